"""``mmot.similarity``: batched (cosine) similarity with broadcast batch dims, its op and gradient."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmot import _checks, _dispatch, reference
from mmot._recompute import vjp

OP = "mmot.similarity"


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
        raise ValueError(
            f"{OP}: the batch dims of 'x' {tuple(x.shape[:-2])} and 'y' {tuple(y.shape[:-2])} must broadcast"
        ) from None
    if not isinstance(normalize, bool):
        raise TypeError(f"{OP}: argument 'normalize' must be a bool; got {type(normalize).__name__}")
    scale = _checks.real_number(OP, "scale", scale)
    backend = _dispatch.resolve_backend(OP, backend, x.device)
    return similarity_op(x, y, normalize, scale, backend)


def _output_shape(x: Tensor, y: Tensor) -> tuple[int, ...]:
    return tuple(torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])) + (x.shape[-2], y.shape[-2])


def _check_values(x: Tensor, y: Tensor, finite: bool = True) -> None:
    # The Rust kernel checks finiteness itself, in its row-norm pass (finite=False).
    if finite:
        _checks.finite(OP, "x", x)
        _checks.finite(OP, "y", y)


def _forward_torch(x, y, normalize, scale):
    return reference.similarity(x, y, normalize, scale)


def _forward_rust(x, y, normalize, scale):
    from mmot import _core

    shape = _output_shape(x, y)
    batch = shape[:-2]
    # Output problem b reads x[x_index[b]] and y[y_index[b]]: broadcasting without copies.
    x_index = torch.arange(math.prod(x.shape[:-2])).reshape(x.shape[:-2]).expand(batch).reshape(-1).contiguous()
    y_index = torch.arange(math.prod(y.shape[:-2])).reshape(y.shape[:-2]).expand(batch).reshape(-1).contiguous()
    dtype = reference.compute_dtype(x.dtype)
    out = _dispatch.new_output((x_index.numel(),) + shape[-2:], dtype)
    _dispatch.call_rust(
        OP,
        _core.similarity,
        _dispatch.kernel_array(x.reshape((-1,) + x.shape[-2:]), dtype),
        _dispatch.kernel_array(y.reshape((-1,) + y.shape[-2:]), dtype),
        x_index.numpy(),
        y_index.numpy(),
        out.numpy(),
        normalize,
        scale,
        _dispatch.num_threads(),
        _checks.value_checks_enabled(),
    )
    return out.view(shape).to(x.dtype)


def _forward_triton(x, y, normalize, scale):
    from mmot.kernels import similarity as kernel

    return kernel.forward(x, y, normalize, scale)


_FORWARD = {"torch": _forward_torch, "rust": _forward_rust, "triton": _forward_triton}


@torch.library.custom_op("mmot::similarity", mutates_args=())
def similarity_op(x: Tensor, y: Tensor, normalize: bool, scale: float, backend: str) -> Tensor:
    """Devices without a kernel of their own run the torch reference."""
    _check_values(x, y)
    return _forward_torch(x, y, normalize, scale)


@similarity_op.register_kernel(("cpu", "cuda"))
def _similarity_kernel(x, y, normalize, scale, backend):
    run = _forward_torch if x.numel() == 0 or y.numel() == 0 else _FORWARD[backend]
    _check_values(x, y, finite=run is not _forward_rust)
    return run(x, y, normalize, scale)


@similarity_op.register_fake
def _similarity_fake(x, y, normalize, scale, backend):
    return x.new_empty(_output_shape(x, y))


def _backward_replay(grad, x, y, normalize, scale):
    """Gradients for x and y (reduced over broadcast batch dims), replaying the reference."""

    def forward(xs: Tensor, ys: Tensor) -> Tensor:
        return reference.similarity(xs, ys, normalize, scale)

    return vjp(forward, [x, y], grad)


def _backward_rust(grad, x, y, normalize, scale):
    """Gradients for x and y (reduced over broadcast batch dims), by the Rust kernel."""
    from mmot import _core

    batch = grad.shape[:-2]
    x_index = torch.arange(math.prod(x.shape[:-2])).reshape(x.shape[:-2]).expand(batch).reshape(-1).contiguous()
    y_index = torch.arange(math.prod(y.shape[:-2])).reshape(y.shape[:-2]).expand(batch).reshape(-1).contiguous()
    dtype = reference.compute_dtype(x.dtype)
    x3 = x.reshape((-1,) + x.shape[-2:])
    y3 = y.reshape((-1,) + y.shape[-2:])
    grad_x = _dispatch.new_output(x3.shape, dtype)
    grad_y = _dispatch.new_output(y3.shape, dtype)
    _dispatch.call_rust(
        OP,
        _core.similarity_backward,
        _dispatch.kernel_array(grad.reshape((-1,) + grad.shape[-2:]), dtype),
        _dispatch.kernel_array(x3, dtype),
        _dispatch.kernel_array(y3, dtype),
        x_index.numpy(),
        y_index.numpy(),
        grad_x.numpy(),
        grad_y.numpy(),
        normalize,
        scale,
        _dispatch.num_threads(),
    )
    return [grad_x.view(x.shape).to(x.dtype), grad_y.view(y.shape).to(y.dtype)]


def _backward_triton(grad, x, y, normalize, scale):
    from mmot.kernels import similarity as kernel

    return list(kernel.backward(grad, x, y, normalize, scale))


_BACKWARD = {"torch": _backward_replay, "rust": _backward_rust, "triton": _backward_triton}


@torch.library.custom_op("mmot::similarity_backward", mutates_args=())
def similarity_backward_op(grad: Tensor, x: Tensor, y: Tensor, normalize: bool, scale: float, backend: str) -> list[Tensor]:
    return _backward_replay(grad, x, y, normalize, scale)


@similarity_backward_op.register_kernel(("cpu", "cuda"))
def _similarity_backward_kernel(grad, x, y, normalize, scale, backend):
    run = _backward_replay if x.numel() == 0 or y.numel() == 0 else _BACKWARD[backend]
    return run(grad, x, y, normalize, scale)


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
