"""``mmot.nt_xent``: SimCLR's 2N-way NT-Xent (CoMM's NCE), fused, its op and its gradient.

The kernels are InfoNCE's (:mod:`mmot.ops.info_nce`) on z = [x; y] against itself, with each
row's own column left out exactly (never a large negative constant) and its positive N rows
away: an online log-sum-exp per row over column tiles, the tiles recomputed in the backward, no
2N×2N tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot import _backend, _checks, _rust, reference
from mmot.ops._kernels import Kernels, triton_entry
from mmot.reverse import nt_xent as reverse

OP = "mmot.nt_xent"
KERNELS = "nt_xent"  # mmot.kernels.nt_xent
REDUCTIONS = ("mean", "sum", "none")


def nt_xent(
    x: Tensor,
    y: Tensor,
    temperature: float = 0.1,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    r"""SimCLR's NT-Xent of N positive pairs (x[i], y[i]): the 2N-way loss CoMM calls NCE.

    Math: with z = [x; y] (2N rows), ẑ its L2-normalised rows (when ``normalize``) and
    s = ẑẑᵀ / ``temperature``, the loss of row r is

        loss_r = logsumexp_{c ≠ r} s[r, c] − s[r, r ± N]

    i.e. the logits [[x·yᵀ, x·xᵀ], [y·yᵀ, y·xᵀ]] / τ with the self-similarities removed and each
    row's partner as its target ("What to align in multimodal contrastive learning?", ICLR 2025,
    and SimCLR). The self-column is left out of the softmax exactly. With N = 1 the partner is
    the only logit and the loss is 0.

    **Reductions.** ``"mean"`` over the 2N rows (CoMM's and SimCLR's), ``"sum"``, or ``"none"``:
    the (2N,) per-row losses, x's rows first.

    Memory: O(N·D) (the normalised copy) plus O(N); no 2N×2N logits. Time: one pass of
    (2N)²·D products in the forward, two more in the backward.

    Args:
        x: (N, D) float tensor, one view (or modality) of N samples.
        y: (N, D) float tensor of the same dtype and device; y[i] is x[i]'s positive.
        temperature: τ > 0; CoMM and SimCLR use 0.1. 1/τ must fit the accumulation dtype.
        normalize: L2-normalise the rows first (cosine similarities).
        reduction: "mean", "sum" or "none".
        backend: "auto", "rust", "triton" or "torch".

    Returns:
        A 0-dim tensor ("mean", "sum") or a (2N,) tensor ("none") in x's dtype.

    Example:
        >>> import torch, mmot
        >>> view1, view2 = torch.randn(4096, 256), torch.randn(4096, 256)
        >>> loss = mmot.nt_xent(view1, view2, 0.1)          # never builds the 8192² logits
    """
    x = _checks.float_tensor(OP, "x", x, min_dim=2, shape_hint="(N, D)")
    y = _checks.float_tensor(OP, "y", y, min_dim=2, shape_hint="(N, D)")
    if x.dim() != 2:
        raise ValueError(f"{OP}: argument 'x' must have shape (N, D); got shape {tuple(x.shape)}")
    if y.dtype != x.dtype:
        raise TypeError(f"{OP}: argument 'y' must have the dtype of 'x' ({x.dtype}); got {y.dtype}")
    _checks.same_device(OP, "y", y, x, "x")
    if y.shape != x.shape:
        raise ValueError(f"{OP}: argument 'y' must have the shape of 'x' {tuple(x.shape)} (one positive per row); got {tuple(y.shape)}")
    temperature = _checks.reciprocal_fits(OP, "temperature", _checks.positive_float(OP, "temperature", temperature), x.dtype)
    if not isinstance(normalize, bool):
        raise TypeError(f"{OP}: argument 'normalize' must be a bool; got {type(normalize).__name__}")
    reduction = _checks.choice(OP, "reduction", reduction, REDUCTIONS)
    backend = _backend.resolve_backend(OP, backend, x.device, KERNELS)

    loss, _ = nt_xent_op(torch.cat([x, y]), temperature, normalize, backend)
    if reduction == "none":
        return loss
    dtype = reference.compute_dtype(x.dtype)
    if reduction == "sum":
        return loss.sum(dtype=dtype).to(x.dtype)
    return (loss.to(dtype) / max(loss.shape[0], 1)).sum().to(x.dtype)


def _check(backend, z, temperature, normalize):
    # The Rust kernel checks finiteness itself, in its row-norm pass.
    if backend != "rust":
        _checks.finite(OP, "x and y", z)


def _forward_torch(z, temperature, normalize):
    """The reference's per-row losses and log-sum-exps, from one 2N×2N logit matrix."""
    dtype = reference.compute_dtype(z.dtype)
    x = reference.unit_rows(z.to(dtype)) if normalize else z.to(dtype)
    logits = (x @ x.T) / temperature
    rows = torch.arange(z.shape[0], device=z.device)
    lse = torch.logsumexp(logits.masked_fill(rows[:, None] == rows[None, :], float("-inf")), dim=1)
    loss = lse - logits[rows, (rows + z.shape[0] // 2) % z.shape[0]]
    return loss.to(z.dtype), lse


def _forward_rust(z, temperature, normalize):
    n = z.shape[0]
    loss, lse = _rust.run(
        OP,
        "nt_xent_forward",
        reference.compute_dtype(z.dtype),
        [z],
        [(n,), (n,)],
        [temperature, normalize],
        checks=_checks.value_checks_enabled(),
    )
    return loss.to(z.dtype), lse


def _backward_rust(grad, z, lse, temperature, normalize):
    (grad_z,) = _rust.run(OP, "nt_xent_backward", reference.compute_dtype(z.dtype), [grad, z, lse], [z.shape], [temperature, normalize])
    return grad_z.to(z.dtype)


_FORWARD = Kernels(
    torch=_forward_torch,
    rust=_forward_rust,
    triton=triton_entry(KERNELS, "forward"),
    empty=lambda z, *_: z.numel() == 0,
    check=_check,
)
_BACKWARD = Kernels(
    torch=reverse.backward,
    rust=_backward_rust,
    triton=triton_entry(KERNELS, "backward"),
    empty=lambda grad, z, *_: z.numel() == 0,
)


@torch.library.custom_op("mmot::nt_xent", mutates_args=())
def nt_xent_op(z: Tensor, temperature: float, normalize: bool, backend: str) -> tuple[Tensor, Tensor]:
    """Per-row losses (2N,) of z = [x; y] and their log-sum-exps; devices without a kernel run the reference."""
    return _FORWARD("torch", z, temperature, normalize)


@nt_xent_op.register_kernel(("cpu", "cuda"))
def _nt_xent_kernel(z, temperature, normalize, backend):
    return _FORWARD(backend, z, temperature, normalize)


@nt_xent_op.register_fake
def _nt_xent_fake(z, temperature, normalize, backend):
    n = z.shape[0]
    return z.new_empty((n,)), z.new_empty((n,), dtype=reference.compute_dtype(z.dtype))


@torch.library.custom_op("mmot::nt_xent_backward", mutates_args=())
def nt_xent_backward_op(grad: Tensor, z: Tensor, lse: Tensor, temperature: float, normalize: bool, backend: str) -> Tensor:
    """The gradient for z from the saved log-sum-exps; other devices run the torch backend."""
    return _BACKWARD("torch", grad, z, lse, temperature, normalize)


@nt_xent_backward_op.register_kernel(("cpu", "cuda"))
def _nt_xent_backward_kernel(grad, z, lse, temperature, normalize, backend):
    return _BACKWARD(backend, grad, z, lse, temperature, normalize)


@nt_xent_backward_op.register_fake
def _nt_xent_backward_fake(grad, z, lse, temperature, normalize, backend):
    return torch.empty_like(z)


def _setup_context(ctx, inputs, output):
    z, temperature, normalize, backend = inputs
    ctx.save_for_backward(z, output[1])
    ctx.params = (temperature, normalize, backend)


def _backward(ctx, grad, _grad_lse):
    z, lse = ctx.saved_tensors
    if grad is None:
        return None, None, None, None
    return nt_xent_backward_op(grad.contiguous(), z, lse, *ctx.params), None, None, None


nt_xent_op.register_autograd(_backward, setup_context=_setup_context)
