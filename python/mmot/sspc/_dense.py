"""LOCAL STAND-IN, used only when ``mmot.bench.baselines.official_dense_multi_sinkhorn`` is absent.

The official-dense Multi-SK of the SSPC code as DESIGN §2.2 describes it (written from that
description): the whole (K, N, K) slot × sample × anchor tensor, 1e-5 added to every
denominator, O(K²·N) time and memory per iteration. It exists only to time a training step
against mmot's grouped kernels with the same model, batch and queue.
"""

from __future__ import annotations

import torch
from torch import Tensor


def official_dense_multi_sinkhorn(scores: Tensor, k: int, eps: float = 0.07, n_iters: int = 20, low_weight: float = 0.25) -> Tensor:
    n, n_anchors = scores.shape
    weights = torch.full((n_anchors,), float(low_weight), dtype=scores.dtype, device=scores.device)
    weights[n_anchors - k:] = 1.0
    r = torch.full((n_anchors,), n / n_anchors, dtype=scores.dtype, device=scores.device)
    logits = weights[:, None, None] * scores[None] / eps  # (slots, N, K)
    p = torch.exp(logits - logits.amax())
    for _ in range(n_iters):
        p = p * (r / (p.sum(dim=1, keepdim=True) + 1e-5))
        p = p / (p.sum(dim=0, keepdim=True) + 1e-5)
        p = p / (p.sum(dim=2, keepdim=True) + 1e-5)
    t = p[n_anchors - k:].sum(dim=0)
    lo, hi = t.amin(dim=1, keepdim=True), t.amax(dim=1, keepdim=True)
    return (t - lo) / (hi - lo + 1e-5)
