"""DPO (section 3.3): preference optimisation without a reward model or sampling.

DPO trains the policy directly on preference pairs. With ``h`` the policy's log-ratio
advantage of the chosen over the rejected reply, measured against a frozen reference,

    h = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)),

the seed's loss is ``-log sigma(beta * h)``: the Bradley-Terry loss of an *implicit* reward
``beta * log(pi / ref)``. The reference log-probs never change, so they are computed once,
before training, and cached (for evaluation pairs too). The variants (label smoothing, IPO,
hinge, robust) live in :func:`companion.losses.preference.dpo_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from companion.losses.preference import dpo_loss, dpo_rewards, sequence_logprobs
from companion.preference import PreferenceData
from companion.train import TrainConfig, share_of_rank, train


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (what ``generate`` uses), so a forward pass scores
    a sequence exactly as it was sampled."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def reply_logps(model, batch: dict, average: bool = False) -> torch.Tensor:
    """Sequence log-prob of the labelled (reply) tokens of each row of ``batch``: (rows,)."""
    device = next(model.parameters()).device
    mask = batch["attention_mask"].to(device)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                   position_ids=position_ids_for(mask),
                   pixel_values=batch["pixel_values"].to(device)).logits
    return sequence_logprobs(logits, batch["labels"].to(device), average=average)


@torch.no_grad()
def reference_logps(reference, data: PreferenceData, pad_id: int, average: bool = False,
                    batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen reference's log-probs of every chosen and rejected reply, computed once."""
    reference.eval()
    chosen, rejected = [], []
    for start in range(0, len(data), batch_size):
        rows = range(start, min(start + batch_size, len(data)))
        logps = reply_logps(reference, data.batch(rows, pad_id), average).cpu()
        chosen.append(logps[:len(rows)])
        rejected.append(logps[len(rows):])
    return torch.cat(chosen), torch.cat(rejected)


def dpo_batch_loss(model, batch: dict, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                   beta: float = 0.1, loss_type: str = "sigmoid",
                   label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The seed's ``dpo_loss`` on a :meth:`PreferenceData.batch`: one concatenated forward
    pass for chosen and rejected; ``ref_chosen``/``ref_rejected`` are the cached reference
    log-probs of the whole data set (indexed by ``batch["rows"]``). IPO uses per-token
    averaged log-probs, as its paper does (the caller must cache the reference alike)."""
    average = loss_type == "ipo"
    logps = reply_logps(model, batch, average)
    n, rows = batch["n_pairs"], batch["rows"].cpu()
    device = logps.device
    ref_c, ref_r = ref_chosen[rows].to(device), ref_rejected[rows].to(device)
    loss = dpo_loss(logps[:n], logps[n:], ref_c, ref_r, beta=beta, loss_type=loss_type,
                    label_smoothing=label_smoothing)
    stats = dpo_rewards(logps[:n].detach(), logps[n:].detach(), ref_c, ref_r, beta=beta)
    return loss, {"reward_accuracy": stats["reward_accuracy"],
                  "reward_margin": stats["reward_margin"],
                  "chosen_reward": float(stats["chosen_rewards"].mean()),
                  "rejected_reward": float(stats["rejected_rewards"].mean())}


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    steps: int = 150
    lr: float = 1e-4
    batch_size: int = 16     # pairs per step (two sequences each)
    seed: int = 0


def train_dpo(policy, reference, data: PreferenceData, pad_id: int, config: DPOConfig,
              device=None, log=print, progress: bool = False, checkpoint=None):
    """Train ``policy`` (its trainable parameters) with DPO against the frozen ``reference``.
    Returns the training history (loss, implicit-reward accuracy and margin per step).
    Under ``torchrun`` each rank scores its block of the step's pairs (chosen and rejected
    together); ``checkpoint``: a :class:`~companion.train.Checkpointing`."""
    average = config.loss_type == "ipo"
    ref_chosen, ref_rejected = reference_logps(reference, data, pad_id, average)
    if not torch.isfinite(torch.cat([ref_chosen, ref_rejected])).all():
        raise FloatingPointError("the reference gives non-finite log-probs to some reply")
    train_config = TrainConfig(steps=config.steps, lr=config.lr, weight_decay=0.0,
                               warmup_fraction=0.1, log_every=max(1, config.steps // 4) if log
                               else 0, progress=progress)
    return train(policy, lambda batch: dpo_batch_loss(policy, batch, ref_chosen, ref_rejected,
                                                      config.beta, config.loss_type,
                                                      config.label_smoothing),
                 lambda step: data.draw(config.batch_size, step, config.seed, pad_id),
                 train_config, device=device, print_fn=log or (lambda _: None),
                 shard=lambda batch, rank, world: data.batch(
                     share_of_rank(batch["rows"], rank, world).tolist(), pad_id),
                 checkpoint=checkpoint)
