"""``CoMMLoss``: CoMM's objective over the M + 1 embeddings of two augmented views."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmot import _checks
from mmot.nn import _args
from mmot.ops.nt_xent import nt_xent

_WHERE = "mmot.nn.CoMMLoss"


class CoMMLoss(nn.Module):
    r"""CoMM's loss ("What to align in multimodal contrastive learning?", ICLR 2025).

    For each of two augmentations a the fusion network gives M + 1 embeddings z_a[0..M]: z_a[i]
    for i < M sees only modality i (the others masked), z_a[M] every modality. With NCE the
    2N-way NT-Xent of :func:`mmot.nt_xent` (cosine, τ = 0.1 in CoMM), the loss is

        L = Σ_i w_i · ½ [NCE(z1[i], z2[M]) + NCE(z2[i], z1[M])] / Σ_i w_i

    over i = 0..M: each unimodal embedding of one view is pulled to the multimodal embedding of
    the other, and the two multimodal embeddings to each other (i = M). The weights w default to
    1 (the plain mean over the M + 1 terms).

    Each NCE is one fused :func:`mmot.nt_xent` call (no 2N×2N logits). The self-similarities of
    z1[M] and z2[M] enter every term and are recomputed by each call.

    Example::

        loss_fn = mmot.nn.CoMMLoss()                      # τ = 0.1
        z1 = fusion(augment(batch))                         # (M + 1, N, D): M unimodal, then fused
        z2 = fusion(augment(batch))
        loss, terms = loss_fn(z1, z2, return_terms=True)    # terms: (M + 1,) per-term losses
    """

    def __init__(self, temperature: float = 0.1, weights=None, *, backend: str = "auto") -> None:
        super().__init__()
        self.temperature = _checks.positive_float(_WHERE, "temperature", temperature)
        self.backend = _args.backend(_WHERE, backend)
        if weights is None:
            self.weights = None
        else:
            w = torch.as_tensor(weights, dtype=torch.float64)
            if w.dim() != 1 or w.numel() == 0 or not bool(torch.isfinite(w).all() & (w >= 0).all()) or float(w.sum()) <= 0:
                expected = "a non-empty 1-D sequence of finite weights >= 0, not all 0"
                raise ValueError(f"{_WHERE}: argument 'weights' must be {expected}; got {weights!r}")
            self.weights = w

    def forward(self, z1: Tensor, z2: Tensor, return_terms: bool = False):
        where = f"{_WHERE}.forward"
        z1 = _checks.float_tensor(where, "z1", z1, min_dim=3, shape_hint="(M + 1, N, D)")
        z2 = _checks.float_tensor(where, "z2", z2, min_dim=3, shape_hint="(M + 1, N, D)")
        if z1.dim() != 3 or z1.shape[0] < 2:
            raise ValueError(f"{where}: argument 'z1' must have shape (M + 1, N, D) with M >= 1; got {tuple(z1.shape)}")
        if z2.shape != z1.shape:
            raise ValueError(f"{where}: argument 'z2' must have the shape of 'z1' {tuple(z1.shape)}; got {tuple(z2.shape)}")
        if z2.dtype != z1.dtype:
            raise TypeError(f"{where}: argument 'z2' must have the dtype of 'z1' ({z1.dtype}); got {z2.dtype}")
        _checks.same_device(where, "z2", z2, z1, "z1")
        last = z1.shape[0] - 1
        if self.weights is not None and self.weights.numel() != last + 1:
            raise ValueError(f"{where}: the {self.weights.numel()} weights do not match the M + 1 = {last + 1} embeddings of 'z1'")
        tau, backend = self.temperature, self.backend
        nce = [(nt_xent(z1[i], z2[last], tau, backend=backend), nt_xent(z2[i], z1[last], tau, backend=backend)) for i in range(last + 1)]
        terms = torch.stack([0.5 * (a + b) for a, b in nce])
        w = torch.ones(last + 1, dtype=terms.dtype, device=terms.device) if self.weights is None else self.weights.to(terms)
        loss = (w * terms).sum() / w.sum()
        return (loss, terms) if return_terms else loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, weights={None if self.weights is None else self.weights.tolist()}"
