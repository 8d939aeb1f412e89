"""The book manifest (``book.toml``) and the runner that executes chapters with papermill.

``book.toml`` is this project's own manifest: the book's title, its chapters in order and
parameter profiles. It is validated on load; every error names the key, chapter or file
that is wrong and what to do about it.

Profiles
--------
``[profile.NAME]`` has a ``description`` and optionally ``cell_timeout`` (seconds per cell)
and ``parameters``: a table per chapter id (or ``"*"`` for every chapter) of papermill
parameters. A profile may only set parameters that the chapter's notebook declares in its
``parameters`` cell, so a typo fails at load time instead of being silently ignored.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import sys
import time
import tokenize
import tomllib
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MANIFEST = ROOT / "book.toml"

_BOOK_KEYS = {"title", "subtitle", "build_dir", "cache_dir", "kernel"}
_CHAPTER_KEYS = {"id", "notebook", "title", "seed_section", "budget_minutes"}
_CHAPTER_REQUIRED = {"id", "notebook", "title", "seed_section"}
_PROFILE_KEYS = {"description", "cell_timeout", "parameters"}
# Parameters the runner itself passes to every notebook.
RUNNER_PARAMETERS = ("output_dir", "cache_dir")
# Parameters the runner passes to a notebook that declares them (unless the profile sets
# them): the profile it runs and its -p options, by which a notebook rebuilds the recipes of
# the chapters whose models it starts from (companion.rlhf.notebook_recipe).
UPSTREAM_PARAMETERS = ("upstream", "upstream_changes")


class BookConfigError(ValueError):
    """book.toml is malformed: the message names the key, chapter or file."""


@dataclass(frozen=True)
class Chapter:
    id: str
    notebook: Path  # absolute path
    title: str
    seed_section: str
    budget_minutes: float | None = None

    @property
    def stem(self) -> str:
        return self.notebook.stem


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    cell_timeout: int | None
    parameters: dict[str, dict[str, Any]]  # chapter id or "*" -> {name: value}

    def parameters_for(self, chapter_id: str) -> dict[str, Any]:
        merged = dict(self.parameters.get("*", {}))
        merged.update(self.parameters.get(chapter_id, {}))
        return merged


@dataclass
class Book:
    path: Path
    title: str
    subtitle: str
    build_dir: Path
    cache_dir: Path
    kernel: str
    chapters: list[Chapter]
    profiles: dict[str, Profile]
    declared: dict[str, dict[str, dict]] = field(default_factory=dict)  # chapter id -> params

    def chapter(self, chapter_id: str) -> Chapter:
        for chapter in self.chapters:
            if chapter.id == chapter_id or chapter.stem == chapter_id:
                return chapter
        known = ", ".join(c.id for c in self.chapters)
        raise BookConfigError(f"{self.path.name}: no chapter {chapter_id!r}; chapters are {known}")

    def profile(self, name: str) -> Profile:
        if name not in self.profiles:
            known = ", ".join(self.profiles)
            raise BookConfigError(f"{self.path.name}: no profile {name!r}; profiles are {known}")
        return self.profiles[name]

    def run_dir(self, profile: str) -> Path:
        return self.build_dir / profile


def notebook_parameters(notebook: Path) -> dict[str, dict]:
    """Parameters declared in a notebook's cell tagged ``parameters``.

    Returns ``{name: {"default": str, "type": str, "help": str}}`` as papermill sees them.
    """
    with open(notebook, encoding="utf-8") as handle:
        nb = json.load(handle)
    cells = [
        c for c in nb.get("cells", [])
        if c.get("cell_type") == "code" and "parameters" in c.get("metadata", {}).get("tags", [])
    ]
    if not cells:
        raise BookConfigError(
            f"{notebook}: no code cell tagged 'parameters'; papermill needs one. "
            "Tag the first code cell 'parameters' in JupyterLab (property inspector)."
        )
    source = cells[0]["source"]
    source = "".join(source) if isinstance(source, list) else source
    return parse_parameters_source(source, where=str(notebook))


def parse_parameters_source(source: str, where: str = "<cell>") -> dict[str, dict]:
    """Parse ``name: type = value  # help`` lines of a parameters cell; a help text may go
    on in comment lines that follow its assignment, indented after the ``#``."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise BookConfigError(f"{where}: parameters cell is not valid Python ({exc})") from exc
    lines = source.splitlines()
    params: dict[str, dict] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, annotation = node.targets[0], None
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, annotation = node.target, node.annotation
        else:
            continue
        if not isinstance(target, ast.Name):
            continue
        line = lines[node.end_lineno - 1]
        help_text = _comment(line)
        for more in lines[node.end_lineno:]:
            if not more.startswith("#  ") or not help_text:
                break
            help_text += " " + more[1:].strip()
        params[target.id] = {
            "default": ast.get_source_segment(source, node.value),
            "type": ast.unparse(annotation) if annotation is not None else "",
            "help": help_text,
        }
    return params


