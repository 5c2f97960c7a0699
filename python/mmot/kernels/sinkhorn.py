"""Triton kernels of ``mmot::sinkhorn``: the forward and the exact VJP of the unrolled iteration.

Formulation (the same for every ``log_domain``; no host sync decides anything). With
L = (scores − column max) / eps and log-potentials a (rows) and b (columns)::

    b_1     = log c - LSE_n L                      (pass 0: an online column log-sum-exp)
    a_t     = log r - LSE_a (L + b_t)              (row pass t: row max, one exp per entry)
    P_t     = exp(L + a_t + b_t)                   (rows sum to r, entries <= r)
    b_{t+1} = b_t + log c - log Σ_n P_t            (column sums of P_t, bounded below)

This is the reference's log domain: the column log-sum-exp of iteration t+1 is taken from
the column sums of the already row-normalised plan P_t: those entries never overflow, and a
column sum of P_t is at least c_a · min(r) / Σr, so it never underflows either. With L centred
(each column's maximum exactly 0), b stays within a few log-masses of 0, so the rounding of
logits of any size never moves the plan (subtracting anything else, b would be as large as L
and its rounding would: 0.5 off at scores of 1e8 in float32). a_t, as large as L, is saved in
two parts, the row maximum of L + b_t and log r − log Σ, and the backward forms
exp((L + b_t − row max) + the rest), exact at each row's maximum. The plain and
log domains of ``mmot.reference`` compute the same function, so ``log_domain`` only matters
to the reference: the kernels are always stable, with one exp per entry per iteration.

Each iteration is one streaming pass over the rows. The backward recomputes the potentials
(saving a_t and b_t, O(T·(N+K))), then runs one reverse streaming pass per iteration::

    X = Ḡ ⊙ P_T;  ā_T = Σ_a X;  L̄ = X - ā_T P_T / r;  b̄_T = Σ_n L̄            (pass T)
    Y = -b̄_{t+1} Q_{t+1} / c;  ā_t = Σ_a Y;  Z = -ā_t P_t / r;  L̄ += Y + Z;  b̄_t = Σ_n Z
    L̄ += -b̄_1 Q_1 / c;  ∂scores = L̄ / eps                                    (pass 0)

where Q_t = exp(L + a_{t-1} + b_t) is the plan after the column step of iteration t (a_0 = 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmot.kernels import _common
from mmot.kernels._common import NEG_INF, NOT_SPECIALIZED, scalar


@triton.jit
def _load_logits(S, CMAX, stride_n, stride_k, offs_n, offs_k, mask, inv_eps, ACC: tl.constexpr):
    """(scores − column max) / eps for a tile: every entry ≤ 0, each column's maximum exactly 0.

    The shift is absorbed exactly by the first column scaling and keeps the column potentials
    near 0 (module doc). Halved, so that a difference of two finite scores cannot overflow, then
    doubled by a product, which no add can contract differently in the forward and the backward
    (they must round L + b alike). The floor at −finfo.max/8, the widest range the value checks
    let run in this dtype, keeps the logits finite with the checks off.
    """
    shift = tl.load(CMAX + offs_k, mask=tl.max(mask.to(tl.int32), axis=0) > 0, other=0.0).to(ACC)
    x = tl.load(S + offs_n[:, None] * stride_n + offs_k[None, :] * stride_k, mask=mask, other=0.0).to(ACC)
    half = (x * 0.5 - shift[None, :] * 0.5) * inv_eps
    if ACC == tl.float64:
        floor = tl.full([], -2.2471164185778946e307, tl.float64)
    else:
        floor = tl.full([], -4.253529586511731e37, tl.float32)
    return tl.maximum(2.0 * half, floor)


@triton.jit
def _column_lse(S, CMAX, stride_n, stride_k, row_lo, row_hi, K, inv_eps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """Online (max, Σ exp(x - max)) over rows [row_lo, row_hi) of every column of L."""
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    m = tl.full([BLOCK_K], NEG_INF, ACC)
    acc = tl.zeros([BLOCK_K], ACC)
    for n0 in range(row_lo, row_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = (offs_n < row_hi)[:, None] & kmask[None, :]
        x = tl.where(mask, _load_logits(S, CMAX, stride_n, stride_k, offs_n, offs_k, mask, inv_eps, ACC), NEG_INF)
        new_m = tl.maximum(m, tl.max(x, axis=0))
        safe = tl.where(new_m == NEG_INF, 0.0, new_m)
        acc = acc * tl.exp(m - safe) + tl.sum(tl.exp(x - safe[None, :]), axis=0)
        m = new_m
    return m, acc


@triton.jit
def _row_pass(
    S,
    CMAX,
    stride_n,
    stride_k,
    OUT,
    RMASS,
    APOT,
    b,
    row_lo,
    row_hi,
    K,
    inv_eps,
    SAVE: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """Row step of one iteration given b_t: stores a_t (SAVE), P_t (WRITE_OUT); returns Σ_n P_t."""
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    col = tl.zeros([BLOCK_K], ACC)
    for n0 in range(row_lo, row_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < row_hi
        mask = nmask[:, None] & kmask[None, :]
        x = tl.where(mask, _load_logits(S, CMAX, stride_n, stride_k, offs_n, offs_k, mask, inv_eps, ACC) + b[None, :], NEG_INF)
        row_max = tl.where(nmask, tl.max(x, axis=1), 0.0)
        p = tl.exp(x - row_max[:, None])
        row_sum = tl.where(nmask, tl.sum(p, axis=1), 1.0)
        r = tl.load(RMASS + offs_n, mask=nmask, other=1.0).to(ACC)
        plan = p * (r / row_sum)[:, None]
        if SAVE:
            # a_t = log r − row max − log Σ, kept in two parts: the backward recomputes the
            # plan as exp((x − row max) + the rest), exact at each row's maximum (module doc).
            tl.store(APOT + 2 * offs_n, row_max, mask=nmask)
            tl.store(APOT + 2 * offs_n + 1, tl.log(r) - tl.log(row_sum), mask=nmask)
        if WRITE_OUT:
            tl.store(OUT + offs_n[:, None] * K + offs_k[None, :], plan.to(OUT.dtype.element_ty), mask=mask)
        col += tl.sum(plan, axis=0)
    return col


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _sinkhorn_fwd_kernel(
    S,
    CMAX,
    OUT,
    RMASS,
    CMASS,
    APOT,
    BPOT,
    COLSUM,
    PART,
    N,
    K,
    inv_eps: tl.float64,
    n_iters,
    pass_index,
    rows_per_program,
    R,
    stride_b,
    stride_n,
    stride_k,
    SINGLE: tl.constexpr,
    SAVE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    inv_eps = scalar(inv_eps, ACC)
    pid = tl.program_id(0)
    pid_r = tl.program_id(1)
    S += pid.to(tl.int64) * stride_b
    CMAX += pid * K
    OUT += pid.to(tl.int64) * N * K
    RMASS += pid * N
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    log_c = tl.log(tl.load(CMASS + pid * K + offs_k, mask=kmask, other=1.0).to(ACC))
    row_lo = pid_r * rows_per_program
    row_hi = tl.minimum(row_lo + rows_per_program, N)
    APOT += pid.to(tl.int64) * (n_iters + 1) * 2 * N
    BPOT += pid * (n_iters + 1) * K
    if SINGLE:
        m, acc = _column_lse(S, CMAX, stride_n, stride_k, 0, N, K, inv_eps, BLOCK_N, BLOCK_K, ACC)
        b = tl.where(kmask, log_c - m - tl.log(tl.where(kmask, acc, 1.0)), 0.0)
        if SAVE:
            tl.store(BPOT + K + offs_k, b, mask=kmask)
        for t in range(1, n_iters):
            col = _row_pass(
                S, CMAX, stride_n, stride_k, OUT, RMASS, APOT + t * 2 * N, b, 0, N, K, inv_eps, SAVE, False, BLOCK_N, BLOCK_K, ACC
            )
            b = tl.where(kmask, b + log_c - tl.log(tl.where(kmask, col, 1.0)), 0.0)
            if SAVE:
                tl.store(BPOT + (t + 1) * K + offs_k, b, mask=kmask)
        _row_pass(S, CMAX, stride_n, stride_k, OUT, RMASS, APOT + n_iters * 2 * N, b, 0, N, K, inv_eps, SAVE, True, BLOCK_N, BLOCK_K, ACC)
    else:
        if pass_index == 0:
            m, acc = _column_lse(S, CMAX, stride_n, stride_k, row_lo, row_hi, K, inv_eps, BLOCK_N, BLOCK_K, ACC)
            part = PART + (pid * R + pid_r) * 2 * K
            tl.store(part + offs_k, m, mask=kmask)
            tl.store(part + K + offs_k, acc, mask=kmask)
        else:
            t = pass_index
            if t == 1:
                b = tl.load(BPOT + K + offs_k, mask=kmask, other=0.0)
            else:
                col = tl.load(COLSUM + (pid * (n_iters + 1) + t - 1) * K + offs_k, mask=kmask, other=1.0)
                b = tl.load(BPOT + (t - 1) * K + offs_k, mask=kmask, other=0.0)
                b = tl.where(kmask, b + log_c - tl.log(tl.where(kmask, col, 1.0)), 0.0)
                if pid_r == 0:
                    tl.store(BPOT + t * K + offs_k, b, mask=kmask)
            if t < n_iters:
                col = _row_pass(
                    S,
                    CMAX,
                    stride_n,
                    stride_k,
                    OUT,
                    RMASS,
                    APOT + t * 2 * N,
                    b,
                    row_lo,
                    row_hi,
                    K,
                    inv_eps,
                    SAVE,
                    False,
                    BLOCK_N,
                    BLOCK_K,
                    ACC,
                )
                tl.atomic_add(COLSUM + (pid * (n_iters + 1) + t) * K + offs_k, col, mask=kmask)
            else:
                _row_pass(
                    S,
                    CMAX,
                    stride_n,
                    stride_k,
                    OUT,
                    RMASS,
                    APOT + t * 2 * N,
                    b,
                    row_lo,
                    row_hi,
                    K,
                    inv_eps,
                    SAVE,
                    True,
                    BLOCK_N,
                    BLOCK_K,
                    ACC,
                )


@triton.jit
def _combine_lse_kernel(PART, CMASS, BPOT, K, R, n_iters, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """b_1 = log c - LSE over the R programs' partial (max, sum) pairs of every column."""
    pid = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    m = tl.full([BLOCK_K], NEG_INF, ACC)
    acc = tl.zeros([BLOCK_K], ACC)
    for r in range(0, R):
        part = PART + (pid * R + r) * 2 * K
        pm = tl.load(part + offs_k, mask=kmask, other=NEG_INF)
        ps = tl.load(part + K + offs_k, mask=kmask, other=0.0)
        new_m = tl.maximum(m, pm)
        safe = tl.where(new_m == NEG_INF, 0.0, new_m)
        acc = acc * tl.exp(m - safe) + ps * tl.exp(pm - safe)
        m = new_m
    log_c = tl.log(tl.load(CMASS + pid * K + offs_k, mask=kmask, other=1.0).to(ACC))
    tl.store(BPOT + pid * (n_iters + 1) * K + K + offs_k, log_c - m - tl.log(tl.where(kmask, acc, 1.0)), mask=kmask)


