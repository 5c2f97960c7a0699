"""The specification of the Sinkhorn ops' options path, in readable pure torch.

Calls with ragged sizes, early stopping, an ε-schedule, a warm start or unbalanced marginals run
the ``mmot::sinkhorn_ext`` / ``mmot::multi_sinkhorn_ext`` ops; every backend computes exactly
these functions (docs/sinkhorn_options.md). They also serve as ``backend="torch"``: autograd
through them is the exact gradient of the unrolled iteration.

All tensors are padded batches: problem b is ``scores[b, :row_counts[b], :col_counts[b]]``.
Padding values never matter (they may be NaN) and padded outputs are 0. Potentials are in score
units: the plan is ``exp((scores + f_i + g_j) / eps)``. Each problem runs until its marginal
error is at most ``tol`` at the final ε (``tol < 0``: never) or until ``n_iters``; with
``iters`` given instead, problem b runs exactly ``iters[b]`` iterations (the backward's replay).
"""

from __future__ import annotations

import math

import torch

from mmot import reference


def valid_masks(shape: torch.Size, row_counts: torch.Tensor, col_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, 1) and (B, 1, K) masks of the valid rows and columns of a padded (B, N, K) batch."""
    n, k = shape[-2], shape[-1]
    rows = torch.arange(n, device=row_counts.device) < row_counts[:, None]
    cols = torch.arange(k, device=col_counts.device) < col_counts[:, None]
    return rows[:, :, None], cols[:, None, :]


def masked_lse(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """log Σ exp(x) over ``dim`` where ``mask``, keeping ``dim``; slices without a valid entry
    give a finite value (to be masked by the caller), so that no NaN reaches the gradient."""
    mask = mask.expand_as(x)
    filled = x.masked_fill(~mask, -math.inf)
    filled = torch.where(mask.any(dim, keepdim=True), filled, torch.zeros_like(filled))
    return torch.logsumexp(filled, dim, keepdim=True)


class Schedule:
    """ε_t = max(eps, e_t) with e_0 = eps_start and e_{t+1} = e_t·decay, per problem, in float64."""

    def __init__(self, eps: float, eps_start: torch.Tensor, decay: float):
        self.eps = eps
        self.decay = decay
        self.e = eps_start.to(torch.float64)

    def current(self) -> torch.Tensor:
        """This iteration's ε per problem, (B,) float64."""
        return torch.clamp(self.e, min=self.eps)

    def advance(self) -> None:
        self.e = self.e * self.decay


class _Stopper:
    """Which problems still iterate, from ``tol`` (forward) or fixed counts (replay)."""

    def __init__(self, batch: int, n_iters: int, tol: float, iters: torch.Tensor | None, device):
        self.tol = tol
        self.cap = n_iters if iters is None else int(iters.max()) if iters.numel() else 0
        self.fixed = iters
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.count = torch.zeros(batch, dtype=torch.int64, device=device)

    def running(self, t: int) -> torch.Tensor:
        if self.fixed is not None:
            self.active = t < self.fixed
        return self.active

    def finish(self, t: int, eps_t: torch.Tensor, eps: float, err: torch.Tensor) -> bool:
        """Count iteration ``t``; returns False once no problem iterates any more."""
        self.count = self.count + self.active.to(torch.int64)
        if self.fixed is None and self.tol >= 0:
            converged = (eps_t == eps) & (err <= self.tol)
            self.active = self.active & ~converged
        return bool(self.active.any())


