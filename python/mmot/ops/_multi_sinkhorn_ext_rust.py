"""Launchers of the Rust kernels of ``multi_sinkhorn_ext`` (issue 20 spec, section 2).

Both take CPU tensors in the working dtype (float32 or float64; the caller converts): ``scores``
(B, N, K) padded, ``row_counts``/``col_counts`` (B,) int64, ``counts``/``tops`` (B, G),
``eps_start`` (B,) float64, ``weights`` a list of G floats. Padded entries are never read.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot import _rust

OP = "mmot.multi_sinkhorn"


def _index(values: Tensor) -> Tensor:
    return values.detach().to(torch.int64).contiguous()


def _eps_start(eps_start: Tensor) -> list[float]:
    # A list of float64 values: the schedule runs in float64 whatever the working dtype.
    return eps_start.detach().to(torch.float64).reshape(-1).tolist()


def forward(
    scores: Tensor,
    row_counts: Tensor,
    col_counts: Tensor,
    weights: list[float],
    counts: Tensor,
    tops: Tensor,
    eps_start: Tensor,
    eps: float,
    decay: float,
    n_iters: int,
    tol: float,
    normalize: str,
    log_domain: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(T (B,N,K), F (B,G,K), Gam (B,N,K), H (B,G,N), iters (B,) int64, err (B,))."""
    b, n, k = scores.shape
    g = len(weights)
    target, f, gam, h, iters, err = _rust.run(
        OP,
        "multi_sinkhorn_ext_forward",
        scores.dtype,
        [scores, _index(row_counts), _index(col_counts), counts.reshape(b, g), tops.reshape(b, g)],
        [(b, n, k), (b, g, k), (b, n, k), (b, g, n), (b,), (b,)],
        [[float(w) for w in weights], _eps_start(eps_start), float(eps), float(decay), int(n_iters), float(tol), normalize, log_domain],
    )
    return target, f, gam, h, iters.to(torch.int64), err


def backward(
    grad: Tensor,
    scores: Tensor,
    row_counts: Tensor,
    col_counts: Tensor,
    weights: list[float],
    counts: Tensor,
    tops: Tensor,
    eps_start: Tensor,
    eps: float,
    decay: float,
    iters: Tensor,
    normalize: str,
    log_domain: str,
) -> Tensor:
    """d<grad, T>/d scores through ``iters[b]`` unrolled iterations (B, N, K); padding 0."""
    b, n, k = scores.shape
    g = len(weights)
    (out,) = _rust.run(
        OP,
        "multi_sinkhorn_ext_backward",
        scores.dtype,
        [grad, scores, _index(row_counts), _index(col_counts), counts.reshape(b, g), tops.reshape(b, g), _index(iters)],
        [(b, n, k)],
        [[float(w) for w in weights], _eps_start(eps_start), float(eps), float(decay), normalize, log_domain],
    )
    return out
