"""The Rust kernels of the general Sinkhorn path (issue 20 spec, section 1).

Checked against a naive float64 form written from the spec's math (per problem, materialised,
torch.logsumexp; it shares no code with the kernel), on padded ragged batches whose padding is
NaN: forward (plan, potentials, iteration counts, marginal errors) and the exact VJP of the
unrolled iteration by autograd through the naive form.
"""

from __future__ import annotations

import math

import mmot
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from mmot.ops import _sinkhorn_ext_rust as ext

INF = math.inf


# --- the naive form ------------------------------------------------------------------------------


def naive(s, r, c, f0, eps, eps_start, decay, n_iters, tol, reach):
    """One problem, float64: (plan, f, g, iters, err), differentiable w.r.t. ``s``."""
    f = f0
    e_sched = eps_start
    for t in range(n_iters):
        e = max(eps, e_sched)
        e_sched = e_sched * decay
        tau = 1.0 if reach == INF else reach / (reach + e)
        g = e * torch.log(c) - tau * e * torch.logsumexp((s + f[:, None]) / e, dim=0)
        f = e * torch.log(r) - tau * e * torch.logsumexp((s + g[None, :]) / e, dim=1)
        plan = torch.exp((s + f[:, None] + g[None, :]) / e)
        a = torch.exp((s + f[:, None]) / e).sum(0)
        chat = c * a ** (1.0 - tau)
        err = ((plan.sum(0) - chat).abs() / chat).max()
        if tol >= 0 and e == eps and float(err) <= tol:
            return plan, f, g, t + 1, err
    return plan, f, g, n_iters, err


# --- batches ---------------------------------------------------------------------------------------


