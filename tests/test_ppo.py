"""PPO pieces for RLHF: GAE, whitening, KL estimators, clipped losses, KL control, rewards."""

from __future__ import annotations

import math

import pytest
import torch

from companion.losses.ppo import (
    KL_KINDS,
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    gae,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    reward_with_kl,
    whiten,
)

F64 = torch.float64


def _randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=F64)


def _right_padded(lengths, t):
    return torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]  # (B, T) bool


# ------------------------------------------------------------------ GAE


def _reference_gae(rewards, values, gamma, lam):
    """GAE row by row with Python loops over floats; V after the last step is 0."""
    advantages, returns = [], []
    for r, v in zip(rewards, values):
        n = len(r)
        a = [0.0] * n
        following = 0.0
        for t in reversed(range(n)):
            next_value = v[t + 1] if t + 1 < n else 0.0
            delta = r[t] + gamma * next_value - v[t]
            following = delta + gamma * lam * following
            a[t] = following
        advantages.append(a)
        returns.append([x + y for x, y in zip(a, v)])
    return advantages, returns


def _assert_close(tensor, nested, rel=1e-12, abs=1e-12):
    got = tensor.tolist()
    assert len(got) == len(nested)
    for row, expected in zip(got, nested):
        assert row == pytest.approx(expected, rel=rel, abs=abs)


@pytest.mark.parametrize(
    "gamma, lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0), (0.5, 1.0)]
)
def test_gae_matches_hand_recursion(gamma, lam):
    rewards, values = _randn(3, 6, seed=1), _randn(3, 6, seed=2)
    advantages, returns = gae(rewards, values, gamma=gamma, lam=lam)
    ref_a, ref_r = _reference_gae(rewards.tolist(), values.tolist(), gamma, lam)
    _assert_close(advantages, ref_a)
    _assert_close(returns, ref_r)


def test_gae_monte_carlo_and_td_limits():
    rewards, values = _randn(2, 5, seed=3), _randn(2, 5, seed=4)
    # γ = λ = 1: A_t = Σ_{k>=t} r_k − V_t
    advantages, returns = gae(rewards, values, gamma=1.0, lam=1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1)
    assert torch.allclose(advantages, to_go - values, rtol=0, atol=1e-12)
    assert torch.allclose(returns, to_go, rtol=0, atol=1e-12)
    # λ = 0: A_t = r_t + γ V_{t+1} − V_t (one-step TD error)
    advantages, _ = gae(rewards, values, gamma=0.9, lam=0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros(2, 1, dtype=F64)], dim=1)
    assert torch.allclose(advantages, rewards + 0.9 * next_values - values, rtol=0, atol=1e-12)


def test_gae_hand_computed_numbers():
    # T = 2, γ = 0.5, λ = 0.5: δ_1 = 2 − 1 = 1; δ_0 = 1 + 0.5·1 − 0.5 = 1; A_0 = 1 + 0.25·1
    advantages, returns = gae(
        torch.tensor([[1.0, 2.0]], dtype=F64), torch.tensor([[0.5, 1.0]], dtype=F64), 0.5, 0.5
    )
    assert advantages.tolist() == [[1.25, 1.0]]
    assert returns.tolist() == [[1.75, 2.0]]


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.7), (1.0, 1.0), (0.8, 0.0)])
def test_gae_with_mask_treats_the_last_real_token_as_terminal(gamma, lam):
    lengths = [6, 3, 1, 4]
    mask = _right_padded(lengths, 6)
    rewards, values = _randn(4, 6, seed=5), _randn(4, 6, seed=6)
    rewards[~mask] = math.nan  # garbage on the padding must not leak in
    values[~mask] = math.inf
    advantages, returns = gae(rewards, values, gamma, lam, mask=mask)
    assert bool((advantages[~mask] == 0).all()) and bool((returns[~mask] == 0).all())
    for row, n in enumerate(lengths):
        trimmed_a, trimmed_r = gae(rewards[row : row + 1, :n], values[row : row + 1, :n],
                                   gamma, lam)
        assert torch.allclose(advantages[row, :n], trimmed_a[0], rtol=1e-13, atol=1e-13)
        assert torch.allclose(returns[row, :n], trimmed_r[0], rtol=1e-13, atol=1e-13)
        # at the last real token the next value is 0: A = r − V (+0)
        last = n - 1
        assert advantages[row, last].item() == pytest.approx(
            (rewards[row, last] - values[row, last]).item(), rel=1e-14
        )


