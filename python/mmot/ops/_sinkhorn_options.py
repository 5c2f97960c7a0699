"""The Sinkhorn ops' options: argument checks and the padded batch they run on.

Ragged problems (``row_counts``/``col_counts`` or a list of matrices), early stopping (``tol``,
``return_info``), ε-scaling (``eps_schedule``), warm starts (``init``, ``return_potentials``),
implicit gradients (``grad``) and unbalanced marginals (``reach``) all run on one padded
(B, N, K) batch with per-problem sizes (docs/sinkhorn_options.md). This module turns the public
arguments into that batch and the results back into the caller's shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import NamedTuple

import torch
from torch import Tensor

from mmot import _checks, reference_ext

GRAD_CHOICES = ("unrolled", "implicit")


class SinkhornInfo(NamedTuple):
    """What a Sinkhorn call did, per problem (shaped as the batch; one entry per matrix of a list).

    ``n_iters``: iterations run (int64). ``marginal_error``: max over columns of the relative gap
    between the returned plan's column sums and their target, |Σ_i P_ij − c_j| / c_j (for
    ``reach``: the target the next column scaling would set). With ``tol`` a problem stopped
    early where ``marginal_error <= tol``; one that shows ``n_iters`` at the cap and a larger
    error did not converge.
    """

    n_iters: Tensor
    marginal_error: Tensor


@dataclass(frozen=True)
class EpsSchedule:
    """Geometric ε-scaling: ε_t = max(eps, start · decay^t).

    ``start`` defaults to each problem's score range (max − min), where the plan is still close
    to uniform. The start is lowered where needed so that the last of ``n_iters`` iterations
    runs at ``eps``; with ``tol``, a problem stops only once ε_t has reached ``eps``.
    """

    decay: float = 0.9
    start: float | None = None


@dataclass
class Batch:
    """A padded (B, N, K) batch in the working dtype, with what is needed to undo the padding."""

    scores: Tensor
    row_counts: Tensor
    col_counts: Tensor
    batch_shape: torch.Size
    shapes: list[tuple[int, int]] | None  # the matrices' shapes for list input, else None
    dtype: torch.dtype  # the caller's dtype
    padded: bool  # whether any problem is smaller than the batch (counts or a list given)

    def valid(self) -> tuple[Tensor, Tensor]:
        """(B, N) and (B, K) masks of the valid rows and columns."""
        rows, cols = reference_ext.valid_masks(self.scores.shape, self.row_counts, self.col_counts)
        return rows.squeeze(-1), cols.squeeze(-2)

    def matrices(self, out: Tensor) -> Tensor | list[Tensor]:
        """(B, N, K) results in the caller's layout: (..., N, K), or a list of (n_b, k_b)."""
        out = out.to(self.dtype)
        if self.shapes is None:
            return out.reshape(self.batch_shape + out.shape[-2:])
        return [out[b, :n, :k] for b, (n, k) in enumerate(self.shapes)]

    def vectors(self, out: Tensor, along_rows: bool) -> Tensor | list[Tensor]:
        """(B, L) per-row or per-column results in the caller's layout."""
        out = out.to(self.dtype)
        if self.shapes is None:
            return out.reshape(self.batch_shape + out.shape[-1:])
        return [out[b, : shape[0 if along_rows else 1]] for b, shape in enumerate(self.shapes)]

    def per_problem(self, out: Tensor) -> Tensor:
        return out if self.shapes is not None else out.reshape(self.batch_shape)


