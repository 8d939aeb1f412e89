"""The LLaVA-1.5 pipeline: the stage table drives training; reruns resume; broken artifacts
are rebuilt, never loaded."""

import json
import warnings

import pytest
import torch

from companion.pipeline import (CPU_STAGES, LLAVA15_STAGES, PipelineConfig, Stage, StageResult,
                                run_pipeline, stage_summary, stage_table)


def _tiny(stages=("vision", "lm", "stage1", "stage2")):
    table = {"vision": dict(batch_size=8, epochs=0.5), "lm": dict(batch_size=4, epochs=0.8),
             "stage1": dict(batch_size=4, epochs=1.0), "stage2": dict(batch_size=4, epochs=0.1),
             "dpo": dict(batch_size=2, epochs=0.01)}
    rows = tuple(s.__class__(**{**s.__dict__, **table[s.name]}) for s in CPU_STAGES
                 if s.name in stages)
    return PipelineConfig(tokenizer_scenes=40, clip_scenes=32, lm_scenes=10, sft_scenes=8,
                          preference_scenes=10, stages=rows)


def _lm_weights(folder):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder)
    return model.model.language_model.state_dict()


def test_stage_table_matches_llava_15_and_validates():
    stage1, stage2 = (next(s for s in LLAVA15_STAGES if s.name == n) for n in ("stage1", "stage2"))
    assert (stage1.lr, stage1.batch_size, stage1.epochs, stage1.trains) == (
        1e-3, 256, 1, ("projector",))
    assert (stage2.lr, stage2.batch_size, stage2.epochs) == (2e-5, 128, 1)
    assert stage2.trains == ("projector", "lm") and stage2.warmup_fraction == 0.03
    assert [row["stage"] for row in stage_summary(PipelineConfig())] == [
        "vision", "lm", "stage1", "stage2", "dpo"]
    with pytest.raises(ValueError, match="choose parts"):
        Stage("stage1", "", "", ("decoder",), 1e-3, 8)
    with pytest.raises(ValueError, match="trains"):
        Stage("vision", "", "", ("lm",), 1e-3, 8)
    with pytest.raises(ValueError, match="subsequence"):
        PipelineConfig(stages=(CPU_STAGES[2], CPU_STAGES[0]))
    with pytest.raises(ValueError, match="needs"):
        PipelineConfig(stages=(CPU_STAGES[3],))
    assert Stage("stage2", "", "", ("lm",), 1e-3, 32, epochs=2).steps(100) == 7


def test_stage_table_puts_llava_15_beside_the_llava_stages():
    config = PipelineConfig().with_stage("stage2", lr=5e-4, batch_size=8, epochs=0.5)
    lines = stage_table(config).splitlines()
    assert lines[0] == ("  stage           trains       lr  batch  epochs   "
                        "LLaVA-1.5 (lr, batch, epochs)")
    rows = {line.split()[0]: line for line in lines[1:]}
    assert list(rows) == ["vision", "lm", "stage1", "stage2", "dpo"]
    assert rows["stage2"] == " stage2   projector + lm    5e-04      8     0.5   2e-05, 128, 1"
    assert rows["stage1"].endswith("   1e-03, 256, 1")
    assert all(rows[name].endswith("   -") for name in ("vision", "lm", "dpo"))
    # LLaVA-1.5's column starts at the same place on every line
    assert all(line[48:51] == "   " and line[51] != " " for line in lines)
    without = stage_table(config.without_stage("stage1")).splitlines()
    assert [line.split()[0] for line in without[1:]] == ["vision", "lm", "stage2", "dpo"]
    unpublished = stage_table(config, published=()).splitlines()
    assert all(line.endswith("   -") for line in unpublished[1:])


