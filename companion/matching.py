"""Image-text matching (ITM) on the shapes world: the fused model, its data and evaluation.

The loss, the seed's ``ITMHead`` and negative mining live in
:mod:`companion.losses.matching`; this module builds what they need:

* ``ITMModel``: the CLIP vision tower of section 3.1.1 (frozen by default) feeding a small
  fused image-text encoder, a ``transformers.BertModel`` run on ``inputs_embeds``
  (single-stream fusion as in ViLT: [CLS], the caption's tokens and the projected image
  patches share one sequence, so every text token attends to every patch), and the seed's
  ``ITMHead`` on the fused [CLS];
* ``itm_batch``: BLIP's batch of B positive pairs, B (image, negative caption) pairs and B
  (negative image, caption) pairs, with random or hard (contrastive-similarity) negatives;
* ``fine_grained_negative`` / ``fine_grained_pairs``: a caption with exactly one fact
  changed (a colour, a shape, a size or a position), in the world's own phrasing;
* ``train_itm`` (the chapter's one loop, :func:`companion.train.train`), ``evaluate_itm``,
  ``evaluate_fine_grained`` and ``rerank`` (contrastive top-k re-scored by ITM).

When is a caption a negative? Only when it is *false* of the image. Two scenes can share a
description (identical ground truth), and the world's position-free phrasings ("a picture
of a large red circle.") are true of every scene with those objects, wherever they are.
:func:`caption_truth` records, for every caption text of a :class:`CaptionData`, which
scene groups it is true of, and :func:`true_pairs` turns that into the batch's exclusion
mask, so neither a random nor a hard negative is ever a true caption.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from companion.clip import (candidate_captions, embed_data, image_embeddings, sample_batch,
                            similarity_matrix, text_embeddings, tokenize_captions)
from companion.evaluate import recall_at_k
from companion.losses.matching import (ITMHead, itm_loss, sample_hard_negatives,
                                       sample_random_negatives)
from companion.train import train
from companion.world import COLORS, REGIONS, SHAPES, SIZES, Scene, canonical_caption, scene_captions

__all__ = [
    "CHANGES",
    "FusionConfig",
    "FusionEncoder",
    "ITMModel",
    "caption_truth",
    "evaluate_fine_grained",
    "evaluate_itm",
    "fine_grained_negative",
    "fine_grained_pairs",
    "itm_batch",
    "rerank",
    "train_itm",
    "true_pairs",
]

CHANGES = ("color", "shape", "size", "position")


# ----------------------------------------------------------------------------- the model

@dataclass
class FusionConfig:
    """Sizes of the fused image-text encoder (a tiny ``BertModel``)."""

    hidden_size: int = 64        # width of the fused sequence
    layers: int = 2              # transformer layers over [CLS] + text + image
    heads: int = 4               # attention heads (hidden_size must divide by it)
    intermediate_size: int = 256  # MLP width inside each layer
    dropout: float = 0.0         # hidden and attention dropout
    max_text_length: int = 64    # longest caption in tokens
    text_input: str = "clip"     # "clip": CLIP's text-tower states; "tokens": word embeddings
    image_pool: int = 1          # average k×k neighbouring patches into one image token
    vision_layer: int = -2       # which hidden state of the vision tower (LLaVA: -2)
    init_std: float = 0.02       # std of the initial weights (BERT: 0.02)

    def __post_init__(self):
        for name in ("hidden_size", "layers", "heads", "intermediate_size", "max_text_length",
                     "image_pool"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FusionConfig.{name}={value!r} must be a positive integer")
        if self.hidden_size % self.heads:
            raise ValueError(f"FusionConfig.hidden_size={self.hidden_size} must be a multiple of "
                             f"heads={self.heads}")
        if not 0.0 < self.init_std < 1.0:
            raise ValueError(f"FusionConfig.init_std={self.init_std} must be in (0, 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"FusionConfig.dropout={self.dropout} must be in [0, 1)")
        if self.text_input not in ("clip", "tokens"):
            raise ValueError(f"FusionConfig.text_input={self.text_input!r}: use 'clip' (the CLIP "
                             "text tower's hidden states) or 'tokens' (word embeddings only)")

    def to_dict(self) -> dict:
        return asdict(self)


class FusionEncoder(nn.Module):
    """Single-stream fusion: one ``BertModel`` over [CLS] + caption tokens + image tokens.

    The sequence is ``[CLS] t_1 .. t_L v_1 .. v_P``: a learned [CLS] vector, the caption's
    BERT word embeddings, and the vision tower's P hidden states projected to the fused
    width. Token type 0 marks [CLS] and text, 1 the image; position ids are 0..L for the
    text and a fixed block after ``max_text_length`` for the image, so a patch keeps its
    position whatever the caption's length. Padding tokens of the caption are masked out.
    """

    def __init__(self, vocab_size: int, vision_width: int, image_tokens: int,
                 config: FusionConfig | None = None, pad_token_id: int | None = None,
                 text_width: int | None = None):
        super().__init__()

        config = config or FusionConfig()
        self.config = config
        self.image_tokens = image_tokens
        self.vocab_size = vocab_size
        bert_config = BertConfig(
            vocab_size=vocab_size, hidden_size=config.hidden_size,
            num_hidden_layers=config.layers, num_attention_heads=config.heads,
            intermediate_size=config.intermediate_size,
            hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout,
            max_position_embeddings=1 + config.max_text_length + image_tokens,
            type_vocab_size=2, pad_token_id=pad_token_id if pad_token_id is not None else 0,
            initializer_range=config.init_std,
        )
        self.bert = BertModel(bert_config, add_pooling_layer=False)
        self.image_projection = nn.Sequential(nn.LayerNorm(vision_width),
                                              nn.Linear(vision_width, config.hidden_size))
        self.text_projection = (nn.Sequential(nn.LayerNorm(text_width),
                                              nn.Linear(text_width, config.hidden_size))
                                if text_width is not None else None)
        self.cls = nn.Parameter(torch.randn(1, 1, config.hidden_size) * 0.02)

    def forward(self, image_features: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor,
                text_features: torch.Tensor | None = None) -> torch.Tensor:
        """Fused hidden states ``(B, 1 + L + P, hidden)``; position 0 is [CLS].

        ``text_features`` (B, L, text_width): a text encoder's states of the caption, added
        (projected) to the word embeddings; None uses the word embeddings alone.
        """
        batch, length = input_ids.shape
        if length > self.config.max_text_length:
            raise ValueError(f"captions have {length} tokens but FusionConfig.max_text_length="
                             f"{self.config.max_text_length}; truncate them or raise the limit")
        if image_features.shape[1] != self.image_tokens:
            raise ValueError(f"got {image_features.shape[1]} image tokens, the encoder was built "
                             f"for {self.image_tokens}")
        device = input_ids.device
        text = self.bert.embeddings.word_embeddings(input_ids)                 # [B, L, H]
        if text_features is not None:
            if self.text_projection is None:
                raise ValueError("this FusionEncoder was built without text_width; it takes "
                                 "token ids only")
            text = text + self.text_projection(text_features.to(text.dtype))   # [B, L, H]
        image = self.image_projection(image_features.to(text.dtype))          # [B, P, H]
        cls = self.cls.expand(batch, -1, -1)                                   # [B, 1, H]
        embeds = torch.cat([cls, text, image], dim=1)                          # [B, 1+L+P, H]
        types = torch.cat([torch.zeros(batch, 1 + length, dtype=torch.long, device=device),
                           torch.ones(batch, self.image_tokens, dtype=torch.long, device=device)],
                          dim=1)                                               # [B, 1+L+P]
        start = 1 + self.config.max_text_length
        positions = torch.cat([torch.arange(1 + length, device=device),
                               torch.arange(start, start + self.image_tokens, device=device)])
        mask = torch.cat([torch.ones(batch, 1, dtype=attention_mask.dtype, device=device),
                          attention_mask,
                          torch.ones(batch, self.image_tokens, dtype=attention_mask.dtype,
                                     device=device)], dim=1)                   # [B, 1+L+P]
        out = self.bert(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types,
                        position_ids=positions[None].expand(batch, -1))
        return out.last_hidden_state


class ITMModel(nn.Module):
    """CLIP's encoders + a fused encoder + the seed's ``ITMHead``: logits (B, 2).

    ``clip``: a ``transformers.CLIPModel`` (from :func:`companion.models.build_clip`, trained
    in 3.1.1). The model keeps its own copy of the vision tower, so the CLIP passed in is
    never changed; with ``freeze_vision=True`` (default) that copy gets no gradients, stays in
    eval mode and runs under ``no_grad``. With ``fusion_config.text_input="clip"`` (default)
    it also keeps a frozen copy of CLIP's text tower, whose per-token states enter the fused
    encoder beside its own word embeddings, as ALBEF and BLIP put their fusion layers on top
    of unimodal encoders. The fused encoder's vocabulary is CLIP's text vocabulary, so the
    same token ids (``CaptionData.input_ids``) feed both models.
    """

    def __init__(self, clip, fusion_config: FusionConfig | None = None,
                 freeze_vision: bool = True):
        super().__init__()
        vision_config = getattr(getattr(clip, "config", None), "vision_config", None)
        text_config = getattr(getattr(clip, "config", None), "text_config", None)
        if vision_config is None or text_config is None or not hasattr(clip, "vision_model"):
            raise TypeError(f"ITMModel needs a transformers CLIPModel (with .vision_model and "
                            f".config.vision_config), got {type(clip).__name__}")
        self.fusion_config = fusion_config or FusionConfig()
        self.freeze_vision = bool(freeze_vision)
        self.vision = copy.deepcopy(clip.vision_model)
        self.image_size = int(vision_config.image_size)
        self.text_positions = (int(text_config.max_position_embeddings)
                               if self.fusion_config.text_input == "clip" else 10**9)
        self.grid = vision_config.image_size // vision_config.patch_size  # patches per side
        pool = self.fusion_config.image_pool
        if self.grid % pool:
            raise ValueError(f"FusionConfig.image_pool={pool} must divide the {self.grid}×"
                             f"{self.grid} patch grid of this vision tower")
        image_tokens = (self.grid // pool) ** 2 + 1  # pooled patches + the vision CLS
        self.text = None
        text_width = None
        if self.fusion_config.text_input == "clip":
            self.text = copy.deepcopy(clip.text_model).requires_grad_(False).eval()
            text_width = int(text_config.hidden_size)
        self.fusion = FusionEncoder(int(text_config.vocab_size), int(vision_config.hidden_size),
                                    image_tokens, self.fusion_config,
                                    pad_token_id=text_config.pad_token_id, text_width=text_width)
        self.itm_head = ITMHead(self.fusion_config.hidden_size)
        if self.freeze_vision:
            self.vision.requires_grad_(False)
            self.vision.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_vision:
            self.vision.eval()  # a frozen tower never switches to training behaviour
        if self.text is not None:
            self.text.eval()
        return self

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision tower's hidden states (B, P, width): its CLS, then the patches (each
        ``image_pool`` × ``image_pool`` block of patches averaged into one token)."""
        with torch.no_grad() if self.freeze_vision else nullcontext():
            out = self.vision(pixel_values=pixel_values, output_hidden_states=True)
            states = out.hidden_states[self.fusion_config.vision_layer]       # [B, 1+G*G, W]
        pool = self.fusion_config.image_pool
        if pool == 1:
            return states
        cls, patches = states[:, :1], states[:, 1:]
        batch, _, width = patches.shape
        grid = patches.transpose(1, 2).reshape(batch, width, self.grid, self.grid)
        pooled = F.avg_pool2d(grid, pool).flatten(2).transpose(1, 2)          # [B, (G/k)^2, W]
        return torch.cat([cls, pooled], dim=1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """CLIP's frozen text-tower states (B, L, width), or None with ``text_input="tokens"``."""
        if self.text is None:
            return None
        with torch.no_grad():
            return self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def _check_inputs(self, pixel_values, input_ids, attention_mask):
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != self.image_size \
                or pixel_values.shape[-2] != self.image_size:
            raise ValueError(f"pixel_values must be (B, 3, {self.image_size}, {self.image_size}) "
                             f"from the CLIP image processor, got {tuple(pixel_values.shape)}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L) token ids, got {tuple(input_ids.shape)}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have the shape "
                             f"of input_ids {tuple(input_ids.shape)}")
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images but {input_ids.shape[0]} captions; "
                             "ITM scores one (image, caption) pair per row")
        limit = min(self.fusion_config.max_text_length, self.text_positions)
        if input_ids.shape[1] > limit:
            raise ValueError(f"captions have {input_ids.shape[1]} tokens; this model takes at most "
                             f"{limit} (FusionConfig.max_text_length and the CLIP text tower's "
                             "positions); truncate or trim shared padding first")
        if input_ids.numel() and (int(input_ids.max()) >= self.fusion.vocab_size
                                  or int(input_ids.min()) < 0):
            raise ValueError(f"input_ids must lie in [0, {self.fusion.vocab_size}), CLIP's text "
                             "vocabulary; tokenise with the CLIP model's tokenizer")

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """ITM logits (B, 2) of B (image, caption) pairs; column 1 = match."""
        self._check_inputs(pixel_values, input_ids, attention_mask)
        fused = self.fusion(self.image_features(pixel_values), input_ids, attention_mask,
                            self.text_features(input_ids, attention_mask))
        return self.itm_head(fused)

    @torch.no_grad()
    def match_logits(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Log-odds of a match, ``logit_1 - logit_0``, (B,), computed in eval mode in chunks of
        ``batch_size`` on the model's device, returned on the CPU in float32."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = []
        for start in range(0, input_ids.shape[0], batch_size):
            part = slice(start, start + batch_size)
            logits = self(pixel_values[part].to(device), input_ids[part].to(device),
                          attention_mask[part].to(device)).float()
            out.append((logits[:, 1] - logits[:, 0]).cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def match_scores(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """P(match) of each pair, (B,): the softmax of the head's two logits, column 1."""
        return torch.sigmoid(self.match_logits(pixel_values, input_ids, attention_mask,
                                               batch_size))


# ------------------------------------------------------------------- which captions are true

def _key(ids: torch.Tensor, mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(ids[mask.bool()].tolist())


def caption_truth(data) -> dict[tuple[int, ...], frozenset[int]]:
    """For every caption of ``data`` (a :class:`companion.clip.CaptionData`), the groups it is
    true of, keyed by its token ids.

    A caption is true of a scene when it is one of that scene's phrasings; a group is a
    scene's full description, so every scene of a group has the same phrasings.
    """
    truth: dict[tuple[int, ...], set[int]] = {}
    for scene in range(len(data)):
        group = int(data.groups[scene])
        for phrasing in range(data.phrasings):
            key = _key(data.input_ids[scene, phrasing], data.attention_mask[scene, phrasing])
            truth.setdefault(key, set()).add(group)
    return {key: frozenset(groups) for key, groups in truth.items()}


def true_pairs(data_batch: dict, truth: dict | None = None) -> torch.Tensor:
    """(B, B) bool: ``[i, j]`` is True when caption j of the batch is true of image i.

    Always: the diagonal, identical scenes (equal ``groups``) and identical caption texts
    (equal ``caption_ids``). With ``truth`` (from :func:`caption_truth` of the data the batch
    came from) also every caption that is a phrasing of image i's scene, e.g. a
    position-free phrasing of another scene with the same objects.
    """
    for key in ("groups", "caption_ids", "input_ids", "attention_mask"):
        if key not in data_batch:
            raise KeyError(f"the batch has no {key!r}; make it with companion.clip.sample_batch")
    groups = data_batch["groups"].cpu()
    ids = data_batch["caption_ids"].cpu()
    n = groups.shape[0]
    same = (groups[:, None] == groups[None, :]) | (ids[:, None] == ids[None, :])  # [B, B]
    same |= torch.eye(n, dtype=torch.bool)
    if truth is not None:
        for j in range(n):
            key = _key(data_batch["input_ids"][j].cpu(), data_batch["attention_mask"][j].cpu())
            if key not in truth:
                raise ValueError(f"caption {j} of the batch is not in the truth table; build it "
                                 "with caption_truth(data) from the data the batch came from")
            same[:, j] |= torch.isin(groups, torch.tensor(sorted(truth[key]), dtype=groups.dtype))
    return same


def itm_batch(data_batch: dict, negatives: str = "random", similarity: torch.Tensor | None = None,
              generator: torch.Generator | None = None, truth: dict | None = None,
              anchors: int | None = None) -> dict:
    """BLIP's ITM batch from a contrastive batch of B (image, caption) pairs.

    The first A = ``anchors`` pairs (default: all B) are the examples; all B pairs form the
    pool negatives are drawn from (BLIP draws from the batch gathered across GPUs, larger
    than each GPU's own). Rows 0..A-1 of the result: the A positive pairs (label 1). Rows
    A..2A-1: image i with a negative caption (label 0). Rows 2A..3A-1: a negative image with
    caption j (label 0).

    ``negatives="random"``: each negative uniform among the pool's captions (images) that
    are false of the example. ``"hard"``: caption k drawn with probability
    ``softmax(similarity[i])_k`` and image k with ``softmax(similarity[:, j])_k``, BLIP's
    mining; ``similarity`` is the (B, B) image-caption logit matrix of a contrastive model
    over the pool, e.g. ``companion.clip.similarity_matrix(clip, batch, temperature)``.
    Captions and images true of the example (:func:`true_pairs`; pass ``truth`` for the
    complete set) are never chosen.

    Returns ``pixel_values`` (3A, ...), ``input_ids`` / ``attention_mask`` (3A, L),
    ``labels`` (3A,), and ``negative_texts`` / ``negative_images`` (A,): pool indices drawn.
    """
    for key in ("pixel_values", "input_ids", "attention_mask"):
        if key not in data_batch:
            raise KeyError(f"the batch has no {key!r}; make it with companion.clip.sample_batch")
    exclude = true_pairs(data_batch, truth)                                    # [B, B]
    n = exclude.shape[0]
    a = n if anchors is None else anchors
    if isinstance(a, bool) or not isinstance(a, int) or not 1 <= a <= n:
        raise ValueError(f"anchors={anchors!r} must be an integer in [1, {n}] (the batch size)")
    image_to_text = exclude[:a]                                                # [A, B]
    text_to_image = exclude[:, :a].T.contiguous()                              # [A, B]
    if negatives == "random":
        negative_texts = sample_random_negatives(image_to_text, generator)     # [A]
        negative_images = sample_random_negatives(text_to_image, generator)    # [A]
    elif negatives == "hard":
        if similarity is None:
            raise ValueError("negatives='hard' needs the batch's (B, B) contrastive similarity; "
                             "compute it with companion.clip.similarity_matrix(clip, batch, "
                             "temperature)")
        if not isinstance(similarity, torch.Tensor) or tuple(similarity.shape) != (n, n):
            raise ValueError(f"similarity must be ({n}, {n}) for a batch of {n} pairs, got "
                             f"{tuple(getattr(similarity, 'shape', ()))}")
        similarity = similarity.detach().cpu()
        negative_texts = sample_hard_negatives(similarity[:a], image_to_text, generator)
        negative_images = sample_hard_negatives(similarity[:, :a].T.contiguous(), text_to_image,
                                                generator)
    else:
        raise ValueError(f"negatives={negatives!r}: use 'random' or 'hard'")
    rows = torch.arange(a)
    images = torch.cat([rows, rows, negative_images])                          # [3A]
    texts = torch.cat([rows, negative_texts, rows])                            # [3A]
    labels = torch.cat([torch.ones(a, dtype=torch.long), torch.zeros(2 * a, dtype=torch.long)])
    input_ids = data_batch["input_ids"][texts.to(data_batch["input_ids"].device)]
    attention_mask = data_batch["attention_mask"][texts.to(data_batch["attention_mask"].device)]
    length = int(attention_mask.sum(dim=1).max())  # drop padding no chosen caption needs
    return {
        "pixel_values": data_batch["pixel_values"][images.to(data_batch["pixel_values"].device)],
        "input_ids": input_ids[:, :length],
        "attention_mask": attention_mask[:, :length],
        "labels": labels,
        "negative_texts": negative_texts,
        "negative_images": negative_images,
    }


# --------------------------------------------------------------------- fine-grained negatives

def _perturb(scene, rng: random.Random, change: str):
    """A copy of ``scene`` with exactly one fact changed; returns (new scene, object index)."""
    if not scene.objects:
        raise ValueError(f"scene {scene.scene_id} has no objects to change")
    index = rng.randrange(len(scene.objects))
    obj = scene.objects[index]
    if change == "color":
        new = _replace(obj, color=rng.choice([c for c in COLORS if c != obj.color]))
    elif change == "shape":
        new = _replace(obj, shape=rng.choice([s for s in SHAPES if s != obj.shape]))
    elif change == "size":
        new = _replace(obj, size=rng.choice([s for s in SIZES if s != obj.size]))
    elif change == "position":
        taken = {o.region for o in scene.objects} | {scene.word_region}
        free = [r for r in REGIONS if r not in taken]
        if not free:
            raise ValueError(f"scene {scene.scene_id} has no free cell to move an object to")
        region = rng.choice(free)
        (row, column), (new_row, new_column) = (divmod(REGIONS.index(obj.region), 3),
                                                divmod(REGIONS.index(region), 3))
        dx, dy = (new_column - column) / 3, (new_row - row) / 3
        x0, y0, x1, y1 = obj.bbox
        new = _replace(obj, region=region, bbox=tuple(round(v, 3) for v in
                                                      (x0 + dx, y0 + dy, x1 + dx, y1 + dy)))
    else:
        raise ValueError(f"change={change!r}: use one of {CHANGES}")
    objects = list(scene.objects)
    objects[index] = new
    return Scene(scene.scene_id, tuple(objects), scene.word, scene.word_region), index


def _replace(obj, **changes):
    return replace(obj, **changes)


def fine_grained_negative(scene, rng: random.Random, change: str | None = None) -> tuple[str, str]:
    """``(caption, change)``: the scene's canonical caption with exactly one fact changed.

    ``change`` (drawn from ``rng`` when None) is one of :data:`CHANGES`: one object's
    ``"color"``, ``"shape"`` or ``"size"`` replaced by another value, or the object moved to
    a free cell (``"position"``). The caption is written by the world's own
    ``canonical_caption``, so it is in-distribution text, and it is false of the scene: it
    is none of the scene's phrasings.
    """
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
    if change is None:
        change = rng.choice(CHANGES)
    if change not in CHANGES:
        raise ValueError(f"change={change!r}: use one of {CHANGES}")
    changed, _ = _perturb(scene, rng, change)
    caption = canonical_caption(changed)
    if caption in scene_captions(scene):  # impossible for a changed fact; checked anyway
        raise AssertionError(f"scene {scene.scene_id}: the changed caption {caption!r} is still "
                             "true of the scene")
    return caption, change


def fine_grained_pairs(scenes: Sequence, seed: int = 0) -> list[tuple[int, str, str, str]]:
    """``(scene_index, true_caption, false_caption, change)`` for every scene, the changes
    cycling through :data:`CHANGES` so each kind is equally represented."""
    out = []
    for index, scene in enumerate(scenes):
        rng = random.Random(f"fine-grained:{seed}:{scene.scene_id}")
        change = CHANGES[index % len(CHANGES)]
        false_caption, change = fine_grained_negative(scene, rng, change)
        out.append((index, canonical_caption(scene), false_caption, change))
    return out


# ----------------------------------------------------------------------------- training

def train_itm(itm_model: ITMModel, data, config, *, negatives: str = "random",
              clip_model=None, temperature: float = 0.05, batch_size: int = 32, seed: int = 0,
              pool_size: int | None = None, device=None, truth: dict | None = None,
              phrasing="random", eval_fn: Callable[[int], dict] | None = None,
              print_fn: Callable[[str], None] = print):
    """Train ``itm_model`` on ``data`` with :func:`companion.train.train`; return the History.

    Each step samples a pool of ``pool_size`` scenes (default ``batch_size``) with
    :func:`companion.clip.sample_batch`; its first ``batch_size`` pairs become ``3 ×
    batch_size`` ITM pairs (:func:`itm_batch`), negatives drawn from the whole pool, and
    :func:`itm_loss` is minimised. Hard negatives need ``clip_model``: its cosine
    similarities divided by ``temperature`` are the mining logits. ``eval_fn``
    is passed to ``train`` (called every ``config.eval_every`` steps and at the end).
    """
    if negatives not in ("random", "hard"):
        raise ValueError(f"negatives={negatives!r}: use 'random' or 'hard'")
    if negatives == "hard" and clip_model is None:
        raise ValueError("negatives='hard' mines with a contrastive model: pass clip_model")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be positive")
    pool_size = batch_size if pool_size is None else pool_size
    if pool_size < batch_size:
        raise ValueError(f"pool_size={pool_size} must be at least batch_size={batch_size}")
    truth = truth if truth is not None else caption_truth(data)
    if device is not None:
        itm_model.to(device)
        if clip_model is not None:
            clip_model.to(device)

    def next_batch(step: int) -> dict:
        batch = sample_batch(data, pool_size, step, seed=seed, phrasing=phrasing)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step + 17)
        similarity = None
        if negatives == "hard":
            clip_model.eval()
            similarity = similarity_matrix(clip_model, batch, temperature)
        pairs = itm_batch(batch, negatives, similarity, generator, truth, anchors=batch_size)
        return {k: pairs[k] for k in ("pixel_values", "input_ids", "attention_mask", "labels")}

    def loss_fn(batch: dict):
        logits = itm_model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        loss = itm_loss(logits, batch["labels"])
        accuracy = (logits.argmax(dim=-1) == batch["labels"]).float().mean()
        return loss, {"accuracy": float(accuracy)}

    return train(itm_model, loss_fn, next_batch, config, eval_fn=eval_fn, device=device,
                 print_fn=print_fn)


# ----------------------------------------------------------------------------- evaluation

def _accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return ((scores > 0.5).long() == labels).float().mean().item()


def evaluate_itm(itm_model: ITMModel, data, seed: int = 0, negatives: str = "random",
                 clip_model=None, temperature: float = 0.05, phrasing="first",
                 truth: dict | None = None) -> dict[str, float]:
    """ITM accuracy on every scene of ``data``: its caption, a negative caption, a negative
    image (:func:`itm_batch` over the whole set), at threshold P(match) = 0.5."""
    truth = truth if truth is not None else caption_truth(data)
    batch = sample_batch(data, len(data), step=0, seed=seed, phrasing=phrasing)
    similarity = similarity_matrix(clip_model, batch, temperature) if negatives == "hard" else None
    generator = torch.Generator().manual_seed(seed)
    pairs = itm_batch(batch, negatives, similarity, generator, truth)
    scores = itm_model.match_scores(pairs["pixel_values"], pairs["input_ids"],
                                    pairs["attention_mask"])
    n = len(data)
    labels = pairs["labels"]
    return {"accuracy": _accuracy(scores, labels),
            "positive_accuracy": _accuracy(scores[:n], labels[:n]),
            "negative_accuracy": _accuracy(scores[n:], labels[n:])}


@torch.no_grad()
def evaluate_fine_grained(clip_model, itm_model: ITMModel | None, tokenizer, pixel_values,
                          pairs: Sequence[tuple[int, str, str, str]], max_length: int = 64) -> dict:
    """Does each model prefer the true caption to its one-fact-changed twin?

    ``pixel_values`` (S, 3, H, W) are the scenes' images; ``pairs`` from
    :func:`fine_grained_pairs`. Returns, overall and per change, ``contrastive``: share of
    pairs where CLIP's cosine similarity ranks the true caption higher, and with an ITM
    model ``itm``: the same for P(match), and ``itm_accuracy``: share of the 2·N captions
    classified right at P(match) = 0.5.
    """
    if not pairs:
        raise ValueError("evaluate_fine_grained got no pairs")
    index = torch.tensor([p[0] for p in pairs])
    true_ids, true_mask = tokenize_captions(tokenizer, [p[1] for p in pairs], max_length)
    false_ids, false_mask = tokenize_captions(tokenizer, [p[2] for p in pairs], max_length)
    changes = [p[3] for p in pairs]
    device = next(clip_model.parameters()).device
    clip_model.eval()
    images = image_embeddings(clip_model, pixel_values[index].to(device)).float()
    images = F.normalize(images, dim=-1)                                      # [N, D]

    def cosine(ids, mask):
        text = text_embeddings(clip_model, ids.to(device), mask.to(device)).float()
        text = F.normalize(text, dim=-1)                                      # [N, D]
        return (images * text).sum(-1).cpu()

    results = {"contrastive": (cosine(true_ids, true_mask) > cosine(false_ids, false_mask))}
    if itm_model is not None:
        p_true = itm_model.match_scores(pixel_values[index], true_ids, true_mask)
        p_false = itm_model.match_scores(pixel_values[index], false_ids, false_mask)
        results["itm"] = p_true > p_false
        results["itm_accuracy"] = ((p_true > 0.5).float() + (p_false <= 0.5).float()) / 2
    out = {}
    for name, hits in results.items():
        out[name] = hits.float().mean().item()
        for change in CHANGES:
            chosen = torch.tensor([c == change for c in changes])
            if chosen.any():
                out[f"{name}_{change}"] = hits[chosen].float().mean().item()
    return out


@torch.no_grad()
def rerank(clip_model, itm_model: ITMModel, data, k: int = 10, phrasing: int | None = None,
           itc_temperature: float | None = None, batch_size: int = 256) -> dict[str, float]:
    """Re-rank CLIP's top-k captions of every image of ``data`` with ITM; R@1 before/after.

    Candidates and correctness are those of :func:`companion.clip.evaluate_retrieval`: every
    distinct caption text of ``data`` (or of one ``phrasing``), correct when it is one of the
    image's own captions (:func:`companion.clip.candidate_captions`). ITM re-scores only the
    k captions CLIP ranks highest (BLIP's retrieval recipe: the cheap dual encoder
    shortlists, the fused encoder decides), so CLIP's ``R@k`` bounds what re-ranking reaches.

    The new score is ITM's log-odds of a match; with ``itc_temperature`` it is that plus
    CLIP's logit ``cosine / itc_temperature`` (BLIP adds the contrastive similarity to the
    ITM score the same way), so each model can overrule the other only by a margin.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"rerank: k={k!r} must be a positive integer")
    if itc_temperature is not None and not itc_temperature > 0:
        raise ValueError(f"rerank: itc_temperature={itc_temperature} must be positive (or None "
                         "for the ITM score alone)")
    images, texts, relevance = embed_data(clip_model, data, phrasing=phrasing)  # [S,D] [T,D] [S,T]
    index, _ = candidate_captions(data, phrasing)                             # [T, 2]
    similarity = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T  # [S, T]
    k = min(k, similarity.shape[1])
    before = recall_at_k(similarity, ks=(1, k), relevance=relevance)
    top_similarity, top = similarity.topk(k, dim=1)                           # [S, k]
    ids = data.input_ids[index[:, 0], index[:, 1]]                            # [T, L]
    mask = data.attention_mask[index[:, 0], index[:, 1]]                      # [T, L]
    flat = top.flatten()                                                      # [S*k]
    image_index = torch.arange(len(data)).repeat_interleave(k)               # [S*k]
    length = int(mask[flat].sum(dim=1).max())
    scores = itm_model.match_logits(data.pixel_values[image_index], ids[flat][:, :length],
                                    mask[flat][:, :length], batch_size=batch_size).view(-1, k)
    if itc_temperature is not None:
        scores = scores + top_similarity / itc_temperature
    best = top.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)      # [S]
    after = relevance[torch.arange(len(data)), best].float().mean().item()
    return {"R@1_contrastive": before[1], f"R@{k}_contrastive": before[k], "R@1_reranked": after,
            "k": k}
