"""mmot.info_nce against the reference and an independent materialised F.cross_entropy form."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import mmot
from mmot import reference
from mmot.ops.info_nce import info_nce_op

BACKENDS = ["rust", "torch"]


def materialized(a, b, temperature, valid=None, symmetric=True, normalize=True):
    """The textbook form: drop invalid pairs, build the logits, cross-entropy against the diagonal."""
    if valid is not None:
        a, b = a[valid], b[valid]
    if a.shape[0] == 0:
        return (a.sum() + b.sum()) * 0.0
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.T / temperature
    labels = torch.arange(a.shape[0])
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = loss + F.cross_entropy(logits.T, labels)
    return loss


def pair(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    b = (a.double() + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)
    return a.requires_grad_(True), b.requires_grad_(True)


def grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


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
    a, b = pair(n, d, seed)
    valid = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1)) >= drop
    want = materialized(a, b, temperature, valid, symmetric, normalize)
    want_grads = grads(want, a, b)
    spec = reference.info_nce(a, b, valid, temperature, symmetric, normalize)
    spec_mean = spec.sum() / valid.sum().clamp_min(1)
    torch.testing.assert_close(spec_mean, want, rtol=1e-10, atol=1e-10)
    spec_grads = grads(spec_mean, a, b)
    for backend in BACKENDS:
        got = mmot.info_nce(a, b, temperature, symmetric=symmetric, normalize=normalize, valid=valid, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        for g, w, s in zip(grads(got, a, b), want_grads, spec_grads):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(g, s, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_and_per_pair_losses(backend):
    a, b = pair(37, 11, 3)
    valid = torch.arange(37) % 5 != 2
    none = mmot.info_nce(a, b, 0.1, valid=valid, reduction="none", backend=backend)
    assert none.shape == (37,) and bool((none[~valid] == 0).all())
    total = mmot.info_nce(a, b, 0.1, valid=valid, reduction="sum", backend=backend)
    mean = mmot.info_nce(a, b, 0.1, valid=valid, backend=backend)
    torch.testing.assert_close(total, none.sum())
    torch.testing.assert_close(mean, none.sum() / valid.sum())
    torch.testing.assert_close(mean, materialized(a, b, 0.1, valid))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_valid_pair_gives_zero_loss_and_zero_gradient(backend):
    a, b = pair(6, 4, 4)
    loss = mmot.info_nce(a, b, valid=torch.zeros(6, dtype=torch.bool), backend=backend)
    assert loss.item() == 0.0
    ga, gb = grads(loss, a, b)
    assert bool((ga == 0).all()) and bool((gb == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_rows_get_zero_gradient_and_do_not_change_the_rest(backend):
    a, b = pair(20, 8, 5)
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
def test_low_precision_dtypes(dtype):
    a, b = pair(50, 24, 6, dtype)
    got = mmot.info_nce(a, b, 0.05, backend="rust")
    assert got.dtype == dtype
    want = materialized(a.detach().double(), b.detach().double(), 0.05)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    ga, gb = grads(got, a, b)
    assert ga.dtype == dtype and bool(torch.isfinite(ga.float()).all())


def test_gradcheck_rust():
    a, b = pair(9, 5, 7)
    valid = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    for symmetric in (True, False):
        torch.autograd.gradcheck(
            lambda x, y: mmot.info_nce(x, y, 0.3, symmetric=symmetric, valid=valid, reduction="none", backend="rust"), (a, b)
        )


def test_small_temperature_and_zero_rows_stay_finite(backend):
    a, b = pair(30, 6, 8)
    with torch.no_grad():
        a[3] = 0.0  # a zero row: cosine 0 with everything, as F.normalize makes it
    loss = mmot.info_nce(a, b, 1e-3, backend=backend)
    want = materialized(a, b, 1e-3)
    torch.testing.assert_close(loss, want)
    for g, w in zip(grads(loss, a, b), grads(want, a, b)):
        assert bool(torch.isfinite(g).all())
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9)


def test_non_contiguous_inputs(backend):
    base_a, base_b = pair(16, 20, 9)
    a, b = base_a[:, ::2], base_b.T.contiguous().T[:, 1::2]
    assert not a.is_contiguous() and not b.is_contiguous()
    torch.testing.assert_close(mmot.info_nce(a, b, 0.2, backend=backend), materialized(a, b, 0.2))


def test_empty_batch(backend):
    a = torch.zeros(0, 5, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(0, 5, dtype=torch.float64, requires_grad=True)
    loss = mmot.info_nce(a, b, backend=backend)
    assert loss.item() == 0.0
    assert mmot.info_nce(a, b, reduction="none", backend=backend).shape == (0,)


def test_rust_is_deterministic_across_thread_counts():
    a, b = pair(300, 33, 10, torch.float32)
    script = (
        "import torch, mmot, sys; g = torch.Generator().manual_seed(0);"
        "a = torch.randn(300, 33, generator=g, requires_grad=True); b = torch.randn(300, 33, generator=g, requires_grad=True);"
        "l = mmot.info_nce(a, b, backend='rust'); l.backward();"
        "torch.save((l.detach(), a.grad, b.grad), sys.argv[1])"
    )
    results = []
    for threads, path in (("1", "/tmp/mmot_nce_t1.pt"), ("2", "/tmp/mmot_nce_t2.pt")):
        env = dict(os.environ, MMOT_NUM_THREADS=threads)
        subprocess.run([sys.executable, "-c", script, path], check=True, env=env)
        results.append(torch.load(path))
    for x, y in zip(*results):
        assert torch.equal(x, y)


@pytest.mark.parametrize("symmetric,normalize", [(True, True), (False, True), (True, False)])
def test_rust_several_tiles_with_masks_float64(symmetric, normalize):
    """N = 777 spans four 256-row tiles (a ragged last one): the wavefront backward and the forward's
    per-block column partials, with masked rows on and next to tile edges."""
    a, b = pair(777, 9, 16)
    valid = torch.ones(777, dtype=torch.bool)
    valid[[0, 255, 256, 300, 511, 700, 776]] = False
    want = materialized(a, b, 0.07, valid, symmetric, normalize)
    got = mmot.info_nce(a, b, 0.07, symmetric=symmetric, normalize=normalize, valid=valid, backend="rust")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, w in zip(grads(got, a, b), grads(want, a, b)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_rust_is_deterministic_across_thread_counts_several_tiles():
    script = (
        "import torch, mmot, sys; g = torch.Generator().manual_seed(1);"
        "a = torch.randn(900, 40, generator=g, requires_grad=True); b = torch.randn(900, 40, generator=g, requires_grad=True);"
        "v = torch.arange(900) % 13 != 5;"
        "l = mmot.info_nce(a, b, valid=v, backend='rust'); l.backward();"
        "torch.save((l.detach(), a.grad, b.grad), sys.argv[1])"
    )
    results = []
    for threads in ("1", "3", "4"):
        path = f"/tmp/mmot_nce_tiles_t{threads}.pt"
        env = dict(os.environ, MMOT_NUM_THREADS=threads)
        subprocess.run([sys.executable, "-c", script, path], check=True, env=env)
        results.append(torch.load(path))
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)


def test_matches_everything_at_once_normsoftmax():
    """everything_at_once's NormSoftmaxLoss: logits on normalised rows, log_softmax both ways, diagonal mean, summed."""
    a, b = pair(25, 12, 11)
    x = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / 0.05
    want = -torch.diag(F.log_softmax(x, dim=1)).mean() - torch.diag(F.log_softmax(x.T, dim=1)).mean()
    torch.testing.assert_close(mmot.info_nce(a, b, 0.05), want)


