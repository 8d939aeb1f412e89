"""InfoNCE (CLIP), multi-positive InfoNCE, ClipLoss and SigLIP against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from companion import ClipLoss, info_nce_loss, siglip_loss
from companion.losses.contrastive import SiglipLoss, contrastive_logits

F64 = torch.float64


def _features(n=6, d=5, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)


# ------------------------------------------------------------------ independent references


def _unit_rows(x):
    """Rows of ``x`` as Python lists scaled to unit length."""
    rows = x.tolist()
    return [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in rows]


def _dot(a, b):
    return sum(u * v for u, v in zip(a, b))


def _lse(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def _reference_info_nce(x, y, temperature, normalize=True, positive_ids=None):
    """Symmetric InfoNCE with explicit loops: mean over rows and columns of −Σ t_ij log p_ij."""
    xs = _unit_rows(x) if normalize else x.tolist()
    ys = _unit_rows(y) if normalize else y.tolist()
    n = len(xs)
    s = [[_dot(xs[i], ys[j]) / temperature for j in range(n)] for i in range(n)]
    ids = list(range(n)) if positive_ids is None else list(positive_ids)
    total = 0.0
    for i in range(n):  # image i: row i; text i: column i
        group = [j for j in range(n) if ids[j] == ids[i]]
        row_lse = _lse(s[i])
        col_lse = _lse([s[k][i] for k in range(n)])
        total += sum(row_lse - s[i][j] for j in group) / len(group)
        total += sum(col_lse - s[j][i] for j in group) / len(group)
    return total / (2 * n)


def _reference_siglip(x, y, scale, bias):
    xs, ys = _unit_rows(x), _unit_rows(y)
    n = len(xs)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            u = z * (scale * _dot(xs[i], ys[j]) + bias)
            total += math.log1p(math.exp(-u))  # −log σ(u)
    return total / n


# ------------------------------------------------------------------ InfoNCE


@pytest.mark.parametrize("n", [1, 2, 7])
@pytest.mark.parametrize("temperature", [0.07, 1.0, 0.5])
def test_info_nce_matches_brute_force_reference(n, temperature):
    x, y = _features(n=n, d=4, seed=n)
    expected = _reference_info_nce(x, y, temperature)
    assert info_nce_loss(x, y, temperature).item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_info_nce_without_normalisation_matches_reference_and_differs():
    x, y = _features(n=5, d=3, seed=3)
    raw = info_nce_loss(x, y, 0.5, normalize=False)
    assert raw.item() == pytest.approx(_reference_info_nce(x, y, 0.5, normalize=False), rel=1e-12)
    assert raw.item() != pytest.approx(info_nce_loss(x, y, 0.5).item(), rel=1e-3)
    # normalised features ignore the feature norm, raw ones do not
    assert info_nce_loss(3 * x, y).item() == pytest.approx(info_nce_loss(x, y).item(), rel=1e-12)
    assert info_nce_loss(3 * x, y, 0.5, normalize=False).item() != pytest.approx(
        raw.item(), rel=1e-3
    )


def test_info_nce_is_symmetric_and_permutation_invariant():
    x, y = _features(n=8, d=5, seed=1)
    loss = info_nce_loss(x, y)
    assert info_nce_loss(y, x).item() == pytest.approx(loss.item(), rel=1e-13)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(2))
    assert info_nce_loss(x[perm], y[perm]).item() == pytest.approx(loss.item(), rel=1e-13)
    # permuting only one side breaks the pairing, so the loss changes
    assert info_nce_loss(x[perm], y).item() != pytest.approx(loss.item(), rel=1e-6)


def test_contrastive_logits_shape_and_values():
    x, y = _features(n=4, d=3, seed=4)
    logits = contrastive_logits(x, y, 0.1)
    assert logits.shape == (4, 4)
    xs, ys = _unit_rows(x), _unit_rows(y)
    assert logits[1, 2].item() == pytest.approx(_dot(xs[1], ys[2]) / 0.1, rel=1e-12)


def test_info_nce_gradcheck_features():
    x, y = _features(n=5, d=4, seed=5)
    x.requires_grad_()
    y.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: info_nce_loss(a, b, 0.3), (x, y))


def test_info_nce_gradcheck_learnable_temperature():
    x, y = _features(n=5, d=4, seed=6)
    x.requires_grad_()
    temperature = torch.tensor(0.2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, t: info_nce_loss(a, y, t), (x, temperature))
    # and it matches the reference's finite difference in τ
    loss = info_nce_loss(x.detach(), y, temperature)
    (grad,) = torch.autograd.grad(loss, temperature)
    h = 1e-6
    numeric = (
        _reference_info_nce(x.detach(), y, 0.2 + h) - _reference_info_nce(x.detach(), y, 0.2 - h)
    ) / (2 * h)
    assert grad.item() == pytest.approx(numeric, rel=1e-6)


# ------------------------------------------------------------------ multi-positive


def test_multi_positive_reduces_to_plain_without_repeated_captions():
    x, y = _features(n=6, d=4, seed=7)
    ids = torch.tensor([10, 3, 5, 7, 0, 2])  # all distinct, in any order
    plain = info_nce_loss(x, y, 0.1)
    assert info_nce_loss(x, y, 0.1, positive_ids=ids).item() == pytest.approx(
        plain.item(), rel=1e-14
    )


def test_multi_positive_matches_reference_with_duplicates():
    x, y = _features(n=6, d=4, seed=8)
    ids = [0, 1, 0, 2, 1, 0]
    got = info_nce_loss(x, y, 0.2, positive_ids=torch.tensor(ids))
    assert got.item() == pytest.approx(_reference_info_nce(x, y, 0.2, positive_ids=ids), rel=1e-12)


def test_multi_positive_hand_computed():
    # raw features, τ = 1: S = [[2,1,0],[2,1,0],[0,0,1]]; images 0 and 1 share caption id 0
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=F64)
    y = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=F64)
    e = math.e
    rows = 2 * (math.log(e**2 + e + 1) - 1.5) + (math.log(2 + e) - 1)  # targets ½(S_i0 + S_i1)
    cols = (math.log(2 * e**2 + 1) - 2) + (math.log(2 * e + 1) - 1) + (math.log(2 + e) - 1)
    expected = (rows / 3 + cols / 3) / 2
    got = info_nce_loss(x, y, 1.0, normalize=False, positive_ids=torch.tensor([0, 0, 1]))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_multi_positive_is_lower_when_duplicates_are_false_negatives():
    # captions 0 and 1 are the same sentence (id 0); each image sits closest to the *other*
    # copy, which the plain loss punishes as a mismatch and the multi-positive loss accepts
    y = torch.tensor([[1.0, 0.1, 0.0], [1.0, -0.1, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    x = y[[1, 0, 2]].clone()
    plain = info_nce_loss(x, y, 0.05)
    multi = info_nce_loss(x, y, 0.05, positive_ids=torch.tensor([0, 0, 1]))
    assert multi.item() < plain.item() - 1e-3


# ------------------------------------------------------------------ ClipLoss


def test_clip_loss_initialisation_and_forward():
    module = ClipLoss()
    assert module.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert module.temperature == pytest.approx(0.07, rel=1e-6)
    x, y = _features(n=4, d=3, seed=9, dtype=torch.float32)
    loss = module(x, y)
    assert loss.item() == pytest.approx(info_nce_loss(x, y, 0.07).item(), rel=1e-5)
    loss.backward()
    assert module.logit_scale.grad is not None and module.logit_scale.grad.item() != 0


def test_clip_loss_clamp_survives_huge_gradients():
    module = ClipLoss(temperature=0.07, max_scale=100.0)
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    x, y = _features(n=4, d=3, seed=10, dtype=torch.float32)

    module.logit_scale.grad = torch.tensor(-1e6)  # pushes log-scale up by 1e6
    optimizer.step()
    assert module.logit_scale.item() > 1e5
    assert module.scale.item() <= 100.0  # forward clamps the effective scale
    assert module.temperature == pytest.approx(0.01, rel=1e-6)
    assert module(x, y).item() == pytest.approx(info_nce_loss(x, y, 0.01).item(), rel=1e-5)
    module.clamp_()
    assert module.logit_scale.item() <= math.log(100.0) + 1e-6

    module.logit_scale.grad = torch.tensor(1e6)  # and down
    optimizer.step()
    module.clamp_()
    assert module.logit_scale.item() == 0.0  # scale 1, temperature 1


def test_clip_loss_normalize_passthrough():
    x, y = _features(n=4, d=3, seed=15, dtype=torch.float32)
    expected = info_nce_loss(x, y, 0.07, normalize=False)
    assert ClipLoss(normalize=False)(x, y).item() == pytest.approx(expected.item(), rel=1e-5)


def test_clip_loss_multi_positive_passthrough():
    module = ClipLoss()
    x, y = _features(n=4, d=3, seed=11, dtype=torch.float32)
    ids = torch.tensor([0, 0, 1, 2])
    expected = info_nce_loss(x, y, 0.07, positive_ids=ids)
    assert module(x, y, positive_ids=ids).item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------ SigLIP


@pytest.mark.parametrize("as_tensor", [False, True])
def test_siglip_matches_formula(as_tensor):
    x, y = _features(n=5, d=4, seed=12)
    scale, bias = 10.0, -10.0
    s = torch.tensor(scale, dtype=F64) if as_tensor else scale
    b = torch.tensor(bias, dtype=F64) if as_tensor else bias
    expected = _reference_siglip(x, y, scale, bias)
    assert siglip_loss(x, y, s, b).item() == pytest.approx(expected, rel=1e-12)
    assert siglip_loss(x, y, 3.0, 0.5).item() == pytest.approx(
        _reference_siglip(x, y, 3.0, 0.5), rel=1e-12
    )


def test_siglip_gradcheck():
    x, y = _features(n=4, d=3, seed=13)
    params = (
        x.requires_grad_(),
        y.requires_grad_(),
        torch.tensor(4.0, dtype=F64, requires_grad=True),
        torch.tensor(-2.0, dtype=F64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(siglip_loss, params)


def test_siglip_module_init():
    module = SiglipLoss()
    assert module.logit_scale.exp().item() == pytest.approx(10.0, rel=1e-6)
    assert module.logit_bias.item() == -10.0
    x, y = _features(n=4, d=3, seed=14, dtype=torch.float32)
    assert module(x, y).item() == pytest.approx(
        _reference_siglip(x.double(), y.double(), 10.0, -10.0), rel=1e-5
    )


# ------------------------------------------------------------------ errors


def _bad(n=4, d=3):
    return torch.randn(n, d), torch.randn(n, d)


@pytest.mark.parametrize("loss", ["info_nce", "siglip"])
@pytest.mark.parametrize(
    "make, error, match",
    [
        (
            lambda: (torch.randn(4), torch.randn(4, 3)),
            ValueError,
            r"image_features must be 2-D \[N, D\].*\(4,\)",
        ),
        (
            lambda: (torch.randn(4, 3), torch.randn(2, 4, 3)),
            ValueError,
            r"text_features must be 2-D",
        ),
        (
            lambda: (torch.randn(4, 3), torch.randn(5, 3)),
            ValueError,
            r"N=4 rows but text_features has N=5",
        ),
        (
            lambda: (torch.randn(4, 3), torch.randn(4, 2)),
            ValueError,
            r"D=3 but text_features has D=2",
        ),
        (lambda: (torch.randn(0, 3), torch.randn(0, 3)), ValueError, r"empty batch.*\(0, 3\)"),
        (
            lambda: (torch.ones(4, 3, dtype=torch.long), torch.randn(4, 3)),
            TypeError,
            r"image_features must have a floating dtype",
        ),
        (lambda: ([[1.0]], torch.randn(1, 1)), TypeError, r"image_features must be a torch.Tensor"),
    ],
)
def test_shape_and_type_errors(loss, make, error, match):
    x, y = make()
    with pytest.raises(error, match=match):
        if loss == "info_nce":
            info_nce_loss(x, y)
        else:
            siglip_loss(x, y, 10.0, -10.0)


@pytest.mark.parametrize("value, name", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_non_finite_features_name_the_row(value, name):
    x, y = _bad()
    x[2, 1] = value
    with pytest.raises(ValueError, match=r"image_features contains NaN/inf at row 2"):
        info_nce_loss(x, y)
    x, y = _bad()
    y[3, 0] = value
    with pytest.raises(ValueError, match=r"text_features contains NaN/inf at row 3"):
        siglip_loss(x, y, 10.0, -10.0)


@pytest.mark.parametrize(
    "temperature", [0.0, -0.1, float("inf"), float("nan"), torch.tensor(0.0), torch.tensor(-1.0)]
)
def test_bad_temperature(temperature):
    x, y = _bad()
    with pytest.raises(ValueError, match=r"temperature must be finite and > 0"):
        info_nce_loss(x, y, temperature)


def test_bad_temperature_type_and_shape():
    x, y = _bad()
    with pytest.raises(TypeError, match=r"temperature must be a float or a 0-d tensor"):
        info_nce_loss(x, y, "0.07")
    with pytest.raises(ValueError, match=r"temperature must be a scalar.*\(2,\)"):
        info_nce_loss(x, y, torch.tensor([0.1, 0.2]))


def test_bad_positive_ids():
    x, y = _bad()
    with pytest.raises(ValueError, match=r"positive_ids must have shape \(4,\).*\(3,\)"):
        info_nce_loss(x, y, positive_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"positive_ids must have shape \(4,\).*\(4, 1\)"):
        info_nce_loss(x, y, positive_ids=torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(TypeError, match=r"positive_ids must be an integer tensor"):
        info_nce_loss(x, y, positive_ids=torch.zeros(4))


def test_bad_siglip_scale_and_bias():
    x, y = _bad()
    with pytest.raises(ValueError, match=r"logit_scale must be finite and > 0"):
        siglip_loss(x, y, 0.0, -10.0)
    with pytest.raises(ValueError, match=r"logit_bias must be finite"):
        siglip_loss(x, y, 10.0, float("nan"))


def test_bad_clip_loss_arguments():
    with pytest.raises(ValueError, match=r"temperature must be finite and > 0"):
        ClipLoss(temperature=0.0)
    with pytest.raises(ValueError, match=r"max_scale must be >= 1"):
        ClipLoss(max_scale=0.5)


def test_features_on_different_devices():
    x = torch.randn(4, 3)
    y = torch.randn(4, 3, device="meta")
    with pytest.raises(ValueError, match=r"image_features is on cpu but text_features is on meta"):
        info_nce_loss(x, y)
