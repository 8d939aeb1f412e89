"""The paired comparison of two judged runs (companion.evaluate): the standard error of a
change in accuracy or hallucination rate, per task type and for the mean over task types,
and the two-standard-error verdict the chapter uses."""

import math
import random
import statistics

import pytest

import companion
from companion.evaluate import paired_difference, task_mean_difference, verdict
from companion.answers import TaskScores


def _scores(correct, hallucinated=None, task="counting"):
    hallucinated = hallucinated or [False] * len(correct)
    return TaskScores([{"id": f"r{i}", "task": task, "turn": 0, "correct": c,
                        "hallucinations": ["x"] if h else []}
                       for i, (c, h) in enumerate(zip(correct, hallucinated))])


def _random_runs(rng, tasks, per_task, p_control=0.5, flip=0.15):
    """Two runs on the same questions: the arm's answers are the control's with a fraction
    flipped at random (no true effect on average)."""
    control, arm = [], []
    for t in tasks:
        for i in range(per_task):
            for turn in range(2 if t == "multi_turn" else 1):
                c = rng.random() < p_control
                a = (not c) if rng.random() < flip else c
                row = {"id": f"{t}-{i}", "task": t, "turn": turn, "hallucinations": []}
                control.append({**row, "correct": c})
                arm.append({**row, "correct": a})
    return TaskScores(control), TaskScores(arm)


def test_the_package_exports_the_comparison():
    assert companion.paired_difference is paired_difference
    assert companion.task_mean_difference is task_mean_difference


def test_paired_difference_against_a_hand_computation():
    control = _scores([1, 0, 0, 1, 0], [0, 1, 1, 0, 0])
    arm = _scores([1, 1, 0, 1, 1], [0, 0, 1, 0, 0])
    out = paired_difference(control, arm)
    # per-answer differences 0, 1, 0, 0, 1: mean 0.4, sample sd sqrt(0.3), se sqrt(0.3 / 5)
    assert out["control"] == pytest.approx(0.4) and out["arm"] == pytest.approx(0.8)
    assert out["difference"] == pytest.approx(0.4)
    assert out["se"] == pytest.approx((0.3 / 5) ** 0.5)
    hal = paired_difference(control, arm, "hallucinated")
    assert hal["difference"] == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="key"):
        paired_difference(control, arm, "score")
    with pytest.raises(ValueError, match="same held-out"):
        paired_difference(control,
                          TaskScores([{**a, "id": "other" + a["id"]} for a in arm.answers]))


def test_paired_difference_keeps_one_task_type():
    control = TaskScores(_scores([1, 0, 0], task="ocr").answers
                         + [{**a, "id": "c" + a["id"]} for a in _scores([0, 0, 0, 0]).answers])
    arm = TaskScores(_scores([1, 1, 1], task="ocr").answers
                     + [{**a, "id": "c" + a["id"]} for a in _scores([0, 0, 0, 1]).answers])
    ocr = paired_difference(control, arm, task="ocr")
    assert ocr["n"] == 3 and ocr["difference"] == pytest.approx(2 / 3)
    counting = paired_difference(control, arm, task="counting")
    assert counting["n"] == 4 and counting["difference"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="'grounding'"):
        paired_difference(control, arm, task="grounding")


def test_a_single_shared_answer_has_an_unknown_se_and_no_clear_effect():
    control = TaskScores(_scores([0], task="ocr").answers
                         + [{**a, "id": "c" + a["id"]} for a in _scores([0, 1, 0]).answers])
    arm = TaskScores(_scores([1], task="ocr").answers
                     + [{**a, "id": "c" + a["id"]} for a in _scores([1, 1, 1]).answers])
    ocr = paired_difference(control, arm, task="ocr")
    assert ocr["n"] == 1 and ocr["difference"] == 1 and math.isnan(ocr["se"])
    assert verdict(ocr["difference"], ocr["se"]) == "no clear effect"
    both = task_mean_difference(control, arm)
    assert both["difference"] == pytest.approx((1 + 2 / 3) / 2) and math.isnan(both["se"])
    assert verdict(both["difference"], both["se"]) == "no clear effect"
    with pytest.raises(ValueError, match="share no answers"):
        paired_difference(control, TaskScores([{**a, "id": "x" + a["id"]} for a in arm.answers]))


def test_task_mean_difference_against_an_independent_computation():
    rng = random.Random(3)
    tasks = ["description", "counting", "multi_turn"]
    control, arm = _random_runs(rng, tasks, per_task=40, flip=0.3)
    out = task_mean_difference(control, arm)
    diffs, ses = [], []
    for t in tasks:
        pairs = [(c["correct"], a["correct"]) for c, a in zip(control.answers, arm.answers)
                 if c["task"] == t]
        d = [float(a) - float(c) for c, a in pairs]
        diffs.append(statistics.fmean(d))
        ses.append(statistics.stdev(d) / len(d) ** 0.5)
        assert out["by_task"][t]["difference"] == pytest.approx(diffs[-1])
        assert out["by_task"][t]["se"] == pytest.approx(ses[-1])
    assert list(out["by_task"]) == tasks
    assert out["difference"] == pytest.approx(statistics.fmean(diffs))
    assert out["se"] == pytest.approx(sum(s * s for s in ses) ** 0.5 / len(tasks))
    assert out["control"] == pytest.approx(control.mean_task_accuracy())
    assert out["arm"] == pytest.approx(arm.mean_task_accuracy())
    assert out["difference"] == pytest.approx(arm.mean_task_accuracy()
                                              - control.mean_task_accuracy())


def test_task_mean_difference_refuses_runs_that_do_not_match():
    control = _scores([1, 0, 1])
    with pytest.raises(ValueError, match="different task types"):
        task_mean_difference(control, _scores([1, 0, 1], task="ocr"))
    with pytest.raises(ValueError, match="no judged answers"):
        task_mean_difference(TaskScores([]), TaskScores([]))


@pytest.mark.parametrize("which", ["one task", "task mean"])
def test_the_two_se_bar_flags_about_one_run_in_twenty_when_nothing_changed(which):
    """Calibration: with no true effect, |difference| > 2 se should happen about 4.6% of the
    time. A standard error off by a factor (no sqrt, no 1/n, the task ses summed instead of
    added in quadrature) moves this rate far outside the band."""
    rng = random.Random(0)
    flagged, trials = 0, 400
    for _ in range(trials):
        if which == "one task":
            control, arm = _random_runs(rng, ["counting"], per_task=150)
            out = paired_difference(control, arm)
        else:
            control, arm = _random_runs(rng, ["description", "counting", "ocr"], per_task=60)
            out = task_mean_difference(control, arm)
        flagged += verdict(out["difference"], out["se"]) != "no clear effect"
    assert 0.01 <= flagged / trials <= 0.10, flagged / trials


def test_verdict_needs_two_standard_errors():
    assert verdict(0.05, 0.02) == "helped"
    assert verdict(-0.05, 0.02) == "hurt"
    assert verdict(0.03, 0.02) == "no clear effect"
    assert verdict(-0.05, 0.02, higher_is_better=False) == "helped"
    assert verdict(0.0, 0.0) == "no clear effect"


def test_task_mean_difference_lists_task_types_in_the_worlds_order():
    rng = random.Random(1)
    control, arm = _random_runs(rng, ["grounding", "zebra", "ocr", "description"], per_task=5)
    assert list(task_mean_difference(control, arm)["by_task"]) == [
        "description", "ocr", "grounding", "zebra"]
