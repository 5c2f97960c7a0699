"""Triton kernels of ``mmot::sinkhorn_ext`` (issue 20, spec section 1) under the interpreter.

Every result is compared with an independent float64 form written from the spec: a Python loop
over the problems, each cut out of the padded batch, iterated in the spec's own words (the
error as the relative column-marginal error against c A^(1−τ), which the kernels compute in
another form). The backward is compared with autograd through that loop, run for each problem's
own iteration count. Padding holds NaN throughout, so any padded value that leaks shows up.
"""

from __future__ import annotations

import math

import pytest
import torch
from backends import needs_triton
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = needs_triton

INF = math.inf


def _kernels():
    from mmot.kernels import sinkhorn_ext

    return sinkhorn_ext


# --- the naive form ------------------------------------------------------------------------


def naive_problem(s, r, c, f0, eps_start, eps, decay, n_iters, tol, rho):
    """One problem, float64: (plan, f, g, iters, err), differentiable in ``s``."""
    f = f0.clone()
    e = float(eps_start)
    it, err = 0, None
    for _ in range(n_iters):
        et = max(eps, e)
        tau = 1.0 if rho == INF else rho / (rho + et)
        g = et * torch.log(c) - tau * et * torch.logsumexp((s + f[:, None]) / et, dim=0)
        f = et * torch.log(r) - tau * et * torch.logsumexp((s + g[None, :]) / et, dim=1)
        plan = torch.exp((s + f[:, None] + g[None, :]) / et)
        a = torch.exp((s + f[:, None]) / et).sum(0)
        target = c * a ** (1.0 - tau)
        err = ((plan.sum(0) - target).abs() / target).max()
        it += 1
        if tol >= 0 and et == eps and err <= tol:
            break
        e = e * decay
    return plan, f, g, it, err


def naive_batch(scores, rows, cols, nc, kc, f0, e0, eps, decay, n_iters, tol, rho):
    """The batch as a loop over problems, results padded with zeros."""
    B, N, K = scores.shape
    plan = torch.zeros(B, N, K, dtype=torch.float64)
    f = torch.zeros(B, N, dtype=torch.float64)
    g = torch.zeros(B, K, dtype=torch.float64)
    iters = torch.zeros(B, dtype=torch.int64)
    err = torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        n, k = int(nc[b]), int(kc[b])
        p, fb, gb, it, eb = naive_problem(
            scores[b, :n, :k].double(),
            rows[b, :n].double(),
            cols[b, :k].double(),
            f0[b, :n].double(),
            float(e0[b]),
            eps,
            decay,
            n_iters,
            tol,
            rho,
        )
        plan[b, :n, :k], f[b, :n], g[b, :k], iters[b], err[b] = p, fb, gb, it, eb
    return plan, f, g, iters, err


def naive_grad(grad, scores, rows, cols, nc, kc, f0, e0, eps, decay, iters, rho):
    """∂⟨grad, plan⟩/∂scores by autograd through each problem's own ``iters[b]`` iterations."""
    out = torch.zeros(scores.shape, dtype=torch.float64)
    for b in range(scores.shape[0]):
        n, k = int(nc[b]), int(kc[b])
        s = scores[b, :n, :k].double().clone().requires_grad_(True)
        p, *_ = naive_problem(
            s, rows[b, :n].double(), cols[b, :k].double(), f0[b, :n].double(), float(e0[b]), eps, decay, int(iters[b]), -1.0, rho
        )
        (gs,) = torch.autograd.grad((p * grad[b, :n, :k].double()).sum(), s)
        out[b, :n, :k] = gs
    return out


# --- inputs --------------------------------------------------------------------------------


