"""Reliability of the Sinkhorn ops on every backend: feasible masses only, non-finite in gives
non-finite out with the checks off, one constant-row rule for min-max, forced plain domain
refused where it overflows, and a reference that stays finite for every finite score.

Triton runs under the interpreter (tests/conftest.py) on tiny shapes.
"""

from __future__ import annotations

import math

import mmot
import mpmath
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from mmot import reference

BACKENDS = ["rust", "torch", "triton"]


@pytest.fixture
def checks_off():
    mmot.set_checks(False)
    yield
    mmot.set_checks(True)


def _naive_multi_sinkhorn(s: torch.Tensor, eps: float, n_iters: int, weights: list[float], k: int) -> torch.Tensor:
    """The dense [K, N, K] Multi-SK in float64, plain domain, uniform anchor masses N/K."""
    s = s.double()
    n, kk = s.shape
    w = torch.tensor(weights, dtype=torch.float64).view(kk, 1, 1)
    p = torch.exp(w * (s - s.amax(0)) / eps).expand(kk, n, kk).clone()
    for _ in range(n_iters):
        p = p * (n / kk) / p.sum(1, keepdim=True)
        p = p / p.sum(0, keepdim=True)
        p = p / p.sum(2, keepdim=True)
    return p[kk - k :].sum(0)


# Class: anchor_mass. Only uniform masses are feasible; the result never depends on them.


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_uniform_anchor_mass_is_refused(backend):
    s = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"mmot\.multi_sinkhorn: argument 'anchor_mass' must be uniform"):
        mmot.multi_sinkhorn(s, 2, 0.3, 200, anchor_mass=torch.tensor([1.0, 2.0, 1.5, 1.5]), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_anchor_mass_matches_default_and_naive(backend):
    s = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    given = mmot.multi_sinkhorn(s, 2, 0.3, 50, anchor_mass=torch.full((4,), 1.5), normalize="none", backend=backend)
    default = mmot.multi_sinkhorn(s, 2, 0.3, 50, normalize="none", backend=backend)
    torch.testing.assert_close(given, default)
    naive = _naive_multi_sinkhorn(s, 0.3, 50, [0.25, 0.25, 1.0, 1.0], 2)
    torch.testing.assert_close(given.double(), naive, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_uniform_anchor_mass_with_checks_off_never_nan(backend, checks_off):
    s = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    out = mmot.multi_sinkhorn(s, 2, 0.3, 200, anchor_mass=torch.tensor([1.0, 2.0, 1.5, 1.5]), normalize="none", backend=backend)
    assert torch.isfinite(out).all()
    naive = _naive_multi_sinkhorn(s, 0.3, 200, [0.25, 0.25, 1.0, 1.0], 2)
    torch.testing.assert_close(out.double(), naive, atol=2e-5, rtol=1e-4)


# Class: non-finite in, non-finite out with the checks off.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("op", ["sinkhorn", "multi_sinkhorn"])
@pytest.mark.parametrize("log_domain", [True, "auto"])
def test_non_finite_scores_give_nan_problems(backend, bad, op, log_domain, checks_off):
    s = torch.randn(2, 8, 5, generator=torch.Generator().manual_seed(4))
    s[0, 3, 1] = bad
    s.requires_grad_(True)
    out = getattr(mmot, op)(s, eps=0.5, log_domain=log_domain, backend=backend)
    assert torch.isnan(out[0]).all()
    assert torch.isfinite(out[1]).all()
    (grad,) = torch.autograd.grad((out[1] * torch.arange(5.0)).sum() + out[0].nan_to_num().sum(), s)
    assert torch.isnan(grad[0]).all()
    assert torch.isfinite(grad[1]).all()


# Class: constant rows. Equal slot weights make every row constant: min-max gives exactly 0.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", [dict(k=2, low_weight=1.0), dict(k=4, low_weight=0.25), dict(k=3, slot_weights=[0.7] * 4)])
def test_equal_slot_weights_give_zero_targets(backend, dtype, case):
    s = torch.randn(5, 4, dtype=dtype, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    options = dict(case)
    k = options.pop("k")
    out = mmot.multi_sinkhorn(s, k, 0.3, 7, backend=backend, **options)
    assert torch.equal(out, torch.zeros_like(out))
    (grad,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), s)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_constant_row_rule_is_relative_to_the_row():
    from mmot.reference import minmax_rows

    eps32 = torch.finfo(torch.float32).eps
    rows = torch.tensor([[1.0, 1.0 + 64 * eps32, 1.0], [1.0, 1.0 + 4096 * eps32, 1.0], [1e-30, 2e-30, 1.5e-30]])
    out = minmax_rows(rows)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.5]]))
    assert torch.isnan(minmax_rows(torch.tensor([[1.0, math.nan, 2.0]]))).any()


