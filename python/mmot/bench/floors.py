"""Physical floors: the least time any implementation of a workload can take on this machine.

A workload states what every implementation must do (:class:`Work`): bytes of inputs and outputs,
bytes moved if every pass reads its data once, the bytes one problem re-reads on each pass, and
its least multiply-add and exp counts. :func:`measure` times the machine's own limits (DRAM and
in-cache bandwidth, GEMM rate, exp rate) and :func:`floor` picks the floor that binds, the largest of

- dram: the bytes that must come from memory over the DRAM bandwidth (all passes when one
  problem's data exceeds the last-level cache, else the footprint once when that exceeds it);
- cache: the bytes that must move between cache and core over the in-cache bandwidth;
- compute: multiply-add flops over the GEMM rate, or exps over the exp rate, whichever is larger.

Each is a lower bound only if the rates are the machine's best, so the runner measures them at
its start and end and in every round of every workload, and keeps the best seen (:meth:`Rates.best`). docs/benchmarks.md
describes the model and each workload's counts.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from mmot.bench.timing import best_seconds

KINDS = ("dram", "cache", "compute")
# Timings per rate in a full measurement, the best kept: a rate measured low puts a floor above
# what the machine can do.
TRIES = 10


@dataclass(frozen=True)
class Work:
    """What any implementation of one call must move and compute.

    Attributes:
        footprint: bytes of the inputs read and outputs written; each crosses from memory once.
        traffic: bytes moved when every pass reads the pass's data once and outputs are written once.
        resident: bytes one problem re-reads on every pass (0 for a single pass).
        flops: least multiply-add work, two per multiply-add.
        exps: least number of exponentials.
    """

    footprint: int
    traffic: int
    resident: int = 0
    flops: float = 0.0
    exps: float = 0.0

    def __add__(self, more: Work) -> Work:
        """This work followed by ``more`` (a backward pass after its forward) on the same data."""
        return Work(
            self.footprint + more.footprint,
            self.traffic + more.traffic,
            max(self.resident, more.resident),
            self.flops + more.flops,
            self.exps + more.exps,
        )


@dataclass(frozen=True)
class Rates:
    """The machine's limits; bandwidths count bytes read plus bytes written."""

    dram_gbps: float
    cache_gbps: float
    gemm_gflops: float  # float32 products at IEEE precision (on CUDA: no TF32)
    exp_per_s: float  # inf where exps are not a limit worth measuring (CUDA's special-function units)
    llc_bytes: int
    l1_bytes: int
    tf32_gflops: float = 0.0  # CUDA only, for the record: TF32 tensor cores (no floor uses it)

    def best(self, other: Rates | None) -> Rates:
        """The higher of each rate: floors from the best rate seen are the ones noise cannot raise."""
        if other is None:
            return self
        merged = {f.name: max(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)}
        return Rates(**merged)

    def describe(self) -> str:
        exp = "" if math.isinf(self.exp_per_s) else f", exp {self.exp_per_s / 1e9:.2f} G/s"
        tf32 = f" (TF32 {self.tf32_gflops:.0f}, not used)" if self.tf32_gflops else ""
        return (
            f"DRAM {self.dram_gbps:.1f} GB/s, in-cache {self.cache_gbps:.0f} GB/s, GEMM {self.gemm_gflops:.0f} GFLOP/s{tf32}{exp}, "
            f"last-level cache {self.llc_bytes / 2**20:.0f} MiB"
        )


@dataclass(frozen=True)
class Floor:
    kind: str
    ms: float
    parts_ms: dict[str, float]


def floor(work: Work, rates: Rates) -> Floor:
    """The floor that binds for ``work`` at ``rates``: the largest of the dram, cache and compute floors."""
    if work.resident > rates.llc_bytes:
        # A cyclic stream larger than the cache misses on every pass.
        dram_bytes = work.traffic
    elif work.footprint > rates.llc_bytes:
        dram_bytes = work.footprint
    else:
        dram_bytes = 0
    # A problem that fits the L1 data cache is re-read from L1 or registers, which no copy measures.
    cache_bytes = work.footprint if work.resident <= rates.l1_bytes else work.traffic
    parts = {
        "dram": dram_bytes / (rates.dram_gbps * 1e9) * 1e3,
        "cache": cache_bytes / (rates.cache_gbps * 1e9) * 1e3,
        "compute": max(work.flops / (rates.gemm_gflops * 1e9), work.exps / rates.exp_per_s) * 1e3,
    }
    kind = max(KINDS, key=lambda name: parts[name])
    return Floor(kind, parts[kind], parts)


