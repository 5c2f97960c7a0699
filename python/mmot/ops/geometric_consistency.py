"""``mmot.geometric_consistency``: cross-modal symmetry and intra-modal agreement of paired embeddings, its op and gradient.

The kernels never form the N×N similarity matrices: both terms are exact functions of three D×D
Grams of the unit rows and their differences (:mod:`mmot.reverse.geometric_consistency` has the
derivation), O(N·D²) time and O(D²) memory. The forward returns the Grams with the two sums, so
the backward is one N×2D by 2D×2D product without a second pass over the Grams.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot import _backend, _checks, _rust, reference
from mmot.ops._kernels import Kernels, triton_entry
from mmot.reverse import geometric_consistency as reverse

OP = "mmot.geometric_consistency"
KERNELS = "geometric_consistency"  # mmot.kernels.geometric_consistency
REDUCTIONS = ("mean", "sum", "none")


def geometric_consistency(a: Tensor, b: Tensor, *, normalize: bool = True, reduction: str = "mean", backend: str = "auto") -> Tensor:
    r"""Geometric consistency of N paired embeddings, through D×D Grams (never N×N).

    Math: with â, b̂ the rows of a and b (L2-normalised when ``normalize``; rows are divided by
    max(‖row‖, 1e-12)), S = â b̂ᵀ the cross-modal similarities and P = â âᵀ, Q = b̂ b̂ᵀ the
    intra-modal ones (all N×N),

        symmetry  = mean_ij (S_ij − S_ji)²     (row i of a should see b_j as b_i sees a_j)
        structure = mean_ij (P_ij − Q_ij)²     (both modalities should have the same geometry)
        L = symmetry + structure

    the means over the N² entries. Both are 0 when a = b (or b̂ = â).

    **How.** With ê = b̂ − â and the Grams A = âᵀâ, F = âᵀê, G = êᵀê (D×D each), exactly

        Σ (S − Sᵀ)² = 2⟨A, G⟩ − 2 tr(F²)
        Σ (P − Q)²  = 2⟨A, G⟩ + 2 tr(F²) + 4⟨F, G⟩ + ‖G‖²

    so the cost is O(N·D²) time and O(D²) memory, whatever N is. Using ê rather than b̂ matters:
    the equivalent 2⟨A, B⟩ − 2tr(C²) (B = b̂ᵀb̂, C = âᵀb̂) subtracts numbers of size N² whose
    difference vanishes as b → a, where float32 leaves only rounding (its relative error grows
    as u/δ² with δ = ‖b̂ − â‖/‖â‖). Here every product has the size of the loss: the relative
    error is about u·(√(N + D²) + 2√D/δ), u the accumulation dtype's unit roundoff, the second
    part from rounding the unit rows before ê is formed (u·√(N + D²) alone without
    ``normalize``); ``tests/test_geometric_consistency.py`` derives and checks it.

    **Clamping.** Each sum is a sum of squares; rounding can leave it slightly below 0 (when it
    is at rounding level), so each is clamped at 0 and a clamped term passes no gradient. NaN
    passes the clamp: non-finite inputs give a non-finite loss (with the value checks off).

    **Numerics.** Accumulation is float32 (float64 for float64 inputs; float16 and bfloat16 are
    read into float32); the result has a's dtype. Without ``normalize`` the Grams hold fourth
    powers of the entries: rows past about 1e9 (float32) overflow, as the loss itself does.

    **Reductions.** ``"mean"``: L above, a 0-dim tensor. ``"sum"``: the sums without the 1/N²,
    Σ(S − Sᵀ)² + Σ(P − Q)². ``"none"``: the two terms separately, a (2,) tensor
    [symmetry, structure] with the 1/N² of "mean" (so ``"mean"`` is its sum), for weighting them
    apart. N = 0 gives zeros.

    Args:
        a: (N, D) float tensor, one modality's embeddings.
        b: (N, D) float tensor of the same dtype and device, the other modality's; row i of a
            and row i of b are a pair.
        normalize: L2-normalise the rows of a and b first.
        reduction: "mean", "sum" or "none" (see above).
        backend: "auto", "rust", "triton" or "torch".

    Returns:
        A 0-dim tensor ("mean", "sum") or a (2,) tensor ("none") in the dtype of ``a``.
        Gradients flow to ``a`` and ``b``.

    Example:
        >>> import torch, mmot
        >>> image, text = torch.randn(4096, 256), torch.randn(4096, 256)
        >>> loss = mmot.geometric_consistency(image, text)
        >>> symmetry, structure = mmot.geometric_consistency(image, text, reduction="none")
        >>> loss = symmetry + 0.5 * structure
    """
    a = _rows(a, "a")
    b = _rows(b, "b")
    if b.dtype != a.dtype:
        raise TypeError(f"{OP}: argument 'b' must have the dtype of 'a' ({a.dtype}); got {b.dtype}")
    _checks.same_device(OP, "b", b, a, "a")
    if b.shape != a.shape:
        raise ValueError(f"{OP}: argument 'b' must have the shape of 'a' {tuple(a.shape)} (a row per pair); got {tuple(b.shape)}")
    if not isinstance(normalize, bool):
        raise TypeError(f"{OP}: argument 'normalize' must be a bool; got {type(normalize).__name__}")
    reduction = _checks.choice(OP, "reduction", reduction, REDUCTIONS)
    backend = _backend.resolve_backend(OP, backend, a.device, KERNELS)

    terms, _ = geometric_consistency_op(a, b, normalize, backend)
    if reduction == "sum":
        return terms.sum().to(a.dtype)
    n = a.shape[0]
    means = terms / max(n * n, 1)  # in the accumulation dtype: N² may pass float16's range
    if reduction == "none":
        return means.to(a.dtype)
    return means.sum().to(a.dtype)


def _rows(x: object, name: str) -> Tensor:
    x = _checks.float_tensor(OP, name, x, min_dim=2, shape_hint="(N, D)")
    if x.dim() != 2:
        raise ValueError(f"{OP}: argument '{name}' must have shape (N, D); got shape {tuple(x.shape)}")
    return x


def _check(backend, a, b, normalize):
    """The rows' finiteness where the Rust kernel does not check it itself (in its row-norm pass)."""
    if backend != "rust":
        _checks.finite(OP, "a", a)
        _checks.finite(OP, "b", b)