# Class: forcing the plain domain where exp overflows.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["sinkhorn", "multi_sinkhorn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forced_plain_domain_beyond_its_limit_is_refused(backend, op, dtype):
    s = torch.randn(8, 5, dtype=dtype, generator=torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match=rf"mmot\.{op}: log_domain=False .*eps = (0\.001|1e-3).*log_domain=\"auto\""):
        getattr(mmot, op)(s, eps=1e-3, log_domain=False, backend=backend)
    # Inside the limit the plain domain is allowed and agrees with the log domain.
    plain = getattr(mmot, op)(s, eps=1.0, log_domain=False, backend=backend)
    log = getattr(mmot, op)(s, eps=1.0, log_domain=True, backend=backend)
    torch.testing.assert_close(plain, log, atol=1e-5, rtol=1e-5)


# Class: the reference is as robust as the kernels for every finite score.


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_huge_scores_give_finite_plans_with_the_checks_off(backend, checks_off):
    # At 1e38 Multi-SK's exponent range is past what float64 resolves (refused with the checks
    # on, test_multi_sinkhorn_past_float64_resolution_is_refused); unchecked, the floored
    # logits still give finite plans with the right marginals.
    _finite_plans(backend, 1e38)


def _finite_plans(backend, scale):
    s = (torch.randn(8, 5, generator=torch.Generator().manual_seed(7)) * scale).requires_grad_(True)
    p = mmot.sinkhorn(s, backend=backend)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(8))
    t = mmot.multi_sinkhorn(s, normalize="none", backend=backend)
    assert torch.isfinite(t).all()
    torch.testing.assert_close(t.sum(-1), torch.full((8,), 2.0))
    (grad,) = torch.autograd.grad((p * torch.arange(5.0)).sum() + (t * torch.arange(5.0)).sum(), s)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_scores_agree_with_float64(backend):
    # Large but representable logits: every backend must match the float64 log-domain result
    # to the float32 rounding of logits near 1e4 (an ulp of 1e-3).
    s = torch.randn(8, 5, generator=torch.Generator().manual_seed(8)) * 1e4
    p = mmot.sinkhorn(s, eps=1.0, n_iters=5, backend=backend)
    expected = mmot.sinkhorn(s.double(), eps=1.0, n_iters=5, backend="torch")
    torch.testing.assert_close(p.double(), expected, atol=5e-3, rtol=0)


# Class: extreme magnitudes and eps near its limit. The specification is the exact iteration,
# evaluated here with 100-bit mpmath numbers (whose exponents do not overflow), independent of
# mmot: float64 itself rounds the potentials of the reference's old form at |logits| ~ 1e20.

MP_PREC = 100


def _exact_sinkhorn(s: torch.Tensor, eps: float, n_iters: int, jitter: float = 0.0) -> torch.Tensor:
    """Plain-domain Sinkhorn-Knopp in mpmath, default masses (rows 1, columns N/K), of the
    scores each scaled by 1 ± ``jitter`` (alternating signs)."""
    n, k = s.shape
    with mpmath.workprec(MP_PREC):
        rows = [[mpmath.mpf(v) * (1 + jitter * (-1) ** (i + j)) for j, v in enumerate(row)] for i, row in enumerate(s.double().tolist())]
        col_max = [max(row[j] for row in rows) for j in range(k)]
        e = [[mpmath.exp((row[j] - col_max[j]) / eps) for j in range(k)] for row in rows]
        u = [mpmath.mpf(1)] * n
        for _ in range(n_iters):
            v = [mpmath.mpf(n) / k / mpmath.fsum(e[i][j] * u[i] for i in range(n)) for j in range(k)]
            u = [1 / mpmath.fsum(e[i][j] * v[j] for j in range(k)) for i in range(n)]
        return torch.tensor([[float(e[i][j] * u[i] * v[j]) for j in range(k)] for i in range(n)], dtype=torch.float64)


