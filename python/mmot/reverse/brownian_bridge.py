"""Reverse pass of ``mmot::brownian_bridge_loss``: the per-row losses' gradient from the saved log-sum-exps.

With x̂, ŷ, m̂ the (normalised) rows of a, b and mid, u = 1 − t, c = 1/(2σ²·t·u) per row and the
logits of the forward (the row constant c_i‖m̂_i‖² left out: it cancels)

    s[i,j] = c_i (2u_i m̂_i·x̂_j + 2t_i m̂_i·ŷ_j − u_i²‖x̂_j‖² − t_i²‖ŷ_j‖² − 2u_i t_i x̂_j·ŷ_j),

ḡ the cotangent of the per-row losses and lse[i] = log Σ_j e^{s[i,j]}, the adjoint of the logits
times c is G[i,j] = c_i ḡ_i (e^{s[i,j] − lse[i]} − δ_ij), and

    m̂̄_i = 2u_i (G x̂)_i + 2t_i (G ŷ)_i
    x̂̄_j = 2 Σ_i G[i,j] u_i m̂_i − 2x̂_j Σ_i G[i,j] u_i² − 2ŷ_j Σ_i G[i,j] u_i t_i
    ŷ̄_j = 2 Σ_i G[i,j] t_i m̂_i − 2ŷ_j Σ_i G[i,j] t_i² − 2x̂_j Σ_i G[i,j] u_i t_i

then through the L2 normalisation as in :mod:`mmot.reverse.similarity`. This materialises the
N×N logits, as the reference's forward does. See ``docs/structure_losses.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot.reference import compute_dtype
from mmot.reverse.similarity import unit_rows, unit_rows_backward


def logits(x: Tensor, y: Tensor, m: Tensor, t: Tensor, scale: Tensor) -> Tensor:
    """The N×N logits s above from the (normalised) rows, in their dtype."""
    u = 1.0 - t
    cross = 2.0 * (u[:, None] * (m @ x.T) + t[:, None] * (m @ y.T))
    bridge_sq = (u * u)[:, None] * (x * x).sum(-1) + (t * t)[:, None] * (y * y).sum(-1) + (2.0 * u * t)[:, None] * (x * y).sum(-1)
    return scale[:, None] * (cross - bridge_sq)


def backward(grad: Tensor, a: Tensor, b: Tensor, mid: Tensor, t: Tensor, scale: Tensor, lse: Tensor, normalize: bool) -> list[Tensor]:
    """[∂loss/∂a, ∂loss/∂b, ∂loss/∂mid] for ∂loss/∂(per-row losses) = grad (N,)."""
    if a.numel() == 0:
        return [torch.zeros_like(a), torch.zeros_like(b), torch.zeros_like(mid)]
    dtype = compute_dtype(a.dtype)
    x, y, m = a.to(dtype), b.to(dtype), mid.to(dtype)
    if normalize:
        (x, x_norm), (y, y_norm), (m, m_norm) = unit_rows(x), unit_rows(y), unit_rows(m)
    t, scale = t.to(dtype), scale.to(dtype)
    u = 1.0 - t
    s = logits(x, y, m, t, scale)
    # Exponents capped at 0 (s ≤ lse up to the rounding of lse itself).
    coef = torch.exp((s - lse.to(dtype)[:, None]).clamp(max=0.0))
    coef.diagonal().sub_(1.0)
    coef = (scale * grad.to(dtype))[:, None] * coef
    coef_u, coef_t = coef * u[:, None], coef * t[:, None]
    grad_m = 2.0 * (u[:, None] * (coef @ x) + t[:, None] * (coef @ y))
    cross = (coef_u * t[:, None]).sum(0)[:, None]
    grad_x = 2.0 * (coef_u.T @ m - x * (coef_u * u[:, None]).sum(0)[:, None] - y * cross)
    grad_y = 2.0 * (coef_t.T @ m - y * (coef_t * t[:, None]).sum(0)[:, None] - x * cross)
    if normalize:
        grad_x = unit_rows_backward(grad_x, x, x_norm)
        grad_y = unit_rows_backward(grad_y, y, y_norm)
        grad_m = unit_rows_backward(grad_m, m, m_norm)
    return [grad_x.to(a.dtype), grad_y.to(b.dtype), grad_m.to(mid.dtype)]
