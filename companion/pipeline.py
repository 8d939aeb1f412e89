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
after it, not the ones before. With ``checkpoint_every`` a stage also writes a checkpoint
every that many steps, so a run killed in the middle of a long stage resumes inside it.

The same function runs under ``torchrun``: every rank trains (see :func:`companion.train.train`),
rank 0 alone writes the stage artifacts and checkpoints, and every rank waits at a barrier
before it reads one. From the command line::

    python -m companion pipeline run --profile gpu
    torchrun --nproc_per_node 8 -m companion pipeline run --profile gpu
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch.distributed as dist
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, CLIPModel

from companion.answers import evaluate_tasks
from companion.artifacts import artifact_path, cached_artifact, verify_artifact
from companion.clip import ClipRecipe, pixel_values_for, pretrain_clip, save_clip_run
from companion.distributed import rank_and_world
from companion.dpo import DPOConfig, train_dpo
from companion.instruction import (InstructionRecipe, encode_records, instruction_records,
                                   train_stage)
from companion.llava import image_seq_length
from companion.lm import LMRecipe, build_lm, pretrain_lm
from companion.models import build_clip
from companion.rlhf import RLHFRecipe, make_preferences, preference_data, rlhf_prompts
from companion.stages import PARTS, set_trainable
from companion.tokenizer import world_tokenizer
from companion.train import Checkpointing
from companion.tricks import mismatch_images, select_tasks, subsample_scenes
from companion.vlm import build_vlm, load_vlm, save_vlm
from companion.world import TASK_TYPES, render_scene

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
    # per-part learning-rate multipliers, e.g. (("vision", 0.1),): that part learns at lr * 0.1
    lr_scale: tuple[tuple[str, float], ...] = ()
    # the data recipe of stage1 / stage2 (the training tricks of section 3.4 change these):
    tasks: tuple[str, ...] = ()    # task types to train on; () = the stage's own default
    scene_fraction: float = 1.0    # keep this fraction of the scenes (and all their records)
    image_noise: float = 0.0       # this fraction of records gets another scene's image

    def __post_init__(self):
        if self.name not in STAGE_KINDS:
            raise ValueError(f"stage {self.name!r} is not one of {STAGE_KINDS}")
        if not (self.lr > 0 and self.batch_size >= 1 and self.epochs > 0):
            raise ValueError(f"stage {self.name!r}: lr={self.lr}, batch_size={self.batch_size} "
                             f"and epochs={self.epochs} must be positive")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"stage {self.name!r}: warmup_fraction={self.warmup_fraction} must "
                             "be in [0, 1)")
        for part, scale in self.lr_scale:
            if part not in self.trains or not (scale > 0 and math.isfinite(scale)):
                raise ValueError(f"stage {self.name!r}: lr_scale {part!r}={scale}: the part must "
                                 f"be one the stage trains {self.trains} and the scale positive "
                                 "(to freeze a part, leave it out of trains)")
        if self.name not in ("stage1", "stage2") and (self.tasks or self.scene_fraction != 1.0
                                                       or self.image_noise):
            raise ValueError(f"stage {self.name!r}: tasks, scene_fraction and image_noise "
                             "describe instruction data; only stage1 and stage2 take them")
        if not 0 < self.scene_fraction <= 1 or not 0 <= self.image_noise <= 1:
            raise ValueError(f"stage {self.name!r}: scene_fraction={self.scene_fraction} must be "
                             f"in (0, 1] and image_noise={self.image_noise} in [0, 1]")
        if self.tasks:
            unknown = [t for t in self.tasks if t not in TASK_TYPES]
            if unknown:
                raise ValueError(f"stage {self.name!r}: tasks {unknown} are not task types of "
                                 f"the world {TASK_TYPES}")
        allowed = {"vision": {("clip",)}, "lm": {("lm",)}}.get(self.name)
        if allowed is not None and tuple(self.trains) not in allowed:
            raise ValueError(f"stage {self.name!r} trains {sorted(allowed)[0]}, not "
                             f"{self.trains}")
        if allowed is None:
            unknown = [p for p in self.trains if p not in PARTS]
            if unknown or not self.trains:
                raise ValueError(f"stage {self.name!r}: trains={self.trains}; choose parts "
                                 f"from {sorted(PARTS)}")

    def steps(self, n_examples: int) -> int:
        """Optimiser steps for ``epochs`` passes over ``n_examples`` examples."""
        return max(1, math.ceil(self.epochs * n_examples / self.batch_size))


