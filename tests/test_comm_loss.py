"""mmot.nn.CoMMLoss on every native backend.

Against mmot.reference.comm_loss and the literal form (naive.py), weights, return_terms,
gradcheck, opcheck, torch.compile, dtypes, the shared self blocks counted, bad input.
"""

from __future__ import annotations

import mmot
import pytest
import torch
from backends import NATIVE, needs_triton
from bad_input import bad_input_test
from hypothesis import given, settings
from hypothesis import strategies as st
from mmot import reference
from mmot.ops import nt_xent as ops
from naive import materialized_comm_loss

CL = "mmot.nn.CoMMLoss"


def views(m, n, d, seed, dtype=torch.float64):
    """(z1, z2) leaves (M+1, N, D): each masked view a noisy copy of the fused one."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=generator, dtype=torch.float64)
    z = [base + torch.randn(m + 1, n, d, generator=generator, dtype=torch.float64) for _ in range(2)]
    return tuple(v.to(dtype).requires_grad_(True) for v in z)


@settings(deadline=None, max_examples=30)
@given(
    m=st.integers(1, 3),
    n=st.integers(1, 20),
    d=st.integers(1, 9),
    temperature=st.sampled_from([0.1, 0.5]),
    weighted=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_values_and_gradients_float64(m, n, d, temperature, weighted, seed):
    z1, z2 = views(m, n, d, seed)
    weights = [0.5 + k for k in range(m + 1)] if weighted else None
    want, want_terms = materialized_comm_loss(z1, z2, temperature, weights)
    ref, ref_terms = reference.comm_loss(z1, z2, temperature, None if weights is None else torch.tensor(weights))
    torch.testing.assert_close(ref, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ref_terms, want_terms, rtol=1e-10, atol=1e-12)
    up = torch.linspace(-1.0, 2.0, m + 1, dtype=torch.float64)
    want_grads = torch.autograd.grad(want + (want_terms * up).sum(), (z1, z2))
    for backend in NATIVE:
        loss, terms = mmot.nn.CoMMLoss(temperature, weights, backend=backend)(z1, z2, return_terms=True)
        assert loss.shape == () and terms.shape == (m + 1,)
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(terms, want_terms, rtol=1e-10, atol=1e-12)
        for g, w in zip(torch.autograd.grad(loss + (terms * up).sum(), (z1, z2)), want_grads):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_default_is_mean_of_terms(native_backend):
    z1, z2 = views(2, 8, 5, 0)
    loss, terms = mmot.nn.CoMMLoss(backend=native_backend)(z1, z2, True)
    torch.testing.assert_close(loss, terms.mean())
    assert mmot.nn.CoMMLoss(backend=native_backend)(z1, z2).shape == ()
    # The last term is NT-Xent of the fused views.
    torch.testing.assert_close(terms[-1], mmot.nt_xent(z1[-1], z2[-1], backend=native_backend))


def test_several_tiles(native_backend):
    z1, z2 = views(2, 300, 6, 1)
    want, want_terms = materialized_comm_loss(z1, z2, 0.1)
    loss, terms = mmot.nn.CoMMLoss(backend=native_backend)(z1, z2, True)
    torch.testing.assert_close(terms, want_terms, rtol=1e-10, atol=1e-12)
    for g, w in zip(torch.autograd.grad(loss, (z1, z2)), torch.autograd.grad(want, (z1, z2))):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_gradcheck(native_backend):
    z1, z2 = views(2, 4, 3, 5)
    f = lambda a, b: mmot.nn.CoMMLoss(0.4, [1.0, 2.0, 0.5], backend=native_backend)(a, b, True)  # noqa: E731
    assert torch.autograd.gradcheck(lambda a, b: torch.cat([t.reshape(-1) for t in f(a, b)]), (z1, z2))


class _Counting:
    """Wraps a block table, counting self-block calls by the tensor they read."""

    def __init__(self, inner):
        self.inner, self.self_calls, self.grad_calls = inner, [], []

    def self_lse(self, z, temperature):
        self.self_calls.append(z)
        return self.inner.self_lse(z, temperature)

    def self_grad(self, z, c, shift, temperature):
        self.grad_calls.append(z)
        return self.inner.self_grad(z, c, shift, temperature)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("m", [1, 3])
def test_shared_self_blocks_computed_once(native_backend, m, monkeypatch):
    spy = _Counting(ops.BLOCKS[native_backend])
    monkeypatch.setitem(ops.BLOCKS, native_backend, spy)
    z1, z2 = views(m, 6, 4, 2)
    loss = mmot.nn.CoMMLoss(backend=native_backend)(z1, z2)
    loss.backward()
    fused = [torch.nn.functional.normalize(z[m].detach(), dim=-1) for z in (z1, z2)]

    def count(calls, target):
        return sum(1 for z in calls if z.shape == target.shape and torch.allclose(z, target))

    for calls in (spy.self_calls, spy.grad_calls):
        assert len(calls) == 2 * m + 2  # one per masked view, one per fused view
        assert count(calls, fused[0]) == 1 and count(calls, fused[1]) == 1


def test_low_precision(native_backend):
    z1, z2 = views(2, 30, 16, 4, dtype=torch.float32)
    loss = mmot.nn.CoMMLoss(backend=native_backend)(z1, z2)
    assert loss.dtype == torch.float32
    want, _ = materialized_comm_loss(z1.double(), z2.double())
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    z1, z2 = views(2, 30, 16, 4, dtype=torch.bfloat16)
    loss = mmot.nn.CoMMLoss(backend=native_backend)(z1, z2)
    assert loss.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), want, rtol=2e-2, atol=1e-2)


def test_non_finite_input_is_named(native_backend):
    z1, z2 = views(2, 4, 3, 0)
    bad = z1.detach().clone()
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"mmot\.nn\.CoMMLoss.*'z1'"):
        mmot.nn.CoMMLoss(backend=native_backend)(bad, z2)


def test_opcheck(native_backend):
    z1, z2 = views(2, 5, 3, 1)
    torch.library.opcheck(ops.comm_loss_op, (z1, z2, 0.2, True, native_backend))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(native_backend, dynamic):
    loss_fn = mmot.nn.CoMMLoss(0.2, backend=native_backend)
    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for n in (5, 8, 11):
        z1, z2 = views(2, n, 4, n)
        got = compiled(z1, z2)
        torch.testing.assert_close(got, materialized_comm_loss(z1, z2, 0.2)[0])
        assert torch.isfinite(torch.autograd.grad(got, (z1,))[0]).all()


@needs_triton
def test_triton_gradcheck_and_values():
    z1, z2 = views(1, 4, 3, 8)
    f = lambda a, b: mmot.nn.CoMMLoss(0.4, backend="triton")(a, b, True)[1]  # noqa: E731
    assert torch.autograd.gradcheck(f, (z1, z2))
    z1, z2 = views(2, 17, 5, 9)
    torch.testing.assert_close(f(z1, z2), materialized_comm_loss(z1, z2, 0.4)[1], rtol=1e-10, atol=1e-12)


test_bad_input_is_named = bad_input_test(
    CL,
    [
        (lambda: mmot.nn.CoMMLoss(0.0), ValueError, "'temperature'"),
        (lambda: mmot.nn.CoMMLoss(weights=[1.0, -1.0]), ValueError, "'weights'"),
        (lambda: mmot.nn.CoMMLoss(weights="ab"), TypeError, "'weights'"),
        (lambda: mmot.nn.CoMMLoss(weights=torch.ones(2, 2)), ValueError, "'weights'"),
        (lambda: mmot.nn.CoMMLoss(backend="gpu"), ValueError, "'backend'"),
        (lambda: mmot.nn.CoMMLoss()(torch.randn(3, 4), torch.randn(3, 4)), ValueError, "forward", "'z1'", "(M+1, N, D)"),
        (lambda: mmot.nn.CoMMLoss()(torch.randn(3, 4, 2), torch.randn(3, 5, 2)), ValueError, "forward", "'z2'", "shape"),
        (lambda: mmot.nn.CoMMLoss()(torch.randn(3, 4, 2), torch.randn(3, 4, 2).double()), TypeError, "forward", "'z2'", "dtype"),
        (lambda: mmot.nn.CoMMLoss(weights=[1, 1])(torch.randn(3, 4, 2), torch.randn(3, 4, 2)), ValueError, "forward", "'z1'", "views"),
        (lambda: mmot.nn.CoMMLoss()(torch.randn(3, 4, 2), torch.randn(3, 4, 2), return_terms=1), TypeError, "'return_terms'"),
    ],
)
