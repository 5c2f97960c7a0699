"""mmot.multi_sinkhorn against the dense (K, N, K) form, the reference, and its own properties."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mmot
from inputs import cosine_scores, multi_problems, random_scores
from naive import dense_multi_sinkhorn

# (N, K, k): N < K, K = 1, k = K, k = 1, primes.
ODD_SHAPES = [(7, 5, 2), (3, 6, 3), (13, 1, 1), (5, 4, 4), (33, 17, 8), (1, 3, 1), (29, 11, 1)]


def default_weights(n_anchors, k, low=0.25):
    return [low] * (n_anchors - k) + [1.0] * k


def comparable_modes(n, n_anchors, k):
    """With k = K or a single sample, T is constant up to rounding and its min-max is noise."""
    return ["none"] if k == n_anchors or n == 1 else ["none", "minmax"]


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("log_domain", ["auto", True, False])
def test_matches_dense_float64(backend, shape, log_domain):
    n, n_anchors, k = shape
    scores = random_scores(n, n_anchors, seed=n * 100 + n_anchors)
    for normalize in comparable_modes(n, n_anchors, k):
        got = mmot.multi_sinkhorn(scores, k, eps=0.3, n_iters=7, normalize=normalize, log_domain=log_domain, backend=backend)
        want = dense_multi_sinkhorn(scores, k, 0.3, 7, default_weights(n_anchors, k), normalize=normalize)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_matches_dense_float32(backend, shape):
    n, n_anchors, k = shape
    scores = cosine_scores(n, n_anchors, seed=n)
    for normalize in comparable_modes(n, n_anchors, k):
        got = mmot.multi_sinkhorn(scores.float(), k, normalize=normalize, backend=backend)
        want = dense_multi_sinkhorn(scores, k, 0.07, 20, default_weights(n_anchors, k), normalize=normalize)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-4)


@given(problem=multi_problems())
def test_hypothesis_backends_agree_with_dense(problem):
    scores, k, eps, n_iters = problem
    want = dense_multi_sinkhorn(scores, k, eps, n_iters, default_weights(scores.shape[1], k), normalize="none")
    for backend in ("rust", "torch"):
        got = mmot.multi_sinkhorn(scores, k, eps, n_iters, normalize="none", backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


def test_custom_slot_weights_and_anchor_mass(backend):
    scores = random_scores(9, 5, seed=3)
    weights = [1.0, 0.3, 1.0, 0.5, 0.3]  # repeated weights in mixed order: three groups
    mass = torch.tensor([1.0, 2.5, 2.0, 1.5, 2.0], dtype=torch.float64)
    got = mmot.multi_sinkhorn(scores, 3, 0.2, 6, slot_weights=weights, anchor_mass=mass, normalize="none", backend=backend)
    want = dense_multi_sinkhorn(scores, 3, 0.2, 6, weights, anchor_mass=mass, normalize="none")
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("low", [0.5, 1 / 3, 0.25, 0.3])
@pytest.mark.parametrize("shape", [(41, 37, 18), (300, 21, 5), (57, 64, 32), (603, 32, 16)])
def test_weight_ratios_match_dense(backend, low, shape):
    # With two weight groups the Rust forward caches only D = E_1 / E_0, whatever the ratio of
    # the weights. K = 37 and 21 leave a remainder after the vector lanes, N = 41 an odd row;
    # K = 64 and 32 take the single-sweep path (whole vectors per row) in f32 and f64.
    n, n_anchors, k = shape
    weights = default_weights(n_anchors, k, low)
    scores64 = random_scores(n, n_anchors, seed=n + n_anchors)
    got = mmot.multi_sinkhorn(scores64, k, 0.3, 7, low_weight=low, normalize="none", backend=backend)
    torch.testing.assert_close(got, dense_multi_sinkhorn(scores64, k, 0.3, 7, weights, normalize="none"), rtol=1e-9, atol=1e-10)
    scores32 = cosine_scores(n, n_anchors, seed=n)
    got = mmot.multi_sinkhorn(scores32.float(), k, low_weight=low, backend=backend)
    want = dense_multi_sinkhorn(scores32, k, 0.07, 20, weights, normalize="minmax")
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-4)


def test_low_weight_equal_to_one_is_a_single_group(backend):
    scores = random_scores(8, 6, seed=4)
    got = mmot.multi_sinkhorn(scores, 2, 0.4, 5, low_weight=1.0, normalize="none", backend=backend)
    want = dense_multi_sinkhorn(scores, 2, 0.4, 5, [1.0] * 6, normalize="none")
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@given(problem=multi_problems())
def test_marginals_and_range(problem):
    scores, k, eps, n_iters = problem
    raw = mmot.multi_sinkhorn(scores, k, eps, n_iters, normalize="none")
    torch.testing.assert_close(raw.sum(-1), torch.full((scores.shape[0],), float(k), dtype=torch.float64))
    assert bool((raw >= 0).all())  # entries reach [0, 1] only as the iteration converges
    targets = mmot.multi_sinkhorn(scores, k, eps, n_iters)
    assert bool((targets >= 0).all()) and bool((targets <= 1).all())


def test_converged_columns_and_entries(backend):
    n, n_anchors, k = 40, 8, 3
    raw = mmot.multi_sinkhorn(cosine_scores(n, n_anchors), k, eps=0.5, n_iters=400, normalize="none", backend=backend)
    torch.testing.assert_close(raw.sum(0), torch.full((n_anchors,), k * n / n_anchors, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert bool((raw >= 0).all()) and bool((raw <= 1 + 1e-9).all())


@given(problem=multi_problems(), shift=st.floats(-5.0, 5.0), column=st.integers(0, 11))
def test_invariant_to_shifting_an_anchor_column(problem, shift, column):
    scores, k, eps, n_iters = problem
    shifted = scores.clone()
    shifted[:, column % scores.shape[1]] += shift
    a = mmot.multi_sinkhorn(scores, k, eps, n_iters, normalize="none")
    b = mmot.multi_sinkhorn(shifted, k, eps, n_iters, normalize="none")
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_batched_equals_looped(backend):
    scores = random_scores(2, 3, 11, 7, seed=5)
    mass = torch.rand(2, 3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    mass = mass / mass.sum(-1, keepdim=True) * 11
    batched = mmot.multi_sinkhorn(scores, 3, 0.3, 9, anchor_mass=mass, backend=backend)
    for i in range(2):
        for j in range(3):
            single = mmot.multi_sinkhorn(scores[i, j], 3, 0.3, 9, anchor_mass=mass[i, j], backend=backend)
            torch.testing.assert_close(batched[i, j], single, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_eps_stays_finite_and_right(backend, dtype):
    scores = cosine_scores(50, 16, seed=7, dtype=dtype)
    raw = mmot.multi_sinkhorn(scores, 8, eps=1e-3, n_iters=20, normalize="none", backend=backend)
    assert bool(torch.isfinite(raw).all())
    torch.testing.assert_close(raw.sum(-1).double(), torch.full((50,), 8.0, dtype=torch.float64), rtol=0, atol=1e-4)
    reference = mmot.multi_sinkhorn(scores.double(), 8, eps=1e-3, n_iters=20, normalize="none", backend="torch")
    torch.testing.assert_close(raw.double(), reference, rtol=0, atol=1e-3 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("dtype, limit", [(torch.float32, 50.0), (torch.float64, 300.0)])
@pytest.mark.parametrize("side", [0.98, 1.02])
def test_plain_and_log_domain_agree_near_the_switch(backend, dtype, limit, side):
    eps = 0.1
    scores = random_scores(12, 6, seed=8)
    # Put every column's spread at `side` times the plain-domain limit.
    spread = scores.amax(0) - scores.amin(0)
    scores = (scores - scores.amin(0)) / spread * (side * limit * eps)
    scores = scores.to(dtype)
    plain = mmot.multi_sinkhorn(scores, 3, eps, 10, normalize="none", log_domain=False, backend=backend)
    log = mmot.multi_sinkhorn(scores, 3, eps, 10, normalize="none", log_domain=True, backend=backend)
    auto = mmot.multi_sinkhorn(scores, 3, eps, 10, normalize="none", backend=backend)
    assert bool(torch.isfinite(plain).all()) and bool(torch.isfinite(log).all())
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(plain, log, rtol=tol, atol=tol)
    torch.testing.assert_close(auto, log, rtol=tol, atol=tol)


def test_constant_rows_minmax_to_zero(backend):
    out = mmot.multi_sinkhorn(random_scores(6, 1, seed=9), 1, backend=backend)
    torch.testing.assert_close(out, torch.zeros(6, 1, dtype=torch.float64))


def test_default_k_is_half_of_k(backend):
    scores = random_scores(10, 9, seed=10)
    raw = mmot.multi_sinkhorn(scores, normalize="none", backend=backend)
    torch.testing.assert_close(raw.sum(-1), torch.full((10,), 4.0, dtype=torch.float64))
