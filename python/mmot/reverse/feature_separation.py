"""Reverse pass of ``mmot::feature_separation_loss``: the loss's gradient from the saved Gram.

With Ŝ, Ĥ the (normalised) rows, C = ŜᵀĤ (saved by the forward) and L = ‖C‖²_F / N², the
upstream scalar g gives

    ∂Ŝ = (2g/N²) Ĥ Cᵀ,    ∂Ĥ = (2g/N²) Ŝ C

then through the L2 normalisation as in :mod:`mmot.reverse.similarity`. O(N·D_s·D_h).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot.reference import compute_dtype
from mmot.reverse.similarity import unit_rows, unit_rows_backward


def backward(grad: Tensor, shared: Tensor, specific: Tensor, gram: Tensor, normalize: bool) -> list[Tensor]:
    """[∂L/∂shared, ∂L/∂specific] for ∂(output)/∂L = grad (0-dim)."""
    n = shared.shape[0]
    if shared.numel() == 0 or specific.numel() == 0:
        return [torch.zeros_like(shared), torch.zeros_like(specific)]
    dtype = compute_dtype(shared.dtype)
    x, y, c = shared.to(dtype), specific.to(dtype), gram.to(dtype)
    if normalize:
        (x, x_norm), (y, y_norm) = unit_rows(x), unit_rows(y)
    grad_x, grad_y = y @ c.T, x @ c
    if normalize:
        grad_x = unit_rows_backward(grad_x, x, x_norm)
        grad_y = unit_rows_backward(grad_y, y, y_norm)
    # 2g/N² last, as 2g·(1/N)·(1/N): only a gradient beyond the dtype overflows.
    scale = 2.0 * grad.to(dtype) / n / n
    return [(scale * grad_x).to(shared.dtype), (scale * grad_y).to(specific.dtype)]
