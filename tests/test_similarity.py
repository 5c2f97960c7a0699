"""mmot.similarity against explicit loops, with broadcasting and edge cases."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mmot
from inputs import random_scores
from naive import loop_similarity


@given(
    n=st.integers(1, 9),
    m=st.integers(1, 9),
    d=st.integers(1, 17),
    normalize=st.booleans(),
    scale=st.floats(-3.0, 20.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_loops_float64(n, m, d, normalize, scale, seed):
    x = random_scores(n, d, seed=seed)
    y = random_scores(m, d, seed=seed + 1)
    want = loop_similarity(x, y, normalize, scale)
    for backend in ("rust", "torch"):
        got = mmot.similarity(x, y, normalize=normalize, scale=scale, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_every_modality_against_every_anchor_set(backend):
    feats = random_scores(3, 1, 5, 7, seed=1)
    anchors = random_scores(1, 2, 4, 7, seed=2)
    got = mmot.similarity(feats, anchors, scale=10.0, backend=backend)
    assert got.shape == (3, 2, 5, 4)
    for mod in range(3):
        for a in range(2):
            torch.testing.assert_close(got[mod, a], loop_similarity(feats[mod, 0], anchors[0, a], True, 10.0))


def test_float32_and_zero_rows(backend):
    x = random_scores(6, 33, seed=3, dtype=torch.float32)
    x[2] = 0.0  # a zero row has zero cosine similarity with everything
    y = random_scores(70, 33, seed=4, dtype=torch.float32)
    got = mmot.similarity(x, y, backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), loop_similarity(x, y, True, 1.0), rtol=1e-5, atol=1e-6)
    assert bool((got[2] == 0).all())


@pytest.mark.parametrize("shapes", [((0, 4), (3, 4)), ((2, 0, 4), (1, 3, 4)), ((5, 0), (3, 0))])
def test_empty_inputs(backend, shapes):
    x = torch.ones(shapes[0], dtype=torch.float64) * 0.5
    y = torch.ones(shapes[1], dtype=torch.float64) * 0.25
    got = mmot.similarity(x, y, backend=backend)
    assert got.shape == torch.broadcast_shapes(x.shape[:-2], y.shape[:-2]) + (x.shape[-2], y.shape[-2])
    assert bool((got == 0).all())
