"""The specification of every mmot op, in readable pure torch.

This module is the spec in code: every backend must compute exactly these functions. It also
serves as ``backend="torch"`` and as the fallback on devices other than CPU and CUDA.
Gradients come from autograd through these loops, which is the exact gradient of the unrolled
iteration.

Arguments here are assumed valid (the public functions in :mod:`mmot` check them). Masses are
given in full, already broadcast to the batch shape.

Both Sinkhorn ops scale columns first. A constant added to a whole column of ``scores`` is
absorbed exactly by the column scaling, so the plain (exp) domain shifts every column by its
maximum before exponentiating. The plain domain is used while the remaining spread of
``w * scores / eps`` within a column stays small enough for the accumulation dtype; beyond that
(``log_domain="auto"``), or when forced, the same iteration runs on log-potentials.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmot._columns import LOCAL

# Largest column spread of w*scores/eps that the plain domain accepts, per accumulation dtype.
# exp(-50) is far above float32's smallest normal and exp(50)*N*K far below its largest.
PLAIN_DOMAIN_MAX_SPREAD = {torch.float32: 50.0, torch.float64: 300.0}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def uses_log_domain(scores: torch.Tensor, eps: float, max_weight: float, log_domain: str, columns=LOCAL, op: str = "mmot.sinkhorn") -> bool:
    """Decide the domain: ``log_domain`` is "on", "off" or "auto" (spread threshold above).

    Forcing the plain domain ("off") where "auto" would leave it raises ValueError: exp would
    under- or overflow there and the result would be NaN. ``op`` names the op in the message.
    """
    if log_domain == "on" or scores.numel() == 0:
        return log_domain == "on"
    spread = exponent_range(scores, eps, max_weight, columns)
    limit = PLAIN_DOMAIN_MAX_SPREAD[compute_dtype(scores.dtype)]
    if log_domain == "off" and spread > limit:
        raise ValueError(
            f"{op}: log_domain=False forces the plain domain, where exp would under- or overflow: the exponent range "
            f"(max - min of a score column) * weight / eps is {spread:.4g} here (eps = {eps:g}), above the plain "
            f'domain\'s limit of {limit:g} for this dtype; use log_domain="auto" (or True)'
        )
    # `not (<=)` so that a NaN spread (non-finite scores) takes the log domain, as in the kernels.
    return log_domain == "auto" and not spread <= limit


def exponent_range(scores: torch.Tensor, eps: float, max_weight: float, columns=LOCAL) -> float:
    """max over columns of (max − min of the column) · max_weight / eps, in float64 (so a spread
    beyond the dtype's range is measured, not infinite); NaN for non-finite scores."""
    scores = scores.detach()
    col_max = columns.max(scores.amax(-2)).double()
    col_min = -columns.max(-scores.amin(-2)).double()
    # Halved, so that the spread of float64 scores near finfo.max is measured, not infinite;
    # x − x is NaN exactly for an infinite x.
    spread = (0.5 * col_max - 0.5 * col_min) + (col_max - col_max) + (col_min - col_min)
    return float(spread.amax()) * max_weight / eps * 2.0


# Largest exponent range R each Sinkhorn op computes in a given accumulation dtype
# (docs/numerics.md, "Extreme scores"). sinkhorn keeps its potentials within a few log-masses of
# 0, so its results are accurate wherever the centred logits are representable (finfo.max/8).
# Multi-SK's potentials are of the size of R itself and its plan is decided by their O(1)
# differences, so past R·2^-12 units of the dtype (about 1e-3 off in its plan entries) the
# result would be decided by rounding. Float32 (float16, bfloat16) scores past their float32
# limit are computed in float64; past the float64 limit the op refuses.
MAX_EXPONENT_RANGE = {
    "mmot.sinkhorn": {torch.float32: torch.finfo(torch.float32).max / 8, torch.float64: torch.finfo(torch.float64).max / 8},
    "mmot.multi_sinkhorn": {torch.float32: 2.0**12, torch.float64: 2.0**41},
}


def working_dtype(scores: torch.Tensor, eps: float, max_weight: float, op: str = "mmot.sinkhorn", columns=LOCAL) -> torch.dtype:
    """The accumulation dtype of a Sinkhorn call: :func:`compute_dtype`, or float64 for narrower
    scores whose exponent range is past the op's float32 limit (``MAX_EXPONENT_RANGE``), whose
    column spread is past float32's largest value (the kernels' differences from the column
    maximum would be −inf) or whose eps is (it would round to inf: every logit 0). Reads the
    scores (a host sync on CUDA). Non-finite scores stay in their compute dtype."""
    dtype = compute_dtype(scores.dtype)
    if dtype == torch.float64 or scores.numel() == 0:
        return dtype
    top = torch.finfo(dtype).max
    if eps > top:
        return torch.float64
    spread = exponent_range(scores, 1.0, 1.0, columns)
    wide = spread > top or spread * max_weight / eps > MAX_EXPONENT_RANGE[op][torch.float32]
    return torch.float64 if wide else dtype


def check_log_range(scores: torch.Tensor, eps: float, max_weight: float, op: str, columns=LOCAL) -> None:
    """ValueError where the exponent range is past the op's float64 limit (``MAX_EXPONENT_RANGE``).

    Narrower scores are computed in float64 past their own limit (:func:`working_dtype`), so the
    float64 limit is the only one a caller meets.
    """
    limit = MAX_EXPONENT_RANGE[op][torch.float64]
    # The widest range narrower scores can have (spread 2·max, eps ≥ 1/max of float32) may fit:
    # then the scores need not be read.
    widest = 2 * torch.finfo(scores.dtype).max * max_weight * torch.finfo(compute_dtype(scores.dtype)).max
    if scores.numel() == 0 or widest <= limit:
        return
    spread = exponent_range(scores, eps, max_weight, columns)
    if spread > limit:
        what = "represents" if op == "mmot.sinkhorn" else "resolves (the plan would be decided by rounding)"
        raise ValueError(
            f"{op}: argument 'eps' is too small for these scores: the exponent range (max - min of a score column) "
            f"* weight / eps is {spread:.4e} here (eps = {eps:g}), beyond the {limit:.4e} that float64 {what}; "
            f"scale the scores down or raise eps"
        )


def centered_logits(s: torch.Tensor, eps: float, columns=LOCAL, weight: float = 1.0) -> torch.Tensor:
    """weight·(s − column max)/eps, floored at −(dtype max)/8 so that every log-potential stays finite.

    The column shift is absorbed exactly by the first column scaling. Without the floor a
    difference beyond the dtype's range (scores near 1e38 in float32) is −inf, and a row of
    −inf has no row normaliser: the log domain then gives NaN where the kernels give a finite
    result. Entries at the floor are exp-negligible next to their column's maximum; potentials
    and their sums stay within a few floors, inside the range. The floor passes NaN through.
    """
    shift = columns.max(s.detach().amax(-2, keepdim=True))
    # Halved, so that a difference of two finite scores cannot overflow; doubling is exact.
    return (weight * (2.0 * ((0.5 * s - 0.5 * shift) / eps))).clamp(min=logit_floor(s.dtype))


def logit_floor(dtype: torch.dtype) -> float:
    """The smallest centred logit the Sinkhorn ops use: −(largest finite value)/8."""
    return -torch.finfo(dtype).max / 8


def poison_non_finite(out: torch.Tensor, s: torch.Tensor, columns=LOCAL) -> torch.Tensor:
    """Non-finite in, non-finite out: all-NaN for every problem whose scores hold a NaN or Inf.

    Max-shifts, floors and min-max would otherwise turn such inputs into finite values.
    """
    bad = (~torch.isfinite(s.detach())).any(-1, keepdim=True).any(-2, keepdim=True).to(s.dtype)
    return torch.where(columns.max(bad) > 0, torch.full_like(out, float("nan")), out)


def _column_logsumexp(x: torch.Tensor, columns) -> torch.Tensor:
    """log Σ_n exp(x[..., n, a]), keeping dim -2; the shift is detached, which is exact."""
    shift = columns.max(x.detach().amax(-2, keepdim=True))
    return shift + torch.log(columns.sum(torch.exp(x - shift).sum(-2, keepdim=True)))


def _row_log_normalizer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split log Σ_a exp(x[..., a]) as row_max + log_norm, returning x - row_max too.

    The output entries exp(centered - log_norm) then sum to one per row to float rounding even
    when |x| is in the thousands (eps = 1e-3), where exp(x - logsumexp(x)) would lose ~1e-4.
    The detached shift is exact: the normalised entries do not depend on it.
    """
    row_max = x.detach().amax(-1, keepdim=True)
    centered = x - row_max
    return centered, torch.logsumexp(centered, dim=-1, keepdim=True), row_max


def sinkhorn(
    scores: torch.Tensor,
    eps: float,
    n_iters: int,
    row_mass: torch.Tensor,
    col_mass: torch.Tensor,
    log_domain: str = "auto",
    columns=LOCAL,
) -> torch.Tensor:
    """SwAV-style Sinkhorn-Knopp on scores (..., N, K).

    P ∝ exp(scores/eps); n_iters times: scale columns to ``col_mass`` (..., K), then rows to
    ``row_mass`` (..., N). Returns P with the input's dtype.
    """
    s = scores.to(working_dtype(scores, eps, 1.0, columns=columns))
    r = row_mass.to(s.dtype).unsqueeze(-1)
    c = col_mass.to(s.dtype).unsqueeze(-2)
    logits = centered_logits(s, eps, columns)
    if uses_log_domain(s, eps, 1.0, log_domain, columns):
        # The column potentials b stay within a few log-masses of 0: b_1 from the centred
        # logits, then b_{t+1} = b_t + log c − log Σ_n P_t from the row-normalised plan P_t,
        # whose column sums are at least c·min(r)/Σr. Row potentials, of the size of the
        # logits, are never formed, so rounding at |logits| ~ 1e20 cannot move the plan.
        log_c = torch.log(c)
        b = log_c - _column_logsumexp(logits, columns)
        for t in range(n_iters):
            centered, log_norm, _ = _row_log_normalizer(logits + b)
            plan = torch.exp(centered - log_norm) * r
            if t + 1 < n_iters:
                b = b + log_c - torch.log(columns.sum(plan.sum(-2, keepdim=True)))
    else:
        e = torch.exp(logits)
        u = torch.ones_like(r)
        for _ in range(n_iters):
            v = c / columns.sum((e * u).sum(-2, keepdim=True))
            u = r / (e * v).sum(-1, keepdim=True)
        plan = e * u * v
    return poison_non_finite(plan, s, columns).to(scores.dtype)


def slot_groups(slot_weights: list[float], k: int) -> list[tuple[float, int, int]]:
    """Group slots by equal weight: (weight, slots in the group, slots among the last k).

    Slots of equal weight start equal and are updated identically, so each group needs one
    set of potentials, however many slots it has.
    """
    n_slots = len(slot_weights)
    groups: dict[float, list[int]] = {}
    for index, weight in enumerate(slot_weights):
        counts = groups.setdefault(float(weight), [0, 0])
        counts[0] += 1
        counts[1] += index >= n_slots - k
    return [(weight, count, top) for weight, (count, top) in groups.items()]


def multi_sinkhorn(
    scores: torch.Tensor,
    eps: float,
    n_iters: int,
    slot_weights: list[float],
    k: int,
    anchor_mass: torch.Tensor,
    normalize: str = "minmax",
    log_domain: str = "auto",
    columns=LOCAL,
) -> torch.Tensor:
    """Multi-Assignment Sinkhorn-Knopp (SSPC) on scores (..., N, K), in the grouped form.

    The dense form has K slots m with weights w_m: P[m,n,a] ∝ exp(w_m S[n,a]/eps), then n_iters
    times: Σ_n P[m,n,a] = r_a, Σ_m P[m,n,a] = 1, Σ_a P[m,n,a] = 1. The output sums the last k
    slots, T[n,a] = Σ_{m ≥ K-k} P[m,n,a], min-max rescaled per row when normalize="minmax".
    With P[m,n,a] = E_G[n,a] f_G[a] g[n,a] h_G[n] for the slot group G of m, one iteration is

        f_G[a] = r_a / Σ_n E_G g h_G
        g[n,a] = 1 / Σ_G c_G E_G f_G h_G
        h_G[n] = 1 / Σ_a E_G g f_G
    """
    groups = slot_groups(slot_weights, k)
    max_weight = max(weight for weight, _, _ in groups)
    s = scores.to(working_dtype(scores, eps, max_weight, "mmot.multi_sinkhorn", columns))
    r = anchor_mass.to(s.dtype).unsqueeze(-2)

    logits = [centered_logits(s, eps, columns, weight) for weight, _, _ in groups]
    if uses_log_domain(s, eps, max_weight, log_domain, columns, "mmot.multi_sinkhorn"):
        log_count = [math.log(count) for _, count, _ in groups]
        log_r = torch.log(r)
        log_g = torch.zeros_like(s)
        log_h = [s.new_zeros(s.shape[:-1] + (1,)) for _ in groups]
        for _ in range(n_iters):
            log_f = [log_r - _column_logsumexp(lg + log_g + lh, columns) for lg, lh in zip(logits, log_h)]
            log_g = -torch.logsumexp(torch.stack([lc + lg + lf + lh for lc, lg, lf, lh in zip(log_count, logits, log_f, log_h)]), dim=0)
            rows = [_row_log_normalizer(lg + log_g + lf) for lg, lf in zip(logits, log_f)]
            log_h = [-row_max - log_norm for _, log_norm, row_max in rows]
        target = sum(top * torch.exp(centered - log_norm) for (_, _, top), (centered, log_norm, _) in zip(groups, rows) if top)
    else:
        e = [torch.exp(lg) for lg in logits]
        g = torch.ones_like(s)
        h = [s.new_ones(s.shape[:-1] + (1,)) for _ in groups]
        for _ in range(n_iters):
            f = [r / columns.sum((eg * g * hg).sum(-2, keepdim=True)) for eg, hg in zip(e, h)]
            g = 1.0 / sum(count * eg * fg * hg for (_, count, _), eg, fg, hg in zip(groups, e, f, h))
            h = [1.0 / (eg * g * fg).sum(-1, keepdim=True) for eg, fg in zip(e, f)]
        target = sum(top * eg * fg * g * hg for (_, _, top), eg, fg, hg in zip(groups, e, f, h) if top)

    if normalize == "minmax":
        target = minmax_rows(target)
    return poison_non_finite(target, s, columns).to(scores.dtype)


# A min-max row counts as constant when max − min ≤ CONSTANT_ROW_ULPS · ε · max(|max|, |min|),
# ε the accumulation dtype's machine epsilon (docs/numerics.md). Equal slot weights make every
# row constant in exact arithmetic; the iteration leaves up to about 100 ulps of rounding there.
CONSTANT_ROW_ULPS = 1024.0


def constant_rows(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Which rows with extremes ``low``, ``high`` are constant; NaN rows are not (NaN passes on)."""
    scale = torch.maximum(low.abs(), high.abs())
    return high - low <= CONSTANT_ROW_ULPS * torch.finfo(low.dtype).eps * scale


def minmax_rows(target: torch.Tensor) -> torch.Tensor:
    """Rescale each row to [0, 1]; constant rows (:func:`constant_rows`) become 0, as in scikit-learn's MinMaxScaler."""
    low = target.amin(-1, keepdim=True)
    high = target.amax(-1, keepdim=True)
    constant = constant_rows(low, high)
    spread = torch.where(constant, torch.ones_like(high), high - low)
    return torch.where(constant, 0.0, (target - low) / spread)


def normal_exponents(dtype: torch.dtype) -> tuple[int, int]:
    """(lo, hi) with 2^lo .. 2^hi the normal powers of two of ``dtype``: a step outside (2^128 in
    float32 for rows past 2^127) would be inf or inexact."""
    info = torch.finfo(dtype)
    return math.frexp(info.tiny)[1] - 1, math.frexp(info.max)[1] - 1


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x / max(‖x‖₂, 1e-12) row-wise (F.normalize's rule), scale-safe.

    Each row is first divided by the power of two at its largest magnitude (exact), so the sum
    of squares neither overflows (rows past ~1.8e19 in float32 used to give 0) nor underflows.
    """
    if x.shape[-1] == 0:
        return x
    _, exponent = torch.frexp(x.detach().abs().amax(-1, keepdim=True))
    step = torch.ldexp(torch.ones_like(x[..., :1]), exponent.clamp(*normal_exponents(x.dtype)))
    scaled = x / step
    return scaled / torch.maximum(torch.linalg.vector_norm(scaled, dim=-1, keepdim=True), 1e-12 / step)


def similarity(x: torch.Tensor, y: torch.Tensor, normalize: bool = True, scale: float = 1.0) -> torch.Tensor:
    """scale · x̂ ŷᵀ for x (..., N, D) and y (..., M, D) with broadcast batch dims.

    x̂ and ŷ are the rows divided by max(‖row‖₂, 1e-12) when ``normalize``, else x and y.
    Without normalisation, entries that come out ±inf or NaN from finite rows (a product or a
    partial sum overflowed: [1e20, 1e20]·[1e20, −1e20] in float32) are recomputed from the rows
    scaled down by powers of two (:func:`product_steps`), so they are ±inf only where the exact
    value overflows.
    """
    dtype = compute_dtype(x.dtype)
    xs, ys = x.to(dtype), y.to(dtype)
    if normalize:
        xs, ys = unit_rows(xs), unit_rows(ys)
    out = xs @ ys.transpose(-1, -2)
    if not normalize and out.numel() and xs.shape[-1] and _products_may_overflow(xs, ys) and not bool(torch.isfinite(out).all()):
        return torch.where(torch.isfinite(out), scale * out, _stepped_similarity(xs, ys, scale)).to(x.dtype)
    return (scale * out).to(x.dtype)


def _products_may_overflow(xs: torch.Tensor, ys: torch.Tensor) -> bool:
    """Whether D products of the largest magnitudes of xs and ys could pass the dtype: a host
    read on CUDA, made only without normalisation (unit rows cannot overflow a product)."""
    top = xs.detach().abs().amax().double() * ys.detach().abs().amax().double() * xs.shape[-1]
    return bool(top >= torch.finfo(xs.dtype).max / 2)


def product_steps(x: torch.Tensor) -> torch.Tensor:
    """Per row of x (..., R, D): the exponent s ≥ 0 such that x·2^-s has no entry past 2^h,
    h = (emax − ⌈log2 D⌉ − 2)/2, so that a dot product of two such rows sums D products below
    2^(emax−2): none of them, and no partial sum, overflows. 0 for rows already below 2^h."""
    emax = normal_exponents(x.dtype)[1]
    h = (emax - math.ceil(math.log2(max(x.shape[-1], 1))) - 2) // 2
    _, exponent = torch.frexp(x.detach().abs().amax(-1, keepdim=True))
    return (exponent - h).clamp(min=0)


def _ldexp(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """x·2^e in two exact halves (2^e alone may pass the dtype's range where x·2^e does not)."""
    half = e // 2
    return torch.ldexp(torch.ldexp(x, half), e - half)


def _stepped_similarity(xs: torch.Tensor, ys: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · xs ysᵀ from rows scaled down by :func:`product_steps` and the products scaled
    back, scale applied where it cannot overflow (or underflow) the partial result first."""
    sx, sy = product_steps(xs), product_steps(ys)
    products = _ldexp(xs, -sx) @ _ldexp(ys, -sy).transpose(-1, -2)
    shift = sx + sy.transpose(-1, -2)
    if abs(scale) >= 1.0:
        return scale * _ldexp(products, shift)
    return _ldexp(scale * products, shift)


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    valid: torch.Tensor,
    temperature: float,
    symmetric: bool = True,
    normalize: bool = True,
) -> torch.Tensor:
    """Per-pair NormSoftmax (InfoNCE) loss of the pairs (a[i], b[i]) for a, b (N, D); returns (N,).

    With s = â b̂ᵀ / temperature (â, b̂ the L2-normalised rows when ``normalize``) and ``valid``
    an (N,) bool mask of the pairs that take part (others are dropped as if absent):

        loss[i] = logsumexp_{j valid} s[i, j] − s[i, i]                      (row direction)
                + logsumexp_{j valid} s[j, i] − s[i, i]   when ``symmetric``  (column direction)

    and loss[i] = 0 for invalid i. This materialises the N×N logits: it is the readable spec,
    not the fused kernels.
    """
    dtype = compute_dtype(a.dtype)
    x, y = a.to(dtype), b.to(dtype)
    if normalize:
        x, y = unit_rows(x), unit_rows(y)
    logits = (x @ y.T) / temperature
    keep = valid.to(torch.bool)
    pair = keep[:, None] & keep[None, :]
    diag = torch.diagonal(logits)
    # Dropped pairs leave -inf; an invalid row or column is all -inf, so give it a harmless 0
    # (its loss is zeroed below) to keep NaN out of the gradient.
    masked = logits.masked_fill(~pair, float("-inf"))
    rows = masked.masked_fill(~keep[:, None], 0.0)
    loss = torch.logsumexp(rows, dim=1) - diag
    if symmetric:
        cols = masked.masked_fill(~keep[None, :], 0.0)
        loss = loss + torch.logsumexp(cols, dim=0) - diag
    return torch.where(keep, loss, torch.zeros_like(loss)).to(a.dtype)


def bridge_scale(t: torch.Tensor, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    """1 / (2σ²·t(1 − t)) per row, formed in float64 and rounded once to ``dtype``: the Brownian
    bridge's inverse variance at time t, times ½."""
    t = t.detach().double()
    return (1.0 / (2.0 * sigma * sigma * (t * (1.0 - t)))).to(dtype)


def brownian_bridge_loss(
    a: torch.Tensor, b: torch.Tensor, mid: torch.Tensor, t: torch.Tensor, sigma: float, normalize: bool = True
) -> torch.Tensor:
    """Per-row Brownian-bridge loss of ``mid`` against the bridges from a to b; returns (N,).

    With â, b̂, m̂ the rows (L2-normalised when ``normalize``), t (N,) in (0, 1) and the bridge
    point p_ij = (1 − t_i)·â_j + t_i·b̂_j, the logits are the Gaussian log-densities of the bridge
    at time t_i up to a constant,

        ℓ[i, j] = −‖m̂_i − p_ij‖² / (2σ²·t_i(1 − t_i)),

    and loss[i] = logsumexp_j ℓ[i, j] − ℓ[i, i] (InfoNCE of mid row i against its own bridge).
    The squared distance is expanded into products: ‖m̂_i‖² is the same for every j of row i and
    cancels between the log-sum-exp and the diagonal, so the logits used are ℓ + ‖m̂_i‖²·scale_i,
    2(1 − t)·m̂·â + 2t·m̂·b̂ − ‖p‖², with ‖p‖² from the per-column ‖â‖², ‖b̂‖² and â·b̂. This
    materialises the N×N logits: it is the readable spec, not the fused kernels.
    """
    dtype = compute_dtype(a.dtype)
    x, y, m = a.to(dtype), b.to(dtype), mid.to(dtype)
    if normalize:
        x, y, m = unit_rows(x), unit_rows(y), unit_rows(m)
    t = t.detach().to(dtype)
    u = 1.0 - t
    scale = bridge_scale(t, sigma, dtype)
    cross = 2.0 * (u[:, None] * (m @ x.T) + t[:, None] * (m @ y.T))
    bridge_sq = (u * u)[:, None] * (x * x).sum(-1) + (t * t)[:, None] * (y * y).sum(-1) + (2.0 * u * t)[:, None] * (x * y).sum(-1)
    logits = scale[:, None] * (cross - bridge_sq)
    return (torch.logsumexp(logits, dim=1) - torch.diagonal(logits)).to(a.dtype)


def anchor_consistency_loss(sim: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """SSPC's anchor term: mean over all entries of BCE-with-logits(exp(sim / temperature), target).

    ``target`` carries no gradient. Returns a 0-dim tensor in the dtype of ``sim`` (0 when empty).

    With x = sim/τ and z = e^x each term is (1 − t)·z + log(1 + e^{−z}). The first part is summed
    as ±e^{x + log|1 − t|}, shifted down where its largest exponent passes 64, so e^x is never formed: the loss is
    finite wherever the exact mean is (0 from entries with t = 1 however large x is) and ±inf only
    where the exact mean overflows. NaN or ±inf in ``sim`` or ``target`` gives NaN.
    """
    if sim.numel() == 0:
        return sim.new_zeros(())
    dtype = compute_dtype(sim.dtype)
    s, t = sim.to(dtype), target.detach().to(dtype)
    one_minus = 1.0 - t
    x = s / temperature
    # t = 1 has no linear part even where x overflowed to +inf (inf + log 0 would be NaN).
    log_linear = torch.where(one_minus == 0, float("-inf"), x + torch.log(one_minus.abs()))
    # Shifted only when e^64 would be exceeded, so ordinary inputs keep every entry's gradient;
    # not when the largest exponent is +inf (x past the dtype): that term is ±inf as it is exactly.
    top = log_linear.detach().amax()
    shift = torch.where(torch.isinf(top), 0.0, (top - 64.0).clamp_min(0.0))
    linear = torch.exp(shift) * (torch.sign(one_minus) * torch.exp(log_linear - shift)).mean()
    # log(1 + e^{−z}) is exactly 0 in every dtype once x > 64 (z > 6e27): clamping there keeps
    # e^x finite and its gradient 0 instead of 0·inf.
    softplus = F.softplus(-torch.exp(x.clamp(max=64.0))).mean()
    # 0 for finite inputs, NaN otherwise (e^{−inf} alone would hide a −inf).
    probe = (s - s).sum() + (t - t).sum()
    return (linear + softplus + probe).to(sim.dtype)


def geometric_consistency(a: torch.Tensor, b: torch.Tensor, normalize: bool = True, reduction: str = "mean") -> torch.Tensor:
    """Geometric consistency of the pairs (a[i], b[i]) for a, b (N, D), as ``mmot.geometric_consistency``.

    With x̂, ŷ the rows (divided by max(‖row‖, 1e-12) when ``normalize``), S = x̂ŷᵀ, P = x̂x̂ᵀ and
    Q = ŷŷᵀ (all N×N), the two sums

        T1 = Σ_ij (S_ij − S_ji)²      (cross-modal similarity is symmetric)
        T2 = Σ_ij (P_ij − Q_ij)²      (intra-modal structures agree)

    are computed through D×D Grams of x̂ and the difference ê = ŷ − x̂ (A = x̂ᵀx̂, F = x̂ᵀê,
    G = êᵀê): T1 = 2⟨A, G⟩ − 2 tr(F²), T2 = 2⟨A, G⟩ + 2 tr(F²) + ‖G‖² + 4⟨F, G⟩
    (:func:`consistency_terms`), never N×N. ``reduction``: "mean" is (T1 + T2)/N², "sum" is
    T1 + T2, "none" the (2,) tensor [T1/N², T2/N²]; 0 for N = 0. In a's dtype, accumulated in
    :func:`compute_dtype`.
    """
    dtype = compute_dtype(a.dtype)
    x, y = a.to(dtype), b.to(dtype)
    if normalize:
        x, y = unit_rows(x), unit_rows(y)
    e = y - x
    terms = consistency_terms(torch.stack((x.T @ x, x.T @ e, e.T @ e)))
    if reduction == "sum":
        return terms.sum().to(a.dtype)
    means = terms / max(a.shape[0] ** 2, 1)
    return (means if reduction == "none" else means.sum()).to(a.dtype)


def consistency_terms(grams: torch.Tensor) -> torch.Tensor:
    """[T1, T2] from the (3, D, D) Grams [A, F, G] of :func:`geometric_consistency`.

    Each is a sum of squares, so each is clamped at 0 (rounding may leave it a little below);
    a NaN passes. Written in ê rather than ŷ, every product is of the size of the loss itself:
    the plain form 2⟨x̂ᵀx̂, ŷᵀŷ⟩ − 2tr((x̂ᵀŷ)²) subtracts O(N²) values whose difference vanishes as
    a → b, which float32 cannot resolve.
    """
    a, f, g = grams.unbind(0)
    ag, ff, gg, fg = (a * g).sum(), (f * f.T).sum(), (g * g).sum(), (f * g).sum()
    return torch.stack((2.0 * ag - 2.0 * ff, 2.0 * ag + 2.0 * ff + gg + 4.0 * fg)).clamp(min=0.0)


def feature_separation_loss(shared: torch.Tensor, specific: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """‖ŜᵀĤ‖²_F / N² for shared (N, D_s) and specific (N, D_h); 0 for N = 0. Returns a 0-dim tensor.

    Ŝ, Ĥ are the rows divided by max(‖row‖, 1e-12) when ``normalize``. C = ŜᵀĤ is D_s×D_h,
    so nothing N×N is formed; each entry is divided by N before it is squared, so that only a
    loss beyond the dtype overflows.
    """
    dtype = compute_dtype(shared.dtype)
    x, y = shared.to(dtype), specific.to(dtype)
    if normalize:
        x, y = unit_rows(x), unit_rows(y)
    return ((x.T @ y) / max(shared.shape[0], 1)).square().sum().to(shared.dtype)


def multi_info_nce(
    embeddings: torch.Tensor,
    present: torch.Tensor,
    pair_weights: torch.Tensor,
    temperature: float,
    symmetric: bool = True,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PCMC for embeddings (M, N, D), present (M, N) bool and pair weights (M, M):
    (the (M, M) matrix of pair losses, upper triangle; the pair-weighted mean over pairs with a
    common sample, 0 if none).

    Pair m < m′ is :func:`info_nce` over the samples present in both, its mean over them (0 for
    a pair with no common sample)."""
    m = embeddings.shape[0]
    dtype = compute_dtype(embeddings.dtype)
    losses = torch.zeros(m, m, dtype=dtype, device=embeddings.device)
    total = weight = torch.zeros((), dtype=dtype, device=embeddings.device)
    for i in range(m):
        for j in range(i + 1, m):
            valid = present[i] & present[j]
            count = int(valid.sum())
            per_sample = info_nce(embeddings[i], embeddings[j], valid, temperature, symmetric, normalize).to(dtype)
            losses[i, j] = per_sample.sum() / max(count, 1)
            if count:
                total = total + pair_weights[i, j].to(dtype) * losses[i, j]
                weight = weight + pair_weights[i, j].to(dtype)
    mean = total / weight if weight > 0 else total
    return losses.to(embeddings.dtype), mean.to(embeddings.dtype)


# --- mmot.pairwise_similarity_regression (PCMR) ---


def pairwise_similarity_regression_losses(
    x: torch.Tensor,
    present: torch.Tensor | None,
    match_target: float = 1.0,
    nonmatch_target: float = 0.0,
    margin: float | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """(M, M) per-pair losses L_p (upper triangle; 0 elsewhere) of x (M, N, D), in the accumulation dtype.

    For m < m' with R the rows present in both and s_ij = â_i·b̂_j:
    L_p = mean_{i∈R} (s_ii − t)² + mean_{i≠j∈R} f(s_ij − u)², f the identity, or max(0, · − margin)
    with a margin; an empty mean is 0. Written plainly over per-pair similarity tiles of R×R.
    """
    dtype = compute_dtype(x.dtype)
    rows = x.to(dtype)
    if normalize:
        rows = unit_rows(rows)
    m, n = rows.shape[0], rows.shape[1]
    mask = torch.ones(m, n, dtype=torch.bool, device=x.device) if present is None else present.to(torch.bool)
    out = torch.zeros(m, m, dtype=dtype, device=x.device)
    for p in range(m):
        for q in range(p + 1, m):
            r = mask[p] & mask[q]
            a, b = rows[p][r], rows[q][r]
            k = a.shape[0]
            if k == 0:
                continue
            s = a @ b.T
            diag = torch.diagonal(s)
            match = (diag - match_target).square().mean()
            off = s - nonmatch_target
            if margin is not None:
                off = (off - margin).clamp_min(0.0)
            off = off.square()
            nonmatch = (off.sum() - torch.diagonal(off).sum()) / (k * (k - 1)) if k > 1 else off.new_zeros(())
            out[p, q] = match + nonmatch
    return out


def pairwise_similarity_regression(
    embeddings: torch.Tensor,
    present: torch.Tensor | None = None,
    match_target: float = 1.0,
    nonmatch_target: float = 0.0,
    margin: float | None = None,
    pair_weights: torch.Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """PCMR's pairwise similarity regression of embeddings (M, N, D); see mmot.pairwise_similarity_regression."""
    losses = pairwise_similarity_regression_losses(embeddings, present, match_target, nonmatch_target, margin, normalize)
    m = embeddings.shape[0]
    if reduction == "none":
        return losses.to(embeddings.dtype)
    upper = torch.ones(m, m, dtype=torch.bool, device=embeddings.device).triu(1)
    w = torch.ones_like(losses) if pair_weights is None else pair_weights.to(losses.dtype)
    w = torch.where(upper, w, torch.zeros_like(w))
    total = (w * losses).sum()
    if reduction == "sum":
        return total.to(embeddings.dtype)
    mask = torch.ones(m, embeddings.shape[1], dtype=torch.bool, device=embeddings.device) if present is None else present.to(torch.bool)
    counts = mask.to(losses.dtype) @ mask.to(losses.dtype).T
    w = torch.where(counts > 0, w, torch.zeros_like(w))
    denominator = w.sum()
    return torch.where(denominator > 0, total / torch.where(denominator > 0, denominator, 1.0), 0.0 * total).to(embeddings.dtype)


# ---- mmot.nt_xent and mmot.nn.CoMMLoss ----------------------------------------------------


def nt_xent(x: torch.Tensor, y: torch.Tensor, temperature: float = 0.1, normalize: bool = True) -> torch.Tensor:
    """SimCLR's 2N-way NT-Xent per row, (2N,) with the rows of x first, written block by block.

    With Z = [x̂; ŷ] and S = ZZᵀ/τ, row r's loss is logsumexp_{c≠r} S[r, c] − S[r, partner(r)].
    The four N×N blocks of S are kept apart: a row of x sees its cross block (x̂ŷᵀ) whole and its
    self block (x̂x̂ᵀ) without the diagonal; a row of y sees ŷŷᵀ without the diagonal and ŷx̂ᵀ.
    """
    dtype = compute_dtype(x.dtype)
    a, b = x.to(dtype), y.to(dtype)
    if normalize:
        a, b = unit_rows(a), unit_rows(b)
    n = a.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=a.device)
    cross = (a @ b.T) / temperature
    self_a = ((a @ a.T) / temperature).masked_fill(~off, -math.inf)
    self_b = ((b @ b.T) / temperature).masked_fill(~off, -math.inf)
    lse_a = torch.logaddexp(torch.logsumexp(cross, 1), torch.logsumexp(self_a, 1))
    lse_b = torch.logaddexp(torch.logsumexp(self_b, 1), torch.logsumexp(cross, 0))
    positive = torch.diagonal(cross)
    return torch.cat((lse_a - positive, lse_b - positive)).to(x.dtype)


def comm_loss(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CoMM's loss and its (M+1,) terms for z1, z2 (M+1, N, D); the last entry is the all-modality fusion.

    term_i = ½[NCE(z1[i], z2[M]) + NCE(z2[i], z1[M])] with NCE the mean of :func:`nt_xent`;
    the loss is 1/(M+1) · Σ w_i term_i (w all ones by default: the mean of the terms).
    """
    m = z1.shape[0] - 1
    terms = torch.stack(
        [0.5 * (nt_xent(z1[i], z2[m], temperature).mean() + nt_xent(z2[i], z1[m], temperature).mean()) for i in range(m + 1)]
    )
    dtype = compute_dtype(z1.dtype)
    w = torch.ones(m + 1, dtype=dtype, device=z1.device) if weights is None else weights.to(dtype)
    return ((terms.to(dtype) * w).sum() / (m + 1)).to(z1.dtype), terms
