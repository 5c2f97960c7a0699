"""mmot.sinkhorn's options (ragged sizes, tol, eps_schedule, init, reach, grad) on every backend,
against per-problem calls, the naive float64 forms of tests/naive.py and POT."""

from __future__ import annotations

import math

import mmot
import pytest
import torch
from backends import NATIVE
from bad_input import bad_input_test
from hypothesis import given
from hypothesis import strategies as st
from naive import eps_sequence, general_sinkhorn

F64 = torch.float64


def ragged_batch(seed, b, n, k, dtype=F64):
    """Padded scores with NaN padding, and counts that include the full size and 1."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, n, k, generator=gen, dtype=F64)
    rows = torch.randint(1, n + 1, (b,), generator=gen)
    cols = torch.randint(1, k + 1, (b,), generator=gen)
    rows[0], cols[0] = n, k
    if b > 1:
        rows[1], cols[1] = 1, max(1, k - 1)
    padded = scores.clone()
    for i in range(b):
        padded[i, rows[i] :, :] = math.nan
        padded[i, :, cols[i] :] = math.nan
    return padded.to(dtype), rows, cols


def masses(n, k):
    return torch.ones(n, dtype=F64), torch.full((k,), n / k, dtype=F64)


@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 4), n=st.integers(1, 9), k=st.integers(1, 7), n_iters=st.integers(1, 6))
def test_ragged_batch_equals_per_problem_calls(seed, b, n, k, n_iters):
    scores, rows, cols = ragged_batch(seed, b, n, k)
    for backend in NATIVE:
        out = mmot.sinkhorn(scores, 0.3, n_iters, row_counts=rows, col_counts=cols, backend=backend)
        for i in range(b):
            block = scores[i, : rows[i], : cols[i]]
            naive = general_sinkhorn(block, *masses(rows[i], cols[i]), [0.3] * n_iters)[0]
            torch.testing.assert_close(out[i, : rows[i], : cols[i]], naive, rtol=1e-10, atol=1e-12)
            assert (out[i, rows[i] :] == 0).all() and (out[i, :, cols[i] :] == 0).all()


def test_ragged_on_triton_equals_per_problem_calls():
    pytest.importorskip("triton")
    scores, rows, cols = ragged_batch(3, 3, 5, 4)
    out = mmot.sinkhorn(scores, 0.3, 3, row_counts=rows, col_counts=cols, backend="triton")
    for i in range(3):
        naive = general_sinkhorn(scores[i, : rows[i], : cols[i]], *masses(rows[i], cols[i]), [0.3] * 3)[0]
        torch.testing.assert_close(out[i, : rows[i], : cols[i]], naive, rtol=1e-10, atol=1e-12)
    assert (out.nan_to_num(1.0)[torch.isnan(scores)] == 0).all()


def test_list_input_returns_a_list(backend):
    scores, rows, cols = ragged_batch(5, 3, 6, 5)
    mats = [scores[i, : rows[i], : cols[i]] for i in range(3)]
    row_mass = [torch.rand(int(r), dtype=F64) + 0.5 for r in rows]
    out, (f, g), info = mmot.sinkhorn(mats, 0.4, 4, row_mass=row_mass, return_potentials=True, return_info=True, backend=backend)
    assert isinstance(out, list) and [tuple(o.shape) for o in out] == [tuple(m.shape) for m in mats]
    for m, o, r, fi, gi in zip(mats, out, row_mass, f, g):
        c = torch.full((m.shape[1],), float(r.sum()) / m.shape[1], dtype=F64)
        torch.testing.assert_close(o, general_sinkhorn(m, r, c, [0.4] * 4)[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(o, torch.exp((m + fi[:, None] + gi[None, :]) / 0.4), rtol=1e-9, atol=1e-12)
    assert info.n_iters.tolist() == [4, 4, 4]


def test_no_option_is_bit_identical_and_the_options_path_agrees(backend):
    scores = torch.randn(2, 9, 6, dtype=torch.float32)
    plain = mmot.sinkhorn(scores, 0.1, 5, backend=backend)
    assert torch.equal(plain, mmot.sinkhorn(scores, 0.1, 5, tol=None, backend=backend))
    via_options, info = mmot.sinkhorn(scores, 0.1, 5, return_info=True, backend=backend)
    torch.testing.assert_close(via_options, plain, rtol=1e-5, atol=1e-6)
    assert info.n_iters.tolist() == [5, 5] and info.marginal_error.shape == (2,)


@given(seed=st.integers(0, 2**31 - 1), tol=st.sampled_from([1e-3, 1e-6, 1e-9]))
def test_tol_stops_each_problem_where_the_naive_loop_does(seed, tol):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(4, 7, 5, generator=gen, dtype=F64) * torch.tensor([0.2, 1.0, 3.0, 6.0], dtype=F64)[:, None, None]
    for backend in NATIVE:
        out, info = mmot.sinkhorn(scores, 0.5, 400, tol=tol, return_info=True, backend=backend)
        for i in range(4):
            naive, _, _, iters, err = general_sinkhorn(scores[i], *masses(7, 5), [0.5] * 400, tol=tol)
            assert int(info.n_iters[i]) == iters
            if iters < 400:  # a problem that reaches the cap reports its error unconverged, like the naive loop
                assert float(info.marginal_error[i]) <= tol
            torch.testing.assert_close(info.marginal_error[i], err, rtol=1e-6, atol=1e-14)
            torch.testing.assert_close(out[i], naive, rtol=1e-10, atol=1e-12)
    assert len(set(info.n_iters.tolist())) > 1, "the problems should stop at different iterations"


def test_non_convergence_is_reported():
    scores = torch.randn(1, 30, 20, dtype=F64) * 5
    _, info = mmot.sinkhorn(scores, 0.01, 3, tol=1e-9, return_info=True)
    assert int(info.n_iters[0]) == 3 and float(info.marginal_error[0]) > 1e-9


def test_eps_schedule_follows_the_naive_schedule(backend):
    gen = torch.Generator().manual_seed(7)
    scores = torch.randn(2, 6, 5, generator=gen, dtype=F64)
    schedule = mmot.EpsSchedule(decay=0.6, start=4.0)
    out, info = mmot.sinkhorn(scores, 0.05, 12, eps_schedule=schedule, return_info=True, backend=backend)
    for i in range(2):
        naive = general_sinkhorn(scores[i], *masses(6, 5), eps_sequence(0.05, 12, 4.0, 0.6))[0]
        torch.testing.assert_close(out[i], naive, rtol=1e-9, atol=1e-12)


def test_eps_schedule_needs_fewer_iterations_at_small_eps():
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(8, 64, 16, generator=gen, dtype=F64), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(8, 48, 16, generator=gen, dtype=F64), dim=-1)
    scores = x @ y.transpose(-1, -2)
    _, cold = mmot.sinkhorn(scores, 1e-3, 20000, tol=1e-3, return_info=True)
    _, warm = mmot.sinkhorn(scores, 1e-3, 20000, tol=1e-3, eps_schedule="geometric", return_info=True)
    assert (warm.marginal_error <= 1e-3).all() and (cold.marginal_error <= 1e-3).all()
    assert warm.n_iters.sum() < 0.9 * cold.n_iters.sum()


def test_schedule_reaches_eps_by_the_last_iteration():
    scores = torch.randn(1, 6, 5, dtype=F64) * 10
    out, (f, g) = mmot.sinkhorn(scores, 0.01, 4, eps_schedule="geometric", return_potentials=True)
    torch.testing.assert_close(out, torch.exp((scores + f[..., :, None] + g[..., None, :]) / 0.01), rtol=1e-8, atol=1e-12)


def test_warm_start_from_potentials(backend):
    gen = torch.Generator().manual_seed(11)
    scores = torch.randn(2, 8, 6, generator=gen, dtype=F64)
    f0 = torch.randn(2, 8, generator=gen, dtype=F64) * 0.1
    out = mmot.sinkhorn(scores, 0.3, 3, init=(f0, None), backend=backend)
    for i in range(2):
        torch.testing.assert_close(out[i], general_sinkhorn(scores[i], *masses(8, 6), [0.3] * 3, f0=f0[i])[0], rtol=1e-10, atol=1e-12)
    _, (f, g) = mmot.sinkhorn(scores, 0.3, 50, return_potentials=True, backend=backend)
    _, cold = mmot.sinkhorn(scores, 0.3, 200, tol=1e-8, return_info=True, backend=backend)
    _, warm = mmot.sinkhorn(scores, 0.3, 200, tol=1e-8, init=(None, g), return_info=True, backend=backend)
    assert (warm.n_iters < cold.n_iters).all()


def test_reach_matches_pot_sinkhorn_unbalanced(backend):
    ot = pytest.importorskip("ot")
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(7, 5, generator=gen, dtype=F64)
    a, b = torch.rand(7, generator=gen, dtype=F64) + 0.5, 2 * torch.rand(5, generator=gen, dtype=F64) + 0.5
    out, info = mmot.sinkhorn(scores, 0.4, 3000, row_mass=a, col_mass=b, reach=0.7, tol=1e-13, return_info=True, backend=backend)
    expected = ot.unbalanced.sinkhorn_unbalanced(a.numpy(), b.numpy(), -scores.numpy(), 0.4, 0.7, numItermax=100000, stopThr=1e-15)
    assert float(info.marginal_error) <= 1e-13
    torch.testing.assert_close(out, torch.from_numpy(expected), rtol=1e-9, atol=1e-12)


def _options_case(seed):
    scores, rows, cols = ragged_batch(seed, 3, 5, 4)
    f0 = torch.randn(3, 5, generator=torch.Generator().manual_seed(seed), dtype=F64) * 0.1
    return scores, rows, cols, f0


@pytest.mark.parametrize("case", ["plain", "schedule", "reach", "tol"])
def test_unrolled_gradient_equals_autograd_through_the_naive_loop(backend, case):
    scores, rows, cols, f0 = _options_case(4)
    kwargs = {"schedule": {"eps_schedule": mmot.EpsSchedule(0.5, 2.0)}, "reach": {"reach": 0.8}, "tol": {"tol": 1e-4}}.get(case, {})
    x = scores.clone().requires_grad_()
    out, info = mmot.sinkhorn(x, 0.3, 8, row_counts=rows, col_counts=cols, init=(f0, None), return_info=True, backend=backend, **kwargs)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    for i in range(3):
        block = scores[i, : rows[i], : cols[i]].detach().clone().requires_grad_()
        seq = eps_sequence(0.3, int(info.n_iters[i]), 2.0 if case == "schedule" else None)
        naive = general_sinkhorn(block, *masses(rows[i], cols[i]), seq, f0=f0[i, : rows[i]], reach=kwargs.get("reach"))[0]
        (grad,) = torch.autograd.grad((naive * weights[i, : rows[i], : cols[i]]).sum(), block)
        torch.testing.assert_close(x.grad[i, : rows[i], : cols[i]], grad, rtol=1e-6, atol=1e-9)
        assert (x.grad[i, rows[i] :] == 0).all() and (x.grad[i, :, cols[i] :] == 0).all()


@pytest.mark.parametrize("reach", [None, 1.5])
def test_implicit_gradient_equals_unrolled_at_convergence(backend, reach):
    scores, rows, cols = ragged_batch(9, 2, 6, 5)
    grads = {}
    for mode in ("unrolled", "implicit"):
        x = scores.clone().requires_grad_()
        out, info = mmot.sinkhorn(
            x, 0.5, 3000, row_counts=rows, col_counts=cols, tol=1e-12, reach=reach, grad=mode, return_info=True, backend=backend
        )
        assert (info.marginal_error <= 1e-12).all()
        # A random upstream: one of the form a_i + b_j (a linspace is one) has an exactly zero gradient.
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
        (out * upstream).sum().backward()
        grads[mode] = x.grad
    assert grads["unrolled"].abs().max() > 1e-3
    torch.testing.assert_close(grads["implicit"], grads["unrolled"], rtol=1e-6, atol=1e-9)


def test_options_trace_without_graph_breaks(native_backend):
    scores, rows, cols = ragged_batch(1, 2, 6, 5, torch.float32)
    scores = scores.nan_to_num(0.0)

    def step(s):
        plan, (f, g), info = mmot.sinkhorn(
            s,
            0.2,
            30,
            row_counts=rows,
            col_counts=cols,
            tol=1e-4,
            eps_schedule="geometric",
            return_potentials=True,
            return_info=True,
            backend=native_backend,
        )
        return plan.sum() + f.sum() + info.marginal_error.sum()

    compiled = torch.compile(step, fullgraph=True)
    x = scores.clone().requires_grad_()
    compiled(x).backward()
    torch.testing.assert_close(compiled(scores), step(scores), rtol=1e-5, atol=1e-5)


def test_float32_options_agree_with_float64():
    scores, rows, cols = ragged_batch(6, 3, 7, 6)
    wide = mmot.sinkhorn(scores, 0.2, 20, row_counts=rows, col_counts=cols, eps_schedule="geometric")
    narrow = mmot.sinkhorn(scores.float(), 0.2, 20, row_counts=rows, col_counts=cols, eps_schedule="geometric")
    assert narrow.dtype == torch.float32
    torch.testing.assert_close(narrow.double(), wide, rtol=1e-4, atol=1e-5)


_S = torch.randn(2, 4, 3)
test_bad_input = bad_input_test(
    "mmot.sinkhorn",
    [
        (lambda: mmot.sinkhorn(_S, row_counts=torch.tensor([5, 1])), ValueError, "'row_counts'", "1..4"),
        (lambda: mmot.sinkhorn(_S, col_counts=torch.tensor([1.0, 2.0])), TypeError, "'col_counts'", "integer tensor"),
        (lambda: mmot.sinkhorn(_S, row_counts=torch.tensor([1, 2, 3])), ValueError, "'row_counts'", "batch shape"),
        (lambda: mmot.sinkhorn([_S[0], _S[1]], row_counts=torch.tensor([1, 2])), ValueError, "'row_counts'", "list"),
        (lambda: mmot.sinkhorn([]), ValueError, "'scores'", "at least one matrix"),
        (lambda: mmot.sinkhorn([_S[0], torch.randn(3)]), ValueError, "'scores[1]'", "(N, K)"),
        (lambda: mmot.sinkhorn(_S, tol=-1.0), ValueError, "'tol'", "non-negative"),
        (lambda: mmot.sinkhorn(_S, tol="1e-3"), TypeError, "'tol'", "real number"),
        (lambda: mmot.sinkhorn(_S, eps_schedule="linear"), TypeError, "'eps_schedule'", "'geometric'"),
        (lambda: mmot.sinkhorn(_S, eps_schedule=mmot.EpsSchedule(decay=1.5)), ValueError, "'eps_schedule.decay'", "(0, 1)"),
        (lambda: mmot.sinkhorn(_S, eps_schedule="geometric", log_domain=False), ValueError, "'eps_schedule'", "log domain"),
        (lambda: mmot.sinkhorn(_S, init=torch.zeros(2, 4)), TypeError, "'init'", "pair"),
        (lambda: mmot.sinkhorn(_S, init=(torch.zeros(2, 5), None)), ValueError, "'init[0]'", "broadcast"),
        (lambda: mmot.sinkhorn(_S, init=(None, torch.full((2, 3), math.nan))), ValueError, "'init'", "finite"),
        (lambda: mmot.sinkhorn(_S, grad="adjoint"), ValueError, "'grad'", "'implicit'"),
        (lambda: mmot.sinkhorn(_S, reach=0.0), ValueError, "'reach'", "positive"),
        (lambda: mmot.sinkhorn(_S, reach=-1.0), ValueError, "'reach'", "positive"),
    ],
)
