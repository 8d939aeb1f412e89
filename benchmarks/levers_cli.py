"""What the lever benchmarks share: one run per JSON argument of recipe fields, the thread
count and cache folder, and one JSON line per run appended to ``--out``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lever_parser(doc: str) -> argparse.ArgumentParser:
    """The command line of a lever benchmark; its module docstring is the help."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="JSON",
                        help="one run: a JSON object of recipe fields ({} for the defaults)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache"))
    parser.add_argument("--out", default="", help="a .jsonl file the runs' lines are added to")
    return parser


def parse_runs(parser: argparse.ArgumentParser, texts: list[str],
               check: Callable[[dict], None], what: str) -> list[dict]:
    """Each run's options; ``check(options)`` raises ValueError or TypeError for a run that
    is not ``what`` (then the command stops with the run, and why, before training)."""
    runs = []
    for text in texts:
        try:
            options = json.loads(text)
            if not isinstance(options, dict):
                raise ValueError("not a JSON object")
            check(options)
        except (ValueError, TypeError) as exc:
            parser.error(f"run {text!r}: not a JSON object of {what} ({exc})")
        runs.append(options)
    return runs


def report(row: dict, out: str) -> None:
    """Print one run's line and, with ``out``, append it there."""
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
