"""``mmot-bench``: every op against the alternatives users would pick instead, with physical floors.

The providers of each workload run in interleaved rounds; the table gives every provider's min
and median time, mmot's speed-up by each, and the fraction of the workload's physical floor (the
binding one of DRAM, cache and compute, measured on this machine in the same run). Optional:
forward + backward timings, peak memory per provider, and a check of every provider against
``mmot.reference``. On a CPU only the ratios are meaningful: absolute times move with the load.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

import mmot
from mmot.bench import check, floors, memory, report, timing, workloads
from mmot.bench.workloads import Provider, backward_of, forward

MODES = ("forward", "forward+backward")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmot-bench", description=__doc__.splitlines()[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="the SSPC and SwAV sizes, smaller batches (under 2 minutes on a 2-core CPU)")
    sizes.add_argument("--tiny", action="store_true", help="tiny sizes, one round: a smoke test of the runner (the figures mean nothing)")
    parser.add_argument(
        "--ops",
        nargs="+",
        choices=sorted(workloads.OPS),
        default=sorted(workloads.OPS),
        metavar="OP",
        help=f"ops to time (default: all of {', '.join(sorted(workloads.OPS))})",
    )
    parser.add_argument("--only", nargs="+", metavar="TEXT", help='only workloads whose label contains one of these (e.g. "K=1024")')
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 1 with --tiny, 5 with --quick, else 7)")
    parser.add_argument("--backward", action="store_true", help="also time forward + backward of the differentiable providers")
    parser.add_argument("--memory", action="store_true", help="peak memory a call adds, per provider (a fresh process per figure on CPU)")
    parser.add_argument("--check", action="store_true", help="compare every provider with mmot.reference; exit 1 on a mismatch")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd references (always skipped below full sizes)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the records as JSON")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG of mmot's speed-up per workload and provider")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="write the tables as a markdown section (bench/RESULTS.md)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False); use --device cpu")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    for path in (args.json, args.plot, args.markdown):
        if path is not None and not path.resolve().parent.is_dir():
            parser.error(f"cannot write {path}: directory {path.resolve().parent} does not exist")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print('mmot-bench --plot needs matplotlib: pip install "mmot[bench]"', file=sys.stderr)
        sys.exit(2)
    args.size = "tiny" if args.tiny else "quick" if args.quick else "full"
    args.repeats = args.repeats or {"tiny": 1, "quick": 5, "full": 7}[args.size]
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


def _commit() -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(mmot.__file__).parent, capture_output=True, text=True, timeout=10
        )
        return result.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _machine(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mmot_num_threads": os.environ.get("MMOT_NUM_THREADS", "unset"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mmot": mmot.__version__,
        "commit": _commit(),
        "device": device.type,
        "load_before": _load(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _calls(workload: workloads.Workload, mode: str) -> dict:
    wrap = forward if mode == "forward" else (lambda fn: backward_of(fn, workload.grad_inputs))
    return {
        name: wrap(p.run) for name, p in workload.providers.items() if isinstance(p, Provider) and (mode == "forward" or p.differentiable)
    }


def _time_workload(workload, device, args, on_round: Callable[[], None]) -> tuple[list[dict], list[dict]]:
    records, skipped = [], []
    modes = MODES if args.backward else MODES[:1]
    inputs = workload.make_inputs(device, False)
    for mode in modes:
        calls = _calls(workload, mode)
        bound: dict[str, Callable[[], object]] = {name: functools.partial(fn, inputs) for name, fn in calls.items()}
        results = timing.interleaved(bound, device, args.repeats, on_round)
        for name, provider in workload.providers.items():
            if mode != "forward" and not (isinstance(provider, Provider) and provider.differentiable):
                continue  # unavailable and forward-only providers are listed once, under the forward pass
            result = results.get(name, provider)
            where = {"op": workload.op, "shape": workload.shape, "label": workload.label, "mode": mode, "provider": name}
            if isinstance(result, timing.Timing):
                records.append({**where, **asdict(result)})
            else:
                reason = f"{type(result).__name__}: {result}"[:200] if isinstance(result, Exception) else str(result)
                skipped.append({**where, "reason": reason})
    del inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records, skipped


def _add_floors(result: dict, selected: list, rates: floors.Rates) -> None:
    """Floors at the best rates of the run, each row's fraction of its floor, and mmot's speed-ups."""
    by_label = {w.label: w for w in selected}
    result["floors"] = []
    for label, mode in dict.fromkeys((r["label"], r["mode"]) for r in result["records"]):
        workload = by_label[label]
        work = workload.work if mode == "forward" else workload.work + workload.backward_work
        bound = floors.floor(work, rates)
        result["floors"].append({"label": label, "mode": mode, "kind": bound.kind, "ms": bound.ms, "parts_ms": bound.parts_ms})
        rows = [r for r in result["records"] if (r["label"], r["mode"]) == (label, mode)]
        mine = next((r for r in rows if r["provider"].startswith("mmot-")), None)
        for r in rows:
            fraction = bound.ms / r["min_ms"]
            r.update(
                floor_kind=bound.kind,
                floor_ms=bound.ms,
                # Above 1 the model is wrong, not the machine fast: reported as broken, never as a fraction.
                floor_fraction=fraction if fraction <= 1 else None,
                gbps=work.traffic / (r["min_ms"] * 1e-3) / 1e9,
                speedup_min=r["min_ms"] / mine["min_ms"] if mine else None,
                speedup_median=r["median_ms"] / mine["median_ms"] if mine else None,
            )


def _targets(result: dict, selected: list, rates: floors.Rates) -> list[dict]:
    out = []
    for workload in (w for w in selected if w.target):
        target = workload.target
        rows = {r["provider"]: r for r in result["records"] if r["label"] == workload.label and r["mode"] == "forward"}
        mine = next((r for name, r in rows.items() if name.startswith("mmot-")), None)
        if mine is None or target.against not in rows:
            continue
        floor_ms = workload.work.traffic / (rates.dram_gbps * 1e9) * 1e3
        speedups = [rows[target.against][key] / mine[key] for key in ("min_ms", "median_ms")]
        to_floor = [mine[key] / floor_ms for key in ("min_ms", "median_ms")]
        met = [s >= target.speedup and f <= target.floor_factor for s, f in zip(speedups, to_floor)]
        verdict = "met" if all(met) else "met by min, not by median" if met[0] else "missed"
        text = (
            f"Target: {mine['provider']} at least {target.speedup}× {target.against} and within {target.floor_factor}× the "
            f"{target.floor_text} memory floor ({floor_ms:.3g} ms at {rates.dram_gbps:.1f} GB/s): {speedups[0]:.1f}× / "
            f"{speedups[1]:.1f}× (min / median), {to_floor[0]:.2f}× / {to_floor[1]:.2f}× the floor: **{verdict}**."
        )
        out.append({"label": workload.label, "speedup": speedups, "times_floor": to_floor, "met": met, "text": text})
    return out


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    device = torch.device(args.device)
    compile_ = False if args.no_compile else None
    selected = workloads.select(device, args.size, args.ops, args.only, compile_)
    machine = _machine(device)
    result: dict = {"command": shlex.join(["mmot-bench", *argv]), "machine": machine, "records": [], "skipped": [], "checks": []}
    rounds = len(selected) * args.repeats * (2 if args.backward else 1)
    rates = floors.measure(device)
    with tqdm(total=rounds, desc="mmot-bench", unit="round", file=sys.stderr) as progress:

        def after_round() -> None:
            # The machine's rates drift (a shared VM's bandwidth and clock change by 1.5-2x within
            # minutes): a one-try probe in every round meets the same moments as the providers.
            nonlocal rates
            rates = rates.best(floors.measure(device, tries=1))
            progress.update()

        for workload in selected:
            progress.set_postfix_str(workload.label)
            if args.check:
                inputs = workload.make_inputs(device, False)
                result["checks"] += check.check(workload, inputs, args.backward)
                del inputs
            records, skipped = _time_workload(workload, device, args, after_round)
            result["records"] += records
            result["skipped"] += skipped
    rates = floors.measure(device).best(rates)
    machine.update(load_after=_load(), rates=asdict(rates), rates_text=rates.describe())
    _add_floors(result, selected, rates)
    result["targets"] = _targets(result, selected, rates)
    if args.memory:
        by_label = {w.label: w for w in selected}
        for r in tqdm(result["records"], desc="peak memory", file=sys.stderr):
            if device.type == "cuda":
                r["peak_mib"] = memory.peak_mib_cuda(by_label[r["label"]], r["provider"], r["mode"], device)
            else:
                r["peak_mib"] = memory.peak_mib_cpu(
                    r["label"], r["provider"], r["mode"], args.size, compile_ is not False and args.size == "full"
                )
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    result = run(args, argv)
    print(report.format_table(result))
    if args.markdown:
        args.markdown.write_text(report.markdown_report(result))
        print(f"\nwrote {args.markdown}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        report.plot(result, args.plot)
        print(f"wrote {args.plot}")
    if any(not c["ok"] for c in result["checks"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
