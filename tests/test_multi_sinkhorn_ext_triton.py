"""Triton kernels of ``mmot::multi_sinkhorn_ext`` (``mmot.kernels.multi_sinkhorn_ext``) against an
independent naive float64 form written from the spec (issue 20, section 2), under the interpreter.

The naive form loops over problems and iterations with dense per-group tensors, in score units:
ragged padded batches (NaN padding), per-problem slot counts (absent groups) and tops, the
geometric ε schedule (float64 by repeated multiplication), per-problem early stopping, the
marginal error, min-max over the valid columns; the backward is compared with autograd through it.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mmot import reference
from mmot.kernels import _common
from mmot.kernels import multi_sinkhorn_ext as kernel

CONSTANT_ULPS = 1024


def naive(scores, row_counts, col_counts, weights, counts, tops, eps_start, eps, decay, n_iters, tol, normalize):
    """(T, F, Gam, H, iters, err) in float64, one problem at a time, straight from the spec."""
    B, N, K = scores.shape
    G = len(weights)
    F_out = torch.zeros(B, G, K, dtype=torch.float64)
    Gam_out = torch.zeros(B, N, K, dtype=torch.float64)
    H_out = torch.zeros(B, G, N, dtype=torch.float64)
    iters = torch.zeros(B, dtype=torch.int64)
    errs = torch.zeros(B, dtype=torch.float64)
    rows_T, rows_F, rows_Gam, rows_H = [], [], [], []
    for b in range(B):
        n, k = int(row_counts[b]), int(col_counts[b])
        S = scores[b, :n, :k].to(torch.float64)
        present = [g for g in range(G) if float(counts[b, g]) > 0]
        r = n / k
        F = {g: torch.zeros(k, dtype=torch.float64) for g in present}
        H = {g: torch.zeros(n, dtype=torch.float64) for g in present}
        Gam = torch.zeros(n, k, dtype=torch.float64)
        e_cur = float(eps_start[b])
        for t in range(n_iters):
            e = max(eps, e_cur)
            F = {g: e * math.log(r) - e * torch.logsumexp((weights[g] * S + Gam + H[g][:, None]) / e, dim=0) for g in present}
            terms = [math.log(float(counts[b, g])) + (weights[g] * S + F[g][None, :] + H[g][:, None]) / e for g in present]
            Gam = -e * torch.logsumexp(torch.stack(terms), dim=0)
            H = {g: -e * torch.logsumexp((weights[g] * S + Gam + F[g][None, :]) / e, dim=1) for g in present}
            P = {g: torch.exp((weights[g] * S + F[g][None, :] + Gam + H[g][:, None]) / e) for g in present}
            err = max(float(((P[g].detach().sum(0) - r).abs() / r).max()) for g in present)
            iters[b] = t + 1
            errs[b] = err
            stop = tol >= 0 and e <= eps and err <= tol
            e_cur = e_cur * decay
            if stop:
                break
        target = sum(float(tops[b, g]) * P[g] for g in present)
        if normalize == "minmax":
            lo = target.amin(-1, keepdim=True)
            hi = target.amax(-1, keepdim=True)
            constant = hi - lo <= CONSTANT_ULPS * torch.finfo(torch.float64).eps * torch.maximum(lo.abs(), hi.abs())
            target = torch.where(constant, torch.zeros_like(target), (target - lo) / torch.where(constant, torch.ones_like(hi), hi - lo))
        rows_T.append(target)
        rows_Gam.append(Gam)
        rows_F.append(dict(F))
        rows_H.append(dict(H))
    pad_T = []
    for b in range(B):
        n, k = int(row_counts[b]), int(col_counts[b])
        pad_T.append(torch.nn.functional.pad(rows_T[b], (0, K - k, 0, N - n)))
        Gam_out[b, :n, :k] = rows_Gam[b].detach()
        for g, f in rows_F[b].items():
            F_out[b, g, :k] = f.detach()
        for g, h in rows_H[b].items():
            H_out[b, g, :n] = h.detach()
    return torch.stack(pad_T), F_out, Gam_out, H_out, iters, errs


def problem(seed, B, N, K, G, dtype=torch.float64, ragged=True, absent=True):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, N, K, generator=gen, dtype=torch.float64).to(dtype)
    if ragged:
        rows = torch.randint(1, N + 1, (B,), generator=gen)
        cols = torch.randint(1, K + 1, (B,), generator=gen)
        rows[0], cols[0] = N, K
    else:
        rows = torch.full((B,), N, dtype=torch.int64)
        cols = torch.full((B,), K, dtype=torch.int64)
    for b in range(B):
        scores[b, int(rows[b]) :, :] = float("nan")
        scores[b, :, int(cols[b]) :] = float("nan")
    weights = [0.25, 1.0, 0.5][:G]
    counts = torch.randint(1, 4, (B, G), generator=gen).double()
    if absent and G > 1:
        counts[1::2, 0] = 0.0  # group 0 absent in every other problem
    tops = torch.floor(counts * torch.rand(B, G, generator=gen, dtype=torch.float64) + 0.5)
    tops[:, -1] = torch.clamp(tops[:, -1], min=1.0)
    return scores, rows, cols, weights, counts, tops


def check_forward(got, want, iters_equal=True, rtol=1e-9, atol=1e-10):
    names = ("T", "F", "Gam", "H", "iters", "err")
    for name, g, w in zip(names, got, want):
        if name == "iters":
            if iters_equal:
                assert torch.equal(g, w), (g, w)
            continue
        assert g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def run(scores, rows, cols, weights, counts, tops, eps_start, eps, decay, n_iters, tol, normalize):
    return kernel.forward(scores, rows, cols, weights, counts, tops, eps_start, eps, decay, n_iters, tol, normalize, "auto")


def zero_padding(got, rows, cols):
    """Where the padding of each output is (for T/Gam (B,N,K), F (B,G,K), H (B,G,N))."""
    T, F, Gam, H = got[:4]
    for b in range(T.shape[0]):
        n, k = int(rows[b]), int(cols[b])
        for x in (T[b], Gam[b]):
            assert not x[n:].any() and not x[:, k:].any()
        assert not F[b][:, k:].any() and not H[b][:, n:].any()


def upstream_for(scores, seed=7):
    gen = torch.Generator().manual_seed(seed)
    up = torch.randn(scores.shape, generator=gen, dtype=torch.float64)
    valid = ~torch.isnan(scores)
    return up, valid


def naive_grad(scores, rows, cols, weights, counts, tops, eps_start, eps, decay, n_iters, tol, normalize, up, valid):
    s = torch.where(valid, scores.double(), 0.0).requires_grad_(True)
    s_in = torch.where(valid, s, float("nan"))
    T = naive(s_in, rows, cols, weights, counts, tops, eps_start, eps, decay, n_iters, tol, normalize)[0]
    (g,) = torch.autograd.grad((T * torch.where(valid, up, 0.0)).sum(), s)
    return torch.where(valid, g, 0.0)


@pytest.fixture(params=[None, 2], ids=["one-tile", "row-tiles-of-2"])
def tiles(request, monkeypatch):
    """One row tile per problem, or tiles of 2 rows (the column reductions then span tiles)."""
    if request.param is not None:
        monkeypatch.setattr(_common, "FORCE_TILE_ROWS", request.param)
    return request.param


# (seed, B, N, K, G, eps_start per problem (None: eps), eps, decay, n_iters, tol)
CASES = [
    pytest.param(0, 3, 5, 4, 2, None, 0.1, 0.5, 4, -1.0, id="plain"),
    pytest.param(1, 4, 5, 3, 2, [2.0, 0.1, 1.0, 0.3], 0.1, 0.5, 30, 1e-3, id="schedule-early-stop"),
    pytest.param(2, 3, 6, 5, 3, [0.8, 0.05, 0.4], 0.05, 0.7, 6, -1.0, id="schedule-three-groups"),
    pytest.param(3, 3, 4, 7, 1, None, 0.2, 0.5, 40, 1e-6, id="one-group"),
    pytest.param(4, 4, 7, 5, 2, None, 0.1, 0.5, 40, 1e-5, id="early-stop-no-schedule"),
]


def _eps_start(B, values, eps):
    return torch.tensor(values if values is not None else [eps] * B, dtype=torch.float64)


@pytest.mark.parametrize("normalize", ["minmax", "none"])
@pytest.mark.parametrize("seed, B, N, K, G, starts, eps, decay, n_iters, tol", CASES)
def test_forward_matches_naive_float64(tiles, seed, B, N, K, G, starts, eps, decay, n_iters, tol, normalize):
    scores, rows, cols, weights, counts, tops = problem(seed, B, N, K, G)
    eps_start = _eps_start(B, starts, eps)
    args = (scores, rows, cols, weights, counts, tops, eps_start, eps, decay, n_iters, tol, normalize)
    got = run(*args)
    want = naive(*args)
    check_forward(got, want)
    assert got[0].dtype == torch.float64 and got[4].dtype == torch.int64
    zero_padding(got, rows, cols)
    if tol >= 0 and G > 1:
        assert len(set(got[4].tolist())) > 1, "the case should stop problems at different iterations"
        assert (got[4] < n_iters).any()


BACKWARD_CASES = [
    CASES[0],
    pytest.param(1, 4, 5, 3, 2, [2.0, 0.1, 1.0, 0.3], 0.1, 0.5, 12, 2e-2, id="schedule-early-stop"),
    CASES[2],
]


@pytest.mark.parametrize("normalize", ["minmax", "none"])
@pytest.mark.parametrize("seed, B, N, K, G, starts, eps, decay, n_iters, tol", BACKWARD_CASES)
def test_backward_matches_autograd_through_naive_float64(tiles, seed, B, N, K, G, starts, eps, decay, n_iters, tol, normalize):
    scores, rows, cols, weights, counts, tops = problem(seed, B, N, K, G)
    eps_start = _eps_start(B, starts, eps)
    args = (scores, rows, cols, weights, counts, tops, eps_start, eps, decay, n_iters, tol, normalize)
    iters = run(*args)[4]
    if tol >= 0:
        assert len(set(iters.tolist())) > 1 and (iters < n_iters).any()
    up, valid = upstream_for(scores)
    want = naive_grad(*args, up, valid)
    got = kernel.backward(
        torch.where(valid, up, float("nan")), scores, rows, cols, weights, counts, tops, eps_start, eps, decay, iters, normalize, "auto"
    )
    assert got.dtype == torch.float64
    scale = float(want.abs().max())
    assert scale > 1e-3
    torch.testing.assert_close(got / scale, want / scale, rtol=1e-9, atol=1e-10)
    assert not got[~valid].any()
    # The cap passed explicitly (no host synchronisation) gives the same numbers.
    again = kernel.backward(up, scores, rows, cols, weights, counts, tops, eps_start, eps, decay, iters, normalize, "auto", n_iters=n_iters)
    assert torch.equal(again, got)


def test_forward_float32(tiles):
    scores, rows, cols, weights, counts, tops = problem(5, 4, 5, 6, 2)
    eps_start = torch.tensor([0.9, 0.1, 0.5, 0.2], dtype=torch.float64)
    args = (scores, rows, cols, weights, counts, tops, eps_start, 0.1, 0.6, 8, -1.0, "minmax")
    got = run(scores.float(), *args[1:])
    want = naive(scores.float().double(), *args[1:])
    assert got[0].dtype == torch.float32 and got[5].dtype == torch.float32
    check_forward(got, want, rtol=2e-3, atol=2e-4)
    zero_padding(got, rows, cols)


def test_forward_float32_early_stop():
    scores, rows, cols, weights, counts, tops = problem(6, 4, 6, 5, 2)
    eps_start = torch.tensor([0.5, 0.1, 0.3, 0.1], dtype=torch.float64)
    args = (rows, cols, weights, counts, tops, eps_start, 0.1, 0.5, 60, 1e-3, "none")
    got = run(scores.float(), *args)
    want = naive(scores.float().double(), *args)
    assert (got[4] - want[4]).abs().max() <= 1 and (want[4] < 60).all()
    assert (got[5] <= 1e-3).all()
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("normalize", ["minmax", "none"])
def test_backward_float32(normalize):
    scores, rows, cols, weights, counts, tops = problem(8, 3, 5, 4, 2)
    eps_start = torch.tensor([0.5, 0.1, 0.3], dtype=torch.float64)
    args = (rows, cols, weights, counts, tops, eps_start, 0.1, 0.5, 5, -1.0, normalize)
    s32 = scores.float()
    iters = run(s32, *args)[4]
    up, valid = upstream_for(scores)
    want = naive_grad(s32.double(), *args, up, valid)
    got = kernel.backward(
        torch.where(valid, up, float("nan")).float(), s32, rows, cols, weights, counts, tops, eps_start, 0.1, 0.5, iters, normalize, "auto"
    )
    assert got.dtype == torch.float32
    scale = float(want.abs().max())
    torch.testing.assert_close(got.double() / scale, want / scale, rtol=2e-3, atol=2e-4)


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    B=st.integers(1, 3),
    N=st.integers(1, 6),
    K=st.integers(1, 6),
    G=st.integers(1, 3),
    n_iters=st.integers(1, 6),
    schedule=st.booleans(),
    tol=st.sampled_from([-1.0, 1e-2]),
    normalize=st.sampled_from(["minmax", "none"]),
)
def test_forward_and_backward_hypothesis(seed, B, N, K, G, n_iters, schedule, tol, normalize):
    scores, rows, cols, weights, counts, tops = problem(seed, B, N, K, G)
    gen = torch.Generator().manual_seed(seed + 1)
    eps = 0.15
    # A start below eps means no schedule (eps_t = eps).
    eps_start = eps * (0.5 + 4 * torch.rand(B, generator=gen, dtype=torch.float64)) if schedule else _eps_start(B, None, eps)
    args = (scores, rows, cols, weights, counts, tops, eps_start, eps, 0.6, n_iters, tol, normalize)
    got = run(*args)
    check_forward(got, naive(*args))
    up, valid = upstream_for(scores, seed)
    want = naive_grad(*args, up, valid)
    grad = kernel.backward(
        torch.where(valid, up, float("nan")), scores, rows, cols, weights, counts, tops, eps_start, eps, 0.6, got[4], normalize, "auto"
    )
    scale = max(float(want.abs().max()), 1e-3)
    torch.testing.assert_close(grad / scale, want / scale, rtol=1e-9, atol=1e-10)


def test_no_option_equals_reference_multi_sinkhorn():
    """Full problems, one slot table for the batch, no schedule, no tol: today's reference."""
    gen = torch.Generator().manual_seed(11)
    B, N, K, k = 2, 6, 5, 2
    scores = torch.randn(B, N, K, generator=gen, dtype=torch.float64)
    slot_weights = [0.25] * (K - k) + [1.0] * k
    groups = reference.slot_groups(slot_weights, k)
    weights = [w for w, _, _ in groups]
    counts = torch.tensor([[c for _, c, _ in groups]] * B, dtype=torch.float64)
    tops = torch.tensor([[t for _, _, t in groups]] * B, dtype=torch.float64)
    full = torch.full((B,), N), torch.full((B,), K)
    for normalize in ("minmax", "none"):
        want = reference.multi_sinkhorn(scores, 0.1, 5, slot_weights, k, torch.full((B, K), N / K, dtype=torch.float64), normalize, "on")
        got = run(scores, *full, weights, counts, tops, torch.full((B,), 0.1, dtype=torch.float64), 0.1, 0.5, 5, -1.0, normalize)
        torch.testing.assert_close(got[0], want, rtol=1e-9, atol=1e-10)
        assert torch.equal(got[4], torch.full((B,), 5))


