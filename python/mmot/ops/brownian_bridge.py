"""``mmot.brownian_bridge_loss``: the Brownian-bridge regulariser of Jiang et al. (CVPR 2023), its op and gradient.

An augmented view ``mid`` of each pair should lie on the Brownian bridge from a to b at time t.
The loss is InfoNCE of each mid row against every pair's bridge, its own being the positive. The
kernels never hold the N×N logits: the squared distance ‖m̂_i − p_ij‖² expands into two products
(m̂·â, m̂·b̂) and per-column terms, the forward keeps an online log-sum-exp over column tiles and
the backward recomputes the tiles from the saved log-sum-exps (``docs/structure_losses.md``).
"""

from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor

from mmot import _backend, _checks, _rust, reference
from mmot.ops._kernels import Kernels, triton_entry
from mmot.reverse import brownian_bridge as reverse

OP = "mmot.brownian_bridge_loss"
KERNELS = "brownian_bridge"  # mmot.kernels.brownian_bridge
REDUCTIONS = ("mean", "sum", "none")
ROWS = ("a", "b", "mid")


def brownian_bridge_loss(
    a: Tensor,
    b: Tensor,
    mid: Tensor,
    t: float | Tensor = 0.5,
    *,
    sigma: float = 1.0,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    r"""Brownian-bridge loss of N augmented views against the bridges between N pairs, without the N×N logits.

    Math: with â, b̂, m̂ the rows of a, b and mid (L2-normalised when ``normalize``; rows are
    divided by max(‖row‖, 1e-12)), a Brownian bridge from â_j to b̂_j at time t has mean
    p_ij = (1 − t_i)·â_j + t_i·b̂_j and variance σ²·t_i(1 − t_i) per coordinate. Row i's logits
    are its Gaussian log-densities up to a constant,

        ℓ[i, j] = −‖m̂_i − ((1 − t_i)·â_j + t_i·b̂_j)‖² / (2σ²·t_i(1 − t_i)),

    and its loss is InfoNCE against its own pair's bridge: loss_i = logsumexp_j ℓ[i, j] − ℓ[i, i].
    So m̂_i is pulled onto the bridge of (a_i, b_i) and pushed off every other pair's bridge.

    **Which form.** Jiang et al., "Understanding and Constructing Latent Modality Structures in
    Multi-modal Representation Learning" (CVPR 2023, arXiv 2303.05952) describe a Brownian-bridge
    loss between the modalities and their augmentations; no official code exists, and their own
    equation could not be consulted when this op was written. This is the form of issue 19: the
    softmax runs over the bridges j for each augmented row i, each row at its own time t_i.

    **t.** A float or an (N,) tensor, each value in the open interval (0, 1): at t = 0 or 1 the
    bridge has variance 0 and the logits are undefined, so those (and NaN) are a ``ValueError``
    naming 't'. Tensor values are checked with the value checks (off under
    ``mmot.set_checks(False)``; then t outside (0, 1) gives non-finite losses). t is a schedule:
    it receives no gradient (a tensor that requires grad is detached).

    **Numerics.** Accumulation is float32 (float64 for float64 inputs); the output has a's dtype.
    The squared distance is expanded into products, so each logit carries an absolute error of
    about u·(‖m̂‖² + ‖p‖²)/(2σ²t(1 − t)) (u the accumulation dtype's unit roundoff): with unit
    rows and σ = 1, t = 0.5, about 5e-7 in float32. Pass float64 inputs for σ²·t(1 − t) far
    below 1e-3. 1/(2σ²·t(1 − t)) must be finite in the accumulation dtype (a ``ValueError`` naming
    'sigma' otherwise).

    **Reductions.** ``"none"`` returns the (N,) per-row losses, ``"sum"`` their sum and ``"mean"``
    their mean (0 for N = 0), accumulated in float32 (float64 for float64).

    Memory: O(N·D) beyond the inputs. Time: with a float t (one time for every row) the bridge
    points are formed once and the forward computes one N×N×D product tile by tile, the backward
    recomputes it and makes two more; with a t per row, two products and four more. At N = 4096,
    D = 256 on a 2-core CPU, a float t runs forward + backward 2.4× faster than the materialised
    N×N torch form (``bench/RESULTS.md``).

    Args:
        a: (N, D) float tensor, one modality's embeddings (the bridge's start, t = 0).
        b: (N, D) float tensor of the same dtype and device, the other modality's (its end, t = 1).
        mid: (N, D) float tensor, the augmented views; mid[i] should lie on the bridge from a[i]
            to b[i] at time t_i.
        t: bridge time, a float or an (N,) float tensor on a's device, in (0, 1). Default 0.5.
        sigma: σ > 0, the bridge's diffusion scale. Default 1.
        normalize: L2-normalise the rows of a, b and mid first.
        reduction: "mean", "sum" or "none".
        backend: "auto", "rust", "triton" or "torch".

    Returns:
        A 0-dim tensor ("mean", "sum") or an (N,) tensor ("none") in the dtype of ``a``.
        Gradients flow to ``a``, ``b`` and ``mid``.

    Example:
        >>> import torch, mmot
        >>> image, text = torch.randn(4096, 256), torch.randn(4096, 256)
        >>> augmented = image + 0.1 * torch.randn(4096, 256)       # e.g. an augmented image's embedding
        >>> loss = mmot.brownian_bridge_loss(image, text, augmented, 0.3, sigma=0.5)
        >>> t = torch.rand(4096) * 0.8 + 0.1                         # a time per row
        >>> loss = mmot.brownian_bridge_loss(image, text, augmented, t)
    """
    a = _rows(a, "a")
    b = _rows(b, "b")
    mid = _rows(mid, "mid")
    for name, x in (("b", b), ("mid", mid)):
        if x.dtype != a.dtype:
            raise TypeError(f"{OP}: argument '{name}' must have the dtype of 'a' ({a.dtype}); got {x.dtype}")
        _checks.same_device(OP, name, x, a, "a")
        if x.shape != a.shape:
            raise ValueError(f"{OP}: argument '{name}' must have the shape of 'a' {tuple(a.shape)} (a row per pair); got {tuple(x.shape)}")
    sigma = _checks.positive_float(OP, "sigma", sigma)
    if not isinstance(normalize, bool):
        raise TypeError(f"{OP}: argument 'normalize' must be a bool; got {type(normalize).__name__}")
    reduction = _checks.choice(OP, "reduction", reduction, REDUCTIONS)
    times = _times(t, sigma, a)
    backend = _backend.resolve_backend(OP, backend, a.device, KERNELS)

    dtype = reference.compute_dtype(a.dtype)
    # One time for every row (a float or a 0-dim t): the kernels form the bridge points once.
    uniform = not isinstance(t, Tensor) or t.dim() == 0
    loss, _ = brownian_bridge_op(a, b, mid, times, reference.bridge_scale(times, sigma, dtype), normalize, uniform, backend)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum(dtype=dtype).to(a.dtype)
    # Each loss divided first, as info_nce does: no partial sum passes the mean.
    return (loss.to(dtype) / max(a.shape[0], 1)).sum().to(a.dtype)


def _rows(x: object, name: str) -> Tensor:
    x = _checks.float_tensor(OP, name, x, min_dim=2, shape_hint="(N, D)")
    if x.dim() != 2:
        raise ValueError(f"{OP}: argument '{name}' must have shape (N, D); got shape {tuple(x.shape)}")
    return x


def _times(t: object, sigma: float, a: Tensor) -> Tensor:
    """t as an (N,) detached tensor in the accumulation dtype; a float t is checked here, a
    tensor's values inside the op (with the value checks), so that compiled graphs stay whole."""
    n, dtype = a.shape[0], reference.compute_dtype(a.dtype)
    if isinstance(t, Tensor):
        if t.dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"{OP}: argument 't' must be a float or a floating tensor of shape ({n},); got dtype {t.dtype}")
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != n):
            raise ValueError(f"{OP}: argument 't' must be a float or a tensor of shape ({n},) (a time per row); got shape {tuple(t.shape)}")
        _checks.same_device(OP, "t", t, a, "a")
        return t.detach().to(dtype).expand(n).contiguous()
    if isinstance(t, bool) or not isinstance(t, Real):
        raise TypeError(f"{OP}: argument 't' must be a float in (0, 1) or a tensor of shape ({n},); got {type(t).__name__}")
    t = float(t)
    if not 0.0 < t < 1.0:  # comparisons: a SymFloat under torch.compile; NaN fails them
        raise ValueError(f"{OP}: argument 't' must be in the open interval (0, 1) (the bridge has variance 0 at its ends); got {t}")
    _scale_fits(2.0 * sigma * sigma * (t * (1.0 - t)), dtype)
    return a.new_full((n,), t, dtype=dtype)


