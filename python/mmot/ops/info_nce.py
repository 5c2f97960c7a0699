"""``mmot.info_nce``: the fused NormSoftmax / InfoNCE loss, its op and its gradient.

The kernels never hold the N×N logits: the forward keeps an online log-sum-exp per row over
column tiles (once for a against b, once for b against a when symmetric), and the backward
recomputes the tiles from the saved log-sum-exps (the Inf-CL approach, arXiv 2410.17243).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot import _backend, _checks, _rust, reference
from mmot.ops._kernels import Kernels, triton_entry
from mmot.reverse import info_nce as reverse

OP = "mmot.info_nce"
KERNELS = "info_nce"  # mmot.kernels.info_nce
REDUCTIONS = ("mean", "sum", "none")


def info_nce(
    a: Tensor,
    b: Tensor,
    temperature: float = 0.05,
    *,
    symmetric: bool = True,
    normalize: bool = True,
    reduction: str = "mean",
    valid: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    r"""NormSoftmax (InfoNCE) loss of N paired embeddings, without materialising the N×N logits.

    Math: with â, b̂ the L2-normalised rows (when ``normalize``; rows are divided by
    max(‖row‖, 1e-12)) and s = â b̂ᵀ / ``temperature``, pair i's loss is the cross-entropy of
    row i of s against its diagonal, plus that of column i when ``symmetric`` (the two
    directions summed, as in everything_at_once and SSPC):

        loss_i = (logsumexp_j s[i, j] − s[i, i]) + (logsumexp_j s[j, i] − s[i, i])

    **Missing pairs.** ``valid`` is an (N,) bool mask of the pairs that exist (e.g. clips that
    have both modalities). Invalid pairs are dropped entirely, as if their rows were absent
    from a and b: they are neither anchors nor negatives, their loss is 0 and their rows get
    zero gradient. ``info_nce(a, b, valid=v)`` equals ``info_nce(a[v], b[v])``, but needs no
    data-dependent indexing, so it traces under ``torch.compile(fullgraph=True)``.

    **Reductions.** ``"none"`` returns the (N,) per-pair losses (0 where invalid), ``"sum"``
    their sum and ``"mean"`` their sum divided by the number of valid pairs, i.e. the mean
    over valid pairs of each direction's cross-entropy, the directions summed. With no
    valid pair at all the loss is 0 (not NaN).

    Memory: O(N·D) beyond the inputs (O(N) for the Rust kernel, which never writes normalised
    copies). Time: about twice a materialised forward, since each direction recomputes the
    similarities; the backward recomputes them twice more.

    Args:
        a: (N, D) float tensor, e.g. video embeddings.
        b: (N, D) float tensor of the same dtype and device, e.g. text embeddings; a[i] and
            b[i] are a positive pair.
        temperature: τ > 0. everything_at_once and SSPC use 0.05. It must be at least
            1/finfo(compute dtype).max (2.9e-39 for float32, float16 and bfloat16 inputs), so
            that 1/τ is finite. Logits are cosines/τ; past |s| ≈ 2^24 (τ below ~6e-8 in float32)
            the dtype resolves them only to about |s|·2^-24, so the loss is accurate to that
            absolutely and the gradient's softmax weights e^{s − lse} are decided by rounding:
            pass float64 inputs there. A loss or gradient whose exact value is past the dtype's
            largest value is inf (e.g. near the limit with rows shorter than 1).
        symmetric: add the b→a direction to the a→b direction.
        normalize: L2-normalise the rows first (cosine similarities).
        reduction: "mean", "sum" or "none".
        valid: optional (N,) bool tensor of the pairs that take part.
        backend: "auto", "rust", "triton" or "torch".

    Returns:
        A 0-dim tensor ("mean", "sum") or an (N,) tensor ("none") in the dtype of ``a``.
        Gradients flow to ``a`` and ``b``.

    Example:
        >>> import torch, mmot
        >>> video, text = torch.randn(4096, 256), torch.randn(4096, 256)
        >>> loss = mmot.info_nce(video, text, 0.05)            # never builds the 4096² logits
        >>> has_text = torch.rand(4096) > 0.1
        >>> loss = mmot.info_nce(video, text, 0.05, valid=has_text)
    """
    a = _checks.float_tensor(OP, "a", a, min_dim=2, shape_hint="(N, D)")
    b = _checks.float_tensor(OP, "b", b, min_dim=2, shape_hint="(N, D)")
    if a.dim() != 2:
        raise ValueError(f"{OP}: argument 'a' must have shape (N, D); got shape {tuple(a.shape)}")
    if b.dim() != 2:
        raise ValueError(f"{OP}: argument 'b' must have shape (N, D); got shape {tuple(b.shape)}")
    if b.dtype != a.dtype:
        raise TypeError(f"{OP}: argument 'b' must have the dtype of 'a' ({a.dtype}); got {b.dtype}")
    _checks.same_device(OP, "b", b, a, "a")
    if b.shape != a.shape:
        raise ValueError(f"{OP}: argument 'b' must have the shape of 'a' {tuple(a.shape)} (one positive per row); got {tuple(b.shape)}")
    temperature = _checks.reciprocal_fits(OP, "temperature", _checks.positive_float(OP, "temperature", temperature), a.dtype)
    for name, flag in (("symmetric", symmetric), ("normalize", normalize)):
        if not isinstance(flag, bool):
            raise TypeError(f"{OP}: argument '{name}' must be a bool; got {type(flag).__name__}")
    reduction = _checks.choice(OP, "reduction", reduction, REDUCTIONS)
    weights = _valid_weights(valid, a)
    backend = _backend.resolve_backend(OP, backend, a.device, KERNELS)

    loss, _, _ = info_nce_op(a, b, weights, temperature, symmetric, normalize, backend)
    if reduction == "none":
        return loss
    # Accumulated in float32 (float64 for float64) and cast back: an fp16 sum of ~2048 losses of
    # ~log N each passes 65504 although the mean does not.
    dtype = reference.compute_dtype(a.dtype)
    if reduction == "sum":
        return loss.sum(dtype=dtype).to(a.dtype)
    # The mean sums loss/count: the losses are ≥ 0, so no partial sum passes the mean, which
    # fits wherever the largest loss does (a float32 sum of losses near 1.8e38 would not).
    return (loss.to(dtype) / weights.sum().clamp_min(1.0).to(dtype)).sum().to(a.dtype)


def _valid_weights(valid, a: Tensor) -> Tensor:
    """The (N,) 0/1 weights of the pairs, in the kernels' accumulation dtype."""
    dtype = reference.compute_dtype(a.dtype)
    n = a.shape[0]
    if valid is None:
        return a.new_ones((n,), dtype=dtype)
    if not isinstance(valid, Tensor):
        raise TypeError(f"{OP}: argument 'valid' must be None or a bool tensor of shape ({n},); got {type(valid).__name__}")
    if valid.dtype != torch.bool:
        raise TypeError(f"{OP}: argument 'valid' must be a bool tensor of shape ({n},); got dtype {valid.dtype}")
    if tuple(valid.shape) != (n,):
        raise ValueError(f"{OP}: argument 'valid' must have shape ({n},) (one flag per pair); got {tuple(valid.shape)}")
    _checks.same_device(OP, "valid", valid, a, "a")
    return valid.to(dtype)


