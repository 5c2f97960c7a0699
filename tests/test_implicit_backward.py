"""Implicit (fixed-point adjoint) backward of sinkhorn and multi_sinkhorn, every backend.

Checked against an independent naive float64 form written from the spec (per-problem loops
here, sharing no code with the kernels): autograd through a long unrolled iteration, which at
convergence is the fixed point's gradient; a central finite difference of the converged
solution; the exact invariances (balanced: the plan ignores row and column shifts of the
scores, so the gradient's row and column sums vanish; Multi-SK likewise). Ragged padded
batches with NaN padding, float32, Rust thread-count independence.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from mmot.reverse import implicit as torch_impl

BACKENDS = ["torch", "rust", "triton"]


def _impl(name: str):
    if name == "torch":
        return torch_impl
    if name == "rust":
        from mmot.ops import _implicit_rust

        return _implicit_rust
    from mmot.kernels import implicit

    return implicit


@pytest.fixture(params=BACKENDS)
def impl(request):
    return _impl(request.param)


# ---- naive forms (spec sections 1 and 2, one problem at a time) ------------------------------


def naive_sinkhorn(s, r, c, eps, rho, iters):
    tau = 1.0 if math.isinf(rho) else rho / (rho + eps)
    f = torch.zeros(s.shape[0], dtype=s.dtype)
    g = torch.zeros(s.shape[1], dtype=s.dtype)
    for _ in range(iters):
        g = tau * (eps * torch.log(c) - eps * torch.logsumexp((s + f[:, None]) / eps, 0))
        f = tau * (eps * torch.log(r) - eps * torch.logsumexp((s + g[None, :]) / eps, 1))
    return torch.exp((s + f[:, None] + g[None, :]) / eps)


def naive_multi(s, weights, cnt, top, eps, iters):
    """Returns T_raw and the potentials F (G, k), Gam (n, k), H (G, n)."""
    n, k = s.shape
    w = torch.tensor(weights, dtype=s.dtype)[:, None, None]
    present = [i for i, c in enumerate(cnt) if c > 0]
    lc = torch.tensor([math.log(c) if c > 0 else 0.0 for c in cnt], dtype=s.dtype)[:, None, None]
    f = torch.zeros(len(weights), k, dtype=s.dtype)
    gam = torch.zeros(n, k, dtype=s.dtype)
    h = torch.zeros(len(weights), n, dtype=s.dtype)
    for _ in range(iters):
        f = eps * math.log(n / k) - eps * torch.logsumexp((w * s + gam + h[:, :, None]) / eps, 1)
        gam = -eps * torch.logsumexp((lc + (w * s + f[:, None, :] + h[:, :, None]) / eps)[present], 0)
        h = -eps * torch.logsumexp((w * s + gam + f[:, None, :]) / eps, 2)
    p = torch.exp((w * s + f[:, None, :] + gam + h[:, :, None]) / eps)
    t = sum(top[i] * p[i] for i in present)
    return t, f, gam, h


def _pad(blocks, shape, fill=float("nan")):
    out = torch.full(shape, fill, dtype=blocks[0].dtype)
    for b, x in enumerate(blocks):
        out[(b,) + tuple(slice(0, d) for d in x.shape)] = x
    return out


def _sinkhorn_case(sizes, eps, rho, seed, iters=600):
    """Per-problem (plan, upstream, autograd gradient) at a converged forward, and the padded batch."""
    gen = torch.Generator().manual_seed(seed)
    plans, grads, refs = [], [], []
    for n, k in sizes:
        s = torch.randn(n, k, dtype=torch.float64, generator=gen).requires_grad_()
        r = torch.rand(n, dtype=torch.float64, generator=gen) + 0.5
        c = torch.rand(k, dtype=torch.float64, generator=gen) + 0.5
        c = c * r.sum() / c.sum()
        up = torch.randn(n, k, dtype=torch.float64, generator=gen)
        p = naive_sinkhorn(s, r, c, eps, rho, iters)
        (gs,) = torch.autograd.grad((p * up).sum(), s)
        plans.append(p.detach())
        grads.append(up)
        refs.append(gs)
    nmax, kmax = max(n for n, _ in sizes) + 1, max(k for _, k in sizes) + 2
    shape = (len(sizes), nmax, kmax)
    rows = torch.tensor([n for n, _ in sizes])
    cols = torch.tensor([k for _, k in sizes])
    return _pad(plans, shape), _pad(grads, shape), rows, cols, refs


def _check_blocks(out, refs, rtol):
    out = out.to(torch.float64)
    scale = max(ref.abs().max().item() for ref in refs)
    assert scale > 1e-6, "the reference gradient must not be zero"
    for b, ref in enumerate(refs):
        n, k = ref.shape
        torch.testing.assert_close(out[b, :n, :k], ref, rtol=0, atol=rtol * scale)
        block = torch.zeros_like(out[b], dtype=torch.bool)
        block[:n, :k] = True
        assert (out[b][~block] == 0).all(), "padded outputs must be exactly 0"


SIZES = [(5, 4), (3, 7), (8, 2), (1, 3)]


@pytest.mark.parametrize("rho", [math.inf, 0.8, 5.0])
def test_sinkhorn_matches_unrolled_autograd_at_convergence(impl, rho):
    plan, grad, rows, cols, refs = _sinkhorn_case(SIZES, 0.5, rho, seed=1)
    iters = torch.zeros(len(SIZES), dtype=torch.int64)
    out = impl.sinkhorn_implicit_backward(grad, plan, rows, cols, 0.5, rho, iters=iters)
    _check_blocks(out, refs, 1e-6)
    assert (iters <= 1000).all() and (iters[:3] > 0).all()


def test_sinkhorn_small_eps_converged(impl):
    # eps 0.1 on unit-variance scores: a less well-conditioned adjoint system.
    plan, grad, rows, cols, refs = _sinkhorn_case([(6, 5), (4, 4)], 0.1, math.inf, seed=5, iters=3000)
    out = impl.sinkhorn_implicit_backward(grad, plan, rows, cols, 0.1, math.inf)
    _check_blocks(out, refs, 1e-5)


def test_sinkhorn_matches_finite_difference_of_converged_plan():
    gen = torch.Generator().manual_seed(3)
    n, k, eps, rho = 5, 4, 0.4, 1.5
    s = torch.randn(n, k, dtype=torch.float64, generator=gen)
    r = torch.full((n,), 1.0 / n, dtype=torch.float64)
    c = torch.full((k,), 1.0 / k, dtype=torch.float64)
    up = torch.randn(n, k, dtype=torch.float64, generator=gen)
    d = torch.randn(n, k, dtype=torch.float64, generator=gen)
    h = 1e-5

    def loss(x):
        return (naive_sinkhorn(x, r, c, eps, rho, 3000) * up).sum().item()

    fd = (loss(s + h * d) - loss(s - h * d)) / (2 * h)
    p = naive_sinkhorn(s, r, c, eps, rho, 3000)
    for name in ["torch", "rust"]:
        g = _impl(name).sinkhorn_implicit_backward(up[None], p[None], torch.tensor([n]), torch.tensor([k]), eps, rho)
        assert abs((g[0] * d).sum().item() - fd) < 1e-7 * max(1.0, abs(fd)), name


def test_sinkhorn_balanced_gradient_has_zero_row_and_column_sums(impl):
    plan, grad, rows, cols, _ = _sinkhorn_case(SIZES, 0.3, math.inf, seed=7, iters=1500)
    out = impl.sinkhorn_implicit_backward(grad, plan, rows, cols, 0.3, math.inf).to(torch.float64)
    scale = out.abs().max().item()
    assert scale > 1e-3
    # Rows: exact to rounding (α is formed from β exactly); columns: to the solver's tolerance.
    assert out.sum(-1).abs().max().item() < 1e-12 * scale
    assert out.sum(-2).abs().max().item() < 1e-6 * scale


# ---- multi_sinkhorn ---------------------------------------------------------------------------

# (weights, per-problem counts, per-problem tops): counts sum to each problem's k.
MULTI_CASES = {
    "two_groups": ([1.0, 0.6], [(5, 4, [2.0, 2.0], [1.0, 1.0]), (7, 5, [3.0, 2.0], [2.0, 1.0]), (3, 3, [1.0, 2.0], [0.0, 2.0])]),
    "absent_group": ([1.0, 0.5, 2.0], [(6, 5, [2.0, 0.0, 3.0], [1.0, 0.0, 2.0]), (4, 4, [1.0, 1.0, 2.0], [1.0, 1.0, 1.0])]),
}


def naive_minmax(t):
    """Each row rescaled to [0, 1] (no constant rows in these cases)."""
    lo, hi = t.amin(-1, keepdim=True), t.amax(-1, keepdim=True)
    return (t - lo) / (hi - lo)


def _multi_case(weights, problems, eps, seed, iters=800, minmax=False):
    """``minmax``: the references differentiate min-max(T_raw), and the upstream is ∂L/∂T."""
    gen = torch.Generator().manual_seed(seed)
    g_count = len(weights)
    blocks = {"s": [], "up": [], "f": [], "gam": [], "h": []}
    refs = []
    for n, k, cnt, top in problems:
        s = torch.randn(n, k, dtype=torch.float64, generator=gen).requires_grad_()
        up = torch.randn(n, k, dtype=torch.float64, generator=gen)
        t, f, gam, h = naive_multi(s, weights, cnt, top, eps, iters)
        (gs,) = torch.autograd.grad(((naive_minmax(t) if minmax else t) * up).sum(), s)
        refs.append(gs)
        for key, x in zip(blocks, (s.detach(), up, f.detach(), gam.detach(), h.detach())):
            blocks[key].append(x)
    bsz = len(problems)
    nmax, kmax = max(p[0] for p in problems) + 2, max(p[1] for p in problems) + 1
    args = dict(
        grad_raw=_pad(blocks["up"], (bsz, nmax, kmax)),
        scores=_pad(blocks["s"], (bsz, nmax, kmax)),
        F=_pad(blocks["f"], (bsz, g_count, kmax)),
        Gam=_pad(blocks["gam"], (bsz, nmax, kmax)),
        H=_pad(blocks["h"], (bsz, g_count, nmax)),
        row_counts=torch.tensor([p[0] for p in problems]),
        col_counts=torch.tensor([p[1] for p in problems]),
        weights=weights,
        counts=torch.tensor([p[2] for p in problems], dtype=torch.float64),
        tops=torch.tensor([p[3] for p in problems], dtype=torch.float64),
        eps=eps,
    )
    return args, refs


@pytest.mark.parametrize("case", list(MULTI_CASES))
def test_multi_matches_unrolled_autograd_at_convergence(impl, case):
    weights, problems = MULTI_CASES[case]
    args, refs = _multi_case(weights, problems, 0.5, seed=11)
    iters = torch.zeros(len(problems), dtype=torch.int64)
    out = impl.multi_sinkhorn_implicit_backward(**args, iters=iters)
    _check_blocks(out, refs, 1e-6)
    # A problem whose gradient is 0 analytically (two_groups' first: every top / count is 1/2)
    # has a zero right-hand side up to rounding, so 0 iterations is right for it too.
    solved = torch.tensor([ref.abs().max().item() > 1e-12 for ref in refs])
    assert (iters[solved] > 0).all() and (iters < 1000).all()


def test_multi_one_group_top_below_count_has_zero_gradient(impl):
    # One weight for every slot: g makes each slot value 1/count, so T ignores the scores.
    args, refs = _multi_case([0.7], [(5, 4, [4.0], [2.0]), (3, 6, [6.0], [1.0])], 0.5, seed=2)
    for ref in refs:
        assert ref.abs().max().item() < 1e-12
    out = impl.multi_sinkhorn_implicit_backward(**args)
    assert (out == 0).all()


def test_multi_matches_finite_difference_of_converged_solution():
    weights, cnt, top = [1.0, 0.4], [2.0, 3.0], [1.0, 2.0]
    gen = torch.Generator().manual_seed(4)
    n, k, eps = 6, 5, 0.6
    s = torch.randn(n, k, dtype=torch.float64, generator=gen)
    up = torch.randn(n, k, dtype=torch.float64, generator=gen)
    d = torch.randn(n, k, dtype=torch.float64, generator=gen)
    h = 1e-5

    def loss(x):
        return (naive_multi(x, weights, cnt, top, eps, 2000)[0] * up).sum().item()

    fd = (loss(s + h * d) - loss(s - h * d)) / (2 * h)
    _, f, gam, hh = naive_multi(s, weights, cnt, top, eps, 2000)
    for name in ["torch", "rust"]:
        g = _impl(name).multi_sinkhorn_implicit_backward(
            up[None],
            s[None],
            f[None],
            gam[None],
            hh[None],
            torch.tensor([n]),
            torch.tensor([k]),
            weights,
            torch.tensor([cnt], dtype=torch.float64),
            torch.tensor([top], dtype=torch.float64),
            eps,
        )
        assert abs((g[0] * d).sum().item() - fd) < 1e-7 * max(1.0, abs(fd)), name


def test_multi_gradient_has_zero_row_and_column_sums(impl):
    weights, problems = MULTI_CASES["two_groups"]
    args, _ = _multi_case(weights, problems, 0.4, seed=13, iters=1500)
    out = impl.multi_sinkhorn_implicit_backward(**args).to(torch.float64)
    scale = out.abs().max().item()
    assert scale > 1e-3
    # Exact at the adjoint system's solution: zero to the solver's tolerance (1e-7).
    assert out.sum(-1).abs().max().item() < 1e-5 * scale
    assert out.sum(-2).abs().max().item() < 1e-5 * scale


# ---- float32, backends against each other, threads --------------------------------------------


def test_float32_agrees_with_float64(impl):
    plan, grad, rows, cols, _ = _sinkhorn_case(SIZES, 0.5, 2.0, seed=21)
    ref = torch_impl.sinkhorn_implicit_backward(grad, plan, rows, cols, 0.5, 2.0)
    out = impl.sinkhorn_implicit_backward(grad.float(), plan.float(), rows, cols, 0.5, 2.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-4 * ref.abs().max().item())
    weights, problems = MULTI_CASES["two_groups"]
    args, _ = _multi_case(weights, problems, 0.5, seed=22, iters=400)
    ref = torch_impl.multi_sinkhorn_implicit_backward(**args)
    args32 = {key: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for key, v in args.items()}
    out = impl.multi_sinkhorn_implicit_backward(**args32)
    assert out.dtype == torch.float32
    # float32 plans rebuilt from potentials, and D − c_G P_G cancelling: ~5e-4 relative here.
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-3 * ref.abs().max().item())


@given(
    sizes=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=4),
    rho=st.sampled_from([math.inf, 0.3, 4.0]),
    seed=st.integers(0, 2**16),
)
def test_rust_matches_torch_on_ragged_batches(sizes, rho, seed):
    from mmot.ops import _implicit_rust

    plan, grad, rows, cols, _ = _sinkhorn_case(sizes, 0.7, rho, seed=seed, iters=60)
    ref = torch_impl.sinkhorn_implicit_backward(grad, plan, rows, cols, 0.7, rho)
    out = _implicit_rust.sinkhorn_implicit_backward(grad, plan, rows, cols, 0.7, rho)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6 * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rust_results_do_not_depend_on_thread_count(monkeypatch, dtype):
    from mmot.ops import _implicit_rust

    gen = torch.Generator().manual_seed(9)
    # Wide rows so that one problem spans several row chunks (32 rows each at this width).
    s = torch.randn(2, 100, 300, dtype=torch.float64, generator=gen)
    plan = torch.softmax(s / 0.3, -1) / 100
    grad = torch.randn(2, 100, 300, dtype=torch.float64, generator=gen)
    rows, cols = torch.tensor([100, 77]), torch.tensor([300, 251])
    f = torch.randn(2, 2, 300, dtype=torch.float64, generator=gen) * 0.1
    gam = torch.randn(2, 100, 300, dtype=torch.float64, generator=gen) * 0.1
    h = torch.randn(2, 2, 100, dtype=torch.float64, generator=gen) * 0.1
    counts = torch.tensor([[150.0, 150.0], [100.0, 151.0]], dtype=torch.float64)
    tops = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)
    s, plan, grad, f, gam, h, counts, tops = (x.to(dtype) for x in (s, plan, grad, f, gam, h, counts, tops))
    results = []
    for threads in ["1", "2", "3"]:
        monkeypatch.setenv("MMOT_NUM_THREADS", threads)
        a = _implicit_rust.sinkhorn_implicit_backward(grad, plan, rows, cols, 0.3, 2.0)
        b = _implicit_rust.multi_sinkhorn_implicit_backward(grad, s, f, gam, h, rows, cols, [1.0, 0.5], counts, tops, 0.3)
        c = _implicit_rust.multi_sinkhorn_implicit_backward(grad, s, f, gam, h, rows, cols, [1.0, 0.5], counts, tops, 0.3, "minmax")
        results.append((a, b, c))
    for result in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(result, results[0]))
    assert all(x.abs().max() > 0 for x in results[0])


def test_rust_rejects_bad_counts():
    from mmot.ops import _implicit_rust

    p = torch.full((1, 2, 2), 0.25, dtype=torch.float64)
    with pytest.raises(ValueError, match="row_counts"):
        _implicit_rust.sinkhorn_implicit_backward(p, p, torch.tensor([3]), torch.tensor([2]), 0.1, math.inf)
    with pytest.raises(ValueError, match="col_counts"):
        _implicit_rust.sinkhorn_implicit_backward(p, p, torch.tensor([2]), torch.tensor([0]), 0.1, math.inf)


def test_triton_small_row_tiles_match_torch(monkeypatch):
    # Tiny shapes span one tile under the interpreter; force 2-row tiles so that every pass
    # (and Multi-SK's workspace round trip between passes) runs over several tiles.
    from mmot.kernels import _common

    monkeypatch.setattr(_common, "FORCE_TILE_ROWS", 2)
    tri = _impl("triton")
    plan, grad, rows, cols, refs = _sinkhorn_case(SIZES, 0.5, 0.8, seed=31)
    _check_blocks(tri.sinkhorn_implicit_backward(grad, plan, rows, cols, 0.5, 0.8), refs, 1e-6)
    weights, problems = MULTI_CASES["absent_group"]
    args, refs = _multi_case(weights, problems, 0.5, seed=32)
    _check_blocks(tri.multi_sinkhorn_implicit_backward(**args), refs, 1e-6)


@given(
    shapes=st.lists(st.tuples(st.integers(1, 7), st.integers(2, 6)), min_size=1, max_size=3),
    weights=st.sampled_from([[1.0, 0.25], [0.5, 1.0, 2.0]]),
    seed=st.integers(0, 2**16),
)
def test_multi_rust_matches_torch_on_ragged_batches(shapes, weights, seed):
    from mmot.ops import _implicit_rust

    gen = torch.Generator().manual_seed(seed)
    problems = []
    for n, k in shapes:
        # Random slot counts summing to k (some groups absent), tops at most the counts.
        cut = sorted(torch.randint(0, k + 1, (len(weights) - 1,), generator=gen).tolist())
        cnt = [float(b - a) for a, b in zip([0, *cut], [*cut, k])]
        top = [float(torch.randint(0, int(c) + 1, (1,), generator=gen).item()) for c in cnt]
        problems.append((n, k, cnt, top))
    args, _ = _multi_case(weights, problems, 0.6, seed=seed, iters=30)
    ref = torch_impl.multi_sinkhorn_implicit_backward(**args)
    out = _implicit_rust.multi_sinkhorn_implicit_backward(**args)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * max(1.0, ref.abs().max().item()))


# ---- min-max inside the Rust kernel -----------------------------------------------------------


# As MULTI_CASES, with no tops proportional to the counts: those make T_raw's rows constant
# (Σ_G c_G P_G = 1), which min-max maps to 0.
MINMAX_CASES = {
    "two_groups": ([1.0, 0.6], [(5, 4, [2.0, 2.0], [2.0, 0.0]), (7, 5, [3.0, 2.0], [2.0, 1.0]), (3, 3, [1.0, 2.0], [0.0, 2.0])]),
    "absent_group": MULTI_CASES["absent_group"],
}


@pytest.mark.parametrize("case", list(MINMAX_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_multi_rust_minmax_matches_unrolled_autograd_at_convergence(case, dtype):
    from mmot.ops import _implicit_rust

    weights, problems = MINMAX_CASES[case]
    args, refs = _multi_case(weights, problems, 0.5, seed=41, minmax=True)
    args = {key: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for key, v in args.items()}
    out = _implicit_rust.multi_sinkhorn_implicit_backward(**args, normalize="minmax")
    assert out.dtype == dtype
    # float32: as test_float32_agrees_with_float64, plus min-max's 1/(max − min).
    _check_blocks(out.double(), refs, 1e-6 if dtype == torch.float64 else 5e-3)


@given(
    shapes=st.lists(st.tuples(st.integers(1, 7), st.integers(2, 6)), min_size=1, max_size=3),
    weights=st.sampled_from([[1.0, 0.25], [0.5, 1.0, 2.0]]),
    seed=st.integers(0, 2**16),
)
def test_multi_rust_minmax_matches_torch_minmax_vjp_then_torch(shapes, weights, seed):
    # The op's torch path (min-max VJP from the rebuilt T_raw in torch, then the torch solve)
    # against the Rust kernel's fused one, on ragged batches with NaN padding.
    from mmot.ops import _implicit_rust
    from mmot.ops.multi_sinkhorn_ext import _minmax_vjp

    gen = torch.Generator().manual_seed(seed)
    problems = []
    for n, k in shapes:
        cut = sorted(torch.randint(0, k + 1, (len(weights) - 1,), generator=gen).tolist())
        cnt = [float(b - a) for a, b in zip([0, *cut], [*cut, k])]
        top = [float(torch.randint(0, int(c) + 1, (1,), generator=gen).item()) for c in cnt]
        # Tops proportional to the counts make T_raw's rows constant up to the unconverged
        # iteration's residue, which min-max's 1/(max − min) then blows up (ill-posed).
        assume(len({t / c for t, c in zip(top, cnt) if c}) > 1)
        problems.append((n, k, cnt, top))
    args, _ = _multi_case(weights, problems, 0.6, seed=seed, iters=30)
    keys = ("grad_raw", "scores", "F", "Gam", "H", "row_counts", "col_counts", "weights", "tops", "eps")
    grad_raw = _minmax_vjp(*(args[key] for key in keys))
    ref = torch_impl.multi_sinkhorn_implicit_backward(**{**args, "grad_raw": grad_raw})
    out = _implicit_rust.multi_sinkhorn_implicit_backward(**args, normalize="minmax")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * max(1.0, ref.abs().max().item()))


def test_multi_rust_minmax_constant_rows_have_zero_gradient():
    # Equal weights make every row of T_raw constant in exact arithmetic, and only rounding
    # noise apart in the kernel: min-max maps such rows to 0 (the forward's rule), so the
    # gradient is exactly 0; a kernel that divided by max − min there would not give 0.
    from mmot.ops import _implicit_rust

    args, _ = _multi_case([0.8, 0.8], [(5, 4, [2.0, 2.0], [1.0, 2.0]), (4, 3, [1.0, 2.0], [1.0, 1.0])], 0.5, seed=5, iters=300)
    out = _implicit_rust.multi_sinkhorn_implicit_backward(**args, normalize="minmax")
    assert (out == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_op_kernels_take_the_minmax_upstream(backend):
    # The op's kernel table: torch and Triton get the min-max VJP in torch first, Rust fuses it.
    from mmot.ops import multi_sinkhorn_ext

    weights, problems = MINMAX_CASES["absent_group"]
    args, refs = _multi_case(weights, problems, 0.5, seed=43, minmax=True)
    out = multi_sinkhorn_ext._IMPLICIT(backend, *args.values(), "minmax")
    _check_blocks(out, refs, 1e-6)