def _comment(line: str) -> str:
    """The text of a line's comment, ``#`` in strings aside."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line).readline))
    except (tokenize.TokenError, SyntaxError):
        return line.split("#", 1)[1].strip() if "#" in line else ""
    return next((t.string[1:].strip() for t in tokens if t.type == tokenize.COMMENT), "")


def _check_keys(table: dict, allowed: set[str], where: str, path: Path) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise BookConfigError(
            f"{path.name}: unknown key {unknown[0]!r} in {where}; allowed keys are "
            f"{', '.join(sorted(allowed))}"
        )


def load_book(path: str | os.PathLike | None = None) -> Book:
    """Read and validate ``book.toml``; raise :class:`BookConfigError` naming what is wrong."""
    path = Path(path) if path is not None else DEFAULT_MANIFEST
    if not path.is_file():
        raise BookConfigError(f"{path}: book manifest not found; run from the project root")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise BookConfigError(f"{path.name}: not valid TOML ({exc})") from exc
    root = path.parent
    _check_keys(data, {"book", "chapter", "profile"}, "the top level", path)

    book_table = data.get("book")
    if not isinstance(book_table, dict) or "title" not in book_table:
        raise BookConfigError(f"{path.name}: a [book] table with a 'title' is required")
    _check_keys(book_table, _BOOK_KEYS, "[book]", path)

    chapters: list[Chapter] = []
    declared: dict[str, dict[str, dict]] = {}
    raw_chapters = data.get("chapter", [])
    if not isinstance(raw_chapters, list) or not raw_chapters:
        raise BookConfigError(f"{path.name}: at least one [[chapter]] is required")
    for index, raw in enumerate(raw_chapters):
        where = f"[[chapter]] #{index + 1}" + (f" (id {raw.get('id')!r})" if "id" in raw else "")
        _check_keys(raw, _CHAPTER_KEYS, where, path)
        missing = sorted(_CHAPTER_REQUIRED - set(raw))
        if missing:
            raise BookConfigError(f"{path.name}: {where} lacks the key {missing[0]!r}")
        for key in _CHAPTER_REQUIRED:
            if not isinstance(raw[key], str) or not raw[key].strip():
                raise BookConfigError(f"{path.name}: {where}: {key!r} must be a non-empty string")
        if raw["id"] in declared:
            raise BookConfigError(f"{path.name}: chapter id {raw['id']!r} appears twice")
        notebook = (root / raw["notebook"]).resolve()
        if not notebook.is_file():
            raise BookConfigError(
                f"{path.name}: {where}: notebook {raw['notebook']!r} does not exist "
                f"(looked for {notebook})"
            )
        declared[raw["id"]] = notebook_parameters(notebook)
        for name in RUNNER_PARAMETERS:
            if name not in declared[raw["id"]]:
                raise BookConfigError(
                    f"{path.name}: {where}: notebook {raw['notebook']} must declare the "
                    f"parameter {name!r} (the runner passes it)"
                )
        chapters.append(
            Chapter(raw["id"], notebook, raw["title"], raw["seed_section"],
                    raw.get("budget_minutes"))
        )

    profiles: dict[str, Profile] = {}
    for name, raw in data.get("profile", {}).items():
        where = f"[profile.{name}]"
        if not isinstance(raw, dict):
            raise BookConfigError(f"{path.name}: {where} must be a table")
        _check_keys(raw, _PROFILE_KEYS, where, path)
        params = raw.get("parameters", {})
        for chapter_id, values in params.items():
            pwhere = f"[profile.{name}.parameters.\"{chapter_id}\"]"
            if chapter_id != "*" and chapter_id not in declared:
                raise BookConfigError(
                    f"{path.name}: {pwhere} names no chapter; chapters are "
                    f"{', '.join(declared)} (or \"*\" for all)"
                )
            targets = list(declared) if chapter_id == "*" else [chapter_id]
            for key in values:
                if key in RUNNER_PARAMETERS:
                    raise BookConfigError(
                        f"{path.name}: {pwhere} sets {key!r}, which the runner sets itself"
                    )
                for target in targets:
                    if key not in declared[target]:
                        nb = next(c.notebook for c in chapters if c.id == target)
                        raise BookConfigError(
                            f"{path.name}: {pwhere} sets {key!r}, which {nb.relative_to(root)} "
                            f"(chapter {target}) does not declare; it declares "
                            f"{', '.join(declared[target])}"
                        )
        timeout = raw.get("cell_timeout")
        if timeout is not None and (not isinstance(timeout, int) or timeout <= 0):
            raise BookConfigError(f"{path.name}: {where}: cell_timeout must be a positive integer")
        profiles[name] = Profile(name, raw.get("description", ""), timeout, dict(params))
    for required in ("default", "smoke"):
        if required not in profiles:
            raise BookConfigError(f"{path.name}: a [profile.{required}] table is required")

    return Book(
        path=path,
        title=book_table["title"],
        subtitle=book_table.get("subtitle", ""),
        build_dir=(root / book_table.get("build_dir", "build")).resolve(),
        cache_dir=(root / book_table.get("cache_dir", ".cache")).resolve(),
        kernel=book_table.get("kernel", "python3"),
        chapters=chapters,
        profiles=profiles,
        declared=declared,
    )


def parse_cli_value(text: str) -> Any:
    """``-p key=value`` values: Python literals (1, 0.5, True, 'x', [1, 2]) or plain strings."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """The ``-p KEY=VALUE`` options of the command line as ``{key: value}``
    (values read by :func:`parse_cli_value`); a malformed item raises BookConfigError."""
    overrides = {}
    for item in items:
        if "=" not in item:
            raise BookConfigError(f"-p {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        overrides[key.strip()] = parse_cli_value(value)
    return overrides


def resolve_parameters(
    book: Book, chapter: Chapter, profile: str, overrides: dict[str, Any]
) -> dict[str, Any]:
    """Profile parameters, then command-line overrides the chapter declares, then runner paths."""
    params = book.profile(profile).parameters_for(chapter.id)
    declared = book.declared[chapter.id]
    params.update({k: v for k, v in overrides.items() if k in declared})
    profile_name, changes_name = UPSTREAM_PARAMETERS
    if profile_name in declared:
        params.setdefault(profile_name, profile)
    if changes_name in declared:
        params.setdefault(changes_name, dict(overrides))
    run_dir = book.run_dir(profile)
    params["output_dir"] = str(run_dir)
    params["cache_dir"] = str(book.cache_dir)
    return params


def chapter_parameters(book: Book, chapter_id: str, profile: str = "default",
                       changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every parameter of a chapter as ``book run --profile PROFILE -p NAME=VALUE...`` runs
    it: its notebook's declared values, then the profile's, then the ``changes`` it declares
    (other names are ignored, as the runner ignores a ``-p`` option a chapter does not
    declare). The runner's own paths are left out."""
    chapter = book.chapter(chapter_id)
    declared = book.declared[chapter.id]
    values = {}
    for name, spec in declared.items():
        try:
            values[name] = ast.literal_eval(spec["default"])
        except (ValueError, SyntaxError) as exc:
            raise BookConfigError(
                f"{chapter.notebook.name}: parameter {name} = {spec['default']}: not a Python "
                f"literal, so its value cannot be read without running the notebook ({exc})"
            ) from exc
    values.update(book.profile(profile).parameters_for(chapter.id))
    values.update({k: v for k, v in (changes or {}).items() if k in declared})
    for name in RUNNER_PARAMETERS:
        values.pop(name, None)
    return values