def _exact_multi_sinkhorn(s: torch.Tensor, eps: float, n_iters: int, weights: list[float], k: int) -> torch.Tensor:
    """The dense [K, N, K] Multi-SK in mpmath, uniform anchor masses N/K, normalize="none"."""
    rows = [[mpmath.mpf(v) for v in row] for row in s.double().tolist()]
    n, kk = len(rows), len(rows[0])
    with mpmath.workprec(MP_PREC):
        col_max = [max(row[a] for row in rows) for a in range(kk)]
        p = [[[mpmath.exp(w * (row[a] - col_max[a]) / eps) for a in range(kk)] for row in rows] for w in weights]
        mass = mpmath.mpf(n) / kk
        for _ in range(n_iters):
            for m in range(kk):
                for a in range(kk):
                    scale = mass / mpmath.fsum(p[m][i][a] for i in range(n))
                    for i in range(n):
                        p[m][i][a] *= scale
            for i in range(n):
                for a in range(kk):
                    total = mpmath.fsum(p[m][i][a] for m in range(kk))
                    for m in range(kk):
                        p[m][i][a] /= total
            for m in range(kk):
                for i in range(n):
                    total = mpmath.fsum(p[m][i])
                    p[m][i] = [x / total for x in p[m][i]]
        top = range(kk - k, kk)
        return torch.tensor([[float(mpmath.fsum(p[m][i][a] for m in top)) for a in range(kk)] for i in range(n)], dtype=torch.float64)


def _scores(seed: int, dtype: torch.dtype, magnitude: float, shape=(6, 4), tie=False, constant=False) -> torch.Tensor:
    """Uniform in [−magnitude, magnitude] (so finite in ``dtype``), optionally with a row tied
    to another and a constant row."""
    s = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).mul(2).sub(1).mul(magnitude)
    if tie:
        s[1] = s[0]
    if constant:
        s[2] = s[2, 0]
    return s.to(dtype)


def _tolerance(dtype: torch.dtype) -> float:
    """Float32 accuracy for float32 (and float64 at least); float16/bfloat16 outputs round to their own unit."""
    return {torch.float64: 1e-12, torch.float32: 2e-6}.get(dtype, torch.finfo(dtype).eps)


MAGNITUDE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=12)
@given(
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(MAGNITUDE_DTYPES),
    position=st.floats(0.0, 1.0),
    tie=st.booleans(),
    constant=st.booleans(),
)
@example(seed=0, dtype=torch.float32, position=1.0, tie=True, constant=False)
def test_sinkhorn_matches_exact_at_every_magnitude(backend, seed, dtype, position, tie, constant):
    """From the smallest normals to finfo.max/2 (float32: 10**-37.9 .. 1.7e38): float32 scores
    past float32's exponent range run in float64 and match the exact plan (they used to be
    refused, or rounded to 0.2 everywhere on torch; torch and Triton were 1e-2 off from 1e5)."""
    info = torch.finfo(dtype)
    # float64 up to 1e300: past about 1e305 the exponent range at eps = 0.05 leaves float64.
    low, high = math.log10(info.tiny), math.log10(info.max / 2) if dtype != torch.float64 else 300.0
    s = _scores(seed, dtype, 10 ** (low + position * (high - low)), tie=tie, constant=constant)
    exact, atol = _exact_sinkhorn(s, 0.05, 3), _tolerance(dtype)
    # Only where float64 can decide the plan: near 1e38 a tie (a constant row) can be settled by
    # score differences below float64's resolution there, and then a change of the scores in
    # their last float64 bits moves the exact plan; no float64 computation can match it.
    assume(torch.allclose(exact, _exact_sinkhorn(s, 0.05, 3, jitter=2.0**-50), atol=atol, rtol=0))
    got = mmot.sinkhorn(s, backend=backend)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), exact, atol=atol, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.float64]), exponent=st.floats(-37.0, 10.0))
