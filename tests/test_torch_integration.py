"""torch.library registration of every op: opcheck and torch.compile(fullgraph=True), forward and backward."""

import mmot
import pytest
import torch
from inputs import positive_pairs, random_scores, uniform_cosines
from mmot.ops.anchor_consistency import anchor_consistency_op
from mmot.ops.info_nce import info_nce_op
from mmot.ops.multi_sinkhorn import multi_sinkhorn_op
from mmot.ops.similarity import similarity_op
from mmot.ops.sinkhorn import sinkhorn_op
from naive import softplus_anchor_consistency


def op_samples(backend):
    scores = random_scores(2, 7, 5, seed=1).requires_grad_(True)
    rows = torch.ones(2, 7, dtype=torch.float64)
    cols = torch.full((2, 5), 7 / 5, dtype=torch.float64)
    mass = torch.full((2, 5), 7 / 5, dtype=torch.float64)
    x = random_scores(3, 1, 4, 6, seed=2).requires_grad_(True)
    y = random_scores(1, 2, 5, 6, seed=3).requires_grad_(True)
    weights = [0.25, 0.25, 0.25, 1.0, 1.0]
    a, b = positive_pairs(7, 5, 12)
    pair_weights = torch.tensor([1, 1, 0, 1, 1, 1, 1], dtype=torch.float64)
    sim, target = uniform_cosines(6, 4, seed=4).requires_grad_(True), uniform_cosines(6, 4, seed=5).abs()
    return {
        "sinkhorn": (sinkhorn_op, (scores, 0.3, 3, rows, cols, "auto", backend)),
        "sinkhorn_log": (sinkhorn_op, (scores, 0.3, 3, rows, cols, "on", backend)),
        "multi_sinkhorn": (multi_sinkhorn_op, (scores, 0.3, 4, weights, 2, mass, "minmax", "auto", backend)),
        "multi_sinkhorn_log": (multi_sinkhorn_op, (scores, 0.3, 4, weights, 2, mass, "none", "on", backend)),
        "similarity": (similarity_op, (x, y, True, 2.0, backend)),
        "info_nce": (info_nce_op, (a, b, pair_weights, 0.2, True, True, backend)),
        "info_nce_plain": (info_nce_op, (a, b, pair_weights, 0.5, False, False, backend)),
        "anchor_consistency": (anchor_consistency_op, (sim, target, 0.1, backend)),
    }


@pytest.mark.parametrize("name", list(op_samples("torch")))
def test_opcheck(native_backend, name):
    op, args = op_samples(native_backend)[name]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_forward_and_backward(native_backend):
    torch._dynamo.reset()

    def step(feats, anchors):
        scores = mmot.similarity(feats, anchors, backend=native_backend)
        with torch.no_grad():
            targets = mmot.multi_sinkhorn(scores, 3, backend=native_backend)
        q = mmot.sinkhorn(scores, 0.1, 3, backend=native_backend)
        multi = mmot.multi_sinkhorn(scores, 3, 0.2, 5, normalize="none", backend=native_backend)
        return (scores * targets).sum() + (q * scores).sum() + multi.square().sum()

    feats = random_scores(10, 8, seed=4).requires_grad_(True)
    anchors = random_scores(6, 8, seed=5).requires_grad_(True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(feats, anchors)
    loss.backward()
    eager_feats, eager_anchors = feats.detach().clone().requires_grad_(True), anchors.detach().clone().requires_grad_(True)
    eager_loss = step(eager_feats, eager_anchors)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(feats.grad, eager_feats.grad)
    torch.testing.assert_close(anchors.grad, eager_anchors.grad)


def test_compile_info_nce_with_masks(native_backend):
    torch._dynamo.reset()

    def step(a, b, valid):
        return mmot.info_nce(a, b, 0.1, valid=valid, backend=native_backend) + mmot.info_nce(a, b, symmetric=False, backend=native_backend)

    a, b = positive_pairs(12, 6, 13)
    valid = torch.arange(12) % 4 != 0
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(a, b, valid)
    got = torch.autograd.grad(loss, (a, b))
    want_loss = step(a, b, valid)
    torch.testing.assert_close(loss, want_loss)
    for g, w in zip(got, torch.autograd.grad(want_loss, (a, b))):
        torch.testing.assert_close(g, w)


def test_compile_anchor_consistency_against_its_softplus_form(native_backend):
    sim = uniform_cosines(6, 4, seed=4).requires_grad_(True)
    target = uniform_cosines(6, 4, seed=5).abs()
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda s, t: mmot.anchor_consistency_loss(s * 1.0, t, backend=native_backend), fullgraph=True, backend="aot_eager"
    )
    (grad,) = torch.autograd.grad(compiled(sim, target), sim)
    (want,) = torch.autograd.grad(softplus_anchor_consistency(sim, target, 0.1), sim)
    torch.testing.assert_close(grad, want)


def test_compile_with_inductor():
    torch._dynamo.reset()
    scores = random_scores(12, 6, seed=6, dtype=torch.float32).requires_grad_(True)
    compiled = torch.compile(lambda s: mmot.multi_sinkhorn(s * 2.0, 3).sum(-1).square().mean(), fullgraph=True)
    compiled(scores).backward()
    assert scores.grad is not None and bool(torch.isfinite(scores.grad).all())