def test_stage_curve_reads_the_history_and_shifts_its_steps(tmp_path):
    (tmp_path / "stage2").mkdir()
    (tmp_path / "stage2" / "history.json").write_text(json.dumps(
        [{"step": 1, "loss": 2.0, "lr": 0.1}, {"step": 2, "loss": 1.5, "lr": 0.2}]))
    stage = StageResult("stage2", tmp_path / "stage2", built=True, seconds=0.0, steps=2,
                        examples=4)
    assert stage.curve() == ([1, 2], [2.0, 1.5])
    assert stage.curve("lr", step_offset=10) == ([11, 12], [0.1, 0.2])
    (tmp_path / "vision").mkdir()  # the vision stage keeps its steps in a CLIP run's file
    (tmp_path / "vision" / "training.json").write_text(json.dumps(
        {"steps": [{"step": 0, "loss": 3.0}, {"step": 1, "loss": 2.5}]}))
    vision = StageResult("vision", tmp_path / "vision", built=False, seconds=0.0, steps=2,
                         examples=8)
    assert vision.curve(step_offset=5) == ([5, 6], [3.0, 2.5])


def test_the_table_drives_what_trains_and_reruns_resume(tmp_path):
    config = _tiny()
    first = run_pipeline(config, tmp_path, log=None)
    assert [s.built for s in first.stages] == [True] * 4
    assert all(s.steps >= 1 for s in first.stages)
    # stage 1 trains the projector only: its LM is the lm stage's, bit for bit
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM.from_pretrained(first.folder("lm")).model.state_dict()
    after1, after2 = _lm_weights(first.folder("stage1")), _lm_weights(first.folder("stage2"))
    assert all(torch.equal(lm[k], after1[k]) for k in lm)
    assert not all(torch.equal(after1[k], after2[k]) for k in after1)  # stage 2 trains it
    # a rerun loads every finished stage
    again = run_pipeline(config, tmp_path, log=None)
    assert [s.built for s in again.stages] == [False] * 4
    # the table, not the stage's name, says what learns: let stage 1 train the LM as well
    changed = config.with_stage("stage1", trains=("projector", "lm"))
    third = run_pipeline(changed, tmp_path, log=None)
    assert [s.built for s in third.stages] == [False, False, True, True]
    after1 = _lm_weights(third.folder("stage1"))
    assert not all(torch.equal(lm[k], after1[k]) for k in lm)


def test_an_interrupted_stage_resumes_without_redoing_finished_ones(tmp_path, monkeypatch):
    import companion.pipeline as pipeline

    config = _tiny()
    real = pipeline._BUILDERS["stage2"]

    def crash(config, stage, folder, ctx):
        (folder / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt("killed mid-stage")

    monkeypatch.setitem(pipeline._BUILDERS, "stage2", crash)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config, tmp_path, log=None)
    assert not list(tmp_path.glob("3-stage2-*")), "a half-written stage must not be in place"
    monkeypatch.setitem(pipeline._BUILDERS, "stage2", real)
    resumed = run_pipeline(config, tmp_path, log=None)
    assert [s.built for s in resumed.stages] == [False, False, False, True]


def test_a_corrupted_artifact_is_detected_and_rebuilt(tmp_path):
    config = _tiny(("vision", "lm", "stage1"))
    first = run_pipeline(config, tmp_path, log=None)
    weights = first.folder("stage1") / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-10] + bytes(10))  # same size, different bytes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = run_pipeline(config, tmp_path, log=None)
    assert any("broken cached artifact" in str(w.message) for w in caught)
    assert [s.built for s in again.stages] == [False, False, True]
    assert (again.folder("stage1") / "model.safetensors").read_bytes() == original  # same run


def test_dpo_stage_runs_after_stage2(tmp_path):
    result = run_pipeline(_tiny(("vision", "lm", "stage1", "stage2", "dpo")), tmp_path, log=None)
    assert result.stages[-1].name == "dpo" and result.stages[-1].built
    assert (result.folder("dpo") / "history.json").exists()


def test_stage2_straight_after_lm_unfreezes_all_at_once(tmp_path):
    """Progressive unfreezing's other arm: no stage 1, the projector learns with the LM."""
    config = _tiny().without_stage("stage1")
    result = run_pipeline(config, tmp_path, log=None)
    assert [s.name for s in result.stages] == ["vision", "lm", "stage2"]
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM.from_pretrained(result.folder("lm")).model.state_dict()
    tuned = _lm_weights(result.folder("stage2"))
    assert not all(torch.equal(lm[k], tuned[k]) for k in lm)
    with pytest.raises(ValueError, match="needs"):
        PipelineConfig(stages=tuple(s for s in CPU_STAGES if s.name != "lm"))


