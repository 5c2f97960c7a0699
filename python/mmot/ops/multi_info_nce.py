"""``mmot.multi_info_nce``: PCMC's InfoNCE over every pair of modalities, with missing modalities.

The op normalises each modality once, then runs the fused InfoNCE kernels of
:mod:`mmot.ops.info_nce` (Rust, Triton or torch) on each pair of normalised modalities, so no
N×N block outlives a tile; the backward runs their reverse passes, adds each modality's gradient
over its M − 1 pairs and applies the normalisation's adjoint once. The Rust and torch kernels see
only the samples both modalities of a pair have (gathered: a missing sample costs nothing); the
Triton kernels take the pair's mask instead, which needs no host sync.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from mmot import _backend, _checks, reference
from mmot.ops import info_nce as pair
from mmot.reverse.similarity import unit_rows, unit_rows_backward

OP = "mmot.multi_info_nce"
REDUCTIONS = ("mean", "sum", "none")


def multi_info_nce(
    embeddings: Tensor | Sequence[Tensor],
    temperature: float = 0.05,
    *,
    present: Tensor | None = None,
    pair_weights: Tensor | None = None,
    symmetric: bool = True,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    r"""PCMC: the InfoNCE loss of every pair of M modalities, each pair over the samples that have both.

    "Cross-Modal Coordination Across a Diverse Set of Input Modalities" (arXiv 2401.16347)
    extends CLIP's contrastive loss to M modalities by summing it over every pair, and masks the
    samples that lack a modality (their Eqs. 8–9). For a pair m < m′ with
    v = present[m] & present[m′], the pair's loss is

        L_{m,m′} = mmot.info_nce(e_m, e_m′, temperature, symmetric=..., normalize=..., valid=v)

    the mean over the valid samples of both directions' cross-entropies, summed: a sample without
    either modality is neither an anchor nor a negative of that pair (it leaves every
    denominator). A pair with no valid sample has loss 0.

    **Reductions.** With w the pair weights (1 by default; only entries m < m′ are read):
    ``"mean"`` is Σ w·L / Σ w over the pairs that have at least one valid sample (0 when none
    has); ``"sum"`` is Σ w·L; ``"none"`` is the (M, M) matrix of the unweighted pair losses in
    its upper triangle, zeros elsewhere.

    Cost: each modality is normalised once per call (not once per pair); each pair then costs
    one fused InfoNCE, O(N·D) memory and no N×N logits. Extra memory is O(M·N·D), the
    normalised copies.

    Args:
        embeddings: (M, N, D) float tensor, or a sequence of M (N, D) tensors of one dtype and
            device (gradients flow back to each). M ≥ 2.
        temperature: τ > 0, as in :func:`mmot.info_nce` (0.05 by default).
        present: optional (M, N) bool tensor: which samples have which modality.
        pair_weights: optional (M, M) float tensor of weights ≥ 0; entry [m, m′] with m < m′
            weighs that pair.
        symmetric: both directions of each pair (CLIP's loss), or m → m′ only.
        normalize: L2-normalise the rows first (cosine similarities).
        reduction: "mean", "sum" or "none".
        backend: "auto", "rust", "triton" or "torch".

    Returns:
        A 0-dim tensor ("mean", "sum") or an (M, M) tensor ("none") in the embeddings' dtype.

    Example:
        >>> import torch, mmot
        >>> image, text, audio = (torch.randn(1024, 256) for _ in range(3))
        >>> has = torch.rand(3, 1024) > 0.2                     # which samples have which modality
        >>> loss = mmot.multi_info_nce([image, text, audio], 0.05, present=has)
    """
    x = _stack(embeddings)
    m = x.shape[0]
    temperature = _checks.reciprocal_fits(OP, "temperature", _checks.positive_float(OP, "temperature", temperature), x.dtype)
    for name, flag in (("symmetric", symmetric), ("normalize", normalize)):
        if not isinstance(flag, bool):
            raise TypeError(f"{OP}: argument '{name}' must be a bool; got {type(flag).__name__}")
    reduction = _checks.choice(OP, "reduction", reduction, REDUCTIONS)
    dtype = reference.compute_dtype(x.dtype)
    weights = _present_weights(present, x, dtype)
    pair_w = _pair_weights(pair_weights, x, dtype)
    backend = _backend.resolve_backend(OP, backend, x.device, pair.KERNELS)

    rows, _, _ = multi_info_nce_op(x, weights, temperature, symmetric, normalize, backend)
    first, second = pair_index(m, x.device)
    counts = (weights[first] * weights[second]).sum(-1)  # valid samples per pair
    # Each pair's mean sums loss/count (as info_nce's): no partial sum passes the mean.
    losses = (rows.to(dtype) / counts.clamp_min(1.0)[:, None]).sum(-1)
    if reduction == "none":
        return torch.zeros(m, m, dtype=dtype, device=x.device).index_put((first, second), losses).to(x.dtype)
    w = pair_w[first, second]
    if reduction == "sum":
        return (w * losses).sum().to(x.dtype)
    w = torch.where(counts > 0, w, 0.0)
    total = w.sum()
    return torch.where(total > 0, (w * losses).sum() / torch.where(total > 0, total, 1.0), 0.0).to(x.dtype)


def pair_index(m: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The pairs m < m′ in order (0, 1), (0, 2), …, (1, 2), …: two (P,) index tensors."""
    first, second = zip(*itertools.combinations(range(m), 2))
    return torch.tensor(first, device=device), torch.tensor(second, device=device)


def _stack(embeddings) -> Tensor:
    if isinstance(embeddings, Tensor):
        x = _checks.float_tensor(OP, "embeddings", embeddings, min_dim=3, shape_hint="(M, N, D)")
        if x.dim() != 3:
            raise ValueError(f"{OP}: argument 'embeddings' must have shape (M, N, D); got shape {tuple(x.shape)}")
    elif isinstance(embeddings, (list, tuple)):
        parts = [_checks.float_tensor(OP, f"embeddings[{i}]", e, min_dim=2, shape_hint="(N, D)") for i, e in enumerate(embeddings)]
        for i, e in enumerate(parts):
            if e.dim() != 2:
                raise ValueError(f"{OP}: argument 'embeddings[{i}]' must have shape (N, D); got shape {tuple(e.shape)}")
            if i and e.dtype != parts[0].dtype:
                raise TypeError(f"{OP}: argument 'embeddings[{i}]' must have the dtype of embeddings[0] ({parts[0].dtype}); got {e.dtype}")
            if i and e.shape != parts[0].shape:
                raise ValueError(
                    f"{OP}: argument 'embeddings[{i}]' must have the shape of embeddings[0] {tuple(parts[0].shape)}; got {tuple(e.shape)}"
                )
            if i:
                _checks.same_device(OP, f"embeddings[{i}]", e, parts[0], "embeddings[0]")
        if len(parts) < 2:
            raise ValueError(f"{OP}: argument 'embeddings' must hold at least 2 modalities; got {len(parts)}")
        x = torch.stack(parts)
    else:
        got = type(embeddings).__name__
        raise TypeError(f"{OP}: argument 'embeddings' must be an (M, N, D) tensor or a sequence of (N, D) tensors; got {got}")
    if x.shape[0] < 2:
        raise ValueError(f"{OP}: argument 'embeddings' must hold at least 2 modalities (M ≥ 2); got shape {tuple(x.shape)}")
    return x


def _present_weights(present, x: Tensor, dtype: torch.dtype) -> Tensor:
    """The (M, N) 0/1 weights of which samples have which modality."""
    m, n = x.shape[0], x.shape[1]
    if present is None:
        return x.new_ones((m, n), dtype=dtype)
    if not isinstance(present, Tensor) or present.dtype != torch.bool:
        got = f"dtype {present.dtype}" if isinstance(present, Tensor) else type(present).__name__
        raise TypeError(f"{OP}: argument 'present' must be None or a bool tensor of shape ({m}, {n}); got {got}")
    if tuple(present.shape) != (m, n):
        raise ValueError(f"{OP}: argument 'present' must have shape ({m}, {n}) (modalities × samples); got {tuple(present.shape)}")
    _checks.same_device(OP, "present", present, x, "embeddings")
    return present.to(dtype)


def _pair_weights(pair_weights, x: Tensor, dtype: torch.dtype) -> Tensor:
    m = x.shape[0]
    if pair_weights is None:
        return x.new_ones((m, m), dtype=dtype)
    if not isinstance(pair_weights, Tensor) or not pair_weights.is_floating_point():
        got = f"dtype {pair_weights.dtype}" if isinstance(pair_weights, Tensor) else type(pair_weights).__name__
        raise TypeError(f"{OP}: argument 'pair_weights' must be None or a float tensor of shape ({m}, {m}); got {got}")
    if tuple(pair_weights.shape) != (m, m):
        raise ValueError(f"{OP}: argument 'pair_weights' must have shape ({m}, {m}); got {tuple(pair_weights.shape)}")
    _checks.same_device(OP, "pair_weights", pair_weights, x, "embeddings")
    w = pair_weights.detach().to(dtype)
    # A value check needs the values: skipped while torch.compile traces (as C3's are).
    if _checks.value_checks_enabled() and not torch.compiler.is_compiling() and not bool(((w >= 0) & torch.isfinite(w)).all()):
        raise ValueError(f"{OP}: argument 'pair_weights' must hold finite weights >= 0")
    return w


def _units(x: Tensor, normalize: bool) -> tuple[Tensor, Tensor | None]:
    """Each modality's rows in the accumulation dtype, normalised once when asked: (x̂, ‖x‖)."""
    xs = x.to(reference.compute_dtype(x.dtype))
    return unit_rows(xs) if normalize else (xs, None)


def _pairs(backend: str, x: Tensor, weights: Tensor):
    """Per pair (p, i, j, rows): the indices of the samples both modalities have, so that the
    kernels skip the others' work; None for Triton (its kernels mask them: no host sync)."""
    first, second = pair_index(x.shape[0], x.device)
    for p, (i, j) in enumerate(zip(first.tolist(), second.tolist())):
        rows = None if backend == "triton" else torch.nonzero(weights[i] * weights[j]).flatten()
        yield p, i, j, rows


def _forward(backend, x, weights, temperature, symmetric, normalize):
    _checks.finite(OP, "embeddings", x)  # once here, so the pair kernels' own check never names info_nce
    units, _ = _units(x, normalize)
    dtype = units.dtype
    n_pairs, n = x.shape[0] * (x.shape[0] - 1) // 2, x.shape[1]
    loss, lse_a, lse_b = (units.new_zeros((n_pairs, n)) for _ in range(3))
    for p, i, j, rows in _pairs(backend, x, weights):
        if rows is None:
            loss[p], lse_a[p], lse_b[p] = pair.FORWARD(backend, units[i], units[j], weights[i] * weights[j], temperature, symmetric, False)
            continue
        a, b, ones = units[i][rows], units[j][rows], torch.ones(len(rows), dtype=dtype, device=x.device)
        parts = pair.FORWARD(backend, a, b, ones, temperature, symmetric, False)
        for out, part in zip((loss[p], lse_a[p], lse_b[p]), parts):
            out[rows] = part.to(dtype)
    return loss.to(x.dtype), lse_a, lse_b


def _backward(backend, grad, x, weights, lse_a, lse_b, temperature, symmetric, normalize):
    units, norms = _units(x, normalize)
    total = torch.zeros_like(units)
    for p, i, j, rows in _pairs(backend, x, weights):
        g = grad[p].to(units.dtype)
        if rows is None:
            both = weights[i] * weights[j]
            grad_i, grad_j = pair.BACKWARD(backend, g, units[i], units[j], both, lse_a[p], lse_b[p], temperature, symmetric, False)
            total[i] += grad_i
            total[j] += grad_j
            continue
        ones = torch.ones(len(rows), dtype=units.dtype, device=x.device)
        a, b = units[i][rows], units[j][rows]
        grad_i, grad_j = pair.BACKWARD(backend, g[rows], a, b, ones, lse_a[p][rows], lse_b[p][rows], temperature, symmetric, False)
        total[i].index_add_(0, rows, grad_i)
        total[j].index_add_(0, rows, grad_j)
    if normalize:  # one modality at a time: the adjoint's temporaries stay N×D
        for i in range(x.shape[0]):
            total[i] = unit_rows_backward(total[i], units[i], norms[i])
    return total.to(x.dtype)


@torch.library.custom_op("mmot::multi_info_nce", mutates_args=())
def multi_info_nce_op(
    x: Tensor, weights: Tensor, temperature: float, symmetric: bool, normalize: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Per pair (P = M(M−1)/2, in :func:`pair_index`'s order) the per-sample losses (P, N) and
    both directions' log-sum-exps; devices without a kernel run the torch backend."""
    return _forward("torch", x, weights, temperature, symmetric, normalize)


@multi_info_nce_op.register_kernel(("cpu", "cuda"))
def _multi_info_nce_kernel(x, weights, temperature, symmetric, normalize, backend):
    return _forward(backend, x, weights, temperature, symmetric, normalize)


@multi_info_nce_op.register_fake
def _multi_info_nce_fake(x, weights, temperature, symmetric, normalize, backend):
    p, n = x.shape[0] * (x.shape[0] - 1) // 2, x.shape[1]
    dtype = reference.compute_dtype(x.dtype)
    return x.new_empty((p, n)), x.new_empty((p, n), dtype=dtype), x.new_empty((p, n), dtype=dtype)


@torch.library.custom_op("mmot::multi_info_nce_backward", mutates_args=())
def multi_info_nce_backward_op(
    grad: Tensor,
    x: Tensor,
    weights: Tensor,
    lse_a: Tensor,
    lse_b: Tensor,
    temperature: float,
    symmetric: bool,
    normalize: bool,
    backend: str,
) -> Tensor:
    """The gradient for the (M, N, D) embeddings; other devices run the torch backend."""
    return _backward("torch", grad, x, weights, lse_a, lse_b, temperature, symmetric, normalize)


@multi_info_nce_backward_op.register_kernel(("cpu", "cuda"))
def _multi_info_nce_backward_kernel(grad, x, weights, lse_a, lse_b, temperature, symmetric, normalize, backend):
    return _backward(backend, grad, x, weights, lse_a, lse_b, temperature, symmetric, normalize)


@multi_info_nce_backward_op.register_fake
def _multi_info_nce_backward_fake(grad, x, weights, lse_a, lse_b, temperature, symmetric, normalize, backend):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, weights, temperature, symmetric, normalize, backend = inputs
    _, lse_a, lse_b = output
    ctx.save_for_backward(x, weights, lse_a, lse_b)
    ctx.params = (temperature, symmetric, normalize, backend)


def _backward_entry(ctx, grad, _grad_lse_a, _grad_lse_b):
    x, weights, lse_a, lse_b = ctx.saved_tensors
    if grad is None:
        return None, None, None, None, None, None
    return multi_info_nce_backward_op(grad.contiguous(), x, weights, lse_a, lse_b, *ctx.params), None, None, None, None, None


multi_info_nce_op.register_autograd(_backward_entry, setup_context=_setup_context)
