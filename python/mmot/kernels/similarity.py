"""Triton kernels of ``mmot::similarity``: scale · x̂ ŷᵀ with broadcast batch dims, and its VJP.

Forward: one program per (batch, N tile, M tile) computes the raw dot products x·yᵀ with
``tl.dot`` while accumulating the squared row norms (and largest magnitudes) of the very tiles
it loads, then multiplies the tile by 1/max(‖x‖, 1e-12), 1/max(‖y‖, 1e-12) and scale, in that
order (the cosine is formed before a large scale meets it). No normalised copy is written.
Scale-safety: when a row of the tile has a squared norm past finfo.max/8 (its raw products may
overflow) or below 1e-24 while not zero (squares and raw products underflow), the program
recomputes its tile from rows multiplied by the power of two at their largest magnitude (exact,
also in bf16), as ``mmot.reference.unit_rows`` does. Plain tiles pay only the magnitude
tracking and one branch.

Backward (per output batch b):

    v = Σ_{b using this x} Ḡ_b ŷ_b,     ∂x = scale · (v - x̂ (x̂ · v)) / ‖x‖   (row-wise; no
                                              projection when ‖x‖ ≤ 1e-12; ∂x = scale · Σ Ḡ_b y_b
                                              when normalize=False)

and the same for y with Ḡᵀ. Each side is one kernel that loops over the output batches that
broadcast onto it (so the reduction over broadcast dims happens in registers), plus a small
row kernel for the projection, which applies 1/‖x‖ and then scale last: v and x̂ are of the
size of Ḡ and 1, so neither the projection nor scale/(‖x‖‖y‖) under- or overflows before the
result does (rows of 2e152 at scale 4.2e-44 once lost the projection to a coefficient of
1e-349). The inverse row norms are precomputed as O(N + M) vectors, with a power-of-two step
per row (1 for plain rows) that the products and the projection apply to the rows first, so
that no product sees a raw magnitude past the dtype's range.
Accumulation is fp32 (fp64 for fp64 inputs); bf16/fp16 tiles feed ``tl.dot`` natively on a
GPU and are cast to fp32 under the interpreter, which has no bf16 arithmetic.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mmot.kernels import _common
from mmot.kernels._common import scalar


@triton.jit
def _pow2_step(peak, ACC: tl.constexpr):
    """2^-e for peak = f·2^e (f in [0.5, 1)), e clamped so that the step is a normal power of
    two: multiplying a row by it is exact and brings its largest magnitude near 1."""
    if ACC == tl.float64:
        e = ((peak.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1022
        k = tl.minimum(tl.maximum(-e, -1022), 1023)
        return ((k + 1023) << 52).to(tl.float64, bitcast=True)
    else:
        e = ((peak.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126
        k = tl.minimum(tl.maximum(-e, -126), 127)
        return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _needs_step(ss, peak, BIG: tl.constexpr):
    """Rows whose plain sum of squares cannot be trusted: past BIG (finfo.max/8) or below 1e-24
    (the 1e-12 floor) while not zero."""
    return (ss > BIG) | ((ss < 1e-24) & (peak > 0))


@triton.jit
def _steps(ss, peak, BIG: tl.constexpr, ACC: tl.constexpr):
    """The per-row power-of-two steps: 1 for plain rows."""
    return tl.where(_needs_step(ss, peak, BIG), _pow2_step(peak, ACC), 1.0).to(ACC)


@triton.jit
def _down_steps(peak, half, ACC: tl.constexpr):
    """Per row, 2^-s with s = max(0, e - half) for peak = f·2^e (f in [0.5, 1)): the row times
    it has no entry past 2^half (a normal power of two: exact)."""
    if ACC == tl.float64:
        e = ((peak.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1022
        s = tl.maximum(e - half, 0)
        return ((1023 - s) << 52).to(tl.float64, bitcast=True)
    else:
        e = ((peak.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126
        s = tl.maximum(e - half, 0)
        return ((127 - s) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _stepped_tile(
    X,
    Y,
    offs_n,
    offs_m,
    nmask,
    mmask,
    D,
    sxn,
    sxd,
    sym,
    syd,
    sc,
    half,
    CAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    """sc · x yᵀ of one tile without normalisation, from rows times their down-steps (no
    product or partial sum of D terms below 2^half each can overflow), scaled back row by row
    and column by column, with sc first where it is below 1 (so the partial result neither
    overflows nor underflows where the result does not)."""
    pkx = tl.zeros([BLOCK_N], ACC)
    pky = tl.zeros([BLOCK_M], ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        xt = tl.load(X + offs_n[:, None] * sxn + offs_d[None, :] * sxd, mask=nmask[:, None] & dmask[None, :], other=0.0)
        yt = tl.load(Y + offs_m[:, None] * sym + offs_d[None, :] * syd, mask=mmask[:, None] & dmask[None, :], other=0.0)
        pkx = tl.maximum(pkx, tl.max(tl.abs(xt.to(ACC)), axis=1))
        pky = tl.maximum(pky, tl.max(tl.abs(yt.to(ACC)), axis=1))
    stx = _down_steps(pkx, half, ACC)
    sty = _down_steps(pky, half, ACC)
    acc = tl.zeros([BLOCK_N, BLOCK_M], ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        xt = tl.load(X + offs_n[:, None] * sxn + offs_d[None, :] * sxd, mask=nmask[:, None] & dmask[None, :], other=0.0)
        yt = tl.load(Y + offs_m[:, None] * sym + offs_d[None, :] * syd, mask=mmask[:, None] & dmask[None, :], other=0.0)
        xf = xt.to(ACC) * stx[:, None]
        yf = yt.to(ACC) * sty[:, None]
        if CAST:
            acc += tl.dot(xf, tl.trans(yf), input_precision=PRECISION, out_dtype=ACC)
        else:
            acc += tl.dot(xf.to(xt.dtype), tl.trans(yf.to(yt.dtype)), input_precision=PRECISION, out_dtype=ACC)
    acc = tl.where(tl.abs(sc) < 1.0, acc * sc, acc)
    acc = (acc * (1.0 / stx)[:, None]) * (1.0 / sty)[None, :]
    return tl.where(tl.abs(sc) < 1.0, acc, acc * sc)


@triton.jit
def _similarity_fwd_kernel(
    X,
    Y,
    OUT,
    XI,
    YI,
    N,
    M,
    D,
    scale: tl.float64,
    half,
    sxb,
    sxn,
    sxd,
    syb,
    sym,
    syd,
    NORMALIZE: tl.constexpr,
    CAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BIG: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    nmask = offs_n < N
    mmask = offs_m < M
    X += tl.load(XI + b).to(tl.int64) * sxb
    Y += tl.load(YI + b).to(tl.int64) * syb
    acc = tl.zeros([BLOCK_N, BLOCK_M], ACC)
    ssx = tl.zeros([BLOCK_N], ACC)
    ssy = tl.zeros([BLOCK_M], ACC)
    pkx = tl.zeros([BLOCK_N], ACC)
    pky = tl.zeros([BLOCK_M], ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        xt = tl.load(X + offs_n[:, None] * sxn + offs_d[None, :] * sxd, mask=nmask[:, None] & dmask[None, :], other=0.0)
        yt = tl.load(Y + offs_m[:, None] * sym + offs_d[None, :] * syd, mask=mmask[:, None] & dmask[None, :], other=0.0)
        if CAST:
            xt = xt.to(ACC)
            yt = yt.to(ACC)
        acc += tl.dot(xt, tl.trans(yt), input_precision=PRECISION, out_dtype=ACC)
        if NORMALIZE:
            xf = xt.to(ACC)
            yf = yt.to(ACC)
            ssx += tl.sum(xf * xf, axis=1)
            ssy += tl.sum(yf * yf, axis=1)
            pkx = tl.maximum(pkx, tl.max(tl.abs(xf), axis=1))
            pky = tl.maximum(pky, tl.max(tl.abs(yf), axis=1))
    if NORMALIZE:
        floor_x = tl.full([BLOCK_N], 1e-12, ACC)
        floor_y = tl.full([BLOCK_M], 1e-12, ACC)
        redo = tl.sum(_needs_step(ssx, pkx, BIG).to(tl.int32), axis=0) + tl.sum(_needs_step(ssy, pky, BIG).to(tl.int32), axis=0)
        if redo > 0:
            # The tile again from rows times their power-of-two steps (exact): x̂ = (x·step) / max(‖x·step‖, 1e-12·step).
            stx = _steps(ssx, pkx, BIG, ACC)
            sty = _steps(ssy, pky, BIG, ACC)
            acc = tl.zeros([BLOCK_N, BLOCK_M], ACC)
            ssx = tl.zeros([BLOCK_N], ACC)
            ssy = tl.zeros([BLOCK_M], ACC)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                dmask = offs_d < D
                xt = tl.load(X + offs_n[:, None] * sxn + offs_d[None, :] * sxd, mask=nmask[:, None] & dmask[None, :], other=0.0)
                yt = tl.load(Y + offs_m[:, None] * sym + offs_d[None, :] * syd, mask=mmask[:, None] & dmask[None, :], other=0.0)
                xf = xt.to(ACC) * stx[:, None]
                yf = yt.to(ACC) * sty[:, None]
                if CAST:
                    acc += tl.dot(xf, tl.trans(yf), input_precision=PRECISION, out_dtype=ACC)
                else:
                    acc += tl.dot(xf.to(xt.dtype), tl.trans(yf.to(yt.dtype)), input_precision=PRECISION, out_dtype=ACC)
                ssx += tl.sum(xf * xf, axis=1)
                ssy += tl.sum(yf * yf, axis=1)
            floor_x = 1e-12 * stx
            floor_y = 1e-12 * sty
        acc = acc * (1.0 / tl.maximum(tl.sqrt(ssx), floor_x))[:, None]
        acc = acc * (1.0 / tl.maximum(tl.sqrt(ssy), floor_y))[None, :]
        out = acc * scalar(scale, ACC)
    else:
        out = acc * scalar(scale, ACC)
        bad = (tl.abs(acc) == float("inf")).to(tl.int32) + (acc != acc).to(tl.int32)
        if tl.sum(tl.sum(bad, axis=1), axis=0) > 0:
            # A product or partial sum overflowed: the tile again from rows scaled down by
            # powers of two (exact) so that none can, the result scaled back and scale last.
            sc = scalar(scale, ACC)
            out = _stepped_tile(
                X, Y, offs_n, offs_m, nmask, mmask, D, sxn, sxd, sym, syd, sc, half, CAST, PRECISION, BLOCK_N, BLOCK_M, BLOCK_D, ACC
            )
    ptrs = OUT + b.to(tl.int64) * N * M + offs_n[:, None] * M + offs_m[None, :]
    tl.store(ptrs, out.to(OUT.dtype.element_ty), mask=nmask[:, None] & mmask[None, :])


@triton.jit
def _row_scale_kernel(X, RN, STEP, INV, rows, D, BIG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """Per row of a contiguous (rows, D) tensor: the power-of-two step (1 for plain rows), the
    inverse 1/max(‖x·step‖, 1e-12·step) of the stepped row, and their product 1/max(‖x‖, 1e-12)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = offs_r < rows
    ss = tl.zeros([BLOCK_R], ACC)
    peak = tl.zeros([BLOCK_R], ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(X + offs_r[:, None].to(tl.int64) * D + offs_d[None, :], mask=rmask[:, None] & (offs_d < D)[None, :], other=0.0)
        v = v.to(ACC)
        ss += tl.sum(v * v, axis=1)
        peak = tl.maximum(peak, tl.max(tl.abs(v), axis=1))
    step = _steps(ss, peak, BIG, ACC)
    if tl.sum(_needs_step(ss, peak, BIG).to(tl.int32), axis=0) > 0:
        ss = tl.zeros([BLOCK_R], ACC)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            v = tl.load(X + offs_r[:, None].to(tl.int64) * D + offs_d[None, :], mask=rmask[:, None] & (offs_d < D)[None, :], other=0.0)
            v = v.to(ACC) * step[:, None]
            ss += tl.sum(v * v, axis=1)
    inv = 1.0 / tl.maximum(tl.sqrt(ss), 1e-12 * step)
    tl.store(STEP + offs_r, step, mask=rmask)
    tl.store(INV + offs_r, inv, mask=rmask)
    tl.store(RN + offs_r, inv * step, mask=rmask)


@triton.jit
def _similarity_grad_kernel(
    G,
    OTHER,
    ROTHER,
    SOTHER,
    V,
    BMAP,
    OTHER_INDEX,
    P,
    Q,
    D,
    n_rep,
    scale: tl.float64,
    sgb,
    sgp,
    sgq,
    sob,
    soq,
    sod,
    NORMALIZE: tl.constexpr,
    CAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    """v[self, p, d] = Σ_{b → self} Σ_q Ḡ_b[p, q] ô_b[q, d], ô = (other·s_other)·r_other (the other
    rows' steps s applied to the rows only where a step is not 1); times scale only without
    normalisation (the projection kernel applies 1/‖self‖ and scale otherwise)."""
    pself = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    pmask = offs_p < P
    dmask = offs_d < D
    acc = tl.zeros([BLOCK_P, BLOCK_D], ACC)
    for j in range(0, n_rep):
        b = tl.load(BMAP + pself * n_rep + j)
        o = tl.load(OTHER_INDEX + b).to(tl.int64)
        for q0 in range(0, Q, BLOCK_Q):
            offs_q = q0 + tl.arange(0, BLOCK_Q)
            qmask = offs_q < Q
            h = tl.load(
                G + b.to(tl.int64) * sgb + offs_p[:, None] * sgp + offs_q[None, :] * sgq, mask=pmask[:, None] & qmask[None, :], other=0.0
            ).to(ACC)
            if NORMALIZE:
                ro = tl.load(ROTHER + o * Q + offs_q, mask=qmask, other=0.0)
                h = h * ro[None, :]
            ot = tl.load(OTHER + o * sob + offs_q[:, None] * soq + offs_d[None, :] * sod, mask=qmask[:, None] & dmask[None, :], other=0.0)
            if NORMALIZE:
                so = tl.load(SOTHER + o * Q + offs_q, mask=qmask, other=1.0)
                if tl.sum((so != 1.0).to(tl.int32), axis=0) > 0:
                    ot = (ot.to(ACC) * so[:, None]).to(ot.dtype)
            if CAST:
                ot = ot.to(ACC)
            else:
                h = h.to(ot.dtype)
            acc += tl.dot(h, ot, input_precision=PRECISION, out_dtype=ACC)
    if not NORMALIZE:
        acc = acc * scalar(scale, ACC)
    tl.store(V + pself.to(tl.int64) * P * D + offs_p[:, None] * D + offs_d[None, :], acc, mask=pmask[:, None] & dmask[None, :])


@triton.jit
def _project_kernel(X, STEP, INV, RN, V, OUT, rows, D, scale: tl.float64, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """out = scale · (v - x̂ (x̂ · v)) / max(‖x‖, 1e-12) per row (no projection for rows with
    ‖x‖ ≤ 1e-12), x̂ = (x·step)·inv from the rows times their power-of-two steps (exact), so that
    no square overflows or underflows; 1/‖x‖ (RN) and then scale are applied last."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = offs_r < rows
    base = offs_r[:, None].to(tl.int64) * D
    step = tl.load(STEP + offs_r, mask=rmask, other=1.0)
    inv = tl.load(INV + offs_r, mask=rmask, other=0.0)
    rn = tl.load(RN + offs_r, mask=rmask, other=0.0)
    ss = tl.zeros([BLOCK_R], ACC)
    xv = tl.zeros([BLOCK_R], ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (offs_d < D)[None, :]
        x = tl.load(X + base + offs_d[None, :], mask=mask, other=0.0).to(ACC) * step[:, None]
        v = tl.load(V + base + offs_d[None, :], mask=mask, other=0.0)
        ss += tl.sum(x * x, axis=1)
        xv += tl.sum((x * inv[:, None]) * v, axis=1)
    coef = tl.where(tl.sqrt(ss) > 1e-12 * step, xv, 0.0)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (offs_d < D)[None, :]
        x = tl.load(X + base + offs_d[None, :], mask=mask, other=0.0).to(ACC) * step[:, None]
        v = tl.load(V + base + offs_d[None, :], mask=mask, other=0.0)
        out = ((v - coef[:, None] * (x * inv[:, None])) * rn[:, None]) * scalar(scale, ACC)
        tl.store(OUT + base + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=mask)


def _settings(dtype: torch.dtype, device: torch.device):
    """(CAST, PRECISION, warps, widest feature tile): how the tiles meet tl.dot for this dtype and device.

    float32 on a GPU takes three TF32 products (tf32x3), which hold about three times the
    registers of one, and float64 products twice the bytes: those tiles are shallower. Every
    tile spreads over 8 warps with up to 255 registers a thread (ptxas would stop at 128): the
    sizes that compile without spills (``python -m mmot.aot``).
    """
    if not _common.compiled_for_gpu(device):
        return True, "ieee", 4, 32 if dtype == torch.float64 else 64
    if dtype == torch.float64:
        return True, "ieee", 8, 16
    if dtype == torch.float32:
        return False, "tf32x3", 8, 16
    return False, "ieee", 8, 64  # bf16 / fp16 tiles on tensor cores, fp32 accumulation


def _batch_maps(x: torch.Tensor, y: torch.Tensor):
    """Output batch shape and, per output problem, the x and y problem it reads (on device)."""
    xb, yb = x.shape[:-2], y.shape[:-2]
    ob = torch.broadcast_shapes(xb, yb)
    dev = x.device
    xi = torch.arange(math.prod(xb), device=dev, dtype=torch.int32).reshape(xb).expand(ob).reshape(-1)
    yi = torch.arange(math.prod(yb), device=dev, dtype=torch.int32).reshape(yb).expand(ob).reshape(-1)
    return ob, xi.contiguous(), yi.contiguous()


def _tile(size: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(size)))


def forward(x: torch.Tensor, y: torch.Tensor, normalize: bool, scale: float) -> torch.Tensor:
    N, D = x.shape[-2:]
    M = y.shape[-2]
    ob, xi, yi = _batch_maps(x, y)
    xs = x.reshape((-1, N, D))
    ys = y.reshape((-1, M, D))
    B = xi.numel()
    acc = _common.acc_dtype(x.dtype)
    out = torch.empty((B, N, M), dtype=x.dtype, device=x.device)
    cast, precision, warps, depth = _settings(x.dtype, x.device)
    bn, bm = _tile(N, 64), _tile(M, 64)
    bd = _tile(D, depth)
    grid = (B, triton.cdiv(N, bn), triton.cdiv(M, bm))
    _similarity_fwd_kernel[grid](
        xs,
        ys,
        out,
        xi,
        yi,
        N,
        M,
        D,
        scale,
        _half_exponent(acc, D),
        *xs.stride(),
        *ys.stride(),
        NORMALIZE=normalize,
        CAST=cast,
        PRECISION=precision,
        BLOCK_N=bn,
        BLOCK_M=bm,
        BLOCK_D=bd,
        BIG=_big(acc),
        ACC=_common.tl_dtype(acc),
        num_warps=warps,
        maxnreg=_common.MAX_REGISTERS,
    )
    return out.view(tuple(ob) + (N, M))


def _half_exponent(acc: torch.dtype, d: int) -> int:
    """h = (emax − ⌈log2 D⌉ − 2) // 2: rows with no entry past 2^h have dot products of D terms
    whose products and partial sums stay below 2^(emax − 2) (``reference.product_steps``)."""
    emax = math.frexp(torch.finfo(acc).max)[1] - 1
    return (emax - math.ceil(math.log2(max(d, 1))) - 2) // 2


def _big(acc: torch.dtype) -> float:
    """The largest sum of squares taken plainly: raw products of two such rows stay below max/8."""
    return torch.finfo(acc).max / 8


def _row_scales(t: torch.Tensor, acc: torch.dtype):
    """(1/max(‖row‖, 1e-12), power-of-two step, inverse of the stepped row) per row of t (P, R, D)."""
    rows, D = t.shape[0] * t.shape[1], t.shape[2]
    rn, step, inv = (torch.empty(t.shape[:2], dtype=acc, device=t.device) for _ in range(3))
    block_r = 16
    _row_scale_kernel[(triton.cdiv(rows, block_r),)](
        t, rn, step, inv, rows, D, BIG=_big(acc), BLOCK_R=block_r, BLOCK_D=_tile(D, 128), ACC=_common.tl_dtype(acc)
    )
    return rn, step, inv


def backward(grad, x, y, normalize: bool, scale: float):
    N, D = x.shape[-2:]
    M = y.shape[-2]
    ob, xi, yi = _batch_maps(x, y)
    B = xi.numel()
    xs = x.reshape((-1, N, D)).contiguous()
    ys = y.reshape((-1, M, D)).contiguous()
    g = grad.reshape(B, N, M).contiguous()
    acc = _common.acc_dtype(x.dtype)
    acc_tl = _common.tl_dtype(acc)
    cast, precision, warps, depth = _settings(x.dtype, x.device)
    if normalize:
        (rx, sx, ix), (ry, sy, iy) = _row_scales(xs, acc), _row_scales(ys, acc)
    else:
        rx = sx = ix = ry = sy = iy = xs.new_empty((1,), dtype=acc)
    grads = []
    for self_t, other_t, self_index, other_index, P, Q, rs, ss, si, io, so, strides_g in (
        (xs, ys, xi, yi, N, M, rx, sx, ix, iy, sy, (N * M, M, 1)),
        (ys, xs, yi, xi, M, N, ry, sy, iy, ix, sx, (N * M, 1, M)),
    ):
        n_self = self_t.shape[0]
        # Output problems grouped by the self problem they read: each appears B / n_self times.
        bmap = torch.argsort(self_index, stable=True).to(torch.int32).contiguous()
        n_rep = B // n_self
        v = torch.empty((n_self, P, D), dtype=acc, device=x.device)
        # float64 tiles here also hold the other rows' steps: half as many of its rows per step keeps them in registers.
        bp, bq = _tile(P, 64), _tile(Q, 32 if acc == torch.float64 else 64)
        bd = _tile(D, depth)
        _similarity_grad_kernel[(n_self, triton.cdiv(P, bp), triton.cdiv(D, bd))](
            g,
            other_t,
            io,
            so,
            v,
            bmap,
            other_index,
            P,
            Q,
            D,
            n_rep,
            scale,
            *strides_g,
            *other_t.stride(),
            NORMALIZE=normalize,
            CAST=cast,
            PRECISION=precision,
            BLOCK_P=bp,
            BLOCK_Q=bq,
            BLOCK_D=bd,
            ACC=acc_tl,
            num_warps=warps,
            maxnreg=_common.MAX_REGISTERS,
        )
        if normalize:
            out = torch.empty(self_t.shape, dtype=x.dtype, device=x.device)
            rows = n_self * P
            _project_kernel[(triton.cdiv(rows, 16),)](
                self_t, ss, si, rs, v, out, rows, D, scale, BLOCK_R=16, BLOCK_D=_tile(D, 128), ACC=acc_tl
            )
        else:
            out = v.to(x.dtype)
        grads.append(out)
    return [grads[0].view(x.shape), grads[1].view(y.shape)]
