"""C3's collapse and corrupt, and the modality gap (Zhang et al., "Connect, Collapse, Corrupt:
Learning Cross-Modal Tasks with Uni-Modal Data", ICLR 2024, arXiv 2401.08567).

A contrastively trained space has a modality gap: each modality's L2-normalised embeddings sit
around their own mean, so one modality's embedding is a poor stand-in for another's. C3 closes
it in two steps, as the authors' code does (``image_captioning/src/datasets/dataset_coco.py``
and ``src/parse_data/compute_embed_means.py`` in github.com/yuhui-zh15/C3):

- **collapse**: subtract the modality's mean of L2-normalised embeddings, taken over the whole
  training set (the code sums x/‖x‖ over every caption and every image and divides by the
  count), then re-normalise;
- **corrupt**: add isotropic Gaussian noise of standard deviation σ, then re-normalise. The
  code's default noise level is √0.016 ≈ 0.126 (0.016 is the variance) and is added to the
  collapsed embedding before its one re-normalisation; :class:`mmot.nn.C3` follows that order.

These are a few elementwise operations and one mean, not a hot spot: plain torch with autograd.
The normalisation is mmot's scale-safe one (:func:`mmot.reference.unit_rows`), computed in
float32 for low-precision inputs (float64 for float64). Non-finite values are a ValueError naming
the argument (with the value checks on, outside a compiled graph, where NaN in gives NaN out).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot import _checks, reference

DEFAULT_SIGMA = 0.016**0.5


def _checking() -> bool:
    """Value checks read the data: skipped inside a compiled graph (where NaN in gives NaN out)."""
    return _checks.value_checks_enabled() and not torch.compiler.is_compiling()


def _rows(op: str, name: str, x: object) -> Tensor:
    x = _checks.float_tensor(op, name, x, min_dim=1, shape_hint="(..., D)")
    if x.shape[-1] == 0:
        raise ValueError(f"{op}: argument '{name}' must have at least one feature; got shape {tuple(x.shape)}")
    if _checking():
        _checks.finite(op, name, x)
    return x


def _unit(x: Tensor) -> Tensor:
    return reference.unit_rows(x.to(reference.compute_dtype(x.dtype)))


def _mean_vector(op: str, mean: object, x: Tensor) -> Tensor:
    mean = _checks.float_tensor(op, "mean", mean, min_dim=1, shape_hint=f"({x.shape[-1]},)")
    if mean.dim() != 1 or mean.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: argument 'mean' must have shape ({x.shape[-1]},) (one value per feature of 'x'); got {tuple(mean.shape)}")
    _checks.same_device(op, "mean", mean, x, "x")
    if _checking():
        _checks.finite(op, "mean", mean)
    return mean


def collapse(x: Tensor, mean: Tensor) -> Tensor:
    """C3's collapse: normalize(normalize(x) − mean), removing the modality's constant offset.

    Args:
        x: (..., D) float tensor, one modality's embeddings (any scale: they are normalised first).
        mean: (D,) the modality's mean of L2-normalised embeddings over the training set
            (:class:`mmot.nn.ModalityMean` accumulates it).

    Returns:
        Unit rows of x's shape and dtype. A row equal to the mean becomes 0 (the 1e-12 floor).

    Example:
        >>> image = mmot.collapse(image_embeddings, image_mean)
        >>> text = mmot.collapse(text_embeddings, text_mean)   # now comparable across modalities
    """
    op = "mmot.collapse"
    x = _rows(op, "x", x)
    mean = _mean_vector(op, mean, x)
    unit = _unit(x)
    return reference.unit_rows(unit - mean.to(unit.dtype)).to(x.dtype)


def corrupt(x: Tensor, sigma: float = DEFAULT_SIGMA, *, generator: torch.Generator | None = None) -> Tensor:
    """C3's corrupt: normalize(x + σ·ε), ε ~ N(0, I) drawn with ``generator`` on x's device.

    Args:
        x: (..., D) float tensor.
        sigma: the noise's standard deviation, ≥ 0 (C3's default √0.016 ≈ 0.126; 0 only normalises).
        generator: a torch.Generator on x's device for reproducible noise (default: torch's global one).

    Returns:
        Unit rows of x's shape and dtype; gradients flow to x.
    """
    op = "mmot.corrupt"
    x = _rows(op, "x", x)
    sigma = _checks.real_number(op, "sigma", sigma)
    if not 0.0 <= sigma < float("inf"):
        raise ValueError(f"{op}: argument 'sigma' must be a finite number >= 0; got {sigma}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: argument 'generator' must be a torch.Generator or None; got {type(generator).__name__}")
    dtype = reference.compute_dtype(x.dtype)
    noise = torch.randn(x.shape, generator=generator, dtype=dtype, device=x.device)
    return reference.unit_rows(x.to(dtype) + sigma * noise).to(x.dtype)


def modality_gap(a: Tensor, b: Tensor) -> Tensor:
    """The modality gap ‖mean(â) − mean(b̂)‖ of two sets of embeddings (â, b̂ the L2-normalised rows).

    Args:
        a: (N, D) one modality's embeddings; b: (M, D) another's (N and M may differ).

    Returns:
        A 0-dim tensor in a's dtype, accumulated in float32 (float64 for float64).
    """
    op = "mmot.modality_gap"
    a, b = _rows(op, "a", a), _rows(op, "b", b)
    for name, x in (("a", a), ("b", b)):
        if x.dim() != 2 or x.shape[0] == 0:
            raise ValueError(f"{op}: argument '{name}' must have shape (N, D) with N >= 1; got shape {tuple(x.shape)}")
    if b.shape[-1] != a.shape[-1]:
        raise ValueError(f"{op}: argument 'b' must have a's feature size {a.shape[-1]}; got {b.shape[-1]}")
    _checks.same_device(op, "b", b, a, "a")
    dtype = torch.promote_types(reference.compute_dtype(a.dtype), reference.compute_dtype(b.dtype))
    gap = _unit(a.to(dtype)).mean(0) - _unit(b.to(dtype)).mean(0)
    return torch.linalg.vector_norm(gap).to(a.dtype)
