"""Bradley-Terry, DPO (sigmoid/cDPO, robust, hinge, IPO), sequence log-probs vs their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from companion.losses.preference import (
    DPO_LOSS_TYPES,
    bradley_terry_loss,
    dpo_loss,
    dpo_rewards,
    preference_probability,
    sequence_logprobs,
    token_logprobs,
)

F64 = torch.float64
LN2 = math.log(2.0)


def _logps(n=8, seed=0, dtype=F64):
    """Four (n,) tensors of plausible sequence log-probs: policy c/r, reference c/r."""
    g = torch.Generator().manual_seed(seed)
    base = -20 * torch.rand(2, n, generator=g, dtype=dtype) - 1  # shared "model" log-probs
    drift = 6 * torch.randn(2, n, generator=g, dtype=dtype)  # policy moved away from the ref
    return base[0] + drift[0], base[1] + drift[1], base[0], base[1]


# ------------------------------------------------------------------ independent references


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _reference_dpo(pc, pr, rc, rr, beta, loss_type, eps):
    """The DPO variants pair by pair in Python floats."""
    total = 0.0
    rows = list(zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()))
    for a, b, c, d in rows:
        h = (a - c) - (b - d)
        if loss_type == "sigmoid":
            total += -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
        elif loss_type == "robust":
            total += (-(1 - eps) * _log_sigmoid(beta * h) + eps * _log_sigmoid(-beta * h)) / (
                1 - 2 * eps
            )
        elif loss_type == "hinge":
            total += max(0.0, 1 - beta * h)
        elif loss_type == "ipo":
            total += (h - 1 / (2 * beta)) ** 2
    return total / len(rows)


def _reference_bt(chosen, rejected, margins, center):
    pairs = list(zip(chosen, rejected, margins))
    nll = sum(-_log_sigmoid(c - r - m) for c, r, m in pairs) / len(pairs)
    return nll + center * sum((c + r) ** 2 for c, r, _ in pairs) / len(pairs)


def _reference_sequence_logprobs(logits, labels, ignore_index=-100, average=False):
    """Hand loop: logits[b, t] scores labels[b, t + 1]; log-softmax by explicit sums."""
    out = []
    for b in range(logits.shape[0]):
        total, count = 0.0, 0
        for t in range(logits.shape[1] - 1):
            label = int(labels[b, t + 1])
            if label == ignore_index:
                continue
            row = logits[b, t].tolist()
            m = max(row)
            lse = m + math.log(sum(math.exp(v - m) for v in row))
            total += row[label] - lse
            count += 1
        out.append(total / count if average else total)
    return out


# ------------------------------------------------------------------ DPO


DPO_SETTINGS = [
    ("sigmoid", 0.1, 0.0),
    ("sigmoid", 0.5, 0.0),
    ("sigmoid", 0.1, 0.1),
    ("sigmoid", 0.3, 0.3),
    ("robust", 0.1, 0.0),
    ("robust", 0.1, 0.2),
    ("robust", 0.5, 0.4),
    ("hinge", 0.1, 0.0),
    ("hinge", 0.7, 0.0),
    ("ipo", 0.1, 0.0),
    ("ipo", 1.0, 0.0),
]


@pytest.mark.parametrize("loss_type, beta, eps", DPO_SETTINGS)
def test_dpo_matches_closed_form(loss_type, beta, eps):
    logps = _logps(n=9, seed=1)
    got = dpo_loss(*logps, beta=beta, loss_type=loss_type, label_smoothing=eps)
    expected = _reference_dpo(*logps, beta, loss_type, eps)
    assert got.ndim == 0 and got.dtype == F64
    assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_dpo_hinge_reference_covers_both_sides_of_the_kink():
    pc, pr, rc, rr = _logps(n=9, seed=1)
    beta_h = 0.7 * ((pc - rc) - (pr - rr))  # the ("hinge", 0.7) setting above
    assert bool((beta_h < 1).any()) and bool((beta_h > 1).any())  # relu active and inactive


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.45])
@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
def test_dpo_is_ln2_when_policy_equals_reference(loss_type, eps):
    chosen = -torch.rand(6, dtype=F64) * 30
    rejected = -torch.rand(6, dtype=F64) * 30
    loss = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), 0.1, loss_type, eps)
    assert loss.item() == pytest.approx(LN2, rel=1e-14)


def test_robust_with_no_smoothing_equals_sigmoid():
    logps = _logps(n=7, seed=2)
    for beta in (0.05, 0.1, 2.0):
        robust = dpo_loss(*logps, beta=beta, loss_type="robust", label_smoothing=0.0)
        sigmoid = dpo_loss(*logps, beta=beta, loss_type="sigmoid")
        assert robust.item() == pytest.approx(sigmoid.item(), rel=1e-14)


def test_label_smoothing_changes_the_sigmoid_loss():
    logps = _logps(n=7, seed=3)
    plain = dpo_loss(*logps, beta=0.5)
    smoothed = dpo_loss(*logps, beta=0.5, label_smoothing=0.2)
    assert abs(plain.item() - smoothed.item()) > 1e-3


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_gradient_direction(loss_type):
    # from π = π_ref: more chosen likelihood lowers the loss, more rejected raises it
    chosen = torch.full((4,), -10.0, dtype=F64, requires_grad=True)
    rejected = torch.full((4,), -12.0, dtype=F64, requires_grad=True)
    loss = dpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), 0.1, loss_type)
    grad_chosen, grad_rejected = torch.autograd.grad(loss, (chosen, rejected))
    assert bool((grad_chosen < 0).all()) and bool((grad_rejected > 0).all())
    with torch.no_grad():
        higher = dpo_loss(chosen + 0.5, rejected, chosen, rejected, 0.1, loss_type)
    assert higher.item() < loss.item()


def test_dpo_sigmoid_gradient_value():
    # ∂L/∂π_c = −(β/B) σ(−βh) per pair (ε = 0)
    pc, pr, rc, rr = _logps(n=5, seed=4)
    pc.requires_grad_()
    (grad,) = torch.autograd.grad(dpo_loss(pc, pr, rc, rr, beta=0.3), pc)
    for g, a, b, c, d in zip(grad.tolist(), pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        h = (a - c) - (b - d)
        assert g == pytest.approx(-0.3 / 5 / (1 + math.exp(0.3 * h)), rel=1e-12)


@pytest.mark.parametrize("loss_type, beta, eps", DPO_SETTINGS)
def test_dpo_gradcheck(loss_type, beta, eps):
    logps = tuple(x.detach().requires_grad_() for x in _logps(n=5, seed=5))
    assert torch.autograd.gradcheck(
        lambda *x: dpo_loss(*x, beta=beta, loss_type=loss_type, label_smoothing=eps), logps
    )


def test_dpo_rewards():
    pc = torch.tensor([-1.0, -2.0, -3.0, -4.0], dtype=F64, requires_grad=True)
    pr = torch.tensor([-2.0, -1.0, -3.0, -6.0], dtype=F64)
    rc = torch.tensor([-1.5, -2.0, -2.0, -4.0], dtype=F64)
    rr = torch.tensor([-1.5, -2.0, -3.0, -5.0], dtype=F64)
    out = dpo_rewards(pc, pr, rc, rr, beta=0.5)
    # r_c = 0.5·(pc − rc) = [0.25, 0, −0.5, 0]; r_r = 0.5·(pr − rr) = [−0.25, 0.5, 0, −0.5]
    assert out["chosen_rewards"].tolist() == pytest.approx([0.25, 0.0, -0.5, 0.0])
    assert out["rejected_rewards"].tolist() == pytest.approx([-0.25, 0.5, 0.0, -0.5])
    assert not out["chosen_rewards"].requires_grad
    assert out["reward_accuracy"] == pytest.approx(0.5)  # pairs 0 and 3
    assert out["reward_margin"] == pytest.approx((0.5 - 0.5 - 0.5 + 0.5) / 4)
    assert isinstance(out["reward_accuracy"], float) and isinstance(out["reward_margin"], float)
    # ties count as wrong: at π = π_ref accuracy is 0, not 1
    assert dpo_rewards(rc, rr, rc, rr)["reward_accuracy"] == 0.0


def test_dpo_rewards_agree_with_the_sigmoid_loss():
    logps = _logps(n=6, seed=6)
    out = dpo_rewards(*logps, beta=0.2)
    margin = out["chosen_rewards"] - out["rejected_rewards"]  # = βh
    expected = -torch.nn.functional.logsigmoid(margin).mean()
    assert dpo_loss(*logps, beta=0.2).item() == pytest.approx(expected.item(), rel=1e-13)


# ------------------------------------------------------------------ DPO errors


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf")])
def test_dpo_bad_beta(beta):
    with pytest.raises(ValueError, match=r"beta must be finite and > 0"):
        dpo_loss(*_logps(n=3), beta=beta)
    with pytest.raises(ValueError, match=r"beta must be finite and > 0"):
        dpo_rewards(*_logps(n=3), beta=beta)


@pytest.mark.parametrize("eps", [-0.1, 0.5, 0.7, float("nan")])
def test_dpo_bad_label_smoothing(eps):
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        dpo_loss(*_logps(n=3), label_smoothing=eps)


def test_dpo_unknown_loss_type_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown loss_type 'kto'.*sigmoid, robust, hinge, ipo"):
        dpo_loss(*_logps(n=3), loss_type="kto")


@pytest.mark.parametrize("loss_type", ["hinge", "ipo"])
def test_dpo_label_smoothing_only_for_sigmoid_and_robust(loss_type):
    with pytest.raises(ValueError, match=rf"label_smoothing=0.1 has no effect with.*{loss_type}"):
        dpo_loss(*_logps(n=3), loss_type=loss_type, label_smoothing=0.1)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda x: x[:2], ValueError, r"\(3,\) but reference_chosen_logps has shape \(2,\)"),
        (lambda x: x[:, None], ValueError, r"has shape \(3,\) but reference_chosen_logps"),
        (lambda x: x.long(), TypeError, r"reference_chosen_logps must have a floating dtype"),
        (lambda x: x.tolist(), TypeError, r"reference_chosen_logps must be a torch.Tensor"),
    ],
)
def test_dpo_shape_errors(change, error, match):
    pc, pr, rc, rr = _logps(n=3)
    with pytest.raises(error, match=match):
        dpo_loss(pc, pr, change(rc), rr)


def test_dpo_needs_1d_nonempty_finite_inputs():
    pc, pr, rc, rr = (x.reshape(3, 1) for x in _logps(n=3))
    with pytest.raises(ValueError, match=r"policy_chosen_logps must have shape \(B,\).*\(3, 1\)"):
        dpo_loss(pc, pr, rc, rr)
    empty = torch.zeros(0, dtype=F64)
    with pytest.raises(ValueError, match=r"empty batch"):
        dpo_loss(empty, empty, empty, empty)
    pc, pr, rc, rr = _logps(n=3)
    rr[2] = -math.inf
    with pytest.raises(ValueError, match=r"reference_rejected_logps is NaN/inf at pair 2"):
        dpo_loss(pc, pr, rc, rr)


# ------------------------------------------------------------------ Bradley-Terry


def _rewards(n=7, seed=10):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, generator=g, dtype=F64), 2 * torch.randn(n, generator=g, dtype=F64)


@pytest.mark.parametrize("margin", [0.0, 0.5, -1.0])
@pytest.mark.parametrize("center", [0.0, 0.01, 1.0])
def test_bradley_terry_matches_formula_scalar_margin(margin, center):
    chosen, rejected = _rewards()
    got = bradley_terry_loss(chosen, rejected, margin=margin, center_coefficient=center)
    expected = _reference_bt(chosen.tolist(), rejected.tolist(), [margin] * 7, center)
    assert got.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("shape", [(7,), (7, 1)])
def test_bradley_terry_per_pair_margin_and_column_rewards(shape):
    chosen, rejected = _rewards()
    margins = torch.linspace(0, 3, 7, dtype=F64)
    got = bradley_terry_loss(
        chosen.reshape(shape), rejected.reshape(shape), margin=margins.reshape(shape),
        center_coefficient=0.1,
    )
    expected = _reference_bt(chosen.tolist(), rejected.tolist(), margins.tolist(), 0.1)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_bradley_terry_basic_properties():
    chosen, rejected = _rewards()
    assert bradley_terry_loss(chosen, chosen).item() == pytest.approx(LN2, rel=1e-14)
    # only the difference counts without centring; centring penalises a common offset
    shifted = bradley_terry_loss(chosen + 5, rejected + 5)
    assert shifted.item() == pytest.approx(bradley_terry_loss(chosen, rejected).item(), rel=1e-12)
    assert bradley_terry_loss(chosen + 5, rejected + 5, center_coefficient=0.01).item() > (
        bradley_terry_loss(chosen, rejected, center_coefficient=0.01).item()
    )
    # a margin makes the same pairs cost more
    assert bradley_terry_loss(chosen, rejected, 1.0).item() > shifted.item()


def test_bradley_terry_gradcheck():
    chosen, rejected = (x.requires_grad_() for x in _rewards(n=5))
    margins = torch.rand(5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda c, r, m: bradley_terry_loss(c, r, m, center_coefficient=0.3),
        (chosen, rejected, margins),
    )


def test_preference_probability():
    assert preference_probability(1.0, 1.0).item() == pytest.approx(0.5)
    a = torch.tensor([0.0, 2.0, -1.0], dtype=F64)
    b = torch.tensor([1.0, 0.0, -1.0], dtype=F64)
    expected = [1 / (1 + math.exp(-(x - y))) for x, y in zip(a.tolist(), b.tolist())]
    assert preference_probability(a, b).tolist() == pytest.approx(expected, rel=1e-14)
    assert preference_probability(3, 1).item() == pytest.approx(1 / (1 + math.exp(-2)), rel=1e-6)
    # the BT loss is the mean negative log of this probability
    c, r = _rewards(n=4)
    assert bradley_terry_loss(c, r).item() == pytest.approx(
        -preference_probability(c, r).log().mean().item(), rel=1e-12
    )


@pytest.mark.parametrize(
    "chosen, rejected, kwargs, error, match",
    [
        (
            torch.zeros(3), torch.zeros(4), {}, ValueError,
            r"chosen_rewards has shape \(3,\) but rejected_rewards has shape \(4,\)",
        ),
        (
            torch.zeros(3, 2), torch.zeros(3, 2), {}, ValueError,
            r"must have shape \(B,\) or \(B, 1\).*\(3, 2\)",
        ),
        (torch.zeros(0), torch.zeros(0), {}, ValueError, r"empty batch"),
        (
            torch.zeros(3, dtype=torch.long), torch.zeros(3), {}, TypeError,
            r"chosen_rewards must have a floating dtype",
        ),
        (
            torch.tensor([0.0, math.nan]), torch.zeros(2), {}, ValueError,
            r"chosen_rewards is NaN/inf at pair 1",
        ),
        (
            torch.zeros(3), torch.zeros(3), {"margin": torch.zeros(4)}, ValueError,
            r"margin must be a float or have shape \(3,\)",
        ),
        (torch.zeros(3), torch.zeros(3), {"margin": math.inf}, ValueError, r"must be finite"),
        (
            torch.zeros(3), torch.zeros(3), {"margin": torch.tensor([0.0, math.nan, 1.0])},
            ValueError, r"margin contains NaN/inf",
        ),
        (
            torch.zeros(3), torch.zeros(3), {"center_coefficient": -0.1}, ValueError,
            r"center_coefficient must be finite and >= 0",
        ),
    ],
)
def test_bradley_terry_errors(chosen, rejected, kwargs, error, match):
    with pytest.raises(error, match=match):
        bradley_terry_loss(chosen, rejected, **kwargs)


# ------------------------------------------------------------------ sequence log-probs


def _lm_batch(b=3, t=7, v=11, seed=20, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(b, t, v, generator=g, dtype=dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = -100  # prompt
    labels[1, :2] = -100
    labels[1, 5:] = -100  # padding
    labels[2, 0] = -100
    labels[2, 4] = -100  # a masked token in the middle
    return logits, labels


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_matches_hand_loop(average):
    logits, labels = _lm_batch()
    got = sequence_logprobs(logits, labels, average=average)
    expected = _reference_sequence_logprobs(logits, labels, average=average)
    assert got.shape == (3,) and got.dtype == F64
    assert got.tolist() == pytest.approx(expected, rel=1e-12)


def test_sequence_logprobs_average_divides_by_the_count():
    logits, labels = _lm_batch()
    counts = (labels[:, 1:] != -100).sum(dim=1).to(F64)  # [4, 3, 5]
    assert counts.tolist() == [4, 3, 5]
    total = sequence_logprobs(logits, labels)
    assert sequence_logprobs(logits, labels, average=True).tolist() == pytest.approx(
        (total / counts).tolist(), rel=1e-14
    )


def test_sequence_logprobs_ignores_masked_positions():
    logits, labels = _lm_batch()
    base = sequence_logprobs(logits, labels)
    changed = logits.clone()
    # logits at t score labels[t + 1]: rewrite every position whose next label is ignored,
    # and the last position, which predicts nothing
    nothing_to_score = torch.cat([labels[:, 1:] == -100, torch.ones(3, 1, dtype=torch.bool)], 1)
    changed[nothing_to_score] = 100 * torch.randn(int(nothing_to_score.sum()), 11, dtype=F64)
    assert torch.equal(sequence_logprobs(changed, labels), base)
    # the first label is never scored: any value there, ignored or not, changes nothing
    relabelled = labels.clone()
    relabelled[:, 0] = torch.tensor([5, -100, 0])
    assert torch.equal(sequence_logprobs(logits, relabelled), base)
    # another ignore value works the same way
    other = labels.masked_fill(labels == -100, -1)
    assert torch.equal(sequence_logprobs(logits, other, ignore_index=-1), base)


def test_sequence_logprobs_gradient_is_zero_at_ignored_positions():
    logits, labels = _lm_batch()
    logits.requires_grad_()
    (grad,) = torch.autograd.grad(sequence_logprobs(logits, labels).sum(), logits)
    nothing_to_score = torch.cat([labels[:, 1:] == -100, torch.ones(3, 1, dtype=torch.bool)], 1)
    assert bool((grad[nothing_to_score] == 0).all())
    assert bool((grad[~nothing_to_score].abs().sum(-1) > 0).all())


def test_sequence_logprobs_shifts_by_one():
    # position t puts (almost) all mass on labels[t + 1]: the shifted log-prob is ~0, while
    # scoring labels[t] with the logits at t would give about −50 per token
    labels = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    logits = torch.zeros(1, 8, 10, dtype=F64)
    logits[0, torch.arange(7), labels[0, 1:]] = 50.0
    assert sequence_logprobs(logits, labels).item() == pytest.approx(0.0, abs=1e-15)
    unshifted = torch.zeros(1, 8, 10, dtype=F64)
    unshifted[0, torch.arange(8), labels[0]] = 50.0
    assert sequence_logprobs(unshifted, labels).item() < -300


def test_token_logprobs_layout():
    logits, labels = _lm_batch()
    logps, mask = token_logprobs(logits, labels)
    assert logps.shape == mask.shape == (3, 6) and mask.dtype == torch.bool
    assert torch.equal(mask, labels[:, 1:] != -100)
    assert bool((logps[~mask] == 0).all()) and bool((logps[mask] < 0).all())
    b, t = 2, 4  # logits[2, 4] score labels[2, 5]
    row = logits[b, t]
    expected = (row[labels[b, t + 1]] - torch.logsumexp(row, 0)).item()
    assert logps[b, t].item() == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_upcast(dtype):
    g = torch.Generator().manual_seed(21)
    logits = (8 * torch.randn(2, 9, 500, generator=g)).to(dtype)
    labels = torch.randint(0, 500, (2, 9), generator=g)
    got = sequence_logprobs(logits, labels)
    assert got.dtype == torch.float32
    expected = _reference_sequence_logprobs(logits.double(), labels)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    logps, _ = token_logprobs(logits, labels)
    assert logps.dtype == torch.float32


def test_row_without_scored_tokens_is_named():
    logits, labels = _lm_batch()
    labels[1, 1:] = -100
    labels[2, 1:] = -100
    labels[2, 0] = 7  # position 0 is never scored
    with pytest.raises(ValueError, match=r"rows \[1, 2\] have no scored token"):
        sequence_logprobs(logits, labels)
    # token_logprobs itself just returns an all-False mask for them
    _, mask = token_logprobs(logits, labels)
    assert mask.sum(1).tolist() == [4, 0, 0]


@pytest.mark.parametrize(
    "logits, labels, error, match",
    [
        (torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.long), ValueError, r"logits must be 3-D"),
        (
            torch.zeros(2, 5, 4), torch.zeros(2, 4, dtype=torch.long), ValueError,
            r"labels must have shape \(B, T\) = \(2, 5\)",
        ),
        (torch.zeros(2, 5, 4), torch.zeros(2, 5), TypeError, r"labels must be an integer tensor"),
        (
            torch.zeros(2, 5, 4, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long), TypeError,
            r"logits must have a floating dtype",
        ),
        (torch.zeros(2, 1, 4), torch.zeros(2, 1, dtype=torch.long), ValueError, r"need T >= 2"),
        (
            torch.zeros(2, 5, 4), torch.tensor([[0, 1, 2, 3, 0], [0, 1, 4, 0, 0]]), ValueError,
            r"labels\[1, 2\] = 4 is neither a token id in \[0, 4\)",
        ),
        (
            torch.zeros(2, 5, 4), torch.tensor([[0, 1, 2, 3, -5], [0, 1, 2, 0, 0]]), ValueError,
            r"labels\[0, 4\] = -5",
        ),
    ],
)
def test_sequence_logprobs_errors(logits, labels, error, match):
    with pytest.raises(error, match=match):
        sequence_logprobs(logits, labels)


def test_dpo_from_logits_end_to_end():
    # the same model as policy and reference: ln 2; improving the chosen answers lowers it
    logits, labels = _lm_batch(b=4, seed=22)
    chosen = sequence_logprobs(logits[:2], labels[:2])
    rejected = sequence_logprobs(logits[2:], labels[2:])
    assert dpo_loss(chosen, rejected, chosen, rejected).item() == pytest.approx(LN2, rel=1e-14)
    better = logits[:2].clone()
    keep = labels[:2, 1:] != -100
    better[:, :-1][keep] = better[:, :-1][keep].scatter_add(
        1, labels[:2, 1:][keep][:, None], torch.full((int(keep.sum()), 1), 2.0, dtype=F64)
    )
    improved = sequence_logprobs(better, labels[:2])
    assert bool((improved > chosen).all())
    assert dpo_loss(improved, rejected, chosen, rejected).item() < LN2
