"""Rust launchers of the general Sinkhorn path (``mmot._core.sinkhorn_ext_forward`` / ``_backward``).

Kernel-level functions on padded ragged batches (issue 20 spec, section 1): CPU tensors,
``scores`` (B, N, K) in the working dtype (float32 or float64; the caller converts),
``row_counts`` / ``col_counts`` (B,) int64, ``init_f`` (B, N), ``eps_start`` (B,) float64.
Values outside each problem's valid block are never read; padded outputs are 0. The kernels
write only the valid blocks of the (B, N, K) plan and gradient, so those start zero-filled.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot import _rust, reference_ext

OP = "mmot.sinkhorn"


def _common_inputs(scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start):
    b, n, k = scores.shape
    # eps_start stays float64 whatever the working dtype: an ndarray passes _rust.run unconverted.
    eps_start = eps_start.detach().to(torch.float64).reshape(b).contiguous().numpy()
    return [
        scores.reshape(b, n, k),
        row_mass.reshape(b, n),
        col_mass.reshape(b, k),
        row_counts.to(torch.int64).reshape(b),
        col_counts.to(torch.int64).reshape(b),
        init_f.reshape(b, n),
        eps_start,
    ]


def _valid_blocks_output(scores: Tensor, row_counts: Tensor, col_counts: Tensor) -> Tensor:
    """A zero-filled (B, N, K) output of which the kernel writes the valid blocks."""

    def valid():
        rows, cols = reference_ext.valid_masks(scores.shape, row_counts, col_counts)
        return rows & cols

    return _rust.zeroed_output(scores.shape, scores.dtype, valid)


def forward(
    scores: Tensor,
    row_mass: Tensor,
    col_mass: Tensor,
    row_counts: Tensor,
    col_counts: Tensor,
    init_f: Tensor,
    eps_start: Tensor,
    eps: float,
    decay: float,
    n_iters: int,
    tol: float,
    reach: float,
    log_domain: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(plan (B,N,K), f (B,N), g (B,K), iters (B,) int64, err (B,)) of the general Sinkhorn forward."""
    b, n, k = scores.shape
    # The iteration counts are an int64 output; the kernel writes every entry.
    iters = torch.full((b,), -1, dtype=torch.int64)
    plan = _valid_blocks_output(scores, row_counts, col_counts)
    inputs = _common_inputs(scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start)
    f, g, err = _rust.run(
        OP,
        "sinkhorn_ext_forward",
        scores.dtype,
        [*inputs, iters.numpy(), plan.numpy()],
        [(b, n), (b, k), (b,)],
        [float(eps), float(decay), int(n_iters), float(tol), float(reach), log_domain],
    )
    return plan, f, g, iters, err


def backward(
    grad: Tensor,
    scores: Tensor,
    row_mass: Tensor,
    col_mass: Tensor,
    row_counts: Tensor,
    col_counts: Tensor,
    init_f: Tensor,
    eps_start: Tensor,
    eps: float,
    decay: float,
    iters: Tensor,
    reach: float,
    log_domain: str,
) -> Tensor:
    """The exact VJP (w.r.t. ``scores``) of the unrolled iteration that ran ``iters[b]`` iterations."""
    b, n, k = scores.shape
    out = _valid_blocks_output(scores, row_counts, col_counts)
    inputs = _common_inputs(scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start)
    _rust.run(
        OP,
        "sinkhorn_ext_backward",
        scores.dtype,
        [grad.reshape(b, n, k), *inputs, iters.to(torch.int64).reshape(b), out.numpy()],
        [],
        [float(eps), float(decay), float(reach), log_domain],
    )
    return out
