"""Forward and reverse of ``mmot::pairwise_similarity_regression`` in torch, through D×D Grams.

For a pair of modalities (a, b) with R the rows present in both (0/1 row weights r), n = |R|,
K = n(n − 1), s_ij = â_i·b̂_j, t the match target and u the non-match target:

    match    = (1/n) Σ_{i∈R} (s_ii − t)²                                     (O(N·D), direct)
    nonmatch = (1/K) Σ_{i≠j∈R} (s_ij − u)²
             = (1/K) [⟨G_a, G_b⟩ − Σ_R s_ii² − 2u (σ_a·σ_b − Σ_R s_ii) + K u²]

with the D×D Grams G_a = Â_RᵀÂ_R, G_b = B̂_RᵀB̂_R and the row sums σ_a = Σ_R â_i, σ_b = Σ_R b̂_j
(Σ_{i,j∈R} s_ij² = ⟨G_a, G_b⟩, Σ_{i,j∈R} s_ij = σ_a·σ_b). The non-match sum is a sum of squares
that rounding may leave slightly below 0: it is clamped at 0 (and a clamped term passes no
gradient). When every row is present, each modality's Gram and row sum serve all its pairs.

**Reverse.** With c0, c1 the cotangents of a pair's two terms, and per row

    g_i = r_i [2c0 (s_ii − t)/n − 2c1 (s_ii − u)/K]

    ∂â_i = r_i [(2c1/K) â_i G_b − (2c1 u/K) σ_b] + g_i b̂_i      (and the same with a, b swapped)

summed over the pairs a modality is in; with every row present that is one N×D by D×D product
per modality with Σ_pairs (2c1/K) G_other. Then through the L2 normalisation.

**Margin.** With a margin μ the non-match term is (1/K) Σ_{i≠j∈R} max(0, s_ij − u − μ)², which is
not a polynomial in s: it is summed over row blocks of the similarity matrix (a B×N tile at a
time, never N×N), and the reverse recomputes each tile, h_ij = (2c1/K) max(0, s_ij − u − μ),
∂Â_R += H B̂_R, ∂B̂_R += Hᵀ Â_R.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot.reference import compute_dtype
from mmot.reverse.similarity import unit_rows, unit_rows_backward

TILE_ROWS = 1024  # rows of a similarity tile in the margin path


def operands(x: Tensor, normalize: bool) -> tuple[Tensor, Tensor | None]:
    """(x̂, ‖x‖ or None) of x (M, N, D) in the accumulation dtype."""
    rows = x.to(compute_dtype(x.dtype))
    if normalize:
        return unit_rows(rows)
    return rows, None


def _weights(present: Tensor | None, m: int, n: int, like: Tensor) -> Tensor | None:
    return None if present is None else present.to(like.dtype)


def _pairs(m: int):
    return [(p, q) for p in range(m) for q in range(p + 1, m)]


def hinge_tile(a: Tensor, b: Tensor, r: Tensor | None, start: int, stop: int, shift: float) -> Tensor:
    """max(0, s_ij − shift) for rows start..stop of a against every row of b, 0 on the diagonal and outside R."""
    h = (a[start:stop] @ b.T - shift).clamp_min(0.0)
    idx = torch.arange(start, stop, device=a.device)
    h[idx - start, idx] = 0.0
    if r is not None:
        h = h * r[start:stop, None] * r[None, :]
    return h


def _hinge_sum(a: Tensor, b: Tensor, r: Tensor | None, shift: float) -> Tensor:
    """Σ_{i≠j∈R} max(0, a_i·b_j − shift)² over row blocks of a."""
    total = a.new_zeros(())
    n = a.shape[0]
    for start in range(0, n, TILE_ROWS):
        total = total + hinge_tile(a, b, r, start, min(start + TILE_ROWS, n), shift).square().sum()
    return total


def forward(x: Tensor, present: Tensor | None, t: float, u: float, margin: float | None, normalize: bool) -> Tensor:
    """(2, M, M): [match, nonmatch] means of each pair p < q (0 elsewhere), in the accumulation dtype."""
    units, _ = operands(x, normalize)
    m, n = units.shape[0], units.shape[1]
    out = units.new_zeros((2, m, m))
    w = _weights(present, m, n, units)
    grams = sums = None
    if w is None and margin is None:
        grams = units.transpose(1, 2) @ units
        sums = units.sum(1)
    for p, q in _pairs(m):
        a, b = units[p], units[q]
        r = None if w is None else w[p] * w[q]
        count = float(n) if r is None else float(r.sum())
        if count == 0:
            continue
        diag = (a * b).sum(-1)
        dev = (diag - t).square()
        out[0, p, q] = (dev.sum() if r is None else (r * dev).sum()) / count
        k = count * (count - 1.0)
        if k == 0:
            continue
        if margin is not None:
            out[1, p, q] = _hinge_sum(a, b, r, u + margin) / k
            continue
        if r is not None:
            a, b = a * r[:, None], b * r[:, None]
            diag = diag * r
        if grams is not None:
            ga, gb, sa, sb = grams[p], grams[q], sums[p], sums[q]
        else:
            ga, gb, sa, sb = a.T @ a, b.T @ b, a.sum(0), b.sum(0)
        total = (ga * gb).sum() - diag.square().sum() - 2.0 * u * (sa @ sb - diag.sum()) + k * u * u
        out[1, p, q] = total.clamp_min(0.0) / k
    return out


def backward(c: Tensor, x: Tensor, present: Tensor | None, t: float, u: float, margin: float | None, normalize: bool) -> Tensor:
    """∂/∂x of Σ c ⊙ forward(...), c (2, M, M) the cotangents of the [match, nonmatch] means."""
    if x.numel() == 0:
        return torch.zeros_like(x)
    units, norms = operands(x, normalize)
    c = c.to(units.dtype)
    m, n = units.shape[0], units.shape[1]
    grad = torch.zeros_like(units)
    w = _weights(present, m, n, units)
    all_rows = w is None and margin is None
    if all_rows:
        grams = units.transpose(1, 2) @ units
        sums = units.sum(1)
        mixed = torch.zeros_like(grams)  # Σ over pairs of (2c1/K) G_other, per modality
    for p, q in _pairs(m):
        a, b = units[p], units[q]
        r = None if w is None else w[p] * w[q]
        count = float(n) if r is None else float(r.sum())
        if count == 0:
            continue
        k = count * (count - 1.0)
        c0, c1 = c[0, p, q], c[1, p, q] if k > 0 else c.new_zeros(())
        diag = (a * b).sum(-1)
        g = 2.0 * c0 * (diag - t) / count
        if k > 0:
            g = g - 2.0 * c1 * (diag - u) / k if margin is None else g
        if r is not None:
            g = g * r
        grad[p] += g[:, None] * b
        grad[q] += g[:, None] * a
        if k == 0:
            continue
        scale = 2.0 * c1 / k
        if margin is not None:
            for start in range(0, n, TILE_ROWS):
                stop = min(start + TILE_ROWS, n)
                h = scale * hinge_tile(a, b, r, start, stop, u + margin)
                grad[p, start:stop] += h @ b
                grad[q] += h.T @ a[start:stop]
            continue
        if all_rows:
            mixed[p] += scale * grams[q]
            mixed[q] += scale * grams[p]
            grad[p] -= (scale * u) * sums[q]
            grad[q] -= (scale * u) * sums[p]
            continue
        ar, br = a * r[:, None], b * r[:, None]
        ga, gb, sa, sb = ar.T @ ar, br.T @ br, ar.sum(0), br.sum(0)
        grad[p] += scale * (ar @ gb) - (scale * u) * r[:, None] * sb
        grad[q] += scale * (br @ ga) - (scale * u) * r[:, None] * sa
    if all_rows:
        grad = grad + units @ mixed
    if normalize:
        grad = unit_rows_backward(grad, units, norms)
    return grad.to(x.dtype)
