"""mmot.reverse (the torch backend's backward) against autograd through mmot.reference.

Every reverse pass is compared with ``torch.autograd.grad`` through the reference function it
differentiates: to 1e-9 in float64 over hypothesis-drawn odd shapes, batched leading dims and
random non-zero inputs and cotangents; float32 inputs against float64 autograd; empty inputs;
meta tensors (no host synchronisation, no CPU-only construct). Central finite differences check
one small case per op independently of autograd.
"""

from __future__ import annotations

import pathlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from inputs import cosine_scores, random_scores
from mmot import reference
from mmot.reverse import anchor_consistency, info_nce, multi_sinkhorn, similarity, sinkhorn

F64 = dict(rtol=1e-9, atol=1e-9)
F32 = dict(rtol=2e-3, atol=2e-4)
BATCHES = st.sampled_from([(), (2,), (1, 3)])
SEEDS = st.integers(0, 2**31 - 1)
DOMAINS = st.sampled_from(["on", "off"])


def autograd_vjp(fn, inputs, cotangent):
    """Gradients of fn(*inputs) against cotangent, by autograd in float64."""
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    return list(torch.autograd.grad(out, leaves, cotangent.double()))


def finite_difference_vjp(fn, inputs, cotangent, step=1e-6):
    """⟨cotangent, ∂fn/∂input⟩ for every input entry, by central differences in float64."""
    grads = []
    for index, tensor in enumerate(inputs):
        grad = torch.zeros_like(tensor)
        for entry in range(tensor.numel()):
            values = []
            for sign in (1.0, -1.0):
                moved = [t.clone() for t in inputs]
                moved[index].view(-1)[entry] += sign * step
                values.append((fn(*moved) * cotangent).sum())
            grad.view(-1)[entry] = (values[0] - values[1]) / (2 * step)
        grads.append(grad)
    return grads


def assert_grads_close(got, want, dtype=torch.float64, tol=None):
    """Entry-wise, relative to the largest entry of the expected gradient."""
    tol = tol or (F64 if dtype == torch.float64 else F32)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == w.shape
        scale = max(float(w.abs().max()), 1e-3)
        torch.testing.assert_close(g.double() / scale, w.double() / scale, **tol)


def cotangent_like(shape, seed, dtype=torch.float64):
    return random_scores(*shape, seed=seed + 1, dtype=dtype)


def positive_masses(shape, seed, total=None):
    """Non-uniform positive masses, scaled to ``total`` per problem when given."""
    mass = torch.rand(shape, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64) + 0.5
    return mass if total is None else mass / mass.sum(-1, keepdim=True) * total


# ---------------------------------------------------------------- sinkhorn


def sinkhorn_problem(batch, n, k, seed, spread=1.0, dtype=torch.float64):
    scores = random_scores(*batch, n, k, seed=seed, spread=spread, dtype=dtype)
    rows = positive_masses(batch + (n,), seed)
    cols = positive_masses(batch + (k,), seed + 3, rows.sum(-1, keepdim=True))
    return scores, rows, cols


@given(
    batch=BATCHES,
    n=st.integers(1, 9),
    k=st.integers(1, 7),
    eps=st.floats(0.1, 2.0),
    n_iters=st.integers(1, 6),
    spread=st.floats(0.1, 3.0),
    seed=SEEDS,
    log_domain=DOMAINS,
)
def test_sinkhorn_matches_autograd(batch, n, k, eps, n_iters, spread, seed, log_domain):
    scores, rows, cols = sinkhorn_problem(batch, n, k, seed, spread)
    upstream = cotangent_like(scores.shape, seed)
    want = autograd_vjp(lambda s: reference.sinkhorn(s, eps, n_iters, rows, cols, log_domain), [scores], upstream)
    got = sinkhorn.backward(upstream, scores, eps, n_iters, rows, cols, log_domain)
    assert_grads_close([got], want)


SMALL_EPS = {
    "sinkhorn": (reference.sinkhorn, sinkhorn.backward, (1e-3, 5, torch.ones(40, dtype=torch.float64), torch.full((9,), 40 / 9), "on")),
    "multi_sinkhorn": (
        reference.multi_sinkhorn,
        multi_sinkhorn.backward,
        (1e-3, 10, [0.25] * 5 + [1.0] * 4, 4, torch.full((9,), 40 / 9), "minmax", "on"),
    ),
}