def sinkhorn_ext(
    scores: torch.Tensor,
    row_mass: torch.Tensor,
    col_mass: torch.Tensor,
    row_counts: torch.Tensor,
    col_counts: torch.Tensor,
    init_f: torch.Tensor,
    eps_start: torch.Tensor,
    eps: float,
    decay: float,
    n_iters: int,
    tol: float,
    reach: float,
    log_domain: str = "auto",
    iters: torch.Tensor | None = None,
):
    """Sinkhorn with options on a padded (B, N, K) batch: returns (plan, f, g, iters, err).

    With e = ε_t and τ = reach/(reach + e) (1 for reach = inf), each iteration is

        g_j = e log c_j − τ e LSE_i((S_ij + f_i)/e)     (columns, valid rows i)
        f_i = e log r_i − τ e LSE_j((S_ij + g_j)/e)     (rows, valid columns j)

    (the unbalanced form with reference measure r⊗c, POT's ``sinkhorn_unbalanced``) and
    err = max_j |Σ_i P_ij − ĉ_j| / ĉ_j for the plan P = exp((S + f + g)/e), with ĉ_j the
    column sums the next column step would set (c_j when balanced). ``log_domain`` is accepted
    for the kernels' signature: this form is the log domain, which every domain equals.
    """
    dtype = scores.dtype
    rows, cols = valid_masks(scores.shape, row_counts, col_counts)
    valid = rows & cols
    s = torch.where(valid, scores, torch.zeros((), dtype=dtype, device=scores.device))
    log_r = torch.where(rows, row_mass.unsqueeze(-1), 1.0).log()
    log_c = torch.where(cols, col_mass.unsqueeze(-2), 1.0).log()
    f = torch.where(rows, init_f.to(dtype).unsqueeze(-1), 0.0)
    g = torch.zeros_like(log_c)
    err = torch.zeros(scores.shape[0], dtype=dtype, device=scores.device)
    schedule = Schedule(eps, eps_start, decay)
    stop = _Stopper(scores.shape[0], n_iters, tol, iters, scores.device)
    e_last = schedule.current()
    for t in range(stop.cap):
        active = stop.running(t)
        e64 = schedule.current()
        e = e64.to(dtype)[:, None, None]
        tau = _tau(reach, e)
        g_new = e * log_c - tau * e * masked_lse((s + f) / e, rows, -2)
        f_new = e * log_r - tau * e * masked_lse((s + g_new) / e, cols, -1)
        err_new = _marginal_error(s, f_new, g_new, log_c, e, tau, rows, cols)
        keep = active[:, None, None]
        g = torch.where(keep & cols, g_new, torch.where(cols, g, 0.0))
        f = torch.where(keep & rows, f_new, torch.where(rows, f, 0.0))
        err = torch.where(active, err_new, err)
        e_last = torch.where(active, e64, e_last)
        schedule.advance()
        if not stop.finish(t, e64, eps, err_new):
            break
    e = e_last.to(dtype)[:, None, None]
    plan = torch.where(valid, torch.exp((s + f + g) / e), 0.0)
    plan = _poison(plan, scores, valid)
    err = torch.where(torch.isnan(plan).any(-1).any(-1), math.nan, err)
    return plan, f.squeeze(-1), g.squeeze(-2), stop.count, err


def _tau(reach: float, e: torch.Tensor) -> torch.Tensor | float:
    return 1.0 if math.isinf(reach) else reach / (reach + e)


def _marginal_error(s, f, g, log_c, e, tau, rows, cols) -> torch.Tensor:
    """max_j |exp((g_j − g'_j)/e) − 1| over valid columns: the relative gap between the plan's
    column sums and the next column step's target (|colsum − c|/c when balanced)."""
    g_next = e * log_c - tau * e * masked_lse((s + f) / e, rows, -2)
    gap = torch.expm1((g - g_next) / e).abs()
    return torch.where(cols, gap, 0.0).amax((-2, -1))


