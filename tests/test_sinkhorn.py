"""mmot.sinkhorn on every backend.

Against SwAV's loop and a plain generic-mass loop (naive.py), against autograd through
mmot.reference, its own properties, the Rust kernel's large-shape paths, the Triton kernels
under both launch structures, and its bad input.
"""

from functools import partial

import mmot
import pytest
import torch
from backends import NATIVE, needs_triton
from bad_input import bad_input_test
from gradients import F32, F64, assert_grads_close, assert_matches_reference, grad_of, leaf, value_and_grads
from hypothesis import given, settings
from hypothesis import strategies as st
from inputs import cosine_scores, random_scores
from mmot import reference
from naive import alternating_sinkhorn, swav_sinkhorn

ODD_SHAPES = [(7, 5), (3, 11), (13, 1), (1, 4), (33, 17), (64, 3)]
LOG_DOMAIN = {"auto": "auto", True: "on", False: "off"}


def reference_sinkhorn(scores, eps, n_iters, row_mass=None, col_mass=None, log_domain="auto"):
    """mmot.reference.sinkhorn with mmot.sinkhorn's default masses: total N unless one mass is given."""
    n, k = scores.shape[-2:]
    if row_mass is None and col_mass is None:
        row_mass = torch.ones(scores.shape[:-1], dtype=torch.float64)
    if col_mass is None:
        col_mass = (row_mass.sum(-1, keepdim=True) / k).expand(*scores.shape[:-2], k)
    if row_mass is None:
        row_mass = (col_mass.sum(-1, keepdim=True) / n).expand(scores.shape[:-1])
    return reference.sinkhorn(scores, eps, n_iters, row_mass, col_mass, LOG_DOMAIN[log_domain])


# ---------------------------------------------------------------- values


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
    want = alternating_sinkhorn(scores, eps, n_iters, rows, cols)
    for backend in NATIVE:
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
    log = mmot.sinkhorn(scores, eps, 6, log_domain=True, backend=backend)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(mmot.sinkhorn(scores, eps, 6, backend=backend), log, rtol=tol, atol=tol)
    if side > 1:  # forcing the plain domain past its limit would overflow exp: refused
        with pytest.raises(ValueError, match="mmot.sinkhorn: log_domain=False forces the plain domain"):
            mmot.sinkhorn(scores, eps, 6, log_domain=False, backend=backend)
    else:
        torch.testing.assert_close(mmot.sinkhorn(scores, eps, 6, log_domain=False, backend=backend), log, rtol=tol, atol=tol)


def test_empty_rows_give_an_empty_result(backend):
    out = mmot.sinkhorn(torch.empty(0, 5, dtype=torch.float64), backend=backend)
    assert out.shape == (0, 5)
    out = mmot.sinkhorn(torch.empty(0, 3, 5, dtype=torch.float64), backend=backend)
    assert out.shape == (0, 3, 5)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("log_domain", [True, False])