def test_padding_values_do_not_matter_and_batch_equals_single_problems():
    scores, rows, cols, weights, counts, tops = problem(12, 3, 5, 4, 2)
    eps_start = torch.tensor([0.4, 0.1, 0.25], dtype=torch.float64)
    rest = (weights, counts, tops, eps_start, 0.1, 0.5, 12, 1e-4, "minmax")
    got = run(scores, rows, cols, *rest)
    garbage = torch.where(torch.isnan(scores), torch.tensor(1e30, dtype=torch.float64), scores)
    garbage[0, 0, 0] = scores[0, 0, 0]
    again = run(garbage, rows, cols, *rest)
    for x, y in zip(got, again):
        assert torch.equal(x, y)
    up, valid = upstream_for(scores)
    grad = kernel.backward(torch.where(valid, up, float("nan")), scores, rows, cols, *rest[:6], got[4], "minmax", "auto")
    grad_inf = kernel.backward(torch.where(valid, up, float("inf")), garbage, rows, cols, *rest[:6], got[4], "minmax", "auto")
    assert torch.equal(grad, grad_inf)
    for b in range(3):
        n, k = int(rows[b]), int(cols[b])
        one = run(
            scores[b : b + 1, :n, :k].contiguous(),
            rows[b : b + 1],
            cols[b : b + 1],
            weights,
            counts[b : b + 1],
            tops[b : b + 1],
            eps_start[b : b + 1],
            *rest[4:],
        )
        torch.testing.assert_close(one[0][0], got[0][b, :n, :k], rtol=1e-12, atol=1e-13)
        assert int(one[4][0]) == int(got[4][b])
        g1 = kernel.backward(
            up[b : b + 1, :n, :k].contiguous(),
            scores[b : b + 1, :n, :k].contiguous(),
            rows[b : b + 1],
            cols[b : b + 1],
            weights,
            counts[b : b + 1],
            tops[b : b + 1],
            eps_start[b : b + 1],
            0.1,
            0.5,
            one[4],
            "minmax",
            "auto",
        )
        torch.testing.assert_close(g1[0], grad[b, :n, :k], rtol=1e-11, atol=1e-12)


