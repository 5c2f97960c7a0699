"""Modules that drop mmot's ops into a model.

- :class:`Anchors`: cosine similarity of features to L2-normalised learnable anchors;
- :class:`Sinkhorn` and :class:`MultiSinkhorn`: the assignment ops as modules;
- :class:`FeatureQueue`: a FIFO of past embeddings, without gradient;
- :class:`NormSoftmaxLoss` and :class:`CombinatorialContrastiveLoss`: the fused InfoNCE loss
  for one pair and for every pair of modalities, with pair weights and missing modalities;
- :class:`SSPCLoss`: SSPC's intra- and cross-modal anchor loss with its queue warm-up;
- :class:`ModalityMean` and :class:`C3`: C3's streaming modality mean and its collapse/corrupt transform;
- :class:`CoMMLoss`: CoMM's multimodal contrastive loss over modality-masked views (NT-Xent terms);
- :class:`FeatureSeparation`: a modality-specific head and its orthogonality loss against the shared embedding.
"""

from mmot.nn.anchors import Anchors
from mmot.nn.assignment import MultiSinkhorn, Sinkhorn
from mmot.nn.c3 import C3, ModalityMean
from mmot.nn.comm import CoMMLoss
from mmot.nn.contrastive import CombinatorialContrastiveLoss, NormSoftmaxLoss
from mmot.nn.queue import FeatureQueue
from mmot.nn.separation import FeatureSeparation
from mmot.nn.sspc import SSPCLoss

__all__ = [
    "Anchors",
    "C3",
    "CoMMLoss",
    "CombinatorialContrastiveLoss",
    "FeatureQueue",
    "FeatureSeparation",
    "ModalityMean",
    "MultiSinkhorn",
    "NormSoftmaxLoss",
    "SSPCLoss",
    "Sinkhorn",
]
