"""The structure methods on the SSPC model: one extra loss term each, and C3's collapse at evaluation.

Each term is summed over the weighted modality pairs of the contrastive loss (weights normalised
to sum 1, as :class:`mmot.nn.CombinatorialContrastiveLoss` does) and added at its own weight
(``loss.gc_weight`` ...) to the contrastive loss, or to SSPC's for the ``multi_sk+`` variants:

- ``gc``: :func:`mmot.geometric_consistency` of the two modalities' joint embeddings: their
  cross-modal similarities should be symmetric and their intra-modal structures agree;
- ``bridge``: :func:`mmot.brownian_bridge_loss` of an augmented view of each modality of the
  pair, which should lie on the Brownian bridge from that modality's embedding to the other's at
  time ``loss.bridge_t`` (both directions, averaged). The view is the model's joint embedding of
  tokens augmented as the test bed allows (``loss.bridge_augment``: jitter of every token, or
  token dropout);
- ``separation``: :func:`mmot.feature_separation_loss` of each modality's joint embedding
  against modality-specific features, which a per-modality head (:class:`mmot.nn.FeatureSeparation`)
  reads from the same pooled transformer output that the joint projection reads: the specific
  features are kept orthogonal to the shared ones.

``c3`` trains as ``contrastive``; its evaluation collapses every split's embeddings with the
training split's modality means (:func:`mmot.collapse`, means from :class:`mmot.nn.ModalityMean`),
as C3 does before using one modality's embeddings in place of another's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import mmot
from mmot.sspc.config import LossConfig


def wide(x: Tensor) -> Tensor:
    """The losses' input dtype: float64 stays (``train.dtype: float64``), the rest becomes float32 (AMP's halves)."""
    return x if x.dtype == torch.float64 else x.float()


def augment_tokens(tokens: Tensor, mask: Tensor, kind: str, strength: float) -> tuple[Tensor, Tensor]:
    """An augmented view of a batch of token sequences (B, T, D) with their validity mask (B, T),
    drawn from torch's global generator (saved in checkpoints, so a resumed run draws the same).

    ``jitter``: every token plus strength·rms(token)·N(0, I). ``dropout``: each valid token dropped
    with probability ``strength``, the first valid token of a sequence whose every token was dropped
    kept (a sequence of one token is left as it is)."""
    if kind == "jitter":
        rms = tokens.float().pow(2).mean(-1, keepdim=True).sqrt().to(tokens.dtype)
        return tokens + strength * rms * torch.randn_like(tokens), mask
    keep = mask & (torch.rand(mask.shape, device=mask.device) >= strength)
    first = mask & (mask.cumsum(-1) == 1)
    keep = keep | (first & ~keep.any(-1, keepdim=True))
    return tokens, keep


def augmented_batch(tokens: dict[str, Tensor], masks: dict[str, Tensor], kind: str, strength: float) -> tuple[dict, dict]:
    """(tokens, masks) of an augmented view of every modality (:func:`augment_tokens`)."""
    views = {m: augment_tokens(tokens[m], masks[m], kind, strength) for m in tokens}
    return {m: v[0] for m, v in views.items()}, {m: v[1] for m, v in views.items()}


class StructureTerm(nn.Module):
    """The structure term of ``cfg.structure`` over the weighted modality pairs; modules it
    needs (the separation heads) are its parameters, trained with the model's."""

    def __init__(self, cfg: LossConfig, pairs: dict[tuple[str, str], float], hidden_dim: int) -> None:
        super().__init__()
        self.kind = cfg.structure
        self.cfg = cfg
        total = sum(pairs.values())
        self.pairs = {p: w / total for p, w in pairs.items() if w > 0}
        modalities = sorted({m for p in self.pairs for m in p})
        self.heads = None
        if self.kind == "separation":
            self.heads = nn.ModuleDict({m: mmot.nn.FeatureSeparation(hidden_dim, cfg.separation_dim) for m in modalities})

    @property
    def weight(self) -> float:
        return {"gc": self.cfg.gc_weight, "bridge": self.cfg.bridge_weight, "separation": self.cfg.separation_weight}[self.kind]

    def forward(self, joint: dict[str, Tensor], hidden: dict[str, Tensor], augmented: dict[str, Tensor] | None) -> Tensor:
        """The unweighted term. ``joint``: the joint embeddings; ``hidden``: the pooled transformer
        outputs the joint projection reads; ``augmented``: joint embeddings of augmented views
        (the bridge term only)."""
        total = wide(next(iter(joint.values())).new_zeros(()))
        if self.kind == "separation":
            for m, head in self.heads.items():
                total = total + head.loss(wide(joint[m]), head(wide(hidden[m])))
            return total / len(self.heads)
        for (a, b), w in self.pairs.items():
            x, y = wide(joint[a]), wide(joint[b])
            if self.kind == "gc":
                term = mmot.geometric_consistency(x, y)
            else:
                t, sigma = self.cfg.bridge_t, self.cfg.bridge_sigma
                to_b = mmot.brownian_bridge_loss(x, y, wide(augmented[a]), t, sigma=sigma)
                to_a = mmot.brownian_bridge_loss(y, x, wide(augmented[b]), t, sigma=sigma)
                term = 0.5 * (to_b + to_a)
            total = total + w * term
        return total


@torch.no_grad()
def collapsed(embeddings: dict[str, Tensor], means: dict[str, Tensor]) -> dict[str, Tensor]:
    """C3's collapse of each modality's embeddings with its training-split mean."""
    return {m: mmot.collapse(x, means[m]) for m, x in embeddings.items()}


@torch.no_grad()
def modality_means(embeddings: dict[str, Tensor], batch: int = 4096) -> dict[str, Tensor]:
    """Per modality, the mean of the L2-normalised embeddings, streamed as over a dataset."""
    out = {}
    for m, x in embeddings.items():
        mean = mmot.nn.ModalityMean(x.shape[-1])
        for start in range(0, x.shape[0], batch):
            mean.update(x[start : start + batch])
        out[m] = mean.mean
    return out
