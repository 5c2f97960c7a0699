"""Shared pieces of the per-op fuzz suite (tests/test_fuzz_*.py): extreme-but-valid inputs, the
settings that keep it reproducible and bounded, the refusal rule and the comparison with exact
values.

The property every fuzz test checks: for valid input an op returns values that agree with an exact
evaluation to a tolerance derived from the dtype and the problem's conditioning; where the exact
value overflows the dtype the result is that infinity; and where the input is beyond what the
dtype can compute (documented limits), the op raises ValueError/TypeError naming itself and the
argument. Exact values come from numpy in a wider format: float64 for float32 and narrower
inputs (their products and squares fit it), x87 extended precision for float64 inputs (15
exponent bits, so 1e300² fits; 11 more mantissa bits).

Inputs are built from a drawn seed and a few drawn parameters (pattern, magnitude, eps), so a
failing example prints a short recipe; ``Case.__repr__`` adds the values of small tensors.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

# ---------------------------------------------------------------- settings

# CI: derandomized (the same examples every run) with a fixed example count per test, sized so
# that the suite stays within its time budget, and no shrinking (minutes on a slow op; a failure
# prints its recipe and values). HYPOTHESIS_PROFILE=thorough: ten times the examples, random
# ones, shrunk.
THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
settings.register_profile(
    "fuzz",
    deadline=None,
    derandomize=not THOROUGH,
    database=None,
    print_blob=True,
    phases=list(Phase) if THOROUGH else [Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def fuzz(max_examples: int) -> settings:
    """The fuzz profile with this test's example budget."""
    return settings(settings.get_profile("fuzz"), max_examples=max_examples * (10 if THOROUGH else 1))


# ---------------------------------------------------------------- dtypes

FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# Decimal exponents of the largest entry: from near the smallest normal to near the largest
# finite value of each dtype.
EXPONENTS = {torch.float64: (-300.0, 308.2), torch.float32: (-36.0, 38.4), torch.bfloat16: (-36.0, 38.4), torch.float16: (-4.0, 4.8)}

# Extended precision for float64 inputs where the platform has it (x86-64 Linux); elsewhere the
# float64 cases stay within float64's square-root range.
HAS_EXTENDED = np.finfo(np.longdouble).maxexp > 1024
if not HAS_EXTENDED:
    EXPONENTS[torch.float64] = (-150.0, 150.0)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype (docs/numerics.md)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit(dtype: torch.dtype) -> float:
    """Machine epsilon of the dtype's accumulation type: the rounding unit of its arithmetic."""
    return torch.finfo(compute_dtype(dtype)).eps


def wide(t: torch.Tensor) -> np.ndarray:
    """The exact values of ``t`` in the oracle's wider numpy format."""
    values = t.detach().double().cpu().numpy()
    return values.astype(np.longdouble) if t.dtype == torch.float64 and HAS_EXTENDED else values


def lse(x: np.ndarray, axis: int) -> np.ndarray:
    """log Σ exp(x) along ``axis``, keeping it; exact to the format's rounding for finite x."""
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    return top + np.log(np.sum(np.exp(x - top), axis=axis, keepdims=True))


# ---------------------------------------------------------------- inputs


def uniform(low: float, high: float) -> st.SearchStrategy[float]:
    """Evenly spread over [low, high] (st.floats piles up at 0 and at the ends), shrinking to low."""
    return st.integers(0, 4096).map(lambda i: low + (high - low) * i / 4096)


@dataclass
class Case:
    """One drawn problem: its recipe (printed by hypothesis) and the tensors built from it."""

    recipe: dict
    tensors: dict = field(default_factory=dict)

    def __getattr__(self, name):
        for part in ("tensors", "recipe"):
            values = self.__dict__.get(part, {})
            if name in values:
                return values[name]
        raise AttributeError(name)

    def __repr__(self) -> str:
        shown = {name: _show(t) for name, t in self.tensors.items() if t is not None}
        return f"Case({self.recipe}, {shown})"


def _show(t: torch.Tensor) -> str:
    if t.numel() > 48:
        return f"<{tuple(t.shape)} {t.dtype}>"
    return f"torch.tensor({t.detach().double().tolist()!r}, dtype={t.dtype})"


PATTERNS = ("gaussian", "ties", "constant_rows", "constant_cols", "constant", "mixed_magnitudes", "positive", "spike")


@st.composite
def extreme_tensor(draw, shape: tuple[int, ...], dtype: torch.dtype, recipe: dict, exponents: tuple[float, float] | None = None):
    """Finite values of ``dtype`` whose largest magnitude is 10**(drawn exponent), in one of
    PATTERNS: mixed signs, ties (few distinct levels), constant rows/columns or all equal,
    magnitudes spread over the dtype's whole range, one entry far above the rest."""
    low, high = exponents or EXPONENTS[dtype]
    # The whole range, with extra weight near its two ends.
    exponent = draw(st.one_of(uniform(low, high), uniform(high - 1.0, high), uniform(low, low + 1.0)))
    pattern = draw(st.sampled_from(PATTERNS))
    seed = draw(st.integers(0, 2**32 - 1))
    recipe.update(pattern=pattern, exponent=exponent, seed=seed)
    return make_tensor(shape, dtype, pattern, exponent, seed)