def _check(backend, a, b, weights, temperature, symmetric, normalize):
    # The Rust kernel checks finiteness itself, in its row-norm pass.
    if backend != "rust":
        _checks.finite(OP, "a", a)
        _checks.finite(OP, "b", b)


def _lse_torch(a, b, weights, temperature, normalize):
    """Row log-sum-exps of the masked logits (−inf for a row with no valid column)."""
    dtype = reference.compute_dtype(a.dtype)
    x, y = a.to(dtype), b.to(dtype)
    if normalize:
        x, y = reference.unit_rows(x), reference.unit_rows(y)
    logits = (x @ y.T) / temperature
    return torch.logsumexp(logits.masked_fill(weights[None, :] == 0, float("-inf")), dim=1)


def _forward_torch(a, b, weights, temperature, symmetric, normalize):
    loss = reference.info_nce(a, b, weights != 0, temperature, symmetric, normalize)
    lse_a = _lse_torch(a, b, weights, temperature, normalize)
    lse_b = _lse_torch(b, a, weights, temperature, normalize) if symmetric else torch.zeros_like(lse_a)
    return loss, lse_a, lse_b


def _forward_rust(a, b, weights, temperature, symmetric, normalize):
    n = a.shape[0]
    loss, lse_a, lse_b = _rust.run(
        OP,
        "info_nce_forward",
        reference.compute_dtype(a.dtype),
        [a, b, weights],
        [(n,), (n,), (n,)],
        [temperature, symmetric, normalize],
        checks=_checks.value_checks_enabled(),
    )
    return loss.to(a.dtype), lse_a, lse_b


