"""mmot.sinkhorn against a SwAV-style loop, a naive generic-mass loop, and its own properties."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mmot
from inputs import cosine_scores, random_scores
from naive import swav_sinkhorn

ODD_SHAPES = [(7, 5), (3, 11), (13, 1), (1, 4), (33, 17), (64, 3)]


def naive_sinkhorn(scores, eps, n_iters, row_mass, col_mass):
    """Plain alternating scaling of the full matrix, in float64."""
    p = torch.exp(scores.double() / eps)
    for _ in range(n_iters):
        p = p * (col_mass.double() / p.sum(0))[None, :]
        p = p * (row_mass.double() / p.sum(1))[:, None]
    return p


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("log_domain", ["auto", True, False])
def test_matches_swav_float64(backend, shape, log_domain):
    scores = random_scores(*shape, seed=shape[0])
    got = mmot.sinkhorn(scores, eps=0.5, n_iters=4, log_domain=log_domain, backend=backend)
    torch.testing.assert_close(got, swav_sinkhorn(scores, 0.5, 4), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_matches_swav_float32(backend, shape):
    scores = cosine_scores(*shape, seed=shape[1])
    got = mmot.sinkhorn(scores.float(), backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), swav_sinkhorn(scores, 0.05, 3), rtol=1e-4, atol=1e-5)


@given(
    n=st.integers(1, 20),
    k=st.integers(1, 12),
    eps=st.floats(0.05, 2.0),
    n_iters=st.integers(1, 10),
    seed=st.integers(0, 2**31 - 1),
)
def test_hypothesis_custom_masses(n, k, eps, n_iters, seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, k, generator=generator, dtype=torch.float64)
    rows = torch.rand(n, generator=generator, dtype=torch.float64) + 0.1
    cols = torch.rand(k, generator=generator, dtype=torch.float64) + 0.1
    cols = cols / cols.sum() * rows.sum()
    want = naive_sinkhorn(scores, eps, n_iters, rows, cols)
    for backend in ("rust", "torch"):
        got = mmot.sinkhorn(scores, eps, n_iters, row_mass=rows, col_mass=cols, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got.sum(-1), rows)


def test_one_mass_given_sets_the_total(backend):
    scores = random_scores(6, 4, seed=2)
    rows = torch.tensor([1.0, 2.0, 0.5, 0.5, 1.0, 3.0], dtype=torch.float64)
    got = mmot.sinkhorn(scores, 0.5, 200, row_mass=rows, backend=backend)
    torch.testing.assert_close(got.sum(0), torch.full((4,), 2.0, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    cols = torch.tensor([3.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    got = mmot.sinkhorn(scores, 0.5, 3, col_mass=cols, backend=backend)
    torch.testing.assert_close(got.sum(-1), torch.ones(6, dtype=torch.float64))


def test_batched_equals_looped(backend):
    scores = random_scores(4, 9, 5, seed=3)
    batched = mmot.sinkhorn(scores, 0.3, 5, backend=backend)
    for i in range(4):
        torch.testing.assert_close(batched[i], mmot.sinkhorn(scores[i], 0.3, 5, backend=backend), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_eps_stays_finite_and_right(backend, dtype):
    scores = cosine_scores(40, 12, seed=4, dtype=dtype)
    got = mmot.sinkhorn(scores, eps=1e-3, n_iters=5, backend=backend)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.sum(-1).double(), torch.ones(40, dtype=torch.float64), rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype, limit", [(torch.float32, 50.0), (torch.float64, 300.0)])
@pytest.mark.parametrize("side", [0.98, 1.02])
def test_plain_and_log_domain_agree_near_the_switch(backend, dtype, limit, side):
    eps = 0.1
    scores = random_scores(10, 7, seed=5)
    scores = ((scores - scores.amin(0)) / (scores.amax(0) - scores.amin(0)) * (side * limit * eps)).to(dtype)
    plain = mmot.sinkhorn(scores, eps, 6, log_domain=False, backend=backend)
    log = mmot.sinkhorn(scores, eps, 6, log_domain=True, backend=backend)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(plain, log, rtol=tol, atol=tol)
    torch.testing.assert_close(mmot.sinkhorn(scores, eps, 6, backend=backend), log, rtol=tol, atol=tol)


def test_empty_rows_give_an_empty_result(backend):
    out = mmot.sinkhorn(torch.empty(0, 5, dtype=torch.float64), backend=backend)
    assert out.shape == (0, 5)
    out = mmot.sinkhorn(torch.empty(0, 3, 5, dtype=torch.float64), backend=backend)
    assert out.shape == (0, 3, 5)
