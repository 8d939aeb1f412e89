"""The vision-language model of sections 3.2 to 3.4: LLaVA on real ``transformers`` classes.

``LlavaForConditionalGeneration`` = a CLIP vision tower (trained in 3.1.1) + the LLaVA-1.5
projector (linear, GELU, linear) + a causal LM. The chapter's LM is a tiny ``LlamaForCausalLM``
first pretrained on the world's *text* (:func:`pretrain_lm`), so that it plays the part of
the pretrained LLM that LLaVA's stage 1 keeps frozen. Any real checkpoint loads instead
through the same functions (:func:`build_lm` with ``checkpoint=``, :func:`load_vlm`).

How the LM learns about scenes without ever seeing one: its pretraining conversations put a
*text description* of the scene where the image will later be (``<image>`` replaced by
"Scene: a small red circle at the top left. ..."). It learns to answer counting, OCR,
reasoning and grounding questions from that text. Stage 1 then only has to teach the
projector to turn image features into something the frozen LM reads like that description.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass

import torch

from companion.tokenizer import IMAGE_TOKEN

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
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if checkpoint:
        from companion.tokenizer import prepare_tokenizer

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


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant reply: ``<|end|>`` for the world's tokenizer, else
    the token the chat template closes a reply with (``<|im_end|>``, ``<|eot_id|>``...),
    else eos (LLaVA-1.5's ``</s>``)."""
    from companion.tokenizer import END_OF_TURN, template_end_of_turn

    ids = tokenizer.convert_tokens_to_ids([END_OF_TURN])
    if ids and ids[0] is not None and ids[0] != tokenizer.unk_token_id:
        return int(ids[0])
    # rendering the template costs a few hundred microseconds and decoding asks for every
    # reply, so the answer is kept per tokenizer object, for its current template and size
    state = (str(tokenizer.chat_template), len(tokenizer))
    known = _END_OF_TURN.get(tokenizer)
    if known is None or known[0] != state:
        found = template_end_of_turn(tokenizer) if tokenizer.chat_template else None
        if found is None and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer's chat template ends a reply with no special token "
                             "and it has no eos token; set tokenizer.eos_token")
        known = (state, int(found if found is not None else tokenizer.eos_token_id))
        _END_OF_TURN[tokenizer] = known
    return known[1]


_END_OF_TURN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fit_embeddings(model, tokenizer) -> int:
    """Grow ``model``'s token embeddings (and output layer) to ``len(tokenizer)`` after
    :func:`companion.tokenizer.prepare_tokenizer` added tokens; return how many rows were
    added (new rows start at the mean of the old ones, as transformers does)."""
    current = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= current:
        return 0
    model.resize_token_embeddings(len(tokenizer))
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return len(tokenizer) - current


def image_token_id(tokenizer) -> int:
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token; add it with "
                         "tokenizer.add_special_tokens({'additional_special_tokens': "
                         f"['{IMAGE_TOKEN}']}})"
                         " and resize the LM's embeddings")
    return int(token_id)


# ----------------------------------------------------------------------------- text-only LM data

def scene_as_text(scene, boxes: bool = False) -> str:
    """What the LM reads in place of the image during its text-only pretraining: the
    canonical caption, or with ``boxes`` the caption with each object's box."""
    from companion.world import canonical_caption, caption_with_boxes

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
    from companion.world import TASK_TYPES, make_instruction_dataset, make_scenes, merge_records

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
        from companion.world import ANSWER_STYLES

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
    from companion.instruction import IGNORE_INDEX

    return [token if keep else IGNORE_INDEX
            for token, keep in zip(chat["input_ids"], chat["assistant_mask"])]


def pretrain_lm(recipe: LMRecipe, tokenizer, device="cpu", log_every: int = 0,
                checkpoint=None, after_step=None, examples=None):
    """Train a tiny LM on text-only conversations; returns ``(model, history)``.
    ``checkpoint``: a :class:`~companion.train.Checkpointing` for mid-run checkpoints;
    ``after_step(step, model)``: called after each optimiser step (e.g. to measure the LM
    part-way, for a curve of accuracy against compute); ``examples``: the recipe's
    :func:`lm_training_examples`, when the caller has already encoded them."""
    from companion.train import TrainConfig, train

    from companion.instruction import grouped_rows, label_tokens, pad_examples

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
    from companion.tokenizer import encode_chat

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
    from companion.world import make_instruction_dataset

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
    import torch

    from companion.instruction import evaluate_tasks
    from companion.world import make_scenes

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
    import json

    from transformers import LlamaForCausalLM

    from companion.artifacts import cached_artifact
    from companion.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS

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


