"""Triton kernels of ``mmot::anchor_consistency_loss``: one elementwise pass plus a reduction.

With z = exp(sim / τ) > 0 and the detached target t, each entry's BCE-with-logits is

    softplus(z) − t·z = (1 − t)·z + log(1 + e^{−z})

which never forms e^{z} (the softplus form). Where (1 − t)·z overflows (z = e^x beyond the
dtype, x = sim/τ) it is recomputed as ±e^{x + log|1 − t|}, and it is 0 at t = 1 exactly, so the
terms are finite wherever the exact ones are. The loss is the mean over all entries; its gradient

    ∂loss/∂sim = grad / count · ((1 − t)·z − z·σ(−z)) / τ,        σ(z) = 1 / (1 + e^{−z}),

is formed as that product where it and its factors are normal numbers, and otherwise as
±e^{x + log|c| + log|b|} (c = grad/(count·τ), b = (1 − t) − σ(−z), log|b| = −softplus(z) for
t = 1), so it is lost neither where e^x underflows nor where e^x overflows. NaN or ±inf in sim
or target gives NaN (x − x is added: e^{−inf} = 0 alone would hide a −inf).

forward   one program per BLOCK entries writes its partial sum of term/count; the partials are added by torch
          in a fixed order (deterministic, no atomics, no host synchronisation).
backward  one program per BLOCK entries; the upstream gradient divided by count·τ, its log
          magnitude and its sign are read from device memory (a device tensor: no host
          synchronisation).

1/τ reaches the kernels as a ``tl.float64`` parameter (the convention of ``_common``).

Accumulation is float32, or float64 for float64 inputs; bf16/fp16 are loaded and cast.
"""

from __future__ import annotations

import math

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
def _backward_kernel(GRAD, SIM, TARGET, OUT, COUNT, inv_tau: tl.float64, tiny: tl.float64, BLOCK: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    inv_tau = scalar(inv_tau, ACC)
    tiny = scalar(tiny, ACC)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < COUNT
    # c = grad/(count·τ), log|c| from its parts and the sign of grad (c may under- or overflow).
    c = tl.load(GRAD).to(ACC)
    log_c = tl.load(GRAD + 1).to(ACC)
    sign_c = tl.load(GRAD + 2).to(ACC)
    s = tl.load(SIM + offs, mask=mask, other=0.0).to(ACC)
    t = tl.load(TARGET + offs, mask=mask, other=0.0).to(ACC)
    x = s * inv_tau
    z = tl.exp(x)
    e = tl.exp(-z)
    one_minus = 1.0 - t
    b = one_minus - e / (1.0 + e)
    direct = c * (z * b)
    # The product where it and its factors are normal numbers, else ±e^{x + log|c| + log|b|}
    # with log|b| = −softplus(z) for t = 1 (b = −σ(−z) underflows there first).
    size = tl.abs(direct)
    normal = (size >= tiny) & (size < float("inf")) & (z >= tiny) & ((one_minus != 0.0) | (e >= tiny))
    log_b = tl.where(one_minus == 0.0, -(z + tl.log(1.0 + e)), tl.log(tl.abs(b)))
    sign_b = tl.where((one_minus == 0.0) | (b < 0.0), -1.0, 1.0)
    far = sign_c * sign_b * tl.exp(x + log_c + log_b)
    # No gradient where b = 0 (or t = 1 with z = inf): e^{x − inf} would be NaN at x = +inf.
    far = tl.where(log_b == float("-inf"), 0.0, far)
    v = tl.where(normal, direct, far)
    v = tl.where(sign_c == 0.0, 0.0, v) + (s - s) + (t - t)
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
    # grad/(count·τ), its log magnitude from the parts and its sign, formed on the device (no
    # host synchronisation).
    g = grad.reshape(1).to(dtype)
    log_c = torch.log(g.abs()) - (math.log(count) + math.log(temperature))
    g = torch.cat([g * (1.0 / temperature) / count, log_c, torch.sign(g)]).contiguous()
    out = _common.new_output((count,), sim.dtype, sim.device)
    # float64 at 2048 entries a program spills registers on sm_80/sm_90 (python -m mmot.aot).
    block = min(_block(count), 1024) if dtype == torch.float64 else _block(count)
    _backward_kernel[(triton.cdiv(count, block),)](
        g, s, t, out, count, 1.0 / temperature, torch.finfo(dtype).tiny, BLOCK=block, ACC=_common.tl_dtype(dtype)
    )
    return out.view(sim.shape)
