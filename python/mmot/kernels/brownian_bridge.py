"""Triton kernels of ``mmot::brownian_bridge_loss``: an online log-sum-exp forward and tile-recomputing backwards.

With x̂, ŷ, m̂ the (normalised) rows of a, b and mid, u = 1 − t, c = 1/(2σ²·t·u) per row, the
logits (the row constant c_i‖m̂_i‖² left out: it cancels) are

    s[i, j] = c_i (2 L_i·R_j − u_i²‖x̂_j‖² − t_i²‖ŷ_j‖² − 2u_i t_i x̂_j·ŷ_j)

with L_i = [u_i m̂_i, t_i m̂_i] and R_j = [x̂_j, ŷ_j] (2D features each): one product of width 2D
per tile, plus per-column terms. With G[i, j] = c_i ḡ_i (e^{s[i,j] − lse[i]} − δ_ij):

    forward        lse[i] = log Σ_j e^{s[i, j]}         one program per BLOCK_M rows, an online
                                                        (max, sum) over column tiles
    row backward   (G R)_i                              one program per BLOCK_M rows and BLOCK_E
                                                        of the 2D features; m̂̄ = 2u(GR)[:D] + 2t(GR)[D:]
    column backward (Gᵀ L)_j and Σ_i G[i,j]·(u_i², t_i², u_i t_i)
                                                        one program per BLOCK_N columns and
                                                        BLOCK_E features; x̂̄ = 2((GᵀL)[:D] − x̂Σu² − ŷΣut),
                                                        ŷ̄ = 2((GᵀL)[D:] − ŷΣt² − x̂Σut)

With one time t for every row, L = m̂ and R = P = u·x̂ + t·ŷ (the bridge points, formed once): the
products are D wide instead of 2D, and the same kernels run with u = 1, t = 0 and ‖P‖² as the
column term (``_Operands``). D2 below is the products' width, 2D or D.

No N×N buffer exists: extra memory is O(N·D). Accumulation is float32, or float64 for float64
inputs; fp32 products use IEEE precision (not TF32), since the logits are multiplied by c, which
grows as σ²t(1 − t) shrinks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmot.kernels import _common
from mmot.kernels._common import NEG_INF


@triton.jit
def _logits(
    L,
    R,
    XX,
    YY,
    XY,
    u,
    t,
    c,
    rows,
    cols,
    rmask,
    cmask,
    D2,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of s, the 2D features in BLOCK_D chunks; u, t, c are the rows' values."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for d0 in range(0, D2, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dmask = dims < D2
        lt = tl.load(L + rows[:, None] * D2 + dims[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        rt = tl.load(R + cols[:, None] * D2 + dims[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        acc += tl.dot(lt, tl.trans(rt), input_precision="ieee").to(ACC)
    xx = tl.load(XX + cols, mask=cmask, other=0.0)
    yy = tl.load(YY + cols, mask=cmask, other=0.0)
    xy = tl.load(XY + cols, mask=cmask, other=0.0)
    sq = (u * u)[:, None] * xx[None, :] + (t * t)[:, None] * yy[None, :] + (2.0 * u * t)[:, None] * xy[None, :]
    return c[:, None] * (2.0 * acc - sq)


@triton.jit
def _rows(U, T, C, rows, rmask):
    return (
        tl.load(U + rows, mask=rmask, other=0.0),
        tl.load(T + rows, mask=rmask, other=0.0),
        tl.load(C + rows, mask=rmask, other=0.0),
    )


@triton.jit
def _coef(s, LSE, G, rows, cols, rmask, cmask, c):
    """G[i, j] = c_i ḡ_i (e^{s − lse_i} − δ_ij) on the tile, 0 outside; exponents capped at 0
    (s ≤ lse up to the rounding of lse)."""
    lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    g = tl.load(G + rows, mask=rmask, other=0.0)
    p = tl.exp(tl.minimum(s - lse[:, None], 0.0))
    p = tl.where(rows[:, None] == cols[None, :], p - 1.0, p)
    return tl.where(rmask[:, None] & cmask[None, :], (c * g)[:, None] * p, 0.0)


@triton.jit
def _lse_kernel(
    L, R, XX, YY, XY, U, T, C, LSE, DIAG, N, D2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr
):
    """lse and s[i, i] per row, both from the same tiles (N = 1 is a loss of exactly 0)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    u, t, c = _rows(U, T, C, rows, rmask)
    m = tl.full([BLOCK_M], NEG_INF, ACC)
    acc = tl.zeros([BLOCK_M], ACC)
    diag = tl.zeros([BLOCK_M], ACC)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        s = _logits(L, R, XX, YY, XY, u, t, c, rows, cols, rmask, cmask, D2, BLOCK_M, BLOCK_N, BLOCK_D, ACC)
        diag += tl.sum(tl.where(rows[:, None] == cols[None, :], s, 0.0), axis=1)
        s = tl.where(cmask[None, :], s, NEG_INF)
        new_m = tl.maximum(m, tl.max(s, axis=1))
        safe = tl.where(new_m == NEG_INF, 0.0, new_m)
        acc = acc * tl.exp(m - safe) + tl.sum(tl.exp(s - safe[:, None]), axis=1)
        m = new_m
    lse = tl.where(m == NEG_INF, NEG_INF, m + tl.log(tl.where(acc > 0, acc, 1.0)))
    tl.store(LSE + rows, lse, mask=rmask)
    tl.store(DIAG + rows, diag, mask=rmask)


