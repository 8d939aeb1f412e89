"""PPO for language models (RLHF): KL-shaped rewards, GAE, clipped losses, KL control (3.3).

One PPO step on a batch of sampled answers (Ouyang et al. 2022; Ziegler et al. 2019; the
conventions of TRL's ``PPOTrainer``). Every tensor is (B, T) over the answer tokens, with a
bool ``mask`` (True = real token, padding only at the end of a row):

1. Rewards (``reward_with_kl``). The judge (reward model) gives one score ``s`` per answer.
   Each token pays for drifting from the reference model, and the score arrives at the last
   real token::

       r_t = −β · kl_t  (+ s  if t is the last real token)

   with ``kl_t`` an estimate of ``KL(π ‖ π_ref)`` from the sampled token (``kl_penalty``,
   Schulman 2020, "Approximating KL divergence")::

       k1 = log π − log π_ref                  unbiased, but negative on some tokens
       k3 = (e^ℓ − 1) − ℓ,  ℓ = log π_ref − log π   unbiased and never negative

   Since the tokens are sampled from π, ``E[k1] = E[k3] = KL``. A *mean* k1 below 0 usually
   means the answers were sampled with other settings (temperature, top-k) than the ones
   used to score them.
2. Advantages (``gae``, Schulman et al. 2016). With the value head's ``V_t`` and ``V_T = 0``
   after the last real token::

       δ_t = r_t + γ V_{t+1} − V_t
       A_t = δ_t + γλ A_{t+1}          (A_T = 0)
       R_t = A_t + V_t                 (the value head's regression target)

   ``λ = 0`` gives the one-step TD error ``δ_t``; ``γ = λ = 1`` gives reward-to-go minus
   ``V_t``. TRL uses γ = 1, λ = 0.95 and whitens the advantages over the batch (``whiten``).
3. Losses, for several epochs over the same rollouts. With the ratio
   ``ρ_t = π(a_t)/π_old(a_t) = exp(log π − log π_old)`` and clip range ``ε``::

       L_policy = mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1−ε, 1+ε))
       L_value  = ½ mean_t max((V_t − R_t)², (clip(V_t, V_old,t ± ε_v) − R_t)²)

   Taking the max (the pessimistic branch) means a token whose ratio has already moved
   past ``1 ± ε`` in the direction its advantage favours gets no gradient: the update stays
   in a trust region around the policy that sampled the data (Schulman et al. 2017).
4. KL control (``AdaptiveKLController``, Ziegler et al. 2019): after each batch, with
   ``n`` the number of samples seen::

       e = clip(KL / target − 1, −0.2, 0.2),    β ← β (1 + e · n / horizon)

   so β grows while the policy is further from the reference than ``target`` and shrinks
   otherwise, by at most 20 % per ``horizon`` samples.

TRL's defaults: ε = 0.2, ε_v = 0.2, γ = 1, λ = 0.95, 4 PPO epochs per batch.
"""

from __future__ import annotations

import math
import numbers

import torch

from companion.losses.checks import scalar_value

__all__ = [
    "KL_KINDS",
    "AdaptiveKLController",
    "FixedKLController",
    "gae",
    "kl_penalty",
    "masked_mean",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reward_with_kl",
    "whiten",
]

KL_KINDS = ("k1", "k3", "abs", "mse")


# ---------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------


def _check_same_shape(tensors: dict[str, torch.Tensor], ndim: int | None = 2) -> None:
    """Raise unless all are floating tensors of one shape (``ndim``-D when given) and device."""
    names = list(tensors)
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"{name} must have a floating dtype, got {x.dtype}; call .float() on it"
            )
    first = tensors[names[0]]
    if ndim is not None and first.ndim != ndim:
        raise ValueError(
            f"{names[0]} must be {ndim}-D (B, T) (one value per answer token), got shape "
            f"{tuple(first.shape)}"
        )
    for name in names[1:]:
        x = tensors[name]
        if x.shape != first.shape:
            raise ValueError(
                f"{names[0]} has shape {tuple(first.shape)} but {name} has shape "
                f"{tuple(x.shape)}; they must be aligned token by token"
            )
        if x.device != first.device:
            raise ValueError(
                f"{names[0]} is on {first.device} but {name} is on {x.device}; move them to "
                "the same device"
            )
    if first.numel() == 0:
        raise ValueError(f"{names[0]} is empty (shape {tuple(first.shape)}); nothing to average")


