"""Preference learning losses: Bradley-Terry reward models and DPO with its variants (3.3).

A preference pair is one prompt with two answers, the *chosen* one ``c`` (preferred by a
person or a judge) and the *rejected* one ``r``.

* Reward model (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1). A scalar reward ``r(x, y)``
  makes ``c`` preferred with probability ``P(c ≻ r) = σ(r_c − r_r)``; the loss is the
  negative log-likelihood of the observed preferences::

      L_BT = −mean log σ(r_c − r_r − m)  [+ λ · mean((r_c + r_r)²)]

  An optional margin ``m`` (Llama 2, Touvron et al. 2023) asks for a larger gap on pairs
  rated "clearly better"; the optional centring term of TRL (``center_rewards_coefficient``,
  Eisenstein et al. 2023) keeps the rewards near zero, since ``σ`` only sees their difference.

* DPO (Rafailov et al. 2023). The policy ``π`` is its own reward model: the implicit reward
  of an answer is ``β (log π(y|x) − log π_ref(y|x))``, so with the log-ratio margin::

      h = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))

  the variants are (``ε`` = label smoothing, the assumed share of flipped labels)::

      sigmoid   −(1−ε) log σ(βh) − ε log σ(−βh)          (ε = 0: DPO; ε > 0: cDPO)
      robust    [−(1−ε) log σ(βh) + ε log σ(−βh)] / (1−2ε)   (Chowdhury et al. 2024)
      hinge     relu(1 − βh)                              (SLiC, Zhao et al. 2023)
      ipo       (h − 1/(2β))²                             (Azar et al. 2023)

  At the start of training ``π = π_ref``, so ``h = 0`` and the sigmoid loss is
  ``log 2 ≈ 0.6931`` whatever ``ε``: a loss that *stays* there means the policy and the
  reference are the same model, or the reference log-probs are wrong.

The log-probabilities ``log π(y|x)`` come from ``sequence_logprobs``: the causal LM scores
token ``t + 1`` with the logits at position ``t``, and only answer tokens count (labels are
``-100`` on the prompt, the image tokens and the padding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from companion.losses.checks import check_positive_scalar, scalar_value
from companion.losses.generation import IGNORE_INDEX

__all__ = [
    "DPO_LOSS_TYPES",
    "bradley_terry_loss",
    "dpo_loss",
    "dpo_rewards",
    "preference_probability",
    "sequence_logprobs",
    "token_logprobs",
]

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


# ---------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------


def _check_vectors(
    tensors: dict[str, torch.Tensor], squeeze_last: bool = False
) -> list[torch.Tensor]:
    """Return the tensors as equally long, non-empty, finite 1-D floating vectors or raise.

    With ``squeeze_last`` a ``(B, 1)`` tensor (a reward head's output) becomes ``(B,)``.
    """
    names = list(tensors)
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B,), got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"{name} must have a floating dtype, got {x.dtype}; call .float() on it"
            )
    first = names[0]
    shape = tuple(tensors[first].shape)
    for name in names[1:]:
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{first} has shape {shape} but {name} has shape {tuple(tensors[name].shape)}; "
                "pass one value per preference pair in each"
            )
        if tensors[name].device != tensors[first].device:
            raise ValueError(
                f"{first} is on {tensors[first].device} but {name} is on "
                f"{tensors[name].device}; move them to the same device"
            )
    out = list(tensors.values())
    if squeeze_last and len(shape) == 2 and shape[1] == 1:
        out = [x.squeeze(-1) for x in out]
    if out[0].ndim != 1:
        accepted = "(B,) or (B, 1)" if squeeze_last else "(B,)"
        raise ValueError(
            f"{first} must have shape {accepted} (one value per preference pair), got {shape}"
        )
    if out[0].shape[0] == 0:
        raise ValueError(f"empty batch: {first} has shape {shape}; B must be >= 1")
    for name, x in zip(names, out):
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            k = int((~finite).nonzero()[0, 0])
            raise ValueError(
                f"{name} is NaN/inf at pair {k}; a -inf log-prob means a token had probability "
                "0 (check the labels and the masking)"
            )
    return out


def _check_beta(beta) -> float:
    check_positive_scalar(beta, "beta")
    return scalar_value(beta, "beta")


# ---------------------------------------------------------------------------------------
# Bradley-Terry reward model
# ---------------------------------------------------------------------------------------


def preference_probability(reward_a, reward_b) -> torch.Tensor:
    """Bradley-Terry probability that ``a`` is preferred to ``b``: ``σ(r_a − r_b)``.

    Takes tensors or Python numbers (broadcast against each other); returns a tensor.
    """
    a = torch.as_tensor(reward_a)
    b = torch.as_tensor(reward_b)
    if not a.is_floating_point():
        a = a.to(torch.get_default_dtype())
    if not b.is_floating_point():
        b = b.to(torch.get_default_dtype())
    return torch.sigmoid(a - b)


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: float | torch.Tensor = 0.0,
    center_coefficient: float = 0.0,
) -> torch.Tensor:
    """Pairwise reward-model loss ``−mean log σ(r_c − r_r − m) + λ·mean((r_c + r_r)²)``.

    Args:
        chosen_rewards: (B,) or (B, 1) rewards of the chosen answers (a reward head's
            score at the last non-padding token).
        rejected_rewards: the same for the rejected answers, same shape.
        margin: ``m``, a float or a (B,) tensor (one margin per pair, e.g. from how strongly
            the rater preferred the chosen answer). The loss only reaches 0 once
            ``r_c − r_r`` exceeds ``m`` by a wide gap.
        center_coefficient: ``λ >= 0`` of TRL's centring term (0 = off, TRL suggests 0.01).

    Returns:
        The scalar loss.
    """
    chosen, rejected = _check_vectors(
        {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards},
        squeeze_last=True,
    )
    if isinstance(margin, torch.Tensor) and margin.numel() != 1:
        if margin.ndim == 2 and margin.shape[1] == 1:
            margin = margin.squeeze(-1)
        if tuple(margin.shape) != tuple(chosen.shape):
            raise ValueError(
                f"margin must be a float or have shape {tuple(chosen.shape)} (one per pair), "
                f"got shape {tuple(margin.shape)}"
            )
        if not margin.is_floating_point():
            margin = margin.to(chosen.dtype)
        if not bool(torch.isfinite(margin).all()):
            raise ValueError("margin contains NaN/inf; use finite margins (0 = no margin)")
        margin = margin.to(chosen.device)
    else:
        value = scalar_value(margin, "margin")
        if not math.isfinite(value):
            raise ValueError(f"margin must be finite, got {value}")
        margin = value
    coefficient = scalar_value(center_coefficient, "center_coefficient")
    if not (math.isfinite(coefficient) and coefficient >= 0):
        raise ValueError(
            f"center_coefficient must be finite and >= 0 (0 turns centring off), got {coefficient}"
        )
    loss = -F.logsigmoid(chosen - rejected - margin).mean()
    if coefficient > 0:
        loss = loss + coefficient * ((chosen + rejected) ** 2).mean()
    return loss


# ---------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """DPO loss and its variants, averaged over the B pairs (formulas in the module docstring).

    Args:
        policy_chosen_logps: (B,) ``log π(c|x)`` of the trained policy (sequence sums from
            ``sequence_logprobs``; per-token means, ``average=True``, for ``"ipo"``).
        policy_rejected_logps: (B,) ``log π(r|x)``.
        reference_chosen_logps: (B,) ``log π_ref(c|x)`` of the frozen reference model.
        reference_rejected_logps: (B,) ``log π_ref(r|x)``.
        beta: ``β > 0``; small β lets the policy move far from the reference (default 0.1).
        loss_type: one of ``"sigmoid"``, ``"robust"``, ``"hinge"``, ``"ipo"``.
        label_smoothing: ``ε`` in [0, 0.5), the assumed share of flipped preference labels;
            only used by ``"sigmoid"`` (conservative DPO) and ``"robust"``.

    Returns:
        The scalar loss.
    """
    logps = _check_vectors(
        {
            "policy_chosen_logps": policy_chosen_logps,
            "policy_rejected_logps": policy_rejected_logps,
            "reference_chosen_logps": reference_chosen_logps,
            "reference_rejected_logps": reference_rejected_logps,
        }
    )
    beta = _check_beta(beta)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(
            f"unknown loss_type {loss_type!r}; valid ones are {', '.join(DPO_LOSS_TYPES)}"
        )
    eps = scalar_value(label_smoothing, "label_smoothing")
    if not (math.isfinite(eps) and 0.0 <= eps < 0.5):
        raise ValueError(
            f"label_smoothing must be in [0, 0.5) (the share of flipped labels), got {eps}"
        )
    if eps != 0.0 and loss_type in ("hinge", "ipo"):
        raise ValueError(
            f"label_smoothing={eps} has no effect with loss_type={loss_type!r}; it is only "
            "defined for 'sigmoid' and 'robust', so set it to 0"
        )
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = logps
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (
            1 - 2 * eps
        )
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo: regress h onto 1/(2β)
        losses = (h - 1 / (2 * beta)) ** 2
    return losses.mean()


def dpo_rewards(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> dict:
    """DPO's implicit rewards ``β (log π − log π_ref)`` and the metrics TRL logs.

    Returns:
        ``chosen_rewards`` and ``rejected_rewards``: detached (B,) tensors;
        ``reward_accuracy``: share of pairs with ``r_c > r_r`` (float, 0.5 = chance, ties
        count as wrong); ``reward_margin``: ``mean(r_c − r_r)`` (float).
    """
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = _check_vectors(
        {
            "policy_chosen_logps": policy_chosen_logps,
            "policy_rejected_logps": policy_rejected_logps,
            "reference_chosen_logps": reference_chosen_logps,
            "reference_rejected_logps": reference_rejected_logps,
        }
    )
    beta = _check_beta(beta)
    with torch.no_grad():
        chosen = beta * (policy_chosen.detach() - reference_chosen.detach())  # (B,)
        rejected = beta * (policy_rejected.detach() - reference_rejected.detach())  # (B,)
        accuracy = float((chosen > rejected).to(torch.float64).mean())
        margin = float((chosen - rejected).to(torch.float64).mean())
    return {
        "chosen_rewards": chosen,
        "rejected_rewards": rejected,
        "reward_accuracy": accuracy,
        "reward_margin": margin,
    }


# ---------------------------------------------------------------------------------------
# log-probabilities of answers under a causal LM
# ---------------------------------------------------------------------------------------


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log p(label_{t+1} | ≤ t)`` of a causal LM and the mask of scored tokens.

    Labels are *unshifted* (aligned with the inputs, as ``caption_inputs`` builds them): the
    logits at position ``t`` predict the label at ``t + 1``, so ``logits[:, :-1]`` scores
    ``labels[:, 1:]``. Positions whose label is ``ignore_index`` are not scored.

    Args:
        logits: (B, T, V). fp16/bf16 logits are upcast to float32 before the log-softmax
            (a half-precision log-sum-exp over a large vocabulary loses digits); float32 and
            float64 are kept as they are.
        labels: (B, T) integer token ids, ``ignore_index`` where nothing is scored.
        ignore_index: the label of unscored positions (-100, as in ``F.cross_entropy``).

    Returns:
        ``(logps, mask)``: (B, T−1) log-probs, 0 where not scored, and the (B, T−1) bool
        mask of scored positions (True = kept). Position ``t`` belongs to label ``t + 1``.
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(
            "logits and labels must be torch.Tensors, got "
            f"{type(logits).__name__} and {type(labels).__name__}"
        )
    if logits.ndim != 3:
        raise ValueError(f"logits must be 3-D (B, T, V), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must have a floating dtype, got {logits.dtype}")
    if labels.ndim != 2 or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"labels must have shape (B, T) = {tuple(logits.shape[:2])} to match logits "
            f"{tuple(logits.shape)}, got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of token ids, got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(
            f"logits are on {logits.device} but labels on {labels.device}; move them together"
        )
    if logits.shape[1] < 2:
        raise ValueError(
            f"need T >= 2 positions to score a next token, got logits of shape "
            f"{tuple(logits.shape)}"
        )
    vocab = logits.shape[2]
    targets = labels[:, 1:]  # (B, T-1): the token that position t predicts
    mask = targets != ignore_index  # (B, T-1)
    bad = mask & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels[{row}, {col + 1}] = {int(targets[row, col])} is neither a token id in "
            f"[0, {vocab}) nor ignore_index={ignore_index}; check the tokenizer and the padding"
        )
    scores = logits[:, :-1]  # (B, T-1, V): position t predicts label t+1
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    log_probs = torch.log_softmax(scores, dim=-1)  # (B, T-1, V)
    picked = log_probs.gather(-1, targets.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    logps = torch.where(mask, picked, torch.zeros((), dtype=picked.dtype, device=picked.device))
    return logps, mask


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    average: bool = False,
) -> torch.Tensor:
    """``log π(y|x)`` of each row: the sum (or, with ``average``, the mean) of the scored tokens.

    See ``token_logprobs`` for the shift by one and the masking. DPO uses sums; IPO and
    length-normalised variants use means, which do not favour short answers.

    Returns:
        (B,) log-probs, float32 for half-precision logits, else the logits' dtype.

    Raises:
        ValueError: when a row has no scored token (its log-prob would be an empty sum).
    """
    logps, mask = token_logprobs(logits, labels, ignore_index)
    counts = mask.sum(dim=-1)  # (B,)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"rows {empty} have no scored token: every label after position 0 is "
            f"ignore_index={ignore_index}; an answer was truncated away or its labels are "
            "all masked"
        )
    total = logps.sum(dim=-1)  # (B,)
    return total / counts.to(total.dtype) if average else total