def _stage(name, goal, data, trains, lr, batch_size, epochs, warmup=0.03, beta=0.1):
    return Stage(name, goal, data, tuple(trains), lr, batch_size, epochs, warmup, beta)


# The pipeline's text recipe is the chapter's first, cheaper one: one question per
# conversation, loss on every token, verdicts before evidence. Section 3.2's LM (LMRecipe's
# defaults: six questions per 512-token conversation, loss on the replies, evidence first,
# 2,000 steps on 20,000 scenes) takes about 8 minutes here, more than 3.4 can spend on one
# of its five stages; the stage table below sizes the pipeline's LM in epochs of its own.
PIPELINE_LM_TEXT = {"loss_on": "all", "questions_per_conversation": 1,
                    "answer_style": "verdict_first", "max_length": 256}

# this machine: the chapter's defaults (3.1.1, 3.2 and 3.3.3), written as epochs
# (the lm stage: 3.2's first LM recipe, 3000 scenes and 600 steps; see PIPELINE_LM_TEXT)
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
    clip_checkpoint: str = ""   # a CLIP (hub id or folder) is the vision stage: loaded, not trained
    lm_checkpoint: str = ""     # a causal LM is the lm stage, and its tokenizer the pipeline's

    def __post_init__(self):
        names = [s.name for s in self.stages]
        if names != [n for n in STAGE_KINDS if n in names] or len(set(names)) != len(names):
            raise ValueError(f"stages {names} must be a subsequence of {STAGE_KINDS}, each once")
        # stage 2 may follow lm directly: unfreezing projector and LM at once, no stage 1
        for needed, before in (("stage1", ("vision", "lm")), ("stage2", ("vision", "lm")),
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

    def upto(self, name: str) -> PipelineConfig:
        """This config's stages up to and including ``name``."""
        names = [s.name for s in self.stages]
        self.stage(name)
        return replace(self, stages=self.stages[:names.index(name) + 1])

    def without_stage(self, name: str) -> PipelineConfig:
        """This config without stage ``name`` (e.g. no stage 1: unfreeze all at once)."""
        self.stage(name)
        return replace(self, stages=tuple(s for s in self.stages if s.name != name))

    def to_dict(self) -> dict:
        values = asdict(self)
        for name in ("clip_checkpoint", "lm_checkpoint"):
            if not values[name]:  # the world's own runs keep the keys they always had
                del values[name]
        return values

    def key_for(self, index: int) -> dict:
        """What decides the artifact of stage ``index``: the world and stages 0..index."""
        data = {k: v for k, v in self.to_dict().items() if k != "stages"}
        return {"kind": "pipeline", "procedure": 1, "world": data,
                "stages": [asdict(s) for s in self.stages[:index + 1]]}


_WORLD_PARAMETERS = ("seed", "tokenizer_scenes", "clip_scenes", "lm_scenes", "sft_scenes",
                     "preference_scenes", "clip_checkpoint", "lm_checkpoint")
_STAGE_PARAMETERS = {"lr": "lr", "batch_size": "batch_size", "epochs": "epochs",
                     "warmup_fraction": "warmup_fraction", "beta": "beta"}


def config_from_parameters(parameters: dict,
                           base: tuple[Stage, ...] = CPU_STAGES) -> PipelineConfig:
    """The pipeline of notebook 3.4 from its parameters: world sizes by name
    (``clip_scenes``...) and each stage's settings as ``<stage>_<setting>`` (``stage2_lr``,
    ``stage1_batch_size``, ``vision_epochs``, ``dpo_beta``...); ``warmup_fraction`` sets the
    warmup of the LLaVA stages (stage 1, 2 and DPO). Names not given keep ``base``'s values,
    so the book's profiles stay short and one test can check the gpu profile against
    LLaVA-1.5's published table."""
    world = {name: parameters[name] for name in _WORLD_PARAMETERS if name in parameters}
    stages = []
    for stage in base:
        changes = {}
        if "warmup_fraction" in parameters and stage.name in ("stage1", "stage2", "dpo"):
            changes["warmup_fraction"] = parameters["warmup_fraction"]
        for suffix, field_name in _STAGE_PARAMETERS.items():
            key = f"{stage.name}_{suffix}"
            if key in parameters:
                changes[field_name] = parameters[key]
        stages.append(replace(stage, **changes))
    return PipelineConfig(stages=tuple(stages), **world)


@dataclass
class StageResult:
    name: str
    folder: Path
    built: bool          # False: loaded from a finished artifact of an earlier run
    seconds: float
    steps: int           # optimiser steps the stage took (when it was built)
    examples: int        # training examples of the stage (its epoch)

    def history(self) -> list[dict]:
        """The stage's per-step training records (loss, lr, ...), from its artifact."""
        path = self.folder / "history.json"
        if path.is_file():
            return json.loads(path.read_text())
        clip_run = self.folder / "training.json"  # the vision stage saves a CLIP run
        return json.loads(clip_run.read_text())["steps"] if clip_run.is_file() else []

    def curve(self, key: str = "loss", step_offset: int = 0) -> tuple[list, list]:
        """The stage's training curve as ``(steps, values)`` of ``key`` (for
        :func:`companion.plots.plot_curves`); ``step_offset`` shifts the steps, e.g. by the
        steps of the stages before it, to draw two chains on one axis."""
        history = self.history()
        return [r["step"] + step_offset for r in history], [r[key] for r in history]


@dataclass
class PipelineResult:
    config: PipelineConfig
    stages: list[StageResult] = field(default_factory=list)

    def stage(self, name: str) -> StageResult:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"the run has no stage {name!r}: {[s.name for s in self.stages]}")

    def folder(self, name: str) -> Path:
        return self.stage(name).folder