@triton.jit
def _plan(x, b, APOT, offs_n, nmask, mask):
    """exp(L + a_t + b) from a_t's two saved parts (see ``_row_pass``)."""
    row_max = tl.load(APOT + 2 * offs_n, mask=nmask, other=0.0)
    rest = tl.load(APOT + 2 * offs_n + 1, mask=nmask, other=0.0)
    return tl.exp(tl.where(mask, (x + b[None, :]) - row_max[:, None] + rest[:, None], NEG_INF))


@triton.jit
def _reverse_pass(
    S,
    CMAX,
    stride_n,
    stride_k,
    G,
    D,
    RMASS,
    CMASS,
    APOT,
    BPOT,
    BBAR_IN,
    DS,
    row_lo,
    row_hi,
    N,
    K,
    inv_eps,
    t,
    FIRST: tl.constexpr,
    FINAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """One reverse pass; returns this program's column sums for b̄ of the next (earlier) pass."""
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    col = tl.zeros([BLOCK_K], ACC)
    if FIRST:
        b_t = tl.load(BPOT + t * K + offs_k, mask=kmask, other=0.0)
    else:
        b_next = tl.load(BPOT + (t + 1) * K + offs_k, mask=kmask, other=0.0)
        if FINAL:
            b_prev = b_next
        else:
            b_prev = tl.load(BPOT + t * K + offs_k, mask=kmask, other=0.0)
        # −b̄_{t+1} Q_{t+1} / c with Q_{t+1} = P_t · e^{b_{t+1} − b_t} (Q_1 = e^{L + b_1}): one
        # column vector, so that the widest tiles keep the column shift in registers too.
        c = tl.load(CMASS + offs_k, mask=kmask, other=1.0).to(ACC)
        scale = BBAR_IN / c * tl.exp(b_next - b_prev)
    for n0 in range(row_lo, row_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < row_hi
        mask = nmask[:, None] & kmask[None, :]
        x = _load_logits(S, CMAX, stride_n, stride_k, offs_n, offs_k, mask, inv_eps, ACC)
        tile = offs_n[:, None] * K + offs_k[None, :]
        r = tl.load(RMASS + offs_n, mask=nmask, other=1.0).to(ACC)
        if FIRST:
            p = _plan(x, b_t, APOT + t * 2 * N, offs_n, nmask, mask)
            grad = tl.load(G + tile, mask=mask, other=0.0).to(ACC)
            xg = grad * p
            abar = tl.sum(xg, axis=1)
            contrib = xg - (abar / r)[:, None] * p
            col += tl.sum(contrib, axis=0)
            dl = contrib
        else:
            if FINAL:
                y = -scale[None, :] * tl.exp(tl.where(mask, x + b_prev[None, :], NEG_INF))  # a_0 = 0
            else:
                y = -scale[None, :] * _plan(x, b_prev, APOT + t * 2 * N, offs_n, nmask, mask)
            dl = tl.load(D + tile, mask=mask, other=0.0) + y
            if not FINAL:
                abar = tl.sum(y, axis=1)
                # Recomputed rather than kept from y: the widest tiles have no registers for both.
                p = _plan(x, b_prev, APOT + t * 2 * N, offs_n, nmask, mask)
                z = -(abar / r)[:, None] * p
                col += tl.sum(z, axis=0)
                dl += z
        if FINAL:
            tl.store(DS + tile, (dl * inv_eps).to(DS.dtype.element_ty), mask=mask)
        else:
            tl.store(D + tile, dl, mask=mask)
    return col


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _sinkhorn_bwd_kernel(
    S,
    CMAX,
    G,
    D,
    DS,
    RMASS,
    CMASS,
    APOT,
    BPOT,
    BBAR,
    N,
    K,
    inv_eps: tl.float64,
    n_iters,
    pass_index,
    rows_per_program,
    stride_b,
    stride_n,
    stride_k,
    SINGLE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """Reverse passes t = T (first), T-1 .. 1, then 0 (final, writes ∂scores)."""
    inv_eps = scalar(inv_eps, ACC)
    pid = tl.program_id(0)
    pid_r = tl.program_id(1)
    S += pid.to(tl.int64) * stride_b
    CMAX += pid * K
    G += pid.to(tl.int64) * N * K
    D += pid.to(tl.int64) * N * K
    DS += pid.to(tl.int64) * N * K
    RMASS += pid * N
    CMASS += pid * K
    APOT += pid.to(tl.int64) * (n_iters + 1) * 2 * N
    BPOT += pid * (n_iters + 1) * K
    BBAR += pid * (n_iters + 1) * K
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    row_lo = pid_r * rows_per_program
    row_hi = tl.minimum(row_lo + rows_per_program, N)
    if SINGLE:
        bbar = _reverse_pass(
            S,
            CMAX,
            stride_n,
            stride_k,
            G,
            D,
            RMASS,
            CMASS,
            APOT,
            BPOT,
            offs_k * 0.0,
            DS,
            0,
            N,
            N,
            K,
            inv_eps,
            n_iters,
            True,
            False,
            BLOCK_N,
            BLOCK_K,
            ACC,
        )
        for i in range(1, n_iters):
            tl.debug_barrier()
            t = n_iters - i
            bbar = _reverse_pass(
                S,
                CMAX,
                stride_n,
                stride_k,
                G,
                D,
                RMASS,
                CMASS,
                APOT,
                BPOT,
                bbar,
                DS,
                0,
                N,
                N,
                K,
                inv_eps,
                t,
                False,
                False,
                BLOCK_N,
                BLOCK_K,
                ACC,
            )
        tl.debug_barrier()
        _reverse_pass(
            S,
            CMAX,
            stride_n,
            stride_k,
            G,
            D,
            RMASS,
            CMASS,
            APOT,
            BPOT,
            bbar,
            DS,
            0,
            N,
            N,
            K,
            inv_eps,
            0,
            False,
            True,
            BLOCK_N,
            BLOCK_K,
            ACC,
        )
    else:
        t = pass_index
        if t == n_iters:
            col = _reverse_pass(
                S,
                CMAX,
                stride_n,
                stride_k,
                G,
                D,
                RMASS,
                CMASS,
                APOT,
                BPOT,
                offs_k * 0.0,
                DS,
                row_lo,
                row_hi,
                N,
                K,
                inv_eps,
                t,
                True,
                False,
                BLOCK_N,
                BLOCK_K,
                ACC,
            )
            tl.atomic_add(BBAR + t * K + offs_k, col, mask=kmask)
        else:
            bbar = tl.load(BBAR + (t + 1) * K + offs_k, mask=kmask, other=0.0)
            if t > 0:
                col = _reverse_pass(
                    S,
                    CMAX,
                    stride_n,
                    stride_k,
                    G,
                    D,
                    RMASS,
                    CMASS,
                    APOT,
                    BPOT,
                    bbar,
                    DS,
                    row_lo,
                    row_hi,
                    N,
                    K,
                    inv_eps,
                    t,
                    False,
                    False,
                    BLOCK_N,
                    BLOCK_K,
                    ACC,
                )
                tl.atomic_add(BBAR + t * K + offs_k, col, mask=kmask)
            else:
                _reverse_pass(
                    S,
                    CMAX,
                    stride_n,
                    stride_k,
                    G,
                    D,
                    RMASS,
                    CMASS,
                    APOT,
                    BPOT,
                    bbar,
                    DS,
                    row_lo,
                    row_hi,
                    N,
                    K,
                    inv_eps,
                    0,
                    False,
                    True,
                    BLOCK_N,
                    BLOCK_K,
                    ACC,
                )


class _Plan:
    """Shapes, tiles and the launch structure of one call."""

    def __init__(self, scores: torch.Tensor):
        self.n_rows, self.n_cols = scores.shape[-2:]
        self.s = scores.reshape(-1, self.n_rows, self.n_cols)
        self.n_problems = self.s.shape[0]
        self.acc = _common.acc_dtype(scores.dtype)
        self.block_k = triton.next_power_of_2(self.n_cols)
        self.block_n = _common.tile_rows(self.n_rows, self.block_k, self.acc)
        self.warps = _common.num_warps(self.block_n * self.block_k, self.acc)
        self.R = _common.programs_per_problem(self.n_problems, self.n_rows, self.block_n, self.n_rows * self.n_cols, scores.device)
        tiles = triton.cdiv(self.n_rows, self.block_n)
        self.rows_per_program = triton.cdiv(tiles, self.R) * self.block_n
        self.R = triton.cdiv(self.n_rows, self.rows_per_program)
        self.single = self.R == 1

    def strides(self):
        return self.s.stride(0), self.s.stride(1), self.s.stride(2)


def fits(n_cols: int, dtype: torch.dtype) -> bool:
    """Whether rows of ``n_cols`` scores fit one tile; the op runs wider calls elsewhere."""
    return triton.next_power_of_2(n_cols) <= _common.widest_row(_common.acc_dtype(dtype))


def _run_forward(plan: _Plan, eps, n_iters, row_mass, col_mass, save: bool, shift=None, reduce=None):
    """With ``reduce`` (rows sharded over processes, ``mmot.ops._sharded``): ``shift`` holds the
    column maxima over every rank, the passes run one launch each, and ``reduce`` sums each
    pass's column vector over the ranks in place between launches (no host sync)."""
    s = plan.s
    dev = s.device
    B, N, K = plan.n_problems, plan.n_rows, plan.n_cols
    out = torch.empty((B, N, K), dtype=s.dtype, device=dev)
    rows = row_mass.reshape(B, N).to(plan.acc).contiguous()
    cols = col_mass.reshape(B, K).to(plan.acc).contiguous()
    keep = save or not plan.single
    apot = torch.empty((B, n_iters + 1, N, 2) if save else (1,), dtype=plan.acc, device=dev)
    bpot = torch.empty((B, n_iters + 1, K) if keep else (1,), dtype=plan.acc, device=dev)
    colsum = torch.zeros((B, n_iters + 1, K) if not plan.single else (1,), dtype=plan.acc, device=dev)
    part = torch.empty((B, plan.R, 2, K) if not plan.single else (1,), dtype=plan.acc, device=dev)
    acc_tl = _common.tl_dtype(plan.acc)

    # The column shifts of the logits (_load_logits); sharded: the maxima over every rank.
    cmax = s.amax(-2).contiguous() if shift is None else shift.reshape(B, K).to(s.dtype).contiguous()

    def launch(pass_index):
        _sinkhorn_fwd_kernel[(B, plan.R)](
            s,
            cmax,
            out,
            rows,
            cols,
            apot,
            bpot,
            colsum,
            part,
            N,
            K,
            1.0 / eps,
            n_iters,
            pass_index,
            plan.rows_per_program,
            plan.R,
            *plan.strides(),
            SINGLE=plan.single,
            SAVE=save,
            BLOCK_N=plan.block_n,
            BLOCK_K=plan.block_k,
            ACC=acc_tl,
            num_warps=plan.warps,
            maxnreg=_common.MAX_REGISTERS,
        )

    if reduce is not None:
        launch(0)
        # b_1 = log c − log Σ over ranks of Σ_n exp(L): each program's (max, sum) pair, taken to
        # the common scale (L's column maximum over all ranks is 0, so nothing overflows).
        local = (part[:, :, 1] * torch.exp(part[:, :, 0])).sum(1)
        reduce(local)
        bpot[:, 1] = torch.log(cols) - torch.log(local)
        for t in range(1, n_iters + 1):
            launch(t)
            if t < n_iters:
                total = colsum[:, t].contiguous()
                reduce(total)
                colsum[:, t] = total
    elif plan.single:
        launch(0)
    else:
        launch(0)
        block = min(plan.block_k, 1024)
        _combine_lse_kernel[(B, triton.cdiv(K, block))](part, cols, bpot, K, plan.R, n_iters, BLOCK_K=block, ACC=acc_tl)
        for t in range(1, n_iters + 1):
            launch(t)
    return out, rows, cols, apot, bpot, cmax


def _sharded_plan(scores, reduce) -> _Plan:
    plan = _Plan(scores)
    if reduce is not None:
        plan.single = False  # one launch per pass, with the all-reduce between them
    return plan


def forward(scores, eps, n_iters, row_mass, col_mass, log_domain, *, shift=None, reduce=None):
    """P (same shape and dtype as scores); ``log_domain`` is accepted but never needed (see module doc).
    ``shift`` and ``reduce``: this rank's rows of a sharded call (see ``_run_forward``)."""
    plan = _sharded_plan(scores, reduce)
    out, *_ = _run_forward(plan, eps, n_iters, row_mass, col_mass, save=False, shift=shift, reduce=reduce)
    return out.view(scores.shape)


def backward(grad, scores, eps, n_iters, row_mass, col_mass, log_domain, *, shift=None, reduce=None):
    """∂loss/∂scores for ∂loss/∂P = grad: recompute the potentials, then the reverse passes.
    Sharded (``reduce``): each pass's b̄ column sums are summed over the ranks between launches."""
    plan = _sharded_plan(scores, reduce)
    _, rows, cols, apot, bpot, cmax = _run_forward(plan, eps, n_iters, row_mass, col_mass, save=True, shift=shift, reduce=reduce)
    B, N, K = plan.n_problems, plan.n_rows, plan.n_cols
    g = grad.reshape(B, N, K).contiguous()
    d = torch.empty((B, N, K), dtype=plan.acc, device=scores.device)
    ds = d if scores.dtype == plan.acc else torch.empty((B, N, K), dtype=scores.dtype, device=scores.device)
    bbar = torch.zeros((B, n_iters + 1, K) if not plan.single else (1,), dtype=plan.acc, device=scores.device)
    acc_tl = _common.tl_dtype(plan.acc)

    def launch(pass_index):
        _sinkhorn_bwd_kernel[(B, plan.R)](
            plan.s,
            cmax,
            g,
            d,
            ds,
            rows,
            cols,
            apot,
            bpot,
            bbar,
            N,
            K,
            1.0 / eps,
            n_iters,
            pass_index,
            plan.rows_per_program,
            *plan.strides(),
            SINGLE=plan.single,
            BLOCK_N=plan.block_n,
            BLOCK_K=plan.block_k,
            ACC=acc_tl,
            num_warps=plan.warps,
            maxnreg=_common.MAX_REGISTERS,
        )

    if plan.single:
        launch(n_iters)
    else:
        for t in range(n_iters, -1, -1):
            launch(t)
            if reduce is not None and t > 0:
                total = bbar[:, t].contiguous()
                reduce(total)
                bbar[:, t] = total
    return ds.view(scores.shape)
