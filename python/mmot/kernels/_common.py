"""Launch helpers shared by mmot's Triton kernels: dtypes, tile sizes and the launch plan.

Launch structure of the Sinkhorn kernels (see ``sinkhorn.py`` and ``multi_sinkhorn.py``):

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

from mmot import reference

# Tests set this to force the split launch structure under the interpreter (None: automatic).
FORCE_PROGRAMS_PER_PROBLEM: int | None = None
# Tests set this to force small row tiles, so tiny problems span several tiles and programs.
FORCE_TILE_ROWS: int | None = None

# Work per problem (rows × columns × groups) above which a single problem is split over programs.
SPLIT_MIN_ELEMENTS = 1 << 17
# Widest row a tile holds (the kernels keep a whole row in one tile for the row reductions).
MAX_BLOCK_K = 1 << 14


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return reference.compute_dtype(dtype)


def tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


@functools.lru_cache(maxsize=None)
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
