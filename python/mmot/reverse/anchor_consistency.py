"""Reverse pass of ``mmot::anchor_consistency_loss``: mean BCE-with-logits of z = exp(sim/τ).

With t the detached target, ḡ the (0-dim) cotangent of the loss and count the number of
entries, d/dz BCE(z, t) = σ(z) − t and dz/dsim = z/τ, so

    ∂sim = ḡ / count · (σ(z) − t) · z / τ,        σ(z) = 1 / (1 + e^{−z}),

which equals autograd through the reference wherever that is finite. See
``docs/gradients.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot.reference import compute_dtype


def backward(grad: Tensor, sim: Tensor, target: Tensor, temperature: float) -> Tensor:
    """∂loss/∂sim for ∂loss/∂(the 0-dim loss) = grad; ``target`` gets no gradient."""
    if sim.numel() == 0:
        return torch.zeros_like(sim)
    dtype = compute_dtype(sim.dtype)
    z = torch.exp(sim.to(dtype) / temperature)
    per_entry = grad.to(dtype) / sim.numel()
    return ((torch.sigmoid(z) - target.to(dtype)) * per_entry * z / temperature).to(sim.dtype)
