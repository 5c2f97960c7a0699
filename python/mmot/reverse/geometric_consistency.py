"""Reverse pass of ``mmot::geometric_consistency``: the two sums' gradient through D×D products.

**Forward.** With x̂, ŷ the (normalised) rows of a and b (N×D), S = x̂ŷᵀ, P = x̂x̂ᵀ, Q = ŷŷᵀ and
ê = ŷ − x̂, write M = x̂êᵀ (N×N, never formed). Since x̂x̂ᵀ is symmetric, S − Sᵀ = M − Mᵀ and
P − Q = −(M + Mᵀ + êêᵀ). With the D×D Grams A = x̂ᵀx̂, F = x̂ᵀê, G = êᵀê and the identities
Σ_ij (U Vᵀ)_ij (U' V'ᵀ)_ij = ⟨UᵀU', VᵀV'⟩ (and, for a transposed factor, a trace):

    ‖M‖² = ⟨A, G⟩   ⟨M, Mᵀ⟩ = tr(F²)   ‖êêᵀ‖² = ‖G‖²   ⟨M, êêᵀ⟩ = ⟨Mᵀ, êêᵀ⟩ = ⟨F, G⟩

so that

    T1 = Σ (S − Sᵀ)² = 2‖M‖² − 2⟨M, Mᵀ⟩               = 2⟨A, G⟩ − 2 tr(F²)
    T2 = Σ (P − Q)²  = ‖M + Mᵀ‖² + 4⟨M, êêᵀ⟩ + ‖êêᵀ‖² = 2⟨A, G⟩ + 2 tr(F²) + 4⟨F, G⟩ + ‖G‖²

(the same as 2⟨A, B⟩ − 2tr(C²) and ‖A‖² − 2‖C‖² + ‖B‖² with B = ŷᵀŷ, C = x̂ᵀŷ, but without
their cancellation: every product here is of the size of the loss). Each is clamped at 0.

**Reverse.** Holding ê fixed, then x̂ fixed (dA = dx̂ᵀx̂ + x̂ᵀdx̂, dF = dx̂ᵀê or x̂ᵀdê, dG = dêᵀê + êᵀdê):

    ∂⟨A,G⟩/∂x̂ = 2x̂G     ∂tr(F²)/∂x̂ = 2êF     ∂⟨F,G⟩/∂x̂ = êG                  ∂‖G‖²/∂x̂ = 0
    ∂⟨A,G⟩/∂ê = 2êA     ∂tr(F²)/∂ê = 2x̂Fᵀ    ∂⟨F,G⟩/∂ê = x̂G + ê(F + Fᵀ)      ∂‖G‖²/∂ê = 4êG

With c1, c2 the cotangents of T1, T2 (0 for a term clamped to 0) this gives ∂x̂|ê = x̂M1 + êM2 and
∂ê = êN1 + x̂N2, where

    M1 = 4(c1 + c2) G                       M2 = 4(c2 − c1) F + 4c2 G
    N1 = 4(c1 + c2) A + 4c2 (G + F + Fᵀ)    N2 = 4(c2 − c1) Fᵀ + 4c2 G

and, as ê = ŷ − x̂, ∂x̂ = ∂x̂|ê − ∂ê and ∂ŷ = ∂ê: [∂x̂, ∂ŷ] = [x̂, ê] W with the 2D×2D matrix

    W = [[M1 − N2, N2], [M2 − N1, N1]]

(:func:`backward_matrix`), one N×2D by 2D×2D product: O(N·D²) time, O(D²) memory beyond the
rows. Then through the L2 normalisation as in :mod:`mmot.reverse.similarity`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot.reference import compute_dtype
from mmot.reverse.similarity import unit_rows, unit_rows_backward


def operands(a: Tensor, b: Tensor, normalize: bool) -> tuple[Tensor, Tensor, Tensor, tuple | None]:
    """(x̂, ŷ, ê = ŷ − x̂, the rows' norms or None) in the accumulation dtype."""
    dtype = compute_dtype(a.dtype)
    x, y = a.to(dtype), b.to(dtype)
    norms = None
    if normalize:
        (x, x_norm), (y, y_norm) = unit_rows(x), unit_rows(y)
        norms = (x_norm, y_norm)
    return x, y, y - x, norms


def grams(x: Tensor, e: Tensor) -> Tensor:
    """(3, D, D): [x̂ᵀx̂, x̂ᵀê, êᵀê]."""
    return torch.stack((x.T @ x, x.T @ e, e.T @ e))


def backward_matrix(grams: Tensor, c: Tensor) -> Tensor:
    """W (2D, 2D) above from the Grams [A, F, G] and the terms' cotangents c (2,)."""
    a, f, g = grams.unbind(0)
    ft = f.T
    plus, minus, two = 4.0 * (c[0] + c[1]), 4.0 * (c[1] - c[0]), 4.0 * c[1]
    m1 = plus * g
    m2 = minus * f + two * g
    n1 = plus * a + two * (g + f + ft)
    n2 = minus * ft + two * g
    return torch.cat((torch.cat((m1 - n2, n2), dim=1), torch.cat((m2 - n1, n1), dim=1)), dim=0)


def backward(c: Tensor, a: Tensor, b: Tensor, saved_grams: Tensor, normalize: bool) -> list[Tensor]:
    """[∂/∂a, ∂/∂b] of c[0]·T1 + c[1]·T2 from the forward's Grams."""
    if a.numel() == 0:
        return [torch.zeros_like(a), torch.zeros_like(b)]
    x, y, e, norms = operands(a, b, normalize)
    d = x.shape[1]
    z, w = torch.cat((x, e), dim=1), backward_matrix(saved_grams.to(x.dtype), c.to(x.dtype))
    # Two products, not views of one: the op's two outputs must not alias each other.
    grad_x, grad_y = z @ w[:, :d], z @ w[:, d:]
    if normalize:
        grad_x = unit_rows_backward(grad_x, x, norms[0])
        grad_y = unit_rows_backward(grad_y, y, norms[1])
    return [grad_x.to(a.dtype), grad_y.to(b.dtype)]
