"""One training loop for every paradigm of the chapter.

``train(model, loss_fn, next_batch, config)`` runs AdamW with linear warmup and cosine
decay, gradient clipping, optional gradient accumulation and bf16 autocast on CUDA, logs a
history of losses and metrics, and calls an evaluation function every ``eval_every`` steps.
The paradigm is entirely in ``loss_fn(batch) -> loss`` (or ``(loss, {name: value})``), so
contrastive pre-training, instruction tuning and DPO share this loop.

Under ``torchrun`` (an initialised ``torch.distributed`` process group with more than one
rank) the same call trains data-parallel: see :func:`train` and the README's "Past one
machine". Without a process group nothing of that runs and the loop does exactly what it
does in the single-process notebooks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gc
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from companion.distributed import rank_and_world


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


@dataclass(frozen=True)
class Checkpointing:
    """Checkpoints in the middle of a run, so that a killed run resumes where it stopped.

    Every ``every`` optimiser steps rank 0 writes the trainable parameters, the optimiser
    state, the history, the step and every rank's RNG state to ``path`` (a temporary file
    renamed into place, so a kill never leaves half a checkpoint). A later :func:`train` with
    the same ``path`` and settings loads it and continues at the next step; the data order
    is a function of the step (``next_batch(index)``), so the resumed run draws the batches
    the killed one would have drawn and ends with the same weights.
    """

    path: Path | str
    every: int = 50

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"Checkpointing.every={self.every} must be at least 1")


def share_of_rank(batch: Any, rank: int, world: int) -> Any:
    """This rank's contiguous block of a global batch: rows ``[rank·b, (rank+1)·b)`` of
    every tensor (``b = N / world``); dicts, lists and tuples are walked, other values kept.

    Every rank draws the same global batch (the data order depends on the step only) and
    keeps its block, so ``world`` ranks together see exactly one process's batch, in the
    order ``distributed_info_nce_loss`` gathers it.
    """
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 0:
            return batch
        rows = batch.shape[0]
        if rows % world:
            raise ValueError(f"a batch tensor of {rows} rows does not split into {world} equal "
                             f"shares; choose a global batch size divisible by the world size "
                             "(times the accumulation)")
        b = rows // world
        return batch[rank * b:(rank + 1) * b]
    if isinstance(batch, dict):
        return {k: share_of_rank(v, rank, world) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(share_of_rank(v, rank, world) for v in batch)
    return batch


class _LossModule(torch.nn.Module):
    """The model as DDP's module, ``loss_fn`` as its forward (the paradigm's loss closes over
    the model, so DDP must run it to see its parameters' gradients)."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.__dict__["loss_fn"] = loss_fn  # not a submodule: loss_fn may be the model itself

    def forward(self, batch):
        return self.loss_fn(batch)


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _fingerprint(config: TrainConfig, params) -> dict:
    """What a checkpoint must agree on with the run that loads it."""
    return {"steps": config.steps, "lr": config.lr, "accumulation": config.accumulation,
            "warmup_fraction": config.warmup_fraction, "weight_decay": config.weight_decay,
            "parameters": [[n, list(p.shape)] for n, p in params]}


