"""The LLaVA-1.5 training chain as one config-driven, resumable pipeline (section 3.4).

One table declares every stage: what it is for, its data, which parts learn, its learning
rate, batch size and epochs (the seed's LLaVA-1.5 table, plus the chapter's other stages):

=========  ==========================  =====================  ===================
stage      data                        trains                 LLaVA-1.5 (gpu)
=========  ==========================  =====================  ===================
vision     image-caption pairs         the CLIP towers        (a pretrained CLIP)
lm         text-only conversations     the LM                 (a pretrained LLM)
stage1     description records         projector              lr 1e-3, batch 256, 1 epoch
stage2     every task type             projector + LM         lr 2e-5, batch 128, 1 epoch
dpo        judge-labelled preferences  projector + LM         (beyond LLaVA-1.5)
=========  ==========================  =====================  ===================

:func:`run_pipeline` runs the stages in order. Each stage's result is an artifact in the
run folder, keyed by the configuration of that stage *and every stage before it*, written
to a temporary folder and renamed into place with a checksummed manifest only when complete
(:mod:`companion.artifacts`). So a rerun loads finished stages and resumes at the first
missing one; a stage whose artifact is half-written or corrupted is detected, discarded and
rebuilt, never loaded; and changing one stage's settings rebuilds that stage and the ones
after it, not the ones before.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

STAGE_KINDS = ("vision", "lm", "stage1", "stage2", "dpo")


@dataclass(frozen=True)
class Stage:
    """One row of the stage table."""

    name: str                      # one of STAGE_KINDS
    goal: str
    data: str
    trains: tuple[str, ...]        # parts that learn: "clip", "lm", or VLM parts of stages.PARTS
    lr: float
    batch_size: int
    epochs: float = 1.0            # passes over the stage's data (steps = ceil(epochs * n / batch))
    warmup_fraction: float = 0.03
    beta: float = 0.1              # DPO only: strength of the pull towards the reference

    def __post_init__(self):
        if self.name not in STAGE_KINDS:
            raise ValueError(f"stage {self.name!r} is not one of {STAGE_KINDS}")
        if not (self.lr > 0 and self.batch_size >= 1 and self.epochs > 0):
            raise ValueError(f"stage {self.name!r}: lr={self.lr}, batch_size={self.batch_size} "
                             f"and epochs={self.epochs} must be positive")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"stage {self.name!r}: warmup_fraction={self.warmup_fraction} must "
                             "be in [0, 1)")
        allowed = {"vision": {("clip",)}, "lm": {("lm",)}}.get(self.name)
        if allowed is not None and tuple(self.trains) not in allowed:
            raise ValueError(f"stage {self.name!r} trains {sorted(allowed)[0]}, not "
                             f"{self.trains}")
        if allowed is None:
            from companion.stages import PARTS

            unknown = [p for p in self.trains if p not in PARTS]
            if unknown or not self.trains:
                raise ValueError(f"stage {self.name!r}: trains={self.trains}; choose parts "
                                 f"from {sorted(PARTS)}")

    def steps(self, n_examples: int) -> int:
        """Optimiser steps for ``epochs`` passes over ``n_examples`` examples."""
        return max(1, math.ceil(self.epochs * n_examples / self.batch_size))


def _stage(name, goal, data, trains, lr, batch_size, epochs, warmup=0.03, beta=0.1):
    return Stage(name, goal, data, tuple(trains), lr, batch_size, epochs, warmup, beta)


# this machine: the chapter's defaults (3.1.1, 3.2 and 3.3.3), written as epochs
CPU_STAGES = (
    _stage("vision", "align images and text (CLIP, InfoNCE)", "image-caption pairs", ["clip"],
           3e-3, 64, 14.4, 0.05),
    _stage("lm", "the 'pretrained LLM': language modelling", "text-only conversations", ["lm"],
           3e-3, 32, 6.4, 0.05),
    _stage("stage1", "feature alignment", "description records", ["projector"], 1e-3, 32, 3.2),
    _stage("stage2", "instruction following", "all six task types", ["projector", "lm"],
           2e-3, 32, 3.2),
    _stage("dpo", "preference alignment", "judge-labelled preference pairs", ["projector", "lm"],
           3e-5, 16, 1.45, 0.1, 0.1),
)

# LLaVA-1.5's published settings for the two LLaVA stages (one epoch, warmup 3%, cosine)
LLAVA15_STAGES = (
    _stage("vision", "align images and text (CLIP, InfoNCE)", "image-caption pairs", ["clip"],
           5e-4, 512, 32, 0.05),
    _stage("lm", "the 'pretrained LLM': language modelling", "text-only conversations", ["lm"],
           3e-4, 128, 1),
    _stage("stage1", "feature alignment", "558K image-caption pairs (LCS-558K)", ["projector"],
           1e-3, 256, 1),
    _stage("stage2", "instruction following", "665K mixed instructions", ["projector", "lm"],
           2e-5, 128, 1),
    _stage("dpo", "preference alignment", "preference pairs", ["projector", "lm"], 5e-7, 64, 1,
           0.1, 0.1),
)


@dataclass(frozen=True)
class PipelineConfig:
    """The world sizes and the stage table of one pipeline run."""

    seed: int = 0
    tokenizer_scenes: int = 2000
    clip_scenes: int = 8000
    lm_scenes: int = 3000
    sft_scenes: int = 3000
    preference_scenes: int = 400
    stages: tuple[Stage, ...] = CPU_STAGES

    def __post_init__(self):
        names = [s.name for s in self.stages]
        if names != [n for n in STAGE_KINDS if n in names] or len(set(names)) != len(names):
            raise ValueError(f"stages {names} must be a subsequence of {STAGE_KINDS}, each once")
        for needed, before in (("stage1", ("vision", "lm")), ("stage2", ("stage1",)),
                               ("dpo", ("stage2",))):
            if needed in names and not all(b in names for b in before):
                raise ValueError(f"stage {needed!r} needs {before} before it; stages: {names}")

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r} in {[s.name for s in self.stages]}")

    def with_stage(self, name: str, **changes) -> PipelineConfig:
        """This config with one stage's settings changed."""
        self.stage(name)
        return replace(self, stages=tuple(replace(s, **changes) if s.name == name else s
                                          for s in self.stages))

    def to_dict(self) -> dict:
        return asdict(self)

    def key_for(self, index: int) -> dict:
        """What decides the artifact of stage ``index``: the world and stages 0..index."""
        data = {k: v for k, v in self.to_dict().items() if k != "stages"}
        return {"kind": "pipeline", "procedure": 1, "world": data,
                "stages": [asdict(s) for s in self.stages[:index + 1]]}


