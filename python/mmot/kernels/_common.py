"""What mmot's Triton kernels share: dtypes, float scalars, constants, tile sizes and the launch plan.

This is the only module the kernel modules import besides torch and triton (see
``docs/architecture.md``).

**Float scalars** (eps, temperatures, scales). The real Triton compiler types a plain Python
``float`` argument as fp32, while the interpreter used in CI keeps it a Python float, so a
float64 kernel that takes ``1/eps`` as a float is exact in every CPU test and silently fp32 on a
GPU. The one convention here:

* the kernel parameter is annotated ``tl.float64`` (``inv_eps: tl.float64``). Triton then types
  it fp64 whatever the Python value, and the launcher passes it by value as a double: no device
  tensor, no host-to-device copy, no host sync, and it is captured by value in a CUDA graph;
* the kernel reads it once through :func:`scalar`, which rounds it to the accumulation dtype
  (one ``cvt`` for fp32 kernels, nothing for fp64 ones), so fp32 kernels never compute in fp64.
  Under the interpreter, where the value is still a Python float, :func:`scalar` materialises
  it in the accumulation dtype directly, so both paths round it the same way.

Constants that shape a kernel rather than vary per call (Multi-SK's slot-group table, whose
length is the constexpr group count anyway) are ``tl.constexpr`` Python numbers: Triton
materialises a Python number in the dtype of the tensor it meets, so those stay exact too (a
new table compiles a new kernel, as a new group count would).
Module-level constants used inside ``@triton.jit`` code must be ``tl.constexpr`` (the compiler
refuses other globals), hence :data:`NEG_INF` and :data:`POS_INF`.

**Launch structure of the Sinkhorn kernels** (``sinkhorn.py`` and ``multi_sinkhorn.py``):

* **persistent** (``R == 1``): one program per problem runs every pass of the iteration (the
  column pass, ``n_iters`` row passes, the output) in a single launch, keeping the column
  potentials in registers. Used for batched problems (the batch fills the GPU) and for small
  problems, where a launch would cost more than the work.
* **split** (``R > 1``): the rows of one problem are split over ``R`` programs, and the host
  launches one kernel per pass. Column sums cross programs through fp32/fp64 atomics into a
  per-iteration buffer, so each iteration is a single streaming pass over the scores
  (``n_iters + 2`` launches for the forward). Used for large single problems.

Either way no host synchronisation happens inside an op: every decision is made from shapes.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))
POS_INF: tl.constexpr = tl.constexpr(float("inf"))

# Tests set this to force the split launch structure under the interpreter (None: automatic).
FORCE_PROGRAMS_PER_PROBLEM: int | None = None
# Tests set this to force small row tiles, so tiny problems span several tiles and programs.
FORCE_TILE_ROWS: int | None = None

# Work per problem (rows × columns × groups) above which a single problem is split over programs.
SPLIT_MIN_ELEMENTS = 1 << 17
# Widest row a tile holds: the Sinkhorn kernels keep a whole row in one tile for the row
# reductions. Wider calls are not theirs to take (each kernel module's ``fits``).
MAX_BLOCK_K = 1 << 14

# Tests set MMOT_POISON_OUTPUTS=1 so that an element a kernel forgets to write shows up as NaN.
_poison_outputs = os.environ.get("MMOT_POISON_OUTPUTS", "0") == "1"


def interpreting() -> bool:
    """TRITON_INTERPRET=1: the kernels run on CPU tensors through Triton's interpreter (CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


@triton.jit
def scalar(value, ACC: tl.constexpr):
    """A ``tl.float64`` kernel parameter in the accumulation dtype (see the module doc)."""
    return tl.full([], value, ACC)


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised output, NaN-filled under MMOT_POISON_OUTPUTS=1."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison_outputs:
        out.fill_(float("nan"))
    return out


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def tile_rows(n_rows: int, row_elements: int) -> int:
    """Rows per tile so that a tile holds about 8K elements on a GPU (16K under the interpreter)."""
    if FORCE_TILE_ROWS is not None:
        return FORCE_TILE_ROWS
    target = (1 << 14) if interpreting() else (1 << 13)
    return max(1, min(triton.next_power_of_2(n_rows), target // row_elements))


def num_warps(tile_elements: int) -> int:
    return max(1, min(8, tile_elements // 512))


def programs_per_problem(n_problems: int, n_rows: int, block_n: int, work: int, device: torch.device) -> int:
    """R, the programs that share one problem's rows (1: the persistent structure)."""
    tiles = triton.cdiv(n_rows, block_n)
    if FORCE_PROGRAMS_PER_PROBLEM is not None:
        return max(1, min(FORCE_PROGRAMS_PER_PROBLEM, tiles))
    if device.type != "cuda" or tiles <= 1 or work < SPLIT_MIN_ELEMENTS:
        return 1
    sms = sm_count(device)
    if n_problems >= sms:
        return 1
    return max(1, min(tiles, (2 * sms) // n_problems))
