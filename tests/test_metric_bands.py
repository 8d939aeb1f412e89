"""The trained figures, guarded within measured bands (``companion/bands.py``).

Two kinds of tests:

- unit tests of the band logic (how a band is made from variation runs, what a check
  reports, the reference file's validation);
- ``test_chapter_metrics_within_bands``: after nbval has executed a notebook at its default
  parameters in this same pytest session, the metrics JSON it wrote must lie inside the bands
  of ``tests/reference_metrics.json``. ``scripts/test.sh`` collects this file after the
  notebooks, so these run last; collected without the notebooks they skip and say why.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest

from companion.bands import (Band, BandError, check_metrics, flatten_metrics, headline_keys,
                             judge_chapter, load_reference, make_band, make_bands,
                             save_reference)
from companion.book import load_book, metrics_path

ROOT = Path(__file__).resolve().parent.parent
BOOK = load_book(ROOT / "book.toml")
NBVAL_OUTPUT_DIR = ROOT / "build" / "interactive"  # the notebooks' default output_dir


# --- the band logic ---------------------------------------------------------------------------

def test_flatten_keeps_numbers_and_drops_curves_strings_flags_and_times():
    metrics = {"acc": 0.5, "n": 3, "nested": {"kl": 1.25, "deep": {"x": -2}},
               "curve": [0.1, 0.2], "name": "DPO", "ok": True, "train_seconds": 12.0,
               "stage2": {"wall_seconds": 3.0}, "final_temperature": 0.01}
    assert flatten_metrics(metrics) == {"acc": 0.5, "n": 3.0, "nested/kl": 1.25,
                                        "nested/deep/x": -2.0, "final_temperature": 0.01}


def test_band_is_the_reference_plus_minus_factor_times_the_largest_deviation():
    band = make_band(0.50, [0.47, 0.52], factor=3.0, floor_fraction=0.0)
    assert band.low == pytest.approx(0.50 - 0.09) and band.high == pytest.approx(0.50 + 0.09)
    assert band.contains(0.42) and not band.contains(0.40) and not band.contains(0.60)


def test_band_has_a_floor_for_metrics_that_moved_only_a_little():
    band = make_band(0.9, [0.9001], factor=3.0, floor_fraction=0.02)
    assert band.high - band.reference == pytest.approx(0.02)  # fractions: scale 1
    big = make_band(200.0, [200.5], factor=3.0, floor_fraction=0.02)
    assert big.high - big.reference == pytest.approx(0.02 * 200.5)  # scale: the value


def test_a_metric_no_variation_moved_must_match_exactly():
    band = make_band(300.0, [300.0, 300.0])
    assert band.exact and band.contains(300.0) and not band.contains(300.0001)


def test_a_fraction_no_variation_moved_still_gets_the_floor():
    # an accuracy of 0 in every run so far read 1/60 on a fresh clone with other kernels
    band = make_band(0.0, [0.0, 0.0], floor_fraction=0.05)
    assert not band.exact and band.contains(1 / 60) and not band.contains(0.1)
    assert make_band(1.0, [1.0]).contains(0.96)
    assert make_band(2.0, [2.0]).exact  # a count is structural: exact


def test_nan_everywhere_is_an_exact_nan_band_and_nan_somewhere_is_refused():
    band = make_band(math.nan, [math.nan])
    assert band.contains(math.nan) and not band.contains(0.0)
    with pytest.raises(BandError, match="NaN in some runs"):
        make_band(0.5, [math.nan])


def test_impossible_band_parameters_are_refused():
    with pytest.raises(BandError, match="at least one variation"):
        make_band(0.5, [])
    with pytest.raises(BandError, match="factor=0.5 must be at least 1"):
        make_band(0.5, [0.4], factor=0.5)


def test_make_bands_names_the_chapter_and_metric_a_variation_lacks():
    with pytest.raises(BandError, match=r"chapter 3.2: metric 'b' .* variation run 0"):
        make_bands({"3.2": {"a": 1.0, "b": 2.0}}, [{"3.2": {"a": 1.1}}])
    with pytest.raises(BandError, match="no variation run has metrics for chapter 3.2"):
        make_bands({"3.2": {"a": 1.0}}, [{"3.1.1": {"a": 1.0}}])


def test_a_figure_a_variation_run_did_not_measure_is_null_and_adds_nothing():
    """A run made before the notebook changed how "b/c" is measured says null there: its
    other figures still widen their bands, that one is banded by the other runs alone."""
    reference = {"3.3.1": {"a": 0.5, "b": {"c": 0.7}}}
    old_run = {"3.3.1": {"a": 0.4, "b": {"c": None}}}
    new_run = {"3.3.1": {"a": 0.5, "b": {"c": 0.69}}}
    bands = make_bands(reference, [old_run, new_run], factor=3.0, floor_fraction=0.0)
    assert bands["3.3.1"]["a"].runs == (0.4, 0.5)
    assert bands["3.3.1"]["a"].low == pytest.approx(0.2)  # the old run's 0.1, three times
    assert bands["3.3.1"]["b/c"].runs == (None, 0.69)
    assert bands["3.3.1"]["b/c"].low == pytest.approx(0.67)  # the new run's alone
    with pytest.raises(BandError, match="metric 'b/c' .* variation run 0"):
        make_bands(reference, [{"3.3.1": {"a": 0.4, "b": {}}}, new_run])  # absent, not null


def test_check_reports_outside_missing_and_unreferenced_metrics():
    bands = {"acc": make_band(0.5, [0.48], floor_fraction=0.0),
             "n": make_band(10.0, [10.0])}
    assert check_metrics("3.2", {"acc": 0.53, "n": 10}, bands) == []
    problems = check_metrics("3.2", {"acc": 0.60, "extra": 1.0}, bands)
    assert len(problems) == 3
    assert "3.2: acc = 0.6 is outside [0.44, 0.56]" in problems[0]
    assert "metric 'n' is missing" in problems[1]
    assert "metric 'extra' = 1 has no reference value" in problems[2]
    assert check_metrics("3.2", {"acc": 0.5, "n": 11}, bands) == [
        "3.2: n = 11 is outside exactly 10 (the same in every variation run)"]


def test_judge_fails_headline_structural_and_far_figures_and_tolerates_a_few_near_ones():
    band = make_band(0.5, [0.48], floor_fraction=0.0)  # [0.44, 0.56], half-width 0.06
    bands = {"head": band, "n": make_band(10.0, [10.0]),
             **{f"minor{i}": band for i in range(5)}}
    ok = {"head": 0.5, "n": 10, **{f"minor{i}": 0.5 for i in range(5)}}
    verdict = judge_chapter("3.2", ok, bands, {"head"})
    assert verdict.passed and verdict.failures == () and verdict.tolerated == ()
    # three minor figures just outside: reported, tolerated
    near = {**ok, "minor0": 0.6, "minor1": 0.4, "minor2": 0.61}
    verdict = judge_chapter("3.2", near, bands, {"head"})
    assert verdict.passed and len(verdict.tolerated) == 3 and "minor0 = 0.6" in verdict.tolerated[0]
    # a fourth fails them all
    verdict = judge_chapter("3.2", {**near, "minor3": 0.39}, bands, {"head"})
    assert not verdict.passed and len(verdict.failures) == 4 and not verdict.tolerated
    assert "at most 3 are tolerated" in verdict.failures[0]
    # one headline figure, one count, one figure far outside: each fails alone
    for key, value, why in (("head", 0.57, "a headline figure"), ("n", 11, "a structural number"),
                            ("minor4", 0.69, "more than 3 half-widths away")):
        verdict = judge_chapter("3.2", {**ok, key: value}, bands, {"head"})
        assert len(verdict.failures) == 1 and why in verdict.failures[0], (key, verdict)
    verdict = judge_chapter("3.2", {**ok, "minor4": float("nan")}, bands, {"head"})
    assert not verdict.passed  # non-finite
    missing = dict(ok)
    del missing["minor4"]
    assert not judge_chapter("3.2", missing, bands, {"head"}).passed
    assert not judge_chapter("3.2", {**ok, "new": 1.0}, bands, {"head"}).passed


def test_headline_keys_are_the_summary_and_target_figures_and_effects_with_their_se():
    keys = headline_keys("3.2", {"stage2_vs_stage1": {"change": 0.1, "se": 0.02},
                                 "by_task": {"ocr": 0.9}})
    assert {"stage2_mean_task_accuracy", "stage2_hallucination_rate",
            "text_lm_mean_task_accuracy", "stage2_vs_stage1/change"} <= keys
    assert "by_task/ocr" not in keys and "stage2_vs_stage1/se" not in keys
    assert "heldout_i2t_R@1" in headline_keys("3.1.1")
    # the default of judge_chapter: a headline figure outside fails even when alone
    bands = {"stage2_mean_task_accuracy": make_band(0.5, [0.48], floor_fraction=0.0)}
    assert not judge_chapter("3.2", {"stage2_mean_task_accuracy": 0.57}, bands).passed


def test_cross_check_leaves_each_run_out_and_checks_it_against_the_others():
    from companion.bands import cross_check

    reference = {"3.2": {"acc": 0.50, "steps": 100}}
    runs = {"a": {"3.2": {"acc": 0.48, "steps": 100}}, "b": {"3.2": {"acc": 0.52, "steps": 100}},
            "far": {"3.2": {"acc": 0.60, "steps": 100}}, "other": {"3.1.1": {"r1": 0.9}}}
    result = cross_check(reference, runs, factor=3.0, floor_fraction=0.0)
    assert result["a"]["3.2"].passed and result["b"]["3.2"].passed  # inside ±0.30
    assert not result["a"]["3.2"].tolerated
    assert result["far"]["3.2"].tolerated == (  # the others give ±0.06: minor, near
        "3.2: acc = 0.6 is outside [0.44, 0.56] around the reference 0.5 "
        "(variation runs: 0.48, 0.52)",)
    assert result["other"] == {}  # it covers no chapter of the reference


def test_cross_check_judges_only_figures_the_left_out_run_and_another_run_measured():
    from companion.bands import cross_check

    reference = {"3.3.1": {"acc": 0.50, "rm": 0.71, "new": 0.30}}
    runs = {"old": {"3.3.1": {"acc": 0.52, "rm": None, "new": None}},  # before rm changed
            "a": {"3.3.1": {"acc": 0.49, "rm": 0.70, "new": 0.31}},
            "b": {"3.3.1": {"acc": 0.51, "rm": 0.72, "new": None}}}
    result = cross_check(reference, runs, factor=3.0, floor_fraction=0.0)
    # "old" is judged on acc alone (inside a's and b's ±0.03), not reported missing rm
    assert result["old"]["3.3.1"].passed and result["old"]["3.3.1"].tolerated == ()
    # with "a" left out no other run measured "new": it is not judged (nor an error)
    assert result["a"]["3.3.1"].passed and result["a"]["3.3.1"].tolerated == ()
    assert result["b"]["3.3.1"].passed


def test_reference_file_round_trip_and_validation(tmp_path):
    bands = make_bands({"3.1.1": {"r1": 0.91, "steps": 1800}},
                       [{"3.1.1": {"r1": 0.89, "steps": 1800}}])
    path = save_reference(tmp_path / "ref.json", bands, [{"name": "a"}], 3.0, 0.02, "how")
    assert load_reference(path) == bands
    data = json.loads(path.read_text())
    data["chapters"]["3.1.1"]["r1"]["low"] = 0.95  # the reference outside its own band
    path.write_text(json.dumps(data))
    with pytest.raises(BandError, match="lies outside its own band"):
        load_reference(path)
    path.write_text("{}")
    with pytest.raises(BandError, match="not a reference file"):
        load_reference(path)
    with pytest.raises(BandError, match="no reference file"):
        load_reference(tmp_path / "missing.json")


# --- the committed reference file --------------------------------------------------------------

def test_the_committed_reference_covers_every_chapter_and_says_how_it_was_made():
    bands = load_reference()
    assert set(bands) == {c.id for c in BOOK.chapters}
    data = json.loads((ROOT / "tests" / "reference_metrics.json").read_text())
    assert "variation" in data["how"] and data["runs"][0]["role"] == "reference"
    assert all(r["changed"] for r in data["runs"][1:]), "say what each variation run changed"
    for chapter, metrics in bands.items():
        assert metrics, f"chapter {chapter} has no banded metric"
        for key, band in metrics.items():
            assert isinstance(band, Band) and len(band.runs) == len(data["runs"]) - 1, key


def test_the_lessons_headline_figures_are_banded_not_exact():
    """The figures the chapter's lessons rest on moved between the variation runs, so they are
    checked within a band (and that band excludes what a broken change gives, e.g. CLIP that
    learned nothing)."""
    bands = load_reference()
    clip = bands["3.1.1"]["heldout_i2t_R@1"]
    assert not clip.exact and not clip.contains(bands["3.1.1"]["initial_i2t_R@1"].reference)
    stage2 = bands["3.2"]["stage2_mean_task_accuracy"]
    assert not stage2.exact and not stage2.contains(
        bands["3.2"]["stage1_mean_task_accuracy"].reference)


# --- the nbval run's metrics against the reference ---------------------------------------------

@pytest.mark.notebook
@pytest.mark.parametrize("chapter_id", [c.id for c in BOOK.chapters])
def test_chapter_metrics_within_bands(chapter_id, request):
    chapter = next(c for c in BOOK.chapters if c.id == chapter_id)
    ran = getattr(request.config, "companion_nbval_notebooks", set())
    if chapter.notebook.name not in ran:
        pytest.skip(f"nbval did not execute {chapter.notebook.name} in this session (collect "
                    "the notebooks before this file, as scripts/test.sh does)")
    path = metrics_path(NBVAL_OUTPUT_DIR, chapter_id)
    assert path.is_file(), f"{path}: nbval ran {chapter.notebook.name} but it wrote no metrics"
    assert path.stat().st_mtime >= request.config.companion_session_start, (
        f"{path} is older than this test session: the notebook did not write its metrics")
    verdict = judge_chapter(chapter_id, json.loads(path.read_text()),
                            load_reference()[chapter_id])
    for problem in verdict.tolerated:
        warnings.warn(f"tolerated, a minor figure outside its band: {problem}", stacklevel=2)
    assert verdict.passed, "\n".join(verdict.failures + verdict.tolerated)


# --- the command ------------------------------------------------------------------------------

def _fake_run(folder: Path, value: float) -> Path:
    for chapter in BOOK.chapters:
        metrics = {"accuracy": value, "steps": 100, "curve": [1, 2]}
        path = metrics_path(folder, chapter.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics))
    return folder


def test_bands_command_makes_a_reference_and_checks_runs_against_it(tmp_path, capsys):
    from companion.bands import main_bands

    reference, variation = _fake_run(tmp_path / "ref", 0.50), _fake_run(tmp_path / "var", 0.48)
    out = tmp_path / "reference.json"
    assert main_bands(["make", str(reference), str(variation), "--output", str(out),
                       "--describe", f"{variation}=seed 1"]) == 0
    data = json.loads(out.read_text())
    assert data["runs"][1] == {"name": str(variation), "role": "variation", "factor": 3.0,
                               "changed": "seed 1"}
    assert data["chapters"]["3.2"]["accuracy"]["low"] == pytest.approx(0.44)
    assert data["chapters"]["3.2"]["steps"] == {"reference": 100, "low": 100, "high": 100,
                                                "runs": [100]}
    assert main_bands(["check", str(variation), "--reference", str(out)]) == 0
    assert "every metric inside its band" in capsys.readouterr().out
    assert main_bands(["check", str(_fake_run(tmp_path / "broken", 0.30)),
                       "--reference", str(out)]) == 1
    assert "3.2: accuracy = 0.3 is outside [0.44, 0.56]" in capsys.readouterr().out
    seed2 = _fake_run(tmp_path / "seed2", 0.53)  # a run added later: the old ones keep their words
    assert main_bands(["make", str(reference), str(variation), str(seed2), "--output", str(out),
                       "--describe", f"{seed2}=seed 2"]) == 0
    assert [r["changed"] for r in json.loads(out.read_text())["runs"][1:]] == ["seed 1", "seed 2"]
    (variation / "metrics" / "3.4.json").unlink()
    assert main_bands(["check", str(variation), "--reference", str(out)]) == 2
    assert "chapter 3.4 wrote no metrics" in capsys.readouterr().err


def test_bands_run_refuses_a_malformed_parameter_before_running_anything(capsys):
    from companion.bands import main_bands

    assert main_bands(["run", "never", "-p", "seed"]) == 2
    assert "-p 'seed': expected KEY=VALUE" in capsys.readouterr().err
    assert not (ROOT / "build" / "bands" / "never").exists()


def test_a_run_with_another_seed_counts_once_and_a_kernel_run_three_times():
    band = make_band(0.46, [0.42, 0.34], floor_fraction=0.0, factors=[3.0, 1.0])
    assert band.low == pytest.approx(0.46 - 0.12) and band.high == pytest.approx(0.46 + 0.12)
    with pytest.raises(BandError, match="2 factors for 1 variation runs"):
        make_band(0.5, [0.4], factors=[3.0, 1.0])


def test_every_run_that_made_a_band_lies_inside_it_despite_rounding():
    reference, variation = 0.72, 0.20833333333333334  # 0.72 - (0.72 - v) != v in floats
    band = make_band(reference, [variation], factors=[1.0], floor_fraction=0.0)
    assert band.contains(variation) and band.contains(reference)


def test_an_effect_with_its_own_standard_error_is_banded_at_least_two_se_of_a_difference():
    # 3.2 under other kernels: grounding change 0.333 against a reference of 0.217 (se 0.054);
    # the two runs' variations (0.200, 0.150) alone gave a band of [0.150, 0.283]
    narrow = make_band(0.2167, [0.2, 0.15], factors=[3.0, 1.0], floor_fraction=0.02)
    assert not narrow.contains(0.3333)
    band = make_band(0.2167, [0.2, 0.15], factors=[3.0, 1.0], floor_fraction=0.02, se=0.0536)
    half = 2.0 * math.sqrt(2) * 0.0536
    assert band.low == pytest.approx(0.2167 - half) and band.high == pytest.approx(0.2167 + half)
    assert band.contains(0.3333) and not band.contains(0.40)
    # a spread wider than the se floor still sets the band
    wide = make_band(0.2, [0.5], factors=[3.0], se=0.01)
    assert wide.high == pytest.approx(0.2 + 0.9)
    with pytest.raises(BandError, match="standard error -0.1"):
        make_band(0.2, [0.3], se=-0.1)


def test_make_bands_finds_each_effects_standard_error_beside_it():
    reference = {"3.2": {"stage2_vs_stage1": {"ocr": {"change": 0.7, "se": 0.1}},
                         "versus_sft": {"DPO": {"hallucination_change": -0.1,
                                                "hallucination_se": 0.05}},
                         "clean_minus_noisy": {"difference": 0.03, "se": 0.02},
                         "accuracy": 0.5}}
    variation = {"3.2": {"stage2_vs_stage1": {"ocr": {"change": 0.69, "se": 0.1}},
                         "versus_sft": {"DPO": {"hallucination_change": -0.11,
                                                "hallucination_se": 0.05}},
                         "clean_minus_noisy": {"difference": 0.031, "se": 0.02},
                         "accuracy": 0.49}}
    bands = make_bands(reference, [variation], floor_fraction=0.02)["3.2"]
    floor = 2.0 * math.sqrt(2)
    assert bands["stage2_vs_stage1/ocr/change"].high == pytest.approx(0.7 + floor * 0.1)
    assert bands["versus_sft/DPO/hallucination_change"].high == pytest.approx(-0.1 + floor * 0.05)
    assert bands["clean_minus_noisy/difference"].high == pytest.approx(0.03 + floor * 0.02)
    assert bands["accuracy"].high == pytest.approx(0.5 + 0.03)  # no se: factor 3 × 0.01
    assert bands["stage2_vs_stage1/ocr/se"].high == pytest.approx(0.12)  # unmoved fraction: floor


def test_a_variation_run_that_stopped_part_way_bands_only_the_chapters_it_reached(tmp_path):
    bands = make_bands({"3.1.1": {"r1": 0.91}, "3.2": {"acc": 0.46}},
                       [{"3.1.1": {"r1": 0.89}, "3.2": {"acc": 0.44}}, {"3.1.1": {"r1": 0.90}}])
    assert bands["3.2"]["acc"].runs == (0.44, None)
    assert bands["3.1.1"]["r1"].runs == (0.89, 0.90)
    path = save_reference(tmp_path / "ref.json", bands, [{"name": "a"}], 3.0, 0.02, "how")
    assert load_reference(path) == bands
    assert "variation runs: 0.44, -" in bands["3.2"]["acc"].describe()
    with pytest.raises(BandError, match="no variation run has metrics for chapter 3.2"):
        make_bands({"3.2": {"acc": 0.46}}, [{"3.1.1": {"r1": 0.9}}])
    with pytest.raises(BandError, match="a band needs at least one variation run"):
        make_band(0.5, [None])


def test_make_keeps_unchanged_chapters_and_remakes_the_rest_from_runs_that_cover_them(tmp_path,
                                                                                      capsys):
    """``bands make --keep``: after a change that touched only some notebooks, their bands are
    re-made from new runs while the other chapters keep theirs (and their runs' values)."""
    from companion.bands import main_bands

    ids = [c.id for c in BOOK.chapters]
    out = tmp_path / "reference.json"
    ref, seed1 = _fake_run(tmp_path / "ref", 0.50), _fake_run(tmp_path / "seed1", 0.48)
    assert main_bands(["make", str(ref), str(seed1), "--output", str(out),
                       "--describe", f"{seed1}=seed 1"]) == 0
    # the change: chapters 3.2 onwards re-run for the reference, the seed-1 run not repeated
    new_ref, new_seed1 = tmp_path / "new_ref", tmp_path / "new_seed1"
    for chapter in ids[ids.index("3.2"):]:
        path = metrics_path(new_ref, chapter)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"accuracy": 0.70, "steps": 100, "curve": [1]}))
    (new_seed1 / "metrics").mkdir(parents=True)
    assert main_bands(["make", str(new_ref), str(new_seed1), "--output", str(out),
                       "--keep", *ids[:ids.index("3.2")]]) == 2
    assert "was made from the runs" in capsys.readouterr().err  # other run names: refused
    kept = ids[:ids.index("3.2")]
    # same names, new contents: the reference run's metrics replaced, the seed-1 run's gone
    for chapter in ids:
        metrics_path(seed1, chapter).unlink()
        if chapter not in kept:
            metrics_path(ref, chapter).write_text(metrics_path(new_ref, chapter).read_text())
    assert main_bands(["make", str(ref), str(seed1), "--output", str(out),
                       "--keep", *kept]) == 2  # no run covers 3.2 now: nothing to band it by
    assert "no variation run has metrics for chapter 3.2" in capsys.readouterr().err
    data = json.loads(out.read_text())
    assert main_bands(["make", str(ref), str(seed1), "--output", str(out),
                       "--keep", *kept, "3.9"]) == 2
    assert "--keep 3.9: no such chapter" in capsys.readouterr().err
    assert json.loads(out.read_text()) == data  # a refused make leaves the file as it was
    for chapter in ids:  # the seed-1 run repeated for the changed chapters
        if chapter not in kept:
            metrics_path(seed1, chapter).write_text(
                json.dumps({"accuracy": 0.69, "steps": 100, "curve": [1]}))
    assert main_bands(["make", str(ref), str(seed1), "--output", str(out),
                       "--keep", *kept]) == 0
    data = json.loads(out.read_text())
    assert data["chapters"]["3.1.1"]["accuracy"] == {  # kept, with the old run's value
        "reference": 0.5, "low": pytest.approx(0.44), "high": pytest.approx(0.56),
        "runs": [0.48]}
    assert data["chapters"]["3.2"]["accuracy"]["reference"] == 0.7
    assert data["chapters"]["3.2"]["accuracy"]["runs"] == [0.69]
    assert data["runs"][1]["changed"] == "seed 1"  # the description survives
    assert "chapters" not in data["runs"][1]  # it covers every chapter, old and new
    assert "--keep" in data["how"] and "were kept" in data["how"]


