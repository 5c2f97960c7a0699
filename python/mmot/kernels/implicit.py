"""Triton kernels of the implicit Sinkhorn backwards: the adjoint of the converged fixed point.

The math and the solver are those of :mod:`mmot.reverse.implicit` (the torch backend): the
adjoint equations are the normal equations of a weighted least squares; the block that is
diagonal is eliminated exactly and the rest solved by preconditioned conjugate gradients from 0,
until the residual's 2-norm is ``tol`` times the right-hand side's (1e-7 float64, 1e-5
float32) or after 1000 iterations.

Launch structure: **persistent**, one program per problem runs the whole solve (a setup pass,
one streaming pass over the problem's rows per CG iteration, the output pass) with the CG
loop inside the kernel, so nothing synchronises with the host and the call's time depends on
the iteration count only through the loop. Each tile holds whole rows (``fits``).

* sinkhorn: the CG vectors (length K) live in registers; the row sums R and the row dots are
  recomputed in each pass from the plan tile (no row state).
* multi_sinkhorn: the plans are rebuilt from the potentials in each pass (G exponentials per
  element, nothing of size G·N·K stored); the anchor block of the CG vectors (G × K) lives in
  registers, the row block (G × N, five vectors) in a workspace, written and read back by the
  same program with a barrier between the passes.

Ragged padded batches: problem b is the block [:row_counts[b], :col_counts[b]]; loads outside
it are masked (padding may be NaN) and the output there is 0.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mmot.kernels import _common
from mmot.kernels._common import scalar

MAX_ITERS = 1000


def tolerance(dtype: torch.dtype) -> float:
    return 1e-7 if dtype == torch.float64 else 1e-5


# ---- sinkhorn ---------------------------------------------------------------------------------


@triton.jit
def _sk_tile(P, G, base, n0, K, n_b, k_b, LOAD_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask = (offs_n < n_b)[:, None] & (offs_k < k_b)[None, :]
    ptr = base + offs_n[:, None] * K + offs_k[None, :]
    p = tl.load(P + ptr, mask=mask, other=0.0).to(ACC)
    p = tl.where(mask, p, 0.0)
    if LOAD_G:
        g = tl.where(mask, tl.load(G + ptr, mask=mask, other=0.0).to(ACC), 0.0)
    else:
        g = p
    return p, g


@triton.jit
def _sinkhorn_implicit_kernel(
    G,
    P,
    OUT,
    RC,
    CC,
    ITERS,
    N,
    K,
    inv_eps_in: tl.float64,
    tau_in: tl.float64,
    tol_in: tl.float64,
    max_iters,
    BALANCED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(0)
    n_b = tl.load(RC + b).to(tl.int32)
    k_b = tl.load(CC + b).to(tl.int32)
    base = b.to(tl.int64) * N * K
    tau = scalar(tau_in, ACC)
    inv_eps = scalar(inv_eps_in, ACC)
    tol = scalar(tol_in, ACC)
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < k_b

    # Setup: C = Σ_n P; rhs = (P⊙G)ᵀ1 − Pᵀ(τ a / R).
    csum = tl.zeros([BLOCK_K], ACC)
    rhs = tl.zeros([BLOCK_K], ACC)
    for n0 in range(0, n_b, BLOCK_N):
        p, g = _sk_tile(P, G, base, n0, K, n_b, k_b, True, BLOCK_N, BLOCK_K, ACC)
        rs = tl.sum(p, axis=1)
        a = tl.sum(p * g, axis=1)
        w = tl.where(rs > 0, tau / tl.where(rs > 0, rs, 1.0), 0.0)
        csum += tl.sum(p, axis=0)
        rhs += tl.sum(p * (g - (w * a)[:, None]), axis=0)
    if BALANCED:
        rhs = tl.where(kmask, rhs - tl.sum(rhs, axis=0) / k_b.to(ACC), 0.0)
    pre = tl.where(csum > 0, tau / tl.where(csum > 0, csum, 1.0), 0.0)
    x = tl.zeros([BLOCK_K], ACC)
    r = rhs
    z = pre * r
    pv = z
    rz = tl.sum(r * z, axis=0)
    rr = tl.sum(r * r, axis=0)
    stop = tol * tol * rr
    it = tl.zeros([], tl.int32)
    active = (rr > stop) & (rz > 0)
    while active:
        q = tl.zeros([BLOCK_K], ACC)
        for n0 in range(0, n_b, BLOCK_N):
            p, _ = _sk_tile(P, G, base, n0, K, n_b, k_b, False, BLOCK_N, BLOCK_K, ACC)
            rs = tl.sum(p, axis=1)
            w = tl.where(rs > 0, tau / tl.where(rs > 0, rs, 1.0), 0.0) * tl.sum(p * pv[None, :], axis=1)
            q += tl.sum(p * w[:, None], axis=0)
        q = csum / tau * pv - q
        pq = tl.sum(pv * q, axis=0)
        ok = pq > 0
        step = tl.where(ok, rz / tl.where(ok, pq, 1.0), 0.0)
        x += step * pv
        r -= step * q
        z = pre * r
        rz_new = tl.sum(r * z, axis=0)
        rr = tl.sum(r * r, axis=0)
        it += ok.to(tl.int32)
        beta = tl.where(ok, rz_new / tl.where(ok, rz, 1.0), 0.0)
        pv = z + beta * pv
        rz = rz_new
        active = ok & (rr > stop) & (rz_new > 0) & (it < max_iters)
    tl.store(ITERS + b, it.to(tl.int64))

    # Output: α_i = τ (a_i − ⟨P_i, β⟩)/R_i, ∂S = P (G − α − β)/eps; 0 outside the block.
    for n0 in range(0, N, BLOCK_N):
        p, g = _sk_tile(P, G, base, n0, K, n_b, k_b, True, BLOCK_N, BLOCK_K, ACC)
        rs = tl.sum(p, axis=1)
        w = tl.where(rs > 0, tau / tl.where(rs > 0, rs, 1.0), 0.0)
        alpha = w * (tl.sum(p * g, axis=1) - tl.sum(p * x[None, :], axis=1))
        d = p * (g - alpha[:, None] - x[None, :]) * inv_eps
        offs_n = n0 + tl.arange(0, BLOCK_N)
        smask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
        tl.store(OUT + base + offs_n[:, None] * K + offs_k[None, :], d.to(OUT.dtype.element_ty), mask=smask)


def fits(n_cols: int, dtype: torch.dtype, n_groups: int | None = None) -> bool:
    """Whether a row of ``n_cols`` columns fits one tile: sinkhorn (``n_groups`` None), or
    Multi-SK with ``n_groups`` slot groups, whose (G, rows, K) tiles count double (the plans and
    their products live at once). The caller runs wider calls on another backend."""
    row = triton.next_power_of_2(max(1, n_cols))
    if n_groups is not None:
        row *= 2 * triton.next_power_of_2(max(1, n_groups))
    return row <= _common.widest_row(_common.acc_dtype(dtype))


def _tile(n_rows: int, row: int, acc: torch.dtype) -> tuple[int, int]:
    block_n = _common.tile_rows(n_rows, row, acc)
    return block_n, _common.num_warps(block_n * row, acc)


def sinkhorn_implicit_backward(grad, plan, row_counts, col_counts, eps: float, reach: float, *, iters=None):
    """∂L/∂scores (B, N, K) of converged Sinkhorn for ∂L/∂plan = ``grad`` (see module doc)."""
    B, N, K = plan.shape
    dtype = plan.dtype
    acc = _common.acc_dtype(dtype)
    out = torch.empty((B, N, K), dtype=dtype, device=plan.device)
    its = torch.zeros(B, dtype=torch.int64, device=plan.device)
    if B * N * K > 0:
        block_k = triton.next_power_of_2(K)
        block_n, warps = _tile(N, block_k, acc)
        tau = 1.0 if math.isinf(reach) else reach / (reach + eps)
        _sinkhorn_implicit_kernel[(B,)](
            grad.contiguous(),
            plan.contiguous(),
            out,
            row_counts.to(device=plan.device, dtype=torch.int64).contiguous(),
            col_counts.to(device=plan.device, dtype=torch.int64).contiguous(),
            its,
            N,
            K,
            1.0 / eps,
            tau,
            tolerance(dtype),
            MAX_ITERS,
            BALANCED=math.isinf(reach),
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            ACC=_common.tl_dtype(acc),
            num_warps=warps,
            maxnreg=_common.MAX_REGISTERS,
        )
    if iters is not None:
        iters.copy_(its)
    return out


# ---- multi_sinkhorn ---------------------------------------------------------------------------


@triton.jit
def _msk_plans(
    S,
    F,
    GAM,
    H,
    base,
    fbase,
    hbase,
    n0,
    N,
    K,
    n_b,
    k_b,
    w,
    present,
    inv_eps,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """P_G for a row tile as (BLOCK_G, BLOCK_N, BLOCK_K), 0 outside the block and for absent groups."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    nmask = offs_n < n_b
    kmask = offs_k < k_b
    mask2 = nmask[:, None] & kmask[None, :]
    ptr = base + offs_n[:, None] * K + offs_k[None, :]
    s = tl.where(mask2, tl.load(S + ptr, mask=mask2, other=0.0).to(ACC), 0.0)
    gm = tl.where(mask2, tl.load(GAM + ptr, mask=mask2, other=0.0).to(ACC), 0.0)
    fmask = present[:, None] & kmask[None, :]
    f = tl.where(fmask, tl.load(F + fbase + offs_g[:, None] * K + offs_k[None, :], mask=fmask, other=0.0).to(ACC), 0.0)
    hmask = present[:, None] & nmask[None, :]
    h = tl.where(hmask, tl.load(H + hbase + offs_g[:, None] * N + offs_n[None, :], mask=hmask, other=0.0).to(ACC), 0.0)
    mask3 = present[:, None, None] & mask2[None, :, :]
    logit = (w[:, None, None] * s[None, :, :] + f[:, None, :] + gm[None, :, :] + h[:, :, None]) * inv_eps
    return tl.where(mask3, tl.exp(tl.where(mask3, logit, 0.0)), 0.0), mask3, mask2


