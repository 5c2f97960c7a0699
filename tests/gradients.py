"""Input gradients against an upstream gradient, and their comparison at a tolerance per dtype."""

from __future__ import annotations

import torch

F64 = dict(rtol=1e-9, atol=1e-10)
F32 = dict(rtol=2e-3, atol=2e-4)


def leaf(tensor):
    return tensor.detach().clone().requires_grad_(True)


def value_and_grads(fn, inputs, upstream):
    """fn(*inputs) and the gradients of <fn(*inputs), upstream> with respect to every input."""
    leaves = [leaf(t) for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, upstream.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


def grad_of(fn, scores, upstream):
    """The gradient of <fn(scores), upstream> with respect to scores."""
    return value_and_grads(fn, [scores], upstream)[1][0]


def assert_grads_close(got, want, dtype):
    tol = F64 if dtype == torch.float64 else F32
    for g, w in zip(got, want):
        # Gradients scale with 1/eps: compare relative to the largest entry (an exactly zero
        # gradient, e.g. of a single sample or of a min-max over two anchors, only has to come
        # out at rounding level: cancellations through the iterations leave ~1e-13 in float64).
        scale = max(float(w.abs().max()), 1e-2 if dtype == torch.float64 else 1.0)
        torch.testing.assert_close(g.double() / scale, w.double() / scale, **tol)


def assert_matches_reference(fn, reference_fn, inputs, upstream):
    """fn against reference_fn (autograd through mmot.reference), value and input gradients."""
    dtype = inputs[0].dtype
    out, got = value_and_grads(fn, inputs, upstream)
    ref, want = value_and_grads(reference_fn, inputs, upstream)
    torch.testing.assert_close(out, ref, **(F64 if dtype == torch.float64 else F32))
    assert_grads_close(got, want, dtype)
    return got
