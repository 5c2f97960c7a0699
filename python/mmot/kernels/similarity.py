"""Triton kernels of ``mmot::similarity``: scale · x̂ ŷᵀ with broadcast batch dims, and its VJP.

Forward: one program per (batch, N tile, M tile) computes the raw dot products x·yᵀ with
``tl.dot`` while accumulating the squared row norms of the very tiles it loads, then scales
the tile by scale / (max(‖x‖, 1e-12) · max(‖y‖, 1e-12)). No normalised copy is written.

Backward, with H = scale · Ḡ ⊙ (1/‖x‖)(1/‖y‖)ᵀ (per output batch b):

    v = Σ_{b using this x} H_b y_b,     ∂x = v - x̂ (x̂ · v)   (row-wise; no projection when
                                                                ‖x‖ ≤ 1e-12 or normalize=False)

and the same for y with Hᵀ. Each side is one kernel that loops over the output batches that
broadcast onto it (so the reduction over broadcast dims happens in registers), plus a small
row kernel for the projection. The inverse row norms are precomputed as O(N + M) vectors.
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
def _inv_norm(ss, NORMALIZE: tl.constexpr):
    if NORMALIZE:
        return 1.0 / tl.maximum(tl.sqrt(ss), 1e-12)
    else:
        return ss * 0.0 + 1.0


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
    acc = acc * scalar(scale, ACC)
    out = acc * _inv_norm(ssx, NORMALIZE)[:, None] * _inv_norm(ssy, NORMALIZE)[None, :]
    ptrs = OUT + b.to(tl.int64) * N * M + offs_n[:, None] * M + offs_m[None, :]
    tl.store(ptrs, out.to(OUT.dtype.element_ty), mask=nmask[:, None] & mmask[None, :])


@triton.jit
def _inv_norm_kernel(X, RN, rows, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """1 / max(‖row‖₂, 1e-12) for the rows of a contiguous (rows, D) tensor."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = offs_r < rows
    ss = tl.zeros([BLOCK_R], ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(X + offs_r[:, None].to(tl.int64) * D + offs_d[None, :], mask=rmask[:, None] & (offs_d < D)[None, :], other=0.0)
        v = v.to(ACC)
        ss += tl.sum(v * v, axis=1)
    tl.store(RN + offs_r, 1.0 / tl.maximum(tl.sqrt(ss), 1e-12), mask=rmask)


@triton.jit
def _similarity_grad_kernel(
    G,
    OTHER,
    RSELF,
    ROTHER,
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
    """v[self, p, d] = Σ_{b → self} Σ_q H_b[p, q] other_b[q, d], H = scale·Ḡ·r_self·r_other."""
    pself = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    pmask = offs_p < P
    dmask = offs_d < D
    if NORMALIZE:
        rs = tl.load(RSELF + pself.to(tl.int64) * P + offs_p, mask=pmask, other=0.0)
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
                h = h * rs[:, None] * ro[None, :]
            ot = tl.load(OTHER + o * sob + offs_q[:, None] * soq + offs_d[None, :] * sod, mask=qmask[:, None] & dmask[None, :], other=0.0)
            if CAST:
                ot = ot.to(ACC)
            else:
                h = h.to(ot.dtype)
            acc += tl.dot(h, ot, input_precision=PRECISION, out_dtype=ACC)
    acc = acc * scalar(scale, ACC)
    tl.store(V + pself.to(tl.int64) * P * D + offs_p[:, None] * D + offs_d[None, :], acc, mask=pmask[:, None] & dmask[None, :])


@triton.jit
def _project_kernel(X, V, OUT, rows, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """out = v - x̂ (x̂ · v) per row (no projection for rows with ‖x‖ ≤ 1e-12)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = offs_r < rows
    base = offs_r[:, None].to(tl.int64) * D
    ss = tl.zeros([BLOCK_R], ACC)
    xv = tl.zeros([BLOCK_R], ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (offs_d < D)[None, :]
        x = tl.load(X + base + offs_d[None, :], mask=mask, other=0.0).to(ACC)
        v = tl.load(V + base + offs_d[None, :], mask=mask, other=0.0)
        ss += tl.sum(x * x, axis=1)
        xv += tl.sum(x * v, axis=1)
    coef = tl.where(tl.sqrt(ss) > 1e-12, xv / tl.where(ss > 0, ss, 1.0), 0.0)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (offs_d < D)[None, :]
        x = tl.load(X + base + offs_d[None, :], mask=mask, other=0.0).to(ACC)
        v = tl.load(V + base + offs_d[None, :], mask=mask, other=0.0)
        tl.store(OUT + base + offs_d[None, :], (v - coef[:, None] * x).to(OUT.dtype.element_ty), mask=mask)


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
        *xs.stride(),
        *ys.stride(),
        NORMALIZE=normalize,
        CAST=cast,
        PRECISION=precision,
        BLOCK_N=bn,
        BLOCK_M=bm,
        BLOCK_D=bd,
        ACC=_common.tl_dtype(acc),
        num_warps=warps,
        maxnreg=_common.MAX_REGISTERS,
    )
    return out.view(tuple(ob) + (N, M))


def _inv_norms(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    rows, D = t.shape[0] * t.shape[1], t.shape[2]
    rn = torch.empty(t.shape[:2], dtype=acc, device=t.device)
    block_r = 16
    _inv_norm_kernel[(triton.cdiv(rows, block_r),)](t, rn, rows, D, BLOCK_R=block_r, BLOCK_D=_tile(D, 128), ACC=_common.tl_dtype(acc))
    return rn


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
    rx = _inv_norms(xs, acc) if normalize else xs.new_empty((1,), dtype=acc)
    ry = _inv_norms(ys, acc) if normalize else ys.new_empty((1,), dtype=acc)
    grads = []
    for self_t, other_t, self_index, other_index, P, Q, rs, ro, strides_g in (
        (xs, ys, xi, yi, N, M, rx, ry, (N * M, M, 1)),
        (ys, xs, yi, xi, M, N, ry, rx, (N * M, 1, M)),
    ):
        n_self = self_t.shape[0]
        # Output problems grouped by the self problem they read: each appears B / n_self times.
        bmap = torch.argsort(self_index, stable=True).to(torch.int32).contiguous()
        n_rep = B // n_self
        v = torch.empty((n_self, P, D), dtype=acc, device=x.device)
        bp, bq = _tile(P, 64), _tile(Q, 64)
        bd = _tile(D, depth)
        _similarity_grad_kernel[(n_self, triton.cdiv(P, bp), triton.cdiv(D, bd))](
            g,
            other_t,
            rs,
            ro,
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
            _project_kernel[(triton.cdiv(rows, 16),)](self_t, v, out, rows, D, BLOCK_R=16, BLOCK_D=_tile(D, 128), ACC=acc_tl)
        else:
            out = v.to(x.dtype)
        grads.append(out)
    return [grads[0].view(x.shape), grads[1].view(y.shape)]