@pytest.mark.parametrize("op", SMALL_EPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_small_eps_keeps_the_precision_of_autograd(op, dtype):
    """At eps = 1e-3 (|scores/eps| ~ 1000) the plans must still sum to their masses to rounding."""
    forward, backward, args = SMALL_EPS[op]
    scores = cosine_scores(40, 9, seed=0, dtype=dtype)
    upstream = cotangent_like(scores.shape, 0)
    want = autograd_vjp(lambda s: forward(s, *args), [scores], upstream)
    compute_args = tuple(arg.to(reference.compute_dtype(dtype)) if isinstance(arg, torch.Tensor) else arg for arg in args)
    got = backward(upstream.to(dtype), scores, *compute_args)
    # Autograd through the float32 reference is itself off by 2e-3 (sinkhorn) here; plans taken as
    # exp(L + a + b) instead of softmaxes were off by 0.7 in float32 and 2e-9 in float64.
    assert_grads_close([got], want, dtype, tol=None if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2))


# ---------------------------------------------------------------- multi_sinkhorn

WEIGHT_VALUES = [0.2, 0.35, 0.5, 0.8, 1.0, 1.3]


@st.composite
def multi_problems(draw):
    """(scores, eps, n_iters, slot_weights, k, anchor_mass) with 2 or 3 distinct slot weights."""
    batch = draw(BATCHES)
    n, n_slots = draw(st.integers(1, 9)), draw(st.integers(2, 6))
    n_distinct = min(draw(st.sampled_from([2, 3])), n_slots)
    values = draw(st.lists(st.sampled_from(WEIGHT_VALUES), min_size=n_distinct, max_size=n_distinct, unique=True))
    order = draw(st.permutations(range(n_slots)))
    weights = [values[order[slot] % n_distinct] for slot in range(n_slots)]
    k = draw(st.integers(1, n_slots))
    seed = draw(SEEDS)
    scores = random_scores(*batch, n, n_slots, seed=seed, spread=draw(st.floats(0.1, 3.0)))
    mass = positive_masses(batch + (n_slots,), seed, float(n))
    return scores, draw(st.floats(0.1, 2.0)), draw(st.integers(1, 6)), weights, k, mass, seed


def has_flat_row(scores, eps, n_iters, weights, k, mass):
    """Whether some row of T is nearly constant, where min-max only amplifies rounding."""
    raw = reference.multi_sinkhorn(scores, eps, n_iters, weights, k, mass, "none", "on")
    return bool(((raw.amax(-1) - raw.amin(-1)) < 1e-3).any())


@given(problem=multi_problems(), normalize=st.sampled_from(["minmax", "none"]), log_domain=DOMAINS)
def test_multi_sinkhorn_matches_autograd(problem, normalize, log_domain):
    scores, eps, n_iters, weights, k, mass, seed = problem
    assume(normalize == "none" or not has_flat_row(scores, eps, n_iters, weights, k, mass))
    upstream = cotangent_like(scores.shape, seed)
    args = (eps, n_iters, weights, k, mass, normalize, log_domain)
    want = autograd_vjp(lambda s: reference.multi_sinkhorn(s, *args), [scores], upstream)
    assert_grads_close([multi_sinkhorn.backward(upstream, scores, *args)], want)


@pytest.mark.parametrize("log_domain", ["on", "off"])
def test_multi_sinkhorn_minmax_ties_share_the_gradient(log_domain):
    """Identical columns tie exactly in T; amin/amax share the gradient between them equally."""
    base = random_scores(2, 7, 3, seed=11)
    # columns 0 and 3 are equal, low in even rows and high in odd rows: they tie at either end
    duplicate = base[..., :1] + 2.0 * torch.tensor([-1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0], dtype=torch.float64)[:, None]
    scores = torch.cat([duplicate, base[..., 1:], duplicate], -1)
    mass = torch.full((2, 4), 7 / 4, dtype=torch.float64)
    args = (0.5, 4, [0.3, 0.3, 1.0, 1.0], 2, mass, "minmax", log_domain)
    raw = reference.multi_sinkhorn(scores, *args[:-2], "none", log_domain)
    assert bool((raw[..., 0] == raw[..., 3]).all())
    assert int((raw[..., 0] == raw.amin(-1)).sum()) >= 6 and int((raw[..., 0] == raw.amax(-1)).sum()) >= 6
    upstream = cotangent_like(scores.shape, 5)
    want = autograd_vjp(lambda s: reference.multi_sinkhorn(s, *args), [scores], upstream)
    assert_grads_close([multi_sinkhorn.backward(upstream, scores, *args)], want)


