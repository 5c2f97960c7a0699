"""Rust launchers of the implicit Sinkhorn backwards (``mmot_core::implicit``).

Same signatures as :mod:`mmot.reverse.implicit` (the torch backend) and
:mod:`mmot.kernels.implicit` (Triton): padded (B, N, K) CPU tensors in the working dtype
(float32 or float64), ``row_counts``/``col_counts`` (B,) int64; the result is the scores'
gradient, 0 outside each problem's block. ``iters``, if given, a (B,) int64 tensor, receives
each problem's CG iteration count.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot._rust import new_output, num_threads


def _array(t: Tensor, dtype: torch.dtype):
    return t.detach().to(dtype).contiguous().numpy()


def _counts(t: Tensor):
    return t.detach().to(torch.int64).contiguous().numpy()


def _call(name: str, args: list, dtype: torch.dtype, shape, iters: Tensor | None) -> Tensor:
    from mmot import _core

    out = new_output(shape, dtype)
    its = torch.zeros(shape[0], dtype=torch.int64)
    try:
        getattr(_core, name)(*args(out.numpy(), its.numpy()))
    except (ValueError, TypeError) as error:
        raise type(error)(f"mmot.{name}: {error}") from None
    if iters is not None:
        iters.copy_(its)
    return out


def sinkhorn_implicit_backward(
    grad: Tensor, plan: Tensor, row_counts: Tensor, col_counts: Tensor, eps: float, reach: float, *, iters: Tensor | None = None
) -> Tensor:
    """∂L/∂scores of converged Sinkhorn for ∂L/∂plan = ``grad`` (see :mod:`mmot.reverse.implicit`)."""
    dtype = plan.dtype
    g, p = _array(grad, dtype), _array(plan, dtype)
    rc, cc = _counts(row_counts), _counts(col_counts)

    def args(out, its):
        return (g, p, rc, cc, out, its, float(eps), float(reach), num_threads())

    return _call("sinkhorn_implicit_backward", args, dtype, plan.shape, iters)


def multi_sinkhorn_implicit_backward(
    grad_raw: Tensor,
    scores: Tensor,
    F: Tensor,
    Gam: Tensor,
    H: Tensor,
    row_counts: Tensor,
    col_counts: Tensor,
    weights: list[float],
    counts: Tensor,
    tops: Tensor,
    eps: float,
    normalize: str = "none",
    *,
    iters: Tensor | None = None,
) -> Tensor:
    """∂L/∂scores of converged grouped Multi-SK for ∂L/∂T_raw = ``grad_raw`` (see :mod:`mmot.reverse.implicit`).

    With ``normalize="minmax"``, ``grad_raw`` is instead ∂L/∂T of the min-max-normalised target:
    the kernel applies the min-max VJP row by row as it rebuilds T_raw (the other backends leave
    that to their caller).
    """
    dtype = scores.dtype
    arrays = [_array(t, dtype) for t in (grad_raw, scores, F, Gam, H)]
    rc, cc = _counts(row_counts), _counts(col_counts)
    cn, tp = _array(counts, dtype), _array(tops, dtype)

    def args(out, its):
        return (*arrays, rc, cc, cn, tp, out, its, [float(w) for w in weights], float(eps), normalize, num_threads())

    return _call("multi_sinkhorn_implicit_backward", args, dtype, scores.shape, iters)