def metrics_path(output_dir: str | os.PathLike, chapter_id: str) -> Path:
    return Path(output_dir) / "metrics" / f"{chapter_id}.json"


def write_metrics(chapter_id: str, metrics: dict, output_dir: str | os.PathLike) -> Path:
    """Write a chapter's measured metrics as JSON (atomically); return the path."""
    path = metrics_path(output_dir, chapter_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def read_metrics(output_dir: str | os.PathLike, chapter_id: str) -> dict:
    path = metrics_path(output_dir, chapter_id)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no metrics for chapter {chapter_id}; run `python -m companion book run "
            f"{chapter_id}` first"
        )
    return json.loads(path.read_text())


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to metrics JSON")


def _shown(path: Path, book: Book) -> str:
    """``path`` relative to the book's folder when it lies inside it, else absolute."""
    try:
        return str(path.relative_to(book.path.parent))
    except ValueError:
        return str(path)


@dataclass
class RunResult:
    chapter: Chapter
    output_notebook: Path
    metrics_file: Path | None
    seconds: float


def run_chapters(
    book: Book,
    chapter_ids: list[str] | None = None,
    profile: str = "default",
    overrides: dict[str, Any] | None = None,
    *,
    progress: bool = True,
    log=print,
) -> list[RunResult]:
    """Execute chapters with papermill; return where each executed notebook and metrics went."""
    import papermill  # imported here so `book list` stays fast

    overrides = dict(overrides or {})
    chapters = [book.chapter(c) for c in chapter_ids] if chapter_ids else list(book.chapters)
    for key in overrides:
        if key in RUNNER_PARAMETERS:
            raise BookConfigError(f"-p {key}=...: the runner sets {key!r} itself")
        if not any(key in book.declared[c.id] for c in chapters):
            raise BookConfigError(
                f"-p {key}=...: none of the chapters {', '.join(c.id for c in chapters)} "
                f"declares a parameter {key!r} (see `python -m companion book list`)"
            )
    prof = book.profile(profile)
    run_dir = book.run_dir(profile)
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    results = []
    for number, chapter in enumerate(chapters, 1):
        params = resolve_parameters(book, chapter, profile, overrides)
        shown = {k: v for k, v in params.items() if k not in RUNNER_PARAMETERS}
        log(f"[{number}/{len(chapters)}] {chapter.id} {chapter.title} "
            f"(profile {profile}{', ' + str(shown) if shown else ''})")
        out = run_dir / "notebooks" / chapter.notebook.name
        start = time.perf_counter()
        papermill.execute_notebook(
            str(chapter.notebook),
            str(out),
            parameters=params,
            kernel_name=book.kernel,
            cwd=str(chapter.notebook.parent),
            execution_timeout=prof.cell_timeout,
            progress_bar=progress,
            report_mode=False,
        )
        seconds = time.perf_counter() - start
        metrics = metrics_path(run_dir, chapter.id)
        metrics_file = metrics if metrics.is_file() else None
        log(f"      done in {seconds:.1f} s -> {_shown(out, book)}"
            + (f", metrics {_shown(metrics, book)}" if metrics_file else ""))
        results.append(RunResult(chapter, out, metrics_file, seconds))
    return results


