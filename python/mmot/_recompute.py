"""Vector-Jacobian products by recomputing the reference under autograd, inside a custom op.

The backward ops (``mmot::*_backward``) are opaque ``torch.library`` ops, so ``torch.compile``
traces through them without seeing autograd inside. Their bodies replay the forward through
:mod:`mmot.reference` and differentiate it: the exact gradient of the unrolled iteration.
A custom op's body runs with autograd's dispatch keys excluded; ``autograd_inside_op`` lifts
that exclusion for the replay only and restores it afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

_AUTOGRAD_KEYS = (
    torch._C.DispatchKey.AutogradFunctionality,
    torch._C.DispatchKey.AutogradOther,
    torch._C.DispatchKey.AutogradNestedTensor,
)


@contextlib.contextmanager
def autograd_inside_op() -> Iterator[None]:
    excluded = [torch._C._dispatch_tls_is_dispatch_key_excluded(key) for key in _AUTOGRAD_KEYS]
    try:
        for key in _AUTOGRAD_KEYS:
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
        with torch.enable_grad():
            yield
    finally:
        for key, was_excluded in zip(_AUTOGRAD_KEYS, excluded):
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, was_excluded)


def vjp(forward: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], grad_output: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of ``forward(*inputs)`` against ``grad_output``, one per input, in the inputs' dtypes."""
    with autograd_inside_op():
        leaves = [tensor.detach().requires_grad_(True) for tensor in inputs]
        output = forward(*leaves)
        grads = torch.autograd.grad(output, leaves, grad_output.to(output.dtype), allow_unused=True)
    return [torch.zeros_like(leaf) if grad is None else grad.to(leaf.dtype) for leaf, grad in zip(leaves, grads)]
