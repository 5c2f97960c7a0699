"""``mmot.multi_sinkhorn``: Multi-Assignment Sinkhorn-Knopp (SSPC), its op and its gradient."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mmot import _backend, _checks, _rust, reference
from mmot._columns import LOCAL, ShardedColumns
from mmot.ops import _sharded
from mmot.ops import _sinkhorn_options as options
from mmot.ops._kernels import Kernels, triton_kernels
from mmot.ops._sinkhorn_options import EpsSchedule, SinkhornInfo
from mmot.ops.multi_sinkhorn_ext import multi_sinkhorn_ext_op
from mmot.reverse import multi_sinkhorn as reverse

OP = "mmot.multi_sinkhorn"
KERNELS = "multi_sinkhorn"  # mmot.kernels.multi_sinkhorn
NORMALIZE_CHOICES = ("minmax", "none")


def multi_sinkhorn(
    scores: Tensor | Sequence[Tensor],
    k: int | None = None,
    eps: float = 0.07,
    n_iters: int = 20,
    *,
    low_weight: float = 0.25,
    slot_weights: Sequence[float] | Tensor | None = None,
    anchor_mass: Tensor | None = None,
    normalize: str = "minmax",
    row_counts: Tensor | None = None,
    col_counts: Tensor | None = None,
    tol: float | None = None,
    return_info: bool = False,
    eps_schedule: str | EpsSchedule | None = None,
    grad: str = "unrolled",
    log_domain: str | bool = "auto",
    process_group=None,
    backend: str = "auto",
):
    r"""Soft k-hot assignment of N samples to K anchors (SSPC's Multi-Assignment Sinkhorn-Knopp).

    Math: there are K slots m with weights w_m (``low_weight`` for the first K−k, 1 for the
    last k, or ``slot_weights``). P[m,n,a] ∝ exp(w_m · scores[n,a] / eps), then ``n_iters``
    times scale so that

    1. Σ_n P[m,n,a] = r_a = N/K (every slot gives every anchor the same share of the N samples);
    2. Σ_m P[m,n,a] = 1;
    3. Σ_a P[m,n,a] = 1.

    The result is T[n,a] = Σ_{last k slots m} P[m,n,a]: rows sum to k, entries lie in [0, 1]
    and anchor columns sum to about k·N/K. ``normalize="minmax"`` rescales each row to [0, 1]
    (the targets SSPC trains on; a row whose spread is within rounding of constant becomes 0,
    see docs/numerics.md), ``"none"`` returns T as is.

    The three constraints are only consistent for equal anchor masses: summing 1 over m and n
    gives K·r_a, summing 2 over m and n gives N, so r_a = N/K for every anchor. Nor would a mass
    change the result: the per-(sample, anchor) scaling of step 2 absorbs any anchor scaling of
    step 1 (docs/multi_sinkhorn.md). Hence ``anchor_mass`` may only be uniform.

    Slots of equal weight stay identical, so the kernels keep one set of potentials per
    distinct weight: O(N·K) memory and time per iteration instead of the dense O(K²·N).

    Args:
        scores: (..., N, K) float tensor of sample-anchor similarities; leading dims are
            independent problems.
        k: assignments per sample, 1..K. Default K // 2 (at least 1), as SSPC.
        eps: entropic temperature, > 0. SSPC pre-training uses 0.07. Scores whose exponent
            range R = (max − min of a column) · max weight / eps passes 2^12 are computed in
            float64; past R = 2^41 float64 no longer resolves the plan and eps is refused
            (docs/numerics.md).
        n_iters: iterations, >= 1. SSPC uses 20.
        low_weight: weight of the first K−k slots, > 0 (ignored with ``slot_weights``).
        slot_weights: K positive weights, one per slot, instead of ``low_weight``.
        anchor_mass: (K,) or (..., K) anchor masses, accepted for SSPC compatibility: they
            must all be N/K (to a relative 1e-4), else ValueError. Default N/K each.
        normalize: "minmax" or "none".
        log_domain: "auto", True or False (see :func:`mmot.sinkhorn`).
        process_group: shard the rows across a ``torch.distributed`` group (see
            :func:`mmot.sinkhorn`): each rank passes its own rows and the per-anchor column
            sums are all-reduced every iteration; N is then the total over ranks.
        backend: "auto" (Rust on CPU, Triton on CUDA), "rust", "triton" or "torch"; with
            ``process_group`` too ("torch": the reference with all-reduced sums).

    Options (as in :func:`mmot.sinkhorn`, docs/sinkhorn_options.md; not with ``process_group``):
        row_counts, col_counts: per-problem sizes N_b, K_b of a padded batch, or a list of 2-D
            ``scores``. Each problem has K_b slots (``low_weight`` for the first K_b − k, 1 for
            the last k; ``slot_weights`` cannot vary with K_b and is refused with ragged
            columns), k defaults to K_b // 2 per problem, and r_a = N_b / K_b.
        tol, return_info: stop each problem once max_{slot, a} |Σ_n P[m,n,a] − r_a| / r_a is
            at most ``tol`` (``n_iters`` is the cap); return a :class:`mmot.SinkhornInfo`.
        eps_schedule: "geometric" or :class:`mmot.EpsSchedule` (ε-scaling, log domain).
        grad: "unrolled" or "implicit" (the converged fixed point's gradient, O(N·K) memory).

    Returns:
        T with the shape and dtype of ``scores`` (a list for list input), followed by a
        :class:`mmot.SinkhornInfo` when ``return_info``. Gradients flow to ``scores`` only.

    Example:
        >>> import torch, mmot
        >>> feats = torch.nn.functional.normalize(torch.randn(7660, 256), dim=-1)
        >>> anchors = torch.nn.functional.normalize(torch.randn(64, 256), dim=-1)
        >>> targets = mmot.multi_sinkhorn(feats @ anchors.T, k=32)   # (7660, 64), rows in [0, 1]
        >>> raw = mmot.multi_sinkhorn(feats @ anchors.T, k=32, normalize="none")
        >>> torch.allclose(raw.sum(-1), torch.full((7660,), 32.0))
        True
    """
    options = (row_counts, col_counts, tol, eps_schedule)
    if isinstance(scores, (list, tuple)) or any(o is not None for o in options) or return_info or grad != "unrolled":
        if process_group is not None:
            raise ValueError(f"{OP}: the options (ragged sizes, tol, return_info, eps_schedule, grad) do not combine with 'process_group'")
        return _with_options(
            scores,
            k,
            eps,
            n_iters,
            low_weight,
            slot_weights,
            anchor_mass,
            normalize,
            row_counts,
            col_counts,
            tol,
            return_info,
            eps_schedule,
            grad,
            log_domain,
            backend,
        )
    scores = _checks.float_tensor(OP, "scores", scores, min_dim=2, shape_hint="(..., N, K)")
    n_rows, n_slots = scores.shape[-2:]
    if n_slots == 0:
        raise ValueError(f"{OP}: argument 'scores' must have at least one anchor column (K >= 1); got shape {tuple(scores.shape)}")
    k = max(1, n_slots // 2) if k is None else _checks.int_in_range(OP, "k", k, 1, n_slots)
    eps = _checks.reciprocal_fits(OP, "eps", _checks.positive_float(OP, "eps", eps), scores.dtype)
    n_iters = _checks.int_in_range(OP, "n_iters", n_iters, 1)
    weights = _slot_weights(slot_weights, low_weight, n_slots, k)
    normalize = _checks.choice(OP, "normalize", normalize, NORMALIZE_CHOICES)
    flag = _checks.log_domain_flag(OP, log_domain)
    distributed = _checks.process_group(OP, process_group)
    backend = _backend.resolve_backend(OP, backend, scores.device, KERNELS, distributed=distributed)
    columns = ShardedColumns(process_group) if distributed else LOCAL
    total_rows = columns.total_rows(n_rows, scores.device) if distributed else n_rows
    mass = _anchor_mass(scores, anchor_mass, total_rows)

    if distributed:
        _checks.finite(OP, "scores", scores)
        if backend == "torch":
            if _checks.value_checks_enabled():
                reference.check_log_range(scores, eps, max(weights), OP, columns)
            return reference.multi_sinkhorn(scores, eps, n_iters, weights, k, mass, normalize, flag, columns)
        return _sharded.multi_sinkhorn(scores, eps, n_iters, weights, k, mass, normalize, flag, columns, backend)
    if scores.numel() == 0:
        return scores.new_empty(scores.shape)
    return multi_sinkhorn_op(scores, eps, n_iters, weights, k, mass, normalize, flag, backend)


def _with_options(
    scores,
    k,
    eps,
    n_iters,
    low_weight,
    slot_weights,
    anchor_mass,
    normalize,
    row_counts,
    col_counts,
    tol,
    return_info,
    eps_schedule,
    grad,
    log_domain,
    backend,
):
    """The options path: checks, slot groups per problem, then ``mmot::multi_sinkhorn_ext``."""
    batch = options.batch(OP, scores, row_counts, col_counts)
    n_slots = batch.scores.shape[-1]
    ragged_cols = batch.shapes is not None or col_counts is not None
    eps = _checks.reciprocal_fits(OP, "eps", _checks.positive_float(OP, "eps", eps), batch.dtype)
    n_iters = _checks.int_in_range(OP, "n_iters", n_iters, 1)
    normalize = _checks.choice(OP, "normalize", normalize, NORMALIZE_CHOICES)
    tol = options.tolerance(OP, tol)
    grad = options.grad_mode(OP, grad)
    flag = _checks.log_domain_flag(OP, log_domain)
    backend = _backend.resolve_backend(OP, backend, batch.scores.device, KERNELS)
    if ragged_cols:
        weights, counts, tops = _ragged_groups(batch, k, low_weight, slot_weights)
    else:
        k = max(1, n_slots // 2) if k is None else _checks.int_in_range(OP, "k", k, 1, n_slots)
        groups = reference.slot_groups(_slot_weights(slot_weights, low_weight, n_slots, k), k)
        weights = [weight for weight, _, _ in groups]
        counts = batch.scores.new_tensor([[count for _, count, _ in groups]], dtype=torch.float64).expand(batch.scores.shape[0], -1)
        tops = batch.scores.new_tensor([[top for _, _, top in groups]], dtype=torch.float64).expand(batch.scores.shape[0], -1)
    if anchor_mass is not None:
        if batch.shapes is not None or row_counts is not None or ragged_cols:
            raise ValueError(f"{OP}: argument 'anchor_mass' is N_b/K_b per problem with ragged sizes; pass None")
        _anchor_mass(batch.scores.reshape(batch.batch_shape + batch.scores.shape[-2:]), anchor_mass, batch.scores.shape[-2])
    if eps_schedule is not None and flag == "off":
        raise ValueError(f"{OP}: argument 'eps_schedule' runs in the log domain; log_domain=False cannot be honoured")
    filled = options.masked_fill_valid(batch)
    dtype = reference.compute_dtype(filled.dtype)
    eps_start, decay = options.schedule(OP, eps_schedule, eps, n_iters, batch)
    target, _, _, _, iters, err = multi_sinkhorn_ext_op(
        filled,
        batch.row_counts,
        batch.col_counts,
        weights,
        counts.to(dtype).contiguous(),
        tops.to(dtype).contiguous(),
        eps_start,
        eps,
        decay,
        n_iters,
        tol,
        normalize,
        flag,
        grad,
        backend,
    )
    out = batch.matrices(target)
    if return_info:
        return out, SinkhornInfo(batch.per_problem(iters), batch.per_problem(err))
    return out


def _ragged_groups(batch, k, low_weight, slot_weights) -> tuple[list[float], Tensor, Tensor]:
    """Per problem: K_b slots, the last k_b of weight 1 and the others of ``low_weight``."""
    if slot_weights is not None:
        raise ValueError(f"{OP}: argument 'slot_weights' fixes K slots; with ragged columns give 'low_weight' (and 'k') instead")
    low = _checks.positive_float(OP, "low_weight", low_weight)
    k_b = batch.col_counts.to(torch.float64)
    if k is None:
        top = torch.clamp(torch.floor(k_b / 2), min=1)
    else:
        k = _checks.int_in_range(OP, "k", k, 1, batch.scores.shape[-1])
        if _checks.value_checks_enabled() and not torch.compiler.is_compiling() and k > int(batch.col_counts.min()):
            raise ValueError(
                f"{OP}: argument 'k' must be at most every problem's number of columns "
                f"(the smallest is {int(batch.col_counts.min())}); got {k}"
            )
        top = torch.full_like(k_b, k)
    if low == 1.0:
        return [1.0], k_b[:, None], top[:, None]
    return [low, 1.0], torch.stack([k_b - top, top], -1), torch.stack([torch.zeros_like(top), top], -1)


def _slot_weights(slot_weights, low_weight, n_slots: int, k: int) -> list[float]:
    if slot_weights is None:
        low = _checks.positive_float(OP, "low_weight", low_weight)
        return [low] * (n_slots - k) + [1.0] * k
    if isinstance(slot_weights, Tensor):
        slot_weights = slot_weights.detach().cpu().tolist()
    if isinstance(slot_weights, (str, bytes)) or not isinstance(slot_weights, Sequence):
        raise TypeError(f"{OP}: argument 'slot_weights' must be a sequence of {n_slots} positive floats; got {type(slot_weights).__name__}")
    if len(slot_weights) != n_slots:
        raise ValueError(f"{OP}: argument 'slot_weights' must hold one weight per slot ({n_slots}); got {len(slot_weights)}")
    return [_checks.positive_float(OP, "slot_weights", weight) for weight in slot_weights]


def _anchor_mass(scores: Tensor, anchor_mass, total_rows: int) -> Tensor:
    """The uniform masses N/K, after checking that a given ``anchor_mass`` is uniform.

    The kernels always get the uniform masses: only they are feasible, and with the value checks
    off a non-uniform mass would otherwise make plain-domain potentials drift by K·r_a/N per
    iteration until they overflow.
    """
    dtype = reference.compute_dtype(scores.dtype)
    shape = scores.shape[:-2] + scores.shape[-1:]
    uniform = total_rows / shape[-1]
    if anchor_mass is not None:
        given = _checks.mass_shape(OP, "anchor_mass", anchor_mass, scores, shape, "K")
        if _checks.value_checks_enabled() and given.numel():
            low, high = float(given.amin()), float(given.amax())
            if not (abs(low - uniform) <= 1e-4 * uniform and abs(high - uniform) <= 1e-4 * uniform):
                raise ValueError(
                    f"{OP}: argument 'anchor_mass' must be uniform, N/K = {uniform:.6g} for every anchor: the Multi-SK "
                    f"marginals are only consistent for equal anchor masses (summing them gives K·r_a = N), and the "
                    f"result does not depend on them; got masses from {low:.6g} to {high:.6g}"
                )
    return scores.new_full(shape, uniform, dtype=dtype)


def _check(backend, scores, eps, n_iters, slot_weights, k, anchor_mass, normalize, log_domain):
    # The Rust kernel checks finiteness itself, in the column-statistics pass it makes anyway.
    if backend != "rust":
        _checks.finite(OP, "scores", scores)
    if _checks.value_checks_enabled():
        reference.check_log_range(scores, eps, max(slot_weights), OP)
    if backend == "triton" and log_domain == "off" and _checks.value_checks_enabled():
        # Triton needs no domain, but forcing the plain domain is refused as on every backend.
        reference.uses_log_domain(scores, eps, max(slot_weights), log_domain, op=OP)


def _fits_triton(scores: Tensor, slot_weights: list[float], k: int, backward: bool) -> bool:
    n_groups = len(reference.slot_groups(slot_weights, k))
    return triton_kernels(KERNELS).fits(scores.shape[-1], n_groups, scores.dtype, backward)


def _forward_rust(scores, eps, n_iters, slot_weights, k, anchor_mass, normalize, log_domain):
    b, n, m = _rust.problem_shape(scores)
    (out,) = _rust.run(
        OP,
        "multi_sinkhorn",
        reference.working_dtype(scores, eps, max(slot_weights), OP),
        [scores.reshape(b, n, m), anchor_mass.reshape(b, m)],
        [(b, n, m)],
        [eps, n_iters, list(slot_weights), k, normalize, log_domain],
        checks=_checks.value_checks_enabled(),
    )
    return out.view(scores.shape).to(scores.dtype)


def _backward_rust(grad, scores, eps, n_iters, slot_weights, k, anchor_mass, normalize, log_domain):
    """The exact VJP of the unrolled iteration and the min-max step, by the Rust reverse sweep."""
    b, n, m = _rust.problem_shape(scores)
    (out,) = _rust.run(
        OP,
        "multi_sinkhorn_backward",
        reference.working_dtype(scores, eps, max(slot_weights), OP),  # as the forward's
        [grad.reshape(b, n, m), scores.reshape(b, n, m), anchor_mass.reshape(b, m)],
        [(b, n, m)],
        [eps, n_iters, list(slot_weights), k, normalize, log_domain],
    )
    return out.view(scores.shape).to(scores.dtype)


# The Triton kernels take the slot groups, and no log_domain: they need no domain decision.
# With the value checks off, non-finite scores must give NaN problems (docs/numerics.md); the
# kernels' shifts and guards would not ensure it. With them on, such scores never get here.
def _forward_triton(scores, eps, n_iters, slot_weights, k, anchor_mass, normalize, log_domain):
    if _triton_widens(scores, eps, slot_weights):
        if not _fits_triton(scores.double(), slot_weights, k, False):
            return reference.multi_sinkhorn(scores, eps, n_iters, slot_weights, k, anchor_mass, normalize, log_domain)
        wide = _forward_triton(scores.double(), eps, n_iters, slot_weights, k, anchor_mass.double(), normalize, log_domain)
        return wide.to(scores.dtype)
    groups = reference.slot_groups(slot_weights, k)
    out = triton_kernels(KERNELS).forward(scores, eps, n_iters, groups, anchor_mass, normalize)
    return out if _checks.value_checks_enabled() else reference.poison_non_finite(out, scores)


def _backward_triton(grad, scores, eps, n_iters, slot_weights, k, anchor_mass, normalize, log_domain):
    if _triton_widens(scores, eps, slot_weights):
        if not _fits_triton(scores.double(), slot_weights, k, True):
            return reverse.backward(grad, scores, eps, n_iters, slot_weights, k, anchor_mass, normalize, log_domain)
        wide = _backward_triton(grad.double(), scores.double(), eps, n_iters, slot_weights, k, anchor_mass.double(), normalize, log_domain)
        return wide.to(scores.dtype)
    groups = reference.slot_groups(slot_weights, k)
    out = triton_kernels(KERNELS).backward(grad, scores, eps, n_iters, groups, anchor_mass, normalize)
    return reference.poison_non_finite(out, scores)


def _triton_widens(scores, eps, slot_weights) -> bool:
    """Whether narrower scores run in float64 (``reference.working_dtype``), by Triton where its
    float64 tile takes the row, else by torch. Measuring the range costs a host sync, so it is
    made only with the value checks on (they sync anyway); unchecked, such scores run in float32
    (docs/numerics.md)."""
    if scores.dtype == torch.float64 or not _checks.value_checks_enabled():
        return False
    return reference.working_dtype(scores, eps, max(slot_weights), OP) == torch.float64


_FORWARD = Kernels(
    torch=reference.multi_sinkhorn,
    rust=_forward_rust,
    triton=_forward_triton,
    empty=lambda scores, *_: scores.numel() == 0,
    fits=lambda scores, eps, n_iters, slot_weights, k, *_: _fits_triton(scores, slot_weights, k, False),
    check=_check,
)
_BACKWARD = Kernels(
    torch=reverse.backward,
    rust=_backward_rust,
    triton=_backward_triton,
    empty=lambda grad, scores, *_: scores.numel() == 0,
    fits=lambda grad, scores, eps, n_iters, slot_weights, k, *_: _fits_triton(scores, slot_weights, k, True),
)


@torch.library.custom_op("mmot::multi_sinkhorn", mutates_args=())
def multi_sinkhorn_op(
    scores: Tensor,
    eps: float,
    n_iters: int,
    slot_weights: list[float],
    k: int,
    anchor_mass: Tensor,
    normalize: str,
    log_domain: str,
    backend: str,
) -> Tensor:
    """Devices without a kernel of their own run the torch backend."""
    return _FORWARD("torch", scores, eps, n_iters, slot_weights, k, anchor_mass, normalize, log_domain)


@multi_sinkhorn_op.register_kernel(("cpu", "cuda"))
def _multi_sinkhorn_kernel(scores, eps, n_iters, slot_weights, k, anchor_mass, normalize, log_domain, backend):
    return _FORWARD(backend, scores, eps, n_iters, slot_weights, k, anchor_mass, normalize, log_domain)


@multi_sinkhorn_op.register_fake
def _multi_sinkhorn_fake(scores, eps, n_iters, slot_weights, k, anchor_mass, normalize, log_domain, backend):
    return torch.empty_like(scores)


@torch.library.custom_op("mmot::multi_sinkhorn_backward", mutates_args=())
def multi_sinkhorn_backward_op(
    grad: Tensor,
    scores: Tensor,
    eps: float,
    n_iters: int,
    slot_weights: list[float],
    k: int,
    anchor_mass: Tensor,
    normalize: str,
    log_domain: str,
    backend: str,
) -> Tensor:
    """The exact VJP of the unrolled iteration and the min-max step; other devices run the torch backend."""
    return _BACKWARD("torch", grad, scores, eps, n_iters, slot_weights, k, anchor_mass, normalize, log_domain)


@multi_sinkhorn_backward_op.register_kernel(("cpu", "cuda"))
def _multi_sinkhorn_backward_kernel(grad, scores, eps, n_iters, slot_weights, k, anchor_mass, normalize, log_domain, backend):
    return _BACKWARD(backend, grad, scores, eps, n_iters, slot_weights, k, anchor_mass, normalize, log_domain)


@multi_sinkhorn_backward_op.register_fake
def _multi_sinkhorn_backward_fake(grad, scores, eps, n_iters, slot_weights, k, anchor_mass, normalize, log_domain, backend):
    return torch.empty_like(scores)


def _setup_context(ctx, inputs, output):
    scores, eps, n_iters, slot_weights, k, anchor_mass, normalize, log_domain, backend = inputs
    ctx.save_for_backward(scores, anchor_mass)
    ctx.params = (eps, n_iters, slot_weights, k, normalize, log_domain, backend)


def _backward(ctx, grad):
    scores, anchor_mass = ctx.saved_tensors
    eps, n_iters, slot_weights, k, normalize, log_domain, backend = ctx.params
    grad_scores = multi_sinkhorn_backward_op(
        grad.contiguous(), scores, eps, n_iters, slot_weights, k, anchor_mass, normalize, log_domain, backend
    )
    return grad_scores, None, None, None, None, None, None, None, None


multi_sinkhorn_op.register_autograd(_backward, setup_context=_setup_context)
