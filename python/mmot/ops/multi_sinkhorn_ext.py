"""``mmot::multi_sinkhorn_ext``: :func:`mmot.multi_sinkhorn` with options, its op and its two gradients.

As ``mmot::sinkhorn_ext``: a padded batch in the working dtype, tensors only out (the target, the
score-unit potentials F, Gam, H that the implicit gradient rebuilds the slot plans from, the
iterations and the marginal errors), and the unrolled or the implicit backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot import _checks, reference, reference_ext
from mmot.ops import _implicit_rust, _multi_sinkhorn_ext_rust
from mmot.ops import _sinkhorn_options as options
from mmot.ops._kernels import Kernels, triton_entry, triton_kernels
from mmot.reverse import implicit

OP = "mmot.multi_sinkhorn"
KERNELS = "multi_sinkhorn_ext"  # mmot.kernels.multi_sinkhorn_ext


def _check_values(scores, row_counts, col_counts, weights, eps, log_domain) -> None:
    """The value checks (one host sync each), made inside the op so that compiled graphs hold none."""
    options.check_counts(OP, scores, row_counts, col_counts)
    _checks.finite(OP, "scores", scores)
    reference.check_log_range(scores, eps, max(weights), OP)
    if log_domain == "off":
        reference.uses_log_domain(scores, eps, max(weights), log_domain, op=OP)


def _working_dtype(scores: Tensor, eps: float, weights) -> torch.dtype:
    """reference.working_dtype where the value checks may read the scores, else the compute dtype."""
    if not _checks.value_checks_enabled():
        return reference.compute_dtype(scores.dtype)
    return reference.working_dtype(scores, eps, max(weights), OP)


def _forward(backend, scores, row_counts, col_counts, weights, counts, tops, eps_start, eps, decay, n_iters, tol, normalize, log_domain):
    """Checks, then the chosen kernel in the working dtype; results in the scores' dtype (errors in the compute dtype)."""
    if _checks.value_checks_enabled() and scores.numel():
        _check_values(scores, row_counts, col_counts, weights, eps, log_domain)
    dtype = _working_dtype(scores, eps, weights)
    target, f, gam, h, iters, err = _FORWARD(
        backend,
        scores.to(dtype),
        row_counts,
        col_counts,
        weights,
        counts.to(dtype),
        tops.to(dtype),
        eps_start,
        eps,
        decay,
        n_iters,
        tol,
        normalize,
        log_domain,
    )
    out = (target, f, gam, h)
    return tuple(x.to(scores.dtype) for x in out) + (iters, err.to(reference.compute_dtype(scores.dtype)))


def _fits(scores, weights) -> bool:
    return triton_kernels(KERNELS).fits(scores.shape[-1], len(weights), scores.dtype)


def _backward_torch(grad, scores, row_counts, col_counts, weights, counts, tops, eps_start, eps, decay, iters, normalize, log_domain):
    """Autograd through the reference's replay of ``iters`` iterations (exact, explicit in the op)."""

    def target(s):
        return reference_ext.multi_sinkhorn_ext(
            s, row_counts, col_counts, weights, counts, tops, eps_start, eps, decay, 1, -1.0, normalize, log_domain, iters
        )[0]

    _, vjp = torch.func.vjp(target, scores)
    return vjp(grad)[0]


_FORWARD = Kernels(
    torch=reference_ext.multi_sinkhorn_ext,
    rust=_multi_sinkhorn_ext_rust.forward,
    triton=triton_entry(KERNELS, "forward"),
    empty=lambda scores, *_: scores.numel() == 0,
    fits=lambda scores, row_counts, col_counts, weights, *_: _fits(scores, weights),
)
_BACKWARD = Kernels(
    torch=_backward_torch,
    rust=_multi_sinkhorn_ext_rust.backward,
    triton=triton_entry(KERNELS, "backward"),
    empty=lambda grad, scores, *_: scores.numel() == 0,
    fits=lambda grad, scores, row_counts, col_counts, weights, *_: _fits(scores, weights),
)


def _minmax_first(kernel):
    """A backend whose kernel takes ∂L/∂T_raw: the min-max step's VJP runs first, in torch (O(N·K))."""

    def run(grad, scores, f, gam, h, row_counts, col_counts, weights, counts, tops, eps, normalize):
        if normalize == "minmax":
            grad = _minmax_vjp(grad, scores, f, gam, h, row_counts, col_counts, weights, tops, eps).contiguous()
        return kernel(grad, scores, f, gam, h, row_counts, col_counts, weights, counts, tops, eps)

    return run