def _poison(out: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """All-NaN valid block for every problem with a non-finite valid score (reference.poison_non_finite's rule)."""
    bad = (valid & ~torch.isfinite(scores.detach())).any(-1, keepdim=True).any(-2, keepdim=True)
    return torch.where(bad & valid, math.nan, out)


def multi_sinkhorn_ext(
    scores: torch.Tensor,
    row_counts: torch.Tensor,
    col_counts: torch.Tensor,
    weights: list[float],
    counts: torch.Tensor,
    tops: torch.Tensor,
    eps_start: torch.Tensor,
    eps: float,
    decay: float,
    n_iters: int,
    tol: float,
    normalize: str,
    log_domain: str = "auto",
    iters: torch.Tensor | None = None,
):
    """Multi-SK with options on a padded (B, N, K) batch: returns (T, F, Gam, H, iters, err).

    Slot group G (weight w_G, cnt[b, G] slots, top[b, G] of them among the last k) has the plan
    P_G = exp((w_G S + F_G[a] + Gam[n, a] + H_G[n]) / e). With r_a = n_b / k_b, each iteration is

        F_G[a]   = e log r_a − e LSE_n((w_G S + Gam + H_G)/e)
        Gam[n,a] = −e LSE_G(log cnt_G + (w_G S + F_G + H_G)/e)
        H_G[n]   = −e LSE_a((w_G S + Gam + F_G)/e)

    and err = max_{G,a} |Σ_n P_G[n,a] − r_a| / r_a. The output is T = Σ_G top_G P_G, min-max
    rescaled over each row's valid columns when ``normalize="minmax"``.
    """
    dtype = scores.dtype
    batch = scores.shape[0]
    rows, cols = valid_masks(scores.shape, row_counts, col_counts)
    valid = rows & cols
    s = torch.where(valid, scores, torch.zeros((), dtype=dtype, device=scores.device))
    present = (counts > 0)[:, :, None, None]  # (B, G, 1, 1)
    log_cnt = torch.where(present, counts.to(dtype)[:, :, None, None], 1.0).log()
    log_cnt = log_cnt.masked_fill(~present, -math.inf)
    w = torch.tensor(weights, dtype=dtype, device=scores.device)[None, :, None, None]
    ws = w * s.unsqueeze(1)  # (B, G, N, K)
    log_r = (row_counts.to(dtype) / col_counts.to(dtype)).log()[:, None, None, None]
    rows4, cols4 = rows.unsqueeze(1), cols.unsqueeze(1)
    groups = present.expand(-1, -1, 1, scores.shape[-1])  # (B, G, 1, K)
    big_f = torch.zeros(batch, len(weights), 1, scores.shape[-1], dtype=dtype, device=scores.device)
    gam = torch.zeros_like(s).unsqueeze(1)
    big_h = torch.zeros(batch, len(weights), scores.shape[-2], 1, dtype=dtype, device=scores.device)
    err = torch.zeros(batch, dtype=dtype, device=scores.device)
    schedule = Schedule(eps, eps_start, decay)
    stop = _Stopper(batch, n_iters, tol, iters, scores.device)
    e_last = schedule.current()
    for t in range(stop.cap):
        active = stop.running(t)
        e64 = schedule.current()
        e = e64.to(dtype)[:, None, None, None]
        f_new = e * log_r - e * masked_lse((ws + gam + big_h) / e, rows4, -2)
        f_new = torch.where(present & cols4, f_new, 0.0)
        logits = log_cnt + (ws + f_new + big_h) / e
        gam_new = -e * masked_lse(logits.masked_fill(~present, -math.inf), present.expand_as(logits), 1)
        gam_new = torch.where(valid.unsqueeze(1), gam_new, 0.0)
        h_new = -e * masked_lse((ws + gam_new + f_new) / e, cols4, -1)
        h_new = torch.where(present & rows4, h_new, 0.0)
        plans = torch.where(present & valid.unsqueeze(1), torch.exp((ws + f_new + gam_new + h_new) / e), 0.0)
        gap = (plans.sum(-2, keepdim=True) - log_r.exp()).abs() / log_r.exp()
        err_new = torch.where(groups & cols4, gap, 0.0).amax((1, 2, 3))
        keep = active[:, None, None, None]
        big_f = torch.where(keep, f_new, big_f)
        gam = torch.where(keep, gam_new, gam)
        big_h = torch.where(keep, h_new, big_h)
        err = torch.where(active, err_new, err)
        e_last = torch.where(active, e64, e_last)
        schedule.advance()
        if not stop.finish(t, e64, eps, err_new):
            break
    e = e_last.to(dtype)[:, None, None, None]
    plans = torch.where(present & valid.unsqueeze(1), torch.exp((ws + big_f + gam + big_h) / e), 0.0)
    target = (tops.to(dtype)[:, :, None, None] * plans).sum(1)
    if normalize == "minmax":
        target = masked_minmax_rows(target, cols)
    target = torch.where(valid, target, 0.0)
    target = _poison(target, scores, valid)
    err = torch.where(torch.isnan(target).any(-1).any(-1), math.nan, err)
    return target, big_f.squeeze(-2), gam.squeeze(1), big_h.squeeze(-1), stop.count, err


def masked_minmax_rows(target: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """:func:`mmot.reference.minmax_rows` over each row's valid columns only."""
    low = target.masked_fill(~cols, math.inf).amin(-1, keepdim=True)
    high = target.masked_fill(~cols, -math.inf).amax(-1, keepdim=True)
    constant = reference.constant_rows(low, high)
    spread = torch.where(constant, torch.ones_like(high), high - low)
    return torch.where(constant, 0.0, (target - low) / spread)
