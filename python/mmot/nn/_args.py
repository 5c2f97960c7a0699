"""Argument checks for mmot.nn: modules check what they are given when they are built.

A bad argument must fail at construction (or at the start of the call), naming the class or
method, the argument and what was expected, not at the first step after a queue warm-up.
The op-level checks (:mod:`mmot._checks`) do the work; ``where`` is "mmot.nn.<Class>" or
"mmot.nn.<Class>.<method>".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real

import torch

from mmot import _backend, _checks

positive_float = _checks.positive_float
int_in_range = _checks.int_in_range
choice = _checks.choice


def backend(where: str, value: object) -> str:
    return _checks.choice(where, "backend", value, _backend.BACKENDS)


def flag(where: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{where}: argument '{name}' must be a bool; got {type(value).__name__}")
    return value


def weight(where: str, name: str, value: object, key: object) -> float:
    """A finite weight >= 0 (``key`` names the entry of a weight table)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{where}: argument '{name}' must hold real weights; got {type(value).__name__} for {key!r}")
    value = float(value)
    if not 0 <= value < math.inf:
        raise ValueError(f"{where}: argument '{name}' must hold finite weights >= 0; got {value} for {key!r}")
    return value


def mapping(where: str, name: str, value: object, what: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise TypeError(f"{where}: argument '{name}' must be a mapping of {what}; got {type(value).__name__}")
    return value


def float_dtype(where: str, name: str, value: object) -> torch.dtype:
    if not isinstance(value, torch.dtype) or value not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{where}: argument '{name}' must be a floating torch.dtype {_checks.FLOAT_DTYPES}; got {value!r}")
    return value


def rows(where: str, name: str, value: object, width: int, device: torch.device | None = None) -> torch.Tensor:
    """A dense floating (B, width) tensor, on ``device`` if given."""
    value = _checks.float_tensor(where, name, value, min_dim=2, shape_hint=f"(B, {width})")
    if value.dim() != 2 or value.shape[1] != width:
        raise ValueError(f"{where}: argument '{name}' must have shape (B, {width}); got {tuple(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{where}: argument '{name}' must be on {device} (the module's device); got {value.device}")
    return value
