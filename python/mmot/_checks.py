"""Argument validation shared by every op.

Errors name the op, the argument and what was expected, so a user can fix the call without
reading mmot's source. Shape, dtype and parameter checks always run; checks that must read
tensor values (finiteness, masses) can be switched off with :func:`set_checks` or
``MMOT_CHECKS=0`` because on CUDA they cost a host synchronisation.
"""

from __future__ import annotations

import math
import os
from numbers import Integral, Real

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# Counts (iterations, slots) reach the kernels as 32-bit integers.
MAX_COUNT = 2**31 - 1

_value_checks = os.environ.get("MMOT_CHECKS", "1").strip().lower() not in ("0", "false", "off", "no")


def set_checks(enabled: bool) -> bool:
    """Turn the value checks (non-finite scores, mass values) on or off; return the old setting.

    Shape, dtype and parameter checks always run. Turn value checks off for sync-free CUDA
    training and CUDA-graph capture. The environment variable ``MMOT_CHECKS=0`` sets the
    initial state.
    """
    global _value_checks
    if not isinstance(enabled, bool):
        raise TypeError(f"mmot.set_checks: argument 'enabled' must be a bool; got {type(enabled).__name__}")
    previous, _value_checks = _value_checks, enabled
    return previous


def value_checks_enabled() -> bool:
    return _value_checks


