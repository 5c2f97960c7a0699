"""The runner's output: a markdown table per workload and pass, the markdown report, the speed-up plot."""

from __future__ import annotations

from pathlib import Path

from mmot._extras import require

PASSES = ("forward", "forward+backward")

FLOOR_NOTE = (
    "Floor: the least time any implementation needs here, the largest of the DRAM floor (bytes that must come from memory "
    "over the measured DRAM bandwidth), the cache floor (bytes that must move between cache and core over the measured "
    "in-cache bandwidth) and the compute floor (multiply-add flops over the measured GEMM rate, or exps over the measured "
    "exp rate); the fraction is floor / min time (docs/benchmarks.md)."
)


def _groups(report: dict) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in report["records"]:
        groups.setdefault((record["label"], record["mode"]), []).append(record)
    for skip in report["skipped"]:
        if skip["mode"] in PASSES:
            groups.setdefault((skip["label"], skip["mode"]), [])
    return groups


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _speedup(value: float | None) -> str:
    return "–" if value is None else (f"{value:.1f}×" if value < 100 else f"{value:.0f}×")


def header(report: dict) -> str:
    machine = report["machine"]
    where = machine.get("gpu", machine["processor"])
    if "gpu" in machine:
        smi = machine.get("nvidia_smi_before")
        driver = smi.get("driver_version", "?") if isinstance(smi, dict) else "?"
        where += f" ({machine['capability']}, CUDA {machine['cuda']}, driver {driver}, triton {machine.get('triton', '–')})"
    return (
        f"mmot {machine['mmot']} (commit {machine['commit']}) · torch {machine['torch']} · {where} · {machine['cpu_count']} CPUs · "
        f"torch threads {machine['torch_threads']}, MMOT_NUM_THREADS={machine['mmot_num_threads']} · "
        f"load average {machine['load_before']} before, {machine.get('load_after', '–')} after · {machine['date']}\n\n"
        f"Rates (best seen in the run): {machine.get('rates_text', 'not measured')}"
    )


def format_table(report: dict) -> str:
    """A markdown table per workload and pass: min and median time, mmot's speed-up by each, the floor and its fraction."""
    memory = any("peak_mib" in r for r in report["records"])
    floors = {(f["label"], f["mode"]): f for f in report["floors"]}
    workload_checks = [c for c in report.get("checks", []) if c.get("kind") != "validate"]
    checks: dict[tuple[str, str, str], dict] = {(c["label"], c["provider"], c["mode"]): c for c in workload_checks}
    lines = [header(report)]
    lines += validation_table(report)
    for (label, mode), rows in _groups(report).items():
        floor = floors.get((label, mode))
        lines += ["", f"### {label} · {mode}", ""]
        if floor:
            parts = ", ".join(f"{kind} {ms:.3g}" for kind, ms in floor["parts_ms"].items())
            lines += [f"Floor: {floor['kind']}, {floor['ms']:.3g} ms ({parts} ms).", ""]
        columns = ["provider", "min ms", "median ms", "mmot speed-up (min)", "(median)", "floor", "fraction of floor", "of DRAM BW"]
        columns += ["peak MiB"] if memory else []
        columns += ["max error"] if checks else []
        lines += ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
        for r in sorted(rows, key=lambda r: r["min_ms"]):
            fraction = "model broken" if r["floor_fraction"] is None else f"{r['floor_fraction']:.0%}"
            cells = [r["provider"], _ms(r["min_ms"]), _ms(r["median_ms"]), _speedup(r["speedup_min"]), _speedup(r["speedup_median"])]
            cells += [r["floor_kind"], fraction, f"{r['dram_fraction']:.0%}"]
            cells += [_peak(r.get("peak_mib"))] if memory else []
            if checks:
                check = checks.get((label, r["provider"], mode))
                cells.append(_error(check))
            lines.append("| " + " | ".join(cells) + " |")
        for skip in (s for s in report["skipped"] if (s["label"], s["mode"]) == (label, mode)):
            lines.append("| " + " | ".join([skip["provider"]] + ["–"] * (len(columns) - 2) + [skip["reason"]]) + " |")
        for target in (t for t in report["targets"] if (t["label"], "forward") == (label, mode)):
            lines += ["", target["text"]]
        if floor:
            for r in (r for r in rows if r["floor_fraction"] is None):
                why = (
                    " (on CUDA: faster than float32 GEMMs at IEEE precision, so it multiplies in TF32 or lower)"
                    if floor["kind"] == "compute" and report["machine"]["device"] == "cuda"
                    else ""
                )
                lines += [
                    "",
                    f"Warning: {r['provider']} took {r['min_ms']:.3g} ms, under the {floor['ms']:.3g} ms floor: the floor model "
                    f"is wrong for this workload{why} (docs/benchmarks.md).",
                ]
    failed = [c for c in workload_checks if not c["ok"]]
    if workload_checks:
        lines += ["", f"Check against mmot.reference: {len(workload_checks) - len(failed)} of {len(workload_checks)} passed."]
        for c in failed:
            detail = c.get("note") or f"error {c['error']:.2e} > tolerance {c['tolerance']:.0e}"
            lines.append(f"- MISMATCH {c['label']} · {c['mode']} · {c['provider']}: {detail}")
    for skip in report["skipped"]:
        if skip["mode"] not in PASSES and skip.get("kind") != "validate":
            lines.append(f"- skipped {skip['label']} ({skip['mode']}): {skip['reason']}")
    for error in report.get("errors", []):
        lines.append(f"- ERROR {error['where']}: {error['error']}")
    if not report.get("complete", True):
        lines += ["", f"INCOMPLETE: the run stopped after {report['elapsed_s'].get('total', '?')} s."]
    return "\n".join(lines)


