"""mmot.info_nce on every backend.

Against mmot.reference and the materialised F.cross_entropy form (naive.py), masks and
reductions, the Rust kernel's tiles, thread counts and memory, the Triton kernel on tiny
shapes, and its bad input.
"""

from __future__ import annotations

import os
import subprocess
import sys

import mmot
import pytest
import torch
import torch.nn.functional as F
from backends import NATIVE, needs_triton
from bad_input import bad_input_test
from hypothesis import given
from hypothesis import strategies as st
from inputs import positive_pairs
from mmot import reference
from naive import cross_entropy_info_nce


def grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


# ---------------------------------------------------------------- values and gradients


@given(
    n=st.integers(1, 40),
    d=st.integers(1, 19),
    temperature=st.floats(0.02, 2.0),
    symmetric=st.booleans(),
    normalize=st.booleans(),
    drop=st.floats(0.0, 0.8),
    seed=st.integers(0, 2**31 - 1),
)
def test_values_and_gradients_float64(n, d, temperature, symmetric, normalize, drop, seed):
    a, b = positive_pairs(n, d, seed)
    valid = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1)) >= drop
    want = cross_entropy_info_nce(a, b, temperature, valid, symmetric, normalize)
    want_grads = grads(want, a, b)
    spec = reference.info_nce(a, b, valid, temperature, symmetric, normalize)
    spec_mean = spec.sum() / valid.sum().clamp_min(1)
    torch.testing.assert_close(spec_mean, want, rtol=1e-10, atol=1e-10)
    spec_grads = grads(spec_mean, a, b)
    for backend in NATIVE:
        got = mmot.info_nce(a, b, temperature, symmetric=symmetric, normalize=normalize, valid=valid, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        for g, w, s in zip(grads(got, a, b), want_grads, spec_grads):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(g, s, rtol=1e-9, atol=1e-11)


def test_reductions_and_per_pair_losses(backend):
    a, b = positive_pairs(37, 11, 3)
    valid = torch.arange(37) % 5 != 2
    none = mmot.info_nce(a, b, 0.1, valid=valid, reduction="none", backend=backend)
    assert none.shape == (37,) and bool((none[~valid] == 0).all())
    total = mmot.info_nce(a, b, 0.1, valid=valid, reduction="sum", backend=backend)
    mean = mmot.info_nce(a, b, 0.1, valid=valid, backend=backend)
    torch.testing.assert_close(total, none.sum())
    torch.testing.assert_close(mean, none.sum() / valid.sum())
    torch.testing.assert_close(mean, cross_entropy_info_nce(a, b, 0.1, valid))


def test_no_valid_pair_gives_zero_loss_and_zero_gradient(backend):
    a, b = positive_pairs(6, 4, 4)
    loss = mmot.info_nce(a, b, valid=torch.zeros(6, dtype=torch.bool), backend=backend)
    assert loss.item() == 0.0
    ga, gb = grads(loss, a, b)
    assert bool((ga == 0).all()) and bool((gb == 0).all())


def test_invalid_rows_get_zero_gradient_and_do_not_change_the_rest(backend):
    a, b = positive_pairs(20, 8, 5)
    valid = torch.ones(20, dtype=torch.bool)
    valid[[0, 7, 19]] = False
    loss = mmot.info_nce(a, b, 0.07, valid=valid, backend=backend)
    ga, gb = grads(loss, a, b)
    assert bool((ga[~valid] == 0).all()) and bool((gb[~valid] == 0).all())
    sub_a, sub_b = a.detach()[valid].requires_grad_(True), b.detach()[valid].requires_grad_(True)
    sub = mmot.info_nce(sub_a, sub_b, 0.07, backend=backend)
    torch.testing.assert_close(loss, sub)
    sa, sb = grads(sub, sub_a, sub_b)
    torch.testing.assert_close(ga[valid], sa)
    torch.testing.assert_close(gb[valid], sb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_dtypes(backend, dtype):
    a, b = positive_pairs(50, 24, 6, dtype)
    got = mmot.info_nce(a, b, 0.05, backend=backend)
    assert got.dtype == dtype
    want = cross_entropy_info_nce(a.detach().double(), b.detach().double(), 0.05)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    ga, gb = grads(got, a, b)
    assert ga.dtype == dtype and bool(torch.isfinite(ga.float()).all())


@pytest.mark.parametrize("symmetric", [True, False])
def test_gradcheck(native_backend, symmetric):
    a, b = positive_pairs(9, 5, 7)
    valid = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda x, y: mmot.info_nce(x, y, 0.3, symmetric=symmetric, valid=valid, reduction="none", backend=native_backend), (a, b)
    )


def test_small_temperature_and_zero_rows_stay_finite(backend):
    a, b = positive_pairs(30, 6, 8)
    with torch.no_grad():
        a[3] = 0.0  # a zero row: cosine 0 with everything, as F.normalize makes it
    loss = mmot.info_nce(a, b, 1e-3, backend=backend)
    want = cross_entropy_info_nce(a, b, 1e-3)
    torch.testing.assert_close(loss, want)
    for g, w in zip(grads(loss, a, b), grads(want, a, b)):
        assert bool(torch.isfinite(g).all())
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9)


