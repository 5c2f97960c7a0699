"""Implicit reverse pass of the Sinkhorn ops: the adjoint of the converged fixed point.

The unrolled reverse pass replays every forward iteration; this one differentiates the fixed
point itself, so its memory is O(N·K) and its time depends only on how fast a linear system
converges, not on the forward's ``n_iters`` (issue 20, spec section 3).

**sinkhorn.** At the fixed point P = exp((S + f + g)/eps) with row sums R and column sums C,
tau = rho/(rho + eps) (1 balanced), the adjoint of an upstream G = ∂L/∂P is

    ∂L/∂S = P ⊙ (G − α 1ᵀ − 1 βᵀ) / eps,    (R/tau) α + P β = (P⊙G) 1,    Pᵀα + (C/tau) β = (P⊙G)ᵀ 1.

These are the normal equations of the weighted least squares
min Σ P (G − α_i − β_j)² + (1/tau − 1)(Σ R α² + Σ C β²), so the system is symmetric positive
(semi)definite. α is eliminated exactly (its block is diagonal): α = tau (a − Pβ)/R, and the
Schur complement in β,

    M β = (C/tau) β − Pᵀ (tau/R ⊙ P β) = (P⊙G)ᵀ1 − Pᵀ (tau/R ⊙ (P⊙G)1),

is solved by conjugate gradients preconditioned by diag(C/tau), warm-started at 0. One CG
iteration is one streaming pass over P (a row dot, then the row's share of Pᵀ). Preconditioned,
M's spectrum is 1/tau − tau σ_i², σ_i the singular values of R^{-½} P C^{-½} (σ_1 = 1): CG needs
O(sqrt(κ) log(1/tol)) passes where alternating Gauss-Seidel (Sinkhorn's own adjoint) needs
O(κ log(1/tol)), κ = 1/(1 − σ_2²) when balanced. Balanced, M has the null vector 1 (β + t,
α − t leave the gradient unchanged); the right-hand side is projected off it, and CG from 0
then stays in M's range.

**multi_sinkhorn.** With W_G = P_G / c_G (c_G the group's slot count), the adjoint system of the
spec is the normal equations of min Σ_G Σ W_G (Ĝ_G − α_G[a] − c_G β[n,a] − γ_G[n])². β's block
is diagonal: β = Σ_G P_G (Ĝ_G − α_G − γ_G) / D, D = Σ_G c_G P_G. Eliminating it leaves, for
x = (α, γ) and v_G = α_G[a] + γ_G[n], e_G(v) = v_G − c_G Σ_G' P_G' v_G' / D:

    M x = (Σ_n W_G e_G(v), Σ_a W_G e_G(v)) = (Σ_n W_G ê_G, Σ_a W_G ê_G),  ê_G = e_G(Ĝ),

symmetric positive semidefinite (its null space changes no residual), solved by CG with the
diagonal preconditioner (Σ_n W_G, Σ_a W_G). The residual A_G = ê_G − e_G(v) gives
∂L/∂S = Σ_G w_G P_G A_G / eps. A problem with fewer than two present groups has T independent
of the scores, and its gradient is 0.

Convergence: ‖r‖₂ ≤ tol ‖r₀‖₂ per problem (tol 1e-7 in float64, 1e-5 otherwise; at most 1000
iterations); a converged problem stops changing while the others go on, so each problem's
result equals its own call. Ragged batches: entries outside problem b's block are padding,
never read into a result (they may be NaN), and get 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MAX_ITERS = 1000


def tolerance(dtype: torch.dtype) -> float:
    """Relative residual at which the solvers stop."""
    return 1e-7 if dtype == torch.float64 else 1e-5


def _valid(counts: Tensor, size: int, device: torch.device) -> Tensor:
    return torch.arange(size, device=device)[None, :] < counts.to(device)[:, None]


def _pcg(apply, rhs: list[Tensor], precond: list[Tensor], dtype: torch.dtype, iters_out: Tensor | None) -> list[Tensor]:
    """Batched preconditioned CG on a list of (B, ...) blocks; each problem stops on its own."""
    batch = rhs[0].shape[0]

    def dot(x: list[Tensor], y: list[Tensor]) -> Tensor:
        return sum((a * b).flatten(1).sum(1) for a, b in zip(x, y))

    x = [torch.zeros_like(r) for r in rhs]
    r = [t.clone() for t in rhs]
    z = [m * t for m, t in zip(precond, r)]
    p = [t.clone() for t in z]
    rz = dot(r, z)
    stop = tolerance(dtype) ** 2 * dot(r, r)
    active = (dot(r, r) > stop) & (rz > 0)
    count = torch.zeros(batch, dtype=torch.int64, device=rhs[0].device)

    def bcast(v: Tensor, like: Tensor) -> Tensor:
        return v.view((-1,) + (1,) * (like.dim() - 1))

    for _ in range(MAX_ITERS):
        if not bool(active.any()):
            break
        q = apply(p)
        pq = dot(p, q)
        ok = active & (pq > 0)
        step = torch.where(ok, rz / torch.where(ok, pq, 1.0), 0.0)  # 0 freezes a stopped problem
        x = [a + bcast(step, a) * b for a, b in zip(x, p)]
        r = [a - bcast(step, a) * b for a, b in zip(r, q)]
        count += ok.to(torch.int64)
        z = [m * t for m, t in zip(precond, r)]
        rz_new = dot(r, z)
        rr = dot(r, r)
        beta = torch.where(ok, rz_new / torch.where(ok, rz, 1.0), 0.0)
        p = [a + bcast(beta, a) * b for a, b in zip(z, p)]
        rz = torch.where(ok, rz_new, rz)
        active = ok & (rr > stop) & (rz_new > 0)
    if iters_out is not None:
        iters_out.copy_(count)
    return x


def sinkhorn_implicit_backward(
    grad: Tensor, plan: Tensor, row_counts: Tensor, col_counts: Tensor, eps: float, reach: float, *, iters: Tensor | None = None
) -> Tensor:
    """∂L/∂scores (B, N, K) of the converged Sinkhorn plan for ∂L/∂plan = ``grad``.

    ``reach`` is rho (``math.inf``: balanced). ``iters``, if given, a (B,) int64 tensor, receives
    each problem's CG iteration count.
    """
    dtype = plan.dtype
    batch, n, k = plan.shape
    if plan.numel() == 0:
        if iters is not None:
            iters.zero_()
        return torch.zeros_like(plan)
    rows = _valid(row_counts, n, plan.device)
    cols = _valid(col_counts, k, plan.device)
    mask = rows[:, :, None] & cols[:, None, :]
    p = torch.where(mask, plan, 0.0)
    g = torch.where(mask, grad.to(dtype), 0.0)
    tau = 1.0 if math.isinf(reach) else reach / (reach + eps)
    row_sum = p.sum(-1)
    col_sum = p.sum(-2)
    inv_row = torch.where(row_sum > 0, 1.0 / torch.where(row_sum > 0, row_sum, 1.0), 0.0)
    pg = p * g
    a = pg.sum(-1)
    rhs = pg.sum(-2) - ((tau * inv_row * a)[:, :, None] * p).sum(-2)
    if tau == 1.0:  # balanced: project off M's null vector 1
        mean = rhs.sum(-1, keepdim=True) / col_counts.to(device=plan.device, dtype=dtype)[:, None]
        rhs = torch.where(cols, rhs - mean, 0.0)
    precond = torch.where(col_sum > 0, tau / torch.where(col_sum > 0, col_sum, 1.0), 0.0)

    def apply(vs: list[Tensor]) -> list[Tensor]:
        (v,) = vs
        w = tau * inv_row * (p @ v[:, :, None])[:, :, 0]
        return [col_sum / tau * v - (w[:, :, None] * p).sum(-2)]

    (beta,) = _pcg(apply, [rhs], [precond], dtype, iters)
    alpha = tau * inv_row * (a - (p @ beta[:, :, None])[:, :, 0])
    out = p * (g - alpha[:, :, None] - beta[:, None, :]) / eps
    return torch.where(mask, out, 0.0)


def multi_sinkhorn_implicit_backward(
    grad_raw: Tensor,
    scores: Tensor,
    F: Tensor,
    Gam: Tensor,
    H: Tensor,
    row_counts: Tensor,
    col_counts: Tensor,
    weights: list[float],
    counts: Tensor,
    tops: Tensor,
    eps: float,
    *,
    iters: Tensor | None = None,
) -> Tensor:
    """∂L/∂scores (B, N, K) of converged grouped Multi-SK for ∂L/∂T_raw = ``grad_raw``.

    ``F`` (B, G, K), ``Gam`` (B, N, K), ``H`` (B, G, N) are the forward's score-unit potentials,
    ``counts``/``tops`` (B, G) the groups' slot counts and top-k counts. ``iters``: as in
    :func:`sinkhorn_implicit_backward`.
    """
    dtype = scores.dtype
    batch, n, k = scores.shape
    n_groups = len(weights)
    if scores.numel() == 0 or n_groups == 0:
        if iters is not None:
            iters.zero_()
        return torch.zeros_like(scores)
    dev = scores.device
    rows = _valid(row_counts, n, dev)
    cols = _valid(col_counts, k, dev)
    mask = (rows[:, :, None] & cols[:, None, :])[:, None]  # (B, 1, N, K)
    cnt = counts.to(device=dev, dtype=dtype)
    present = cnt > 0  # (B, G)
    gmask = mask & present[:, :, None, None]  # (B, G, N, K)
    w = torch.tensor(weights, dtype=dtype, device=dev).view(1, -1, 1, 1)
    s = torch.where(mask, scores[:, None], 0.0)
    logits = (w * s + F[:, :, None, :].to(dtype) + Gam[:, None].to(dtype) + H[:, :, :, None].to(dtype)) / eps
    p = torch.where(gmask, torch.exp(torch.where(gmask, logits, 0.0)), 0.0)
    cnt4 = torch.where(present, cnt, 1.0)[:, :, None, None]
    wt = p / cnt4  # W_G
    den = (cnt4 * p).sum(1, keepdim=True)  # D
    inv_den = torch.where(den > 0, 1.0 / torch.where(den > 0, den, 1.0), 0.0)
    ghat = torch.where(gmask, tops.to(device=dev, dtype=dtype)[:, :, None, None] * grad_raw.to(dtype)[:, None], 0.0)

    def fitted(v: Tensor) -> Tensor:  # e_G(v)
        return torch.where(gmask, v - cnt4 * (p * v).sum(1, keepdim=True) * inv_den, 0.0)

    def normal(e: Tensor) -> list[Tensor]:
        we = wt * e
        return [we.sum(2), we.sum(3)]

    e_hat = fitted(ghat)
    rhs = normal(e_hat)
    diag = normal(torch.ones_like(wt))
    precond = [torch.where(d > 0, 1.0 / torch.where(d > 0, d, 1.0), 0.0) for d in diag]
    several = present.sum(1) >= 2  # (B,)
    rhs = [torch.where(several.view(-1, 1, 1), r, 0.0) for r in rhs]

    def apply(xs: list[Tensor]) -> list[Tensor]:
        alpha, gamma = xs
        return normal(fitted(alpha[:, :, None, :] + gamma[:, :, :, None]))

    alpha, gamma = _pcg(apply, rhs, precond, dtype, iters)
    resid = e_hat - fitted(alpha[:, :, None, :] + gamma[:, :, :, None])
    out = (w * p * resid).sum(1) / eps
    return torch.where(mask[:, 0] & several.view(-1, 1, 1), out, 0.0)
