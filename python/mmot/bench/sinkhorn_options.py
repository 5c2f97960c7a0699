"""``mmot-bench sinkhorn-options``: what the Sinkhorn options save, measured side by side.

* ``ragged``: a batch of problems of different sizes in one call, against a Python loop of
  per-problem calls and against today's op on the batch padded to the largest size (tiny masses
  on the padding keep it valid);
* ``eps-scaling``: iterations and time to reach a marginal error at a small ε, cold against the
  geometric ε-schedule;
* ``warm-start``: iterations to reach a marginal error on consecutive SwAV batches, cold against
  starting from the previous batch's prototype potentials;
* ``implicit``: the implicit backward against the unrolled one at 20 and 200 iterations;
* ``overhead``: what the options path costs per iteration: the default call against the same
  call with ``return_info=True`` (same iterations, answer and gradient, run by the options ops).

Every comparison alternates its providers round after round, so that they see the same load;
times are the best of the rounds (milliseconds).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import mmot
from mmot.bench.workloads import cosine_scores


def best_ms(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best time of each call over ``repeats`` interleaved rounds (one untimed round first)."""
    best = dict.fromkeys(calls, float("inf"))
    for round_index in range(repeats + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            elapsed = time.perf_counter() - start
            if round_index:
                best[name] = min(best[name], elapsed * 1e3)
    return best


def ragged_case(problems: int, low: int, high: int, seed: int = 0):
    """Padded (B, high, high) cosine scores with sizes uniform in [low, high], and the counts."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(low, high + 1, (problems,), generator=gen)
    cols = torch.randint(low, high + 1, (problems,), generator=gen)
    scores = cosine_scores(high, high, batch=(problems,))
    return scores, rows, cols


def padded_masses(rows: torch.Tensor, cols: torch.Tensor, size: int, tiny: float = 1e-9):
    """Masses that make today's op solve the valid blocks of a padded batch: the padding carries ``tiny``."""
    index = torch.arange(size)
    row_mass = torch.where(index < rows[:, None], 1.0, tiny)
    col_mass = torch.where(index < cols[:, None], (rows / cols)[:, None].float(), tiny)
    col_mass = col_mass * (row_mass.sum(-1, keepdim=True) / col_mass.sum(-1, keepdim=True))
    return row_mass, col_mass


def ragged(args) -> None:
    problems = 64 if args.tiny else 4096
    scores, rows, cols = ragged_case(problems, 4, 64)
    mats = [scores[b, : rows[b], : cols[b]].contiguous() for b in range(problems)]
    row_mass, col_mass = padded_masses(rows, cols, scores.shape[-1])
    eps, iters = 0.05, 20
    print(f"ragged: {problems} problems, N and K uniform in [4, 64], float32, eps {eps}, {iters} iterations")
    for backward in (False, True):
        best = best_ms(_ragged_calls(scores, rows, cols, mats, row_mass, col_mass, eps, iters, backward), args.repeats)
        mode = "forward+backward" if backward else "forward"
        base = best["mmot ragged"]
        print(f"  {mode:17s} " + "  ".join(f"{name} {ms:9.2f} ms ({ms / base:5.2f}x)" for name, ms in best.items()), flush=True)


def _ragged_calls(scores, rows, cols, mats, row_mass, col_mass, eps, iters, backward):
    ragged_in, padded_in = scores.clone().requires_grad_(backward), scores.clone().requires_grad_(backward)
    loop_in = [m.clone().requires_grad_(backward) for m in mats]

    def finish(outs):
        # A plan's plain sum has a zero gradient (its total is fixed): square it.
        if backward:
            torch.stack([o.square().sum() for o in outs]).sum().backward()

    return {
        "mmot ragged": lambda: finish([mmot.sinkhorn(ragged_in, eps, iters, row_counts=rows, col_counts=cols)]),
        "python loop": lambda: finish([mmot.sinkhorn(m, eps, iters) for m in loop_in]),
        "padded": lambda: finish([mmot.sinkhorn(padded_in, eps, iters, row_mass=row_mass, col_mass=col_mass)]),
    }


def eps_scaling(args) -> None:
    batch, n, k = (2, 64, 32) if args.tiny else (16, 256, 128)
    scores = cosine_scores(n, k, batch=(batch,)).double()
    eps, tol, cap = 1e-3, 1e-3, 20000
    print(f"eps-scaling: {batch}x({n}x{k}) cosine scores, float64, eps {eps}, tol {tol}, cap {cap}")
    schedules = {"cold": None, "geometric": "geometric", "decay 0.5": mmot.EpsSchedule(decay=0.5)}
    infos = {}

    def run(name):
        infos[name] = mmot.sinkhorn(scores, eps, cap, tol=tol, return_info=True, eps_schedule=schedules[name])[1]

    best = best_ms({name: (lambda name=name: run(name)) for name in schedules}, args.repeats)
    for name, info in infos.items():
        print(
            f"  {name:10s} iterations total {int(info.n_iters.sum()):7d} max {int(info.n_iters.max()):6d}  "
            f"max error {float(info.marginal_error.max()):.2e}  {best[name]:9.2f} ms",
            flush=True,
        )


def warm_start(args) -> None:
    n, k, steps = (256, 100, 4) if args.tiny else (4096, 3000, 8)
    eps, tol, cap = 0.05, 1e-3, 1000
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.nn.functional.normalize(torch.randn(k, 128, generator=gen), dim=-1)
    centers = torch.nn.functional.normalize(torch.randn(k // 4, 128, generator=gen), dim=-1)
    print(f"warm-start: {steps} consecutive SwAV batches {n}x{k}, float32, eps {eps}, tol {tol}")
    cold_iters, warm_iters, g = [], [], None
    for step in range(steps):
        picks = torch.randint(0, centers.shape[0], (n,), generator=gen)
        feats = torch.nn.functional.normalize(centers[picks] + 0.5 * torch.randn(n, 128, generator=gen), dim=-1)
        scores = feats @ prototypes.T
        _, cold = mmot.sinkhorn(scores, eps, cap, tol=tol, return_info=True)
        init = None if g is None else (None, g)
        _, (_, g), warm = mmot.sinkhorn(scores, eps, cap, tol=tol, init=init, return_potentials=True, return_info=True)
        if step:  # the first batch has nothing to start from
            cold_iters.append(int(cold.n_iters))
            warm_iters.append(int(warm.n_iters))
    print(f"  cold iterations {cold_iters} (mean {sum(cold_iters) / len(cold_iters):.1f})")
    print(f"  warm iterations {warm_iters} (mean {sum(warm_iters) / len(warm_iters):.1f})", flush=True)


def implicit(args) -> None:
    sizes = {"sinkhorn": (256, 100) if args.tiny else (4096, 3000), "multi_sinkhorn": (256, 16) if args.tiny else (7660, 64)}
    for op, (n, k) in sizes.items():
        scores = cosine_scores(n, k).requires_grad_(True)
        upstream = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
        for iters in (20, 200):
            graphs = {}
            for mode in ("unrolled", "implicit"):
                if op == "sinkhorn":
                    graphs[mode] = mmot.sinkhorn(scores, 0.05, iters, grad=mode)
                else:
                    graphs[mode] = mmot.multi_sinkhorn(scores, k // 2, 0.07, iters, grad=mode)
            best = best_ms(_backward_calls(graphs, scores, upstream), args.repeats)
            print(
                f"implicit: {op} {n}x{k}, {iters:3d} iterations: backward unrolled {best['unrolled']:9.2f} ms, "
                f"implicit {best['implicit']:9.2f} ms ({best['unrolled'] / best['implicit']:.2f}x faster)",
                flush=True,
            )


def overhead(args) -> None:
    big = 64 if args.tiny else 65536
    workloads = [
        ("sinkhorn", (256, 100, 1) if args.tiny else (4096, 3000, 1), 3, lambda x, **o: mmot.sinkhorn(x, 0.05, 3, **o)),
        ("sinkhorn", (4, 4, big), 20, lambda x, **o: mmot.sinkhorn(x, 0.05, 20, **o)),
        ("sinkhorn", (16, 16, big), 20, lambda x, **o: mmot.sinkhorn(x, 0.05, 20, **o)),
        (
            "multi_sinkhorn k=K/2",
            (256, 64, 1) if args.tiny else (7660, 64, 1),
            20,
            lambda x, **o: mmot.multi_sinkhorn(x, 32, 0.07, 20, **o),
        ),
        ("multi_sinkhorn k=K/2", (16, 16, big), 20, lambda x, **o: mmot.multi_sinkhorn(x, 8, 0.07, 20, **o)),
    ]
    print("overhead: forward ms of the default call and of the same call with return_info=True (the options path)")
    for op, (n, k, batch), iters, call in workloads:
        scores = cosine_scores(n, k, batch=(batch,)) if batch > 1 else cosine_scores(n, k)
        calls = {"default": lambda c=call, x=scores: c(x), "options": lambda c=call, x=scores: c(x, return_info=True)}
        best = best_ms(calls, args.repeats)
        name = f"{op} {batch}x({n}x{k}), {iters} iters" if batch > 1 else f"{op} {n}x{k}, {iters} iters"
        print(
            f"  {name:44s} default {best['default']:9.2f}  options {best['options']:9.2f}  ({best['options'] / best['default']:5.2f}x)",
            flush=True,
        )


def _backward_calls(graphs, scores, upstream):
    return {mode: (lambda out=out: torch.autograd.grad(out, scores, upstream, retain_graph=True)) for mode, out in graphs.items()}


CASES = {"ragged": ragged, "eps-scaling": eps_scaling, "warm-start": warm_start, "implicit": implicit, "overhead": overhead}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="mmot-bench sinkhorn-options", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), metavar="CASE", help=f"of {', '.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke test (the figures mean nothing)")
    args = parser.parse_args(argv)
    for name in args.cases:
        CASES[name](args)
