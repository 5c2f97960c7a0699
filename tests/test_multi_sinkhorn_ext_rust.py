"""The Rust kernels of multi_sinkhorn_ext (issue 20 spec, section 2): forward and exact VJP.

Compared with today's op (no option), with per-problem calls (ragged batches padded with NaN)
and with an independent naive float64 form written from the spec's math (per-problem loop,
score-unit potentials, autograd for the gradient).
"""

from __future__ import annotations

import math

import mmot
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from mmot import reference
from mmot.ops import _multi_sinkhorn_ext_rust as ext

WEIGHTS = [0.25, 1.0, 0.6]


# ---------------------------------------------------------------- the naive form (float64)


def naive_problem(s, weights, counts, tops, eps_start, eps, decay, n_iters, tol, normalize):
    """One problem s (n, k) in float64, straight from the spec: returns T, F (G, k), Gam, H
    (G, n), iterations run, marginal error. Absent groups (count 0) get zero potentials."""
    n, k = s.shape
    r = n / k
    live = [g for g in range(len(weights)) if counts[g] > 0]
    f = {g: s.new_zeros(k) for g in live}
    h = {g: s.new_zeros(n) for g in live}
    gam = torch.zeros_like(s)
    raw = eps_start
    for t in range(n_iters):
        e = max(eps, raw)
        f = {g: e * math.log(r) - e * torch.logsumexp((weights[g] * s + gam + h[g][:, None]) / e, dim=0) for g in live}
        terms = [math.log(counts[g]) + (weights[g] * s + f[g][None, :] + h[g][:, None]) / e for g in live]
        gam = -e * torch.logsumexp(torch.stack(terms), dim=0)
        h = {g: -e * torch.logsumexp((weights[g] * s + gam + f[g][None, :]) / e, dim=1) for g in live}
        plans = {g: torch.exp((weights[g] * s + f[g][None, :] + gam + h[g][:, None]) / e) for g in live}
        err = max(float(((plans[g].detach().sum(0) - r).abs() / r).max()) for g in live)
        iters = t + 1
        if tol >= 0 and e == eps and err <= tol:
            break
        raw *= decay
    target = sum(tops[g] * plans[g] for g in live)
    if normalize == "minmax":
        low = target.amin(-1, keepdim=True)
        high = target.amax(-1, keepdim=True)
        constant = (high - low) <= 1024 * torch.finfo(s.dtype).eps * torch.maximum(low.abs(), high.abs())
        target = torch.where(constant, 0.0, (target - low) / torch.where(constant, 1.0, high - low))
    zeros = s.new_zeros
    f_out = torch.stack([f[g] if g in f else zeros(k) for g in range(len(weights))])
    h_out = torch.stack([h[g] if g in h else zeros(n) for g in range(len(weights))])
    return target, f_out, gam, h_out, iters, err


def pad(blocks, nn, kk, fill=float("nan")):
    out = torch.full((len(blocks), nn, kk), fill, dtype=blocks[0].dtype)
    for b, x in enumerate(blocks):
        out[b, : x.shape[0], : x.shape[1]] = x
    return out