def test_gradcheck(native_backend, log_domain):
    scores = leaf(random_scores(5, 4, seed=1))
    rows = torch.tensor([1.0, 2.0, 1.0, 0.5, 1.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda s: mmot.sinkhorn(s, 0.4, 3, row_mass=rows, log_domain=log_domain, backend=native_backend), (scores,)
    )


def test_gradient_equals_swav_autograd(backend):
    scores = random_scores(8, 5, seed=7)
    upstream = random_scores(8, 5, seed=8)
    ours, swav = leaf(scores), leaf(scores)
    (mmot.sinkhorn(ours, 0.5, 3, backend=backend) * upstream).sum().backward()
    (swav_sinkhorn(swav, 0.5, 3) * upstream).sum().backward()
    torch.testing.assert_close(ours.grad, swav.grad, rtol=1e-9, atol=1e-12)


# Single sample, K = 1, primes, batched problems; larger shapes in the Rust section.
SHAPES = [(1, 1), (1, 5), (6, 1), (7, 3), (33, 17), (3, 2, 9, 4)]


def check_against_reference(backend, shape, log_domain, dtype):
    scores = random_scores(*shape, seed=sum(shape), dtype=dtype)
    upstream = random_scores(*shape, seed=1 + sum(shape), dtype=dtype)
    rows = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    assert_matches_reference(
        lambda s: mmot.sinkhorn(s, 0.3, 4, row_mass=rows.to(dtype), log_domain=log_domain, backend=backend),
        lambda s: reference_sinkhorn(s, 0.3, 4, row_mass=rows.to(dtype), log_domain=log_domain),
        [scores],
        upstream,
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("log_domain", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_backward_match_reference(native_backend, shape, log_domain, dtype):
    check_against_reference(native_backend, shape, log_domain, dtype)


@given(
    n=st.integers(1, 30),
    k=st.integers(1, 12),
    eps=st.floats(0.05, 2.0),
    n_iters=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    log_domain=st.sampled_from([True, False, "auto"]),
)
def test_hypothesis_backward_matches_reference(n, k, eps, n_iters, seed, log_domain):
    scores = random_scores(n, k, seed=seed)
    upstream = random_scores(n, k, seed=seed + 1)
    cols = torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    cols = cols / cols.sum() * n
    ref, want = value_and_grads(lambda s: reference_sinkhorn(s, eps, n_iters, col_mass=cols, log_domain=log_domain), [scores], upstream)
    for backend in NATIVE:
        out, got = value_and_grads(
            partial(mmot.sinkhorn, eps=eps, n_iters=n_iters, col_mass=cols, log_domain=log_domain, backend=backend), [scores], upstream
        )
        torch.testing.assert_close(out, ref, **F64)
        assert_grads_close(got, want, torch.float64)


def test_backward_small_eps_log_domain_is_finite(native_backend):
    scores = cosine_scores(200, 30, seed=4)
    got = assert_matches_reference(
        lambda s: mmot.sinkhorn(s, 1e-3, 3, backend=native_backend),
        lambda s: reference_sinkhorn(s, 1e-3, 3),
        [scores],
        random_scores(200, 30, seed=5),
    )
    assert bool(torch.isfinite(got[0]).all())


# ---------------------------------------------------------------- Rust kernel


@pytest.mark.parametrize("shape", [(300, 70), (2100, 5)])
@pytest.mark.parametrize("log_domain", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rust_several_row_chunks_match_reference(shape, log_domain, dtype):
    check_against_reference("rust", shape, log_domain, dtype)


def test_rust_large_outputs_with_huge_page_advice_are_fully_written():
    # 2048 x 1536 float32 is 12 MiB: above the size where the bindings advise huge pages for
    # the output, so this is the madvise path. Outputs are NaN-poisoned (conftest).
    assert_matches_reference(
        lambda s: mmot.sinkhorn(s, 0.05, 3, backend="rust"),
        lambda s: reference_sinkhorn(s, 0.05, 3),
        [cosine_scores(2048, 1536, seed=7, dtype=torch.float32)],
        random_scores(2048, 1536, seed=8, dtype=torch.float32),
    )


def test_rust_huge_page_advice_on_an_unaligned_output_view():
    from mmot import _core

    scores = cosine_scores(1, 2048, 1536, seed=9, dtype=torch.float32)
    # An output that starts 4 bytes into its buffer: the advised range is the 2 MiB-aligned
    # interior, and the elements outside it must be written all the same.
    buf = torch.full((1 + scores.numel(),), float("nan"), dtype=torch.float32)
    out = buf[1:].view(scores.shape)
    rows, cols = torch.ones(1, 2048), torch.full((1, 1536), 2048 / 1536)
    _core.sinkhorn(scores.numpy(), rows.numpy(), cols.numpy(), out.numpy(), 0.05, 3, "auto", 2)
    torch.testing.assert_close(out, mmot.sinkhorn(scores, 0.05, 3, backend="torch"), **F32)


# ---------------------------------------------------------------- Triton interpreter, tiny shapes

TRITON_SHAPES = [(7, 5), (3, 6), (13, 1), (1, 4), (2, 5, 3)]


@needs_triton
@pytest.mark.parametrize("shape", TRITON_SHAPES)
@pytest.mark.parametrize("log_domain", ["auto", True, False])
def test_triton_forward_float64(shape, log_domain, launch):
    scores = random_scores(*shape, seed=sum(shape))
    got = mmot.sinkhorn(scores, 0.3, 4, log_domain=log_domain, backend="triton")
    want = mmot.sinkhorn(scores, 0.3, 4, log_domain=log_domain, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, mmot.sinkhorn(scores, 0.3, 4, log_domain=log_domain, backend="rust"), rtol=1e-9, atol=1e-11)


@needs_triton
@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_backward_float64(shape, launch):
    scores = random_scores(*shape, seed=3 + sum(shape))
    rows = torch.rand(shape[:-1], dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    grad = random_scores(*shape, seed=7)
    got = grad_of(lambda s: mmot.sinkhorn(s, 0.4, 3, row_mass=rows, backend="triton"), scores, grad)
    want = grad_of(lambda s: mmot.sinkhorn(s, 0.4, 3, row_mass=rows, backend="torch"), scores, grad)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@needs_triton
def test_triton_masses_and_one_iteration(launch):
    scores = random_scores(6, 4, seed=11)
    rows = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0, 2.0], dtype=torch.float64)
    cols = torch.tensor([3.0, 1.0, 2.0, 2.0], dtype=torch.float64)
    for n_iters in (1, 2):
        fn = partial(mmot.sinkhorn, eps=0.2, n_iters=n_iters, row_mass=rows, col_mass=cols)
        torch.testing.assert_close(fn(scores, backend="triton"), fn(scores, backend="torch"), rtol=1e-10, atol=1e-12)
        grad = random_scores(6, 4, seed=n_iters)
        got, want = (grad_of(partial(fn, backend=b), scores, grad) for b in ("triton", "torch"))
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_low_precision(dtype):
    scores = cosine_scores(2, 9, 6, seed=2).to(dtype)
    got = mmot.sinkhorn(scores, 0.05, 3, backend="triton")
    assert got.dtype == dtype
    want = reference.sinkhorn(scores.double(), 0.05, 3, torch.ones(2, 9, dtype=torch.float64), torch.full((2, 6), 1.5, dtype=torch.float64))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    grad = random_scores(2, 9, 6, seed=4).to(dtype)
    got_grad = grad_of(lambda s: mmot.sinkhorn(s, 0.05, 3, backend="triton"), scores, grad)
    assert got_grad.dtype == dtype
    want_grad = grad_of(lambda s: mmot.sinkhorn(s, 0.05, 3, backend="torch"), scores.double(), grad.double())
    scale = want_grad.abs().max()
    torch.testing.assert_close(got_grad.double() / scale, want_grad / scale, rtol=0, atol=1e-4 if dtype == torch.float32 else 5e-2)


@needs_triton
def test_triton_small_eps_is_stable():
    # eps = 1e-3 on cosine scores: exp(scores/eps) overflows float32; the kernels never do.
    scores = cosine_scores(12, 5, seed=3).float()
    got = mmot.sinkhorn(scores, 1e-3, 5, backend="triton")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.sum(-1), torch.ones(12), rtol=1e-4, atol=1e-4)
    want = mmot.sinkhorn(scores.double(), 1e-3, 5, backend="torch")
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)


@needs_triton
def test_triton_non_contiguous_scores():
    scores = random_scores(6, 9, seed=12).t()  # (9, 6) view with swapped strides
    torch.testing.assert_close(mmot.sinkhorn(scores, backend="triton"), mmot.sinkhorn(scores, backend="torch"), rtol=1e-9, atol=1e-10)


@needs_triton
@settings(max_examples=6, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 7), eps=st.floats(0.1, 1.5), n_iters=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_triton_hypothesis_matches_torch_and_rust(n, k, eps, n_iters, seed):
    scores = random_scores(n, k, seed=seed)
    grad = random_scores(n, k, seed=seed + 1)
    fn = lambda s, b: mmot.sinkhorn(s, eps, n_iters, backend=b)  # noqa: E731
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
def test_gpu_triton_swav_size():
    scores = cosine_scores(4096, 3000, dim=128, seed=2).to(cuda())
    got = mmot.sinkhorn(scores.float(), 0.05, 3, backend="triton")
    want = mmot.sinkhorn(scores, 0.05, 3, backend="torch")
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    grad = torch.randn_like(scores)
    got_grad = grad_of(lambda s: mmot.sinkhorn(s, 0.05, 3, backend="triton"), scores, grad)
    want_grad = grad_of(lambda s: mmot.sinkhorn(s, 0.05, 3, backend="torch"), scores, grad)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-7, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.parametrize("size", [4, 16])
def test_gpu_triton_batched_tiny_problems(size):
    scores = cosine_scores(4096, size, size, seed=3).to(cuda())
    fn = lambda s, b: mmot.sinkhorn(s, 0.05, 20, backend=b)  # noqa: E731
    torch.testing.assert_close(fn(scores, "triton"), fn(scores, "torch"), rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------- bad input

S = random_scores(6, 4, seed=0)
INF = S.clone()
INF[0, 0] = float("inf")

test_bad_input_is_named = bad_input_test(
    "mmot.sinkhorn",
    [
        (lambda: mmot.sinkhorn(S[0]), ValueError, "'scores'", "(..., N, K)"),
        (lambda: mmot.sinkhorn(S.long()), TypeError, "'scores'", "floating"),
        (lambda: mmot.sinkhorn(S, eps=0), ValueError, "'eps'", "positive"),
        (lambda: mmot.sinkhorn(S, n_iters=-2), ValueError, "'n_iters'", "1..2147483647"),
        (lambda: mmot.sinkhorn(S, row_mass=-torch.ones(6)), ValueError, "'row_mass'", "positive"),
        (lambda: mmot.sinkhorn(S, row_mass=torch.ones(6), col_mass=torch.ones(4)), ValueError, "'col_mass'", "sum"),
        (lambda: mmot.sinkhorn(S, col_mass=torch.ones(3)), ValueError, "'col_mass'", "shape"),
        (lambda: mmot.sinkhorn(S, row_mass=torch.ones(6, device="meta")), ValueError, "'row_mass'", "device"),
        (lambda: mmot.sinkhorn(INF), ValueError, "'scores'", "finite"),
        (lambda: mmot.sinkhorn(S, log_domain=None), ValueError, "'log_domain'"),
    ],
)