def test_stop_waits_for_the_end_of_the_schedule():
    """A loose tol is met at once, but a problem stops only once eps_t == eps: after the
    schedule's last step (eps_start·decay^t <= eps), here 0.8·0.5^3 = 0.1."""
    scores, rows, cols, weights, counts, tops = problem(13, 2, 4, 4, 2)
    eps_start = torch.tensor([0.8, 0.1], dtype=torch.float64)
    got = run(scores, rows, cols, weights, counts, tops, eps_start, 0.1, 0.5, 20, 10.0, "minmax")
    assert got[4].tolist() == [4, 1]
    check_forward(got, naive(scores, rows, cols, weights, counts, tops, eps_start, 0.1, 0.5, 20, 10.0, "minmax"))


def test_non_finite_valid_scores_poison_only_their_problem():
    scores, rows, cols, weights, counts, tops = problem(14, 3, 4, 4, 2)
    scores[1, 0, 0] = float("inf")
    eps_start = torch.full((3,), 0.1, dtype=torch.float64)
    args = (rows, cols, weights, counts, tops, eps_start, 0.1, 0.5, 7, 1e-3, "minmax")
    got = run(scores, *args)
    n, k = int(rows[1]), int(cols[1])
    assert torch.isnan(got[0][1, :n, :k]).all() and not got[0][1, n:].any()
    assert int(got[4][1]) == 7 and math.isnan(float(got[5][1]))
    clean = [0, 2]
    want = naive(scores[clean], rows[clean], cols[clean], weights, counts[clean], tops[clean], eps_start[clean], *args[6:])
    check_forward(tuple(x[clean] for x in got), want)
    up, valid = upstream_for(scores)
    grad = kernel.backward(up, scores, *args[:8], got[4], "minmax", "auto")
    assert torch.isnan(grad[1, :n, :k]).all() and torch.isfinite(grad[clean]).all()