def test_gae_accepts_an_integer_attention_mask_and_has_no_grad():
    rewards = _randn(2, 4, seed=7).requires_grad_()
    values = _randn(2, 4, seed=8).requires_grad_()
    bool_mask = _right_padded([4, 2], 4)
    a_bool, r_bool = gae(rewards, values, mask=bool_mask)
    a_int, r_int = gae(rewards, values, mask=bool_mask.long())
    assert torch.equal(a_bool, a_int) and torch.equal(r_bool, r_int)
    assert not a_bool.requires_grad and not r_bool.requires_grad


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gamma": 1.1}, r"gamma must be finite and in \[0, 1\], got 1.1"),
        ({"gamma": math.nan}, r"gamma must be finite"),
        ({"lam": -0.1}, r"lam must be finite and in \[0, 1\]"),
        ({"mask": torch.tensor([[1, 1, 0], [1, 0, 1]])}, r"mask row 1 has a real token after pad"),
        ({"mask": torch.tensor([[1, 1, 0], [1, 2, 0]])}, r"mask must be bool .* hold only 0 and 1"),
        ({"mask": torch.ones(2, 2, dtype=torch.bool)}, r"mask must have the shape \(2, 3\)"),
    ],
)
def test_gae_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gae(torch.zeros(2, 3), torch.zeros(2, 3), **kwargs)


def test_gae_shape_errors():
    with pytest.raises(ValueError, match=r"rewards has shape \(2, 3\) but values has shape \(2, 4"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"rewards must be 2-D \(B, T\)"):
        gae(torch.zeros(3), torch.zeros(3))
    with pytest.raises(TypeError, match=r"values must have a floating dtype"):
        gae(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))


# ------------------------------------------------------------------ masked statistics


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, math.nan], [4.0, math.inf, -math.inf]], dtype=F64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_mean(x, mask).item() == pytest.approx(7 / 3, rel=1e-15)
    assert masked_mean(x, mask.double()).item() == pytest.approx(7 / 3, rel=1e-15)
    # NaN under the mask gets no NaN gradient either
    x.requires_grad_()
    (grad,) = torch.autograd.grad(masked_mean(x, mask), x)
    assert grad.tolist() == [[1 / 3, 1 / 3, 0.0], [1 / 3, 0.0, 0.0]]
    with pytest.raises(ValueError, match=r"mask is all False"):
        masked_mean(x, torch.zeros(2, 3, dtype=torch.bool))


def test_whiten_masked():
    mask = _right_padded([5, 2, 4], 5)
    x = _randn(3, 5, seed=9, scale=4.0) + 3.0
    x[~mask] = 1e9  # padding must not count
    out = whiten(x, mask)
    real = out[mask]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert real.std(unbiased=True).item() == pytest.approx(1.0, rel=1e-6)
    assert bool((out[~mask] == 0).all())
    # hand reference with Python floats
    values = x[mask].tolist()
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    expected = [(v - mean) / math.sqrt(var + 1e-8) for v in values]
    assert real.tolist() == pytest.approx(expected, rel=1e-12)
    # shift_mean=False rescales only
    kept = whiten(x, mask, shift_mean=False)[mask]
    assert kept.tolist() == pytest.approx([e + mean for e in expected], rel=1e-12)


def test_whiten_without_mask_and_errors():
    x = _randn(4, 3, seed=10, scale=2.0)
    out = whiten(x)
    assert out.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert out.std().item() == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match=r"at least 2 real values"):
        whiten(x, torch.nn.functional.one_hot(torch.tensor(4), 12).reshape(4, 3).bool())
    with pytest.raises(ValueError, match=r"eps must be finite and >= 0"):
        whiten(x, eps=-1.0)


# ------------------------------------------------------------------ KL estimators


