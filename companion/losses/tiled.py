"""Tiled InfoNCE: CLIP's loss without ever holding the N×N logit matrix (Inf-CL, Wang et al. 2024).

The symmetric InfoNCE of ``companion.losses.contrastive.info_nce_loss`` needs only, per row
and per column of ``S = s·X·Yᵀ`` (``s = 1/τ``), its log-sum-exp::

    r_i = log Σ_j exp S_ij          c_j = log Σ_i exp S_ij
    L   = (1/2N) Σ_i (r_i − S_ii) + (1/2N) Σ_j (c_j − S_jj)

Both are computed one strip of rows at a time (``tile_size`` rows × all N columns): a strip
holds whole rows, so its ``r_i`` are final; the column ones are merged across strips with
``c ← logaddexp(c, c_strip)``. Memory is O(N·D + N·tile_size) instead of O(N²).

Backward recomputes each strip. With ``p_ij = exp(S_ij − r_i)`` (row softmax) and
``q_ij = exp(S_ij − c_j)`` (column softmax), ``∂L/∂S_ij = G_ij / 2N`` with
``G_ij = p_ij + q_ij − 2δ_ij``, and, by the chain rule through ``S_ij = s·x_i·y_j``::

    ∂L/∂x_i = s/(2N) · (Σ_j G_ij y_j)      = s/(2N) · (Σ_j (p_ij + q_ij) y_j − 2 y_i)
    ∂L/∂y_j = s/(2N) · (Σ_i G_ij x_i)
    ∂L/∂s   = 1/(2N) · Σ_ij G_ij x_i·y_j   = 1/(2N) · Σ_i x_i · (Σ_j G_ij y_j)

so the scale's gradient falls out of the ``G·Y`` product that ``∂L/∂x`` needs anyway.
Here x, y are the unit rows; the L2 normalisation is part of the Function (only ``ŷ`` is
stored in full, image rows are normalised per strip) and its backward,
``∂L/∂x = (g − x̂ (x̂·g)) / ‖x‖``, is applied strip by strip as well.

Four N×N×D matrix products in all (one forward, three backward: the recomputed strip, ``G·Y``
and ``Gᵀ·X``), one more than the plain loss, which instead streams several N×N matrices
through memory.

Speed: one ``exp`` per element and pass. A strip is exponentiated once with a single shift
``m`` (the strip's maximum); row sums and column sums, and in the backward ``p + q =
exp(S − m)·(e^{m−r_i} + e^{m−c_j})``, come from that one exponential. That is exact as long
as nothing that matters underflows below float32's smallest normal number; the forward
checks a bound on the mass that could have been lost and, if it is not negligible (very
large scale with very uneven rows), recomputes with one shift per row and per column.
"""

from __future__ import annotations

import math

import torch

from companion.losses.checks import as_scalar, check_features, check_positive_scalar

__all__ = ["DEFAULT_TILE_SIZE", "tiled_info_nce_loss"]

# Rows per strip. Measured on 2 CPU cores, D=256 (benchmarks/contrastive_loss_memory.py):
# 256 balances matmul efficiency against the strip buffers staying in cache.
DEFAULT_TILE_SIZE = 256