def problem_set(seed, b, nn, kk, n_groups=3, dtype=torch.float64, ragged=True, schedule=True, eps=0.1):
    """Random ragged problems: scores, counts, tops, eps starts. With ``schedule``, every
    problem but the second starts above ``eps`` (log domain); otherwise all start at ``eps``
    (no schedule: the plain domain where the exponent range allows it)."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, nn + 1, (b,), generator=gen) if ragged else torch.full((b,), nn)
    cols = torch.randint(1, kk + 1, (b,), generator=gen) if ragged else torch.full((b,), kk)
    rows[0], cols[0] = nn, kk
    blocks = [torch.rand(int(n), int(k), generator=gen, dtype=torch.float64) * 2 - 1 for n, k in zip(rows, cols)]
    counts = torch.randint(0, 4, (b, n_groups), generator=gen).double()
    counts[:, 0] = counts[:, 0].clamp(min=1)  # every problem keeps a group
    tops = torch.minimum(counts, torch.randint(0, 3, (b, n_groups), generator=gen).double())
    starts = torch.rand(b, generator=gen, dtype=torch.float64) * 2 + eps * 1.01
    if not schedule:
        starts.fill_(eps)
    elif b > 1:
        starts[1] = eps
    return rows, cols, [x.to(dtype) for x in blocks], counts, tops, starts


def run_forward(blocks, rows, cols, counts, tops, starts, eps, n_iters, tol, normalize="minmax", weights=WEIGHTS, dtype=torch.float64):
    nn, kk = int(rows.max()), int(cols.max())
    scores = pad(blocks, nn, kk).to(dtype)
    return ext.forward(
        scores, rows, cols, weights[: counts.shape[1]], counts.to(dtype), tops.to(dtype), starts, eps, 0.5, n_iters, tol, normalize, "auto"
    )


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("normalize", ["minmax", "none"])
@pytest.mark.parametrize("log_domain", ["auto", "on"])
def test_no_option_equals_todays_op(dtype, normalize, log_domain):
    gen = torch.Generator().manual_seed(0)
    b, n, kk, k = 3, 11, 7, 3
    scores = (torch.rand(b, n, kk, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
    slot_weights = [0.25] * (kk - k) + [1.0] * k
    groups = reference.slot_groups(slot_weights, k)
    weights = [w for w, _, _ in groups]
    counts = torch.tensor([[c for _, c, _ in groups]] * b, dtype=dtype)
    tops = torch.tensor([[t for _, _, t in groups]] * b, dtype=dtype)
    eps, n_iters = 0.07, 20
    full = torch.full((b,), n), torch.full((b,), kk)
    target, f, gam, h, iters, err = ext.forward(
        scores, *full, weights, counts, tops, torch.full((b,), eps, dtype=torch.float64), eps, 0.5, n_iters, -1.0, normalize, log_domain
    )
    mass = torch.full((b, kk), n / kk, dtype=dtype)
    want = reference.multi_sinkhorn(scores, eps, n_iters, slot_weights, k, mass, normalize, log_domain)
    public_flag = {"auto": "auto", "on": True}[log_domain]
    today = mmot.multi_sinkhorn(scores, k, eps, n_iters, normalize=normalize, log_domain=public_flag, backend="rust")
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(target, want, **tol)
    torch.testing.assert_close(target, today, **tol)
    assert iters.dtype == torch.int64 and iters.tolist() == [n_iters] * b
    assert torch.isfinite(err).all() and (err >= 0).all()


@pytest.mark.parametrize("schedule", [True, False])
def test_ragged_equals_per_problem_calls_and_the_naive_form(schedule):
    eps, n_iters = 0.1, 40
    rows, cols, blocks, counts, tops, starts = problem_set(1, 6, 9, 7, schedule=schedule, eps=eps)
    tols = [-1.0, 1e-3, 1e-6]
    for tol in tols:
        target, f, gam, h, iters, err = run_forward(blocks, rows, cols, counts, tops, starts, eps, n_iters, tol)
        nn, kk = target.shape[1:]
        for b, s in enumerate(blocks):
            n, k = s.shape
            one = ext.forward(
                s[None].contiguous(), rows[b : b + 1], cols[b : b + 1], WEIGHTS, counts[b : b + 1], tops[b : b + 1],
                starts[b : b + 1], eps, 0.5, n_iters, tol, "minmax", "auto",
            )  # fmt: skip
            got = (target[b, :n, :k], f[b, :, :k], gam[b, :n, :k], h[b, :, :n], iters[b], err[b])
            for x, y in zip(got, (one[0][0], one[1][0], one[2][0], one[3][0], one[4][0], one[5][0])):
                torch.testing.assert_close(x, y, rtol=0, atol=0)
            # Padding is exactly 0.
            for full, valid in ((target[b], (n, k)), (gam[b], (n, k))):
                mask = torch.ones(nn, kk, dtype=torch.bool)
                mask[: valid[0], : valid[1]] = False
                assert (full[mask] == 0).all()
            assert (f[b, :, k:] == 0).all() and (h[b, :, n:] == 0).all()
            naive = naive_problem(s, WEIGHTS, counts[b].tolist(), tops[b].tolist(), float(starts[b]), eps, 0.5, n_iters, tol, "minmax")
            assert int(iters[b]) == naive[4]
            for x, y in zip(got[:4], naive[:4]):
                torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-9)
            torch.testing.assert_close(float(err[b]), naive[5], rtol=1e-6, atol=1e-12)
    # Mixed stop points occurred at the middle tolerance.
    *_, iters, _ = run_forward(blocks, rows, cols, counts, tops, starts, eps, n_iters, 1e-3)
    assert len(set(iters.tolist())) > 1 and max(iters.tolist()) <= n_iters


@given(
    st.integers(1, 8), st.integers(1, 6), st.integers(1, 3), st.integers(0, 10**6),
    st.sampled_from([0.05, 0.3, 1.0]), st.integers(1, 12), st.sampled_from([-1.0, 1e-4]), st.sampled_from(["minmax", "none"]),
)  # fmt: skip
def test_forward_matches_the_naive_form(nn, kk, b, seed, eps, n_iters, tol, normalize):
    rows, cols, blocks, counts, tops, starts = problem_set(seed, b, nn, kk, schedule=seed % 2 == 0, eps=eps)
    target, f, gam, h, iters, err = run_forward(blocks, rows, cols, counts, tops, starts, eps, n_iters, tol, normalize)
    for i, s in enumerate(blocks):
        n, k = s.shape
        want = naive_problem(s, WEIGHTS, counts[i].tolist(), tops[i].tolist(), float(starts[i]), eps, 0.5, n_iters, tol, normalize)
        assert int(iters[i]) == want[4]
        for x, y in zip((target[i, :n, :k], f[i, :, :k], gam[i, :n, :k], h[i, :, :n]), want[:4]):
            torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_plain_and_log_domains_agree(dtype):
    """Without a schedule "auto" runs the plain domain on these scores; "on" the log domain."""
    eps = 0.1
    rows, cols, blocks, counts, tops, starts = problem_set(8, 4, 10, 6, schedule=False, eps=eps)
    plain = run_forward(blocks, rows, cols, counts, tops, starts, eps, 12, 1e-5, dtype=dtype)
    nn, kk = int(rows.max()), int(cols.max())
    log = ext.forward(
        pad(blocks, nn, kk).to(dtype), rows, cols, WEIGHTS, counts.to(dtype), tops.to(dtype), starts, eps, 0.5, 12, 1e-5, "minmax", "on"
    )
    tol = dict(rtol=1e-10, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)
    for x, y in zip(plain[:4], log[:4]):
        torch.testing.assert_close(x, y, **tol)
    assert plain[4].tolist() == log[4].tolist() or dtype == torch.float32


def test_float32_matches_float64():
    rows, cols, blocks, counts, tops, starts = problem_set(3, 4, 12, 6)
    eps, n_iters = 0.1, 15
    want = run_forward(blocks, rows, cols, counts, tops, starts, eps, n_iters, -1.0)
    got = run_forward(blocks, rows, cols, counts, tops, starts, eps, n_iters, -1.0, dtype=torch.float32)
    for x, y in zip(got[:4], want[:4]):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x.double(), y, rtol=1e-3, atol=1e-4)
    assert got[4].tolist() == want[4].tolist()


def test_potentials_rebuild_the_plan():
    """T = Σ_G top_G exp((w_G S + F_G + Gam + H_G) / eps) from the returned potentials."""
    rows, cols, blocks, counts, tops, starts = problem_set(4, 3, 8, 5)
    eps = 0.2
    target, f, gam, h, *_ = run_forward(blocks, rows, cols, counts, tops, starts, eps, 25, -1.0, "none")
    for b, s in enumerate(blocks):
        n, k = s.shape
        rebuilt = sum(
            tops[b, g] * torch.exp((WEIGHTS[g] * s + f[b, g, :k] + gam[b, :n, :k] + h[b, g, :n, None]) / eps)
            for g in range(3)
            if counts[b, g] > 0
        )
        torch.testing.assert_close(target[b, :n, :k], rebuilt, rtol=1e-10, atol=1e-12)


def test_schedule_reaches_small_eps_without_nan():
    gen = torch.Generator().manual_seed(5)
    s = torch.rand(1, 30, 8, generator=gen, dtype=torch.float64) * 2 - 1
    one = torch.ones(1, 3, dtype=torch.float64)
    out = ext.forward(
        s,
        torch.tensor([30]),
        torch.tensor([8]),
        WEIGHTS,
        one,
        one,
        torch.tensor([2.0], dtype=torch.float64),
        1e-3,
        0.5,
        60,
        1e-6,
        "minmax",
        "auto",
    )
    assert all(torch.isfinite(x).all() for x in out[:4])
    want = naive_problem(s[0], WEIGHTS, [1, 1, 1], [1, 1, 1], 2.0, 1e-3, 0.5, 60, 1e-6, "minmax")
    assert int(out[4][0]) == want[4]
    torch.testing.assert_close(out[0][0], want[0], rtol=1e-6, atol=1e-7)


def test_non_finite_scores_poison_only_their_problem():
    rows, cols, blocks, counts, tops, starts = problem_set(6, 3, 6, 5)
    blocks[1][0, 0] = float("inf")
    target, f, gam, h, iters, err = run_forward(blocks, rows, cols, counts, tops, starts, 0.1, 7, 1e-3)
    n, k = blocks[1].shape
    assert torch.isnan(target[1, :n, :k]).all() and int(iters[1]) == 7 and math.isnan(float(err[1]))
    assert torch.isfinite(target[0]).all() and torch.isfinite(target[2]).all()
    assert (target[1, n:] == 0).all() and (target[1, :, k:] == 0).all()


def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    # One large problem (several row chunks, run in parallel) and small ones.
    rows, cols, blocks, counts, tops, starts = problem_set(7, 3, 900, 12)
    outs = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("MMOT_NUM_THREADS", threads)
        fwd = run_forward(blocks, rows, cols, counts, tops, starts, 0.1, 6, -1.0)
        grad = torch.randn(fwd[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        scores = pad(blocks, 900, 12)
        back = ext.backward(grad, scores, rows, cols, WEIGHTS, counts, tops, starts, 0.1, 0.5, fwd[4], "minmax", "auto")
        outs.append((*fwd, back))
    for other in outs[1:]:
        for x, y in zip(outs[0], other):
            assert torch.equal(x, y)


def test_forced_plain_domain_out_of_range_raises():
    s = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]], dtype=torch.float64)
    one = torch.ones(1, 1, dtype=torch.float64)
    two = torch.tensor([2])
    with pytest.raises(ValueError, match="plain domain"):
        ext.forward(s, two, two, [1.0], one, one, torch.tensor([1e-3], dtype=torch.float64), 1e-3, 0.5, 3, -1.0, "minmax", "off")
    out = ext.forward(s, two, two, [1.0], one, one, torch.tensor([1.0], dtype=torch.float64), 1.0, 0.5, 3, -1.0, "none", "off")
    assert torch.isfinite(out[0]).all()


# ---------------------------------------------------------------- backward


def naive_grad(s, grad, counts, tops, start, eps, iters, normalize):
    x = s.detach().clone().requires_grad_(True)
    t = naive_problem(x, WEIGHTS, counts, tops, start, eps, 0.5, iters, -1.0, normalize)[0]
    (g,) = torch.autograd.grad((t * grad).sum(), x)
    return g


def assert_grad_close(got, s, grad, counts, tops, start, eps, iters, normalize, rtol, atol):
    """``got`` against autograd through the naive form. Min-max divides by a row's spread: on
    rows within 1e-3 (relative) of constant (tops proportional to counts make them nearly so)
    the rounding of the plan is amplified by the inverse spread, so those rows get a tolerance
    of 1e-3 of the gradient's scale."""
    want = naive_grad(s, grad, counts, tops, start, eps, iters, normalize)
    well = torch.ones(s.shape[0], dtype=torch.bool)
    if normalize == "minmax":
        raw = naive_problem(s, WEIGHTS, counts, tops, start, eps, 0.5, iters, -1.0, "none")[0]
        spread = (raw.amax(1) - raw.amin(1)) / raw.abs().amax(1).clamp(min=1e-300)
        well = spread > 1e-3
    torch.testing.assert_close(got[well], want[well], rtol=rtol, atol=atol)
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got[~well], want[~well], rtol=1e-3, atol=1e-3 * scale + atol)


