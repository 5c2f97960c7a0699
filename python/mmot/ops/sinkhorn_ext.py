"""``mmot::sinkhorn_ext``: :func:`mmot.sinkhorn` with options, its op and its two gradients.

The op runs on a padded batch in the working dtype (``mmot.ops._sinkhorn_options``) and returns
tensors only (plan, potentials, iterations, marginal errors), so that early stopping is decided
inside the kernels and never breaks a ``torch.compile`` graph. Its backward is the exact VJP of
the unrolled iteration (``grad="unrolled"``) or the adjoint of the converged fixed point
(``grad="implicit"``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot import _checks, reference, reference_ext
from mmot.ops import _implicit_rust, _sinkhorn_ext_rust
from mmot.ops import _sinkhorn_options as options
from mmot.ops._kernels import Kernels, triton_entry, triton_kernels
from mmot.reverse import implicit

OP = "mmot.sinkhorn"
KERNELS = "sinkhorn_ext"  # mmot.kernels.sinkhorn_ext


def _check_values(scores, row_mass, col_mass, row_counts, col_counts, init_f, reach, log_domain, eps) -> None:
    """The value checks made before the kernel runs: O(B·(N + K)), never a pass over the scores
    (the kernels read each valid score anyway; :func:`_explain_non_finite` reads them after).
    Empty masses are the defaults, valid by construction."""
    options.check_counts(OP, scores, row_counts, col_counts)
    _checks.finite(OP, "init", init_f)
    if log_domain == "off":
        reference.uses_log_domain(options.fill_padding(scores, row_counts, col_counts), eps, 1.0, log_domain, op=OP)
    if row_mass.numel() == 0:
        return
    rows, cols = reference_ext.valid_masks(scores.shape, row_counts, col_counts)
    _checks.positive_masses(OP, "row_mass", torch.where(rows.squeeze(-1), row_mass, 1.0))
    _checks.positive_masses(OP, "col_mass", torch.where(cols.squeeze(-2), col_mass, 1.0))
    if reach == float("inf"):
        # Padding holds 0, so the plain sums are the valid entries' totals.
        rows_total, cols_total = row_mass.sum(-1, dtype=torch.float64), col_mass.sum(-1, dtype=torch.float64)
        mismatch = (rows_total - cols_total).abs() > 1e-4 * rows_total.abs()
        if bool(mismatch.any()):
            worst = int(mismatch.nonzero()[0])
            raise ValueError(
                f"{OP}: argument 'col_mass' must sum to the total of row_mass in every problem (or give 'reach' for unbalanced "
                f"marginals); got a sum of {float(cols_total[worst]):.6g} where {float(rows_total[worst]):.6g} was expected"
            )


def _explain_non_finite(scores, row_counts, col_counts, eps) -> None:
    """A NaN marginal error means a problem the kernel could not compute: name the cause."""
    valid = options.fill_padding(scores, row_counts, col_counts)
    _checks.finite(OP, "scores", valid)
    reference.check_log_range(valid, eps, 1.0, OP)
    raise ValueError(
        f"{OP}: argument 'scores' gives a problem whose iteration leaves the {scores.dtype} range (its marginal error is NaN); "
        f"pass float64 scores or a larger eps"
    )


def _forward(backend, scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start, eps, decay, n_iters, tol, reach, log_domain):
    """Checks, then the chosen kernel in the compute dtype; results in the scores' dtype (errors in the compute dtype).

    Unlike the anchor op, no pass over the scores decides the dtype before the kernel runs: the
    padded batch's ragged problems are read by the kernel alone, and a problem whose range the
    compute dtype cannot iterate shows as a NaN error, which the checks turn into a ValueError.
    """
    checks = _checks.value_checks_enabled() and scores.numel() > 0
    if checks:
        _check_values(scores, row_mass, col_mass, row_counts, col_counts, init_f, reach, log_domain, eps)
    dtype = reference.compute_dtype(scores.dtype)
    row_mass, col_mass = options.masses_or_defaults(scores.shape, dtype, row_mass, col_mass, row_counts, col_counts)
    plan, f, g, iters, err = _FORWARD(
        backend,
        scores.to(dtype),
        row_mass.to(dtype),
        col_mass.to(dtype),
        row_counts,
        col_counts,
        init_f.to(dtype),
        eps_start,
        eps,
        decay,
        n_iters,
        tol,
        reach,
        log_domain,
    )
    if checks and not bool(torch.isfinite(err).all()):
        _explain_non_finite(scores, row_counts, col_counts, eps)
    return plan.to(scores.dtype), f.to(scores.dtype), g.to(scores.dtype), iters, err.to(dtype)


def _empty(scores, *_) -> bool:
    return scores.numel() == 0


def _fits(scores, *_) -> bool:
    return triton_kernels(KERNELS).fits(scores.shape[-1], scores.dtype)


def _backward_torch(grad, scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start, eps, decay, iters, reach, log_domain):
    """Autograd through the reference's replay of ``iters`` iterations (exact, explicit in the op)."""

    def plan(s):
        return reference_ext.sinkhorn_ext(
            s, row_mass, col_mass, row_counts, col_counts, init_f, eps_start, eps, decay, 1, -1.0, reach, log_domain, iters
        )[0]

    _, vjp = torch.func.vjp(plan, scores)
    return vjp(grad)[0]


