"""Fuzz: mmot.sinkhorn and mmot.multi_sinkhorn on every backend with valid but extreme input.

Scores near the dtype's limits with mixed signs, ties and constant rows/columns; eps near the
smallest accepted value and near the exponent-range limit (docs/numerics.md, "Extreme scores");
non-uniform Sinkhorn masses; non-uniform Multi-SK anchor masses (refused). The property: a
refusal exactly where a documented limit is passed, naming the op and 'eps' (or log_domain=);
otherwise finite values that agree with an exact dense log-domain evaluation (fuzz_support.wide)
to the error bound of the unrolled iteration in the accumulation dtype, rows summing to their
mass; gradients that agree with autograd through mmot.reference in float64.

Error bound: the backends centre logits on their column maximum, so every logit and potential
lies within about 2R + log-mass terms of 0, R = (column spread) · weight / eps. Each log-sum-exp
is 1-Lipschitz in the sup norm, so the rounding of each of the 2·n_iters (3·n_iters for Multi-SK)
half-steps, at most a few units of the accumulation dtype times those magnitudes, adds up in
the log of every plan entry (ERROR_BOUND below).
"""

from __future__ import annotations

import math

import mmot
import numpy as np
import pytest
import torch
from backends import HAS_TRITON, needs_triton
from fuzz_support import (
    FLOATS,
    Case,
    assert_matches,
    check_refusal,
    compute_dtype,
    extreme_tensor,
    fuzz,
    known_failure,
    lse,
    outcome,
    small_temperature,
    uniform,
    wide,
)
from hypothesis import given
from hypothesis import strategies as st
from mmot import reference

NATIVE = ["rust", "torch"]
PLAIN_LIMIT = reference.PLAIN_DOMAIN_MAX_SPREAD
BAND = 1e-6  # relative band around a limit inside which either outcome is right


# Open failure classes (fuzz_support.known_failure): none at present. A class found later gets its
# entry here and a strict-xfail reproducer (as in test_fuzz_losses.py) until it is fixed.
KNOWN: dict = {}


def error_bound(exponent_range: float, log_terms: float, half_steps: int, arithmetic: torch.dtype) -> float:
    """Bound on |log(got) − log(exact)| of a plan entry (module docstring): 4 units per half-step
    on values up to 2R + log terms, two more steps for the output."""
    return 4.0 * (half_steps + 2) * torch.finfo(arithmetic).eps * (2.0 * exponent_range + log_terms + 4.0)


def column_spread(scores: torch.Tensor) -> float:
    """max over problems and columns of (max − min), in float64 (inf where it overflows)."""
    s = scores.double()
    return float((s.amax(-2) - s.amin(-2)).amax())


def range_limits(op: str) -> dict:
    """The largest exponent range R = spread · weight / eps each accumulation dtype computes
    (docs/numerics.md, "Extreme scores"): the log domain's finfo.max/8, or the ops' own table
    where they have one (narrower scores then move to float64 past their float32 limit)."""
    table = getattr(reference, "MAX_EXPONENT_RANGE", None)
    if table is not None:
        return table[f"mmot.{op}"]
    return {dtype: torch.finfo(dtype).max / 8 for dtype in (torch.float32, torch.float64)}


def arithmetic(op: str, dtype: torch.dtype, exponent_range: float) -> torch.dtype:
    """The dtype the op computes in: the accumulation dtype, or float64 past the float32 limit
    where the ops move there (reference.working_dtype)."""
    if hasattr(reference, "working_dtype") and exponent_range > range_limits(op)[torch.float32]:
        return torch.float64
    return compute_dtype(dtype)