def _backward_rust(grad, a, b, weights, lse_a, lse_b, temperature, symmetric, normalize):
    grad_a, grad_b = _rust.run(
        OP,
        "info_nce_backward",
        reference.compute_dtype(a.dtype),
        [grad, a, b, weights, lse_a, lse_b],
        [a.shape, b.shape],
        [temperature, symmetric, normalize],
    )
    return [grad_a.to(a.dtype), grad_b.to(b.dtype)]


FORWARD = Kernels(
    torch=_forward_torch,
    rust=_forward_rust,
    triton=triton_entry(KERNELS, "forward"),
    empty=lambda a, *_: a.numel() == 0,
    check=_check,
)
BACKWARD = Kernels(
    torch=reverse.backward,
    rust=_backward_rust,
    triton=triton_entry(KERNELS, "backward"),
    empty=lambda grad, a, *_: a.numel() == 0,
)


@torch.library.custom_op("mmot::info_nce", mutates_args=())
def info_nce_op(
    a: Tensor, b: Tensor, weights: Tensor, temperature: float, symmetric: bool, normalize: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses (N,) and the row/column log-sum-exps; devices without a kernel run the reference."""
    return FORWARD("torch", a, b, weights, temperature, symmetric, normalize)


@info_nce_op.register_kernel(("cpu", "cuda"))
def _info_nce_kernel(a, b, weights, temperature, symmetric, normalize, backend):
    return FORWARD(backend, a, b, weights, temperature, symmetric, normalize)


@info_nce_op.register_fake
def _info_nce_fake(a, b, weights, temperature, symmetric, normalize, backend):
    n = a.shape[0]
    dtype = reference.compute_dtype(a.dtype)
    return a.new_empty((n,)), a.new_empty((n,), dtype=dtype), a.new_empty((n,), dtype=dtype)


@torch.library.custom_op("mmot::info_nce_backward", mutates_args=())
def info_nce_backward_op(
    grad: Tensor,
    a: Tensor,
    b: Tensor,
    weights: Tensor,
    lse_a: Tensor,
    lse_b: Tensor,
    temperature: float,
    symmetric: bool,
    normalize: bool,
    backend: str,
) -> list[Tensor]:
    """Gradients for a and b from the saved log-sum-exps; other devices run the torch backend."""
    return BACKWARD("torch", grad, a, b, weights, lse_a, lse_b, temperature, symmetric, normalize)


@info_nce_backward_op.register_kernel(("cpu", "cuda"))
def _info_nce_backward_kernel(grad, a, b, weights, lse_a, lse_b, temperature, symmetric, normalize, backend):
    return BACKWARD(backend, grad, a, b, weights, lse_a, lse_b, temperature, symmetric, normalize)


@info_nce_backward_op.register_fake
def _info_nce_backward_fake(grad, a, b, weights, lse_a, lse_b, temperature, symmetric, normalize, backend):
    return [torch.empty_like(a), torch.empty_like(b)]


def _setup_context(ctx, inputs, output):
    a, b, weights, temperature, symmetric, normalize, backend = inputs
    _, lse_a, lse_b = output
    ctx.save_for_backward(a, b, weights, lse_a, lse_b)
    ctx.params = (temperature, symmetric, normalize, backend)


def _backward(ctx, grad, _grad_lse_a, _grad_lse_b):
    a, b, weights, lse_a, lse_b = ctx.saved_tensors
    if grad is None:
        return None, None, None, None, None, None, None
    grad_a, grad_b = info_nce_backward_op(grad.contiguous(), a, b, weights, lse_a, lse_b, *ctx.params)
    return grad_a, grad_b, None, None, None, None, None


info_nce_op.register_autograd(_backward, setup_context=_setup_context)
