"""Freeze policies: which parts of a vision-language model a training stage updates.

LLaVA names three parts; the stage table of the chapter (seed 3.2 and 3.4) says which of
them learn in each stage:

=========  ===================  ======================  =========================
stage      vision tower         projector               language model
=========  ===================  ======================  =========================
stage 1    frozen               trained                 frozen
stage 2    frozen               trained                 trained
=========  ===================  ======================  =========================
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

from companion.lora import LORA_MARKER

# parameter-name prefixes of each part of LlavaForConditionalGeneration
PARTS = {
    "vision": ("model.vision_tower.",),
    "projector": ("model.multi_modal_projector.",),
    "lm": ("model.language_model.", "lm_head."),
}

STAGES = {
    "stage1": ("projector",),
    "stage2": ("projector", "lm"),
    "all": ("vision", "projector", "lm"),
}


def part_of(name: str) -> str:
    """Which part (vision, projector, lm) a parameter belongs to."""
    for part, prefixes in PARTS.items():
        if name.startswith(prefixes):
            return part
    raise ValueError(f"parameter {name!r} belongs to no known part {sorted(PARTS)}; is this a "
                     "LlavaForConditionalGeneration?")


def set_trainable(model: nn.Module, parts: Iterable[str]) -> dict[str, int]:
    """Make exactly the parameters of ``parts`` trainable; return trainable counts per part.

    A part that carries LoRA adapters (:func:`companion.lora.add_lora`) trains its adapters
    only: its base weights stay frozen, which is the point of LoRA.
    """
    parts = tuple(parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; choose from {sorted(PARTS)}")
    named = [(name, part_of(name), parameter) for name, parameter in model.named_parameters()]
    adapted = {part for name, part, _ in named if LORA_MARKER in name}
    counts = {part: 0 for part in PARTS}
    for name, part, parameter in named:
        train = part in parts and (part not in adapted or LORA_MARKER in name)
        parameter.requires_grad_(train)
        if train:
            counts[part] += parameter.numel()
    return counts


def apply_stage(model: nn.Module, stage: str) -> dict[str, int]:
    """Freeze ``model`` as LLaVA's ``stage`` does (``"stage1"``, ``"stage2"`` or ``"all"``)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from {sorted(STAGES)}")
    return set_trainable(model, STAGES[stage])


def trainable_summary(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Per part: (trainable parameters, all parameters)."""
    summary = {part: [0, 0] for part in PARTS}
    for name, parameter in model.named_parameters():
        part = part_of(name)
        summary[part][1] += parameter.numel()
        if parameter.requires_grad:
            summary[part][0] += parameter.numel()
    return {part: tuple(v) for part, v in summary.items()}