def test_lr_scale_in_the_table_sets_the_vision_towers_learning_rate(tmp_path):
    """The same stage 2 with the vision tower learning at 1x and at 0.01x the rate: the
    smaller scale moves the tower far less, and the frozen default not at all."""
    from transformers import CLIPModel, LlavaForConditionalGeneration

    from companion.tricks import vision_drift

    base = _tiny()
    clip = CLIPModel.from_pretrained(run_pipeline(base, tmp_path, log=None).folder("vision"))
    drift = {}
    for scale in (1.0, 0.01):
        config = base.with_stage("stage2", trains=("vision", "projector", "lm"),
                                 lr_scale=(("vision", scale),))
        result = run_pipeline(config, tmp_path, log=None)
        assert [s.built for s in result.stages] == [False, False, False, True]
        drift[scale] = vision_drift(
            LlavaForConditionalGeneration.from_pretrained(result.folder("stage2")), clip)
    frozen = LlavaForConditionalGeneration.from_pretrained(
        run_pipeline(base, tmp_path, log=None).folder("stage2"))
    assert vision_drift(frozen, clip) == 0.0
    assert 0 < drift[0.01] < 0.2 * drift[1.0], drift


_KILL_SCRIPT = """
import sys
from companion.pipeline import run_pipeline
sys.path.insert(0, {tests!r})
from test_pipeline import _tiny
config = _tiny().with_stage("stage2", epochs=40.0)  # long enough to be killed in the middle
run_pipeline(config, {run_dir!r}, log=None)
"""


def test_a_run_killed_mid_stage_resumes_at_that_stage(tmp_path):
    """SIGKILL a real pipeline process while stage 2 is being written; the rerun loads the
    finished stages, ignores the half-written one and builds stage 2."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = _KILL_SCRIPT.format(tests=str(root / "tests"), run_dir=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)})
    deadline = time.monotonic() + 300
    try:
        while not list(tmp_path.glob(".3-stage2-*")):  # stage 2's temporary folder
            assert proc.poll() is None, "the pipeline process ended before stage 2 began"
            assert time.monotonic() < deadline, "stage 2 never started"
            time.sleep(0.02)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert list(tmp_path.glob("2-stage1-*")) and not list(tmp_path.glob("3-stage2-*"))
    config = _tiny().with_stage("stage2", epochs=40.0)
    resumed = run_pipeline(config, tmp_path, log=None)
    assert [s.built for s in resumed.stages] == [False, False, False, True]
    assert (resumed.folder("stage2") / "model.safetensors").is_file()


def test_checkpoints_stand_in_for_the_vision_and_lm_stages(tmp_path):
    """clip_checkpoint / lm_checkpoint: the pipeline starts from pretrained models, as LLaVA
    does. Neither stage trains; the LM's own tokenizer (ChatML, no <image>) becomes the
    pipeline's, and the world run's keys do not change."""
    from foreign_tokenizers import save_foreign_lm
    from transformers import AutoTokenizer

    from companion.models import build_clip
    from companion.tokenizer import world_tokenizer
    from companion.vlm import load_vlm

    tokenizer = world_tokenizer(tmp_path / "tok", n_scenes=200, log=None)
    for part in build_clip(tokenizer, seed=1):
        part.save_pretrained(tmp_path / "clip")
    save_foreign_lm(tmp_path / "lm")
    from dataclasses import replace

    world = _tiny(("vision", "lm", "stage1"))
    config = replace(world, clip_checkpoint=str(tmp_path / "clip"),
                     lm_checkpoint=str(tmp_path / "lm"))
    assert "clip_checkpoint" not in world.to_dict() and world.key_for(0) != config.key_for(0)
    lines = []
    result = run_pipeline(config, tmp_path / "run", log=lines.append)
    assert [(s.name, s.steps) for s in result.stages][:2] == [("vision", 0), ("lm", 0)]
    assert "the checkpoint" in lines[0] and "not trained" in lines[1]
    assert result.stage("stage1").steps > 0
    model, _, loaded = load_vlm(result.folder("stage1"))
    assert loaded.convert_ids_to_tokens(model.config.image_token_index) == "<image>"
    assert "<|im_start|>" in loaded.chat_template
    original = AutoTokenizer.from_pretrained(tmp_path / "lm")
    assert len(loaded) == len(original) + 1  # + <image>