def make_tensor(shape, dtype, pattern, exponent, seed) -> torch.Tensor:
    """The tensor a recipe of extreme_tensor describes (deterministic)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if pattern == "ties":
        x = torch.randint(-2, 3, shape, generator=gen).double() + 0.5
    elif pattern == "constant_rows" and x.dim() >= 2:
        rows = torch.rand(shape[:-1], generator=gen) < 0.5
        x = torch.where(rows[..., None], x[..., :1], x)
    elif pattern == "constant_cols" and x.dim() >= 2:
        cols = torch.rand(shape[-1], generator=gen) < 0.5
        x = torch.where(cols, x[..., :1, :], x)
    elif pattern == "constant":
        x = torch.full(shape, 1.0 if torch.rand((), generator=gen) < 0.5 else -1.0, dtype=torch.float64)
    elif pattern == "mixed_magnitudes":
        low, high = EXPONENTS[dtype]
        x = x.sign() * 10.0 ** (torch.rand(shape, generator=gen, dtype=torch.float64) * (low - high))
    elif pattern == "positive":
        x = x.abs() + 0.1
    elif pattern == "spike" and x.numel():
        x = x * 1e-3
        x.view(-1)[int(torch.randint(x.numel(), (), generator=gen))] = 1.0
    top = x.abs().amax() if x.numel() else torch.tensor(1.0)
    x = x / torch.where(top > 0, top, 1.0) * 10.0**exponent
    limit = torch.finfo(dtype).max
    return x.clamp(-limit, limit).to(dtype)


@st.composite
def small_temperature(draw, dtype: torch.dtype, recipe: dict, name: str = "eps", ordinary=(-3.0, 1.0)):
    """eps or a temperature: ordinary, or down to the smallest the dtype accepts (its reciprocal
    fits the accumulation dtype), or within a factor 2 either side of that bound."""
    smallest = 1.0 / torch.finfo(compute_dtype(dtype)).max
    kind = draw(st.sampled_from(["ordinary", "tiny", "at_reciprocal_limit"]))
    if kind == "ordinary":
        value = 10.0 ** draw(uniform(*ordinary))
    elif kind == "tiny":
        value = 10.0 ** draw(uniform(math.log10(smallest), -3.0))
    else:
        value = smallest * 2.0 ** draw(uniform(-1.0, 1.0))
    value = max(value, 5e-324)
    recipe[name] = value
    return value


# ---------------------------------------------------------------- outcomes


def outcome(call):
    """(result, None) or (None, the ValueError/TypeError it raised)."""
    try:
        return call(), None
    except (ValueError, TypeError) as error:
        return None, error


def check_refusal(op: str, error, must: set[str], may: set[str], context) -> bool:
    """Whether the call was (correctly) refused.

    ``must``: argument names of which one has to be refused (a documented limit is passed);
    ``may``: names that may be refused (within rounding of a limit). A refusal names the op
    ("mmot.<op>:") and one of the arguments ('eps' or eps=).
    """
    names = must | may
    if error is None:
        assert not must, f"mmot.{op} accepted input beyond the limits on {sorted(must)}: {context}"
        return False
    message = str(error)
    assert names, f"mmot.{op} refused valid input: {type(error).__name__}: {message}\n{context}"
    assert message.startswith(f"mmot.{op}:"), f"refusal does not name the op: {message}"
    assert any(f"'{name}'" in message or f"{name}=" in message for name in names), (
        f"refusal names none of {sorted(names)}: {message}\n{context}"
    )
    return True


def assert_matches(got: torch.Tensor, want: np.ndarray, tol, dtype: torch.dtype, what: str, context) -> None:
    """``got`` (of ``dtype``) equals the exact ``want`` within ``tol`` (the computation's error
    bound) plus the rounding of the result to ``dtype``. Where the exact value overflows the
    dtype the result is the infinity of its sign (either sign where the bound passes the dtype's
    range); NaN is never right."""
    info = torch.finfo(dtype)
    g = got.detach().double().cpu().numpy().astype(want.dtype)
    tol = np.broadcast_to(np.asarray(tol, dtype=want.dtype), want.shape)
    with np.errstate(invalid="ignore", over="ignore"):
        bound = tol + info.eps * np.abs(want) + info.tiny * info.eps
        close = np.isfinite(g) & (np.abs(g - want) <= bound)
        # An infinity of the exact value's sign where that value is within the bound of overflowing,
        # of either sign where the bound itself passes the dtype's largest value.
        overflow = np.isinf(g) & ((np.sign(g) == np.sign(want)) | (bound >= info.max)) & (np.abs(want) + bound >= info.max)
    bad = ~(close | overflow)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} entries off; first at {index}: got {g[index]!r}, "
            f"exact {want[index]!r}, allowed error {bound[index]!r}\n{context}"
        )


# ---------------------------------------------------------------- failure classes still open

# Classes of valid input that some backend still gets wrong, found by this suite while the fixes
# were under way: {name: (backends, predicate(case))}, one registry per test file. The main
# fuzz tests pass such (case, backend) pairs by, and each file's test_known_failures_* runs one
# reproducer per class, so the open classes stay visible (and failing) until fixed; then the
# registry entry goes and the reproducer stays as a regression test.


def known_failure(registry: dict, case, backend: str) -> str | None:
    """The name of the open failure class this (case, backend) falls in, if any."""
    for name, (backends, predicate) in registry.items():
        if backend in backends and predicate(case):
            return name
    return None
