"""C3's collapse and corrupt, and the modality gap (Zhang et al., "Connect, Collapse, Corrupt:
Learning Cross-Modal Tasks with Uni-Modal Data", ICLR 2024, arXiv 2401.08567).

In a contrastively trained space, each modality's L2-normalised embeddings cluster around
their own mean, so an embedding from one modality is a poor stand-in for another's. C3 fixes
this in two steps. The behaviour below was checked against the authors' code
(github.com/yuhui-zh15/C3):

- **the mean**: the average of the *normalised* embeddings over the whole training split. Each
  embedding is divided by its norm, the results are summed and then divided by the count, once
  per modality (``image_captioning/src/parse_data/compute_embed_means.py``,
  ``image_generation/compute_embed_mean.py``).
- **collapse**: normalise, subtract that modality's mean, and normalise again. This is what the
  captioning test path does to image embeddings (``get_item_per_image`` in
  ``image_captioning/src/datasets/dataset_coco.py``).
- **corrupt**: add isotropic Gaussian noise and normalise. The default noise level is
  ``math.sqrt(0.016)`` ≈ 0.126, which is a *standard deviation*: it multiplies ``torch.randn``,
  so 0.016 is the variance (``--noise_level`` in ``image_captioning/run.py``; ``noise_level``
  in ``image_generation/train.py``).
- **order in training**: normalise, subtract the mean, add the noise, then normalise *once*.
  There is no re-normalisation between collapsing and corrupting (``__getitem__`` in
  ``dataset_coco.py``). The image-generation code has an optional extra normalisation
  (``norm_after_remove_mean``, default off, not set by ``scripts/train_c3.sh``).
  :class:`mmot.nn.C3` follows the default.

These are a few elementwise passes and one mean, so they are not a hot spot. They are written in
plain torch with autograd. Normalisation uses mmot's scale-safe rule
(:func:`mmot.reference.unit_rows`) and runs in float32 for low-precision inputs (float64 for
float64). With the value checks on and outside a compiled graph, a non-finite input raises a
ValueError that names the argument. Inside a compiled graph, NaN in gives NaN out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot import _checks, reference

DEFAULT_SIGMA = 0.016**0.5  # the authors' default standard deviation (0.016 is the variance)


def _checking() -> bool:
    """Value checks read the data: skipped inside a compiled graph."""
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


def _sigma(op: str, sigma: object) -> float:
    sigma = _checks.real_number(op, "sigma", sigma)
    if not sigma >= 0.0:
        raise ValueError(f"{op}: argument 'sigma' must be a finite number >= 0; got {sigma}")
    return sigma


def _generator(op: str, generator: object, x: Tensor) -> torch.Generator | None:
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: argument 'generator' must be a torch.Generator or None; got {type(generator).__name__}")
    # torch.randn would fail with a message that names neither the op nor the argument.
    where = generator.device
    index = where.index if where.index is not None or where.type != "cuda" else torch.cuda.current_device()
    if where.type != x.device.type or (where.type == "cuda" and index != x.device.index):
        raise ValueError(f"{op}: argument 'generator' must be on x's device ({x.device}); got a generator on {generator.device}")
    return generator


def _collapsed(op: str, x: Tensor, mean: object) -> Tensor:
    """normalize(x) − mean in the compute dtype, before the final normalisation."""
    mean = _mean_vector(op, mean, x)
    unit = _unit(x)
    return unit - mean.to(unit.dtype)


def _noisy_unit(x: Tensor, sigma: float, generator: torch.Generator | None) -> Tensor:
    # Noise is drawn in the compute dtype (float32 for bf16/fp16) so that a seed gives the same
    # ε whatever the input's precision, and the sum is not rounded to 8 bits before normalising.
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return reference.unit_rows(x + sigma * noise)


def collapse(x: Tensor, mean: Tensor) -> Tensor:
    """C3's collapse: normalize(normalize(x) − mean), removing the modality's constant offset.

    Args:
        x: (..., D) float tensor of one modality's embeddings, at any scale (rows are normalised first).
        mean: (D,) that modality's mean of L2-normalised embeddings over the training set
            (:class:`mmot.nn.ModalityMean` accumulates it), on x's device, in any float dtype.

    Returns:
        Unit rows with x's shape and dtype. A row equal to the mean becomes 0 (the 1e-12 floor).

    Example:
        >>> image = mmot.collapse(image_embeddings, image_mean)
        >>> text = mmot.collapse(text_embeddings, text_mean)   # now comparable across modalities
    """
    op = "mmot.collapse"
    x = _rows(op, "x", x)
    return reference.unit_rows(_collapsed(op, x, mean)).to(x.dtype)


def corrupt(x: Tensor, sigma: float = DEFAULT_SIGMA, *, generator: torch.Generator | None = None) -> Tensor:
    """C3's corrupt: normalize(x + σ·ε), where ε ~ N(0, I) has x's shape.

    Args:
        x: (..., D) float tensor.
        sigma: the noise's standard deviation, >= 0. The default √0.016 ≈ 0.126 is the authors'.
            With 0, corrupt only normalises.
        generator: a torch.Generator on x's device, for reproducible noise (default: torch's
            global generator). ε is drawn in float32 for bf16/fp16 inputs (float64 for
            float64), so one seed gives the same noise at every precision.

    Returns:
        Unit rows with x's shape and dtype. Gradients flow to x (the noise is a constant).

    Note:
        :class:`mmot.nn.C3` applies the authors' training transform in one call:
        normalize(normalize(x) − mean + σ·ε). That equals ``corrupt(normalize(x) − mean)`` and is
        *not* ``corrupt(collapse(x, mean))``, which would re-normalise twice.
    """
    op = "mmot.corrupt"
    x = _rows(op, "x", x)
    sigma = _sigma(op, sigma)
    generator = _generator(op, generator, x)
    return _noisy_unit(x.to(reference.compute_dtype(x.dtype)), sigma, generator).to(x.dtype)


def modality_gap(a: Tensor, b: Tensor) -> Tensor:
    """The modality gap ‖mean(â) − mean(b̂)‖ between two sets of embeddings (â, b̂: the L2-normalised rows).

    This is the distance between the two modalities' centroids on the unit sphere, the quantity
    that collapse drives towards 0. For paired rows it equals the norm of the mean paired
    difference mean(â − b̂). The authors' notebook (``geometry_analysis/analyze_gap.ipynb``)
    histograms that difference over groups of 100 pairs.

    Args:
        a: (N, D) one modality's embeddings. b: (M, D) another's. N and M may differ; both are >= 1.

    Returns:
        A 0-dim tensor in the promoted dtype of a and b. It is accumulated in float32, or in
        float64 when either input is float64.
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
    return torch.linalg.vector_norm(gap).to(torch.promote_types(a.dtype, b.dtype))
