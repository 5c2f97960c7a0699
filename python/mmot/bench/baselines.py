"""The baselines mmot is measured against, each written here from its description.

Every baseline takes ``scores`` (a float tensor) first, then the op's parameters in the order
of the mmot op (``k`` first for Multi-SK), and returns a tensor shaped like ``scores`` in the
layout mmot returns (samples × prototypes), so outputs can be compared directly:

- :func:`grouped_torch_eager_multi_sinkhorn`: the grouped form of Multi-SK in plain torch, the
  best eager formulation (one (f, h) pair per slot weight);
- :func:`swav_eager_sinkhorn`: SwAV's ``distributed_sinkhorn`` loop for one process;
- :func:`pot_sinkhorn`: POT's ``ot.sinkhorn`` on the same problem (numpy or torch backend);
- :func:`batched_torch_eager_sinkhorn`: a batch of independent Sinkhorn problems in one
  batched tensor, the eager way to run many tiny problems.

SSPC's dense (K, N, K) Multi-SK is :func:`mmot.dense_multi_sinkhorn.dense_multi_sinkhorn`
(shared with ``mmot.sspc``). All of them run under whatever grad mode the caller sets.
"""

from __future__ import annotations

import torch

from mmot._extras import require
from mmot.reference import minmax_rows

__all__ = [
    "grouped_torch_eager_multi_sinkhorn",
    "swav_eager_sinkhorn",
    "pot_sinkhorn",
    "batched_torch_eager_sinkhorn",
]


def grouped_torch_eager_multi_sinkhorn(scores: torch.Tensor, k: int, eps: float, n_iters: int, low_weight: float = 0.25) -> torch.Tensor:
    """Multi-SK in its grouped form (docs/multi_sinkhorn.md), plain domain, in eager torch.

    The two slot groups (weight ``low_weight`` × (K−k) slots, weight 1 × k slots) each keep
    E_G = exp(w_G (S − colmax)/eps) (G, N, K), f_G (G, 1, K) and h_G (G, N, 1); g is (N, K).
    The sums are contractions (``einsum``, which torch maps to batched matmuls), so each
    iteration is a handful of (G, N, K) elementwise passes: O(G·N·K) time and memory. This is
    the fastest formulation we know in eager torch; use it only where exp(w·spread/eps) stays
    in range (cosine scores with eps ≳ 0.02 in float32).

    Args: as :func:`mmot.dense_multi_sinkhorn.dense_multi_sinkhorn`.
    """
    n, n_anchors = scores.shape
    w = torch.tensor([low_weight, 1.0], dtype=scores.dtype, device=scores.device)
    counts = torch.tensor([n_anchors - k, k], dtype=scores.dtype, device=scores.device)
    if k == n_anchors or low_weight == 1.0:  # a single group
        w, counts = w[1:], torch.tensor([float(n_anchors)], dtype=scores.dtype, device=scores.device)
    centered = (scores - scores.amax(0, keepdim=True)) / eps
    e = torch.exp(w[:, None, None] * centered)  # (G, N, K)
    mass = n / n_anchors
    h = scores.new_ones(len(w), n)  # (G, N)
    g = scores.new_ones(n, n_anchors)
    for _ in range(n_iters):
        f = mass / torch.einsum("gnk,gn->gk", e * g, h)  # (G, K)
        ef = e * f[:, None, :]
        g = 1.0 / torch.einsum("gnk,gn->nk", ef, h * counts[:, None])
        h = 1.0 / torch.einsum("gnk,nk->gn", ef, g)
    # The last k slots are the weight-1 group (the only group when there is one).
    t = k * e[-1] * f[-1] * g * h[-1][:, None]
    return minmax_rows(t)


def swav_eager_sinkhorn(scores: torch.Tensor, eps: float, n_iters: int) -> torch.Tensor:
    """SwAV's ``distributed_sinkhorn`` for one process, returned as (B, K) like mmot.sinkhorn.

    Q = exp(scores/eps)ᵀ (K × B), normalised to sum 1; then ``n_iters`` times its rows (the
    prototypes) are scaled to sum 1/K and its columns (the samples) to 1/B; the result is
    B·Q, transposed. No max-shift, as in SwAV.

    Args:
        scores: (B, K) sample-prototype scores.
        eps: temperature.
        n_iters: iterations.
    """
    q = torch.exp(scores / eps).t()
    n_protos, batch = q.shape
    q /= q.sum()
    for _ in range(n_iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= n_protos
        q /= q.sum(dim=0, keepdim=True)
        q /= batch
    q *= batch
    return q.t()


def pot_sinkhorn(scores: torch.Tensor, eps: float, n_iters: int, backend: str = "numpy") -> torch.Tensor:
    """POT's ``ot.sinkhorn`` on the same problem as ``mmot.sinkhorn(scores, eps, n_iters)``.

    The cost is M = −scores and the regularisation ``eps``, so POT's kernel exp(−M/eps) is
    exp(scores/eps); the marginals are 1 per sample and N/K per prototype; exactly ``n_iters``
    Sinkhorn-Knopp iterations (each scales columns, then rows) with no stopping threshold.

    Args:
        scores: (N, K) scores.
        eps: temperature (POT's ``reg``).
        n_iters: iterations (POT's ``numItermax``, with ``stopThr=0``).
        backend: "numpy" (arrays in, as POT's default users call it) or "torch" (tensors in,
            POT's torch backend).
    """
    ot = require("ot", "bench", "mmot-bench's POT baseline")

    n, n_anchors = scores.shape
    if backend == "numpy":
        m = (-scores).detach().cpu().numpy()
        a = torch.ones(n, dtype=scores.dtype).numpy()
        b = torch.full((n_anchors,), n / n_anchors, dtype=scores.dtype).numpy()
        plan = ot.sinkhorn(a, b, m, eps, method="sinkhorn", numItermax=n_iters, stopThr=0.0, warn=False)
        return torch.from_numpy(plan)
    if backend == "torch":
        rows, cols = scores.new_ones(n), scores.new_full((n_anchors,), n / n_anchors)
        return ot.sinkhorn(rows, cols, -scores, eps, method="sinkhorn", numItermax=n_iters, stopThr=0.0, warn=False)
    raise ValueError(f"pot_sinkhorn: backend must be 'numpy' or 'torch'; got {backend!r}")


def batched_torch_eager_sinkhorn(scores: torch.Tensor, eps: float, n_iters: int) -> torch.Tensor:
    """Many independent Sinkhorn problems (B, N, K) at once, in batched eager torch.

    Per problem: P = exp((scores − colmax)/eps), then ``n_iters`` times scale columns to N/K
    and rows to 1: the same result as ``mmot.sinkhorn(scores, eps, n_iters)``. In-place
    updates, so each iteration is two reductions and two broadcasts over the batch.

    Args:
        scores: (B, N, K) scores.
        eps: temperature.
        n_iters: iterations.
    """
    n, n_anchors = scores.shape[-2:]
    p = torch.exp((scores - scores.amax(-2, keepdim=True)) / eps)
    col = n / n_anchors
    for _ in range(n_iters):
        p /= p.sum(-2, keepdim=True)
        p *= col
        p /= p.sum(-1, keepdim=True)
    return p