def _save_checkpoint(checkpoint: Checkpointing, step: int, params, optimizer, history,
                     fingerprint: dict, device: torch.device, rank: int, world: int) -> None:
    """Rank 0 writes the state after ``step`` optimiser steps (atomically); every rank's RNG
    state is gathered first, so a resumed run continues each rank's random stream."""
    rng = _rng_state(device)
    if world > 1:
        states = [None] * world
        dist.all_gather_object(states, {k: v.cpu() for k, v in rng.items()})
    else:
        states = [rng]
    if rank != 0:
        return
    path = Path(checkpoint.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "fingerprint": fingerprint, "rng": states,
             "params": {n: p.detach().cpu() for n, p in params},
             "optimizer": optimizer.state_dict(),
             "history": {"steps": history.steps, "evals": history.evals}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a reader sees the old checkpoint or the new one


def _load_checkpoint(checkpoint: Checkpointing, params, optimizer, history, fingerprint: dict,
                     device: torch.device, rank: int, world: int) -> int:
    """Load the checkpoint if there is one; return the step to continue from (0: none).

    Every rank waits at a barrier first, so none reads while rank 0 may still write."""
    if world > 1:
        dist.barrier()
    path = Path(checkpoint.path)
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["fingerprint"] != fingerprint:
        raise ValueError(f"the checkpoint {path} belongs to a run with other settings or "
                         f"parameters ({state['fingerprint']} vs {fingerprint}); delete it to "
                         "start afresh, or resume with the settings that wrote it")
    with torch.no_grad():
        for name, param in params:
            param.copy_(state["params"][name].to(param.device))
    optimizer.load_state_dict(state["optimizer"])
    history.steps[:] = state["history"]["steps"]
    history.evals[:] = state["history"]["evals"]
    if len(state["rng"]) == world:  # another world size: the data order still resumes exactly
        rng = state["rng"][rank]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
    return state["step"]


def _micro_step(forward, batch, config: TrainConfig, amp, step: int) -> tuple[float, dict]:
    """One micro-batch in one process: loss, backward of ``loss / accumulation``."""
    with amp:
        out = forward(batch)
    loss, extra = (out if isinstance(out, tuple) else (out, {}))
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"loss is {loss.item()} at step {step}; lower the learning rate or check "
            "the batch for bad values")
    (loss.float() / config.accumulation).backward()
    return loss.item(), {key: float(value) for key, value in extra.items()}