# ----------------------------------------------------------------------------- the VLM

def build_vlm(vision_model, lm, tokenizer, vision_feature_layer: int = -2, seed: int = 0,
              merge_patches: int = 1):
    """Assemble ``LlavaForConditionalGeneration`` from a trained CLIP (or its vision tower)
    and a causal LM, with a fresh LLaVA-1.5 projector (two linear layers with GELU).

    ``vision_feature_select_strategy="default"`` drops the CLS token, so an image becomes
    one token per patch. Like LLaVA-1.5 it reads the penultimate vision layer
    (``vision_feature_layer=-2``): CLIP's loss only looks at the CLS token of the last
    layer, so the last layer's patch outputs are never trained to mean anything, while the
    penultimate layer's patch features are what that CLS token attends to.

    ``merge_patches=m`` > 1 joins each m × m block of patches into one vision token
    (:class:`companion.llava.LlavaWithMergedPatches`): 6 × 6 patches become 9 tokens.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from companion.llava import LlavaWithMergedPatches

    tower = getattr(vision_model, "vision_model", vision_model)  # CLIPModel or CLIPVisionModel
    vision_config = (vision_model.config.vision_config
                     if hasattr(vision_model.config, "vision_config") else vision_model.config)
    side = vision_config.image_size // vision_config.patch_size
    if merge_patches < 1 or side % merge_patches:
        raise ValueError(f"merge_patches={merge_patches}: the tower's {side} x {side} patches "
                         "must split into whole merge_patches x merge_patches blocks")
    config = LlavaConfig(
        vision_config=vision_config.to_dict(), text_config=lm.config.to_dict(),
        image_token_index=image_token_id(tokenizer),
        image_seq_length=(side // merge_patches) ** 2,
        projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=vision_feature_layer,
    )
    if merge_patches > 1:
        config.merge_patches = merge_patches
    torch.manual_seed(seed)
    vlm = (LlavaWithMergedPatches if merge_patches > 1 else LlavaForConditionalGeneration)(config)
    vlm.model.vision_tower.load_state_dict(tower.state_dict())
    vlm.model.language_model.load_state_dict(lm.model.state_dict())
    vlm.lm_head.load_state_dict(lm.lm_head.state_dict())
    vlm.config.pad_token_id = tokenizer.pad_token_id
    vlm.generation_config.pad_token_id = tokenizer.pad_token_id
    vlm.generation_config.eos_token_id = end_of_turn_id(tokenizer)
    return vlm


def load_vlm(checkpoint, device="cpu"):
    """``(model, image_processor, tokenizer)`` of a LLaVA checkpoint (hub id or folder)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, \
        LlavaForConditionalGeneration

    from companion.llava import LlavaWithMergedPatches
    from companion.tokenizer import prepare_tokenizer

    merged = getattr(AutoConfig.from_pretrained(checkpoint), "merge_patches", 1) > 1
    model = (LlavaWithMergedPatches if merged else LlavaForConditionalGeneration
             ).from_pretrained(checkpoint)
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prepare_tokenizer(tokenizer)  # a pad token and a chat template where the checkpoint has none
    fit_embeddings(model, tokenizer)
    if model.config.image_token_index != image_token_id(tokenizer):
        raise ValueError(f"{checkpoint}: the model's image_token_index is "
                         f"{model.config.image_token_index} but the tokenizer's <image> token is "
                         f"{image_token_id(tokenizer)}; the tokenizer does not belong to the model")
    return model.to(device), processor, tokenizer


def save_vlm(folder, model, processor, tokenizer) -> None:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def image_seq_length(model) -> int:
    """Number of ``<image>`` tokens one image becomes in ``model`` (LLaVA config)."""
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    merge = getattr(model.config, "merge_patches", 1)
    strategy = getattr(model.config, "vision_feature_select_strategy", "default")
    if merge > 1:
        if strategy != "default":
            raise ValueError("merged patches need vision_feature_select_strategy='default' "
                             "(the CLS token is not part of the patch grid)")
        return patches // merge ** 2
    return patches if strategy == "default" else patches + 1
