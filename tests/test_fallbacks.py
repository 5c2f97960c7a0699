"""The op layer's fallbacks to the torch backend: rows too wide for a Triton tile, and empty inputs.

Only the op layer decides them (docs/architecture.md, Fallbacks): a call the Triton Sinkhorn
kernels cannot take, or one with no work, runs ``mmot.reference`` forward and the
``mmot.reverse`` backward instead. No test shape reaches the real tile limit, so the too-wide
tests shrink it under the interpreter and check that the Triton kernels are not called while
values and gradients match autograd through the reference in float64.
"""

import mmot
import pytest
import torch
from backends import ALL, needs_triton
from gradients import F64, assert_matches_reference, value_and_grads
from inputs import positive_pairs, random_scores, uniform_cosines
from mmot import reference
from mmot.ops.multi_sinkhorn import multi_sinkhorn_backward_op, multi_sinkhorn_op
from mmot.ops.sinkhorn import sinkhorn_backward_op, sinkhorn_op

# ---------------------------------------------------------------- too wide for a Triton tile

NARROW = 4  # the tile limit under test: rows of at most 4 columns (Multi-SK: columns × weight groups)


@pytest.fixture
def narrow_tiles(monkeypatch):
    """Shrink the Triton tile limit and record every call into the Sinkhorn kernels' entry points."""
    from mmot.kernels import _common
    from mmot.kernels import multi_sinkhorn as multi_kernels
    from mmot.kernels import sinkhorn as sinkhorn_kernels

    monkeypatch.setattr(_common, "MAX_BLOCK_K", NARROW)
    calls = []
    for module in (sinkhorn_kernels, multi_kernels):
        for entry in ("forward", "backward"):
            monkeypatch.setattr(module, entry, recording(calls, f"{module.__name__}.{entry}", getattr(module, entry)))
    return calls


def recording(calls, name, run):
    def spy(*args):
        calls.append(name)
        return run(*args)

    return spy


