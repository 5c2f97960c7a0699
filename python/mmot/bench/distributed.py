"""``mmot-bench distributed``: the sharded Sinkhorn ops over gloo processes on this machine.

Spawns ``--world`` CPU processes (gloo, one ``torch.distributed`` group), each holding an equal
shard of the rows, and times per call, forward and forward + backward:

- ``sharded-kernel``: ``process_group=`` with ``backend="auto"`` (the Rust kernel on each rank's
  rows, column sums all-reduced per iteration);
- ``sharded-reference``: ``process_group=`` with ``backend="torch"`` (the reference with
  all-reduced column sums: the path every sharded call took before the kernels did);
- ``single-kernel``: one process, the kernel on all the rows, with the threads of all ranks
  together: what the collectives cost next to not sharding at all.

Each process gets ``cores // world`` threads (at least 1), so the ranks share the machine as the
single process does. Rounds alternate the providers; the median of the rounds is reported, with
the ratio sharded-reference / sharded-kernel. On a shared CPU only the ratios mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# (N, K, k, eps, iters) of each op: Multi-SK at SSPC's size (bench "quick"), Sinkhorn at SwAV's.
SIZES = {
    "multi_sinkhorn": {"quick": (7660, 64, 32, 0.07, 20), "tiny": (300, 16, 8, 0.07, 20)},
    "sinkhorn": {"quick": (4096, 3000, 0, 0.05, 3), "tiny": (256, 96, 0, 0.05, 3)},
}
PROVIDERS = ("sharded-kernel", "sharded-reference")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmot-bench distributed", description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", choices=sorted(SIZES), default=["multi_sinkhorn"], metavar="OP")
    parser.add_argument("--world", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke test (the figures mean nothing)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, 1 with --tiny)")
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the records as JSON")
    args = parser.parse_args(argv)
    if args.world < 2:
        parser.error(f"--world must be >= 2; got {args.world}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    args.size = "tiny" if args.tiny else "quick"
    args.repeats = args.repeats or (1 if args.tiny else 5)
    return args


def _scores(n: int, k: int) -> torch.Tensor:
    from mmot.bench.workloads import cosine_scores

    return cosine_scores(n, k, seed=0)


def _call(op: str, size: tuple, scores: torch.Tensor, **kwargs) -> torch.Tensor:
    import mmot

    n, n_anchors, k, eps, iters = size
    if op == "multi_sinkhorn":
        return mmot.multi_sinkhorn(scores, k, eps, iters, **kwargs)
    return mmot.sinkhorn(scores, eps, iters, **kwargs)


def _timed(fn, backward: bool, upstream: torch.Tensor | None, barrier=None) -> float:
    if barrier:
        barrier()
    start = time.perf_counter()
    out = fn()
    if backward:
        out.backward(upstream)
    if barrier:
        barrier()
    return time.perf_counter() - start


def _modes(args) -> list[str]:
    return ["forward"] if args.no_backward else ["forward", "forward+backward"]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, threads: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MMOT_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.group.WORLD
    times: dict[str, list[float]] = {}
    for op in args.ops:
        size = SIZES[op][args.size]
        full = _scores(size[0], size[1])
        shard = full.chunk(world, dim=0)[rank].contiguous()
        upstream = torch.randn(full.shape, generator=torch.Generator().manual_seed(1)).chunk(world, dim=0)[rank]
        for mode in _modes(args):
            backward = mode != "forward"
            for _ in range(args.repeats + 1):  # the first round warms up
                for provider in PROVIDERS:
                    backend = "auto" if provider == "sharded-kernel" else "torch"
                    x = shard.clone().requires_grad_(backward)

                    def fn(x=x, backend=backend, size=size, op=op):
                        return _call(op, size, x, process_group=group, backend=backend)

                    if backward:
                        elapsed = _timed(fn, True, upstream, dist.barrier)
                    else:
                        with torch.no_grad():
                            elapsed = _timed(fn, False, None, dist.barrier)
                    times.setdefault(f"{op}|{provider}|{mode}", []).append(elapsed)
    if rank == 0:
        # The warm-up round is dropped.
        Path(out_dir, "times.json").write_text(json.dumps({key: value[1:] for key, value in times.items()}))
    dist.barrier()
    os._exit(0)  # gloo's teardown aborts a process now and then; the figures are on disk


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(args: argparse.Namespace) -> list[dict]:
    import torch.multiprocessing as mp

    cores = os.cpu_count() or 1
    threads = max(1, cores // args.world)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(args.world, _free_port(), args, threads, out_dir), nprocs=args.world, join=True)
        times = json.loads(Path(out_dir, "times.json").read_text())
    # The single process, with the ranks' threads together, after the workers have left.
    saved = torch.get_num_threads()
    torch.set_num_threads(threads * args.world)
    os.environ["MMOT_NUM_THREADS"] = str(threads * args.world)
    try:
        for op in args.ops:
            size = SIZES[op][args.size]
            full = _scores(size[0], size[1])
            upstream = torch.randn(full.shape, generator=torch.Generator().manual_seed(1))
            for mode in _modes(args):
                backward = mode != "forward"
                for _ in range(args.repeats + 1):
                    x = full.clone().requires_grad_(backward)
                    fn = lambda x=x, size=size, op=op: _call(op, size, x)  # noqa: E731
                    if backward:
                        elapsed = _timed(fn, True, upstream)
                    else:
                        with torch.no_grad():
                            elapsed = _timed(fn, False, None)
                    times.setdefault(f"{op}|single-kernel|{mode}", []).append(elapsed)
                times[f"{op}|single-kernel|{mode}"] = times[f"{op}|single-kernel|{mode}"][1:]
    finally:
        torch.set_num_threads(saved)
        os.environ.pop("MMOT_NUM_THREADS", None)
    records = []
    for key, values in times.items():
        op, provider, mode = key.split("|")
        n, n_anchors, k, eps, iters = SIZES[op][args.size]
        shape = f"N={n} K={n_anchors}" + (f" k={k}" if op == "multi_sinkhorn" else "") + f" iters={iters}"
        records.append(
            dict(
                op=op,
                shape=shape,
                provider=provider,
                mode=mode,
                world=args.world if provider != "single-kernel" else 1,
                threads_per_process=threads if provider != "single-kernel" else threads * args.world,
                min_s=min(values),
                median_s=statistics.median(values),
                rounds=len(values),
            )
        )
    return records


def ratios(records: list[dict]) -> dict[str, float]:
    """sharded-reference / sharded-kernel median time, per op and mode."""
    by = {(r["op"], r["provider"], r["mode"]): r["median_s"] for r in records}
    found = {}
    for op, provider, mode in by:
        if provider == "sharded-kernel" and (op, "sharded-reference", mode) in by:
            found[f"{op} {mode}"] = by[(op, "sharded-reference", mode)] / by[(op, provider, mode)]
    return found


def format_table(records: list[dict], world: int) -> str:
    lines = [f"{'op':<15} {'shape':<28} {'mode':<17} {'provider':<18} {'procs':>5} {'median ms':>10} {'min ms':>9}"]
    for r in records:
        lines.append(
            f"{r['op']:<15} {r['shape']:<28} {r['mode']:<17} {r['provider']:<18} {r['world']:>5} "
            f"{1e3 * r['median_s']:>10.2f} {1e3 * r['min_s']:>9.2f}"
        )
    lines.append("")
    for label, ratio in ratios(records).items():
        lines.append(f"{label}: {world} processes, sharded-kernel is {ratio:.1f}x faster than sharded-reference")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = _parse(sys.argv[1:] if argv is None else argv)
    records = run(args)
    print(format_table(records, args.world))
    if args.json:
        args.json.write_text(json.dumps({"command": ["mmot-bench", "distributed", *(argv or [])], "records": records}, indent=1))
        print(f"wrote {args.json}")
