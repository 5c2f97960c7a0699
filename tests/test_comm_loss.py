"""mmot.nn.CoMMLoss against CoMM's formula on the literal NT-Xent, its gradients and bad input."""

from __future__ import annotations

import mmot
import pytest
import torch
from backends import NATIVE
from hypothesis import given
from hypothesis import strategies as st
from naive import materialized_comm_loss


def views(m, n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(m + 1, n, d, generator=g, dtype=torch.float64)
    z1 = base + 0.5 * torch.randn(m + 1, n, d, generator=g, dtype=torch.float64)
    z2 = base + 0.5 * torch.randn(m + 1, n, d, generator=g, dtype=torch.float64)
    return z1.to(dtype).requires_grad_(True), z2.to(dtype).requires_grad_(True)


@given(m=st.integers(1, 3), n=st.integers(1, 12), d=st.integers(1, 7), weighted=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_matches_the_formula_float64(m, n, d, weighted, seed):
    z1, z2 = views(m, n, d, seed)
    weights = [0.5 + i for i in range(m + 1)] if weighted else None
    want, want_terms = materialized_comm_loss(z1, z2, 0.1, weights)
    want_grads = torch.autograd.grad(want, (z1, z2))
    for backend in NATIVE:
        loss, terms = mmot.nn.CoMMLoss(0.1, weights, backend=backend)(z1, z2, return_terms=True)
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(terms, want_terms, rtol=1e-10, atol=1e-10)
        for g, w in zip(torch.autograd.grad(loss, (z1, z2)), want_grads):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_gradcheck(backend):
    z1, z2 = views(2, 4, 3, 1)
    torch.autograd.gradcheck(lambda a, b: mmot.nn.CoMMLoss(0.3, backend=backend)(a, b), (z1, z2))


def test_compile_fullgraph():
    torch._dynamo.reset()
    loss_fn = mmot.nn.CoMMLoss()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    z1, z2 = views(2, 6, 5, 3)
    torch.testing.assert_close(compiled(z1, z2), loss_fn(z1, z2))


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [
        (lambda: mmot.nn.CoMMLoss(0.0), ValueError, "'temperature'"),
        (lambda: mmot.nn.CoMMLoss(weights=[1.0, -1.0]), ValueError, "'weights'"),
        (lambda: mmot.nn.CoMMLoss(weights=[0.0, 0.0]), ValueError, "'weights'"),
        (lambda: mmot.nn.CoMMLoss()(torch.randn(3, 4), torch.randn(3, 4)), ValueError, "'z1'"),
        (lambda: mmot.nn.CoMMLoss()(torch.randn(1, 4, 5), torch.randn(1, 4, 5)), ValueError, "'z1'"),
        (lambda: mmot.nn.CoMMLoss()(torch.randn(3, 4, 5), torch.randn(3, 5, 5)), ValueError, "'z2'"),
        (lambda: mmot.nn.CoMMLoss()(torch.randn(3, 4, 5), torch.randn(3, 4, 5).double()), TypeError, "'z2'"),
        (lambda: mmot.nn.CoMMLoss(weights=[1.0, 1.0])(torch.randn(3, 4, 5), torch.randn(3, 4, 5)), ValueError, "weights"),
    ],
)
def test_bad_input_is_named(call, error, fragment):
    with pytest.raises(error, match="mmot.nn.CoMMLoss") as info:
        call()
    assert type(info.value) is error and fragment in str(info.value)
