"""Reverse pass of ``mmot::similarity``: out = scale · x̂ ŷᵀ with broadcast batch dims.

With m_x = max(‖x‖₂, 1e-12) row-wise, x̂ = x / m_x (x itself when not normalising) and Ḡ the
cotangent of out (per output batch b):

    x̂̄ = scale · Σ_{b using this x} Ḡ_b ŷ_b,      ŷ̄ = scale · Σ_{b using this y} Ḡ_bᵀ x̂_b
    x̄ = (x̂̄ − x̂ (x̂ · x̂̄)) / m_x                   (row-wise; x̄ = x̂̄ / m_x where ‖x‖ ≤ 1e-12)

and the same for y: the sums run over the batch dims that broadcast onto x (or y), and the
projection is the VJP of the L2 normalisation, which :mod:`mmot.reverse.info_nce` shares. See
``docs/gradients.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot.reference import compute_dtype, normal_exponents

NORM_FLOOR = 1e-12  # F.normalize's eps in the reference


def unit_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(x̂, ‖x‖) row-wise, x̂ = x / max(‖x‖, 1e-12) as the reference's unit_rows: scale-safe, each
    row divided by the power of two at its largest magnitude before the sum of squares. ‖x‖ is
    inf only past the dtype's range, where the gradient (below 1/max) rounds to 0."""
    if x.shape[-1] == 0:
        return x, x.new_zeros(x.shape[:-1] + (1,))
    _, exponent = torch.frexp(x.abs().amax(-1, keepdim=True))
    step = torch.ldexp(torch.ones_like(x[..., :1]), exponent.clamp(*normal_exponents(x.dtype)))
    scaled = x / step
    norm = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True)
    return scaled / torch.maximum(norm, NORM_FLOOR / step), norm * step


def unit_rows_backward(grad_unit: Tensor, unit: Tensor, norm: Tensor) -> Tensor:
    """VJP of x ↦ x / max(‖x‖, 1e-12) given x̂ and ‖x‖: no projection where the floor applies."""
    radial = torch.where(norm > NORM_FLOOR, (unit * grad_unit).sum(-1, keepdim=True), torch.zeros_like(norm))
    return (grad_unit - unit * radial) / norm.clamp_min(NORM_FLOOR)


def backward(grad: Tensor, x: Tensor, y: Tensor, normalize: bool, scale: float) -> list[Tensor]:
    """[∂loss/∂x, ∂loss/∂y] for ∂loss/∂out = grad, each summed over its broadcast batch dims."""
    if grad.numel() == 0 or x.numel() == 0 or y.numel() == 0:
        return [torch.zeros_like(x), torch.zeros_like(y)]
    dtype = compute_dtype(x.dtype)
    xs, ys, g = x.to(dtype), y.to(dtype), grad.to(dtype)
    if normalize:
        (xs, x_norm), (ys, y_norm) = unit_rows(xs), unit_rows(ys)
    grad_x = (g @ ys).sum_to_size(x.shape)
    grad_y = (g.transpose(-1, -2) @ xs).sum_to_size(y.shape)
    if normalize:
        # The normalisation is row-wise per x (not per output batch), so it follows the sum.
        grad_x = unit_rows_backward(grad_x, xs, x_norm)
        grad_y = unit_rows_backward(grad_y, ys, y_norm)
    # scale last: a scale near the dtype's largest value overflows only a gradient beyond it.
    return [(scale * grad_x).to(x.dtype), (scale * grad_y).to(y.dtype)]
