"""Reverse pass of ``mmot::multi_sinkhorn``: the adjoint of grouped Multi-SK and its min-max step.

Slots are grouped by equal weight (:func:`mmot.reference.slot_groups`): group G has weight
w_G, c_G slots and top_G of the last k slots. The plain and log domains of the reference are
the same function, so one stable log form serves both. With lE_G = w_G·scores/eps and
log-potentials φ_G (anchors), γ (samples × anchors), ψ_G (samples), γ_0 = ψ_{G,0} = 0,
iteration t = 1..T is

    φ_{G,t} = log r − LSE_n (lE_G + γ_{t−1} + ψ_{G,t−1})
    γ_t     = −LSE_G (log c_G + lE_G + φ_{G,t} + ψ_{G,t−1})
    ψ_{G,t} = −LSE_a (lE_G + γ_t + φ_{G,t})
    T       = Σ_G top_G C_{G,T},    C_{G,t} = exp(lE_G + γ_t + φ_{G,t} + ψ_{G,t}).

The forward is re-run keeping φ_{G,t} and ψ_{G,t}; γ_t is recomputed from them. With the
plans after each step, taken as softmaxes so that they sum to their masses to rounding,

    A_{G,t} = exp(lE_G + γ_{t−1} + ψ_{G,t−1} + φ_{G,t}) = r·softmax_n(lE_G + γ_{t−1} + ψ_{G,t−1})
    c_G B_{G,t} = softmax_G(log c_G + lE_G + φ_{G,t} + ψ_{G,t−1})
    C_{G,t} = softmax_a(lE_G + γ_t + φ_{G,t})

and T̄ the cotangent of T after the min-max VJP, the reverse sweep is

    X_G = top_G T̄ ⊙ C_{G,T}:  lĒ_G = X_G, γ̄_T = Σ_G X_G, φ̄_{G,T} = Σ_n X_G, ψ̄_{G,T} = Σ_a X_G
    for t = T..1:
        Y_G = −ψ̄_{G,t} C_{G,t}        γ̄_t += Σ_G Y_G,  φ̄_{G,t} += Σ_n Y_G
        Z_G = −γ̄_t c_G B_{G,t}        φ̄_{G,t} += Σ_n Z_G,  ψ̄_{G,t−1} = Σ_a Z_G
        W_G = −φ̄_{G,t} A_{G,t} / r    γ̄_{t−1} = Σ_G W_G,  ψ̄_{G,t−1} += Σ_a W_G
        lĒ_G += X_G (t = T) + Y_G + Z_G + W_G
    ∂scores = Σ_G w_G lĒ_G / eps

Min-max: y = (T − lo)/(hi − lo) per row gives T̄ = ȳ/s − Σ_a ȳ(1 − y)/s · ∂lo − Σ_a ȳ y/s · ∂hi
with s = hi − lo, where ∂lo and ∂hi share 1 equally among the entries that attain the row's
min and max (as torch.amin/amax do); constant rows (within rounding, see
:func:`mmot.reference.constant_rows`) give 0 and zero gradient. Logits are centred per column
and floored as in the forward (:func:`mmot.reference.centered_logits`). See
``docs/gradients.md``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmot.reference import centered_logits, constant_rows, logit_floor, poison_non_finite, slot_groups, working_dtype


def backward(
    grad: Tensor,
    scores: Tensor,
    eps: float,
    n_iters: int,
    slot_weights: list[float],
    k: int,
    anchor_mass: Tensor,
    normalize: str,
    log_domain: str,
) -> Tensor:
    """∂loss/∂scores (..., N, K) for ∂loss/∂T = grad; ``log_domain`` does not change the function."""
    if scores.numel() == 0:
        return torch.zeros_like(scores)
    groups = slot_groups(slot_weights, k)
    dtype = working_dtype(scores, eps, max(w for w, _, _ in groups), "mmot.multi_sinkhorn")  # as the forward's
    # Groups stack along a new leading dim: every group-indexed tensor is (G, ..., N or 1, K or 1).
    group_shape = (len(groups),) + (1,) * scores.dim()

    def per_group(values: list[float]) -> Tensor:
        return torch.tensor(values, dtype=dtype, device=scores.device).view(group_shape)

    weight = per_group([w for w, _, _ in groups])
    log_count = per_group([math.log(count) for _, count, _ in groups])
    top = per_group([float(in_top) for _, _, in_top in groups])
    # As in the forward: centred per column and floored; floored entries pass no gradient.
    logits = torch.stack([centered_logits(scores.to(dtype), eps, weight=w) for w, _, _ in groups])
    r = anchor_mass.to(dtype).unsqueeze(-2)
    log_r = torch.log(r)

    def sample_pot(t: int) -> Tensor:
        """γ_t, recomputed from the saved φ_{G,t} and ψ_{G,t−1}."""
        if t == 0:
            return torch.zeros_like(logits[0])
        return -torch.logsumexp(log_count + logits + anchor_pot[t] + row_pot[t - 1], dim=0)

    anchor_pot: list[Tensor] = [logits.new_zeros(())]  # φ_{G,t}; index 0 unused
    row_pot = [logits.new_zeros(logits.shape[:-1] + (1,))]  # ψ_{G,0} .. ψ_{G,T−1}: ψ_{G,T} enters no plan
    gamma = sample_pot(0)
    for t in range(1, n_iters + 1):
        anchor_pot.append(log_r - torch.logsumexp(logits + gamma + row_pot[t - 1], dim=-2, keepdim=True))
        gamma = sample_pot(t)
        if t < n_iters:
            row_pot.append(-torch.logsumexp(logits + gamma + anchor_pot[t], dim=-1, keepdim=True))

    # Each plan is the softmax that its normaliser defines, so it sums to its mass to rounding.
    plan = torch.softmax(logits + gamma + anchor_pot[-1], dim=-1)  # C_{G,T}
    target_bar = grad.to(dtype)
    if normalize == "minmax":
        target_bar = _minmax_backward(target_bar, (top * plan).sum(0))
    grad_logits = top * target_bar * plan  # X_G
    gamma_bar = grad_logits.sum(0)
    anchor_bar = grad_logits.sum(-2, keepdim=True)
    row_bar = grad_logits.sum(-1, keepdim=True)
    for t in range(n_iters, 0, -1):
        if t < n_iters:
            plan = torch.softmax(logits + gamma + anchor_pot[t], dim=-1)
        y = -row_bar * plan  # Y_G
        gamma_bar = gamma_bar + y.sum(0)
        z = -gamma_bar * torch.softmax(log_count + logits + anchor_pot[t] + row_pot[t - 1], dim=0)  # Z_G
        anchor_bar = anchor_bar + (y + z).sum(-2, keepdim=True)
        gamma = sample_pot(t - 1)
        w = -anchor_bar * torch.softmax(logits + gamma + row_pot[t - 1], dim=-2)  # W_G = −φ̄ A / r
        grad_logits += y + z + w
        gamma_bar = w.sum(0)
        row_bar = (z + w).sum(-1, keepdim=True)
        anchor_bar = torch.zeros_like(anchor_bar)  # φ_{G,t−1} feeds iteration t−1 only
    grad_logits = torch.where(logits > logit_floor(dtype), grad_logits, 0.0)
    return poison_non_finite((weight * grad_logits).sum(0) / eps, scores).to(scores.dtype)


def _minmax_backward(grad: Tensor, target: Tensor) -> Tensor:
    """VJP of :func:`mmot.reference.minmax_rows` at ``target``."""
    low = target.amin(-1, keepdim=True)
    high = target.amax(-1, keepdim=True)
    nonzero = ~constant_rows(low, high)
    spread = torch.where(nonzero, high - low, torch.ones_like(high))
    scaled_grad = torch.where(nonzero, grad, torch.zeros_like(grad)) / spread
    scaled = (target - low) / spread
    high_bar = -(scaled_grad * scaled).sum(-1, keepdim=True)
    low_bar = -scaled_grad.sum(-1, keepdim=True) - high_bar
    at_low = (target == low).to(grad.dtype)
    at_high = (target == high).to(grad.dtype)
    return scaled_grad + low_bar * at_low / at_low.sum(-1, keepdim=True) + high_bar * at_high / at_high.sum(-1, keepdim=True)
