"""The training tricks of 3.4: data recipes, vision-tower measures, and the stage-table
settings that drive them (the paired comparison is tested in test_paired_comparison.py)."""

import pytest
import torch

from companion.answers import TaskScores
from companion.evaluate import paired_difference
from companion.pipeline import CPU_STAGES, PipelineConfig, Stage, stage_records
from companion.tricks import (compare_arm, mismatch_images, select_tasks, subsample_scenes,
                              vision_alignment, vision_drift)
from companion.world import TASK_TYPES, make_instruction_dataset, make_scenes


@pytest.fixture(scope="module")
def records():
    return make_instruction_dataset(make_scenes(30, seed=4), seed=4)


def test_select_tasks_keeps_order_and_rejects_unknown_or_missing(records):
    kept = select_tasks(records, ["counting", "ocr"])
    assert kept == [r for r in records if r["task"] in ("counting", "ocr")]
    assert {r["task"] for r in kept} == {"counting", "ocr"}
    with pytest.raises(ValueError, match="no records of task type"):
        select_tasks(records, ["counting", "countnig"])
    with pytest.raises(ValueError, match="no task types"):
        select_tasks(records, [])


def test_subsample_scenes_keeps_whole_scenes(records):
    kept = subsample_scenes(records, 0.5, seed=1)
    scenes = {r["scene_id"] for r in kept}
    assert len(scenes) == 15
    assert kept == [r for r in records if r["scene_id"] in scenes]  # every record of a kept scene
    assert kept == subsample_scenes(records, 0.5, seed=1)
    assert kept != subsample_scenes(records, 0.5, seed=2)
    assert subsample_scenes(records, 1.0) == list(records)
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            subsample_scenes(records, bad)


def test_mismatch_images_changes_exactly_the_fraction_and_only_the_image(records):
    before = [dict(r) for r in records]
    noisy = mismatch_images(records, 0.4, seed=3)
    assert [dict(r) for r in records] == before  # the input is not modified
    changed = [(a, b) for a, b in zip(records, noisy) if b.get("noisy")]
    assert len(changed) == round(0.4 * len(records))
    image_of = {r["scene_id"]: r["image"] for r in records}
    for original, swapped in changed:
        assert swapped["scene_id"] != original["scene_id"]
        assert swapped["source_scene_id"] == original["scene_id"]
        assert swapped["image"] == image_of[swapped["scene_id"]]
        assert swapped["conversations"] == original["conversations"]
    unchanged = [(a, b) for a, b in zip(records, noisy) if not b.get("noisy")]
    assert all(a == b for a, b in unchanged)
    assert mismatch_images(records, 0.0) == list(records)
    one_scene = [r for r in records if r["scene_id"] == records[0]["scene_id"]]
    with pytest.raises(ValueError, match="single scene"):
        mismatch_images(one_scene, 0.5)
    with pytest.raises(ValueError, match="fraction"):
        mismatch_images(records, 1.2)


def test_vision_measures_see_an_unchanged_and_a_changed_tower(tmp_path):
    from companion.clip import build_caption_data, evaluate_retrieval
    from companion.models import build_clip
    from companion.tokenizer import world_tokenizer
    from companion.lm import build_lm
    from companion.vlm import build_vlm

    tokenizer = world_tokenizer(tmp_path, n_scenes=40, log=None)
    clip, processor, _ = build_clip(tokenizer)
    lm, _ = build_lm(tokenizer)
    vlm = build_vlm(clip, lm, tokenizer)
    data = build_caption_data(make_scenes(12, seed=9), tokenizer, processor,
                              render_size=clip.config.vision_config.image_size)
    assert vision_drift(vlm, clip) == 0.0
    assert vision_alignment(clip, vlm, data) == evaluate_retrieval(clip, data)
    with torch.no_grad():
        for p in vlm.model.vision_tower.parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert vision_drift(vlm, clip) > 0.1
    assert vision_alignment(clip, vlm, data) != evaluate_retrieval(clip, data)


def test_stage_rows_validate_their_trick_settings():
    base = dict(name="stage2", goal="", data="", trains=("projector", "lm"), lr=1e-3, batch_size=8)
    with pytest.raises(ValueError, match="lr_scale"):
        Stage(**base, lr_scale=(("vision", 0.1),))  # vision does not learn in this row
    with pytest.raises(ValueError, match="lr_scale"):
        Stage(**{**base, "trains": ("vision", "lm")}, lr_scale=(("vision", 0.0),))
    with pytest.raises(ValueError, match="task types of the world"):
        Stage(**base, tasks=("counting", "poetry"))
    with pytest.raises(ValueError, match="scene_fraction"):
        Stage(**base, scene_fraction=0.0)
    with pytest.raises(ValueError, match="image_noise"):
        Stage(**base, image_noise=1.5)
    with pytest.raises(ValueError, match="only stage1 and stage2"):
        Stage("dpo", "", "", ("lm",), 1e-3, 8, tasks=("counting",))