def _distributed_micro_step(forward, batch, config: TrainConfig, amp, step: int,
                            batch_weight: Callable[[Any], Any] | None,
                            world: int) -> tuple[float, dict]:
    """One micro-batch on this rank's share; the returned loss is the global batch's.

    Each rank's loss is the mean over its share; the global loss is their weighted mean
    ``L = Σ_r w_r L_r / Σ_r w_r`` with ``w_r = batch_weight(share)`` (the number of tokens
    a token-mean loss averages over; 1 per rank, a plain mean, when ``batch_weight`` is None).
    DDP averages gradients over ranks, so each rank backpropagates ``W · w_r / Σ w · L_r``:
    the average of those is the gradient of ``L``, as one process on the whole batch gets it.
    """
    with amp:
        out = forward(batch)
    loss, extra = (out if isinstance(out, tuple) else (out, {}))
    weight = 1.0 if batch_weight is None else float(batch_weight(batch))
    value = loss.item()
    # one all_reduce: [Σ w, Σ w·L, ranks without weight, ranks with a non-finite loss, Σ w·metric]
    stats = torch.tensor([weight, weight * value if weight else 0.0, float(weight == 0),
                          float(not math.isfinite(value))]
                         + [weight * float(v) for v in extra.values()],
                         dtype=torch.float64, device=loss.device)
    dist.all_reduce(stats)
    if stats[2] > 0:
        raise ValueError(f"at step {step}, {int(stats[2])} rank(s) got a share of the batch "
                         "with nothing to average over (batch_weight 0, e.g. no label "
                         "tokens); use a larger batch per rank")
    if stats[3] > 0:
        raise FloatingPointError(
            f"the loss is not finite on {int(stats[3])} rank(s) at step {step}; lower the "
            "learning rate or check the batch for bad values")
    scale = world * weight / float(stats[0])
    (loss.float() * scale / config.accumulation).backward()
    total = float(stats[0])
    metrics = {key: float(stats[4 + i]) / total for i, key in enumerate(extra)}
    return float(stats[1]) / total, metrics


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
    batch_weight: Callable[[Any], Any] | None = None,
    shard: Callable[[Any, int, int], Any] = share_of_rank,
    checkpoint: Checkpointing | None = None,
) -> History:
    """Train the trainable parameters of ``model``; return the :class:`History`.

    ``next_batch(index)`` returns micro-batch ``index = step · accumulation + micro``
    (deterministic data order); ``after_step(step)`` runs after each optimiser step (e.g.
    ``ClipLoss.clamp_``). Raises ``FloatingPointError`` at the first non-finite loss, naming
    the step. ``checkpoint`` writes mid-run checkpoints and resumes from one
    (:class:`Checkpointing`).

    Under ``torchrun`` (a process group of W > 1 ranks) the model's trainable parameters
    are wrapped in ``DistributedDataParallel`` (frozen ones get no gradient buckets); every
    rank draws the same global micro-batch and trains on ``shard(batch, rank, W)`` (default
    :func:`share_of_rank`, its block of rows); ``batch_weight(share)`` weights the ranks'
    losses for a loss averaged over tokens (see :func:`_distributed_micro_step`); only rank 0
    prints, shows progress and writes checkpoints. The result matches one process on the
    same global batches up to float rounding.
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

    rank, world = rank_and_world()
    first = 0
    if checkpoint is not None:
        fingerprint = _fingerprint(config, params)
        first = _load_checkpoint(checkpoint, params, optimizer, history, fingerprint, device,
                                 rank, world)
        if first and rank == 0:
            print_fn(f"resumed from {checkpoint.path} at step {first}/{config.steps}")
    forward, ddp = loss_fn, None
    if world > 1:
        # find_unused_parameters: a trainable parameter the loss does not use (CLIPModel's own
        # logit_scale, when ClipLoss owns the temperature) would otherwise hold back its
        # gradient bucket, and DDP would average nothing; the price is one graph walk a step
        ddp = DistributedDataParallel(_LossModule(model, loss_fn),
                                      find_unused_parameters=True,
                                      device_ids=[device.index] if device.type == "cuda" else None)
        forward = ddp
    amp = (torch.autocast("cuda", dtype=torch.bfloat16)
           if config.autocast and device.type == "cuda" else nullcontext())
    bar = None
    if config.progress and rank == 0:
        bar = tqdm(total=config.steps, initial=first, desc="training", leave=False)
    print_fn = print_fn if rank == 0 else (lambda _: None)
    model.train()
    for step in range(first, config.steps):
        factor = warmup_cosine(step, config.steps, warmup, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * group["lr_scale"] * factor
        total_loss, metrics = 0.0, {}
        for micro in range(config.accumulation):
            batch = next_batch(step * config.accumulation + micro)
            if ddp is None:
                loss, extra = _micro_step(forward, _to_device(batch, device), config, amp, step)
            else:
                last_micro = micro + 1 == config.accumulation
                with nullcontext() if last_micro else ddp.no_sync():  # all_reduce once a step
                    loss, extra = _distributed_micro_step(
                        forward, _to_device(shard(batch, rank, world), device), config, amp,
                        step, batch_weight, world)
            total_loss += loss / config.accumulation
            for key, value in extra.items():
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
            print_fn(f"step {step + 1:>5}/{config.steps}  loss {mean:.4f}  "
                     f"lr {config.lr * factor:.2e}")
        if eval_fn is not None and (last or (config.eval_every
                                             and (step + 1) % config.eval_every == 0)):
            model.eval()
            with torch.no_grad():
                result = dict(eval_fn(step + 1))
            model.train()
            history.evals.append({"step": step + 1, **result})
        if checkpoint is not None and not last and (step + 1) % checkpoint.every == 0:
            _save_checkpoint(checkpoint, step + 1, params, optimizer, history, fingerprint,
                             device, rank, world)
    if bar is not None:
        bar.close()
    if ddp is not None:
        # DistributedDataParallel sits in a reference cycle with its reducer; left to the
        # collector at interpreter exit, gloo's threads abort the process ("terminate called
        # without an active exception", exit -6) after a run that succeeded. Free it now.
        del forward, ddp
        gc.collect()
    model.eval()
    return history
