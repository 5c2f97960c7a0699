"""Hypothesis strategies for the fuzz suite (tests/test_fuzz.py): valid but extreme inputs.

Values are drawn as seeded patterns (mixed signs, ties, constant rows or columns, rows of very
different size) times magnitudes spread over most of the dtype's exponent range, then cast to
the dtype under test; every tensor is finite in that dtype and never all zeros.
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
PATTERNS = ["random", "ties", "constant_rows", "constant_cols", "spike", "row_scales"]


def accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def exponent_bounds(dtype: torch.dtype, fraction: float = 0.8) -> tuple[float, float]:
    """log10 of the smallest and largest magnitudes drawn: ``fraction`` of the way from 1 to the
    dtype's smallest normal and largest finite value (float32: about 1e-30 .. 1e30)."""
    info = torch.finfo(dtype)
    return fraction * math.log10(info.tiny), fraction * math.log10(info.max)


def magnitude(draw, dtype: torch.dtype, fraction: float = 0.8) -> float:
    """10**u, u uniform over the dtype's exponent bounds, with extra weight on the two ends and on 1."""
    low, high = exponent_bounds(dtype, fraction)
    u = draw(st.one_of(st.floats(low, high), st.sampled_from([low, high, 0.0])))
    return 10.0**u


def pattern_tensor(draw, shape: tuple[int, ...], dtype: torch.dtype, fraction: float = 0.8, pattern: str | None = None) -> torch.Tensor:
    """A float64 tensor of ``shape`` (rows on dim -2), exactly representable in ``dtype``."""
    pattern = pattern or draw(st.sampled_from(PATTERNS))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=generator, dtype=torch.float64)
    if pattern == "ties":
        base = torch.randint(-2, 3, shape, generator=generator).double() + 0.5
    elif pattern == "constant_rows":
        base = base[..., :1].expand(shape).clone()
    elif pattern == "constant_cols" and len(shape) >= 2:
        base = base[..., :1, :].expand(shape).clone()
    elif pattern == "spike":
        base = base * 1e-3
        base.view(-1)[seed % base.numel()] = 1.0
    scale = magnitude(draw, dtype, fraction)
    if pattern == "row_scales" and len(shape) >= 2:
        low, high = exponent_bounds(dtype, fraction)
        # Rows from the smallest to the largest magnitude in one tensor.
        exponents = torch.rand(*shape[:-1], 1, generator=generator, dtype=torch.float64) * (high - low) + low
        out = base * 10.0**exponents
    else:
        out = base * scale
    # Keep |values| <= max/4 after rounding, and away from zero-only tensors.
    limit = torch.finfo(dtype).max / 4
    out = out.clamp(-limit, limit).to(dtype).double()
    if not bool((out != 0).any()):
        out = torch.full(shape, scale, dtype=torch.float64).to(dtype).double()
    return out


@st.composite
def sizes(draw, max_n: int, max_k: int):
    return draw(st.integers(1, max_n)), draw(st.integers(1, max_k))


@st.composite
def masses(draw, n: int, dtype: torch.dtype, total: float | None = None, spread: float = 3.0) -> torch.Tensor:
    """n positive masses in float64, log-uniform over ``spread`` decades, summing to ``total``."""
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    m = 10.0 ** (torch.rand(n, generator=generator, dtype=torch.float64) * spread)
    m = m / m.sum()
    return m * (total if total is not None else 1.0)