def sinkhorn_masses(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.rand(shape[:-1], generator=generator, dtype=torch.float64) + 0.5
    cols = torch.rand(shape[:-2] + shape[-1:], generator=generator, dtype=torch.float64) + 0.5
    return rows, cols * (rows.sum(-1, keepdim=True) / cols.sum(-1, keepdim=True))


@needs_triton
@pytest.mark.parametrize("shape", [(7, 5), (2, 6, 9)])
def test_sinkhorn_too_wide_runs_torch(narrow_tiles, shape):
    scores = random_scores(*shape, seed=sum(shape))
    rows, cols = sinkhorn_masses(shape, seed=1)
    upstream = random_scores(*shape, seed=2)
    assert_matches_reference(
        lambda s: mmot.sinkhorn(s, 0.3, 4, row_mass=rows, col_mass=cols, backend="triton"),
        lambda s: reference.sinkhorn(s, 0.3, 4, rows, cols),
        [scores],
        upstream,
    )
    assert narrow_tiles == []


@needs_triton
@pytest.mark.parametrize("low_weight,n_anchors", [(0.25, 3), (0.4, 4), (0.25, 5)])
def test_multi_sinkhorn_too_wide_runs_torch(narrow_tiles, low_weight, n_anchors):
    # Two weight groups: a row of the tile holds 4·2, 4·2 or 8·2 > 4 values.
    shape, k = (2, 6, n_anchors), 2
    scores = random_scores(*shape, seed=n_anchors)
    weights = [low_weight] * (n_anchors - k) + [1.0] * k
    mass = torch.full((n_anchors,), shape[-2] / n_anchors, dtype=torch.float64).expand(shape[0], n_anchors)
    upstream = random_scores(*shape, seed=3)
    assert_matches_reference(
        lambda s: mmot.multi_sinkhorn(s, k, 0.3, 4, low_weight=low_weight, backend="triton"),
        lambda s: reference.multi_sinkhorn(s, 0.3, 4, weights, k, mass, "minmax"),
        [scores],
        upstream,
    )
    assert narrow_tiles == []


@needs_triton
def test_calls_that_fit_still_run_triton(narrow_tiles):
    """The spies see calls within the limit: the tests above prove a fallback, not a broken spy."""
    scores = random_scores(5, 4, seed=4).requires_grad_(True)
    mmot.sinkhorn(scores, 0.3, 2, backend="triton").sum().backward()
    # One weight group: 2 anchors fill half a row forward; the reverse pass counts rows double.
    anchors = random_scores(5, 2, seed=5).requires_grad_(True)
    mmot.multi_sinkhorn(anchors, 2, 0.3, 2, low_weight=1.0, backend="triton").sum().backward()
    prefix = "mmot.kernels."
    assert narrow_tiles == [prefix + name for name in ("sinkhorn.forward", "sinkhorn.backward")] + [
        prefix + name for name in ("multi_sinkhorn.forward", "multi_sinkhorn.backward")
    ]


@needs_triton
def test_multi_sinkhorn_backward_falls_back_alone(narrow_tiles):
    """2 anchors in 2 weight groups fill a row forward, and twice that backward: the forward runs
    Triton, the backward torch."""
    scores = random_scores(5, 2, seed=6)
    upstream = random_scores(5, 2, seed=7)
    assert_matches_reference(
        lambda s: mmot.multi_sinkhorn(s, 1, 0.3, 3, low_weight=0.25, backend="triton"),
        lambda s: reference.multi_sinkhorn(s, 0.3, 3, [0.25, 1.0], 1, torch.full((2,), 5 / 2, dtype=torch.float64), "minmax"),
        [scores],
        upstream,
    )
    assert narrow_tiles == ["mmot.kernels.multi_sinkhorn.forward"]


# ---------------------------------------------------------------- empty inputs

EMPTY_SCORES = [(0, 5), (3, 0, 4), (0, 5, 4)]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("shape", EMPTY_SCORES)
def test_sinkhorn_ops_empty_results(backend, shape):
    scores = random_scores(*shape)
    for out in (mmot.sinkhorn(scores, backend=backend), mmot.multi_sinkhorn(scores, backend=backend)):
        assert out.shape == scores.shape and out.dtype == scores.dtype


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sinkhorn_forward_and_backward_ops_on_empty_batches(backend, dtype):
    """The ops themselves on zero problems: forward and backward run the torch backend."""
    scores, grad = random_scores(0, 5, 4, dtype=dtype), random_scores(0, 5, 4, dtype=dtype)
    acc = reference.compute_dtype(dtype)
    rows, cols = torch.ones(0, 5, dtype=acc), torch.ones(0, 4, dtype=acc)
    for out in (
        sinkhorn_op(scores, 0.3, 3, rows, cols, "auto", backend),
        sinkhorn_backward_op(grad, scores, 0.3, 3, rows, cols, "auto", backend),
        multi_sinkhorn_op(scores, 0.3, 3, [0.25, 0.25, 1.0, 1.0], 2, cols, "minmax", "auto", backend),
        multi_sinkhorn_backward_op(grad, scores, 0.3, 3, [0.25, 0.25, 1.0, 1.0], 2, cols, "minmax", "auto", backend),
    ):
        assert out.shape == scores.shape and out.dtype == dtype


def assert_empty_case_matches(fn, reference_fn, inputs, upstream):
    """Values and input gradients against autograd through the reference (shapes, dtypes, values)."""
    out, got = value_and_grads(fn, inputs, upstream)
    ref, want = value_and_grads(reference_fn, inputs, upstream)
    torch.testing.assert_close(out, ref, **F64)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **F64)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("x_shape,y_shape", [((2, 0, 3), (4, 3)), ((5, 0), (4, 0)), ((0, 1, 3), (1, 6, 3))])
def test_similarity_empty(backend, x_shape, y_shape):
    x, y = random_scores(*x_shape, seed=1), random_scores(*y_shape, seed=2)
    upstream = random_scores(*torch.broadcast_shapes(x_shape[:-2], y_shape[:-2]), x_shape[-2], y_shape[-2], seed=3)
    assert_empty_case_matches(
        lambda a, b: mmot.similarity(a, b, scale=2.0, backend=backend),
        lambda a, b: reference.similarity(a, b, True, 2.0),
        [x, y],
        upstream,
    )


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("n,d", [(0, 8), (4, 0)])
def test_info_nce_empty(backend, n, d):
    a, b = positive_pairs(n, d, seed=5)
    valid = torch.ones(n, dtype=torch.bool)
    assert_empty_case_matches(
        lambda x, y: mmot.info_nce(x, y, 0.1, reduction="none", backend=backend),
        lambda x, y: reference.info_nce(x, y, valid, 0.1),
        [a, b],
        random_scores(n, seed=6),
    )
    loss = mmot.info_nce(a, b, 0.1, backend=backend)
    grads = torch.autograd.grad(loss, (a, b))
    assert loss.shape == () and torch.isfinite(loss)
    if n == 0:
        assert loss.item() == 0.0
    assert [g.shape for g in grads] == [a.shape, b.shape]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("shape", [(0, 5), (0,), (3, 0, 2)])
def test_anchor_consistency_empty(backend, shape):
    sim = uniform_cosines(*shape).requires_grad_(True)
    loss = mmot.anchor_consistency_loss(sim, uniform_cosines(*shape, seed=1).abs(), 0.1, backend=backend)
    (grad,) = torch.autograd.grad(loss, sim)
    assert loss.shape == () and loss.item() == 0.0
    assert grad.shape == sim.shape and grad.dtype == sim.dtype