def summary(report: dict) -> str:
    """The last lines a run prints: what failed, the targets, mmot's floor fractions and time, for a log's tail."""
    cases = [c for c in report["checks"] if c.get("kind") == "validate"]
    checks = [c for c in report["checks"] if c.get("kind") != "validate"]
    lines = [
        f"SUMMARY {report['machine'].get('gpu', report['machine']['processor'])} · {report['elapsed_s'].get('total', '?')} s · "
        f"{'complete' if report.get('complete') else 'INCOMPLETE'}",
        f"validation {sum(c['ok'] for c in cases)}/{len(cases)} passed · check {sum(c['ok'] for c in checks)}/{len(checks)} passed · "
        f"{len(report['errors'])} errors · {len(report['skipped'])} skipped",
    ]
    for c in (c for c in report["checks"] if not c["ok"]):
        detail = c.get("note") or f"error {c['error']:.3g} > {c['tolerance']:.0e}"
        lines.append(f"FAILED {c['label']} · {c['mode']}{' ∂' + c['input'] if c.get('input') else ''} · {c['provider']}: {detail}")
    for error in report["errors"]:
        lines.append(f"ERROR {error['where']}: {error['error'][:200]}")
    lines += [t["text"] for t in report["targets"]]
    for r in (r for r in report["records"] if r["provider"].startswith("mmot-") and "floor_fraction" in r):
        fraction = "model broken" if r["floor_fraction"] is None else f"{r['floor_fraction']:.0%}"
        lines.append(
            f"{r['label']} · {r['mode']}: {r['min_ms']:.3g} ms, {fraction} of the {r['floor_kind']} floor, "
            f"{r['dram_fraction']:.0%} of DRAM BW; fastest alternative {_next_best(report, r)}"
        )
    return "\n".join(lines)


def _next_best(report: dict, mine: dict) -> str:
    others = [r for r in report["records"] if (r["label"], r["mode"]) == (mine["label"], mine["mode"]) and r is not mine]
    if not others:
        return "–"
    best = min(others, key=lambda r: r["min_ms"])
    return f"{best['provider']} at {best['min_ms'] / mine['min_ms']:.2f}× mmot's time"


def validation_table(report: dict) -> list[str]:
    """The --validate cases: one row per case and pass, its error in units of its tolerance (1 is the limit)."""
    cases = [c for c in report.get("checks", []) if c.get("kind") == "validate"]
    skipped = [s for s in report.get("skipped", []) if s.get("kind") == "validate"]
    if not cases and not skipped:
        return []
    lines = ["", f"### Validation against mmot.reference on {report['machine']['device']}", ""]
    lines += [
        "error: max |got − want| / (atol + rtol·|want|), want from autograd through mmot.reference in float64; "
        "gradients relative to their largest entry; 1 is the limit.",
        "",
        "| op | shape | dtype | backend | launch | pass | error | rtol | atol | |",
        "|---|---|---|---|---|---|---:|---:|---:|---|",
    ]
    for c in cases:
        what = c["mode"] + (f" ∂{c['input']}" if c.get("input") else "")
        error = "raised" if c["error"] is None else f"{c['error']:.2g}"
        verdict = "ok" if c["ok"] else "**FAILED** " + c.get("note", "")
        cells = [c["op"], c["shape"], c["dtype"], c["backend"], c.get("launch") or "–", what, error, f"{c['rtol']:.0e}", f"{c['atol']:.0e}"]
        lines.append("| " + " | ".join(cells + [verdict]) + " |")
    failed = [c for c in cases if not c["ok"]]
    lines += ["", f"Validation: {len(cases) - len(failed)} of {len(cases)} passed" + (f", {len(skipped)} skipped." if skipped else ".")]
    for s in skipped:
        lines.append(f"- skipped {s['label']}: {s['reason']}")
    return lines


def _peak(value) -> str:
    if value is None:
        return "–"
    return value if isinstance(value, str) else f"{value:.1f}"


def _error(check: dict | None) -> str:
    if check is None:
        return "–"
    if check["error"] is None:
        return "failed"
    return f"{check['error']:.1e}" + ("" if check["ok"] else " MISMATCH")


def markdown_report(report: dict) -> str:
    machine = report["machine"]
    where = machine.get("gpu", f"{machine['processor']}, {machine['cpu_count']} CPUs")
    intro = [
        f"## mmot-bench on {machine['device']} ({where})",
        "",
        f"Command: `{report['command']}`. Each provider's calls run interleaved with the others', round after round, each "
        "timed call after an untimed one of its own; min and median over the rounds. " + FLOOR_NOTE,
        "",
        "",
    ]
    return "\n".join(intro) + format_table(report) + "\n"


def plot(report: dict, path: Path) -> None:
    """A bar per workload and provider: mmot's speed-up by median (log scale), forward rows."""
    require("matplotlib", "bench", "mmot-bench --plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["records"] if r["mode"] == "forward" and not r["provider"].startswith("mmot-")]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    figure, axis = plt.subplots(figsize=(max(6, 1.8 * len(labels)), 4.5))
    width = 0.8 / max(1, len(providers))
    for index, provider in enumerate(providers):
        points = [(labels.index(r["label"]) + index * width, r["speedup_median"]) for r in rows if r["provider"] == provider]
        axis.bar([x for x, _ in points], [y for _, y in points], width, label=provider)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_yscale("log")
    axis.set_ylabel("mmot speed-up (provider time / mmot time, median)")
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], [label.replace(" · ", "\n") for label in labels], fontsize=7)
    axis.legend(fontsize=7)
    axis.set_title(f"mmot-bench · {report['machine'].get('gpu', report['machine']['processor'])}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
