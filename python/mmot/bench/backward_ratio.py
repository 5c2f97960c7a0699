"""``mmot-bench backward-ratio``: the unrolled Sinkhorn backward's time over its forward's.

The Sinkhorn ops differentiate through every iteration; the reverse pass replays the forward and
then runs the iterations backwards, so its cost is a multiple of the forward's. This times both
halves of one call on the workloads where that multiple matters (the SSPC-size Multi-SK, the
SwAV-size Sinkhorn, and 65536 tiny problems), alternating forward and backward round after
round so that both see the same load, and reports the best of each and their ratio. The
``*_log`` rows force the log domain (``log_domain=True``), which small ε selects by itself.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import mmot
from mmot.bench.workloads import cosine_scores

Case = tuple[str, Callable[[], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def cases() -> dict[str, Case]:
    tiny = {side: (lambda side=side: cosine_scores(side, side, batch=(65536,))) for side in (4, 16)}
    return {
        "multi_sinkhorn": (
            "multi_sinkhorn N=7660 K=64 k=32, 20 iters",
            lambda: cosine_scores(7660, 64),
            lambda x: mmot.multi_sinkhorn(x, 32, 0.07, 20),
        ),
        "multi_sinkhorn_log": (
            "multi_sinkhorn N=7660 K=64 k=32, 20 iters, log",
            lambda: cosine_scores(7660, 64),
            lambda x: mmot.multi_sinkhorn(x, 32, 0.07, 20, log_domain=True),
        ),
        "sinkhorn": ("sinkhorn N=4096 K=3000, 3 iters", lambda: cosine_scores(4096, 3000), lambda x: mmot.sinkhorn(x, 0.05, 3)),
        "sinkhorn_log": (
            "sinkhorn N=4096 K=3000, 3 iters, log",
            lambda: cosine_scores(4096, 3000),
            lambda x: mmot.sinkhorn(x, 0.05, 3, log_domain=True),
        ),
        "sinkhorn_4x4": ("sinkhorn 65536x(4x4), 20 iters", tiny[4], lambda x: mmot.sinkhorn(x, 0.1, 20)),
        "sinkhorn_16x16": ("sinkhorn 65536x(16x16), 20 iters", tiny[16], lambda x: mmot.sinkhorn(x, 0.1, 20)),
        "multi_sinkhorn_4x4": ("multi_sinkhorn 65536x(4x4) k=2, 20 iters", tiny[4], lambda x: mmot.multi_sinkhorn(x, 2, 0.1, 20)),
        "multi_sinkhorn_16x16": ("multi_sinkhorn 65536x(16x16) k=8, 20 iters", tiny[16], lambda x: mmot.multi_sinkhorn(x, 8, 0.1, 20)),
    }


def measure(
    make: Callable[[], torch.Tensor],
    op: Callable[[torch.Tensor], torch.Tensor],
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, float]:
    """(best forward ms, best backward ms) of ``op`` on ``make()`` with a seeded upstream gradient,
    timed by ``clock`` (wall time by default)."""
    scores = make().requires_grad_(True)
    upstream = torch.randn(scores.shape, generator=torch.Generator().manual_seed(1))
    out = op(scores)
    best_forward = best_backward = float("inf")
    for _ in range(repeats + 1):  # the first round warms up
        start = clock()
        with torch.no_grad():
            op(scores)
        middle = clock()
        torch.autograd.grad(out, scores, upstream, retain_graph=True)
        end = clock()
        best_forward, best_backward = min(best_forward, middle - start), min(best_backward, end - middle)
    return best_forward * 1e3, best_backward * 1e3


def main(argv: list[str]) -> None:
    table = cases()
    parser = argparse.ArgumentParser(prog="mmot-bench backward-ratio", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(table), default=list(table), metavar="CASE", help=f"of {', '.join(table)}")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time (default), or this process's CPU time on one thread (torch's and, unless "
        "MMOT_NUM_THREADS says otherwise, the Rust kernels'), which a busy machine barely moves",
    )
    args = parser.parse_args(argv)
    clock = time.perf_counter
    if args.clock == "cpu":
        # Idle pool threads that spin would count as work: one thread, so only work counts.
        torch.set_num_threads(1)
        clock = time.process_time
    print(f"{'workload':50s} {'forward ms':>11s} {'backward ms':>12s} {'backward/forward':>17s}")
    for key in args.cases:
        label, make, op = table[key]
        forward, backward = measure(make, op, args.repeats, clock)
        print(f"{label:50s} {forward:11.2f} {backward:12.2f} {backward / forward:16.2f}x", flush=True)
