"""mmot.multi_sinkhorn on every backend.

Against the dense (K, N, K) form (naive.py), against autograd through mmot.reference, its own
properties, the Rust kernel's vector-lane and row-chunk paths, the Triton kernels under both
launch structures, and its bad input.
"""

from functools import partial

import mmot
import pytest
import torch
from backends import NATIVE, needs_triton
from bad_input import bad_input_test
from gradients import F64, assert_grads_close, assert_matches_reference, grad_of, leaf, value_and_grads
from hypothesis import given, settings
from hypothesis import strategies as st
from inputs import cosine_scores, multi_problems, random_scores
from mmot import reference
from naive import dense_multi_sinkhorn

LOG_DOMAIN = {"auto": "auto", True: "on", False: "off"}
# (N, K, k): N < K, K = 1, k = K, k = 1, primes.
ODD_SHAPES = [(7, 5, 2), (3, 6, 3), (13, 1, 1), (5, 4, 4), (33, 17, 8), (1, 3, 1), (29, 11, 1)]


def default_weights(n_anchors, k, low=0.25):
    return [low] * (n_anchors - k) + [1.0] * k


def comparable_modes(n, n_anchors, k):
    """With k = K or a single sample, T is constant up to rounding and its min-max is noise."""
    return ["none"] if k == n_anchors or n == 1 else ["none", "minmax"]


def reference_multi(scores, k, eps, n_iters, slot_weights=None, anchor_mass=None, normalize="minmax", log_domain="auto", low_weight=0.25):
    """mmot.reference.multi_sinkhorn with mmot.multi_sinkhorn's defaults: weights low_weight and 1, masses N/K."""
    n, n_anchors = scores.shape[-2:]
    weights = default_weights(n_anchors, k, low_weight) if slot_weights is None else list(slot_weights)
    if anchor_mass is None:
        anchor_mass = torch.full((*scores.shape[:-2], n_anchors), n / n_anchors, dtype=torch.float64)
    return reference.multi_sinkhorn(scores, eps, n_iters, weights, k, anchor_mass, normalize, LOG_DOMAIN[log_domain])


def flat_minmax(scores, k, eps, n_iters, weights, mass):
    """Whether some row of T is nearly constant, where min-max only amplifies rounding."""
    raw = reference.multi_sinkhorn(scores.double(), eps, n_iters, weights, k, mass.double(), "none", "auto")
    return bool(((raw.amax(-1) - raw.amin(-1)) < 1e-2).any())


# ---------------------------------------------------------------- values


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
def test_matches_dense_float32(native_backend, shape):
    n, n_anchors, k = shape
    scores = cosine_scores(n, n_anchors, seed=n)
    for normalize in comparable_modes(n, n_anchors, k):
        got = mmot.multi_sinkhorn(scores.float(), k, normalize=normalize, backend=native_backend)
        want = dense_multi_sinkhorn(scores, k, 0.07, 20, default_weights(n_anchors, k), normalize=normalize)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-4)