def test_stage_records_apply_the_rows_data_recipe():
    config = PipelineConfig(sft_scenes=20)
    stage1, stage2 = config.stage("stage1"), config.stage("stage2")
    _, captions = stage_records(config, stage1)
    assert {r["task"] for r in captions} == {"description"} and len(captions) == 20
    by_id, full = stage_records(config, stage2)
    assert {r["task"] for r in full} == set(TASK_TYPES)
    _, mixed = stage_records(config, config.with_stage("stage2", tasks=("counting", "ocr"))
                             .stage("stage2"))
    assert {r["task"] for r in mixed} == {"counting", "ocr"}
    _, small = stage_records(config,
                             config.with_stage("stage2", scene_fraction=0.25).stage("stage2"))
    assert len({r["scene_id"] for r in small}) == 5
    _, noisy = stage_records(config, config.with_stage("stage2", image_noise=0.5).stage("stage2"))
    assert sum(bool(r.get("noisy")) for r in noisy) == round(0.5 * len(full))
    assert all(r["scene_id"] in by_id for r in noisy)


def test_the_gpu_profile_carries_llava_15s_published_stages():
    from pathlib import Path

    from companion.book import load_book
    from companion.pipeline import LLAVA15_STAGES, config_from_parameters

    book = load_book(Path(__file__).resolve().parent.parent / "book.toml")
    config = config_from_parameters(book.profiles["gpu"].parameters_for("3.4"))
    for name in ("stage1", "stage2"):
        ours, published = config.stage(name), next(s for s in LLAVA15_STAGES if s.name == name)
        assert (ours.lr, ours.batch_size, ours.epochs, ours.warmup_fraction, ours.trains) == (
            published.lr, published.batch_size, published.epochs, published.warmup_fraction,
            published.trains), name
    default = config_from_parameters({})
    assert default.stages == CPU_STAGES
    assert config_from_parameters({"stage2_lr": 5e-4, "warmup_fraction": 0.1}).stage(
        "stage2").lr == 5e-4
    assert config_from_parameters({"warmup_fraction": 0.1}).stage("vision").warmup_fraction == 0.05


def _scores(correct, hallucinated):
    return TaskScores([{"id": f"r{i}", "task": "ocr" if i % 2 else "counting", "turn": 0,
                        "correct": bool(c), "hallucinations": ["a red star"] if h else []}
                       for i, (c, h) in enumerate(zip(correct, hallucinated))])


def test_compare_arm_pairs_the_arm_with_the_control():
    control = _scores([1, 0, 0, 1, 0, 0, 1, 0], [0, 1, 1, 0, 1, 0, 0, 1])
    arm = _scores([1, 1, 1, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0, 1])
    row, line = compare_arm(control, arm, "data mixing", "without ocr", "a note")
    assert (row["trick"], row["arm"], row["note"]) == ("data mixing", "without ocr", "a note")
    assert row["accuracy"] == arm.accuracy() == 7 / 8
    assert row["hallucination"] == arm.hallucination_rate() == 1 / 8
    assert row["mean_task_accuracy"] == arm.mean_task_accuracy() == (1.0 + 0.75) / 2
    assert row["accuracy_change"] == pytest.approx(0.5)
    assert row["accuracy_se"] == pytest.approx(paired_difference(control, arm)["se"])
    assert row["hallucination_change"] == pytest.approx(-0.375)
    assert row["hallucination_se"] == pytest.approx(
        paired_difference(control, arm, "hallucinated")["se"])
    assert row["verdict"] == "helped"  # +0.500 is beyond two standard errors (2 x 0.189)
    assert line == ("without ocr: answers correct 0.375 -> 0.875 (+0.500 ± 0.189), "
                    "hallucinating 0.500 -> 0.125 (-0.375 ± 0.183): helped")
    back, _ = compare_arm(arm, control, "data mixing", "the control")
    assert back["accuracy_change"] == pytest.approx(-0.5) and back["verdict"] == "hurt"
    same, _ = compare_arm(control, control, "data mixing", "the same")
    assert same["accuracy_change"] == 0 and same["verdict"] == "no clear effect"