def test_constant_rows_and_single_columns():
    """k_b = 1 (and a problem whose tops are all 0) give constant rows: T and its gradient 0."""
    scores, rows, cols, weights, counts, tops = problem(15, 3, 4, 4, 2, ragged=False, absent=False)
    cols = torch.tensor([1, 4, 3])
    scores[0, :, 1:] = float("nan")
    scores[2, :, 3:] = float("nan")
    tops[2] = 0.0
    eps_start = torch.full((3,), 0.2, dtype=torch.float64)
    args = (scores, rows, cols, weights, counts, tops, eps_start, 0.2, 0.5, 3, -1.0, "minmax")
    got = run(*args)
    check_forward(got, naive(*args))
    assert not got[0][0].any() and not got[0][2].any() and got[0][1].any()
    up, valid = upstream_for(scores)
    grad = kernel.backward(torch.where(valid, up, float("nan")), *args[:9], got[4], "minmax", "auto")
    assert not grad[0].any() and not grad[2].any()
    torch.testing.assert_close(grad, naive_grad(*args, up, valid), rtol=1e-9, atol=1e-10)


def test_empty_batch_and_bad_iteration_count():
    scores = torch.empty(0, 3, 4, dtype=torch.float64)
    empty = torch.empty(0, dtype=torch.int64)
    table = torch.empty(0, 2, dtype=torch.float64)
    out = run(scores, empty, empty, [0.5, 1.0], table, table, torch.empty(0, dtype=torch.float64), 0.1, 0.5, 3, -1.0, "minmax")
    assert [tuple(x.shape) for x in out] == [(0, 3, 4), (0, 2, 4), (0, 3, 4), (0, 2, 3), (0,), (0,)]
    grad = kernel.backward(
        scores, scores, empty, empty, [0.5, 1.0], table, table, torch.empty(0, dtype=torch.float64), 0.1, 0.5, empty, "minmax", "auto"
    )
    assert grad.shape == (0, 3, 4)
    s, rows, cols, weights, counts, tops = problem(0, 1, 2, 2, 1)
    with pytest.raises(ValueError, match="n_iters"):
        run(s, rows, cols, weights, counts, tops, torch.full((1,), 0.1, dtype=torch.float64), 0.1, 0.5, 0, -1.0, "minmax")


