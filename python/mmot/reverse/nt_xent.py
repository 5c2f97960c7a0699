"""Reverse pass of ``mmot::nt_xent``: the per-row losses' gradient from the saved log-sum-exps.

With ẑ the (normalised) rows of z = [x; y] (2N rows), s = ẑẑᵀ/τ, ḡ the cotangent of the per-row
losses and lse[r] = log Σ_{c≠r} e^{s[r,c]}:

    G[r,c] = ḡ_r e^{s[r,c] − lse[r]}  (c ≠ r),   G[r, r ± N] −= ḡ_r,   ẑ̄ = (G + Gᵀ) ẑ / τ

and through the L2 normalisation. This materialises the 2N×2N logits, as the reference does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot.reference import compute_dtype
from mmot.reverse.similarity import unit_rows, unit_rows_backward


def backward(grad: Tensor, z: Tensor, lse: Tensor, temperature: float, normalize: bool) -> Tensor:
    """∂loss/∂z for ∂loss/∂(per-row losses) = grad (2N,)."""
    if z.numel() == 0:
        return torch.zeros_like(z)
    dtype = compute_dtype(z.dtype)
    x = z.to(dtype)
    if normalize:
        x, norm = unit_rows(x)
    n = x.shape[0]
    rows = torch.arange(n, device=z.device)
    logits = (x @ x.T) / temperature
    g = grad.to(dtype)
    coef = g[:, None] * torch.exp((logits - lse.to(dtype)[:, None]).clamp(max=0.0))
    coef[rows, rows] = 0.0
    coef[rows, (rows + n // 2) % n] -= g
    grad_x = (coef + coef.T) @ x
    if normalize:
        grad_x = unit_rows_backward(grad_x, x, norm)
    return (grad_x / temperature).to(z.dtype)