def _scale_fits(variance: float, dtype: torch.dtype) -> None:
    """1/(2σ²t(1 − t)) must be finite in the accumulation dtype."""
    smallest = 1.0 / torch.finfo(dtype).max
    if not variance >= smallest:
        raise ValueError(
            f"{OP}: argument 'sigma' is too small: 1/(2·sigma²·t(1 − t)) must be finite in {dtype} "
            f"(2·sigma²·t(1 − t) at least {smallest:.4g}); got 2·sigma²·t(1 − t) = {variance:.4g}"
        )


def _check(backend, a, b, mid, t, scale, normalize, uniform):
    """The value checks: t in (0, 1) and a finite scale always here; the rows' finiteness where the
    Rust kernel does not check it itself (in its row-norm pass)."""
    if not _checks.value_checks_enabled() or a.shape[0] == 0:
        return
    if not bool(((t > 0) & (t < 1)).all()):
        bad = t[~((t > 0) & (t < 1))][0].item()
        raise ValueError(
            f"{OP}: argument 't' must hold values in the open interval (0, 1) (the bridge has variance 0 at its ends); got {bad}"
        )
    if not bool(torch.isfinite(scale).all()):
        worst = t[~torch.isfinite(scale)][0].item()
        raise ValueError(f"{OP}: argument 'sigma' is too small for these t: 1/(2·sigma²·t(1 − t)) overflows {scale.dtype} at t = {worst}")
    if backend != "rust":
        for name, x in zip(ROWS, (a, b, mid)):
            _checks.finite(OP, name, x)


