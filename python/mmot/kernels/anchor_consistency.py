"""Triton kernels of ``mmot::anchor_consistency_loss``: one elementwise pass plus a reduction.

With z = exp(sim / τ) > 0 and the detached target t, each entry's BCE-with-logits is

    softplus(z) − t·z = (1 − t)·z + log(1 + e^{−z})

which never forms e^{z} (the softplus form). Where (1 − t)·z overflows (z = e^x beyond the
dtype, x = sim/τ) it is recomputed as ±e^{x + log|1 − t|}, and it is 0 at t = 1 exactly, so the
terms are finite wherever the exact ones are. The loss is the mean over all entries; its gradient

    ∂loss/∂sim = grad / count · ((1 − t)·z − z·σ(−z)) / τ,        σ(z) = 1 / (1 + e^{−z}),

takes the same route (z·σ(−z) is 0 where z overflows). NaN or ±inf in sim or target gives NaN
(x − x is added: e^{−inf} = 0 alone would hide a −inf).

forward   one program per BLOCK entries writes its partial sum of term/count; the partials are added by torch
          in a fixed order (deterministic, no atomics, no host synchronisation).
backward  one program per BLOCK entries; the upstream gradient, already divided by count·τ,
          is read from device memory (it is a device tensor: no host synchronisation).

1/τ reaches the kernels as a ``tl.float64`` parameter (the convention of ``_common``).

Accumulation is float32, or float64 for float64 inputs; bf16/fp16 are loaded and cast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmot.kernels import _common
from mmot.kernels._common import scalar

# Entries per program; tests may set this to force several programs on tiny inputs.
FORCE_BLOCK: int | None = None


@triton.jit
def _softplus_exp_neg(z):
    """log(1 + e^{−z}) for z ≥ 0, accurate where e^{−z} is tiny (log1p is not in core tl)."""
    e = tl.exp(-z)
    return tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))


@triton.jit
def _linear(x, z, one_minus, c, log_c):
    """(1 − t)·c·z (c ≥ 0, log_c = log c) with z = e^x: the product where it is finite, else ±e^{x + log|1 − t| + log_c}."""
    direct = one_minus * z * c
    far = tl.exp(x + tl.log(tl.abs(one_minus)) + log_c)
    far = tl.where(one_minus < 0.0, -far, far)
    lin = tl.where(tl.abs(direct) < float("inf"), direct, far)
    return tl.where(one_minus == 0.0, 0.0, lin)


@triton.jit
def _forward_kernel(SIM, TARGET, PARTIAL, COUNT, inv_tau: tl.float64, BLOCK: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    inv_tau = scalar(inv_tau, ACC)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < COUNT
    s = tl.load(SIM + offs, mask=mask, other=0.0).to(ACC)
    t = tl.load(TARGET + offs, mask=mask, other=0.0).to(ACC)
    x = s * inv_tau
    z = tl.exp(x)
    # (1 − t)·z with t = 1 exactly giving 0 even where z overflowed.
    # Each term is divided by count here, so the sum overflows only where the mean does.
    inv_count = 1.0 / COUNT.to(ACC)
    lin = _linear(x, z, 1.0 - t, inv_count, tl.log(inv_count))
    term = lin + _softplus_exp_neg(z) * inv_count + (s - s) + (t - t)
    term = tl.where(mask, term, 0.0)
    tl.store(PARTIAL + pid, tl.sum(term, axis=0))


@triton.jit
def _backward_kernel(GRAD, SIM, TARGET, OUT, COUNT, inv_tau: tl.float64, BLOCK: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    inv_tau = scalar(inv_tau, ACC)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < COUNT
    g = tl.load(GRAD).to(ACC)
    s = tl.load(SIM + offs, mask=mask, other=0.0).to(ACC)
    t = tl.load(TARGET + offs, mask=mask, other=0.0).to(ACC)
    x = s * inv_tau
    z = tl.exp(x)
    e = tl.exp(-z)
    # z·σ(−z) is 0 where z overflowed (e = 0), not inf·0.
    damp = tl.where(e == 0.0, 0.0, z * e / (1.0 + e))
    v = _linear(x, z, 1.0 - t, tl.abs(g), tl.log(tl.abs(g))) * tl.where(g < 0.0, -1.0, 1.0) - g * damp
    v = tl.where(g == 0.0, 0.0, v) + (s - s) + (t - t)
    tl.store(OUT + offs, v.to(OUT.dtype.element_ty), mask=mask)


def _block(count: int) -> int:
    if FORCE_BLOCK is not None:
        return FORCE_BLOCK
    if _common.interpreting():
        return 64
    return 2048 if count >= 1 << 20 else 1024


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1).contiguous()


def forward(sim: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """The mean loss as a 0-dim tensor in ``sim``'s dtype (0 for empty input)."""
    count = sim.numel()
    if count == 0:
        return sim.new_zeros(())
    dtype = _common.acc_dtype(sim.dtype)
    s, t = _flat(sim), _flat(target.to(sim.dtype))
    block = _block(count)
    programs = triton.cdiv(count, block)
    partial = _common.new_output((programs,), dtype, sim.device)
    _forward_kernel[(programs,)](s, t, partial, count, 1.0 / temperature, BLOCK=block, ACC=_common.tl_dtype(dtype))
    return partial.sum().to(sim.dtype)


def backward(grad: torch.Tensor, sim: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """∂(grad · loss)/∂sim, shaped and typed like ``sim``."""
    count = sim.numel()
    if count == 0:
        return torch.zeros_like(sim)
    dtype = _common.acc_dtype(sim.dtype)
    s, t = _flat(sim), _flat(target.to(sim.dtype))
    # grad / count / τ, formed on the device (no host synchronisation).
    g = (grad.reshape(1).to(dtype) * (1.0 / temperature) / count).contiguous()
    out = _common.new_output((count,), sim.dtype, sim.device)
    block = _block(count)
    _backward_kernel[(triton.cdiv(count, block),)](g, s, t, out, count, 1.0 / temperature, BLOCK=block, ACC=_common.tl_dtype(dtype))
    return out.view(sim.shape)