def measure(device: torch.device, tries: int = TRIES) -> Rates:
    """Measure the rates, each the best of ``tries`` timings (about 1.5 s on the 2-core CPU; tens of ms with one try).

    On a CPU the in-cache, GEMM and exp rates are one thread's times the cores: a fork-join team
    loses a whole time slice to any other process that takes one of its cores, a single thread
    does not, and per-core rates add up to at most that across cores (so the floor stays a lower
    bound). DRAM bandwidth, which one core cannot saturate, is measured with every thread.
    """
    llc, l1 = cache_sizes(device)
    if device.type == "cuda":
        return _measure_cuda(device, llc, l1, tries)
    volume = 2**25  # bytes copied per in-cache timing: enough to hide the per-call overhead
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with torch.no_grad():
        dram = _bandwidth_gbps(device, max(128 * 2**20, 4 * llc), 1, tries)
        with _one_thread():
            cache = max(_bandwidth_gbps(device, size, max(1, volume // size), tries) for size in (llc // 16, llc // 4))
            gemm = _gemm_gflops(device, tries)
            exp = _exp_per_s(device, tries)
    return Rates(dram, cores * cache, cores * gemm, cores * exp, llc, l1)


def _measure_cuda(device: torch.device, llc: int, l1: int, tries: int) -> Rates:
    """HBM bandwidth from a 1 GiB device copy or sum; GEMM rates from torch.mm on 4096²; L2 from re-reads.

    The floors use the float32 GEMM rate at IEEE precision: mmot's Triton kernels multiply
    float32 at IEEE precision (info_nce) or as three TF32 products (similarity), never plain TF32.
    A copy of an L2-sized buffer takes about as long as its launch, so the in-cache rate is the
    faster of repeated copies and one reduction that re-reads a buffer many times (stride 0):
    an over-estimate at worst, which keeps the cache floor a lower bound.
    """
    with torch.no_grad():
        dram = _bandwidth_gbps(device, 2**30, 1, tries)
        size = llc // 4
        cache = max(_bandwidth_gbps(device, size, max(1, 2**31 // size), tries), _reread_gbps(device, size, tries))
        gemm = _gemm_gflops(device, tries, tf32=False)
        tf32 = _gemm_gflops(device, tries, tf32=True)
    return Rates(dram, cache, gemm, math.inf, llc, l1, tf32)


def _reread_gbps(device: torch.device, size: int, tries: int, reads: int = 64) -> float:
    """Bytes read per second by one reduction over ``reads`` stride-0 copies of a ``size``-byte buffer."""
    src = torch.ones(max(1, size // 4), device=device)
    dst = torch.empty_like(src)
    view = src.expand(reads, src.numel())
    return reads * src.numel() * 4 / best_seconds(lambda: torch.sum(view, 0, out=dst), device, tries) / 1e9


@contextlib.contextmanager
def _one_thread():
    """torch and mmot's Rust kernels on one thread."""
    threads, configured = torch.get_num_threads(), os.environ.get("MMOT_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["MMOT_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if configured is None:
            del os.environ["MMOT_NUM_THREADS"]
        else:
            os.environ["MMOT_NUM_THREADS"] = configured


def cache_sizes(device: torch.device) -> tuple[int, int]:
    """(last-level cache, L1 data cache) in bytes; the L1 stands for what a core keeps next to it."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size, 128 * 2**10
    llc = l1 = 0
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = _parse_size((index / "size").read_text().strip())
        except (OSError, ValueError):
            continue
        if kind in ("Data", "Unified"):
            llc = max(llc, size)
            if level == 1:
                l1 = size
    if not llc:
        llc = max((_sysconf(name) for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE")), default=0)
    # Unknown sizes: assume a large cache, so no row gets a DRAM floor it may not have.
    return llc or 2**30, l1 or _sysconf("SC_LEVEL1_DCACHE_SIZE") or 32 * 2**10


def _parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def _sysconf(name: str) -> int:
    try:
        return max(0, os.sysconf(name))
    except (ValueError, OSError):
        return 0


def _bandwidth_gbps(device: torch.device, size: int, repeats: int, tries: int) -> float:
    """Best of a copy (read + write) and a sum (read) of a ``size``-byte float32 buffer."""
    src = torch.ones(max(1, size // 4), device=device)
    dst = torch.empty_like(src)

    def copies():
        for _ in range(repeats):
            dst.copy_(src)

    def sums():
        for _ in range(repeats):
            src.sum()

    copy_rate = 2 * src.numel() * 4 * repeats / best_seconds(copies, device, tries)
    read_rate = src.numel() * 4 * repeats / best_seconds(sums, device, tries)
    return max(copy_rate, read_rate) / 1e9


def _gemm_gflops(device: torch.device, tries: int, tf32: bool = False) -> float:
    """The faster of torch's matmul and mmot's GEMM (the Rust similarity without normalisation).

    On CUDA: torch.mm on 4096², with TF32 tensor cores allowed only when ``tf32``.
    """
    if device.type == "cuda":
        n = 4096
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        allowed = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            return 2 * n**3 / best_seconds(lambda: a @ b, device, tries) / 1e9
        finally:
            torch.backends.cuda.matmul.allow_tf32 = allowed
    import mmot

    n, d = 1024, 256
    a, b = torch.randn(n, d), torch.randn(n, d)
    flops = 2 * n * n * d
    torch_rate = flops / best_seconds(lambda: a @ b.T, device, tries)
    mmot_rate = flops / best_seconds(lambda: mmot.similarity(a, b, normalize=False, backend="rust"), device, tries)
    return max(torch_rate, mmot_rate) / 1e9


def _exp_per_s(device: torch.device, tries: int) -> float:
    x = torch.rand(2**16) - 0.5
    y = torch.empty_like(x)
    repeats = 16

    def exps():
        for _ in range(repeats):
            torch.exp(x, out=y)

    return x.numel() * repeats / best_seconds(exps, device, tries)
