"""Reference values of the chapters' trained figures, and the bands a re-run must stay inside.

Why bands. A figure that comes out of training (a recall, an accuracy, a KL) depends on float
rounding, and rounding differs between CPUs: PyTorch dispatches AVX-512, AVX2 or plain
kernels by what the processor has (``ATEN_CPU_CAPABILITY`` forces one), and each sums in its
own order. On another CPU every trained figure moves in its last digits, and after a few
hundred training steps often in the second decimal. So the notebook tests compare printed
trained figures by their text only (``nbval``, cells tagged ``trained-figures``), and guard
the numbers here instead: each chapter's metrics JSON is compared with the reference run's
within a band measured from re-runs that changed the seed or the kernel set.

How a band is made (:func:`make_bands`). For every numeric metric, the reference value is
the run that made the committed notebooks; the *variation runs* are the same chapter re-run
with another seed or kernel set. With ``d`` the largest distance of a variation from the
reference, the band is ``reference ± max(factor * d, floor)``, where ``floor`` is a small
absolute width (``floor_fraction`` of the metric's scale) for metrics that moved in the
variations. A metric that did not move in any variation, not even with another seed, is a
structural number (a count of scenes, a configured number of steps) and must match exactly,
unless it is a fraction (every value in [0, 1]: an accuracy, a rate): those get the floor,
because an accuracy that was 0 in every run so far (a task the untrained model never gets
right) reads 1/60 on another CPU, as a fresh clone with other kernels showed.

Every variation run counts ``factor`` (3) times, a seed run as much as a kernel run: made
from fewer runs, with seed runs counted once, the bands let a fresh clone with another kernel
set fall outside in 52 of its 314 metrics. Each run left out in turn and checked against
bands made from the others (:func:`cross_check`, ``bands cross-check``) fell outside in 223
of 1,114 checks with every run counted once, a floor of 0.02 and unmoved fractions exact,
and in 27 under this rule (``factor`` 3 for all, a floor of 0.05 of the scale): about one
metric in 40 of a run on a new CPU may still leave its band (a later fresh clone with AVX2
kernels left it in 9 of 314; with that run added, 23 of 1,428 left-out checks).

An effect measured with its own standard error (a ``.../change`` or ``..._change`` metric
beside a ``.../se`` or ``..._se``) has a second floor, ``SE_FLOOR_Z * sqrt(2) * se``: two
runs that each measure the effect on their own held-out sample differ by about
``sqrt(2) * se`` at one standard deviation, so a band narrower than two of those would fail
a correct run one time in twenty on sampling noise alone. Two or three variation runs
cannot show that spread reliably (a kernel-only run of 3.2 missed its grounding change's
band by 1.5 such standard deviations).

Bands alone still fail a correct run on a new CPU now and then: with some 300 metrics, a
few per-task figures land just outside. So a chapter is judged as a whole
(:func:`judge_chapter`): a headline figure (the summary's and the targets', and every effect
with its own standard error), a structural number, or a figure far outside fails it; up to
``TOLERATED_PER_CHAPTER`` minor figures just outside are reported and tolerated. Under that
rule the cross-check failed 4 of 46 left-out chapters (11 when every metric counted), and
one kernel-only run of five; with two runs of the re-made 3.3 added, 5 of 49 (21 of 1,727
checks), two of them PPO's KL, which moves by a factor of two between kernel sets.

A variation run may cover only some chapters (a run stopped part-way still measured the
chapters it finished); its value is then ``None`` in the bands of the chapters it lacks.
A run made before a notebook changed how some figures are made keeps the figures that did
not change and says ``null`` for the others (:func:`null_paths`): they are then banded by
the other runs alone.

A broken change leaves the band: the lessons' effects (CLIP learning, stage 2 over stage 1)
are far larger than the seed-to-seed spread, and a metric that disappears, appears or
becomes non-finite is reported too. ``python -m companion bands`` runs the variations and
re-makes the reference file; the README says when and how.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from companion.book import (ROOT, BookConfigError, load_book, metrics_path, parse_command_line,
                            parse_overrides, read_metrics, run_chapters)
from companion.summary import RLHF_ROWS, SUMMARY_ROWS, TARGET_ROWS

REFERENCE_FILE = ROOT / "tests" / "reference_metrics.json"
BANDS_DIR = ROOT / "build" / "bands"
# Metrics that are not figures of the lesson: wall-clock times.
_UNCHECKED = re.compile(r"(^|/|_)(seconds|wall|minutes|time_s)($|/|_)")
DEFAULT_FACTOR = 3.0
DEFAULT_FLOOR_FRACTION = 0.05
SE_FLOOR_Z = 2.0
# how a chapter's metrics are judged (:func:`judge_chapter`)
TOLERATED_PER_CHAPTER = 3  # minor figures that may leave their band on a new CPU
GROSS_FACTOR = 3.0         # ... each by at most this many times its band's half-width


class BandError(ValueError):
    """A reference file or a metrics file that cannot be used: the message says which."""


def null_paths(metrics: Mapping, prefix: str = "") -> set[str]:
    """The ``a/b/c`` paths whose value is ``null``: in a variation run's file, a figure that
    run did not measure (the notebook changed how it is made after the run), which then adds
    nothing to that figure's band."""
    out = set()
    for key, value in metrics.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out |= null_paths(value, path)
        elif value is None:
            out.add(path)
    return out


