"""``NormSoftmaxLoss`` and ``CombinatorialContrastiveLoss``: the fused InfoNCE loss as modules."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mmot.nn import _args
from mmot.ops.info_nce import info_nce

# SSPC's and everything_at_once's pair weights: text–video 1, anything with audio 0.1.
SSPC_PAIR_WEIGHTS = {("text", "video"): 1.0, ("text", "audio"): 0.1, ("video", "audio"): 0.1}


class NormSoftmaxLoss(nn.Module):
    """The NormSoftmax loss of everything_at_once and SSPC: ``mmot.info_nce`` as a module.

    ``forward(a, b, valid=None)`` is ``mmot.info_nce(a, b, temperature, symmetric=..., normalize=...,
    valid=valid)``: both directions' cross-entropies summed, averaged over valid pairs, never
    materialising the B×B logits.

    Example: replace a hand-written contrastive loss::

        criterion = mmot.nn.NormSoftmaxLoss(temperature=0.05)
        video_emb, text_emb = model(video, text)          # (B, D) each
        loss = criterion(video_emb, text_emb)             # was: F.cross_entropy(v @ t.T / 0.05, ...) * 2 directions
    """

    def __init__(self, temperature: float = 0.05, *, symmetric: bool = True, normalize: bool = True, backend: str = "auto") -> None:
        super().__init__()
        where = "mmot.nn.NormSoftmaxLoss"
        self.temperature = _args.positive_float(where, "temperature", temperature)
        self.symmetric = _args.flag(where, "symmetric", symmetric)
        self.normalize = _args.flag(where, "normalize", normalize)
        self.backend = _args.backend(where, backend)

    def forward(self, a: Tensor, b: Tensor, valid: Tensor | None = None) -> Tensor:
        return info_nce(a, b, self.temperature, symmetric=self.symmetric, normalize=self.normalize, valid=valid, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, symmetric={self.symmetric}, normalize={self.normalize}"


class CombinatorialContrastiveLoss(nn.Module):
    r"""The NormSoftmax loss over every weighted pair of modalities, with missing modalities.

    loss = Σ_{(m,n)} w_{m,n} · info_nce(e_m, e_n, valid = mask_m & mask_n) / Σ_{(m,n) present} w_{m,n}

    - ``pair_weights`` maps modality pairs (in either order) to weights; pairs not listed are
      not used. The default is SSPC's: text–video 1, text–audio 0.1, video–audio 0.1.
    - **Missing modalities.** ``masks`` maps a modality to an (B,) bool tensor of the samples
      that have it; a pair uses only the samples that have both (see ``mmot.info_nce``'s
      ``valid``). A modality absent from ``embeddings`` (or None) drops its pairs, and the
      weights are renormalised over the pairs that remain.
    - After each call, ``last_terms`` holds every pair's unweighted loss (detached), for logging.

    Example: everything_at_once / SSPC-style training with three modalities::

        criterion = mmot.nn.CombinatorialContrastiveLoss()     # tv 1, ta 0.1, va 0.1
        out = model(batch)                                      # {"text": (B, D), "video": ..., "audio": ...}
        loss = criterion(out, masks={"audio": batch["has_audio"]})
        loss.backward()
    """

    def __init__(
        self,
        pair_weights: Mapping[tuple[str, str], float] | None = None,
        temperature: float = 0.05,
        *,
        symmetric: bool = True,
        normalize: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        where = "mmot.nn.CombinatorialContrastiveLoss"
        given = (
            SSPC_PAIR_WEIGHTS if pair_weights is None else _args.mapping(where, "pair_weights", pair_weights, "modality pairs to weights")
        )
        self.pair_weights: dict[tuple[str, str], float] = {}
        for pair, weight in given.items():
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(m, str) for m in pair) and pair[0] != pair[1]):
                raise ValueError(
                    f"{where}: argument 'pair_weights' must map pairs of two different modality names to weights; got key {pair!r}"
                )
            if (pair[1], pair[0]) in self.pair_weights:
                raise ValueError(f"{where}: argument 'pair_weights' names the pair {pair} in both orders; give it once")
            self.pair_weights[pair] = _args.weight(where, "pair_weights", weight, pair)
        if sum(self.pair_weights.values()) <= 0:
            raise ValueError(f"{where}: argument 'pair_weights' needs at least one positive weight")
        self.loss = NormSoftmaxLoss(temperature, symmetric=symmetric, normalize=normalize, backend=backend)
        self.last_terms: dict[tuple[str, str], Tensor] = {}

    def forward(self, embeddings: Mapping[str, Tensor | None], masks: Mapping[str, Tensor] | None = None) -> Tensor:
        where = "mmot.nn.CombinatorialContrastiveLoss.forward"
        _args.mapping(where, "embeddings", embeddings, "modality names to (B, D) tensors or None")
        for name, value in embeddings.items():
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(
                    f"{where}: argument 'embeddings' must map modalities to tensors or None; got {type(value).__name__} for {name!r}"
                )
        masks = {} if masks is None else _args.mapping(where, "masks", masks, "modality names to (B,) bool tensors")
        for name, value in masks.items():
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(
                    f"{where}: argument 'masks' must map modalities to (B,) bool tensors; got {type(value).__name__} for {name!r}"
                )
        total, weight_sum, terms = None, 0.0, {}
        for (m, n), weight in self.pair_weights.items():
            a, b = embeddings.get(m), embeddings.get(n)
            if a is None or b is None:
                continue
            valid = _both(masks.get(m), masks.get(n))
            term = self.loss(a, b, valid)
            terms[(m, n)] = term.detach()
            total = weight * term if total is None else total + weight * term
            weight_sum += weight
        self.last_terms = terms
        if total is None or weight_sum == 0:
            reference = next((e for e in embeddings.values() if e is not None), None)
            if reference is None:
                raise ValueError("mmot.nn.CombinatorialContrastiveLoss: argument 'embeddings' holds no modality")
            return reference.new_zeros(())
        return total / weight_sum

    def extra_repr(self) -> str:
        return f"pair_weights={self.pair_weights}"


def _both(mask_a: Tensor | None, mask_b: Tensor | None) -> Tensor | None:
    if mask_a is None:
        return mask_b
    if mask_b is None:
        return mask_a
    return torch.logical_and(mask_a, mask_b)
