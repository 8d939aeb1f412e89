"""Real Hugging Face models from tiny configs, or from a checkpoint when one is named.

The chapter never hand-writes a transformer block: CLIP is ``transformers.CLIPModel``.
``build_clip(checkpoint=None)`` makes a tiny one sized for a laptop CPU;
``build_clip(checkpoint="openai/clip-vit-base-patch32")`` (or a local folder) loads real
weights through the same code path, with that checkpoint's own image processor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPModel

try:  # transformers 5 without torchvision: the PIL backend (same numbers, no warning)
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # a transformers without it
    from transformers import CLIPImageProcessor


@dataclass
class TinyClipConfig:
    """Sizes of the default CLIP (about 0.25M parameters: trains in two minutes on 2 cores)."""

    image_size: int = 48       # input pixels per side
    patch_size: int = 8        # ViT patch side: (48/8)^2 = 36 patches
    vision_width: int = 64     # ViT hidden size
    vision_layers: int = 2
    text_width: int = 64       # text transformer hidden size
    text_layers: int = 2
    heads: int = 4
    projection_dim: int = 64   # shared embedding space
    max_text_length: int = 64  # longest caption in tokens

    def to_dict(self) -> dict:
        return asdict(self)


def tiny_clip_config(tokenizer, sizes: TinyClipConfig | None = None):
    """A ``CLIPConfig`` whose text side matches ``tokenizer`` (vocab, pad, bos, eos ids)."""
    sizes = sizes or TinyClipConfig()
    if sizes.image_size % sizes.patch_size:
        raise ValueError(f"image_size={sizes.image_size} must be a multiple of "
                         f"patch_size={sizes.patch_size}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; CLIP pools the text at the eos token")
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=sizes.text_width,
        intermediate_size=4 * sizes.text_width, num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.heads, max_position_embeddings=sizes.max_text_length,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision_config = dict(
        image_size=sizes.image_size, patch_size=sizes.patch_size,
        hidden_size=sizes.vision_width, intermediate_size=4 * sizes.vision_width,
        num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.heads,
    )
    return CLIPConfig(text_config=text_config, vision_config=vision_config,
                      projection_dim=sizes.projection_dim)


def tiny_image_processor(image_size: int):
    """A real ``CLIPImageProcessor`` for the world's images (saved beside the model)."""
    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": image_size}, do_center_crop=True,
        crop_size={"height": image_size, "width": image_size}, do_rescale=True,
        do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )


def build_clip(tokenizer=None, checkpoint: str | None = None,
               sizes: TinyClipConfig | None = None, seed: int = 0):
    """Return ``(model, image_processor, tokenizer)``.

    With ``checkpoint`` (a hub id or a local folder saved with ``save_pretrained``) the
    model, its image processor and its tokenizer come from there. Otherwise a tiny CLIP is
    initialised from ``seed`` for ``tokenizer`` (required then).
    """
    if checkpoint:
        model = CLIPModel.from_pretrained(checkpoint)
        processor = AutoImageProcessor.from_pretrained(checkpoint)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(checkpoint)
        return model, processor, tokenizer
    if tokenizer is None:
        raise ValueError("build_clip needs a tokenizer when no checkpoint is given")
    sizes = sizes or TinyClipConfig()
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(tokenizer, sizes))
    return model, tiny_image_processor(sizes.image_size), tokenizer


def clip_image_size(model) -> int:
    return int(model.config.vision_config.image_size)


def count_parameters(module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
