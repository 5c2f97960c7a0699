"""Input generators shared by the tests: never zeros, always seeded."""

from __future__ import annotations

import torch
from hypothesis import strategies as st


def cosine_scores(*shape_nk, dim=16, seed=0, dtype=torch.float64):
    """Cosine similarities of random unit vectors: the scores SSPC feeds to Multi-SK."""
    *batch, n, k = shape_nk
    generator = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(*batch, n, dim, generator=generator, dtype=torch.float64), dim=-1)
    a = torch.nn.functional.normalize(torch.randn(*batch, k, dim, generator=generator, dtype=torch.float64), dim=-1)
    return (x @ a.transpose(-1, -2)).to(dtype)


def random_scores(*shape, seed=0, dtype=torch.float64, spread=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (spread * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)


@st.composite
def multi_problems(draw, max_n=24, max_k=12):
    """(scores, k, eps, n_iters) for one Multi-SK problem with odd sizes."""
    n = draw(st.integers(1, max_n))
    n_anchors = draw(st.integers(1, max_k))
    k = draw(st.integers(1, n_anchors))
    eps = draw(st.floats(0.05, 2.0))
    n_iters = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    spread = draw(st.floats(0.1, 3.0))
    return random_scores(n, n_anchors, seed=seed, spread=spread), k, eps, n_iters


def positive_pairs(n, d, seed, dtype=torch.float64):
    """(a, b) leaves of shape (N, D) where b[i] is a noisy copy of a[i]: InfoNCE's positive pairs."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=generator, dtype=torch.float64).to(dtype)
    b = (a.double() + 0.7 * torch.randn(n, d, generator=generator, dtype=torch.float64)).to(dtype)
    return a.requires_grad_(True), b.requires_grad_(True)


def uniform_cosines(*shape, seed=0, dtype=torch.float64):
    """Values uniform in [-1, 1): stand-ins for cosine similarities."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1).to(dtype)