def test_export_writes_the_files_runs_back_so_the_file_can_be_re_made_from_them(tmp_path):
    """``bands export``: each recorded run becomes a run folder again; making the file from
    those folders gives the same bands (so old runs can be combined with new ones)."""
    from companion.bands import export_runs, main_bands

    ref = _fake_run(tmp_path / "ref", 0.50)
    seed1 = _fake_run(tmp_path / "seed1", 0.48)
    partial = _fake_run(tmp_path / "partial", 0.53)
    for chapter in [c.id for c in BOOK.chapters][1:]:
        metrics_path(partial, chapter).unlink()  # this run reached only the first chapter
    nested = {"accuracy": 0.5, "steps": 100, "by_task": {"ocr": 0.9}}
    for folder, scale in ((ref, 1.0), (seed1, 0.9), (partial, 1.1)):
        first = metrics_path(folder, BOOK.chapters[0].id)
        if first.exists():
            first.write_text(json.dumps({**nested, "by_task": {"ocr": 0.9 * scale}}))
    out = tmp_path / "reference.json"
    assert main_bands(["make", str(ref), str(seed1), str(partial), "--output", str(out)]) == 0
    folders = export_runs(out, tmp_path / "exported")
    assert list(folders) == [str(ref), str(seed1), str(partial)]
    exported = json.loads(metrics_path(folders[str(ref)], BOOK.chapters[0].id).read_text())
    assert exported == {"accuracy": 0.5, "steps": 100, "by_task": {"ocr": 0.9}}
    assert not metrics_path(folders[str(partial)], BOOK.chapters[1].id).exists()
    again = tmp_path / "again.json"
    assert main_bands(["make", str(folders[str(ref)]), str(folders[str(seed1)]),
                       str(folders[str(partial)]), "--output", str(again)]) == 0
    assert load_reference(again) == load_reference(out)
