"""torch.library registration: opcheck and torch.compile(fullgraph=True), forward and backward."""

import pytest
import torch

import mmot
from inputs import random_scores
from mmot.ops.multi_sinkhorn import multi_sinkhorn_op
from mmot.ops.similarity import similarity_op
from mmot.ops.sinkhorn import sinkhorn_op


def op_samples(backend):
    scores = random_scores(2, 7, 5, seed=1).requires_grad_(True)
    rows = torch.ones(2, 7, dtype=torch.float64)
    cols = torch.full((2, 5), 7 / 5, dtype=torch.float64)
    mass = torch.full((2, 5), 7 / 5, dtype=torch.float64)
    x = random_scores(3, 1, 4, 6, seed=2).requires_grad_(True)
    y = random_scores(1, 2, 5, 6, seed=3).requires_grad_(True)
    weights = [0.25, 0.25, 0.25, 1.0, 1.0]
    return [
        (sinkhorn_op, (scores, 0.3, 3, rows, cols, "auto", backend)),
        (sinkhorn_op, (scores, 0.3, 3, rows, cols, "on", backend)),
        (multi_sinkhorn_op, (scores, 0.3, 4, weights, 2, mass, "minmax", "auto", backend)),
        (multi_sinkhorn_op, (scores, 0.3, 4, weights, 2, mass, "none", "on", backend)),
        (similarity_op, (x, y, True, 2.0, backend)),
    ]


@pytest.mark.parametrize("index", range(5))
def test_opcheck(backend, index):
    op, args = op_samples(backend)[index]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_forward_and_backward(backend):
    torch._dynamo.reset()

    def step(feats, anchors):
        scores = mmot.similarity(feats, anchors, backend=backend)
        with torch.no_grad():
            targets = mmot.multi_sinkhorn(scores, 3, backend=backend)
        q = mmot.sinkhorn(scores, 0.1, 3, backend=backend)
        multi = mmot.multi_sinkhorn(scores, 3, 0.2, 5, normalize="none", backend=backend)
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


def test_compile_with_inductor():
    torch._dynamo.reset()
    scores = random_scores(12, 6, seed=6, dtype=torch.float32).requires_grad_(True)
    compiled = torch.compile(lambda s: mmot.multi_sinkhorn(s * 2.0, 3).sum(-1).square().mean(), fullgraph=True)
    compiled(scores).backward()
    assert scores.grad is not None and bool(torch.isfinite(scores.grad).all())