def test_opcheck(backend):
    a, b = pair(7, 5, 12)
    weights = torch.tensor([1, 1, 0, 1, 1, 1, 1], dtype=torch.float64)
    torch.library.opcheck(info_nce_op, (a, b, weights, 0.2, True, True, backend))
    torch.library.opcheck(info_nce_op, (a, b, weights, 0.5, False, False, backend))


def test_compile_fullgraph(backend):
    torch._dynamo.reset()

    def step(a, b, valid):
        return mmot.info_nce(a, b, 0.1, valid=valid, backend=backend) + mmot.info_nce(a, b, symmetric=False, backend=backend)

    a, b = pair(12, 6, 13)
    valid = torch.arange(12) % 4 != 0
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(a, b, valid)
    got = grads(loss, a, b)
    want_loss = step(a, b, valid)
    torch.testing.assert_close(loss, want_loss)
    for g, w in zip(got, grads(want_loss, a, b)):
        torch.testing.assert_close(g, w)


A = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
NAN = A.clone()
NAN[1, 2] = float("nan")

BAD = [
    (lambda: mmot.info_nce(A.numpy(), A), TypeError, ["mmot.info_nce", "'a'", "torch.Tensor"]),
    (lambda: mmot.info_nce(A.long(), A.long()), TypeError, ["mmot.info_nce", "'a'", "floating"]),
    (lambda: mmot.info_nce(A[0], A[0]), ValueError, ["mmot.info_nce", "'a'", "(N, D)"]),
    (lambda: mmot.info_nce(A[None], A[None]), ValueError, ["'a'", "(N, D)"]),
    (lambda: mmot.info_nce(A, A[None]), ValueError, ["'b'", "(N, D)"]),
    (lambda: mmot.info_nce(A, A[:5]), ValueError, ["mmot.info_nce", "'b'", "shape"]),
    (lambda: mmot.info_nce(A, A[:, :3]), ValueError, ["'b'", "shape"]),
    (lambda: mmot.info_nce(A, A.float()), TypeError, ["'b'", "dtype"]),
    (lambda: mmot.info_nce(A, A.to("meta")), ValueError, ["'b'", "device"]),
    (lambda: mmot.info_nce(A, A, 0.0), ValueError, ["'temperature'", "positive"]),
    (lambda: mmot.info_nce(A, A, -1.0), ValueError, ["'temperature'"]),
    (lambda: mmot.info_nce(A, A, float("inf")), ValueError, ["'temperature'"]),
    (lambda: mmot.info_nce(A, A, "0.1"), TypeError, ["'temperature'"]),
    (lambda: mmot.info_nce(A, A, symmetric=1), TypeError, ["'symmetric'", "bool"]),
    (lambda: mmot.info_nce(A, A, normalize="yes"), TypeError, ["'normalize'", "bool"]),
    (lambda: mmot.info_nce(A, A, reduction="avg"), ValueError, ["'reduction'", "mean"]),
    (lambda: mmot.info_nce(A, A, valid=[True] * 6), TypeError, ["'valid'", "bool tensor"]),
    (lambda: mmot.info_nce(A, A, valid=torch.ones(6)), TypeError, ["'valid'", "bool"]),
    (lambda: mmot.info_nce(A, A, valid=torch.ones(5, dtype=torch.bool)), ValueError, ["'valid'", "(6,)"]),
    (lambda: mmot.info_nce(A, A, valid=torch.ones(6, dtype=torch.bool, device="meta")), ValueError, ["'valid'", "device"]),
    (lambda: mmot.info_nce(NAN, A), ValueError, ["mmot.info_nce", "'a'", "finite"]),
    (lambda: mmot.info_nce(A, NAN, backend="torch"), ValueError, ["'b'", "finite"]),
    (lambda: mmot.info_nce(A, NAN, backend="rust"), ValueError, ["mmot.info_nce", "'b'", "finite"]),
    (lambda: mmot.info_nce(A, A * float("inf"), normalize=False, backend="rust"), ValueError, ["'b'", "finite"]),
    (lambda: mmot.info_nce(A, A, backend="gpu"), ValueError, ["'backend'"]),
    (lambda: mmot.info_nce(A.to("meta"), A.to("meta"), backend="rust"), ValueError, ["'rust'", "CPU"]),
]


