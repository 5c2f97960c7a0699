"""``process_group=`` on the kernels: each rank runs the Rust (CPU) or Triton (CUDA) kernel on its
own rows, and the per-column sums are all-reduced once per iteration, forward and backward
(``docs/distributed.md``).

The ops' public functions resolve the masses and check the values, then call :func:`sinkhorn` or
:func:`multi_sinkhorn` here for ``backend`` "rust" or "triton" ("torch" keeps the reference with
:class:`mmot._columns.ShardedColumns`). Every decision that shapes the iteration (the range check,
the working dtype, the domain, the column shift) is taken from the column maxima and minima
all-reduced once per call, so every rank makes the same one and calls the same collectives in the
same order. Every rank must call the op (and its
backward) together, as with any collective.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot import _checks, _rust, reference
from mmot.ops._kernels import triton_kernels

SINKHORN = "mmot.sinkhorn"
MULTI = "mmot.multi_sinkhorn"


def _numpy_sum(group):
    """The Rust kernels' collective: an in-place sum over ``group`` of a 1-D numpy array."""
    import torch.distributed as dist

    def reduce(array) -> None:
        dist.all_reduce(torch.from_numpy(array), group=group)

    return reduce


def _tensor_sum(group):
    """The Triton launchers' collective: an in-place sum over ``group`` of a device tensor (no host sync)."""
    import torch.distributed as dist

    def reduce(tensor: Tensor) -> None:
        dist.all_reduce(tensor, group=group)

    return reduce


class _KnownColumns:
    """The column statistics over every rank, all-reduced once per call, served to the reference's
    range helpers in place of :class:`mmot._columns.ShardedColumns` (no collective of their own).

    ``reference.exponent_range`` (behind the range check, the working dtype and the domain) asks
    for the maximum over ranks of the column maxima, then of the negated column minima; the
    answers alternate in that order, and each request is checked against this rank's own
    statistics (a local comparison, so a mismatch raises on its own instead of desynchronising
    the collectives).
    """

    def __init__(self, scores: Tensor, columns) -> None:
        s = scores.detach()
        self.local = torch.stack([s.amax(-2), -s.amin(-2)]).double()
        self.reduced = columns.max(self.local)
        self.calls = 0

    def max(self, partial: Tensor) -> Tensor:
        which = self.calls % 2
        self.calls += 1
        if not torch.equal(partial.detach().double(), self.local[which]):
            raise AssertionError("mmot: the sharded range helpers asked for an unexpected column statistic")
        return self.reduced[which].to(partial.dtype)

    def column_max(self, dtype: torch.dtype) -> Tensor:
        """The column maxima over every rank's rows, (..., K): the common centre of the logits
        (exact in ``dtype``: the maxima of values of that dtype, or of a narrower one)."""
        return self.reduced[0].to(dtype).contiguous()


def _prepare(scores: Tensor, eps: float, max_weight: float, log_domain: str, columns, op: str, backend: str):
    """(working-dtype scores, log domain?, column shift) of a sharded call, from one all-reduce."""
    known = _KnownColumns(scores, columns)
    if _checks.value_checks_enabled():
        reference.check_log_range(scores, eps, max_weight, op, known)
    work = _working(scores, eps, max_weight, op, known, backend)
    s = scores.detach().to(work).contiguous()
    log = _log_domain(s, eps, max_weight, log_domain, known, op, backend)
    return s, log, known.column_max(work)


def _working(scores: Tensor, eps: float, max_weight: float, op: str, columns, backend: str) -> torch.dtype:
    # Triton widens narrower scores only with the value checks on (their measurement syncs),
    # exactly as the single-process op does; the spread is all-reduced, so the ranks agree.
    if backend == "triton" and not _checks.value_checks_enabled():
        return reference.compute_dtype(scores.dtype)
    return reference.working_dtype(scores, eps, max_weight, op, columns)


def _log_domain(s: Tensor, eps: float, max_weight: float, log_domain: str, columns, op: str, backend: str) -> bool:
    """The domain, from the all-reduced exponent range (the same on every rank). The Triton
    kernels are always stable and need none; forcing the plain domain where it cannot work is
    still refused, as on every backend."""
    if backend == "triton":
        if log_domain == "off" and _checks.value_checks_enabled():
            reference.uses_log_domain(s, eps, max_weight, log_domain, columns, op)
        return True
    return reference.uses_log_domain(s, eps, max_weight, log_domain, columns, op)


def _check_fits(op: str, fits: bool, scores: Tensor) -> None:
    if not fits:
        raise ValueError(
            f"{op}: with process_group, backend 'triton' needs a row of scores to fit one Triton tile; got {scores.shape[-1]} "
            "columns, too wide for this dtype; use backend='torch' (the reference-based sharded path)"
        )