def _forward_torch(a, b, mid, t, scale, normalize, uniform):
    dtype = reference.compute_dtype(a.dtype)
    x, y, m = a.to(dtype), b.to(dtype), mid.to(dtype)
    if normalize:
        x, y, m = reference.unit_rows(x), reference.unit_rows(y), reference.unit_rows(m)
    logits = reverse.logits(x, y, m, t.to(dtype), scale.to(dtype))
    lse = torch.logsumexp(logits, dim=1)
    return (lse - torch.diagonal(logits)).to(a.dtype), lse


def _backward_torch(grad, a, b, mid, t, scale, lse, normalize, uniform):
    # The torch backend forms every logit: one time for all rows changes nothing for it.
    return reverse.backward(grad, a, b, mid, t, scale, lse, normalize)


def _forward_rust(a, b, mid, t, scale, normalize, uniform):
    n, dtype = a.shape[0], reference.compute_dtype(a.dtype)
    loss, lse = _rust.run(
        OP,
        "brownian_bridge_forward",
        dtype,
        [a, b, mid, t, scale],
        [(n,), (n,)],
        [normalize],
        checks=_checks.value_checks_enabled(),
    )
    return loss.to(a.dtype), lse


def _backward_rust(grad, a, b, mid, t, scale, lse, normalize, uniform):
    grad_a, grad_b, grad_mid = _rust.run(
        OP,
        "brownian_bridge_backward",
        reference.compute_dtype(a.dtype),
        [grad, a, b, mid, t, scale, lse],
        [a.shape, b.shape, mid.shape],
        [normalize],
    )
    return [grad_a.to(a.dtype), grad_b.to(b.dtype), grad_mid.to(mid.dtype)]


_FORWARD = Kernels(
    torch=_forward_torch,
    rust=_forward_rust,
    triton=triton_entry(KERNELS, "forward"),
    empty=lambda a, *_: a.numel() == 0,
    check=_check,
)
_BACKWARD = Kernels(
    torch=_backward_torch,
    rust=_backward_rust,
    triton=triton_entry(KERNELS, "backward"),
    empty=lambda grad, a, *_: a.numel() == 0,
)


@torch.library.custom_op("mmot::brownian_bridge_loss", mutates_args=())
def brownian_bridge_op(
    a: Tensor, b: Tensor, mid: Tensor, t: Tensor, scale: Tensor, normalize: bool, uniform: bool, backend: str
) -> tuple[Tensor, Tensor]:
    """Per-row losses (N,) and the rows' log-sum-exps; devices without a kernel run the torch backend."""
    return _FORWARD("torch", a, b, mid, t, scale, normalize, uniform)


@brownian_bridge_op.register_kernel(("cpu", "cuda"))
def _brownian_bridge_kernel(a, b, mid, t, scale, normalize, uniform, backend):
    return _FORWARD(backend, a, b, mid, t, scale, normalize, uniform)


@brownian_bridge_op.register_fake
def _brownian_bridge_fake(a, b, mid, t, scale, normalize, uniform, backend):
    n = a.shape[0]
    return a.new_empty((n,)), a.new_empty((n,), dtype=reference.compute_dtype(a.dtype))


@torch.library.custom_op("mmot::brownian_bridge_loss_backward", mutates_args=())
def brownian_bridge_backward_op(
    grad: Tensor, a: Tensor, b: Tensor, mid: Tensor, t: Tensor, scale: Tensor, lse: Tensor, normalize: bool, uniform: bool, backend: str
) -> list[Tensor]:
    """Gradients for a, b and mid from the saved log-sum-exps; other devices run the torch backend."""
    return _BACKWARD("torch", grad, a, b, mid, t, scale, lse, normalize, uniform)


@brownian_bridge_backward_op.register_kernel(("cpu", "cuda"))
def _brownian_bridge_backward_kernel(grad, a, b, mid, t, scale, lse, normalize, uniform, backend):
    return _BACKWARD(backend, grad, a, b, mid, t, scale, lse, normalize, uniform)


@brownian_bridge_backward_op.register_fake
def _brownian_bridge_backward_fake(grad, a, b, mid, t, scale, lse, normalize, uniform, backend):
    return [torch.empty_like(a), torch.empty_like(b), torch.empty_like(mid)]


def _setup_context(ctx, inputs, output):
    a, b, mid, t, scale, normalize, uniform, backend = inputs
    _, lse = output
    ctx.save_for_backward(a, b, mid, t, scale, lse)
    ctx.params = (normalize, uniform, backend)


def _backward(ctx, grad, _grad_lse):
    a, b, mid, t, scale, lse = ctx.saved_tensors
    if grad is None:
        return None, None, None, None, None, None, None, None
    grad_a, grad_b, grad_mid = brownian_bridge_backward_op(grad.contiguous(), a, b, mid, t, scale, lse, *ctx.params)
    return grad_a, grad_b, grad_mid, None, None, None, None, None


brownian_bridge_op.register_autograd(_backward, setup_context=_setup_context)
