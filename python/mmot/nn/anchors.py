"""``Anchors``: learnable anchors scored by cosine similarity."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmot import _checks
from mmot.nn import _args
from mmot.ops.similarity import similarity

_WHERE = "mmot.nn.Anchors"


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
        dim = _args.int_in_range(_WHERE, "dim", dim, 1)
        n_anchors = _args.int_in_range(_WHERE, "n_anchors", n_anchors, 1)
        self.scale = _checks.real_number(_WHERE, "scale", scale)
        self.backend = _args.backend(_WHERE, backend)
        self.weight = nn.Parameter(torch.randn(n_anchors, dim))

    def normalized(self) -> Tensor:
        """The anchors divided by their L2 norms, (n_anchors, dim)."""
        return nn.functional.normalize(self.weight, dim=-1, eps=1e-12)

    def forward(self, x: Tensor) -> Tensor:
        dim = self.weight.shape[1]
        x = _checks.float_tensor(f"{_WHERE}.forward", "x", x, min_dim=2, shape_hint=f"(..., B, {dim})")
        if x.shape[-1] != dim:
            raise ValueError(f"{_WHERE}.forward: argument 'x' must have shape (..., B, {dim}); got {tuple(x.shape)}")
        _checks.same_device(f"{_WHERE}.forward", "x", x, self.weight, "the anchors")
        return similarity(x, self.weight.to(x.dtype), scale=self.scale, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[1]}, n_anchors={self.weight.shape[0]}"