def sinkhorn(scores: Tensor, eps: float, n_iters: int, rows: Tensor, cols: Tensor, log_domain: str, columns, backend: str) -> Tensor:
    """``mmot.sinkhorn`` on this rank's rows; ``rows``, ``cols`` the resolved masses."""
    s, log, shift = _prepare(scores, eps, 1.0, log_domain, columns, SINKHORN, backend)
    if backend == "triton":
        _check_fits(SINKHORN, triton_kernels("sinkhorn").fits(s.shape[-1], s.dtype), scores)
    masses = rows.to(s.dtype).contiguous(), cols.to(s.dtype).contiguous()
    return _Sinkhorn.apply(scores, s, shift, *masses, eps, n_iters, log, backend, columns.group)


class _Sinkhorn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, s, shift, rows, cols, eps, n_iters, log, backend, group):
        if backend == "rust":
            b, n, k = _rust.problem_shape(s)
            (out,) = _rust.run(
                SINKHORN,
                "sharded_sinkhorn",
                s.dtype,
                [s.reshape(b, n, k), shift.reshape(b, k), rows.reshape(b, n), cols.reshape(b, k)],
                [(b, n, k)],
                [eps, n_iters, log, _numpy_sum(group)],
            )
            out = out.view(s.shape)
        else:
            out = triton_kernels("sinkhorn").forward(s, eps, n_iters, rows, cols, "auto", shift=shift, reduce=_tensor_sum(group))
        ctx.save_for_backward(s, shift, rows, cols)
        ctx.params = (eps, n_iters, backend, group, scores.dtype)
        return out.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad):
        s, shift, rows, cols = ctx.saved_tensors
        eps, n_iters, backend, group, dtype = ctx.params
        g = grad.to(s.dtype).contiguous()
        if backend == "rust":
            b, n, k = _rust.problem_shape(s)
            (out,) = _rust.run(
                SINKHORN,
                "sharded_sinkhorn_backward",
                s.dtype,
                [g.reshape(b, n, k), s.reshape(b, n, k), shift.reshape(b, k), rows.reshape(b, n), cols.reshape(b, k)],
                [(b, n, k)],
                [eps, n_iters, _numpy_sum(group)],
            )
            out = out.view(s.shape)
        else:
            out = triton_kernels("sinkhorn").backward(g, s, eps, n_iters, rows, cols, "auto", shift=shift, reduce=_tensor_sum(group))
        return (out.to(dtype),) + (None,) * 9


def multi_sinkhorn(
    scores: Tensor,
    eps: float,
    n_iters: int,
    slot_weights: list[float],
    k: int,
    anchor_mass: Tensor,
    normalize: str,
    log_domain: str,
    columns,
    backend: str,
) -> Tensor:
    """``mmot.multi_sinkhorn`` on this rank's rows; ``anchor_mass`` the resolved N/K masses."""
    s, log, shift = _prepare(scores, eps, max(slot_weights), log_domain, columns, MULTI, backend)
    groups = reference.slot_groups(slot_weights, k)
    if backend == "triton":
        _check_fits(MULTI, triton_kernels("multi_sinkhorn").fits(s.shape[-1], len(groups), s.dtype, True), scores)
    mass = anchor_mass.to(s.dtype).contiguous()
    return _MultiSinkhorn.apply(scores, s, shift, mass, eps, n_iters, groups, normalize, log, backend, columns.group)


class _MultiSinkhorn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, s, shift, mass, eps, n_iters, groups, normalize, log, backend, group):
        if backend == "rust":
            b, n, k = _rust.problem_shape(s)
            (out,) = _rust.run(
                MULTI,
                "sharded_multi_sinkhorn",
                s.dtype,
                [s.reshape(b, n, k), shift.reshape(b, k), mass.reshape(b, k)],
                [(b, n, k)],
                [eps, n_iters, *_group_lists(groups), normalize == "minmax", log, _numpy_sum(group)],
            )
            out = out.view(s.shape)
        else:
            out = triton_kernels("multi_sinkhorn").forward(s, eps, n_iters, groups, mass, normalize, shift=shift, reduce=_tensor_sum(group))
        ctx.save_for_backward(s, shift, mass)
        ctx.params = (eps, n_iters, groups, normalize, log, backend, group, scores.dtype)
        return out.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad):
        s, shift, mass = ctx.saved_tensors
        eps, n_iters, groups, normalize, log, backend, group, dtype = ctx.params
        g = grad.to(s.dtype).contiguous()
        if backend == "rust":
            b, n, k = _rust.problem_shape(s)
            (out,) = _rust.run(
                MULTI,
                "sharded_multi_sinkhorn_backward",
                s.dtype,
                [g.reshape(b, n, k), s.reshape(b, n, k), shift.reshape(b, k), mass.reshape(b, k)],
                [(b, n, k)],
                [eps, n_iters, *_group_lists(groups), normalize == "minmax", log, _numpy_sum(group)],
            )
            out = out.view(s.shape)
        else:
            out = triton_kernels("multi_sinkhorn").backward(
                g, s, eps, n_iters, groups, mass, normalize, shift=shift, reduce=_tensor_sum(group)
            )
        return (out.to(dtype),) + (None,) * 10


def _group_lists(groups) -> tuple[list[float], list[int], list[int]]:
    return [float(w) for w, _, _ in groups], [int(c) for _, c, _ in groups], [int(t) for _, _, t in groups]