def float_tensor(op: str, name: str, value: object, *, min_dim: int, shape_hint: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor of shape {shape_hint}; got {type(value).__name__}")
    if value.is_nested or value.layout != torch.strided:
        layout = "nested" if value.is_nested else str(value.layout).removeprefix("torch.")
        raise TypeError(f"{op}: argument '{name}' must be a dense (strided) tensor; got a {layout} tensor (convert it with .to_dense())")
    _reverse_mode_only(op, name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: argument '{name}' must be a floating tensor (float64, float32, bfloat16 or float16); got {value.dtype}")
    if value.dim() < min_dim:
        raise ValueError(f"{op}: argument '{name}' must have shape {shape_hint}; got shape {tuple(value.shape)}")
    return value


def _reverse_mode_only(op: str, name: str, value: torch.Tensor) -> None:
    """mmot's ops define reverse-mode gradients only (torch.library's register_autograd): under
    torch.func's grad/vjp/jacrev/jvp they would fail deep inside torch, and forward-mode AD would
    silently drop or zero the tangent, so both are refused up front."""
    if torch.compiler.is_compiling():
        return
    from torch.autograd.forward_ad import unpack_dual

    if torch._C._functorch.is_gradtrackingtensor(value) or unpack_dual(value).tangent is not None:
        raise NotImplementedError(
            f"{op}: argument '{name}' is being differentiated by a torch.func transform (grad, vjp, jacrev, jvp) or by "
            f"forward-mode AD; mmot's ops have reverse-mode autograd only: use loss.backward() or torch.autograd.grad "
            f"(torch.vmap works)"
        )


def positive_float(op: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{op}: argument '{name}' must be a positive real number; got {type(value).__name__}")
    value = float(value)
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) the value is a SymFloat,
    # which comparisons guard on and math.isfinite cannot take. NaN fails both.
    if not 0 < value < math.inf:
        raise ValueError(f"{op}: argument '{name}' must be a positive finite number; got {value}")
    return value


def real_number(op: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{op}: argument '{name}' must be a real number; got {type(value).__name__}")
    value = float(value)
    if not -math.inf < value < math.inf:  # SymFloat-safe, as in positive_float
        raise ValueError(f"{op}: argument '{name}' must be finite; got {value}")
    return value


def int_in_range(op: str, name: str, value: object, low: int, high: int = MAX_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{op}: argument '{name}' must be an int; got {type(value).__name__}")
    value = int(value)
    if not low <= value <= high:
        raise ValueError(f"{op}: argument '{name}' must be in {low}..{high}; got {value}")
    return value


def choice(op: str, name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{op}: argument '{name}' must be one of {choices}; got {value!r}")
    return value


def log_domain_flag(op: str, value: object) -> str:
    """Map the public ``log_domain`` ("auto", True, False) onto the kernels' "auto"/"on"/"off"."""
    if isinstance(value, str) and value == "auto":
        return "auto"
    if isinstance(value, bool):
        return "on" if value else "off"
    raise ValueError(f"{op}: argument 'log_domain' must be 'auto', True or False; got {value!r}")


def same_device(op: str, name: str, tensor: torch.Tensor, reference: torch.Tensor, reference_name: str) -> None:
    if tensor.device != reference.device:
        raise ValueError(
            f"{op}: argument '{name}' must be on the same device as '{reference_name}' ({reference.device}); got {tensor.device}"
        )


def finite(op: str, name: str, tensor: torch.Tensor) -> None:
    """Value check: reject NaN and Inf (one host sync on CUDA).

    The extremes show both (aminmax propagates NaN) and need no temporary as large as the
    tensor: on CPU this is 10-20x faster than ``isfinite(tensor).all()``.
    """
    if _value_checks and tensor.numel() and not bool(torch.stack(torch.aminmax(tensor.detach())).isfinite().all()):
        raise ValueError(f"{op}: argument '{name}' must be finite; found NaN or Inf")


def positive_masses(op: str, name: str, masses: torch.Tensor, total: torch.Tensor | float | None = None, total_desc: str = "") -> None:
    """Value check: masses are positive and finite and, if ``total`` is given, each problem's sum to it."""
    if not _value_checks or masses.numel() == 0:
        return
    # amin/amax propagate NaN and make no temporaries (a batch of 65536 tiny problems has
    # mass tensors as large as its scores, so these checks must stay cheap).
    low, high = float(masses.amin()), float(masses.amax())
    if not (low > 0 and high < math.inf):
        raise ValueError(f"{op}: argument '{name}' must hold positive finite masses")
    if total is None:
        return
    sums = masses.sum(-1, dtype=torch.float64)
    total = torch.as_tensor(total, dtype=torch.float64, device=masses.device).expand_as(sums)
    # ~isclose(sums, total, rtol=1e-4, atol=0) for finite values, without its temporaries.
    mismatch = (sums - total).abs() > 1e-4 * total.abs()
    if bool(mismatch.any()):
        worst = int(mismatch.flatten().nonzero()[0])
        raise ValueError(
            f"{op}: argument '{name}' must sum to {total_desc} in every problem; "
            f"got a sum of {sums.flatten()[worst].item():.6g} where {total.flatten()[worst].item():.6g} was expected"
        )


def mass_shape(op: str, name: str, masses: object, scores: torch.Tensor, full_shape: tuple[int, ...], what: str) -> torch.Tensor:
    """Broadcast a user-given mass vector to ``full_shape``: (L,) or the full (..., L) batch shape."""
    masses = float_tensor(op, name, masses, min_dim=1, shape_hint=f"({what},) or (..., {what})")
    same_device(op, name, masses, scores, "scores")
    try:
        expanded = masses.expand(full_shape)
    except RuntimeError:
        raise ValueError(
            f"{op}: argument '{name}' must have shape ({full_shape[-1]},) or broadcast to {tuple(full_shape)}; "
            f"got shape {tuple(masses.shape)}"
        ) from None
    _given_masses(op, name, masses, scores.dtype)
    return expanded


def _given_masses(op: str, name: str, masses: torch.Tensor, scores_dtype: torch.dtype) -> None:
    """Value check of a user's masses before any default is derived from them, so that a bad
    ``col_mass`` is never reported as the ``row_mass`` computed from its total (or the reverse)."""
    positive_masses(op, name, masses)
    if not _value_checks or masses.numel() == 0:
        return
    compute = torch.float64 if scores_dtype == torch.float64 else torch.float32
    limit = torch.finfo(compute).max
    total = float(masses.sum(-1, dtype=torch.float64).amax())
    if not total <= limit:
        raise ValueError(
            f"{op}: argument '{name}' must sum to at most {limit:.4g} ({compute} is the compute dtype of "
            f"{scores_dtype} scores); got a sum of {total:.4g}"
        )


def process_group(op: str, group: object) -> bool:
    """Whether the rows are sharded: ``group`` is None or an initialised ``torch.distributed`` group."""
    if group is None:
        return False
    import torch.distributed as dist

    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"{op}: argument 'process_group' must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD) or None; "
            f"got {type(group).__name__}"
        )
    if not dist.is_initialized():
        raise ValueError(f"{op}: argument 'process_group' needs torch.distributed initialised (dist.init_process_group)")
    return True


def reciprocal_fits(op: str, name: str, value: float, dtype: torch.dtype) -> float:
    """A temperature whose reciprocal overflows the accumulation dtype (float64 for float64
    inputs, float32 otherwise) is refused: the kernels scale by 1/value."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    smallest = 1.0 / torch.finfo(compute).max
    if not value >= smallest:  # a comparison, so a SymFloat under torch.compile stays in the graph
        raise ValueError(
            f"{op}: argument '{name}' must be at least {smallest:.4g} for {dtype} inputs (its reciprocal overflows {compute}); got {value}"
        )
    return value