_FORWARD = Kernels(
    torch=reference_ext.sinkhorn_ext,
    rust=_sinkhorn_ext_rust.forward,
    triton=triton_entry(KERNELS, "forward"),
    empty=_empty,
    fits=_fits,
)
_BACKWARD = Kernels(
    torch=_backward_torch,
    rust=_sinkhorn_ext_rust.backward,
    triton=triton_entry(KERNELS, "backward"),
    empty=lambda grad, scores, *_: scores.numel() == 0,
    fits=lambda grad, scores, *_: _fits(scores),
)
_IMPLICIT = Kernels(
    torch=implicit.sinkhorn_implicit_backward,
    rust=_implicit_rust.sinkhorn_implicit_backward,
    triton=triton_entry("implicit", "sinkhorn_implicit_backward"),
    empty=lambda grad, plan, *_: plan.numel() == 0,
    fits=lambda grad, plan, *_: triton_kernels("implicit").fits(plan.shape[-1], plan.dtype),
)


@torch.library.custom_op("mmot::sinkhorn_ext", mutates_args=())
def sinkhorn_ext_op(
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
    grad: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Devices without a kernel of their own run the torch backend."""
    return _forward(
        "torch", scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start, eps, decay, n_iters, tol, reach, log_domain
    )


@sinkhorn_ext_op.register_kernel(("cpu", "cuda"))
def _sinkhorn_ext_kernel(
    scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start, eps, decay, n_iters, tol, reach, log_domain, grad, backend
):
    return _forward(
        backend, scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start, eps, decay, n_iters, tol, reach, log_domain
    )


@sinkhorn_ext_op.register_fake
def _sinkhorn_ext_fake(
    scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start, eps, decay, n_iters, tol, reach, log_domain, grad, backend
):
    b = scores.shape[0]
    return (
        torch.empty_like(scores),
        scores.new_empty(scores.shape[:-1]),
        scores.new_empty((b, scores.shape[-1])),
        scores.new_empty((b,), dtype=torch.int64),
        scores.new_empty((b,), dtype=reference.compute_dtype(scores.dtype)),
    )


@torch.library.custom_op("mmot::sinkhorn_ext_backward", mutates_args=())
def sinkhorn_ext_backward_op(
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
    backend: str,
) -> Tensor:
    """The exact VJP of the unrolled iteration; devices without a kernel of their own run the torch backend."""
    return _backward_unrolled(
        "torch", grad, scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start, eps, decay, iters, reach, log_domain
    )


@sinkhorn_ext_backward_op.register_kernel(("cpu", "cuda"))
def _sinkhorn_ext_backward_kernel(
    grad, scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start, eps, decay, iters, reach, log_domain, backend
):
    return _backward_unrolled(
        backend, grad, scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start, eps, decay, iters, reach, log_domain
    )


def _backward_unrolled(
    backend, grad, scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start, eps, decay, iters, reach, log_domain
):
    dtype = reference.compute_dtype(scores.dtype)  # as the forward's
    row_mass, col_mass = options.masses_or_defaults(scores.shape, dtype, row_mass, col_mass, row_counts, col_counts)
    out = _BACKWARD(
        backend,
        grad.to(dtype),
        scores.to(dtype),
        row_mass.to(dtype),
        col_mass.to(dtype),
        row_counts,
        col_counts,
        init_f.to(dtype),
        eps_start,
        eps,
        decay,
        iters,
        reach,
        log_domain,
    )
    return out.to(scores.dtype)


@sinkhorn_ext_backward_op.register_fake
def _sinkhorn_ext_backward_fake(grad, scores, *_):
    return torch.empty_like(scores)


@torch.library.custom_op("mmot::sinkhorn_implicit_backward", mutates_args=())
def sinkhorn_implicit_backward_op(
    grad: Tensor, plan: Tensor, row_counts: Tensor, col_counts: Tensor, eps: float, reach: float, backend: str
) -> Tensor:
    """The adjoint of the converged fixed point; devices without a kernel of their own run the torch backend."""
    return _backward_implicit("torch", grad, plan, row_counts, col_counts, eps, reach)


@sinkhorn_implicit_backward_op.register_kernel(("cpu", "cuda"))
def _sinkhorn_implicit_backward_kernel(grad, plan, row_counts, col_counts, eps, reach, backend):
    return _backward_implicit(backend, grad, plan, row_counts, col_counts, eps, reach)


def _backward_implicit(backend, grad, plan, row_counts, col_counts, eps, reach):
    dtype = reference.compute_dtype(plan.dtype)
    return _IMPLICIT(backend, grad.to(dtype), plan.to(dtype), row_counts, col_counts, eps, reach).to(plan.dtype)


@sinkhorn_implicit_backward_op.register_fake
def _sinkhorn_implicit_backward_fake(grad, plan, *_):
    return torch.empty_like(plan)


def _setup_context(ctx, inputs, output):
    scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start, eps, decay, n_iters, tol, reach, log_domain, grad, backend = (
        inputs
    )
    plan, f, g, iters, err = output
    ctx.mark_non_differentiable(f, g, iters, err)
    if grad == "implicit":
        ctx.save_for_backward(plan, row_counts, col_counts)
    else:
        ctx.save_for_backward(scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start, iters)
    ctx.params = (eps, decay, reach, log_domain, grad, backend)


def _backward(ctx, grad_plan, *_):
    eps, decay, reach, log_domain, grad, backend = ctx.params
    if grad == "implicit":
        plan, row_counts, col_counts = ctx.saved_tensors
        grad_scores = sinkhorn_implicit_backward_op(grad_plan.contiguous(), plan, row_counts, col_counts, eps, reach, backend)
    else:
        scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start, iters = ctx.saved_tensors
        grad_scores = sinkhorn_ext_backward_op(
            grad_plan.contiguous(),
            scores,
            row_mass,
            col_mass,
            row_counts,
            col_counts,
            init_f,
            eps_start,
            eps,
            decay,
            iters,
            reach,
            log_domain,
            backend,
        )
    return (grad_scores,) + (None,) * 14


sinkhorn_ext_op.register_autograd(_backward, setup_context=_setup_context)
