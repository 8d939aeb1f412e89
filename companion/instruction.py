"""Instruction tuning (section 3.2): LLaVA conversations to tensors, the loss, and answers.

- :func:`build_example` turns one conversation into ``input_ids`` and ``labels``: the chat
  template, ``<image>`` expanded to one token per image patch, labels ``-100`` everywhere
  except the assistant's replies and their end-of-turn token.
- :class:`LlavaCollator` does that for a batch of LLaVA records (with their images) and pads;
  a record left with no assistant token (after truncation) is reported and skipped, never
  trained as a zero loss.
- :func:`instruction_tuning_step` is the seed's function: a batch in, the loss out.
- :func:`generate_replies` and :func:`evaluate_tasks` (:mod:`companion.answers`) let the
  model answer held-out questions turn by turn and score the answers with the world's judge.
- :class:`InstructionRecipe` and :func:`instruction_tune`: section 3.2's run (both stages
  from the cached CLIP and LM), cached by its recipe.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

# answering and judging live in companion.answers; imported here too (re-exported), where
# section 3.2 first uses them
from companion.answers import TaskScores, evaluate_tasks, generate_replies  # noqa: F401
from companion.answers import decode_reply, generate_tokens, prompt_ids  # noqa: F401
from companion.artifacts import cached_artifact
from companion.batching import IGNORE_INDEX, grouped_rows, label_tokens, pad_examples
from companion.clip import ClipRecipe, pixel_values_for, pretrained_clip
from companion.data.llava import open_image
from companion.llava import (VisionFeatureCache, expand_image_placeholder, image_seq_length,
                             inputs_embeds)
from companion.lm import LMRecipe, TinyLMConfig, pretrained_lm
from companion.stages import apply_stage, set_trainable
from companion.tokenizer import (CHAT_TEMPLATE, SPECIAL_TOKENS, encode_chat, image_token_id,
                                 world_tokenizer)
from companion.train import TrainConfig, train
from companion.vlm import build_vlm, load_vlm, save_vlm
from companion.world import (ANSWER_STYLES, careless_annotations, make_instruction_dataset,
                             make_scenes, merge_records, render_scene)


class NoTargetError(ValueError):
    """A sample has no token that carries loss (nothing to learn from it)."""


def build_example(tokenizer, conversations: list[dict], n_image_tokens: int, image_id: int,
                  max_length: int = 512, where: str = "sample") -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` of one LLaVA conversation, ready for a causal VLM.

    Labels equal the input ids on assistant reply tokens and each reply's end-of-turn token,
    and ``-100`` on everything else (system and human turns, template text, image tokens).
    They are *not* shifted: the model shifts them once, inside its loss. Longer sequences are
    cut from the right to ``max_length``; the image tokens are never cut (an error says so
    if ``max_length`` cannot hold them), and a sample left without any assistant token raises
    :class:`NoTargetError` so the caller can report and skip it.
    """
    encoded = encode_chat(tokenizer, conversations)
    ids, mask = expand_image_placeholder(encoded["input_ids"], encoded["assistant_mask"],
                                         image_id, n_image_tokens, where)
    if image_id in ids:
        last_image = len(ids) - 1 - ids[::-1].index(image_id)
        if last_image >= max_length:
            raise ValueError(f"{where}: max_length={max_length} would cut the image's "
                             f"{n_image_tokens} tokens (they end at position {last_image}); "
                             f"use max_length > {last_image + 1}")
    ids, mask = ids[:max_length], mask[:max_length]
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, mask)]
    if all(label == IGNORE_INDEX for label in labels):
        reason = ("no assistant token survives truncation to max_length="
                  f"{max_length}" if any(encoded["assistant_mask"]) else
                  "the conversation has no assistant reply")
        raise NoTargetError(f"{where}: {reason}; skipping it (it would train on nothing)")
    return {"input_ids": ids, "labels": labels}