def limits(op: str, dtype, eps, spread, weight, log_domain) -> tuple[set[str], set[str]]:
    """(must, may) refusal names for these scores and eps (fuzz_support.check_refusal)."""
    finfo = torch.finfo(compute_dtype(dtype))
    must, may = set(), set()
    exponent_range = spread * weight / eps
    refused_past = range_limits(op)[arithmetic(op, dtype, math.inf)]
    if eps < 1.0 / finfo.max or exponent_range > refused_past * (1 + BAND):
        must.add("eps")
    elif exponent_range >= refused_past * (1 - BAND):
        may.add("eps")
    if log_domain is False:
        plain = PLAIN_LIMIT[compute_dtype(dtype)]
        if exponent_range > plain * (1 + BAND):
            must.add("log_domain")
        elif exponent_range >= plain * (1 - BAND):
            may.add("log_domain")
    if must:  # either limit may be the one reported
        may |= {"eps", "log_domain"} if log_domain is False else {"eps"}
    return must, may


@st.composite
def eps_for(draw, op: str, scores: torch.Tensor, weight: float, recipe: dict):
    """eps from small_temperature, or set by the exponent range R it gives: ordinary (R ≤ 1000),
    huge (up to past the largest limit) or within a factor 2 of one of the limits."""
    spread = column_spread(scores) * weight
    kind = draw(st.sampled_from(["temperature", "range", "range", "range_huge", "near_limit"]))
    if kind == "temperature" or not 0 < spread < math.inf:
        return draw(small_temperature(scores.dtype, recipe))
    bounds = sorted(range_limits(op).values())
    if kind == "near_limit":
        target = draw(st.sampled_from(bounds)) * 2.0 ** draw(uniform(-1.0, 1.0))
    else:
        target = 10.0 ** draw(uniform(-2.0, 3.0) if kind == "range" else uniform(3.0, math.log10(bounds[-1]) + 0.3))
    eps = min(max(spread / target, 5e-324), 1e308)
    recipe["eps"] = eps
    return eps


