"""Triton kernels of ``mmot::info_nce``: an online log-sum-exp forward and a tile-recomputing backward.

With x̂, ŷ the (normalised) rows, s = x̂ ŷᵀ · scale (scale = 1/τ) and w the 0/1 pair weights:

    forward   lse_x[i] = log Σ_j w_j exp(s[i, j])          one program per BLOCK_M rows, an
                                                          online (max, sum) over column tiles
    backward  ∂x̂_i = scale · Σ_j G[i, j] ŷ_j               one program per BLOCK_M rows and
                                                          BLOCK_E features, the tiles of s
                                                          recomputed
    G[i, j] = w_i w_j (OWN · g_i e^{s − lse_x[i]} + OTHER · g_j e^{s − lse_y[j]}) − δ_ij g_i w_i (OWN + OTHER)

The loss's row direction uses (x, y) = (a, b), the column direction (b, a); the gradient for
a is the pass over a's rows with OWN = 1, OTHER = symmetric, the one for b the pass over b's
rows with OWN = symmetric, OTHER = 1. No N×N buffer exists: extra memory is O(N·D) (the
normalised copies) plus O(N). The copies are normalised scale-safely (each row multiplied by the
power of two at its largest magnitude first, as ``mmot.reference.unit_rows``), and the gradient
meets 1/τ last, after the normalisation's adjoint, so that only a gradient beyond the dtype
overflows. Accumulation is float32, or float64 for float64 inputs; fp32
products use IEEE precision (not TF32), since logits are divided by τ as small as 0.05.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmot.kernels import _common
from mmot.kernels._common import NEG_INF, scalar


@triton.jit
def _logits(
    X, Y, rows, cols, rmask, cmask, D, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr
):
    """One tile of s = x̂ ŷᵀ · scale, the features in BLOCK_D chunks: registers and shared memory stay
    bounded whatever D is."""
    s = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dmask = dims < D
        x = tl.load(X + rows[:, None] * D + dims[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        y = tl.load(Y + cols[:, None] * D + dims[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        s += tl.dot(x, tl.trans(y), input_precision="ieee").to(ACC)
    return s * scale


@triton.jit
def _lse_kernel(
    X, Y, W, LSE, N, D, scale: tl.float64, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr
):
    scale = scalar(scale, ACC)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    m = tl.full([BLOCK_M], NEG_INF, ACC)
    acc = tl.zeros([BLOCK_M], ACC)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        w = tl.load(W + cols, mask=cmask, other=0.0)
        s = _logits(X, Y, rows, cols, rmask, cmask, D, scale, BLOCK_M, BLOCK_N, BLOCK_D, ACC)
        s = tl.where((cmask & (w != 0))[None, :], s, NEG_INF)
        new_m = tl.maximum(m, tl.max(s, axis=1))
        safe = tl.where(new_m == NEG_INF, 0.0, new_m)
        acc = acc * tl.exp(m - safe) + tl.sum(tl.exp(s - safe[:, None]), axis=1)
        m = new_m
    lse = tl.where(m == NEG_INF, NEG_INF, m + tl.log(tl.where(acc > 0, acc, 1.0)))
    tl.store(LSE + rows, lse, mask=rmask)


@triton.jit
def _grad_kernel(
    X,
    Y,
    W,
    G,
    LSE_X,
    LSE_Y,
    OUT,
    N,
    D,
    scale: tl.float64,
    OWN: tl.constexpr,
    OTHER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    ACC: tl.constexpr,
):
    """τ·∂x̂ for BLOCK_M rows and BLOCK_E of the D output features (program axes 0 and 1): the
    caller multiplies by 1/τ last."""
    scale = scalar(scale, ACC)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    rmask = rows < N
    fmask = feats < D
    w_row = tl.load(W + rows, mask=rmask, other=0.0).to(ACC)
    g_row = tl.load(G + rows, mask=rmask, other=0.0).to(ACC)
    lse_row = tl.load(LSE_X + rows, mask=rmask, other=0.0).to(ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_E], ACC)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        w_col = tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
        s = _logits(X, Y, rows, cols, rmask, cmask, D, scale, BLOCK_M, BLOCK_N, BLOCK_D, ACC)
        coef = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        # Exponents capped at 0 (s ≤ lse): at logits near finfo.max the log-sum-exps' rounding
        # (lse_y from the transposed tiles) would otherwise give e^{1e31} = inf.
        if OWN:
            coef += g_row[:, None] * tl.exp(tl.minimum(s - lse_row[:, None], 0.0))
        if OTHER:
            g_col = tl.load(G + cols, mask=cmask, other=0.0).to(ACC)
            lse_col = tl.load(LSE_Y + cols, mask=cmask, other=0.0).to(ACC)
            coef += g_col[None, :] * tl.exp(tl.minimum(s - lse_col[None, :], 0.0))
        live = ((w_row != 0) & rmask)[:, None] & ((w_col != 0) & cmask)[None, :]
        diag = rows[:, None] == cols[None, :]
        coef = tl.where(live, coef, 0.0)
        coef = tl.where(live & diag, coef - (g_row * (OWN + OTHER))[:, None], coef)
        y = tl.load(Y + cols[:, None] * D + feats[None, :], mask=cmask[:, None] & fmask[None, :], other=0.0)
        acc += tl.dot(coef.to(ACC), y, input_precision="ieee").to(ACC)
    tl.store(OUT + rows[:, None] * D + feats[None, :], acc, mask=rmask[:, None] & fmask[None, :])


class _Tiles:
    """Tile sizes: rows × columns of the logits, the feature chunk of their products, and the
    output features one backward program holds: 256 in float32 and 128 in float64, so up to
    D = 256 each logit is computed once per direction, and a wider D is split over programs that
    each recompute the logits (twice at D = 512): the price of bounded registers."""

    def __init__(self, d: int, dtype: torch.dtype):
        wide = dtype == torch.float64
        if _common.interpreting():  # the smallest tiles tl.dot takes: tests span several of each
            self.m = self.n = self.d = self.e = 16
            self.warps = 4
            return
        self.m, self.n = (32, 32) if wide else (64, 32)
        self.d = 16
        self.e = min(128 if wide else 256, max(16, triton.next_power_of_2(d)))
        # The accumulator and the logits tile over 8 warps, up to 255 registers each (ptxas would
        # stop at 128 and spill): the sizes that compile without spills.
        self.warps = 8


def _prepare(a: torch.Tensor, b: torch.Tensor, normalize: bool):
    dtype = _common.acc_dtype(a.dtype)
    x, y = a.to(dtype).contiguous(), b.to(dtype).contiguous()
    if not normalize:
        return (x, None), (y, None)
    (x, *rx), (y, *ry) = _common.unit_rows(x), _common.unit_rows(y)
    return (x.contiguous(), rx), (y.contiguous(), ry)


def _lse(x, y, weights, scale):
    n, d = x.shape
    tiles = _Tiles(d, x.dtype)
    out = _common.new_output((n,), x.dtype, x.device)
    acc = _common.tl_dtype(x.dtype)
    grid = (triton.cdiv(n, tiles.m),)
    _lse_kernel[grid](
        x,
        y,
        weights,
        out,
        n,
        d,
        scale,
        BLOCK_M=tiles.m,
        BLOCK_N=tiles.n,
        BLOCK_D=tiles.d,
        ACC=acc,
        num_warps=tiles.warps,
        maxnreg=_common.MAX_REGISTERS,
    )
    return out


def forward(a, b, weights, temperature, symmetric, normalize):
    """(per-pair loss in a's dtype, lse_a, lse_b) as ``mmot::info_nce`` returns them."""
    (x, _), (y, _) = _prepare(a, b, normalize)
    w = weights.to(x.dtype).contiguous()
    scale = 1.0 / temperature
    lse_a = _lse(x, y, w, scale)
    lse_b = _lse(y, x, w, scale) if symmetric else torch.zeros_like(lse_a)
    diag = (x * y).sum(-1) * scale
    loss = lse_a - diag
    if symmetric:
        loss = loss + lse_b - diag
    loss = torch.where(w != 0, loss, torch.zeros_like(loss))
    return loss.to(a.dtype), lse_a, lse_b


def _grad(x, y, w, g, lse_x, lse_y, scale, own, other):
    n, d = x.shape
    tiles = _Tiles(d, x.dtype)
    out = _common.new_output((n, d), x.dtype, x.device)
    _grad_kernel[(triton.cdiv(n, tiles.m), triton.cdiv(d, tiles.e))](
        x,
        y,
        w,
        g,
        lse_x,
        lse_y,
        out,
        n,
        d,
        scale,
        OWN=own,
        OTHER=other,
        BLOCK_M=tiles.m,
        BLOCK_N=tiles.n,
        BLOCK_D=tiles.d,
        BLOCK_E=tiles.e,
        ACC=_common.tl_dtype(x.dtype),
        num_warps=tiles.warps,
        maxnreg=_common.MAX_REGISTERS,
    )
    return out


def backward(grad, a, b, weights, lse_a, lse_b, temperature, symmetric, normalize):
    """Gradients for a and b of Σ grad · loss, recomputing the logit tiles."""
    (x, rx), (y, ry) = _prepare(a, b, normalize)
    dtype = x.dtype
    w = weights.to(dtype).contiguous()
    g = grad.to(dtype).contiguous()
    la, lb = lse_a.to(dtype).contiguous(), lse_b.to(dtype).contiguous()
    scale = 1.0 / temperature
    # The kernels leave out 1/τ (multiplied last, below); the logits they recompute take it.
    grad_x = _grad(x, y, w, g, la, lb, scale, True, symmetric)
    grad_y = _grad(y, x, w, g, lb, la, scale, symmetric, True)
    if normalize:
        grad_x = _common.through_normalize(x, *rx, grad_x)
        grad_y = _common.through_normalize(y, *ry, grad_y)
    return [(grad_x * scale).to(a.dtype), (grad_y * scale).to(b.dtype)]
