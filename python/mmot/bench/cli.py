"""``mmot-bench``: every op against the alternatives users would pick instead, with physical floors.

The providers of each workload run in interleaved rounds; the table gives every provider's min
and median time, mmot's speed-up by each, and the fraction of the workload's physical floor (the
binding one of DRAM, cache and compute, measured on this machine in the same run). Optional:
forward + backward timings, peak memory per provider, a check of every provider against
``mmot.reference``, and the validation cases of every op and dtype (``--validate``,
bench/validate.py). On a CPU only the ratios are meaningful: absolute times move with the load.

``--gpu-validate`` is the one command for a lent GPU (docs/gpu.md): validation, the check, forward
+ backward, peak memory, within a time budget. A failure anywhere is recorded and the run goes
on; the JSON is rewritten after every workload, so a run cut short still leaves its data.

``mmot-bench distributed`` times the ``process_group=`` paths over gloo processes on this machine
(bench/distributed.py; ``mmot-bench distributed --help``). ``mmot-bench backward-ratio`` times the
unrolled Sinkhorn backward against its forward (bench/backward_ratio.py); ``mmot-bench
sinkhorn-options`` what ragged batches, ε-scaling, warm starts and implicit gradients save
(bench/sinkhorn_options.py).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

import mmot
from mmot.bench import check, floors, memory, report, timing, validate, workloads
from mmot.bench.workload import Provider, backward_of, forward

MODES = ("forward", "forward+backward")
# --gpu-validate: seconds after which no further workload starts (the command must end within
# about 8 minutes on one H100; the last workload and the report take the rest).
GPU_BUDGET_S = 400
GPU_REPEATS = 5
# --gpu-validate compiles only these references (each torch.compile takes tens of seconds): the
# SSPC-size Multi-SK, the SwAV-size Sinkhorn and the similarity.
GPU_COMPILED = ("multi_sinkhorn · N=7660 K=64 ", "sinkhorn · B=4096", "similarity · ")
# --gpu-validate's order, the targets first, so that the budget cuts what matters least.
GPU_ORDER = (
    "sinkhorn",
    "info_nce",
    "multi_sinkhorn",
    "similarity",
    "anchor_consistency",
    "batched",
    "brownian_bridge",
    "geometric_consistency",
    "feature_separation",
    "multi_info_nce",
    "nt_xent",
    "pairwise_similarity_regression",
    "comm_loss",
)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmot-bench", description=__doc__.splitlines()[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument(
        "--quick", action="store_true", help="the SSPC and SwAV sizes, smaller batches (about 4 minutes on an idle 2-core CPU)"
    )
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
    parser.add_argument("--validate", action="store_true", help="run every op's validation cases (bench/validate.py); exit 1 on a failure")
    parser.add_argument(
        "--budget", type=float, metavar="SECONDS", help="start no workload after this many seconds; the rest are listed as skipped"
    )
    parser.add_argument(
        "--gpu-validate",
        action="store_true",
        help=f"the lent-GPU command: --device cuda --validate --check --backward --memory --budget {GPU_BUDGET_S}, "
        f"{GPU_REPEATS} rounds, three compiled references (docs/gpu.md)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the records as JSON")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG of mmot's speed-up per workload and provider")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="write the tables as a markdown section (bench/RESULTS.md)")
    args = parser.parse_args(argv)
    if args.gpu_validate:
        if args.quick or args.tiny:
            parser.error("--gpu-validate runs the full sizes; drop --quick/--tiny")
        args.device = "cuda"
        args.validate = args.check = args.backward = args.memory = True
        args.budget = GPU_BUDGET_S if args.budget is None else args.budget
        args.repeats = args.repeats or GPU_REPEATS
        if args.ops == sorted(workloads.OPS):
            args.ops = list(GPU_ORDER)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False); use --device cpu")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    if args.budget is not None and args.budget <= 0:
        parser.error(f"--budget must be > 0 seconds; got {args.budget}")
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
    """The checkout's commit; MMOT_COMMIT names it where the tree is a copy without .git (a lent GPU machine)."""
    if os.environ.get("MMOT_COMMIT"):
        return os.environ["MMOT_COMMIT"]
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
    info: dict = {
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
    if importlib.util.find_spec("triton") is not None:
        info["triton"] = importlib.metadata.version("triton")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=torch.cuda.get_device_name(device),
            capability=f"sm_{props.major}{props.minor}",
            sm_count=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            l2_mib=round(props.L2_cache_size / 2**20, 1),
            cuda=torch.version.cuda,
            nvidia_smi_before=_nvidia_smi(),
        )
    return info


def _nvidia_smi() -> dict | str:
    """Driver, clocks, temperature, power and utilisation as nvidia-smi reports them (low clocks or busy: contention)."""
    fields = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu,memory.used"
    try:
        result = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError) as error:
        return f"nvidia-smi failed: {error}"
    values = result.stdout.strip().splitlines()[0].split(", ") if result.stdout.strip() else []
    return dict(zip(fields.split(","), values)) if len(values) == len(fields.split(",")) else f"nvidia-smi: {result.stderr.strip()[:200]}"


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
                # The share of the DRAM (HBM) bandwidth the row's traffic would take if every pass
                # streamed from memory; above 1 the data stayed in cache.
                dram_fraction=work.traffic / (r["min_ms"] * 1e-3) / 1e9 / rates.dram_gbps,
                speedup_min=r["min_ms"] / mine["min_ms"] if mine else None,
                speedup_median=r["median_ms"] / mine["median_ms"] if mine else None,
            )