def flatten_metrics(metrics: Mapping, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (nested) metrics dict as ``{"a/b/c": value}``.

    Lists (loss curves), strings and booleans are not figures to band; neither are
    wall-clock times (keys naming seconds or wall time).
    """
    flat = {}
    for key, value in metrics.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, path))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if not _UNCHECKED.search(path):
                flat[path] = float(value)
    return flat


@dataclass(frozen=True)
class Band:
    reference: float
    low: float
    high: float
    # the variation runs' values, in the order of the file's "runs" (None: not in that run)
    runs: tuple[float | None, ...]

    @property
    def exact(self) -> bool:
        return self.low == self.high

    def contains(self, value: float) -> bool:
        if math.isnan(self.reference):
            return math.isnan(value)
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.exact:
            return f"exactly {self.reference:g} (the same in every variation run)"
        runs = ", ".join("-" if v is None else f"{v:.4g}" for v in self.runs)
        return (f"[{self.low:.4g}, {self.high:.4g}] around the reference {self.reference:.4g} "
                f"(variation runs: {runs})")


def make_band(reference: float, variations: Sequence[float], factor: float = DEFAULT_FACTOR,
              floor_fraction: float = DEFAULT_FLOOR_FRACTION,
              factors: Sequence[float] | None = None, se: float | None = None) -> Band:
    """The band of one metric from its reference value and its variation runs' values.

    ``se``: the metric's own standard error where the chapter measured one; the band is then
    at least ``SE_FLOOR_Z * sqrt(2) * se`` wide on each side (see the module's docstring).

    ``factors`` gives each variation run its own factor (default: ``factor`` for all): a run
    with another seed changes the data and the held-out scenes too, so its distance already
    over-states what another CPU does and is taken once, while a run that only changed the
    kernel set is taken ``factor`` times."""
    factors = list(factors) if factors is not None else [factor] * len(variations)
    if len(factors) != len(variations):
        raise BandError(f"{len(factors)} factors for {len(variations)} variation runs")
    if factors and min(factors) < 1:
        raise BandError(f"factor={min(factors)} must be at least 1 (a band narrower than the "
                        "spread it was measured from would fail the runs that made it)")
    runs = tuple(variations)
    pairs = [(f, v) for f, v in zip(factors, variations) if v is not None]
    if not pairs:
        raise BandError("a band needs at least one variation run")
    values = [v for _, v in pairs]
    if any(math.isnan(v) for v in (reference, *values)):
        if all(math.isnan(v) for v in (reference, *values)):
            return Band(reference, reference, reference, runs)
        raise BandError(f"NaN in some runs but not all (reference {reference}, variations "
                        f"{values}): such a metric cannot be banded")
    fraction = all(0 <= v <= 1 for v in (reference, *values))
    if all(v == reference for v in values) and not fraction:
        return Band(reference, reference, reference, runs)
    scale = max(abs(reference), *(abs(v) for v in values), 1.0 if abs(reference) <= 1 else 0)
    half = max(max(f * abs(v - reference) for f, v in pairs), floor_fraction * scale)
    if se is not None:
        if not se >= 0:
            raise BandError(f"standard error {se} must be a non-negative number")
        half = max(half, SE_FLOOR_Z * math.sqrt(2) * se)
    # min/max: with f = 1, reference ∓ |v - reference| can miss v by a rounding error
    return Band(reference, min(reference - half, *values), max(reference + half, *values), runs)


def standard_error_of(key: str, flat: Mapping[str, float]) -> float | None:
    """The standard error a chapter wrote beside an effect (``x/change`` → ``x/se``,
    ``x/accuracy_change`` → ``x/accuracy_se``, ``x/difference`` → ``x/se``), or None."""
    head, _, name = key.rpartition("/")
    prefix = f"{head}/" if head else ""
    if name in ("change", "difference"):
        candidate = prefix + "se"
    elif name.endswith("_change"):
        candidate = prefix + name[: -len("change")] + "se"
    else:
        return None
    return flat.get(candidate)


def make_bands(reference: Mapping[str, Mapping], variations: Sequence[Mapping[str, Mapping]],
               factor: float = DEFAULT_FACTOR, floor_fraction: float = DEFAULT_FLOOR_FRACTION,
               factors: Sequence[float] | None = None) -> dict[str, dict[str, Band]]:
    """Bands for every chapter and metric of ``reference`` ({chapter: metrics dict}).

    Each variation is another run's ``{chapter: metrics dict}``; a run may lack whole chapters
    (it stopped part-way), but a metric missing from a chapter it has is an error (the runs
    must come from the same notebooks), unless the run's file says ``null`` there (a figure
    that run did not measure: :func:`null_paths`). An effect's band is at least as wide as
    its own standard error requires (:func:`standard_error_of`).
    """
    bands: dict[str, dict[str, Band]] = {}
    for chapter, metrics in reference.items():
        flat_ref = flatten_metrics(metrics)
        flat_vars = [flatten_metrics(v[chapter]) if chapter in v else None for v in variations]
        unmeasured = [null_paths(v[chapter]) if chapter in v else set() for v in variations]
        if all(flat is None for flat in flat_vars):
            raise BandError(f"no variation run has metrics for chapter {chapter}")
        bands[chapter] = {}
        for key, value in flat_ref.items():
            values = []
            for number, flat in enumerate(flat_vars):
                if flat is not None and key not in flat and key in unmeasured[number]:
                    values.append(None)
                    continue
                if flat is not None and key not in flat:
                    raise BandError(f"chapter {chapter}: metric {key!r} is in the reference "
                                    f"run but not in variation run {number}")
                values.append(None if flat is None else flat[key])
            bands[chapter][key] = make_band(value, values, factor, floor_fraction, factors,
                                            se=standard_error_of(key, flat_ref))
    return bands


def check_metrics(chapter: str, metrics: Mapping, bands: Mapping[str, Band]) -> list[str]:
    """Problems of one chapter's metrics against its bands (empty: all inside)."""
    return [problem for _, problem in _problems(chapter, metrics, bands)]


def _problems(chapter: str, metrics: Mapping, bands: Mapping[str, Band]
              ) -> list[tuple[str | None, str]]:
    """``(key, problem)`` for each metric outside its band; key None for a metric that is
    missing or has no reference value."""
    flat = flatten_metrics(metrics)
    problems: list[tuple[str | None, str]] = []
    for key, band in bands.items():
        if key not in flat:
            problems.append((None, f"{chapter}: metric {key!r} is missing (the reference has "
                                   f"{band.reference:g})"))
        elif not band.contains(flat[key]):
            problems.append((key, f"{chapter}: {key} = {flat[key]:.4g} is outside "
                                  f"{band.describe()}"))
    for key in sorted(set(flat) - set(bands)):
        problems.append((None, f"{chapter}: metric {key!r} = {flat[key]:.4g} has no reference "
                               "value; if the notebook now writes it on purpose, re-make the "
                               "reference file (python -m companion bands, see the README)"))
    return problems


def headline_keys(chapter: str, reference_metrics: Mapping | None = None) -> set[str]:
    """The metrics of ``chapter`` that must stay inside their bands on any CPU: the figures of
    the chapter summary (3.5) and of its targets (the competent model's, RLHF's), and every
    effect the chapter measured with its own standard error (whose band already allows for
    sampling)."""
    keys = {m.path for row in (*SUMMARY_ROWS, *TARGET_ROWS, *RLHF_ROWS) for m in row.measures
            if m.chapter == chapter}
    if reference_metrics is not None:
        flat = flatten_metrics(reference_metrics)
        keys |= {k for k in flat if standard_error_of(k, flat) is not None}
    return keys


@dataclass(frozen=True)
class Verdict:
    """A chapter's metrics judged against their bands: ``failures`` fail the test; minor
    figures outside their band (``tolerated``) are reported but pass while there are few."""
    failures: tuple[str, ...]
    tolerated: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures


def judge_chapter(chapter: str, metrics: Mapping, bands: Mapping[str, Band],
                  headline: set[str] | None = None,
                  tolerated_per_chapter: int = TOLERATED_PER_CHAPTER,
                  gross_factor: float = GROSS_FACTOR) -> Verdict:
    """Whether one chapter's metrics pass (see the README's "what the test command checks").

    A metric outside its band fails the chapter when it is a headline figure
    (:func:`headline_keys`, the default for ``headline``), when its band is exact (a count or
    a configured number of steps: rounding cannot move it), or when it lies more than
    ``gross_factor`` half-widths from the reference. A minor figure (a per-task accuracy, one
    arm of an ablation) slightly outside is tolerated, up to ``tolerated_per_chapter`` per
    chapter: left out of the bands and checked against the others, runs on new kernels left
    about one such figure in 60 outside (``bands cross-check``), two or three in a chapter
    at once, while a broken change moves a headline figure or many minor ones. A missing,
    new or non-finite metric always fails."""
    if headline is None:
        headline = headline_keys(chapter, {k: b.reference for k, b in bands.items()})
    flat = flatten_metrics(metrics)
    failures, minor = [], []
    for key, problem in _problems(chapter, metrics, bands):
        if key is None:  # missing, or no reference value
            failures.append(problem)
            continue
        band = bands[key]
        half = max(band.high - band.reference, band.reference - band.low)
        if key in headline:
            failures.append(f"{problem} [a headline figure]")
        elif band.exact:
            failures.append(f"{problem} [a structural number]")
        elif not abs(flat[key] - band.reference) <= gross_factor * half:
            failures.append(f"{problem} [more than {gross_factor:g} half-widths away]")
        else:
            minor.append(problem)
    if len(minor) > tolerated_per_chapter:
        failures += [f"{p} [one of {len(minor)} minor figures outside; at most "
                     f"{tolerated_per_chapter} are tolerated]" for p in minor]
        minor = []
    return Verdict(tuple(failures), tuple(minor))


def save_reference(path, bands: Mapping[str, Mapping[str, Band]], runs: Sequence[dict],
                   factor: float, floor_fraction: float, how: str) -> Path:
    """Write the reference file (atomically): how it was made, the runs, every band."""
    path = Path(path)
    data = {
        "how": how,
        "factor": factor,
        "floor_fraction": floor_fraction,
        "runs": list(runs),
        "chapters": {
            chapter: {key: {"reference": b.reference, "low": b.low, "high": b.high,
                            "runs": list(b.runs)} for key, b in sorted(metrics.items())}
            for chapter, metrics in bands.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_reference(path=REFERENCE_FILE) -> dict[str, dict[str, Band]]:
    """``{chapter: {metric: Band}}`` from a reference file, validated."""
    path = Path(path)
    if not path.is_file():
        raise BandError(f"{path}: no reference file; make one with `python -m companion bands`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        chapters = data["chapters"]
        bands = {}
        for chapter, metrics in chapters.items():
            bands[chapter] = {}
            for key, entry in metrics.items():
                band = Band(float(entry["reference"]), float(entry["low"]), float(entry["high"]),
                            tuple(None if v is None else float(v) for v in entry["runs"]))
                if not band.low <= band.reference <= band.high and not math.isnan(band.reference):
                    raise BandError(f"{path}: chapter {chapter}, metric {key!r}: the reference "
                                    f"{band.reference} lies outside its own band")
                bands[chapter][key] = band
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, BandError):
            raise
        raise BandError(f"{path}: not a reference file of this project ({exc!r}); re-make it "
                        "with `python -m companion bands`") from exc
    return bands


def read_run(metrics_dir, chapters: Sequence[str], partial: bool = False) -> dict[str, dict]:
    """``{chapter: metrics}`` from a run's ``metrics/`` folder. ``partial``: a chapter the run
    did not reach is left out (a variation run stopped part-way), as long as one is there."""
    run = {}
    for chapter in chapters:
        try:
            run[chapter] = read_metrics(metrics_dir, chapter)
        except FileNotFoundError:
            if not partial:
                raise BandError(f"{metrics_path(metrics_dir, chapter)}: chapter {chapter} wrote "
                                "no metrics in this run") from None
    if not run:
        raise BandError(f"{metrics_dir}: no chapter wrote metrics in this run")
    return run


def read_variation(metrics_dir, chapters: Sequence[str], may_be_absent: bool = False) -> dict:
    """A variation run's ``{chapter: metrics}`` (the chapters it reached). ``may_be_absent``:
    a run that was not repeated for these chapters (``--keep`` kept its other chapters) may
    have no metrics at all, and then adds nothing."""
    try:
        return read_run(metrics_dir, chapters, partial=True)
    except BandError:
        if may_be_absent:
            return {}
        raise


def recorded_runs(path) -> dict[str, dict]:
    """The runs an existing reference file records, by name (none when there is no file):
    a run made again under the same name keeps what the file said it changed, unless
    ``--describe`` says it anew."""
    try:
        runs = json.loads(Path(path).read_text(encoding="utf-8"))["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {r["name"]: r for r in runs if isinstance(r, dict) and "name" in r}


def kept_bands(path, keep: Sequence[str], names: Sequence[str], chapters: Sequence[str]
               ) -> tuple[dict[str, dict[str, Band]], dict[str, dict]]:
    """The bands of the chapters in ``keep``, read from the existing reference file, and that
    file's runs by name. Keeping is only sound when the file was made from the same runs in
    the same order (each band lists its runs' values by position)."""
    if not keep:
        return {}, {}
    unknown = [c for c in keep if c not in chapters]
    if unknown:
        raise BandError(f"--keep {' '.join(unknown)}: no such chapter in book.toml "
                        f"(chapters: {', '.join(chapters)})")
    bands = load_reference(path)
    runs = json.loads(Path(path).read_text(encoding="utf-8"))["runs"]
    if [r["name"] for r in runs] != list(names):
        raise BandError(f"{path} was made from the runs {[r['name'] for r in runs]}; --keep "
                        f"needs the same runs in the same order, got {list(names)}")
    missing = [c for c in keep if c not in bands]
    if missing:
        raise BandError(f"{path} has no bands for {', '.join(missing)} to keep")
    return {c: bands[c] for c in keep}, {r["name"]: r for r in runs}


def export_runs(path, out_dir) -> dict[str, Path]:
    """Write each run recorded in a reference file back as a run folder,
    ``out_dir/NAME/metrics/CHAPTER.json``, holding the figures the file kept of it (the
    banded numbers: no curves, strings or times). A run that did not cover a chapter gets no
    file for it. With these folders a new reference file can be made from the old runs
    together with new ones (a chapter re-run after a change, or a run on another CPU)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    bands = load_reference(path)
    folders = {}
    for index, run in enumerate(data["runs"]):
        folder = Path(out_dir) / run["name"]
        for chapter, metrics in bands.items():
            values = {key: band.reference if index == 0 else band.runs[index - 1]
                      for key, band in metrics.items()}
            if all(v is None for v in values.values()):
                continue
            nested: dict = {}
            for key, value in values.items():
                *parents, leaf = key.split("/")
                node = nested
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = value
            target = metrics_path(folder, chapter)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(nested, indent=1), encoding="utf-8")
        folders[run["name"]] = folder
    return folders


def cross_check(reference: Mapping[str, Mapping], variations: Mapping[str, Mapping[str, Mapping]],
                factor: float = DEFAULT_FACTOR, floor_fraction: float = DEFAULT_FLOOR_FRACTION
                ) -> dict[str, dict[str, Verdict]]:
    """How well the band rule predicts a run it has not seen: each variation run (name ->
    ``{chapter: metrics}``) in turn is left out, bands are made from the reference and the
    other runs, and the left-out run is judged against them (:func:`judge_chapter`). Returns
    ``{run: {chapter: Verdict}}`` for every chapter the run and at least one other run cover;
    a verdict's failures and tolerated figures together are every metric outside its band.
    A rule that passes its own runs but fails left-out ones would fail the next CPU too.
    A figure the left-out run did not measure (``null`` there), or that no other run measured,
    is not judged."""
    out: dict[str, dict[str, Verdict]] = {}
    for name, run in variations.items():
        out[name] = {}
        for chapter in reference:
            others = [v for n, v in variations.items() if n != name and chapter in v]
            if chapter not in run or not others:
                continue
            measured = [set(flatten_metrics(v[chapter])) for v in others]
            judged = {k: v for k, v in flatten_metrics(run[chapter]).items()
                      if any(k in m for m in measured)}
            flat_ref = flatten_metrics(reference[chapter])
            bands = make_bands({chapter: {k: flat_ref[k] for k in judged if k in flat_ref}},
                               others, factor, floor_fraction)
            out[name][chapter] = judge_chapter(
                chapter, judged, bands[chapter], headline_keys(chapter, reference[chapter]))
    return out


# --- the command: run the variations, make the file ------------------------------------------

def run_variation(name: str, overrides: dict, chapters: Sequence[str] | None = None,
                  log=print) -> Path:
    """Run the book (default profile) into ``build/bands/NAME`` with its own cache, so that no
    model trained by another run is reused; return the run's folder (holding ``metrics/``).
    The kernel set is taken from this process's environment (``ATEN_CPU_CAPABILITY`` and
    friends), which the notebooks' kernels inherit."""
    book = load_book()
    book.build_dir = BANDS_DIR / name
    book.cache_dir = BANDS_DIR / name / "cache"
    run_chapters(book, list(chapters) if chapters else None, "default", overrides,
                 progress=False, log=log)
    return book.run_dir("default")


def _run_folder(name: str) -> Path:
    """A variation run by name (``build/bands/NAME/default``) or by the path of its folder."""
    path = Path(name)
    if (path / "metrics").is_dir():
        return path
    return BANDS_DIR / name / "default"


def main_bands(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m companion bands",
        description="Run the book's variation runs and (re)make the reference file of trained "
                    "figures that the notebook tests compare against.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the book into build/bands/NAME (own cache)")
    p_run.add_argument("name")
    p_run.add_argument("chapters", nargs="*")
    p_run.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    p_make = sub.add_parser("make", help="make the reference file from finished runs")
    p_make.add_argument("reference", help="run name of the reference (the committed outputs)")
    p_make.add_argument("variations", nargs="+", help="run names of the variation runs")
    p_make.add_argument("--describe", action="append", default=[], metavar="NAME=TEXT",
                        help="what a run changed (seed, kernel set, CPU), for the file")
    p_make.add_argument("--factor", type=float, default=DEFAULT_FACTOR,
                        help="how many times a variation run's distance the band is wide")
    p_make.add_argument("--run-factor", action="append", default=[], metavar="NAME=F",
                        help="another factor for one run (e.g. 1 for a run with another seed)")
    p_make.add_argument("--floor-fraction", type=float, default=DEFAULT_FLOOR_FRACTION)
    p_make.add_argument("--output", default=str(REFERENCE_FILE))
    p_make.add_argument("--keep", nargs="+", default=[], metavar="CHAPTER",
                        help="keep these chapters' bands from the existing file (their "
                             "notebooks did not change); the runs need cover only the others")
    p_export = sub.add_parser("export", help="write the file's runs back as run folders "
                                             "(DIR/NAME/metrics/), to re-make it with new runs")
    p_export.add_argument("out_dir")
    p_export.add_argument("--reference", default=str(REFERENCE_FILE))
    p_cross = sub.add_parser("cross-check", help="check each variation run against bands made "
                                                 "from the reference and the other runs")
    p_cross.add_argument("reference")
    p_cross.add_argument("variations", nargs="+")
    p_cross.add_argument("--factor", type=float, default=DEFAULT_FACTOR)
    p_cross.add_argument("--floor-fraction", type=float, default=DEFAULT_FLOOR_FRACTION)
    p_check = sub.add_parser("check", help="check a run's metrics against the reference file")
    p_check.add_argument("metrics_dir", help="a run folder holding metrics/ (e.g. build/default)")
    p_check.add_argument("--reference", default=str(REFERENCE_FILE))
    args = parse_command_line(parser, sub.choices, argv)
    chapters = [c.id for c in load_book().chapters]
    try:
        if args.command == "run":
            run_variation(args.name, parse_overrides(args.param), args.chapters or None)
            return 0
        if args.command == "export":
            for name, folder in export_runs(args.reference, args.out_dir).items():
                print(f"{name}: {folder}")
            return 0
        if args.command == "cross-check":
            reference = read_run(_run_folder(args.reference), chapters)
            runs = {name: read_variation(_run_folder(name), chapters) for name in args.variations}
            result = cross_check(reference, runs, args.factor, args.floor_fraction)
            checks = outside = judged = failed = 0
            for name, by_chapter in result.items():
                for chapter, verdict in by_chapter.items():
                    n = len(flatten_metrics(reference[chapter]))
                    out = len(verdict.failures) + len(verdict.tolerated)
                    checks, outside = checks + n, outside + out
                    judged, failed = judged + 1, failed + (not verdict.passed)
                    if out:
                        print(f"{name} left out, {chapter}: {out} of {n} outside, "
                              + ("FAILS" if verdict.failures else "passes (minor figures)"))
                        print("\n".join(f"    {p}" for p in verdict.failures + verdict.tolerated))
            print(f"{outside} of {checks} left-out checks outside their bands; {failed} of "
                  f"{judged} left-out chapters fail (factor {args.factor:g}, floor "
                  f"{args.floor_fraction:g}, at most {TOLERATED_PER_CHAPTER} minor figures "
                  "tolerated per chapter)")
            return 0
        if args.command == "make":
            described = dict(item.partition("=")[::2] for item in args.describe)
            names = [args.reference, *args.variations]
            kept, old_runs = kept_bands(args.output, args.keep, names, chapters)
            old_runs = old_runs or recorded_runs(args.output)  # their descriptions carry over
            fresh = [c for c in chapters if c not in kept]
            reference = read_run(_run_folder(args.reference), fresh)
            variations = [read_variation(_run_folder(name), fresh, may_be_absent=bool(kept))
                          for name in args.variations]
            run_factors = {name: float(f) for name, _, f in
                           (item.partition("=") for item in args.run_factor)}
            factors = [run_factors.get(name, args.factor) for name in args.variations]
            made = make_bands(reference, variations, args.factor, args.floor_fraction,
                              factors) if fresh else {}
            bands = {c: kept[c] if c in kept else made[c] for c in chapters}
            runs = [{"name": args.reference, "role": "reference",
                     "changed": described.get(args.reference,
                                              old_runs.get(args.reference, {}).get("changed", ""))}]
            for name, f, variation in zip(args.variations, factors, variations):
                old = old_runs.get(name, {})
                entry = {"name": name, "role": "variation", "factor": f,
                         "changed": described.get(name, old.get("changed", ""))}
                covered = set(variation) | {c for c in kept
                                            if c in old.get("chapters", chapters)}
                if len(covered) < len(chapters):
                    entry["chapters"] = [c for c in chapters if c in covered]
                runs.append(entry)
            how = (f"reference = run {args.reference!r} (the run that made the committed "
                   "notebooks); band = reference ± max(over the variation runs: the run's "
                   "factor × its distance from the reference; "
                   f"{args.floor_fraction:g} × the metric's scale; for an effect with its "
                   f"own standard error, {SE_FLOOR_Z:g} × √2 × se); a metric no variation "
                   "moved must match exactly, unless it is a fraction (then the floor); "
                   "a run listing its chapters covered only those. "
                   "Made with `python -m companion bands make "
                   f"{' '.join([args.reference, *args.variations])}"
                   + "".join(f" --run-factor {item}" for item in args.run_factor)
                   + (f" --keep {' '.join(args.keep)}" if args.keep else "") + "`"
                   + (f"; the bands of {', '.join(args.keep)} were kept from the file "
                      "before, made from the same runs of those chapters" if args.keep else "")
                   + ".")
            path = save_reference(args.output, bands, runs, args.factor, args.floor_fraction,
                                  how)
            n = sum(len(m) for m in bands.values())
            exact = sum(b.exact for m in bands.values() for b in m.values())
            print(f"{path}: {n} metrics of {len(bands)} chapters ({exact} exact)")
            return 0
        bands = load_reference(args.reference)
        failures, tolerated = [], []
        for chapter in chapters:
            run = read_run(Path(args.metrics_dir), [chapter])
            verdict = judge_chapter(chapter, run[chapter], bands.get(chapter, {}))
            failures += verdict.failures
            tolerated += verdict.tolerated
        for problem in tolerated:
            print(f"tolerated (a minor figure): {problem}")
        if failures:
            print("\n".join(failures))
        elif tolerated:
            print(f"passed: every headline figure and structural number inside its band; "
                  f"{len(tolerated)} minor figures outside, tolerated (at most "
                  f"{TOLERATED_PER_CHAPTER} per chapter, each within {GROSS_FACTOR:g} "
                  "half-widths)")
        else:
            print("every metric inside its band")
        return 1 if failures else 0
    except (BandError, BookConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
