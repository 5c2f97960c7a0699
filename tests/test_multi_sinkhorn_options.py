"""mmot.multi_sinkhorn's options (ragged sizes, tol, eps_schedule, grad) on every backend, against
per-problem calls and the dense naive float64 form of tests/naive.py."""

from __future__ import annotations

import math

import mmot
import pytest
import torch
from backends import NATIVE
from bad_input import bad_input_test
from hypothesis import given
from hypothesis import strategies as st
from naive import eps_sequence, general_multi_sinkhorn

F64 = torch.float64


def ragged_batch(seed, b, n, k, dtype=F64):
    """Padded scores with NaN padding, counts that include the full size and 1 row."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, n, k, generator=gen, dtype=F64)
    rows = torch.randint(1, n + 1, (b,), generator=gen)
    cols = torch.randint(2, k + 1, (b,), generator=gen)
    rows[0], cols[0] = n, k
    if b > 1:
        rows[1] = 1
    padded = scores.clone()
    for i in range(b):
        padded[i, rows[i] :, :] = math.nan
        padded[i, :, cols[i] :] = math.nan
    return padded.to(dtype), rows, cols


def slot_weights(k_b, top, low=0.25):
    return [low] * (k_b - top) + [1.0] * top


@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 4),
    n=st.integers(1, 8),
    k=st.integers(2, 6),
    normalize=st.sampled_from(["minmax", "none"]),
)
def test_ragged_batch_equals_the_dense_form_per_problem(seed, b, n, k, normalize):
    scores, rows, cols = ragged_batch(seed, b, n, k)
    for backend in NATIVE:
        out = mmot.multi_sinkhorn(scores, None, 0.4, 4, row_counts=rows, col_counts=cols, normalize=normalize, backend=backend)
        for i in range(b):
            n_b, k_b = int(rows[i]), int(cols[i])
            top = max(1, k_b // 2)
            naive = general_multi_sinkhorn(scores[i, :n_b, :k_b], top, [0.4] * 4, slot_weights(k_b, top), normalize=normalize)[0]
            torch.testing.assert_close(out[i, :n_b, :k_b], naive, rtol=1e-9, atol=1e-11)
            assert (out[i, n_b:] == 0).all() and (out[i, :, k_b:] == 0).all()


def test_ragged_on_triton_equals_the_dense_form():
    pytest.importorskip("triton")
    scores, rows, cols = ragged_batch(2, 2, 4, 4)
    out = mmot.multi_sinkhorn(scores, 1, 0.4, 3, row_counts=rows, col_counts=cols, backend="triton")
    for i in range(2):
        n_b, k_b = int(rows[i]), int(cols[i])
        naive = general_multi_sinkhorn(scores[i, :n_b, :k_b], 1, [0.4] * 3, slot_weights(k_b, 1))[0]
        torch.testing.assert_close(out[i, :n_b, :k_b], naive, rtol=1e-9, atol=1e-11)


def test_list_input_and_the_no_option_path(backend):
    gen = torch.Generator().manual_seed(3)
    mats = [torch.randn(5, 4, generator=gen, dtype=F64), torch.randn(3, 6, generator=gen, dtype=F64)]
    out, info = mmot.multi_sinkhorn(mats, 2, 0.3, 5, return_info=True, backend=backend)
    for m, o in zip(mats, out):
        torch.testing.assert_close(o, mmot.multi_sinkhorn(m, 2, 0.3, 5, backend=backend), rtol=1e-9, atol=1e-11)
    assert info.n_iters.tolist() == [5, 5]
    plain = torch.randn(2, 7, 6, generator=gen)
    torch.testing.assert_close(
        mmot.multi_sinkhorn(plain, 3, return_info=True, backend=backend)[0],
        mmot.multi_sinkhorn(plain, 3, backend=backend),
        rtol=1e-5,
        atol=1e-5,
    )


def test_tol_stops_where_the_dense_form_does(native_backend):
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(3, 6, 5, generator=gen, dtype=F64) * torch.tensor([0.3, 1.0, 2.0], dtype=F64)[:, None, None]
    out, info = mmot.multi_sinkhorn(scores, 2, 0.5, 500, tol=1e-7, return_info=True, backend=native_backend)
    for i in range(3):
        naive, iters, err = general_multi_sinkhorn(scores[i], 2, [0.5] * 500, slot_weights(5, 2), tol=1e-7)
        assert int(info.n_iters[i]) == iters and float(info.marginal_error[i]) <= 1e-7
        torch.testing.assert_close(out[i], naive, rtol=1e-8, atol=1e-10)
    assert len(set(info.n_iters.tolist())) > 1


def test_eps_schedule_follows_the_dense_form(backend):
    gen = torch.Generator().manual_seed(8)
    scores = torch.randn(2, 5, 4, generator=gen, dtype=F64)
    out = mmot.multi_sinkhorn(scores, 2, 0.05, 10, eps_schedule=mmot.EpsSchedule(0.5, 1.0), backend=backend)
    for i in range(2):
        naive = general_multi_sinkhorn(scores[i], 2, eps_sequence(0.05, 10, 1.0, 0.5), slot_weights(4, 2))[0]
        torch.testing.assert_close(out[i], naive, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("normalize", ["minmax", "none"])
def test_unrolled_gradient_equals_autograd_through_the_dense_form(backend, normalize):
    scores, rows, cols = ragged_batch(6, 2, 4, 4)
    x = scores.clone().requires_grad_()
    out, info = mmot.multi_sinkhorn(
        x,
        1,
        0.3,
        6,
        row_counts=rows,
        col_counts=cols,
        tol=1e-3,
        eps_schedule=mmot.EpsSchedule(0.5, 1.2),
        normalize=normalize,
        return_info=True,
        backend=backend,
    )
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    for i in range(2):
        n_b, k_b = int(rows[i]), int(cols[i])
        block = scores[i, :n_b, :k_b].clone().requires_grad_()
        seq = eps_sequence(0.3, int(info.n_iters[i]), 1.2)
        naive = general_multi_sinkhorn(block, 1, seq, slot_weights(k_b, 1), normalize=normalize)[0]
        (grad,) = torch.autograd.grad((naive * weights[i, :n_b, :k_b]).sum(), block)
        torch.testing.assert_close(x.grad[i, :n_b, :k_b], grad, rtol=1e-6, atol=1e-9)
        assert (x.grad[i, n_b:] == 0).all() and (x.grad[i, :, k_b:] == 0).all()


@pytest.mark.parametrize("normalize", ["minmax", "none"])
def test_implicit_gradient_equals_unrolled_at_convergence(native_backend, normalize):
    gen = torch.Generator().manual_seed(12)
    scores = torch.randn(2, 7, 5, generator=gen, dtype=F64)
    grads = {}
    for mode in ("unrolled", "implicit"):
        x = scores.clone().requires_grad_()
        out, info = mmot.multi_sinkhorn(
            x, 2, 0.5, 4000, tol=1e-12, grad=mode, normalize=normalize, return_info=True, backend=native_backend
        )
        assert (info.marginal_error <= 1e-12).all()
        # A random upstream: one of the form a_i + b_j (a linspace is one) has an exactly zero gradient.
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
        (out * upstream).sum().backward()
        grads[mode] = x.grad
    assert grads["unrolled"].abs().max() > 1e-3
    # The adjoint solve stops at a relative residual of 1e-7 (float64).
    torch.testing.assert_close(grads["implicit"], grads["unrolled"], rtol=1e-5, atol=1e-7)


def test_options_trace_without_graph_breaks(native_backend):
    scores, rows, cols = ragged_batch(1, 2, 6, 5, torch.float32)
    scores = scores.nan_to_num(0.0)

    def step(s):
        target, info = mmot.multi_sinkhorn(
            s, None, 0.2, 20, row_counts=rows, col_counts=cols, tol=1e-4, eps_schedule="geometric", return_info=True, backend=native_backend
        )
        return target.sum() + info.marginal_error.sum()

    compiled = torch.compile(step, fullgraph=True)
    x = scores.clone().requires_grad_()
    compiled(x).backward()
    torch.testing.assert_close(compiled(scores), step(scores), rtol=1e-5, atol=1e-5)


_S = torch.randn(2, 5, 4)
test_bad_input = bad_input_test(
    "mmot.multi_sinkhorn",
    [
        (
            lambda: mmot.multi_sinkhorn(_S, 2, col_counts=torch.tensor([4, 3]), slot_weights=[1.0] * 4),
            ValueError,
            "'slot_weights'",
            "low_weight",
        ),
        (lambda: mmot.multi_sinkhorn(_S, 3, col_counts=torch.tensor([4, 2])), ValueError, "'k'", "at most"),
        (lambda: mmot.multi_sinkhorn(_S, row_counts=torch.tensor([0, 5])), ValueError, "'row_counts'", "1..5"),
        (
            lambda: mmot.multi_sinkhorn(_S, row_counts=torch.tensor([2, 5]), anchor_mass=torch.ones(4)),
            ValueError,
            "'anchor_mass'",
            "N_b/K_b",
        ),
        (lambda: mmot.multi_sinkhorn(_S, tol=math.nan), ValueError, "'tol'", "non-negative"),
        (lambda: mmot.multi_sinkhorn(_S, grad="exact"), ValueError, "'grad'", "'unrolled'"),
        (lambda: mmot.multi_sinkhorn(_S, eps_schedule=0.5), TypeError, "'eps_schedule'", "EpsSchedule"),
    ],
)
