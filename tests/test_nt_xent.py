"""mmot.nt_xent on every native backend.

Against mmot.reference and the literal 2N×2N form (naive.py), reductions, dtypes, gradcheck,
opcheck and torch.compile, N = 1, odd D, several Rust tiles (N > 256), thread counts,
non-finite and bad input.
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
from hypothesis import given, settings
from hypothesis import strategies as st
from mmot import reference
from mmot.ops.nt_xent import nt_xent_op
from naive import materialized_nt_xent


def pairs(n, d, seed, dtype=torch.float64, noise=1.0):
    """(x, y) leaves, y a noisy copy of x (so that positives stand out and the loss is not flat)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = x + noise * torch.randn(n, d, generator=generator, dtype=torch.float64)
    return x.to(dtype).requires_grad_(True), y.to(dtype).requires_grad_(True)


@settings(deadline=None, max_examples=40)
@given(
    n=st.integers(1, 20),
    d=st.integers(1, 9),
    temperature=st.sampled_from([0.05, 0.1, 0.5, 2.0]),
    normalize=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_values_and_gradients_float64(n, d, temperature, normalize, seed):
    x, y = pairs(n, d, seed)
    want = materialized_nt_xent(x, y, temperature, normalize)
    torch.testing.assert_close(reference.nt_xent(x, y, temperature, normalize), want, rtol=1e-10, atol=1e-12)
    upstream = torch.randn(2 * n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    want_grads = torch.autograd.grad(want, (x, y), upstream)
    for backend in NATIVE:
        got = mmot.nt_xent(x, y, temperature, normalize=normalize, reduction="none", backend=backend)
        assert got.shape == (2 * n,) and got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11)
        for g, w in zip(torch.autograd.grad(got, (x, y), upstream), want_grads):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
        mean = mmot.nt_xent(x, y, temperature, normalize=normalize, backend=backend)
        torch.testing.assert_close(mean, want.mean(), rtol=1e-10, atol=1e-12)
        total = mmot.nt_xent(x, y, temperature, normalize=normalize, reduction="sum", backend=backend)
        torch.testing.assert_close(total, want.sum(), rtol=1e-10, atol=1e-11)


def test_symmetric_and_rows_of_x_first(native_backend):
    x, y = pairs(6, 5, 3)
    a = mmot.nt_xent(x, y, reduction="none", backend=native_backend)
    b = mmot.nt_xent(y, x, reduction="none", backend=native_backend)
    torch.testing.assert_close(a, b.roll(6))
    # A row of x whose partner is its exact copy and far from the rest has a small loss.
    y2 = y.detach().clone()
    y2[0] = x[0].detach()
    assert mmot.nt_xent(x, y2, reduction="none", backend=native_backend)[0] < a[0]


def test_single_pair_is_zero(native_backend):
    x, y = pairs(1, 4, 0)
    loss = mmot.nt_xent(x, y, reduction="none", backend=native_backend)
    torch.testing.assert_close(loss, torch.zeros(2, dtype=torch.float64))
    gx, gy = torch.autograd.grad(loss.sum(), (x, y))
    assert gx.abs().max() < 1e-14 and gy.abs().max() < 1e-14  # rounding of e^{s − L} − 1 only


def test_empty(native_backend):
    x = torch.randn(0, 4, requires_grad=True)
    assert mmot.nt_xent(x, x, backend=native_backend).item() == 0.0
    assert mmot.nt_xent(x, x, reduction="none", backend=native_backend).shape == (0,)


@pytest.mark.parametrize("n", [257, 600, 1000])
def test_several_tiles_against_naive(native_backend, n):
    x, y = pairs(n, 7, n, noise=0.5)
    want = materialized_nt_xent(x, y, 0.1)
    got = mmot.nt_xent(x, y, reduction="none", backend=native_backend)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11)
    upstream = torch.linspace(-1, 2, 2 * n, dtype=torch.float64)
    for g, w in zip(torch.autograd.grad(got, (x, y), upstream), torch.autograd.grad(want, (x, y), upstream)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck(native_backend, normalize):
    x, y = pairs(5, 3, 11)
    f = lambda a, b: mmot.nt_xent(a, b, 0.3, normalize=normalize, reduction="none", backend=native_backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision(native_backend, dtype):
    x, y = pairs(40, 16, 5, dtype=dtype)
    got = mmot.nt_xent(x, y, backend=native_backend)
    assert got.dtype == dtype
    want = materialized_nt_xent(x.double(), y.double()).mean()
    torch.testing.assert_close(got.double(), want, rtol=2e-2 if dtype != torch.float32 else 1e-5, atol=1e-5)
    gx, gy = torch.autograd.grad(got, (x, y))
    assert gx.dtype == dtype and torch.isfinite(gx.float()).all()


def test_backends_agree_float32():
    x, y = pairs(300, 33, 2, dtype=torch.float32)
    a = mmot.nt_xent(x, y, reduction="none", backend="rust")
    b = mmot.nt_xent(x, y, reduction="none", backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_opcheck(native_backend, normalize):
    x, y = pairs(7, 5, 1)
    torch.library.opcheck(nt_xent_op, (x, y, 0.2, normalize, native_backend))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(native_backend, dynamic):
    def step(x, y):
        return mmot.nt_xent(x, y, 0.2, backend=native_backend)

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for n in (5, 9, 12):
        x, y = pairs(n, 6, n)
        got = compiled(x, y)
        torch.testing.assert_close(got, materialized_nt_xent(x, y, 0.2).mean())
        g = torch.autograd.grad(got, (x,))[0]
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("normalize", [True, False])
def test_non_finite_input_is_named(native_backend, value, normalize):
    x, y = pairs(4, 3, 0)
    bad = y.detach().clone()
    bad[1, 2] = value
    with pytest.raises(ValueError, match=r"mmot\.nt_xent.*'y'"):
        mmot.nt_xent(x, bad, normalize=normalize, backend=native_backend)
    with pytest.raises(ValueError, match=r"mmot\.nt_xent.*'x'"):
        mmot.nt_xent(bad, x, normalize=normalize, backend=native_backend)


def test_rust_independent_of_thread_count():
    code = (
        "import torch, mmot\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(700, 19, generator=g, requires_grad=True); y = torch.randn(700, 19, generator=g, requires_grad=True)\n"
        "l = mmot.nt_xent(x, y, reduction='none', backend='rust')\n"
        "gx, gy = torch.autograd.grad((l * torch.linspace(-1, 1, 1400)).sum(), (x, y))\n"
        "print(l.double().tolist(), gx.double().sum().item(), gy.double().pow(2).sum().item())\n"
    )
    outs = []
    for threads in ("1", "2", "3"):
        env = dict(os.environ, MMOT_NUM_THREADS=threads)
        outs.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    assert outs[0] == outs[1] == outs[2], outs


# ---------------------------------------------------------------- Triton (interpreter, tiny)


@needs_triton
@pytest.mark.parametrize("n, d", [(1, 3), (5, 3), (20, 17)])
def test_triton_against_naive(n, d):
    x, y = pairs(n, d, n + d)
    want = materialized_nt_xent(x, y, 0.2)
    got = mmot.nt_xent(x, y, 0.2, reduction="none", backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11)
    upstream = torch.linspace(-1, 2, 2 * n, dtype=torch.float64)
    for g, w in zip(torch.autograd.grad(got, (x, y), upstream), torch.autograd.grad(want, (x, y), upstream)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@needs_triton
def test_triton_gradcheck_and_float32():
    x, y = pairs(4, 3, 1)
    assert torch.autograd.gradcheck(lambda a, b: mmot.nt_xent(a, b, 0.3, reduction="none", backend="triton"), (x, y))
    x, y = pairs(18, 5, 2, dtype=torch.float32)
    got = mmot.nt_xent(x, y, backend="triton")
    torch.testing.assert_close(got, mmot.nt_xent(x, y, backend="rust"), rtol=1e-5, atol=1e-5)


test_bad_input_is_named = bad_input_test(
    "mmot.nt_xent",
    [
        (lambda: mmot.nt_xent(torch.randn(3), torch.randn(3, 2)), ValueError, "'x'"),
        (lambda: mmot.nt_xent(torch.randn(3, 2), torch.randn(4, 2)), ValueError, "'y'", "shape"),
        (lambda: mmot.nt_xent(torch.randn(3, 2), torch.randn(3, 2).double()), TypeError, "'y'", "dtype"),
        (lambda: mmot.nt_xent(torch.ones(3, 2, dtype=torch.long), torch.randn(3, 2)), TypeError, "'x'"),
        (lambda: mmot.nt_xent("x", torch.randn(3, 2)), TypeError, "'x'"),
        (lambda: mmot.nt_xent(torch.randn(3, 2), torch.randn(3, 2), 0.0), ValueError, "'temperature'"),
        (lambda: mmot.nt_xent(torch.randn(3, 2), torch.randn(3, 2), reduction="avg"), ValueError, "'reduction'"),
        (lambda: mmot.nt_xent(torch.randn(3, 2), torch.randn(3, 2), normalize=1), TypeError, "'normalize'", "bool"),
        (lambda: mmot.nt_xent(torch.randn(3, 2), torch.randn(3, 2), backend="gpu"), ValueError, "'backend'"),
    ],
)
