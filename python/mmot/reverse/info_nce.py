"""Reverse pass of ``mmot::info_nce``: the per-pair losses' gradient from the saved log-sum-exps.

With x̂, ŷ the (normalised) rows of a and b, s = x̂ ŷᵀ / τ, w the 0/1 pair weights, ḡ the
cotangent of the per-pair losses and lse_a[i] = log Σ_j w_j e^{s[i,j]},
lse_b[j] = log Σ_i w_i e^{s[i,j]} the forward's log-sum-exps, the gradient of the losses with
respect to the logits is

    G[i,j] = w_i w_j (ḡ_i e^{s[i,j] − lse_a[i]} + [symmetric] ḡ_j e^{s[i,j] − lse_b[j]})
             − δ_ij w_i ḡ_i (1 + [symmetric])

(the row and column softmaxes minus the diagonal, over valid pairs only), then

    x̂̄ = G ŷ / τ,    ŷ̄ = Gᵀ x̂ / τ,

and through the L2 normalisation as in :mod:`mmot.reverse.similarity`. This materialises the
N×N logits, as the reference's forward does. See ``docs/gradients.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot.reference import compute_dtype
from mmot.reverse.similarity import unit_rows, unit_rows_backward


def backward(
    grad: Tensor,
    a: Tensor,
    b: Tensor,
    weights: Tensor,
    lse_a: Tensor,
    lse_b: Tensor,
    temperature: float,
    symmetric: bool,
    normalize: bool,
) -> list[Tensor]:
    """[∂loss/∂a, ∂loss/∂b] for ∂loss/∂(per-pair losses) = grad (N,)."""
    if a.numel() == 0:
        return [torch.zeros_like(a), torch.zeros_like(b)]
    dtype = compute_dtype(a.dtype)
    x, y = a.to(dtype), b.to(dtype)
    if normalize:
        (x, x_norm), (y, y_norm) = unit_rows(x), unit_rows(y)
    logits = (x @ y.T) / temperature
    keep = weights != 0
    pair = keep[:, None] & keep[None, :]
    g = torch.where(keep, grad.to(dtype), 0.0)
    # torch.where, not a product: a row without valid columns has lse = −inf. The exponents are
    # at most 0 (s ≤ lse); capped there, since at logits near finfo.max a rounding of the
    # log-sum-exp's own logits (a transposed product for lse_b) would be e^{1e31} = inf.
    coef = torch.where(pair, g[:, None] * torch.exp((logits - lse_a.to(dtype)[:, None]).clamp(max=0.0)), 0.0)
    if symmetric:
        coef = coef + torch.where(pair, g[None, :] * torch.exp((logits - lse_b.to(dtype)[None, :]).clamp(max=0.0)), 0.0)
    coef.diagonal().sub_(g * (2.0 if symmetric else 1.0))
    grad_x, grad_y = coef @ y, coef.T @ x
    if normalize:
        grad_x, grad_y = unit_rows_backward(grad_x, x, x_norm), unit_rows_backward(grad_y, y, y_norm)
    # 1/τ last: it may be near the dtype's largest value, and only a gradient beyond it overflows.
    return [(grad_x / temperature).to(a.dtype), (grad_y / temperature).to(b.dtype)]
