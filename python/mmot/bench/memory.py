"""``mmot-bench --memory``: the peak memory one call of a provider adds over its inputs.

On CUDA this is torch's own count, ``max_memory_allocated`` over the call. On a CPU, where torch
allocates through malloc and no Python tracer sees it, every figure comes from a fresh process
(``python -m mmot.bench.memory``): it warms the provider up on a few rows (code loaded, thread
pools started, no large allocation), builds the inputs, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``) and reads the peak resident set (``VmHWM``) after one call. Where the
mark cannot be reset, the rise of ``ru_maxrss`` over the call is used instead.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys

import torch

from mmot.bench.workload import Provider, Workload, backward_of, forward
from mmot.bench.workloads import select


def _call(workload: Workload, provider: str, mode: str):
    fn = workload.providers[provider]
    assert isinstance(fn, Provider)
    return forward(fn.run) if mode == "forward" else backward_of(fn.run, workload.grad_inputs)


def peak_mib_cuda(workload: Workload, provider: str, mode: str, device: torch.device) -> float:
    call = _call(workload, provider, mode)
    inputs = workload.make_inputs(device, False)
    call(inputs)  # warm-up outside the measurement
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    call(inputs)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def peak_mib_cpu(label: str, provider: str, mode: str, size: str, compile_: bool) -> float | str:
    """Runs the measurement in a fresh process; a string says why there is no figure."""
    command = [sys.executable, "-m", "mmot.bench.memory", label, provider, mode, size, "1" if compile_ else "0"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return "timed out"
    if result.returncode != 0:
        return f"failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}"
    return float(result.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def _measure_here(label: str, provider: str, mode: str, size: str, compile_: bool) -> float:
    cpu = torch.device("cpu")
    (workload,) = [w for w in select(cpu, size, compile_=compile_) if w.label == label]
    call = _call(workload, provider, mode)
    call(workload.make_inputs(cpu, True))
    inputs = workload.make_inputs(cpu, False)
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM (the peak RSS) to the current RSS
        base = _status_kib("VmRSS:")
        call(inputs)
        return (_status_kib("VmHWM:") - base) / 1024
    except OSError:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        call(inputs)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m mmot.bench.memory", description="peak memory of one provider call (CPU)")
    parser.add_argument("label")
    parser.add_argument("provider")
    parser.add_argument("mode", choices=("forward", "forward+backward"))
    parser.add_argument("size")
    parser.add_argument("compile", choices=("0", "1"))
    args = parser.parse_args()
    print(f"{_measure_here(args.label, args.provider, args.mode, args.size, args.compile == '1'):.2f}")


if __name__ == "__main__":
    main()
