"""Backend choice and the plumbing between torch tensors and the Rust kernels.

``backend="auto"`` picks Rust for CPU tensors and Triton for CUDA tensors; any other device
falls back to the torch reference. The choice is made before the op is called and travels as
an argument, so one ``torch.library`` op serves every backend.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch

BACKENDS = ("auto", "rust", "triton", "torch")

# Tests set MMOT_POISON_OUTPUTS=1 so that an element a kernel forgets to write shows up as NaN.
_poison_outputs = os.environ.get("MMOT_POISON_OUTPUTS", "0") == "1"


# Ops whose Triton module under mmot.kernels is not named after the op.
_KERNEL_MODULES = {"anchor_consistency_loss": "anchor_consistency"}


def triton_available(op: str) -> bool:
    """Whether Triton and mmot's Triton kernel for ``op`` (e.g. "multi_sinkhorn") are importable."""
    module = _KERNEL_MODULES.get(op, op)
    return importlib.util.find_spec("triton") is not None and importlib.util.find_spec(f"mmot.kernels.{module}") is not None


def triton_interpreter() -> bool:
    """TRITON_INTERPRET=1 runs Triton kernels on CPU tensors (slowly): how CI tests them."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(public: str, backend: object, device: torch.device, *, distributed: bool = False) -> str:
    """Return the concrete backend ("rust", "triton" or "torch") for a call to ``public`` ("mmot.<op>"), or raise."""
    op = public.removeprefix("mmot.")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{public}: argument 'backend' must be one of {BACKENDS}; got {backend!r}")
    if distributed:
        # Column sums are all-reduced between iterations, which the torch formulation does natively.
        if backend not in ("auto", "torch"):
            raise ValueError(f"{public}: argument 'backend' must be 'auto' or 'torch' when process_group is given; got {backend!r}")
        return "torch"
    if backend == "auto":
        if device.type == "cpu":
            return "rust"
        if device.type == "cuda" and triton_available(op):
            return "triton"
        return "torch"
    if backend == "rust" and device.type != "cpu":
        raise ValueError(f"{public}: backend 'rust' runs on CPU tensors only; got a tensor on {device}")
    if backend == "triton":
        if not triton_available(op):
            raise ValueError(
                f"{public}: backend 'triton' is not available (needs the triton package and mmot's Triton kernel for this op); "
                "use backend='auto', 'rust' or 'torch'"
            )
        if device.type == "cpu" and not triton_interpreter():
            raise ValueError(f"{public}: backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before import for CPU tensors")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"{public}: backend 'triton' runs on CUDA tensors; got a tensor on {device}")
    return backend


def num_threads() -> int:
    """Threads for the Rust pool: MMOT_NUM_THREADS, else torch's intra-op thread count."""
    configured = os.environ.get("MMOT_NUM_THREADS", "").strip()
    if configured:
        try:
            return max(1, int(configured))
        except ValueError:
            raise ValueError(f"MMOT_NUM_THREADS must be a positive integer; got {configured!r}") from None
    return max(1, torch.get_num_threads())


def new_output(shape, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison_outputs:
        out.fill_(float("nan"))
    return out


def problem_shape(scores: torch.Tensor) -> tuple[int, int, int]:
    """(problems, rows, columns) of a (..., N, K) tensor whose leading dims are flattened."""
    return math.prod(scores.shape[:-2]), scores.shape[-2], scores.shape[-1]


def kernel_array(tensor: torch.Tensor, dtype: torch.dtype):
    """A zero-copy numpy view for the Rust kernels (copies only to convert or make contiguous)."""
    return tensor.detach().to(dtype).contiguous().numpy()


def call_rust(op: str, kernel, *args):
    """Run a Rust kernel and put the op's name on the kernel's errors."""
    try:
        return kernel(*args)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{op}: {error}") from None
