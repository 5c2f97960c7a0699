"""Calls into the Rust kernels (``mmot._core``): arrays in, torch-allocated outputs, named errors.

Every kernel of ``mmot._core`` takes its input arrays, then its output arrays, then its
parameters and the thread count (and, for forwards that check values, the checks flag last). The
arrays are zero-copy numpy views of contiguous CPU tensors in one float dtype; the outputs are
allocated by torch (or, for kernels that write only part of an output, zero-filled by
:func:`zeroed_output`), so the results are ordinary tensors (``docs/architecture.md``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

# Tests set MMOT_POISON_OUTPUTS=1 so that an element a kernel forgets to write shows up as NaN.
_poison_outputs = os.environ.get("MMOT_POISON_OUTPUTS", "0") == "1"
MAX_THREADS = 4096
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def num_threads() -> int:
    """Threads for the Rust pool: MMOT_NUM_THREADS, else torch's intra-op thread count."""
    configured = os.environ.get("MMOT_NUM_THREADS", "").strip()
    if configured:
        # A thread per core at most makes sense; 4096 bounds it well below what rayon can spawn.
        if not (configured.isdigit() and 1 <= int(configured) <= MAX_THREADS):
            raise ValueError(f"MMOT_NUM_THREADS must be an integer in 1..{MAX_THREADS}; got {configured!r}")
        return int(configured)
    return max(1, torch.get_num_threads())


def new_output(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor for a kernel to fill, NaN-filled under MMOT_POISON_OUTPUTS=1."""
    out = torch.empty(tuple(shape), dtype=dtype)
    if _poison_outputs:
        out.fill_(float("nan"))
    return out


def zeroed_output(shape: Sequence[int], dtype: torch.dtype, written: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A zero-filled CPU tensor for a kernel that writes only the entries ``written()`` masks.

    numpy takes its zeros from calloc, which for a large size maps fresh pages instead of writing
    zeros; the OS zeroes a page when it is first touched, so pages the kernel never writes (a
    ragged batch's padding) cost no time. Under MMOT_POISON_OUTPUTS=1 the masked entries start as
    NaN, so that one the kernel forgets shows.
    """
    out = torch.from_numpy(np.zeros(tuple(shape), dtype=_NUMPY_DTYPES[dtype]))
    if _poison_outputs:
        out.masked_fill_(written(), float("nan"))
    return out


def problem_shape(tensor: torch.Tensor) -> tuple[int, int, int]:
    """(problems, rows, columns) of a (..., N, K) tensor whose leading dims are flattened."""
    return math.prod(tensor.shape[:-2]), tensor.shape[-2], tensor.shape[-1]


def _array(value, dtype: torch.dtype):
    """Float tensors as arrays in ``dtype`` (copied only to convert or make contiguous), index tensors as they are."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point():
        value = value.detach().to(dtype)
    return value.contiguous().numpy()


def run(op: str, kernel: str, dtype: torch.dtype, inputs: Sequence, outputs: Sequence[Sequence[int]], params: Sequence, *, checks=None):
    """Call ``mmot._core.<kernel>(*inputs, *outputs, *params, num_threads()[, checks])``.

    ``inputs`` are tensors (float ones converted to ``dtype``, the kernels' one float dtype) or
    plain values; ``outputs`` are the shapes of new ``dtype`` tensors for the kernel to write.
    Returns those tensors, or the kernel's own result when there are none. Errors from the
    kernel are re-raised with ``op`` in front, so that they name the public function.
    """
    from mmot import _core

    outs = [new_output(shape, dtype) for shape in outputs]
    args = [_array(value, dtype) for value in inputs] + [out.numpy() for out in outs] + list(params) + [num_threads()]
    if checks is not None:
        args.append(checks)
    try:
        result = getattr(_core, kernel)(*args)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{op}: {error}") from None
    return outs if outs else result
