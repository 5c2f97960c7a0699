"""C3's modules: a streaming modality mean over a dataset, and the collapse/corrupt transform (:mod:`mmot.c3`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmot import c3, reference
from mmot.nn import _args


class ModalityMean(nn.Module):
    """The mean of one modality's L2-normalised embeddings over a dataset, accumulated batch by batch.

    The running sum is kept in float64 with the row count, so the mean over millions of rows is
    exact to float64 rounding whatever the batch sizes; both are buffers, so the mean is in
    ``state_dict`` and moves with ``.to(device)``. Under ``torch.distributed``, all-reduce
    ``total`` and ``count`` (sums) before reading ``mean``.

    Example:
        >>> means = {m: mmot.nn.ModalityMean(512) for m in ("image", "text")}
        >>> for batch in loader:                       # the training set, once
        ...     for m, x in encode(batch).items():
        ...         means[m].update(x)
        >>> image = mmot.collapse(image_embeddings, means["image"].mean)
    """

    total: Tensor
    count: Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = _args.int_in_range("mmot.nn.ModalityMean", "dim", dim, 1)
        self.register_buffer("total", torch.zeros(self.dim, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Adds the L2-normalised rows of x (N, dim); no gradient."""
        where = "mmot.nn.ModalityMean.update"
        x = c3._rows(where, "x", x)
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{where}: argument 'x' must have shape (N, {self.dim}); got shape {tuple(x.shape)}")
        if x.device != self.total.device:
            raise ValueError(
                f"{where}: argument 'x' is on {x.device} but the mean's buffers are on {self.total.device} (move the module with .to())"
            )
        self.total += reference.unit_rows(x.double()).sum(0)
        self.count += x.shape[0]

    @property
    def mean(self) -> Tensor:
        """The mean so far, (dim,) float32 (float64 sums divided by the count)."""
        if int(self.count) == 0:
            raise ValueError("mmot.nn.ModalityMean.mean: no rows seen yet; call update() over the dataset first")
        return (self.total / self.count).float()

    def reset(self) -> None:
        self.total.zero_()
        self.count.zero_()

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class C3(nn.Module):
    """C3's transform of one modality's embeddings: in training, collapse and corrupt,
    normalize(normalize(x) − mean + σ·ε) (the authors' order: the noise is added to the collapsed
    embedding before its one re-normalisation); in evaluation, collapse only,
    normalize(normalize(x) − mean).

    Args:
        mean: the modality's (D,) mean of normalised embeddings, a tensor (kept as a buffer) or a
            :class:`ModalityMean` (read at every call, so it may still be accumulating).
        sigma: the noise's standard deviation (default √0.016 ≈ 0.126, C3's).
    """

    def __init__(self, mean: Tensor | ModalityMean, sigma: float = c3.DEFAULT_SIGMA) -> None:
        super().__init__()
        where = "mmot.nn.C3"
        if isinstance(mean, ModalityMean):
            self.source = mean
        elif isinstance(mean, Tensor):
            if mean.dim() != 1 or not mean.dtype.is_floating_point:
                raise ValueError(
                    f"{where}: argument 'mean' must be a (D,) float tensor or a ModalityMean; got {mean.dtype} {tuple(mean.shape)}"
                )
            self.source = None
            self.register_buffer("fixed_mean", mean.detach().clone())
        else:
            raise TypeError(f"{where}: argument 'mean' must be a tensor or a mmot.nn.ModalityMean; got {type(mean).__name__}")
        sigma = _args.positive_float(where, "sigma", sigma) if sigma != 0 else 0.0
        self.sigma = sigma

    @property
    def mean(self) -> Tensor:
        return self.source.mean if self.source is not None else self.fixed_mean

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mean = self.mean.to(x.device)
        if not self.training or self.sigma == 0:
            return c3.collapse(x, mean)
        x = c3._rows("mmot.nn.C3", "x", x)
        unit = c3._unit(x)
        shifted = unit - c3._mean_vector("mmot.nn.C3", mean, x).to(unit.dtype)
        return c3.corrupt(shifted, self.sigma, generator=generator).to(x.dtype)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma:.4g}"
