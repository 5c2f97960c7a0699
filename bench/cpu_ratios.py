"""Issue-3 CPU ratios, measured side by side: every provider of a workload runs interleaved.

    PYTHONPATH=python MMOT_NUM_THREADS=2 python bench/cpu_ratios.py [--rounds 7] [--out bench/cpu_ratios.json]

Prints a markdown table per workload (min and median ms over interleaved rounds, speed-up of
mmot-rust over each baseline by min and by median, time over the memory floor) and the peak
memory of each Multi-SK provider (a subprocess per measurement, ru_maxrss minus the inputs).
Floors: (iters + 1) reads of the scores plus one write of the result, over the bandwidth of a
256 MB torch copy measured in the same run; a strict floor (one read, one write) is given too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

import torch

import mmot
from mmot.bench import baselines
from mmot.bench.workloads import cosine_scores as cosine
from mmot.bench.timing import copy_bandwidth_gbps, interleaved

N = 7660


def backward_of(fn, scores):
    upstream = torch.randn_like(scores)

    def run():
        with torch.enable_grad():
            leaf = scores.detach().requires_grad_(True)
            return torch.autograd.grad(fn(leaf), leaf, upstream)

    return run


def workloads(quick: bool):
    """(name, floor elements·passes, strict floor elements, {provider: fn}, rounds)."""
    out = []
    for kk in (64,) if quick else (64, 128, 256, 1024):
        s = cosine(N, kk)
        k = kk // 2
        providers = {
            "mmot-rust": lambda s=s, k=k: mmot.multi_sinkhorn(s, k, 0.07, 20),
            "grouped-torch-eager": lambda s=s, k=k: baselines.grouped_torch_eager_multi_sinkhorn(s, k, 0.07, 20),
            # mmot.reference is also grouped plain-domain torch eager; whichever of the two is
            # faster is "the best pure-torch eager formulation" the issue measures against.
            "reference-eager": lambda s=s, k=k: mmot.multi_sinkhorn(s, k, 0.07, 20, backend="torch"),
        }
        out.append((f"multi_sinkhorn N={N} K={kk} k={k} 20 iters", 21 * N * kk, 2 * N * kk, providers, 15 if kk == 64 else 5))
        if kk == 64:
            # official-dense takes seconds a call, so it gets a workload (and fewer rounds) of its own
            dense = {
                "mmot-rust": providers["mmot-rust"],
                "official-dense": lambda s=s, k=k: baselines.official_dense_multi_sinkhorn(s, k, 0.07, 20),
            }
            out.append((f"multi_sinkhorn N={N} K={kk} k={k} 20 iters vs official-dense", 21 * N * kk, 2 * N * kk, dense, 3))
    s = cosine(N, 64)
    out.append(
        (
            "multi_sinkhorn N=7660 K=64 backward (fwd+bwd vs fwd)",
            21 * N * 64,
            2 * N * 64,
            {
                "mmot-rust fwd": lambda s=s: mmot.multi_sinkhorn(s, 32, 0.07, 20),
                "mmot-rust fwd+bwd": backward_of(lambda x: mmot.multi_sinkhorn(x, 32, 0.07, 20), s),
                "reference fwd+bwd (autograd)": backward_of(lambda x: mmot.multi_sinkhorn(x, 32, 0.07, 20, backend="torch"), s),
            },
            7,
        )
    )
    s = cosine(4096, 3000)
    out.append(
        (
            "sinkhorn B=4096 K=3000 3 iters",
            4 * 4096 * 3000,
            2 * 4096 * 3000,
            {
                "mmot-rust": lambda s=s: mmot.sinkhorn(s, 0.05, 3),
                "swav-eager": lambda s=s: baselines.swav_eager_sinkhorn(s, 0.05, 3),
                "pot-numpy": lambda s=s: baselines.pot_sinkhorn(s, 0.05, 3, backend="numpy"),
                "pot-torch": lambda s=s: baselines.pot_sinkhorn(s, 0.05, 3, backend="torch"),
                "mmot-rust fwd+bwd": backward_of(lambda x: mmot.sinkhorn(x, 0.05, 3), s),
            },
            7,
        )
    )
    for size in (16,) if quick else (4, 16):
        s = cosine(size, size, batch=(65536,))
        out.append(
            (
                f"sinkhorn 65536x({size}x{size}) 20 iters",
                21 * 65536 * size * size,
                2 * 65536 * size * size,
                {
                    "mmot-rust": lambda s=s: mmot.sinkhorn(s, 0.1, 20),
                    "batched-torch-eager": lambda s=s: baselines.batched_torch_eager_sinkhorn(s, 0.1, 20),
                    "mmot-rust fwd+bwd": backward_of(lambda x: mmot.sinkhorn(x, 0.1, 20), s),
                },
                7,
            )
        )
    for size in (16,) if quick else (4, 16):
        s = cosine(size, size, batch=(65536,))
        k = size // 2
        out.append(
            (
                f"multi_sinkhorn 65536x({size}x{size}) k={k} 20 iters",
                21 * 65536 * size * size,
                2 * 65536 * size * size,
                {
                    "mmot-rust": lambda s=s, k=k: mmot.multi_sinkhorn(s, k, 0.1, 20),
                    "torch-backend (batched eager)": lambda s=s, k=k: mmot.multi_sinkhorn(s, k, 0.1, 20, backend="torch"),
                },
                5,
            )
        )
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 1, N, 256, generator=generator), torch.randn(1, 3, 64, 256, generator=generator)
    out.append(
        (
            "similarity (3,1,7660,256)x(1,3,64,256)",
            (3 * N * 256 + 3 * 64 * 256 + 9 * N * 64),
            (3 * N * 256 + 3 * 64 * 256 + 9 * N * 64),
            {
                "mmot-rust": lambda: mmot.similarity(x, y),
                "reference-eager": lambda: mmot.similarity(x, y, backend="torch"),
                "mmot-rust fwd+bwd": _sim_backward(x, y, "rust"),
                "reference fwd+bwd (autograd)": _sim_backward(x, y, "torch"),
            },
            7,
        )
    )
    return out


def _sim_backward(x, y, backend):
    upstream = torch.randn(3, 3, N, 64)

    def run():
        with torch.enable_grad():
            a, b = x.detach().requires_grad_(True), y.detach().requires_grad_(True)
            return torch.autograd.grad(mmot.similarity(a, b, backend=backend), (a, b), upstream)

    return run


PEAK_SNIPPET = """
import sys, torch, mmot
from mmot.bench import baselines
from mmot.bench.workloads import cosine_scores
kk, provider = int(sys.argv[1]), sys.argv[2]
run = {
    'mmot-rust': lambda s: mmot.multi_sinkhorn(s, kk // 2, 0.07, 20),
    'reference-eager': lambda s: mmot.multi_sinkhorn(s, kk // 2, 0.07, 20, backend='torch'),
    'grouped-torch-eager': lambda s: baselines.grouped_torch_eager_multi_sinkhorn(s, kk // 2, 0.07, 20),
    'official-dense': lambda s: baselines.official_dense_multi_sinkhorn(s, kk // 2, 0.07, 20),
}[provider]
def status_mib(field):
    with open('/proc/self/status') as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field)) / 1024
with torch.no_grad():
    run(cosine_scores(64, kk))  # loads code and starts thread pools outside the measurement
    s = cosine_scores(7660, kk)
    with open('/proc/self/clear_refs', 'w') as handle:
        handle.write('5')  # resets VmHWM (the peak RSS) to the current RSS
    base = status_mib('VmRSS:')
    run(s)
    print(status_mib('VmHWM:') - base)
"""


def peak_mib(kk: int, provider: str) -> str:
    env = dict(os.environ, PYTHONPATH="python")
    try:
        result = subprocess.run([sys.executable, "-c", PEAK_SNIPPET, str(kk), provider], capture_output=True, text=True, env=env, timeout=600)
        return f"{float(result.stdout.strip().splitlines()[-1]):.1f}"
    except Exception as error:  # noqa: BLE001
        return f"failed: {error}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=0, help="override the rounds per workload")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory", action="store_true", help="Multi-SK peak-memory table (a fresh process per figure)")
    parser.add_argument("--out", default="")
    parser.add_argument("--only", default="", help="run only the workloads whose name contains this")
    args = parser.parse_args()
    cpu = torch.device("cpu")
    bandwidth = copy_bandwidth_gbps(cpu)
    print(f"# {datetime.date.today()} {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} threads {torch.get_num_threads()}, MMOT_NUM_THREADS={os.environ.get('MMOT_NUM_THREADS', '')}")
    print(f"256 MB torch copy: {bandwidth:.1f} GB/s (read+write)\n")
    report = {"copy_gbps": bandwidth, "workloads": []}
    for name, floor_elems, strict_elems, providers, rounds in workloads(args.quick):
        if args.only and args.only not in name:
            continue
        bandwidth = copy_bandwidth_gbps(cpu)  # re-measured beside each workload: the machine is shared
        results = interleaved(providers, cpu, args.rounds or rounds)
        floor_ms = floor_elems * 4 / (bandwidth * 1e9) * 1e3
        strict_ms = strict_elems * 4 / (bandwidth * 1e9) * 1e3
        print(f"## {name}  (floor {floor_ms:.2f} ms, strict floor {strict_ms:.2f} ms at {bandwidth:.1f} GB/s)\n")
        print("| provider | min ms | median ms | mmot-rust speed-up (min) | (median) | min / floor |")
        print("|---|---|---|---|---|---|")
        ours = results.get("mmot-rust") or results.get("mmot-rust fwd")
        if isinstance(ours, Exception) or ours is None:
            print(f"mmot-rust failed: {ours}\n")
            continue
        rows = []
        for provider, timing in results.items():
            if isinstance(timing, Exception):
                print(f"| {provider} | failed: {timing} | | | | |")
                continue
            up_min = timing.min_ms / ours.min_ms
            up_med = timing.median_ms / ours.median_ms
            print(f"| {provider} | {timing.min_ms:.2f} | {timing.median_ms:.2f} | {up_min:.1f}x | {up_med:.1f}x | {timing.min_ms / floor_ms:.1f} |")
            rows.append({"provider": provider, "min_ms": timing.min_ms, "median_ms": timing.median_ms})
        print()
        report["workloads"].append({"name": name, "floor_ms": floor_ms, "strict_floor_ms": strict_ms, "gbps": bandwidth, "results": rows})
        sys.stdout.flush()
    if args.memory:
        print("## Multi-SK peak memory (MiB of resident memory a call adds over its inputs, fresh process)\n")
        print("| K | mmot-rust | reference-eager | grouped-torch-eager | official-dense |")
        print("|---|---|---|---|---|")
        for kk in (64, 128, 256, 1024):
            dense = peak_mib(kk, "official-dense") if kk <= 128 else f"not run: (K,N,K) f32 = {kk * N * kk * 4 / 2**30:.1f} GiB per tensor"
            cells = [peak_mib(kk, name) for name in ("mmot-rust", "reference-eager", "grouped-torch-eager")]
            print(f"| {kk} | {' | '.join(cells)} | {dense} |")
            sys.stdout.flush()
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
