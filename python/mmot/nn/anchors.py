"""``Anchors``: learnable anchors scored by cosine similarity."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmot.ops.similarity import similarity


class Anchors(nn.Module):
    r"""``n_anchors`` learnable anchors in a ``dim``-dimensional space.

    ``forward(x)`` returns the cosine similarities x̂ Âᵀ of the rows of x (..., B, dim) with
    the L2-normalised anchors, shape (..., B, n_anchors), through :func:`mmot.similarity`
    (no normalised copies are written). Gradients reach both x and the anchors.

    Example: give an existing encoder SSPC-style anchors and Multi-SK targets::

        class Encoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.backbone = nn.Linear(512, 256)
                self.anchors = mmot.nn.Anchors(256, 64)

            def forward(self, x):
                z = self.backbone(x)
                return z, self.anchors(z)            # embeddings and (B, 64) anchor scores

        z, scores = Encoder()(torch.randn(32, 512))
        with torch.no_grad():
            targets = mmot.multi_sinkhorn(scores, k=32)
        loss = mmot.anchor_consistency_loss(scores, targets)
    """

    def __init__(self, dim: int, n_anchors: int, *, scale: float = 1.0, backend: str = "auto") -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"mmot.nn.Anchors: argument 'dim' must be an int >= 1; got {dim!r}")
        if isinstance(n_anchors, bool) or not isinstance(n_anchors, int) or n_anchors < 1:
            raise ValueError(f"mmot.nn.Anchors: argument 'n_anchors' must be an int >= 1; got {n_anchors!r}")
        self.weight = nn.Parameter(torch.randn(n_anchors, dim))
        self.scale = float(scale)
        self.backend = backend

    def normalized(self) -> Tensor:
        """The anchors divided by their L2 norms, (n_anchors, dim)."""
        return nn.functional.normalize(self.weight, dim=-1, eps=1e-12)

    def forward(self, x: Tensor) -> Tensor:
        return similarity(x, self.weight.to(x.dtype), scale=self.scale, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[1]}, n_anchors={self.weight.shape[0]}"