def render_html(book: Book, profile: str = "default", *, committed: bool = False,
                log=print) -> Path:
    """Render executed chapters to HTML with nbconvert plus an index page in book order.

    ``committed=True`` renders the notebooks under ``notebooks/`` (executed, outputs
    committed) instead of a profile's run.
    """
    import nbformat  # the `book` extra, like papermill: imported where it is used
    from nbconvert import HTMLExporter

    run_dir = book.run_dir("committed" if committed else profile)
    html_dir = run_dir / "html"
    html_dir.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter()
    entries = []
    for chapter in book.chapters:
        source = chapter.notebook if committed else run_dir / "notebooks" / chapter.notebook.name
        if not source.is_file():
            raise FileNotFoundError(
                f"{source}: chapter {chapter.id} has not been executed with profile {profile}; "
                f"run `python -m companion book run {chapter.id} --profile {profile}` first"
            )
        nb = nbformat.read(source, as_version=4)
        body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": chapter.title}})
        page = html_dir / f"{chapter.stem}.html"
        page.write_text(body, encoding="utf-8")
        entries.append((chapter, page.name))
        log(f"  {chapter.id}: {_shown(page, book)}")
    index = html_dir / "index.html"
    index.write_text(_index_page(book, entries, profile, committed), encoding="utf-8")
    log(f"contents page: {_shown(index, book)}")
    return index