def tiled_info_nce_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    temperature: float | torch.Tensor = 0.07,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    normalize: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021) computed strip by strip (Inf-CL).

    Same value and gradients as ``info_nce_loss(image_features, text_features, temperature,
    normalize=normalize)`` up to rounding, in O(N·D + N·tile_size) memory.

    Args:
        image_features: [N, D] image embeddings (any floating dtype; bf16/fp16 are computed
            in float32, float64 in float64).
        text_features: [N, D] text embeddings; row i is the caption of image i.
        temperature: τ > 0, a float or a 0-d tensor that may require grad.
        tile_size: rows per strip (>= 1); any N works, the last strip may be shorter.
        normalize: L2-normalise the rows first, as ``F.normalize`` does (inside the custom
            Function: unit image rows are made one strip at a time, and the normalisation's
            backward runs strip by strip too, so no extra N×D temporaries).

    Returns:
        The scalar loss, in float32 for half-precision inputs, else in the input dtype.
    """
    check_features(image_features, text_features)
    check_positive_scalar(temperature, "temperature")
    if isinstance(tile_size, bool) or not isinstance(tile_size, int):
        raise TypeError(f"tile_size must be an int, got {type(tile_size).__name__}")
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1 (rows per strip), got {tile_size}")
    x, y = image_features, text_features
    dtype = _compute_dtype(x.dtype, y.dtype)
    temperature = as_scalar(temperature)
    if isinstance(temperature, torch.Tensor):
        scale = 1.0 / temperature.to(device=x.device, dtype=dtype)  # 0-d, keeps autograd
    else:
        scale = torch.tensor(1.0 / temperature, device=x.device, dtype=dtype)
    return _TiledInfoNCE.apply(x, y, scale, tile_size, normalize)


# F.normalize divides by max(‖x‖, eps) with this eps
_NORM_EPS = 1e-12


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float64, else float32 (log-sum-exp never in half precision)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _strips(n: int, tile: int):
    """Row ranges (start, stop) covering 0..n in steps of ``tile``."""
    for start in range(0, n, tile):
        yield start, min(start + tile, n)


def _row_norms(x: torch.Tensor, normalize: bool, dtype: torch.dtype) -> torch.Tensor | None:
    """‖x_i‖ [N] in the compute dtype, or None when the rows are used as they are."""
    if not normalize:
        return None
    return torch.linalg.vector_norm(x, dim=1, dtype=dtype)  # [N]


def _inverse(norms: torch.Tensor | None) -> torch.Tensor | None:
    """1 / max(‖x_i‖, eps) [N], F.normalize's divisor (None stays None)."""
    return None if norms is None else norms.clamp_min(_NORM_EPS).reciprocal_()


def _scaled_rows(x, factors, dtype):
    """x [N, D] times a per-row factor [N] (or just cast when ``factors`` is None), one op."""
    if factors is None:
        return x.to(dtype)
    return x * factors[:, None]  # [N, D], promotes half precision to the factors' dtype


def _scaled_inverse(norms, scale, n):
    """Per-row factor [N] that turns x_i into s·x̂_i: s/max(‖x_i‖, eps), or s without norms."""
    return scale.expand(n) if norms is None else _inverse(norms).mul_(scale)


# Largest |S| that needs no shift before exp: e^60·N stays finite in float32 for N < e^28,
# and e^−60 is a normal float32 with full precision.
_NO_SHIFT_BOUND = 60.0


def _needs_shift(sxh, yh) -> bool:
    """Whether |S_ij| <= max‖s·x̂_i‖·max‖ŷ_j‖ may exceed ``_NO_SHIFT_BOUND`` (one host sync).

    Below the bound (e.g. CLIP's initial s ≈ 14.3 on unit rows) each strip is exponentiated
    as is, which saves a max and a subtraction per strip.
    """
    bound = torch.linalg.vector_norm(sxh, dim=1).max() * torch.linalg.vector_norm(yh, dim=1).max()
    return float(bound) > _NO_SHIFT_BOUND


class _TiledInfoNCE(torch.autograd.Function):
    """loss = InfoNCE(x, y, scale) for x, y [N, D] (normalised inside) and a 0-d scale.

    Per strip the forward issues 4 large ops (mm, exp, row sum, column sum) and the backward
    6 (mm, outer sum, exp, product, two mm): few parallel regions, which matters on shared
    cores, where each one waits for all its threads.
    """

    @staticmethod
    def forward(ctx, x, y, scale, tile_size, normalize):
        dtype, n = scale.dtype, x.shape[0]
        norm_x, norm_y = _row_norms(x, normalize, dtype), _row_norms(y, normalize, dtype)
        yh = _scaled_rows(y, _inverse(norm_y), dtype)  # [N, D], ŷ
        sxh = _scaled_rows(x, _scaled_inverse(norm_x, scale, n), dtype)  # [N, D], s·x̂
        shift = _needs_shift(sxh, yh)
        r, c, diag, shifts, fast = _row_col_lse(sxh, yh, tile_size, shift)
        loss = (r.sum() + c.sum() - 2 * diag.sum()) / (2 * n)
        ctx.save_for_backward(x, y, scale, r, c, shifts, norm_x, norm_y)
        ctx.tile_size, ctx.fast, ctx.shift = tile_size, fast, shift
        return loss  # ŷ and s·x̂ are freed here and recomputed in backward

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():  # create_graph=True: the strips are not differentiable
            raise RuntimeError(
                "tiled_info_nce_loss does not support double backward (create_graph=True); "
                "use info_nce_loss for higher-order gradients"
            )
        x, y, scale, r, c, shifts, norm_x, norm_y = ctx.saved_tensors
        dtype, n, tile = scale.dtype, x.shape[0], ctx.tile_size
        yh = _scaled_rows(y, _inverse(norm_y), dtype)  # [N, D], ŷ
        sxh = _scaled_rows(x, _scaled_inverse(norm_x, scale, n), dtype)  # [N, D], s·x̂
        # gx = Σ_j (p_ij + q_ij) ŷ_j,  gy = Σ_i (p_ij + q_ij) s·x̂_i   [N, D] each
        gx, gy = _strip_gradients(sxh, yh, r, c, shifts, tile, ctx.fast, ctx.shift)
        dot = _finish_gradients_(gx, gy, sxh, yh, scale, norm_x, norm_y, tile)
        g = grad_loss.to(dtype) / (2 * n)
        grad_scale = g * dot if ctx.needs_input_grad[2] else None
        grad_x = gx.mul_(g * scale).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_y = gy.mul_(g).to(y.dtype) if ctx.needs_input_grad[1] else None  # s is in gy
        return grad_x, grad_y, grad_scale, None, None


