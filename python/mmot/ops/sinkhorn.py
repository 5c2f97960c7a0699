"""``mmot.sinkhorn``: the SwAV-style Sinkhorn-Knopp, its ``mmot::sinkhorn`` op and its gradient."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mmot import _backend, _checks, _rust, reference, reference_ext
from mmot._columns import LOCAL, ShardedColumns
from mmot.ops import _sharded
from mmot.ops import _sinkhorn_options as options
from mmot.ops._kernels import Kernels, triton_kernels
from mmot.ops._sinkhorn_options import EpsSchedule
from mmot.ops.sinkhorn_ext import sinkhorn_ext_op
from mmot.reverse import sinkhorn as reverse

OP = "mmot.sinkhorn"
KERNELS = "sinkhorn"  # mmot.kernels.sinkhorn


def sinkhorn(
    scores: Tensor | Sequence[Tensor],
    eps: float = 0.05,
    n_iters: int = 3,
    *,
    row_mass: Tensor | Sequence[Tensor] | None = None,
    col_mass: Tensor | Sequence[Tensor] | None = None,
    row_counts: Tensor | None = None,
    col_counts: Tensor | None = None,
    tol: float | None = None,
    return_info: bool = False,
    eps_schedule: str | EpsSchedule | None = None,
    init: tuple[Tensor | None, Tensor | None] | None = None,
    return_potentials: bool = False,
    grad: str = "unrolled",
    reach: float | None = None,
    log_domain: str | bool = "auto",
    process_group=None,
    backend: str = "auto",
):
    r"""Balanced soft assignment of N samples to K prototypes (SwAV's Sinkhorn-Knopp).

    Math: P ∝ exp(scores / eps), then ``n_iters`` times

    1. scale every column so that it sums to ``col_mass`` (default N/K each);
    2. scale every row so that it sums to ``row_mass`` (default 1 each).

    Rows of the result sum to ``row_mass`` exactly, columns to ``col_mass`` approximately.
    With the defaults this is SwAV's ``distributed_sinkhorn`` transposed: SwAV's Q is K×B.

    Args:
        scores: (..., N, K) float tensor; leading dimensions are independent problems.
        eps: entropic temperature, > 0, with 1/eps finite in the accumulation dtype. Scores
            whose exponent range (max − min of a column) / eps float32 cannot hold are computed
            in float64; past float64's (finfo.max/8) eps is refused (docs/numerics.md).
        n_iters: number of (column, row) scaling rounds, >= 1.
        row_mass: positive (N,) or (..., N) target row sums. Default: total / N each.
        col_mass: positive (K,) or (..., K) target column sums. Default: total / K each.
            The total is N when neither is given, else the sum of the one given; when both are
            given they must have equal sums.
        log_domain: "auto" picks the log domain only when exp(scores/eps) could under- or
            overflow; True or False forces it.
        process_group: a ``torch.distributed`` group over which the rows (samples) are
            sharded: each rank passes its own rows (at least one), and the column sums are
            all-reduced every iteration, forward and backward; every rank must call the op
            (and its backward) together. N in the defaults is then the total over ranks. The
            result equals the single-process call on the concatenated rows (docs/distributed.md).
        backend: "auto" (Rust on CPU, Triton on CUDA, torch elsewhere), "rust", "triton" or "torch".
            With ``process_group`` the Rust and Triton kernels run each rank's rows; "torch" is
            the reference with all-reduced column sums.

    Options (docs/sinkhorn_options.md; none of them combines with ``process_group``):
        row_counts, col_counts: (...) integer tensors giving every problem of a padded batch
            its own size N_b <= N, K_b <= K (rows and columns beyond are padding: ignored,
            whatever their values, and 0 in every output and gradient). ``scores`` may also
            be a list of 2-D tensors (masses then lists too); the results are lists.
        tol: stop each problem once its marginal error (max_j |Σ_i P_ij − c_j| / c_j) is at
            most ``tol``; ``n_iters`` is then the cap. None: exactly ``n_iters`` iterations.
        return_info: also return a :class:`mmot.SinkhornInfo` (iterations and marginal error
            per problem), so that non-convergence is never silent.
        eps_schedule: "geometric" or :class:`mmot.EpsSchedule`: ε-scaling from the scores'
            range down to ``eps`` (log domain; ``n_iters`` counts every iteration).
        init: (f, g) log-potentials in score units from ``return_potentials`` (either may be
            None; g alone starts with a row step against it): a warm start. No gradient.
        return_potentials: also return (f, g) with P = exp((scores + f_i + g_j) / eps).
        grad: "unrolled" (the exact gradient of the iterations run) or "implicit" (the
            gradient of the converged fixed point, by an adjoint solve: memory O(N·K) and time
            independent of ``n_iters``; use it with a converged forward, e.g. with ``tol``).
        reach: unbalanced transport: KL relaxation weight of both marginals (POT's ``reg_m``
            of ``ot.unbalanced.sinkhorn_unbalanced`` with M = −scores, reg = eps). None:
            balanced. Masses need not have equal totals then.

    Returns:
        P with the shape and dtype of ``scores`` (a list for list input), followed by (f, g)
        when ``return_potentials`` and a :class:`mmot.SinkhornInfo` when ``return_info``.
        Gradients flow to ``scores`` only.

    Example:
        >>> import torch, mmot
        >>> logits = torch.randn(256, 30)          # 256 samples, 30 prototypes
        >>> q = mmot.sinkhorn(logits, eps=0.05, n_iters=3)
        >>> torch.allclose(q.sum(-1), torch.ones(256))
        True
    """
    options = (row_counts, col_counts, tol, eps_schedule, init, reach)
    if isinstance(scores, (list, tuple)) or any(o is not None for o in options) or return_info or return_potentials or grad != "unrolled":
        if process_group is not None:
            raise ValueError(
                f"{OP}: the options (ragged sizes, tol, return_info, eps_schedule, init, return_potentials, grad, reach) "
                f"do not combine with 'process_group'"
            )
        return _with_options(
            scores,
            eps,
            n_iters,
            row_mass,
            col_mass,
            row_counts,
            col_counts,
            tol,
            return_info,
            eps_schedule,
            init,
            return_potentials,
            grad,
            reach,
            log_domain,
            backend,
        )
    scores = _checks.float_tensor(OP, "scores", scores, min_dim=2, shape_hint="(..., N, K)")
    eps = _checks.reciprocal_fits(OP, "eps", _checks.positive_float(OP, "eps", eps), scores.dtype)
    n_iters = _checks.int_in_range(OP, "n_iters", n_iters, 1)
    flag = _checks.log_domain_flag(OP, log_domain)
    distributed = _checks.process_group(OP, process_group)
    backend = _backend.resolve_backend(OP, backend, scores.device, KERNELS, distributed=distributed)
    n_rows, n_cols = scores.shape[-2:]
    if n_cols == 0:
        raise ValueError(f"{OP}: argument 'scores' must have at least one column (K >= 1); got shape {tuple(scores.shape)}")
    columns = ShardedColumns(process_group) if distributed else LOCAL
    total_rows = columns.total_rows(n_rows, scores.device) if distributed else n_rows
    rows, cols = _resolve_masses(scores, row_mass, col_mass, total_rows, columns)

    if distributed:
        _check_values(scores, rows, cols, columns)
        if backend == "torch":
            if _checks.value_checks_enabled():
                reference.check_log_range(scores, eps, 1.0, OP, columns)
            return reference.sinkhorn(scores, eps, n_iters, rows, cols, flag, columns)
        return _sharded.sinkhorn(scores, eps, n_iters, rows, cols, flag, columns, backend)
    if scores.numel() == 0:
        return scores.new_empty(scores.shape)
    return sinkhorn_op(scores, eps, n_iters, rows, cols, flag, backend)


def _with_options(
    scores,
    eps,
    n_iters,
    row_mass,
    col_mass,
    row_counts,
    col_counts,
    tol,
    return_info,
    eps_schedule,
    init,
    return_potentials,
    grad,
    reach,
    log_domain,
    backend,
):
    """The options path: checks, then ``mmot::sinkhorn_ext`` on the padded batch."""
    batch = options.batch(OP, scores, row_counts, col_counts)
    eps = _checks.reciprocal_fits(OP, "eps", _checks.positive_float(OP, "eps", eps), batch.dtype)
    n_iters = _checks.int_in_range(OP, "n_iters", n_iters, 1)
    tol = options.tolerance(OP, tol)
    grad = options.grad_mode(OP, grad)
    reach = options.reach_value(OP, reach)
    flag = _checks.log_domain_flag(OP, log_domain)
    backend = _backend.resolve_backend(OP, backend, batch.scores.device, KERNELS)
    if eps_schedule is not None and flag == "off":
        raise ValueError(f"{OP}: argument 'eps_schedule' runs in the log domain; log_domain=False cannot be honoured")
    dtype = reference.compute_dtype(batch.dtype)
    rows, cols = _ragged_masses(batch, row_mass, col_mass, dtype)
    eps_start, decay = options.schedule(OP, eps_schedule, eps, n_iters, batch)
    init_f = _initial_rows(batch, init, batch.scores.to(dtype), (rows, cols), eps_start, eps, reach)
    plan, f, g, iters, err = sinkhorn_ext_op(
        batch.scores,
        rows,
        cols,
        batch.row_counts,
        batch.col_counts,
        init_f,
        eps_start,
        eps,
        decay,
        n_iters,
        tol,
        reach,
        flag,
        grad,
        backend,
    )
    result = [batch.matrices(plan)]
    if return_potentials:
        result.append((batch.vectors(f, along_rows=True), batch.vectors(g, along_rows=False)))
    if return_info:
        result.append(options.SinkhornInfo(batch.per_problem(iters), batch.per_problem(err)))
    return result[0] if len(result) == 1 else tuple(result)


def _ragged_masses(batch, row_mass, col_mass, dtype) -> tuple[Tensor, Tensor]:
    """(B, N) and (B, K) masses, 0 in the padding, checked in the op; with neither given, two
    empty tensors, which the op takes for the defaults (``options.masses_or_defaults``)."""
    if row_mass is None and col_mass is None:
        empty = batch.scores.new_empty((0,), dtype=dtype)
        return empty, empty
    b, n, k = batch.scores.shape
    row_valid, col_valid = batch.valid()
    rows = None if row_mass is None else _given_mass(batch, "row_mass", row_mass, n, row_valid, dtype)
    cols = None if col_mass is None else _given_mass(batch, "col_mass", col_mass, k, col_valid, dtype)
    n_b, k_b = batch.row_counts.to(dtype)[:, None], batch.col_counts.to(dtype)[:, None]
    if cols is None:
        cols = torch.where(col_valid, rows.sum(-1, keepdim=True) / k_b, 0.0)
    elif rows is None:
        rows = torch.where(row_valid, cols.sum(-1, keepdim=True) / n_b, 0.0)
    return rows.contiguous(), cols.contiguous()


def _given_mass(batch, name: str, mass, size: int, valid: Tensor, dtype) -> Tensor:
    """A user's masses as (B, L) in ``dtype``, checked positive on the valid entries, 0 elsewhere."""
    if batch.shapes is not None:
        if not isinstance(mass, (list, tuple)) or len(mass) != len(batch.shapes):
            raise ValueError(f"{OP}: argument '{name}' must be a list of {len(batch.shapes)} 1-D tensors when 'scores' is a list")
        padded = batch.scores.new_zeros((len(mass), size), dtype=dtype)
        for index, m in enumerate(mass):
            m = _checks.float_tensor(OP, f"{name}[{index}]", m, min_dim=1, shape_hint="(L,)")
            length = int(valid[index].sum())
            if m.shape != (length,):
                raise ValueError(f"{OP}: argument '{name}[{index}]' must have shape ({length},); got {tuple(m.shape)}")
            padded[index, :length] = m.to(dtype)
        mass = padded
    else:
        full = batch.batch_shape + (size,)
        mass = _checks.mass_shape(OP, name, mass, batch.scores, full, "N" if name == "row_mass" else "K").reshape(-1, size).to(dtype)
    return torch.where(valid, mass, 0.0)


def _initial_rows(batch, init, work: Tensor, masses: tuple[Tensor, Tensor], eps_start: Tensor, eps: float, reach: float) -> Tensor:
    """The starting row potential f0 (B, N): zeros (cold), the given f, or a row step against the given g."""
    if init is None:
        return work.new_zeros(work.shape[:-1])
    if not isinstance(init, (tuple, list)) or len(init) != 2:
        raise TypeError(f"{OP}: argument 'init' must be a pair (f, g) of tensors (either may be None); got {type(init).__name__}")
    f, g = init
    b, n, k = work.shape
    if f is not None:
        return _init_part(batch, "init[0]", f, n, batch.valid()[0], work.dtype)
    if g is None:
        return work.new_zeros(work.shape[:-1])
    row_valid, col_valid = batch.valid()
    g = _init_part(batch, "init[1]", g, k, col_valid, work.dtype)
    e = torch.clamp(eps_start, min=eps).to(work.dtype)[:, None]
    tau = 1.0 if math.isinf(reach) else reach / (reach + e)
    rows = options.masses_or_defaults(work.shape, work.dtype, *masses, batch.row_counts, batch.col_counts)[0]
    lse = reference_ext.masked_lse((work + g.unsqueeze(-2)) / e.unsqueeze(-1), col_valid.unsqueeze(-2), -1).squeeze(-1)
    f0 = e * torch.where(row_valid, rows, 1.0).log() - tau * e * lse
    return torch.where(row_valid, f0, 0.0).detach()


def _init_part(batch, name: str, value, size: int, valid: Tensor, dtype) -> Tensor:
    if batch.shapes is not None:
        if not isinstance(value, (list, tuple)) or len(value) != len(batch.shapes):
            raise ValueError(f"{OP}: argument '{name}' must be a list of {len(batch.shapes)} 1-D tensors when 'scores' is a list")
        value = torch.nn.utils.rnn.pad_sequence(
            [_checks.float_tensor(OP, name, v, min_dim=1, shape_hint="(L,)") for v in value], batch_first=True
        )
        value = torch.nn.functional.pad(value, (0, size - value.shape[-1]))
    else:
        value = _checks.float_tensor(OP, name, value, min_dim=1, shape_hint=f"(..., {size})")
        try:
            value = value.expand(batch.batch_shape + (size,))
        except RuntimeError:
            raise ValueError(
                f"{OP}: argument '{name}' must broadcast to {tuple(batch.batch_shape + (size,))}; got shape {tuple(value.shape)}"
            ) from None
    value = value.reshape(-1, size).detach().to(dtype)
    return torch.where(valid, value, 0.0).contiguous()


def _resolve_masses(scores: Tensor, row_mass, col_mass, total_rows: int, columns) -> tuple[Tensor, Tensor]:
    """Broadcast user masses to (..., N) and (..., K) and fill in the defaults."""
    dtype = reference.compute_dtype(scores.dtype)
    row_shape, col_shape = scores.shape[:-1], scores.shape[:-2] + scores.shape[-1:]
    rows = None if row_mass is None else _checks.mass_shape(OP, "row_mass", row_mass, scores, row_shape, "N").to(dtype)
    cols = None if col_mass is None else _checks.mass_shape(OP, "col_mass", col_mass, scores, col_shape, "K").to(dtype)
    if rows is None and cols is None:
        # The defaults need no reductions: the total is the number of rows (over all ranks).
        rows = scores.new_ones(row_shape, dtype=dtype)
        cols = scores.new_full(col_shape, total_rows, dtype=dtype).div_(col_shape[-1])
    if cols is None:
        total = columns.sum(rows.sum(-1, keepdim=True))
        cols = (total / col_shape[-1]).expand(col_shape)
    if rows is None:
        rows = (cols.sum(-1, keepdim=True) / total_rows).expand(row_shape)
    return rows.contiguous(), cols.contiguous()


def _check_values(scores: Tensor, rows: Tensor, cols: Tensor, columns=LOCAL, finite: bool = True) -> None:
    if finite:
        _checks.finite(OP, "scores", scores)
    _checks.positive_masses(OP, "row_mass", rows)
    _checks.positive_masses(OP, "col_mass", cols, columns.sum(rows.sum(-1)), "the total of row_mass")


def _check(backend, scores, eps, n_iters, row_mass, col_mass, log_domain):
    # The Rust kernel checks finiteness itself, in its column-statistics pass.
    _check_values(scores, row_mass, col_mass, finite=backend != "rust")
    if _checks.value_checks_enabled():
        reference.check_log_range(scores, eps, 1.0, OP)
    if backend == "triton" and log_domain == "off" and _checks.value_checks_enabled():
        # Triton needs no domain, but forcing the plain domain is refused as on every backend.
        reference.uses_log_domain(scores, eps, 1.0, log_domain, op=OP)


# With the value checks off, non-finite scores must give NaN problems (docs/numerics.md); the
# kernels' shifts and guards would not ensure it. With them on, such scores never get here.
def _forward_triton(scores, eps, n_iters, row_mass, col_mass, log_domain):
    if _triton_widens(scores, eps):
        if not triton_kernels(KERNELS).fits(scores.shape[-1], torch.float64):
            return reference.sinkhorn(scores, eps, n_iters, row_mass, col_mass, log_domain)
        wide = _forward_triton(scores.double(), eps, n_iters, row_mass.double(), col_mass.double(), log_domain)
        return wide.to(scores.dtype)
    out = triton_kernels(KERNELS).forward(scores, eps, n_iters, row_mass, col_mass, log_domain)
    return out if _checks.value_checks_enabled() else reference.poison_non_finite(out, scores)


def _backward_triton(grad, scores, eps, n_iters, row_mass, col_mass, log_domain):
    if _triton_widens(scores, eps):
        if not triton_kernels(KERNELS).fits(scores.shape[-1], torch.float64):
            return reverse.backward(grad, scores, eps, n_iters, row_mass, col_mass, log_domain)
        wide = _backward_triton(grad.double(), scores.double(), eps, n_iters, row_mass.double(), col_mass.double(), log_domain)
        return wide.to(scores.dtype)
    out = triton_kernels(KERNELS).backward(grad, scores, eps, n_iters, row_mass, col_mass, log_domain)
    return reference.poison_non_finite(out, scores)


def _triton_widens(scores, eps) -> bool:
    """Whether narrower scores run in float64 (``reference.working_dtype``), by Triton where its
    float64 tile takes the row, else by torch. Measuring the range costs a host sync, so it is
    made only with the value checks on (they sync anyway); unchecked, such scores run in float32
    with floored logits (docs/numerics.md)."""
    if scores.dtype == torch.float64 or not _checks.value_checks_enabled():
        return False
    return reference.working_dtype(scores, eps, 1.0) == torch.float64


def _forward_rust(scores, eps, n_iters, row_mass, col_mass, log_domain):
    b, n, k = _rust.problem_shape(scores)
    (out,) = _rust.run(
        OP,
        "sinkhorn",
        reference.working_dtype(scores, eps, 1.0),
        [scores.reshape(b, n, k), row_mass.reshape(b, n), col_mass.reshape(b, k)],
        [(b, n, k)],
        [eps, n_iters, log_domain],
        checks=_checks.value_checks_enabled(),
    )
    return out.view(scores.shape).to(scores.dtype)


def _backward_rust(grad, scores, eps, n_iters, row_mass, col_mass, log_domain):
    """The exact VJP of the unrolled iteration, by the Rust kernel's own reverse sweep."""
    b, n, k = _rust.problem_shape(scores)
    (out,) = _rust.run(
        OP,
        "sinkhorn_backward",
        reference.working_dtype(scores, eps, 1.0),  # as the forward's
        [grad.reshape(b, n, k), scores.reshape(b, n, k), row_mass.reshape(b, n), col_mass.reshape(b, k)],
        [(b, n, k)],
        [eps, n_iters, log_domain],
    )
    return out.view(scores.shape).to(scores.dtype)


_FORWARD = Kernels(
    torch=reference.sinkhorn,
    rust=_forward_rust,
    triton=_forward_triton,
    empty=lambda scores, *_: scores.numel() == 0,
    fits=lambda scores, *_: triton_kernels(KERNELS).fits(scores.shape[-1], scores.dtype),
    check=_check,
)
_BACKWARD = Kernels(
    torch=reverse.backward,
    rust=_backward_rust,
    triton=_backward_triton,
    empty=lambda grad, scores, *_: scores.numel() == 0,
    fits=lambda grad, scores, *_: triton_kernels(KERNELS).fits(scores.shape[-1], scores.dtype),
)


@torch.library.custom_op("mmot::sinkhorn", mutates_args=())
def sinkhorn_op(scores: Tensor, eps: float, n_iters: int, row_mass: Tensor, col_mass: Tensor, log_domain: str, backend: str) -> Tensor:
    """Devices without a kernel of their own run the torch backend."""
    return _FORWARD("torch", scores, eps, n_iters, row_mass, col_mass, log_domain)


@sinkhorn_op.register_kernel(("cpu", "cuda"))
def _sinkhorn_kernel(scores, eps, n_iters, row_mass, col_mass, log_domain, backend):
    return _FORWARD(backend, scores, eps, n_iters, row_mass, col_mass, log_domain)


@sinkhorn_op.register_fake
def _sinkhorn_fake(scores, eps, n_iters, row_mass, col_mass, log_domain, backend):
    return torch.empty_like(scores)


@torch.library.custom_op("mmot::sinkhorn_backward", mutates_args=())
def sinkhorn_backward_op(
    grad: Tensor, scores: Tensor, eps: float, n_iters: int, row_mass: Tensor, col_mass: Tensor, log_domain: str, backend: str
) -> Tensor:
    """The exact VJP of the unrolled iteration; devices without a kernel of their own run the torch backend."""
    return _BACKWARD("torch", grad, scores, eps, n_iters, row_mass, col_mass, log_domain)


@sinkhorn_backward_op.register_kernel(("cpu", "cuda"))
def _sinkhorn_backward_kernel(grad, scores, eps, n_iters, row_mass, col_mass, log_domain, backend):
    return _BACKWARD(backend, grad, scores, eps, n_iters, row_mass, col_mass, log_domain)


@sinkhorn_backward_op.register_fake
def _sinkhorn_backward_fake(grad, scores, eps, n_iters, row_mass, col_mass, log_domain, backend):
    return torch.empty_like(scores)


def _setup_context(ctx, inputs, output):
    scores, eps, n_iters, row_mass, col_mass, log_domain, backend = inputs
    ctx.save_for_backward(scores, row_mass, col_mass)
    ctx.params = (eps, n_iters, log_domain, backend)


def _backward(ctx, grad):
    scores, row_mass, col_mass = ctx.saved_tensors
    eps, n_iters, log_domain, backend = ctx.params
    grad_scores = sinkhorn_backward_op(grad.contiguous(), scores, eps, n_iters, row_mass, col_mass, log_domain, backend)
    return grad_scores, None, None, None, None, None, None


sinkhorn_op.register_autograd(_backward, setup_context=_setup_context)
