"""Capture the kernel specialisations mmot's launchers ask for on a GPU that is not here.

A stand-in Triton driver reports the target GPU, and Triton's ``jit_cache_hook`` hands over
what a launch would compile (the specialised signature, constexprs, attributes and options) and
tells Triton to skip the compile, so nothing is launched. The launchers run their own host code
on meta tensors (shapes only, no memory), with ``_common.TARGET_SM_COUNT`` set so that they plan
as they would on that GPU. Signatures and constexprs therefore come from the launcher code
itself, not from a copy of it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver

from mmot.kernels import _common

# Streaming multiprocessors of the GPUs each architecture is checked for (A100, H100 SXM).
SM_COUNTS = {80: 108, 90: 132}


@dataclass(frozen=True)
class Specialization:
    """One kernel compile as a launch would ask for it."""

    kernel: triton.runtime.jit.JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    arch: int

    @property
    def name(self) -> str:
        """The kernel with its op's module (several modules have a ``_combine_lse_kernel``)."""
        return f"{self.kernel.fn.__module__.rsplit('.', 1)[-1]}.{self.kernel.fn.__name__}"

    @property
    def key(self) -> tuple:
        """What makes two launches the same compile."""
        constexprs = sorted((str(path), repr(value)) for path, value in self.constexprs.items())
        options = json.dumps(self.options, sort_keys=True, default=str)
        return (self.name, self.arch, json.dumps(self.signature), str(constexprs), options)


class _StandInDriver(DriverBase):
    """Answers what Triton's launch path asks of a driver, for a GPU that is not present."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)
        self.arch = arch

    @classmethod
    def is_active(cls) -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("the stand-in driver builds no launcher")

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        # One device id per architecture: Triton caches the target per device id.
        return self.arch

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_active_torch_device(self):
        raise NotImplementedError("the stand-in driver has no torch device")

    def get_benchmarker(self):
        raise NotImplementedError("the stand-in driver cannot time kernels")


def _tuples(value):
    """Triton's options as they were before their JSON round trip (tuples, which hash)."""
    if isinstance(value, list):
        return tuple(_tuples(item) for item in value)
    if isinstance(value, dict):
        return {key: _tuples(item) for key, item in value.items()}
    return value


@contextlib.contextmanager
def specializations(arch: int) -> Iterator[list[Specialization]]:
    """Within the block, Triton launches record their compile for ``arch`` instead of running."""
    if _common.interpreting():
        raise RuntimeError("mmot.aot compiles for real GPUs: run it without TRITON_INTERPRET=1")
    recorded: list[Specialization] = []

    def record(*, fn, compile, **_) -> bool:
        options = _tuples(json.loads(compile["specialization_data"])["options"])
        recorded.append(Specialization(fn.jit_function, compile["signature"], compile["constants"], compile["configs"][0], options, arch))
        return True  # handled: Triton skips the compile and the launch

    # Triton's own driver is created on first use, which fails without a GPU: restore it as found.
    saved = (knobs.runtime.jit_cache_hook, _common.TARGET_SM_COUNT, driver._active)
    driver.set_active(_StandInDriver(arch))
    knobs.runtime.jit_cache_hook, _common.TARGET_SM_COUNT = record, SM_COUNTS[arch]
    try:
        yield recorded
    finally:
        knobs.runtime.jit_cache_hook, _common.TARGET_SM_COUNT, driver._active = saved
