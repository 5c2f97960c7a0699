"""info_nce on CPU: the fused Rust kernel against the materialised F.cross_entropy form.

pytest-benchmark (times, grouped by size, one provider per row):
    PYTHONPATH=python pytest bench/test_cpu_info_nce.py --benchmark-group-by=group
Script (time ratio and peak-RSS increase, each provider and size in a fresh child process,
the table in bench/RESULTS.md):
    PYTHONPATH=python python bench/test_cpu_info_nce.py [N ...]
CPU figures are only comparable as ratios within one run (DESIGN.md §3).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mmot

D = 256
TEMPERATURE = 0.05
SIZES = [4096, 8192, 16384]
PROVIDERS = ["mmot-rust", "materialized"]


def materialized(a, b):
    """The full N×N logits and F.cross_entropy in both directions (everything_at_once's NormSoftmax)."""
    x, y = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = x @ y.T / TEMPERATURE
    labels = torch.arange(a.shape[0])
    return F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)


def fused(a, b):
    return mmot.info_nce(a, b, TEMPERATURE, backend="rust")


LOSS = {"mmot-rust": fused, "materialized": materialized}


def inputs(n):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, D, generator=g, requires_grad=True), torch.randn(n, D, generator=g, requires_grad=True)


def step(provider, a, b):
    a.grad = b.grad = None
    loss = LOSS[provider](a, b)
    loss.backward()
    return loss


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("n", SIZES)
def test_info_nce_forward_backward(benchmark, provider, n):
    benchmark.group = f"info_nce fwd+bwd N=M={n} D={D} (CPU)"
    a, b = inputs(n)
    benchmark.pedantic(step, args=(provider, a, b), rounds=1, iterations=1, warmup_rounds=0)


CHILD = r"""
import resource, sys, time
sys.path.insert(0, "bench")
import torch
from test_cpu_info_nce import inputs, step
provider, n = sys.argv[1], int(sys.argv[2])
small_a, small_b = inputs(256)
step(provider, small_a, small_b)                      # warm-up: load kernels, start the pool
a, b = inputs(n)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
loss = step(provider, a, b)
elapsed = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{elapsed:.3f} {(after - before) / 1024:.1f} {loss.item():.6f}")
"""


def measure(provider: str, n: int) -> tuple[float, float, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, provider, str(n)], capture_output=True, text=True, check=True)
    seconds, mib, loss = out.stdout.split()
    return float(seconds), float(mib), float(loss)


def main(sizes: list[int]) -> None:
    print(f"| N=M | D | mmot-rust fwd+bwd (s) | materialized fwd+bwd (s) | time ratio rust/materialized | peak RSS increase rust (MiB) | peak RSS increase materialized (MiB) | loss rust / materialized |")
    print("|---|---|---|---|---|---|---|---|")
    for n in sizes:
        rust = measure("mmot-rust", n)
        dense = measure("materialized", n)
        print(
            f"| {n} | {D} | {rust[0]:.2f} | {dense[0]:.2f} | {rust[0] / dense[0]:.2f} | {rust[1]:.0f} | {dense[1]:.0f} | "
            f"{rust[2]:.4f} / {dense[2]:.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or SIZES)