def test_kl_estimators_match_formulas():
    logprobs, ref = -_randn(3, 5, seed=11).abs(), -_randn(3, 5, seed=12).abs()
    for kind in KL_KINDS:
        got = kl_penalty(logprobs, ref, kind).tolist()
        for row_got, row_lp, row_ref in zip(got, logprobs.tolist(), ref.tolist()):
            for g, a, b in zip(row_got, row_lp, row_ref):
                ell = b - a
                expected = {
                    "k1": a - b,
                    "k3": math.expm1(ell) - ell,
                    "abs": abs(a - b),
                    "mse": 0.5 * (a - b) ** 2,
                }[kind]
                assert g == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_k3_is_never_negative_and_k1_can_be():
    logprobs, ref = _randn(64, 32, seed=13, scale=3.0), _randn(64, 32, seed=14, scale=3.0)
    k3 = kl_penalty(logprobs, ref, "k3")
    assert bool((k3 >= 0).all())
    assert bool((kl_penalty(logprobs, ref, "k1") < 0).any())
    tiny = logprobs + 1e-9 * _randn(64, 32, seed=15)  # where exp(ℓ) − 1 − ℓ would cancel
    assert bool((kl_penalty(tiny, logprobs, "k3") >= 0).all())
    assert bool((kl_penalty(logprobs, logprobs, "k3") == 0).all())
    assert bool((kl_penalty(logprobs, logprobs, "k1") == 0).all())


@pytest.mark.parametrize("delta", [1e-3, -1e-3, 1e-5, 1e-7])
def test_k3_is_half_the_squared_difference_for_small_differences(delta):
    logprobs = torch.tensor([-2.0], dtype=F64)
    k3 = kl_penalty(logprobs + delta, logprobs, "k3").item()
    assert k3 == pytest.approx(0.5 * delta**2, rel=2 * abs(delta))  # next term is −ℓ³/6


def test_kl_errors():
    with pytest.raises(ValueError, match=r"unknown KL kind 'full'; valid ones are k1, k3, abs, ms"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "full")
    with pytest.raises(ValueError, match=r"shape \(2,\) but ref_logprobs has shape \(3,\)"):
        kl_penalty(torch.zeros(2), torch.zeros(3))


# ------------------------------------------------------------------ policy loss


def _policy_grad(logprobs, old, advantages, mask, clip_range=0.2):
    logprobs = logprobs.clone().requires_grad_()
    loss, stats = ppo_policy_loss(logprobs, old, advantages, mask, clip_range)
    (grad,) = torch.autograd.grad(loss, logprobs)
    return loss, stats, grad


def test_policy_loss_clipping_stops_the_gradient():
    eps = 0.2
    old = torch.zeros(1, 6, dtype=F64)
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.9, 1.5, 0.5]], dtype=F64)
    advantages = torch.tensor([[2.0, -3.0, 1.5, -0.5, -1.0, 4.0]], dtype=F64)
    mask = torch.ones(1, 6, dtype=torch.bool)
    loss, stats, grad = _policy_grad(ratios.log(), old, advantages, mask, eps)
    n = 6
    # token 0: A > 0, ρ > 1+ε -> clipped, no gradient; token 1: A < 0, ρ < 1−ε -> same
    assert grad[0, 0].item() == 0.0 and grad[0, 1].item() == 0.0
    # tokens 2, 3 inside the region; tokens 4, 5 outside but on the side that makes the
    # loss worse, where the unclipped branch is the max and keeps its gradient
    for t in (2, 3, 4, 5):
        expected = -advantages[0, t].item() * ratios[0, t].item() / n
        assert grad[0, t].item() == pytest.approx(expected, rel=1e-12)
    assert stats["clip_fraction"] == pytest.approx(2 / 6)
    clipped = [1.2, 0.8, 1.1, 0.9, 1.2, 0.8]
    per_token = [
        max(-a * r, -a * c) for a, r, c in zip(advantages[0].tolist(), ratios[0].tolist(), clipped)
    ]
    assert loss.item() == pytest.approx(sum(per_token) / n, rel=1e-12)
    expected_kl = sum(0.5 * math.log(r) ** 2 for r in ratios[0].tolist()) / n
    assert stats["approx_kl"] == pytest.approx(expected_kl, rel=1e-12)


