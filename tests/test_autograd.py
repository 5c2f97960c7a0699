"""Gradients: gradcheck in float64 and agreement with autograd through the naive forms."""

import pytest
import torch

import mmot
from inputs import random_scores
from naive import dense_multi_sinkhorn, swav_sinkhorn


def leaf(tensor):
    return tensor.clone().requires_grad_(True)


@pytest.mark.parametrize("log_domain", [True, False])
def test_sinkhorn_gradcheck(backend, log_domain):
    scores = leaf(random_scores(5, 4, seed=1))
    rows = torch.tensor([1.0, 2.0, 1.0, 0.5, 1.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda s: mmot.sinkhorn(s, 0.4, 3, row_mass=rows, log_domain=log_domain, backend=backend), (scores,)
    )


@pytest.mark.parametrize("normalize", ["minmax", "none"])
@pytest.mark.parametrize("log_domain", [True, False])
def test_multi_sinkhorn_gradcheck(backend, normalize, log_domain):
    scores = leaf(random_scores(6, 5, seed=2))
    assert torch.autograd.gradcheck(
        lambda s: mmot.multi_sinkhorn(s, 2, 0.3, 4, normalize=normalize, log_domain=log_domain, backend=backend), (scores,)
    )


def test_similarity_gradcheck_with_broadcasting(backend):
    x = leaf(random_scores(2, 1, 4, 3, seed=3))
    y = leaf(random_scores(1, 3, 5, 3, seed=4))
    assert torch.autograd.gradcheck(lambda a, b: mmot.similarity(a, b, scale=2.0, backend=backend), (x, y))


def test_multi_sinkhorn_gradient_equals_dense_autograd(backend):
    scores = random_scores(9, 6, seed=5)
    upstream = random_scores(9, 6, seed=6)
    weights = [0.25] * 3 + [1.0] * 3
    for normalize in ("minmax", "none"):
        ours, dense = leaf(scores), leaf(scores)
        (mmot.multi_sinkhorn(ours, 3, 0.3, 6, normalize=normalize, backend=backend) * upstream).sum().backward()
        (dense_multi_sinkhorn(dense, 3, 0.3, 6, weights, normalize=normalize) * upstream).sum().backward()
        torch.testing.assert_close(ours.grad, dense.grad, rtol=1e-8, atol=1e-10)


def test_sinkhorn_gradient_equals_swav_autograd(backend):
    scores = random_scores(8, 5, seed=7)
    upstream = random_scores(8, 5, seed=8)
    ours, swav = leaf(scores), leaf(scores)
    (mmot.sinkhorn(ours, 0.5, 3, backend=backend) * upstream).sum().backward()
    (swav_sinkhorn(swav, 0.5, 3) * upstream).sum().backward()
    torch.testing.assert_close(ours.grad, swav.grad, rtol=1e-9, atol=1e-12)


def test_float32_gradients_match_float64(backend):
    scores = random_scores(12, 8, seed=9)
    upstream = random_scores(12, 8, seed=10)
    grads = []
    for dtype in (torch.float32, torch.float64):
        s = leaf(scores.to(dtype))
        (mmot.multi_sinkhorn(s, 4, backend=backend) * upstream.to(dtype)).sum().backward()
        grads.append(s.grad.double())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-3)


def test_no_graph_without_grad(backend):
    out = mmot.multi_sinkhorn(random_scores(5, 4, seed=11), backend=backend)
    assert out.grad_fn is None and not out.requires_grad
