"""LLaVA's mechanism written out: what ``LlavaForConditionalGeneration`` does to an image.

Three steps turn an image and a prompt into the LM's input (the seed's 视觉编码器 →
投影层 → 语言模型):

1. :func:`vision_features`: the vision tower encodes the image; LLaVA-1.5 keeps the
   penultimate layer's hidden states and drops the CLS token, one vector per patch.
2. :func:`project`: the projector (linear, GELU, linear) maps each patch vector to the LM's
   width. These are the "vision tokens".
3. :func:`merge_image_tokens`: the prompt holds one ``<image>`` placeholder per vision token;
   their embeddings are replaced, in order, by the vision tokens.

:func:`inputs_embeds` chains the three; ``tests/test_llava_mechanism.py`` checks that the
LM fed these embeddings gives exactly the logits ``LlavaForConditionalGeneration`` gives.

Fewer vision tokens: :func:`merge_patches` joins each ``factor × factor`` block of
neighbouring patches into one token (their features concatenated, "pixel shuffle" in
Idefics3, SmolVLM and nanoVLM), and :class:`MergingProjector` is LLaVA-1.5's projector
reading such tokens. ``build_vlm(..., merge_patches=2)`` gives the shapes world's 6 × 6
patches as 9 tokens, one per cell of the scene's grid, without coarsening the tower's patches
(:class:`LlavaWithMergedPatches` is the model class that holds it).

Both of LLaVA's stages freeze the vision tower, so step 1 gives the same output for an
image at every step of both stages. :class:`VisionFeatureCache` computes it once per image
and the training step starts from step 2 (:func:`companion.instruction.instruction_tuning_step`
takes ``vision_features`` in place of ``pixel_values``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration
from transformers.activations import ACT2FN


def vision_features(vlm, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images → (B, P, D_vision) patch features, as ``vlm`` selects them."""
    config = vlm.config
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer={layer!r}: only one layer is written out here")
    tower = vlm.model.vision_tower
    hidden = tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
    features = hidden[layer]                       # (B, 1 + P, D_vision), CLS first
    if config.vision_feature_select_strategy == "default":
        features = features[:, 1:]                 # drop CLS: one vector per patch
    return features


def project(vlm, features: torch.Tensor) -> torch.Tensor:
    """(B, P, D_vision) → (B, P / m², D_lm): LLaVA-1.5's two-layer MLP projector (m = the
    model's ``merge_patches``, 1 for LLaVA itself)."""
    return vlm.model.multi_modal_projector(features)


def merge_patches(features: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, P, D) features of a square s × s patch grid → (B, (s/f)², f²·D): the features
    of each f × f block of neighbouring patches concatenated (row by row inside the block)
    into one token, the blocks in reading order. ``factor=1`` returns ``features``."""
    batch, patches, width = features.shape
    side = round(patches ** 0.5)
    if factor < 1 or side * side != patches or side % factor:
        raise ValueError(f"{patches} patches do not form a square grid whose side is a "
                         f"multiple of merge factor {factor}")
    blocks = side // factor
    grid = features.reshape(batch, blocks, factor, blocks, factor, width)  # (B, by, fy, bx, fx, D)
    grid = grid.permute(0, 1, 3, 2, 4, 5)                                # (B, by, bx, fy, fx, D)
    return grid.reshape(batch, blocks * blocks, factor * factor * width)


class MergingProjector(nn.Module):
    """LLaVA-1.5's projector (linear, GELU, linear) over merged patches: it reads
    ``merge_patches² × D_vision`` features per token. Its layers keep LLaVA's names, so the
    stages find them under ``multi_modal_projector`` as usual."""

    def __init__(self, config):
        super().__init__()
        self.factor = int(config.merge_patches)
        width = config.vision_config.hidden_size * self.factor ** 2
        hidden = config.text_config.hidden_size
        bias = config.multimodal_projector_bias
        self.linear_1 = nn.Linear(width, hidden, bias=bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # (B, P, D_vision) → (B, P / f², f² D_vision) → (B, P / f², D_lm)
        return self.linear_2(self.act(self.linear_1(merge_patches(features, self.factor))))


class LlavaWithMergedPatches(LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` whose projector reads merged patches when its
    config says ``merge_patches`` > 1 (everything else is the library's: the tower, the
    merge into the ``<image>`` positions, the LM, generation, saving and loading). A
    checkpoint saved from it needs this class to load: plain LLaVA would build a projector
    of the wrong width."""

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "merge_patches", 1) > 1:
            self.model.multi_modal_projector = MergingProjector(config)
            self.model.multi_modal_projector.apply(self._init_weights)


