"""Reliability of the Sinkhorn ops on every backend: feasible masses only, non-finite in gives
non-finite out with the checks off, one constant-row rule for min-max, forced plain domain
refused where it overflows, and a reference that stays finite for every finite score.

Triton runs under the interpreter (tests/conftest.py) on tiny shapes.
"""

from __future__ import annotations

import math

import mmot
import pytest
import torch
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
@pytest.mark.parametrize("scale, checks", [(1e30, True), (1e38, False)])
def test_huge_scores_give_finite_plans(backend, scale, checks):
    # At 1e38 the exponent range is beyond float32's log domain (refused with the checks on,
    # test_exponent_range_beyond_the_log_domain_is_refused); unchecked, the floored logits
    # still give finite plans with the right marginals.
    previous = mmot.set_checks(checks)
    try:
        _finite_plans(backend, scale)
    finally:
        mmot.set_checks(previous)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e38), (torch.float32, 1e36), (torch.float64, 1e306)])
def test_exponent_range_beyond_the_log_domain_is_refused(backend, dtype, scale):
    """Past finfo.max/8 a centred logit would hit the floor and a row's order would be lost."""
    s = torch.rand(6, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64).mul(2).sub(1).mul(scale).to(dtype)
    eps = 0.01  # range/eps past the limit in every case
    named = r"argument 'eps' is too small for these scores: the exponent range"
    with pytest.raises(ValueError, match=r"mmot\.sinkhorn: " + named):
        mmot.sinkhorn(s, eps, 3, backend=backend)
    with pytest.raises(ValueError, match=r"mmot\.multi_sinkhorn: " + named):
        mmot.multi_sinkhorn(s, 2, eps, 3, backend=backend)
    # Just inside the limit the answer is the float64 one (a near-hard assignment).
    inside = s.double() * (reference.logit_floor(dtype) / -8.0 / float(s.double().amax(-2).sub(s.double().amin(-2)).amax()) * eps)
    got = mmot.sinkhorn(inside.to(dtype), eps, 3, backend=backend)
    torch.testing.assert_close(got.double(), mmot.sinkhorn(inside.to(dtype).double(), eps, 3, backend="torch"), atol=1e-5, rtol=0)


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
