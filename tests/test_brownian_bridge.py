"""mmot.brownian_bridge_loss on every backend.

Against mmot.reference and the literal (N, N, D) bridge points (naive.py), t as a float and as a
vector, reductions and dtypes, gradcheck, opcheck and torch.compile, the Rust kernel's tiles and
thread counts, the Triton kernel on tiny shapes, non-finite input, and bad input.
"""

from __future__ import annotations

import os
import subprocess
import sys

import mmot
import pytest
import torch
from backends import NATIVE, needs_triton
from bad_input import bad_input_test
from hypothesis import given
from hypothesis import strategies as st
from inputs import positive_pairs
from mmot import reference
from mmot.ops.brownian_bridge import brownian_bridge_op
from naive import materialized_brownian_bridge


def triples(n, d, seed, dtype=torch.float64):
    """(a, b, mid) leaves: mid a noisy point between a and b, as an augmentation would give."""
    a, b = positive_pairs(n, d, seed, dtype)
    generator = torch.Generator().manual_seed(seed + 7)
    mix = 0.5 * a.detach().double() + 0.5 * b.detach().double() + 0.3 * torch.randn(n, d, generator=generator, dtype=torch.float64)
    return a, b, mix.to(dtype).requires_grad_(True)


def times(n, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed + 11)
    return (0.05 + 0.9 * torch.rand(n, generator=generator, dtype=torch.float64)).to(dtype)


def grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


# ---------------------------------------------------------------- values and gradients


@given(
    n=st.integers(1, 24),
    d=st.integers(1, 13),
    vector=st.booleans(),
    scalar_t=st.floats(0.02, 0.98),
    sigma=st.floats(0.3, 3.0),
    normalize=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_values_and_gradients_float64(n, d, vector, scalar_t, sigma, normalize, seed):
    a, b, mid = triples(n, d, seed)
    t = times(n, seed) if vector else scalar_t
    want = materialized_brownian_bridge(a, b, mid, t, sigma, normalize)
    spec = reference.brownian_bridge_loss(a, b, mid, torch.as_tensor(t, dtype=torch.float64).expand(n), sigma, normalize)
    torch.testing.assert_close(spec, want, rtol=1e-9, atol=1e-9)
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    want_grads = torch.autograd.grad(want, (a, b, mid), upstream)
    for backend in NATIVE:
        got = mmot.brownian_bridge_loss(a, b, mid, t, sigma=sigma, normalize=normalize, reduction="none", backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        for g, w in zip(torch.autograd.grad(got, (a, b, mid), upstream), want_grads):
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9)


def test_reductions(backend):
    a, b, mid = triples(19, 7, 1)
    t = times(19, 1)
    none = mmot.brownian_bridge_loss(a, b, mid, t, reduction="none", backend=backend)
    assert none.shape == (19,)
    torch.testing.assert_close(mmot.brownian_bridge_loss(a, b, mid, t, reduction="sum", backend=backend), none.sum())
    mean = mmot.brownian_bridge_loss(a, b, mid, t, backend=backend)
    torch.testing.assert_close(mean, none.mean())
    torch.testing.assert_close(mean, materialized_brownian_bridge(a, b, mid, t).mean())


def test_scalar_t_equals_constant_vector(native_backend):
    a, b, mid = triples(13, 6, 2)

    def losses(t):
        return mmot.brownian_bridge_loss(a, b, mid, t, sigma=0.8, reduction="none", backend=native_backend)

    scalar = losses(0.3)
    torch.testing.assert_close(scalar, losses(torch.full((13,), 0.3, dtype=torch.float64)), rtol=0, atol=0)
    torch.testing.assert_close(scalar, losses(torch.tensor(0.3, dtype=torch.float64)), rtol=0, atol=0)


def test_t_gets_no_gradient(native_backend):
    a, b, mid = triples(5, 4, 3)
    t = times(5, 3).requires_grad_(True)
    loss = mmot.brownian_bridge_loss(a, b, mid, t, backend=native_backend)
    loss.backward()
    assert t.grad is None and a.grad is not None and mid.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_dtypes(backend, dtype):
    a, b, mid = triples(40, 24, 4, dtype)
    t = times(40, 4, dtype)
    got = mmot.brownian_bridge_loss(a, b, mid, t, sigma=0.5, backend=backend)
    assert got.dtype == dtype
    want = materialized_brownian_bridge(*(x.detach().double() for x in (a, b, mid)), t.double(), 0.5).mean()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    for g in grads(got, a, b, mid):
        assert g.dtype == dtype and bool(torch.isfinite(g.float()).all())


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck(native_backend, normalize):
    a, b, mid = triples(7, 5, 5)
    t = times(7, 5)
    assert torch.autograd.gradcheck(
        lambda x, y, z: mmot.brownian_bridge_loss(x, y, z, t, sigma=0.9, normalize=normalize, reduction="none", backend=native_backend),
        (a, b, mid),
    )


def test_single_row_and_extreme_times(backend):
    """N = 1 is a loss of 0 with zero gradient; t near the ends and a small σ stay finite."""
    a, b, mid = triples(1, 3, 6)
    one = mmot.brownian_bridge_loss(a, b, mid, 0.5, backend=backend)
    assert one.item() == 0.0 and all(bool((g == 0).all()) for g in grads(one, a, b, mid))
    a, b, mid = triples(9, 5, 6)
    t = torch.tensor([1e-6, 0.999999, 0.5, 0.01, 0.99, 0.3, 0.7, 0.2, 0.8], dtype=torch.float64)
    got = mmot.brownian_bridge_loss(a, b, mid, t, sigma=0.2, reduction="none", backend=backend)
    want = materialized_brownian_bridge(a, b, mid, t, 0.2)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-6)
    assert all(bool(torch.isfinite(g).all()) for g in grads(got.sum(), a, b, mid))


