"""Triton kernels of ``mmot::feature_separation_loss``: a split Gram forward and row-tile backwards.

With Ŝ (N, D_s) and Ĥ (N, D_h) the (normalised) rows, C = ŜᵀĤ and L = ‖C‖²_F / N²:

    forward    C             one program per (BLOCK_S, BLOCK_H) tile of C and split of the rows,
                             each looping over its rows in a fixed order into its own partial;
                             the R partials are summed by torch (a fixed-order reduction, no
                             atomics), then L = Σ (C/N)² (O(D_s·D_h))
    backward   (2g/N²) Ĥ Cᵀ  one program per BLOCK_M rows and BLOCK_E output features, the
               (2g/N²) Ŝ C   contraction in BLOCK_D chunks; the same kernel for both, C read
                             through strides (transposed for ∂Ŝ)

then through the normalisation (``_common.through_normalize``). Every sum has a fixed order
and the row splits are chosen from the shapes and the GPU's SM count (no atomics), so results
are bitwise repeatable on a given GPU model. Accumulation is float32, or float64 for
float64 inputs; fp32 products use IEEE precision (not TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmot.kernels import _common


@triton.jit
def _gram_kernel(
    S,
    H,
    OUT,
    N,
    DS,
    DH,
    ROWS_PER_SPLIT,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ACC: tl.constexpr,
):
    """Partial C[tile] over the rows of split program_id(2) into OUT[split] (R, DS, DH)."""
    fs = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    fh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    smask = fs < DS
    hmask = fh < DH
    start = split * ROWS_PER_SPLIT
    stop = tl.minimum(start + ROWS_PER_SPLIT, N)
    acc = tl.zeros([BLOCK_S, BLOCK_H], ACC)
    for i0 in range(start, stop, BLOCK_N):
        rows = i0 + tl.arange(0, BLOCK_N)
        rmask = rows < stop
        s = tl.load(S + rows[:, None] * DS + fs[None, :], mask=rmask[:, None] & smask[None, :], other=0.0)
        h = tl.load(H + rows[:, None] * DH + fh[None, :], mask=rmask[:, None] & hmask[None, :], other=0.0)
        acc += tl.dot(tl.trans(s), h, input_precision="ieee").to(ACC)
    out = OUT + split * DS * DH + fs[:, None] * DH + fh[None, :]
    tl.store(out, acc, mask=smask[:, None] & hmask[None, :])


@triton.jit
def _project_kernel(
    X,
    W,
    G,
    OUT,
    N,
    DIN,
    DOUT,
    stride_wi,
    stride_wo,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    """OUT = (2g/N²)·X W for BLOCK_M rows of X (N, DIN) and BLOCK_E columns of W (DIN, DOUT,
    element [d, e] at d·stride_wi + e·stride_wo); g = G[0]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    rmask = rows < N
    fmask = feats < DOUT
    acc = tl.zeros([BLOCK_M, BLOCK_E], ACC)
    for d0 in range(0, DIN, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dmask = dims < DIN
        x = tl.load(X + rows[:, None] * DIN + dims[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        w = tl.load(W + dims[:, None] * stride_wi + feats[None, :] * stride_wo, mask=dmask[:, None] & fmask[None, :], other=0.0)
        acc += tl.dot(x, w, input_precision="ieee").to(ACC)
    # 2g/N² as 2g·(1/N)·(1/N): N² alone would overflow int32 past N = 46340.
    inv_n = 1.0 / tl.full([], N, ACC)
    scale = 2.0 * tl.load(G).to(ACC) * inv_n * inv_n
    tl.store(OUT + rows[:, None] * DOUT + feats[None, :], acc * scale, mask=rmask[:, None] & fmask[None, :])


class _Tiles:
    """Gram tiles (features × features, rows per step) and backward tiles (rows × output
    features, contraction chunk); the smallest tl.dot takes under the interpreter, so tests span
    several of each."""

    def __init__(self, dtype: torch.dtype):
        if _common.interpreting():
            self.s = self.h = self.n = self.m = self.e = self.d = 16
            self.warps = self.project_warps = 4
            return
        wide = dtype == torch.float64
        self.s = self.h = 32 if wide else 64
        self.n = 16 if wide else 32
        self.m = self.e = 32 if wide else 64
        # The backward's fp32 IEEE products run on FMAs: a 32-wide contraction chunk at 4 warps
        # spills on sm_90 (C read transposed), 16 wide at 8 warps needs 96 registers.
        self.d = 16
        self.warps = 4
        self.project_warps = 8


class _Rows:
    """Both inputs' rows in the accumulation dtype, unit rows when normalised (with what
    ``through_normalize`` needs)."""

    def __init__(self, shared, specific, normalize):
        dtype = _common.acc_dtype(shared.dtype)
        x, y = shared.to(dtype).contiguous(), specific.to(dtype).contiguous()
        self.norms = None
        if normalize:
            (x, *rx), (y, *ry) = _common.unit_rows(x), _common.unit_rows(y)
            self.norms = (rx, ry)
        self.x, self.y = x.contiguous(), y.contiguous()
        self.dtype = dtype
        self.acc = _common.tl_dtype(dtype)
        self.tiles = _Tiles(dtype)


def forward(shared, specific, normalize):
    """(loss in shared's dtype, the Gram C in the accumulation dtype), as the op returns them."""
    rows = _Rows(shared, specific, normalize)
    (n, ds), dh = rows.x.shape, rows.y.shape[1]
    tiles = rows.tiles
    grid_s, grid_h = triton.cdiv(ds, tiles.s), triton.cdiv(dh, tiles.h)
    # Splits of the rows only where the Gram tiles alone leave the GPU idle; from shapes and SM count.
    splits = _common.programs_per_problem(grid_s * grid_h, n, tiles.n, n * ds * dh, shared.device)
    per_split = triton.cdiv(triton.cdiv(n, splits), tiles.n) * tiles.n
    splits = triton.cdiv(n, per_split)
    partials = _common.new_output((splits, ds, dh), rows.dtype, shared.device)
    _gram_kernel[(grid_s, grid_h, splits)](
        rows.x,
        rows.y,
        partials,
        n,
        ds,
        dh,
        per_split,
        BLOCK_N=tiles.n,
        BLOCK_S=tiles.s,
        BLOCK_H=tiles.h,
        ACC=rows.acc,
        num_warps=tiles.warps,
        maxnreg=_common.MAX_REGISTERS,
    )
    gram = partials[0] if splits == 1 else partials.sum(0)
    return ((gram / n).square().sum()).to(shared.dtype), gram


def backward(grad, shared, specific, gram, normalize):
    """[∂L/∂shared, ∂L/∂specific] for the upstream 0-dim ``grad``, from the saved Gram."""
    rows = _Rows(shared, specific, normalize)
    (n, ds), dh = rows.x.shape, rows.y.shape[1]
    tiles = rows.tiles
    g = grad.to(rows.dtype).reshape(1).contiguous()
    c = gram.to(rows.dtype).contiguous()
    launch = dict(
        BLOCK_M=tiles.m, BLOCK_E=tiles.e, BLOCK_D=tiles.d, ACC=rows.acc, num_warps=tiles.project_warps, maxnreg=_common.MAX_REGISTERS
    )
    grad_x = _common.new_output((n, ds), rows.dtype, shared.device)
    # ∂Ŝ = Ĥ Cᵀ: W[d, e] = C[e, d].
    _project_kernel[(triton.cdiv(n, tiles.m), triton.cdiv(ds, tiles.e))](rows.y, c, g, grad_x, n, dh, ds, 1, dh, **launch)
    grad_y = _common.new_output((n, dh), rows.dtype, shared.device)
    # ∂Ĥ = Ŝ C: W[d, e] = C[d, e].
    _project_kernel[(triton.cdiv(n, tiles.m), triton.cdiv(dh, tiles.e))](rows.x, c, g, grad_y, n, ds, dh, dh, 1, **launch)
    if normalize:
        rx, ry = rows.norms
        grad_x = _common.through_normalize(rows.x, *rx, grad_x)
        grad_y = _common.through_normalize(rows.y, *ry, grad_y)
    return [grad_x.to(shared.dtype), grad_y.to(specific.dtype)]
