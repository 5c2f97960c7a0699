"""``FeatureSeparation``: a modality-specific head trained apart from the shared embedding."""

from __future__ import annotations

from torch import Tensor, nn

from mmot import _checks
from mmot.nn import _args
from mmot.ops.feature_separation import feature_separation_loss

_WHERE = "mmot.nn.FeatureSeparation"


class FeatureSeparation(nn.Module):
    r"""A learned linear head (with bias) from ``dim`` features to ``specific_dim`` modality-specific ones.

    It sits next to the shared (joint) embedding computed from the same encoder output:
    ``forward(x)`` maps the (N, dim) encoder features to (N, specific_dim) modality-specific
    features, ``self.proj(x)``, and :meth:`loss` returns
    :func:`mmot.feature_separation_loss` of the shared embedding and those features, which is
    small when the two carry uncorrelated directions (the "deep feature separation" of Jiang et
    al., CVPR 2023; see the op for the form). Gradients reach the projection and, through the
    shared embedding, the encoder.

    Example::

        encoder = nn.Linear(512, 256)
        joint = nn.Linear(256, 128)                       # the shared embedding head
        separation = mmot.nn.FeatureSeparation(256, 64)   # the modality-specific head

        features = encoder(torch.randn(32, 512))
        shared, specific = joint(features), separation(features)
        loss = contrastive_loss(shared, other_modality) + 0.1 * separation.loss(shared, specific)
    """

    def __init__(self, dim: int, specific_dim: int, *, normalize: bool = True, backend: str = "auto") -> None:
        super().__init__()
        dim = _args.int_in_range(_WHERE, "dim", dim, 1)
        specific_dim = _args.int_in_range(_WHERE, "specific_dim", specific_dim, 1)
        self.normalize = _args.flag(_WHERE, "normalize", normalize)
        self.backend = _args.backend(_WHERE, backend)
        self.proj = nn.Linear(dim, specific_dim)

    def forward(self, x: Tensor) -> Tensor:
        """The modality-specific features (N, specific_dim) of encoder features x (N, dim)."""
        dim = self.proj.in_features
        x = _args.rows(f"{_WHERE}.forward", "x", x, dim)
        _checks.same_device(f"{_WHERE}.forward", "x", x, self.proj.weight, "the projection")
        return self.proj(x)

    def loss(self, shared: Tensor, specific: Tensor) -> Tensor:
        """:func:`mmot.feature_separation_loss` of the shared embedding (N, D_s) and ``specific``
        (N, specific_dim), normally this module's output for the same samples."""
        specific = _args.rows(f"{_WHERE}.loss", "specific", specific, self.proj.out_features)
        return feature_separation_loss(shared, specific, normalize=self.normalize, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.proj.in_features}, specific_dim={self.proj.out_features}"