def test_policy_loss_with_padding():
    mask = _right_padded([4, 2], 5)
    logprobs, old = -_randn(2, 5, seed=16, scale=0.1).abs(), -_randn(2, 5, seed=17, scale=0.1).abs()
    advantages = _randn(2, 5, seed=18)
    logprobs[~mask] = 1e4  # exp would overflow if padding were read
    advantages[~mask] = math.nan
    loss, stats, grad = _policy_grad(logprobs, old, advantages, mask, 0.2)
    assert math.isfinite(loss.item()) and bool(torch.isfinite(grad).all())
    assert bool((grad[~mask] == 0).all())
    expected = 0.0
    for lp, o, a in zip(logprobs[mask].tolist(), old[mask].tolist(), advantages[mask].tolist()):
        rho = math.exp(lp - o)
        expected += max(-a * rho, -a * min(max(rho, 0.8), 1.2))
    assert loss.item() == pytest.approx(expected / 6, rel=1e-12)


def test_policy_loss_at_the_first_epoch_is_minus_the_mean_advantage():
    logprobs = _randn(3, 4, seed=19)
    advantages = _randn(3, 4, seed=20)
    mask = torch.ones(3, 4, dtype=torch.bool)
    loss, stats, grad = _policy_grad(logprobs, logprobs, advantages, mask)
    assert loss.item() == pytest.approx(-advantages.mean().item(), rel=1e-12)
    assert torch.allclose(grad, -advantages / 12, rtol=1e-12, atol=0)
    assert stats == {"clip_fraction": 0.0, "approx_kl": 0.0}


@pytest.mark.parametrize("clip_range", [0.0, -0.1, math.inf])
def test_policy_loss_bad_clip_range(clip_range):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"clip_range must be finite and > 0"):
        ppo_policy_loss(x, x, x, torch.ones(2, 3, dtype=torch.bool), clip_range)


def test_policy_loss_shape_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\(2, 3\) but advantages has shape \(2, 4\)"):
        ppo_policy_loss(x, x, torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask is all False"):
        ppo_policy_loss(x, x, x, torch.zeros(2, 3, dtype=torch.bool))


# ------------------------------------------------------------------ value loss


def test_value_loss_clipping():
    eps = 0.2
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=F64)
    values = torch.tensor([[1.0, 0.1, -1.0, 1.0]], dtype=F64, requires_grad=True)
    returns = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=F64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, stats = ppo_value_loss(values, old, returns, mask, eps)
    (grad,) = torch.autograd.grad(loss, values)
    # token 0: V = 1 moved past V_old + ε away from R = 0: (1 − 0)² = 1 > (0.2 − 0)², the
    #   unclipped branch wins, gradient (V − R)/N; token 1: inside, both branches are equal;
    # token 2: (−1 − 2)² = 9 > (−0.2 − 2)² = 4.84, unclipped wins again;
    # token 3: V = 1 moved past V_old + ε towards R = 3, but (0.2 − 3)² = 7.84 > (1 − 3)² = 4:
    #   the clipped branch wins and the gradient is 0
    n = 4
    assert grad[0, 3].item() == 0.0
    for t in (0, 1, 2):
        expected = (values[0, t] - returns[0, t]).item() / n
        assert grad[0, t].item() == pytest.approx(expected, rel=1e-12)
    assert stats["value_clip_fraction"] == pytest.approx(1 / 4)
    expected_loss = 0.5 * (1.0 + 0.81 + 9.0 + 7.84) / n
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)


def test_value_loss_ignores_padding():
    mask = _right_padded([3, 1], 4)
    values = _randn(2, 4, seed=21).requires_grad_()
    old, returns = _randn(2, 4, seed=22), _randn(2, 4, seed=23)
    with torch.no_grad():
        values[~mask] = math.nan
    returns[~mask] = math.inf
    loss, stats = ppo_value_loss(values, old, returns, mask, 0.3)
    (grad,) = torch.autograd.grad(loss, values)
    assert math.isfinite(loss.item()) and bool(torch.isfinite(grad).all())
    assert bool((grad[~mask] == 0).all())
    expected = 0.0
    for v, o, r in zip(values[mask].tolist(), old[mask].tolist(), returns[mask].tolist()):
        clipped = o + min(max(v - o, -0.3), 0.3)
        expected += max((v - r) ** 2, (clipped - r) ** 2)
    assert loss.item() == pytest.approx(0.5 * expected / 4, rel=1e-12)
    with pytest.raises(ValueError, match=r"clip_range_value must be finite and > 0"):
        ppo_value_loss(values, old, returns, mask, 0.0)


