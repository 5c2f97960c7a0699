"""Reverse pass of ``mmot::anchor_consistency_loss``: mean BCE-with-logits of z = exp(sim/τ).

With t the detached target, ḡ the (0-dim) cotangent of the loss and count the number of
entries, d/dz BCE(z, t) = σ(z) − t and dz/dsim = z/τ, so

    ∂sim = ḡ / count · (σ(z) − t) · z / τ,        σ(z) = 1 / (1 + e^{−z}),

which equals autograd through the reference wherever that is finite. See
``docs/gradients.md``. It is evaluated as ḡ/(count·τ)·((1 − t)·z − z·σ(−z)); where that
overflows (z = e^x beyond the dtype) the second part is 0 and the first is recomputed as
±e^{x + log|1 − t| + log|ḡ/(count·τ)|}, so the gradient is finite wherever the exact one is.
NaN or ±inf in ``sim`` or ``target`` gives NaN at those entries.
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
    s, t = sim.to(dtype), target.to(dtype)
    x = s / temperature
    c = grad.to(dtype) / sim.numel() / temperature
    one_minus = 1.0 - t
    z = torch.exp(x)
    direct = c * (one_minus * z - z * torch.sigmoid(-z))
    far = torch.sign(c) * torch.sign(one_minus) * torch.exp(x + torch.log(one_minus.abs()) + torch.log(c.abs()))
    out = torch.where(torch.isfinite(direct), direct, torch.where(c == 0, 0.0, far))
    # NaN where an input is not finite (e^{−inf} alone would give 0).
    return (out + (s - s) + (t - t)).to(sim.dtype)