def batch(op: str, scores, row_counts, col_counts) -> Batch:
    """Scores as a padded batch: a (..., N, K) tensor with optional per-problem counts, or a list of 2-D tensors."""
    if isinstance(scores, (list, tuple)):
        if row_counts is not None or col_counts is not None:
            raise ValueError(f"{op}: arguments 'row_counts' and 'col_counts' are taken from the shapes when 'scores' is a list; pass None")
        return _pad_list(op, scores)
    scores = _checks.float_tensor(op, "scores", scores, min_dim=2, shape_hint="(..., N, K)")
    batch_shape, (n, k) = scores.shape[:-2], scores.shape[-2:]
    if k == 0:
        raise ValueError(f"{op}: argument 'scores' must have at least one column (K >= 1); got shape {tuple(scores.shape)}")
    flat = scores.reshape((-1, n, k))
    rows = _counts(op, "row_counts", row_counts, batch_shape, n, scores.device)
    cols = _counts(op, "col_counts", col_counts, batch_shape, k, scores.device)
    return Batch(flat, rows, cols, batch_shape, None, scores.dtype, row_counts is not None or col_counts is not None)


def _pad_list(op: str, matrices) -> Batch:
    if len(matrices) == 0:
        raise ValueError(f"{op}: argument 'scores' must hold at least one matrix; got an empty list")
    first = None
    for index, m in enumerate(matrices):
        name = f"scores[{index}]"
        m = _checks.float_tensor(op, name, m, min_dim=2, shape_hint="(N, K)")
        if m.dim() != 2 or m.shape[0] == 0 or m.shape[1] == 0:
            raise ValueError(f"{op}: argument '{name}' must be a non-empty 2-D (N, K) matrix; got shape {tuple(m.shape)}")
        if first is None:
            first = m
        elif m.dtype != first.dtype or m.device != first.device:
            raise ValueError(
                f"{op}: argument '{name}' must have the dtype and device of scores[0] ({first.dtype}, {first.device}); "
                f"got {m.dtype}, {m.device}"
            )
    shapes = [(int(m.shape[0]), int(m.shape[1])) for m in matrices]
    n, k = max(s[0] for s in shapes), max(s[1] for s in shapes)
    padded = first.new_zeros((len(matrices), n, k))
    for b, m in enumerate(matrices):
        padded[b, : m.shape[0], : m.shape[1]] = m
    rows = torch.tensor([s[0] for s in shapes], dtype=torch.int64, device=first.device)
    cols = torch.tensor([s[1] for s in shapes], dtype=torch.int64, device=first.device)
    return Batch(padded, rows, cols, torch.Size([len(matrices)]), shapes, first.dtype, True)


def _counts(op: str, name: str, counts, batch_shape: torch.Size, size: int, device) -> Tensor:
    if counts is None:
        return torch.full((math.prod(batch_shape),), size, dtype=torch.int64, device=device)
    if not isinstance(counts, Tensor) or counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
        raise TypeError(
            f"{op}: argument '{name}' must be an integer tensor of shape {tuple(batch_shape)}; got {type(counts).__name__}"
            + (f" of {counts.dtype}" if isinstance(counts, Tensor) else "")
        )
    if counts.shape != batch_shape:
        raise ValueError(f"{op}: argument '{name}' must have the batch shape {tuple(batch_shape)} of 'scores'; got {tuple(counts.shape)}")
    _checks.same_device(op, name, counts, torch.empty(0, device=device), "scores")
    return counts.reshape(-1).to(torch.int64)


def masked_fill_valid(batch: Batch) -> Tensor:
    """:func:`fill_padding` of the batch's scores (the scores themselves when nothing is padded)."""
    if not batch.padded:
        return batch.scores
    return fill_padding(batch.scores, batch.row_counts, batch.col_counts)


def fill_padding(scores: Tensor, row_counts: Tensor, col_counts: Tensor) -> Tensor:
    """The scores with every padded entry replaced by a valid score of its problem (row 0 of its
    column, or entry (0, 0) in padded columns): the column ranges that decide the domain and the
    dtype are then those of the valid entries, and padding values (even NaN) never matter."""
    rows, cols = reference_ext.valid_masks(scores.shape, row_counts, col_counts)
    fill = torch.where(cols, scores[:, :1, :], scores[:, :1, :1])
    return torch.where(rows & cols, scores, fill)


