"""Triton kernels of ``mmot::multi_sinkhorn_ext``: grouped Multi-SK on ragged padded batches,
with per-problem slot groups, an ε schedule, early stopping and its exact unrolled VJP.

Problem b of a padded batch (B, N, K) is ``scores[b, :n_b, :k_b]``; group G has the shared
weight w_G and per-problem slot count c_{b,G} (absent where 0) and top_{b,G}. Anchor mass
r = n_b/k_b. Potentials are kept in score units (docs: issue 20 spec, section 2)::

    F_G[a]   = e log r - e LSE_n((w_G S + Gam + H_G)/e)
    Gam[n,a] = -e LSE_G(log c_G + (w_G S + F_G + H_G)/e)
    H_G[n]   = -e LSE_a((w_G S + Gam + F_G)/e)
    P_G      = exp((w_G S + F_G + Gam + H_G)/e),   T = Σ_G top_G P_G  (then min-max per row)

with e = eps_t = max(eps, eps_start·decay^t), computed in float64 by repeated multiplication,
and err_t = max_{G,a} |Σ_n P_G[n,a] - r| / r after the H step. A problem stops after
iteration t when tol >= 0, eps_t == eps and err_t <= tol.

**Structure.** One program per problem (the batch fills the GPU; ragged sizes make a split of
one problem's rows over programs pointless at the sizes this op targets) runs the whole
iteration in one launch: a column pass gives F_0, then one streaming pass over the rows per
iteration. Pass t recomputes Gam_t from (F_t, H_{t-1}) per tile, forms H_t and P_t, stores
H_t (a (G, N) ring), and accumulates Σ_n P_t (the marginal error, and F_{t+1} = F_t + e log r
- e log Σ_n P_t while e stays the same) and, only while the schedule still changes e, an online
column log-sum-exp at e_{t+1} for F_{t+1}. The stopping test is a scalar in registers, so no
host synchronisation happens: a ``while`` loop per program. The pass that reaches the cap
writes T, Gam and H directly; a problem that stops early gets one more pass writing them.
All in the log domain (every exponent is bounded by its row or column maximum), so the
``log_domain`` argument does not change the numbers; internally the scores are centred on the
problem's first row (absorbed exactly by F, which is shifted back on output).

**Backward** (one launch, one program per problem): the forward is re-run for exactly
``iters[b]`` iterations saving F_t (G, K), H_t (G, N) and e_t (float64) per iteration; Gam_t
is recomputed per tile. Then one reverse streaming pass per iteration with the adjoints
(score units; A_{t+1} the plan after the column step of iteration t+1, at e_{t+1})::

    W_G = -F̄_{G,t+1}/r · A_{G,t+1}           (F_{t+1} through Gam_t, H_t and S; A_{t+1} = P_t·exp((F_{t+1}-F_t)/e) at equal e)
    U_G = -H̄_{G,t} · P_{G,t}                 (H̄_t = Σ_a W + Σ_a Z of iteration t+1)
    Z_G = -Ḡam_t · c_G B_{G,t}                (Ḡam_t = Σ_G (W + U); c_G B_G the softmax over G)
    S̄ += Σ_G w_G (W + U + Z),   F̄_{G,t} = Σ_n (U + Z)

and the last iteration starts from X_G = top_G T̄ P_G / e through the min-max VJP (ties share
like torch.amin/amax), U = X - (Σ_a X) P. A last pass adds the column step of iteration 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmot.kernels import _common
from mmot.kernels._common import NEG_INF, scalar
from mmot.kernels.multi_sinkhorn import _gamma, _minmax, _rows

NOT_SPECIALIZED = ("n_iters", "h_slots", "n_cap")
NAN: tl.constexpr = tl.constexpr(float("nan"))


@triton.jit
def _weight_vector(WEIGHTS: tl.constexpr, NG: tl.constexpr, BLOCK_G: tl.constexpr, ACC: tl.constexpr):
    offs_g = tl.arange(0, BLOCK_G)
    w = tl.zeros([BLOCK_G], ACC)
    for i in tl.static_range(NG):
        w = tl.where(offs_g == i, WEIGHTS[i], w)
    return w


@triton.jit
def _centred(S, stride_n, stride_k, offs_n, offs_k, valid, first, ACC: tl.constexpr):
    """(scores − first row) over the valid entries (0 elsewhere), clamped to ±finfo.max/8, and the raw tile."""
    raw = tl.load(S + offs_n[:, None] * stride_n + offs_k[None, :] * stride_k, mask=valid, other=0.0).to(ACC)
    if ACC == tl.float64:
        bound = tl.full([], 2.2471164185778946e307, tl.float64)
    else:
        bound = tl.full([], 4.253529586511731e37, tl.float32)
    x = tl.minimum(tl.maximum(raw - first[None, :], -bound), bound)
    return tl.where(valid, x, 0.0), raw


@triton.jit
def _column_pass(
    S,
    stride_n,
    stride_k,
    first,
    n_b,
    kvalid,
    inv_e,
    w,
    gmask,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """Online LSE_n(w_G x / e) per (group, anchor), and whether a valid score is not finite."""
    offs_k = tl.arange(0, BLOCK_K)
    m = tl.full([BLOCK_G, BLOCK_K], NEG_INF, ACC)
    acc = tl.zeros([BLOCK_G, BLOCK_K], ACC)
    bad = tl.zeros([], tl.int32)
    for n0 in range(0, n_b, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = (offs_n < n_b)[:, None] & kvalid[None, :]
        mask3 = gmask[:, None, None] & valid[None, :, :]
        x, raw = _centred(S, stride_n, stride_k, offs_n, offs_k, valid, first, ACC)
        bad = tl.maximum(bad, tl.max(tl.max(tl.where(valid & ((raw - raw) != 0), 1, 0), axis=1), axis=0))
        le = tl.where(mask3, w[:, None, None] * x[None, :, :] * inv_e, NEG_INF)
        new_m = tl.maximum(m, tl.max(le, axis=1))
        safe = tl.where(new_m == NEG_INF, 0.0, new_m)
        acc = acc * tl.exp(m - safe) + tl.sum(tl.exp(le - safe[:, None, :]), axis=1)
        m = new_m
    return m, acc, bad


@triton.jit
def _row_pass(
    S,
    stride_n,
    stride_k,
    first,
    HPREV,
    HCUR,
    T_OUT,
    GAM_OUT,
    H_OUT,
    F,
    e,
    inv_e,
    ratio,
    lse_next,
    write,
    n_b,
    N,
    K,
    kvalid,
    w,
    lc,
    top,
    gmask,
    WRITE_OUT: tl.constexpr,
    MINMAX: tl.constexpr,
    NG: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """Iteration pass given F_t (score units) and H_{t-1} (HPREV): stores H_t (HCUR); returns
    Σ_n P_t and, with ``lse_next``, the online LSE_n((w x + Gam_t + H_t)/e_{t+1}) as (max, sum)
    (``ratio`` = e_t/e_{t+1}). With ``write`` it also writes T, Gam and H over every row."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, BLOCK_G)
    phi = F * inv_e
    col = tl.zeros([BLOCK_G, BLOCK_K], ACC)
    m = tl.full([BLOCK_G, BLOCK_K], NEG_INF, ACC)
    acc = tl.zeros([BLOCK_G, BLOCK_K], ACC)
    row_hi = n_b
    if WRITE_OUT:
        row_hi = tl.where(write, N, n_b)
    for n0 in range(0, row_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nvalid = offs_n < n_b
        valid = nvalid[:, None] & kvalid[None, :]
        mask3 = gmask[:, None, None] & valid[None, :, :]
        gn = offs_g[:, None] * N + offs_n[None, :]
        gnvalid = gmask[:, None] & nvalid[None, :]
        x, _ = _centred(S, stride_n, stride_k, offs_n, offs_k, valid, first, ACC)
        le = w[:, None, None] * x[None, :, :] * inv_e
        psi_prev = tl.load(HPREV + gn, mask=gnvalid, other=0.0) * inv_e
        gamma, _ = _gamma(le, phi, psi_prev, lc, mask3)
        psi, c = _rows(le, gamma, phi, mask3, nvalid)
        tl.store(HCUR + gn, psi * e, mask=gnvalid)
        col += tl.sum(c, axis=1)
        if lse_next:
            v = tl.where(mask3, (le + gamma[None, :, :] + psi[:, :, None]) * ratio, NEG_INF)
            new_m = tl.maximum(m, tl.max(v, axis=1))
            safe = tl.where(new_m == NEG_INF, 0.0, new_m)
            acc = acc * tl.exp(m - safe) + tl.sum(tl.exp(v - safe[:, None, :]), axis=1)
            m = new_m
        if WRITE_OUT:
            if write:
                out_mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
                target = tl.sum(top[:, None, None] * c, axis=0)
                if MINMAX:
                    lo, hi, spread, valid_row = _minmax(target, kvalid)
                    target = tl.where(valid_row[:, None], (target - lo[:, None]) / tl.where(valid_row, spread, 1.0)[:, None], 0.0)
                tile = offs_n[:, None] * K + offs_k[None, :]
                tl.store(T_OUT + tile, tl.where(valid, target, 0.0).to(T_OUT.dtype.element_ty), mask=out_mask)
                tl.store(GAM_OUT + tile, tl.where(valid, gamma * e, 0.0).to(GAM_OUT.dtype.element_ty), mask=out_mask)
                h_mask = (offs_g < NG)[:, None] & (offs_n < N)[None, :]
                tl.store(H_OUT + gn, tl.where(gnvalid, psi * e, 0.0).to(H_OUT.dtype.element_ty), mask=h_mask)
    return col, m, acc


@triton.jit
def _problem(CNT, TOP, ROWC, COLC, pid, NG: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """Problem pid's sizes, group mask, log counts, tops and anchor mass (and its log)."""
    offs_g = tl.arange(0, BLOCK_G)
    n_b = tl.load(ROWC + pid).to(tl.int32)
    k_b = tl.load(COLC + pid).to(tl.int32)
    kvalid = tl.arange(0, BLOCK_K) < k_b
    cnt = tl.load(CNT + pid * NG + offs_g, mask=offs_g < NG, other=0.0).to(tl.float64)
    gmask = cnt > 0
    lc = tl.where(gmask, tl.log(tl.where(gmask, cnt, 1.0)), NEG_INF).to(ACC)
    top = tl.where(gmask, tl.load(TOP + pid * NG + offs_g, mask=offs_g < NG, other=0.0).to(ACC), 0.0)
    r64 = n_b.to(tl.float64) / k_b.to(tl.float64)
    return n_b, k_b, kvalid, gmask, lc, top, r64.to(ACC), tl.log(r64).to(ACC)


@triton.jit
def _iterate(
    S,
    stride_n,
    stride_k,
    first,
    HS,
    FS,
    ES,
    T_OUT,
    GAM_OUT,
    H_OUT,
    e_start,
    eps64,
    decay64,
    tol64,
    n_iters,
    h_slots,
    n_b,
    N,
    K,
    kvalid,
    w,
    lc,
    top,
    gmask,
    r,
    log_r,
    SAVE: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    MINMAX: tl.constexpr,
    NG: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """Up to n_iters iterations (early stop by tol). SAVE: F_t to FS[t], e_t to ES[t] and H_t to
    HS[t + 1] (HS[0] = 0); else H in a ring of two. Returns (iterations run, err of the last,
    F of the last, e of the last, whether a valid score is not finite)."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_k = tl.arange(0, BLOCK_K)
    gk = offs_g[:, None] * K + offs_k[None, :]
    gkvalid = gmask[:, None] & kvalid[None, :]
    slot = BLOCK_G * N
    e0 = tl.maximum(eps64, e_start)
    m, acc, bad = _column_pass(S, stride_n, stride_k, first, n_b, kvalid, (1.0 / e0).to(ACC), w, gmask, BLOCK_G, BLOCK_N, BLOCK_K, ACC)
    safe_acc = tl.where(gkvalid & (acc > 0), acc, 1.0)
    safe_m = tl.where(m == NEG_INF, 0.0, m)
    F = tl.where(gkvalid, e0.to(ACC) * (log_r - safe_m - tl.log(safe_acc)), 0.0)
    F_last = F
    e_cur = e_start
    e_last = e0
    err = tl.zeros([], ACC)
    t = tl.zeros([], tl.int32)
    go = (bad == 0) & (n_iters > 0)
    while go:
        e_t = tl.maximum(eps64, e_cur)
        e_next = e_cur * decay64
        e_n = tl.maximum(eps64, e_next)
        same = e_n == e_t
        if SAVE:
            tl.store(FS + t.to(tl.int64) * BLOCK_G * K + gk, F, mask=gkvalid)
            tl.store(ES + t, e_t)
        if SAVE:
            hprev = HS + t.to(tl.int64) * slot
            hcur = HS + (t.to(tl.int64) + 1) * slot
        else:
            hprev = HS + (t % h_slots) * slot
            hcur = HS + ((t + 1) % h_slots) * slot
        e_acc = e_t.to(ACC)
        col, m, acc = _row_pass(
            S,
            stride_n,
            stride_k,
            first,
            hprev,
            hcur,
            T_OUT,
            GAM_OUT,
            H_OUT,
            F,
            e_acc,
            (1.0 / e_t).to(ACC),
            (e_t / e_n).to(ACC),
            e_n != e_t,
            t == n_iters - 1,
            n_b,
            N,
            K,
            kvalid,
            w,
            lc,
            top,
            gmask,
            WRITE_OUT,
            MINMAX,
            NG,
            BLOCK_G,
            BLOCK_N,
            BLOCK_K,
            ACC,
        )
        # H_t crosses threads before the next pass reads it.
        tl.debug_barrier()
        col = tl.where(gkvalid, col, r)
        err = tl.max(tl.max(tl.abs(col - r) / r, axis=1), axis=0)
        stop = (tol64 >= 0) & (e_cur <= eps64) & (err.to(tl.float64) <= tol64)
        F_last = F
        e_last = e_t
        safe_col = tl.where(col > 0, col, 1.0)
        safe_acc = tl.where(gkvalid & (acc > 0), acc, 1.0)
        safe_m = tl.where(m == NEG_INF, 0.0, m)
        F_same = F + e_acc * (log_r - tl.log(safe_col))
        F_new = e_n.to(ACC) * (log_r - safe_m - tl.log(safe_acc))
        F = tl.where(gkvalid, tl.where(same, F_same, F_new), 0.0)
        e_cur = e_next
        t += 1
        go = (t < n_iters) & (stop == 0)
    return t, err, F_last, e_last, bad


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _msk_ext_fwd_kernel(
    S,
    T_OUT,
    F_OUT,
    GAM_OUT,
    H_OUT,
    ITERS,
    ERR,
    ROWC,
    COLC,
    CNT,
    TOP,
    EPS0,
    HS,
    N,
    K,
    eps: tl.float64,
    decay: tl.float64,
    tol: tl.float64,
    n_iters,
    h_slots,
    stride_b,
    stride_n,
    stride_k,
    WEIGHTS: tl.constexpr,
    NG: tl.constexpr,
    MINMAX: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    eps64 = scalar(eps, tl.float64)
    decay64 = scalar(decay, tl.float64)
    tol64 = scalar(tol, tl.float64)
    S += pid.to(tl.int64) * stride_b
    T_OUT += pid.to(tl.int64) * N * K
    GAM_OUT += pid.to(tl.int64) * N * K
    H_OUT += pid.to(tl.int64) * NG * N
    HS += pid.to(tl.int64) * h_slots * BLOCK_G * N
    offs_g = tl.arange(0, BLOCK_G)
    offs_k = tl.arange(0, BLOCK_K)
    n_b, k_b, kvalid, gmask, lc, top, r, log_r = _problem(CNT, TOP, ROWC, COLC, pid, NG, BLOCK_G, BLOCK_K, ACC)
    w = _weight_vector(WEIGHTS, NG, BLOCK_G, ACC)
    first = tl.load(S + offs_k * stride_k, mask=kvalid, other=0.0).to(ACC)
    e_start = tl.load(EPS0 + pid).to(tl.float64)
    t, err, F, e_last, bad = _iterate(
        S,
        stride_n,
        stride_k,
        first,
        HS,
        HS,
        EPS0,
        T_OUT,
        GAM_OUT,
        H_OUT,
        e_start,
        eps64,
        decay64,
        tol64,
        n_iters,
        h_slots,
        n_b,
        N,
        K,
        kvalid,
        w,
        lc,
        top,
        gmask,
        r,
        log_r,
        False,
        True,
        MINMAX,
        NG,
        BLOCK_G,
        BLOCK_N,
        BLOCK_K,
        ACC,
    )
    if (bad == 0) & (t < n_iters):
        # Stopped early: the iteration that ran last writes T, Gam and H in one more pass.
        slot = BLOCK_G * N
        _row_pass(
            S,
            stride_n,
            stride_k,
            first,
            HS + ((t - 1) % h_slots) * slot,
            HS + (t % h_slots) * slot,
            T_OUT,
            GAM_OUT,
            H_OUT,
            F,
            e_last.to(ACC),
            (1.0 / e_last).to(ACC),
            tl.full([], 1.0, ACC),
            t < 0,
            t >= 0,
            n_b,
            N,
            K,
            kvalid,
            w,
            lc,
            top,
            gmask,
            True,
            MINMAX,
            NG,
            BLOCK_G,
            BLOCK_N,
            BLOCK_K,
            ACC,
        )
    if bad != 0:
        # Non-finite valid scores: the problem is NaN (padding still 0).
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            valid = (offs_n < n_b)[:, None] & kvalid[None, :]
            out_mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
            tile = offs_n[:, None] * K + offs_k[None, :]
            tl.store(T_OUT + tile, tl.where(valid, NAN, 0.0).to(T_OUT.dtype.element_ty), mask=out_mask)
            tl.store(GAM_OUT + tile, tl.where(valid, NAN, 0.0).to(GAM_OUT.dtype.element_ty), mask=out_mask)
            gn = offs_g[:, None] * N + offs_n[None, :]
            h_mask = (offs_g < NG)[:, None] & (offs_n < N)[None, :]
            tl.store(H_OUT + gn, tl.where(gmask[:, None] & (offs_n < n_b)[None, :], NAN, 0.0).to(H_OUT.dtype.element_ty), mask=h_mask)
    gkvalid = gmask[:, None] & kvalid[None, :]
    F = F - w[:, None] * first[None, :]
    F = tl.where(bad != 0, NAN, F)
    gk_out = (offs_g < NG)[:, None] & (offs_k < K)[None, :]
    tl.store(
        F_OUT + pid.to(tl.int64) * NG * K + offs_g[:, None] * K + offs_k[None, :],
        tl.where(gkvalid, F, 0.0).to(F_OUT.dtype.element_ty),
        mask=gk_out,
    )
    tl.store(ITERS + pid, tl.where(bad != 0, n_iters, t).to(tl.int64))
    tl.store(ERR + pid, tl.where(bad != 0, NAN, err).to(ERR.dtype.element_ty))


@triton.jit
def _reverse_pass(
    S,
    stride_n,
    stride_k,
    first,
    GRAD,
    D,
    HPREV,
    PSIBAR,
    F,
    F_next,
    Fbar_next,
    inv_e,
    ratio,
    inv_en,
    same_next,
    n_b,
    N,
    K,
    kvalid,
    w,
    lc,
    top,
    gmask,
    r,
    FIRST: tl.constexpr,
    MINMAX: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """Reverse pass of iteration t (FIRST: the last one, from the output); returns F̄_t."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, BLOCK_G)
    phi = F * inv_e
    phi_next = F_next * inv_en
    step = tl.exp(phi_next - phi)
    col = tl.zeros([BLOCK_G, BLOCK_K], ACC)
    for n0 in range(0, n_b, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nvalid = offs_n < n_b
        valid = nvalid[:, None] & kvalid[None, :]
        mask3 = gmask[:, None, None] & valid[None, :, :]
        gn = offs_g[:, None] * N + offs_n[None, :]
        gnvalid = gmask[:, None] & nvalid[None, :]
        tile = offs_n[:, None] * K + offs_k[None, :]
        x, _ = _centred(S, stride_n, stride_k, offs_n, offs_k, valid, first, ACC)
        le = w[:, None, None] * x[None, :, :] * inv_e
        psi_prev = tl.load(HPREV + gn, mask=gnvalid, other=0.0) * inv_e
        gamma, cb = _gamma(le, phi, psi_prev, lc, mask3)
        psi, c = _rows(le, gamma, phi, mask3, nvalid)
        if FIRST:
            target = tl.sum(top[:, None, None] * c, axis=0)
            grad = tl.load(GRAD + tile, mask=valid, other=0.0).to(ACC)
            if MINMAX:
                lo, hi, spread, valid_row = _minmax(target, kvalid)
                d = tl.where(valid_row, spread, 1.0)
                tn = (target - lo[:, None]) / d[:, None]
                is_lo = tl.where(valid & (target == lo[:, None]), 1.0, 0.0)
                is_hi = tl.where(valid & (target == hi[:, None]), 1.0, 0.0)
                sum_lo = tl.sum(grad * (tn - 1.0), axis=1) / d / tl.maximum(tl.sum(is_lo, axis=1), 1.0)
                sum_hi = -tl.sum(grad * tn, axis=1) / d / tl.maximum(tl.sum(is_hi, axis=1), 1.0)
                grad = grad / d[:, None] + is_lo * sum_lo[:, None] + is_hi * sum_hi[:, None]
                grad = tl.where(valid_row[:, None] & valid, grad, 0.0)
            xadj = top[:, None, None] * grad[None, :, :] * c * inv_e
            u = xadj - tl.sum(xadj, axis=2)[:, :, None] * c
            dl3 = u
        else:
            if same_next:
                # e_{t+1} == e_t: A_{t+1} = P_t · exp(φ_{t+1} - φ_t), one exp per column instead of per entry.
                a = c * step[:, None, :]
            else:
                a = tl.exp(tl.where(mask3, (le + gamma[None, :, :] + psi[:, :, None]) * ratio + phi_next[:, None, :], NEG_INF))
            wadj = -(Fbar_next / r)[:, None, :] * a
            hbar = tl.load(PSIBAR + gn, mask=gnvalid, other=0.0) + tl.sum(wadj, axis=2)
            u = -hbar[:, :, None] * c
            dl3 = wadj + u
        gbar = tl.sum(dl3, axis=0)
        z = tl.where(mask3, -gbar[None, :, :] * cb, 0.0)
        u = u + z
        dl3 = dl3 + z
        col += tl.sum(u, axis=1)
        tl.store(PSIBAR + gn, tl.sum(z, axis=2), mask=gnvalid)
        dl = tl.sum(w[:, None, None] * dl3, axis=0)
        if not FIRST:
            dl += tl.load(D + tile, mask=valid, other=0.0)
        tl.store(D + tile, dl, mask=valid)
    return col


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _msk_ext_bwd_kernel(
    S,
    GRAD,
    D,
    DS,
    ITERS,
    ROWC,
    COLC,
    CNT,
    TOP,
    EPS0,
    HS,
    FS,
    ES,
    PSIBAR,
    N,
    K,
    eps: tl.float64,
    decay: tl.float64,
    n_cap,
    stride_b,
    stride_n,
    stride_k,
    WEIGHTS: tl.constexpr,
    NG: tl.constexpr,
    MINMAX: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    eps64 = scalar(eps, tl.float64)
    decay64 = scalar(decay, tl.float64)
    S += pid.to(tl.int64) * stride_b
    GRAD += pid.to(tl.int64) * N * K
    D += pid.to(tl.int64) * N * K
    DS += pid.to(tl.int64) * N * K
    HS += pid.to(tl.int64) * (n_cap + 1) * BLOCK_G * N
    FS += pid.to(tl.int64) * n_cap * BLOCK_G * K
    ES += pid.to(tl.int64) * n_cap
    PSIBAR += pid.to(tl.int64) * BLOCK_G * N
    offs_g = tl.arange(0, BLOCK_G)
    offs_k = tl.arange(0, BLOCK_K)
    gk = offs_g[:, None] * K + offs_k[None, :]
    n_b, k_b, kvalid, gmask, lc, top, r, log_r = _problem(CNT, TOP, ROWC, COLC, pid, NG, BLOCK_G, BLOCK_K, ACC)
    gkvalid = gmask[:, None] & kvalid[None, :]
    w = _weight_vector(WEIGHTS, NG, BLOCK_G, ACC)
    first = tl.load(S + offs_k * stride_k, mask=kvalid, other=0.0).to(ACC)
    e_start = tl.load(EPS0 + pid).to(tl.float64)
    tau = tl.minimum(tl.load(ITERS + pid).to(tl.int32), n_cap)
    slot = BLOCK_G * N
    # The forward again, exactly tau iterations, saving F_t, e_t and H_t.
    t, err, F_unused, e_unused, bad = _iterate(
        S,
        stride_n,
        stride_k,
        first,
        HS,
        FS,
        ES,
        D,
        D,
        D,
        e_start,
        eps64,
        decay64,
        tl.full([], -1.0, tl.float64),
        tau,
        1,
        n_b,
        N,
        K,
        kvalid,
        w,
        lc,
        top,
        gmask,
        r,
        log_r,
        True,
        False,
        MINMAX,
        NG,
        BLOCK_G,
        BLOCK_N,
        BLOCK_K,
        ACC,
    )
    Fbar = tl.zeros([BLOCK_G, BLOCK_K], ACC)
    e0 = tl.maximum(eps64, e_start)
    if (bad == 0) & (tau > 0):
        tl.debug_barrier()
        t = tau - 1
        e_t = tl.load(ES + t)
        F_t = tl.load(FS + t.to(tl.int64) * BLOCK_G * K + gk, mask=gkvalid, other=0.0)
        Fbar = _reverse_pass(
            S,
            stride_n,
            stride_k,
            first,
            GRAD,
            D,
            HS + t.to(tl.int64) * slot,
            PSIBAR,
            F_t,
            F_t,
            Fbar,
            (1.0 / e_t).to(ACC),
            tl.full([], 1.0, ACC),
            (1.0 / e_t).to(ACC),
            e_t == e_t,
            n_b,
            N,
            K,
            kvalid,
            w,
            lc,
            top,
            gmask,
            r,
            True,
            MINMAX,
            BLOCK_G,
            BLOCK_N,
            BLOCK_K,
            ACC,
        )
        for i in range(1, tau):
            tl.debug_barrier()
            t = tau - 1 - i
            e_n = e_t
            e_t = tl.load(ES + t)
            F_n = F_t
            F_t = tl.load(FS + t.to(tl.int64) * BLOCK_G * K + gk, mask=gkvalid, other=0.0)
            Fbar = _reverse_pass(
                S,
                stride_n,
                stride_k,
                first,
                GRAD,
                D,
                HS + t.to(tl.int64) * slot,
                PSIBAR,
                F_t,
                F_n,
                Fbar,
                (1.0 / e_t).to(ACC),
                (e_t / e_n).to(ACC),
                (1.0 / e_n).to(ACC),
                e_t == e_n,
                n_b,
                N,
                K,
                kvalid,
                w,
                lc,
                top,
                gmask,
                r,
                False,
                MINMAX,
                BLOCK_G,
                BLOCK_N,
                BLOCK_K,
                ACC,
            )
        tl.debug_barrier()
    # The column step of iteration 0 (A_0 = exp((w x + F_0)/e_0)), and the output over every row.
    ran = (tau > 0) & (bad == 0)
    F_0 = tl.where(ran, tl.load(FS + gk, mask=gkvalid, other=0.0), 0.0)
    inv_e0 = (1.0 / e0).to(ACC)
    phi0 = F_0 * inv_e0
    coef = tl.where(gkvalid, Fbar / r, 0.0)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = (offs_n < n_b)[:, None] & kvalid[None, :]
        mask3 = gmask[:, None, None] & valid[None, :, :]
        tile = offs_n[:, None] * K + offs_k[None, :]
        x, _ = _centred(S, stride_n, stride_k, offs_n, offs_k, valid, first, ACC)
        a = tl.exp(tl.where(mask3, w[:, None, None] * x[None, :, :] * inv_e0 + phi0[:, None, :], NEG_INF))
        dl = tl.where(ran, tl.load(D + tile, mask=valid, other=0.0), 0.0) - tl.sum((w[:, None] * coef)[:, None, :] * a, axis=0)
        dl = tl.where(bad != 0, NAN, dl)
        out_mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
        tl.store(DS + tile, tl.where(valid, dl, 0.0).to(DS.dtype.element_ty), mask=out_mask)


class _Plan:
    def __init__(self, scores: torch.Tensor, weights, backward: bool):
        self.s = scores
        self.n_problems, self.n_rows, self.n_cols = scores.shape
        self.acc = _common.acc_dtype(scores.dtype)
        self.acc_tl = _common.tl_dtype(self.acc)
        self.n_groups = len(weights)
        self.block_g = triton.next_power_of_2(self.n_groups)
        self.block_k = triton.next_power_of_2(self.n_cols)
        row = self.block_g * self.block_k * (2 if backward else 1)
        self.block_n = _common.tile_rows(self.n_rows, row, self.acc)
        self.warps = _common.num_warps(self.block_n * row, self.acc)
        self.meta = dict(
            WEIGHTS=tuple(float(x) for x in weights),
            NG=self.n_groups,
            BLOCK_G=self.block_g,
            BLOCK_N=self.block_n,
            BLOCK_K=self.block_k,
            ACC=self.acc_tl,
            num_warps=self.warps,
            maxnreg=_common.MAX_REGISTERS,
        )


def fits(n_cols: int, n_groups: int, dtype: torch.dtype, backward: bool = True) -> bool:
    """Whether a row of ``n_cols`` anchors for ``n_groups`` groups fits one tile (the backward
    counts it double, and is the default so that both directions fit)."""
    row = triton.next_power_of_2(max(1, n_cols)) * triton.next_power_of_2(max(1, n_groups)) * (2 if backward else 1)
    return row <= _common.widest_row(_common.acc_dtype(dtype))


def _small(t: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    return t.to(device=device, dtype=dtype).contiguous()


def forward(scores, row_counts, col_counts, weights, counts, tops, eps_start, eps, decay, n_iters, tol, normalize, log_domain):
    """(T, F (B,G,K), Gam (B,N,K), H (B,G,N), iters (B,) int64, err (B,)) for padded scores (B,N,K).

    ``log_domain`` does not change the numbers: the kernels run the log domain, exact for any
    finite input. ``tol`` < 0: no early stop. No host synchronisation."""
    del log_domain
    B, N, K = scores.shape
    dev = scores.device
    G = len(weights)
    dt = scores.dtype
    out = _common.new_output((B, N, K), dt, dev)
    F = _common.new_output((B, G, K), dt, dev)
    gam = _common.new_output((B, N, K), dt, dev)
    H = _common.new_output((B, G, N), dt, dev)
    iters = torch.full((B,), -1, dtype=torch.int64, device=dev)
    err = _common.new_output((B,), dt, dev)
    if B == 0:
        return out, F, gam, H, iters, err
    if n_iters < 1:
        raise ValueError(f"multi_sinkhorn_ext: n_iters must be >= 1; got {n_iters}")
    plan = _Plan(scores, weights, backward=False)
    hs = torch.empty((B, 2, plan.block_g, N), dtype=plan.acc, device=dev)
    hs[:, 0].zero_()
    _msk_ext_fwd_kernel[(B,)](
        scores,
        out,
        F,
        gam,
        H,
        iters,
        err,
        _small(row_counts, torch.int64, dev),
        _small(col_counts, torch.int64, dev),
        _small(counts, torch.float64, dev),
        _small(tops, torch.float64, dev),
        _small(eps_start, torch.float64, dev),
        hs,
        N,
        K,
        float(eps),
        float(decay),
        float(tol),
        int(n_iters),
        2,
        *scores.stride(),
        MINMAX=normalize == "minmax",
        **plan.meta,
    )
    return out, F, gam, H, iters, err


def backward(
    grad, scores, row_counts, col_counts, weights, counts, tops, eps_start, eps, decay, iters, normalize, log_domain, *, n_iters=None
):
    """∂loss/∂scores for ∂loss/∂T = ``grad``: the exact VJP of the ``iters[b]`` iterations run.

    The scratch holds every iteration's potentials, sized by ``n_iters`` (the forward's cap)
    when given, else by ``iters.max()`` (one host synchronisation before the launch)."""
    del log_domain
    B, N, K = scores.shape
    dev = scores.device
    ds = _common.new_output((B, N, K), scores.dtype, dev)
    if B == 0:
        return ds
    plan = _Plan(scores, weights, backward=True)
    n_cap = int(n_iters) if n_iters is not None else int(iters.max())
    n_cap = max(n_cap, 1)
    BG = plan.block_g
    hs = torch.empty((B, n_cap + 1, BG, N), dtype=plan.acc, device=dev)
    hs[:, 0].zero_()
    fs = torch.empty((B, n_cap, BG, K), dtype=plan.acc, device=dev)
    es = torch.empty((B, n_cap), dtype=torch.float64, device=dev)
    psibar = torch.empty((B, BG, N), dtype=plan.acc, device=dev)
    d = ds if scores.dtype == plan.acc else torch.empty((B, N, K), dtype=plan.acc, device=dev)
    g = grad.contiguous()
    _msk_ext_bwd_kernel[(B,)](
        scores,
        g,
        d,
        ds,
        _small(iters, torch.int64, dev),
        _small(row_counts, torch.int64, dev),
        _small(col_counts, torch.int64, dev),
        _small(counts, torch.float64, dev),
        _small(tops, torch.float64, dev),
        _small(eps_start, torch.float64, dev),
        hs,
        fs,
        es,
        psibar,
        N,
        K,
        float(eps),
        float(decay),
        n_cap,
        *scores.stride(),
        MINMAX=normalize == "minmax",
        **plan.meta,
    )
    return ds


# The names the spec gives the kernel-level functions.
multi_sinkhorn_ext_forward = forward
multi_sinkhorn_ext_backward = backward