# ------------------------------------------------------------------ KL controllers


def test_adaptive_kl_controller_moves_towards_the_target():
    up = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert up.update(6.6, 100) == pytest.approx(0.1 * (1 + 0.1 * 100 / 10_000), rel=1e-14)
    assert up.value > 0.1
    down = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert down.update(5.4, 100) < 0.1
    assert down.value == pytest.approx(0.1 * (1 - 0.1 * 100 / 10_000), rel=1e-14)
    same = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert same.update(6.0, 100) == 0.1


def test_adaptive_kl_controller_is_clipped():
    high = AdaptiveKLController(1.0, target=1.0, horizon=100)
    high.update(1000.0, 10)  # e clipped to +0.2
    assert high.value == pytest.approx(1.02, rel=1e-14)
    low = AdaptiveKLController(1.0, target=1.0, horizon=100)
    low.update(-5.0, 10)  # a negative k1 mean: e clipped to −0.2
    assert low.value == pytest.approx(0.98, rel=1e-14)
    for _ in range(50):
        low.update(0.0, 10)
    assert low.value == pytest.approx(0.98**51, rel=1e-12)


def test_fixed_kl_controller_never_moves():
    fixed = FixedKLController(0.05)
    for kl in (0.0, 100.0, -3.0):
        assert fixed.update(kl, 256) == 0.05
    assert fixed.value == 0.05


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: AdaptiveKLController(-0.1, 6.0, 100), r"init_beta must be finite and >= 0"),
        (lambda: AdaptiveKLController(0.1, 0.0, 100), r"target must be finite and > 0"),
        (lambda: AdaptiveKLController(0.1, 6.0, -1), r"horizon must be finite and > 0"),
        (lambda: AdaptiveKLController(0.1, 6.0, 100).update(math.nan, 1), r"current_kl must be"),
        (lambda: AdaptiveKLController(0.1, 6.0, 100).update(1.0, -1), r"n_steps must be an int"),
        (lambda: AdaptiveKLController(0.1, 6.0, 100).update(1.0, 500), r"n_steps=500 >= 5·hor"),
        (lambda: FixedKLController(-1.0), r"beta must be finite and >= 0"),
    ],
)
def test_kl_controller_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------ rewards


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_reward_with_kl(kind):
    lengths = [5, 2, 1]
    mask = _right_padded(lengths, 5)
    logprobs, ref = -_randn(3, 5, seed=24).abs(), -_randn(3, 5, seed=25).abs()
    logprobs[~mask] = math.nan  # padding is never read
    scores = torch.tensor([1.5, -2.0, 0.25], dtype=F64)
    rewards, kl = reward_with_kl(scores, logprobs, ref, mask, beta=0.1, kind=kind)
    assert rewards.shape == kl.shape == (3, 5)
    assert bool((rewards[~mask] == 0).all()) and bool((kl[~mask] == 0).all())
    for row, n in enumerate(lengths):
        for t in range(n):
            a, b = logprobs[row, t].item(), ref[row, t].item()
            expected_kl = a - b if kind == "k1" else math.expm1(b - a) - (b - a)
            assert kl[row, t].item() == pytest.approx(expected_kl, rel=1e-12)
            expected = -0.1 * expected_kl + (scores[row].item() if t == n - 1 else 0.0)
            assert rewards[row, t].item() == pytest.approx(expected, rel=1e-12)


def test_reward_with_kl_is_detached_and_beta_zero_is_the_score_alone():
    mask = _right_padded([3, 4], 4)
    logprobs = _randn(2, 4, seed=26).requires_grad_()
    scores = torch.tensor([2.0, 3.0], dtype=F64, requires_grad=True)
    rewards, kl = reward_with_kl(scores, logprobs, _randn(2, 4, seed=27), mask, beta=0.0)
    assert not rewards.requires_grad and not kl.requires_grad
    assert rewards.tolist() == [[0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]]


