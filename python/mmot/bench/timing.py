"""Side-by-side timing: the providers of one workload run in interleaved rounds, so noise hits them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# A provider whose warm-up call took longer than this is its own steady state: its timed calls
# are not preceded by an untimed one (official-dense takes seconds a call).
SLOW_CALL_S = 1.0


@dataclass
class Timing:
    min_ms: float
    median_ms: float
    max_ms: float
    rounds: int


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call; on CUDA between events, after the device has drained."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    fn()
    return (time.perf_counter() - start_s) * 1e3


def best_seconds(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Least time of ``repeats`` calls after a warm-up call."""
    fn()
    return min(time_once(fn, device) for _ in range(repeats)) / 1e3


def interleaved(
    calls: dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int,
    on_round: Callable[[], None] = lambda: None,
) -> dict[str, Timing | Exception]:
    """Warm every call up once, then time ``repeats`` rounds of all calls in turn.

    Within a round each timed call directly follows an untimed call of the same provider, so
    every provider is measured in its steady state (warm caches, its own thread pool awake)
    rather than in the wake of the previous provider: torch's OpenMP workers keep spinning for
    a while after an op, and on a 2-core machine that took a core from whatever ran next
    (Multi-SK at the SSPC size: 5.1 ms after an idle pause, 7.9 ms right after a torch op).
    A provider that raises is reported with its exception, not fatal.
    """
    samples: dict[str, list[float]] = {}
    slow: set[str] = set()
    failures: dict[str, Exception] = {}
    for name, fn in calls.items():
        try:
            warm_ms = time_once(fn, device)  # compilation, caches, thread pools
        except Exception as error:
            failures[name] = error
            continue
        samples[name] = []
        if warm_ms > SLOW_CALL_S * 1e3:
            slow.add(name)
    for _ in range(repeats):
        for name in samples:
            if name not in slow:
                calls[name]()
            samples[name].append(time_once(calls[name], device))
        on_round()
    results: dict[str, Timing | Exception] = dict(failures)
    for name, times in samples.items():
        results[name] = Timing(min(times), statistics.median(times), max(times), len(times))
    return results
