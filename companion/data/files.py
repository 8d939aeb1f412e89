"""Record files as users have them: a JSON list (``.json``) or JSON Lines (``.jsonl``).

Both are read as UTF-8 with or without a byte-order mark (Windows tools often write one).
The format follows the extension: ``.jsonl`` is one record per line (blank lines skipped),
anything else a single JSON value. A ``.json`` that holds JSON Lines is refused with an error
that says so and how to read it (rename it to ``.jsonl``) rather than Python's "Extra data".

Also here: :func:`content_sha256`, the digest that keys a data file or a dataset folder in
the cache, and :func:`import_datasets`, the optional Hugging Face ``datasets`` import.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

JSON_LINES_SUFFIXES = (".jsonl",)
DATASETS_INSTALL = "pip install -e '.[data]'"


class DataFileError(ValueError):
    """A record file that cannot be read as records: ``path`` and ``problem`` (what to do)."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def is_json_lines(path) -> bool:
    """True when ``path``'s extension says JSON Lines (``.jsonl``)."""
    return Path(path).suffix.lower() in JSON_LINES_SUFFIXES


def _parse_lines(path: Path, text: str) -> list:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataFileError(path, f"line {number} is not valid JSON: {error.msg} at column "
                                      f"{error.colno}. A JSON Lines file holds one whole record "
                                      "per line; fix that line.") from None
    return records


def _holds_json_lines(text: str) -> bool:
    """True when ``text`` is two or more JSON values, one per line (JSON Lines)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        return False
    try:
        return all(isinstance(json.loads(line), dict) for line in lines)
    except json.JSONDecodeError:
        return False


def read_json_records(path) -> list:
    """The JSON value of ``path`` (``.json``), or its lines' values as a list (``.jsonl``).

    Raises :class:`DataFileError` naming the file and, for bad JSON, the line; the value is
    returned as parsed (the caller checks that it is a list of records).
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")  # utf-8-sig: a leading BOM is dropped
    if is_json_lines(path):
        return _parse_lines(path, text)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        if _holds_json_lines(text):
            raise DataFileError(path, "holds JSON Lines (one record per line), not a JSON list. "
                                      f"Rename it to {path.stem}.jsonl to read it as JSON Lines, "
                                      "or wrap the records in [ ... ] with commas.") from None
        raise DataFileError(path, f"not valid JSON: {error.msg} at line {error.lineno}, column "
                                  f"{error.colno}. Fix the file there (a missing comma or quote "
                                  "is the usual cause).") from None


def content_sha256(path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (sorted relative paths and bytes),
    so an edited file or dataset folder gets a new digest."""
    path = Path(path)
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        name = file.relative_to(path).as_posix().encode()
        data = file.read_bytes()
        for part in (name, data):  # lengths first: no two layouts hash alike
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()


def import_datasets(purpose: str):
    """The ``datasets`` module, or an ImportError that says how to install it."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{purpose} needs the Hugging Face datasets library, an optional "
                          f"dependency: {DATASETS_INSTALL} (or pip install 'datasets>=3.0')"
                          ) from None
    return datasets
