"""``mmot.feature_separation_loss``: orthogonality of shared and modality-specific features, its op and gradient.

The kernels never form anything N×N: the loss is the squared Frobenius norm of the D_s×D_h
Gram ŜᵀĤ, built in one pass over the rows; the forward returns that Gram, so the backward is
two row-by-Gram products without a second pass over the rows for it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot import _backend, _checks, _rust, reference
from mmot.ops._kernels import Kernels, triton_entry
from mmot.reverse import feature_separation as reverse

OP = "mmot.feature_separation_loss"
KERNELS = "feature_separation"  # mmot.kernels.feature_separation


def feature_separation_loss(shared: Tensor, specific: Tensor, *, normalize: bool = True, backend: str = "auto") -> Tensor:
    r"""Feature-separation (orthogonality) loss of shared and modality-specific features, through a D_s×D_h Gram.

    Math: with Ŝ the rows of ``shared`` (N, D_s) and Ĥ those of ``specific`` (N, D_h), each
    L2-normalised when ``normalize`` (rows are divided by max(‖row‖, 1e-12)),

        L = ‖Ŝᵀ Ĥ‖²_F / N² = (1/N²) Σ_ab (Σ_i ŝ_ia ĥ_ib)²  = mean_ij (ŝ_i·ŝ_j)(ĥ_i·ĥ_j).

    It is 0 when every shared feature direction is uncorrelated with every specific one over the
    batch, so minimising it pushes the modality-specific features to carry what the shared
    (joint) embedding does not. D_s and D_h may differ.

    **Which form.** This is the "difference loss" of domain-separation networks (Bousmalis et
    al., "Domain Separation Networks", NeurIPS 2016), ‖S_cᵀ H_p‖²_F, used as the "deep feature
    separation" loss by Jiang et al., "Understanding and Constructing Latent Modality Structures
    in Multi-modal Representation Learning" (CVPR 2023, arXiv 2303.05952). No official code
    exists; this is our reconstruction: rows L2-normalised (optional) and the sum divided by N²,
    so the loss does not grow with the batch size and lies in [0, 1] for unit rows.

    **Numerics.** Accumulation is float32 (float64 for float64 inputs; float16 and bfloat16 are
    read into float32); the result has shared's dtype. Each Gram entry is divided by N before it
    is squared. Normalisation is scale-safe (rows near the dtype's largest or smallest values
    are normalised exactly). The Rust and Triton kernels sum in an order fixed by the shapes:
    results do not depend on the thread count or the launch.

    Memory: O(D_s·D_h) beyond the inputs and gradients (the Gram, and on CPU up to 32 partial
    Grams). Time: O(N·D_s·D_h) for the forward and twice that for the backward. N = 0 gives 0
    (and zero gradients).

    Args:
        shared: (N, D_s) float tensor, the shared (joint) embedding of N samples.
        specific: (N, D_h) float tensor of the same dtype and device, their modality-specific
            features (e.g. from :class:`mmot.nn.FeatureSeparation`); row i of both is sample i.
        normalize: L2-normalise the rows of both first.
        backend: "auto", "rust", "triton" or "torch".

    Returns:
        A 0-dim tensor in the dtype of ``shared``. Gradients flow to ``shared`` and ``specific``.

    Example:
        >>> import torch, mmot
        >>> shared = torch.randn(4096, 256)             # the joint embedding of one modality
        >>> specific = torch.randn(4096, 64)            # its modality-specific features
        >>> loss = mmot.feature_separation_loss(shared, specific)
    """
    shared = _rows(shared, "shared", "(N, D_s)")
    specific = _rows(specific, "specific", "(N, D_h)")
    if specific.dtype != shared.dtype:
        raise TypeError(f"{OP}: argument 'specific' must have the dtype of 'shared' ({shared.dtype}); got {specific.dtype}")
    _checks.same_device(OP, "specific", specific, shared, "shared")
    if specific.shape[0] != shared.shape[0]:
        raise ValueError(
            f"{OP}: argument 'specific' must have the rows of 'shared' ({shared.shape[0]}, a row per sample); "
            f"got shape {tuple(specific.shape)}"
        )
    if not isinstance(normalize, bool):
        raise TypeError(f"{OP}: argument 'normalize' must be a bool; got {type(normalize).__name__}")
    backend = _backend.resolve_backend(OP, backend, shared.device, KERNELS)
    loss, _ = feature_separation_op(shared, specific, normalize, backend)
    return loss


def _rows(x: object, name: str, hint: str) -> Tensor:
    x = _checks.float_tensor(OP, name, x, min_dim=2, shape_hint=hint)
    if x.dim() != 2:
        raise ValueError(f"{OP}: argument '{name}' must have shape {hint}; got shape {tuple(x.shape)}")
    return x


def _check(backend, shared, specific, normalize):
    """The rows' finiteness, where the Rust kernel does not check it itself (in its row-norm pass)."""
    if backend != "rust":
        _checks.finite(OP, "shared", shared)
        _checks.finite(OP, "specific", specific)