def stage_summary(config: PipelineConfig) -> list[dict]:
    """The stage table as rows (for printing next to the seed's table)."""
    return [{"stage": s.name, "goal": s.goal, "data": s.data, "trains": " + ".join(s.trains),
             "lr": s.lr, "batch": s.batch_size, "epochs": s.epochs} for s in config.stages]


def stage_table(config: PipelineConfig, published: tuple[Stage, ...] = LLAVA15_STAGES) -> str:
    """The stage table as text, one line per stage of ``config`` (what it trains, its learning
    rate, batch size and epochs), with ``published``'s settings (LLaVA-1.5's) beside the two
    LLaVA stages and a dash beside the others."""
    by_name = {s.name: s for s in published}
    lines = [f"{'stage':>7} {'trains':>16} {'lr':>8} {'batch':>6} {'epochs':>7}   "
             "LLaVA-1.5 (lr, batch, epochs)"]
    for s in config.stages:
        p = by_name.get(s.name)
        llava = ("-" if p is None or s.name not in ("stage1", "stage2")
                 else f"{p.lr:.0e}, {p.batch_size}, {p.epochs:g}")
        lines.append(f"{s.name:>7} {' + '.join(s.trains):>16} {s.lr:>8.0e} {s.batch_size:>6} "
                     f"{s.epochs:>7g}   {llava}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- stage builders

def _history_file(folder: Path | None, steps: list[dict]) -> None:
    if folder is not None:
        (folder / "history.json").write_text(json.dumps(steps))


# Every builder trains in every process of a torchrun launch but writes only where it gets a
# folder: rank 0 gets the artifact's temporary folder, the other ranks None.


def _build_vision(config: PipelineConfig, stage: Stage, folder: Path, ctx: dict) -> int:
    if config.clip_checkpoint:  # a pretrained CLIP is the stage: saved as it is, 0 steps

        for part in build_clip(checkpoint=config.clip_checkpoint):
            if folder is not None:
                part.save_pretrained(folder)
        return 0, 0
    steps = stage.steps(config.clip_scenes)
    recipe = ClipRecipe(seed=config.seed, tokenizer_scenes=config.tokenizer_scenes,
                        train_scenes=config.clip_scenes, batch_size=stage.batch_size,
                        steps=steps, lr=stage.lr, warmup_fraction=stage.warmup_fraction)
    run = pretrain_clip(recipe, tokenizer=ctx["tokenizer"], device=ctx["device"], log_every=0,
                        checkpoint=ctx["checkpoint"])
    if folder is not None:
        save_clip_run(run, folder)
    return steps, config.clip_scenes


def _build_lm(config: PipelineConfig, stage: Stage, folder: Path, ctx: dict) -> int:
    if config.lm_checkpoint:  # a pretrained LLM is the stage; its tokenizer gains <image>
        for part in build_lm(checkpoint=config.lm_checkpoint):
            if folder is not None:
                part.save_pretrained(folder)
        return 0, 0
    steps = stage.steps(config.lm_scenes)
    recipe = LMRecipe(seed=config.seed, tokenizer_scenes=config.tokenizer_scenes,
                      scenes=config.lm_scenes, steps=steps, batch_size=stage.batch_size,
                      lr=stage.lr, **PIPELINE_LM_TEXT)
    model, history = pretrain_lm(recipe, ctx["tokenizer"], device=ctx["device"],
                                 checkpoint=ctx["checkpoint"])
    if folder is not None:
        model.save_pretrained(folder)
    _history_file(folder, history.steps)
    return steps, config.lm_scenes


def stage_records(config: PipelineConfig, stage: Stage, ctx: dict | None = None):
    """``(scenes_by_id, records)`` a LLaVA stage trains on: the pipeline's instruction data
    (one record of each task type per scene), then the stage's data recipe: its task types
    (stage 1: descriptions, like LLaVA's image-caption pairs; stage 2: every type), its
    fraction of the scenes, and its fraction of records shown with a wrong image."""
    ctx = ctx if ctx is not None else {}
    if "sft_records" not in ctx:
        ctx["sft_records"] = instruction_records(
            InstructionRecipe(seed=config.seed, train_scenes=config.sft_scenes,
                              answer_style=PIPELINE_LM_TEXT["answer_style"]))
    by_id, records = ctx["sft_records"]
    tasks = stage.tasks or (("description",) if stage.name == "stage1" else TASK_TYPES)
    records = select_tasks(records, [t for t in TASK_TYPES if t in tasks])
    if stage.scene_fraction < 1:
        records = subsample_scenes(records, stage.scene_fraction, seed=config.seed)
    if stage.image_noise:
        records = mismatch_images(records, stage.image_noise, seed=config.seed)
    return by_id, records


def _build_llava_stage(config: PipelineConfig, stage: Stage, folder: Path, ctx: dict) -> int:
    model, processor, tokenizer = ctx["load_vlm"](stage.name)
    by_id, records = stage_records(config, stage, ctx)
    size = model.config.vision_config.image_size
    data = encode_records(records, tokenizer, processor, image_seq_length(model),
                          lambda record: render_scene(by_id[record["scene_id"]], size))
    steps = stage.steps(len(data))
    lr_scale = {prefix: scale for part, scale in stage.lr_scale for prefix in PARTS[part]}
    history = train_stage(model, stage.name, data, steps, stage.lr, stage.batch_size,
                          config.seed, tokenizer.pad_token_id, ctx["device"], log=None,
                          parts=stage.trains, warmup_fraction=stage.warmup_fraction,
                          lr_scale=lr_scale or None, checkpoint=ctx["checkpoint"])
    if folder is not None:
        save_vlm(folder, model, processor, tokenizer)
    _history_file(folder, history.steps)
    return steps, len(data)


def _build_dpo(config: PipelineConfig, stage: Stage, folder: Path, ctx: dict) -> int:
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
                        device=ctx["device"], log=None, checkpoint=ctx["checkpoint"])
    if folder is not None:
        save_vlm(folder, policy, processor, tokenizer)
    _history_file(folder, history.steps)
    return steps, len(data)


