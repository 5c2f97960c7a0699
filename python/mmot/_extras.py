"""Optional dependencies: a missing one names the ``pip install`` that brings it.

``pip install mmot`` needs only torch, numpy and tqdm. The training module needs pyyaml
(``mmot[sspc]``), the benchmark runner POT, pytest-benchmark and matplotlib (``mmot[bench]``).
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says which extra to install."""


def require(module: str, extra: str, user: str) -> ModuleType:
    """Import ``module`` for ``user`` (e.g. "mmot-sspc"), or raise :class:`MissingExtra`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise MissingExtra(f'{user} needs the optional package {top!r}: pip install "mmot[{extra}]"') from None