@dataclass
class LlavaCollator:
    """LLaVA records to a padded batch: ``input_ids``, ``attention_mask``, ``labels``,
    ``pixel_values``.

    ``load_image(record)`` returns the record's PIL image (the world renders its scene; a real
    data set opens ``image_root / record["image"]``). Skipped records are listed in
    ``skipped`` as ``(record id, reason)``.
    """

    tokenizer: object
    image_processor: object
    n_image_tokens: int
    load_image: Callable[[dict], object]
    max_length: int = 512
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self):
        self.image_id = image_token_id(self.tokenizer)

    def __call__(self, records: Sequence[dict]) -> dict[str, torch.Tensor]:
        examples, images = [], []
        for index, record in enumerate(records):
            where = f"record {record.get('id', index)!r}"
            try:
                example = build_example(self.tokenizer, record["conversations"],
                                        self.n_image_tokens, self.image_id, self.max_length, where)
            except NoTargetError as error:
                self.skipped.append((str(record.get("id", index)), str(error)))
                warnings.warn(str(error), stacklevel=2)
                continue
            examples.append(example)
            images.append(self.load_image(record))
        if not examples:
            raise NoTargetError(f"every record of this batch of {len(records)} was skipped: "
                                f"{self.skipped[-1][1]}")
        batch = pad_examples(examples, self.tokenizer.pad_token_id)
        batch["pixel_values"] = self.image_processor(images=images,
                                                     return_tensors="pt")["pixel_values"]
        return batch