def padded_problem(nc, kc, N, K, seed, dtype=torch.float64, *, scale=1.0, warm=False, balanced=True, schedule=None):
    """A padded batch with NaN outside every problem: cosine-like scores, random positive masses
    (balanced: Σc = Σr per problem), f0 random when ``warm``, eps_start per problem."""
    gen = torch.Generator().manual_seed(seed)
    B = len(nc)
    nan = float("nan")
    scores = torch.full((B, N, K), nan, dtype=torch.float64)
    rows = torch.full((B, N), nan, dtype=torch.float64)
    cols = torch.full((B, K), nan, dtype=torch.float64)
    f0 = torch.full((B, N), nan, dtype=torch.float64)
    for b, (n, k) in enumerate(zip(nc, kc, strict=True)):
        scores[b, :n, :k] = scale * (2 * torch.rand(n, k, generator=gen, dtype=torch.float64) - 1)
        r = 0.5 + torch.rand(n, generator=gen, dtype=torch.float64)
        c = 0.5 + torch.rand(k, generator=gen, dtype=torch.float64)
        if balanced:
            c = c * r.sum() / c.sum()
        rows[b, :n], cols[b, :k] = r, c
        f0[b, :n] = 0.1 * torch.randn(n, generator=gen, dtype=torch.float64) if warm else 0.0
    e0 = torch.tensor(schedule if schedule is not None else [0.0] * B, dtype=torch.float64)
    counts = torch.tensor(nc, dtype=torch.int64), torch.tensor(kc, dtype=torch.int64)
    return scores.to(dtype), rows.to(dtype), cols.to(dtype), *counts, f0.to(dtype), e0


def run_forward(scores, rows, cols, nc, kc, f0, e0, eps, decay, n_iters, tol, rho):
    e0 = torch.where(e0 > 0, e0, torch.full_like(e0, eps))
    got = _kernels().forward(scores, rows, cols, nc, kc, f0, e0, eps, decay, n_iters, tol, rho, "auto")
    want = naive_batch(scores, rows, cols, nc, kc, f0, e0, eps, decay, n_iters, tol, rho)
    return got, want, e0


def assert_close(got, want, rtol, atol):
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol, equal_nan=False)


def check_forward(got, want, dtype, tol_err=None):
    plan, f, g, iters, err = got
    wplan, wf, wg, witers, werr = want
    assert torch.equal(iters, witers), (iters, witers)
    rtol, atol = (1e-9, 1e-11) if dtype == torch.float64 else (2e-4, 2e-5)
    assert_close(plan, wplan, rtol, atol)
    assert_close(f, wf, rtol, atol * 10)
    assert_close(g, wg, rtol, atol * 10)
    assert_close(err, werr, 1e-6 if dtype == torch.float64 else 1e-2, 1e-12 if dtype == torch.float64 else 1e-5)


# --- forward -------------------------------------------------------------------------------

