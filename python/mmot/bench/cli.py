"""``mmot-bench``: kernel throughput of every op against the alternatives users would pick instead.

Each workload's providers run side by side with interleaved repeats; the table reports the
median time, mmot's speed-up over each provider, the achieved GB/s and the fraction of the
memory floor (the floor's bytes at the copy bandwidth measured in the same run). On a CPU only
the ratios are meaningful: absolute times move with the machine's load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import mmot
from mmot.bench import timing, workloads


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmot-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (under 2 minutes on a 2-core CPU)")
    parser.add_argument("--ops", nargs="+", choices=sorted(workloads.OPS), default=sorted(workloads.OPS), metavar="OP",
                        help=f"ops to time (default: all of {', '.join(sorted(workloads.OPS))})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per workload (default 3 with --quick, else 7)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the records as JSON")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG of mmot's speed-up per op and provider")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="write the table as a markdown report (bench/RESULTS.md)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False); use --device cpu")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    for path in (args.json, args.plot, args.markdown):
        if path is not None and not path.resolve().parent.is_dir():
            parser.error(f"cannot write {path}: directory {path.resolve().parent} does not exist")
    args.repeats = args.repeats or (3 if args.quick else 7)
    return args


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, copy_gbps: float) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mmot": mmot.__version__,
        "device": device.type,
        "copy_gbps": round(copy_gbps, 2),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(args: argparse.Namespace, argv_for_record: list[str] | None = None) -> dict:
    device = torch.device(args.device)
    copy_gbps = timing.copy_bandwidth_gbps(device)
    selected = [w for op in args.ops for w in workloads.OPS[op](device, args.quick)]
    if args.quick:
        for workload in selected:  # compiling each reference costs tens of seconds
            if "reference-compiled" in workload.providers:
                workload.providers["reference-compiled"] = "skipped with --quick (compile time)"
    records, skipped = [], []
    with tqdm(total=len(selected) * args.repeats, desc="mmot-bench", unit="round", file=sys.stderr) as progress:
        for workload in selected:
            progress.set_postfix_str(f"{workload.op} {workload.shape}")
            inputs = workload.make_inputs(device)
            calls = {name: (lambda fn=fn: fn(inputs)) for name, fn in workload.providers.items() if callable(fn)}
            results = timing.interleaved(calls, device, args.repeats, on_step=lambda: progress.update(1))
            for name, fn in workload.providers.items():
                result = results.get(name, fn)
                if isinstance(result, timing.Timing):
                    records.append({
                        "op": workload.op,
                        "shape": workload.shape,
                        "provider": name,
                        "median_ms": round(result.median_ms, 4),
                        "min_ms": round(result.min_ms, 4),
                        "max_ms": round(result.max_ms, 4),
                        "gbps": round(workload.floor_bytes / (result.median_ms * 1e-3) / 1e9, 3),
                        "floor_ms": round(workload.floor_bytes / (copy_gbps * 1e9) * 1e3, 4),
                    })
                else:
                    reason = f"{type(result).__name__}: {result}" if isinstance(result, Exception) else str(result)
                    skipped.append({"op": workload.op, "shape": workload.shape, "provider": name, "reason": reason})
            del inputs
    command = " ".join(["mmot-bench", *(argv_for_record or [])])
    return {"command": command, "machine": machine_info(device, copy_gbps), "records": records, "skipped": skipped}


def format_table(report: dict) -> str:
    """A markdown table per workload: time, mmot's speed-up over each provider, GB/s, floor fraction."""
    lines = []
    machine = report["machine"]
    lines.append(
        f"mmot {machine['mmot']} · torch {machine['torch']} · {machine.get('gpu', machine['processor'])} · "
        f"{machine['torch_threads']} threads · copy {machine['copy_gbps']} GB/s · {machine['date']}"
    )
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in report["records"]:
        groups.setdefault((record["op"], record["shape"]), []).append(record)
    for (op, shape), rows in groups.items():
        mine = next((r for r in rows if r["provider"].startswith("mmot-")), None)
        lines += ["", f"### {op} · {shape}", "",
                  "| provider | median ms | min–max ms | mmot speed-up | GB/s | floor fraction |", "|---|---:|---:|---:|---:|---:|"]
        for r in sorted(rows, key=lambda r: r["median_ms"]):
            speedup = f"{r['median_ms'] / mine['median_ms']:.1f}×" if mine else "–"
            lines.append(
                f"| {r['provider']} | {r['median_ms']:.3f} | {r['min_ms']:.3f}–{r['max_ms']:.3f} | {speedup} | "
                f"{r['gbps']:.2f} | {r['floor_ms'] / r['median_ms']:.1%} |"
            )
        for skip in (s for s in report["skipped"] if (s["op"], s["shape"]) == (op, shape)):
            lines.append(f"| {skip['provider']} | – | – | – | – | {skip['reason']} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, dict[str, float]] = {}
    for record in report["records"]:
        groups.setdefault(f"{record['op']}\n{record['shape']}", {})[record["provider"]] = record["median_ms"]
    labels = [label for label, times in groups.items() if any(p.startswith("mmot-") for p in times)]
    providers = sorted({p for label in labels for p in groups[label] if not p.startswith("mmot-")})
    figure, axis = plt.subplots(figsize=(max(6, 1.8 * len(labels)), 4.5))
    width = 0.8 / max(1, len(providers))
    for index, provider in enumerate(providers):
        xs, ys = [], []
        for position, label in enumerate(labels):
            times = groups[label]
            mine = next(t for p, t in times.items() if p.startswith("mmot-"))
            if provider in times:
                xs.append(position + index * width)
                ys.append(times[provider] / mine)
        axis.bar(xs, ys, width, label=provider)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_yscale("log")
    axis.set_ylabel("mmot speed-up (provider time / mmot time)")
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, fontsize=7)
    axis.legend(fontsize=7)
    axis.set_title(f"mmot-bench · {report['machine'].get('gpu', report['machine']['processor'])}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown_report(report: dict) -> str:
    machine = report["machine"]
    where = machine.get("gpu", f"{machine['processor']}, {machine['cpu_count']} cores")
    header = [
        f"## mmot-bench on {machine['device']} ({where})",
        "",
        f"Command: `{report['command']}` · date {machine['date']} · measured copy bandwidth {machine['copy_gbps']} GB/s "
        "(read+write). The floor of a workload is the fewest bytes a streaming implementation moves (one read of the "
        "scores per iteration plus one write of the result) at that bandwidth; the floor fraction is floor time / median time.",
        "",
    ]
    return "\n".join(header) + format_table(report) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    report = run(args, argv)
    print(format_table(report))
    if args.markdown:
        args.markdown.write_text(markdown_report(report))
        print(f"\nwrote {args.markdown}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