@pytest.mark.parametrize("normalize", ["minmax", "none"])
@pytest.mark.parametrize("seed", [10, 11])
@pytest.mark.parametrize("schedule", [True, False])
@pytest.mark.parametrize("log_domain", ["auto", "on"])
def test_backward_equals_autograd_through_the_naive_form(normalize, seed, schedule, log_domain):
    """Ragged (NaN padding in scores and grad), schedule or not, mixed per-problem stop
    points; both domains where the schedule allows the plain one."""
    eps, n_iters = 0.15, 30
    rows, cols, blocks, counts, tops, starts = problem_set(seed, 5, 8, 6, schedule=schedule, eps=eps)
    target, f, gam, h, iters, err = run_forward(blocks, rows, cols, counts, tops, starts, eps, n_iters, 1e-4, normalize)
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in blocks]
    scores, grad = pad(blocks, 8, 6), pad(grads, 8, 6)
    got = ext.backward(grad, scores, rows, cols, WEIGHTS, counts, tops, starts, eps, 0.5, iters, normalize, log_domain)
    for b, s in enumerate(blocks):
        n, k = s.shape
        args = (counts[b].tolist(), tops[b].tolist(), float(starts[b]), eps, int(iters[b]), normalize)
        assert_grad_close(got[b, :n, :k], s, grads[b], *args, rtol=1e-7, atol=1e-9)
        pad_mask = torch.ones(8, 6, dtype=torch.bool)
        pad_mask[:n, :k] = False
        assert (got[b][pad_mask] == 0).all()


