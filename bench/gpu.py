"""GPU benchmark of mmot's Triton kernels: correctness at full size, then timings against baselines.

    python bench/gpu.py [--quick] [--json PATH] [--repeats 20] [--warmup 5]

On a CUDA machine this
1. checks every op at full size against ``mmot.reference`` (float64 reference, fp32 kernels);
2. times every op (CUDA events, warm-up, median) for: mmot-triton, reference-eager (torch eager
   of ``mmot.reference``), reference-compiled (``torch.compile`` of it), official-dense (the SSPC
   (K, N, K) Multi-SK of DESIGN §2.2, Multi-SK only) and flash-sinkhorn (PyPI ``flash-sinkhorn``
   where installed; SwAV only, since its squared-Euclidean cost fits unit vectors:
   ‖z - c‖² = 2 - 2 z·c, so blur = sqrt(2·eps); it runs its own iteration schedule);
3. measures device-to-device copy bandwidth in the same run and prints, per workload, time,
   speed-up over reference-eager and the fraction of the memory floor (floor = bytes the op must
   move / copy bandwidth; Sinkhorn ops: one read of the scores per iteration plus one write).

Without CUDA it exits with a clear message (status 2).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import mmot  # noqa: E402
from mmot import reference  # noqa: E402

DENSE_MAX_ELEMENTS = 1 << 31  # official-dense holds several (K, N, K) tensors


# ------------------------------------------------------------------ timing


def cuda_time_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbps(megabytes: int = 1024, repeats: int = 10) -> float:
    """Device-to-device copy, counting read + write bytes."""
    n = megabytes * (1 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), 3, repeats)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------ baselines

from mmot.bench.baselines import official_dense_multi_sinkhorn  # noqa: E402


def flash_sinkhorn_provider(z, c, eps):
    try:
        from flash_sinkhorn import SamplesLoss
    except Exception as error:  # noqa: BLE001
        return f"not installed ({type(error).__name__})"
    try:
        loss = SamplesLoss(loss="sinkhorn", p=2, blur=math.sqrt(2 * eps), debias=False)
        loss(z, c)
    except Exception as error:  # noqa: BLE001
        return f"failed: {type(error).__name__}: {error}"[:120]
    return lambda: loss(z, c)


def compiled(fn):
    try:
        return torch.compile(fn, fullgraph=True, dynamic=False)
    except Exception as error:  # noqa: BLE001
        return f"compile failed: {error}"[:120]


# ------------------------------------------------------------------ workloads


def unit_rows(n, dim, gen):
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=gen, device="cuda"), dim=-1)


def cosine(n, k, dim=256, batch=(), seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(*batch, n, dim, generator=gen, device="cuda"), dim=-1)
    a = torch.nn.functional.normalize(torch.randn(*batch, k, dim, generator=gen, device="cuda"), dim=-1)
    return x @ a.transpose(-1, -2)


def workloads(quick: bool):
    out = []
    for n_anchors in ([64] if quick else [64, 128, 256, 1024]):
        n, k, eps, iters = 7660, n_anchors // 2, 0.07, 20
        s = cosine(n, n_anchors)
        mass = torch.full((n_anchors,), n / n_anchors, device="cuda")
        weights = [0.25] * (n_anchors - k) + [1.0] * k
        ref = lambda s=s, k=k, mass=mass, weights=weights: reference.multi_sinkhorn(s, 0.07, 20, weights, k, mass)  # noqa: E731
        providers = {
            "mmot-triton": lambda s=s, k=k: mmot.multi_sinkhorn(s, k, backend="triton"),
            "reference-eager": ref,
            "reference-compiled": compiled(ref),
        }
        providers["official-dense"] = (
            (lambda s=s, k=k: official_dense_multi_sinkhorn(s, k, eps, iters))
            if n_anchors * n * n_anchors <= DENSE_MAX_ELEMENTS
            else f"skipped: (K, N, K) = {n_anchors * n * n_anchors:.2e} entries"
        )
        out.append(dict(
            op="multi_sinkhorn", shape=f"N={n} K={n_anchors} k={k} 20 it", providers=providers,
            floor_bytes=(iters + 1) * s.numel() * 4 + s.numel() * 4,
            check=lambda s=s, k=k: (mmot.multi_sinkhorn(s, k, backend="triton").double(),
                                    mmot.multi_sinkhorn(s.double(), k, backend="torch")),
            grad=lambda s=s, k=k: (s, lambda t, b: mmot.multi_sinkhorn(t, k, backend=b)),
        ))

    gen = torch.Generator(device="cuda").manual_seed(1)
    z, c = unit_rows(4096, 128, gen), unit_rows(3000, 128, gen)
    s = z @ c.T
    rows, cols = torch.ones(4096, device="cuda"), torch.full((3000,), 4096 / 3000, device="cuda")
    ref = lambda: reference.sinkhorn(s, 0.05, 3, rows, cols)  # noqa: E731
    out.append(dict(
        op="sinkhorn", shape="B=4096 K=3000 3 it",
        providers={
            "mmot-triton": lambda: mmot.sinkhorn(s, 0.05, 3, backend="triton"),
            "reference-eager": ref, "reference-compiled": compiled(ref),
            "flash-sinkhorn": flash_sinkhorn_provider(z, c, 0.05),
        },
        floor_bytes=(3 + 1) * s.numel() * 4 + s.numel() * 4,
        check=lambda: (mmot.sinkhorn(s, 0.05, 3, backend="triton").double(), mmot.sinkhorn(s.double(), 0.05, 3, backend="torch")),
        grad=lambda: (s, lambda t, b: mmot.sinkhorn(t, 0.05, 3, backend=b)),
    ))

    for size in (4, 16):
        batch = 65536
        sb = cosine(size, size, dim=32, batch=(batch,))
        mass = torch.full((batch, size), 1.0, device="cuda")
        weights = [0.25] * (size - size // 2) + [1.0] * (size // 2)
        ref_m = lambda sb=sb, size=size, mass=mass, weights=weights: reference.multi_sinkhorn(sb, 0.07, 20, weights, size // 2, mass)  # noqa: E731
        out.append(dict(
            op="multi_sinkhorn", shape=f"{batch}x{size}x{size} 20 it",
            providers={
                "mmot-triton": lambda sb=sb, size=size: mmot.multi_sinkhorn(sb, size // 2, backend="triton"),
                "reference-eager": ref_m, "reference-compiled": compiled(ref_m),
            },
            floor_bytes=2 * sb.numel() * 4,
            check=lambda sb=sb, size=size: (mmot.multi_sinkhorn(sb, size // 2, backend="triton").double(),
                                            mmot.multi_sinkhorn(sb.double(), size // 2, backend="torch")),
            grad=None,
        ))
        rows_b = torch.ones(batch, size, device="cuda")
        ref_s = lambda sb=sb, rows_b=rows_b: reference.sinkhorn(sb, 0.05, 20, rows_b, rows_b)  # noqa: E731
        out.append(dict(
            op="sinkhorn", shape=f"{batch}x{size}x{size} 20 it",
            providers={
                "mmot-triton": lambda sb=sb: mmot.sinkhorn(sb, 0.05, 20, backend="triton"),
                "reference-eager": ref_s, "reference-compiled": compiled(ref_s),
            },
            floor_bytes=2 * sb.numel() * 4,
            check=lambda sb=sb: (mmot.sinkhorn(sb, 0.05, 20, backend="triton").double(),
                                 mmot.sinkhorn(sb.double(), 0.05, 20, backend="torch")),
            grad=None,
        ))

    gen = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(3, 1, 7660, 256, generator=gen, device="cuda")
    a = torch.randn(1, 3, 64, 256, generator=gen, device="cuda")
    ref = lambda: reference.similarity(x, a)  # noqa: E731
    out.append(dict(
        op="similarity", shape="(3,1,7660,256)x(1,3,64,256)",
        providers={"mmot-triton": lambda: mmot.similarity(x, a, backend="triton"), "reference-eager": ref, "reference-compiled": compiled(ref)},
        floor_bytes=(x.numel() + a.numel() + 9 * 7660 * 64) * 4,
        check=lambda: (mmot.similarity(x, a, backend="triton").double(), reference.similarity(x.double(), a.double())),
        grad=None,
    ))
    return out


# ------------------------------------------------------------------ main


def check(workload) -> dict:
    got, want = workload["check"]()
    result = {"max_abs_err": float((got - want).abs().max())}
    if workload.get("grad"):
        s, fn = workload["grad"]()
        g = torch.randn_like(s)
        grads = []
        for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
            leaf = s.to(dtype).detach().requires_grad_(True)
            (d,) = torch.autograd.grad(fn(leaf, backend), leaf, g.to(dtype))
            grads.append(d.double())
        scale = float(grads[1].abs().max())
        result["grad_rel_err"] = float((grads[0] - grads[1]).abs().max()) / max(scale, 1e-30)
    result["ok"] = result["max_abs_err"] < 5e-3 and result.get("grad_rel_err", 0.0) < 5e-3
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the K=64 SSPC size")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu.py: needs a CUDA GPU (torch.cuda.is_available() is False); "
              "use `mmot-bench` for CPU benchmarks.", file=sys.stderr)
        return 2

    device = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth_gbps()
    print(f"# {device}  torch {torch.__version__}  {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"# device-to-device copy: {bandwidth:.0f} GB/s (read + write)\n")
    rows = []
    header = f"{'op':<15} {'shape':<32} {'provider':<19} {'ms':>10} {'speed-up':>9} {'floor %':>8}  note"
    print(header)
    print("-" * len(header))
    failed = False
    for workload in workloads(args.quick):
        status = check(workload)
        failed |= not status["ok"]
        floor_ms = workload["floor_bytes"] / (bandwidth * 1e9) * 1e3
        times = {}
        for name, fn in workload["providers"].items():
            if isinstance(fn, str):
                times[name] = (None, fn)
                continue
            try:
                times[name] = (cuda_time_ms(fn, args.warmup, args.repeats), "")
            except Exception as error:  # noqa: BLE001
                times[name] = (None, f"failed: {type(error).__name__}: {error}"[:100])
            torch.cuda.empty_cache()
        base = times.get("reference-eager", (None, ""))[0]
        for name, (ms, note) in times.items():
            speedup = f"{base / ms:.1f}x" if ms and base else ""
            floor = f"{100 * floor_ms / ms:.0f}%" if ms else ""
            if name == "mmot-triton":
                note = ("check ok " if status["ok"] else "CHECK FAILED ") + ", ".join(
                    f"{key}={value:.1e}" for key, value in status.items() if key != "ok")
            print(f"{workload['op']:<15} {workload['shape']:<32} {name:<19} {ms if ms else float('nan'):>10.4f} {speedup:>9} {floor:>8}  {note}")
            rows.append(dict(op=workload["op"], shape=workload["shape"], provider=name, ms=ms, speedup=base / ms if ms and base else None,
                             floor_ms=floor_ms, floor_fraction=floor_ms / ms if ms else None, note=note))
        dense = times.get("official-dense", (None, ""))[0]
        if dense and times["mmot-triton"][0]:
            print(f"{'':<15} {'':<32} {'(vs official-dense)':<19} {'':>10} {dense / times['mmot-triton'][0]:>8.0f}x")
    if args.json:
        args.json.write_text(json.dumps(dict(device=device, torch=torch.__version__, copy_gbps=bandwidth,
                                             date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv), rows=rows), indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
