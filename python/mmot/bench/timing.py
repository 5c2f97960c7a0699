"""Side-by-side timing: providers of one workload run interleaved, so noise hits them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return (time.perf_counter() - start) * 1e3


def interleaved(
    calls: dict[str, Callable[[], object]], device: torch.device, repeats: int, on_step: Callable[[], None] = lambda: None
) -> dict[str, Timing | Exception]:
    """Warm every call up once, then time ``repeats`` rounds of all calls in turn.

    Within a round each timed call directly follows an untimed call of the same provider, so
    every provider is measured in its steady state (warm caches, its own thread pool awake)
    rather than in the wake of the previous provider: torch's OpenMP workers keep spinning for
    a while after an op, and on a 2-core machine that took a core from whatever ran next
    (Multi-SK at the SSPC size: 5.1 ms after an idle pause, 7.9 ms right after a torch op).
    """
    samples: dict[str, list[float]] = {}
    failures: dict[str, Exception] = {}
    with torch.no_grad():
        for name, fn in calls.items():
            try:
                fn()  # warm-up: compilation, caches, thread pools
                samples[name] = []
            except Exception as error:  # a provider that breaks is reported, not fatal
                failures[name] = error
        for _ in range(repeats):
            for name in samples:
                calls[name]()
                samples[name].append(time_once(calls[name], device))
            on_step()
    results: dict[str, Timing | Exception] = dict(failures)
    for name, times in samples.items():
        results[name] = Timing(statistics.median(times), min(times), max(times))
    return results


def copy_bandwidth_gbps(device: torch.device, megabytes: int = 256, repeats: int = 5) -> float:
    """Read+write bandwidth of a device-local copy: the roof the floors are measured against."""
    src = torch.ones(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    times = [time_once(lambda: dst.copy_(src), device) for _ in range(repeats + 1)][1:]
    return 2 * src.numel() * 4 / (min(times) * 1e-3) / 1e9
