"""The builds as text: a per-kernel summary for the terminal, and a markdown section for bench/RESULTS.md."""

from __future__ import annotations

import datetime
import platform
import shlex
from collections import defaultdict

import triton

from mmot.aot.build import SHARED_LIMIT, Build


def _by_kernel(builds: list[Build]) -> dict[tuple[str, int], list[Build]]:
    groups: dict[tuple[str, int], list[Build]] = defaultdict(list)
    for b in builds:
        groups[(b.kernel, b.arch)].append(b)
    return dict(sorted(groups.items()))


def _worst(builds: list[Build]) -> tuple[int, int, int, int]:
    """(configurations, most registers, most shared bytes, configurations that spill)."""
    built = [b for b in builds if b.registers is not None]
    registers = max((b.registers or 0 for b in built), default=0)
    shared = max((b.shared_bytes or 0 for b in built), default=0)
    return len(builds), registers, shared, sum(1 for b in built if b.spill_bytes)


def summary(builds: list[Build]) -> str:
    lines = [f"{'kernel':44s} {'arch':6s} {'configs':>7s} {'max regs':>8s} {'max smem':>9s} {'spilling':>8s} {'failed':>6s}"]
    for (kernel, arch), group in _by_kernel(builds).items():
        count, registers, shared, spilling = _worst(group)
        failed = sum(1 for b in group if not b.ok)
        lines.append(f"{kernel:44s} sm_{arch:<3d} {count:7d} {registers:8d} {shared / 1024:8.1f}K {spilling:8d} {failed:6d}")
    return "\n".join(lines)


def markdown(builds: list[Build], seconds: float, args: list[str]) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    command = shlex.join(["python", "-m", "mmot.aot", *args])
    failed = [b for b in builds if not b.ok]
    out = [
        f"## Ahead-of-time builds for sm_80 and sm_90 ({date})",
        "",
        f"`{command}` on {platform.node() or 'this machine'} (no GPU; triton {triton.__version__}, its own ptxas),"
        f" {len(builds)} distinct builds in {seconds:.0f} s (those in Triton's cache cost nothing), **{len(failed)} failed**."
        f" Limits: shared memory per block {SHARED_LIMIT[80] // 1024} KiB (sm_80) and {SHARED_LIMIT[90] // 1024} KiB (sm_90),"
        " no register spill, every float scalar fp64.",
        "",
        "| kernel | arch | configurations | most registers | most shared memory | spilling | failed |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (kernel, arch), group in _by_kernel(builds).items():
        count, registers, shared, spilling = _worst(group)
        failed = sum(not b.ok for b in group)
        out.append(f"| `{kernel}` | sm_{arch} | {count} | {registers} | {shared / 1024:.1f} KiB | {spilling} | {failed} |")
    out += ["", "<details><summary>Every build: kernel, configuration, arch, registers, spills, shared memory</summary>", ""]
    out += ["| kernel | configuration | arch | registers | spill bytes | shared memory | problems |", "|---|---|---|---:|---:|---:|---|"]
    for b in sorted(builds, key=lambda b: (b.kernel, b.arch, b.config)):
        shared = f"{b.shared_bytes / 1024:.1f} KiB" if b.shared_bytes is not None else "-"
        registers, spills = ("-" if v is None else v for v in (b.registers, b.spill_bytes))
        out.append(f"| `{b.kernel}` | {b.config} | sm_{b.arch} | {registers} | {spills} | {shared} | {'; '.join(b.problems)} |")
    out += ["", "</details>", ""]
    return "\n".join(out)
