"""Reverse pass of ``mmot::sinkhorn``: the adjoint of the unrolled Sinkhorn-Knopp iteration.

The plain and log domains of :func:`mmot.reference.sinkhorn` compute the same function, so one
stable log-potential form serves both. With L = scores/eps, row potentials a, column
potentials b (a_0 = 0) and masses r (rows), c (columns), iteration t = 1..T is

    b_t = log c − LSE_n (L + a_{t−1}),    a_t = log r − LSE_k (L + b_t),    P = exp(L + a_T + b_T).

The forward is re-run keeping a_t and b_t (O(T·(N+K))). With the plans after the row and
the column step of iteration t, P_t = exp(L + a_t + b_t) = r·softmax_k(L + b_t) and
Q_t = exp(L + a_{t−1} + b_t) = c·softmax_n(L + a_{t−1}), the reverse sweep is

    X = Ḡ ⊙ P;  ā_T = Σ_k X;  L̄ = X − ā_T P_T / r;  b̄_T = Σ_n L̄
    for t = T..1:  Y = −b̄_t Q_t / c;  L̄ += Y;  and for t > 1:
                   ā_{t−1} = Σ_k Y;  Z = −ā_{t−1} P_{t−1} / r;  L̄ += Z;  b̄_{t−1} = Σ_n Z
    ∂scores = L̄ / eps

(see ``docs/gradients.md``). The plans are taken as softmaxes, not as exp(L + a + b): they then
sum to their masses to rounding, which the cancellations in L̄ need when |L| is large (at
eps = 1e-3 in float32, exp of the summed potentials loses about half of the gradient). L is
centred per column and floored as in the forward (:func:`mmot.reference.centered_logits`), and
as there only b_t (near 0) is formed: P_t / r = softmax_k(L + b_t), Q_1 / c = softmax_n(L) and
Q_t / c = P_{t−1} / Σ_n P_{t−1}, b_{t+1} = b_t + log c − log Σ_n P_t.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot.reference import centered_logits, logit_floor, poison_non_finite, working_dtype


def backward(grad: Tensor, scores: Tensor, eps: float, n_iters: int, row_mass: Tensor, col_mass: Tensor, log_domain: str) -> Tensor:
    """∂loss/∂scores (..., N, K) for ∂loss/∂P = grad; ``log_domain`` does not change the function."""
    if scores.numel() == 0:
        return torch.zeros_like(scores)
    dtype = working_dtype(scores, eps, 1.0)  # as the forward's
    # As in the forward: centred per column and floored; floored entries pass no gradient.
    logits = centered_logits(scores.to(dtype), eps)
    r = row_mass.to(dtype).unsqueeze(-1)
    c = col_mass.to(dtype).unsqueeze(-2)
    log_c = torch.log(c)

    # As in the forward, only the column potentials b_t (near 0) are formed; P_t / r is a row
    # softmax of L + b_t, and Q_t / c = P_{t−1} / Σ_n P_{t−1} (Q_1 / c a column softmax of L).
    col_pot = [None, log_c - torch.logsumexp(logits, dim=-2, keepdim=True)]  # b_1 .. b_T
    row_plans = [None]  # P_1 / r .. P_T / r
    for t in range(1, n_iters + 1):
        row_plans.append(torch.softmax(logits + col_pot[t], dim=-1))
        if t < n_iters:
            col_pot.append(col_pot[t] + log_c - torch.log((row_plans[t] * r).sum(-2, keepdim=True)))

    def col_plan(t: int) -> Tensor:  # Q_t / c
        if t == 1:
            return torch.softmax(logits, dim=-2)
        plan = row_plans[t - 1] * r
        return plan / plan.sum(-2, keepdim=True)

    row_softmax = row_plans[n_iters]  # P_T / r
    x = grad.to(dtype) * r * row_softmax
    grad_logits = x - x.sum(-1, keepdim=True) * row_softmax
    col_bar = grad_logits.sum(-2, keepdim=True)
    for t in range(n_iters, 0, -1):
        y = -col_bar * col_plan(t)  # −b̄_t Q_t / c
        grad_logits += y
        if t > 1:
            z = -y.sum(-1, keepdim=True) * row_plans[t - 1]  # −ā_{t−1} P_{t−1} / r
            grad_logits += z
            col_bar = z.sum(-2, keepdim=True)
    grad_logits = torch.where(logits > logit_floor(dtype), grad_logits, 0.0)
    return poison_non_finite(grad_logits / eps, scores).to(scores.dtype)
