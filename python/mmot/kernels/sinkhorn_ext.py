"""Triton kernels of ``mmot::sinkhorn_ext``: ragged batches, per-problem early stopping, the
geometric ε-schedule, warm starts, unbalanced marginals, and the exact VJP of the unrolled loop.

The math is issue 20's section 1. Problem b is ``scores[b, :n_b, :k_b]``; with e = ε_t, and
τ = ρ / (ρ + e) (τ = 1 when ρ = ∞), the potentials f (rows) and g (columns) are in score units::

    g_j = τ (e log c_j − e LSE_i((S_ij + f_i) / e))         column step
    f_i = τ (e log r_i − e LSE_j((S_ij + g_j) / e))         row step
    P   = exp((S + f + g) / e)

and err_t = max_j |exp((g_j − g'_j) / e) − 1|, g' the column step that would follow at the same
e. ε_t = max(ε, e_t) with e_0 = eps_start_b and e_{t+1} = e_t · decay in float64 (every backend
multiplies the same numbers). A problem stops after iteration t when tol ≥ 0, ε_t == ε and
err_t ≤ tol.

**Launch structures** (chosen from shapes alone, as ``mmot.kernels.sinkhorn``'s, by
``_common.programs_per_problem``):

* **persistent** (batches, and small problems): one program per problem (grid (B,)) runs the
  whole iteration in one launch. The loop over iterations is a ``while`` on the program's own
  iteration count and stop flag, so every problem stops where its own error says, with no host
  synchronisation. The row loops run over the problem's own rows (``range(0, n_b, BLOCK_N)``),
  so the padding costs no work beyond the tile width; a tile holds BLOCK_N whole rows of
  ``next_power_of_2(K)`` columns (:func:`fits`). g lives in registers, f in the f output.
* **split** (a few large problems, e.g. the SwAV size): each problem's rows are split over R
  programs and the host launches every pass: per round a column-partials launch (work only
  while ε changes), the row step (column partials per program, no atomics, so the result does
  not depend on scheduling) and a one-program-per-problem finish (the error, the stopping test,
  the next ε), each problem's iteration count, ε and stop flag living on the device. The host
  launches ``n_iters`` rounds whatever the stops (a stopped problem's programs return at once):
  no host reads, the same as the persistent structure.

**Log domain throughout** (``log_domain`` is accepted and not needed). Each iteration is one
streaming pass over the rows: a row block's row log-sum-exp gives its f, and the same pass folds
(S + f) / e into an online column log-sum-exp, which is both the error's g' and, when ε_t does
not change, the next iteration's column step. While the schedule anneals (ε_{t+1} ≠ ε_t) a
second pass recomputes the column log-sum-exp at the new ε.

**Backward** (the exact VJP of the iteration that ran ``iters[b]`` steps). A replay of the
forward (capped at ``iters[b]``, no stopping test) saves, per iteration, the row and column
log-sum-exps and ε_t: O(T·(N + K)) per problem; f and g are recomputed from them by the same
arithmetic as the forward. With softmaxes R^t = exp((S + g^t)/e_t − lse_row^t) (rows sum to 1)
and C^t = exp((S + f^{t−1})/e_t − lse_col^t) (columns sum to 1), f^{−1} = f0 a constant::

    X = Ḡ ⊙ P / e_T;  f̄^T = Σ_j X;  S̄ = X;  ḡ^T = Σ_i X
    row step t:     S̄ −= τ_t f̄^t R^t;   ḡ^t += −τ_t Σ_i f̄^t R^t
    column step t:  S̄ −= τ_t ḡ^t C^t;   f̄^{t−1} = −τ_t Σ_j ḡ^t C^t

A column step's f̄ is a row sum, so it fuses with the row step before it: one streaming pass per
iteration, S̄ accumulated in the output (iters + 1 passes in all).

**Host reads.** None in the forward. The backward sizes the replay's scratch from
``max(iters)``, one read of ``iters`` on the host, unless the caller passes ``max_iters`` (the
forward's ``n_iters`` is a bound), which makes it free of host reads as well.

**Limits.** The split forward costs 3 launches per round (``mmot.kernels.sinkhorn``: 1), its
backward one per reverse pass up to max(iters) + 1. Potentials in score units round to
ulp(|S + f|) / ε in the logits (float32 with scores far from 0 against ε), where
``mmot.kernels.sinkhorn`` centres each column first.

**Non-finite valid scores** poison their problem: plan, f, g and err NaN, iters = n_iters, and
the backward's valid entries NaN (the op's value checks refuse them first when on).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mmot.kernels import _common
from mmot.kernels._common import NEG_INF, POS_INF, scalar

# Integers that vary per call: no specialisation on 1 or multiples of 16.
_NOT_SPECIALIZED = ("n_iters", "max_iters")
NAN: tl.constexpr = tl.constexpr(float("nan"))


@triton.jit
def _tau(rho, e):
    """ρ / (ρ + e) in float64, exactly 1 when ρ = ∞."""
    balanced = rho == POS_INF
    r = tl.where(balanced, 1.0, rho)
    return r / (r + tl.where(balanced, 0.0, e))


@triton.jit
def _potential(log_mass, lse, e, tau):
    """e log m − τ e LSE: one potential from its log-sum-exp (forward and backward alike; with
    τ < 1 this is the KL relaxation relative to r ⊗ c, POT's ``sinkhorn_unbalanced``)."""
    return e * log_mass - tau * e * lse


@triton.jit
def _tile(S, stride_n, stride_k, offs_n, offs_k, mask, ACC: tl.constexpr):
    return tl.load(S + offs_n[:, None] * stride_n + offs_k[None, :] * stride_k, mask=mask, other=0.0).to(ACC)


@triton.jit
def _column_lse(S, F, stride_n, stride_k, row_lo, row_hi, k, inv_e, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """(max, Σ exp(· − max)) of (S_ij + f_i) / e over rows [row_lo, row_hi), online."""
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < k
    m = tl.full([BLOCK_K], NEG_INF, ACC)
    s = tl.zeros([BLOCK_K], ACC)
    for n0 in range(row_lo, row_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < row_hi
        mask = nmask[:, None] & kmask[None, :]
        x = _tile(S, stride_n, stride_k, offs_n, offs_k, mask, ACC)
        f = tl.load(F + offs_n, mask=nmask, other=0.0).to(ACC)
        z = tl.where(mask, (x + f[:, None]) * inv_e, NEG_INF)
        new_m = tl.maximum(m, tl.max(z, axis=0))
        safe = tl.where(new_m == NEG_INF, 0.0, new_m)
        s = s * tl.exp(m - safe) + tl.sum(tl.exp(z - safe[None, :]), axis=0)
        m = new_m
    return m, s


@triton.jit
def _lse(m, s, kmask):
    """m + log s on the valid columns, 0 on the padding."""
    return tl.where(kmask, m + tl.log(tl.where(kmask, s, 1.0)), 0.0)


@triton.jit
def _merge(m, s, pm, ps):
    """Two (max, Σ exp(· − max)) partials of a log-sum-exp as one."""
    new_m = tl.maximum(m, pm)
    safe = tl.where(new_m == NEG_INF, 0.0, new_m)
    return new_m, s * tl.exp(m - safe) + ps * tl.exp(pm - safe)


@triton.jit
def _after_rows(m, s, g, inv_e, log_c, lse_col, tau, kmask, BALANCED: tl.constexpr):
    """From the row pass's column partials: (the next column step's LSE at this e, (g − g') / e).

    (g − g') / e: balanced, log(Σ_i P_ij / c_j), free of the cancellation of two potentials of
    the scores' size (in float32 at small eps that would floor err near 1e-4).
    """
    if BALANCED:
        log_s = tl.where(kmask, tl.log(tl.where(kmask, s, 1.0)), 0.0)
        return tl.where(kmask, log_s - g * inv_e, 0.0), log_s - log_c
    else:
        lse = _lse(m, s, kmask)
        return lse, tau * (lse - lse_col)


@triton.jit
def _row_pass(
    S,
    RMASS,
    F,
    LSER,
    stride_n,
    stride_k,
    g,
    row_lo,
    row_hi,
    k,
    e,
    inv_e,
    tau,
    SAVE: tl.constexpr,
    BALANCED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """Row step given g on rows [row_lo, row_hi): writes f (and its row LSE when SAVE); returns
    the column partials (max, Σ) of LSE_i((S + f) / e), or BALANCED (0, Σ_i P_ij).

    BALANCED (τ = 1): that LSE is log Σ_i P_ij − g_j / e with P = r ⊙ the row softmax, whose
    exps the row step has just taken; a column sum of P is at least c_j min(r) / Σr (the column
    step made Q's columns sum to c, and the row step scales each row of Q by r_i / Σ_j Q_ij ≥
    r_i / Σc), so nothing underflows, and the pass takes one exp per entry instead of two.
    """
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < k
    m = tl.full([BLOCK_K], NEG_INF, ACC)
    s = tl.zeros([BLOCK_K], ACC)
    for n0 in range(row_lo, row_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < row_hi
        mask = nmask[:, None] & kmask[None, :]
        x = _tile(S, stride_n, stride_k, offs_n, offs_k, mask, ACC)
        z = tl.where(mask, (x + g[None, :]) * inv_e, NEG_INF)
        row_max = tl.where(nmask, tl.max(z, axis=1), 0.0)
        p = tl.exp(z - row_max[:, None])
        row_sum = tl.where(nmask, tl.sum(p, axis=1), 1.0)
        lse = row_max + tl.log(row_sum)
        r = tl.load(RMASS + offs_n, mask=nmask, other=1.0).to(ACC)
        f = _potential(tl.log(r), lse, e, tau)
        tl.store(F + offs_n, f.to(F.dtype.element_ty), mask=nmask)
        if SAVE:
            tl.store(LSER + offs_n, lse, mask=nmask)
        if BALANCED:
            s += tl.sum(p * (r / row_sum)[:, None], axis=0)
        else:
            w = tl.where(mask, (x + f[:, None]) * inv_e, NEG_INF)
            new_m = tl.maximum(m, tl.max(w, axis=0))
            safe = tl.where(new_m == NEG_INF, 0.0, new_m)
            s = s * tl.exp(m - safe) + tl.sum(tl.exp(w - safe[None, :]), axis=0)
            m = new_m
    return m, s


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _sinkhorn_ext_fwd_kernel(
    S,
    RMASS,
    CMASS,
    RCNT,
    CCNT,
    F0,
    ESTART,
    CAP,
    PLAN,
    FOUT,
    GOUT,
    ITERS,
    ERR,
    LSER,
    LSEC,
    EPOT,
    BAD,
    N,
    K,
    eps: tl.float64,
    decay: tl.float64,
    tol: tl.float64,
    reach: tl.float64,
    n_iters,
    max_iters,
    stride_b,
    stride_n,
    stride_k,
    SAVE: tl.constexpr,
    WRITE_PLAN: tl.constexpr,
    BALANCED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """One problem: the iteration until its cap or its stop, then its plan and potentials.

    SAVE (the backward's replay): runs exactly CAP[b] iterations (no stopping test) and keeps
    each iteration's row and column LSE and ε_t in slot t of LSER, LSEC and EPOT (max_iters
    slots per problem) and whether the problem is poisoned in BAD.
    """
    eps = scalar(eps, tl.float64)
    decay = scalar(decay, tl.float64)
    tol = scalar(tol, tl.float64)
    rho = scalar(reach, tl.float64)
    pid = tl.program_id(0)
    n = tl.load(RCNT + pid).to(tl.int32)
    k = tl.load(CCNT + pid).to(tl.int32)
    S += pid.to(tl.int64) * stride_b
    PLAN += pid.to(tl.int64) * N * K
    RMASS += pid.to(tl.int64) * N
    F0 += pid.to(tl.int64) * N
    FOUT += pid.to(tl.int64) * N
    LSER += pid.to(tl.int64) * max_iters * N
    LSEC += pid.to(tl.int64) * max_iters * K
    EPOT += pid.to(tl.int64) * max_iters
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < k
    log_c = tl.log(tl.load(CMASS + pid.to(tl.int64) * K + offs_k, mask=kmask, other=1.0).to(ACC))
    if SAVE:
        cap = tl.minimum(tl.load(CAP + pid).to(tl.int32), n_iters)
    else:
        cap = n_iters

    # f := f0 on the problem's rows (0 on the padding); a non-finite valid score poisons it.
    bad = tl.zeros([], tl.int32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < n
        f0 = tl.load(F0 + offs_n, mask=valid, other=0.0).to(ACC)
        tl.store(FOUT + offs_n, tl.where(valid, f0, 0.0).to(FOUT.dtype.element_ty), mask=offs_n < N)
        mask = valid[:, None] & kmask[None, :]
        x = _tile(S, stride_n, stride_k, offs_n, offs_k, mask, ACC)
        bad = tl.maximum(bad, tl.max(tl.max(tl.where(mask & ~(tl.abs(x) < POS_INF), 1, 0), axis=1), axis=0))
    tl.debug_barrier()

    e = tl.load(ESTART + pid).to(tl.float64)
    e_prev = tl.full([], -1.0, tl.float64)  # ε of the last iteration run
    t = tl.zeros([], tl.int32)
    done = bad
    g = tl.zeros([BLOCK_K], ACC)
    lse_next = tl.zeros([BLOCK_K], ACC)
    err = tl.zeros([], ACC)
    while (t < cap) & (done == 0):
        e_t = tl.maximum(e, eps)
        tau = _tau(rho, e_t).to(ACC)
        e_acc = e_t.to(ACC)
        inv_e = (1.0 / e_t).to(ACC)
        if e_t != e_prev:
            cm, cs = _column_lse(S, FOUT, stride_n, stride_k, 0, n, k, inv_e, BLOCK_N, BLOCK_K, ACC)
            lse_col = _lse(cm, cs, kmask)
        else:
            lse_col = lse_next
        g = tl.where(kmask, _potential(log_c, lse_col, e_acc, tau), 0.0)
        if SAVE:
            tl.store(LSEC + t * K + offs_k, lse_col, mask=kmask)
            tl.store(EPOT + t, e_t)
        tl.debug_barrier()
        rm, rs = _row_pass(
            S, RMASS, FOUT, LSER + t * N, stride_n, stride_k, g, 0, n, k, e_acc, inv_e, tau, SAVE, BALANCED, BLOCK_N, BLOCK_K, ACC
        )
        tl.debug_barrier()
        lse_next, gap = _after_rows(rm, rs, g, inv_e, log_c, lse_col, tau, kmask, BALANCED)
        err = tl.max(tl.where(kmask, tl.abs(tl.exp(gap) - 1.0), 0.0), axis=0)
        if not SAVE:
            done = ((tol >= 0.0) & (e_t == eps) & (err.to(tl.float64) <= tol)).to(tl.int32)
        e_prev = e_t
        e = e * decay
        t += 1

    if SAVE:
        tl.store(BAD + pid, bad)
    else:
        tl.store(ITERS + pid, tl.where(bad != 0, n_iters, t).to(tl.int64))
        tl.store(ERR + pid, tl.where(bad != 0, NAN, err).to(ERR.dtype.element_ty))
        kout = offs_k < K
        tl.store(
            GOUT + pid.to(tl.int64) * K + offs_k, tl.where(kmask, tl.where(bad != 0, NAN, g), 0.0).to(GOUT.dtype.element_ty), mask=kout
        )
        if WRITE_PLAN:
            inv_e = (1.0 / e_prev).to(ACC)
            for n0 in range(0, N, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                valid = offs_n < n
                mask = valid[:, None] & kmask[None, :]
                x = _tile(S, stride_n, stride_k, offs_n, offs_k, mask, ACC)
                f = tl.load(FOUT + offs_n, mask=valid, other=0.0).to(ACC)
                p = tl.exp(tl.where(mask, (x + f[:, None] + g[None, :]) * inv_e, NEG_INF))
                p = tl.where(mask, tl.where(bad != 0, NAN, p), 0.0)
                tl.store(
                    PLAN + offs_n[:, None] * K + offs_k[None, :], p.to(PLAN.dtype.element_ty), mask=(offs_n < N)[:, None] & kout[None, :]
                )
                if bad != 0:
                    tl.store(FOUT + offs_n, tl.full([BLOCK_N], NAN, ACC).to(FOUT.dtype.element_ty), mask=valid)


@triton.jit
def _potentials_at(LSEC, EPOT, log_c, offs_k, kmask, rho, t, K, ACC: tl.constexpr):
    """(e_t, 1/e_t, τ_t in the accumulation dtype, lse_col^t, g^t) of saved iteration t."""
    e_t = tl.load(EPOT + t)
    tau = _tau(rho, e_t).to(ACC)
    e_acc = e_t.to(ACC)
    lse_col = tl.load(LSEC + t * K + offs_k, mask=kmask, other=0.0)
    g = tl.where(kmask, _potential(log_c, lse_col, e_acc, tau), 0.0)
    return e_acc, (1.0 / e_t).to(ACC), tau, lse_col, g


@triton.jit
def _reverse_pass(
    S,
    DS,
    RMASS,
    LSER,
    stride_n,
    stride_k,
    gbar,
    log_c,
    inv_e,
    tau,
    lse_col,
    e_p,
    inv_e_p,
    tau_p,
    lse_col_p,
    g_p,
    row_lo,
    row_hi,
    k,
    K,
    FAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """Column step t, then row step t − 1 (their saved LSEs: ``LSER`` at t − 1, ``lse_col`` at t,
    ``lse_col_p`` at t − 1); S̄ += both into DS; returns ḡ^{t−1}.

    FAST (τ = 1 and ε_t = ε_{t−1}): both softmaxes from one exp per entry, P^{t−1} =
    exp((S + f^{t−1} + g^{t−1}) / e): R^{t−1} = P^{t−1} / r and C^t = P^{t−1} / Σ_i P^{t−1}
    (that column sum, exp(lse_col^t − lse_col^{t−1}) c, is at least c min(r) / Σr; see
    ``_row_pass``).
    """
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < k
    if FAST:
        scale = gbar * tl.exp(lse_col_p - lse_col - log_c)
    else:
        scale = tau * gbar
    new_gbar = tl.zeros([BLOCK_K], ACC)
    for n0 in range(row_lo, row_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < row_hi
        mask = nmask[:, None] & kmask[None, :]
        x = _tile(S, stride_n, stride_k, offs_n, offs_k, mask, ACC)
        tile = offs_n[:, None] * K + offs_k[None, :]
        lse_row = tl.load(LSER + offs_n, mask=nmask, other=0.0)
        r = tl.load(RMASS + offs_n, mask=nmask, other=1.0).to(ACC)
        f_p = _potential(tl.log(r), lse_row, e_p, tau_p)
        if FAST:
            p = tl.exp(tl.where(mask, (x + f_p[:, None] + g_p[None, :]) * inv_e_p, NEG_INF))
            a = -scale[None, :] * p
            fbar = tl.sum(a, axis=1)
            b = -(fbar / r)[:, None] * p
        else:
            a = -scale[None, :] * tl.exp(tl.where(mask, (x + f_p[:, None]) * inv_e - lse_col[None, :], NEG_INF))
            fbar = tl.sum(a, axis=1)
            rsm = tl.exp(tl.where(mask, (x + g_p[None, :]) * inv_e_p - lse_row[:, None], NEG_INF))
            b = -(tau_p * fbar)[:, None] * rsm
        new_gbar += tl.sum(b, axis=0)
        tl.store(DS + tile, tl.load(DS + tile, mask=mask, other=0.0) + a + b, mask=mask)
    return new_gbar


@triton.jit
def _first_pass(
    S,
    G,
    DS,
    RMASS,
    LSER,
    stride_n,
    stride_k,
    e,
    inv_e,
    tau,
    g,
    row_lo,
    row_hi,
    k,
    K,
    BALANCED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """The plan, then row step T − 1 (its row LSEs at ``LSER``), on rows [row_lo, row_hi):
    S̄ := X − τ f̄ R into DS; returns this range's ḡ^{T−1}."""
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < k
    gbar = tl.zeros([BLOCK_K], ACC)
    for n0 in range(row_lo, row_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < row_hi
        mask = nmask[:, None] & kmask[None, :]
        x = _tile(S, stride_n, stride_k, offs_n, offs_k, mask, ACC)
        tile = offs_n[:, None] * K + offs_k[None, :]
        lse_row = tl.load(LSER + offs_n, mask=nmask, other=0.0)
        r = tl.load(RMASS + offs_n, mask=nmask, other=1.0).to(ACC)
        f = _potential(tl.log(r), lse_row, e, tau)
        p = tl.exp(tl.where(mask, (x + f[:, None] + g[None, :]) * inv_e, NEG_INF))
        xg = tl.load(G + tile, mask=mask, other=0.0).to(ACC) * p * inv_e
        fbar = tl.sum(xg, axis=1)
        if BALANCED:  # the row softmax is P / r
            d = xg - (fbar / r)[:, None] * p
        else:
            rsm = tl.exp(tl.where(mask, (x + g[None, :]) * inv_e - lse_row[:, None], NEG_INF))
            d = xg - (tau * fbar)[:, None] * rsm
        gbar += tl.sum(d, axis=0)
        tl.store(DS + tile, d, mask=mask)
    return gbar


@triton.jit
def _last_pass(
    S,
    DS,
    F0,
    stride_n,
    stride_k,
    scale,
    inv_e,
    lse_col,
    row_lo,
    row_hi,
    n,
    k,
    K,
    bad,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """Column step 0 (from f0; scale = τ_0 ḡ^0) on padded rows [row_lo, row_hi): writes ∂scores,
    0 on the padding, NaN on a poisoned problem's valid entries."""
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < k
    kout = offs_k < K
    for n0 in range(row_lo, row_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < n
        mask = nmask[:, None] & kmask[None, :]
        tile = offs_n[:, None] * K + offs_k[None, :]
        x = _tile(S, stride_n, stride_k, offs_n, offs_k, mask, ACC)
        f0 = tl.load(F0 + offs_n, mask=nmask, other=0.0).to(ACC)
        a = -scale[None, :] * tl.exp(tl.where(mask, (x + f0[:, None]) * inv_e - lse_col[None, :], NEG_INF))
        d = tl.load(DS + tile, mask=mask, other=0.0) + a
        d = tl.where(mask, tl.where(bad != 0, NAN, d), 0.0)
        tl.store(DS + tile, d, mask=(offs_n < row_hi)[:, None] & kout[None, :])


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _sinkhorn_ext_bwd_kernel(
    S,
    G,
    DS,
    RMASS,
    CMASS,
    RCNT,
    CCNT,
    F0,
    ITERS,
    LSER,
    LSEC,
    EPOT,
    BAD,
    N,
    K,
    reach: tl.float64,
    max_iters,
    stride_b,
    stride_n,
    stride_k,
    BALANCED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """The reverse passes of one problem (module doc), S̄ accumulated in DS (accumulation dtype)."""
    rho = scalar(reach, tl.float64)
    pid = tl.program_id(0)
    n = tl.load(RCNT + pid).to(tl.int32)
    k = tl.load(CCNT + pid).to(tl.int32)
    T = tl.maximum(tl.minimum(tl.load(ITERS + pid).to(tl.int32), max_iters), 1)  # in bounds whatever ITERS holds
    bad = tl.load(BAD + pid)
    S += pid.to(tl.int64) * stride_b
    G += pid.to(tl.int64) * N * K
    DS += pid.to(tl.int64) * N * K
    RMASS += pid.to(tl.int64) * N
    F0 += pid.to(tl.int64) * N
    LSER += pid.to(tl.int64) * max_iters * N
    LSEC += pid.to(tl.int64) * max_iters * K
    EPOT += pid.to(tl.int64) * max_iters
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < k
    log_c = tl.log(tl.load(CMASS + pid.to(tl.int64) * K + offs_k, mask=kmask, other=1.0).to(ACC))

    gbar = tl.zeros([BLOCK_K], ACC)
    if bad == 0:
        # The plan, then row step T−1.
        e_acc, inv_e, tau, lse_col, g = _potentials_at(LSEC, EPOT, log_c, offs_k, kmask, rho, T - 1, K, ACC)
        gbar = _first_pass(
            S, G, DS, RMASS, LSER + (T - 1) * N, stride_n, stride_k, e_acc, inv_e, tau, g, 0, n, k, K, BALANCED, BLOCK_N, BLOCK_K, ACC
        )
        tl.debug_barrier()
        # Column step t, then row step t−1, for t = T−1 .. 1.
        for i in range(1, T):
            t = T - i
            e_t = tl.load(EPOT + t)
            same = e_t == tl.load(EPOT + t - 1)
            _, inv_e, tau, lse_col, _ = _potentials_at(LSEC, EPOT, log_c, offs_k, kmask, rho, t, K, ACC)
            e_p, inv_e_p, tau_p, lse_col_p, g_p = _potentials_at(LSEC, EPOT, log_c, offs_k, kmask, rho, t - 1, K, ACC)
            rows = LSER + (t - 1) * N
            if BALANCED:
                if same:
                    gbar = _reverse_pass(
                        S, DS, RMASS, rows, stride_n, stride_k, gbar, log_c, inv_e, tau, lse_col, e_p, inv_e_p, tau_p, lse_col_p, g_p,
                        0, n, k, K, True, BLOCK_N, BLOCK_K, ACC,
                    )  # fmt: skip
                else:
                    gbar = _reverse_pass(
                        S, DS, RMASS, rows, stride_n, stride_k, gbar, log_c, inv_e, tau, lse_col, e_p, inv_e_p, tau_p, lse_col_p, g_p,
                        0, n, k, K, False, BLOCK_N, BLOCK_K, ACC,
                    )  # fmt: skip
            else:
                gbar = _reverse_pass(
                    S, DS, RMASS, rows, stride_n, stride_k, gbar, log_c, inv_e, tau, lse_col, e_p, inv_e_p, tau_p, lse_col_p, g_p,
                    0, n, k, K, False, BLOCK_N, BLOCK_K, ACC,
                )  # fmt: skip
            tl.debug_barrier()
    # Column step 0 (from f0), and the padding's zeros; NaN on a poisoned problem.
    _, inv_e, tau, lse_col, _ = _potentials_at(LSEC, EPOT, log_c, offs_k, kmask, rho, 0, K, ACC)
    _last_pass(S, DS, F0, stride_n, stride_k, tau * gbar, inv_e, lse_col, 0, N, n, k, K, bad, BLOCK_N, BLOCK_K, ACC)


# --- the split structure: one large problem's rows over R programs, one launch per pass ---------


@triton.jit
def _split_active(TT, DONE, BAD, CAP, pid, n_iters, SAVE: tl.constexpr):
    """(whether problem pid iterates in this round, its iterations so far)."""
    t = tl.load(TT + pid)
    if SAVE:
        cap = tl.minimum(tl.load(CAP + pid).to(tl.int32), n_iters)
    else:
        cap = n_iters
    return (t < cap) & (tl.load(DONE + pid) == 0) & (tl.load(BAD + pid) == 0), t


@triton.jit
def _split_rows(RCNT, pid, pid_r, rows_per_program, N):
    """(n_b, this program's padded rows [lo, hi))."""
    lo = pid_r * rows_per_program
    return tl.load(RCNT + pid).to(tl.int32), lo, tl.minimum(lo + rows_per_program, N)


@triton.jit
def _split_init_kernel(
    S, RCNT, CCNT, F0, FOUT, BAD, N, K, rows_per_program, stride_b, stride_n, stride_k,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """f := f0 (0 on the padding) on this program's rows; any non-finite valid score sets BAD."""
    pid = tl.program_id(0)
    n, lo, hi = _split_rows(RCNT, pid, tl.program_id(1), rows_per_program, N)
    k = tl.load(CCNT + pid).to(tl.int32)
    S += pid.to(tl.int64) * stride_b
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < k
    bad = tl.zeros([], tl.int32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < n
        f0 = tl.load(F0 + pid.to(tl.int64) * N + offs_n, mask=valid, other=0.0).to(ACC)
        tl.store(FOUT + pid.to(tl.int64) * N + offs_n, tl.where(valid, f0, 0.0).to(FOUT.dtype.element_ty), mask=offs_n < hi)
        mask = valid[:, None] & kmask[None, :]
        x = _tile(S, stride_n, stride_k, offs_n, offs_k, mask, ACC)
        bad = tl.maximum(bad, tl.max(tl.max(tl.where(mask & ~(tl.abs(x) < POS_INF), 1, 0), axis=1), axis=0))
    tl.atomic_max(BAD + pid, bad)


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _split_col_kernel(
    S, RCNT, CCNT, FOUT, CAP, TT, DONE, BAD, E, EP, PART, N, K, R, eps: tl.float64, n_iters, rows_per_program,
    stride_b, stride_n, stride_k,
    SAVE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """The column step's partial LSE on this program's rows, when ε_t changed (else nothing)."""
    eps = scalar(eps, tl.float64)
    pid = tl.program_id(0)
    pid_r = tl.program_id(1)
    active, t = _split_active(TT, DONE, BAD, CAP, pid, n_iters, SAVE)
    e_t = tl.maximum(tl.load(E + pid), eps)
    if active & (e_t != tl.load(EP + pid)):
        n, lo, hi = _split_rows(RCNT, pid, pid_r, rows_per_program, N)
        k = tl.load(CCNT + pid).to(tl.int32)
        offs_k = tl.arange(0, BLOCK_K)
        inv_e = (1.0 / e_t).to(ACC)
        m, s = _column_lse(
            S + pid.to(tl.int64) * stride_b, FOUT + pid.to(tl.int64) * N, stride_n, stride_k, lo, tl.minimum(hi, n), k, inv_e,
            BLOCK_N, BLOCK_K, ACC,
        )  # fmt: skip
        part = PART + (pid.to(tl.int64) * R + pid_r) * 2 * K
        tl.store(part + offs_k, m, mask=offs_k < K)
        tl.store(part + K + offs_k, s, mask=offs_k < K)


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _split_row_kernel(
    S, RMASS, CMASS, RCNT, CCNT, FOUT, CAP, TT, DONE, BAD, E, EP, PART, PART_ROW, LSENEXT, LSECUR, LSER, LSEC, EPOT,
    N, K, R, eps: tl.float64, reach: tl.float64, n_iters, max_iters, rows_per_program, stride_b, stride_n, stride_k,
    SAVE: tl.constexpr, BALANCED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """The column step (from the partials, or the last row pass's LSE), then the row step on
    this program's rows; its column partials go to PART_ROW."""
    eps = scalar(eps, tl.float64)
    rho = scalar(reach, tl.float64)
    pid = tl.program_id(0)
    pid_r = tl.program_id(1)
    active, t = _split_active(TT, DONE, BAD, CAP, pid, n_iters, SAVE)
    if active:
        n, lo, hi = _split_rows(RCNT, pid, pid_r, rows_per_program, N)
        k = tl.load(CCNT + pid).to(tl.int32)
        offs_k = tl.arange(0, BLOCK_K)
        kmask = offs_k < k
        log_c = tl.log(tl.load(CMASS + pid.to(tl.int64) * K + offs_k, mask=kmask, other=1.0).to(ACC))
        e_t = tl.maximum(tl.load(E + pid), eps)
        tau = _tau(rho, e_t).to(ACC)
        e_acc = e_t.to(ACC)
        inv_e = (1.0 / e_t).to(ACC)
        if e_t != tl.load(EP + pid):
            m = tl.full([BLOCK_K], NEG_INF, ACC)
            s = tl.zeros([BLOCK_K], ACC)
            for r in range(0, R):
                part = PART + (pid.to(tl.int64) * R + r) * 2 * K
                m, s = _merge(m, s, tl.load(part + offs_k, mask=kmask, other=NEG_INF), tl.load(part + K + offs_k, mask=kmask, other=0.0))
            lse_col = _lse(m, s, kmask)
        else:
            lse_col = tl.load(LSENEXT + pid.to(tl.int64) * K + offs_k, mask=kmask, other=0.0)
        g = tl.where(kmask, _potential(log_c, lse_col, e_acc, tau), 0.0)
        if pid_r == 0:
            tl.store(LSECUR + pid.to(tl.int64) * K + offs_k, lse_col, mask=kmask)
            if SAVE:
                tl.store(LSEC + (pid.to(tl.int64) * max_iters + t) * K + offs_k, lse_col, mask=kmask)
                tl.store(EPOT + pid.to(tl.int64) * max_iters + t, e_t)
        m, s = _row_pass(
            S + pid.to(tl.int64) * stride_b, RMASS + pid.to(tl.int64) * N, FOUT + pid.to(tl.int64) * N,
            LSER + (pid.to(tl.int64) * max_iters + t) * N, stride_n, stride_k, g, lo, tl.minimum(hi, n), k, e_acc, inv_e, tau,
            SAVE, BALANCED, BLOCK_N, BLOCK_K, ACC,
        )  # fmt: skip
        part = PART_ROW + (pid.to(tl.int64) * R + pid_r) * 2 * K
        tl.store(part + offs_k, m, mask=offs_k < K)
        tl.store(part + K + offs_k, s, mask=offs_k < K)


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _split_finish_kernel(
    CMASS, CCNT, CAP, TT, DONE, BAD, E, EP, PART_ROW, LSENEXT, LSECUR, ERRB, K, R,
    eps: tl.float64, decay: tl.float64, tol: tl.float64, reach: tl.float64, n_iters,
    SAVE: tl.constexpr, BALANCED: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """One program per problem: the round's column sums, err, the stopping test, the next ε."""
    eps = scalar(eps, tl.float64)
    decay = scalar(decay, tl.float64)
    tol = scalar(tol, tl.float64)
    rho = scalar(reach, tl.float64)
    pid = tl.program_id(0)
    active, t = _split_active(TT, DONE, BAD, CAP, pid, n_iters, SAVE)
    if active:
        offs_k = tl.arange(0, BLOCK_K)
        kmask = offs_k < tl.load(CCNT + pid).to(tl.int32)
        log_c = tl.log(tl.load(CMASS + pid.to(tl.int64) * K + offs_k, mask=kmask, other=1.0).to(ACC))
        e = tl.load(E + pid)
        e_t = tl.maximum(e, eps)
        tau = _tau(rho, e_t).to(ACC)
        inv_e = (1.0 / e_t).to(ACC)
        lse_col = tl.load(LSECUR + pid.to(tl.int64) * K + offs_k, mask=kmask, other=0.0)
        g = tl.where(kmask, _potential(log_c, lse_col, e_t.to(ACC), tau), 0.0)
        m = tl.full([BLOCK_K], NEG_INF, ACC)
        s = tl.zeros([BLOCK_K], ACC)
        for r in range(0, R):
            part = PART_ROW + (pid.to(tl.int64) * R + r) * 2 * K
            ps = tl.load(part + K + offs_k, mask=kmask, other=0.0)
            if BALANCED:
                s += ps
            else:
                m, s = _merge(m, s, tl.load(part + offs_k, mask=kmask, other=NEG_INF), ps)
        lse_next, gap = _after_rows(m, s, g, inv_e, log_c, lse_col, tau, kmask, BALANCED)
        err = tl.max(tl.where(kmask, tl.abs(tl.exp(gap) - 1.0), 0.0), axis=0)
        tl.store(LSENEXT + pid.to(tl.int64) * K + offs_k, lse_next, mask=kmask)
        tl.store(ERRB + pid, err)
        if not SAVE:
            tl.store(DONE + pid, ((tol >= 0.0) & (e_t == eps) & (err.to(tl.float64) <= tol)).to(tl.int32))
        tl.store(TT + pid, t + 1)
        tl.store(EP + pid, e_t)
        tl.store(E + pid, e * decay)


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _split_out_kernel(
    S, CMASS, RCNT, CCNT, FOUT, TT, BAD, EP, LSECUR, ERRB, PLAN, GOUT, ITERS, ERR, N, K, reach: tl.float64, n_iters,
    rows_per_program, stride_b, stride_n, stride_k,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """The plan on this program's rows; program 0 of a problem writes g, iters and err."""
    rho = scalar(reach, tl.float64)
    pid = tl.program_id(0)
    pid_r = tl.program_id(1)
    n, lo, hi = _split_rows(RCNT, pid, pid_r, rows_per_program, N)
    k = tl.load(CCNT + pid).to(tl.int32)
    bad = tl.load(BAD + pid)
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < k
    kout = offs_k < K
    log_c = tl.log(tl.load(CMASS + pid.to(tl.int64) * K + offs_k, mask=kmask, other=1.0).to(ACC))
    e_last = tl.load(EP + pid)
    tau = _tau(rho, e_last).to(ACC)
    lse_col = tl.load(LSECUR + pid.to(tl.int64) * K + offs_k, mask=kmask, other=0.0)
    g = tl.where(kmask, _potential(log_c, lse_col, e_last.to(ACC), tau), 0.0)
    if pid_r == 0:
        tl.store(ITERS + pid, tl.where(bad != 0, n_iters, tl.load(TT + pid)).to(tl.int64))
        tl.store(ERR + pid, tl.where(bad != 0, NAN, tl.load(ERRB + pid)).to(ERR.dtype.element_ty))
        g_out = tl.where(kmask, tl.where(bad != 0, NAN, g), 0.0)
        tl.store(GOUT + pid.to(tl.int64) * K + offs_k, g_out.to(GOUT.dtype.element_ty), mask=kout)
    inv_e = (1.0 / e_last).to(ACC)
    S += pid.to(tl.int64) * stride_b
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < n
        mask = valid[:, None] & kmask[None, :]
        x = _tile(S, stride_n, stride_k, offs_n, offs_k, mask, ACC)
        f = tl.load(FOUT + pid.to(tl.int64) * N + offs_n, mask=valid, other=0.0).to(ACC)
        p = tl.exp(tl.where(mask, (x + f[:, None] + g[None, :]) * inv_e, NEG_INF))
        p = tl.where(mask, tl.where(bad != 0, NAN, p), 0.0)
        out = PLAN + pid.to(tl.int64) * N * K + offs_n[:, None] * K + offs_k[None, :]
        tl.store(out, p.to(PLAN.dtype.element_ty), mask=(offs_n < hi)[:, None] & kout[None, :])
        if bad != 0:
            tl.store(FOUT + pid.to(tl.int64) * N + offs_n, tl.full([BLOCK_N], NAN, ACC).to(FOUT.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=("step", "max_iters"))
def _split_bwd_kernel(
    S, G, DS, RMASS, CMASS, RCNT, CCNT, F0, ITERS, LSER, LSEC, EPOT, BAD, GB, N, K, R, reach: tl.float64, max_iters, step,
    rows_per_program, stride_b, stride_n, stride_k,
    BALANCED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Reverse pass ``step`` of every problem on this program's rows: the first pass at step 0,
    the fused pass of column step t and row step t − 1 at step T − t, column step 0 at step T.
    ḡ crosses programs as per-program partials in GB (two slots, by the step's parity)."""
    rho = scalar(reach, tl.float64)
    pid = tl.program_id(0)
    pid_r = tl.program_id(1)
    n, lo, hi = _split_rows(RCNT, pid, pid_r, rows_per_program, N)
    k = tl.load(CCNT + pid).to(tl.int32)
    T = tl.maximum(tl.minimum(tl.load(ITERS + pid).to(tl.int32), max_iters), 1)
    bad = tl.load(BAD + pid)
    S += pid.to(tl.int64) * stride_b
    G += pid.to(tl.int64) * N * K
    DS += pid.to(tl.int64) * N * K
    RMASS += pid.to(tl.int64) * N
    F0 += pid.to(tl.int64) * N
    LSER += pid.to(tl.int64) * max_iters * N
    LSEC += pid.to(tl.int64) * max_iters * K
    EPOT += pid.to(tl.int64) * max_iters
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < k
    log_c = tl.log(tl.load(CMASS + pid.to(tl.int64) * K + offs_k, mask=kmask, other=1.0).to(ACC))
    out = GB + ((pid.to(tl.int64) * 2 + step % 2) * R + pid_r) * K
    gbar = tl.zeros([BLOCK_K], ACC)
    if (step > 0) & (step <= T) & (bad == 0):
        for r in range(0, R):
            gbar += tl.load(GB + ((pid.to(tl.int64) * 2 + (step - 1) % 2) * R + r) * K + offs_k, mask=kmask, other=0.0)
    if (step == 0) & (bad == 0):
        e_acc, inv_e, tau, lse_col, g = _potentials_at(LSEC, EPOT, log_c, offs_k, kmask, rho, T - 1, K, ACC)
        part = _first_pass(
            S, G, DS, RMASS, LSER + (T - 1) * N, stride_n, stride_k, e_acc, inv_e, tau, g, lo, tl.minimum(hi, n), k, K, BALANCED,
            BLOCK_N, BLOCK_K, ACC,
        )  # fmt: skip
        tl.store(out + offs_k, part, mask=offs_k < K)
    elif (step > 0) & (step < T) & (bad == 0):
        t = T - step
        e_t = tl.load(EPOT + t)
        same = e_t == tl.load(EPOT + t - 1)
        _, inv_e, tau, lse_col, _ = _potentials_at(LSEC, EPOT, log_c, offs_k, kmask, rho, t, K, ACC)
        e_p, inv_e_p, tau_p, lse_col_p, g_p = _potentials_at(LSEC, EPOT, log_c, offs_k, kmask, rho, t - 1, K, ACC)
        rows = LSER + (t - 1) * N
        row_hi = tl.minimum(hi, n)
        if BALANCED:
            if same:
                part = _reverse_pass(
                    S, DS, RMASS, rows, stride_n, stride_k, gbar, log_c, inv_e, tau, lse_col, e_p, inv_e_p, tau_p, lse_col_p, g_p,
                    lo, row_hi, k, K, True, BLOCK_N, BLOCK_K, ACC,
                )  # fmt: skip
            else:
                part = _reverse_pass(
                    S, DS, RMASS, rows, stride_n, stride_k, gbar, log_c, inv_e, tau, lse_col, e_p, inv_e_p, tau_p, lse_col_p, g_p,
                    lo, row_hi, k, K, False, BLOCK_N, BLOCK_K, ACC,
                )  # fmt: skip
        else:
            part = _reverse_pass(
                S, DS, RMASS, rows, stride_n, stride_k, gbar, log_c, inv_e, tau, lse_col, e_p, inv_e_p, tau_p, lse_col_p, g_p,
                lo, row_hi, k, K, False, BLOCK_N, BLOCK_K, ACC,
            )  # fmt: skip
        tl.store(out + offs_k, part, mask=offs_k < K)
    elif step == T:
        _, inv_e, tau, lse_col, _ = _potentials_at(LSEC, EPOT, log_c, offs_k, kmask, rho, 0, K, ACC)
        _last_pass(S, DS, F0, stride_n, stride_k, tau * gbar, inv_e, lse_col, lo, hi, n, k, K, bad, BLOCK_N, BLOCK_K, ACC)


def fits(n_cols: int, dtype: torch.dtype) -> bool:
    """Whether rows of ``n_cols`` scores fit one tile (a program keeps whole rows)."""
    return triton.next_power_of_2(max(1, n_cols)) <= _common.widest_row(_common.acc_dtype(dtype))


class _Shape:
    def __init__(self, scores: torch.Tensor):
        self.B, self.N, self.K = scores.shape
        self.acc = _common.acc_dtype(scores.dtype)
        self.acc_tl = _common.tl_dtype(self.acc)
        self.block_k = triton.next_power_of_2(max(1, self.K))
        self.block_n = _common.tile_rows(max(1, self.N), self.block_k, self.acc)
        self.warps = _common.num_warps(self.block_n * self.block_k, self.acc)
        self.R = _common.programs_per_problem(self.B, self.N, self.block_n, self.N * self.K, scores.device)
        self.rows_per_program = triton.cdiv(triton.cdiv(max(1, self.N), self.block_n), self.R) * self.block_n
        self.R = triton.cdiv(max(1, self.N), self.rows_per_program)


def _prepared(sh: _Shape, scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start):
    dev = scores.device
    return (
        row_mass.reshape(sh.B, sh.N).to(sh.acc).contiguous(),
        col_mass.reshape(sh.B, sh.K).to(sh.acc).contiguous(),
        row_counts.reshape(sh.B).to(device=dev, dtype=torch.int64).contiguous(),
        col_counts.reshape(sh.B).to(device=dev, dtype=torch.int64).contiguous(),
        init_f.reshape(sh.B, sh.N).to(sh.acc).contiguous(),
        eps_start.reshape(sh.B).to(device=dev, dtype=torch.float64).contiguous(),
    )


def _launch_forward(sh, s, rows, cols, rcnt, ccnt, f0, e0, eps, decay, n_iters, tol, reach, save, cap=None, max_iters=1):
    dev = s.device
    out = _common.new_output
    plan = out((sh.B, sh.N, sh.K) if not save else (1,), s.dtype, dev)
    f = out((sh.B, sh.N), sh.acc, dev)
    g = out((sh.B, sh.K) if not save else (1,), sh.acc, dev)
    iters = torch.full((sh.B,) if not save else (1,), -1, dtype=torch.int64, device=dev)
    err = out((sh.B,) if not save else (1,), sh.acc, dev)
    slots = max_iters if save else 1
    lser = torch.empty((sh.B, slots, sh.N) if save else (1,), dtype=sh.acc, device=dev)
    lsec = torch.empty((sh.B, slots, sh.K) if save else (1,), dtype=sh.acc, device=dev)
    epot = torch.ones((sh.B, slots) if save else (1,), dtype=torch.float64, device=dev)  # read, unused, for poisoned problems
    bad = torch.empty((sh.B,) if save else (1,), dtype=torch.int32, device=dev)
    if sh.R > 1:
        outputs = (plan, f, g, iters, err, lser, lsec, epot)
        bad = _split_forward(sh, s, rows, cols, rcnt, ccnt, f0, e0, (eps, decay, tol, reach), n_iters, save, cap, slots, outputs)
        return (*outputs, bad)
    _sinkhorn_ext_fwd_kernel[(sh.B,)](
        s,
        rows,
        cols,
        rcnt,
        ccnt,
        f0,
        e0,
        cap if cap is not None else rcnt,
        plan,
        f,
        g,
        iters,
        err,
        lser,
        lsec,
        epot,
        bad,
        sh.N,
        sh.K,
        float(eps),
        float(decay),
        float(tol),
        float(reach),
        int(n_iters),
        int(slots),
        *s.stride(),
        SAVE=save,
        WRITE_PLAN=not save,
        BALANCED=float(reach) == math.inf,
        BLOCK_N=sh.block_n,
        BLOCK_K=sh.block_k,
        ACC=sh.acc_tl,
        num_warps=sh.warps,
        maxnreg=_common.MAX_REGISTERS,
    )
    return plan, f, g, iters, err, lser, lsec, epot, bad


def _split_forward(sh, s, rows, cols, rcnt, ccnt, f0, e0, floats, n_iters, save, cap, slots, outputs):
    """The split structure: 1 + 3 n_iters + 1 launches (init; per round the column partials, the
    row step, the per-problem finish; the plan). A problem that stopped skips its launches' work;
    nothing is read on the host. Returns the poisoned-problem flags."""
    eps, decay, tol, reach = (float(v) for v in floats)
    plan, f, g, iters, err, lser, lsec, epot = outputs
    dev = s.device
    B, N, K, R = sh.B, sh.N, sh.K, sh.R
    balanced = reach == math.inf
    e = e0.clone()
    e_prev = torch.full((B,), -1.0, dtype=torch.float64, device=dev)
    tt = torch.zeros((B,), dtype=torch.int32, device=dev)
    done = torch.zeros((B,), dtype=torch.int32, device=dev)
    bad = torch.zeros((B,), dtype=torch.int32, device=dev)
    part = torch.empty((B, R, 2, K), dtype=sh.acc, device=dev)
    part_row = torch.empty((B, R, 2, K), dtype=sh.acc, device=dev)
    lse_next = torch.zeros((B, K), dtype=sh.acc, device=dev)
    lse_cur = torch.zeros((B, K), dtype=sh.acc, device=dev)
    err_now = torch.zeros((B,), dtype=sh.acc, device=dev)
    cap = cap if cap is not None else rcnt
    grid = (B, R)
    common = dict(BLOCK_K=sh.block_k, ACC=sh.acc_tl, num_warps=sh.warps, maxnreg=_common.MAX_REGISTERS)
    _split_init_kernel[grid](s, rcnt, ccnt, f0, f, bad, N, K, sh.rows_per_program, *s.stride(), BLOCK_N=sh.block_n, **common)
    for _ in range(n_iters):
        _split_col_kernel[grid](
            s, rcnt, ccnt, f, cap, tt, done, bad, e, e_prev, part, N, K, R, eps, n_iters, sh.rows_per_program, *s.stride(),
            SAVE=save, BLOCK_N=sh.block_n, **common,
        )  # fmt: skip
        _split_row_kernel[grid](
            s, rows, cols, rcnt, ccnt, f, cap, tt, done, bad, e, e_prev, part, part_row, lse_next, lse_cur, lser, lsec, epot,
            N, K, R, eps, reach, n_iters, slots, sh.rows_per_program, *s.stride(),
            SAVE=save, BALANCED=balanced, BLOCK_N=sh.block_n, **common,
        )  # fmt: skip
        _split_finish_kernel[(B,)](
            cols, ccnt, cap, tt, done, bad, e, e_prev, part_row, lse_next, lse_cur, err_now, K, R, eps, decay, tol, reach, n_iters,
            SAVE=save, BALANCED=balanced, **common,
        )  # fmt: skip
    if not save:
        _split_out_kernel[grid](
            s, cols, rcnt, ccnt, f, tt, bad, e_prev, lse_cur, err_now, plan, g, iters, err, N, K, reach, n_iters,
            sh.rows_per_program, *s.stride(), BLOCK_N=sh.block_n, **common,
        )  # fmt: skip
    return bad


def forward(scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start, eps, decay, n_iters, tol, reach, log_domain):
    """(plan (B,N,K) in scores' dtype, f (B,N), g (B,K), iters (B,) int64, err (B,)); f, g and err in
    the accumulation dtype. ``log_domain`` is accepted but not needed (module doc)."""
    sh = _Shape(scores)
    dev = scores.device
    if sh.B == 0 or sh.N == 0 or sh.K == 0:
        return (
            torch.zeros((sh.B, sh.N, sh.K), dtype=scores.dtype, device=dev),
            torch.zeros((sh.B, sh.N), dtype=sh.acc, device=dev),
            torch.zeros((sh.B, sh.K), dtype=sh.acc, device=dev),
            torch.zeros((sh.B,), dtype=torch.int64, device=dev),
            torch.zeros((sh.B,), dtype=sh.acc, device=dev),
        )
    prepared = _prepared(sh, scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start)
    plan, f, g, iters, err, *_ = _launch_forward(sh, scores, *prepared, eps, decay, n_iters, tol, reach, save=False)
    return plan, f, g, iters, err


def backward(
    grad, scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start, eps, decay, iters, reach, log_domain, *, max_iters=None
):
    """∂loss/∂scores (B,N,K), scores' dtype, for ∂loss/∂plan = grad: the exact VJP of ``iters[b]``
    iterations. The replay's scratch holds ``max(iters)`` iterations: pass ``max_iters`` (any bound,
    e.g. the forward's ``n_iters``) to size it without reading ``iters`` on the host."""
    sh = _Shape(scores)
    dev = scores.device
    if sh.B == 0 or sh.N == 0 or sh.K == 0:
        return torch.zeros((sh.B, sh.N, sh.K), dtype=scores.dtype, device=dev)
    rows, cols, rcnt, ccnt, f0, e0 = _prepared(sh, scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start)
    cap = iters.reshape(sh.B).to(device=dev, dtype=torch.int64).contiguous()
    if max_iters is None:
        max_iters = int(cap.max())  # the one host read: the replay's scratch size
    max_iters = max(1, int(max_iters))
    _, _, _, _, _, lser, lsec, epot, bad = _launch_forward(
        sh, scores, rows, cols, rcnt, ccnt, f0, e0, eps, decay, max_iters, -1.0, reach, save=True, cap=cap, max_iters=max_iters
    )
    g = grad.reshape(sh.B, sh.N, sh.K).contiguous()
    ds = _common.new_output((sh.B, sh.N, sh.K), sh.acc, dev)
    if sh.R > 1:
        gb = torch.zeros((sh.B, 2, sh.R, sh.K), dtype=sh.acc, device=dev)
        for step in range(max_iters + 1):
            _split_bwd_kernel[(sh.B, sh.R)](
                scores, g, ds, rows, cols, rcnt, ccnt, f0, cap, lser, lsec, epot, bad, gb, sh.N, sh.K, sh.R, float(reach), max_iters,
                step, sh.rows_per_program, *scores.stride(),
                BALANCED=float(reach) == math.inf, BLOCK_N=sh.block_n, BLOCK_K=sh.block_k, ACC=sh.acc_tl, num_warps=sh.warps,
                maxnreg=_common.MAX_REGISTERS,
            )  # fmt: skip
        return ds.to(scores.dtype)
    _sinkhorn_ext_bwd_kernel[(sh.B,)](
        scores,
        g,
        ds,
        rows,
        cols,
        rcnt,
        ccnt,
        f0,
        cap,
        lser,
        lsec,
        epot,
        bad,
        sh.N,
        sh.K,
        float(reach),
        max_iters,
        *scores.stride(),
        BALANCED=float(reach) == math.inf,
        BLOCK_N=sh.block_n,
        BLOCK_K=sh.block_k,
        ACC=sh.acc_tl,
        num_warps=sh.warps,
        maxnreg=_common.MAX_REGISTERS,
    )
    return ds.to(scores.dtype)
