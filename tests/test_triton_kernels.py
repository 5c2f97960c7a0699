"""The Triton kernels, forward and backward, through ``backend="triton"``.

In CI they run on CPU tensors under TRITON_INTERPRET=1 (set in conftest.py) with tiny shapes,
against ``mmot.reference`` (autograd through it for the gradients) and the Rust backend. The
split launch structure (one problem's rows over several programs, one launch per pass) is
forced with small tiles so that it is exercised too. Full-size checks on CUDA carry the ``gpu``
mark.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmot
from mmot import reference
from mmot.kernels import _common
from inputs import cosine_scores, random_scores

TRITON = "triton"


@pytest.fixture(params=["persistent", "split"])
def launch(request, monkeypatch):
    """Run each test under both launch structures of the Sinkhorn kernels."""
    if request.param == "split":
        monkeypatch.setattr(_common, "FORCE_PROGRAMS_PER_PROBLEM", 3)
        monkeypatch.setattr(_common, "FORCE_TILE_ROWS", 2)
    return request.param


def grad_of(fn, scores, grad):
    leaf = scores.detach().clone().requires_grad_(True)
    (result,) = torch.autograd.grad(fn(leaf), leaf, grad)
    return result


def weights(n_anchors, k, low=0.25):
    return [low] * (n_anchors - k) + [1.0] * k


# ---------------------------------------------------------------- sinkhorn

SK_SHAPES = [(7, 5), (3, 6), (13, 1), (1, 4), (2, 5, 3)]


@pytest.mark.parametrize("shape", SK_SHAPES)
@pytest.mark.parametrize("log_domain", ["auto", True, False])
def test_sinkhorn_forward_float64(shape, log_domain, launch):
    scores = random_scores(*shape, seed=sum(shape))
    got = mmot.sinkhorn(scores, 0.3, 4, log_domain=log_domain, backend=TRITON)
    want = mmot.sinkhorn(scores, 0.3, 4, log_domain=log_domain, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, mmot.sinkhorn(scores, 0.3, 4, log_domain=log_domain, backend="rust"), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("shape", SK_SHAPES)
def test_sinkhorn_backward_float64(shape, launch):
    scores = random_scores(*shape, seed=3 + sum(shape))
    rows = torch.rand(shape[:-1], dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    grad = random_scores(*shape, seed=7)
    got = grad_of(lambda s: mmot.sinkhorn(s, 0.4, 3, row_mass=rows, backend=TRITON), scores, grad)
    want = grad_of(lambda s: mmot.sinkhorn(s, 0.4, 3, row_mass=rows, backend="torch"), scores, grad)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_sinkhorn_masses_and_one_iteration(launch):
    scores = random_scores(6, 4, seed=11)
    rows = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0, 2.0], dtype=torch.float64)
    cols = torch.tensor([3.0, 1.0, 2.0, 2.0], dtype=torch.float64)
    for n_iters in (1, 2):
        fn = lambda s, b: mmot.sinkhorn(s, 0.2, n_iters, row_mass=rows, col_mass=cols, backend=b)  # noqa: E731
        torch.testing.assert_close(fn(scores, TRITON), fn(scores, "torch"), rtol=1e-10, atol=1e-12)
        grad = random_scores(6, 4, seed=n_iters)
        torch.testing.assert_close(
            grad_of(lambda s: fn(s, TRITON), scores, grad), grad_of(lambda s: fn(s, "torch"), scores, grad), rtol=1e-9, atol=1e-11
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinkhorn_low_precision(dtype):
    scores = cosine_scores(2, 9, 6, seed=2).to(dtype)
    got = mmot.sinkhorn(scores, 0.05, 3, backend=TRITON)
    assert got.dtype == dtype
    want = reference.sinkhorn(scores.double(), 0.05, 3, torch.ones(2, 9, dtype=torch.float64), torch.full((2, 6), 1.5, dtype=torch.float64))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    grad = random_scores(2, 9, 6, seed=4).to(dtype)
    got_grad = grad_of(lambda s: mmot.sinkhorn(s, 0.05, 3, backend=TRITON), scores, grad)
    assert got_grad.dtype == dtype
    want_grad = grad_of(lambda s: mmot.sinkhorn(s, 0.05, 3, backend="torch"), scores.double(), grad.double())
    scale = want_grad.abs().max()
    torch.testing.assert_close(got_grad.double() / scale, want_grad / scale, rtol=0, atol=1e-4 if dtype == torch.float32 else 5e-2)


def test_sinkhorn_small_eps_is_stable():
    # eps = 1e-3 on cosine scores: exp(scores/eps) overflows float32; the kernels never do.
    scores = cosine_scores(12, 5, seed=3).float()
    got = mmot.sinkhorn(scores, 1e-3, 5, backend=TRITON)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.sum(-1), torch.ones(12), rtol=1e-4, atol=1e-4)
    want = mmot.sinkhorn(scores.double(), 1e-3, 5, backend="torch")
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- multi_sinkhorn

# (N, K, k): N < K, K = 1, k = K, k = 1.
MULTI_SHAPES = [(7, 5, 2), (3, 6, 3), (13, 1, 1), (5, 4, 4), (9, 5, 1)]


def modes(n, n_anchors, k):
    return ["none"] if k == n_anchors or n == 1 else ["none", "minmax"]


@pytest.mark.parametrize("shape", MULTI_SHAPES)
@pytest.mark.parametrize("log_domain", ["auto", True, False])
def test_multi_sinkhorn_forward_float64(shape, log_domain, launch):
    n, n_anchors, k = shape
    scores = random_scores(n, n_anchors, seed=n * 10 + n_anchors)
    for normalize in modes(*shape):
        fn = lambda b: mmot.multi_sinkhorn(scores, k, 0.3, 6, normalize=normalize, log_domain=log_domain, backend=b)  # noqa: E731
        got = fn(TRITON)
        torch.testing.assert_close(got, fn("torch"), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got, fn("rust"), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("shape", MULTI_SHAPES)
def test_multi_sinkhorn_backward_float64(shape, launch):
    n, n_anchors, k = shape
    scores = random_scores(n, n_anchors, seed=n + n_anchors)
    grad = random_scores(n, n_anchors, seed=99)
    for normalize in modes(*shape):
        fn = lambda s, b: mmot.multi_sinkhorn(s, k, 0.3, 4, normalize=normalize, backend=b)  # noqa: E731
        got = grad_of(lambda s: fn(s, TRITON), scores, grad)
        want = grad_of(lambda s: fn(s, "torch"), scores, grad)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_multi_sinkhorn_groups_masses_and_batch(launch):
    scores = random_scores(2, 8, 5, seed=3)
    slot_weights = [1.0, 0.3, 1.0, 0.5, 0.3]  # three groups in mixed order
    mass = torch.tensor([[1.0, 2.5, 2.0, 1.5, 1.0], [2.0, 2.0, 1.0, 1.0, 2.0]], dtype=torch.float64)
    grad = random_scores(2, 8, 5, seed=5)
    for normalize in ("none", "minmax"):
        fn = lambda s, b: mmot.multi_sinkhorn(  # noqa: E731
            s, 2, 0.25, 5, slot_weights=slot_weights, anchor_mass=mass, normalize=normalize, backend=b
        )
        torch.testing.assert_close(fn(scores, TRITON), fn(scores, "torch"), rtol=1e-10, atol=1e-12)
        got = grad_of(lambda s: fn(s, TRITON), scores, grad)
        torch.testing.assert_close(got, grad_of(lambda s: fn(s, "torch"), scores, grad), rtol=1e-9, atol=1e-10)


def test_multi_sinkhorn_minmax_ties_share_gradient():
    # Two equal columns make tied row minima/maxima: the gradient is shared as torch.amin/amax does.
    base = random_scores(6, 3, seed=8)
    scores = torch.cat([base, base[:, :1]], dim=1)
    grad = random_scores(6, 4, seed=9)
    fn = lambda s, b: mmot.multi_sinkhorn(s, 2, 0.5, 3, normalize="minmax", backend=b)  # noqa: E731
    torch.testing.assert_close(grad_of(lambda s: fn(s, TRITON), scores, grad), grad_of(lambda s: fn(s, "torch"), scores, grad), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_sinkhorn_low_precision(dtype):
    scores = cosine_scores(11, 6, seed=4)
    got = mmot.multi_sinkhorn(scores.to(dtype), 3, normalize="none", backend=TRITON)
    assert got.dtype == dtype
    want = mmot.multi_sinkhorn(scores, 3, normalize="none", backend="torch")
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    grad = random_scores(11, 6, seed=6)
    got_grad = grad_of(lambda s: mmot.multi_sinkhorn(s, 3, n_iters=5, normalize="none", backend=TRITON), scores.to(dtype), grad.to(dtype))
    want_grad = grad_of(lambda s: mmot.multi_sinkhorn(s, 3, n_iters=5, normalize="none", backend="torch"), scores, grad)
    scale = want_grad.abs().max()
    torch.testing.assert_close(got_grad.double() / scale, want_grad / scale, rtol=0, atol=1e-3 if dtype == torch.float32 else 5e-2)


def test_multi_sinkhorn_small_eps_is_stable():
    scores = cosine_scores(10, 6, seed=5).float()
    got = mmot.multi_sinkhorn(scores, 3, eps=1e-3, n_iters=10, normalize="none", backend=TRITON)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.sum(-1), torch.full((10,), 3.0), rtol=1e-4, atol=1e-4)


def test_non_contiguous_scores():
    scores = random_scores(6, 9, seed=12).t()  # (9, 6) view with swapped strides
    torch.testing.assert_close(mmot.multi_sinkhorn(scores, 2, backend=TRITON), mmot.multi_sinkhorn(scores, 2, backend="torch"), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(mmot.sinkhorn(scores, backend=TRITON), mmot.sinkhorn(scores, backend="torch"), rtol=1e-9, atol=1e-10)


@settings(max_examples=6, deadline=None)
@given(
    n=st.integers(1, 9), n_anchors=st.integers(1, 7), data=st.data(),
    eps=st.floats(0.1, 1.5), n_iters=st.integers(1, 5), seed=st.integers(0, 2**31 - 1),
)
def test_hypothesis_triton_matches_reference(n, n_anchors, data, eps, n_iters, seed):
    k = data.draw(st.integers(1, n_anchors))
    scores = random_scores(n, n_anchors, seed=seed)
    grad = random_scores(n, n_anchors, seed=seed + 1)
    multi = lambda s, b: mmot.multi_sinkhorn(s, k, eps, n_iters, normalize="none", backend=b)  # noqa: E731
    single = lambda s, b: mmot.sinkhorn(s, eps, n_iters, backend=b)  # noqa: E731
    for fn in (multi, single):
        torch.testing.assert_close(fn(scores, TRITON), fn(scores, "torch"), rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(fn(scores, TRITON), fn(scores, "rust"), rtol=1e-9, atol=1e-11)
        got = grad_of(lambda s: fn(s, TRITON), scores, grad)
        torch.testing.assert_close(got, grad_of(lambda s: fn(s, "torch"), scores, grad), rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- similarity

SIM_SHAPES = [((5, 3), (7, 3)), ((2, 1, 4, 3), (1, 3, 5, 3)), ((3, 17, 40), (19, 40))]


@pytest.mark.parametrize("shapes", SIM_SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_similarity_float64(shapes, normalize):
    x = random_scores(*shapes[0], seed=1)
    y = random_scores(*shapes[1], seed=2)
    got = mmot.similarity(x, y, normalize=normalize, scale=2.5, backend=TRITON)
    want = mmot.similarity(x, y, normalize=normalize, scale=2.5, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if x.dim() == y.dim():  # the Rust path rejects a y without batch dims against a batched x (reported)
        torch.testing.assert_close(got, mmot.similarity(x, y, normalize=normalize, scale=2.5, backend="rust"), rtol=1e-9, atol=1e-11)
    grad = random_scores(*want.shape, seed=3)

    def grads(backend):
        leaves = [x.clone().requires_grad_(True), y.clone().requires_grad_(True)]
        out = mmot.similarity(*leaves, normalize=normalize, scale=2.5, backend=backend)
        return torch.autograd.grad(out, leaves, grad)

    for got_grad, want_grad in zip(grads(TRITON), grads("torch")):
        assert got_grad.shape == want_grad.shape
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_similarity_low_precision(dtype):
    x = random_scores(2, 1, 9, 24, seed=4).to(dtype)
    y = random_scores(1, 2, 6, 24, seed=5).to(dtype)
    got = mmot.similarity(x, y, backend=TRITON)
    assert got.dtype == dtype
    want = reference.similarity(x.double(), y.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    leaves = [x.clone().requires_grad_(True), y.clone().requires_grad_(True)]
    gx, gy = torch.autograd.grad(mmot.similarity(*leaves, backend=TRITON), leaves, torch.ones_like(got))
    assert gx.dtype == dtype and gy.dtype == dtype
    dleaves = [x.double().requires_grad_(True), y.double().requires_grad_(True)]
    wx, wy = torch.autograd.grad(reference.similarity(*dleaves), dleaves, torch.ones_like(want))
    torch.testing.assert_close(gx.double(), wx, rtol=tol * 10, atol=tol * 10)
    torch.testing.assert_close(gy.double(), wy, rtol=tol * 10, atol=tol * 10)


def test_similarity_zero_row_gives_finite_output():
    x = random_scores(4, 8, seed=6)
    x[2] = 0.0
    y = random_scores(3, 8, seed=7)
    got = mmot.similarity(x, y, backend=TRITON)
    torch.testing.assert_close(got, mmot.similarity(x, y, backend="torch"), rtol=1e-10, atol=1e-12)
    assert (got[2] == 0).all()


# ---------------------------------------------------------------- full size on a GPU


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("n_anchors", [64, 256])
def test_gpu_multi_sinkhorn_sspc_size(n_anchors):
    dev = _cuda()
    scores = cosine_scores(7660, n_anchors, dim=256, seed=1).to(dev)
    got = mmot.multi_sinkhorn(scores.float(), n_anchors // 2, backend=TRITON)
    want = mmot.multi_sinkhorn(scores, n_anchors // 2, backend="torch")
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)
    grad = torch.randn_like(scores)
    got_grad = grad_of(lambda s: mmot.multi_sinkhorn(s, n_anchors // 2, backend=TRITON), scores, grad)
    want_grad = grad_of(lambda s: mmot.multi_sinkhorn(s, n_anchors // 2, backend="torch"), scores, grad)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-7, atol=1e-9)


@pytest.mark.gpu
def test_gpu_sinkhorn_swav_size():
    dev = _cuda()
    scores = cosine_scores(4096, 3000, dim=128, seed=2).to(dev)
    got = mmot.sinkhorn(scores.float(), 0.05, 3, backend=TRITON)
    want = mmot.sinkhorn(scores, 0.05, 3, backend="torch")
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    grad = torch.randn_like(scores)
    got_grad = grad_of(lambda s: mmot.sinkhorn(s, 0.05, 3, backend=TRITON), scores, grad)
    want_grad = grad_of(lambda s: mmot.sinkhorn(s, 0.05, 3, backend="torch"), scores, grad)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-7, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.parametrize("size", [4, 16])
def test_gpu_batched_tiny_problems(size):
    dev = _cuda()
    scores = cosine_scores(4096, size, size, seed=3).to(dev)
    for fn in (
        lambda s, b: mmot.multi_sinkhorn(s, size // 2, normalize="none", backend=b),
        lambda s, b: mmot.sinkhorn(s, 0.05, 20, backend=b),
    ):
        torch.testing.assert_close(fn(scores, TRITON), fn(scores, "torch"), rtol=1e-9, atol=1e-10)


@pytest.mark.gpu
def test_gpu_similarity_broadcast():
    dev = _cuda()
    x = torch.randn(3, 1, 2160, 256, device=dev)
    y = torch.randn(1, 2, 64, 256, device=dev)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        got = mmot.similarity(x.to(dtype), y.to(dtype), backend=TRITON)
        want = reference.similarity(x.to(dtype).double(), y.to(dtype).double())
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
