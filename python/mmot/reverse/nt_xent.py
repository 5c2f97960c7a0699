"""Block primitives of ``mmot::nt_xent`` and ``mmot::comm_loss`` for the torch backend, forward and reverse.

Every logit of NT-Xent lies in a self block S = ẑẑᵀ/τ (diagonal excluded) or a cross block
C = x̂ŷᵀ/τ. The forward needs each block's row log-sum-exps (and a cross block's column ones);
the reverse, given row LSEs L (the rows' full log-sum-exps from the forward) and coefficients,
needs

    self:   ∂ẑ_i = (1/τ) Σ_{j≠i} (c_i e^{S_ij − l_i} + c_j e^{S_ij − l_j}) ẑ_j
    cross:  ∂x̂_i = (1/τ) Σ_j G_ij ŷ_j,  ∂ŷ_j = (1/τ) Σ_i G_ij x̂_i,
            G_ij = p_i e^{C_ij − lp_i} + q_j e^{C_ij − lq_j}

(``docs/comm_loss.md``). Each exponent is at most 0 because every shift is at least the
log-sum-exp of the block it is applied to; they are capped at 0 against rounding. The rows are
walked in chunks of ``CHUNK`` so that no N×N tensor is formed (O(CHUNK·N) memory).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CHUNK = 1024


def _chunks(n: int):
    for i0 in range(0, n, CHUNK):
        yield i0, min(n, i0 + CHUNK)


def _off_diagonal(s: Tensor, i0: int, fill: float) -> Tensor:
    """s (rows i0.., all columns) with its entries (i, i) set to ``fill``."""
    rows = torch.arange(s.shape[0], device=s.device)
    s[rows, rows + i0] = fill
    return s


def self_lse(z: Tensor, temperature: float) -> Tensor:
    """Row log-sum-exps of ẑẑᵀ/τ without the diagonal (−inf for N = 1)."""
    out = z.new_empty(z.shape[0])
    for i0, i1 in _chunks(z.shape[0]):
        s = _off_diagonal((z[i0:i1] @ z.T) / temperature, i0, -math.inf)
        out[i0:i1] = torch.logsumexp(s, 1)
    return out


def cross_lse(x: Tensor, y: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(row, column) log-sum-exps of x̂ŷᵀ/τ."""
    rows = x.new_empty(x.shape[0])
    cols = x.new_full((y.shape[0],), -math.inf)
    for i0, i1 in _chunks(x.shape[0]):
        s = (x[i0:i1] @ y.T) / temperature
        rows[i0:i1] = torch.logsumexp(s, 1)
        cols = torch.logaddexp(cols, torch.logsumexp(s, 0))
    return rows, cols


def self_grad(z: Tensor, c: Tensor, shift: Tensor, temperature: float) -> Tensor:
    """(1/τ) Σ_{j≠i} (c_i e^{S_ij − l_i} + c_j e^{S_ij − l_j}) ẑ_j for every i."""
    out = torch.empty_like(z)
    for i0, i1 in _chunks(z.shape[0]):
        s = (z[i0:i1] @ z.T) / temperature
        g = c[i0:i1, None] * torch.exp((s - shift[i0:i1, None]).clamp(max=0.0)) + c[None, :] * torch.exp(
            (s - shift[None, :]).clamp(max=0.0)
        )
        out[i0:i1] = _off_diagonal(g, i0, 0.0) @ z
    return out / temperature


def cross_grad(x: Tensor, y: Tensor, p: Tensor, lp: Tensor, q: Tensor, lq: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(∂x̂, ∂ŷ) of a cross block with G_ij = p_i e^{C_ij − lp_i} + q_j e^{C_ij − lq_j}."""
    dx, dy = torch.empty_like(x), torch.zeros_like(y)
    for i0, i1 in _chunks(x.shape[0]):
        s = (x[i0:i1] @ y.T) / temperature
        g = p[i0:i1, None] * torch.exp((s - lp[i0:i1, None]).clamp(max=0.0)) + q[None, :] * torch.exp((s - lq[None, :]).clamp(max=0.0))
        dx[i0:i1] = g @ y
        dy += g.T @ x[i0:i1]
    return dx / temperature, dy / temperature
