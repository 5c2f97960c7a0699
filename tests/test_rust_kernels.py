"""backend="rust" against mmot.reference, forward and backward (the Rust reverse sweeps).

The backward of every Rust op is its own kernel, so it is compared with autograd through the
reference loops: to ~1e-9 in float64, over odd shapes and hypothesis-drawn inputs, both
domains, slot_weights and anchor_mass variants, and at eps = 1e-3 in the log domain.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mmot
from inputs import cosine_scores, random_scores

F64 = dict(rtol=1e-9, atol=1e-10)
F32 = dict(rtol=2e-3, atol=2e-4)


def grads(fn, inputs, upstream):
    """Output and input gradients of fn(*inputs) against upstream."""
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    grad = torch.autograd.grad(out, leaves, upstream.to(out.dtype))
    return out.detach(), [g.detach() for g in grad]


def assert_grads_close(got, want, dtype):
    tol = F64 if dtype == torch.float64 else F32
    for g, w in zip(got, want):
        # gradients scale with 1/eps; compare relative to the largest entry (an exactly zero
        # gradient, e.g. of a single sample, only has to come out at rounding level)
        scale = max(float(w.abs().max()), 1e-3 if dtype == torch.float64 else 1.0)
        torch.testing.assert_close(g.double() / scale, w.double() / scale, **tol)


def both(fn, inputs, upstream):
    return grads(lambda *a: fn(*a, "rust"), inputs, upstream), grads(lambda *a: fn(*a, "torch"), inputs, upstream)


def flat_minmax(scores, k, eps, n_iters, weights, mass):
    """Whether some row of T is nearly constant, where min-max only amplifies rounding."""
    raw = mmot.reference.multi_sinkhorn(scores.double(), eps, n_iters, weights, k, mass.double(), "none", "auto")
    return bool(((raw.amax(-1) - raw.amin(-1)) < 1e-2).any())


# ---------------------------------------------------------------- sinkhorn

SK_SHAPES = [(1, 1), (1, 5), (6, 1), (7, 3), (33, 17), (3, 2, 9, 4), (300, 70), (2100, 5)]


@pytest.mark.parametrize("shape", SK_SHAPES)
@pytest.mark.parametrize("log_domain", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sinkhorn_forward_backward(shape, log_domain, dtype):
    scores = random_scores(*shape, seed=sum(shape), dtype=dtype)
    upstream = random_scores(*shape, seed=1 + sum(shape), dtype=dtype)
    rows = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5

    def fn(s, backend):
        return mmot.sinkhorn(s, 0.3, 4, row_mass=rows.to(dtype), log_domain=log_domain, backend=backend)

    (out, got), (ref, want) = both(fn, [scores], upstream)
    tol = F64 if dtype == torch.float64 else F32
    torch.testing.assert_close(out, ref, **tol)
    assert_grads_close(got, want, dtype)


@given(
    n=st.integers(1, 30),
    k=st.integers(1, 12),
    eps=st.floats(0.05, 2.0),
    n_iters=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    log_domain=st.sampled_from([True, False, "auto"]),
)
def test_sinkhorn_hypothesis_backward(n, k, eps, n_iters, seed, log_domain):
    scores = random_scores(n, k, seed=seed)
    upstream = random_scores(n, k, seed=seed + 1)
    cols = torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    cols = cols / cols.sum() * n

    def fn(s, backend):
        return mmot.sinkhorn(s, eps, n_iters, col_mass=cols, log_domain=log_domain, backend=backend)

    (out, got), (ref, want) = both(fn, [scores], upstream)
    torch.testing.assert_close(out, ref, **F64)
    assert_grads_close(got, want, torch.float64)


def test_sinkhorn_backward_small_eps_log_domain_is_finite():
    scores = cosine_scores(200, 30, seed=4)
    upstream = random_scores(200, 30, seed=5)

    def fn(s, backend):
        return mmot.sinkhorn(s, 1e-3, 3, backend=backend)

    (out, got), (ref, want) = both(fn, [scores], upstream)
    assert bool(torch.isfinite(got[0]).all())
    assert_grads_close(got, want, torch.float64)


# ---------------------------------------------------------------- multi_sinkhorn

# (N, K, k): single sample, K = 1, k = 1, k = K, primes, several row chunks.
MULTI_SHAPES = [(1, 4, 2), (9, 1, 1), (7, 5, 1), (6, 6, 6), (13, 11, 5), (33, 17, 8), (700, 64, 32)]


@pytest.mark.parametrize("shape", MULTI_SHAPES)
@pytest.mark.parametrize("log_domain", [True, False])
@pytest.mark.parametrize("normalize", ["none", "minmax"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_multi_sinkhorn_forward_backward(shape, log_domain, normalize, dtype):
    n, n_anchors, k = shape
    scores = random_scores(n, n_anchors, seed=n + n_anchors, dtype=dtype)
    upstream = random_scores(n, n_anchors, seed=7 + n, dtype=dtype)
    weights = [0.25] * (n_anchors - k) + [1.0] * k
    mass = torch.full((n_anchors,), n / n_anchors, dtype=torch.float64)
    if normalize == "minmax" and flat_minmax(scores, k, 0.3, 6, weights, mass):
        pytest.skip("T has a constant row: its min-max is rounding noise")

    def fn(s, backend):
        return mmot.multi_sinkhorn(s, k, 0.3, 6, normalize=normalize, log_domain=log_domain, backend=backend)

    (out, got), (ref, want) = both(fn, [scores], upstream)
    tol = F64 if dtype == torch.float64 else F32
    torch.testing.assert_close(out, ref, **tol)
    assert_grads_close(got, want, dtype)


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
def test_multi_sinkhorn_hypothesis_backward(n, n_anchors, data, eps, n_iters, seed, normalize, log_domain):
    k = data.draw(st.integers(1, n_anchors))
    pool = [0.25, 0.5, 1.0, 0.8]
    weights = [data.draw(st.sampled_from(pool)) for _ in range(n_anchors)]
    generator = torch.Generator().manual_seed(seed)
    mass = torch.rand(n_anchors, generator=generator, dtype=torch.float64) + 0.5
    mass = mass / mass.sum() * n
    scores = random_scores(n, n_anchors, seed=seed)
    upstream = random_scores(n, n_anchors, seed=seed + 1)
    if normalize == "minmax" and flat_minmax(scores, k, eps, n_iters, weights, mass):
        normalize = "none"

    def fn(s, backend):
        return mmot.multi_sinkhorn(
            s, k, eps, n_iters, slot_weights=weights, anchor_mass=mass, normalize=normalize, log_domain=log_domain, backend=backend
        )

    (out, got), (ref, want) = both(fn, [scores], upstream)
    torch.testing.assert_close(out, ref, **F64)
    # Equal-size groups split evenly by k make T nearly flat and the gradient ill-conditioned:
    # compare in proportion to that conditioning.
    assert_grads_close(got, want, torch.float64) if normalize == "none" else _close_minmax(got, want, scores, k, eps, n_iters, weights, mass)


def _close_minmax(got, want, scores, k, eps, n_iters, weights, mass):
    raw = mmot.reference.multi_sinkhorn(scores, eps, n_iters, weights, k, mass, "none", "auto")
    spread = float((raw.amax(-1) - raw.amin(-1)).min())
    # An exactly-zero true gradient (K = 2 rows always min-max to {0, 1}) leaves only rounding
    # noise in the reference, so the scale never drops below 1.
    scale = max(float(want[0].abs().max()), 1.0)
    torch.testing.assert_close(got[0] / scale, want[0] / scale, rtol=0, atol=1e-10 / min(spread, 1.0) ** 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_multi_sinkhorn_backward_weights_mass_and_batch(dtype):
    scores = random_scores(2, 3, 11, 7, seed=5, dtype=dtype)
    upstream = random_scores(2, 3, 11, 7, seed=6, dtype=dtype)
    mass = torch.rand(2, 3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    mass = (mass / mass.sum(-1, keepdim=True) * 11).to(dtype)
    weights = [1.0, 0.3, 1.0, 0.5, 0.3, 0.7, 1.0]  # four groups in mixed order

    def fn(s, backend):
        return mmot.multi_sinkhorn(s, 3, 0.25, 9, slot_weights=weights, anchor_mass=mass, normalize="none", backend=backend)

    (out, got), (ref, want) = both(fn, [scores], upstream)
    tol = F64 if dtype == torch.float64 else F32
    torch.testing.assert_close(out, ref, **tol)
    assert_grads_close(got, want, dtype)


def test_multi_sinkhorn_single_group_has_zero_gradient():
    scores = random_scores(8, 5, seed=9)
    (out, got), (ref, want) = both(
        lambda s, b: mmot.multi_sinkhorn(s, 2, 0.3, 5, low_weight=1.0, normalize="none", backend=b), [scores], random_scores(8, 5, seed=1)
    )
    assert bool((got[0] == 0).all())
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_multi_sinkhorn_backward_small_eps_log_domain(dtype):
    scores = cosine_scores(120, 16, seed=3, dtype=dtype)
    upstream = random_scores(120, 16, seed=4, dtype=dtype)

    def fn(s, backend):
        return mmot.multi_sinkhorn(s, 8, 1e-3, 20, normalize="none", backend=backend)

    (out, got), (ref, want) = both(fn, [scores], upstream)
    assert bool(torch.isfinite(got[0]).all())
    if dtype == torch.float64:
        assert_grads_close(got, want, dtype)


def test_multi_sinkhorn_backward_near_domain_switch():
    # column spread just under 2, so w·spread/eps sits on either side of the f32 limit of 50
    scores = random_scores(60, 12, seed=11, dtype=torch.float32).clamp(-1, 1)
    upstream = random_scores(60, 12, seed=12, dtype=torch.float32)
    for eps in (2.0 / 49.0, 2.0 / 51.0):
        results = [
            grads(lambda s: mmot.multi_sinkhorn(s, 6, eps, 10, log_domain=ld, normalize="none", backend="rust"), [scores], upstream)[1][0]
            for ld in (True, False, "auto")
        ]
        scale = float(results[0].abs().max())
        for other in results[1:]:
            torch.testing.assert_close(other / scale, results[0] / scale, rtol=1e-3, atol=1e-4)


def test_multi_sinkhorn_gradcheck_rust():
    scores = random_scores(7, 5, seed=2).requires_grad_(True)
    weights = [0.5, 1.0, 0.25, 1.0, 0.5]
    mass = torch.tensor([1.0, 2.0, 1.5, 1.0, 1.5], dtype=torch.float64)
    for log_domain in (True, False):
        assert torch.autograd.gradcheck(
            lambda s: mmot.multi_sinkhorn(s, 2, 0.4, 5, slot_weights=weights, anchor_mass=mass, log_domain=log_domain, backend="rust"),
            (scores,),
        )


# ---------------------------------------------------------------- similarity


@pytest.mark.parametrize(
    "x_shape,y_shape",
    [
        ((1, 1), (1, 1)),
        ((5, 3), (4, 3)),
        ((2, 1, 7, 9), (1, 3, 6, 9)),
        ((3, 37, 33), (3, 70, 33)),
        ((2, 130, 40), (65, 40)),  # x batched, y not: a stride-0 broadcast index
    ],
)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_similarity_forward_backward(x_shape, y_shape, normalize, dtype):
    x = random_scores(*x_shape, seed=1, dtype=dtype)
    y = random_scores(*y_shape, seed=2, dtype=dtype)
    if normalize and x_shape[-2] > 1:
        x[..., 1, :] = 0.0  # a zero row: the 1e-12 clamp's branch
    out_shape = torch.broadcast_shapes(x_shape[:-2], y_shape[:-2]) + (x_shape[-2], y_shape[-2])
    upstream = random_scores(*out_shape, seed=3, dtype=dtype)

    def fn(a, b, backend):
        return mmot.similarity(a, b, normalize=normalize, scale=1.7, backend=backend)

    (out, got), (ref, want) = both(fn, [x, y], upstream)
    tol = F64 if dtype == torch.float64 else F32
    torch.testing.assert_close(out, ref, **tol)
    assert_grads_close(got, want, dtype)


@given(
    n=st.integers(1, 9), m=st.integers(1, 9), d=st.integers(1, 20), seed=st.integers(0, 2**31 - 1), normalize=st.booleans()
)
def test_similarity_hypothesis_backward(n, m, d, seed, normalize):
    x = random_scores(2, 1, n, d, seed=seed)
    y = random_scores(1, 3, m, d, seed=seed + 1)
    upstream = random_scores(2, 3, n, m, seed=seed + 2)
    (out, got), (ref, want) = both(lambda a, b, be: mmot.similarity(a, b, normalize=normalize, backend=be), [x, y], upstream)
    torch.testing.assert_close(out, ref, **F64)
    assert_grads_close(got, want, torch.float64)


# ---------------------------------------------------------------- determinism


def test_backward_is_deterministic_across_thread_counts(monkeypatch):
    scores = random_scores(3000, 64, seed=1, dtype=torch.float32)
    upstream = random_scores(3000, 64, seed=2, dtype=torch.float32)
    results = []
    for threads in ("1", "2"):
        monkeypatch.setenv("MMOT_NUM_THREADS", threads)
        results.append(
            [
                grads(lambda s: mmot.multi_sinkhorn(s, 32, backend="rust"), [scores], upstream)[1][0],
                grads(lambda s: mmot.sinkhorn(s, 0.05, 3, backend="rust"), [scores], upstream)[1][0],
            ]
        )
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- large outputs


def test_large_outputs_with_huge_page_advice_are_fully_written():
    # 2048 x 1536 float32 is 12 MiB: above the size where the bindings advise huge pages for
    # the output, so this is the madvise path. Outputs are NaN-poisoned (conftest).
    scores = cosine_scores(2048, 1536, seed=7, dtype=torch.float32)
    upstream = random_scores(2048, 1536, seed=8, dtype=torch.float32)
    (out, got), (ref, want) = both(lambda s, be: mmot.sinkhorn(s, 0.05, 3, backend=be), [scores], upstream)
    torch.testing.assert_close(out, ref, **F32)
    assert_grads_close(got, want, torch.float32)


def test_huge_page_advice_on_an_unaligned_output_view():
    from mmot import _core

    scores = cosine_scores(1, 2048, 1536, seed=9, dtype=torch.float32)
    # An output that starts 4 bytes into its buffer: the advised range is the 2 MiB-aligned
    # interior, and the elements outside it must be written all the same.
    buf = torch.full((1 + scores.numel(),), float("nan"), dtype=torch.float32)
    out = buf[1:].view(scores.shape)
    rows, cols = torch.ones(1, 2048), torch.full((1, 1536), 2048 / 1536)
    _core.sinkhorn(scores.numpy(), rows.numpy(), cols.numpy(), out.numpy(), 0.05, 3, "auto", 2)
    torch.testing.assert_close(out, mmot.sinkhorn(scores, 0.05, 3, backend="torch"), **F32)