@triton.jit
def _row_grad_kernel(
    L,
    R,
    XX,
    YY,
    XY,
    U,
    T,
    C,
    LSE,
    G,
    OUT,
    N,
    D2,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    ACC: tl.constexpr,
):
    """(G R) for BLOCK_M rows and BLOCK_E of the 2D features (program axes 0 and 1)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    rmask = rows < N
    fmask = feats < D2
    u, t, c = _rows(U, T, C, rows, rmask)
    acc = tl.zeros([BLOCK_M, BLOCK_E], ACC)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        s = _logits(L, R, XX, YY, XY, u, t, c, rows, cols, rmask, cmask, D2, BLOCK_M, BLOCK_N, BLOCK_D, ACC)
        coef = _coef(s, LSE, G, rows, cols, rmask, cmask, c)
        r = tl.load(R + cols[:, None] * D2 + feats[None, :], mask=cmask[:, None] & fmask[None, :], other=0.0)
        acc += tl.dot(coef.to(ACC), r, input_precision="ieee").to(ACC)
    tl.store(OUT + rows[:, None] * D2 + feats[None, :], acc, mask=rmask[:, None] & fmask[None, :])


@triton.jit
def _column_grad_kernel(
    L,
    R,
    XX,
    YY,
    XY,
    U,
    T,
    C,
    LSE,
    G,
    OUT,
    SUMS,
    N,
    D2,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    ACC: tl.constexpr,
):
    """(Gᵀ L) for BLOCK_N columns and BLOCK_E of the 2D features (program axes 0 and 1), and, from
    the first feature block, the column sums Σ_i G[i,j]·u_i², ·t_i², ·u_i t_i into SUMS (3, N)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    feats = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    cmask = cols < N
    fmask = feats < D2
    acc = tl.zeros([BLOCK_N, BLOCK_E], ACC)
    su = tl.zeros([BLOCK_N], ACC)
    st = tl.zeros([BLOCK_N], ACC)
    sut = tl.zeros([BLOCK_N], ACC)
    for i0 in range(0, N, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        rmask = rows < N
        u, t, c = _rows(U, T, C, rows, rmask)
        s = _logits(L, R, XX, YY, XY, u, t, c, rows, cols, rmask, cmask, D2, BLOCK_M, BLOCK_N, BLOCK_D, ACC)
        coef = _coef(s, LSE, G, rows, cols, rmask, cmask, c)
        lt = tl.load(L + rows[:, None] * D2 + feats[None, :], mask=rmask[:, None] & fmask[None, :], other=0.0)
        acc += tl.dot(tl.trans(coef.to(ACC)), lt, input_precision="ieee").to(ACC)
        su += tl.sum(coef * (u * u)[:, None], axis=0)
        st += tl.sum(coef * (t * t)[:, None], axis=0)
        sut += tl.sum(coef * (u * t)[:, None], axis=0)
    tl.store(OUT + cols[:, None] * D2 + feats[None, :], acc, mask=cmask[:, None] & fmask[None, :])
    if tl.program_id(1) == 0:
        tl.store(SUMS + cols, su, mask=cmask)
        tl.store(SUMS + N + cols, st, mask=cmask)
        tl.store(SUMS + 2 * N + cols, sut, mask=cmask)


class _Tiles:
    """Tile sizes as ``info_nce``'s: rows × columns of the logits, the feature chunk of their
    products, and the output features one backward program holds (of the 2D concatenated ones)."""

    def __init__(self, d2: int, dtype: torch.dtype):
        wide = dtype == torch.float64
        if _common.interpreting():  # the smallest tiles tl.dot takes: tests span several of each
            self.m = self.n = self.d = self.e = self.m_col = self.e_col = 16
            self.warps = 4
            return
        self.m, self.n = (32, 32) if wide else (64, 32)
        # The column backward also holds three column sums: 64-row tiles, or 256 fp32 features,
        # spill on sm_80.
        self.m_col = 32
        self.d = 16
        self.e = min(128 if wide else 256, max(16, triton.next_power_of_2(d2)))
        # 64 fp32 features spill 4 bytes on sm_90 where 128 do not (a ptxas allocation quirk).
        self.e_col = 128 if 32 < d2 <= 128 else min(128, self.e)
        self.warps = 8


class _Operands:
    """The unit (or raw) rows in the accumulation dtype, with the kernels' operands: L, R, the
    per-column ‖x̂‖², ‖ŷ‖², x̂·ŷ, and per row u, t, c.

    With one time t for every row (``uniform``) the bridge points P_j = u·x̂_j + t·ŷ_j are
    formed once: L = m̂ and R = P (D features, one product per tile instead of two), ‖P‖² in
    the first column term and the others 0, and the kernels read u = 1, t = 0; the backward
    turns their ∂P into ∂x̂ = u·∂P and ∂ŷ = t·∂P."""

    def __init__(self, a, b, mid, t, scale, normalize, uniform):
        dtype = _common.acc_dtype(a.dtype)
        x, y, m = (v.to(dtype).contiguous() for v in (a, b, mid))
        self.norms = None
        if normalize:
            (x, *rx), (y, *ry), (m, *rm) = _common.unit_rows(x), _common.unit_rows(y), _common.unit_rows(m)
            self.norms = (rx, ry, rm)
        self.x, self.y, self.m = x, y, m
        self.t = t.to(dtype).contiguous()
        self.u = (1.0 - self.t).contiguous()
        self.c = scale.to(dtype).contiguous()
        self.uniform = uniform
        if uniform:
            points = (self.u[:, None] * x + self.t[:, None] * y).contiguous()
            self.left, self.right = m, points
            zero = torch.zeros_like(self.t)
            self.terms = ((points * points).sum(-1), zero, zero)
            self.row_u, self.row_t = torch.ones_like(self.t), zero
        else:
            self.left = torch.cat((self.u[:, None] * m, self.t[:, None] * m), dim=1).contiguous()
            self.right = torch.cat((x, y), dim=1).contiguous()
            self.terms = ((x * x).sum(-1), (y * y).sum(-1), (x * y).sum(-1))
            self.row_u, self.row_t = self.u, self.t
        self.tiles = _Tiles(self.right.shape[1], dtype)
        self.acc = _common.tl_dtype(dtype)

    def args(self):
        return (self.left, self.right, *self.terms, self.row_u, self.row_t, self.c)

    def gradients(self, by_row, by_col, sums):
        """(∂x̂, ∂ŷ, ∂m̂) from (G R), (Gᵀ L) and the column sums Σ_i G[i,j]·(u_i², t_i², u_i t_i)."""
        su, st, sut = sums[0, :, None], sums[1, :, None], sums[2, :, None]
        if self.uniform:
            grad_p = 2.0 * (by_col - self.right * su)
            return self.u[:, None] * grad_p, self.t[:, None] * grad_p, 2.0 * by_row
        d = self.x.shape[1]
        grad_m = 2.0 * (self.u[:, None] * by_row[:, :d] + self.t[:, None] * by_row[:, d:])
        grad_x = 2.0 * (by_col[:, :d] - self.x * su - self.y * sut)
        grad_y = 2.0 * (by_col[:, d:] - self.y * st - self.x * sut)
        return grad_x, grad_y, grad_m


def forward(a, b, mid, t, scale, normalize, uniform):
    """(per-row loss in a's dtype, lse) as ``mmot::brownian_bridge_loss`` returns them."""
    ops = _Operands(a, b, mid, t, scale, normalize, uniform)
    n, d2 = ops.right.shape
    tiles = ops.tiles
    lse = _common.new_output((n,), ops.x.dtype, a.device)
    diag = _common.new_output((n,), ops.x.dtype, a.device)
    _lse_kernel[(triton.cdiv(n, tiles.m),)](
        *ops.args(),
        lse,
        diag,
        n,
        d2,
        BLOCK_M=tiles.m,
        BLOCK_N=tiles.n,
        BLOCK_D=tiles.d,
        ACC=ops.acc,
        num_warps=tiles.warps,
        maxnreg=_common.MAX_REGISTERS,
    )
    return (lse - diag).to(a.dtype), lse


def backward(grad, a, b, mid, t, scale, lse, normalize, uniform):
    """Gradients for a, b and mid of Σ grad · loss, recomputing the logit tiles."""
    ops = _Operands(a, b, mid, t, scale, normalize, uniform)
    n, d2 = ops.right.shape
    tiles = ops.tiles
    dtype = ops.x.dtype
    g = grad.to(dtype).contiguous()
    lse = lse.to(dtype).contiguous()
    common = dict(
        BLOCK_N=tiles.n,
        BLOCK_D=tiles.d,
        ACC=ops.acc,
        num_warps=tiles.warps,
        maxnreg=_common.MAX_REGISTERS,
    )
    by_row = _common.new_output((n, d2), dtype, a.device)
    _row_grad_kernel[(triton.cdiv(n, tiles.m), triton.cdiv(d2, tiles.e))](
        *ops.args(), lse, g, by_row, n, d2, BLOCK_M=tiles.m, BLOCK_E=tiles.e, **common
    )
    by_col = _common.new_output((n, d2), dtype, a.device)
    sums = _common.new_output((3, n), dtype, a.device)
    _column_grad_kernel[(triton.cdiv(n, tiles.n), triton.cdiv(d2, tiles.e_col))](
        *ops.args(), lse, g, by_col, sums, n, d2, BLOCK_M=tiles.m_col, BLOCK_E=tiles.e_col, **common
    )
    grad_x, grad_y, grad_m = ops.gradients(by_row, by_col, sums)
    if normalize:
        (rx, ry, rm) = ops.norms
        grad_x = _common.through_normalize(ops.x, *rx, grad_x)
        grad_y = _common.through_normalize(ops.y, *ry, grad_y)
        grad_m = _common.through_normalize(ops.m, *rm, grad_m)
    return [grad_x.to(a.dtype), grad_y.to(b.dtype), grad_m.to(mid.dtype)]