_BUILDERS = {"vision": _build_vision, "lm": _build_lm, "stage1": _build_llava_stage,
             "stage2": _build_llava_stage, "dpo": _build_dpo}


def _stage_artifact(run_dir: Path, name: str, key: dict, build: Callable) -> Path:
    """``cached_artifact`` for every process of a run: alone, exactly that. Under torchrun
    rank 0 decides whether the stage must be built (and tells the others), every rank
    trains it, rank 0 alone writes the artifact, and all wait for it before reading."""
    rank, world = rank_and_world()
    if world == 1:
        return cached_artifact(run_dir, name, key, build, log=None)
    final = artifact_path(run_dir, name, key)
    dist.barrier()
    done = [final.exists() and verify_artifact(final) is None] if rank == 0 else [None]
    dist.broadcast_object_list(done, src=0)
    if not done[0]:
        if rank == 0:
            cached_artifact(run_dir, name, key, build, log=None)
        else:
            build(None)  # train alongside rank 0; write nothing
    dist.barrier()  # the artifact is complete before any rank reads it
    return final


def _shared_tokenizer(run_dir: Path, n_scenes: int):
    """The world's tokenizer from ``run_dir``: trained and saved by rank 0 first, then read
    by the other ranks (one process: simply ``world_tokenizer``)."""
    rank, world = rank_and_world()
    tokenizer = world_tokenizer(run_dir, n_scenes=n_scenes, log=None) if rank == 0 else None
    if world > 1:
        dist.barrier()
    if tokenizer is None:  # rank 0's, read from the run folder
        tokenizer = world_tokenizer(run_dir, n_scenes=n_scenes, log=None)
    return tokenizer