def _forward_torch(a, b, normalize):
    x, _, e, _ = reverse.operands(a, b, normalize)
    grams = reverse.grams(x, e)
    return reference.consistency_terms(grams), grams


def _backward_torch(c, a, b, grams, normalize):
    return reverse.backward(c, a, b, grams, normalize)


def _forward_rust(a, b, normalize):
    d = a.shape[1]
    terms, grams = _rust.run(
        OP,
        "geometric_consistency_forward",
        reference.compute_dtype(a.dtype),
        [a, b],
        [(2,), (3, d, d)],
        [normalize],
        checks=_checks.value_checks_enabled(),
    )
    return terms, grams


def _backward_rust(c, a, b, grams, normalize):
    grad_a, grad_b = _rust.run(
        OP, "geometric_consistency_backward", reference.compute_dtype(a.dtype), [c, a, b, grams], [a.shape, b.shape], [normalize]
    )
    return [grad_a.to(a.dtype), grad_b.to(b.dtype)]


_FORWARD = Kernels(
    torch=_forward_torch,
    rust=_forward_rust,
    triton=triton_entry(KERNELS, "forward"),
    empty=lambda a, *_: a.numel() == 0,
    check=_check,
)
_BACKWARD = Kernels(
    torch=_backward_torch,
    rust=_backward_rust,
    triton=triton_entry(KERNELS, "backward"),
    empty=lambda c, a, *_: a.numel() == 0,
)


@torch.library.custom_op("mmot::geometric_consistency", mutates_args=())
def geometric_consistency_op(a: Tensor, b: Tensor, normalize: bool, backend: str) -> tuple[Tensor, Tensor]:
    """The sums [Σ(S − Sᵀ)², Σ(P − Q)²] (2,) and the Grams [âᵀâ, âᵀê, êᵀê] (3, D, D), both in the
    accumulation dtype; devices without a kernel run the torch backend."""
    return _FORWARD("torch", a, b, normalize)


@geometric_consistency_op.register_kernel(("cpu", "cuda"))
def _geometric_consistency_kernel(a, b, normalize, backend):
    return _FORWARD(backend, a, b, normalize)


@geometric_consistency_op.register_fake
def _geometric_consistency_fake(a, b, normalize, backend):
    d, dtype = a.shape[1], reference.compute_dtype(a.dtype)
    return a.new_empty((2,), dtype=dtype), a.new_empty((3, d, d), dtype=dtype)


@torch.library.custom_op("mmot::geometric_consistency_backward", mutates_args=())
def geometric_consistency_backward_op(c: Tensor, a: Tensor, b: Tensor, grams: Tensor, normalize: bool, backend: str) -> list[Tensor]:
    """Gradients for a and b of c[0]·T1 + c[1]·T2 from the saved Grams; other devices run the torch backend."""
    return _BACKWARD("torch", c, a, b, grams, normalize)


@geometric_consistency_backward_op.register_kernel(("cpu", "cuda"))
def _geometric_consistency_backward_kernel(c, a, b, grams, normalize, backend):
    return _BACKWARD(backend, c, a, b, grams, normalize)


@geometric_consistency_backward_op.register_fake
def _geometric_consistency_backward_fake(c, a, b, grams, normalize, backend):
    return [torch.empty_like(a), torch.empty_like(b)]


def _setup_context(ctx, inputs, output):
    a, b, normalize, backend = inputs
    terms, grams = output
    ctx.save_for_backward(a, b, terms, grams)
    ctx.params = (normalize, backend)


def _backward(ctx, grad_terms, _grad_grams):
    a, b, terms, grams = ctx.saved_tensors
    if grad_terms is None:
        return None, None, None, None
    # A term clamped at 0 passes no gradient; a NaN term keeps its cotangent.
    c = torch.where(terms == 0, torch.zeros_like(terms), grad_terms.to(terms.dtype)).contiguous()
    grad_a, grad_b = geometric_consistency_backward_op(c, a, b, grams, *ctx.params)
    return grad_a, grad_b, None, None


geometric_consistency_op.register_autograd(_backward, setup_context=_setup_context)