def test_non_contiguous_inputs(backend):
    base_a, base_b = positive_pairs(16, 20, 9)
    a, b = base_a[:, ::2], base_b.T.contiguous().T[:, 1::2]
    assert not a.is_contiguous() and not b.is_contiguous()
    torch.testing.assert_close(mmot.info_nce(a, b, 0.2, backend=backend), cross_entropy_info_nce(a, b, 0.2))


def test_empty_batch(backend):
    a = torch.zeros(0, 5, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(0, 5, dtype=torch.float64, requires_grad=True)
    loss = mmot.info_nce(a, b, backend=backend)
    assert loss.item() == 0.0
    assert mmot.info_nce(a, b, reduction="none", backend=backend).shape == (0,)


def test_matches_everything_at_once_normsoftmax(backend):
    """everything_at_once's NormSoftmaxLoss: logits on normalised rows, log_softmax both ways, diagonal mean, summed."""
    a, b = positive_pairs(25, 12, 11)
    x = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / 0.05
    want = -torch.diag(F.log_softmax(x, dim=1)).mean() - torch.diag(F.log_softmax(x.T, dim=1)).mean()
    torch.testing.assert_close(mmot.info_nce(a, b, 0.05, backend=backend), want)


# ---------------------------------------------------------------- Rust kernel: tiles, threads, memory


@pytest.mark.parametrize("symmetric,normalize", [(True, True), (False, True), (True, False)])
def test_rust_several_tiles_with_masks_float64(symmetric, normalize):
    """N = 777 spans four 256-row tiles (a ragged last one): the wavefront backward and the forward's
    per-block column partials, with masked rows on and next to tile edges."""
    a, b = positive_pairs(777, 9, 16)
    valid = torch.ones(777, dtype=torch.bool)
    valid[[0, 255, 256, 300, 511, 700, 776]] = False
    want = cross_entropy_info_nce(a, b, 0.07, valid, symmetric, normalize)
    got = mmot.info_nce(a, b, 0.07, symmetric=symmetric, normalize=normalize, valid=valid, backend="rust")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, w in zip(grads(got, a, b), grads(want, a, b)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def results_per_thread_count(script, thread_counts, tmp_path):
    """(loss, grad a, grad b) of ``script`` run in a fresh process under each MMOT_NUM_THREADS."""
    results = []
    for threads in thread_counts:
        path = tmp_path / f"threads-{threads}.pt"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=dict(os.environ, MMOT_NUM_THREADS=threads))
        results.append(torch.load(path))
    return results


def test_rust_is_deterministic_across_thread_counts(tmp_path):
    script = (
        "import torch, mmot, sys; g = torch.Generator().manual_seed(0);"
        "a = torch.randn(300, 33, generator=g, requires_grad=True); b = torch.randn(300, 33, generator=g, requires_grad=True);"
        "l = mmot.info_nce(a, b, backend='rust'); l.backward();"
        "torch.save((l.detach(), a.grad, b.grad), sys.argv[1])"
    )
    first, second = results_per_thread_count(script, ("1", "2"), tmp_path)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_rust_is_deterministic_across_thread_counts_several_tiles(tmp_path):
    script = (
        "import torch, mmot, sys; g = torch.Generator().manual_seed(1);"
        "a = torch.randn(900, 40, generator=g, requires_grad=True); b = torch.randn(900, 40, generator=g, requires_grad=True);"
        "v = torch.arange(900) % 13 != 5;"
        "l = mmot.info_nce(a, b, valid=v, backend='rust'); l.backward();"
        "torch.save((l.detach(), a.grad, b.grad), sys.argv[1])"
    )
    results = results_per_thread_count(script, ("1", "3", "4"), tmp_path)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)


PEAK_RSS_CHILD = r"""
import resource, sys
import torch, mmot

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

n, d = 16384, 64
g = torch.Generator().manual_seed(0)
a = torch.randn(n, d, generator=g, requires_grad=True)
b = torch.randn(n, d, generator=g, requires_grad=True)
# Warm up every code path on a small problem, so that only the big call's memory is measured.
small = mmot.info_nce(a[:256].detach().requires_grad_(True), b[:256].detach().requires_grad_(True), backend="rust")
small.backward()
before = peak_mib()
loss = mmot.info_nce(a, b, 0.05, backend="rust")
loss.backward()
after = peak_mib()
assert torch.isfinite(loss) and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
print(f"{after - before:.1f}")
"""


@pytest.mark.slow
def test_rust_peak_rss_far_below_the_logits():
    """The N×N logits are never materialised: peak RSS at N=M=16384, D=64 stays far below 1 GiB."""
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD], capture_output=True, text=True, timeout=900, check=True)
    increase_mib = float(result.stdout.strip().splitlines()[-1])
    logits_mib = 16384 * 16384 * 4 / 2**20  # 1024 MiB of float32 logits
    # Inputs' gradients (2 × 4 MiB) and O(N) vectors are all the call may add.
    assert increase_mib < 64, f"peak RSS rose by {increase_mib:.1f} MiB (the logits alone would be {logits_mib:.0f} MiB)"


