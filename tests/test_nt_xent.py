"""mmot.nt_xent (SimCLR's / CoMM's 2N-way loss) on every backend.

Against the literal 2N×2N form with the self-similarities cut out (naive.py) and mmot.reference:
N = 1, odd D, several Rust tiles, reductions, dtypes, upstream gradients that differ per row,
gradcheck, opcheck, torch.compile, thread counts, non-finite and bad input.
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
from mmot.ops.nt_xent import nt_xent_op
from naive import materialized_nt_xent


def weighted(loss):
    """A per-row upstream gradient that differs per row (catches a gradient that mixes rows up)."""
    return (loss * (1.0 + 0.1 * torch.arange(loss.shape[0], dtype=loss.dtype))).sum()


@given(
    n=st.integers(1, 20),
    d=st.integers(1, 9),
    normalize=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_values_and_gradients_float64(n, d, normalize, seed):
    x, y = positive_pairs(n, d, seed)
    temperature = 0.1 if normalize else 4.0
    want = materialized_nt_xent(x, y, temperature, normalize)
    torch.testing.assert_close(reference.nt_xent(x, y, temperature, normalize), want.detach(), rtol=1e-10, atol=1e-10)
    want_grads = torch.autograd.grad(weighted(want), (x, y))
    for backend in NATIVE:
        got = mmot.nt_xent(x, y, temperature, normalize=normalize, reduction="none", backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        for g, w in zip(torch.autograd.grad(weighted(got), (x, y)), want_grads):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
        mean = mmot.nt_xent(x, y, temperature, normalize=normalize, backend=backend)
        torch.testing.assert_close(mean, want.mean(), rtol=1e-10, atol=1e-10)
        total = mmot.nt_xent(x, y, temperature, normalize=normalize, reduction="sum", backend=backend)
        torch.testing.assert_close(total, want.sum(), rtol=1e-10, atol=1e-10)


def test_one_pair_has_zero_loss(backend):
    x, y = positive_pairs(1, 4, 3)
    loss = mmot.nt_xent(x, y, 0.1, reduction="none", backend=backend)
    torch.testing.assert_close(loss.detach(), torch.zeros(2, dtype=loss.dtype), rtol=0, atol=1e-12)  # the partner is the only logit


def test_self_column_is_left_out_exactly(backend):
    """At a small τ a row's self-similarity (1/τ) would swamp the others: it must not enter."""
    x, y = positive_pairs(6, 5, 8)
    got = mmot.nt_xent(x, y, 0.01, reduction="none", backend=backend)
    torch.testing.assert_close(got, materialized_nt_xent(x, y, 0.01), rtol=1e-9, atol=1e-9)


def test_rust_several_tiles_float32():
    x, y = positive_pairs(300, 40, 4, torch.float32)  # 600 rows: three row tiles, diagonal and partner in different tiles
    got = mmot.nt_xent(x, y, 0.1, reduction="none", backend="rust")
    want = materialized_nt_xent(x.detach(), y.detach(), 0.1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(weighted(got), (x, y))
    x64, y64 = (t.detach().double().requires_grad_(True) for t in (x, y))
    want_grads = torch.autograd.grad(weighted(materialized_nt_xent(x64, y64, 0.1)), (x64, y64))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=2e-5 * float(w.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_accumulates_in_float32(native_backend, dtype):
    x, y = positive_pairs(40, 16, 5)
    want = materialized_nt_xent(x.detach(), y.detach(), 0.1).mean()
    got = mmot.nt_xent(x.detach().to(dtype), y.detach().to(dtype), 0.1, backend=native_backend)
    assert got.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_gradcheck(backend):
    x, y = positive_pairs(5, 3, 6)
    for normalize in (True, False):
        torch.autograd.gradcheck(
            lambda a, b, normalize=normalize: mmot.nt_xent(a, b, 0.3, normalize=normalize, reduction="none", backend=backend), (x, y)
        )


@pytest.mark.parametrize("normalize", [True, False])
def test_opcheck(native_backend, normalize):
    x, y = positive_pairs(6, 5, 9)
    torch.library.opcheck(nt_xent_op, (torch.cat([x, y]).detach().requires_grad_(True), 0.1, normalize, native_backend))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_with_changing_sizes(native_backend, dynamic):
    torch._dynamo.reset()

    def step(x, y):
        return mmot.nt_xent(x, y, 0.1, backend=native_backend) + mmot.nt_xent(x, y, 0.2, reduction="none", backend=native_backend).sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for n, d in ((8, 5), (11, 5), (6, 7)):
        x, y = positive_pairs(n, d, n)
        loss, want = compiled(x, y), step(x, y)
        torch.testing.assert_close(loss, want)
        for g, w in zip(torch.autograd.grad(loss, (x, y)), torch.autograd.grad(want, (x, y))):
            torch.testing.assert_close(g, w)


def test_rust_is_deterministic_across_thread_counts(tmp_path):
    script = (
        "import torch, mmot, sys; g = torch.Generator().manual_seed(1);"
        "x, y = (torch.randn(700, 40, generator=g, requires_grad=True) for _ in range(2));"
        "l = mmot.nt_xent(x, y, 0.1, backend='rust'); l.backward();"
        "torch.save((l.detach(), x.grad, y.grad), sys.argv[1])"
    )
    results = []
    for threads in ("1", "3"):
        path = tmp_path / f"threads-{threads}.pt"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=dict(os.environ, MMOT_NUM_THREADS=threads))
        results.append(torch.load(path))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_non_finite_input_is_rejected(backend):
    x, y = positive_pairs(4, 3, 1)
    bad = y.detach().clone()
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="mmot.nt_xent"):
        mmot.nt_xent(x, bad, 0.1, backend=backend)


@needs_triton
def test_triton_matches_rust_tiny():
    x, y = positive_pairs(9, 5, 21)
    got = mmot.nt_xent(x, y, 0.1, reduction="none", backend="triton")
    want = mmot.nt_xent(x, y, 0.1, reduction="none", backend="rust")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, w in zip(torch.autograd.grad(weighted(got), (x, y)), torch.autograd.grad(weighted(want), (x, y))):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


_x = torch.randn(4, 5)
test_bad_input = bad_input_test(
    "mmot.nt_xent",
    [
        (lambda: mmot.nt_xent("x", _x), TypeError, "'x'", "(N, D)"),
        (lambda: mmot.nt_xent(torch.randn(2, 4, 5), _x), ValueError, "'x'", "(N, D)"),
        (lambda: mmot.nt_xent(_x, torch.randn(3, 5)), ValueError, "'y'", "shape"),
        (lambda: mmot.nt_xent(_x, _x.double()), TypeError, "'y'", "dtype"),
        (lambda: mmot.nt_xent(_x, _x, 0.0), ValueError, "'temperature'", "positive"),
        (lambda: mmot.nt_xent(_x, _x, normalize=1), TypeError, "'normalize'", "bool"),
        (lambda: mmot.nt_xent(_x, _x, reduction="max"), ValueError, "'reduction'"),
        (lambda: mmot.nt_xent(_x, _x, backend="cuda"), ValueError, "'backend'"),
    ],
)