@pytest.mark.parametrize(
    "scores, mask, kwargs, error, match",
    [
        (
            torch.zeros(2), torch.tensor([[1, 1, 0], [0, 0, 0]]), {}, ValueError,
            r"rows \[1\] of mask have no real token",
        ),
        (
            torch.zeros(2), torch.tensor([[1, 0, 1], [1, 1, 1]]), {}, ValueError,
            r"mask row 0 has a real token after padding",
        ),
        (torch.zeros(3), torch.ones(2, 3), {}, ValueError, r"scores must have shape \(2,\)"),
        (torch.zeros(2, 1), torch.ones(2, 3), {}, ValueError, r"scores must have shape \(2,\)"),
        (
            torch.zeros(2, dtype=torch.long), torch.ones(2, 3), {}, TypeError,
            r"scores must have a floating dtype",
        ),
        (torch.zeros(2), torch.ones(2, 3), {"beta": -0.1}, ValueError, r"beta must be finite and"),
        (torch.zeros(2), torch.ones(2, 3), {"kind": "k2"}, ValueError, r"unknown KL kind 'k2'"),
    ],
)
def test_reward_with_kl_errors(scores, mask, kwargs, error, match):
    kwargs = {"beta": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        reward_with_kl(scores, torch.zeros(2, 3), torch.zeros(2, 3), mask, **kwargs)


# ------------------------------------------------------------------ one step end to end


def test_one_ppo_step_end_to_end():
    """Rollout -> rewards -> GAE -> whitened advantages -> losses; gradients are finite."""
    lengths = [4, 6, 3]
    mask = _right_padded(lengths, 6)
    old_logprobs, ref = -_randn(3, 6, seed=28).abs(), -_randn(3, 6, seed=29).abs()
    old_values = _randn(3, 6, seed=30)
    scores = torch.tensor([1.0, -1.0, 0.5], dtype=F64)
    rewards, _ = reward_with_kl(scores, old_logprobs, ref, mask, 0.2)
    advantages, returns = gae(rewards, old_values, mask=mask)
    advantages = whiten(advantages, mask)
    logprobs = (old_logprobs + 0.3 * _randn(3, 6, seed=31)).requires_grad_()
    values = (old_values + 0.3 * _randn(3, 6, seed=32)).requires_grad_()
    policy_loss, policy_stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask)
    value_loss, value_stats = ppo_value_loss(values, old_values, returns, mask)
    (policy_loss + 0.1 * value_loss).backward()
    assert bool(torch.isfinite(logprobs.grad).all()) and bool(torch.isfinite(values.grad).all())
    assert bool((logprobs.grad[~mask] == 0).all()) and bool((values.grad[~mask] == 0).all())
    assert 0 < policy_stats["clip_fraction"] < 1 and policy_stats["approx_kl"] > 0
    assert 0 <= value_stats["value_clip_fraction"] <= 1


def test_running_moments_equal_the_moments_of_everything_seen_in_float64():
    torch.manual_seed(0)
    batches = [torch.randn(5) * 30 - 40, torch.randn(2, 3) + 7, torch.tensor([1.5])]
    moments = RunningMoments()
    assert moments.std == 1.0  # nothing seen: normalise only shifts by 0
    for i, batch in enumerate(batches):
        moments.update(batch)
        seen = torch.cat([b.flatten() for b in batches[: i + 1]]).to(F64)
        assert moments.count == seen.numel()
        assert moments.mean == pytest.approx(float(seen.mean()), rel=1e-12)
        assert moments.std == pytest.approx(float(seen.std()), rel=1e-12)  # unbiased, as TRL
    x = torch.tensor([0.0, 10.0], dtype=torch.float32)
    expected = (x.to(F64) - moments.mean) / moments.std
    out = moments.normalise(x)
    assert out.dtype == torch.float32 and torch.allclose(out.to(F64), expected, atol=1e-6)
    with pytest.raises(ValueError, match="empty batch"):
        moments.update(torch.tensor([]))
    with pytest.raises(ValueError, match="non-finite score"):
        moments.update(torch.tensor([1.0, float("nan")]))
    assert moments.count == 12  # a refused batch changes nothing
