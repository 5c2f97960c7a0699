"""``mmot.similarity``: batched (cosine) similarity with broadcast batch dims, its op and gradient."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmot import _backend, _checks, _rust, reference
from mmot.ops._kernels import Kernels, triton_entry
from mmot.reverse import similarity as reverse

OP = "mmot.similarity"
KERNELS = "similarity"  # mmot.kernels.similarity


def similarity(x: Tensor, y: Tensor, *, normalize: bool = True, scale: float = 1.0, backend: str = "auto") -> Tensor:
    r"""All-pairs similarity scale · x̂ ŷᵀ, batched with broadcasting.

    Math: out[..., n, m] = scale · ⟨x̂[..., n, :], ŷ[..., m, :]⟩ where x̂ = x / max(‖x‖₂, 1e-12)
    row-wise when ``normalize`` (cosine similarity), else x itself. The batch dims of x and y
    broadcast, so one call scores every modality against every anchor set. No normalised
    copy of x or y is written: the kernels scale the dot products by the inverse norms.

    Args:
        x: (..., N, D) float tensor.
        y: (..., M, D) float tensor of the same dtype and device.
        normalize: L2-normalise the rows first.
        scale: a multiplier, e.g. 1/temperature.
        backend: "auto", "rust", "triton" or "torch".

    Returns:
        (broadcast(...), N, M) in the dtype of x.

    Example:
        >>> import torch, mmot
        >>> feats = torch.randn(3, 1, 128, 256)       # 3 modalities, batch 128
        >>> anchors = torch.randn(1, 2, 64, 256)      # 2 anchor sets of 64
        >>> mmot.similarity(feats, anchors).shape     # every modality against every set
        torch.Size([3, 2, 128, 64])
    """
    x = _checks.float_tensor(OP, "x", x, min_dim=2, shape_hint="(..., N, D)")
    y = _checks.float_tensor(OP, "y", y, min_dim=2, shape_hint="(..., M, D)")
    if y.dtype != x.dtype:
        raise TypeError(f"{OP}: argument 'y' must have the dtype of 'x' ({x.dtype}); got {y.dtype}")
    _checks.same_device(OP, "y", y, x, "x")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"{OP}: arguments 'x' and 'y' must have the same feature size D; got {x.shape[-1]} and {y.shape[-1]}")
    try:
        torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    except RuntimeError:
        raise ValueError(f"{OP}: the batch dims of 'x' {tuple(x.shape[:-2])} and 'y' {tuple(y.shape[:-2])} must broadcast") from None
    if not isinstance(normalize, bool):
        raise TypeError(f"{OP}: argument 'normalize' must be a bool; got {type(normalize).__name__}")
    scale = _checks.real_number(OP, "scale", scale)
    compute = reference.compute_dtype(x.dtype)
    largest = torch.finfo(compute).max
    if not -largest <= scale <= largest:  # a comparison, so a SymFloat under torch.compile stays in the graph
        raise ValueError(f"{OP}: argument 'scale' must be within ±{largest:.4g} for {x.dtype} inputs (it overflows {compute}); got {scale}")
    backend = _backend.resolve_backend(OP, backend, x.device, KERNELS)
    return similarity_op(x, y, normalize, scale, backend)


def _output_shape(x: Tensor, y: Tensor) -> tuple[int, ...]:
    return tuple(torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])) + (x.shape[-2], y.shape[-2])


def _check(backend, x, y, normalize, scale):
    # The Rust kernel checks finiteness itself, in its row-norm pass.
    if backend != "rust":
        _checks.finite(OP, "x", x)
        _checks.finite(OP, "y", y)


def _problems(t: Tensor) -> Tensor:
    """(..., rows, D) as (problems, rows, D)."""
    return t.reshape((-1,) + t.shape[-2:])


def _problem_index(t: Tensor, batch: tuple[int, ...]) -> Tensor:
    """For each output problem, the problem of ``t`` it reads: broadcasting without copies."""
    return torch.arange(math.prod(t.shape[:-2])).reshape(t.shape[:-2]).expand(batch).reshape(-1).contiguous()


def _forward_rust(x, y, normalize, scale):
    shape = _output_shape(x, y)
    x_index, y_index = _problem_index(x, shape[:-2]), _problem_index(y, shape[:-2])
    (out,) = _rust.run(
        OP,
        "similarity",
        reference.compute_dtype(x.dtype),
        [_problems(x), _problems(y), x_index, y_index],
        [(x_index.numel(),) + shape[-2:]],
        [normalize, scale],
        checks=_checks.value_checks_enabled(),
    )
    return out.view(shape).to(x.dtype)


def _backward_rust(grad, x, y, normalize, scale):
    """Gradients for x and y (reduced over broadcast batch dims), by the Rust kernel."""
    batch = tuple(grad.shape[:-2])
    grad_x, grad_y = _rust.run(
        OP,
        "similarity_backward",
        reference.compute_dtype(x.dtype),
        [_problems(grad), _problems(x), _problems(y), _problem_index(x, batch), _problem_index(y, batch)],
        [_problems(x).shape, _problems(y).shape],
        [normalize, scale],
    )
    return [grad_x.view(x.shape).to(x.dtype), grad_y.view(y.shape).to(y.dtype)]


_FORWARD = Kernels(
    torch=reference.similarity,
    rust=_forward_rust,
    triton=triton_entry(KERNELS, "forward"),
    empty=lambda x, y, *_: x.numel() == 0 or y.numel() == 0,
    check=_check,
)
_BACKWARD = Kernels(
    torch=reverse.backward,
    rust=_backward_rust,
    triton=triton_entry(KERNELS, "backward"),
    empty=lambda grad, x, y, *_: x.numel() == 0 or y.numel() == 0,
)


@torch.library.custom_op("mmot::similarity", mutates_args=())
def similarity_op(x: Tensor, y: Tensor, normalize: bool, scale: float, backend: str) -> Tensor:
    """Devices without a kernel of their own run the torch backend."""
    return _FORWARD("torch", x, y, normalize, scale)


@similarity_op.register_kernel(("cpu", "cuda"))
def _similarity_kernel(x, y, normalize, scale, backend):
    return _FORWARD(backend, x, y, normalize, scale)


@similarity_op.register_fake
def _similarity_fake(x, y, normalize, scale, backend):
    return x.new_empty(_output_shape(x, y))


@torch.library.custom_op("mmot::similarity_backward", mutates_args=())
def similarity_backward_op(grad: Tensor, x: Tensor, y: Tensor, normalize: bool, scale: float, backend: str) -> list[Tensor]:
    """Gradients for x and y, reduced over broadcast batch dims; other devices run the torch backend."""
    return _BACKWARD("torch", grad, x, y, normalize, scale)


@similarity_backward_op.register_kernel(("cpu", "cuda"))
def _similarity_backward_kernel(grad, x, y, normalize, scale, backend):
    return _BACKWARD(backend, grad, x, y, normalize, scale)


@similarity_backward_op.register_fake
def _similarity_backward_fake(grad, x, y, normalize, scale, backend):
    return [torch.empty_like(x), torch.empty_like(y)]


def _setup_context(ctx, inputs, output):
    x, y, normalize, scale, backend = inputs
    ctx.save_for_backward(x, y)
    ctx.params = (normalize, scale, backend)


def _backward(ctx, grad):
    x, y = ctx.saved_tensors
    grad_x, grad_y = similarity_backward_op(grad.contiguous(), x, y, *ctx.params)
    return grad_x, grad_y, None, None, None


similarity_op.register_autograd(_backward, setup_context=_setup_context)