def make_batch(seed, b, n_max, k_max, *, dtype=torch.float64, warm=False, schedule=False, spread=2.0):
    """A padded ragged batch with NaN padding everywhere a kernel must not look."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, n_max + 1, (b,), generator=gen)
    cols = torch.randint(1, k_max + 1, (b,), generator=gen)
    rows[0], cols[0] = n_max, k_max  # the padded shape is the largest problem's
    nan = float("nan")
    scores = torch.full((b, n_max, k_max), nan, dtype=torch.float64)
    row_mass = torch.full((b, n_max), nan, dtype=torch.float64)
    col_mass = torch.full((b, k_max), nan, dtype=torch.float64)
    init_f = torch.full((b, n_max), nan, dtype=torch.float64)
    eps_start = torch.empty(b, dtype=torch.float64)
    for i in range(b):
        n, k = int(rows[i]), int(cols[i])
        scores[i, :n, :k] = (torch.rand(n, k, generator=gen, dtype=torch.float64) - 0.5) * spread
        r = 0.5 + torch.rand(n, generator=gen, dtype=torch.float64)
        c = 0.5 + torch.rand(k, generator=gen, dtype=torch.float64)
        row_mass[i, :n] = r
        col_mass[i, :k] = c * r.sum() / c.sum()
        init_f[i, :n] = (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5) * 0.3 if warm else 0.0
        # Every other problem anneals (when asked), from a few times eps.
        eps_start[i] = 0.4 if (schedule and i % 2 == 0) else 0.0
    return {
        "scores": scores.to(dtype),
        "row_mass": row_mass.to(dtype),
        "col_mass": col_mass.to(dtype),
        "row_counts": rows,
        "col_counts": cols,
        "init_f": init_f.to(dtype),
        "eps_start": eps_start,
    }


def run_forward(batch, eps, decay=0.5, n_iters=10, tol=-1.0, reach=INF, log_domain="auto"):
    eps_start = torch.where(batch["eps_start"] > 0, batch["eps_start"], torch.full_like(batch["eps_start"], eps))
    args = {**batch, "eps_start": eps_start}
    return ext.forward(**args, eps=eps, decay=decay, n_iters=n_iters, tol=tol, reach=reach, log_domain=log_domain), eps_start


def problem(batch, i):
    n, k = int(batch["row_counts"][i]), int(batch["col_counts"][i])
    d = lambda x: x.double()  # noqa: E731
    return n, k, d(batch["scores"][i, :n, :k]), d(batch["row_mass"][i, :n]), d(batch["col_mass"][i, :k]), d(batch["init_f"][i, :n])


def assert_padding_zero(plan, f, g, batch):
    for i in range(plan.shape[0]):
        n, k = int(batch["row_counts"][i]), int(batch["col_counts"][i])
        assert (plan[i, n:] == 0).all() and (plan[i, :, k:] == 0).all()
        assert (f[i, n:] == 0).all() and (g[i, k:] == 0).all()


OPTIONS = [
    # (warm start, schedule, reach, tol, log_domain)
    (False, False, INF, -1.0, "auto"),
    (False, False, INF, -1.0, "on"),
    (True, False, INF, 1e-4, "auto"),
    (True, False, INF, 1e-4, "on"),
    (False, True, INF, 1e-5, "auto"),
    (True, True, 0.7, -1.0, "auto"),
    (False, False, 0.3, 1e-6, "auto"),
    (True, True, 2.0, 1e-2, "on"),
]


# --- forward -----------------------------------------------------------------------------------


@pytest.mark.parametrize("warm,schedule,reach,tol,log_domain", OPTIONS)
@pytest.mark.parametrize("seed", [0, 1])
def test_forward_matches_naive_float64(seed, warm, schedule, reach, tol, log_domain):
    batch = make_batch(seed, 6, 11, 19, warm=warm, schedule=schedule)
    eps, decay, n_iters = 0.1, 0.6, 40
    (plan, f, g, iters, err), eps_start = run_forward(batch, eps, decay, n_iters, tol, reach, log_domain)
    assert plan.dtype == torch.float64 and iters.dtype == torch.int64
    assert_padding_zero(plan, f, g, batch)
    stopped = 0
    for i in range(plan.shape[0]):
        n, k, s, r, c, f0 = problem(batch, i)
        p_ref, f_ref, g_ref, it_ref, err_ref = naive(s, r, c, f0, eps, float(eps_start[i]), decay, n_iters, tol, reach)
        assert int(iters[i]) == it_ref
        stopped += it_ref < n_iters
        torch.testing.assert_close(plan[i, :n, :k], p_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(f[i, :n], f_ref, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(g[i, :k], g_ref, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(err[i], err_ref, rtol=1e-5, atol=1e-12)
    if tol >= 0:
        assert stopped > 0  # the tests see early stops (and the iteration caps elsewhere)


@given(
    seed=st.integers(0, 10_000),
    b=st.integers(1, 5),
    n_max=st.integers(1, 13),
    k_max=st.integers(1, 21),
    opt=st.sampled_from(OPTIONS),
    n_iters=st.integers(1, 12),
)
def test_forward_hypothesis(seed, b, n_max, k_max, opt, n_iters):
    warm, schedule, reach, tol, log_domain = opt
    batch = make_batch(seed, b, n_max, k_max, warm=warm, schedule=schedule)
    eps, decay = 0.15, 0.5
    (plan, f, g, iters, err), eps_start = run_forward(batch, eps, decay, n_iters, -1.0, reach, log_domain)
    assert_padding_zero(plan, f, g, batch)
    assert (iters == n_iters).all()
    for i in range(b):
        n, k, s, r, c, f0 = problem(batch, i)
        p_ref, f_ref, g_ref, _, err_ref = naive(s, r, c, f0, eps, float(eps_start[i]), decay, n_iters, -1.0, reach)
        torch.testing.assert_close(plan[i, :n, :k], p_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(f[i, :n], f_ref, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(g[i, :k], g_ref, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(err[i], err_ref, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("schedule,reach", [(False, INF), (True, INF), (False, 0.5)])
def test_forward_float32(schedule, reach):
    batch = make_batch(3, 7, 12, 17, dtype=torch.float32, warm=True, schedule=schedule)
    eps, decay, n_iters = 0.1, 0.5, 15
    (plan, f, g, iters, err), eps_start = run_forward(batch, eps, decay, n_iters, -1.0, reach)
    assert plan.dtype == torch.float32 and f.dtype == torch.float32 and err.dtype == torch.float32
    assert_padding_zero(plan, f, g, batch)
    for i in range(plan.shape[0]):
        n, k, s, r, c, f0 = problem(batch, i)
        p_ref, f_ref, g_ref, _, _ = naive(s, r, c, f0, eps, float(eps_start[i]), decay, n_iters, -1.0, reach)
        torch.testing.assert_close(plan[i, :n, :k].double(), p_ref, rtol=2e-4, atol=1e-6)
        torch.testing.assert_close(f[i, :n].double(), f_ref, rtol=1e-4, atol=1e-5)


def test_stop_points_float32():
    """Each problem stops at its own count; its error is then <= tol and the plan is that iteration's."""
    batch = make_batch(5, 9, 10, 14, dtype=torch.float32)
    eps, tol, n_iters = 0.1, 1e-3, 200
    (plan, f, g, iters, err), eps_start = run_forward(batch, eps, 0.5, n_iters, tol)
    assert len(set(iters.tolist())) > 2  # mixed stop points
    assert (iters < n_iters).all() and (err <= tol).all()
    for i in range(plan.shape[0]):
        n, k, s, r, c, f0 = problem(batch, i)
        p_ref, *_ = naive(s, r, c, f0, eps, eps, 0.5, int(iters[i]), -1.0, INF)
        torch.testing.assert_close(plan[i, :n, :k].double(), p_ref, rtol=2e-4, atol=1e-6)


