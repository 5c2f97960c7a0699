"""Compile a captured specialisation to a cubin with the real compiler, and read what it costs.

Triton's own pipeline (TTIR → TTGIR → LLVM IR → PTX → cubin, with the ptxas inside the triton
wheel) builds the kernel; then ptxas reports registers, spills and stack for the PTX (its
verbose output, cached in Triton's cache next to the kernel), and the compiled metadata gives
the shared memory. A build fails on a compile error, on shared memory above the architecture's
per-block limit, on any register spill, and on a float scalar parameter that is not fp64 (the
one convention of ``mmot.kernels._common``: a plain Python float would be typed fp32).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.runtime.cache import get_cache_manager

from mmot.aot.capture import Specialization

# Largest shared memory one block may use (the opt-in maximum): A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_F64_PARAM = re.compile(r"\.param \.f64 ")


@dataclass
class Build:
    kernel: str
    config: str
    arch: int
    seconds: float = 0.0
    registers: int | None = None
    spill_bytes: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    warps: int | None = None
    float_scalars: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def describe(spec: Specialization) -> str:
    """The configuration in a table cell: constexprs (dtype names short), pointer dtypes, warps."""
    names = list(spec.signature)
    parts = []
    for path, value in sorted(spec.constexprs.items()):
        name = names[path[0]]
        text = str(value).removeprefix("triton.language.").replace("float", "fp")
        if name.startswith(("WEIGHTS", "LOG_COUNTS", "TOPS")):
            continue  # the slot-group table; NG counts its groups
        parts.append(f"{name}={text}")
    pointers = sorted({kind.lstrip("*") for kind in spec.signature.values() if kind.startswith("*") and kind != "*i32"})
    parts.append("in=" + "/".join(pointers))
    parts.append(f"warps={spec.options.get('num_warps')}")
    return " ".join(parts)


def _float_scalars(spec: Specialization) -> dict[str, str]:
    return {name: kind for name, kind in spec.signature.items() if kind in ("fp16", "bf16", "fp32", "fp64")}


def _ptxas_report(ptx: str, arch: int, fp_fusion: bool) -> str:
    """ptxas's verbose report for ``ptx`` (the options Triton compiles with), cached by content."""
    key = hashlib.sha256(f"{arch} {fp_fusion} {triton.__version__}\n{ptx}".encode()).hexdigest()
    cache = get_cache_manager(key)
    cached = cache.get_file("ptxas-v.log")
    if cached is not None:
        return Path(cached).read_text()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        command = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}"]
        command += [] if fp_fusion else ["--fmad=false"]
        result = subprocess.run([*command, str(source), "-o", str(source.with_suffix(".o"))], capture_output=True, text=True, check=True)
    report = result.stdout + result.stderr
    cache.put(report, "ptxas-v.log", binary=False)
    return report


def build(spec: Specialization) -> Build:
    result = Build(spec.name, describe(spec), spec.arch, float_scalars=_float_scalars(spec))
    start = time.perf_counter()
    try:
        source = triton.compiler.ASTSource(spec.kernel, spec.signature, spec.constexprs, spec.attrs)
        kernel = triton.compile(source, target=GPUTarget("cuda", spec.arch, 32), options=spec.options)
        report = _ptxas_report(kernel.asm["ptx"], spec.arch, spec.options.get("enable_fp_fusion", True))
    except Exception as error:  # a compile error is this build's result, not the run's end
        result.seconds = time.perf_counter() - start
        result.error = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"[:400]
        result.problems.append("compile error")
        return result
    result.seconds = time.perf_counter() - start
    result.shared_bytes = kernel.metadata.shared
    result.warps = kernel.metadata.num_warps
    registers, spills = _REGISTERS.search(report), _SPILLS.search(report)
    if registers is None or spills is None:
        result.problems.append("no ptxas report")
        return result
    result.registers = int(registers.group(1))
    result.stack_bytes = int(spills.group(1))
    result.spill_bytes = int(spills.group(2)) + int(spills.group(3))
    if result.shared_bytes > SHARED_LIMIT[spec.arch]:
        result.problems.append(f"shared memory {result.shared_bytes} B > {SHARED_LIMIT[spec.arch]} B")
    if result.spill_bytes:
        result.problems.append(f"register spills ({spills.group(2)} B stored, {spills.group(3)} B loaded)")
    narrow = {name: kind for name, kind in result.float_scalars.items() if kind != "fp64"}
    if narrow:
        result.problems.append(f"float scalars not fp64: {narrow}")
    wide, f64_params = len(result.float_scalars) - len(narrow), len(_F64_PARAM.findall(kernel.asm["ptx"]))
    if f64_params < wide:
        result.problems.append(f"{wide} fp64 scalars in the signature, {f64_params} .f64 parameters in the PTX")
    return result