# The Rust kernel applies the min-max VJP itself, in the pass that rebuilds the plans (T_raw is
# a by-product there); rebuilding T_raw in torch cost about as much as the whole Rust solve.
_IMPLICIT = Kernels(
    torch=_minmax_first(implicit.multi_sinkhorn_implicit_backward),
    rust=_implicit_rust.multi_sinkhorn_implicit_backward,
    triton=_minmax_first(triton_entry("implicit", "multi_sinkhorn_implicit_backward")),
    empty=lambda grad, scores, *_: scores.numel() == 0,
    fits=lambda grad, scores, f, gam, h, row_counts, col_counts, weights, *_: triton_kernels("implicit").fits(
        scores.shape[-1], scores.dtype, n_groups=len(weights)
    ),
)


@torch.library.custom_op("mmot::multi_sinkhorn_ext", mutates_args=())
def multi_sinkhorn_ext_op(
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
    grad: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Devices without a kernel of their own run the torch backend."""
    return _forward(
        "torch", scores, row_counts, col_counts, weights, counts, tops, eps_start, eps, decay, n_iters, tol, normalize, log_domain
    )


@multi_sinkhorn_ext_op.register_kernel(("cpu", "cuda"))
def _multi_sinkhorn_ext_kernel(
    scores, row_counts, col_counts, weights, counts, tops, eps_start, eps, decay, n_iters, tol, normalize, log_domain, grad, backend
):
    return _forward(
        backend, scores, row_counts, col_counts, weights, counts, tops, eps_start, eps, decay, n_iters, tol, normalize, log_domain
    )


@multi_sinkhorn_ext_op.register_fake
def _multi_sinkhorn_ext_fake(
    scores, row_counts, col_counts, weights, counts, tops, eps_start, eps, decay, n_iters, tol, normalize, log_domain, grad, backend
):
    b, n, k = scores.shape
    groups = len(weights)
    return (
        torch.empty_like(scores),
        scores.new_empty((b, groups, k)),
        torch.empty_like(scores),
        scores.new_empty((b, groups, n)),
        scores.new_empty((b,), dtype=torch.int64),
        scores.new_empty((b,), dtype=reference.compute_dtype(scores.dtype)),
    )


@torch.library.custom_op("mmot::multi_sinkhorn_ext_backward", mutates_args=())
def multi_sinkhorn_ext_backward_op(
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
    backend: str,
) -> Tensor:
    """The exact VJP of the unrolled iteration and the min-max step; other devices run the torch backend."""
    return _backward_unrolled(
        "torch", grad, scores, row_counts, col_counts, weights, counts, tops, eps_start, eps, decay, iters, normalize, log_domain
    )


@multi_sinkhorn_ext_backward_op.register_kernel(("cpu", "cuda"))
def _multi_sinkhorn_ext_backward_kernel(
    grad, scores, row_counts, col_counts, weights, counts, tops, eps_start, eps, decay, iters, normalize, log_domain, backend
):
    return _backward_unrolled(
        backend, grad, scores, row_counts, col_counts, weights, counts, tops, eps_start, eps, decay, iters, normalize, log_domain
    )


def _backward_unrolled(
    backend, grad, scores, row_counts, col_counts, weights, counts, tops, eps_start, eps, decay, iters, normalize, log_domain
):
    dtype = _working_dtype(scores, eps, weights)  # as the forward's
    out = _BACKWARD(
        backend,
        grad.to(dtype),
        scores.to(dtype),
        row_counts,
        col_counts,
        weights,
        counts.to(dtype),
        tops.to(dtype),
        eps_start,
        eps,
        decay,
        iters,
        normalize,
        log_domain,
    )
    return out.to(scores.dtype)


@multi_sinkhorn_ext_backward_op.register_fake
def _multi_sinkhorn_ext_backward_fake(grad, scores, *_):
    return torch.empty_like(scores)


@torch.library.custom_op("mmot::multi_sinkhorn_implicit_backward", mutates_args=())
def multi_sinkhorn_implicit_backward_op(
    grad: Tensor,
    scores: Tensor,
    f: Tensor,
    gam: Tensor,
    h: Tensor,
    row_counts: Tensor,
    col_counts: Tensor,
    weights: list[float],
    counts: Tensor,
    tops: Tensor,
    eps: float,
    normalize: str,
    backend: str,
) -> Tensor:
    """The adjoint of the converged fixed point; devices without a kernel of their own run the torch backend."""
    return _implicit(grad, scores, f, gam, h, row_counts, col_counts, weights, counts, tops, eps, normalize, "torch")


@multi_sinkhorn_implicit_backward_op.register_kernel(("cpu", "cuda"))
def _multi_sinkhorn_implicit_backward_kernel(
    grad, scores, f, gam, h, row_counts, col_counts, weights, counts, tops, eps, normalize, backend
):
    return _implicit(grad, scores, f, gam, h, row_counts, col_counts, weights, counts, tops, eps, normalize, backend)


@multi_sinkhorn_implicit_backward_op.register_fake
def _multi_sinkhorn_implicit_backward_fake(grad, scores, *_):
    return torch.empty_like(scores)


def _implicit(grad, scores, f, gam, h, row_counts, col_counts, weights, counts, tops, eps, normalize, backend):
    """The adjoint solve of the chosen backend, through the min-max step when there is one."""
    dtype = _working_dtype(scores, eps, weights)  # as the forward's
    out_dtype = scores.dtype
    grad, scores, f, gam, h, counts, tops = (x.to(dtype) for x in (grad, scores, f, gam, h, counts, tops))
    args = (grad.contiguous(), scores, f, gam, h, row_counts, col_counts, weights, counts, tops, eps, normalize)
    return _IMPLICIT(backend, *args).to(out_dtype)


def _minmax_vjp(grad, scores, f, gam, h, row_counts, col_counts, weights, tops, eps):
    """∂L/∂T_raw from ∂L/∂T: T_raw rebuilt from the potentials, then the VJP of the min-max step."""
    rows, cols = reference_ext.valid_masks(scores.shape, row_counts, col_counts)
    w = torch.tensor(weights, dtype=scores.dtype, device=scores.device)[None, :, None, None]
    top = tops.to(scores.dtype)[:, :, None, None]
    logits = (w * scores.unsqueeze(1) + f.unsqueeze(-2) + gam.unsqueeze(1) + h.unsqueeze(-1)) / eps
    valid = (rows & cols).unsqueeze(1) & (top > 0)
    raw = torch.where(valid, top * torch.exp(torch.where(valid, logits, 0.0)), 0.0).sum(1)
    _, vjp = torch.func.vjp(lambda t: reference_ext.masked_minmax_rows(t, cols), raw)
    return torch.where(rows & cols, vjp(torch.where(rows & cols, grad, 0.0))[0], 0.0)


def _setup_context(ctx, inputs, output):
    scores, row_counts, col_counts, weights, counts, tops, eps_start, eps, decay, n_iters, tol, normalize, log_domain, grad, backend = (
        inputs
    )
    target, f, gam, h, iters, err = output
    ctx.mark_non_differentiable(f, gam, h, iters, err)
    if grad == "implicit":
        ctx.save_for_backward(scores, f, gam, h, row_counts, col_counts, counts, tops)
    else:
        ctx.save_for_backward(scores, row_counts, col_counts, counts, tops, eps_start, iters)
    ctx.params = (weights, eps, decay, normalize, log_domain, grad, backend)


def _backward(ctx, grad_target, *_):
    weights, eps, decay, normalize, log_domain, grad, backend = ctx.params
    if grad == "implicit":
        scores, f, gam, h, row_counts, col_counts, counts, tops = ctx.saved_tensors
        grad_scores = multi_sinkhorn_implicit_backward_op(
            grad_target.contiguous(), scores, f, gam, h, row_counts, col_counts, weights, counts, tops, eps, normalize, backend
        )
    else:
        scores, row_counts, col_counts, counts, tops, eps_start, iters = ctx.saved_tensors
        grad_scores = multi_sinkhorn_ext_backward_op(
            grad_target.contiguous(),
            scores,
            row_counts,
            col_counts,
            weights,
            counts,
            tops,
            eps_start,
            eps,
            decay,
            iters,
            normalize,
            log_domain,
            backend,
        )
    return (grad_scores,) + (None,) * 14


multi_sinkhorn_ext_op.register_autograd(_backward, setup_context=_setup_context)
