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
import math
import os

import torch
import triton
import triton.language as tl

NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))
POS_INF: tl.constexpr = tl.constexpr(float("inf"))

# Per-call integers of the Sinkhorn kernels that Triton must not specialise on (it compiles a
# variant for a value of 1 and for multiples of 16): the iteration count and the pass of a split
# launch would otherwise cost up to three compiles of the same kernel on first use.
NOT_SPECIALIZED = ("n_iters", "pass_index")

# Tests set this to force the split launch structure under the interpreter (None: automatic).
FORCE_PROGRAMS_PER_PROBLEM: int | None = None
# Tests set this to force small row tiles, so tiny problems span several tiles and programs.
FORCE_TILE_ROWS: int | None = None
# ``mmot.aot`` sets this to plan launches for a GPU that is not here (its streaming-multiprocessor
# count), so the launchers choose the configurations they would choose on that GPU.
TARGET_SM_COUNT: int | None = None

# Work per problem (rows × columns × groups) above which a single problem is split over programs.
SPLIT_MIN_ELEMENTS = 1 << 17
# A Sinkhorn program holds a tile in registers. On a GPU it gets at most MAX_WARPS warps, each
# thread at most ELEMENTS_PER_THREAD float32 elements of the tile (half as many float64 ones)
# and up to MAX_REGISTERS registers (ptxas would otherwise stop at 128 and spill; 16 warps
# would cap them at 128 too): the sizes at which every kernel compiles without register spills
# (``python -m mmot.aot``), at one 8-warp program per SM where a tile needs over 128.
MAX_WARPS = 8
ELEMENTS_PER_THREAD = 16
MAX_REGISTERS = 255
# Widest row a tile holds under the interpreter (tests lower it): the Sinkhorn kernels keep a
# whole row in one tile for the row reductions. Wider calls are not theirs to take (each kernel
# module's ``fits``); on a GPU the register budget binds first (:func:`tile_elements`).
MAX_BLOCK_K = 1 << 14

# Tests set MMOT_POISON_OUTPUTS=1 so that an element a kernel forgets to write shows up as NaN.
_poison_outputs = os.environ.get("MMOT_POISON_OUTPUTS", "0") == "1"


def interpreting() -> bool:
    """TRITON_INTERPRET=1: the kernels run on CPU tensors through Triton's interpreter (CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compiled_for_gpu(device: torch.device) -> bool:
    """Whether launches for ``device`` compile for a GPU: a CUDA device, or ``mmot.aot``'s target."""
    return not interpreting() and (device.type == "cuda" or TARGET_SM_COUNT is not None)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


@triton.jit
def scalar(value, ACC: tl.constexpr):
    """A ``tl.float64`` kernel parameter in the accumulation dtype (see the module doc)."""
    return tl.full([], value, ACC)


@triton.jit
def shifted_logits(S, stride_n, stride_k, offs_n, offs_k, mask, inv_eps, ACC: tl.constexpr):
    """(scores − the problem's first row) / eps for a tile of the Sinkhorn ops.

    A per-column constant is absorbed exactly by the first column scaling (so it passes no
    gradient either), and subtracting one keeps large scores (1e38 with a small spread) from
    overflowing when divided by eps. The clamp to ±finfo.max/8, the widest exponent range the
    value checks accept, keeps logits finite when the checks are off and the range is beyond it.
    """
    kmask = tl.max(mask.to(tl.int32), axis=0) > 0
    first = tl.load(S + offs_k * stride_k, mask=kmask, other=0.0).to(ACC)
    x = tl.load(S + offs_n[:, None] * stride_n + offs_k[None, :] * stride_k, mask=mask, other=0.0).to(ACC)
    if ACC == tl.float64:
        bound = tl.full([], 2.2471164185778946e307, tl.float64)
    else:
        bound = tl.full([], 4.253529586511731e37, tl.float32)
    return tl.minimum(tl.maximum((x - first[None, :]) * inv_eps, -bound), bound)


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
    if not compiled_for_gpu(device):
        return 1
    if TARGET_SM_COUNT is not None:
        return TARGET_SM_COUNT
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _per_thread(acc: torch.dtype) -> int:
    return ELEMENTS_PER_THREAD // (2 if acc == torch.float64 else 1)


def tile_elements(acc: torch.dtype) -> int:
    """Elements of a Sinkhorn tile: what MAX_WARPS warps hold in registers (16K under the interpreter)."""
    return (1 << 14) if interpreting() else MAX_WARPS * 32 * _per_thread(acc)


def widest_row(acc: torch.dtype) -> int:
    """The widest row (a power of two) that one tile holds."""
    return min(MAX_BLOCK_K, tile_elements(acc))


def tile_rows(n_rows: int, row_elements: int, acc: torch.dtype) -> int:
    """Rows per tile: as many as :func:`tile_elements` allows, at least one."""
    if FORCE_TILE_ROWS is not None:
        return FORCE_TILE_ROWS
    return max(1, min(triton.next_power_of_2(n_rows), tile_elements(acc) // row_elements))


def num_warps(tile: int, acc: torch.dtype) -> int:
    """Warps for a tile of ``tile`` elements: enough that no thread holds more than its share."""
    return max(1, min(MAX_WARPS, tile // (32 * _per_thread(acc))))


def programs_per_problem(n_problems: int, n_rows: int, block_n: int, work: int, device: torch.device) -> int:
    """R, the programs that share one problem's rows (1: the persistent structure)."""
    tiles = triton.cdiv(n_rows, block_n)
    if FORCE_PROGRAMS_PER_PROBLEM is not None:
        return max(1, min(FORCE_PROGRAMS_PER_PROBLEM, tiles))
    if tiles <= 1 or work < SPLIT_MIN_ELEMENTS:
        return 1
    sms = sm_count(device)  # 1 off a GPU: one program per problem
    if n_problems >= sms:
        return 1
    return max(1, min(tiles, (2 * sms) // n_problems))


# Rows below this norm are divided by it instead (as F.normalize's eps).
NORM_EPS = 1e-12


def unit_rows(x: torch.Tensor):
    """(x̂, 1/max(‖x‖, 1e-12), whether ‖x‖ < 1e-12) row-wise, scale-safe: each row is first
    multiplied by the power of two at its largest magnitude (exact), so that its sum of squares
    neither overflows (rows past ~1.8e19 in float32) nor underflows."""
    info = torch.finfo(x.dtype)
    lo, hi = math.frexp(info.tiny)[1] - 1, math.frexp(info.max)[1] - 1  # the normal powers of two
    _, exponent = torch.frexp(x.abs().amax(-1, keepdim=True))
    step = torch.ldexp(torch.ones_like(x[:, :1]), (-exponent).clamp(lo, hi))
    scaled = x * step
    norm = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True)
    floor = NORM_EPS * step
    bounded = torch.maximum(norm, floor)
    return scaled / bounded, step / bounded, norm < floor


def through_normalize(unit: torch.Tensor, recip: torch.Tensor, floored: torch.Tensor, grad_unit: torch.Tensor) -> torch.Tensor:
    """∂raw from ∂unit for unit = raw / max(‖raw‖, eps) (as F.normalize's gradient), from the
    unit rows and 1/max(‖raw‖, eps): no product sees the raw magnitude."""
    projected = grad_unit - unit * (unit * grad_unit).sum(-1, keepdim=True)
    return torch.where(floored, grad_unit, projected) * recip