def instruction_tuning_step(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The seed's step: images and conversation tokens in, the assistant-only loss out.

    The vision tower encodes ``pixel_values``, the projector maps the features to vision
    tokens that replace the ``<image>`` placeholders, and the LM's cross-entropy is averaged
    over the label positions that are not -100 (the assistant's tokens), shifted once.

    A batch may carry ``vision_features`` (the frozen tower's output, from a
    :class:`~companion.llava.VisionFeatureCache`) in place of ``pixel_values``: the step then
    starts at the projector (:func:`companion.llava.inputs_embeds`), with the same result.
    """
    if "vision_features" in batch:
        embeds = inputs_embeds(model, batch["input_ids"], features=batch["vision_features"])
        return model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 pixel_values=batch["pixel_values"], labels=batch["labels"]).loss


# ----------------------------------------------------------------------------- pre-encoded data

@dataclass
class InstructionData:
    """A training set encoded once: examples, one image per record, and what was skipped."""

    examples: list[dict]
    pixel_values: torch.Tensor     # (R, 3, H, W), row r belongs to examples[r]
    tasks: list[str]
    skipped: list[tuple[str, str]]
    # the frozen tower's features of every row (VisionFeatureCache); batches then carry
    # them instead of pixels (see cache_vision_features)
    vision_features: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def cache_vision_features(self, model) -> InstructionData:
        """Run ``model``'s frozen vision tower once over every image and keep the features,
        so that each training step starts at the projector (LLaVA's stages 1 and 2 never
        change the tower). Returns ``self``; :meth:`drop_vision_features` undoes it."""
        self.vision_features = VisionFeatureCache(model, self.pixel_values).features
        return self

    def drop_vision_features(self) -> InstructionData:
        self.vision_features = None
        return self

    def batch(self, batch_size: int, step: int, seed: int = 0, pad_id: int = 0,
              group: int = 8) -> dict:
        """The batch of ``step``: rows drawn at random with replacement, deterministic in
        ``(seed, step)``.

        ``group > 1`` draws ``group`` batches' worth of rows at once, sorts them by length
        and hands out one slice per step (in a shuffled order), so a batch holds sequences of
        similar length and little compute goes into padding (Hugging Face's
        ``group_by_length``). Every row is still equally likely to be drawn.
        """
        rows = grouped_rows([len(e["input_ids"]) for e in self.examples], batch_size, step,
                            seed, group)
        out = pad_examples([self.examples[r] for r in rows], pad_id)
        if self.vision_features is not None:
            out["vision_features"] = self.vision_features[rows]
        else:
            out["pixel_values"] = self.pixel_values[rows]
        return out


def encode_records(records: Sequence[dict], tokenizer, image_processor, n_image_tokens: int,
                   load_image: Callable[[dict], object], max_length: int = 512) -> InstructionData:
    """Encode LLaVA records once (tokens, labels, pixels), reporting skipped ones."""
    image_id = image_token_id(tokenizer)
    examples, images, tasks, skipped = [], [], [], []
    for index, record in enumerate(records):
        where = f"record {record.get('id', index)!r}"
        try:
            examples.append(build_example(tokenizer, record["conversations"], n_image_tokens,
                                          image_id, max_length, where))
        except NoTargetError as error:
            skipped.append((str(record.get("id", index)), str(error)))
            continue
        images.append(load_image(record))
        tasks.append(record.get("task", "unknown"))
    if skipped:
        warnings.warn(f"{len(skipped)} of {len(records)} records have no assistant token and "
                      f"were skipped; first: {skipped[0][1]}", stacklevel=2)
    if not examples:
        raise NoTargetError("no record has an assistant token to train on")
    return InstructionData(examples, pixel_values_for(image_processor, images), tasks, skipped)


# ----------------------------------------------------------------------------- the section's run

# fields added to InstructionRecipe after runs were cached -> the value those runs had
_KEYLESS_VALUES = {"clip_image_size": 48, "clip_patch_size": 8, "clip_vision_width": 64,
                   "clip_vision_layers": 2, "lm_layers": 2, "merge_patches": 1}


@dataclass(frozen=True)
class InstructionRecipe:
    """Everything that decides the instruction-tuned VLM of section 3.2 (its cache key).

    The defaults are notebook 3.2's defaults; later sections (RLHF, DPO) start from the
    model this recipe makes, loaded from the cache or trained on the spot.
    """

    seed: int = 0
    tokenizer_scenes: int = 2000
    clip_train_scenes: int = 8000   # the CLIP recipe of 3.1.1
    clip_steps: int = 1800
    clip_batch_size: int = 64
    clip_image_size: int = 48       # pixels per side the scenes are rendered at
    clip_patch_size: int = 8        # 16 (at 48 pixels): one vision token per cell of the grid
    clip_vision_width: int = 64
    clip_vision_layers: int = 2
    merge_patches: int = 2          # each 2 x 2 block of patches is one vision token
                                    # (6 x 6 patches → 9, one per cell; llava.py); 1: LLaVA's
    lm_scenes: int = 20000          # the text-only LM recipe (companion.vlm.LMRecipe)
    lm_steps: int = 2000
    lm_layers: int = 2              # the LM's transformer blocks (TinyLMConfig.layers)
    train_scenes: int = 3000        # scenes of the instruction data
    stage1_steps: int = 300
    stage1_lr: float = 1e-3
    stage2_steps: int = 2400
    stage2_lr: float = 2e-3
    batch_size: int = 32
    lm_loss_on: str = "replies"         # the LM's pretraining loss: "replies" or "all" tokens
    lm_questions_per_conversation: int = 6  # questions per LM pretraining conversation
    answer_style: str = "evidence_first"  # or "verdict_first": the LM's and stage 2's data
    questions_per_conversation: int = 3  # questions per stage-2 record (merge_records)
    annotator_hallucination_rate: float = 0.0  # share of long-form stage-2 answers written
                                               # by a careless annotator (world.careless_...)
    vision_cache: bool = False          # train stages 1 and 2 from cached tower features

    def __post_init__(self):
        for name in ("train_scenes", "stage1_steps", "stage2_steps", "batch_size", "merge_patches",
                     "lm_questions_per_conversation", "questions_per_conversation"):
            if getattr(self, name) < 1:
                raise ValueError(f"InstructionRecipe.{name}={getattr(self, name)} must be >= 1")
        for name in ("stage1_lr", "stage2_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"InstructionRecipe.{name}={getattr(self, name)} must be > 0")
        if self.answer_style not in ANSWER_STYLES:
            raise ValueError(f"InstructionRecipe.answer_style={self.answer_style!r}; choose "
                             f"one of {ANSWER_STYLES}")
        if not 0.0 <= self.annotator_hallucination_rate <= 1.0:
            raise ValueError(f"InstructionRecipe.annotator_hallucination_rate="
                             f"{self.annotator_hallucination_rate} must be in [0, 1]")
        self.lm_recipe()  # the LM's options are checked there

    def to_dict(self) -> dict:
        """The recipe as cache keys read it. A field added after models were cached enters
        the key only when it differs from the value every run had before it existed, so
        those runs keep their keys (and a new default never takes an old key)."""
        values = asdict(self)
        for name, before in _KEYLESS_VALUES.items():
            if values[name] == before:
                del values[name]
        return values

    def clip_recipe(self):
        return ClipRecipe(seed=self.seed, tokenizer_scenes=self.tokenizer_scenes,
                          train_scenes=self.clip_train_scenes, steps=self.clip_steps,
                          batch_size=self.clip_batch_size, image_size=self.clip_image_size,
                          patch_size=self.clip_patch_size,
                          vision_width=self.clip_vision_width,
                          vision_layers=self.clip_vision_layers)

    def lm_recipe(self):
        merged = self.lm_questions_per_conversation > 1
        return LMRecipe(seed=self.seed, tokenizer_scenes=self.tokenizer_scenes,
                        sizes=TinyLMConfig(layers=self.lm_layers),
                        scenes=self.lm_scenes, steps=self.lm_steps, loss_on=self.lm_loss_on,
                        questions_per_conversation=self.lm_questions_per_conversation,
                        answer_style=self.answer_style, max_length=512 if merged else 256)


# notebook 3.2's parameters that make its recipe, each named as the field it sets
NOTEBOOK_PARAMETERS = ("seed", "tokenizer_scenes", "clip_train_scenes", "clip_steps",
                       "clip_batch_size", "lm_scenes", "lm_steps", "train_scenes",
                       "stage1_steps", "stage1_lr", "stage2_steps", "stage2_lr", "batch_size",
                       "questions_per_conversation", "merge_patches")


def recipe_from_parameters(parameters: dict, names: dict[str, str] | None = None,
                           base: InstructionRecipe | None = None) -> InstructionRecipe:
    """Section 3.2's recipe from a notebook's parameters (e.g. its ``globals()``).

    ``names`` maps a parameter's name to the recipe field it sets (default: 3.2's
    :data:`NOTEBOOK_PARAMETERS`, named as the fields); a parameter the notebook does not
    declare keeps ``base``'s value (default: :class:`InstructionRecipe`'s defaults), and
    other names are ignored. The 3.3 notebooks reach their starting model's recipe through
    here too (:func:`companion.rlhf.recipe_from_parameters`), so the same parameters always
    give the same cache key."""
    names = names if names is not None else {name: name for name in NOTEBOOK_PARAMETERS}
    base = base if base is not None else InstructionRecipe()
    return replace(base, **{field_name: parameters[name] for name, field_name in names.items()
                            if name in parameters})


def instruction_records(recipe: InstructionRecipe) -> tuple[dict, list[dict]]:
    """``(scenes_by_id, records)`` of the section's training data: one record of each task
    type per scene (scene ids from 30,000,000, so they never meet another section's), in
    the recipe's answer style, written by the careless annotator at its rate
    (:func:`stage_records` splits them between the stages)."""
    scenes = make_scenes(recipe.train_scenes, seed=recipe.seed + 2, start_id=30_000_000)
    by_id = {s.scene_id: s for s in scenes}
    records = make_instruction_dataset(scenes, seed=recipe.seed + 2,
                                       answer_style=recipe.answer_style)
    if recipe.annotator_hallucination_rate > 0:
        records = careless_annotations(records, by_id, recipe.annotator_hallucination_rate,
                                       seed=recipe.seed + 2)
    return by_id, records


def stage_records(recipe: InstructionRecipe, records: Sequence[dict]) -> dict[str, list[dict]]:
    """Each stage's records: stage 1 the description records (image-caption pairs, as
    LLaVA's stage 1), with their true captions where the careless annotator wrote them
    (LLaVA's stage-1 captions were not written by the text-only GPT-4); stage 2 every
    record as written, joined ``questions_per_conversation`` per conversation
    (:func:`companion.world.merge_records`)."""
    def as_captioned(record):
        note = record.get("annotator")
        if note is None:
            return record
        turns = [dict(t) for t in record["conversations"]]
        turns[2 * note["turn"] + 1]["value"] = note["clean"]
        return {k: v for k, v in record.items() if k != "annotator"} | {"conversations": turns}

    return {"stage1": [as_captioned(r) for r in records if r["task"] == "description"],
            "stage2": merge_records(records, recipe.questions_per_conversation,
                                    seed=recipe.seed + 2)}


def encode_stage_data(records: Sequence[dict], scenes_by_id: dict, tokenizer, processor,
                      n_image_tokens: int, image_size: int) -> dict[str, InstructionData]:
    """The two stages' training sets: ``stage1`` (description records: LLaVA's stage 1
    trains on image-caption pairs) and ``stage2`` (every task type)."""
    def load_image(record):
        return render_scene(scenes_by_id[record["scene_id"]], image_size)

    stage1 = [r for r in records if r["task"] == "description"]
    return {"stage1": encode_records(stage1, tokenizer, processor, n_image_tokens, load_image),
            "stage2": encode_records(records, tokenizer, processor, n_image_tokens, load_image)}


def encode_world_records(records: Sequence[dict], scenes_by_id: dict, tokenizer, processor,
                         n_image_tokens: int, image_size: int) -> InstructionData:
    """World records encoded with their scenes rendered at ``image_size``."""
    return encode_records(records, tokenizer, processor, n_image_tokens,
                          lambda record: render_scene(scenes_by_id[record["scene_id"]],
                                                      image_size))


def encode_file_data(records: Sequence[dict], image_folder, tokenizer, processor,
                     n_image_tokens: int, stage1_records: Sequence[dict] | None = None
                     ) -> dict[str, InstructionData]:
    """The two stages' training sets from LLaVA JSON records whose images are files under
    ``image_folder`` (as :func:`companion.data.llava.load_llava_json` returns them).

    ``stage1_records`` is stage 1's own file (LLaVA's image-caption pairs); without one,
    stage 1 takes the records whose ``task`` is ``description``, or all of them when no
    record says. A text-only record (no ``image``) is reported in ``skipped`` and left out:
    every conversation here feeds one image to the vision tower.
    """
    def with_images(rows):
        kept = [r for r in rows if r.get("image")]
        dropped = [(str(r.get("id", i)), "text-only record (no image); left out")
                   for i, r in enumerate(rows) if not r.get("image")]
        if not kept:
            raise ValueError(f"none of the {len(rows)} records has an image to train on")
        return kept, dropped

    def load_image(record):
        return open_image(image_folder, record["image"], f"record {record.get('id')!r}")

    stage2, dropped2 = with_images(records)
    if stage1_records is None:
        stage1_records = [r for r in stage2 if r.get("task") == "description"] or stage2
    stage1, dropped1 = with_images(stage1_records)
    data = {"stage1": encode_records(stage1, tokenizer, processor, n_image_tokens, load_image),
            "stage2": encode_records(stage2, tokenizer, processor, n_image_tokens, load_image)}
    data["stage1"].skipped.extend(dropped1)
    data["stage2"].skipped.extend(dropped2)
    if dropped2:
        warnings.warn(f"{len(dropped2)} of {len(records)} records are text-only and were left "
                      "out", stacklevel=2)
    return data


def train_stage(model, stage: str, data: InstructionData, steps: int, lr: float,
                batch_size: int, seed: int, pad_id: int, device=None, progress: bool = False,
                log: Callable[[str], None] | None = print, parts: Sequence[str] | None = None,
                warmup_fraction: float = 0.03, lr_scale: dict[str, float] | None = None,
                checkpoint=None, after_step: Callable[[int], None] | None = None):
    """Freeze ``model`` as LLaVA's ``stage`` does (see :mod:`companion.stages`), or so that
    exactly ``parts`` learn when given, and train it on ``data`` with the assistant-only
    loss; returns the training history. ``lr_scale`` maps parameter-name prefixes to
    learning-rate multipliers (e.g. ``{"model.vision_tower.": 0.1}``); ``checkpoint`` a
    :class:`~companion.train.Checkpointing` for mid-stage checkpoints; ``after_step(step)``
    runs after each optimiser step (e.g. to measure the model part-way)."""
    counts = set_trainable(model, parts) if parts is not None else apply_stage(model, stage)
    if data.vision_features is not None:  # cached features are right only for a frozen tower

        VisionFeatureCache.check_frozen(model)
    if log:
        log(f"{stage}: training {', '.join(p for p, n in counts.items() if n)} "
            f"({sum(counts.values()) / 1e6:.3f} M parameters); frozen: "
            f"{', '.join(p for p, n in counts.items() if not n)}")
    config = TrainConfig(steps=steps, lr=lr, weight_decay=0.0, warmup_fraction=warmup_fraction,
                         log_every=max(1, steps // 4) if log else 0, progress=progress)
    return train(model, lambda batch: instruction_tuning_step(model, batch),
                 lambda step: data.batch(batch_size, step, seed=seed, pad_id=pad_id),
                 config, device=device, print_fn=log or (lambda _: None), lr_scale=lr_scale,
                 batch_weight=label_tokens, checkpoint=checkpoint, after_step=after_step)


def _instruction_artifact_config(recipe: InstructionRecipe) -> dict:
    return {"kind": "vlm-instruction", "procedure": 1, "recipe": recipe.to_dict(),
            "lm_sizes": recipe.lm_recipe().sizes.to_dict(),
            "tokenizer": {"template": CHAT_TEMPLATE, "specials": SPECIAL_TOKENS}}


def instruction_tune(recipe: InstructionRecipe, cache_dir, device="cpu", log=None):
    """Run section 3.2 end to end: CLIP and LM (from the cache or trained), the VLM, stage 1,
    stage 2. Returns ``(model, processor, tokenizer, {"stage1": history, "stage2": ...})``."""
    tokenizer = world_tokenizer(cache_dir, n_scenes=recipe.tokenizer_scenes, log=None)
    clip, processor, _ = pretrained_clip(cache_dir, recipe.clip_recipe(), device=device, log=log)
    lm, _ = pretrained_lm(cache_dir, tokenizer, recipe.lm_recipe(), device=device, log=log)
    model = build_vlm(clip, lm, tokenizer, seed=recipe.seed,
                      merge_patches=recipe.merge_patches).to(device)
    scenes_by_id, records = instruction_records(recipe)
    by_stage = stage_records(recipe, records)
    data = {stage: encode_world_records(rows, scenes_by_id, tokenizer, processor,
                                        image_seq_length(model),
                                        model.config.vision_config.image_size)
            for stage, rows in by_stage.items()}
    if recipe.vision_cache:  # both stages freeze the tower: encode each image once

        apply_stage(model, "stage1")
        for stage_data in data.values():
            stage_data.cache_vision_features(model)
    histories = {}
    for stage, steps, lr in (("stage1", recipe.stage1_steps, recipe.stage1_lr),
                             ("stage2", recipe.stage2_steps, recipe.stage2_lr)):
        histories[stage] = train_stage(model, stage, data[stage], steps, lr, recipe.batch_size,
                                       recipe.seed, tokenizer.pad_token_id, device, log=log)
    return model, processor, tokenizer, histories


def _save_instruction_tuned(folder, model, processor, tokenizer, histories) -> None:
    save_vlm(folder, model, processor, tokenizer)
    (Path(folder) / "history.json").write_text(json.dumps(
        {stage: h.steps for stage, h in histories.items()}))


def publish_instruction_tuned(cache_dir, recipe: InstructionRecipe, model, processor, tokenizer,
                              histories: dict, log=print):
    """Store the model a notebook trained with ``recipe`` where
    :func:`instruction_tuned_vlm` finds it."""
    return cached_artifact(cache_dir, "vlm-sft", _instruction_artifact_config(recipe),
                           lambda folder: _save_instruction_tuned(folder, model, processor,
                                                                  tokenizer, histories), log=log)


def instruction_tuned_vlm(cache_dir, recipe: InstructionRecipe | None = None, device="cpu",
                          log=print):
    """The instruction-tuned VLM of section 3.2 ``(model, processor, tokenizer)``: from the
    cache, or trained now with ``recipe`` (default: the section's default run) and cached."""
    recipe = recipe or InstructionRecipe()

    def build(folder):
        model, processor, tokenizer, histories = instruction_tune(recipe, cache_dir, device)
        _save_instruction_tuned(folder, model, processor, tokenizer, histories)

    folder = cached_artifact(cache_dir, "vlm-sft", _instruction_artifact_config(recipe), build,
                             log=log)
    model, processor, tokenizer = load_vlm(folder, device=device)
    return model.eval(), processor, tokenizer