def masses_or_defaults(shape: torch.Size, dtype: torch.dtype, row_mass: Tensor, col_mass: Tensor, row_counts: Tensor, col_counts: Tensor):
    """The (B, N) and (B, K) masses, in ``dtype``, that a kernel takes for a padded batch of
    ``shape``. Two empty ones stand for the defaults (the op then skips their value checks): 1 on
    each valid row and N_b / K_b on each valid column, 0 on the padding."""
    if row_mass.numel() or col_mass.numel():
        return row_mass, col_mass
    rows, cols = reference_ext.valid_masks(shape, row_counts, col_counts)
    n_b, k_b = row_counts.to(dtype)[:, None], col_counts.to(dtype)[:, None]
    return rows.squeeze(-1).to(dtype), torch.where(cols.squeeze(-2), n_b / k_b, 0.0)


def check_counts(op: str, scores: Tensor, row_counts: Tensor, col_counts: Tensor) -> None:
    """Value check: every problem's sizes lie within the padded (B, N, K) batch (one host sync)."""
    extremes = torch.stack([*torch.aminmax(row_counts.to(torch.int64)), *torch.aminmax(col_counts.to(torch.int64))]).tolist()
    for name, (low, high), size in (("row_counts", extremes[:2], scores.shape[-2]), ("col_counts", extremes[2:], scores.shape[-1])):
        if low < 1 or high > size:
            raise ValueError(f"{op}: argument '{name}' must lie in 1..{size} (the padded size); got values from {low} to {high}")


def tolerance(op: str, tol) -> float:
    """``tol`` as a float, -1.0 for None (never stop early)."""
    if tol is None:
        return -1.0
    if isinstance(tol, bool) or not isinstance(tol, Real):
        raise TypeError(f"{op}: argument 'tol' must be a non-negative real number or None; got {type(tol).__name__}")
    tol = float(tol)
    if not 0 <= tol < math.inf:
        raise ValueError(f"{op}: argument 'tol' must be a non-negative finite number or None; got {tol}")
    return tol


def grad_mode(op: str, grad) -> str:
    return _checks.choice(op, "grad", grad, GRAD_CHOICES)


def reach_value(op: str, reach) -> float:
    """``reach`` as a float, inf for None (balanced)."""
    return math.inf if reach is None else _checks.positive_float(op, "reach", reach)


def schedule(op: str, eps_schedule, eps: float, n_iters: int, batch: Batch) -> tuple[Tensor, float]:
    """(eps_start per problem as float64, decay); no schedule is eps_start = eps."""
    filled = batch.scores
    count = filled.shape[0]
    if eps_schedule is None:
        return torch.full((count,), eps, dtype=torch.float64, device=filled.device), 0.5
    if isinstance(eps_schedule, str) and eps_schedule == "geometric":
        eps_schedule = EpsSchedule()
    if not isinstance(eps_schedule, EpsSchedule):
        raise TypeError(
            f"{op}: argument 'eps_schedule' must be None, 'geometric' or an mmot.EpsSchedule; got {type(eps_schedule).__name__}"
        )
    decay = _checks.positive_float(op, "eps_schedule.decay", eps_schedule.decay)
    if not decay < 1:
        raise ValueError(f"{op}: argument 'eps_schedule.decay' must lie in (0, 1); got {decay}")
    if eps_schedule.start is None:
        filled = masked_fill_valid(batch)
        high = filled.detach().amax((-2, -1)).double()
        low = filled.detach().amin((-2, -1)).double()
        start = high - low
    else:
        start = torch.full(
            (count,), _checks.positive_float(op, "eps_schedule.start", eps_schedule.start), dtype=torch.float64, device=filled.device
        )
    # The last iteration must run at eps: lower the start to eps / decay^(n_iters-1), with a
    # margin for the rounding of the repeated products that give ε_t.
    latest = eps * (1 - 1e-9) * math.exp(-(n_iters - 1) * math.log(decay)) if (n_iters - 1) * -math.log(decay) < 700 else math.inf
    return torch.clamp(torch.minimum(start, torch.full_like(start, latest)), min=eps), decay