def run_pipeline(config: PipelineConfig, run_dir, device="cpu",
                 log: Callable[[str], None] | None = print,
                 checkpoint_every: int | None = None) -> PipelineResult:
    """Run (or resume) every stage of ``config`` in order; each stage's artifact lands in
    ``run_dir``. Finished stages of an earlier run with the same settings are loaded, not
    redone. ``checkpoint_every``: also checkpoint a stage every that many optimiser steps
    (in ``run_dir/.checkpoints``, removed when the stage is done), so that a run killed in
    the middle of a stage resumes there, to the weights an uninterrupted run reaches.
    Under torchrun every rank calls this alike; only rank 0 writes and logs."""
    run_dir = Path(run_dir)
    rank = rank_and_world()[0]
    log = log if rank == 0 else None
    result = PipelineResult(config)
    ctx: dict = {"device": device,
                 "tokenizer": _shared_tokenizer(run_dir, config.tokenizer_scenes)}

    def load_vlm_for(name: str):
        """The VLM a stage starts from: assembled from vision + lm for stage 1, else the
        previous stage's artifact."""
        previous = config.stages[[s.name for s in config.stages].index(name) - 1].name
        if previous == "lm":  # the first LLaVA stage: assemble CLIP + projector + LM
            clip = CLIPModel.from_pretrained(result.folder("vision"))
            processor = AutoImageProcessor.from_pretrained(result.folder("vision"))
            lm = AutoModelForCausalLM.from_pretrained(result.folder("lm"))
            tokenizer = (AutoTokenizer.from_pretrained(result.folder("lm"))
                         if config.lm_checkpoint else ctx["tokenizer"])
            return (build_vlm(clip, lm, tokenizer, seed=config.seed).to(device),
                    processor, tokenizer)
        model, processor, tokenizer = load_vlm(result.folder(previous), device=device)
        return model, processor, tokenizer

    ctx["load_vlm"] = load_vlm_for
    for index, stage in enumerate(config.stages):
        start = time.perf_counter()
        steps = []  # filled only when the stage is built, not when it is loaded
        name, key = f"{index}-{stage.name}", config.key_for(index)
        checkpoint = None
        if checkpoint_every:  # named after the artifact: other settings, another checkpoint
            path = run_dir / ".checkpoints" / f"{artifact_path(run_dir, name, key).name}.pt"
            checkpoint = Checkpointing(path, checkpoint_every)
        ctx["checkpoint"] = checkpoint

        def build(folder, stage=stage, steps=steps):
            taken, examples = _BUILDERS[stage.name](config, stage, folder, ctx)
            if folder is not None:
                (folder / "stage.json").write_text(json.dumps({"steps": taken,
                                                               "examples": examples}))
            steps.append(taken)

        folder = _stage_artifact(run_dir, name, key, build)
        if checkpoint is not None and rank == 0:
            Path(checkpoint.path).unlink(missing_ok=True)  # the stage's artifact replaces it
        seconds = time.perf_counter() - start
        done = json.loads((folder / "stage.json").read_text())
        result.stages.append(StageResult(stage.name, folder, bool(steps), seconds,
                                         done["steps"], done["examples"]))
        checkpoint = {"vision": config.clip_checkpoint, "lm": config.lm_checkpoint}.get(stage.name)
        if log and checkpoint:
            log(f"{stage.name:>7}: the checkpoint {checkpoint} ({seconds:.0f} s, not trained)")
        elif log:
            log(f"{stage.name:>7}: {'trained' if steps else 'loaded'} ({seconds:.0f} s, "
                f"{done['steps']} steps on {done['examples']} examples)")
    return result


def evaluate_stage(folder, records, scenes_by_id, device="cpu", max_new_tokens: int = 48):
    """Judge the VLM saved in a stage's ``folder`` on held-out ``records``: the
    :class:`~companion.instruction.TaskScores` of every answer."""
    model, processor, tokenizer = load_vlm(folder, device=device)
    size = model.config.vision_config.image_size
    pixels = pixel_values_for(processor, [render_scene(scenes_by_id[r["scene_id"]], size)
                                          for r in records])
    return evaluate_tasks(model, tokenizer, records, scenes_by_id, pixels,
                          max_new_tokens=max_new_tokens)
