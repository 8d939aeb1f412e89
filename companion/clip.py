"""CLIP pre-training on the shapes world: caption data, the training step, evaluation.

The loss functions live in :mod:`companion.losses.contrastive`; this module feeds them:
it renders scenes, tokenises captions, samples batches and measures retrieval.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from companion.artifacts import cached_artifact
from companion.evaluate import retrieval_metrics, zero_shot_classify
from companion.losses.contrastive import ClipLoss
from companion.models import TinyClipConfig, build_clip, clip_image_size
from companion.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, world_tokenizer
from companion.train import TrainConfig, train
from companion.world import (COLORS, REGIONS, SIZES, Scene, SceneObject, canonical_caption,
                             make_scenes, render_scene, scene_captions)


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projection."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image embeddings, (N, D), not normalised."""
    return _pooled(model.get_image_features(pixel_values=pixel_values))


def text_embeddings(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Projected text embeddings (pooled at the eos token), (N, D), not normalised."""
    return _pooled(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def tokenize_captions(tokenizer, texts: list[str], max_length: int = 64):
    """``(input_ids, attention_mask)`` for a CLIP text tower, each (N, L).

    CLIP pools the text at its end-of-sequence token, so every caption must end with one.
    Tokenizers of real CLIP checkpoints add it themselves; the world's BPE does not, so
    ``<s> ... </s>`` are added here.
    """
    probe = tokenizer("a")["input_ids"]
    adds_eos = len(probe) > 0 and probe[-1] == tokenizer.eos_token_id
    rows = []
    for index, text in enumerate(texts):
        if adds_eos:
            ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        else:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_length - 2]
            ids = [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]
        if not ids:
            raise ValueError(f"caption {index} ({text!r}) encodes to no tokens")
        rows.append(ids)
    length = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
    return input_ids, attention_mask


def pixel_values_for(processor, images) -> torch.Tensor:
    """Run an image processor over PIL images in chunks; (N, 3, H, W) float tensor."""
    chunks = []
    for start in range(0, len(images), 256):
        out = processor(images=list(images[start:start + 256]), return_tensors="pt")
        chunks.append(out["pixel_values"])
    return torch.cat(chunks)


@dataclass
class CaptionData:
    """Scenes as CLIP training data.

    pixel_values: (S, 3, H, W), one image per scene.
    input_ids / attention_mask: (S, P, L), P caption phrasings per scene.
    groups: (S,) id of the scene's canonical description; identical scenes share it, and a
        retrieved caption counts as correct when its group matches.
    """

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    groups: torch.Tensor
    captions: list[list[str]]

    def __len__(self) -> int:
        return self.pixel_values.shape[0]

    @property
    def phrasings(self) -> int:
        return self.input_ids.shape[1]


def build_caption_data(scenes, tokenizer, processor, render_size: int = 64,
                       max_length: int = 64,
                       groups_from: dict[str, int] | None = None) -> CaptionData:
    """Render ``scenes`` and tokenise all their caption phrasings."""
    if not scenes:
        raise ValueError("build_caption_data got no scenes")
    captions = [scene_captions(s) for s in scenes]
    phrasings = min(len(c) for c in captions)
    captions = [c[:phrasings] for c in captions]
    flat = [text for c in captions for text in c]
    ids, mask = tokenize_captions(tokenizer, flat, max_length)
    ids = ids.view(len(scenes), phrasings, -1)
    mask = mask.view(len(scenes), phrasings, -1)
    pixels = pixel_values_for(processor, [render_scene(s, render_size) for s in scenes])
    table = groups_from if groups_from is not None else {}
    groups = []
    for scene in scenes:
        key = canonical_caption(scene)
        groups.append(table.setdefault(key, len(table)))
    return CaptionData(pixels, ids, mask, torch.tensor(groups), captions)


def sample_batch(data: CaptionData, batch_size: int, step: int, seed: int = 0,
                 phrasing: str = "random") -> dict[str, torch.Tensor]:
    """A deterministic batch for ``step``: distinct scenes, one caption phrasing each.

    ``phrasing="random"`` picks a phrasing per scene; ``"first"`` always the canonical one;
    an integer always that phrasing. ``caption_ids`` (B,) numbers identical caption texts
    alike, for the multi-positive target.
    """
    if batch_size > len(data):
        raise ValueError(f"batch_size={batch_size} exceeds the {len(data)} training scenes")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    scenes = torch.randperm(len(data), generator=generator)[:batch_size]          # [B]
    if phrasing == "random":
        which = torch.randint(data.phrasings, (batch_size,), generator=generator)  # [B]
    elif phrasing == "first":
        which = torch.zeros(batch_size, dtype=torch.long)
    elif isinstance(phrasing, int) and 0 <= phrasing < data.phrasings:
        which = torch.full((batch_size,), phrasing, dtype=torch.long)
    else:
        raise ValueError(f"phrasing={phrasing!r}: use 'random', 'first' or an index below "
                         f"{data.phrasings}")
    mask = data.attention_mask[scenes, which]                                       # [B, L]
    length = int(mask.sum(dim=1).max())  # trim padding every row of this batch shares
    return {
        "pixel_values": data.pixel_values[scenes],
        "input_ids": data.input_ids[scenes, which][:, :length],
        "attention_mask": mask[:, :length],
        "groups": data.groups[scenes],
        "caption_ids": torch.unique(data.input_ids[scenes, which], dim=0, return_inverse=True)[1],
    }


class ContrastiveModel(nn.Module):
    """A CLIPModel plus the loss module that owns the learnable scale (and SigLIP's bias)."""

    def __init__(self, clip, loss_module: nn.Module, multi_positive: bool = False):
        super().__init__()
        self.clip = clip
        self.loss = loss_module
        self.multi_positive = multi_positive

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        image = image_embeddings(self.clip, batch["pixel_values"])                 # [B, D]
        text = text_embeddings(self.clip, batch["input_ids"], batch["attention_mask"])  # [B, D]
        if self.multi_positive:
            loss = self.loss(image.float(), text.float(), positive_ids=batch["caption_ids"])
        else:
            loss = self.loss(image.float(), text.float())
        scale = self.loss.logit_scale.detach().exp().clamp(max=100.0)
        return loss, {"temperature": float(1.0 / scale)}


def candidate_captions(data: CaptionData, phrasing: int | None = None):
    """The retrieval pool: every distinct caption text, and which images each describes.

    Returns ``(index, relevance)``: ``index`` (T, 2) holds (scene, phrasing) of the first
    occurrence of each distinct text; ``relevance`` (S, T) is True where the text is one of
    that scene's own captions. Identical strings are one candidate: they have identical
    embeddings, so a ranking cannot tell them apart, and a caption that omits positions is
    true of every scene with the same objects.
    """
    if phrasing is not None and not 0 <= phrasing < data.phrasings:
        raise ValueError(f"phrasing={phrasing}: the data has {data.phrasings} phrasings")
    phrasings = range(data.phrasings) if phrasing is None else [phrasing]
    first: dict[str, int] = {}
    index = []
    for s, captions in enumerate(data.captions):
        for p in phrasings:
            if captions[p] not in first:
                first[captions[p]] = len(index)
                index.append((s, p))
    relevance = torch.zeros(len(data), len(index), dtype=torch.bool)
    for s, captions in enumerate(data.captions):
        for p in phrasings:
            relevance[s, first[captions[p]]] = True
    return torch.tensor(index), relevance


@torch.no_grad()
def embed_data(model, data: CaptionData, batch_size: int = 256, phrasing: int | None = None):
    """Image embeddings (S, D), embeddings of every distinct caption (T, D), and the (S, T)
    relevance matrix of :func:`candidate_captions`."""
    model.eval()
    device = next(model.parameters()).device
    images = torch.cat([
        image_embeddings(model, data.pixel_values[i:i + batch_size].to(device)).float().cpu()
        for i in range(0, len(data), batch_size)])
    index, relevance = candidate_captions(data, phrasing)
    ids = data.input_ids[index[:, 0], index[:, 1]]
    mask = data.attention_mask[index[:, 0], index[:, 1]]
    texts = torch.cat([
        text_embeddings(model, ids[i:i + batch_size].to(device),
                        mask[i:i + batch_size].to(device)).float().cpu()
        for i in range(0, len(ids), batch_size)])
    return images, texts, relevance


def evaluate_retrieval(model, data: CaptionData, phrasing: int | None = None) -> dict[str, float]:
    """Held-out image→text and text→image R@1 and R@5.

    The candidates are the distinct caption texts of the held-out scenes (all phrasings, or
    one); a retrieved caption is correct when it is one of the image's own captions, which
    includes the same text written for an identical scene or, for a phrasing without
    positions, for a scene with the same objects.
    """
    images, texts, relevance = embed_data(model, data, phrasing=phrasing)
    return retrieval_metrics(images, texts, relevance=relevance)


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, pixel_values: torch.Tensor, labels: torch.Tensor,
                       class_prompts: list[list[str]], max_length: int = 64,
                       reduction: str = "mean") -> float:
    """Zero-shot classification accuracy with prompt ensembling.

    class_prompts: for each class, several prompts whose normalised embeddings are averaged.
    """
    device = next(model.parameters()).device
    prompts = [p for ps in class_prompts for p in ps]
    counts = {len(ps) for ps in class_prompts}
    if len(counts) != 1:
        raise ValueError("every class needs the same number of prompts")
    ids, mask = tokenize_captions(tokenizer, prompts, max_length)
    texts = text_embeddings(model, ids.to(device), mask.to(device)).float().cpu()
    texts = texts.view(len(class_prompts), counts.pop(), -1)              # [C, P, D]
    images = image_embeddings(model, pixel_values.to(device)).float().cpu()  # [N, D]
    predictions = zero_shot_classify(images, texts, reduction=reduction)
    return (predictions == labels).float().mean().item()


def similarity_matrix(model, batch, temperature: float | None = None) -> torch.Tensor:
    """Cosine similarity (or logits if ``temperature``) of a batch's images and captions, (B, B)."""
    with torch.no_grad():
        device = next(model.parameters()).device
        image = F.normalize(image_embeddings(model, batch["pixel_values"].to(device)).float(),
                            dim=-1)
        text = F.normalize(text_embeddings(model, batch["input_ids"].to(device),
                                           batch["attention_mask"].to(device)).float(), dim=-1)
        sim = (image @ text.T).cpu()
    return sim / temperature if temperature else sim


def zero_shot_prompts(shape: str) -> list[str]:
    """Prompts for a zero-shot shape class: the canonical caption of a one-object scene with
    that shape, for every colour, size and region (prompt ensembling)."""
    prompts = []
    for color in COLORS:
        for size in SIZES:
            for region in REGIONS:
                obj = SceneObject(shape=shape, color=color, size=size, region=region,
                                  bbox=(0.0, 0.0, 0.0, 0.0))
                prompts.append(canonical_caption(Scene(scene_id=-1, objects=(obj,), word=None,
                                                       word_region=None)))
    return prompts


# ----------------------------------------------------------------------------- the recipe

@dataclass(frozen=True)
class ClipRecipe:
    """Everything that decides the contrastive pre-training run of section 3.1.1.

    The later sections reuse its vision tower; they find it in the cache under a key made
    from this recipe, so a smoke-sized run is never mistaken for the default one.
    """

    seed: int = 0
    tokenizer_scenes: int = 2000   # scenes whose text trains the world's BPE
    train_scenes: int = 8000       # training scenes (each with several caption phrasings)
    image_size: int = 48           # pixels per side; scenes are rendered at this size
    patch_size: int = 8            # ViT patch side: (48 / 8)^2 = 36 vision tokens; 16 gives
                                   # one token per cell of the 3 x 3 grid
    vision_width: int = 64         # ViT hidden size
    vision_layers: int = 2         # ViT blocks
    batch_size: int = 64           # N: N - 1 negatives per image
    steps: int = 1800              # optimiser steps
    lr: float = 3e-3               # peak AdamW learning rate
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    checkpoint: str = ""           # start from this CLIP checkpoint instead of a tiny one

    def __post_init__(self):
        for name in ("tokenizer_scenes", "train_scenes", "image_size", "patch_size",
                     "vision_width", "vision_layers", "batch_size", "steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ClipRecipe.{name}={getattr(self, name)} must be positive")
        if self.image_size % self.patch_size:
            raise ValueError(f"ClipRecipe.image_size={self.image_size} must be a multiple of "
                             f"patch_size={self.patch_size}")
        if self.batch_size > self.train_scenes:
            raise ValueError(f"ClipRecipe.batch_size={self.batch_size} exceeds train_scenes="
                             f"{self.train_scenes}: a batch holds distinct scenes")
        if not self.lr > 0:
            raise ValueError(f"ClipRecipe.lr={self.lr} must be positive")

    def sizes(self):
        """The tiny model's :class:`~companion.models.TinyClipConfig` for this recipe."""
        return TinyClipConfig(image_size=self.image_size, patch_size=self.patch_size,
                              vision_width=self.vision_width, vision_layers=self.vision_layers)

    def to_dict(self) -> dict:
        """The recipe as the cache key reads it. The model's sizes enter the key whole
        (``_clip_artifact_config``), so the size fields added later are left out here at
        the values every run had before they existed: those runs keep their keys."""
        values = asdict(self)
        for name, before in (("patch_size", 8), ("vision_width", 64), ("vision_layers", 2)):
            if values[name] == before:  # the value every run had before the field existed
                del values[name]
        return values


@dataclass
class ClipRun:
    """What :func:`pretrain_clip` returns."""

    model: nn.Module
    processor: object
    tokenizer: object
    loss: nn.Module          # the ClipLoss that owns the learned temperature
    history: object          # companion.train.History
    train_data: CaptionData
    seconds: float


def pretrain_clip(recipe: ClipRecipe, tokenizer=None, device="cpu", progress: bool = False,
                  log_every: int | None = None, cache_dir=None, checkpoint=None) -> ClipRun:
    """Train CLIP with InfoNCE and a learnable temperature, as section 3.1.1 teaches it.

    ``tokenizer`` defaults to the world's BPE (cached in ``cache_dir``) for a tiny model, or
    the checkpoint's own tokenizer when ``recipe.checkpoint`` names one. Under ``torchrun``
    each of W ranks embeds its block of the batch and ``ClipLoss`` scores it against the
    features gathered from all ranks (``distributed_info_nce_loss``): the loss of one process
    on the whole batch. ``checkpoint``: a :class:`~companion.train.Checkpointing`.
    """
    if tokenizer is None and not recipe.checkpoint:
        if cache_dir is None:
            raise ValueError("pretrain_clip needs a tokenizer or a cache_dir to find the world's")

        tokenizer = world_tokenizer(cache_dir, n_scenes=recipe.tokenizer_scenes, log=None)
    model, processor, tokenizer = build_clip(
        tokenizer, checkpoint=recipe.checkpoint or None,
        sizes=recipe.sizes(), seed=recipe.seed)

    data = build_caption_data(make_scenes(recipe.train_scenes, seed=recipe.seed), tokenizer,
                              processor, render_size=clip_image_size(model))
    loss = ClipLoss()
    pair = ContrastiveModel(model, loss).to(device)
    config = TrainConfig(steps=recipe.steps, lr=recipe.lr, weight_decay=recipe.weight_decay,
                         warmup_fraction=recipe.warmup_fraction, progress=progress,
                         log_every=max(1, recipe.steps // 5) if log_every is None else log_every)
    start = time.perf_counter()
    history = train(pair, pair, lambda step: sample_batch(data, recipe.batch_size, step,
                                                          seed=recipe.seed),
                    config, after_step=lambda _: loss.clamp_(), device=device,
                    checkpoint=checkpoint)
    return ClipRun(model, processor, tokenizer, loss, history, data,
                   time.perf_counter() - start)


def _clip_artifact_config(recipe: ClipRecipe) -> dict:
    config = {"kind": "clip", "recipe": recipe.to_dict()}
    if not recipe.checkpoint:
        config["sizes"] = recipe.sizes().to_dict()
        config["tokenizer"] = {"template": CHAT_TEMPLATE, "specials": SPECIAL_TOKENS}
    return config


def save_clip_run(run: ClipRun, folder) -> None:
    """Write a trained CLIP, its processor, tokenizer, temperature and history to ``folder``."""
    folder = Path(folder)
    run.model.save_pretrained(folder)
    run.processor.save_pretrained(folder)
    run.tokenizer.save_pretrained(folder)
    (folder / "training.json").write_text(json.dumps(
        {"temperature": run.loss.temperature, "seconds": run.seconds,
         "steps": run.history.steps}, indent=1))


def publish_clip(cache_dir, recipe: ClipRecipe, run: ClipRun, log=print):
    """Store a run made in a notebook in the cache, where :func:`pretrained_clip` finds it."""
    return cached_artifact(cache_dir, "clip", _clip_artifact_config(recipe),
                           lambda folder: save_clip_run(run, folder), log=log)


def pretrained_clip(cache_dir, recipe: ClipRecipe | None = None, device="cpu", log=print):
    """The CLIP of section 3.1.1, ``(model, processor, tokenizer)``: loaded from the cache,
    or trained now with ``recipe`` (default: the section's default run) and cached."""
    recipe = recipe or ClipRecipe()

    def build(folder):
        save_clip_run(pretrain_clip(recipe, device=device, cache_dir=cache_dir, log_every=0),
                      folder)

    folder = cached_artifact(cache_dir, "clip", _clip_artifact_config(recipe), build, log=log)
    model = CLIPModel.from_pretrained(folder).to(device).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, processor, tokenizer
