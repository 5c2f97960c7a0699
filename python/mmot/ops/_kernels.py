"""The body every op registers for CPU and CUDA: a backend table and the fallbacks to torch.

The public function resolves the backend (:mod:`mmot._backend`) and passes it to the op; the
op's kernel looks the implementation up here. The op layer, and only it, decides when a call
does not go to the chosen kernel (``docs/architecture.md``, Fallbacks):

* empty inputs run the torch backend, which returns empty results, zero losses and gradients;
* a call the Triton kernel cannot take (a row wider than its tile) runs the torch backend.

Value checks that the chosen kernel does not make itself run here too, once per call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType


def triton_kernels(module: str) -> ModuleType:
    """``mmot.kernels.<module>``, imported on first use: importing Triton takes a while."""
    return importlib.import_module(f"mmot.kernels.{module}")


def triton_entry(module: str, entry: str) -> Callable:
    """``mmot.kernels.<module>.<entry>`` as a callable that imports the module on first call."""

    def run(*args):
        return getattr(triton_kernels(module), entry)(*args)

    run.__qualname__ = run.__name__ = f"{module}.{entry}"
    return run


class Kernels:
    """One op direction's implementations by backend ("torch", "rust", "triton").

    ``empty(*args)`` says the call has no work (it runs the torch backend); ``fits(*args)``, if
    given, whether the Triton kernel can take it (if not, the torch backend runs);
    ``check(backend, *args)``, if given, makes the value checks that ``backend``'s kernel does
    not make itself.
    """

    def __init__(
        self,
        *,
        torch: Callable,
        rust: Callable,
        triton: Callable,
        empty: Callable[..., bool],
        fits: Callable[..., bool] | None = None,
        check: Callable[..., None] | None = None,
    ) -> None:
        self.table = {"torch": torch, "rust": rust, "triton": triton}
        self.empty = empty
        self.fits = fits
        self.check = check

    def choose(self, backend: str, *args) -> str:
        """The backend that runs the call: ``backend``, or "torch" where the op falls back."""
        if self.empty(*args):
            return "torch"
        if backend == "triton" and self.fits is not None and not self.fits(*args):
            return "torch"
        return backend

    def __call__(self, backend: str, *args):
        chosen = self.choose(backend, *args)
        if self.check is not None:
            self.check(chosen, *args)
        return self.table[chosen](*args)