def test_cap_reports_error():
    """A problem that cannot meet tol runs to the cap and says so (non-convergence is not silent)."""
    batch = make_batch(6, 3, 8, 9, spread=20.0)
    (plan, f, g, iters, err), _ = run_forward(batch, 0.05, 0.5, 3, 1e-12)
    capped = iters == 3
    assert capped.sum() >= 2 and (err[capped] > 1e-12).all()
    assert (err[~capped] <= 1e-12).all()  # a single row or column is exact at once


def test_schedule_does_not_stop_before_final_eps():
    batch = make_batch(7, 4, 9, 9, schedule=True)
    batch["eps_start"][:] = 50.0
    eps, decay = 0.1, 0.5
    (plan, f, g, iters, err), _ = run_forward(batch, eps, decay, 100, 0.5)
    # e_t reaches eps after ceil(log(500)/log(2)) = 9 halvings: iteration 10 at the earliest.
    assert (iters >= 10).all()


def test_potentials_give_the_plan():
    batch = make_batch(8, 5, 9, 13, warm=True, schedule=True)
    eps = 0.1
    (plan, f, g, iters, err), eps_start = run_forward(batch, eps, 0.5, 30, -1.0, 0.8)
    rebuilt = torch.exp((batch["scores"].nan_to_num() + f[:, :, None] + g[:, None, :]) / eps)
    for i in range(plan.shape[0]):
        n, k = int(batch["row_counts"][i]), int(batch["col_counts"][i])
        torch.testing.assert_close(plan[i, :n, :k], rebuilt[i, :n, :k], rtol=1e-12, atol=1e-14)


