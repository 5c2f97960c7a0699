"""mmot.feature_separation_loss and mmot.nn.FeatureSeparation on every backend.

Against mmot.reference and the literal N×N form (naive.py), dtypes, gradcheck, opcheck and
torch.compile, the Rust kernel's chunks and thread counts, the Triton kernels on tiny shapes
(one row split and several), empty and non-finite input, bad input, and the nn head.
"""

from __future__ import annotations

import os
import subprocess
import sys

import mmot
import pytest
import torch
from backends import ALL, NATIVE, needs_triton
from bad_input import bad_input_test
from hypothesis import given
from hypothesis import strategies as st
from mmot import reference
from mmot.ops.feature_separation import feature_separation_op
from naive import materialized_feature_separation


def features(n, ds, dh, seed, dtype=torch.float64):
    """(shared, specific) leaves, the specific features partly correlated with the shared ones
    (so that the loss is neither 0 nor at its maximum)."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, ds, generator=generator, dtype=torch.float64)
    mix = torch.randn(ds, dh, generator=generator, dtype=torch.float64) / max(ds, 1) ** 0.5
    specific = 0.5 * shared @ mix + torch.randn(n, dh, generator=generator, dtype=torch.float64)
    return shared.to(dtype).requires_grad_(True), specific.to(dtype).requires_grad_(True)


def grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


# ---------------------------------------------------------------- values and gradients


@given(
    n=st.integers(1, 30),
    ds=st.integers(1, 13),
    dh=st.integers(1, 13),
    normalize=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_values_and_gradients_float64(n, ds, dh, normalize, seed):
    shared, specific = features(n, ds, dh, seed)
    want = materialized_feature_separation(shared, specific, normalize)
    torch.testing.assert_close(reference.feature_separation_loss(shared, specific, normalize), want, rtol=1e-10, atol=1e-12)
    upstream = torch.tensor(1.7, dtype=torch.float64)
    want_grads = torch.autograd.grad(want, (shared, specific), upstream)
    for backend in NATIVE:
        got = mmot.feature_separation_loss(shared, specific, normalize=normalize, backend=backend)
        assert got.shape == () and got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for g, w in zip(torch.autograd.grad(got, (shared, specific), upstream), want_grads):
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)


def test_matches_reference_every_backend(backend):
    shared, specific = features(19, 7, 11, 1)
    for normalize in (True, False):
        got = mmot.feature_separation_loss(shared, specific, normalize=normalize, backend=backend)
        torch.testing.assert_close(got, reference.feature_separation_loss(shared, specific, normalize), rtol=1e-10, atol=1e-12)


def test_orthogonal_features_give_zero_and_identical_ones_the_maximum(backend):
    """Shared and specific features on disjoint samples (the others zero rows): every column of Ŝ
    is orthogonal to every column of Ĥ, C = 0. The same unit rows along one direction: every
    (ŝ_i·ŝ_j)(ĥ_i·ĥ_j) is 1, so L = 1."""
    shared = torch.zeros(6, 4, dtype=torch.float64)
    specific = torch.zeros(6, 5, dtype=torch.float64)
    shared[:3] = torch.randn(3, 4, dtype=torch.float64)
    specific[3:] = torch.randn(3, 5, dtype=torch.float64)
    assert mmot.feature_separation_loss(shared, specific, backend=backend).item() == 0.0
    same = torch.ones(6, 3, dtype=torch.float64)
    torch.testing.assert_close(mmot.feature_separation_loss(same, 2.0 * same, backend=backend).item(), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_dtypes(backend, dtype):
    shared, specific = features(40, 24, 9, 4, dtype)
    got = mmot.feature_separation_loss(shared, specific, backend=backend)
    assert got.dtype == dtype
    want = materialized_feature_separation(shared.detach().double(), specific.detach().double())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    for g in grads(got, shared, specific):
        assert g.dtype == dtype and bool(torch.isfinite(g.float()).all())


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck(native_backend, normalize):
    shared, specific = features(7, 5, 3, 5)
    assert torch.autograd.gradcheck(
        lambda s, h: mmot.feature_separation_loss(s, h, normalize=normalize, backend=native_backend), (shared, specific)
    )


def test_zero_rows_huge_rows_and_non_contiguous_inputs(backend):
    base_s, base_h = features(11, 14, 10, 7)
    shared, specific = base_s[:, ::2], base_h.T.contiguous().T[:, 1::2]
    assert not shared.is_contiguous() and not specific.is_contiguous()
    want = materialized_feature_separation(shared, specific)
    torch.testing.assert_close(mmot.feature_separation_loss(shared, specific, backend=backend), want)
    odd = shared.detach().clone()
    odd[3] = 0.0  # a zero row: the norm floor
    odd[4] *= 1e200  # a row whose sum of squares overflows: normalised scale-safe
    odd[5] *= 1e-200
    got = mmot.feature_separation_loss(odd.requires_grad_(True), specific, backend=backend)
    torch.testing.assert_close(got, reference.feature_separation_loss(odd, specific))
    assert all(bool(torch.isfinite(g).all()) for g in grads(got, odd, specific))


def test_empty_batch_and_empty_features(backend):
    for ds, dh in ((5, 3), (0, 3), (4, 0)):
        shared = torch.zeros(0, ds, dtype=torch.float64, requires_grad=True)
        specific = torch.zeros(0, dh, dtype=torch.float64, requires_grad=True)
        loss = mmot.feature_separation_loss(shared, specific, backend=backend)
        assert loss.shape == () and loss.item() == 0.0
        assert all(g.shape == x.shape for g, x in zip(grads(loss, shared, specific), (shared, specific)))
    shared, specific = features(5, 0, 3, 1)
    loss = mmot.feature_separation_loss(shared, specific, backend=backend)
    assert loss.item() == 0.0
    assert all(bool((g == 0).all()) for g in grads(loss, shared, specific))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy matmul
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("normalize", [True, False])
def test_non_finite_in_non_finite_out_with_checks_off(backend, bad, normalize):
    shared, specific = features(6, 4, 3, 8)
    poisoned = specific.detach().clone()
    poisoned[2, 1] = bad
    previous = mmot.set_checks(False)
    try:
        loss = mmot.feature_separation_loss(shared, poisoned, normalize=normalize, backend=backend)
    finally:
        mmot.set_checks(previous)
    assert not bool(torch.isfinite(loss))


# ---------------------------------------------------------------- torch.library and torch.compile


@pytest.mark.parametrize("normalize", [True, False])
def test_opcheck(native_backend, normalize):
    shared, specific = features(6, 5, 3, 9)
    torch.library.opcheck(feature_separation_op, (shared, specific, normalize, native_backend))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_with_changing_sizes(native_backend, dynamic):
    torch._dynamo.reset()

    def step(shared, specific):
        return mmot.feature_separation_loss(shared, specific, backend=native_backend) + mmot.feature_separation_loss(
            shared, specific, normalize=False, backend=native_backend
        )

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for n, ds, dh in ((8, 5, 3), (11, 5, 3), (6, 7, 9)):
        shared, specific = features(n, ds, dh, n)
        loss = compiled(shared, specific)
        want = step(shared, specific)
        torch.testing.assert_close(loss, want)
        for g, w in zip(grads(loss, shared, specific), grads(want, shared, specific)):
            torch.testing.assert_close(g, w)


# ---------------------------------------------------------------- Rust kernel: chunks, threads


@pytest.mark.parametrize("normalize", [True, False])
def test_rust_several_chunks_float64(normalize):
    """N = 9000 is 32 forward chunks of 282 rows (a ragged last one) and 36 backward blocks."""
    shared, specific = features(9000, 9, 6, 16)
    want = reference.feature_separation_loss(shared, specific, normalize)
    got = mmot.feature_separation_loss(shared, specific, normalize=normalize, backend="rust")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    for g, w in zip(grads(got, shared, specific), grads(want, shared, specific)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-15)


def test_rust_is_deterministic_across_thread_counts(tmp_path):
    script = (
        "import torch, mmot, sys; g = torch.Generator().manual_seed(1);"
        "s = torch.randn(5000, 40, generator=g, requires_grad=True);"
        "h = torch.randn(5000, 23, generator=g, requires_grad=True);"
        "l = mmot.feature_separation_loss(s, h, backend='rust'); l.backward();"
        "torch.save((l.detach(), s.grad, h.grad), sys.argv[1])"
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
@pytest.mark.parametrize("splits", [None, 3])
def test_triton_forward_and_backward(monkeypatch, dtype, normalize, splits):
    """37 rows, 21 shared and 18 specific features: three row steps, two Gram tiles each way
    and two contraction chunks (16 each under the interpreter); the rows in one split or three
    (partial Grams summed in order)."""
    from mmot.kernels import _common

    monkeypatch.setattr(_common, "FORCE_PROGRAMS_PER_PROBLEM", splits)
    shared, specific = features(37, 21, 18, 14, dtype)
    got = mmot.feature_separation_loss(shared, specific, normalize=normalize, backend="triton")
    want = mmot.feature_separation_loss(shared, specific, normalize=normalize, backend="torch")
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(got, want, **tol)
    for g, w in zip(grads(got, shared, specific), grads(want, shared, specific)):
        torch.testing.assert_close(g, w, **tol)


@needs_triton
@pytest.mark.parametrize("normalize", [True, False])
def test_triton_gradcheck(normalize):
    shared, specific = features(5, 3, 4, 15)
    assert torch.autograd.gradcheck(
        lambda s, h: mmot.feature_separation_loss(s, h, normalize=normalize, backend="triton"), (shared, specific)
    )


# ---------------------------------------------------------------- mmot.nn.FeatureSeparation


def test_module_shapes_gradients_and_state_dict():
    torch.manual_seed(0)
    head = mmot.nn.FeatureSeparation(8, 5)
    assert "dim=8, specific_dim=5" in repr(head)
    x = torch.randn(12, 8, requires_grad=True)
    shared = torch.randn(12, 6, requires_grad=True)
    specific = head(x)
    assert specific.shape == (12, 5)
    torch.testing.assert_close(specific, x @ head.proj.weight.T + head.proj.bias)
    loss = head.loss(shared, specific)
    torch.testing.assert_close(loss, mmot.feature_separation_loss(shared, specific))
    loss.backward()
    for p in (head.proj.weight, head.proj.bias, x, shared):
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and bool(p.grad.abs().sum() > 0)
    clone = mmot.nn.FeatureSeparation(8, 5)
    clone.load_state_dict(head.state_dict())
    assert set(head.state_dict()) == {"proj.weight", "proj.bias"}
    torch.testing.assert_close(clone(x), head(x))


def test_module_training_reduces_the_loss():
    torch.manual_seed(1)
    head = mmot.nn.FeatureSeparation(6, 4)
    x = torch.randn(64, 6)
    shared = x[:, :3] @ torch.randn(3, 5)  # the shared embedding lives in x's first 3 coordinates
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    first = head.loss(shared, head(x)).item()
    for _ in range(60):
        optimizer.zero_grad()
        loss = head.loss(shared, head(x))
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("backend", ALL)
def test_module_backend_and_normalize(backend):
    head = mmot.nn.FeatureSeparation(4, 3, normalize=False, backend=backend)
    x, shared = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    head = head.double()
    specific = head(x)
    torch.testing.assert_close(head.loss(shared, specific), reference.feature_separation_loss(shared, specific, False))


FS = "mmot.nn.FeatureSeparation"

test_module_bad_input_is_named = bad_input_test(
    FS,
    [
        (lambda: mmot.nn.FeatureSeparation(0, 3), ValueError, "'dim'"),
        (lambda: mmot.nn.FeatureSeparation(4.0, 3), TypeError, "'dim'", "int"),
        (lambda: mmot.nn.FeatureSeparation(4, 0), ValueError, "'specific_dim'"),
        (lambda: mmot.nn.FeatureSeparation(4, True), TypeError, "'specific_dim'", "int"),
        (lambda: mmot.nn.FeatureSeparation(4, 3, normalize=1), TypeError, "'normalize'", "bool"),
        (lambda: mmot.nn.FeatureSeparation(4, 3, backend="gpu"), ValueError, "'backend'"),
        (lambda: mmot.nn.FeatureSeparation(4, 3)(torch.randn(5, 3)), ValueError, "forward", "'x'", "(B, 4)"),
        (lambda: mmot.nn.FeatureSeparation(4, 3)(torch.randn(5)), ValueError, "forward", "'x'", "(B, 4)"),
        (lambda: mmot.nn.FeatureSeparation(4, 3)(torch.ones(5, 4, dtype=torch.long)), TypeError, "forward", "'x'", "floating"),
        (lambda: mmot.nn.FeatureSeparation(4, 3).loss(torch.randn(5, 2), torch.randn(5, 4)), ValueError, "loss", "'specific'", "(B, 3)"),
    ],
)


# ---------------------------------------------------------------- bad input

S = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
H = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
NAN = S.clone()
NAN[1, 2] = float("nan")
INF = H.clone()
INF[0, 0] = float("inf")


def separation(*args, **kwargs):
    return mmot.feature_separation_loss(*args, **kwargs)


test_bad_input_is_named = bad_input_test(
    "mmot.feature_separation_loss",
    [
        (lambda: separation(S.numpy(), H), TypeError, "'shared'", "torch.Tensor"),
        (lambda: separation(S, H.tolist()), TypeError, "'specific'", "torch.Tensor"),
        (lambda: separation(S.long(), H.long()), TypeError, "'shared'", "floating"),
        (lambda: separation(S, H.int()), TypeError, "'specific'", "floating"),
        (lambda: separation(S[0], H), ValueError, "'shared'", "(N, D_s)"),
        (lambda: separation(S[None], H), ValueError, "'shared'", "(N, D_s)"),
        (lambda: separation(S, H[0]), ValueError, "'specific'", "(N, D_h)"),
        (lambda: separation(S, H[None]), ValueError, "'specific'", "(N, D_h)"),
        (lambda: separation(S, H[:5]), ValueError, "'specific'", "rows"),
        (lambda: separation(S, H.float()), TypeError, "'specific'", "dtype"),
        (lambda: separation(S, H.to("meta")), ValueError, "'specific'", "device"),
        (lambda: separation(S, H, normalize=1), TypeError, "'normalize'", "bool"),
        (lambda: separation(NAN, H), ValueError, "'shared'", "finite"),
        (lambda: separation(NAN, H, backend="torch"), ValueError, "'shared'", "finite"),
        (lambda: separation(S, INF, backend="rust"), ValueError, "'specific'", "finite"),
        (lambda: separation(S, INF, normalize=False, backend="rust"), ValueError, "'specific'", "finite"),
        (lambda: separation(S, INF, backend="torch"), ValueError, "'specific'", "finite"),
        (lambda: separation(S, H, backend="gpu"), ValueError, "'backend'"),
        (lambda: separation(S.to("meta"), H.to("meta"), backend="rust"), ValueError, "backend 'rust'", "CPU"),
    ],
)