def test_zero_rows_and_non_contiguous_inputs(backend):
    base_a, base_b, base_mid = triples(11, 14, 7)
    a, b, mid = base_a[:, ::2], base_b.T.contiguous().T[:, 1::2], base_mid[:, :7]
    assert not a.is_contiguous() and not b.is_contiguous()
    torch.testing.assert_close(
        mmot.brownian_bridge_loss(a, b, mid, 0.4, backend=backend), materialized_brownian_bridge(a, b, mid, 0.4).mean()
    )
    zero = torch.zeros(11, 7, dtype=torch.float64)
    zero[3] = 1.0
    torch.testing.assert_close(
        mmot.brownian_bridge_loss(zero, b, mid, 0.4, backend=backend), materialized_brownian_bridge(zero, b, mid, 0.4).mean()
    )


def test_empty_batch(backend):
    a = torch.zeros(0, 5, dtype=torch.float64, requires_grad=True)
    loss = mmot.brownian_bridge_loss(a, a, a, backend=backend)
    assert loss.item() == 0.0
    assert mmot.brownian_bridge_loss(a, a, a, reduction="none", backend=backend).shape == (0,)
    assert mmot.brownian_bridge_loss(a, a, a, torch.zeros(0), backend=backend).item() == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_in_non_finite_out_with_checks_off(backend, bad):
    a, b, mid = triples(6, 4, 8)
    poisoned = mid.detach().clone()
    poisoned[2, 1] = bad
    previous = mmot.set_checks(False)
    try:
        loss = mmot.brownian_bridge_loss(a, b, poisoned, 0.5, backend=backend)
    finally:
        mmot.set_checks(previous)
    assert not bool(torch.isfinite(loss))


# ---------------------------------------------------------------- torch.library and torch.compile