@dataclass
class StageResult:
    name: str
    folder: Path
    built: bool          # False: loaded from a finished artifact of an earlier run
    seconds: float
    steps: int


@dataclass
class PipelineResult:
    config: PipelineConfig
    stages: list[StageResult] = field(default_factory=list)

    def folder(self, name: str) -> Path:
        return next(s.folder for s in self.stages if s.name == name)


def stage_summary(config: PipelineConfig) -> list[dict]:
    """The stage table as rows (for printing next to the seed's table)."""
    return [{"stage": s.name, "goal": s.goal, "data": s.data, "trains": " + ".join(s.trains),
             "lr": s.lr, "batch": s.batch_size, "epochs": s.epochs} for s in config.stages]


# ----------------------------------------------------------------------------- stage builders

def _history_file(folder: Path, steps: list[dict]) -> None:
    (folder / "history.json").write_text(json.dumps(steps))


def _build_vision(config: PipelineConfig, stage: Stage, folder: Path, ctx: dict) -> int:
    from companion.clip import ClipRecipe, pretrain_clip, save_clip_run

    steps = stage.steps(config.clip_scenes)
    recipe = ClipRecipe(seed=config.seed, tokenizer_scenes=config.tokenizer_scenes,
                        train_scenes=config.clip_scenes, batch_size=stage.batch_size,
                        steps=steps, lr=stage.lr, warmup_fraction=stage.warmup_fraction)
    save_clip_run(pretrain_clip(recipe, tokenizer=ctx["tokenizer"], device=ctx["device"],
                                log_every=0), folder)
    return steps


def _build_lm(config: PipelineConfig, stage: Stage, folder: Path, ctx: dict) -> int:
    from companion.vlm import LMRecipe, pretrain_lm

    steps = stage.steps(config.lm_scenes)
    recipe = LMRecipe(seed=config.seed, tokenizer_scenes=config.tokenizer_scenes,
                      scenes=config.lm_scenes, steps=steps, batch_size=stage.batch_size,
                      lr=stage.lr)
    model, history = pretrain_lm(recipe, ctx["tokenizer"], device=ctx["device"])
    model.save_pretrained(folder)
    _history_file(folder, history.steps)
    return steps


def _sft_data(config: PipelineConfig, ctx: dict, model, processor, tokenizer):
    if "sft_data" not in ctx:
        from companion.instruction import InstructionRecipe, encode_stage_data, instruction_records
        from companion.vlm import image_seq_length

        recipe = InstructionRecipe(seed=config.seed, train_scenes=config.sft_scenes)
        by_id, records = instruction_records(recipe)
        ctx["sft_data"] = encode_stage_data(records, by_id, tokenizer, processor,
                                            image_seq_length(model),
                                            model.config.vision_config.image_size)
    return ctx["sft_data"]