def test_fits():
    widest = _common.widest_row(torch.float32)
    assert kernel.fits(widest // 4, 2, torch.float32)
    assert not kernel.fits(widest // 2, 2, torch.float32)
    assert kernel.fits(widest // 2, 2, torch.float32, backward=False)


def test_stop_at_the_cap_and_non_contiguous_scores():
    """A problem that meets tol exactly at the cap, and one that needs one more iteration than
    the cap, against the naive form; a transposed (non-contiguous) view gives the same numbers."""
    scores, rows, cols, weights, counts, tops = problem(16, 3, 5, 5, 2)
    eps_start = torch.tensor([0.3, 0.1, 0.2], dtype=torch.float64)
    rest = (weights, counts, tops, eps_start, 0.1, 0.5)
    free = run(scores, rows, cols, *rest, 50, 1e-4, "minmax")[4]
    assert len(set(free.tolist())) == 3
    cap = int(free.median())
    args = (scores, rows, cols, *rest, cap, 1e-4, "minmax")
    got = run(*args)
    check_forward(got, naive(*args))
    assert sorted(got[4].tolist()) == sorted(min(int(i), cap) for i in free)
    view = scores.transpose(1, 2).contiguous().transpose(1, 2)
    assert not view.is_contiguous()
    again = run(view, *args[1:])
    for x, y in zip(got, again):
        assert torch.equal(x, y)


def test_column_shifts_and_small_eps():
    """Per-column constants of 1e4 (absorbed by F, which moves by -w_G·shift) and eps = 0.02,
    where exp would underflow: the log-domain kernels agree with the naive form."""
    scores, rows, cols, weights, counts, tops = problem(17, 2, 5, 4, 2)
    scores = 3.0 * scores
    shift = 1e4 * torch.randn(2, 1, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps_start = torch.tensor([0.3, 0.02], dtype=torch.float64)
    rest = (rows, cols, weights, counts, tops, eps_start, 0.02, 0.5, 6, -1.0, "minmax")
    base = run(scores, *rest)
    moved = run(scores + shift, *rest)
    check_forward(base, naive(scores, *rest))
    torch.testing.assert_close(moved[0], base[0], rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(moved[2], base[2], rtol=1e-8, atol=1e-8)
    w = torch.tensor(weights, dtype=torch.float64)[None, :, None]
    present = torch.where(base[1] != 0, 1.0, 0.0)
    torch.testing.assert_close(moved[1], base[1] - w * shift * present, rtol=1e-10, atol=1e-7)
    up, valid = upstream_for(scores)
    grad = kernel.backward(torch.where(valid, up, float("nan")), scores + shift, *rest[:8], base[4], "minmax", "auto")
    want = naive_grad(scores, *rest, up, valid)
    scale = float(want.abs().max())
    torch.testing.assert_close(grad / scale, want / scale, rtol=1e-7, atol=1e-8)
