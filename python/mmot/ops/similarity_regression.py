"""``mmot.pairwise_similarity_regression``: PCMR's regression of cross-modal similarities onto targets, its op and gradient.

The op returns, for every pair of modalities m < m', the match and non-match means (a (2, M, M)
tensor); pair weights and reductions are applied here, in torch. Without a margin the kernels
never form an N×N similarity matrix: both means are exact functions of D×D Grams, row sums and
the N matched similarities (:mod:`mmot.reverse.similarity_regression` has the derivation), O(N·D²)
time. With a margin the non-match mean is summed over similarity tiles, recomputed backwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mmot import _backend, _checks, _rust, reference
from mmot.ops._kernels import Kernels, triton_entry
from mmot.reverse import similarity_regression as reverse

OP = "mmot.pairwise_similarity_regression"
KERNELS = "similarity_regression"  # mmot.kernels.similarity_regression
REDUCTIONS = ("mean", "sum", "none")


def pairwise_similarity_regression(
    embeddings: Tensor | Sequence[Tensor],
    *,
    present: Tensor | None = None,
    match_target: float = 1.0,
    nonmatch_target: float = 0.0,
    margin: float | None = None,
    pair_weights: Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    r"""Pairwise cross-modal similarity regression (PCMR) of M modalities' embeddings of N items.

    The loss regresses, for every pair of modalities, the cosine similarity of an item's two
    embeddings onto ``match_target`` and that of two different items onto ``nonmatch_target``,
    as in "Cross-Modal Coordination Across a Diverse Set of Input Modalities" (arXiv 2401.16347).
    The paper's equations could not be read here (no copy of the paper was reachable); the form
    below is mmot's reconstruction from the issue that asked for it (issue 18), not a
    transcription of the paper.

    Math: for modalities m < m' with R the items present in both, â, b̂ their rows (divided by
    max(‖row‖, 1e-12) when ``normalize``) and s_ij = â_i·b̂_j,

        L_{m,m'} = mean_{i∈R} (s_ii − t)²  +  mean_{i≠j; i,j∈R} (s_ij − u)²

    with t = ``match_target`` and u = ``nonmatch_target``; the two means are kept separate (the
    N matched pairs are not outweighed by the N² − N others) and an empty mean is 0. With a
    ``margin`` μ ≥ 0 the non-match term becomes mean_{i≠j} max(0, s_ij − u − μ)²: only pairs more
    similar than u + μ are pushed down (a hinge, not a regression).

    **How.** Without a margin, Σ_{i,j∈R} s_ij² = ⟨Â_RᵀÂ_R, B̂_RᵀB̂_R⟩ and Σ_{i,j∈R} s_ij =
    (Σ â_i)·(Σ b̂_j), so the non-match mean is exact through D×D Grams less the N diagonal terms:
    O(M²·N·D²) time (each modality's Gram computed once when every row is present), no N×N
    tensor. The backward is made of N×D by D×D products. With a margin, row blocks of the
    similarity matrix are formed one tile at a time and recomputed in the backward.

    **Numerics.** Accumulation is float32 (float64 for float64 inputs); the result has the
    embeddings' dtype. The Gram form subtracts the matched pairs' Σ s_ii² (≈ n t²) from the
    total: its rounding error is about u·n (u the unit roundoff) against a non-match sum that,
    for N > D and matched rows near each other, is at least about n²/D − n; so float32 is
    accurate whenever the non-match mean is above ~1e-6·D/n. The non-match sum is clamped at 0 (it
    is a sum of squares; a clamped term passes no gradient).

    **Reductions.** ``"mean"``: Σ w_p L_p / Σ w_p over the pairs p = (m, m') with a non-empty R
    (0 when there is none); ``"sum"``: Σ w_p L_p; ``"none"``: the (M, M) matrix of L_{m,m'} on its
    upper triangle (zeros elsewhere), unweighted.

    Args:
        embeddings: (M, N, D) float tensor, or a sequence of M (N, D) tensors of one dtype and
            device (gradients flow to each); M ≥ 2. Row i of every modality is item i.
        present: optional (M, N) bool tensor; False marks item i as missing from modality m.
        match_target: t, the target similarity of an item's two embeddings.
        nonmatch_target: u, the target similarity of two different items.
        margin: None (regression) or a float μ ≥ 0 (hinged non-match term, above).
        pair_weights: optional (M, M) non-negative tensor; only entries m < m' are read (default 1).
        normalize: L2-normalise the rows first (cosine similarities).
        reduction: "mean", "sum" or "none" (above).
        backend: "auto", "rust", "triton" or "torch".

    Returns:
        A 0-dim tensor ("mean", "sum") or an (M, M) tensor ("none") in the embeddings' dtype.

    Example:
        >>> import torch, mmot
        >>> image, text, audio = (torch.randn(1024, 256, requires_grad=True) for _ in range(3))
        >>> loss = mmot.pairwise_similarity_regression([image, text, audio])
        >>> loss.backward()
        >>> per_pair = mmot.pairwise_similarity_regression(torch.stack([image, text, audio]), reduction="none")
    """
    x = _embeddings(embeddings)
    m, n = x.shape[0], x.shape[1]
    if present is not None:
        if not isinstance(present, torch.Tensor):
            raise TypeError(f"{OP}: argument 'present' must be a torch.Tensor of shape (M, N) = {(m, n)}; got {type(present).__name__}")
        if present.dtype != torch.bool:
            raise TypeError(f"{OP}: argument 'present' must be a bool tensor; got {present.dtype}")
        if tuple(present.shape) != (m, n):
            raise ValueError(f"{OP}: argument 'present' must have shape (M, N) = {(m, n)}; got {tuple(present.shape)}")
        _checks.same_device(OP, "present", present, x, "embeddings")
        present = present.contiguous()
    t = _checks.real_number(OP, "match_target", match_target)
    u = _checks.real_number(OP, "nonmatch_target", nonmatch_target)
    if margin is not None:
        margin = _checks.real_number(OP, "margin", margin)
        if margin < 0:
            raise ValueError(f"{OP}: argument 'margin' must be >= 0 or None; got {margin}")
    if pair_weights is not None:
        if not isinstance(pair_weights, torch.Tensor) or not pair_weights.is_floating_point():
            raise TypeError(f"{OP}: argument 'pair_weights' must be a floating torch.Tensor of shape (M, M); got {_describe(pair_weights)}")
        if tuple(pair_weights.shape) != (m, m):
            raise ValueError(f"{OP}: argument 'pair_weights' must have shape (M, M) = {(m, m)}; got {tuple(pair_weights.shape)}")
        _checks.same_device(OP, "pair_weights", pair_weights, x, "embeddings")
        if _checks.value_checks_enabled() and not torch.compiler.is_compiling():
            upper = pair_weights.detach().triu(1)
            if not bool(torch.isfinite(upper).all()) or bool((upper < 0).any()):
                raise ValueError(f"{OP}: argument 'pair_weights' must be finite and >= 0 above the diagonal")
    if not isinstance(normalize, bool):
        raise TypeError(f"{OP}: argument 'normalize' must be a bool; got {type(normalize).__name__}")
    reduction = _checks.choice(OP, "reduction", reduction, REDUCTIONS)
    backend = _backend.resolve_backend(OP, backend, x.device, KERNELS)

    terms = pairwise_similarity_regression_op(x, present, t, u, margin, normalize, backend)
    losses = terms.sum(0)
    if reduction == "none":
        return losses.to(x.dtype)
    upper = torch.ones(m, m, dtype=torch.bool, device=x.device).triu(1)
    w = torch.ones_like(losses) if pair_weights is None else pair_weights.to(losses.dtype)
    w = torch.where(upper, w, torch.zeros_like(w))
    total = (w * losses).sum()
    if reduction == "sum":
        return total.to(x.dtype)
    if present is None:
        nonempty = torch.full((m, m), n > 0, dtype=torch.bool, device=x.device)
    else:
        mask = present.to(losses.dtype)
        nonempty = (mask @ mask.T) > 0
    weight = torch.where(nonempty, w, torch.zeros_like(w)).sum()
    safe = torch.where(weight > 0, weight, torch.ones_like(weight))
    return torch.where(weight > 0, total / safe, torch.zeros_like(total)).to(x.dtype)


def _describe(value: object) -> str:
    return f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__


def _embeddings(embeddings: object) -> Tensor:
    if isinstance(embeddings, torch.Tensor):
        x = _checks.float_tensor(OP, "embeddings", embeddings, min_dim=3, shape_hint="(M, N, D)")
        if x.dim() != 3:
            raise ValueError(f"{OP}: argument 'embeddings' must have shape (M, N, D); got shape {tuple(x.shape)}")
    elif isinstance(embeddings, Sequence) and not isinstance(embeddings, str):
        rows = [_checks.float_tensor(OP, f"embeddings[{i}]", e, min_dim=2, shape_hint="(N, D)") for i, e in enumerate(embeddings)]
        for i, e in enumerate(rows):
            if e.dim() != 2:
                raise ValueError(f"{OP}: argument 'embeddings[{i}]' must have shape (N, D); got shape {tuple(e.shape)}")
            if i and e.dtype != rows[0].dtype:
                raise TypeError(f"{OP}: argument 'embeddings[{i}]' must have the dtype of 'embeddings[0]' ({rows[0].dtype}); got {e.dtype}")
            if i:
                _checks.same_device(OP, f"embeddings[{i}]", e, rows[0], "embeddings[0]")
            if i and e.shape != rows[0].shape:
                raise ValueError(
                    f"{OP}: argument 'embeddings[{i}]' must have the shape of 'embeddings[0]' {tuple(rows[0].shape)}; got {tuple(e.shape)}"
                )
        if len(rows) < 2:
            raise ValueError(f"{OP}: argument 'embeddings' must hold at least 2 modalities; got {len(rows)}")
        x = torch.stack(rows)
    else:
        raise TypeError(
            f"{OP}: argument 'embeddings' must be a torch.Tensor of shape (M, N, D) or a sequence of (N, D) tensors; "
            f"got {type(embeddings).__name__}"
        )
    if x.shape[0] < 2:
        raise ValueError(f"{OP}: argument 'embeddings' must hold at least 2 modalities (M >= 2); got M = {x.shape[0]}")
    return x


def _check(backend, x, *_):
    """The rows' finiteness where the Rust kernel does not check it itself."""
    if backend != "rust":
        _checks.finite(OP, "embeddings", x)


def _mask(present, x):
    """The (M, N) uint8 mask the Rust kernel reads (all ones when no mask was given)."""
    if present is None:
        return torch.ones(x.shape[0], x.shape[1], dtype=torch.uint8)
    return present.to(torch.uint8).contiguous()


def _margin(margin):
    return -1.0 if margin is None else float(margin)


def _forward_rust(x, present, t, u, margin, normalize):
    m = x.shape[0]
    (terms,) = _rust.run(
        OP,
        "similarity_regression_forward",
        reference.compute_dtype(x.dtype),
        [x, _mask(present, x)],
        [(2, m, m)],
        [t, u, _margin(margin), normalize],
        checks=_checks.value_checks_enabled(),
    )
    return terms


def _backward_rust(c, x, present, t, u, margin, normalize):
    (grad,) = _rust.run(
        OP,
        "similarity_regression_backward",
        reference.compute_dtype(x.dtype),
        [c, x, _mask(present, x)],
        [x.shape],
        [t, u, _margin(margin), normalize],
    )
    return grad.to(x.dtype)


_FORWARD = Kernels(
    torch=reverse.forward,
    rust=_forward_rust,
    triton=triton_entry(KERNELS, "forward"),
    empty=lambda x, *_: x.numel() == 0,
    check=_check,
)
_BACKWARD = Kernels(
    torch=reverse.backward,
    rust=_backward_rust,
    triton=triton_entry(KERNELS, "backward"),
    empty=lambda c, x, *_: x.numel() == 0,
)


@torch.library.custom_op("mmot::pairwise_similarity_regression", mutates_args=())
def pairwise_similarity_regression_op(
    x: Tensor, present: Tensor | None, t: float, u: float, margin: float | None, normalize: bool, backend: str
) -> Tensor:
    """(2, M, M): the [match, non-match] means of every pair m < m' (0 elsewhere), in the accumulation
    dtype; devices without a kernel run the torch backend."""
    return _FORWARD("torch", x, present, t, u, margin, normalize)


@pairwise_similarity_regression_op.register_kernel(("cpu", "cuda"))
def _kernel(x, present, t, u, margin, normalize, backend):
    return _FORWARD(backend, x, present, t, u, margin, normalize)


@pairwise_similarity_regression_op.register_fake
def _fake(x, present, t, u, margin, normalize, backend):
    m = x.shape[0]
    return x.new_empty((2, m, m), dtype=reference.compute_dtype(x.dtype))


@torch.library.custom_op("mmot::pairwise_similarity_regression_backward", mutates_args=())
def pairwise_similarity_regression_backward_op(
    c: Tensor, x: Tensor, present: Tensor | None, t: float, u: float, margin: float | None, normalize: bool, backend: str
) -> Tensor:
    """∂/∂x of Σ c ⊙ terms for the cotangents c (2, M, M); other devices run the torch backend."""
    return _BACKWARD("torch", c, x, present, t, u, margin, normalize)


@pairwise_similarity_regression_backward_op.register_kernel(("cpu", "cuda"))
def _backward_kernel(c, x, present, t, u, margin, normalize, backend):
    return _BACKWARD(backend, c, x, present, t, u, margin, normalize)


@pairwise_similarity_regression_backward_op.register_fake
def _backward_fake(c, x, present, t, u, margin, normalize, backend):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, present, t, u, margin, normalize, backend = inputs
    ctx.save_for_backward(x, present, output)
    ctx.params = (t, u, margin, normalize, backend)


def _backward(ctx, grad_terms):
    x, present, terms = ctx.saved_tensors
    if grad_terms is None:
        return (None,) * 7
    c = grad_terms.to(terms.dtype)
    # A non-match sum clamped at 0 passes no gradient; a NaN keeps its cotangent.
    c = torch.stack((c[0], torch.where(terms[1] == 0, torch.zeros_like(c[1]), c[1])))
    grad = pairwise_similarity_regression_backward_op(c.contiguous(), x, present, *ctx.params)
    return grad, None, None, None, None, None, None


pairwise_similarity_regression_op.register_autograd(_backward, setup_context=_setup_context)
