"""``mmot.anchor_consistency_loss``: SSPC's anchor term, its op and its gradient.

Not fused with the similarity, deliberately: in SSPC the (B, K) sample–anchor similarities
are needed anyway, both as the Multi-SK input that produces the targets and as this loss's
logits, and at K = 64 they are small (B·K values against B·D features). A fused
features+anchors op would recompute them and save only that (B, K) buffer, so it does not
pay; the op is a single elementwise pass plus one reduction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot import _backend, _checks, _rust, reference
from mmot.ops._kernels import Kernels, triton_entry
from mmot.reverse import anchor_consistency as reverse

OP = "mmot.anchor_consistency_loss"
KERNELS = "anchor_consistency"  # mmot.kernels.anchor_consistency


def anchor_consistency_loss(sim: Tensor, target: Tensor, temperature: float = 0.1, *, backend: str = "auto") -> Tensor:
    r"""SSPC's anchor-consistency loss: mean BCE-with-logits of exp(sim/τ) against soft targets.

    Math: with z = exp(sim / temperature), the loss is the mean over every entry of
    softplus(z) − target·z, i.e. ``F.binary_cross_entropy_with_logits(z, target)``. Since z > 0,
    the loss pushes sim up where target is near 1 and down where it is near 0. ``target``
    (Multi-SK targets in [0, 1], computed under ``no_grad``) carries no gradient.

    Args:
        sim: (..., B, K) float tensor of sample–anchor similarities (cosines for SSPC).
        target: tensor of the same shape, floating, on the same device; detached.
        temperature: τ > 0. SSPC uses 0.1.
        backend: "auto", "rust", "triton" or "torch". On CUDA, "auto" runs the Triton kernel
            (one elementwise pass with per-program partial sums; softplus form, stable for
            large exp(sim/τ)).

    Returns:
        A 0-dim tensor in the dtype of ``sim``; 0 for empty input.

    Example:
        >>> import torch, mmot
        >>> feats = torch.randn(256, 128, requires_grad=True)
        >>> anchors = torch.nn.Parameter(torch.randn(64, 128))
        >>> sim = mmot.similarity(feats, anchors)                  # (256, 64) cosines
        >>> with torch.no_grad():
        ...     target = mmot.multi_sinkhorn(sim, k=32)
        >>> mmot.anchor_consistency_loss(sim, target).backward()
    """
    sim = _checks.float_tensor(OP, "sim", sim, min_dim=1, shape_hint="(..., B, K)")
    if not isinstance(target, Tensor):
        raise TypeError(f"{OP}: argument 'target' must be a torch.Tensor of shape {tuple(sim.shape)}; got {type(target).__name__}")
    target = _checks.float_tensor(OP, "target", target, min_dim=0, shape_hint="the shape of 'sim'")
    _checks.same_device(OP, "target", target, sim, "sim")
    if target.shape != sim.shape:
        raise ValueError(f"{OP}: argument 'target' must have the shape of 'sim' {tuple(sim.shape)}; got {tuple(target.shape)}")
    temperature = _checks.reciprocal_fits(OP, "temperature", _checks.positive_float(OP, "temperature", temperature), sim.dtype)
    backend = _backend.resolve_backend(OP, backend, sim.device, KERNELS)
    return anchor_consistency_op(sim, target.detach().to(sim.dtype), temperature, backend)


def _check(backend, sim, target, temperature):
    # The Rust kernel checks finiteness itself, in the pass that computes the loss.
    if backend != "rust":
        _checks.finite(OP, "sim", sim)
        _checks.finite(OP, "target", target)


def _forward_torch(sim, target, temperature):
    if sim.numel() == 0:
        return sim.new_zeros(())
    return reference.anchor_consistency_loss(sim, target, temperature)


def _forward_rust(sim, target, temperature):
    value = _rust.run(
        OP,
        "anchor_consistency_forward",
        reference.compute_dtype(sim.dtype),
        [sim.reshape(-1), target.reshape(-1)],
        [],
        [temperature],
        checks=_checks.value_checks_enabled(),
    )
    return torch.tensor(value, dtype=sim.dtype)


def _backward_rust(grad, sim, target, temperature):
    (out,) = _rust.run(
        OP,
        "anchor_consistency_backward",
        reference.compute_dtype(sim.dtype),
        [float(grad), sim.reshape(-1), target.reshape(-1)],
        [(sim.numel(),)],
        [temperature],
    )
    return out.view(sim.shape).to(sim.dtype)


_FORWARD = Kernels(
    torch=_forward_torch,
    rust=_forward_rust,
    triton=triton_entry(KERNELS, "forward"),
    empty=lambda sim, *_: sim.numel() == 0,
    check=_check,
)
_BACKWARD = Kernels(
    torch=reverse.backward,
    rust=_backward_rust,
    triton=triton_entry(KERNELS, "backward"),
    empty=lambda grad, sim, *_: sim.numel() == 0,
)


@torch.library.custom_op("mmot::anchor_consistency_loss", mutates_args=())
def anchor_consistency_op(sim: Tensor, target: Tensor, temperature: float, backend: str) -> Tensor:
    """Devices without a kernel of their own run the torch backend."""
    return _FORWARD("torch", sim, target, temperature)


@anchor_consistency_op.register_kernel(("cpu", "cuda"))
def _anchor_consistency_kernel(sim, target, temperature, backend):
    return _FORWARD(backend, sim, target, temperature)


@anchor_consistency_op.register_fake
def _anchor_consistency_fake(sim, target, temperature, backend):
    return sim.new_empty(())


@torch.library.custom_op("mmot::anchor_consistency_loss_backward", mutates_args=())
def anchor_consistency_backward_op(grad: Tensor, sim: Tensor, target: Tensor, temperature: float, backend: str) -> Tensor:
    """The gradient for sim; devices without a kernel of their own run the torch backend."""
    return _BACKWARD("torch", grad, sim, target, temperature)


@anchor_consistency_backward_op.register_kernel(("cpu", "cuda"))
def _anchor_consistency_backward_kernel(grad, sim, target, temperature, backend):
    return _BACKWARD(backend, grad, sim, target, temperature)


@anchor_consistency_backward_op.register_fake
def _anchor_consistency_backward_fake(grad, sim, target, temperature, backend):
    return torch.empty_like(sim)


def _setup_context(ctx, inputs, output):
    sim, target, temperature, backend = inputs
    ctx.save_for_backward(sim, target)
    ctx.params = (temperature, backend)


def _backward(ctx, grad):
    sim, target = ctx.saved_tensors
    grad_sim = anchor_consistency_backward_op(grad.contiguous(), sim, target, *ctx.params)
    return grad_sim, None, None, None


anchor_consistency_op.register_autograd(_backward, setup_context=_setup_context)
