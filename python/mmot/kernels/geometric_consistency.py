"""Triton kernels of ``mmot::geometric_consistency``: tiled Grams over N, the two sums from them, and a row-tile backward.

With x̂, ŷ the (normalised) rows of a and b, ê = ŷ − x̂ and Z = [x̂, ê] (N × 2D, formed once):

    Grams      A = x̂ᵀx̂, F = x̂ᵀê, G = êᵀê     one program per (D×D output tile, Gram, row split),
                                              each looping over its rows; the row splits' partial
                                              Grams are added in a fixed order afterwards
    sums       T1 = 2⟨A,G⟩ − 2tr(F²),         one program over the D×D tiles in a fixed order
               T2 = 2⟨A,G⟩ + 2tr(F²) + ‖G‖² + 4⟨F,G⟩   (each clamped at 0, NaN kept)
    backward   [∂x̂, ∂ŷ] = Z W                 one program per (row tile, output column tile),
                                              W the 2D×2D matrix of
                                              :func:`mmot.reverse.geometric_consistency.backward_matrix`

No float atomics anywhere, so results are reproducible. Accumulation is float32, or float64 for
float64 inputs; fp32 products use IEEE precision (not TF32): the sums subtract products of the
size of the loss, which TF32's 10-bit mantissa would leave a few percent off.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmot.kernels import _common

# Rows per split of the Grams' reduction over N (the splits' count depends on N alone), and the
# most elements all splits' partial Grams may hold together.
SPLIT_ROWS = 4096
PARTIAL_BUDGET = 1 << 24
MAX_SPLITS = 32


@triton.jit
def _gram_kernel(Z, OUT, N, D, rows_per_split, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """One (BLOCK_I, BLOCK_J) tile of Gram g (program axis 1: 0 = x̂ᵀx̂, 1 = x̂ᵀê, 2 = êᵀê) over the
    rows of split s (axis 2) into OUT (splits, 3, D, D); axis 0 walks the tiles."""
    tiles_j = tl.cdiv(D, BLOCK_J)
    ti = tl.program_id(0) // tiles_j
    tj = tl.program_id(0) % tiles_j
    g = tl.program_id(1)
    s = tl.program_id(2)
    left = tl.where(g == 2, D, 0)  # ê's columns start at D in Z
    right = tl.where(g == 0, 0, D)
    ci = ti * BLOCK_I + tl.arange(0, BLOCK_I)
    cj = tj * BLOCK_J + tl.arange(0, BLOCK_J)
    imask = ci < D
    jmask = cj < D
    acc = tl.zeros([BLOCK_I, BLOCK_J], ACC)
    first = s * rows_per_split
    last = tl.minimum(first + rows_per_split, N)
    for r0 in range(first, last, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        rmask = rows < last
        lt = tl.load(Z + rows[None, :] * (2 * D) + (left + ci)[:, None], mask=imask[:, None] & rmask[None, :], other=0.0)
        rt = tl.load(Z + rows[:, None] * (2 * D) + (right + cj)[None, :], mask=rmask[:, None] & jmask[None, :], other=0.0)
        acc += tl.dot(lt, rt, input_precision="ieee").to(ACC)
    base = OUT + (s * 3 + g) * D * D
    tl.store(base + ci[:, None] * D + cj[None, :], acc, mask=imask[:, None] & jmask[None, :])


@triton.jit
def _terms_kernel(GRAMS, TERMS, D, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """[T1, T2] from the Grams (3, D, D), one program over the (BLOCK, BLOCK) tiles in order."""
    ag = tl.zeros([], ACC)
    ff = tl.zeros([], ACC)
    gg = tl.zeros([], ACC)
    fg = tl.zeros([], ACC)
    for i0 in range(0, D, BLOCK):
        ci = i0 + tl.arange(0, BLOCK)
        for j0 in range(0, D, BLOCK):
            cj = j0 + tl.arange(0, BLOCK)
            mask = (ci < D)[:, None] & (cj < D)[None, :]
            at = ci[:, None] * D + cj[None, :]
            a = tl.load(GRAMS + at, mask=mask, other=0.0)
            f = tl.load(GRAMS + D * D + at, mask=mask, other=0.0)
            ft = tl.load(GRAMS + D * D + cj[None, :] * D + ci[:, None], mask=mask, other=0.0)
            g = tl.load(GRAMS + 2 * D * D + at, mask=mask, other=0.0)
            ag += tl.sum(tl.sum(a * g, axis=1), axis=0)
            ff += tl.sum(tl.sum(f * ft, axis=1), axis=0)
            gg += tl.sum(tl.sum(g * g, axis=1), axis=0)
            fg += tl.sum(tl.sum(f * g, axis=1), axis=0)
    t1 = 2.0 * ag - 2.0 * ff
    t2 = 2.0 * ag + 2.0 * ff + gg + 4.0 * fg
    # Clamped at 0; a NaN fails the comparison and stays.
    tl.store(TERMS, tl.where(t1 < 0.0, 0.0, t1))
    tl.store(TERMS + 1, tl.where(t2 < 0.0, 0.0, t2))


@triton.jit
def _backward_kernel(Z, W, OUT_X, OUT_Y, N, D2, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """[OUT_X, OUT_Y] = Z W for BLOCK_M rows and BLOCK_E output columns (program axes 0 and 1)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    rmask = rows < N
    cmask = cols < D2
    acc = tl.zeros([BLOCK_M, BLOCK_E], ACC)
    for k0 in range(0, D2, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D2
        zt = tl.load(Z + rows[:, None] * D2 + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(W + ks[:, None] * D2 + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.dot(zt, wt, input_precision="ieee").to(ACC)
    # Columns below D are ∂x̂, the others ∂ŷ: two outputs, so that they alias nothing.
    d = D2 // 2
    left = (cols < d)[None, :]
    at = rows[:, None] * d + tl.where(left, cols[None, :], cols[None, :] - d)
    tl.store(tl.where(left, OUT_X + at, OUT_Y + at), acc, mask=rmask[:, None] & cmask[None, :])


class _Tiles:
    """Gram output tiles and their row chunk, the sums' tile, the backward's row and column tiles."""

    def __init__(self, dtype: torch.dtype):
        if _common.interpreting():  # the smallest tiles tl.dot takes: tests span several of each
            self.gram = self.rows = self.m = self.e = self.k = 16
            self.terms = 16
            self.warps = self.backward_warps = 4
            return
        wide = dtype == torch.float64
        self.gram = 32 if wide else 64
        self.rows = 32
        self.terms = 32
        self.m, self.e, self.k = (32, 64, 32) if wide else (64, 64, 32)
        self.warps = 4
        # The backward's fp32 tile takes about 230 registers per thread at 4 warps: 8 leave headroom.
        self.backward_warps = 4 if wide else 8


class _Operands:
    """Z = [x̂, ê] (N, 2D) in the accumulation dtype, with what the normalisation's backward needs."""

    def __init__(self, a, b, normalize):
        dtype = _common.acc_dtype(a.dtype)
        x, y = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        self.norms = None
        if normalize:
            (x, *rx), (y, *ry) = _common.unit_rows(x), _common.unit_rows(y)
            self.norms = (rx, ry)
        self.x, self.y = x, y
        self.z = torch.cat((x, y - x), dim=1).contiguous()
        self.tiles = _Tiles(dtype)
        self.acc = _common.tl_dtype(dtype)


def splits(n: int, d: int) -> int:
    """Row splits of the Grams' reduction: from the shape alone, so results never depend on the GPU."""
    budget = max(1, PARTIAL_BUDGET // max(1, 3 * d * d))
    return max(1, min(triton.cdiv(n, SPLIT_ROWS), MAX_SPLITS, budget))


def forward(a, b, normalize):
    """(terms (2,), Grams (3, D, D)) as ``mmot::geometric_consistency`` returns them."""
    ops = _Operands(a, b, normalize)
    n, d = a.shape
    tiles = ops.tiles
    dtype = ops.x.dtype
    s = splits(n, d)
    rows_per_split = triton.cdiv(n, s)
    partial = _common.new_output((s, 3, d, d), dtype, a.device)
    tiles_d = triton.cdiv(d, tiles.gram)
    _gram_kernel[(tiles_d * tiles_d, 3, s)](
        ops.z,
        partial,
        n,
        d,
        rows_per_split,
        BLOCK_I=tiles.gram,
        BLOCK_J=tiles.gram,
        BLOCK_N=tiles.rows,
        ACC=ops.acc,
        num_warps=tiles.warps,
        maxnreg=_common.MAX_REGISTERS,
    )
    grams = partial[0] if s == 1 else partial.sum(0)  # a fixed-order reduction, no atomics
    terms = _common.new_output((2,), dtype, a.device)
    _terms_kernel[(1,)](grams, terms, d, BLOCK=tiles.terms, ACC=ops.acc, num_warps=tiles.warps, maxnreg=_common.MAX_REGISTERS)
    return terms, grams


def backward_matrix(grams, c):
    """W (2D, 2D) with [∂x̂, ∂ŷ] = [x̂, ê] W (:func:`mmot.reverse.geometric_consistency.backward_matrix`), on the device."""
    a, f, g = grams.unbind(0)
    ft = f.T
    plus, minus, two = 4.0 * (c[0] + c[1]), 4.0 * (c[1] - c[0]), 4.0 * c[1]
    m1 = plus * g
    m2 = minus * f + two * g
    n1 = plus * a + two * (g + f + ft)
    n2 = minus * ft + two * g
    return torch.cat((torch.cat((m1 - n2, n2), dim=1), torch.cat((m2 - n1, n1), dim=1)), dim=0).contiguous()


def backward(c, a, b, grams, normalize):
    """Gradients for a and b of c[0]·T1 + c[1]·T2 from the forward's Grams."""
    ops = _Operands(a, b, normalize)
    n, d = a.shape
    tiles = ops.tiles
    dtype = ops.x.dtype
    w = backward_matrix(grams.to(dtype), c.to(dtype))
    grad_x = _common.new_output((n, d), dtype, a.device)
    grad_y = _common.new_output((n, d), dtype, a.device)
    _backward_kernel[(triton.cdiv(n, tiles.m), triton.cdiv(2 * d, tiles.e))](
        ops.z,
        w,
        grad_x,
        grad_y,
        n,
        2 * d,
        BLOCK_M=tiles.m,
        BLOCK_E=tiles.e,
        BLOCK_K=tiles.k,
        ACC=ops.acc,
        num_warps=tiles.backward_warps,
        maxnreg=_common.MAX_REGISTERS,
    )
    if normalize:
        rx, ry = ops.norms
        grad_x = _common.through_normalize(ops.x, *rx, grad_x)
        grad_y = _common.through_normalize(ops.y, *ry, grad_y)
    return [grad_x.to(a.dtype), grad_y.to(b.dtype)]