def _forward_torch(shared, specific, normalize):
    dtype = reference.compute_dtype(shared.dtype)
    x, y = shared.to(dtype), specific.to(dtype)
    if normalize:
        x, y = reference.unit_rows(x), reference.unit_rows(y)
    gram = x.T @ y
    return (gram / max(shared.shape[0], 1)).square().sum().to(shared.dtype), gram


def _forward_rust(shared, specific, normalize):
    dtype = reference.compute_dtype(shared.dtype)
    loss, gram = _rust.run(
        OP,
        "feature_separation_forward",
        dtype,
        [shared, specific],
        [(1,), (shared.shape[1], specific.shape[1])],
        [normalize],
        checks=_checks.value_checks_enabled(),
    )
    return loss.reshape(()).to(shared.dtype), gram


def _backward_rust(grad, shared, specific, gram, normalize):
    grad_s, grad_h = _rust.run(
        OP,
        "feature_separation_backward",
        reference.compute_dtype(shared.dtype),
        [grad.reshape(1), shared, specific, gram],
        [shared.shape, specific.shape],
        [normalize],
    )
    return [grad_s.to(shared.dtype), grad_h.to(specific.dtype)]


def _empty(shared, specific, *_):
    # No rows or no features: a loss of 0 (the torch backend's empty Gram or zero rows).
    return shared.numel() == 0 or specific.numel() == 0


_FORWARD = Kernels(
    torch=_forward_torch,
    rust=_forward_rust,
    triton=triton_entry(KERNELS, "forward"),
    empty=_empty,
    check=_check,
)
_BACKWARD = Kernels(
    torch=reverse.backward,
    rust=_backward_rust,
    triton=triton_entry(KERNELS, "backward"),
    empty=lambda grad, shared, specific, *_: _empty(shared, specific),
)


@torch.library.custom_op("mmot::feature_separation_loss", mutates_args=())
def feature_separation_op(shared: Tensor, specific: Tensor, normalize: bool, backend: str) -> tuple[Tensor, Tensor]:
    """The loss (0-dim) and the Gram ŜᵀĤ (D_s, D_h); devices without a kernel run the torch backend."""
    return _FORWARD("torch", shared, specific, normalize)


@feature_separation_op.register_kernel(("cpu", "cuda"))
def _feature_separation_kernel(shared, specific, normalize, backend):
    return _FORWARD(backend, shared, specific, normalize)


@feature_separation_op.register_fake
def _feature_separation_fake(shared, specific, normalize, backend):
    gram = shared.new_empty((shared.shape[1], specific.shape[1]), dtype=reference.compute_dtype(shared.dtype))
    return shared.new_empty(()), gram


@torch.library.custom_op("mmot::feature_separation_loss_backward", mutates_args=())
def feature_separation_backward_op(
    grad: Tensor, shared: Tensor, specific: Tensor, gram: Tensor, normalize: bool, backend: str
) -> list[Tensor]:
    """Gradients for shared and specific from the saved Gram; other devices run the torch backend."""
    return _BACKWARD("torch", grad, shared, specific, gram, normalize)


@feature_separation_backward_op.register_kernel(("cpu", "cuda"))
def _feature_separation_backward_kernel(grad, shared, specific, gram, normalize, backend):
    return _BACKWARD(backend, grad, shared, specific, gram, normalize)


@feature_separation_backward_op.register_fake
def _feature_separation_backward_fake(grad, shared, specific, gram, normalize, backend):
    return [torch.empty_like(shared), torch.empty_like(specific)]


def _setup_context(ctx, inputs, output):
    shared, specific, normalize, backend = inputs
    _, gram = output
    ctx.save_for_backward(shared, specific, gram)
    ctx.params = (normalize, backend)


def _backward(ctx, grad, _grad_gram):
    shared, specific, gram = ctx.saved_tensors
    if grad is None:
        return None, None, None, None
    grad_s, grad_h = feature_separation_backward_op(grad.contiguous(), shared, specific, gram, *ctx.params)
    return grad_s, grad_h, None, None


feature_separation_op.register_autograd(_backward, setup_context=_setup_context)
