"""Triton launchers of ``mmot::nt_xent``: InfoNCE's tiles (:mod:`mmot.kernels.info_nce`) on
z = [x; y] against itself, with each row's own column left out and its positive N rows away.

With ẑ the normalised rows, s = ẑẑᵀ/τ and lse[r] = log Σ_{c≠r} e^{s[r,c]}, the loss of row r is
lse[r] − s[r, r ± N]. Its gradient is (G + Gᵀ) ẑ / τ with G[r,c] = g_r e^{s[r,c] − lse[r]} for
c ≠ r, minus g_r at r's positive: the row pass (OWN) gives G ẑ, the column pass (OTHER) Gᵀ ẑ.
"""

from __future__ import annotations

import torch

from mmot.kernels import _common
from mmot.kernels.info_nce import _grad, _lse


def _rows(z: torch.Tensor, normalize: bool):
    """z's rows in the accumulation dtype, normalised when asked, and what the adjoint needs."""
    x = z.to(_common.acc_dtype(z.dtype)).contiguous()
    if not normalize:
        return x, None
    x, *rx = _common.unit_rows(x)
    return x.contiguous(), rx


def forward(z, temperature, normalize):
    """(per-row loss in z's dtype, lse) as ``mmot::nt_xent`` returns them."""
    x, _ = _rows(z, normalize)
    ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    scale = 1.0 / temperature
    lse = _lse(x, x, ones, scale, half=True)
    positive = (x * x.roll(x.shape[0] // 2, 0)).sum(-1) * scale
    return (lse - positive).to(z.dtype), lse


def backward(grad, z, lse, temperature, normalize):
    """The gradient for z of Σ grad · loss, recomputing the logit tiles."""
    x, rx = _rows(z, normalize)
    ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    g, lse = grad.to(x.dtype).contiguous(), lse.to(x.dtype).contiguous()
    scale = 1.0 / temperature
    # The kernels leave out 1/τ (multiplied last, below); the logits they recompute take it.
    total = _grad(x, x, ones, g, lse, lse, scale, True, False, half=True) + _grad(x, x, ones, g, lse, lse, scale, False, True, half=True)
    if normalize:
        total = _common.through_normalize(x, *rx, total)
    return (total * scale).to(z.dtype)