def _build_llava_stage(config: PipelineConfig, stage: Stage, folder: Path, ctx: dict) -> int:
    from companion.instruction import train_stage
    from companion.vlm import save_vlm

    model, processor, tokenizer = ctx["load_vlm"](stage.name)
    data = _sft_data(config, ctx, model, processor, tokenizer)[stage.name]
    steps = stage.steps(len(data))
    history = train_stage(model, stage.name, data, steps, stage.lr, stage.batch_size,
                          config.seed, tokenizer.pad_token_id, ctx["device"], log=None,
                          parts=stage.trains, warmup_fraction=stage.warmup_fraction)
    save_vlm(folder, model, processor, tokenizer)
    _history_file(folder, history.steps)
    return steps


def _build_dpo(config: PipelineConfig, stage: Stage, folder: Path, ctx: dict) -> int:
    import copy

    from companion.dpo import DPOConfig, train_dpo
    from companion.rlhf import RLHFRecipe, make_preferences, preference_data, rlhf_prompts
    from companion.stages import set_trainable
    from companion.vlm import save_vlm

    reference, processor, tokenizer = ctx["load_vlm"]("dpo")
    recipe = RLHFRecipe(seed=config.seed, scenes=config.preference_scenes)
    records = make_preferences(recipe, reference, tokenizer, processor)
    by_id = rlhf_prompts(recipe, processor, reference.config.vision_config.image_size)[0]
    data = preference_data(records, "train", tokenizer, processor, reference, by_id)
    policy = copy.deepcopy(reference)
    set_trainable(policy, stage.trains)
    steps = stage.steps(len(data))
    history = train_dpo(policy, reference, data, tokenizer.pad_token_id,
                        DPOConfig(beta=stage.beta, steps=steps, lr=stage.lr,
                                  batch_size=stage.batch_size, seed=config.seed),
                        device=ctx["device"], log=None)
    save_vlm(folder, policy, processor, tokenizer)
    _history_file(folder, history.steps)
    return steps


_BUILDERS = {"vision": _build_vision, "lm": _build_lm, "stage1": _build_llava_stage,
             "stage2": _build_llava_stage, "dpo": _build_dpo}


def run_pipeline(config: PipelineConfig, run_dir, device="cpu",
                 log: Callable[[str], None] | None = print) -> PipelineResult:
    """Run (or resume) every stage of ``config`` in order; each stage's artifact lands in
    ``run_dir``. Finished stages of an earlier run with the same settings are loaded, not
    redone."""
    from companion.artifacts import cached_artifact
    from companion.tokenizer import world_tokenizer

    run_dir = Path(run_dir)
    result = PipelineResult(config)
    ctx: dict = {"device": device,
                 "tokenizer": world_tokenizer(run_dir, n_scenes=config.tokenizer_scenes,
                                              log=None)}

    def load_vlm_for(name: str):
        """The VLM a stage starts from: assembled from vision + lm for stage 1, else the
        previous stage's artifact."""
        from transformers import AutoImageProcessor, CLIPModel, LlamaForCausalLM

        from companion.vlm import build_vlm, load_vlm

        previous = config.stages[[s.name for s in config.stages].index(name) - 1].name
        if name == "stage1":
            clip = CLIPModel.from_pretrained(result.folder("vision"))
            processor = AutoImageProcessor.from_pretrained(result.folder("vision"))
            lm = LlamaForCausalLM.from_pretrained(result.folder("lm"))
            return (build_vlm(clip, lm, ctx["tokenizer"], seed=config.seed).to(device),
                    processor, ctx["tokenizer"])
        model, processor, tokenizer = load_vlm(result.folder(previous), device=device)
        return model, processor, tokenizer

    ctx["load_vlm"] = load_vlm_for
    for index, stage in enumerate(config.stages):
        start = time.perf_counter()
        steps = []  # filled only when the stage is built, not when it is loaded

        def build(folder, stage=stage):
            steps.append(_BUILDERS[stage.name](config, stage, folder, ctx))

        folder = cached_artifact(run_dir, f"{index}-{stage.name}", config.key_for(index), build,
                                 log=None)
        seconds = time.perf_counter() - start
        result.stages.append(StageResult(stage.name, folder, bool(steps), seconds,
                                         steps[0] if steps else 0))
        if log:
            log(f"{stage.name:>7}: {'trained' if steps else 'loaded'} "
                f"({seconds:.0f} s{f', {steps[0]} steps' if steps else ''})")
    return result