@triton.jit
def _multi_implicit_kernel(
    GR,
    S,
    F,
    GAM,
    H,
    RC,
    CC,
    CNT,
    TOP,
    OUT,
    ITERS,
    WS,
    N,
    K,
    inv_eps_in: tl.float64,
    tol_in: tl.float64,
    max_iters,
    WEIGHTS: tl.constexpr,
    NG: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(0)
    n_b = tl.load(RC + b).to(tl.int32)
    k_b = tl.load(CC + b).to(tl.int32)
    base = b.to(tl.int64) * N * K
    fbase = b.to(tl.int64) * NG * K
    hbase = b.to(tl.int64) * NG * N
    inv_eps = scalar(inv_eps_in, ACC)
    tol = scalar(tol_in, ACC)
    offs_g = tl.arange(0, BLOCK_G)
    offs_k = tl.arange(0, BLOCK_K)
    gmask = offs_g < NG
    w = tl.zeros([BLOCK_G], ACC)
    for i in tl.static_range(NG):
        w = tl.where(offs_g == i, WEIGHTS[i], w)
    cnt = tl.where(gmask, tl.load(CNT + b * NG + offs_g, mask=gmask, other=0.0).to(ACC), 0.0)
    top = tl.where(gmask, tl.load(TOP + b * NG + offs_g, mask=gmask, other=0.0).to(ACC), 0.0)
    present = cnt > 0
    several = tl.sum(present.to(tl.int32), axis=0) >= 2
    cnt_s = tl.where(present, cnt, 1.0)
    inv_cnt = tl.where(present, 1.0 / cnt_s, 0.0)
    # Workspace rows of this problem: x, r, z, p, q, pre, each (BLOCK_G, N).
    wsb = b.to(tl.int64) * 6 * BLOCK_G * N
    plane = BLOCK_G * N

    # Setup: rhs and preconditioner (α block in registers, γ block into the workspace).
    ra = tl.zeros([BLOCK_G, BLOCK_K], ACC)
    da = tl.zeros([BLOCK_G, BLOCK_K], ACC)
    rz = tl.zeros([], ACC)
    rr = tl.zeros([], ACC)
    for n0 in range(0, n_b, BLOCK_N):
        p, mask3, mask2 = _msk_plans(
            S, F, GAM, H, base, fbase, hbase, n0, N, K, n_b, k_b, w, present, inv_eps, BLOCK_G, BLOCK_N, BLOCK_K, ACC
        )
        offs_n = n0 + tl.arange(0, BLOCK_N)
        g = tl.where(mask2, tl.load(GR + base + offs_n[:, None] * K + offs_k[None, :], mask=mask2, other=0.0).to(ACC), 0.0)
        d = tl.sum(cnt_s[:, None, None] * p, axis=0)
        inv_d = tl.where(d > 0, 1.0 / tl.where(d > 0, d, 1.0), 0.0)
        u = tl.sum(top[:, None, None] * p, axis=0) * g * inv_d
        wt = p * inv_cnt[:, None, None]
        we = tl.where(mask3, wt * (top[:, None, None] * g[None, :, :] - cnt_s[:, None, None] * u[None, :, :]), 0.0)
        ra += tl.sum(we, axis=1)
        da += tl.sum(wt, axis=1)
        rg = tl.sum(we, axis=2)
        dg = tl.sum(wt, axis=2)
        preg = tl.where(dg > 0, 1.0 / tl.where(dg > 0, dg, 1.0), 0.0)
        zg = preg * rg
        wmask = gmask[:, None] & (offs_n < n_b)[None, :]
        wptr = WS + wsb + offs_g[:, None] * N + offs_n[None, :]
        tl.store(wptr + 1 * plane, rg, mask=wmask)
        tl.store(wptr + 2 * plane, zg, mask=wmask)
        tl.store(wptr + 5 * plane, preg, mask=wmask)
        rz += tl.sum(tl.sum(rg * zg, axis=1), axis=0)
        rr += tl.sum(tl.sum(rg * rg, axis=1), axis=0)
    pa_pre = tl.where(da > 0, 1.0 / tl.where(da > 0, da, 1.0), 0.0)
    xa = tl.zeros([BLOCK_G, BLOCK_K], ACC)
    za = pa_pre * ra
    pa = tl.zeros([BLOCK_G, BLOCK_K], ACC)
    rz += tl.sum(tl.sum(ra * za, axis=1), axis=0)
    rr += tl.sum(tl.sum(ra * ra, axis=1), axis=0)
    stop = tol * tol * rr
    it = tl.zeros([], tl.int32)
    beta = tl.zeros([], ACC)
    active = several & (rr > stop) & (rz > 0)
    tl.debug_barrier()
    while active:
        # p = z + beta p (β = 0 first, p = 0 in the zeroed workspace), then q = M p.
        pa = za + beta * pa
        qa = tl.zeros([BLOCK_G, BLOCK_K], ACC)
        pq = tl.zeros([], ACC)
        for n0 in range(0, n_b, BLOCK_N):
            p, mask3, mask2 = _msk_plans(
                S, F, GAM, H, base, fbase, hbase, n0, N, K, n_b, k_b, w, present, inv_eps, BLOCK_G, BLOCK_N, BLOCK_K, ACC
            )
            offs_n = n0 + tl.arange(0, BLOCK_N)
            wmask = gmask[:, None] & (offs_n < n_b)[None, :]
            wptr = WS + wsb + offs_g[:, None] * N + offs_n[None, :]
            pg = tl.load(wptr + 2 * plane, mask=wmask, other=0.0) + beta * tl.load(wptr + 3 * plane, mask=wmask, other=0.0)
            tl.store(wptr + 3 * plane, pg, mask=wmask)
            v = pa[:, None, :] + pg[:, :, None]
            d = tl.sum(cnt_s[:, None, None] * p, axis=0)
            inv_d = tl.where(d > 0, 1.0 / tl.where(d > 0, d, 1.0), 0.0)
            t = tl.sum(p * v, axis=0) * inv_d
            we = tl.where(mask3, p * inv_cnt[:, None, None] * (v - cnt_s[:, None, None] * t[None, :, :]), 0.0)
            qa += tl.sum(we, axis=1)
            qg = tl.sum(we, axis=2)
            tl.store(wptr + 4 * plane, qg, mask=wmask)
            pq += tl.sum(tl.sum(pg * qg, axis=1), axis=0)
        pq += tl.sum(tl.sum(pa * qa, axis=1), axis=0)
        tl.debug_barrier()
        ok = pq > 0
        step = tl.where(ok, rz / tl.where(ok, pq, 1.0), 0.0)
        xa += step * pa
        ra -= step * qa
        za = pa_pre * ra
        rz_new = tl.sum(tl.sum(ra * za, axis=1), axis=0)
        rr = tl.sum(tl.sum(ra * ra, axis=1), axis=0)
        for n0 in range(0, n_b, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            wmask = gmask[:, None] & (offs_n < n_b)[None, :]
            wptr = WS + wsb + offs_g[:, None] * N + offs_n[None, :]
            xg = tl.load(wptr, mask=wmask, other=0.0) + step * tl.load(wptr + 3 * plane, mask=wmask, other=0.0)
            rg = tl.load(wptr + 1 * plane, mask=wmask, other=0.0) - step * tl.load(wptr + 4 * plane, mask=wmask, other=0.0)
            zg = tl.load(wptr + 5 * plane, mask=wmask, other=0.0) * rg
            tl.store(wptr, xg, mask=wmask)
            tl.store(wptr + 1 * plane, rg, mask=wmask)
            tl.store(wptr + 2 * plane, zg, mask=wmask)
            rz_new += tl.sum(tl.sum(rg * zg, axis=1), axis=0)
            rr += tl.sum(tl.sum(rg * rg, axis=1), axis=0)
        tl.debug_barrier()
        it += ok.to(tl.int32)
        beta = tl.where(ok, rz_new / tl.where(ok, rz, 1.0), 0.0)
        rz = rz_new
        active = ok & (rr > stop) & (rz_new > 0) & (it < max_iters)
    tl.store(ITERS + b, it.to(tl.int64))

    # Output: ∂S = Σ_G w_G P_G (ê_G − e_G(α + γ)) / eps; 0 outside the block.
    for n0 in range(0, N, BLOCK_N):
        p, mask3, mask2 = _msk_plans(
            S, F, GAM, H, base, fbase, hbase, n0, N, K, n_b, k_b, w, present, inv_eps, BLOCK_G, BLOCK_N, BLOCK_K, ACC
        )
        offs_n = n0 + tl.arange(0, BLOCK_N)
        g = tl.where(mask2, tl.load(GR + base + offs_n[:, None] * K + offs_k[None, :], mask=mask2, other=0.0).to(ACC), 0.0)
        wmask = gmask[:, None] & (offs_n < n_b)[None, :]
        xg = tl.load(WS + wsb + offs_g[:, None] * N + offs_n[None, :], mask=wmask, other=0.0)
        v = xa[:, None, :] + xg[:, :, None]
        d = tl.sum(cnt_s[:, None, None] * p, axis=0)
        inv_d = tl.where(d > 0, 1.0 / tl.where(d > 0, d, 1.0), 0.0)
        t = tl.sum(p * v, axis=0) * inv_d
        u = tl.sum(top[:, None, None] * p, axis=0) * g * inv_d
        resid = top[:, None, None] * g[None, :, :] - cnt_s[:, None, None] * u[None, :, :] - (v - cnt_s[:, None, None] * t[None, :, :])
        o = tl.sum(tl.where(mask3, w[:, None, None] * p * resid, 0.0), axis=0) * inv_eps
        o = tl.where(mask2 & several, o, 0.0)
        smask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
        tl.store(OUT + base + offs_n[:, None] * K + offs_k[None, :], o.to(OUT.dtype.element_ty), mask=smask)


def multi_sinkhorn_implicit_backward(grad_raw, scores, F, Gam, H, row_counts, col_counts, weights, counts, tops, eps: float, *, iters=None):
    """∂L/∂scores (B, N, K) of converged grouped Multi-SK for ∂L/∂T_raw = ``grad_raw`` (see module doc)."""
    B, N, K = scores.shape
    dtype = scores.dtype
    acc = _common.acc_dtype(dtype)
    dev = scores.device
    n_groups = len(weights)
    out = torch.empty((B, N, K), dtype=dtype, device=dev)
    its = torch.zeros(B, dtype=torch.int64, device=dev)
    if B * N * K > 0:
        block_g = triton.next_power_of_2(n_groups)
        block_k = triton.next_power_of_2(K)
        block_n, warps = _tile(N, 2 * block_g * block_k, acc)
        ws = torch.zeros((B, 6, block_g, N), dtype=acc, device=dev)
        _multi_implicit_kernel[(B,)](
            grad_raw.contiguous(),
            scores.contiguous(),
            F.to(dtype).contiguous(),
            Gam.to(dtype).contiguous(),
            H.to(dtype).contiguous(),
            row_counts.to(device=dev, dtype=torch.int64).contiguous(),
            col_counts.to(device=dev, dtype=torch.int64).contiguous(),
            counts.to(device=dev, dtype=acc).contiguous(),
            tops.to(device=dev, dtype=acc).contiguous(),
            out,
            its,
            ws,
            N,
            K,
            1.0 / eps,
            tolerance(dtype),
            MAX_ITERS,
            WEIGHTS=tuple(float(x) for x in weights),
            NG=n_groups,
            BLOCK_G=block_g,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            ACC=_common.tl_dtype(acc),
            num_warps=warps,
            maxnreg=_common.MAX_REGISTERS,
        )
    if iters is not None:
        iters.copy_(its)
    return out