def merge_image_tokens(input_ids: torch.Tensor, text_embeds: torch.Tensor,
                       image_tokens: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Put the vision tokens where the ``<image>`` placeholders are.

    ``input_ids`` (B, T) with exactly P placeholders per row; ``text_embeds`` (B, T, D) the
    token embeddings; ``image_tokens`` (B, P, D). Row b's placeholders take row b's vision
    tokens in order; every other position keeps its token embedding.
    """
    is_image = input_ids == image_token_id                         # (B, T)
    per_row = is_image.sum(dim=1)
    batch, patches = image_tokens.shape[:2]
    if input_ids.shape[0] != batch or bool((per_row != patches).any()):
        raise ValueError(f"each row needs {patches} <image> tokens for its image, got "
                         f"{per_row.tolist()} placeholders in {input_ids.shape[0]} rows for "
                         f"{batch} images")
    merged = text_embeds.clone()
    merged[is_image] = image_tokens.reshape(-1, image_tokens.shape[-1]).to(merged.dtype)
    return merged


def inputs_embeds(vlm, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                  features: torch.Tensor | None = None) -> torch.Tensor:
    """The LM's input embeddings for a prompt and its images (or their cached features)."""
    if (pixel_values is None) == (features is None):
        raise ValueError("give exactly one of pixel_values and features")
    if features is None:
        features = vision_features(vlm, pixel_values)
    text = vlm.get_input_embeddings()(input_ids)
    return merge_image_tokens(input_ids, text, project(vlm, features),
                              vlm.config.image_token_index)


class VisionFeatureCache:
    """Patch features of a frozen vision tower, computed once per image.

    ``cache = VisionFeatureCache(vlm, pixel_values)`` runs the tower over every image (in
    chunks of ``chunk`` under ``torch.no_grad``); ``cache[rows]`` returns their features.
    A tower that learns (3.4's variant that trains it at a tenth of the rate) must not use
    a cache: :meth:`check_frozen` says so.
    """

    def __init__(self, vlm, pixel_values: torch.Tensor, chunk: int = 256):
        self.check_frozen(vlm)
        tower = vlm.model.vision_tower
        was_training = tower.training
        tower.eval()  # the same output the training step's tower gives: it has no dropout
        parts = []
        with torch.no_grad():
            for start in range(0, len(pixel_values), chunk):
                parts.append(vision_features(vlm, pixel_values[start:start + chunk]))
        tower.train(was_training)
        self.features = torch.cat(parts) if parts else torch.empty(0)

    @staticmethod
    def check_frozen(vlm) -> None:
        learning = [n for n, p in vlm.model.vision_tower.named_parameters() if p.requires_grad]
        if learning:
            raise ValueError(f"the vision tower learns ({len(learning)} tensors, e.g. "
                             f"{learning[0]}): its features change every step and cannot be "
                             "cached; freeze it or train without the cache")

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, rows) -> torch.Tensor:
        return self.features[rows]


# ----------------------------------------------------------------------------- placeholders

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


def expand_image_placeholder(ids: list[int], mask: list[int], image_id: int, n_image_tokens: int,
                             where: str) -> tuple[list[int], list[int]]:
    """The prompt's one ``<image>`` token repeated ``n_image_tokens`` times (one position per
    vision token, for :func:`merge_image_tokens` to fill), with ``mask`` (0 there) kept in
    step; more than one ``<image>`` is an error that names ``where``."""
    positions = [i for i, token in enumerate(ids) if token == image_id]
    if len(positions) > 1:
        raise ValueError(f"{where}: {len(positions)} <image> tokens; LLaVA takes one image per "
                         "conversation, at the start of the first human turn")
    if not positions:
        return ids, mask
    p = positions[0]
    return (ids[:p] + [image_id] * n_image_tokens + ids[p + 1:],
            mask[:p] + [0] * n_image_tokens + mask[p + 1:])
