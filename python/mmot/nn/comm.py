"""``CoMMLoss``: the multimodal contrastive loss of CoMM (Dufumier et al., ICLR 2025)."""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor, nn

from mmot import _backend, _checks, reference
from mmot.nn import _args
from mmot.ops import nt_xent as ops

_WHERE = "mmot.nn.CoMMLoss"


class CoMMLoss(nn.Module):
    r"""CoMM's loss over M modality-masked views and the all-modality view, without any N×N logits.

    Math: z1 and z2 are (M+1, N, D) embeddings of two augmentations of a batch; z1[i] and
    z2[i] for i < M are the fused embeddings with only modality i present, z1[M] and z2[M]
    those with every modality. With NCE the mean NT-Xent of :func:`mmot.nt_xent` (cosine
    similarities, τ = ``temperature``), CoMM's term i is

        term_i = ½ [NCE(z1[i], z2[M]) + NCE(z2[i], z1[M])]      (i = 0, …, M)

    (term M is NCE(z1[M], z2[M])), and the loss is 1/(M+1) · Σ_i w_i term_i, the mean of the
    terms with the default weights, as in the authors' code (Dufumier et al., "What to align in multimodal contrastive
    learning?", ICLR 2025, arXiv 2409.07402).

    Every term contrasts against z1[M] or z2[M]: the self-similarity blocks of those two are
    computed once per call, in the forward and in the backward, whatever M is
    (``docs/comm_loss.md``). Memory O((M+1)·N·D); the forward makes 4M + 3 N×N×D products.

    Args:
        temperature: τ > 0. Default 0.1.
        weights: M+1 finite weights ≥ 0 (a sequence or 1-D tensor), or
            None for all ones. Its length fixes M+1.
        backend: "auto", "rust", "triton" or "torch".

    Example::

        loss_fn = mmot.nn.CoMMLoss(temperature=0.1)
        z1 = torch.randn(3, 256, 128, requires_grad=True)   # M = 2 masked views + the full one
        z2 = torch.randn(3, 256, 128, requires_grad=True)
        loss = loss_fn(z1, z2)
        loss, terms = loss_fn(z1, z2, return_terms=True)   # terms: (3,)
    """

    def __init__(self, temperature: float = 0.1, weights=None, *, backend: str = "auto") -> None:
        super().__init__()
        self.temperature = _checks.positive_float(_WHERE, "temperature", temperature)
        self.backend = _args.backend(_WHERE, backend)
        self.weights = None if weights is None else _weights(weights)

    def forward(self, z1: Tensor, z2: Tensor, return_terms: bool = False):
        """The loss (0-dim, z1's dtype), and with ``return_terms`` also the (M+1,) terms."""
        where = f"{_WHERE}.forward"
        z1 = _views(where, z1, "z1")
        z2 = _views(where, z2, "z2")
        if z2.dtype != z1.dtype:
            raise TypeError(f"{where}: argument 'z2' must have the dtype of 'z1' ({z1.dtype}); got {z2.dtype}")
        _checks.same_device(where, "z2", z2, z1, "z1")
        if z2.shape != z1.shape:
            raise ValueError(f"{where}: argument 'z2' must have the shape of 'z1' {tuple(z1.shape)}; got {tuple(z2.shape)}")
        if not isinstance(return_terms, bool):
            raise TypeError(f"{where}: argument 'return_terms' must be a bool; got {type(return_terms).__name__}")
        terms_count = z1.shape[0]
        if self.weights is not None and len(self.weights) != terms_count:
            raise ValueError(
                f"{where}: argument 'z1' must have {len(self.weights)} views (M+1, as many as the weights); got shape {tuple(z1.shape)}"
            )
        temperature = _checks.reciprocal_fits(_WHERE, "temperature", self.temperature, reference.compute_dtype(z1.dtype))
        backend = _backend.resolve_backend(_WHERE, self.backend, z1.device, ops.KERNELS)
        rows, _ = ops.comm_loss_op(z1, z2, temperature, True, backend)
        dtype = rows.dtype
        n = max(z1.shape[1], 1)
        # term_t = ½ (mean over 2N rows of NCE (t, 0) + the same of NCE (t, 1)); each row divided first.
        terms = (rows / (4 * n)).sum((1, 2))
        w = torch.ones(terms_count, dtype=dtype) if self.weights is None else torch.tensor(self.weights, dtype=dtype)
        w = (w / terms_count).to(z1.device)
        loss = (terms * w).sum().to(z1.dtype)
        return (loss, terms.to(z1.dtype)) if return_terms else loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, weights={self.weights}"


def _views(where: str, z: object, name: str) -> Tensor:
    z = _checks.float_tensor(where, name, z, min_dim=3, shape_hint="(M+1, N, D)")
    if z.dim() != 3:
        raise ValueError(f"{where}: argument '{name}' must have shape (M+1, N, D); got shape {tuple(z.shape)}")
    if z.shape[0] < 1:
        raise ValueError(f"{where}: argument '{name}' must hold at least one view (M+1 ≥ 1); got shape {tuple(z.shape)}")
    return z


def _weights(weights: object) -> tuple[float, ...]:
    if isinstance(weights, Tensor):
        if weights.dim() != 1:
            raise ValueError(f"{_WHERE}: argument 'weights' must be 1-D (M+1 values); got shape {tuple(weights.shape)}")
        weights = weights.detach().cpu().tolist()
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__iter__"):
        raise TypeError(f"{_WHERE}: argument 'weights' must be a sequence of M+1 weights or None; got {type(weights).__name__}")
    values = []
    for k, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, Real):
            raise TypeError(f"{_WHERE}: argument 'weights' must hold real numbers; got {type(w).__name__} at {k}")
        w = float(w)
        if not 0 <= w < math.inf:
            raise ValueError(f"{_WHERE}: argument 'weights' must hold finite values >= 0; got {w} at {k}")
        values.append(w)
    if not values:
        raise ValueError(f"{_WHERE}: argument 'weights' must hold M+1 >= 1 values; got none")
    return tuple(values)