@given(problem=multi_problems())
def test_hypothesis_matches_dense(problem):
    scores, k, eps, n_iters = problem
    want = dense_multi_sinkhorn(scores, k, eps, n_iters, default_weights(scores.shape[1], k), normalize="none")
    for backend in NATIVE:
        got = mmot.multi_sinkhorn(scores, k, eps, n_iters, normalize="none", backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


def test_custom_slot_weights_and_uniform_anchor_mass(backend):
    scores = random_scores(9, 5, seed=3)
    weights = [1.0, 0.3, 1.0, 0.5, 0.3]  # repeated weights in mixed order: three groups
    mass = torch.full((5,), 9 / 5, dtype=torch.float64)  # the only feasible masses, given explicitly
    got = mmot.multi_sinkhorn(scores, 3, 0.2, 6, slot_weights=weights, anchor_mass=mass, normalize="none", backend=backend)
    want = dense_multi_sinkhorn(scores, 3, 0.2, 6, weights, anchor_mass=mass, normalize="none")
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("low", [0.5, 1 / 3, 0.25, 0.3])
@pytest.mark.parametrize("shape", [(41, 37, 18), (300, 21, 5), (57, 64, 32), (603, 32, 16)])
def test_weight_ratios_match_dense(native_backend, low, shape):
    # With two weight groups the Rust forward caches only D = E_1 / E_0, whatever the ratio of
    # the weights. K = 37 and 21 leave a remainder after the vector lanes, N = 41 an odd row;
    # K = 64 and 32 take the single-sweep path (whole vectors per row) in f32 and f64.
    n, n_anchors, k = shape
    weights = default_weights(n_anchors, k, low)
    scores64 = random_scores(n, n_anchors, seed=n + n_anchors)
    got = mmot.multi_sinkhorn(scores64, k, 0.3, 7, low_weight=low, normalize="none", backend=native_backend)
    torch.testing.assert_close(got, dense_multi_sinkhorn(scores64, k, 0.3, 7, weights, normalize="none"), rtol=1e-9, atol=1e-10)
    scores32 = cosine_scores(n, n_anchors, seed=n)
    got = mmot.multi_sinkhorn(scores32.float(), k, low_weight=low, backend=native_backend)
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
    for backend in NATIVE:
        raw = mmot.multi_sinkhorn(scores, k, eps, n_iters, normalize="none", backend=backend)
        torch.testing.assert_close(raw.sum(-1), torch.full((scores.shape[0],), float(k), dtype=torch.float64))
        assert bool((raw >= 0).all())  # entries reach [0, 1] only as the iteration converges
        targets = mmot.multi_sinkhorn(scores, k, eps, n_iters, backend=backend)
        assert bool((targets >= 0).all()) and bool((targets <= 1).all())


def test_converged_columns_and_entries(native_backend):
    n, n_anchors, k = 40, 8, 3
    raw = mmot.multi_sinkhorn(cosine_scores(n, n_anchors), k, eps=0.5, n_iters=400, normalize="none", backend=native_backend)
    torch.testing.assert_close(raw.sum(0), torch.full((n_anchors,), k * n / n_anchors, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert bool((raw >= 0).all()) and bool((raw <= 1 + 1e-9).all())


@given(problem=multi_problems(), shift=st.floats(-5.0, 5.0), column=st.integers(0, 11))
def test_invariant_to_shifting_an_anchor_column(problem, shift, column):
    scores, k, eps, n_iters = problem
    shifted = scores.clone()
    shifted[:, column % scores.shape[1]] += shift
    for backend in NATIVE:
        a = mmot.multi_sinkhorn(scores, k, eps, n_iters, normalize="none", backend=backend)
        b = mmot.multi_sinkhorn(shifted, k, eps, n_iters, normalize="none", backend=backend)
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_batched_equals_looped(backend):
    scores = random_scores(2, 3, 11, 7, seed=5)
    mass = torch.full((2, 3, 7), 11 / 7, dtype=torch.float64)
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
    want = mmot.multi_sinkhorn(scores.double(), 8, eps=1e-3, n_iters=20, normalize="none", backend="torch")
    torch.testing.assert_close(raw.double(), want, rtol=0, atol=1e-3 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("dtype, limit", [(torch.float32, 50.0), (torch.float64, 300.0)])
@pytest.mark.parametrize("side", [0.98, 1.02])
def test_plain_and_log_domain_agree_near_the_switch(backend, dtype, limit, side):
    eps = 0.1
    scores = random_scores(12, 6, seed=8)
    # Put every column's spread at `side` times the plain-domain limit.
    spread = scores.amax(0) - scores.amin(0)
    scores = (scores - scores.amin(0)) / spread * (side * limit * eps)
    scores = scores.to(dtype)
    log = mmot.multi_sinkhorn(scores, 3, eps, 10, normalize="none", log_domain=True, backend=backend)
    auto = mmot.multi_sinkhorn(scores, 3, eps, 10, normalize="none", backend=backend)
    assert bool(torch.isfinite(log).all())
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(auto, log, rtol=tol, atol=tol)
    if side > 1:  # forcing the plain domain past its limit would overflow exp: refused
        with pytest.raises(ValueError, match="mmot.multi_sinkhorn: log_domain=False forces the plain domain"):
            mmot.multi_sinkhorn(scores, 3, eps, 10, normalize="none", log_domain=False, backend=backend)
    else:
        plain = mmot.multi_sinkhorn(scores, 3, eps, 10, normalize="none", log_domain=False, backend=backend)
        torch.testing.assert_close(plain, log, rtol=tol, atol=tol)


def test_constant_rows_minmax_to_zero(backend):
    out = mmot.multi_sinkhorn(random_scores(6, 1, seed=9), 1, backend=backend)
    torch.testing.assert_close(out, torch.zeros(6, 1, dtype=torch.float64))


def test_default_k_is_half_of_k(backend):
    scores = random_scores(10, 9, seed=10)
    raw = mmot.multi_sinkhorn(scores, normalize="none", backend=backend)
    torch.testing.assert_close(raw.sum(-1), torch.full((10,), 4.0, dtype=torch.float64))


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("normalize", ["minmax", "none"])
@pytest.mark.parametrize("log_domain", [True, False])
def test_gradcheck(native_backend, normalize, log_domain):
    scores = leaf(random_scores(6, 5, seed=2))
    assert torch.autograd.gradcheck(
        lambda s: mmot.multi_sinkhorn(s, 2, 0.3, 4, normalize=normalize, log_domain=log_domain, backend=native_backend), (scores,)
    )


def test_gradient_equals_dense_autograd(backend):
    scores = random_scores(9, 6, seed=5)
    upstream = random_scores(9, 6, seed=6)
    weights = [0.25] * 3 + [1.0] * 3
    for normalize in ("minmax", "none"):
        ours, dense = leaf(scores), leaf(scores)
        (mmot.multi_sinkhorn(ours, 3, 0.3, 6, normalize=normalize, backend=backend) * upstream).sum().backward()
        (dense_multi_sinkhorn(dense, 3, 0.3, 6, weights, normalize=normalize) * upstream).sum().backward()
        torch.testing.assert_close(ours.grad, dense.grad, rtol=1e-8, atol=1e-10)


def test_float32_gradients_match_float64(native_backend):
    scores = random_scores(12, 8, seed=9)
    upstream = random_scores(12, 8, seed=10)
    grads = []
    for dtype in (torch.float32, torch.float64):
        s = leaf(scores.to(dtype))
        (mmot.multi_sinkhorn(s, 4, backend=native_backend) * upstream.to(dtype)).sum().backward()
        grads.append(s.grad.double())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-3)


def test_no_graph_without_grad(backend):
    out = mmot.multi_sinkhorn(random_scores(5, 4, seed=11), backend=backend)
    assert out.grad_fn is None and not out.requires_grad


# (N, K, k): single sample, K = 1, k = 1, k = K, primes.
SHAPES = [(1, 4, 2), (9, 1, 1), (7, 5, 1), (6, 6, 6), (13, 11, 5), (33, 17, 8)]


def check_against_reference(backend, shape, log_domain, normalize, dtype):
    n, n_anchors, k = shape
    scores = random_scores(n, n_anchors, seed=n + n_anchors, dtype=dtype)
    upstream = random_scores(n, n_anchors, seed=7 + n, dtype=dtype)
    mass = torch.full((n_anchors,), n / n_anchors, dtype=torch.float64)
    if normalize == "minmax" and flat_minmax(scores, k, 0.3, 6, default_weights(n_anchors, k), mass):
        pytest.skip("T has a constant row: its min-max is rounding noise")
    assert_matches_reference(
        lambda s: mmot.multi_sinkhorn(s, k, 0.3, 6, normalize=normalize, log_domain=log_domain, backend=backend),
        lambda s: reference_multi(s, k, 0.3, 6, normalize=normalize, log_domain=log_domain),
        [scores],
        upstream,
    )


@given(
    n=st.integers(1, 24),
    n_anchors=st.integers(1, 10),
    data=st.data(),
    eps=st.floats(0.1, 2.0),
    n_iters=st.integers(1, 10),
    seed=st.integers(0, 2**31 - 1),
    normalize=st.sampled_from(["none", "minmax"]),
    log_domain=st.sampled_from([True, False, "auto"]),
)
def test_hypothesis_backward_matches_reference(n, n_anchors, data, eps, n_iters, seed, normalize, log_domain):
    k = data.draw(st.integers(1, n_anchors))
    pool = [0.25, 0.5, 1.0, 0.8]
    weights = [data.draw(st.sampled_from(pool)) for _ in range(n_anchors)]
    mass = torch.full((n_anchors,), n / n_anchors, dtype=torch.float64)
    scores = random_scores(n, n_anchors, seed=seed)
    upstream = random_scores(n, n_anchors, seed=seed + 1)
    if normalize == "minmax" and flat_minmax(scores, k, eps, n_iters, weights, mass):
        normalize = "none"
    kwargs = dict(slot_weights=weights, anchor_mass=mass, normalize=normalize, log_domain=log_domain)
    ref, want = value_and_grads(partial(reference_multi, k=k, eps=eps, n_iters=n_iters, **kwargs), [scores], upstream)
    if normalize == "minmax":
        # Equal-size groups split evenly by k make T nearly flat and the gradient ill-conditioned:
        # compare in proportion to that conditioning.
        raw = reference.multi_sinkhorn(scores, eps, n_iters, weights, k, mass, "none", "auto")
        spread = float((raw.amax(-1) - raw.amin(-1)).min())
        # An exactly-zero true gradient (K = 2 rows always min-max to {0, 1}) leaves only rounding
        # noise in the reference, so the scale never drops below 1.
        scale = max(float(want[0].abs().max()), 1.0)
    for backend in NATIVE:
        out, got = value_and_grads(
            partial(mmot.multi_sinkhorn, k=k, eps=eps, n_iters=n_iters, **kwargs, backend=backend), [scores], upstream
        )
        torch.testing.assert_close(out, ref, **F64)
        if normalize == "none":
            assert_grads_close(got, want, torch.float64)
        else:
            torch.testing.assert_close(got[0] / scale, want[0] / scale, rtol=0, atol=1e-10 / min(spread, 1.0) ** 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_weights_mass_and_batch(native_backend, dtype):
    mass = torch.full((2, 3, 7), 11 / 7, dtype=dtype)
    weights = [1.0, 0.3, 1.0, 0.5, 0.3, 0.7, 1.0]  # four groups in mixed order
    assert_matches_reference(
        lambda s: mmot.multi_sinkhorn(s, 3, 0.25, 9, slot_weights=weights, anchor_mass=mass, normalize="none", backend=native_backend),
        lambda s: reference_multi(s, 3, 0.25, 9, weights, mass, normalize="none"),
        [random_scores(2, 3, 11, 7, seed=5, dtype=dtype)],
        random_scores(2, 3, 11, 7, seed=6, dtype=dtype),
    )


# Column spread just under 2, so w·spread/eps sits just under the f32 limit of 50 (past it, forcing
# the plain domain is refused: test_plain_and_log_domain_agree_near_the_switch).
@pytest.mark.parametrize("eps", [2.0 / 49.0, 2.0 / 49.9])
def test_backward_near_domain_switch(native_backend, eps):
    scores = random_scores(60, 12, seed=11, dtype=torch.float32).clamp(-1, 1)
    upstream = random_scores(60, 12, seed=12, dtype=torch.float32)
    results = [
        grad_of(
            partial(mmot.multi_sinkhorn, k=6, eps=eps, n_iters=10, log_domain=ld, normalize="none", backend=native_backend),
            scores,
            upstream,
        )
        for ld in (True, False, "auto")
    ]
    scale = float(results[0].abs().max())
    for other in results[1:]:
        torch.testing.assert_close(other / scale, results[0] / scale, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- Rust kernel

# The Rust reverse sweep against autograd through the reference. The torch backend's reverse pass
# is checked against autograd in test_torch_reverse.py; repeating this sweep for it here would
# double the file's gradient time.


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("log_domain", [True, False])
@pytest.mark.parametrize("normalize", ["none", "minmax"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rust_forward_backward_match_reference(shape, log_domain, normalize, dtype):
    check_against_reference("rust", shape, log_domain, normalize, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rust_backward_small_eps_log_domain(dtype):
    scores = cosine_scores(120, 16, seed=3, dtype=dtype)
    upstream = random_scores(120, 16, seed=4, dtype=dtype)
    _, got = value_and_grads(lambda s: mmot.multi_sinkhorn(s, 8, 1e-3, 20, normalize="none", backend="rust"), [scores], upstream)
    assert bool(torch.isfinite(got[0]).all())
    if dtype == torch.float64:
        _, want = value_and_grads(lambda s: reference_multi(s, 8, 1e-3, 20, normalize="none"), [scores], upstream)
        assert_grads_close(got, want, dtype)


@pytest.mark.parametrize("log_domain", [True, False])
@pytest.mark.parametrize("normalize", ["none", "minmax"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rust_several_row_chunks_match_reference(log_domain, normalize, dtype):
    check_against_reference("rust", (700, 64, 32), log_domain, normalize, dtype)


@pytest.mark.parametrize("log_domain", [True, False])
def test_rust_gradcheck_slot_weights_and_anchor_mass(log_domain):
    scores = leaf(random_scores(7, 5, seed=2))
    weights = [0.5, 1.0, 0.25, 1.0, 0.5]
    mass = torch.full((5,), 7 / 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda s: mmot.multi_sinkhorn(s, 2, 0.4, 5, slot_weights=weights, anchor_mass=mass, log_domain=log_domain, backend="rust"),
        (scores,),
    )


def test_rust_single_group_has_exactly_zero_gradient():
    scores = random_scores(8, 5, seed=9)
    upstream = random_scores(8, 5, seed=1)
    got = grad_of(lambda s: mmot.multi_sinkhorn(s, 2, 0.3, 5, low_weight=1.0, normalize="none", backend="rust"), scores, upstream)
    want = grad_of(lambda s: reference_multi(s, 2, 0.3, 5, low_weight=1.0, normalize="none"), scores, upstream)
    assert bool((got == 0).all())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


# ---------------------------------------------------------------- Triton interpreter, tiny shapes

# (N, K, k): N < K, K = 1, k = K, k = 1.
TRITON_SHAPES = [(7, 5, 2), (3, 6, 3), (13, 1, 1), (5, 4, 4), (9, 5, 1)]


@needs_triton
@pytest.mark.parametrize("shape", TRITON_SHAPES)
@pytest.mark.parametrize("log_domain", ["auto", True, False])
def test_triton_forward_float64(shape, log_domain, launch):
    n, n_anchors, k = shape
    scores = random_scores(n, n_anchors, seed=n * 10 + n_anchors)
    for normalize in comparable_modes(*shape):
        fn = partial(mmot.multi_sinkhorn, scores, k, 0.3, 6, normalize=normalize, log_domain=log_domain)
        got = fn(backend="triton")
        torch.testing.assert_close(got, fn(backend="torch"), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got, fn(backend="rust"), rtol=1e-9, atol=1e-11)


@needs_triton
@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_backward_float64(shape, launch):
    n, n_anchors, k = shape
    scores = random_scores(n, n_anchors, seed=n + n_anchors)
    grad = random_scores(n, n_anchors, seed=99)
    for normalize in comparable_modes(*shape):
        got, want = (
            grad_of(partial(mmot.multi_sinkhorn, k=k, eps=0.3, n_iters=4, normalize=normalize, backend=b), scores, grad)
            for b in ("triton", "torch")
        )
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@needs_triton
def test_triton_groups_masses_and_batch(launch):
    scores = random_scores(2, 8, 5, seed=3)
    slot_weights = [1.0, 0.3, 1.0, 0.5, 0.3]  # three groups in mixed order
    mass = torch.full((2, 5), 8 / 5, dtype=torch.float64)
    grad = random_scores(2, 8, 5, seed=5)
    for normalize in ("none", "minmax"):
        fn = partial(mmot.multi_sinkhorn, k=2, eps=0.25, n_iters=5, slot_weights=slot_weights, anchor_mass=mass, normalize=normalize)
        torch.testing.assert_close(fn(scores, backend="triton"), fn(scores, backend="torch"), rtol=1e-10, atol=1e-12)
        got = grad_of(partial(fn, backend="triton"), scores, grad)
        torch.testing.assert_close(got, grad_of(partial(fn, backend="torch"), scores, grad), rtol=1e-9, atol=1e-10)


@needs_triton
def test_triton_minmax_ties_share_gradient():
    # Two equal columns make tied row minima/maxima: the gradient is shared as torch.amin/amax does.
    base = random_scores(6, 3, seed=8)
    scores = torch.cat([base, base[:, :1]], dim=1)
    grad = random_scores(6, 4, seed=9)
    fn = lambda s, b: mmot.multi_sinkhorn(s, 2, 0.5, 3, normalize="minmax", backend=b)  # noqa: E731
    torch.testing.assert_close(
        grad_of(lambda s: fn(s, "triton"), scores, grad), grad_of(lambda s: fn(s, "torch"), scores, grad), rtol=1e-8, atol=1e-9
    )


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_low_precision(dtype):
    scores = cosine_scores(11, 6, seed=4)
    got = mmot.multi_sinkhorn(scores.to(dtype), 3, normalize="none", backend="triton")
    assert got.dtype == dtype
    want = mmot.multi_sinkhorn(scores, 3, normalize="none", backend="torch")
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    grad = random_scores(11, 6, seed=6)
    got_grad = grad_of(lambda s: mmot.multi_sinkhorn(s, 3, n_iters=5, normalize="none", backend="triton"), scores.to(dtype), grad.to(dtype))
    want_grad = grad_of(lambda s: mmot.multi_sinkhorn(s, 3, n_iters=5, normalize="none", backend="torch"), scores, grad)
    scale = want_grad.abs().max()
    torch.testing.assert_close(got_grad.double() / scale, want_grad / scale, rtol=0, atol=1e-3 if dtype == torch.float32 else 5e-2)


@needs_triton
def test_triton_small_eps_is_stable():
    scores = cosine_scores(10, 6, seed=5).float()
    got = mmot.multi_sinkhorn(scores, 3, eps=1e-3, n_iters=10, normalize="none", backend="triton")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.sum(-1), torch.full((10,), 3.0), rtol=1e-4, atol=1e-4)


@needs_triton
def test_triton_non_contiguous_scores():
    scores = random_scores(6, 9, seed=12).t()  # (9, 6) view with swapped strides
    torch.testing.assert_close(
        mmot.multi_sinkhorn(scores, 2, backend="triton"), mmot.multi_sinkhorn(scores, 2, backend="torch"), rtol=1e-9, atol=1e-10
    )


@needs_triton
@settings(max_examples=6, deadline=None)
@given(
    n=st.integers(1, 9),
    n_anchors=st.integers(1, 7),
    data=st.data(),
    eps=st.floats(0.1, 1.5),
    n_iters=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_triton_hypothesis_matches_torch_and_rust(n, n_anchors, data, eps, n_iters, seed):
    k = data.draw(st.integers(1, n_anchors))
    scores = random_scores(n, n_anchors, seed=seed)
    grad = random_scores(n, n_anchors, seed=seed + 1)
    fn = lambda s, b: mmot.multi_sinkhorn(s, k, eps, n_iters, normalize="none", backend=b)  # noqa: E731
    torch.testing.assert_close(fn(scores, "triton"), fn(scores, "torch"), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(fn(scores, "triton"), fn(scores, "rust"), rtol=1e-9, atol=1e-11)
    got = grad_of(lambda s: fn(s, "triton"), scores, grad)
    torch.testing.assert_close(got, grad_of(lambda s: fn(s, "torch"), scores, grad), rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- full size on a GPU


def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("n_anchors", [64, 256])
def test_gpu_triton_sspc_size(n_anchors):
    scores = cosine_scores(7660, n_anchors, dim=256, seed=1).to(cuda())
    got = mmot.multi_sinkhorn(scores.float(), n_anchors // 2, backend="triton")
    want = mmot.multi_sinkhorn(scores, n_anchors // 2, backend="torch")
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)
    grad = torch.randn_like(scores)
    got_grad = grad_of(lambda s: mmot.multi_sinkhorn(s, n_anchors // 2, backend="triton"), scores, grad)
    want_grad = grad_of(lambda s: mmot.multi_sinkhorn(s, n_anchors // 2, backend="torch"), scores, grad)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-7, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.parametrize("size", [4, 16])
def test_gpu_triton_batched_tiny_problems(size):
    scores = cosine_scores(4096, size, size, seed=3).to(cuda())
    fn = lambda s, b: mmot.multi_sinkhorn(s, size // 2, normalize="none", backend=b)  # noqa: E731
    torch.testing.assert_close(fn(scores, "triton"), fn(scores, "torch"), rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------- bad input

S = random_scores(6, 4, seed=0)
NAN = S.clone()
NAN[2, 1] = float("nan")
INF = S.clone()
INF[0, 0] = float("inf")

test_bad_input_is_named = bad_input_test(
    "mmot.multi_sinkhorn",
    [
        (lambda: mmot.multi_sinkhorn(S[0]), ValueError, "'scores'", "(..., N, K)"),
        (lambda: mmot.multi_sinkhorn(S.numpy()), TypeError, "'scores'", "torch.Tensor"),
        (lambda: mmot.multi_sinkhorn(torch.ones(6, 4, dtype=torch.int64)), TypeError, "'scores'", "floating"),
        (lambda: mmot.multi_sinkhorn(S.to(torch.complex64)), TypeError, "'scores'", "floating"),
        (lambda: mmot.multi_sinkhorn(torch.empty(6, 0)), ValueError, "'scores'", "K >= 1"),
        (lambda: mmot.multi_sinkhorn(S, k=0), ValueError, "'k'", "1..4"),
        (lambda: mmot.multi_sinkhorn(S, k=5), ValueError, "'k'", "1..4"),
        (lambda: mmot.multi_sinkhorn(S, k=2.0), TypeError, "'k'", "int"),
        (lambda: mmot.multi_sinkhorn(S, eps=0.0), ValueError, "'eps'", "positive"),
        (lambda: mmot.multi_sinkhorn(S, eps=-1), ValueError, "'eps'", "positive"),
        (lambda: mmot.multi_sinkhorn(S, eps=float("nan")), ValueError, "'eps'"),
        (lambda: mmot.multi_sinkhorn(S, eps="0.1"), TypeError, "'eps'"),
        (lambda: mmot.multi_sinkhorn(S, n_iters=0), ValueError, "'n_iters'", "1..2147483647"),
        (lambda: mmot.multi_sinkhorn(S, n_iters=True), TypeError, "'n_iters'", "int"),
        (lambda: mmot.multi_sinkhorn(S, low_weight=0.0), ValueError, "'low_weight'", "positive"),
        (lambda: mmot.multi_sinkhorn(S, slot_weights=[1.0, 1.0]), ValueError, "'slot_weights'", "4"),
        (lambda: mmot.multi_sinkhorn(S, slot_weights=[1.0, -1.0, 1.0, 1.0]), ValueError, "'slot_weights'", "positive"),
        (lambda: mmot.multi_sinkhorn(S, slot_weights="abcd"), TypeError, "'slot_weights'"),
        (lambda: mmot.multi_sinkhorn(S, anchor_mass=torch.full((4,), -1.5)), ValueError, "'anchor_mass'", "positive"),
        (lambda: mmot.multi_sinkhorn(S, anchor_mass=torch.full((4,), 2.0)), ValueError, "'anchor_mass'", "must be uniform, N/K = 1.5"),
        (lambda: mmot.multi_sinkhorn(S, anchor_mass=torch.full((5,), 1.2)), ValueError, "'anchor_mass'", "shape"),
        (lambda: mmot.multi_sinkhorn(S, anchor_mass=torch.ones(4, dtype=torch.int32)), TypeError, "'anchor_mass'", "floating"),
        (lambda: mmot.multi_sinkhorn(S, anchor_mass=torch.full((4,), 1.5, device="meta")), ValueError, "'anchor_mass'", "device"),
        (lambda: mmot.multi_sinkhorn(S, normalize="l2"), ValueError, "'normalize'", "minmax"),
        (lambda: mmot.multi_sinkhorn(S, log_domain="yes"), ValueError, "'log_domain'"),
        (lambda: mmot.multi_sinkhorn(S, backend="cuda"), ValueError, "'backend'", "rust"),
        (lambda: mmot.multi_sinkhorn(S.to("meta"), backend="triton"), ValueError, "backend 'triton'", "CUDA"),
        (lambda: mmot.multi_sinkhorn(S.to("meta"), backend="rust"), ValueError, "backend 'rust'", "CPU"),
        (lambda: mmot.multi_sinkhorn(NAN), ValueError, "'scores'", "finite"),
        (lambda: mmot.multi_sinkhorn(INF, backend="torch"), ValueError, "'scores'", "finite"),
    ],
)