def _targets(result: dict, selected: list, rates: floors.Rates) -> list[dict]:
    out = []
    for workload in (w for w in selected if w.target):
        target = workload.target
        rows = {r["provider"]: r for r in result["records"] if r["label"] == workload.label and r["mode"] == target.mode}
        mine = next((r for name, r in rows.items() if name.startswith("mmot-")), None)
        if mine is None or target.against not in rows:
            continue
        work = workload.work if target.mode == "forward" else workload.work + workload.backward_work
        floor_ms = work.traffic / (rates.dram_gbps * 1e9) * 1e3
        speedups = [rows[target.against][key] / mine[key] for key in ("min_ms", "median_ms")]
        to_floor = [mine[key] / floor_ms for key in ("min_ms", "median_ms")]
        factor = math.inf if target.floor_factor is None else target.floor_factor
        met = [s >= target.speedup and f <= factor for s, f in zip(speedups, to_floor)]
        verdict = "met" if all(met) else "met by min, not by median" if met[0] else "missed"
        mode = "" if target.mode == "forward" else f" ({target.mode})"
        if target.floor_factor is None:
            text = (
                f"Target{mode}: {mine['provider']} at least {target.speedup:.3g}× {target.against} (no slower than "
                f"{1 / target.speedup:.3g}×): {speedups[0]:.2f}× / {speedups[1]:.2f}× (min / median): **{verdict}**."
            )
        else:
            text = (
                f"Target: {mine['provider']} at least {target.speedup}× {target.against} and within {target.floor_factor}× the "
                f"{target.floor_text} memory floor ({floor_ms:.3g} ms at {rates.dram_gbps:.1f} GB/s): {speedups[0]:.1f}× / "
                f"{speedups[1]:.1f}× (min / median), {to_floor[0]:.2f}× / {to_floor[1]:.2f}× the floor: **{verdict}**."
            )
        out.append({"label": workload.label, "speedup": speedups, "times_floor": to_floor, "met": met, "text": text})
    return out


class Run:
    """One run's records, written out after every step so that a run cut short leaves its data."""

    def __init__(self, args: argparse.Namespace, argv: list[str]):
        self.args = args
        self.device = torch.device(args.device)
        self.start = time.monotonic()
        self.result: dict = {
            "command": shlex.join(["mmot-bench", *argv]),
            "machine": _machine(self.device),
            "records": [],
            "skipped": [],
            "checks": [],
            "errors": [],
            "floors": [],
            "targets": [],
            "elapsed_s": {},
            "complete": False,
        }
        self.selected: list[workloads.Workload] = []
        self.rates: floors.Rates | None = None

    def log(self, text: str) -> None:
        print(f"[mmot-bench {time.monotonic() - self.start:6.1f} s] {text}", file=sys.stderr, flush=True)

    def over_budget(self) -> bool:
        return self.args.budget is not None and time.monotonic() - self.start > self.args.budget

    def error(self, where: str, error: BaseException) -> None:
        self.result["errors"].append({"where": where, "error": f"{type(error).__name__}: {error}"[:500]})
        self.log(f"{where}: {type(error).__name__}: {error}"[:300])
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def finish(self) -> dict:
        """Floors and targets at the best rates seen so far (also for a partial run)."""
        result = self.result
        result["elapsed_s"]["total"] = round(time.monotonic() - self.start, 1)
        if self.rates is None:
            return result
        result["machine"].update(load_after=_load(), rates=asdict(self.rates), rates_text=self.rates.describe())
        measured = {r["label"] for r in result["records"]}
        done = [w for w in self.selected if w.label in measured]
        _add_floors(result, done, self.rates)
        result["targets"] = _targets(result, done, self.rates)
        return result

    def save(self) -> None:
        """The JSON so far, replaced atomically (a run killed while writing keeps the previous one)."""
        if self.args.json is None:
            return
        self.finish()
        partial = self.args.json.with_name(self.args.json.name + ".partial")
        partial.write_text(json.dumps(self.result, indent=2))
        os.replace(partial, self.args.json)

    def validate(self) -> None:
        self.log(f"validation cases on {self.device.type}")

        def on_case(case: validate.Case, records: list[dict]) -> None:
            failed = [r for r in records if not r["ok"]]
            self.log(f"validate {case.label}: {'FAILED ' + str(len(failed)) if failed else 'ok'}")
            self.result["checks"] += records  # kept as they come: an interrupted run keeps them
            self.save()

        started = time.monotonic()
        _, skipped = validate.run(self.device, on_case)
        self.result["skipped"] += skipped
        self.result["elapsed_s"]["validate"] = round(time.monotonic() - started, 1)
        self.save()

    def workload(self, workload: workloads.Workload, after_round: Callable[[], None]) -> None:
        args, device, started = self.args, self.device, time.monotonic()
        if args.check:
            self._check(workload)
        records, skipped = _time_workload(workload, device, args, after_round)
        self.result["records"] += records
        self.result["skipped"] += skipped
        if args.memory:
            for r in records:
                try:
                    if device.type == "cuda":
                        r["peak_mib"] = memory.peak_mib_cuda(workload, r["provider"], r["mode"], device)
                    else:
                        compiled = args.no_compile is False and args.size == "full"
                        r["peak_mib"] = memory.peak_mib_cpu(r["label"], r["provider"], r["mode"], args.size, compiled)
                except Exception as error:  # an OOM in one provider's measurement leaves the others'
                    r["peak_mib"] = f"failed: {type(error).__name__}"
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        self.result["elapsed_s"][workload.label] = round(time.monotonic() - started, 1)
        self.log(f"{workload.label}: {time.monotonic() - started:.1f} s")

    def _check(self, workload: workloads.Workload) -> None:
        if self.device.type == "cuda" and workload.reference_bytes:
            free, _ = torch.cuda.mem_get_info(self.device)
            if workload.reference_bytes > 0.9 * free:
                need = workload.reference_bytes / 2**30
                reason = f"not checked: the float64 reference needs about {need:.0f} GiB, {free / 2**30:.0f} GiB free"
                self.result["skipped"].append({"label": workload.label, "mode": "check", "provider": "mmot.reference", "reason": reason})
                return
        inputs = workload.make_inputs(self.device, False)
        self.result["checks"] += check.check(workload, inputs, self.args.backward)
        del inputs
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _limit_compiled(selected: list[workloads.Workload]) -> None:
    """--gpu-validate: compiled references only where GPU_COMPILED names the workload."""
    for workload in selected:
        if "reference-compiled" in workload.providers and not any(workload.label.startswith(keep) for keep in GPU_COMPILED):
            workload.providers["reference-compiled"] = (
                "not compiled under --gpu-validate (time budget); run mmot-bench --device cuda --only ..."
            )


