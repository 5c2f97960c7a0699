"""Triton kernels of ``mmot::multi_sinkhorn``: the grouped Multi-SK forward and its exact VJP.

Slots are grouped by equal weight (the op passes the groups, formed as in
``mmot.reference.slot_groups``): group G has weight w_G, c_G slots and top_G of the last k
slots. With L = scores/eps, lE_G = w_G·L and log-potentials φ_G[a] (anchors), γ[n,a] and
ψ_G[n] (samples), iteration t is (``docs/multi_sinkhorn.md``, in logs)::

    φ_{G,t}  = log r - LSE_n (lE_G + γ_{t-1} + ψ_{G,t-1})           (γ_0 = ψ_0 = 0)
    γ_t      = -LSE_G (log c_G + lE_G + φ_{G,t} + ψ_{G,t-1})
    ψ_{G,t}  = -LSE_a (lE_G + γ_t + φ_{G,t})
    T        = Σ_G top_G C_{G,T},   C_{G,t} = exp(lE_G + γ_t + φ_{G,t} + ψ_{G,t})

Kernel structure: pass 0 is an online column log-sum-exp giving φ_1; row pass t loads a
tile of rows (groups × rows × anchors in registers), computes γ_t, ψ_t and C_t, and adds
Σ_n C_{G,t} to the next column sums: φ_{G,t+1} = φ_{G,t} + log r - log Σ_n C_{G,t}. Every
per-slot plan entry is bounded (C ≤ 1) and its column sums are at least 1/K², so this is
stable for any finite input without a host-side domain decision: the kernels take no
``log_domain`` (the plain and log domains of the reference are the same function). The last pass
writes T and its row min-max. Each iteration is one streaming pass over the scores.

Backward: the forward is re-run saving φ_{G,t} and ψ_{G,t} (O(T·G·(N+K))); γ_t is
recomputed per tile. One reverse streaming pass per iteration, with the adjoints

    W_G = -φ̄_{G,t+1}/r · A_{G,t+1}    (A = the plan after the column step, ≤ r)
    Y_G = -ψ̄_{G,t} · C_{G,t}           (ψ̄_{G,t} = Σ_a W_G + Σ_a Z_G of iteration t+1)
    Z_G = -γ̄_t · c_G B_{G,t}           (γ̄_t = Σ_G (W_G + Y_G); c_G B_G = softmax over G)
    ∂L += Σ_G w_G (W + Y + Z),  φ̄_{G,t} = Σ_n (Y_G + Z_G)

and the first reverse pass starts from the min-max VJP (ties share like torch.amin/amax).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mmot.kernels import _common
from mmot.kernels._common import NEG_INF, NOT_SPECIALIZED, POS_INF, scalar, shifted_logits


@triton.jit
def _group_vectors(
    WEIGHTS: tl.constexpr, LOG_COUNTS: tl.constexpr, TOPS: tl.constexpr, NG: tl.constexpr, BLOCK_G: tl.constexpr, ACC: tl.constexpr
):
    """(w, log c, top) as (BLOCK_G,) vectors from the constexpr group table; padded groups: 0, -inf, 0."""
    offs_g = tl.arange(0, BLOCK_G)
    w = tl.zeros([BLOCK_G], ACC)
    lc = tl.full([BLOCK_G], NEG_INF, ACC)
    top = tl.zeros([BLOCK_G], ACC)
    for i in tl.static_range(NG):
        w = tl.where(offs_g == i, WEIGHTS[i], w)
        lc = tl.where(offs_g == i, LOG_COUNTS[i], lc)
        top = tl.where(offs_g == i, TOPS[i], top)
    return w, lc, top


@triton.jit
def _load_logits(S, stride_n, stride_k, offs_n, offs_k, mask, inv_eps, w, ACC: tl.constexpr):
    """lE_G = w_G · (scores − first row) / eps for a tile, as (BLOCK_G, BLOCK_N, BLOCK_K)
    (see ``shifted_logits``; the value checks bound w_G times its range, not only the range)."""
    x = shifted_logits(S, stride_n, stride_k, offs_n, offs_k, mask, inv_eps, ACC)
    return w[:, None, None] * x[None, :, :]


@triton.jit
def _gamma(le, phi, psi_prev, lc, mask3):
    """γ = -LSE_G(log c + lE + φ + ψ_prev) and the softmax weights c_G B_G over the groups."""
    u = tl.where(mask3, lc[:, None, None] + le + phi[:, None, :] + psi_prev[:, :, None], NEG_INF)
    umax = tl.max(u, axis=0)
    umax = tl.where(umax == NEG_INF, 0.0, umax)
    e = tl.exp(u - umax[None, :, :])
    den = tl.sum(e, axis=0)
    den = tl.where(den > 0, den, 1.0)
    return -(umax + tl.log(den)), e / den[None, :, :]


@triton.jit
def _rows(le, gamma, phi, mask3, nmask):
    """ψ = -LSE_a(lE + γ + φ) per (group, row) and C = exp(lE + γ + φ + ψ)."""
    z = tl.where(mask3, le + gamma[None, :, :] + phi[:, None, :], NEG_INF)
    zmax = tl.max(z, axis=2)
    zmax = tl.where(zmax == NEG_INF, 0.0, zmax)
    pz = tl.exp(z - zmax[:, :, None])
    zs = tl.sum(pz, axis=2)
    zs = tl.where(zs > 0, zs, 1.0)
    psi = tl.where(nmask[None, :], -(zmax + tl.log(zs)), 0.0)
    return psi, pz / zs[:, :, None]


@triton.jit
def _minmax(t, kmask):
    lo = tl.min(tl.where(kmask[None, :], t, POS_INF), axis=1)
    hi = tl.max(tl.where(kmask[None, :], t, NEG_INF), axis=1)
    spread = hi - lo
    # reference.constant_rows: a row within 1024 ulps of its magnitude is constant (docs/numerics.md).
    if t.dtype == tl.float64:
        tol = 1024.0 * 2.220446049250313e-16
    else:
        tol = 1024.0 * 1.1920928955078125e-07
    valid = spread > tol * tl.maximum(tl.abs(lo), tl.abs(hi))
    return lo, hi, spread, valid


@triton.jit
def _column_lse(
    S,
    stride_n,
    stride_k,
    row_lo,
    row_hi,
    K,
    inv_eps,
    w,
    gmask,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    m = tl.full([BLOCK_G, BLOCK_K], NEG_INF, ACC)
    acc = tl.zeros([BLOCK_G, BLOCK_K], ACC)
    for n0 in range(row_lo, row_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = (offs_n < row_hi)[:, None] & kmask[None, :]
        mask3 = gmask[:, None, None] & mask[None, :, :]
        le = tl.where(mask3, _load_logits(S, stride_n, stride_k, offs_n, offs_k, mask, inv_eps, w, ACC), NEG_INF)
        new_m = tl.maximum(m, tl.max(le, axis=1))
        safe = tl.where(new_m == NEG_INF, 0.0, new_m)
        acc = acc * tl.exp(m - safe) + tl.sum(tl.exp(le - safe[:, None, :]), axis=1)
        m = new_m
    return m, acc


@triton.jit
def _row_pass(
    S,
    stride_n,
    stride_k,
    OUT,
    PSI_PREV,
    PSI,
    phi,
    t,
    row_lo,
    row_hi,
    N,
    K,
    inv_eps,
    w,
    lc,
    top,
    gmask,
    WRITE_OUT: tl.constexpr,
    MINMAX: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """Row pass of iteration t given φ_t: stores ψ_t, writes T on the last pass; returns Σ_n C_t."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, BLOCK_G)
    kmask = offs_k < K
    col = tl.zeros([BLOCK_G, BLOCK_K], ACC)
    for n0 in range(row_lo, row_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < row_hi
        mask = nmask[:, None] & kmask[None, :]
        mask3 = gmask[:, None, None] & mask[None, :, :]
        gn = offs_g[:, None] * N + offs_n[None, :]
        gnmask = gmask[:, None] & nmask[None, :]
        le = _load_logits(S, stride_n, stride_k, offs_n, offs_k, mask, inv_eps, w, ACC)
        psi_prev = tl.load(PSI_PREV + gn, mask=gnmask, other=0.0)
        gamma, _ = _gamma(le, phi, psi_prev, lc, mask3)
        psi, c = _rows(le, gamma, phi, mask3, nmask)
        tl.store(PSI + gn, psi, mask=gnmask)
        if WRITE_OUT:
            target = tl.sum(top[:, None, None] * c, axis=0)
            if MINMAX:
                lo, hi, spread, valid = _minmax(target, kmask)
                target = tl.where(valid[:, None], (target - lo[:, None]) / tl.where(valid, spread, 1.0)[:, None], 0.0)
            tl.store(OUT + offs_n[:, None] * K + offs_k[None, :], target.to(OUT.dtype.element_ty), mask=mask)
        else:
            col += tl.sum(c, axis=1)
    return col


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _multi_fwd_kernel(
    S,
    OUT,
    RMASS,
    PHI,
    PSI,
    COLSUM,
    PART,
    N,
    K,
    inv_eps: tl.float64,
    n_iters,
    pass_index,
    rows_per_program,
    R,
    psi_slots,
    stride_b,
    stride_n,
    stride_k,
    WEIGHTS: tl.constexpr,
    LOG_COUNTS: tl.constexpr,
    TOPS: tl.constexpr,
    NG: tl.constexpr,
    SINGLE: tl.constexpr,
    MINMAX: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_r = tl.program_id(1)
    inv_eps = scalar(inv_eps, ACC)
    S += pid.to(tl.int64) * stride_b
    OUT += pid.to(tl.int64) * N * K
    PHI += pid.to(tl.int64) * (n_iters + 1) * BLOCK_G * K
    PSI += pid.to(tl.int64) * psi_slots * BLOCK_G * N
    COLSUM += pid.to(tl.int64) * (n_iters + 1) * BLOCK_G * K
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, BLOCK_G)
    kmask = offs_k < K
    gmask = offs_g < NG
    gk = offs_g[:, None] * K + offs_k[None, :]
    gkmask = gmask[:, None] & kmask[None, :]
    w, lc, top = _group_vectors(WEIGHTS, LOG_COUNTS, TOPS, NG, BLOCK_G, ACC)
    log_r = tl.log(tl.load(RMASS + pid * K + offs_k, mask=kmask, other=1.0).to(ACC))
    row_lo = pid_r * rows_per_program
    row_hi = tl.minimum(row_lo + rows_per_program, N)
    slot_stride = BLOCK_G * N
    if SINGLE:
        m, acc = _column_lse(S, stride_n, stride_k, 0, N, K, inv_eps, w, gmask, BLOCK_G, BLOCK_N, BLOCK_K, ACC)
        phi = tl.where(gkmask, log_r[None, :] - m - tl.log(tl.where(gkmask, acc, 1.0)), 0.0)
        tl.store(PHI + K * BLOCK_G + gk, phi, mask=gkmask)
        for t in range(1, n_iters):
            col = _row_pass(
                S,
                stride_n,
                stride_k,
                OUT,
                PSI + ((t - 1) % psi_slots) * slot_stride,
                PSI + (t % psi_slots) * slot_stride,
                phi,
                t,
                0,
                N,
                N,
                K,
                inv_eps,
                w,
                lc,
                top,
                gmask,
                False,
                MINMAX,
                BLOCK_G,
                BLOCK_N,
                BLOCK_K,
                ACC,
            )
            phi = tl.where(gkmask, phi + log_r[None, :] - tl.log(tl.where(gkmask, col, 1.0)), 0.0)
            tl.store(PHI + (t + 1) * K * BLOCK_G + gk, phi, mask=gkmask)
            tl.debug_barrier()
        t = n_iters
        _row_pass(
            S,
            stride_n,
            stride_k,
            OUT,
            PSI + ((t - 1) % psi_slots) * slot_stride,
            PSI + (t % psi_slots) * slot_stride,
            phi,
            t,
            0,
            N,
            N,
            K,
            inv_eps,
            w,
            lc,
            top,
            gmask,
            True,
            MINMAX,
            BLOCK_G,
            BLOCK_N,
            BLOCK_K,
            ACC,
        )
    else:
        if pass_index == 0:
            m, acc = _column_lse(S, stride_n, stride_k, row_lo, row_hi, K, inv_eps, w, gmask, BLOCK_G, BLOCK_N, BLOCK_K, ACC)
            part = PART + (pid * R + pid_r).to(tl.int64) * 2 * BLOCK_G * K
            tl.store(part + gk, m, mask=gkmask)
            tl.store(part + BLOCK_G * K + gk, acc, mask=gkmask)
        else:
            t = pass_index
            if t == 1:
                phi = tl.load(PHI + K * BLOCK_G + gk, mask=gkmask, other=0.0)
            else:
                col = tl.load(COLSUM + (t - 1) * K * BLOCK_G + gk, mask=gkmask, other=1.0)
                phi = tl.load(PHI + (t - 1) * K * BLOCK_G + gk, mask=gkmask, other=0.0)
                phi = tl.where(gkmask, phi + log_r[None, :] - tl.log(col), 0.0)
                if pid_r == 0:
                    tl.store(PHI + t * K * BLOCK_G + gk, phi, mask=gkmask)
            psi_prev = PSI + ((t - 1) % psi_slots) * slot_stride
            psi_next = PSI + (t % psi_slots) * slot_stride
            if t < n_iters:
                col = _row_pass(
                    S,
                    stride_n,
                    stride_k,
                    OUT,
                    psi_prev,
                    psi_next,
                    phi,
                    t,
                    row_lo,
                    row_hi,
                    N,
                    K,
                    inv_eps,
                    w,
                    lc,
                    top,
                    gmask,
                    False,
                    MINMAX,
                    BLOCK_G,
                    BLOCK_N,
                    BLOCK_K,
                    ACC,
                )
                tl.atomic_add(COLSUM + t * K * BLOCK_G + gk, col, mask=gkmask)
            else:
                _row_pass(
                    S,
                    stride_n,
                    stride_k,
                    OUT,
                    psi_prev,
                    psi_next,
                    phi,
                    t,
                    row_lo,
                    row_hi,
                    N,
                    K,
                    inv_eps,
                    w,
                    lc,
                    top,
                    gmask,
                    True,
                    MINMAX,
                    BLOCK_G,
                    BLOCK_N,
                    BLOCK_K,
                    ACC,
                )


@triton.jit
def _combine_lse_kernel(PART, RMASS, PHI, K, R, n_iters, NG: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """φ_1 = log r - LSE over the R programs' partial (max, sum) pairs."""
    pid = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, BLOCK_G)
    gk = offs_g[:, None] * K + offs_k[None, :]
    gkmask = (offs_g < NG)[:, None] & (offs_k < K)[None, :]
    m = tl.full([BLOCK_G, BLOCK_K], NEG_INF, ACC)
    acc = tl.zeros([BLOCK_G, BLOCK_K], ACC)
    for r in range(0, R):
        part = PART + (pid * R + r).to(tl.int64) * 2 * BLOCK_G * K
        pm = tl.load(part + gk, mask=gkmask, other=NEG_INF)
        ps = tl.load(part + BLOCK_G * K + gk, mask=gkmask, other=0.0)
        new_m = tl.maximum(m, pm)
        safe = tl.where(new_m == NEG_INF, 0.0, new_m)
        acc = acc * tl.exp(m - safe) + ps * tl.exp(pm - safe)
        m = new_m
    log_r = tl.log(tl.load(RMASS + pid * K + offs_k, mask=offs_k < K, other=1.0).to(ACC))
    phi = log_r[None, :] - m - tl.log(tl.where(gkmask, acc, 1.0))
    tl.store(PHI + pid.to(tl.int64) * (n_iters + 1) * BLOCK_G * K + BLOCK_G * K + gk, phi, mask=gkmask)


@triton.jit
def _reverse_pass(
    S,
    stride_n,
    stride_k,
    GRAD,
    D,
    DS,
    RMASS,
    PHI,
    PSI,
    PSIBAR,
    phibar_next,
    t,
    row_lo,
    row_hi,
    N,
    K,
    inv_eps,
    w,
    lc,
    top,
    gmask,
    FIRST: tl.constexpr,
    FINAL: tl.constexpr,
    MINMAX: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """Reverse pass t (FIRST: t = T; FINAL: t = 0); returns this program's Σ_n for φ̄_{G,t}."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, BLOCK_G)
    kmask = offs_k < K
    gk = offs_g[:, None] * K + offs_k[None, :]
    gkmask = gmask[:, None] & kmask[None, :]
    r = tl.load(RMASS + offs_k, mask=kmask, other=1.0).to(ACC)
    col = tl.zeros([BLOCK_G, BLOCK_K], ACC)
    if FIRST:
        phi_next = tl.zeros([BLOCK_G, BLOCK_K], ACC)
    else:
        phi_next = tl.load(PHI + (t + 1) * BLOCK_G * K + gk, mask=gkmask, other=0.0)
    if FINAL:
        phi = tl.zeros([BLOCK_G, BLOCK_K], ACC)
    else:
        phi = tl.load(PHI + t * BLOCK_G * K + gk, mask=gkmask, other=0.0)
    for n0 in range(row_lo, row_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < row_hi
        mask = nmask[:, None] & kmask[None, :]
        mask3 = gmask[:, None, None] & mask[None, :, :]
        gn = offs_g[:, None] * N + offs_n[None, :]
        gnmask = gmask[:, None] & nmask[None, :]
        tile = offs_n[:, None] * K + offs_k[None, :]
        le = _load_logits(S, stride_n, stride_k, offs_n, offs_k, mask, inv_eps, w, ACC)
        if FINAL:
            # A_{G,1} = exp(lE_G + φ_{G,1}): γ_0 = ψ_0 = 0.
            a = tl.exp(tl.where(mask3, le + phi_next[:, None, :], NEG_INF))
            wadj = -(phibar_next / r[None, :])[:, None, :] * a
            dl = tl.load(D + tile, mask=mask, other=0.0) + tl.sum(w[:, None, None] * wadj, axis=0)
            tl.store(DS + tile, (dl * inv_eps).to(DS.dtype.element_ty), mask=mask)
        else:
            psi_prev = tl.load(PSI + (t - 1) * BLOCK_G * N + gn, mask=gnmask, other=0.0)
            gamma, cb = _gamma(le, phi, psi_prev, lc, mask3)
            psi, c = _rows(le, gamma, phi, mask3, nmask)
            if FIRST:
                target = tl.sum(top[:, None, None] * c, axis=0)
                grad = tl.load(GRAD + tile, mask=mask, other=0.0).to(ACC)
                if MINMAX:
                    lo, hi, spread, valid = _minmax(target, kmask)
                    d = tl.where(valid, spread, 1.0)
                    tn = (target - lo[:, None]) / d[:, None]
                    is_lo = tl.where(mask & (target == lo[:, None]), 1.0, 0.0)
                    is_hi = tl.where(mask & (target == hi[:, None]), 1.0, 0.0)
                    sum_lo = tl.sum(grad * (tn - 1.0), axis=1) / d / tl.maximum(tl.sum(is_lo, axis=1), 1.0)
                    sum_hi = -tl.sum(grad * tn, axis=1) / d / tl.maximum(tl.sum(is_hi, axis=1), 1.0)
                    grad = grad / d[:, None] + is_lo * sum_lo[:, None] + is_hi * sum_hi[:, None]
                    grad = tl.where(valid[:, None] & mask, grad, 0.0)
                x = top[:, None, None] * grad[None, :, :] * c
                u = x - tl.sum(x, axis=2)[:, :, None] * c
                dl3 = u
            else:
                # W: the column step of iteration t+1, through A_{G,t+1} = exp(lE + γ_t + φ_{t+1} + ψ_t).
                a = tl.exp(tl.where(mask3, le + gamma[None, :, :] + phi_next[:, None, :] + psi[:, :, None], NEG_INF))
                wadj = -(phibar_next / r[None, :])[:, None, :] * a
                psibar = tl.load(PSIBAR + gn, mask=gnmask, other=0.0) + tl.sum(wadj, axis=2)
                u = -psibar[:, :, None] * c
                dl3 = wadj + u
            gammabar = tl.sum(dl3, axis=0)
            z = -gammabar[None, :, :] * cb
            z = tl.where(mask3, z, 0.0)
            u = u + z
            dl3 = dl3 + z
            col += tl.sum(u, axis=1)
            tl.store(PSIBAR + gn, tl.sum(z, axis=2), mask=gnmask)
            dl = tl.sum(w[:, None, None] * dl3, axis=0)
            if not FIRST:
                dl += tl.load(D + tile, mask=mask, other=0.0)
            tl.store(D + tile, dl, mask=mask)
    return col


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _multi_bwd_kernel(
    S,
    GRAD,
    D,
    DS,
    RMASS,
    PHI,
    PSI,
    PSIBAR,
    PHIBAR,
    N,
    K,
    inv_eps: tl.float64,
    n_iters,
    pass_index,
    rows_per_program,
    stride_b,
    stride_n,
    stride_k,
    WEIGHTS: tl.constexpr,
    LOG_COUNTS: tl.constexpr,
    TOPS: tl.constexpr,
    NG: tl.constexpr,
    SINGLE: tl.constexpr,
    MINMAX: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_r = tl.program_id(1)
    inv_eps = scalar(inv_eps, ACC)
    S += pid.to(tl.int64) * stride_b
    GRAD += pid.to(tl.int64) * N * K
    D += pid.to(tl.int64) * N * K
    DS += pid.to(tl.int64) * N * K
    RMASS += pid * K
    PHI += pid.to(tl.int64) * (n_iters + 1) * BLOCK_G * K
    PSI += pid.to(tl.int64) * (n_iters + 1) * BLOCK_G * N
    PSIBAR += pid.to(tl.int64) * BLOCK_G * N
    PHIBAR += pid.to(tl.int64) * (n_iters + 1) * BLOCK_G * K
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, BLOCK_G)
    gmask = offs_g < NG
    gk = offs_g[:, None] * K + offs_k[None, :]
    gkmask = gmask[:, None] & (offs_k < K)[None, :]
    w, lc, top = _group_vectors(WEIGHTS, LOG_COUNTS, TOPS, NG, BLOCK_G, ACC)
    row_lo = pid_r * rows_per_program
    row_hi = tl.minimum(row_lo + rows_per_program, N)
    zero = tl.zeros([BLOCK_G, BLOCK_K], ACC)
    if SINGLE:
        phibar = _reverse_pass(
            S,
            stride_n,
            stride_k,
            GRAD,
            D,
            DS,
            RMASS,
            PHI,
            PSI,
            PSIBAR,
            zero,
            n_iters,
            0,
            N,
            N,
            K,
            inv_eps,
            w,
            lc,
            top,
            gmask,
            True,
            False,
            MINMAX,
            BLOCK_G,
            BLOCK_N,
            BLOCK_K,
            ACC,
        )
        for i in range(1, n_iters):
            tl.debug_barrier()
            phibar = _reverse_pass(
                S,
                stride_n,
                stride_k,
                GRAD,
                D,
                DS,
                RMASS,
                PHI,
                PSI,
                PSIBAR,
                phibar,
                n_iters - i,
                0,
                N,
                N,
                K,
                inv_eps,
                w,
                lc,
                top,
                gmask,
                False,
                False,
                MINMAX,
                BLOCK_G,
                BLOCK_N,
                BLOCK_K,
                ACC,
            )
        tl.debug_barrier()
        _reverse_pass(
            S,
            stride_n,
            stride_k,
            GRAD,
            D,
            DS,
            RMASS,
            PHI,
            PSI,
            PSIBAR,
            phibar,
            0,
            0,
            N,
            N,
            K,
            inv_eps,
            w,
            lc,
            top,
            gmask,
            False,
            True,
            MINMAX,
            BLOCK_G,
            BLOCK_N,
            BLOCK_K,
            ACC,
        )
    else:
        t = pass_index
        if t == n_iters:
            col = _reverse_pass(
                S,
                stride_n,
                stride_k,
                GRAD,
                D,
                DS,
                RMASS,
                PHI,
                PSI,
                PSIBAR,
                zero,
                t,
                row_lo,
                row_hi,
                N,
                K,
                inv_eps,
                w,
                lc,
                top,
                gmask,
                True,
                False,
                MINMAX,
                BLOCK_G,
                BLOCK_N,
                BLOCK_K,
                ACC,
            )
            tl.atomic_add(PHIBAR + t * BLOCK_G * K + gk, col, mask=gkmask)
        else:
            phibar = tl.load(PHIBAR + (t + 1) * BLOCK_G * K + gk, mask=gkmask, other=0.0)
            if t > 0:
                col = _reverse_pass(
                    S,
                    stride_n,
                    stride_k,
                    GRAD,
                    D,
                    DS,
                    RMASS,
                    PHI,
                    PSI,
                    PSIBAR,
                    phibar,
                    t,
                    row_lo,
                    row_hi,
                    N,
                    K,
                    inv_eps,
                    w,
                    lc,
                    top,
                    gmask,
                    False,
                    False,
                    MINMAX,
                    BLOCK_G,
                    BLOCK_N,
                    BLOCK_K,
                    ACC,
                )
                tl.atomic_add(PHIBAR + t * BLOCK_G * K + gk, col, mask=gkmask)
            else:
                _reverse_pass(
                    S,
                    stride_n,
                    stride_k,
                    GRAD,
                    D,
                    DS,
                    RMASS,
                    PHI,
                    PSI,
                    PSIBAR,
                    phibar,
                    0,
                    row_lo,
                    row_hi,
                    N,
                    K,
                    inv_eps,
                    w,
                    lc,
                    top,
                    gmask,
                    False,
                    True,
                    MINMAX,
                    BLOCK_G,
                    BLOCK_N,
                    BLOCK_K,
                    ACC,
                )


class _Plan:
    def __init__(self, scores: torch.Tensor, groups, backward: bool = False):
        self.n_rows, self.n_cols = scores.shape[-2:]
        self.s = scores.reshape(-1, self.n_rows, self.n_cols)
        self.n_problems = self.s.shape[0]
        self.acc = _common.acc_dtype(scores.dtype)
        self.acc_tl = _common.tl_dtype(self.acc)
        self.n_groups = len(groups)
        self.block_g = triton.next_power_of_2(self.n_groups)
        # The group table is constexpr: it shapes the kernel (NG) and stays exact (see _common).
        self.table = dict(
            WEIGHTS=tuple(float(weight) for weight, _, _ in groups),
            LOG_COUNTS=tuple(math.log(count) for _, count, _ in groups),
            TOPS=tuple(float(top) for _, _, top in groups),
            NG=self.n_groups,
        )
        self.block_k = triton.next_power_of_2(self.n_cols)
        # The reverse pass holds about twice the forward's per element: it counts rows double.
        row = self.block_g * self.block_k * (2 if backward else 1)
        self.block_n = _common.tile_rows(self.n_rows, row, self.acc)
        self.warps = _common.num_warps(self.block_n * row, self.acc)
        self.R = _common.programs_per_problem(
            self.n_problems, self.n_rows, self.block_n, self.n_rows * self.n_cols * self.block_g, scores.device
        )
        tiles = triton.cdiv(self.n_rows, self.block_n)
        self.rows_per_program = triton.cdiv(tiles, self.R) * self.block_n
        self.R = triton.cdiv(self.n_rows, self.rows_per_program)
        self.single = self.R == 1

    def strides(self):
        return self.s.stride(0), self.s.stride(1), self.s.stride(2)


def fits(n_cols: int, n_groups: int, dtype: torch.dtype, backward: bool) -> bool:
    """Whether a row of ``n_cols`` anchors for ``n_groups`` weight groups fits one tile (counted
    double for the backward, as :class:`_Plan` does); the op runs wider calls elsewhere."""
    row = triton.next_power_of_2(n_cols) * triton.next_power_of_2(n_groups) * (2 if backward else 1)
    return row <= _common.widest_row(_common.acc_dtype(dtype))


def _run_forward(plan: _Plan, eps, n_iters, anchor_mass, normalize, save: bool, shift=None, reduce=None):
    """With ``reduce`` (rows sharded over processes, ``mmot.ops._sharded``) the passes run one
    launch each and ``reduce`` sums each pass's column vectors over the ranks in place between
    launches (no host sync). The kernels centre the logits on this rank's first row; the ranks
    share the centre ``shift`` (the column maxima over every rank) through the offset
    δ_G = w_G·(first row − shift)/eps kept in this rank's φ: lE_G + φ_G is then the same on
    every rank as with the common centre, and the adjoints of φ are unchanged."""
    s = plan.s
    dev = s.device
    B, N, K, BG = plan.n_problems, plan.n_rows, plan.n_cols, plan.block_g
    out = torch.empty((B, N, K), dtype=s.dtype, device=dev)
    mass = anchor_mass.reshape(B, K).to(plan.acc).contiguous()
    psi_slots = n_iters + 1 if save else 2
    phi = torch.empty((B, n_iters + 1, BG, K), dtype=plan.acc, device=dev)
    psi = torch.empty((B, psi_slots, BG, N), dtype=plan.acc, device=dev)
    psi[:, 0].zero_()  # ψ_0 = 0
    colsum = torch.zeros((B, n_iters + 1, BG, K) if not plan.single else (1,), dtype=plan.acc, device=dev)
    part = torch.empty((B, plan.R, 2, BG, K) if not plan.single else (1,), dtype=plan.acc, device=dev)

    def launch(pass_index):
        _multi_fwd_kernel[(B, plan.R)](
            s,
            out,
            mass,
            phi,
            psi,
            colsum,
            part,
            N,
            K,
            1.0 / eps,
            n_iters,
            pass_index,
            plan.rows_per_program,
            plan.R,
            psi_slots,
            *plan.strides(),
            **plan.table,
            SINGLE=plan.single,
            MINMAX=normalize == "minmax",
            BLOCK_G=BG,
            BLOCK_N=plan.block_n,
            BLOCK_K=plan.block_k,
            ACC=plan.acc_tl,
            num_warps=plan.warps,
            maxnreg=_common.MAX_REGISTERS,
        )

    launch(0)
    if reduce is not None:
        ng = plan.n_groups
        weights = torch.tensor(plan.table["WEIGHTS"], dtype=plan.acc, device=dev)
        first = s[:, 0, :].to(plan.acc)
        delta = weights[None, :, None] * ((first - shift.reshape(B, K).to(plan.acc)) / eps)[:, None, :]  # (B, G, K)
        # Each program's (max, sum) pair of lE_G over its rows, taken to the common centre, where
        # the column maximum over all ranks is 0 (nothing overflows).
        local = (part[:, :, 1, :ng] * torch.exp(part[:, :, 0, :ng] + delta[:, None])).sum(1).contiguous()
        reduce(local)
        phi[:, 1, :ng] = torch.log(mass)[:, None, :] - torch.log(local) + delta
        for t in range(1, n_iters + 1):
            launch(t)
            if t < n_iters:
                total = colsum[:, t].contiguous()
                reduce(total)
                colsum[:, t] = total
    elif not plan.single:
        block = max(1, min(plan.block_k, 1024 // BG))
        _combine_lse_kernel[(B, triton.cdiv(K, block))](
            part, mass, phi, K, plan.R, n_iters, NG=plan.n_groups, BLOCK_G=BG, BLOCK_K=block, ACC=plan.acc_tl
        )
        for t in range(1, n_iters + 1):
            launch(t)
    return out, mass, phi, psi


def forward(scores, eps, n_iters, groups, anchor_mass, normalize, *, shift=None, reduce=None):
    """T (shape and dtype of scores) for the slot groups [(weight, slots, slots among the last k)].
    ``shift`` and ``reduce``: this rank's rows of a sharded call (see ``_run_forward``)."""
    plan = _Plan(scores, groups)
    if reduce is not None:
        plan.single = False  # one launch per pass, with the all-reduce between them
    out, *_ = _run_forward(plan, eps, n_iters, anchor_mass, normalize, save=False, shift=shift, reduce=reduce)
    return out.view(scores.shape)


def backward(grad, scores, eps, n_iters, groups, anchor_mass, normalize, *, shift=None, reduce=None):
    """∂loss/∂scores for ∂loss/∂T = grad: recompute the potentials, then the reverse passes.
    Sharded (``reduce``): each pass's φ̄ column sums are summed over the ranks between launches."""
    plan = _Plan(scores, groups, backward=True)
    if reduce is not None:
        plan.single = False
    _, mass, phi, psi = _run_forward(plan, eps, n_iters, anchor_mass, normalize, save=True, shift=shift, reduce=reduce)
    B, N, K, BG = plan.n_problems, plan.n_rows, plan.n_cols, plan.block_g
    dev = scores.device
    g = grad.reshape(B, N, K).contiguous()
    d = torch.empty((B, N, K), dtype=plan.acc, device=dev)
    ds = d if scores.dtype == plan.acc else torch.empty((B, N, K), dtype=scores.dtype, device=dev)
    psibar = torch.empty((B, BG, N), dtype=plan.acc, device=dev)
    phibar = torch.zeros((B, n_iters + 1, BG, K) if not plan.single else (1,), dtype=plan.acc, device=dev)

    def launch(pass_index):
        _multi_bwd_kernel[(B, plan.R)](
            plan.s,
            g,
            d,
            ds,
            mass,
            phi,
            psi,
            psibar,
            phibar,
            N,
            K,
            1.0 / eps,
            n_iters,
            pass_index,
            plan.rows_per_program,
            *plan.strides(),
            **plan.table,
            SINGLE=plan.single,
            MINMAX=normalize == "minmax",
            BLOCK_G=BG,
            BLOCK_N=plan.block_n,
            BLOCK_K=plan.block_k,
            ACC=plan.acc_tl,
            num_warps=plan.warps,
            maxnreg=_common.MAX_REGISTERS,
        )

    if plan.single:
        launch(n_iters)
    else:
        for t in range(n_iters, -1, -1):
            launch(t)
            if reduce is not None and t > 0:
                total = phibar[:, t].contiguous()
                reduce(total)
                phibar[:, t] = total
    return ds.view(scores.shape)