def _index_page(book: Book, entries, profile: str, committed: bool) -> str:
    items = "\n".join(
        f'    <li><a href="{escape(page)}">{escape(c.id)} {escape(c.title)}</a>'
        f' <span class="seed">seed section {escape(c.seed_section)}</span></li>'
        for c, page in entries
    )
    source = "committed notebooks" if committed else f"profile '{escape(profile)}'"
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{escape(book.title)}</title>
<style>body{{font-family:sans-serif;max-width:48em;margin:2em auto;line-height:1.5}}
.seed{{color:#777;font-size:90%}}</style></head>
<body>
  <h1>{escape(book.title)}</h1>
  <p>{escape(book.subtitle)}</p>
  <h2>Contents</h2>
  <ol class="contents">
{items}
  </ol>
  <p class="seed">Rendered from {source}.</p>
</body>
</html>
"""


def format_listing(book: Book, profile: str | None = None) -> str:
    """Human-readable chapter list with each notebook's parameters (for `book list`)."""
    lines = [book.title, ""]
    for chapter in book.chapters:
        budget = f", budget ~{chapter.budget_minutes:g} min" if chapter.budget_minutes else ""
        lines.append(f"{chapter.id}  {chapter.title}  [seed {chapter.seed_section}{budget}]")
        lines.append(f"      {chapter.notebook.relative_to(book.path.parent)}")
        overrides = book.profile(profile).parameters_for(chapter.id) if profile else {}
        for name, spec in book.declared[chapter.id].items():
            value = f"{spec['default']}"
            if name in overrides:
                value += f"  (profile {profile}: {overrides[name]!r})"
            lines.append(f"      {name:<22} = {value:<28} # {spec['help']}")
        lines.append("")
    lines.append("profiles: " + ", ".join(
        f"{p.name} ({p.description})" if p.description else p.name
        for p in book.profiles.values()))
    return "\n".join(lines)


def parse_command_line(parser, commands: dict, argv: list[str]):
    """Parse ``argv`` with a parser that has sub-commands (``commands``: the sub-parsers by
    name), letting a command's positional arguments come after its options as well as
    before (``bands run NAME -p seed=1 3.2 3.3.1``). Plain ``parse_args`` refuses the
    chapters there: a ``nargs="*"`` positional is filled (empty) before the options."""
    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args
    command = commands[args.command]
    start = argv.index(args.command) + 1
    for key, value in vars(command.parse_intermixed_args(argv[start:])).items():
        setattr(args, key, value)
    return args


def main_book(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m companion book",
                                     description="List, run and render the book's chapters.")
    parser.add_argument("--manifest", default=str(DEFAULT_MANIFEST), help="path to book.toml")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list chapters and their parameters")
    p_list.add_argument("--profile", default=None, help="also show this profile's values")
    p_run = sub.add_parser("run", help="run chapters through papermill")
    p_run.add_argument("chapters", nargs="*", help="chapter ids (default: all, in book order)")
    p_run.add_argument("--profile", default="default", help="parameter profile (book.toml)")
    p_run.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                       help="override a parameter in the chapters that declare it")
    p_run.add_argument("--no-progress", action="store_true", help="hide papermill's cell bar")
    p_html = sub.add_parser("html", help="render executed chapters to HTML")
    p_html.add_argument("--profile", default="default", help="which run to render")
    p_html.add_argument("--committed", action="store_true",
                        help="render the committed notebooks instead of a run")
    args = parse_command_line(parser, sub.choices, argv)

    try:
        book = load_book(args.manifest)
        if args.command == "list":
            if args.profile:
                book.profile(args.profile)
            print(format_listing(book, args.profile))
        elif args.command == "run":
            overrides = parse_overrides(args.param)
            results = run_chapters(book, args.chapters or None, args.profile, overrides,
                                   progress=not args.no_progress)
            run_dir = book.run_dir(args.profile)
            total = sum(r.seconds for r in results)
            print(f"\n{len(results)} chapter(s) in {total:.1f} s")
            print(f"executed notebooks: {run_dir / 'notebooks'}")
            print(f"metrics:            {run_dir / 'metrics'}")
        elif args.command == "html":
            render_html(book, args.profile, committed=args.committed)
    except BookConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