@st.composite
def masses(draw, shape: tuple[int, ...], dtype: torch.dtype, recipe: dict, name: str) -> torch.Tensor:
    """Positive masses 10**U(-2, 2) times a drawn scale, in the accumulation dtype."""
    low, high = (-2.0, 2.0) if dtype == torch.float16 else (-15.0, 15.0)
    scale = 10.0 ** draw(uniform(low, high))
    seed = draw(st.integers(0, 2**32 - 1))
    recipe[name] = dict(scale=scale, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    return (10.0 ** (torch.rand(shape, generator=gen, dtype=torch.float64) * 4 - 2) * scale).to(compute_dtype(dtype))


@st.composite
def sinkhorn_cases(draw, dtypes=tuple(FLOATS), max_n=8, max_k=6, max_iters=5, batches=((), (2,))):
    recipe: dict = {}
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(st.sampled_from(batches)) + (draw(st.integers(1, max_n)), draw(st.integers(1, max_k)))
    recipe.update(dtype=dtype, shape=shape)
    scores = draw(extreme_tensor(shape, dtype, recipe))
    eps = draw(eps_for("sinkhorn", scores, 1.0, recipe))
    recipe["n_iters"] = draw(st.integers(1, max_iters))
    recipe["log_domain"] = draw(st.sampled_from(["auto", True, False]))
    given_masses = draw(st.sampled_from(["default", "row", "col", "both"]))
    n, k = shape[-2:]
    full = draw(st.booleans())  # (N,) or the full batch shape
    rows = draw(masses(shape[:-1] if full else (n,), dtype, recipe, "row_mass")) if given_masses in ("row", "both") else None
    cols = draw(masses(shape[:-2] + (k,) if full else (k,), dtype, recipe, "col_mass")) if given_masses in ("col", "both") else None
    if rows is not None and cols is not None:
        cols = cols / cols.sum(-1, keepdim=True) * rows.expand(shape[:-1]).sum(-1, keepdim=True)
    recipe["eps"] = eps
    return Case(recipe, dict(scores=scores, row_mass=rows, col_mass=cols))


def resolved_masses(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """The row and column masses the op's documentation gives, broadcast: (..., N), (..., K)."""
    shape = case.scores.shape
    n, k = shape[-2:]
    dt = np.longdouble if case.scores.dtype == torch.float64 else np.float64
    rows = None if case.row_mass is None else np.broadcast_to(wide(case.row_mass).astype(dt), shape[:-1])
    cols = None if case.col_mass is None else np.broadcast_to(wide(case.col_mass).astype(dt), shape[:-2] + (k,))
    if rows is None and cols is None:
        return np.ones(shape[:-1], dt), np.full(shape[:-2] + (k,), n / k, dt)
    if rows is None:
        rows = np.broadcast_to(cols.sum(-1, keepdims=True) / n, shape[:-1])
    if cols is None:
        cols = np.broadcast_to(rows.sum(-1, keepdims=True) / k, shape[:-2] + (k,))
    return rows, cols


def centred_logits(scores: torch.Tensor, eps: float) -> np.ndarray:
    """(s − column max)/eps exactly enough: a column shift is absorbed by the first column scaling."""
    s = wide(scores)
    return (s - s.max(-2, keepdims=True)) / s.dtype.type(eps)


def exact_sinkhorn(case: Case) -> np.ndarray:
    logits = centred_logits(case.scores, case.eps)
    rows, cols = resolved_masses(case)
    log_r, log_c = np.log(rows)[..., :, None], np.log(cols)[..., None, :]
    a = np.zeros_like(log_r)
    for _ in range(case.n_iters):
        b = log_c - lse(logits + a, -2)
        a = log_r - lse(logits + b, -1)
    return np.exp(logits + a + b)


def check_sinkhorn(case: Case, backends) -> None:
    dtype, scores = case.scores.dtype, case.scores
    spread = column_spread(scores)
    must, may = limits("sinkhorn", dtype, case.eps, spread, 1.0, case.log_domain)
    arith = arithmetic("sinkhorn", dtype, spread / case.eps)
    want = None
    for backend in backends:
        if known_failure(KNOWN, case, backend):
            continue
        context = f"backend={backend} {case!r}"

        def call(backend=backend):
            return mmot.sinkhorn(
                scores, case.eps, case.n_iters, row_mass=case.row_mass, col_mass=case.col_mass, log_domain=case.log_domain, backend=backend
            )

        got, error = outcome(call)
        if check_refusal("sinkhorn", error, must, may, context):
            continue
        assert got.dtype == dtype and got.shape == scores.shape, context
        if want is None:
            want = exact_sinkhorn(case)
            rows, cols = resolved_masses(case)
            n, k = scores.shape[-2:]
            log_terms = float(np.abs(np.log(rows)).max() + np.abs(np.log(cols)).max()) + math.log(n * k)
            bound = error_bound(spread / case.eps, log_terms, 2 * case.n_iters, arith)
            atol = 4 * torch.finfo(compute_dtype(dtype)).tiny * max(1.0, float(rows.max()), float(cols.max()))
            tol = want * math.expm1(min(bound, 700.0)) + atol
        assert_matches(got, want, tol, dtype, "sinkhorn plan", context)
        # Rows are normalised last: they sum to their mass to rounding whatever the conditioning
        # (exp of a log-domain entry, log r + centred logit − log of the row's norm, rounds to
        # a few units times |log r| + log K).
        info = torch.finfo(dtype)
        row_sums = wide(got).sum(-1)
        row_tol = (4 * (k + 2 + np.abs(np.log(rows)) + math.log(k)) * torch.finfo(arith).eps + info.eps) * rows + k * info.tiny
        assert (np.abs(row_sums - rows) <= row_tol).all(), f"sinkhorn rows: sums {row_sums} for masses {rows}\n{context}"


@fuzz(40)
@given(case=sinkhorn_cases())
def test_sinkhorn_native(case):
    check_sinkhorn(case, NATIVE)


@needs_triton
@fuzz(12)
@given(case=sinkhorn_cases(max_n=5, max_k=4, max_iters=3, batches=((),)))
def test_sinkhorn_triton(case):
    check_sinkhorn(case, ["triton"])


# ---------------------------------------------------------------- multi_sinkhorn


@st.composite
def multi_cases(draw, dtypes=tuple(FLOATS), max_n=7, max_k=5, max_iters=5, batches=((), (2,)), normalize=("minmax", "none")):
    recipe: dict = {}
    dtype = draw(st.sampled_from(dtypes))
    n_anchors = draw(st.integers(1, max_k))
    shape = draw(st.sampled_from(batches)) + (draw(st.integers(1, max_n)), n_anchors)
    recipe.update(dtype=dtype, shape=shape)
    scores = draw(extreme_tensor(shape, dtype, recipe))
    k = draw(st.integers(1, n_anchors))
    weights_kind = draw(st.sampled_from(["low_weight", "equal", "slot_weights"]))
    if weights_kind == "slot_weights":
        weights = [10.0 ** draw(uniform(-2.0, 0.6)) for _ in range(n_anchors)]
        options = dict(slot_weights=weights)
    else:
        low = 1.0 if weights_kind == "equal" else 10.0 ** draw(uniform(-2.0, 0.6))
        weights = [low] * (n_anchors - k) + [1.0] * k
        options = dict(low_weight=low)
    recipe.update(k=k, weights=weights, options=options)
    recipe["eps"] = draw(eps_for("multi_sinkhorn", scores, max(weights), recipe))
    recipe["n_iters"] = draw(st.integers(1, max_iters))
    recipe["normalize"] = draw(st.sampled_from(normalize))
    recipe["log_domain"] = draw(st.sampled_from(["auto", True, False]))
    return Case(recipe, dict(scores=scores))


def exact_multi_sinkhorn(case: Case) -> np.ndarray:
    """The dense (K slots, N, K anchors) iteration in the log domain, uniform anchor masses N/K:
    Σ_n P[m,n,a] = N/K, Σ_m P[m,n,a] = 1, Σ_a P[m,n,a] = 1; T sums the last k slots."""
    logits = centred_logits(case.scores, case.eps)
    n, n_anchors = logits.shape[-2:]
    weights = np.asarray(case.weights, dtype=logits.dtype)
    log_p = weights[:, None, None] * logits[..., None, :, :]
    log_r = np.log(logits.dtype.type(n) / n_anchors)
    for _ in range(case.n_iters):
        log_p = log_p - lse(log_p, -2) + log_r
        log_p = log_p - lse(log_p, -3)
        log_p = log_p - lse(log_p, -1)
    return np.exp(lse(log_p[..., n_anchors - case.k :, :, :], -3)[..., 0, :, :])


def check_minmax(got: torch.Tensor, raw: np.ndarray, raw_tol: np.ndarray, dtype: torch.dtype, arith: torch.dtype, context) -> None:
    """Min-max rows against the exact un-normalised T known to within ``raw_tol``.

    A row is constant (all 0) when its spread is within 1024 units of its magnitude
    (docs/numerics.md). Rows whose exact spread is that close to the rule's threshold, within
    the error of T, may come out either way; every other row must match.
    """
    g = wide(got)
    low, high = raw.min(-1, keepdims=True), raw.max(-1, keepdims=True)
    spread = high - low
    err = raw_tol.max(-1, keepdims=True)
    u = torch.finfo(arith).eps
    threshold = reference.CONSTANT_ROW_ULPS * u * np.maximum(np.abs(low), np.abs(high))
    surely_constant = spread + 2 * err < threshold * (1 - 1e-3) - 2 * err * reference.CONSTANT_ROW_ULPS * u
    surely_not = spread - 2 * err > threshold * (1 + 1e-3) + 2 * err * reference.CONSTANT_ROW_ULPS * u
    zero_rows = (g == 0).all(-1, keepdims=True)
    assert not (surely_constant & ~zero_rows).any(), f"multi_sinkhorn: a constant row is not 0: {g}\n{context}"
    assert not (surely_not & zero_rows).any(), f"multi_sinkhorn: a non-constant row came out 0: {g} (exact T {raw})\n{context}"
    # Every row is all 0 or has min 0 and max 1 exactly: (T − min)/(max − min) at its extremes.
    assert (zero_rows | ((g.min(-1, keepdims=True) == 0) & (g.max(-1, keepdims=True) == 1))).all(), f"min-max rows: {g}\n{context}"
    normalised = (raw - low) / np.where(spread > 0, spread, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tol = np.where(surely_not, np.minimum(4 * err / np.maximum(spread - 2 * err, 0), 1.0), 1.0)
    rows = surely_not[..., 0]
    assert_matches(got[torch.from_numpy(rows)], normalised[rows], np.broadcast_to(tol, g.shape)[rows], dtype, "min-max T", context)


def check_multi_sinkhorn(case: Case, backends) -> None:
    dtype, scores = case.scores.dtype, case.scores
    spread = column_spread(scores)
    max_weight = max(case.weights)
    must, may = limits("multi_sinkhorn", dtype, case.eps, spread, max_weight, case.log_domain)
    arith = arithmetic("multi_sinkhorn", dtype, spread * max_weight / case.eps)
    raw = None
    n, n_anchors = scores.shape[-2:]
    for backend in backends:
        if known_failure(KNOWN, case, backend):
            continue
        context = f"backend={backend} {case!r}"

        def call(backend=backend):
            return mmot.multi_sinkhorn(
                scores,
                case.k,
                case.eps,
                case.n_iters,
                normalize=case.normalize,
                log_domain=case.log_domain,
                backend=backend,
                **case.options,
            )

        got, error = outcome(call)
        if check_refusal("multi_sinkhorn", error, must, may, context):
            continue
        assert got.dtype == dtype and got.shape == scores.shape, context
        if raw is None:
            raw = exact_multi_sinkhorn(case)
            log_terms = 2 * abs(math.log(n / n_anchors)) + 2 * math.log(n * n_anchors) + math.log(n_anchors)
            bound = error_bound(spread * max_weight / case.eps, log_terms, 3 * case.n_iters, arith)
            raw_tol = raw * math.expm1(min(bound, 700.0)) + 4 * torch.finfo(compute_dtype(dtype)).tiny
        if case.normalize == "none":
            assert_matches(got, raw, raw_tol, dtype, "multi_sinkhorn T", context)
            # Slots are normalised over anchors last: rows sum to k to rounding.
            info = torch.finfo(dtype)
            sums = wide(got).sum(-1)
            assert (np.abs(sums - case.k) <= (4 * (n_anchors + 2) * torch.finfo(arith).eps + info.eps) * case.k).all(), (
                f"rows {sums}\n{context}"
            )
        else:
            check_minmax(got, raw, raw_tol, dtype, arith, context)


@fuzz(30)
@given(case=multi_cases())
def test_multi_sinkhorn_native(case):
    check_multi_sinkhorn(case, NATIVE)


@needs_triton
@fuzz(6)
@given(case=multi_cases(max_n=4, max_k=4, max_iters=3, batches=((),)))
def test_multi_sinkhorn_triton(case):
    check_multi_sinkhorn(case, ["triton"])


# ---------------------------------------------------------------- anchor masses


@fuzz(15)
@given(
    n=st.integers(1, 6),
    n_anchors=st.integers(2, 5),
    seed=st.integers(0, 2**32 - 1),
    spread=uniform(1e-3, 1e3),
    dtype=st.sampled_from(FLOATS),
)
def test_multi_sinkhorn_non_uniform_anchor_mass_is_refused(n, n_anchors, seed, spread, dtype):
    """Only N/K for every anchor is feasible: anything else is a ValueError naming 'anchor_mass'
    on every backend (the check runs before any kernel); N/K itself gives the default result."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, n_anchors, generator=gen, dtype=torch.float64).to(dtype)
    uniform = n / n_anchors
    mass = uniform * (1 + spread * torch.rand(n_anchors, generator=gen, dtype=torch.float64))
    mass = mass / mass.sum() * n  # total N: only the shape of the masses is wrong
    for backend in ["rust", "torch", "triton"] if HAS_TRITON else NATIVE:
        with pytest.raises(ValueError, match=r"^mmot\.multi_sinkhorn: argument 'anchor_mass' must be uniform"):
            mmot.multi_sinkhorn(scores, 1, 0.5, 2, anchor_mass=mass.to(dtype), backend=backend)
    for backend in NATIVE:
        given_uniform = mmot.multi_sinkhorn(scores, 1, 0.5, 2, anchor_mass=torch.full((n_anchors,), uniform), backend=backend)
        torch.testing.assert_close(given_uniform, mmot.multi_sinkhorn(scores, 1, 0.5, 2, backend=backend), rtol=0, atol=0)


# ---------------------------------------------------------------- gradients


def upstream(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def check_gradient(op: str, case: Case, backends, run, spec, exact_forward, half_steps: int, weight: float) -> None:
    """Backward on each backend against autograd through mmot.reference in float64.

    The gradient sums terms of size |G|·P·weight/eps (P the plan, G the upstream gradient) that
    may cancel (to exactly 0 for a single row, whose column scaling absorbs the scores). Each
    is moved by the forward's log error bound E per unrolled step, and the float64 oracle's own
    rounding is a unit of float64 per step on the same terms."""
    dtype, scores = case.scores.dtype, case.scores
    spread = column_spread(scores)
    must, may = limits(op, dtype, case.eps, spread, weight, "auto")
    if must or may:
        return  # refusals are the forward tests' subject
    grad_out = upstream(scores.shape, dtype, case.seed + 1)
    exact_in = scores.double().requires_grad_(True)
    (want,) = torch.autograd.grad(spec(exact_in), exact_in, grad_out.double())
    want = wide(want)
    exponent_range = spread * weight / case.eps
    bound = error_bound(exponent_range, math.log(scores.numel()) + 8, half_steps, arithmetic(op, dtype, exponent_range))
    terms = np.abs(wide(grad_out)).max() * exact_forward(case).max() * weight / case.eps
    tol = 4 * (half_steps + 2) * (min(bound, 1.0) + torch.finfo(torch.float64).eps) * terms + 4 * torch.finfo(compute_dtype(dtype)).tiny
    for backend in backends:
        if known_failure(KNOWN, case, backend):
            continue
        leaf = scores.clone().requires_grad_(True)
        (got,) = torch.autograd.grad(run(leaf, backend), leaf, grad_out)
        assert_matches(got, want, tol, dtype, f"{op} gradient", f"backend={backend} {case!r}")


def sinkhorn_spec(case):
    def spec(s):
        rows, cols = resolved_masses(case)
        return reference.sinkhorn(
            s, case.eps, case.n_iters, torch.from_numpy(rows.astype(np.float64)), torch.from_numpy(cols.astype(np.float64))
        )

    return spec


@fuzz(14)
@given(case=sinkhorn_cases(max_n=5, max_k=4, max_iters=3, batches=((),)), triton=st.booleans())
def test_sinkhorn_gradients(case, triton):
    def run(s, backend):
        return mmot.sinkhorn(s, case.eps, case.n_iters, row_mass=case.row_mass, col_mass=case.col_mass, backend=backend)

    backends = NATIVE + (["triton"] if triton and HAS_TRITON else [])
    check_gradient("sinkhorn", case, backends, run, sinkhorn_spec(case), exact_sinkhorn, 2 * case.n_iters, 1.0)


@fuzz(10)
@given(case=multi_cases(max_n=4, max_k=4, max_iters=3, batches=((),), normalize=("none",)), triton=st.booleans())
def test_multi_sinkhorn_gradients(case, triton):
    """normalize="none": min-max's gradient is discontinuous where a row is near the constant
    rule's threshold, and the forward tests cover min-max."""
    n, n_anchors = case.scores.shape

    def run(s, backend):
        return mmot.multi_sinkhorn(s, case.k, case.eps, case.n_iters, normalize="none", backend=backend, **case.options)

    def spec(s):
        mass = torch.full(s.shape[:-2] + (n_anchors,), n / n_anchors, dtype=torch.float64)
        return reference.multi_sinkhorn(s, case.eps, case.n_iters, case.weights, case.k, mass, "none")

    backends = NATIVE + (["triton"] if triton and HAS_TRITON else [])
    check_gradient("multi_sinkhorn", case, backends, run, spec, exact_multi_sinkhorn, 3 * case.n_iters, max(case.weights))


# ---------------------------------------------------------------- fixed failure classes


def _sinkhorn_case(scores, eps, n_iters=2, **recipe):
    return Case(dict(eps=eps, n_iters=n_iters, log_domain="auto", **recipe), dict(scores=scores, row_mass=None, col_mass=None))


def _multi_case(scores, eps, n_iters=2, k=1, weights=(0.25, 1.0)):
    options = dict(low_weight=weights[0])
    recipe = dict(eps=eps, n_iters=n_iters, k=k, weights=list(weights), options=options, normalize="none", log_domain="auto")
    return Case(recipe, dict(scores=scores))


ALL = NATIVE + (["triton"] if HAS_TRITON else [])


def test_eps_beyond_float32():
    """float32 scores, eps = 1e39: exact exponent range 3; torch's plan was once off by 0.05 (eps
    rounded to inf in float32, every logit 0). Such an eps now runs in float64 on every backend."""
    scores = torch.tensor([[1.0, 2.0, -1.0], [0.5, -2.0, 1.0]]) * 1e38
    check_sinkhorn(_sinkhorn_case(scores, 1e39), ALL)
    check_multi_sinkhorn(_multi_case(scores, 1e39, k=2, weights=(0.25, 1.0, 1.0)), ALL)


def test_column_spread_beyond_float32():
    """A column from -2.4e38 to 1.7e38 (spread 4e38 > float32's max) at eps = 1e38 and 3e38:
    exact exponent ranges 4 and 1.3. Rust once refused it ("range inf"; its differences from
    the column maximum are -inf in float32) and Triton's Multi-SK gave [0, 1] rows for it.
    Such scores now run in float64 on every backend."""
    scores = torch.tensor([[1.6772055900391182e38, -3.193652497323549e37], [-2.371373695437345e38, 6.186752021425951e37]])
    for eps in (1e38, 3e38):
        check_sinkhorn(_sinkhorn_case(scores, eps, 1), ALL)
        check_multi_sinkhorn(_multi_case(scores, eps), ALL)


def test_weight_over_eps_beyond_dtype():
    """float16, eps 4.6e-39 (accepted: 1/eps fits float32) with slot weight 2.34: weight/eps
    overflows float32. The exact gradient is 0 for one row, where Rust's backward once gave NaN
    (it formed weight/eps first: inf · 0); two rows give a gradient that is not 0."""
    weights = [2.3351272229192648] * 2 + [1.0] * 2
    rows = torch.tensor([[-0.00012612342834472656, -0.0, -0.0, -3.516674041748047e-06], [0.25, -0.5, 0.125, 0.0]], dtype=torch.float16)
    for scores in (rows[:1], rows):
        case = Case(dict(eps=4.6408062715939895e-39, n_iters=2, k=2, weights=weights, seed=7497, log_domain="auto"), dict(scores=scores))
        n, n_anchors = scores.shape

        def run(s, b, case=case):
            return mmot.multi_sinkhorn(s, case.k, case.eps, case.n_iters, normalize="none", low_weight=case.weights[0], backend=b)

        def spec(s, case=case, n=n, n_anchors=n_anchors):
            mass = torch.full((n_anchors,), n / n_anchors, dtype=torch.float64)
            return reference.multi_sinkhorn(s, case.eps, case.n_iters, case.weights, case.k, mass, "none")

        check_gradient("multi_sinkhorn", case, ALL, run, spec, exact_multi_sinkhorn, 3 * case.n_iters, max(case.weights))
