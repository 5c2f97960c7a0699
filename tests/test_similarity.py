"""mmot.similarity on every backend.

Against explicit loops (naive.py), against autograd through mmot.reference, with broadcasting
and edge cases, the Triton kernel on tiny shapes, and its bad input.
"""

import mmot
import pytest
import torch
from backends import NATIVE, needs_triton
from bad_input import bad_input_test
from gradients import F64, assert_grads_close, assert_matches_reference, leaf, value_and_grads
from hypothesis import given
from hypothesis import strategies as st
from inputs import random_scores
from mmot import reference
from naive import loop_similarity

# ---------------------------------------------------------------- values


@given(
    n=st.integers(1, 9),
    m=st.integers(1, 9),
    d=st.integers(1, 17),
    normalize=st.booleans(),
    scale=st.floats(-3.0, 20.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_loops_float64(n, m, d, normalize, scale, seed):
    x = random_scores(n, d, seed=seed)
    y = random_scores(m, d, seed=seed + 1)
    want = loop_similarity(x, y, normalize, scale)
    for backend in NATIVE:
        got = mmot.similarity(x, y, normalize=normalize, scale=scale, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_every_modality_against_every_anchor_set(backend):
    feats = random_scores(3, 1, 5, 7, seed=1)
    anchors = random_scores(1, 2, 4, 7, seed=2)
    got = mmot.similarity(feats, anchors, scale=10.0, backend=backend)
    assert got.shape == (3, 2, 5, 4)
    for mod in range(3):
        for a in range(2):
            torch.testing.assert_close(got[mod, a], loop_similarity(feats[mod, 0], anchors[0, a], True, 10.0))


def test_broadcast_with_unbatched_anchors(backend):
    x = random_scores(3, 5, 4, seed=3)
    y = random_scores(6, 4, seed=4)
    torch.testing.assert_close(mmot.similarity(x, y, backend=backend), mmot.similarity(x, y, backend="torch"), rtol=1e-12, atol=1e-12)


def test_float32_and_zero_rows(backend):
    x = random_scores(6, 33, seed=3, dtype=torch.float32)
    x[2] = 0.0  # a zero row has zero cosine similarity with everything
    y = random_scores(70, 33, seed=4, dtype=torch.float32)
    got = mmot.similarity(x, y, backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), loop_similarity(x, y, True, 1.0), rtol=1e-5, atol=1e-6)
    assert bool((got[2] == 0).all())


@pytest.mark.parametrize("shapes", [((0, 4), (3, 4)), ((2, 0, 4), (1, 3, 4)), ((5, 0), (3, 0))])
def test_empty_inputs(backend, shapes):
    x = torch.ones(shapes[0], dtype=torch.float64) * 0.5
    y = torch.ones(shapes[1], dtype=torch.float64) * 0.25
    got = mmot.similarity(x, y, backend=backend)
    assert got.shape == torch.broadcast_shapes(x.shape[:-2], y.shape[:-2]) + (x.shape[-2], y.shape[-2])
    assert bool((got == 0).all())


# ---------------------------------------------------------------- gradients


def test_gradcheck_with_broadcasting(native_backend):
    x = leaf(random_scores(2, 1, 4, 3, seed=3))
    y = leaf(random_scores(1, 3, 5, 3, seed=4))
    assert torch.autograd.gradcheck(lambda a, b: mmot.similarity(a, b, scale=2.0, backend=native_backend), (x, y))


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
def test_forward_backward_match_reference(native_backend, x_shape, y_shape, normalize, dtype):
    x = random_scores(*x_shape, seed=1, dtype=dtype)
    y = random_scores(*y_shape, seed=2, dtype=dtype)
    if normalize and x_shape[-2] > 1:
        x[..., 1, :] = 0.0  # a zero row: the 1e-12 clamp's branch
    out_shape = torch.broadcast_shapes(x_shape[:-2], y_shape[:-2]) + (x_shape[-2], y_shape[-2])
    assert_matches_reference(
        lambda a, b: mmot.similarity(a, b, normalize=normalize, scale=1.7, backend=native_backend),
        lambda a, b: reference.similarity(a, b, normalize, 1.7),
        [x, y],
        random_scores(*out_shape, seed=3, dtype=dtype),
    )


@given(n=st.integers(1, 9), m=st.integers(1, 9), d=st.integers(1, 20), seed=st.integers(0, 2**31 - 1), normalize=st.booleans())
def test_rust_hypothesis_backward_matches_reference(n, m, d, seed, normalize):
    # Rust only: at D = 1 with normalize the exact gradient is 0, and the torch backend's reverse
    # pass leaves ~1e-13 of rounding there, above this floor (test_torch_reverse.py checks it).
    x = random_scores(2, 1, n, d, seed=seed)
    y = random_scores(1, 3, m, d, seed=seed + 1)
    upstream = random_scores(2, 3, n, m, seed=seed + 2)
    out, got = value_and_grads(lambda a, b: mmot.similarity(a, b, normalize=normalize, backend="rust"), [x, y], upstream)
    ref, want = value_and_grads(lambda a, b: reference.similarity(a, b, normalize), [x, y], upstream)
    torch.testing.assert_close(out, ref, **F64)
    assert_grads_close(got, want, torch.float64)


# ---------------------------------------------------------------- Triton interpreter, tiny shapes


@needs_triton
@pytest.mark.parametrize("shapes", [((5, 3), (7, 3)), ((2, 1, 4, 3), (1, 3, 5, 3)), ((3, 17, 40), (19, 40))])
@pytest.mark.parametrize("normalize", [True, False])
def test_triton_float64(shapes, normalize):
    x = random_scores(*shapes[0], seed=1)
    y = random_scores(*shapes[1], seed=2)
    got = mmot.similarity(x, y, normalize=normalize, scale=2.5, backend="triton")
    want = mmot.similarity(x, y, normalize=normalize, scale=2.5, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, mmot.similarity(x, y, normalize=normalize, scale=2.5, backend="rust"), rtol=1e-9, atol=1e-11)
    grad = random_scores(*want.shape, seed=3)

    def grads(backend):
        leaves = [leaf(x), leaf(y)]
        out = mmot.similarity(*leaves, normalize=normalize, scale=2.5, backend=backend)
        return torch.autograd.grad(out, leaves, grad)

    for got_grad, want_grad in zip(grads("triton"), grads("torch")):
        assert got_grad.shape == want_grad.shape
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-11)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_low_precision(dtype):
    x = random_scores(2, 1, 9, 24, seed=4).to(dtype)
    y = random_scores(1, 2, 6, 24, seed=5).to(dtype)
    got = mmot.similarity(x, y, backend="triton")
    assert got.dtype == dtype
    want = reference.similarity(x.double(), y.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    leaves = [leaf(x), leaf(y)]
    gx, gy = torch.autograd.grad(mmot.similarity(*leaves, backend="triton"), leaves, torch.ones_like(got))
    assert gx.dtype == dtype and gy.dtype == dtype
    dleaves = [leaf(x.double()), leaf(y.double())]
    wx, wy = torch.autograd.grad(reference.similarity(*dleaves), dleaves, torch.ones_like(want))
    torch.testing.assert_close(gx.double(), wx, rtol=tol * 10, atol=tol * 10)
    torch.testing.assert_close(gy.double(), wy, rtol=tol * 10, atol=tol * 10)


@needs_triton
def test_triton_zero_row_gives_finite_output():
    x = random_scores(4, 8, seed=6)
    x[2] = 0.0
    y = random_scores(3, 8, seed=7)
    got = mmot.similarity(x, y, backend="triton")
    torch.testing.assert_close(got, mmot.similarity(x, y, backend="torch"), rtol=1e-10, atol=1e-12)
    assert (got[2] == 0).all()


# ---------------------------------------------------------------- full size on a GPU


@pytest.mark.gpu
def test_gpu_triton_broadcast():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = torch.randn(3, 1, 2160, 256, device="cuda")
    y = torch.randn(1, 2, 64, 256, device="cuda")
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        got = mmot.similarity(x.to(dtype), y.to(dtype), backend="triton")
        want = reference.similarity(x.to(dtype).double(), y.to(dtype).double())
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


# ---------------------------------------------------------------- bad input

S = random_scores(6, 4, seed=0)
NAN = S.clone()
NAN[2, 1] = float("nan")

test_bad_input_is_named = bad_input_test(
    "mmot.similarity",
    [
        (lambda: mmot.similarity(S, S[:, :3]), ValueError, "'x' and 'y'", "feature size"),
        (lambda: mmot.similarity(S, S.float()), TypeError, "'y'", "dtype"),
        (lambda: mmot.similarity(S.expand(2, 6, 4), S.expand(3, 6, 4)), ValueError, "'x'", "'y'", "broadcast"),
        (lambda: mmot.similarity(S[0], S), ValueError, "'x'", "(..., N, D)"),
        (lambda: mmot.similarity(S, S.to("meta")), ValueError, "'y'", "device"),
        (lambda: mmot.similarity(S, S, scale=float("inf")), ValueError, "'scale'", "finite"),
        (lambda: mmot.similarity(S, S, normalize=1), TypeError, "'normalize'", "bool"),
        (lambda: mmot.similarity(NAN, S), ValueError, "'x'", "finite"),
    ],
)
