"""Triton kernels of ``mmot::pairwise_similarity_regression`` (PCMR): masked Grams over N, row-tile
products with a D×D matrix, and the margin path's hinge tiles.

With x̂ the (normalised) rows of a modality (N × D), r the 0/1 weights of the rows a pair shares:

    Grams      G = Σ r_i x̂_i x̂_iᵀ        one program per (D×D output tile, row split), each
                                          looping over its rows; the splits' partial Grams are
                                          added in a fixed order afterwards
    products   Y = x̂ W (W D×D)           one program per (row tile, output column tile)
    hinge sum  Σ max(0, s_ij − shift)²   one program per (row tile, column tile) of the pair's
                                          similarities, masked on the diagonal and outside R;
                                          the tiles' sums added in a fixed order afterwards
    hinge grad H b̂, H_ij = max(0, s_ij − shift)   one program per (row tile, output column
                                          tile), looping over the column tiles and recomputing s

The O(N·D) and O(D²) rest (the matched similarities, ⟨G_a, G_b⟩, the row sums, the per-row terms
of the backward) is plain torch on the device (see :mod:`mmot.reverse.similarity_regression` for
the math). No float atomics, so results are reproducible. Accumulation is float32 (float64 for
float64 inputs) and fp32 products use IEEE precision: the non-match sum subtracts the matched
pairs' Σ s_ii² from ⟨G_a, G_b⟩, which TF32 would leave far off.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmot.kernels import _common

# Rows per split of the Grams' reduction over N (the splits' count depends on N alone).
SPLIT_ROWS = 4096
MAX_SPLITS = 32


@triton.jit
def _gram_kernel(X, R, OUT, N, D, rows_per_split, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """One (BLOCK_I, BLOCK_J) tile of Σ r_i x_i x_iᵀ over the rows of split s (axis 1) into OUT (splits, D, D)."""
    tiles_j = tl.cdiv(D, BLOCK_J)
    ti = tl.program_id(0) // tiles_j
    tj = tl.program_id(0) % tiles_j
    s = tl.program_id(1)
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
        w = tl.load(R + rows, mask=rmask, other=0.0)
        lt = tl.load(X + rows[None, :] * D + ci[:, None], mask=imask[:, None] & rmask[None, :], other=0.0) * w[None, :]
        rt = tl.load(X + rows[:, None] * D + cj[None, :], mask=rmask[:, None] & jmask[None, :], other=0.0)
        acc += tl.dot(lt, rt, input_precision="ieee").to(ACC)
    tl.store(OUT + s * D * D + ci[:, None] * D + cj[None, :], acc, mask=imask[:, None] & jmask[None, :])


@triton.jit
def _product_kernel(X, W, OUT, N, D, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """OUT = X W (X N×D, W D×D) for BLOCK_M rows and BLOCK_E output columns (program axes 0 and 1)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    rmask = rows < N
    cmask = cols < D
    acc = tl.zeros([BLOCK_M, BLOCK_E], ACC)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        xt = tl.load(X + rows[:, None] * D + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(W + ks[:, None] * D + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.dot(xt, wt, input_precision="ieee").to(ACC)
    tl.store(OUT + rows[:, None] * D + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _hinge(A, B, R, rows, cols, N, D, shift, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """max(0, a_i·b_j − shift) for a (rows, cols) tile, 0 on the diagonal, outside R and past N (NaN passes)."""
    rmask = rows < N
    cmask = cols < N
    s = tl.zeros([BLOCK_M, BLOCK_J], ACC)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        at = tl.load(A + rows[:, None] * D + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        bt = tl.load(B + cols[None, :] * D + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        s += tl.dot(at, bt, input_precision="ieee").to(ACC)
    wr = tl.load(R + rows, mask=rmask, other=0.0)
    wc = tl.load(R + cols, mask=cmask, other=0.0)
    valid = (rows[:, None] != cols[None, :]) & (wr[:, None] != 0.0) & (wc[None, :] != 0.0)
    h = s - shift
    return tl.where(valid & ~(h <= 0.0), h, 0.0)


@triton.jit
def _hinge_sum_kernel(
    A, B, R, OUT, N, D, shift: tl.float64, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr
):
    """Σ of the squared hinge over one (row tile, column tile) into OUT[tile]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    h = _hinge(A, B, R, rows, cols, N, D, _common.scalar(shift, ACC), BLOCK_M, BLOCK_J, BLOCK_K, ACC)
    tl.store(OUT + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(tl.sum(h * h, axis=1), axis=0))


@triton.jit
def _hinge_grad_kernel(
    A,
    B,
    R,
    OUT,
    N,
    D,
    shift: tl.float64,
    BLOCK_M: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    ACC: tl.constexpr,
):
    """OUT[rows, ecols] = Σ_j hinge_ij b_j[ecols], recomputing each similarity tile (the pair's coefficient is applied outside)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ecols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = ecols < D
    shift_acc = _common.scalar(shift, ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_E], ACC)
    for j0 in range(0, N, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        h = _hinge(A, B, R, rows, cols, N, D, shift_acc, BLOCK_M, BLOCK_J, BLOCK_K, ACC)
        bt = tl.load(B + cols[:, None] * D + ecols[None, :], mask=(cols < N)[:, None] & emask[None, :], other=0.0)
        acc += tl.dot(h, bt, input_precision="ieee").to(ACC)
    tl.store(OUT + rows[:, None] * D + ecols[None, :], acc, mask=(rows < N)[:, None] & emask[None, :])


class _Tiles:
    def __init__(self, dtype: torch.dtype):
        if _common.interpreting():  # the smallest tiles tl.dot takes: tests span several of each
            self.gram = self.rows = self.m = self.e = self.k = self.j = self.grad_j = self.grad_m = 16
            self.grad_warps = 4
            self.warps = self.hinge_warps = 4
            return
        wide = dtype == torch.float64
        self.gram = 32 if wide else 64
        self.rows = 32
        self.m, self.e, self.k, self.j = (32, 32, 32, 32) if wide else (64, 64, 32, 64)
        self.warps = 4
        # The fp32 hinge tiles spill a few bytes at 4 warps: 8 leave headroom.
        self.hinge_warps = 4 if wide else 8
        # The backward's hinge holds a similarity tile and an output tile: 32×32 similarity tiles
        # at 8 warps are the first that build without spills on sm_90 (python -m mmot.aot).
        self.grad_j = self.grad_m = 32
        self.grad_warps = 8


class _Operands:
    """The unit rows (M, N, D) in the accumulation dtype and what the normalisation's backward needs."""

    def __init__(self, x, normalize):
        dtype = _common.acc_dtype(x.dtype)
        m, n, d = x.shape
        flat = x.to(dtype).reshape(m * n, d).contiguous()
        self.norms = None
        if normalize:
            flat, recip, floored = _common.unit_rows(flat)
            self.norms = (recip, floored)
        self.flat = flat.contiguous()
        self.units = self.flat.reshape(m, n, d)
        self.tiles = _Tiles(dtype)
        self.acc = _common.tl_dtype(dtype)


def splits(n: int) -> int:
    """Row splits of the Grams' reduction: from the shape alone."""
    return max(1, min(triton.cdiv(n, SPLIT_ROWS), MAX_SPLITS))


def gram(ops: _Operands, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ r_i x̂_i x̂_iᵀ (D, D) of one modality's rows."""
    n, d = rows.shape
    s = splits(n)
    partial = _common.new_output((s, d, d), rows.dtype, rows.device)
    tiles = ops.tiles
    tiles_d = triton.cdiv(d, tiles.gram)
    _gram_kernel[(tiles_d * tiles_d, s)](
        rows,
        weights,
        partial,
        n,
        d,
        triton.cdiv(n, s),
        BLOCK_I=tiles.gram,
        BLOCK_J=tiles.gram,
        BLOCK_N=tiles.rows,
        ACC=ops.acc,
        num_warps=tiles.warps,
        maxnreg=_common.MAX_REGISTERS,
    )
    return partial[0] if s == 1 else partial.sum(0)


def product(ops: _Operands, rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x̂ W (N, D)."""
    n, d = rows.shape
    out = _common.new_output((n, d), rows.dtype, rows.device)
    tiles = ops.tiles
    _product_kernel[(triton.cdiv(n, tiles.m), triton.cdiv(d, tiles.e))](
        rows,
        w.contiguous(),
        out,
        n,
        d,
        BLOCK_M=tiles.m,
        BLOCK_E=tiles.e,
        BLOCK_K=tiles.k,
        ACC=ops.acc,
        num_warps=tiles.warps,
        maxnreg=_common.MAX_REGISTERS,
    )
    return out


def hinge_sum(ops: _Operands, a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor, shift: float) -> torch.Tensor:
    n, d = a.shape
    tiles = ops.tiles
    grid = (triton.cdiv(n, tiles.m), triton.cdiv(n, tiles.j))
    partial = _common.new_output(grid, a.dtype, a.device)
    _hinge_sum_kernel[grid](
        a,
        b,
        weights,
        partial,
        n,
        d,
        shift,
        BLOCK_M=tiles.m,
        BLOCK_J=tiles.j,
        BLOCK_K=tiles.k,
        ACC=ops.acc,
        num_warps=tiles.hinge_warps,
        maxnreg=_common.MAX_REGISTERS,
    )
    return partial.sum()


def hinge_grad(ops: _Operands, a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor, shift: float) -> torch.Tensor:
    n, d = a.shape
    tiles = ops.tiles
    out = _common.new_output((n, d), a.dtype, a.device)
    _hinge_grad_kernel[(triton.cdiv(n, tiles.grad_m), triton.cdiv(d, tiles.e))](
        a,
        b,
        weights,
        out,
        n,
        d,
        shift,
        BLOCK_M=tiles.grad_m,
        BLOCK_J=tiles.grad_j,
        BLOCK_K=tiles.k,
        BLOCK_E=tiles.e,
        ACC=ops.acc,
        num_warps=tiles.grad_warps,
        maxnreg=_common.MAX_REGISTERS,
    )
    return out


def _pairs(m: int):
    return [(p, q) for p in range(m) for q in range(p + 1, m)]


def _pair_weights(present, units, p, q):
    n = units.shape[1]
    if present is None:
        return torch.ones(n, dtype=units.dtype, device=units.device)
    return (present[p] & present[q]).to(units.dtype).contiguous()


def forward(x, present, t, u, margin, normalize):
    """(2, M, M): the [match, non-match] means of every pair p < q, as ``mmot::pairwise_similarity_regression`` returns them."""
    ops = _Operands(x, normalize)
    units = ops.units
    m = units.shape[0]
    out = torch.zeros((2, m, m), dtype=units.dtype, device=units.device)
    shared = {}
    for p, q in _pairs(m):
        a, b = units[p], units[q]
        r = _pair_weights(present, units, p, q)
        count = r.sum()
        k = count * (count - 1.0)
        diag = (a * b).sum(-1)
        out[0, p, q] = (r * (diag - t).square()).sum() / count.clamp_min(1.0)
        if margin is not None:
            out[1, p, q] = hinge_sum(ops, a, b, r, u + margin) / k.clamp_min(1.0)
            continue
        grams = []
        for idx, rows in ((p, a), (q, b)):
            if present is None:
                if idx not in shared:
                    shared[idx] = (gram(ops, rows, r), rows.sum(0))
                grams.append(shared[idx])
            else:
                grams.append((gram(ops, rows, r), (r[:, None] * rows).sum(0)))
        (ga, sa), (gb, sb) = grams
        wd = r * diag
        total = (ga * gb).sum() - (wd * diag).sum() - 2.0 * u * (sa @ sb - wd.sum()) + k * u * u
        out[1, p, q] = torch.where(k > 0, total.clamp_min(0.0) / k.clamp_min(1.0), torch.zeros_like(total))
    return out


def backward(c, x, present, t, u, margin, normalize):
    """∂/∂x of Σ c ⊙ terms for the cotangents c (2, M, M)."""
    ops = _Operands(x, normalize)
    units = ops.units
    m, n, d = units.shape
    c = c.to(units.dtype)
    grad = torch.zeros_like(units)
    mixed = torch.zeros((m, d, d), dtype=units.dtype, device=units.device) if present is None and margin is None else None
    shared = {}
    for p, q in _pairs(m):
        a, b = units[p], units[q]
        r = _pair_weights(present, units, p, q)
        count = r.sum()
        k = count * (count - 1.0)
        c0 = c[0, p, q]
        scale = torch.where(k > 0, 2.0 * c[1, p, q] / k.clamp_min(1.0), torch.zeros_like(k))
        diag = (a * b).sum(-1)
        g = 2.0 * c0 * (diag - t) / count.clamp_min(1.0)
        if margin is None:
            g = g - scale * (diag - u)
        g = g * r
        grad[p] += g[:, None] * b
        grad[q] += g[:, None] * a
        if margin is not None:
            # The pair's coefficient stays on the device (no host read).
            grad[p] += scale * hinge_grad(ops, a, b, r, u + margin)
            grad[q] += scale * hinge_grad(ops, b, a, r, u + margin)
            continue
        if mixed is not None:
            for idx, rows in ((p, a), (q, b)):
                if idx not in shared:
                    shared[idx] = (gram(ops, rows, r), rows.sum(0))
            (ga, sa), (gb, sb) = shared[p], shared[q]
            mixed[p] += scale * gb
            mixed[q] += scale * ga
            grad[p] -= (scale * u) * sb
            grad[q] -= (scale * u) * sa
            continue
        ga, gb = gram(ops, a, r), gram(ops, b, r)
        sa, sb = (r[:, None] * a).sum(0), (r[:, None] * b).sum(0)
        grad[p] += r[:, None] * (product(ops, a, scale * gb) - (scale * u) * sb)
        grad[q] += r[:, None] * (product(ops, b, scale * ga) - (scale * u) * sa)
    if mixed is not None:
        for idx in range(m):
            grad[idx] += product(ops, units[idx].contiguous(), mixed[idx])
    grad = grad.reshape(m * n, d)
    if normalize:
        grad = _common.through_normalize(ops.flat, *ops.norms, grad)
    return grad.reshape(m, n, d).to(x.dtype)
