"""One training loop for every paradigm of the chapter.

``train(model, loss_fn, next_batch, config)`` runs AdamW with linear warmup and cosine
decay, gradient clipping, optional gradient accumulation and bf16 autocast on CUDA, logs a
history of losses and metrics, and calls an evaluation function every ``eval_every`` steps.
The paradigm is entirely in ``loss_fn(batch) -> loss`` (or ``(loss, {name: value})``), so
contrastive pre-training, instruction tuning and DPO share this loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TrainConfig:
    steps: int = 500                 # optimiser steps
    lr: float = 1e-3                 # peak learning rate
    weight_decay: float = 0.0        # AdamW decoupled weight decay
    warmup_fraction: float = 0.05    # share of steps with linear warmup (LLaVA: 0.03)
    min_lr_ratio: float = 0.0        # cosine decays to lr * min_lr_ratio
    grad_clip: float | None = 1.0    # max global gradient norm (None: no clipping)
    accumulation: int = 1            # micro-batches per optimiser step
    log_every: int = 50              # print a line every this many steps (0: never)
    eval_every: int = 0              # call eval_fn every this many steps (0: only at the end)
    progress: bool = False           # tqdm progress bar (off in committed notebook outputs)
    autocast: bool = True            # bf16 autocast on CUDA (losses stay fp32)
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr} must be a positive finite number")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if self.accumulation < 1:
            raise ValueError(f"accumulation={self.accumulation} must be at least 1")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip={self.grad_clip} must be positive or None")


@dataclass
class History:
    """Per-step records: ``{"step", "loss", "lr", ...metrics}`` and evaluation records."""

    steps: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)

    def series(self, key: str, evals: bool = False) -> tuple[list[int], list[float]]:
        rows = self.evals if evals else self.steps
        rows = [r for r in rows if key in r]
        return [r["step"] for r in rows], [r[key] for r in rows]

    def last(self, key: str, window: int = 1) -> float:
        values = self.series(key)[1][-window:]
        if not values:
            raise KeyError(f"no '{key}' in the training history")
        return sum(values) / len(values)


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(named: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float,
                 lr_scale: dict[str, float] | None = None, base_lr: float | None = None):
    """AdamW groups: no weight decay on biases and norms; optional per-prefix LR scales.

    ``lr_scale={"vision_model.": 0.1}`` trains parameters whose names start with that prefix
    at a tenth of the learning rate (the chapter's "small LR for the vision encoder").
    """
    groups: dict[tuple[bool, float], list] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        scale = 1.0
        for prefix, value in (lr_scale or {}).items():
            if name.startswith(prefix):
                scale = value
        decay = param.ndim >= 2 and "norm" not in name.lower()
        groups.setdefault((decay, scale), []).append(param)
    out = []
    for (decay, scale), params in groups.items():
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0,
                 "lr_scale": scale}
        if base_lr is not None:
            group["lr"] = base_lr * scale
        out.append(group)
    return out


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def train(
    model: torch.nn.Module,
    loss_fn: Callable[[Any], torch.Tensor | tuple[torch.Tensor, dict[str, float]]],
    next_batch: Callable[[int], Any],
    config: TrainConfig,
    *,
    eval_fn: Callable[[int], dict[str, float]] | None = None,
    after_step: Callable[[int], None] | None = None,
    lr_scale: dict[str, float] | None = None,
    device: torch.device | str | None = None,
    history: History | None = None,
    print_fn: Callable[[str], None] = print,
) -> History:
    """Train the trainable parameters of ``model``; return the :class:`History`.

    ``next_batch(step)`` returns the batch for a step (deterministic data order);
    ``after_step(step)`` runs after each optimiser step (e.g. ``ClipLoss.clamp_``).
    Raises ``FloatingPointError`` at the first non-finite loss, naming the step.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all requires_grad=False); "
                         "check the freeze policy")
    groups = param_groups(params, config.weight_decay, lr_scale, config.lr)
    # foreach: one kernel per group instead of one per tensor (torch's default only on CUDA);
    # on a CPU with many small tensors the per-tensor loop is a fifth of a step
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, foreach=True)
    warmup = int(round(config.warmup_fraction * config.steps))
    history = history or History()
    amp = (torch.autocast("cuda", dtype=torch.bfloat16)
           if config.autocast and device.type == "cuda" else nullcontext())
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc="training", leave=False)
    model.train()
    for step in range(config.steps):
        factor = warmup_cosine(step, config.steps, warmup, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * group["lr_scale"] * factor
        total_loss, metrics = 0.0, {}
        for micro in range(config.accumulation):
            batch = _to_device(next_batch(step * config.accumulation + micro), device)
            with amp:
                out = loss_fn(batch)
            loss, extra = (out if isinstance(out, tuple) else (out, {}))
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {step}; lower the learning rate or check "
                    "the batch for bad values")
            (loss.float() / config.accumulation).backward()
            total_loss += loss.item() / config.accumulation
            for key, value in extra.items():
                value = float(value)
                metrics[key] = metrics.get(key, 0.0) + value / config.accumulation
        if config.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], config.grad_clip)
            metrics["grad_norm"] = float(norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(step)
        record = {"step": step + 1, "loss": total_loss, "lr": config.lr * factor, **metrics}
        history.steps.append(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss:.3f}")
        last = step + 1 == config.steps
        if config.log_every and ((step + 1) % config.log_every == 0 or last):
            window = history.steps[-config.log_every:]
            mean = sum(r["loss"] for r in window) / len(window)
            print_fn(f"step {step + 1:>5}/{config.steps}  loss {mean:.4f}  lr {config.lr * factor:.2e}")
        if eval_fn is not None and (last or (config.eval_every and (step + 1) % config.eval_every == 0)):
            model.eval()
            with torch.no_grad():
                result = dict(eval_fn(step + 1))
            model.train()
            history.evals.append({"step": step + 1, **result})
    if bar is not None:
        bar.close()
    model.eval()
    return history