@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 10**6), st.integers(1, 6), st.sampled_from([0.1, 0.5]), st.booleans())
def test_backward_matches_autograd_hypothesis(nn, kk, seed, iters, eps, schedule):
    rows, cols, blocks, counts, tops, starts = problem_set(seed, 2, nn, kk, schedule=schedule, eps=eps)
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in blocks]
    counts_iters = torch.tensor([iters, max(1, iters - 2)])
    got = ext.backward(
        pad(grads, nn, kk), pad(blocks, nn, kk), rows, cols, WEIGHTS, counts, tops, starts, eps, 0.5, counts_iters, "minmax", "auto"
    )
    for b, s in enumerate(blocks):
        n, k = s.shape
        args = (counts[b].tolist(), tops[b].tolist(), float(starts[b]), eps, int(counts_iters[b]), "minmax")
        assert_grad_close(got[b, :n, :k], s, grads[b], *args, rtol=1e-6, atol=1e-8)


def test_backward_float32_matches_float64():
    rows, cols, blocks, counts, tops, starts = problem_set(12, 3, 10, 6)
    eps, iters = 0.2, torch.tensor([8, 5, 3])
    gen = torch.Generator().manual_seed(2)
    grads = pad([torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in blocks], 10, 6)
    scores = pad(blocks, 10, 6)
    want = ext.backward(grads, scores, rows, cols, WEIGHTS, counts, tops, starts, eps, 0.5, iters, "none", "auto")
    got = ext.backward(
        grads.float(), scores.float(), rows, cols, WEIGHTS, counts.float(), tops.float(), starts, eps, 0.5, iters, "none", "auto"
    )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-4)


