"""Implicit vs unrolled Sinkhorn backward (issue 20): time of one backward, float32, Rust.

Unrolled: ``torch.autograd.grad`` through ``mmot.sinkhorn`` / ``mmot.multi_sinkhorn`` (Rust),
which replays the forward and reverses every iteration. Implicit: the fixed-point adjoint
(``mmot.ops._implicit_rust``) at the plan / potentials of a forward with the same n_iters.
The two alternate round after round (same load); best of ``--repeats`` each.
Run: ``PYTHONPATH=python python bench/implicit_vs_unrolled.py``.
"""

from __future__ import annotations

import argparse
import math
import time

import mmot
import torch
from mmot.bench.workloads import cosine_scores
from mmot.ops import _implicit_rust


def multi_potentials(s: torch.Tensor, weights, counts, eps: float, iters: int):
    """Score-unit potentials F (G, K), Gam (N, K), H (G, N) of grouped Multi-SK (spec section 2)."""
    n, k = s.shape
    s = s.double()
    w = torch.tensor(weights, dtype=torch.float64)[:, None, None]
    lc = torch.log(torch.tensor(counts, dtype=torch.float64))[:, None, None]
    f = torch.zeros(len(weights), k, dtype=torch.float64)
    gam = torch.zeros(n, k, dtype=torch.float64)
    h = torch.zeros(len(weights), n, dtype=torch.float64)
    ws = w * s
    for _ in range(iters):
        f = eps * math.log(n / k) - eps * torch.logsumexp((ws + gam + h[:, :, None]) / eps, 1)
        gam = -eps * torch.logsumexp(lc + (ws + f[:, None, :] + h[:, :, None]) / eps, 0)
        h = -eps * torch.logsumexp((ws + gam + f[:, None, :]) / eps, 2)
    return f.float(), gam.float(), h.float()


def best_of(fns, repeats):
    best = [float("inf")] * len(fns)
    for _ in range(repeats + 1):  # the first round warms up
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return [b * 1e3 for b in best]


def report(label: str, n_iters: int, unrolled: float, implicit: float, its: torch.Tensor) -> None:
    ratio = unrolled / implicit
    print(f"{label:40s} {n_iters:7d} {unrolled:12.1f} {implicit:12.1f} {ratio:6.1f}x {int(its[0]):8d}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iters", type=int, nargs="+", default=[20, 200])
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}")
    print(f"{'workload':40s} {'n_iters':>7s} {'unrolled ms':>12s} {'implicit ms':>12s} {'ratio':>7s} {'CG iters':>8s}")

    s = cosine_scores(4096, 3000).requires_grad_(True)
    up = torch.randn(s.shape, generator=torch.Generator().manual_seed(1))
    one = torch.ones(1, dtype=torch.int64)
    for n_iters in args.iters:
        out = mmot.sinkhorn(s, 0.05, n_iters, backend="rust")
        plan = out.detach()
        its = torch.zeros(1, dtype=torch.int64)
        unrolled, implicit = best_of(
            [
                lambda out=out: torch.autograd.grad(out, s, up, retain_graph=True),
                lambda plan=plan, its=its: _implicit_rust.sinkhorn_implicit_backward(
                    up[None], plan[None], one * 4096, one * 3000, 0.05, math.inf, iters=its
                ),
            ],
            args.repeats,
        )
        report("sinkhorn N=4096 K=3000 eps=0.05", n_iters, unrolled, implicit, its)

    s = cosine_scores(7660, 64).requires_grad_(True)
    up = torch.randn(s.shape, generator=torch.Generator().manual_seed(1))
    weights, counts, tops = [0.25, 1.0], [32.0, 32.0], [0.0, 32.0]
    for n_iters in args.iters:
        out = mmot.multi_sinkhorn(s, 32, 0.07, n_iters, backend="rust")  # default min-max; its VJP is O(N·K)
        f, gam, h = multi_potentials(s.detach(), weights, counts, 0.07, n_iters)
        its = torch.zeros(1, dtype=torch.int64)
        unrolled, implicit = best_of(
            [
                lambda out=out: torch.autograd.grad(out, s, up, retain_graph=True),
                lambda f=f, gam=gam, h=h, its=its: _implicit_rust.multi_sinkhorn_implicit_backward(
                    up[None],
                    s.detach()[None],
                    f[None],
                    gam[None],
                    h[None],
                    one * 7660,
                    one * 64,
                    weights,
                    torch.tensor([counts]),
                    torch.tensor([tops]),
                    0.07,
                    iters=its,
                ),
            ],
            args.repeats,
        )
        report("multi_sinkhorn N=7660 K=64 k=32 eps=0.07", n_iters, unrolled, implicit, its)


if __name__ == "__main__":
    main()