# Rows per chunk when finishing the gradients (T×D-sized temporaries; bigger chunks = fewer ops).
_FINISH_ROWS = 4096


def _finish_gradients_(gx, gy, sxh, yh, scale, norm_x, norm_y, tile):
    """In place: add the diagonal term and chain through the L2 normalisation; returns ∂L/∂s·2N.

    On entry ``gx = Σ_j (p+q)_ij ŷ_j`` and ``gy = Σ_i (p+q)_ij s·x̂_i``. On exit ``gx`` is
    ``∂/∂x`` up to the factor s/2N and ``gy`` is ``∂/∂y`` up to 1/2N. With ``∂/∂x̂``, the
    normalisation's backward is ``∂L/∂x = (g − x̂ (x̂·g)) / max(‖x‖, eps)``, without the
    projection for rows shorter than eps (those were divided by the constant eps, as in
    F.normalize's autograd).
    """
    n = gx.shape[0]
    dot = torch.zeros((), dtype=gx.dtype, device=gx.device)  # Σ_i s·x̂_i·(Σ_j G_ij ŷ_j)
    inv_x, inv_y = _inverse(norm_x), _inverse(norm_y)  # [N] or None
    for start, stop in _strips(n, max(tile, _FINISH_ROWS)):
        sxh_rows, yh_rows = sxh[start:stop], yh[start:stop]  # [t, D] views
        gx_rows, gy_rows = gx[start:stop], gy[start:stop]  # [t, D] views
        gx_rows.sub_(yh_rows, alpha=2)  # Σ_j G_ij ŷ_j, with the −2δ_ij term
        gy_rows.sub_(sxh_rows, alpha=2)  # Σ_i G_ij s·x̂_i
        proj_x = torch.linalg.vecdot(sxh_rows, gx_rows)  # [t], s·x̂_i·(Σ_j G_ij ŷ_j)
        dot += proj_x.sum()
        if inv_x is not None:  # x̂ (x̂·g) = sxh·proj_x / s²
            coef = proj_x * (norm_x[start:stop] >= _NORM_EPS) / (-scale * scale)  # [t]
            gx_rows.addcmul_(sxh_rows, coef[:, None]).mul_(inv_x[start:stop, None])
        if inv_y is not None:
            proj_y = torch.linalg.vecdot(yh_rows, gy_rows)  # [t]
            coef = -proj_y * (norm_y[start:stop] >= _NORM_EPS)  # [t]
            gy_rows.addcmul_(yh_rows, coef[:, None]).mul_(inv_y[start:stop, None])
    return dot / scale