def test_backward_large_problem_several_chunks():
    """One problem large enough for several row chunks, against autograd on the naive form."""
    gen = torch.Generator().manual_seed(13)
    s = torch.rand(700, 5, generator=gen, dtype=torch.float64) * 2 - 1
    grad = torch.randn(700, 5, generator=gen, dtype=torch.float64)
    counts, tops = [2.0, 3.0, 0.0], [1.0, 2.0, 0.0]
    args = (
        torch.tensor([700]),
        torch.tensor([5]),
        WEIGHTS,
        torch.tensor([counts]),
        torch.tensor([tops]),
        torch.tensor([0.6], dtype=torch.float64),
    )
    got = ext.backward(grad[None], s[None], *args, 0.1, 0.5, torch.tensor([5]), "minmax", "auto")[0]
    assert_grad_close(got, s, grad, counts, tops, 0.6, 0.1, 5, "minmax", rtol=1e-7, atol=1e-10)


def test_backward_of_a_non_finite_problem_is_nan():
    rows, cols, blocks, counts, tops, starts = problem_set(14, 2, 5, 4)
    blocks[0][1, 1] = float("nan")
    scores = pad(blocks, 5, 4)
    grad = torch.ones_like(scores)
    got = ext.backward(grad, scores, rows, cols, WEIGHTS, counts, tops, starts, 0.1, 0.5, torch.tensor([3, 3]), "minmax", "auto")
    assert torch.isnan(got[0]).all()
    n, k = blocks[1].shape
    assert torch.isfinite(got[1, :n, :k]).all()