# ---------------------------------------------------------------- Triton interpreter, tiny shapes


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("symmetric,normalize", [(True, True), (False, True), (True, False)])
def test_triton_forward_and_backward(dtype, symmetric, normalize):
    """21 rows and 37 features: two row tiles, and three feature chunks in both the products and
    the backward's output split (16 each under the interpreter)."""
    a, b = positive_pairs(21, 37, 14, dtype)
    valid = torch.arange(21) % 6 != 1
    temperature = 0.1 if normalize else 5.0  # raw products of 37 features: logits of a similar size
    got = mmot.info_nce(a, b, temperature, symmetric=symmetric, normalize=normalize, valid=valid, backend="triton")
    want = mmot.info_nce(a, b, temperature, symmetric=symmetric, normalize=normalize, valid=valid, backend="torch")
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    for g, w in zip(grads(got, a, b), grads(want, a, b)):
        torch.testing.assert_close(g, w, **tol)
    rust = mmot.info_nce(a, b, temperature, symmetric=symmetric, normalize=normalize, valid=valid, backend="rust")
    torch.testing.assert_close(got, rust, **tol)


@needs_triton
def test_triton_per_pair_losses_and_empty_mask():
    a, b = positive_pairs(5, 3, 15)
    none = mmot.info_nce(a, b, 0.5, reduction="none", backend="triton")
    torch.testing.assert_close(none, reference.info_nce(a, b, torch.ones(5, dtype=torch.bool), 0.5))
    zero = mmot.info_nce(a, b, valid=torch.zeros(5, dtype=torch.bool), backend="triton")
    assert zero.item() == 0.0
    assert all(bool((g == 0).all()) for g in grads(zero, a, b))


# ---------------------------------------------------------------- bad input

A = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
NAN = A.clone()
NAN[1, 2] = float("nan")

test_bad_input_is_named = bad_input_test(
    "mmot.info_nce",
    [
        (lambda: mmot.info_nce(A.numpy(), A), TypeError, "'a'", "torch.Tensor"),
        (lambda: mmot.info_nce(A.long(), A.long()), TypeError, "'a'", "floating"),
        (lambda: mmot.info_nce(A[0], A[0]), ValueError, "'a'", "(N, D)"),
        (lambda: mmot.info_nce(A[None], A[None]), ValueError, "'a'", "(N, D)"),
        (lambda: mmot.info_nce(A, A[None]), ValueError, "'b'", "(N, D)"),
        (lambda: mmot.info_nce(A, A[:5]), ValueError, "'b'", "shape"),
        (lambda: mmot.info_nce(A, A[:, :3]), ValueError, "'b'", "shape"),
        (lambda: mmot.info_nce(A, A.float()), TypeError, "'b'", "dtype"),
        (lambda: mmot.info_nce(A, A.to("meta")), ValueError, "'b'", "device"),
        (lambda: mmot.info_nce(A, A, 0.0), ValueError, "'temperature'", "positive"),
        (lambda: mmot.info_nce(A, A, -1.0), ValueError, "'temperature'"),
        (lambda: mmot.info_nce(A, A, float("inf")), ValueError, "'temperature'"),
        (lambda: mmot.info_nce(A, A, "0.1"), TypeError, "'temperature'"),
        (lambda: mmot.info_nce(A, A, symmetric=1), TypeError, "'symmetric'", "bool"),
        (lambda: mmot.info_nce(A, A, normalize="yes"), TypeError, "'normalize'", "bool"),
        (lambda: mmot.info_nce(A, A, reduction="avg"), ValueError, "'reduction'", "mean"),
        (lambda: mmot.info_nce(A, A, valid=[True] * 6), TypeError, "'valid'", "bool tensor"),
        (lambda: mmot.info_nce(A, A, valid=torch.ones(6)), TypeError, "'valid'", "bool"),
        (lambda: mmot.info_nce(A, A, valid=torch.ones(5, dtype=torch.bool)), ValueError, "'valid'", "(6,)"),
        (lambda: mmot.info_nce(A, A, valid=torch.ones(6, dtype=torch.bool, device="meta")), ValueError, "'valid'", "device"),
        (lambda: mmot.info_nce(NAN, A), ValueError, "'a'", "finite"),
        (lambda: mmot.info_nce(A, NAN, backend="torch"), ValueError, "'b'", "finite"),
        (lambda: mmot.info_nce(A, NAN, backend="rust"), ValueError, "'b'", "finite"),
        (lambda: mmot.info_nce(A, A * float("inf"), normalize=False, backend="rust"), ValueError, "'b'", "finite"),
        (lambda: mmot.info_nce(A, A, backend="gpu"), ValueError, "'backend'"),
        (lambda: mmot.info_nce(A.to("meta"), A.to("meta"), backend="rust"), ValueError, "backend 'rust'", "CPU"),
    ],
)
