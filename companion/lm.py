"""The LLM of LLaVA: a tiny Llama pretrained on the world's text (sections 3.1.3 and 3.2).

The chapter's LM is a tiny ``LlamaForCausalLM`` first pretrained on the world's *text*
(:func:`pretrain_lm`), so that it plays the part of the pretrained LLM that LLaVA's stage 1
keeps frozen. Any real checkpoint loads instead (:func:`build_lm` with ``checkpoint=``).

How the LM learns about scenes without ever seeing one: its pretraining conversations put a
*text description* of the scene where the image will later be (``<image>`` replaced by
"Scene: a small red circle at the top left. ..."). It learns to answer counting, OCR,
reasoning and grounding questions from that text. Stage 1 then only has to teach the
projector to turn image features into something the frozen LM reads like that description.
:func:`pretrained_lm` trains it once per :class:`LMRecipe` and caches it, with its curve of
held-out accuracy (told each scene in words) against pretraining compute.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from companion.answers import evaluate_tasks
from companion.artifacts import cached_artifact
from companion.batching import IGNORE_INDEX, grouped_rows, label_tokens, pad_examples
from companion.tokenizer import (CHAT_TEMPLATE, IMAGE_TOKEN, SPECIAL_TOKENS, encode_chat,
                                 end_of_turn_id, fit_embeddings, prepare_tokenizer)
from companion.train import TrainConfig, train
from companion.world import (ANSWER_STYLES, TASK_TYPES, canonical_caption, caption_with_boxes,
                             make_instruction_dataset, make_scenes, merge_records)

SCENE_PREFIX = "Scene: "


@dataclass(frozen=True)
class TinyLMConfig:
    """Sizes of the default causal LM (a ``LlamaConfig``)."""

    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 384
    max_positions: int = 512

    def to_dict(self) -> dict:
        return asdict(self)


def build_lm(tokenizer=None, checkpoint: str | None = None, sizes: TinyLMConfig | None = None,
             seed: int = 0):
    """``(model, tokenizer)``: a tiny ``LlamaForCausalLM`` for ``tokenizer``, or the causal LM
    and tokenizer saved at ``checkpoint`` (hub id or folder)."""
    if checkpoint:
        model = AutoModelForCausalLM.from_pretrained(checkpoint)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(checkpoint)
        prepare_tokenizer(tokenizer)  # <image>, a pad token and a chat template if missing
        fit_embeddings(model, tokenizer)
        return model, tokenizer
    if tokenizer is None:
        raise ValueError("build_lm needs a tokenizer when no checkpoint is given")
    sizes = sizes or TinyLMConfig()
    if sizes.hidden_size % sizes.heads:
        raise ValueError(f"hidden_size={sizes.hidden_size} must be a multiple of "
                         f"heads={sizes.heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size, num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads, num_key_value_heads=sizes.heads,
        max_position_embeddings=sizes.max_positions, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=end_of_turn_id(tokenizer),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer


# ----------------------------------------------------------------------------- text-only LM data

def scene_as_text(scene, boxes: bool = False) -> str:
    """What the LM reads in place of the image during its text-only pretraining: the
    canonical caption, or with ``boxes`` the caption with each object's box."""
    return SCENE_PREFIX + (caption_with_boxes(scene) if boxes else canonical_caption(scene))


def text_only_conversations(records, scenes_by_id, boxes: bool = False) -> list[list[dict]]:
    """LLaVA records with ``<image>`` replaced by the scene's description (for the LM)."""
    conversations = []
    for record in records:
        scene = scenes_by_id[record["scene_id"]]
        turns = [dict(turn) for turn in record["conversations"]]
        turns[0]["value"] = turns[0]["value"].replace(IMAGE_TOKEN, scene_as_text(scene, boxes))
        conversations.append(turns)
    return conversations


def lm_corpus(n_scenes: int, seed: int, questions_per_conversation: int = 1,
              answer_style: str = "verdict_first", boxes: bool = False) -> list[list[dict]]:
    """Text-only conversations of every task type about ``n_scenes`` fresh scenes; with
    ``questions_per_conversation`` > 1, that many of a scene's questions share one
    conversation (:func:`companion.world.merge_records`)."""
    scenes = make_scenes(n_scenes, seed=seed, start_id=20_000_000)
    records = make_instruction_dataset(scenes, tasks=TASK_TYPES, seed=seed,
                                       answer_style=answer_style)
    records = merge_records(records, questions_per_conversation, seed=seed)
    return text_only_conversations(records, {s.scene_id: s for s in scenes}, boxes)