def _row_col_lse(sxh, yh, tile, shift):
    """Row and column log-sum-exp of S = (s·x̂)·ŷᵀ, one strip of rows at a time.

    Returns r [N], c [N], the diagonal S_ii [N], the shift used for each strip [strips] (its
    maximum, or 0 when ``shift`` is False), and whether the one-exp fast path was accurate
    (else r and c were recomputed on the safe path).
    """
    n, dtype, device = yh.shape[0], yh.dtype, yh.device
    buf = torch.empty(min(tile, n), n, dtype=dtype, device=device)  # [T, N] strip
    r = torch.empty(n, dtype=dtype, device=device)  # [N]
    c = torch.full((n,), -math.inf, dtype=dtype, device=device)  # [N]
    diag = torch.empty(n, dtype=dtype, device=device)  # [N]
    ones = torch.ones(min(tile, n), dtype=dtype, device=device)  # [T]
    zero = torch.zeros((), dtype=dtype, device=device)
    shifts = []
    for start, stop in _strips(n, tile):
        s = torch.mm(sxh[start:stop], yh.T, out=buf[: stop - start])  # [t, N], S rows
        diag[start:stop] = s.diagonal(offset=start)  # [t], S_ii before s is overwritten
        m = s.max() if shift else zero  # 0-d, strip maximum
        if shift:
            s.sub_(m)
        s.exp_()  # [t, N], exp(S − m)
        r[start:stop] = s.sum(dim=1).log_().add_(m)  # [t], whole rows: final
        col = torch.mv(s.T, ones[: stop - start])  # [N], column sums (gemv beats sum(dim=0))
        torch.logaddexp(c, col.log_().add_(m), out=c)  # [N], merge columns
        shifts.append(m)
    shifts = torch.stack(shifts)  # [strips]
    if _fast_path_accurate(r, c, shifts, n, tile):
        return r, c, diag, shifts, True
    # Safe path: exact max shift per row and per column of each strip (two exps).
    c.fill_(-math.inf)
    for start, stop in _strips(n, tile):
        s = torch.mm(sxh[start:stop], yh.T, out=buf[: stop - start])  # [t, N]
        r[start:stop] = torch.logsumexp(s, dim=1)  # [t]
        torch.logaddexp(c, torch.logsumexp(s, dim=0), out=c)  # [N]
    return r, c, diag, shifts, False


def _fast_path_accurate(r, c, shifts, n, tile) -> bool:
    """Whether exp(S − m_strip) lost no mass that matters to any row or column lse.

    Entries below ``tiny`` (float32: e^−87.3) may flush to zero, so row i may lose up to
    ``N·tiny·e^m`` of its sum ``e^{r_i}`` and column j up to ``Σ_strips t·tiny·e^m`` of
    ``e^{c_j}``. The fast path is kept when every such ratio is below ``eps·e^−4`` (which
    also keeps the backward's factors ``e^{m−r}`` and ``e^{m−c}`` below overflow).
    One host sync per call.
    """
    finfo = torch.finfo(r.dtype)
    limit = math.log(finfo.eps) - 4.0 - math.log(finfo.tiny)  # float32: 67.4
    rows = torch.tensor([b - a for a, b in _strips(n, tile)], dtype=r.dtype, device=r.device)
    row_shift = torch.repeat_interleave(shifts, rows.long())  # [N], strip max of each row
    row_lost = math.log(n) + row_shift - r  # [N], log(lost / row sum) − log tiny
    col_lost = torch.logsumexp(shifts + rows.log(), dim=0) - c  # [N], same for columns
    worst = float(torch.maximum(row_lost.max(), col_lost.max()))
    return worst <= limit


def _strip_gradients(sxh, yh, r, c, shifts, tile, fast, shift):
    """Σ_j (p_ij + q_ij) ŷ_j [N, D] and Σ_i (p_ij + q_ij) s·x̂_i [N, D], strip by strip."""
    n, dtype = yh.shape[0], yh.dtype
    buf = torch.empty(min(tile, n), n, dtype=dtype, device=yh.device)  # [T, N]
    buf2 = torch.empty_like(buf)  # [T, N] second strip buffer
    gx = torch.empty_like(yh)  # [N, D]
    gy = torch.zeros_like(yh)  # [N, D]
    col_factor = (-c).exp_() if fast and not shift else None  # [N], e^{−c_j} (m = 0)
    for k, (start, stop) in enumerate(_strips(n, tile)):
        s = torch.mm(sxh[start:stop], yh.T, out=buf[: stop - start])  # [t, N], S rows
        w = buf2[: stop - start]  # [t, N]
        if fast:
            m = shifts[k]
            # p + q = exp(S − m) · (e^{m − r_i} + e^{m − c_j}): one exp per element
            a = (m - r[start:stop]).exp_()  # [t]
            b = (m - c).exp_() if shift else col_factor  # [N]
            torch.add(a[:, None], b[None, :], out=w)  # [t, N]
            if shift:
                s.sub_(m)
            s.exp_().mul_(w)  # [t, N], G without the diagonal
        else:
            torch.sub(s, c[None, :], out=w).exp_()  # [t, N], q
            s.sub_(r[start:stop, None]).exp_().add_(w)  # [t, N], p + q
        torch.mm(s, yh, out=gx[start:stop])  # [t, D]
        gy.addmm_(s.T, sxh[start:stop])  # [N, D]
    return gx, gy
