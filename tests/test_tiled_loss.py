"""The tiled InfoNCE gives the plain InfoNCE's value and gradients, for any N and tile size."""

from __future__ import annotations

import pytest
import torch

from companion import info_nce_loss, tiled_info_nce_loss
from companion.losses import tiled

F64 = torch.float64


def _features(n, d=6, seed=0, dtype=F64, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64) * spread
    y = torch.randn(n, d, generator=g, dtype=F64) * spread
    return x.to(dtype), y.to(dtype)


def _value_and_grads(loss_fn, x, y, temperature, **kwargs):
    """Loss and gradients w.r.t. x, y and (if it is a tensor) the temperature."""
    x = x.detach().clone().requires_grad_()
    y = y.detach().clone().requires_grad_()
    inputs = [x, y]
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.detach().clone().requires_grad_()
        inputs.append(temperature)
    loss = loss_fn(x, y, temperature, **kwargs)
    return loss, torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("n", [1, 7, 64, 100])
@pytest.mark.parametrize("tile_size", [1, 16, 32, 1000])
def test_matches_plain_loss_and_gradients_float64(n, tile_size):
    x, y = _features(n, seed=n + tile_size)
    temperature = torch.tensor(0.1, dtype=F64)
    plain, plain_grads = _value_and_grads(info_nce_loss, x, y, temperature)
    tiled_loss, tiled_grads = _value_and_grads(
        tiled_info_nce_loss, x, y, temperature, tile_size=tile_size
    )
    torch.testing.assert_close(tiled_loss, plain, rtol=1e-12, atol=1e-12)
    for got, want, name in zip(tiled_grads, plain_grads, ["image", "text", "temperature"]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")


@pytest.mark.parametrize("normalize", [True, False])
def test_float_temperature_and_raw_features(normalize):
    x, y = _features(37, d=4, seed=3, spread=0.5)
    plain, plain_grads = _value_and_grads(info_nce_loss, x, y, 0.3, normalize=normalize)
    got, got_grads = _value_and_grads(
        tiled_info_nce_loss, x, y, 0.3, normalize=normalize, tile_size=8
    )
    torch.testing.assert_close(got, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck_small_case():
    x, y = _features(5, d=3, seed=4)
    inputs = (
        x.requires_grad_(),
        y.requires_grad_(),
        torch.tensor(0.25, dtype=F64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(
        lambda a, b, t: tiled_info_nce_loss(a, b, t, tile_size=2), inputs
    )


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("fast", [True, False])
def test_both_kernel_paths_match(monkeypatch, fast, shift):
    """Force the one-exp fast path or the per-row/column safe path, with or without the
    per-strip max shift; all are exact in float64."""
    monkeypatch.setattr(tiled, "_fast_path_accurate", lambda *args: fast)
    monkeypatch.setattr(tiled, "_needs_shift", lambda *args: shift)
    x, y = _features(50, seed=5)
    temperature = torch.tensor(0.05, dtype=F64)
    plain, plain_grads = _value_and_grads(info_nce_loss, x, y, temperature)
    got, got_grads = _value_and_grads(tiled_info_nce_loss, x, y, temperature, tile_size=16)
    torch.testing.assert_close(got, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("temperature", [0.07, 0.01, 1e-3])
def test_float32_against_float64(temperature):
    """float32 stays close to the float64 truth, also at scales where one shift per strip
    would underflow (τ = 1e-3: logits span ±1000, so the kernel must take the safe path)."""
    x, y = _features(300, d=16, seed=6)
    t64 = torch.tensor(temperature, dtype=F64)
    want, want_grads = _value_and_grads(info_nce_loss, x, y, t64)
    got, got_grads = _value_and_grads(
        tiled_info_nce_loss, x.float(), y.float(), torch.tensor(temperature), tile_size=64
    )
    assert got.dtype == torch.float32 and got_grads[0].dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-5)
    for a, b, name in zip(got_grads, want_grads, ["image", "text", "temperature"]):
        scale = b.abs().max()
        torch.testing.assert_close(
            a.double() / scale, b / scale, rtol=1e-4, atol=1e-4, msg=f"gradient of {name}"
        )


def test_bfloat16_inputs_computed_in_float32():
    x, y = _features(64, d=8, seed=7, dtype=torch.bfloat16)
    xb, yb = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss = tiled_info_nce_loss(xb, yb, tile_size=16)
    loss.backward()
    assert loss.dtype == torch.float32
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()
    want = info_nce_loss(x.double(), y.double())  # same (bf16-rounded) inputs in float64
    assert loss.item() == pytest.approx(want.item(), rel=1e-2)


def test_never_builds_the_full_matrix(monkeypatch):
    """Every strip product has at most tile_size rows (no N×N buffer)."""
    shapes = []
    real_mm = torch.mm

    def recording_mm(a, b, **kwargs):
        shapes.append((a.shape[0], b.shape[1]))
        return real_mm(a, b, **kwargs)

    monkeypatch.setattr(tiled.torch, "mm", recording_mm)
    x, y = _features(40, seed=8)
    tiled_info_nce_loss(x.requires_grad_(), y, tile_size=8).backward()
    assert shapes and all(rows <= 8 for rows, _ in shapes)


@pytest.mark.parametrize(
    "tile_size, error, match",
    [
        (0, ValueError, r"tile_size must be >= 1.*got 0"),
        (-4, ValueError, r"tile_size must be >= 1.*got -4"),
        (2.5, TypeError, r"tile_size must be an int, got float"),
        (True, TypeError, r"tile_size must be an int, got bool"),
    ],
)
def test_bad_tile_size(tile_size, error, match):
    x, y = _features(4)
    with pytest.raises(error, match=match):
        tiled_info_nce_loss(x, y, tile_size=tile_size)


def test_feature_and_temperature_errors():
    x, y = _features(4)
    with pytest.raises(ValueError, match=r"N=4 rows but text_features has N=3"):
        tiled_info_nce_loss(x, y[:3])
    with pytest.raises(ValueError, match=r"image_features must be 2-D"):
        tiled_info_nce_loss(x[0], y)
    with pytest.raises(ValueError, match=r"empty batch"):
        tiled_info_nce_loss(x[:0], y[:0])
    bad = x.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"image_features contains NaN/inf at row 1"):
        tiled_info_nce_loss(bad, y)
    with pytest.raises(ValueError, match=r"temperature must be finite and > 0"):
        tiled_info_nce_loss(x, y, 0.0)


def test_double_backward_is_refused():
    x, y = _features(6, seed=9)
    x.requires_grad_()
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(tiled_info_nce_loss(x, y, tile_size=4), x, create_graph=True)


def test_normalisation_edge_rows_match_f_normalize():
    """Rows shorter than F.normalize's eps (zero, 1e-14) and a very short row get the same
    gradients as ordinary autograd through F.normalize."""
    x, y = _features(9, d=5, seed=10)
    x[3] = 0.0
    x[6] *= 1e-14 / x[6].norm()  # 0 < norm < eps: divided by eps, no projection term
    y[5] *= 1e-3
    plain, plain_grads = _value_and_grads(info_nce_loss, x, y, 0.1)
    got, got_grads = _value_and_grads(tiled_info_nce_loss, x, y, 0.1, tile_size=4)
    torch.testing.assert_close(got, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
