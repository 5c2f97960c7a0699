"""``Sinkhorn`` and ``MultiSinkhorn``: the assignment ops as modules."""

from __future__ import annotations

from torch import Tensor, nn

from mmot.ops.multi_sinkhorn import multi_sinkhorn
from mmot.ops.sinkhorn import sinkhorn


class Sinkhorn(nn.Module):
    """SwAV-style Sinkhorn-Knopp as a module: ``forward(scores)`` = ``mmot.sinkhorn(scores, eps, n_iters, **options)``.

    Example: replace the hand-written loop in a SwAV / DINO head::

        class SwAVHead(nn.Module):
            def __init__(self, dim=128, n_prototypes=3000):
                super().__init__()
                self.prototypes = nn.Linear(dim, n_prototypes, bias=False)
                self.sinkhorn = mmot.nn.Sinkhorn(eps=0.05, n_iters=3)

            def forward(self, z):                          # z: (B, dim), L2-normalised
                scores = self.prototypes(z)
                with torch.no_grad():
                    q = self.sinkhorn(scores)              # (B, n_prototypes), rows sum to 1
                return scores, q
    """

    def __init__(self, eps: float = 0.05, n_iters: int = 3, **options) -> None:
        super().__init__()
        self.eps, self.n_iters, self.options = eps, n_iters, options

    def forward(self, scores: Tensor) -> Tensor:
        return sinkhorn(scores, self.eps, self.n_iters, **self.options)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, n_iters={self.n_iters}"


class MultiSinkhorn(nn.Module):
    """Multi-Assignment Sinkhorn-Knopp as a module: ``forward(scores)`` = ``mmot.multi_sinkhorn(scores, k, eps, n_iters, **options)``.

    Defaults are SSPC's (eps 0.07, 20 iterations, k = K/2, min-max targets).

    Example: soft k-hot targets for a model's anchor scores::

        msk = mmot.nn.MultiSinkhorn(k=32)
        scores = model.anchors(features)                  # (B, 64)
        with torch.no_grad():
            targets = msk(scores)                         # (B, 64) in [0, 1]
        loss = loss + mmot.anchor_consistency_loss(scores, targets)
    """

    def __init__(self, k: int | None = None, eps: float = 0.07, n_iters: int = 20, **options) -> None:
        super().__init__()
        self.k, self.eps, self.n_iters, self.options = k, eps, n_iters, options

    def forward(self, scores: Tensor) -> Tensor:
        return multi_sinkhorn(scores, self.k, self.eps, self.n_iters, **self.options)

    def extra_repr(self) -> str:
        return f"k={self.k}, eps={self.eps}, n_iters={self.n_iters}"
