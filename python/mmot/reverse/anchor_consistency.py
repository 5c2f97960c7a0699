"""Reverse pass of ``mmot::anchor_consistency_loss``: mean BCE-with-logits of z = exp(sim/τ).

With t the detached target, ḡ the (0-dim) cotangent of the loss and count the number of
entries, d/dz BCE(z, t) = σ(z) − t and dz/dsim = z/τ, so

    ∂sim = ḡ / count · (σ(z) − t) · z / τ,        σ(z) = 1 / (1 + e^{−z}),

which equals autograd through the reference wherever that is finite. See
``docs/gradients.md``. With c = ḡ/(count·τ) and b = (1 − t) − σ(−z) it is c·z·b, formed as that
product where the product, z and (for t = 1) e^{−z} are normal numbers, and otherwise as
±e^{x + log|c| + log|b|} with log|b| = −softplus(z) for t = 1: so the gradient is neither lost
where e^x underflows (x = −120 in float32 with a tiny τ still gives a normal gradient) nor NaN
where x = sim/τ overflows (0 for t = 1, ±inf otherwise, as exactly). NaN or ±inf in ``sim`` or
``target`` gives NaN at those entries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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
    tiny = torch.finfo(dtype).tiny
    ones = t == 1
    z = torch.exp(x)
    e = torch.exp(-z)
    b = (1.0 - t) - torch.sigmoid(-z)
    direct = c * (z * b)
    normal = (direct.abs() >= tiny) & torch.isfinite(direct) & (z >= tiny) & ~(ones & (e < tiny))
    # log|b| without underflow: for t = 1, b = −σ(−z) and log σ(−z) = −softplus(z).
    log_b = torch.where(ones, -F.softplus(z), torch.log(b.abs()))
    sign_b = torch.where(ones, -1.0, torch.sign(b))  # b itself may have underflowed to 0 there
    # log|c| from its parts: c itself may over- or underflow where the gradient does not.
    g = grad.to(dtype)
    log_c = torch.log(g.abs()) - (math.log(sim.numel()) + math.log(temperature))
    far = torch.sign(g) * sign_b * torch.exp(x + log_c + log_b)
    # No gradient where ḡ = 0 or b = 0 (log_b = −inf; x = +inf would make e^{inf − inf} NaN).
    far = torch.where((g == 0) | (log_b == float("-inf")), 0.0, far)
    out = torch.where(normal, direct, far)
    # NaN where an input is not finite (e^{−inf} alone would give 0).
    return (out + (s - s) + (t - t)).to(sim.dtype)
