"""The chapter summary (3.5): numbers come from metrics files or are shown as missing."""

import json
from pathlib import Path

import pytest

from companion.book import load_book
from companion.plots import plot_model_path
from companion.summary import SUMMARY_ROWS, gpu_commands, metric_at, summary_rows

ROOT = Path(__file__).resolve().parent.parent


def test_missing_chapters_show_a_dash_and_the_command(tmp_path):
    rows = summary_rows(tmp_path)
    assert len(rows) == sum(len(r.measures) for r in SUMMARY_ROWS)
    assert all(r["value"] is None and r["shown"] == "—" for r in rows)
    assert any("python -m companion book run 3.2" in r["source"] for r in rows)


def test_values_are_read_from_the_files_and_a_missing_key_is_named(tmp_path):
    (tmp_path / "3.2.json").write_text(json.dumps({"stage2_mean_task_accuracy": 0.4613}))
    (tmp_path / "3.3.3.json").write_text(
        json.dumps({"heldout": {"DPO": {"hallucination_rate": 0.3}}}))
    rows = {(r["stage"], r["measure"]): r for r in summary_rows(tmp_path)}
    stage2 = next(r for k, r in rows.items() if k[1] == "mean task accuracy after stage 2"
                  and "3.2" in r["source"])
    assert stage2["value"] == 0.4613 and stage2["shown"] == "0.461"
    stage1 = next(r for k, r in rows.items() if k[1] == "mean task accuracy after stage 1")
    assert stage1["value"] is None and "missing" in stage1["source"]
    dpo = next(r for k, r in rows.items() if k[1] == "after DPO" and "3.3.3" in r["source"])
    assert dpo["value"] == 0.3


def test_a_corrupted_metrics_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "3.1.1.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"3\.1\.1\.json: not valid JSON"):
        summary_rows(tmp_path)


def test_metric_at_names_the_missing_part():
    assert metric_at({"a": {"b": 2}}, "a/b") == 2
    with pytest.raises(KeyError, match="'c'"):
        metric_at({"a": {"b": 2}}, "a/c")


def test_gpu_guide_lists_every_chapter_with_its_real_checkpoint_parameters():
    book = load_book(ROOT / "book.toml")
    guide = {g["chapter"]: g for g in gpu_commands(book)}
    assert list(guide) == [c.id for c in book.chapters]
    assert guide["3.2"]["checkpoints"] == ["vlm_checkpoint", "lm_checkpoint", "clip_checkpoint"]
    assert guide["3.2"]["data_files"] == ["train_json", "stage1_json", "image_folder"]
    for chapter in ("3.3.1", "3.3.2", "3.3.3"):
        assert "sft_checkpoint" in guide[chapter]["checkpoints"], chapter
    assert guide["3.1.1"]["checkpoints"] == ["clip_checkpoint"]
    assert guide["3.2"]["book"] == "python -m companion book run 3.2 --profile gpu"
    assert "-p device 'cuda'" in guide["3.2"]["papermill"]
    assert "-p output_dir ../build/gpu" in guide["3.2"]["papermill"]


def test_targets_say_whether_each_figure_reaches_its_bound(tmp_path):
    from companion.summary import TARGET_ROWS

    (tmp_path / "3.2.json").write_text(json.dumps({
        "text_lm_mean_task_accuracy": 0.95, "stage2_hallucination_rate": 0.12,
        "probe_shape_accuracy": 0.979}))
    rows = {r["measure"]: r for r in summary_rows(tmp_path, TARGET_ROWS)}
    assert len(rows) == len(TARGET_ROWS[0].measures)
    told = rows["the LM told the scene in words: mean task accuracy"]
    assert (told["met"], told["target"]) == (True, "≥ 0.95")  # the bound itself is reached
    assert rows["after stage 2: hallucination rate"]["met"] is False  # ≤ 0.10
    assert rows["probe on the vision tokens: shape"]["met"] is False
    assert rows["CLIP held-out image→text R@1"]["met"] is None  # 3.1.1 not run
    assert all(r["target"] == "" and r["met"] is None for r in summary_rows(tmp_path))


def test_rlhf_targets_read_the_flat_keys_of_the_3_3_notebooks(tmp_path):
    from companion.summary import RLHF_ROWS

    (tmp_path / "3.3.1.json").write_text(json.dumps({"factual_rm_pair_accuracy": 0.714,
                                                     "plain_rm_pair_accuracy": 0.498}))
    (tmp_path / "3.3.3.json").write_text(json.dumps({
        "sft_hallucination_rate": 0.307, "dpo_hallucination_relative_change": -0.30,
        "dpo_task_accuracy_change": -0.021}))
    rows = {r["source"]: r for r in summary_rows(tmp_path, RLHF_ROWS)}
    assert rows["3.3.1: factual_rm_pair_accuracy"]["met"] is False  # 0.714 < 0.85
    assert rows["3.3.1: plain_rm_pair_accuracy"]["met"] is None  # reported, no bound
    assert rows["3.3.3: dpo_hallucination_relative_change"]["met"] is True  # -30% reached
    assert rows["3.3.3: dpo_task_accuracy_change"]["met"] is False  # lost more than 2 points
    assert rows["3.3.3: dpo_hallucination_relative_change"]["shown"] == "-0.30"
    missing = {r["measure"] for r in summary_rows(tmp_path, RLHF_ROWS) if r["value"] is None}
    assert "PPO: KL to the reference (nats per answer)" in missing  # 3.3.2 not run
    assert "DPO: hallucination change (paired)" in missing  # not in 3.3.3's file
    assert rows["not run: python -m companion book run 3.3.2"]["met"] is None


def test_the_model_path_figure_draws_each_models_two_rates():
    import matplotlib.pyplot as plt

    points = [("stage 1 (3.2)", 0.4, 0.3), ("stage 2 (3.2)", 0.8, 0.1), ("DPO (3.3.3)", 0.82, 0.05)]
    fig = plot_model_path(points, "a path")
    ax = fig.axes[0]
    accuracy, hallucination = ax.get_lines()
    assert list(accuracy.get_xdata()) == [0, 1, 2]
    assert list(accuracy.get_ydata()) == [0.4, 0.8, 0.82]
    assert list(hallucination.get_ydata()) == [0.3, 0.1, 0.05]
    assert (accuracy.get_label(), hallucination.get_label()) == ("mean task accuracy",
                                                                 "hallucination rate")
    assert [t.get_text() for t in ax.get_xticklabels()] == [p[0] for p in points]
    assert ax.get_ylim() == (0, 1) and ax.get_title() == "a path"
    plt.close(fig)