@dataclass(frozen=True)
class LMRecipe:
    """Text-only pretraining of the chapter's LM (the "pretrained LLM" of LLaVA)."""

    seed: int = 0
    tokenizer_scenes: int = 2000
    scenes: int = 20000         # scenes whose text-only conversations make the corpus
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3
    sizes: TinyLMConfig = TinyLMConfig()
    max_length: int = 512
    # what the loss reads: only the assistant's "replies" (the scene's description is
    # context, never a target, as in instruction tuning) or "all" tokens (plain LM loss)
    loss_on: str = "replies"
    questions_per_conversation: int = 6  # questions about one scene in one conversation
    answer_style: str = "evidence_first"  # or "verdict_first" (companion.world)
    scene_boxes: bool = False  # the scene in words carries each object's box (grounding)

    def __post_init__(self):
        if self.loss_on not in ("all", "replies"):
            raise ValueError(f"LMRecipe.loss_on={self.loss_on!r}; choose 'all' or 'replies'")
        if self.questions_per_conversation < 1:
            raise ValueError(f"LMRecipe.questions_per_conversation="
                             f"{self.questions_per_conversation} must be at least 1")
        if self.answer_style not in ANSWER_STYLES:
            raise ValueError(f"LMRecipe.answer_style={self.answer_style!r}; choose one of "
                             f"{ANSWER_STYLES}")
        if self.max_length > self.sizes.max_positions:
            raise ValueError(f"LMRecipe.max_length={self.max_length} exceeds the LM's "
                             f"max_positions={self.sizes.max_positions}")

    def to_dict(self) -> dict:
        """The recipe as the cache key reads it."""
        return asdict(self)


def lm_reply_labels(chat: dict) -> list[int]:
    """Labels of a text-only conversation whose loss reads only the assistant's replies (and
    their end-of-turn token): every other position is -100, as in instruction tuning."""
    return [token if keep else IGNORE_INDEX
            for token, keep in zip(chat["input_ids"], chat["assistant_mask"])]


def pretrain_lm(recipe: LMRecipe, tokenizer, device="cpu", log_every: int = 0,
                checkpoint=None, after_step=None, examples=None):
    """Train a tiny LM on text-only conversations; returns ``(model, history)``.
    ``checkpoint``: a :class:`~companion.train.Checkpointing` for mid-run checkpoints;
    ``after_step(step, model)``: called after each optimiser step (e.g. to measure the LM
    part-way, for a curve of accuracy against compute); ``examples``: the recipe's
    :func:`lm_training_examples`, when the caller has already encoded them."""
    model, _ = build_lm(tokenizer, sizes=recipe.sizes, seed=recipe.seed)
    encoded = examples if examples is not None else lm_training_examples(recipe, tokenizer)
    lengths = [len(e["input_ids"]) for e in encoded]
    model.to(device)

    def next_batch(step):  # batches of similar length: little compute spent on padding
        rows = grouped_rows(lengths, recipe.batch_size, step, seed=recipe.seed)
        return pad_examples([encoded[r] for r in rows], tokenizer.pad_token_id)

    def loss_fn(batch):
        return model(**batch).loss

    config = TrainConfig(steps=recipe.steps, lr=recipe.lr, weight_decay=0.0,
                         warmup_fraction=0.05, log_every=log_every)
    history = train(model, loss_fn, next_batch, config, device=device, batch_weight=label_tokens,
                    checkpoint=checkpoint,
                    after_step=None if after_step is None else lambda step: after_step(step, model))
    return model, history


def lm_training_examples(recipe: LMRecipe, tokenizer) -> list[dict]:
    """The LM's training set: ``{"input_ids", "labels"}`` per text-only conversation."""
    encoded = []
    corpus = lm_corpus(recipe.scenes, recipe.seed, recipe.questions_per_conversation,
                       recipe.answer_style, recipe.scene_boxes)
    for index, turns in enumerate(corpus):
        chat = encode_chat(tokenizer, turns)
        ids = chat["input_ids"]
        if len(ids) > recipe.max_length:
            raise ValueError(f"text-only conversation {index} has {len(ids)} tokens, more than "
                             f"max_length={recipe.max_length}; raise LMRecipe.max_length (the "
                             f"LM has {recipe.sizes.max_positions} positions)")
        labels = ids if recipe.loss_on == "all" else lm_reply_labels(chat)
        encoded.append({"input_ids": ids, "labels": labels})
    return encoded


