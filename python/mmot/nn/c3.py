"""C3's modules: a streaming modality mean over a dataset, and the collapse/corrupt transform (:mod:`mmot.c3`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmot import _checks, c3, reference
from mmot.nn import _args


class ModalityMean(nn.Module):
    """The mean of one modality's L2-normalised embeddings over a dataset, built up batch by batch.

    C3 subtracts the mean over the whole training split (see :mod:`mmot.c3`). Call
    :meth:`update` on every batch of that split, then read :attr:`mean`.

    State: ``total`` is the float64 sum of the normalised rows and ``count`` is the int64 row
    count. Both are buffers, so they are saved in ``state_dict`` and move with ``.to(device)``.
    A float64 sum stays accurate to about 1e-16 relative error for any batch sizes, far past
    millions of rows. The mean divides by the count only when it is read, so uneven chunks give
    the same result as one batch. ``total`` stays float64 even when the parent model is cast
    with ``.half()``, ``.bfloat16()`` or ``.to(dtype)``: a float16 sum would overflow after
    65504 rows.

    Under ``torch.distributed``, each rank updates with its own shard. Then call
    :meth:`all_reduce` once (or sum ``total`` and ``count`` over the ranks yourself) before
    reading ``mean``.

    Example:
        >>> means = {m: mmot.nn.ModalityMean(512) for m in ("image", "text")}
        >>> for batch in train_loader:                 # the training split, once
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

    def _apply(self, fn, recurse=True):
        # Module.to(dtype)/.half() cast every floating buffer. Put the sum back in float64, cast
        # from the original (not the rounded copy), on whatever device fn chose.
        total = self.total
        module = super()._apply(fn, recurse)
        if self.total.dtype != torch.float64:
            self.total = total.to(device=self.total.device, dtype=torch.float64)
        return module

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add the L2-normalised rows of x, an (N, dim) float tensor on the buffers' device. No gradient."""
        where = "mmot.nn.ModalityMean.update"
        x = c3._rows(where, "x", x)  # a NaN would poison the running sum for good
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{where}: argument 'x' must have shape (N, {self.dim}); got shape {tuple(x.shape)}")
        if x.device != self.total.device:
            raise ValueError(
                f"{where}: argument 'x' is on {x.device} but the mean's buffers are on {self.total.device} (move the module with .to())"
            )
        self.total += reference.unit_rows(x.double()).sum(0)
        self.count += x.shape[0]

    def _mean(self, dtype: torch.dtype) -> Tensor:
        # The empty check reads the count (a host sync). Inside a compiled graph it is skipped,
        # and an empty mean is NaN (0/0).
        if not torch.compiler.is_compiling() and int(self.count) == 0:
            raise ValueError("mmot.nn.ModalityMean.mean: no rows seen yet; call update() over the dataset first")
        return (self.total / self.count).to(dtype)

    @property
    def mean(self) -> Tensor:
        """The mean so far: (dim,) float32, the float64 sum divided by the count.

        Raises ValueError if no rows have been seen. Use ``total / count`` for the float64 value.
        """
        return self._mean(torch.float32)

    def reset(self) -> None:
        """Forget every row seen (for example, before a second pass with a new encoder)."""
        self.total.zero_()
        self.count.zero_()

    @torch.no_grad()
    def all_reduce(self, process_group=None) -> None:
        """Sum ``total`` and ``count`` over the ranks of ``process_group`` (default: the world), in place.

        Call it exactly once, after every rank has updated with its shard. Every rank then holds
        the mean over the whole dataset. A second call would count every row again.
        """
        where = "mmot.nn.ModalityMean.all_reduce"
        import torch.distributed as dist

        if process_group is not None:
            _checks.process_group(where, process_group)
        elif not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"{where}: needs torch.distributed initialised (dist.init_process_group)")
        dist.all_reduce(self.total, group=process_group)
        dist.all_reduce(self.count, group=process_group)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class C3(nn.Module):
    """C3's transform of one modality's embeddings, following the authors' code (see :mod:`mmot.c3`).

    - training mode: collapse and corrupt, normalize(normalize(x) − mean + σ·ε). The noise is
      added to the mean-subtracted embedding, then the result is normalised once.
    - evaluation mode: collapse only, normalize(normalize(x) − mean), the same as
      :func:`mmot.collapse`.

    In the authors' captioning setup, the decoder trains on text passed through C3 in training
    mode with the *text* mean. At test time, images are collapsed with the *image* mean. Give
    each modality its own mean.

    Args:
        mean: the modality's (D,) mean of normalised embeddings. Either a float tensor, copied
            into the ``fixed_mean`` buffer, or a :class:`ModalityMean`, kept as a submodule and
            read at every call, so it may still be accumulating and its state is saved with this
            module's. In both cases the mean moves with ``.to(device)``. Calling with x on
            another device is a ValueError.
        sigma: the noise's standard deviation, >= 0 (default √0.016 ≈ 0.126, the authors'
            value). With 0, training mode is collapse too.

    Call: ``module(x, generator=None)`` with x (..., D). ``generator`` (a torch.Generator on x's
    device) seeds the noise in training mode. Returns unit rows in x's dtype.
    """

    def __init__(self, mean: Tensor | ModalityMean, sigma: float = c3.DEFAULT_SIGMA) -> None:
        super().__init__()
        where = "mmot.nn.C3"
        if isinstance(mean, ModalityMean):
            self.source = mean
        elif isinstance(mean, Tensor):
            mean = _checks.float_tensor(where, "mean", mean, min_dim=1, shape_hint="(D,) or a mmot.nn.ModalityMean")
            if mean.dim() != 1 or mean.shape[0] == 0:
                raise ValueError(f"{where}: argument 'mean' must have shape (D,) with D >= 1; got {tuple(mean.shape)}")
            _checks.finite(where, "mean", mean)
            self.source = None
            self.register_buffer("fixed_mean", mean.detach().clone())
        else:
            raise TypeError(f"{where}: argument 'mean' must be a tensor or a mmot.nn.ModalityMean; got {type(mean).__name__}")
        self.sigma = c3._sigma(where, sigma)

    @property
    def mean(self) -> Tensor:
        """The (D,) mean that is subtracted (float32 when read from a ModalityMean)."""
        return self.source.mean if self.source is not None else self.fixed_mean

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        where = "mmot.nn.C3"
        x = c3._rows(where, "x", x)
        # A float64 input gets the float64 running mean, not its float32 rounding.
        mean = self.source._mean(reference.compute_dtype(x.dtype)) if self.source is not None else self.fixed_mean
        shifted = c3._collapsed(where, x, mean)
        if self.training and self.sigma > 0:
            out = c3._noisy_unit(shifted, self.sigma, c3._generator(where, generator, x))
        else:
            out = reference.unit_rows(shifted)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma:.4g}"
