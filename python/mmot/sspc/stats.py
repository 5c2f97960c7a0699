"""Summaries over seeds: mean ± standard deviation, and the paired difference of two variants
with a 95% Student-t interval (the seeds are the pairs: same data, split and initialisation)."""

from __future__ import annotations

import math
import statistics

# Two-sided 95% quantiles t_{0.975, df} for df = 1..30 (standard tables, 3 decimals).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z975 = 1.959963984540054


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (from a table up to 30,
    then the Cornish-Fisher expansion; within 5e-4 of the exact value)."""
    if df < 1:
        raise ValueError(f"t975: argument 'df' must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_difference(baseline: list[float], other: list[float]) -> dict:
    """``other - baseline`` per pair: its mean and 95% t interval ``[lo, hi]`` over the n pairs
    (``lo``/``hi`` are None for fewer than two pairs)."""
    if len(baseline) != len(other) or not baseline:
        raise ValueError(f"paired_difference: expected two equally long non-empty lists, got {len(baseline)} and {len(other)}")
    diffs = [b - a for a, b in zip(baseline, other)]
    mean, std = mean_std(diffs)
    n = len(diffs)
    if n < 2:
        return {"mean": mean, "lo": None, "hi": None, "n": n}
    half = t975(n - 1) * std / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}