@pytest.mark.parametrize("n_anchors", [1, 4])
def test_multi_sinkhorn_constant_rows_have_zero_gradient(n_anchors):
    """Rows of T that are constant (one anchor, or identical anchors) min-max to 0 with zero gradient."""
    scores = random_scores(6, 1, seed=3).expand(6, n_anchors).contiguous()
    mass = torch.full((n_anchors,), 6 / n_anchors, dtype=torch.float64)
    args = (0.4, 3, [0.5] * (n_anchors // 2) + [1.0] * (n_anchors - n_anchors // 2), max(1, n_anchors // 2), mass, "minmax", "on")
    assert bool((reference.multi_sinkhorn(scores, *args) == 0).all())
    upstream = cotangent_like(scores.shape, 3)
    want = autograd_vjp(lambda s: reference.multi_sinkhorn(s, *args), [scores], upstream)
    got = multi_sinkhorn.backward(upstream, scores, *args)
    assert bool((want[0] == 0).all() and (got == 0).all())


# ---------------------------------------------------------------- similarity

BROADCAST_BATCHES = st.sampled_from([((), ()), ((2,), ()), ((), (3,)), ((2, 1), (3,)), ((1, 3), (2, 1)), ((3,), (1,))])


@given(
    batches=BROADCAST_BATCHES,
    n=st.integers(1, 7),
    m=st.integers(1, 7),
    d=st.integers(1, 6),
    normalize=st.booleans(),
    scale=st.floats(0.2, 3.0),
    negative=st.booleans(),
    seed=SEEDS,
)
def test_similarity_matches_autograd(batches, n, m, d, normalize, scale, negative, seed):
    scale = -scale if negative else scale
    x = random_scores(*batches[0], n, d, seed=seed)
    y = random_scores(*batches[1], m, d, seed=seed + 7)
    out_shape = torch.broadcast_shapes(batches[0], batches[1]) + (n, m)
    upstream = cotangent_like(out_shape, seed)
    want = autograd_vjp(lambda a, b: reference.similarity(a, b, normalize, scale), [x, y], upstream)
    assert_grads_close(similarity.backward(upstream, x, y, normalize, scale), want)


def test_similarity_zero_row_takes_the_norm_floor():
    """A zero row normalises to 0 by the 1e-12 floor, and its gradient is the unprojected one."""
    x = random_scores(4, 3, seed=1)
    x[2] = 0.0
    y = random_scores(5, 3, seed=2)
    upstream = cotangent_like((4, 5), 3)
    want = autograd_vjp(lambda a, b: reference.similarity(a, b, True, 1.0), [x, y], upstream)
    assert_grads_close(similarity.backward(upstream, x, y, True, 1.0), want)


# ---------------------------------------------------------------- info_nce


def lse_like_the_op(a, b, weights, temperature, normalize):
    """Row log-sum-exps over the valid columns, as ``ops/info_nce.py`` computes them for the torch backend."""
    dtype = reference.compute_dtype(a.dtype)
    x, y = a.to(dtype), b.to(dtype)
    if normalize:
        x, y = F.normalize(x, dim=-1, eps=1e-12), F.normalize(y, dim=-1, eps=1e-12)
    logits = (x @ y.T) / temperature
    return torch.logsumexp(logits.masked_fill(weights[None, :] == 0, float("-inf")), dim=1)


def info_nce_case(a, b, weights, temperature, symmetric, normalize, upstream):
    lse_a = lse_like_the_op(a, b, weights, temperature, normalize)
    lse_b = lse_like_the_op(b, a, weights, temperature, normalize) if symmetric else torch.zeros_like(lse_a)
    got = info_nce.backward(upstream, a, b, weights, lse_a, lse_b, temperature, symmetric, normalize)
    want = autograd_vjp(lambda x, y: reference.info_nce(x, y, weights != 0, temperature, symmetric, normalize), [a, b], upstream)
    return got, want


@given(
    n=st.integers(1, 9),
    d=st.integers(1, 6),
    valid=st.lists(st.booleans(), min_size=9, max_size=9),
    temperature=st.floats(0.1, 2.0),
    symmetric=st.booleans(),
    normalize=st.booleans(),
    seed=SEEDS,
)
def test_info_nce_matches_autograd(n, d, valid, temperature, symmetric, normalize, seed):
    a, b = random_scores(n, d, seed=seed), random_scores(n, d, seed=seed + 5)
    weights = torch.tensor(valid[:n], dtype=torch.float64)
    upstream = cotangent_like((n,), seed)
    got, want = info_nce_case(a, b, weights, temperature, symmetric, normalize, upstream)
    assert_grads_close(got, want)


# ---------------------------------------------------------------- anchor_consistency


@given(
    shape=st.sampled_from([(5,), (3, 7), (2, 5, 3)]),
    temperature=st.floats(0.1, 2.0),
    upstream=st.floats(0.1, 3.0),
    seed=SEEDS,
)
def test_anchor_consistency_matches_autograd(shape, temperature, upstream, seed):
    sim = random_scores(*shape, seed=seed).clamp(-1.0, 1.0)
    target = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grad = torch.tensor(upstream, dtype=torch.float64)
    want = autograd_vjp(lambda s: reference.anchor_consistency_loss(s, target, temperature), [sim], grad)
    assert_grads_close([anchor_consistency.backward(grad, sim, target, temperature)], want)


# ---------------------------------------------------------------- every op: cases shared below


def sinkhorn_case(dtype=torch.float64):
    scores, rows, cols = sinkhorn_problem((2,), 5, 3, seed=21, dtype=dtype)
    args = (0.5, 3, rows.to(reference.compute_dtype(dtype)), cols.to(reference.compute_dtype(dtype)), "auto")
    return [scores], args, cotangent_like(scores.shape, 21, dtype), reference.sinkhorn, sinkhorn.backward


def multi_sinkhorn_case(dtype=torch.float64):
    scores = random_scores(2, 5, 4, seed=22, dtype=dtype)
    mass = positive_masses((2, 4), 22, 5.0).to(reference.compute_dtype(dtype))
    args = (0.5, 3, [0.25, 0.5, 1.0, 1.0], 2, mass, "minmax", "auto")
    return [scores], args, cotangent_like(scores.shape, 22, dtype), reference.multi_sinkhorn, multi_sinkhorn.backward


def similarity_case(dtype=torch.float64):
    x, y = random_scores(2, 1, 4, 3, seed=23, dtype=dtype), random_scores(3, 5, 3, seed=24, dtype=dtype)
    upstream = cotangent_like((2, 3, 4, 5), 23, dtype)
    return [x, y], (True, 1.5), upstream, reference.similarity, similarity.backward


def info_nce_full_case(dtype=torch.float64):
    a, b = random_scores(6, 3, seed=25, dtype=dtype), random_scores(6, 3, seed=26, dtype=dtype)
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=reference.compute_dtype(dtype))
    lse_a, lse_b = (lse_like_the_op(p, q, weights, 0.3, True) for p, q in ((a, b), (b, a)))

    def forward(x, y, weights, lse_a, lse_b, temperature, symmetric, normalize):
        return reference.info_nce(x, y, weights != 0, temperature, symmetric, normalize)

    args = (weights, lse_a, lse_b, 0.3, True, True)
    return [a, b], args, cotangent_like((6,), 25, dtype), forward, info_nce.backward


def anchor_consistency_case(dtype=torch.float64):
    sim = random_scores(2, 4, 3, seed=27, dtype=dtype).clamp(-1.0, 1.0)
    target = torch.rand(sim.shape, generator=torch.Generator().manual_seed(27), dtype=torch.float64).to(dtype)
    return [sim], (target, 0.2), torch.tensor(0.7, dtype=dtype), reference.anchor_consistency_loss, anchor_consistency.backward


CASES = [sinkhorn_case, multi_sinkhorn_case, similarity_case, info_nce_full_case, anchor_consistency_case]


def run_backward(backward, upstream, inputs, args):
    grads = backward(upstream, *inputs, *args)
    return list(grads) if isinstance(grads, list) else [grads]


@pytest.mark.parametrize("case", CASES)
def test_finite_differences_agree(case):
    """An independent check: central differences of the reference forward, no autograd."""
    inputs, args, upstream, forward, backward = case()
    with torch.no_grad():
        want = finite_difference_vjp(lambda *xs: forward(*xs, *args), inputs, upstream)
    assert_grads_close(run_backward(backward, upstream, inputs, args), want, tol=dict(rtol=1e-6, atol=1e-6))


@pytest.mark.parametrize("case", CASES)
def test_float32_inputs_against_float64_autograd(case):
    inputs, args, upstream, forward, backward = case(torch.float32)
    args64 = tuple(arg.double() if isinstance(arg, torch.Tensor) else arg for arg in args)
    want = autograd_vjp(lambda *xs: forward(*xs, *args64), inputs, upstream)
    assert_grads_close(run_backward(backward, upstream, inputs, args), want, torch.float32)


@pytest.mark.parametrize("case", CASES)
def test_bfloat16_inputs_give_bfloat16_gradients(case):
    inputs, args, upstream, _, backward = case(torch.bfloat16)
    for grad, tensor in zip(run_backward(backward, upstream, inputs, args), inputs):
        assert grad.dtype == torch.bfloat16 and grad.shape == tensor.shape and bool(grad.isfinite().all())


@pytest.mark.parametrize("case", CASES)
def test_meta_tensors_run_without_data(case):
    """Pure tensor ops with no host synchronisation: the passes trace on the meta device."""
    inputs, args, upstream, _, backward = case()
    meta = [t.to("meta") for t in inputs]
    meta_args = tuple(arg.to("meta") if isinstance(arg, torch.Tensor) else arg for arg in args)
    grads = run_backward(backward, upstream.to("meta"), meta, meta_args)
    for grad, tensor in zip(grads, meta):
        assert grad.device.type == "meta" and grad.shape == tensor.shape and grad.dtype == tensor.dtype


# ---------------------------------------------------------------- empty inputs


def empty_grads():
    """(name, gradients, expected shapes) for empty inputs of every op."""
    f64 = dict(dtype=torch.float64)
    for shape in [(0, 3), (4, 0), (0, 4, 3)]:
        scores = torch.empty(shape, **f64)
        rows, cols = torch.ones(shape[:-1], **f64), torch.ones(shape[:-2] + shape[-1:], **f64)
        yield "sinkhorn", [sinkhorn.backward(torch.empty(shape, **f64), scores, 0.5, 3, rows, cols, "auto")], [shape]
        got = multi_sinkhorn.backward(torch.empty(shape, **f64), scores, 0.5, 3, [0.5, 1.0, 1.0][: shape[-1]], 1, cols, "minmax", "auto")
        yield "multi_sinkhorn", [got], [shape]
    for x_shape, y_shape, out_shape in [((0, 3), (4, 3), (0, 4)), ((5, 0), (4, 0), (5, 4)), ((0, 2, 3), (1, 4, 3), (0, 2, 4))]:
        x, y = torch.randn(x_shape, **f64), torch.randn(y_shape, **f64)
        yield "similarity", similarity.backward(torch.ones(out_shape, **f64), x, y, True, 1.0), [x_shape, y_shape]
    for shape in [(0, 3), (4, 0)]:
        a, n = torch.empty(shape, **f64), shape[0]
        ones = torch.ones(n, **f64)
        yield "info_nce", info_nce.backward(ones, a, a.clone(), ones, ones, ones, 0.1, True, True), [shape, shape]
    for shape in [(0,), (0, 5)]:
        sim = torch.empty(shape, **f64)
        yield "anchor_consistency", [anchor_consistency.backward(torch.tensor(1.0, **f64), sim, sim.clone(), 0.1)], [shape]


@pytest.mark.parametrize("name, grads, shapes", list(empty_grads()))
def test_empty_inputs_give_zero_gradients(name, grads, shapes):
    for grad, shape in zip(grads, shapes, strict=True):
        assert grad.shape == shape and grad.dtype == torch.float64 and not bool(grad.any())


def test_reverse_passes_use_no_autograd_and_no_private_torch():
    sources = pathlib.Path(sinkhorn.__file__).parent.glob("*.py")
    for path in sources:
        text = path.read_text()
        for forbidden in ("torch.autograd", "torch.func", "torch._C", "requires_grad", "enable_grad"):
            assert forbidden not in text, f"{path.name} uses {forbidden}"
