"""mmot.geometric_consistency on every backend.

Against mmot.reference and the literal N×N matrices (naive.py), reductions and dtypes, the
cancellation as b → a, gradcheck, opcheck and torch.compile, the Rust kernel's chunks, parts and
thread counts, the Triton kernel on tiny shapes, non-finite input, and bad input.
"""

from __future__ import annotations

import math
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
from mmot.ops.geometric_consistency import geometric_consistency_op
from naive import materialized_geometric_consistency


def grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


def close_pairs(n, d, noise, seed, dtype=torch.float32):
    """(a, b) leaves with b = a + noise·(standard normal): nearly consistent modalities."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=generator, dtype=torch.float64)
    b = a + noise * torch.randn(n, d, generator=generator, dtype=torch.float64)
    return a.to(dtype).requires_grad_(True), b.to(dtype).requires_grad_(True)


# ---------------------------------------------------------------- values and gradients


@given(
    n=st.integers(1, 30),
    d=st.integers(0, 6).map(lambda k: 2 * k + 1),
    normalize=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_values_and_gradients_float64(n, d, normalize, seed):
    a, b = positive_pairs(n, d, seed)
    want = materialized_geometric_consistency(a, b, normalize)
    spec = reference.geometric_consistency(a, b, normalize, reduction="none")
    torch.testing.assert_close(spec, want, rtol=1e-9, atol=1e-12)
    upstream = torch.randn(2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    want_grads = torch.autograd.grad(want, (a, b), upstream)
    for backend in NATIVE:
        got = mmot.geometric_consistency(a, b, normalize=normalize, reduction="none", backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        for g, w in zip(torch.autograd.grad(got, (a, b), upstream), want_grads):
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


def test_reductions(backend):
    a, b = positive_pairs(19, 7, 1)
    none = mmot.geometric_consistency(a, b, reduction="none", backend=backend)
    assert none.shape == (2,)
    torch.testing.assert_close(none, materialized_geometric_consistency(a, b))
    torch.testing.assert_close(mmot.geometric_consistency(a, b, backend=backend), none.sum())
    torch.testing.assert_close(mmot.geometric_consistency(a, b, reduction="sum", backend=backend), 19 * 19 * none.sum())
    for reduction in ("mean", "sum", "none"):
        spec = reference.geometric_consistency(a, b, reduction=reduction)
        torch.testing.assert_close(mmot.geometric_consistency(a, b, reduction=reduction, backend=backend), spec, rtol=1e-12, atol=0)


def test_identical_inputs_give_zero(backend):
    """a = b: ê = 0, so every Gram but x̂ᵀx̂ is exactly 0 and so are the terms and gradients."""
    a, _ = positive_pairs(9, 5, 2)
    b = a.detach().clone().requires_grad_(True)
    loss = mmot.geometric_consistency(a, b, backend=backend)
    assert loss.item() == 0.0
    assert all(bool((g == 0).all()) for g in grads(loss, a, b))


def plain_form(a, b, normalize):
    """The means from 2⟨A, B⟩ − 2tr(C²) and ‖A‖² − 2‖C‖² + ‖B‖² (B = ŷᵀŷ, C = x̂ᵀŷ) in a's dtype:
    the cancelling form the kernels avoid."""
    x, y = a.detach(), b.detach()
    if normalize:
        x, y = reference.unit_rows(x), reference.unit_rows(y)
    big_a, big_b, c = x.T @ x, y.T @ y, x.T @ y
    sums = torch.stack((2 * (big_a * big_b).sum() - 2 * (c * c.T).sum(), (big_a * big_a).sum() - 2 * (c * c).sum() + (big_b * big_b).sum()))
    return sums.double() / x.shape[0] ** 2


@pytest.mark.parametrize("normalize", [True, False])
def test_cancellation_as_b_approaches_a(backend, normalize):
    """b = a + δ·noise in float32 against the N×N form in float64, at δ from 1e-1 to 1e-4.

    Error bound, to first order, with rounding errors adding in quadrature (√n·u for n rounded
    terms, Higham's rule of thumb, rather than the worst case n·u); u = 2⁻²⁴, x̂ and ê = ŷ − x̂ the
    exact unit rows and differences, N rows, D features:

    * every product the kernels sum (a Gram entry: N of them, a scalar ⟨A, G⟩, tr F², ‖G‖², ⟨F, G⟩:
      D² Gram products) is of the size of the loss, so accumulating them costs a relative
      √(N + D²)·u;
    * ê is formed from rounded unit rows, each entry off by about √D·u relative to its row (the
      norm's sum of D squares; exact without ``normalize``), so ‖Δê‖_F ≲ √D·u·‖x̂‖_F, and as the
      terms are quadratic in ê that costs a relative 2‖Δê‖_F/‖ê‖_F ≲ 2√D·u·‖x̂‖_F/‖ê‖_F.

    Tolerance: 4u·(√(N + D²) + 2√D·‖x̂‖_F/‖ê‖_F) relative, per term. The plain form
    (:func:`plain_form`), whose O(N²) terms cancel, is off by about u·N²/(loss·N²) ∝ u/δ² relative:
    the test checks that it fails this tolerance for δ ≤ 1e-3, so the tolerance does tell them apart.
    """
    n, d = 40, 24
    u = 2.0**-24
    for noise in (1e-1, 1e-2, 1e-3, 1e-4):
        a, b = close_pairs(n, d, noise, 3)
        want = materialized_geometric_consistency(a.detach().double(), b.detach().double(), normalize)
        got = mmot.geometric_consistency(a, b, normalize=normalize, reduction="none", backend=backend)
        assert got.dtype == torch.float32 and bool((got >= 0).all())
        x, y = a.detach().double(), b.detach().double()
        if normalize:
            x, y = reference.unit_rows(x), reference.unit_rows(y)
        spread = 2 * math.sqrt(d) * float(x.norm() / (y - x).norm()) if normalize else 0.0
        tolerance = 4 * u * (math.sqrt(n + d * d) + spread) * want
        error = (got.double() - want).abs()
        assert bool((error <= tolerance).all()), f"δ = {noise}: error {error.tolist()} above {tolerance.tolist()} (values {want.tolist()})"
        if noise <= 1e-3:
            assert not bool(((plain_form(a, b, normalize) - want).abs() <= tolerance).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_dtypes(backend, dtype):
    """Half-precision inputs are read into float32 and accumulated there: the result is the float64
    value of the same inputs up to the output dtype's rounding."""
    a, b = positive_pairs(33, 20, 4, dtype)
    got = mmot.geometric_consistency(a, b, reduction="none", backend=backend)
    assert got.dtype == dtype
    want = materialized_geometric_consistency(a.detach().double(), b.detach().double())
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=1e-7)
    summed = mmot.geometric_consistency(a, b, reduction="sum", backend=backend)
    torch.testing.assert_close(summed.double(), 33 * 33 * want.sum(), rtol=tol, atol=1e-4)
    for g in grads(mmot.geometric_consistency(a, b, backend=backend), a, b):
        assert g.dtype == dtype and bool(torch.isfinite(g.float()).all())


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck(native_backend, normalize):
    a, b = positive_pairs(7, 5, 5)
    assert torch.autograd.gradcheck(
        lambda x, y: mmot.geometric_consistency(x, y, normalize=normalize, reduction="none", backend=native_backend), (a, b)
    )


def test_zero_rows_single_row_and_non_contiguous_inputs(backend):
    base_a, base_b = positive_pairs(11, 14, 7)
    a, b = base_a[:, ::2], base_b.T.contiguous().T[:, 1::2]
    assert not a.is_contiguous() and not b.is_contiguous()
    torch.testing.assert_close(
        mmot.geometric_consistency(a, b, reduction="none", backend=backend), materialized_geometric_consistency(a, b)
    )
    zero = torch.zeros(11, 7, dtype=torch.float64)
    zero[3] = 1.0
    torch.testing.assert_close(
        mmot.geometric_consistency(zero, b, reduction="none", backend=backend), materialized_geometric_consistency(zero, b)
    )
    one_a, one_b = positive_pairs(1, 3, 8)
    single = mmot.geometric_consistency(one_a, one_b, reduction="none", backend=backend)
    torch.testing.assert_close(single, materialized_geometric_consistency(one_a, one_b), rtol=0, atol=1e-15)


def test_empty_batch(backend):
    a = torch.zeros(0, 5, dtype=torch.float64, requires_grad=True)
    loss = mmot.geometric_consistency(a, a, backend=backend)
    assert loss.item() == 0.0
    (grad,) = grads(loss, a)
    assert grad.shape == (0, 5)
    assert mmot.geometric_consistency(a, a, reduction="none", backend=backend).tolist() == [0.0, 0.0]
    assert mmot.geometric_consistency(a, a, reduction="sum", backend=backend).item() == 0.0
    no_features = torch.zeros(4, 0, dtype=torch.float32)
    assert mmot.geometric_consistency(no_features, no_features, backend=backend).item() == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("normalize", [True, False])
def test_non_finite_in_non_finite_out_with_checks_off(backend, bad, normalize):
    a, b = positive_pairs(6, 4, 8)
    poisoned = b.detach().clone()
    poisoned[2, 1] = bad
    previous = mmot.set_checks(False)
    try:
        terms = mmot.geometric_consistency(a, poisoned, normalize=normalize, reduction="none", backend=backend)
    finally:
        mmot.set_checks(previous)
    assert not bool(torch.isfinite(terms).any())


# ---------------------------------------------------------------- torch.library and torch.compile


@pytest.mark.parametrize("normalize", [True, False])
def test_opcheck(native_backend, normalize):
    a, b = positive_pairs(6, 5, 9)
    torch.library.opcheck(geometric_consistency_op, (a, b, normalize, native_backend))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_with_changing_sizes(native_backend, dynamic):
    torch._dynamo.reset()

    def step(a, b):
        symmetry, structure = mmot.geometric_consistency(a, b, reduction="none", backend=native_backend).unbind(0)
        return symmetry + 0.5 * structure + mmot.geometric_consistency(a, b, normalize=False, reduction="sum", backend=native_backend)

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for n, d in ((8, 5), (11, 5), (6, 7)):
        a, b = positive_pairs(n, d, n)
        loss = compiled(a, b)
        want = step(a, b)
        torch.testing.assert_close(loss, want)
        for g, w in zip(grads(loss, a, b), grads(want, a, b)):
            torch.testing.assert_close(g, w)


# ---------------------------------------------------------------- Rust kernel: chunks, parts, threads


@pytest.mark.parametrize("normalize", [True, False])
def test_rust_several_chunks_parts_and_column_blocks_float64(normalize):
    """N = 4097 rows are 17 chunks of 256 in several parts of whole chunks (as many as the
    partial-Gram budget allows at D = 300), with a ragged last chunk; D = 300 is three column
    blocks of 128."""
    a, b = positive_pairs(4097, 300, 16)
    want = reference.geometric_consistency(a, b, normalize, reduction="sum")
    got = mmot.geometric_consistency(a, b, normalize=normalize, reduction="sum", backend="rust")
    torch.testing.assert_close(got, want, rtol=1e-11, atol=0)
    upstream = torch.tensor(0.7, dtype=torch.float64)
    for g, w in zip(torch.autograd.grad(got, (a, b), upstream), torch.autograd.grad(want, (a, b), upstream)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9 * float(w.abs().max()))


def test_rust_is_deterministic_across_thread_counts(tmp_path):
    script = (
        "import torch, mmot, sys; g = torch.Generator().manual_seed(1);"
        "a, b = (torch.randn(2000, 150, generator=g, requires_grad=True) for _ in range(2));"
        "l = mmot.geometric_consistency(a, b, backend='rust'); l.backward();"
        "torch.save((l.detach(), a.grad, b.grad), sys.argv[1])"
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
def test_triton_forward_and_backward(dtype, normalize, monkeypatch):
    """21 rows and 37 features: two row tiles, three Gram tiles per side (16 each under the
    interpreter) and five backward column tiles; the Grams' rows in three splits of 8."""
    from mmot.kernels import geometric_consistency as kernels

    monkeypatch.setattr(kernels, "SPLIT_ROWS", 8)
    a, b = positive_pairs(21, 37, 14, dtype)
    got = mmot.geometric_consistency(a, b, normalize=normalize, reduction="none", backend="triton")
    want = mmot.geometric_consistency(a, b, normalize=normalize, reduction="none", backend="torch")
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(got, want, **tol)
    upstream = torch.tensor([0.6, -1.1], dtype=dtype)
    for g, w in zip(torch.autograd.grad(got, (a, b), upstream), torch.autograd.grad(want, (a, b), upstream)):
        torch.testing.assert_close(g, w, **tol)


@needs_triton
@pytest.mark.parametrize("normalize", [True, False])
def test_triton_gradcheck(normalize):
    a, b = positive_pairs(5, 3, 15)
    assert torch.autograd.gradcheck(
        lambda x, y: mmot.geometric_consistency(x, y, normalize=normalize, reduction="none", backend="triton"), (a, b)
    )


# ---------------------------------------------------------------- bad input

A = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
NAN = A.clone()
NAN[1, 2] = float("nan")


def consistency(*args, **kwargs):
    return mmot.geometric_consistency(*args, **kwargs)


test_bad_input_is_named = bad_input_test(
    "mmot.geometric_consistency",
    [
        (lambda: consistency(A.numpy(), A), TypeError, "'a'", "torch.Tensor"),
        (lambda: consistency(A, [1.0]), TypeError, "'b'", "torch.Tensor"),
        (lambda: consistency(A.long(), A.long()), TypeError, "'a'", "floating"),
        (lambda: consistency(A, A.int()), TypeError, "'b'", "floating"),
        (lambda: consistency(A[0], A[0]), ValueError, "'a'", "(N, D)"),
        (lambda: consistency(A[None], A[None]), ValueError, "'a'", "(N, D)"),
        (lambda: consistency(A, A[None]), ValueError, "'b'", "(N, D)"),
        (lambda: consistency(A, A[:5]), ValueError, "'b'", "shape"),
        (lambda: consistency(A, A[:, :3]), ValueError, "'b'", "shape"),
        (lambda: consistency(A, A.float()), TypeError, "'b'", "dtype"),
        (lambda: consistency(A, A.to("meta")), ValueError, "'b'", "device"),
        (lambda: consistency(A, A, normalize=1), TypeError, "'normalize'", "bool"),
        (lambda: consistency(A, A, reduction="avg"), ValueError, "'reduction'", "mean"),
        (lambda: consistency(NAN, A), ValueError, "'a'", "finite"),
        (lambda: consistency(A, NAN, backend="torch"), ValueError, "'b'", "finite"),
        (lambda: consistency(A, NAN, backend="rust"), ValueError, "'b'", "finite"),
        (lambda: consistency(A * float("inf"), A, normalize=False, backend="rust"), ValueError, "'a'", "finite"),
        (lambda: consistency(A, A, backend="gpu"), ValueError, "'backend'"),
        (lambda: consistency(A.to("meta"), A.to("meta"), backend="rust"), ValueError, "backend 'rust'", "CPU"),
    ],
)
