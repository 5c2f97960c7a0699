"""mmot: Rust- and Triton-accelerated optimal transport for PyTorch.

The ops are ``torch.library`` custom ops with autograd: Rust kernels for CPU tensors, Triton
kernels for CUDA tensors, and :mod:`mmot.reference` (pure torch) as the specification and
fallback.
"""

from mmot import nn
from mmot._checks import set_checks
from mmot.c3 import collapse, corrupt, modality_gap
from mmot.ops._sinkhorn_options import EpsSchedule, SinkhornInfo
from mmot.ops.anchor_consistency import anchor_consistency_loss
from mmot.ops.brownian_bridge import brownian_bridge_loss
from mmot.ops.feature_separation import feature_separation_loss
from mmot.ops.geometric_consistency import geometric_consistency
from mmot.ops.info_nce import info_nce
from mmot.ops.multi_info_nce import multi_info_nce
from mmot.ops.multi_sinkhorn import multi_sinkhorn
from mmot.ops.nt_xent import nt_xent
from mmot.ops.similarity import similarity
from mmot.ops.similarity_regression import pairwise_similarity_regression
from mmot.ops.sinkhorn import sinkhorn

try:
    from importlib.metadata import version as _version

    __version__ = _version("mmot")
except Exception:  # running from a source tree without installed metadata
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "EpsSchedule",
    "SinkhornInfo",
    "anchor_consistency_loss",
    "brownian_bridge_loss",
    "collapse",
    "corrupt",
    "feature_separation_loss",
    "geometric_consistency",
    "pairwise_similarity_regression",
    "info_nce",
    "modality_gap",
    "multi_info_nce",
    "multi_sinkhorn",
    "nn",
    "nt_xent",
    "set_checks",
    "similarity",
    "sinkhorn",
]