SHAPES = ([3, 1, 5], [4, 6, 2], 5, 7)  # ragged: one row, one column, a full problem


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rho", [INF, 0.7])
@pytest.mark.parametrize("tile_rows", [None, 2])
def test_forward_ragged_matches_naive(dtype, rho, tile_rows, monkeypatch):
    from mmot.kernels import _common

    monkeypatch.setattr(_common, "FORCE_TILE_ROWS", tile_rows)
    if tile_rows == 2:  # and split over programs: rows 0-1, 2-3, 4 (empty for short problems)
        monkeypatch.setattr(_common, "FORCE_PROGRAMS_PER_PROBLEM", 3)
    nc, kc, N, K = SHAPES
    inputs = padded_problem(nc, kc, N, K, seed=1, dtype=dtype, warm=True, balanced=rho == INF)
    assert (_kernels()._Shape(inputs[0]).R > 1) == (tile_rows == 2)
    got, want, _ = run_forward(*inputs, eps=0.2, decay=0.5, n_iters=6, tol=-1.0, rho=rho)
    check_forward(got, want, dtype)
    plan = got[0]
    for b, (n, k) in enumerate(zip(nc, kc, strict=True)):
        assert (plan[b, n:] == 0).all() and (plan[b, :, k:] == 0).all()
        assert (got[1][b, n:] == 0).all() and (got[2][b, k:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_schedule_per_problem(dtype, launch):
    """eps_start per problem: annealed from 2.0 and 0.4, and none (== eps); the schedule's last
    iterations run at exactly eps."""
    nc, kc, N, K = [3, 4, 2], [5, 3, 4], 4, 5
    inputs = padded_problem(nc, kc, N, K, seed=2, dtype=dtype, schedule=[2.0, 0.4, 0.0])
    got, want, _ = run_forward(*inputs, eps=0.05, decay=0.6, n_iters=9, tol=-1.0, rho=INF)
    check_forward(got, want, dtype)
    # The schedule changed the result: a cold run at eps differs.
    cold, _, _ = run_forward(*inputs[:-1], torch.zeros(3, dtype=torch.float64), eps=0.05, decay=0.6, n_iters=9, tol=-1.0, rho=INF)
    assert not torch.allclose(cold[0][0], got[0][0], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rho", [INF, 2.0])
def test_early_stop_mixed_counts(dtype, rho, launch):
    """tol stops each problem at its own iteration; with a schedule, never before eps is reached."""
    nc, kc, N, K = [4, 2, 5, 3], [3, 5, 5, 1], 5, 5
    inputs = padded_problem(nc, kc, N, K, seed=3, dtype=dtype, scale=3.0, balanced=rho == INF, schedule=[0.0, 40.0, 0.0, 0.0])
    got, want, _ = run_forward(*inputs, eps=0.5, decay=0.5, n_iters=40, tol=1e-4, rho=rho)
    check_forward(got, want, dtype)
    iters, err = got[3], got[4]
    assert len(set(iters.tolist())) > 1, iters  # the stops differ
    assert (iters < 40).all() and (err.double() <= 1e-4).all()
    # 40 -> 20 -> ... -> 0.625 -> 0.5: six annealed iterations first, though at large eps the
    # error meets tol long before (the stopping test waits for eps).
    assert iters[1] >= 7


def test_cap_reached_reports_error(launch):
    """A tol no problem meets: every problem runs the cap, and err says how far it is."""
    nc, kc, N, K = [3, 4], [4, 2], 4, 4
    inputs = padded_problem(nc, kc, N, K, seed=4, scale=4.0)
    got, want, _ = run_forward(*inputs, eps=0.1, decay=0.5, n_iters=3, tol=1e-14, rho=INF)
    check_forward(got, want, torch.float64)
    assert (got[3] == 3).all() and (got[4] > 1e-6).all()


def test_plan_equals_potentials_and_balanced_rows(launch):
    """plan == exp((S + f + g)/eps) and, balanced, its rows sum to r exactly after the row step."""
    nc, kc, N, K = [3, 5], [4, 2], 5, 4
    s, r, c, n, k, f0, e0 = padded_problem(nc, kc, N, K, seed=5, warm=True)
    plan, f, g, iters, err = _kernels().forward(
        s, r, c, n, k, f0, torch.full((2,), 0.3, dtype=torch.float64), 0.3, 0.5, 5, -1.0, INF, "auto"
    )
    for b in range(2):
        nb, kb = nc[b], kc[b]
        rebuilt = torch.exp((s[b, :nb, :kb] + f[b, :nb, None] + g[b, None, :kb]) / 0.3)
        torch.testing.assert_close(plan[b, :nb, :kb], rebuilt, rtol=1e-12, atol=0)
        torch.testing.assert_close(plan[b, :nb, :kb].sum(1), r[b, :nb], rtol=1e-12, atol=0)
        colerr = ((plan[b, :nb, :kb].sum(0) - c[b, :kb]).abs() / c[b, :kb]).max()
        torch.testing.assert_close(err[b], colerr, rtol=1e-6, atol=1e-14)


def test_matches_todays_sinkhorn_kernel():
    """Cold, balanced, no schedule, no tol: today's mmot.sinkhorn kernel on each problem."""
    from mmot.kernels import sinkhorn

    nc, kc, N, K = [4, 2], [3, 5], 4, 5
    s, r, c, n, k, f0, _ = padded_problem(nc, kc, N, K, seed=6)
    plan, *_ = _kernels().forward(s, r, c, n, k, f0, torch.full((2,), 0.25, dtype=torch.float64), 0.25, 0.5, 7, -1.0, INF, "auto")
    for b in range(2):
        nb, kb = nc[b], kc[b]
        today = sinkhorn.forward(s[b, :nb, :kb].contiguous(), 0.25, 7, r[b, :nb].contiguous(), c[b, :kb].contiguous(), "auto")
        torch.testing.assert_close(plan[b, :nb, :kb], today, rtol=1e-10, atol=1e-13)


def test_non_finite_valid_score_poisons_only_its_problem(launch):
    nc, kc, N, K = [3, 2], [3, 3], 3, 3
    s, r, c, n, k, f0, e0 = padded_problem(nc, kc, N, K, seed=7)
    s[0, 1, 2] = float("inf")
    e0 = torch.full((2,), 0.3, dtype=torch.float64)
    plan, f, g, iters, err = _kernels().forward(s, r, c, n, k, f0, e0, 0.3, 0.5, 4, 1e-3, INF, "auto")
    assert plan[0].isnan().all() and f[0].isnan().all() and g[0].isnan().all()
    assert iters[0] == 4 and err[0].isnan()
    assert plan[1, :2].isfinite().all() and (plan[1, 2:] == 0).all() and (f[1, 2:] == 0).all()
    grad = torch.randn(2, N, K, dtype=torch.float64)
    ds = _kernels().backward(grad, s, r, c, n, k, f0, e0, 0.3, 0.5, iters, INF, "auto")
    assert ds[0].isnan().all()
    assert ds[1, :2].isfinite().all() and (ds[1, 2:] == 0).all()


def test_empty_batch_and_fits():
    k = _kernels()
    s = torch.zeros(0, 3, 4, dtype=torch.float64)
    z = torch.zeros(0, dtype=torch.int64)
    out = k.forward(s, torch.zeros(0, 3), torch.zeros(0, 4), z, z, torch.zeros(0, 3), torch.zeros(0), 0.1, 0.5, 3, -1.0, INF, "auto")
    assert [t.shape for t in out] == [(0, 3, 4), (0, 3), (0, 4), (0,), (0,)]
    assert k.backward(
        s, s, torch.zeros(0, 3), torch.zeros(0, 4), z, z, torch.zeros(0, 3), torch.zeros(0), 0.1, 0.5, z, INF, "auto"
    ).shape == (0, 3, 4)
    assert k.fits(5, torch.float32) and k.fits(1 << 14, torch.float64)
    assert not k.fits((1 << 14) + 1, torch.float32)


# --- backward ------------------------------------------------------------------------------


def check_backward(inputs, eps, decay, n_iters, tol, rho, dtype=torch.float64, seed=0):
    scores, rows, cols, nc, kc, f0, e0 = inputs
    e0 = torch.where(e0 > 0, e0, torch.full_like(e0, eps))
    k = _kernels()
    _, _, _, iters, _ = k.forward(scores, rows, cols, nc, kc, f0, e0, eps, decay, n_iters, tol, rho, "auto")
    grad = torch.randn(scores.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for b in range(scores.shape[0]):  # NaN upstream gradient on the padding
        grad[b, int(nc[b]) :] = float("nan")
        grad[b, :, int(kc[b]) :] = float("nan")
    got = k.backward(grad.to(dtype), scores, rows, cols, nc, kc, f0, e0, eps, decay, iters, rho, "auto")
    want = naive_grad(grad, scores, rows, cols, nc, kc, f0, e0, eps, decay, iters, rho)
    # A one-column problem's plan is fixed (r), its exact gradient 0: rounding sets the floor.
    scale = max(float(want.abs().max()), 1e-3)
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10 * scale)
    else:
        torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-4 * scale)
    return iters


@pytest.mark.parametrize("rho", [INF, 0.6])
@pytest.mark.parametrize("tile_rows", [None, 2])
def test_backward_matches_autograd(rho, tile_rows, monkeypatch):
    from mmot.kernels import _common

    monkeypatch.setattr(_common, "FORCE_TILE_ROWS", tile_rows)
    if tile_rows == 2:
        monkeypatch.setattr(_common, "FORCE_PROGRAMS_PER_PROBLEM", 3)
    nc, kc, N, K = SHAPES
    inputs = padded_problem(nc, kc, N, K, seed=11, warm=True, balanced=rho == INF, schedule=[0.9, 0.0, 0.5])
    check_backward(inputs, eps=0.2, decay=0.6, n_iters=5, tol=-1.0, rho=rho)


@pytest.mark.parametrize("rho", [INF, 1.5])
def test_backward_mixed_stops(rho, launch):
    """Each problem's gradient is that of its own iteration count (tol, and a schedule)."""
    nc, kc, N, K = [4, 2, 5], [3, 5, 4], 5, 5
    inputs = padded_problem(nc, kc, N, K, seed=12, scale=3.0, warm=True, balanced=rho == INF, schedule=[0.0, 1.2, 0.0])
    iters = check_backward(inputs, eps=0.5, decay=0.5, n_iters=30, tol=1e-3, rho=rho)
    assert len(set(iters.tolist())) > 1


def test_backward_one_iteration_and_float32(launch):
    nc, kc, N, K = [2, 3], [3, 1], 3, 3
    check_backward(padded_problem(nc, kc, N, K, seed=13, warm=True), eps=0.3, decay=0.5, n_iters=1, tol=-1.0, rho=INF)
    inputs = padded_problem(nc, kc, N, K, seed=14, dtype=torch.float32, warm=True, schedule=[1.0, 0.0])
    check_backward(inputs, eps=0.3, decay=0.5, n_iters=4, tol=-1.0, rho=0.8, dtype=torch.float32)


def test_backward_max_iters_bound():
    """A scratch bound above max(iters) (no host read) gives the same gradient."""
    nc, kc, N, K = [3, 2], [2, 3], 3, 3
    s, r, c, n, k, f0, _ = padded_problem(nc, kc, N, K, seed=15, warm=True)
    e0 = torch.tensor([0.8, 0.2], dtype=torch.float64)
    iters = torch.tensor([3, 2])
    grad = torch.randn(2, N, K, dtype=torch.float64)
    a = _kernels().backward(grad, s, r, c, n, k, f0, e0, 0.2, 0.5, iters, INF, "auto")
    b = _kernels().backward(grad, s, r, c, n, k, f0, e0, 0.2, 0.5, iters, INF, "auto", max_iters=7)
    assert torch.equal(a, b)
    want = naive_grad(grad, s, r, c, n, k, f0, e0, 0.2, 0.5, iters, INF)
    torch.testing.assert_close(a, want, rtol=1e-8, atol=1e-12)


@settings(max_examples=8)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=3),
    eps=st.sampled_from([0.1, 0.3, 1.0]),
    start=st.sampled_from([0.0, 2.0]),
    n_iters=st.integers(1, 6),
    tol=st.sampled_from([-1.0, 1e-3]),
    rho=st.sampled_from([INF, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_forward_backward(sizes, eps, start, n_iters, tol, rho, seed):
    nc, kc = [n for n, _ in sizes], [k for _, k in sizes]
    N, K = max(nc) + 1, max(kc)
    inputs = padded_problem(nc, kc, N, K, seed=seed, warm=seed % 2 == 1, balanced=rho == INF, schedule=[start] * len(nc))
    got, want, _ = run_forward(*inputs, eps=eps, decay=0.5, n_iters=n_iters, tol=tol, rho=rho)
    check_forward(got, want, torch.float64)
    check_backward(inputs, eps=eps, decay=0.5, n_iters=n_iters, tol=tol, rho=rho, seed=seed)


def test_float32_error_has_no_cancellation_floor():
    """At eps = 1e-3 the potentials are ~1000 eps: an error taken as the difference of two of
    them would floor near 1e-4 in float32. A near-permutation problem converges within a few
    iterations, and the float32 kernel must see it (err below 1e-6) when float64 does."""
    gen = torch.Generator().manual_seed(41)
    n = 5
    s = (torch.eye(n, dtype=torch.float64) + 0.01 * torch.rand(n, n, generator=gen, dtype=torch.float64))[None]
    mass = torch.full((1, n), 1.0 / n, dtype=torch.float64)
    counts = torch.tensor([n])
    stops = []
    for dtype in (torch.float32, torch.float64):
        args = (s.to(dtype), mass.to(dtype), mass.to(dtype), counts, counts, torch.zeros(1, n, dtype=dtype), torch.tensor([1e-3]))
        plan, f, g, iters, err = _kernels().forward(*args, 1e-3, 0.5, 20, 1e-5, INF, "auto")
        assert iters[0] <= 3 and err[0] < 1e-6, (dtype, iters, err)
        assert max(f.abs().max(), g.abs().max()) > 0.5  # potentials of the scores' size: ~1000 eps
        stops.append(int(iters[0]))
    assert stops[0] == stops[1]


def test_strided_scores():
    """Scores as a transposed view (the kernels read through strides): the same results."""
    nc, kc, N, K = [3, 2], [2, 4], 3, 4
    s, r, c, n, k, f0, _ = padded_problem(nc, kc, N, K, seed=51, warm=True)
    view = s.transpose(1, 2).contiguous().transpose(1, 2)
    assert not view.is_contiguous()
    e0 = torch.tensor([0.9, 0.3], dtype=torch.float64)
    args = (r, c, n, k, f0, e0, 0.3, 0.5)
    want = _kernels().forward(s, *args, 4, -1.0, INF, "auto")
    got = _kernels().forward(view, *args, 4, -1.0, INF, "auto")
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    grad = torch.randn(2, N, K, dtype=torch.float64)
    iters = want[3]
    want_grad = _kernels().backward(grad, s, *args, iters, INF, "auto")
    assert torch.equal(_kernels().backward(grad, view, *args, iters, INF, "auto"), want_grad)


def test_batch_equals_per_problem_calls(launch):
    """The padded batch gives each problem what a call on that problem alone gives."""
    nc, kc, N, K = [2, 4, 3], [3, 1, 4], 4, 4
    s, r, c, n, k, f0, _ = padded_problem(nc, kc, N, K, seed=61, warm=True, balanced=False)
    e0 = torch.tensor([1.0, 0.2, 0.5], dtype=torch.float64)
    batch = _kernels().forward(s, r, c, n, k, f0, e0, 0.2, 0.5, 12, 1e-3, 3.0, "auto")
    grad = torch.randn(3, N, K, dtype=torch.float64)
    batch_grad = _kernels().backward(grad, s, r, c, n, k, f0, e0, 0.2, 0.5, batch[3], 3.0, "auto")
    for b in range(3):
        nb, kb = nc[b], kc[b]
        one = (s[b : b + 1, :nb, :kb].contiguous(), r[b : b + 1, :nb], c[b : b + 1, :kb], n[b : b + 1], k[b : b + 1], f0[b : b + 1, :nb])
        plan, f, g, iters, err = _kernels().forward(*one, e0[b : b + 1], 0.2, 0.5, 12, 1e-3, 3.0, "auto")
        assert iters[0] == batch[3][b]
        torch.testing.assert_close(plan[0], batch[0][b, :nb, :kb], rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(f[0], batch[1][b, :nb], rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(g[0], batch[2][b, :kb], rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(err[0], batch[4][b], rtol=1e-9, atol=1e-15)
        ds = _kernels().backward(grad[b : b + 1, :nb, :kb].contiguous(), *one, e0[b : b + 1], 0.2, 0.5, iters, 3.0, "auto")
        torch.testing.assert_close(ds[0], batch_grad[b, :nb, :kb], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("rho", [INF, 2.0])
def test_stop_waits_for_the_end_of_the_schedule(rho, launch):
    """From eps 40 the error is below tol at once (2e-3 after one iteration here), but no problem
    stops before its schedule reaches eps (seven annealed iterations: 40 ... 0.625, then 0.5)."""
    nc, kc, N, K = [4, 2, 5], [3, 5, 5], 5, 5
    inputs = padded_problem(nc, kc, N, K, seed=3, scale=3.0, balanced=rho == INF, schedule=[40.0, 40.0, 0.0])
    got, want, _ = run_forward(*inputs, eps=0.5, decay=0.5, n_iters=30, tol=2e-2, rho=rho)
    check_forward(got, want, torch.float64)
    assert (got[3][:2] >= 8).all(), got[3]