def run(args: argparse.Namespace, argv: list[str], state: Run | None = None) -> dict:
    state = state or Run(args, argv)
    device = state.device
    compile_ = False if args.no_compile else None
    if args.validate:
        state.validate()
    selected = workloads.select(device, args.size, args.ops, args.only, compile_)
    if args.gpu_validate:
        _limit_compiled(selected)
    state.selected = selected
    state.rates = floors.measure(device)
    rounds = len(selected) * args.repeats * (2 if args.backward else 1)
    # No progress bar where stderr is no terminal (a log): the per-workload lines say as much.
    with tqdm(total=rounds, desc="mmot-bench", unit="round", file=sys.stderr, disable=None) as progress:

        def after_round() -> None:
            # The machine's rates drift (a shared VM's bandwidth and clock change by 1.5-2x within
            # minutes): a one-try probe in every round meets the same moments as the providers.
            state.rates = floors.measure(device, tries=1).best(state.rates)
            progress.update()

        for workload in selected:
            if state.over_budget():
                reason = f"time budget: {args.budget:.0f} s spent before it started"
                state.result["skipped"].append({"label": workload.label, "mode": "all", "provider": "all", "reason": reason})
                continue
            progress.set_postfix_str(workload.label)
            try:
                state.workload(workload, after_round)
            except Exception as error:  # one workload's failure (an OOM, a missing package) leaves the rest
                state.error(workload.label, error)
            state.save()
    state.rates = floors.measure(device).best(state.rates)
    if device.type == "cuda":
        state.result["machine"]["nvidia_smi_after"] = _nvidia_smi()
    state.result["complete"] = True
    return state.finish()


def _raise_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def failed(result: dict) -> bool:
    """Any check or validation case failed, or a workload raised outside its providers."""
    return any(not c["ok"] for c in result["checks"]) or bool(result["errors"])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["distributed"]:
        # `mmot-bench distributed`: the sharded ops over gloo processes (bench/distributed.py).
        from mmot.bench import distributed

        distributed.main(argv[1:])
        return
    if argv[:1] == ["sinkhorn-options"]:
        # `mmot-bench sinkhorn-options`: what the Sinkhorn options save (bench/sinkhorn_options.py).
        from mmot.bench import sinkhorn_options

        sinkhorn_options.main(argv[1:])
        return
    if argv[:1] == ["backward-ratio"]:
        from mmot.bench import backward_ratio

        backward_ratio.main(argv[1:])
        return
    args = _parse(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # `timeout` sends SIGTERM: write what there is
    state = Run(args, argv)
    try:
        result = run(args, argv, state)
    except KeyboardInterrupt as interrupt:
        state.error("interrupted", interrupt)
        result = state.finish()
    finally:
        state.save()
    print(report.format_table(result))
    if args.markdown:
        args.markdown.write_text(report.markdown_report(result))
        print(f"\nwrote {args.markdown}")
    if args.json:
        print(f"wrote {args.json}")
    if args.plot:
        report.plot(result, args.plot)
        print(f"wrote {args.plot}")
    print("\n" + report.summary(result))
    if failed(result) or not result["complete"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
