"""Which backend runs a call: ``backend="auto"`` resolved, explicit choices checked.

``"auto"`` picks Rust for CPU tensors and Triton for CUDA tensors when Triton is installed; any
other device runs the torch reference. The choice is made before the op is called and travels
as an argument, so one ``torch.library`` op serves every backend (``docs/architecture.md``).
"""

from __future__ import annotations

import importlib.util

import torch

BACKENDS = ("auto", "rust", "triton", "torch")


def triton_available(module: str) -> bool:
    """Whether Triton and mmot's Triton kernel module ``mmot.kernels.<module>`` are importable."""
    return importlib.util.find_spec("triton") is not None and importlib.util.find_spec(f"mmot.kernels.{module}") is not None


def _interpreting() -> bool:
    # Only asked once Triton is known to be importable: the kernels' own flag, read at call time.
    from mmot.kernels import _common

    return _common.interpreting()


def resolve_backend(public: str, backend: object, device: torch.device, kernels: str, *, distributed: bool = False) -> str:
    """The concrete backend ("rust", "triton" or "torch") for a call to ``public`` ("mmot.<op>"), or raise.

    ``kernels`` names the op's Triton module under ``mmot.kernels``. With ``distributed`` (rows
    sharded over a process group) the same choices hold: the Rust and Triton kernels run each
    rank's rows with the column sums all-reduced between iterations (``docs/distributed.md``).
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{public}: argument 'backend' must be one of {BACKENDS}; got {backend!r}")
    if distributed and backend == "auto" and device.type == "cuda" and not triton_available(kernels):
        # With rows sharded there is no silent fallback to the reference: say what is missing.
        raise ValueError(
            f"{public}: process_group on CUDA tensors runs the Triton kernel, which is not available (needs the triton "
            "package); pass backend='torch' for the reference-based sharded path"
        )
    if backend == "auto":
        if device.type == "cpu":
            return "rust"
        if device.type == "cuda" and triton_available(kernels):
            return "triton"
        return "torch"
    if backend == "rust" and device.type != "cpu":
        raise ValueError(f"{public}: backend 'rust' runs on CPU tensors only; got a tensor on {device}")
    if backend == "triton":
        if not triton_available(kernels):
            raise ValueError(
                f"{public}: backend 'triton' is not available (needs the triton package and mmot's Triton kernel for this op); "
                "use backend='auto', 'rust' or 'torch'"
            )
        if device.type == "cpu" and not _interpreting():
            raise ValueError(f"{public}: backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before import for CPU tensors")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"{public}: backend 'triton' runs on CUDA tensors; got a tensor on {device}")
    return backend
