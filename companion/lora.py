"""LoRA adapters on the language model (optional, through ``peft``).

A large LLM is too big to fine-tune in full on one GPU. LoRA freezes each chosen weight
matrix ``W`` and learns a low-rank change instead: ``W x + (alpha / r) · B A x`` with
``A`` (r × d_in) and ``B`` (d_out × r), ``B`` starting at zero so the adapted model starts
exactly where the base model is. Only ``A`` and ``B`` (and here the projector) learn.

- :func:`add_lora` puts adapters into the LM of a ``LlavaForConditionalGeneration`` in place
  (``peft.inject_adapter_in_model``). Parameter names keep their prefixes, so the freeze
  policies of :mod:`companion.stages` still apply: a stage that trains ``lm`` then trains the
  adapters only, never the base weights.
- :func:`merge_lora` folds the adapters back into the weights (``W + (alpha / r) · B A``) and
  removes them: the model saves and loads as a plain LLaVA checkpoint, with no ``peft``.

``peft`` is an optional dependency (``pip install "companion[lora]"``); everything else in
the package works without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn as nn

LORA_MARKER = ".lora_"  # in the names of adapter parameters


@dataclass(frozen=True)
class LoraSettings:
    """The adapters' shape. ``rank`` 0 means no LoRA (full fine-tuning)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                "gate_proj", "up_proj", "down_proj")

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"LoRA rank={self.rank} must be 0 (off) or positive")
        if self.rank and not self.alpha > 0:
            raise ValueError(f"LoRA alpha={self.alpha} must be positive")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout={self.dropout} must be in [0, 1)")
        if self.rank and not self.targets:
            raise ValueError("LoRA needs at least one target module name (e.g. 'q_proj')")


def _peft():
    try:
        import peft
    except ImportError as error:
        raise ImportError("LoRA needs the optional package peft: pip install peft (or pip "
                          "install -e '.[lora]'); or set lora_rank=0 for full fine-tuning"
                          ) from error
    return peft


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters."""
    return any(LORA_MARKER in name for name, _ in model.named_parameters())


def add_lora(model: nn.Module, settings: LoraSettings | int = 8,
             targets: Sequence[str] | None = None) -> int:
    """Put LoRA adapters into the language model of the LLaVA ``model``, in place; return
    the number of adapter parameters. ``settings`` may be a rank. The adapted model computes
    exactly what the base model computed until the adapters learn (``B`` = 0)."""
    peft = _peft()
    if isinstance(settings, int):
        settings = LoraSettings(rank=settings)
    if targets is not None:
        settings = LoraSettings(settings.rank, settings.alpha, settings.dropout, tuple(targets))
    if settings.rank == 0:
        return 0
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; merge_lora(model) first")
    lm = getattr(getattr(model, "model", None), "language_model", None)
    if lm is None:
        raise ValueError("add_lora expects a LlavaForConditionalGeneration (its LM at "
                         "model.model.language_model)")
    present = {name.rsplit(".", 1)[-1] for name, _ in lm.named_modules()}
    missing = [t for t in settings.targets if t not in present]
    if len(missing) == len(settings.targets):
        raise ValueError(f"none of the LoRA targets {list(settings.targets)} is a module of "
                         "this LM; name its linear layers (e.g. 'c_attn' for GPT-2)")
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                             lora_dropout=settings.dropout,
                             target_modules=[t for t in settings.targets if t in present])
    peft.inject_adapter_in_model(config, lm)
    return sum(p.numel() for n, p in model.named_parameters() if LORA_MARKER in n)


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter of ``model`` into its base weight and remove the adapter, in
    place; return how many layers were merged. The model is then a plain transformers model."""
    if not has_lora(model):
        return 0
    from peft.tuners.lora import LoraLayer  # optional (the `lora` extra), as in _peft()

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
            merged += 1
    return merged