@pytest.mark.parametrize("index", range(len(BAD)))
def test_bad_input_is_named(index):
    call, error, words = BAD[index]
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


# --- Triton through the interpreter (TRITON_INTERPRET=1, set in conftest): tiny shapes only.

triton = pytest.importorskip("triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("symmetric,normalize", [(True, True), (False, True), (True, False)])
def test_triton_forward_and_backward(dtype, symmetric, normalize):
    a, b = pair(21, 9, 14, dtype)
    valid = torch.arange(21) % 6 != 1
    got = mmot.info_nce(a, b, 0.1, symmetric=symmetric, normalize=normalize, valid=valid, backend="triton")
    want = mmot.info_nce(a, b, 0.1, symmetric=symmetric, normalize=normalize, valid=valid, backend="torch")
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    for g, w in zip(grads(got, a, b), grads(want, a, b)):
        torch.testing.assert_close(g, w, **tol)
    rust = mmot.info_nce(a, b, 0.1, symmetric=symmetric, normalize=normalize, valid=valid, backend="rust")
    torch.testing.assert_close(got, rust, **tol)


def test_triton_per_pair_losses_and_empty_mask():
    a, b = pair(5, 3, 15)
    none = mmot.info_nce(a, b, 0.5, reduction="none", backend="triton")
    torch.testing.assert_close(none, reference.info_nce(a, b, torch.ones(5, dtype=torch.bool), 0.5))
    zero = mmot.info_nce(a, b, valid=torch.zeros(5, dtype=torch.bool), backend="triton")
    assert zero.item() == 0.0
    assert all(bool((g == 0).all()) for g in grads(zero, a, b))