def test_plain_and_log_domain_agree():
    batch = make_batch(9, 6, 14, 22, warm=True)
    (p1, f1, g1, i1, e1), _ = run_forward(batch, 0.1, n_iters=25, tol=1e-7, log_domain="off")
    (p2, f2, g2, i2, e2), _ = run_forward(batch, 0.1, n_iters=25, tol=1e-7, log_domain="on")
    assert torch.equal(i1, i2)
    torch.testing.assert_close(p1, p2, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(f1, f2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_no_option_is_todays_sinkhorn(dtype):
    """f0 = 0, balanced, no schedule, no tol, full counts: today's mmot.sinkhorn."""
    gen = torch.Generator().manual_seed(10)
    b, n, k = 3, 37, 21
    scores = torch.randn(b, n, k, generator=gen, dtype=torch.float64).to(dtype) * 0.5
    row_mass = torch.ones(b, n, dtype=dtype)
    col_mass = torch.full((b, k), n / k, dtype=dtype)
    eps, n_iters = 0.1, 7
    today = mmot.sinkhorn(scores, eps, n_iters, backend="rust")
    counts = (torch.full((b,), n), torch.full((b,), k))
    plan, *_ = ext.forward(
        scores,
        row_mass,
        col_mass,
        *counts,
        torch.zeros(b, n, dtype=dtype),
        torch.full((b,), eps, dtype=torch.float64),
        eps,
        0.5,
        n_iters,
        -1.0,
        INF,
        "auto",
    )
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(plan, today, rtol=tol, atol=tol)


def test_non_finite_valid_score_poisons_its_problem_only():
    batch = make_batch(11, 4, 7, 8)
    batch["scores"][2, 0, 0] = float("inf")
    (plan, f, g, iters, err), _ = run_forward(batch, 0.1, n_iters=5, tol=1e-3)
    n, k = int(batch["row_counts"][2]), int(batch["col_counts"][2])
    assert plan[2, :n, :k].isnan().all() and f[2, :n].isnan().all() and err[2].isnan()
    assert int(iters[2]) == 5
    assert_padding_zero(plan, f, g, batch)
    others = [0, 1, 3]
    assert plan[others].nan_to_num(1.0).isfinite().all() and not plan[others].isnan().any()


def test_forced_plain_where_unsafe_is_an_error():
    batch = make_batch(12, 2, 5, 5, spread=40.0)
    with pytest.raises(ValueError, match="log_domain='off'"):
        run_forward(batch, 0.05, log_domain="off")


@pytest.mark.parametrize("bad", [0, 9])
def test_counts_out_of_range(bad):
    batch = make_batch(13, 2, 8, 5)
    batch["row_counts"][1] = bad
    with pytest.raises(ValueError, match="row_counts"):
        run_forward(batch, 0.1)


def test_bad_parameters():
    batch = make_batch(14, 2, 4, 4)
    with pytest.raises(ValueError, match="decay"):
        run_forward(batch, 0.1, decay=1.0)
    with pytest.raises(ValueError, match="reach"):
        run_forward(batch, 0.1, reach=0.0)
    with pytest.raises(ValueError, match="eps"):
        run_forward(batch, -0.1)


def test_empty_batch():
    batch = make_batch(15, 1, 3, 3)
    batch = {key: v[:0] for key, v in batch.items()}
    (plan, f, g, iters, err), _ = run_forward(batch, 0.1)
    assert plan.shape == (0, 3, 3) and iters.shape == (0,)


# --- backward ----------------------------------------------------------------------------------


def naive_grads(batch, grad, eps_start, eps, decay, iters, reach):
    """Autograd through the naive form, per problem, for the forward's own iteration counts."""
    out = torch.zeros(batch["scores"].shape, dtype=torch.float64)
    for i in range(grad.shape[0]):
        n, k, s, r, c, f0 = problem(batch, i)
        s = s.clone().requires_grad_(True)
        plan, *_ = naive(s, r, c, f0, eps, float(eps_start[i]), decay, int(iters[i]), -1.0, reach)
        (plan * grad[i, :n, :k].double()).sum().backward()
        out[i, :n, :k] = s.grad
    return out


@pytest.mark.parametrize("warm,schedule,reach,tol,log_domain", OPTIONS)
@pytest.mark.parametrize("seed", [0, 1])
def test_backward_matches_autograd_float64(seed, warm, schedule, reach, tol, log_domain):
    batch = make_batch(seed + 20, 6, 10, 18, warm=warm, schedule=schedule)
    eps, decay, n_iters = 0.1, 0.6, 30
    (plan, f, g, iters, err), eps_start = run_forward(batch, eps, decay, n_iters, tol, reach, log_domain)
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(plan.shape, generator=gen, dtype=torch.float64)
    for i in range(grad.shape[0]):  # NaN where the kernel must not look
        grad[i, int(batch["row_counts"][i]) :] = float("nan")
        grad[i, :, int(batch["col_counts"][i]) :] = float("nan")
    args = {**batch, "eps_start": eps_start}
    got = ext.backward(grad, **{k: v for k, v in args.items() if k != "scores"}, scores=args["scores"],
                       eps=eps, decay=decay, iters=iters, reach=reach, log_domain=log_domain)  # fmt: skip
    want = naive_grads(batch, grad, eps_start, eps, decay, iters, reach)
    scale = want.abs().max()
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9 * scale)
    if tol >= 0:
        assert (iters < n_iters).any()


@given(
    seed=st.integers(0, 10_000),
    b=st.integers(1, 4),
    n_max=st.integers(1, 10),
    k_max=st.integers(1, 18),
    opt=st.sampled_from(OPTIONS),
    n_iters=st.integers(1, 8),
)
def test_backward_hypothesis(seed, b, n_max, k_max, opt, n_iters):
    warm, schedule, reach, tol, log_domain = opt
    batch = make_batch(seed, b, n_max, k_max, warm=warm, schedule=schedule)
    eps, decay = 0.15, 0.5
    (plan, *_, iters, _), eps_start = run_forward(batch, eps, decay, n_iters, tol, reach, log_domain)
    grad = torch.randn(plan.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = ext.backward(grad, batch["scores"], batch["row_mass"], batch["col_mass"], batch["row_counts"],
                       batch["col_counts"], batch["init_f"], eps_start, eps, decay, iters, reach, log_domain)  # fmt: skip
    want = naive_grads(batch, grad, eps_start, eps, decay, iters, reach)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9 * max(1.0, float(want.abs().max())))


def test_backward_float32_close_to_float64():
    b64 = make_batch(30, 5, 12, 20, warm=True, schedule=True)
    b32 = {k: (v.float() if v.is_floating_point() and k != "eps_start" else v) for k, v in b64.items()}
    eps, decay = 0.1, 0.5
    (plan, *_, iters, _), eps_start = run_forward(b64, eps, decay, 12, -1.0, 1.5)
    grad = torch.randn(plan.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rest = lambda b: (b["row_mass"], b["col_mass"], b["row_counts"], b["col_counts"], b["init_f"], eps_start)  # noqa: E731
    g64 = ext.backward(grad, b64["scores"], *rest(b64), eps, decay, iters, 1.5, "auto")
    g32 = ext.backward(grad.float(), b32["scores"], *rest(b32), eps, decay, iters, 1.5, "auto")
    assert g32.dtype == torch.float32
    torch.testing.assert_close(g32.double(), g64, rtol=1e-3, atol=1e-4 * float(g64.abs().max()))


def test_backward_non_finite_problem():
    batch = make_batch(31, 3, 6, 6)
    batch["scores"][1, 0, 0] = float("nan")
    (plan, *_, iters, _), eps_start = run_forward(batch, 0.1, n_iters=4)
    grad = torch.ones_like(plan)
    got = ext.backward(grad, batch["scores"], batch["row_mass"], batch["col_mass"], batch["row_counts"],
                       batch["col_counts"], batch["init_f"], eps_start, 0.1, 0.5, iters, INF, "auto")  # fmt: skip
    n, k = int(batch["row_counts"][1]), int(batch["col_counts"][1])
    assert got[1, :n, :k].isnan().all() and not got[[0, 2]].isnan().any()


# --- execution ---------------------------------------------------------------------------------


def test_results_independent_of_thread_count(monkeypatch):
    batch = make_batch(40, 64, 12, 20, dtype=torch.float32, warm=True, schedule=True)
    eps = 0.1
    results = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("MMOT_NUM_THREADS", threads)
        (plan, f, g, iters, err), eps_start = run_forward(batch, eps, 0.5, 30, 1e-4, 0.9)
        grad = torch.linspace(-1, 1, plan.numel()).reshape(plan.shape)
        gs = ext.backward(grad, batch["scores"], batch["row_mass"], batch["col_mass"], batch["row_counts"],
                          batch["col_counts"], batch["init_f"], eps_start, eps, 0.5, iters, 0.9, "auto")  # fmt: skip
        results.append((plan, f, g, iters, err, gs))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a.nan_to_num(), b.nan_to_num())


def test_larger_problems_several_blocks():
    """Problems of many rows and several lane blocks (and a row count not a multiple of 4)."""
    batch = make_batch(41, 3, 70, 45, warm=True)
    eps = 0.1
    (plan, f, g, iters, err), eps_start = run_forward(batch, eps, 0.5, 12, -1.0)
    grad = torch.randn(plan.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = ext.backward(grad, batch["scores"], batch["row_mass"], batch["col_mass"], batch["row_counts"],
                       batch["col_counts"], batch["init_f"], eps_start, eps, 0.5, iters, INF, "auto")  # fmt: skip
    want = naive_grads(batch, grad, eps_start, eps, 0.5, iters, INF)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9 * float(want.abs().max()))
    for i in range(3):
        n, k, s, r, c, f0 = problem(batch, i)
        p_ref, *_ = naive(s, r, c, f0, eps, eps, 0.5, 12, -1.0, INF)
        torch.testing.assert_close(plan[i, :n, :k], p_ref, rtol=1e-9, atol=1e-12)


CHILD = r"""
import math, signal, sys, time, torch
from mmot.ops import _sinkhorn_ext_rust as ext

# A child of a shell's background job starts with SIGINT ignored, and Python keeps it so.
signal.signal(signal.SIGINT, signal.default_int_handler)

b, n, k = 64, 24, 16
g = torch.Generator().manual_seed(0)
args = (torch.randn(b, n, k, generator=g), torch.ones(b, n), torch.full((b, k), n / k),
        torch.randint(1, n + 1, (b,), generator=g), torch.randint(1, k + 1, (b,), generator=g),
        torch.zeros(b, n), torch.full((b,), 0.5, dtype=torch.float64))
call = lambda iters, domain: ext.forward(*args, 0.05, 0.5, iters, -1.0, math.inf, domain)
for domain in ("auto", "on"):
    before = call(5, domain)
    print("ready", flush=True)
    try:
        call(10**9, domain)
        print("finished", flush=True)
    except KeyboardInterrupt:
        print("interrupted", time.perf_counter(), flush=True)
    after = call(5, domain)
    print("same" if all(torch.equal(x.nan_to_num(), y.nan_to_num()) for x, y in zip(before, after)) else "differs", flush=True)
"""


def test_ctrl_c_stops_a_long_call():
    """SIGINT stops a call of 10**9 iterations promptly (both domains); the next call is right."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    # A child that never sees the signal is killed, so that the test fails instead of hanging.
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        for _ in range(2):
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(0.5)
            sent = time.perf_counter()
            proc.send_signal(signal.SIGINT)
            word, *stamp = proc.stdout.readline().split()
            assert word == "interrupted"
            assert float(stamp[0]) - sent < 5.0
            assert proc.stdout.readline().strip() == "same"
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_equals_single_problem_calls_bitwise(dtype):
    """A problem's results do not depend on its padding or on the other problems of its batch."""
    batch = make_batch(50, 7, 13, 21, dtype=dtype, warm=True, schedule=True)
    eps = 0.1
    (plan, f, g, iters, err), eps_start = run_forward(batch, eps, 0.5, 25, 1e-4, INF)
    grad = torch.randn(plan.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    rest = (batch["row_mass"], batch["col_mass"], batch["row_counts"], batch["col_counts"], batch["init_f"])
    gs = ext.backward(grad, batch["scores"], *rest, eps_start, eps, 0.5, iters, INF, "auto")
    for i in range(plan.shape[0]):
        n, k = int(batch["row_counts"][i]), int(batch["col_counts"][i])
        one = (
            batch["scores"][i : i + 1, :n, :k].contiguous(),
            batch["row_mass"][i : i + 1, :n].contiguous(),
            batch["col_mass"][i : i + 1, :k].contiguous(),
            torch.tensor([n]),
            torch.tensor([k]),
            batch["init_f"][i : i + 1, :n].contiguous(),
            eps_start[i : i + 1],
        )
        p1, f1, g1, it1, e1 = ext.forward(*one, eps, 0.5, 25, 1e-4, INF, "auto")
        assert torch.equal(p1[0], plan[i, :n, :k]) and torch.equal(f1[0], f[i, :n]) and torch.equal(g1[0], g[i, :k])
        assert int(it1) == int(iters[i]) and torch.equal(e1[0], err[i])
        gs1 = ext.backward(grad[i : i + 1, :n, :k].contiguous(), *one[:1], *one[1:6], one[6], eps, 0.5, it1, INF, "auto")
        assert torch.equal(gs1[0], gs[i, :n, :k])


@pytest.mark.parametrize("schedule,reach,log_domain", [(False, INF, "auto"), (False, INF, "on"), (True, 0.8, "auto")])
def test_large_problems_in_row_chunks(monkeypatch, schedule, reach, log_domain):
    """Problems of >= 2^15 scratch elements run their row passes in chunks on the pool: still
    the naive result, the exact gradient, and bitwise the same on 1 and 2 threads."""
    batch = make_batch(60, 2, 300, 123, warm=True, schedule=schedule)
    eps, decay = 0.1, 0.5
    grad = torch.randn(batch["scores"].shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    runs = []
    for threads in ("1", "2"):
        monkeypatch.setenv("MMOT_NUM_THREADS", threads)
        (plan, f, g, iters, err), eps_start = run_forward(batch, eps, decay, 8, -1.0, reach, log_domain)
        rest = (batch["row_mass"], batch["col_mass"], batch["row_counts"], batch["col_counts"], batch["init_f"])
        gs = ext.backward(grad, batch["scores"], *rest, eps_start, eps, decay, iters, reach, log_domain)
        runs.append((plan, f, g, iters, err, gs))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    plan, f, g, iters, err, gs = runs[0]
    n, k, s, r, c, f0 = problem(batch, 0)
    p_ref, f_ref, g_ref, _, _ = naive(s, r, c, f0, eps, float(eps_start[0]), decay, 8, -1.0, reach)
    torch.testing.assert_close(plan[0, :n, :k], p_ref, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(f[0, :n], f_ref, rtol=1e-9, atol=1e-11)
    want = naive_grads(batch, grad, eps_start, eps, decay, iters, reach)
    torch.testing.assert_close(gs, want, rtol=1e-7, atol=1e-9 * float(want.abs().max()))


# --- the lane path: small plain-domain problems solved L at a time (16 float32, 8 float64) -------


def lane_batch(seed, dtype):
    """37 problems of 1×1 up to 70×64 (a short last group for both lane widths), most of them
    for the lane path, mixed with problems it hands to the per-problem path: 70×64 is too large
    for the lanes, problem 5 has an infinite score and problem 9's range needs the log domain."""
    batch = make_batch(seed, 37, 70, 64, dtype=dtype, warm=True)
    gen = torch.Generator().manual_seed(seed)
    for i, (n, k) in zip((1, 2, 3), ((1, 1), (64, 64), (64, 2))):
        batch["row_counts"][i], batch["col_counts"][i] = n, k
        batch["scores"][i, :n, :k] = (torch.rand(n, k, generator=gen, dtype=torch.float64) - 0.5).to(dtype)
        batch["row_mass"][i, :n] = 1.0
        batch["col_mass"][i, :k] = n / k
        batch["init_f"][i, :n] = 0.1
    batch["scores"][5, 0, 0] = float("inf")
    batch["scores"][9] *= 60.0
    return batch


def single(batch, eps_start, i):
    """Problem i alone, cut to its own size."""
    n, k = int(batch["row_counts"][i]), int(batch["col_counts"][i])
    return (
        batch["scores"][i : i + 1, :n, :k].contiguous(),
        batch["row_mass"][i : i + 1, :n].contiguous(),
        batch["col_mass"][i : i + 1, :k].contiguous(),
        torch.tensor([n]),
        torch.tensor([k]),
        batch["init_f"][i : i + 1, :n].contiguous(),
        eps_start[i : i + 1],
    )


def same(a, b):
    return torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tol", [-1.0, 1e-4])
def test_lane_groups_equal_single_problem_calls_bitwise(dtype, tol):
    """A problem's results do not depend on its group, its lane, its neighbours' sizes or stop
    points, or the batch order: each equals the problem solved alone, bit for bit."""
    batch = lane_batch(70, dtype)
    eps, n_iters = 0.1, 30
    (plan, f, g, iters, err), eps_start = run_forward(batch, eps, 0.5, n_iters, tol)
    assert_padding_zero(plan, f, g, batch)
    if tol >= 0:
        assert len(set(iters.tolist())) > 3  # lanes of one group stop at different iterations
    grad = torch.randn(plan.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    for i in range(grad.shape[0]):  # NaN where the kernel must not look
        grad[i, int(batch["row_counts"][i]) :] = float("nan")
        grad[i, :, int(batch["col_counts"][i]) :] = float("nan")
    rest = (batch["row_mass"], batch["col_mass"], batch["row_counts"], batch["col_counts"], batch["init_f"])
    gs = ext.backward(grad, batch["scores"], *rest, eps_start, eps, 0.5, iters, INF, "auto")
    for i in range(plan.shape[0]):
        n, k = int(batch["row_counts"][i]), int(batch["col_counts"][i])
        one = single(batch, eps_start, i)
        p1, f1, g1, it1, e1 = ext.forward(*one, eps, 0.5, n_iters, tol, INF, "auto")
        assert same(p1[0], plan[i, :n, :k]) and same(f1[0], f[i, :n]) and same(g1[0], g[i, :k])
        assert int(it1) == int(iters[i]) and same(e1, err[i : i + 1])
        gs1 = ext.backward(grad[i : i + 1, :n, :k].contiguous(), *one, eps, 0.5, it1, INF, "auto")
        assert same(gs1[0], gs[i, :n, :k]) and (gs[i, n:] == 0).all() and (gs[i, :, k:] == 0).all()
    assert plan[5].isnan().any() and not plan[[i for i in range(37) if i != 5]].isnan().any()
    # The batch reversed: other groups, other lanes, the same results.
    flip = {key: value.flip(0) for key, value in batch.items()}
    (plan_r, f_r, g_r, iters_r, err_r), _ = run_forward(flip, eps, 0.5, n_iters, tol)
    for a, b in zip((plan, f, g, iters, err), (plan_r, f_r, g_r, iters_r, err_r)):
        assert same(a, b.flip(0))


def test_lane_groups_match_naive_float64():
    batch = lane_batch(71, torch.float64)
    eps, n_iters, tol = 0.1, 40, 1e-6
    (plan, f, g, iters, err), eps_start = run_forward(batch, eps, 0.5, n_iters, tol)
    for i in range(plan.shape[0]):
        if i == 5:
            continue  # the infinite score
        n, k, s, r, c, f0 = problem(batch, i)
        p_ref, f_ref, g_ref, it_ref, err_ref = naive(s, r, c, f0, eps, eps, 0.5, n_iters, tol, INF)
        assert int(iters[i]) == it_ref
        torch.testing.assert_close(plan[i, :n, :k], p_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(f[i, :n], f_ref, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(g[i, :k], g_ref, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(err[i], err_ref, rtol=1e-5, atol=1e-12)
    # The backward: the exact VJP of each problem's own count, whatever its group's counts.
    grad = torch.randn(plan.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    rest = (batch["row_mass"], batch["col_mass"], batch["row_counts"], batch["col_counts"], batch["init_f"])
    got = ext.backward(grad, batch["scores"], *rest, eps_start, eps, 0.5, iters, INF, "auto")
    finite = [i for i in range(plan.shape[0]) if i != 5]
    want = naive_grads({key: value[finite] for key, value in batch.items()}, grad[finite], eps_start[finite], eps, 0.5, iters[finite], INF)
    torch.testing.assert_close(got[finite], want, rtol=1e-7, atol=1e-9 * float(want.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lane_groups_independent_of_thread_count(monkeypatch, dtype):
    batch = lane_batch(72, dtype)
    eps = 0.1
    results = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("MMOT_NUM_THREADS", threads)
        (plan, f, g, iters, err), eps_start = run_forward(batch, eps, 0.5, 25, 1e-4)
        grad = torch.linspace(-1, 1, plan.numel(), dtype=dtype).reshape(plan.shape)
        gs = ext.backward(grad, batch["scores"], batch["row_mass"], batch["col_mass"], batch["row_counts"],
                          batch["col_counts"], batch["init_f"], eps_start, eps, 0.5, iters, INF, "auto")  # fmt: skip
        results.append((plan, f, g, iters, err, gs))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert same(a, b)