@example(seed=1, dtype=torch.float32, exponent=10.0)
def test_multi_sinkhorn_matches_exact_until_float64_resolution(backend, seed, dtype, exponent):
    """Up to the float64 limit of Multi-SK's exponent range (2^41; scores of 1e10 at eps = 0.07):
    float32 scores past 2^12 run in float64 (they were up to 0.9 off at 1e10, 2e-3 at 1e3)."""
    s = _scores(seed, dtype, 10.0**exponent)
    got = mmot.multi_sinkhorn(s, 2, 0.07, 8, normalize="none", backend=backend)
    exact = _exact_multi_sinkhorn(s, 0.07, 8, [0.25, 0.25, 1.0, 1.0], 2)
    # Within 2^12 units of float32 at R = 2^12 (float32), 2^-12 at R = 2^41 (float64).
    torch.testing.assert_close(got.double(), exact, atol=1e-3 if dtype == torch.float32 else 1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, scale, eps", [(torch.float32, 1e38, 0.07), (torch.float64, 1e20, 0.07), (torch.float32, 1.0, 1e-37)])
def test_multi_sinkhorn_past_float64_resolution_is_refused(backend, dtype, scale, eps):
    """Multi-SK's potentials are as large as its exponent range R and its plan is set by their
    O(1) differences: past R = 2^41 even float64 decides it by rounding (0.35 off the exact plan
    at 1e36, 0.05 at 1e20, on every backend), so such eps is refused."""
    s = _scores(9, dtype, scale)
    with pytest.raises(ValueError, match=r"mmot\.multi_sinkhorn: argument 'eps' is too small for these scores: .* float64 resolves"):
        mmot.multi_sinkhorn(s, 2, eps, 3, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_refuses_only_past_the_float64_range(backend):
    """Float32 scores past float32's exponent range run in float64 (they used to be refused);
    past finfo(float64).max/8 a centred logit would hit the floor, so float64 refuses there."""
    s = _scores(3, torch.float32, 1e38)
    torch.testing.assert_close(mmot.sinkhorn(s, 0.01, 3, backend=backend).double(), _exact_sinkhorn(s, 0.01, 3), atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match=r"mmot\.sinkhorn: argument 'eps' is too small for these scores: the exponent range"):
        mmot.sinkhorn(_scores(3, torch.float64, 1e306), 0.01, 3, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.float64]), position=st.floats(0.0, 1.0))
def test_sinkhorn_eps_near_its_limit_matches_exact(backend, seed, dtype, position):
    """eps just above 1/finfo(float32).max (float32: 3e-39 .. 3e-36) or at 1e-300 (float64):
    a near-hard plan whose fractions (1/2, 7/9, ...) come from ties in the max-plus limit. The
    backends used to disagree there (rust 7/9 where torch gave 11/15) as rounding of potentials
    of the size of the logits decided them."""
    if dtype == torch.float32:
        eps = 2.94e-39 * 10 ** (0.5 + 2.5 * position)
    else:
        eps = 1e-300 * 10 ** (3 * position)
    s = _scores(seed, dtype, 1.0)
    got = mmot.sinkhorn(s, eps, 3, backend=backend)
    torch.testing.assert_close(got.double(), _exact_sinkhorn(s, eps, 3), atol=_tolerance(dtype), rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["sinkhorn", "multi_sinkhorn"])
@pytest.mark.parametrize("dtype, eps", [(torch.float32, 1e-45), (torch.float16, 1e-39), (torch.bfloat16, 2e-39), (torch.float64, 1e-320)])
def test_eps_whose_reciprocal_overflows_is_refused(backend, op, dtype, eps):
    """1/eps past the accumulation dtype's range (float32 for float16/bfloat16) used to give a
    uniform 0.25 plan (rust, torch) or 0/1 garbage (Multi-SK)."""
    s = _scores(4, dtype, 1.0)
    limit = 1 / torch.finfo(reference.compute_dtype(dtype)).max
    with pytest.raises(ValueError, match=rf"mmot\.{op}: argument 'eps' must be at least {limit:.4g} for {dtype}"):
        getattr(mmot, op)(s, eps=eps, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, scale, eps", [("sinkhorn", 1e38, 0.05), ("multi_sinkhorn", 1e3, 0.07)])
def test_widened_float32_gradients_match_float64(backend, op, scale, eps):
    """The backward of a float32 call that runs in float64 runs in float64 too."""
    s = _scores(5, torch.float32, scale).requires_grad_(True)
    wide = s.detach().double().requires_grad_(True)
    weights = torch.randn(6, 4, generator=torch.Generator().manual_seed(6)).double()  # exact in float32
    kwargs = dict(eps=eps, n_iters=4, backend=backend) | ({"normalize": "none"} if op == "multi_sinkhorn" else {})
    (grad,) = torch.autograd.grad((getattr(mmot, op)(s, **kwargs) * weights.float()).sum(), s)
    (expected,) = torch.autograd.grad((getattr(mmot, op)(wide, **kwargs) * weights).sum(), wide)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), expected, atol=1e-6 * float(expected.abs().max()) + 1e-30, rtol=1e-4)