def _as_mask(mask, like: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """``mask`` as a bool tensor shaped like ``like`` (True = real token); 0/1 ints or floats
    (an ``attention_mask``) are accepted and converted."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor, got {type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(
            f"{name} must have the shape {tuple(like.shape)} of the values it masks, got "
            f"{tuple(mask.shape)}"
        )
    if mask.device != like.device:
        raise ValueError(f"{name} is on {mask.device} but the values are on {like.device}")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(
                f"{name} must be bool (True = real token) or hold only 0 and 1; got other values"
            )
        mask = mask != 0
    return mask


def _check_right_padded(mask: torch.Tensor, name: str = "mask") -> None:
    """Raise unless every row is real tokens followed by padding (no True after a False)."""
    if mask.ndim != 2:
        raise ValueError(f"{name} must be 2-D (B, T), got shape {tuple(mask.shape)}")
    gaps = mask[:, 1:] & ~mask[:, :-1]  # (B, T-1): a real token right after padding
    if bool(gaps.any()):
        row = int(gaps.nonzero()[0, 0])
        raise ValueError(
            f"{name} row {row} has a real token after padding ({mask[row].int().tolist()}); "
            "padding must come only at the end of each row (right padding)"
        )


def _check_range(value, name: str, low: float, high: float | None = None) -> float:
    """``value`` as a float, or raise unless it is finite and in ``[low, high]``."""
    number = scalar_value(value, name)
    if not math.isfinite(number) or number < low or (high is not None and number > high):
        bounds = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise ValueError(f"{name} must be finite and {bounds}, got {number}")
    return number


def _check_positive(value, name: str) -> float:
    number = scalar_value(value, name)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be finite and > 0, got {number}")
    return number


# ---------------------------------------------------------------------------------------
# masked statistics
# ---------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is True (0-d tensor, differentiable).

    Values under a False mask are never read, so NaN or inf there does not leak in.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    mask = _as_mask(mask, x)
    count = mask.sum()
    if int(count) == 0:
        raise ValueError(
            f"mask is all False (shape {tuple(mask.shape)}): there is no real token to average"
        )
    kept = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() / count.to(kept.dtype)


def whiten(
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``(x − mean) / sqrt(var + eps)`` over the real tokens (TRL's ``masked_whiten``).

    The variance is the unbiased one (divided by ``n − 1``), as in TRL. ``shift_mean=False``
    only rescales: the mean is added back (TRL does this for rewards). Padding positions of
    the result are 0.
    """
    _check_same_shape({"values": values}, ndim=None)
    eps = _check_range(eps, "eps", 0.0)
    real = torch.ones_like(values, dtype=torch.bool) if mask is None else _as_mask(mask, values)
    count = int(real.sum())
    if count < 2:
        raise ValueError(
            f"whiten needs at least 2 real values for a variance, got {count}; "
            "whiten over the whole batch, not one token"
        )
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    mean = masked_mean(values, real)
    centred = torch.where(real, values - mean, zero)
    variance = (centred**2).sum() / (count - 1)
    out = centred * torch.rsqrt(variance + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(real, out, zero)


# ---------------------------------------------------------------------------------------
# rewards and advantages
# ---------------------------------------------------------------------------------------


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1"
) -> torch.Tensor:
    """Per-token KL estimate from the sampled tokens' log-probs under π and π_ref.

    ``kind``: ``"k1"`` = ``log π − log π_ref``; ``"k3"`` = ``(e^ℓ − 1) − ℓ`` with
    ``ℓ = log π_ref − log π`` (never negative, ``≈ ½ℓ²`` for small ℓ); ``"abs"`` =
    ``|log π − log π_ref|``; ``"mse"`` = ``½ (log π − log π_ref)²``. Elementwise, any shape.
    """
    _check_same_shape({"logprobs": logprobs, "ref_logprobs": ref_logprobs}, ndim=None)
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL kind {kind!r}; valid ones are {', '.join(KL_KINDS)}")
    diff = logprobs - ref_logprobs  # log π − log π_ref
    if kind == "k1":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind == "mse":
        return 0.5 * diff**2
    ell = -diff  # ℓ = log π_ref − log π
    # expm1 keeps e^ℓ − 1 exact for small ℓ, where exp(ℓ) − 1 − ℓ would cancel to noise;
    # the clamp only guards against a last-bit rounding below zero.
    return (torch.expm1(ell) - ell).clamp_min(0.0)


def reward_with_kl(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards: ``−β·kl_t`` on every real token plus the score at the last one.

    Args:
        scores: (B,) the judge's score of each answer.
        logprobs: (B, T) log-probs of the sampled tokens under the policy (at sampling time).
        ref_logprobs: (B, T) the same under the frozen reference model.
        mask: (B, T) bool, True on real answer tokens, right-padded.
        beta: KL coefficient ``β >= 0`` (``controller.value``).
        kind: the KL estimator, see ``kl_penalty``.

    Returns:
        ``(rewards, kl)``, both (B, T), detached, 0 on padding.
    """
    _check_same_shape({"logprobs": logprobs, "ref_logprobs": ref_logprobs})
    mask = _as_mask(mask, logprobs)
    _check_right_padded(mask)
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor of shape (B,), got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must have a floating dtype, got {scores.dtype}")
    if tuple(scores.shape) != (logprobs.shape[0],):
        raise ValueError(
            f"scores must have shape ({logprobs.shape[0]},) (one score per answer), got "
            f"{tuple(scores.shape)}"
        )
    beta = _check_range(beta, "beta", 0.0)
    counts = mask.sum(dim=1)  # (B,) real tokens per row
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} of mask have no real token: there is no token to score")
    with torch.no_grad():
        zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
        kl = torch.where(mask, kl_penalty(logprobs.detach(), ref_logprobs.detach(), kind), zero)
        rewards = torch.where(mask, -beta * kl, zero)  # (B, T)
        rows = torch.arange(logprobs.shape[0], device=logprobs.device)
        rewards[rows, counts - 1] += scores.detach().to(rewards.dtype)  # last real token
    return rewards, kl


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), no whitening.

    ``δ_t = r_t + γ V_{t+1} − V_t``, ``A_t = δ_t + γλ A_{t+1}``, ``returns = A + V``; the value
    after the last step is 0 (the answer ends there).

    Args:
        rewards: (B, T) per-token rewards (``reward_with_kl``).
        values: (B, T) value-head estimates ``V_t`` at sampling time.
        gamma: discount in [0, 1] (TRL: 1).
        lam: GAE λ in [0, 1] (TRL: 0.95); 0 = one-step TD, 1 = Monte Carlo.
        mask: optional (B, T) bool, True on real tokens, padding only at the end of a row.
            The last real token is terminal (the value after it is 0), and advantages and
            returns are 0 on padding, whatever rewards and values hold there.

    Returns:
        ``(advantages, returns)``, both (B, T), without gradient.
    """
    _check_same_shape({"rewards": rewards, "values": values})
    gamma = _check_range(gamma, "gamma", 0.0, 1.0)
    lam = _check_range(lam, "lam", 0.0, 1.0)
    rewards, values = rewards.detach(), values.detach()
    if mask is not None:
        mask = _as_mask(mask, rewards)
        _check_right_padded(mask)
        zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
        rewards = torch.where(mask, rewards, zero)
        values = torch.where(mask, values, zero)  # V = 0 after the last real token
    n_steps = rewards.shape[1]
    advantages = torch.empty_like(rewards)  # (B, T)
    next_advantage = torch.zeros_like(rewards[:, 0])  # (B,) A_{t+1}
    next_value = torch.zeros_like(values[:, 0])  # (B,) V_{t+1}
    for t in reversed(range(n_steps)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # on padding r = V = V_{t+1} = A_{t+1} = 0, so δ_t and A_t are 0 there as well
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage
        next_advantage, next_value = advantage, values[:, t]
    returns = advantages + values  # 0 on padding: both terms are
    return advantages, returns


# ---------------------------------------------------------------------------------------
# clipped losses
# ---------------------------------------------------------------------------------------


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate ``mean max(−Aρ, −A·clip(ρ, 1−ε, 1+ε))`` over real tokens.

    Args:
        logprobs: (B, T) log-probs of the sampled tokens under the current policy (grad).
        old_logprobs: (B, T) the same at sampling time (treated as constants).
        advantages: (B, T), usually whitened (treated as constants).
        mask: (B, T) bool, True on real tokens.
        clip_range: ``ε > 0`` (TRL: 0.2).

    Returns:
        ``(loss, stats)``: the 0-d loss and floats ``clip_fraction`` (share of real tokens
        where the clipped branch is the larger one, i.e. where the token gets no gradient)
        and ``approx_kl`` (``mean ½ (log π − log π_old)²``).
    """
    _check_same_shape(
        {"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages}
    )
    mask = _as_mask(mask, logprobs)
    eps = _check_positive(clip_range, "clip_range")
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    advantages = advantages.detach()
    # padding is set to log-ratio 0 before exp, so garbage there cannot overflow into NaN
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), zero)  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps, 1.0 + eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        approx_kl = masked_mean(0.5 * log_ratio.detach() ** 2, mask)
    return loss, {"clip_fraction": float(clip_fraction), "approx_kl": float(approx_kl)}


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float = 0.2,
) -> tuple[torch.Tensor, dict]:
    """Clipped value loss ``½ mean max((V−R)², (clip(V, V_old ± ε_v) − R)²)`` over real tokens.

    Args:
        values: (B, T) current value-head outputs (grad).
        old_values: (B, T) value estimates at sampling time (constants).
        returns: (B, T) GAE returns, the regression targets (constants).
        mask: (B, T) bool, True on real tokens.
        clip_range_value: ``ε_v > 0`` (TRL: 0.2), in the units of the values.

    Returns:
        ``(loss, stats)`` with the float ``value_clip_fraction``: the share of real tokens
        where the clipped branch is the larger one (and the token gets no gradient).
    """
    _check_same_shape({"values": values, "old_values": old_values, "returns": returns})
    mask = _as_mask(mask, values)
    eps = _check_positive(clip_range_value, "clip_range_value")
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(mask, values, zero)
    old_values = torch.where(mask, old_values.detach(), zero)
    returns = torch.where(mask, returns.detach(), zero)
    clipped_values = old_values + (values - old_values).clamp(-eps, eps)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        fraction = masked_mean((clipped_error > unclipped_error).to(values.dtype), mask)
    return loss, {"value_clip_fraction": float(fraction)}


# ---------------------------------------------------------------------------------------
# KL coefficient control
# ---------------------------------------------------------------------------------------


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019): ``β ← β (1 + e·n/horizon)``.

    ``e = clip(KL/target − 1, −0.2, 0.2)``: β rises while the measured KL exceeds
    ``target`` and falls below it, by at most 20 % per ``horizon`` samples. TRL's defaults:
    ``init_beta = 0.2``, ``target = 6``, ``horizon = 10000``.
    """

    def __init__(self, init_beta: float, target: float, horizon: float):
        self.value = _check_range(init_beta, "init_beta", 0.0)
        self.target = _check_positive(target, "target")
        self.horizon = _check_positive(horizon, "horizon")

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move β after a batch of ``n_steps`` samples whose mean KL was ``current_kl``.

        Returns the new β. ``n_steps`` must stay below ``5·horizon``: beyond that one update
        at the −20 % clip would make β negative.
        """
        kl = scalar_value(current_kl, "current_kl")
        if not math.isfinite(kl):
            raise ValueError(
                f"current_kl must be finite, got {kl}; a NaN KL would make β NaN for good"
            )
        if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral) or n_steps < 0:
            raise ValueError(f"n_steps must be an int >= 0 (samples in the batch), got {n_steps!r}")
        if n_steps >= 5 * self.horizon:
            raise ValueError(
                f"n_steps={n_steps} >= 5·horizon={5 * self.horizon:g}: one update could make β "
                "negative; use a larger horizon"
            )
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * int(n_steps) / self.horizon
        return self.value

    def __repr__(self) -> str:
        return (
            f"AdaptiveKLController(value={self.value:.4g}, target={self.target:g}, "
            f"horizon={self.horizon:g})"
        )


class FixedKLController:
    """A constant KL coefficient with ``AdaptiveKLController``'s interface."""

    def __init__(self, beta: float):
        self.value = _check_range(beta, "beta", 0.0)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op: β stays fixed. Returns it."""
        return self.value

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value:.4g})"


# ---------------------------------------------------------------------------------------
# reward scale
# ---------------------------------------------------------------------------------------


class RunningMoments:
    """Mean and standard deviation of every score seen so far, to put the reward model's
    scores on a unit scale before PPO adds the KL penalty (TRL's ``use_score_norm``).

    Why: the value head shares the policy's trunk, so returns of tens of nats (a likelihood
    reward model's log-probs) give value-loss gradients that swamp the policy's, and the
    clipped gradient then mostly trains the trunk to predict values. Batches are merged
    with Chan et al.'s parallel formula; the variance is the unbiased one.
    """

    def __init__(self):
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def update(self, scores: torch.Tensor) -> None:
        """Merge a batch of scores (any shape, every entry finite) into the moments."""
        x = scores.detach().double().flatten()
        if x.numel() == 0:
            raise ValueError("RunningMoments.update got an empty batch of scores")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"non-finite score in {x.tolist()[:8]}...: check the reward model")
        n, mean = x.numel(), float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    def normalise(self, scores: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """``(scores − mean) / (std + eps)`` with the moments so far, in the scores' dtype."""
        return ((scores.double() - self.mean) / (self.std + eps)).to(scores.dtype)
