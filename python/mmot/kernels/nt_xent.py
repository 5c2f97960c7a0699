"""Triton kernels of ``mmot::nt_xent`` and ``mmot::comm_loss``: the four block primitives.

Rows come in normalised, in the accumulation dtype. Two kernels cover the four primitives:

    _lse_rows_kernel   out_i = log Σ_j e^{s_ij}          (j ≠ i when SELF) one program per BLOCK_M rows,
                                                  an online (max, sum) over column tiles
    _grad_rows_kernel  out_i = Σ_j (a_i e^{s_ij − la_i} + b_j e^{s_ij − lb_j}) y_j   (j ≠ i when SELF)
                                                  one program per BLOCK_M rows and BLOCK_E features

with s = x yᵀ · scale. A cross block's column LSEs are the row LSEs of y xᵀ, and its ∂ŷ the
row pass with (x, a, la) and (y, b, lb) exchanged (Gᵀ has the same form). A self block's
gradient is the row pass with x = y = z and a = b = c (G is symmetric). Nothing N×N exists;
the gradients leave out 1/τ and the launcher multiplies by it last. fp32 products use IEEE
precision.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmot.kernels import _common
from mmot.kernels._common import NEG_INF, scalar


@triton.jit
def _tile(X, Y, rows, cols, rmask, cmask, D, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    s = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dmask = dims < D
        x = tl.load(X + rows[:, None] * D + dims[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        y = tl.load(Y + cols[:, None] * D + dims[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        s += tl.dot(x, tl.trans(y), input_precision="ieee").to(ACC)
    return s * scale


@triton.jit
def _lse_rows_kernel(
    X,
    Y,
    OUT,
    N,
    D,
    scale: tl.float64,
    SELF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    scale = scalar(scale, ACC)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    m = tl.full([BLOCK_M], NEG_INF, ACC)
    acc = tl.zeros([BLOCK_M], ACC)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        s = _tile(X, Y, rows, cols, rmask, cmask, D, scale, BLOCK_M, BLOCK_N, BLOCK_D, ACC)
        live = cmask[None, :]
        if SELF:
            live = live & (rows[:, None] != cols[None, :])
        s = tl.where(live, s, NEG_INF)
        new_m = tl.maximum(m, tl.max(s, axis=1))
        safe = tl.where(new_m == NEG_INF, 0.0, new_m)
        acc = acc * tl.exp(m - safe) + tl.sum(tl.exp(s - safe[:, None]), axis=1)
        m = new_m
    out = tl.where(m == NEG_INF, NEG_INF, m + tl.log(tl.where(acc > 0, acc, 1.0)))
    tl.store(OUT + rows, out, mask=rmask)


@triton.jit
def _grad_rows_kernel(
    X,
    Y,
    A,
    LA,
    B,
    LB,
    OUT,
    N,
    D,
    scale: tl.float64,
    SELF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    ACC: tl.constexpr,
):
    scale = scalar(scale, ACC)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    rmask = rows < N
    fmask = feats < D
    a = tl.load(A + rows, mask=rmask, other=0.0).to(ACC)
    la = tl.load(LA + rows, mask=rmask, other=0.0).to(ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_E], ACC)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        b = tl.load(B + cols, mask=cmask, other=0.0).to(ACC)
        lb = tl.load(LB + cols, mask=cmask, other=0.0).to(ACC)
        s = _tile(X, Y, rows, cols, rmask, cmask, D, scale, BLOCK_M, BLOCK_N, BLOCK_D, ACC)
        # Exponents capped at 0: every shift is at least the LSE of the block it scales.
        coef = a[:, None] * tl.exp(tl.minimum(s - la[:, None], 0.0)) + b[None, :] * tl.exp(tl.minimum(s - lb[None, :], 0.0))
        live = rmask[:, None] & cmask[None, :]
        if SELF:
            live = live & (rows[:, None] != cols[None, :])
        coef = tl.where(live, coef, 0.0)
        y = tl.load(Y + cols[:, None] * D + feats[None, :], mask=cmask[:, None] & fmask[None, :], other=0.0)
        acc += tl.dot(coef.to(ACC), y, input_precision="ieee").to(ACC)
    tl.store(OUT + rows[:, None] * D + feats[None, :], acc, mask=rmask[:, None] & fmask[None, :])


class _Tiles:
    """Rows × columns of a logit tile, the feature chunk of its product and the output features
    of one gradient program (the smallest tl.dot tiles under the interpreter)."""

    def __init__(self, d: int, dtype: torch.dtype):
        if _common.interpreting():
            self.m = self.n = self.d = self.e = 16
            self.warps = 4
            return
        wide = dtype == torch.float64
        self.m, self.n = (32, 32) if wide else (64, 32)
        self.d = 16
        self.e = min(128 if wide else 256, max(16, triton.next_power_of_2(d)))
        self.warps = 8


def fits(d: int) -> bool:
    """Any width runs (features are chunked); kept for the op's fallback rule."""
    return True


def _lse(x, y, temperature, self_block):
    n, d = x.shape
    tiles = _Tiles(d, x.dtype)
    out = _common.new_output((n,), x.dtype, x.device)
    _lse_rows_kernel[(triton.cdiv(n, tiles.m),)](
        x.contiguous(),
        y.contiguous(),
        out,
        n,
        d,
        1.0 / temperature,
        SELF=self_block,
        BLOCK_M=tiles.m,
        BLOCK_N=tiles.n,
        BLOCK_D=tiles.d,
        ACC=_common.tl_dtype(x.dtype),
        num_warps=tiles.warps,
        maxnreg=_common.MAX_REGISTERS,
    )
    return out


def _grad(x, y, a, la, b, lb, temperature, self_block):
    n, d = x.shape
    tiles = _Tiles(d, x.dtype)
    out = _common.new_output((n, d), x.dtype, x.device)
    vectors = [v.to(x.dtype).contiguous() for v in (a, la, b, lb)]
    _grad_rows_kernel[(triton.cdiv(n, tiles.m), triton.cdiv(d, tiles.e))](
        x.contiguous(),
        y.contiguous(),
        *vectors,
        out,
        n,
        d,
        1.0 / temperature,
        SELF=self_block,
        BLOCK_M=tiles.m,
        BLOCK_N=tiles.n,
        BLOCK_D=tiles.d,
        BLOCK_E=tiles.e,
        ACC=_common.tl_dtype(x.dtype),
        num_warps=tiles.warps,
        maxnreg=_common.MAX_REGISTERS,
    )
    return out / temperature


def self_lse(z, temperature):
    return _lse(z, z, temperature, True)


def cross_lse(x, y, temperature):
    return _lse(x, y, temperature, False), _lse(y, x, temperature, False)


def self_grad(z, c, shift, temperature):
    return _grad(z, z, c, shift, c, shift, temperature, True)


def cross_grad(x, y, p, lp, q, lq, temperature):
    return _grad(x, y, p, lp, q, lq, temperature, False), _grad(y, x, q, lq, p, lp, temperature, False)