def told_in_words(scenes, seed: int, boxes: bool = False) -> tuple[list[dict], dict]:
    """``(records, scenes_by_id)``: one record of each task type per scene, with ``<image>``
    replaced by the scene in words, to measure what an LM can do with a perfect description
    of the scene (3.2's "text LM" column; the ceiling of a VLM built on that LM)."""
    by_id = {s.scene_id: s for s in scenes}
    records = make_instruction_dataset(scenes, seed=seed)
    return ([{**r, "conversations": c}
             for r, c in zip(records, text_only_conversations(records, by_id, boxes))], by_id)


# the LM's held-out curve, measured while it trains (cached with it): the first scenes of
# 3.2's held-out set (seed + 3, ids from 40,000,000), at these steps and at the last
LM_CURVE_STEPS = (250, 500, 1000, 1500)
LM_CURVE_SCENES = 50
LM_CURVE_MAX_NEW_TOKENS = 48


def pretrain_lm_with_curve(recipe: LMRecipe, tokenizer, device="cpu"):
    """:func:`pretrain_lm`, measuring the LM part-way on held-out scenes told in words;
    returns ``(model, history, curve)``, each curve point ``{"step", "tokens",
    "mean_task_accuracy", "by_task"}`` (tokens: training tokens seen, padding excluded)."""
    scenes = make_scenes(LM_CURVE_SCENES, seed=recipe.seed + 3, start_id=40_000_000)
    records, by_id = told_in_words(scenes, recipe.seed + 3, recipe.scene_boxes)
    examples = lm_training_examples(recipe, tokenizer)
    tokens_per_step = recipe.batch_size * sum(len(e["input_ids"]) for e in examples) / len(examples)
    steps = {s for s in LM_CURVE_STEPS if s < recipe.steps} | {recipe.steps}
    curve = []

    def measure(step, model):
        if step + 1 not in steps:
            return
        model.eval()
        with torch.no_grad():
            scores = evaluate_tasks(model, tokenizer, records, by_id, None,
                                    max_new_tokens=LM_CURVE_MAX_NEW_TOKENS)
        model.train()
        curve.append({"step": step + 1, "tokens": round((step + 1) * tokens_per_step),
                      "mean_task_accuracy": scores.mean_task_accuracy(),
                      "by_task": {t: v["accuracy"] for t, v in scores.by_task().items()}})

    model, history = pretrain_lm(recipe, tokenizer, device=device, after_step=measure,
                                 examples=examples)
    return model, history, curve


def pretrained_lm(cache_dir, tokenizer, recipe: LMRecipe | None = None, device="cpu", log=print,
                  with_curve: bool = False):
    """The text-pretrained LM, from the cache or trained now (keyed by the recipe):
    ``(model, history)``, or ``(model, history, curve)`` with ``with_curve`` (the held-out
    curve :func:`pretrain_lm_with_curve` measured while it trained)."""
    recipe = recipe or LMRecipe()
    # "procedure" changes whenever pretrain_lm trains differently for the same recipe, or
    # the artifact holds something new (3: the held-out curve)
    config = {"kind": "lm", "procedure": 3, "recipe": recipe.to_dict(),
              "curve": {"steps": LM_CURVE_STEPS, "scenes": LM_CURVE_SCENES,
                        "max_new_tokens": LM_CURVE_MAX_NEW_TOKENS},
              "tokenizer": {"template": CHAT_TEMPLATE, "specials": SPECIAL_TOKENS,
                            "size": len(tokenizer)}}

    def build(folder):
        model, history, curve = pretrain_lm_with_curve(recipe, tokenizer, device=device)
        model.save_pretrained(folder)
        (folder / "history.json").write_text(json.dumps(history.steps))
        (folder / "curve.json").write_text(json.dumps(curve))

    folder = cached_artifact(cache_dir, "lm", config, build, log=log)
    history = json.loads((folder / "history.json").read_text())
    model = LlamaForCausalLM.from_pretrained(folder).to(device)
    if with_curve:
        return model, history, json.loads((folder / "curve.json").read_text())
    return model, history
