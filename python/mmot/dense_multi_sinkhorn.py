"""SSPC's dense Multi-Assignment Sinkhorn-Knopp: the whole (K slots, N samples, K anchors) tensor.

This is the form the SSPC code runs, written here from its description. It is the baseline that
``mmot-bench`` (provider "official-dense") and the SSPC training-step timing
(``mmot.sspc``, ``assignment_impl: official_dense``) compare mmot's Multi-SK with. It is not an
mmot op: no checks, no backends, O(K²N) time and memory. mmot's own op computes the same
iteration in the grouped form (docs/multi_sinkhorn.md).
"""

from __future__ import annotations

import torch

from mmot.reference import minmax_rows

__all__ = ["dense_multi_sinkhorn"]

# The SSPC code adds this to every denominator.
DENOMINATOR_GUARD = 1e-5


def dense_multi_sinkhorn(scores: torch.Tensor, k: int, eps: float, n_iters: int, low_weight: float = 0.25) -> torch.Tensor:
    """Multi-SK on the whole (K slots, N, K anchors) tensor, as the SSPC code computes it.

    Slot weights are ``low_weight`` for the first K−k slots and 1 for the last k.
    P[m,n,a] = exp(w_m · S[n,a] / eps), and entries that overflowed to infinity are set to the
    largest finite entry; then ``n_iters`` times P is divided by its sums over samples (and
    multiplied by the uniform anchor mass N/K), over slots and over anchors, each denominator
    plus 1e-5. The result is the sum of the last k slots, min-max scaled per row (a constant row
    becomes 0). It runs under whatever grad mode the caller sets.

    Args:
        scores: (N, K) similarities.
        k: assignments per sample.
        eps: temperature.
        n_iters: iterations.
        low_weight: weight of the first K−k slots.

    Returns:
        (N, K) tensor in the layout of :func:`mmot.multi_sinkhorn`.
    """
    n, n_anchors = scores.shape
    weights = torch.tensor([low_weight] * (n_anchors - k) + [1.0] * k, dtype=scores.dtype, device=scores.device)
    mass = n / n_anchors
    p = torch.exp(weights[:, None, None] * scores[None] / eps)
    overflow = torch.isinf(p)
    if bool(overflow.any()):
        p = torch.where(overflow, p[~overflow].max(), p)
    for _ in range(n_iters):
        p = p / (p.sum(dim=1, keepdim=True) + DENOMINATOR_GUARD) * mass
        p = p / (p.sum(dim=0, keepdim=True) + DENOMINATOR_GUARD)
        p = p / (p.sum(dim=2, keepdim=True) + DENOMINATOR_GUARD)
    return minmax_rows(p[n_anchors - k :].sum(0))