def test_opcheck(native_backend):
    a, b, mid = triples(6, 5, 9)
    t = times(6, 9)
    scale = reference.bridge_scale(t, 0.7, torch.float64)
    torch.library.opcheck(brownian_bridge_op, (a, b, mid, t, scale, True, False, native_backend))
    one = torch.full_like(t, 0.4)
    scale_one = reference.bridge_scale(one, 0.7, torch.float64)
    torch.library.opcheck(brownian_bridge_op, (a, b, mid, one, scale_one, False, True, native_backend))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_with_changing_sizes(native_backend, dynamic):
    torch._dynamo.reset()

    def step(a, b, mid, t):
        return mmot.brownian_bridge_loss(a, b, mid, t, sigma=0.8, backend=native_backend) + mmot.brownian_bridge_loss(
            a, b, mid, 0.25, normalize=False, reduction="sum", backend=native_backend
        )

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for n, d in ((8, 5), (11, 5), (6, 7)):
        a, b, mid = triples(n, d, n)
        t = times(n, n)
        loss = compiled(a, b, mid, t)
        want = step(a, b, mid, t)
        torch.testing.assert_close(loss, want)
        for g, w in zip(grads(loss, a, b, mid), grads(want, a, b, mid)):
            torch.testing.assert_close(g, w)


# ---------------------------------------------------------------- Rust kernel: tiles, threads


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("uniform", [True, False])
def test_rust_several_tiles_float64(normalize, uniform):
    """N = 530 spans three 256-row tiles (a ragged last one): the forward's column tiles and the
    wavefront backward's blocks and column sums, with one time for every row (the bridge points
    formed once) or a time per row."""
    a, b, mid = triples(530, 9, 16)
    t = torch.full((530,), 0.35, dtype=torch.float64) if uniform else times(530, 16)
    want = reference.brownian_bridge_loss(a, b, mid, t, 0.6, normalize)
    got = mmot.brownian_bridge_loss(a, b, mid, t, sigma=0.6, normalize=normalize, reduction="none", backend="rust")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    upstream = times(530, 2)
    for g, w in zip(torch.autograd.grad(got, (a, b, mid), upstream), torch.autograd.grad(want, (a, b, mid), upstream)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_rust_is_deterministic_across_thread_counts(tmp_path):
    script = (
        "import torch, mmot, sys; g = torch.Generator().manual_seed(1);"
        "a, b, m = (torch.randn(600, 40, generator=g, requires_grad=True) for _ in range(3));"
        "t = torch.rand(600, generator=g) * 0.8 + 0.1;"
        "l = mmot.brownian_bridge_loss(a, b, m, t, backend='rust'); l.backward();"
        "torch.save((l.detach(), a.grad, b.grad, m.grad), sys.argv[1])"
    )
    results = []
    for threads in ("1", "3"):
        path = tmp_path / f"threads-{threads}.pt"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=dict(os.environ, MMOT_NUM_THREADS=threads))
        results.append(torch.load(path))
    for x, y in zip(*results):
        assert torch.equal(x, y)


# ---------------------------------------------------------------- Triton interpreter, tiny shapes


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("uniform", [True, False])
def test_triton_forward_and_backward(dtype, normalize, uniform):
    """21 rows and 37 features: two row tiles, and three feature chunks in the products and the
    backward's output split (16 each under the interpreter); one time for every row (the bridge
    points formed once, products D wide) or a time per row (products 2D wide)."""
    a, b, mid = triples(21, 37, 14, dtype)
    t = 0.35 if uniform else times(21, 14, dtype)
    sigma = 1.0 if normalize else 6.0  # raw rows of 37 features: logits of a similar size
    got = mmot.brownian_bridge_loss(a, b, mid, t, sigma=sigma, normalize=normalize, reduction="none", backend="triton")
    want = mmot.brownian_bridge_loss(a, b, mid, t, sigma=sigma, normalize=normalize, reduction="none", backend="torch")
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got, want, **tol)
    upstream = times(21, 3, dtype)
    for g, w in zip(torch.autograd.grad(got, (a, b, mid), upstream), torch.autograd.grad(want, (a, b, mid), upstream)):
        torch.testing.assert_close(g, w, **tol)


@needs_triton
def test_triton_gradcheck():
    a, b, mid = triples(5, 3, 15)
    t = times(5, 15)
    assert torch.autograd.gradcheck(
        lambda x, y, z: mmot.brownian_bridge_loss(x, y, z, t, sigma=0.9, reduction="none", backend="triton"), (a, b, mid)
    )


# ---------------------------------------------------------------- bad input

A = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
NAN = A.clone()
NAN[1, 2] = float("nan")
T = torch.full((6,), 0.5, dtype=torch.float64)
ENDS = T.clone()
ENDS[4] = 1.0


def bridge(*args, **kwargs):
    return mmot.brownian_bridge_loss(*args, **kwargs)


test_bad_input_is_named = bad_input_test(
    "mmot.brownian_bridge_loss",
    [
        (lambda: bridge(A.numpy(), A, A), TypeError, "'a'", "torch.Tensor"),
        (lambda: bridge(A.long(), A.long(), A.long()), TypeError, "'a'", "floating"),
        (lambda: bridge(A[0], A[0], A[0]), ValueError, "'a'", "(N, D)"),
        (lambda: bridge(A[None], A[None], A[None]), ValueError, "'a'", "(N, D)"),
        (lambda: bridge(A, A[:5], A), ValueError, "'b'", "shape"),
        (lambda: bridge(A, A, A[:, :3]), ValueError, "'mid'", "shape"),
        (lambda: bridge(A, A, A[None]), ValueError, "'mid'", "(N, D)"),
        (lambda: bridge(A, A.float(), A), TypeError, "'b'", "dtype"),
        (lambda: bridge(A, A, A.float()), TypeError, "'mid'", "dtype"),
        (lambda: bridge(A, A, A.to("meta")), ValueError, "'mid'", "device"),
        (lambda: bridge(A, A, A, 0.0), ValueError, "'t'", "(0, 1)"),
        (lambda: bridge(A, A, A, 1.0), ValueError, "'t'", "(0, 1)"),
        (lambda: bridge(A, A, A, float("nan")), ValueError, "'t'", "(0, 1)"),
        (lambda: bridge(A, A, A, True), TypeError, "'t'"),
        (lambda: bridge(A, A, A, "0.5"), TypeError, "'t'"),
        (lambda: bridge(A, A, A, ENDS), ValueError, "'t'", "(0, 1)"),
        (lambda: bridge(A, A, A, ENDS, backend="rust"), ValueError, "'t'", "(0, 1)"),
        (lambda: bridge(A, A, A, -T), ValueError, "'t'", "(0, 1)"),
        (lambda: bridge(A, A, A, T[:5]), ValueError, "'t'", "(6,)"),
        (lambda: bridge(A, A, A, T[None]), ValueError, "'t'", "(6,)"),
        (lambda: bridge(A, A, A, T.long()), TypeError, "'t'", "floating"),
        (lambda: bridge(A, A, A, T.to("meta")), ValueError, "'t'", "device"),
        (lambda: bridge(A, A, A, sigma=0.0), ValueError, "'sigma'", "positive"),
        (lambda: bridge(A, A, A, sigma=float("inf")), ValueError, "'sigma'"),
        (lambda: bridge(A, A, A, sigma="1"), TypeError, "'sigma'"),
        (lambda: bridge(A, A, A, sigma=1e-160), ValueError, "'sigma'", "finite"),
        (lambda: bridge(A.float(), A.float(), A.float(), sigma=1e-20), ValueError, "'sigma'", "finite"),
        (lambda: bridge(A, A, A, T * 1e-300, sigma=1e-5), ValueError, "'sigma'", "overflows"),
        (lambda: bridge(A, A, A, normalize=1), TypeError, "'normalize'", "bool"),
        (lambda: bridge(A, A, A, reduction="avg"), ValueError, "'reduction'", "mean"),
        (lambda: bridge(NAN, A, A), ValueError, "'a'", "finite"),
        (lambda: bridge(A, NAN, A, backend="torch"), ValueError, "'b'", "finite"),
        (lambda: bridge(A, A, NAN, backend="rust"), ValueError, "'mid'", "finite"),
        (lambda: bridge(A, A, A * float("inf"), normalize=False, backend="rust"), ValueError, "'mid'", "finite"),
        (lambda: bridge(A, A, A, backend="gpu"), ValueError, "'backend'"),
        (lambda: bridge(A.to("meta"), A.to("meta"), A.to("meta"), backend="rust"), ValueError, "backend 'rust'", "CPU"),
    ],
)
