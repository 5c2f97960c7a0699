"""``mmot.nt_xent`` and CoMM's loss (``mmot.nn.CoMMLoss``): their ops and gradients.

NT-Xent over Z = [x̂; ŷ] splits into four N×N blocks: two self blocks (x̂x̂ᵀ, ŷŷᵀ, diagonal
excluded) and one cross block (x̂ŷᵀ, read by rows for x and by columns for y). Each row's loss
is a log-add-exp of two block log-sum-exps minus its positive, so the kernels compute block
primitives tile by tile and never hold an N×N (or 2N×2N) tensor. CoMM's M+1 terms all contrast
against the fused embeddings z1[M], z2[M]: their self blocks are computed once per call, in the
forward and in the backward (``docs/comm_loss.md``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmot import _backend, _checks, _rust, reference
from mmot.ops._kernels import triton_kernels
from mmot.reverse import nt_xent as torch_blocks
from mmot.reverse.similarity import unit_rows, unit_rows_backward

OP = "mmot.nt_xent"
OP_COMM = "mmot.nn.CoMMLoss"
KERNELS = "nt_xent"  # mmot.kernels.nt_xent
REDUCTIONS = ("mean", "sum", "none")


def nt_xent(
    x: Tensor,
    y: Tensor,
    temperature: float = 0.1,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    r"""SimCLR's NT-Xent (2N-way normalised-temperature cross-entropy) of N pairs, without the 2N×2N logits.

    Math: with Z = [x̂; ŷ] (2N rows; x̂, ŷ the rows of x and y divided by max(‖row‖, 1e-12)
    when ``normalize``) and S = ZZᵀ/τ, row r's positive is its partner p(r) = r ± N and its
    negatives are every other row but itself (the self-similarity is excluded exactly):

        loss_r = logsumexp_{c ≠ r} S[r, c] − S[r, p(r)]

    This is NCE(x, y) of SimCLR (Chen et al., arXiv 2002.05709) and of CoMM (Dufumier et al.,
    "What to align in multimodal contrastive learning?", ICLR 2025, arXiv 2409.07402). It is
    symmetric: NCE(x, y) = NCE(y, x). For N = 1 each row's only other logit is its partner's,
    so the loss is 0.

    **Reductions.** ``"none"`` returns the (2N,) per-row losses, the N rows of x first;
    ``"sum"`` their sum; ``"mean"`` their mean over the 2N rows (0 for N = 0).

    **Numerics.** Accumulation is float32 (float64 for float64 inputs); the output has x's dtype.

    Memory: O(N·D) beyond the inputs. Time: the forward makes three N×N×D products (two self
    blocks and the cross block, whose rows and columns come from one product), the backward
    recomputes them and makes four more.

    Args:
        x: (N, D) float tensor, one view's embeddings.
        y: (N, D) float tensor of the same dtype and device, the other view's; x[i] and y[i]
            are a positive pair.
        temperature: τ > 0. Default 0.1.
        normalize: L2-normalise the rows first (cosine similarities).
        reduction: "mean", "sum" or "none".
        backend: "auto", "rust", "triton" or "torch".

    Returns:
        A 0-dim tensor ("mean", "sum") or a (2N,) tensor ("none") in the dtype of ``x``.
        Gradients flow to ``x`` and ``y``.

    Example:
        >>> import torch, mmot
        >>> view1, view2 = torch.randn(4096, 256), torch.randn(4096, 256)
        >>> loss = mmot.nt_xent(view1, view2, 0.1)
        >>> per_row = mmot.nt_xent(view1, view2, reduction="none")   # (8192,)
    """
    x = _rows(OP, x, "x")
    y = _rows(OP, y, "y")
    _same(OP, y, "y", x, "x")
    temperature = _temperature(OP, temperature, x.dtype)
    if not isinstance(normalize, bool):
        raise TypeError(f"{OP}: argument 'normalize' must be a bool; got {type(normalize).__name__}")
    reduction = _checks.choice(OP, "reduction", reduction, REDUCTIONS)
    backend = _backend.resolve_backend(OP, backend, x.device, KERNELS)
    loss, _ = nt_xent_op(x, y, temperature, normalize, backend)
    if reduction == "none":
        return loss
    dtype = reference.compute_dtype(x.dtype)
    if reduction == "sum":
        return loss.sum(dtype=dtype).to(x.dtype)
    return (loss.to(dtype) / max(2 * x.shape[0], 1)).sum().to(x.dtype)


def _rows(op: str, x: object, name: str) -> Tensor:
    x = _checks.float_tensor(op, name, x, min_dim=2, shape_hint="(N, D)")
    if x.dim() != 2:
        raise ValueError(f"{op}: argument '{name}' must have shape (N, D); got shape {tuple(x.shape)}")
    return x


def _same(op: str, x: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{op}: argument '{name}' must have the dtype of '{ref_name}' ({ref.dtype}); got {x.dtype}")
    _checks.same_device(op, name, x, ref, ref_name)
    if x.shape != ref.shape:
        raise ValueError(f"{op}: argument '{name}' must have the shape of '{ref_name}' {tuple(ref.shape)}; got {tuple(x.shape)}")


def _temperature(op: str, temperature: object, dtype: torch.dtype) -> float:
    temperature = _checks.positive_float(op, "temperature", temperature)
    return _checks.reciprocal_fits(op, "temperature", temperature, reference.compute_dtype(dtype))


# ---- block primitives per backend ---------------------------------------------------------


class _RustBlocks:
    @staticmethod
    def self_lse(z, temperature):
        return _rust.run(OP, "nt_xent_self_lse", z.dtype, [z], [(z.shape[0],)], [temperature])[0]

    @staticmethod
    def cross_lse(x, y, temperature):
        return tuple(_rust.run(OP, "nt_xent_cross_lse", x.dtype, [x, y], [(x.shape[0],), (y.shape[0],)], [temperature]))

    @staticmethod
    def self_grad(z, c, shift, temperature):
        return _rust.run(OP, "nt_xent_self_grad", z.dtype, [z, c, shift], [z.shape], [temperature])[0]

    @staticmethod
    def cross_grad(x, y, p, lp, q, lq, temperature):
        return tuple(_rust.run(OP, "nt_xent_cross_grad", x.dtype, [x, y, p, lp, q, lq], [x.shape, y.shape], [temperature]))


class _TritonBlocks:
    @staticmethod
    def self_lse(z, temperature):
        return triton_kernels(KERNELS).self_lse(z, temperature)

    @staticmethod
    def cross_lse(x, y, temperature):
        return triton_kernels(KERNELS).cross_lse(x, y, temperature)

    @staticmethod
    def self_grad(z, c, shift, temperature):
        return triton_kernels(KERNELS).self_grad(z, c, shift, temperature)

    @staticmethod
    def cross_grad(x, y, p, lp, q, lq, temperature):
        return triton_kernels(KERNELS).cross_grad(x, y, p, lp, q, lq, temperature)


BLOCKS = {"torch": torch_blocks, "rust": _RustBlocks, "triton": _TritonBlocks}


def _chosen(backend: str, z: Tensor) -> str:
    """Empty problems run the torch backend; so does a Triton call whose rows are too wide."""
    if z.numel() == 0:
        return "torch"
    if backend == "triton" and not triton_kernels(KERNELS).fits(z.shape[-1]):
        return "torch"
    return backend


# ---- the composition, shared by every backend ----------------------------------------------
#
# z1, z2: (T, N, D), T = M + 1, anchors A = z1[M], B = z2[M]. NCE (t, k) contrasts x = (z1[t],
# z2[t])[k] with y = (B, A)[k]; NCE (M, 1) equals NCE (M, 0) with its halves swapped, so only
# (M, 0) is computed. Rows of a loss or LSE tensor (T, 2, 2N): x's N rows, then y's.


def _normalised(z: Tensor, normalize: bool) -> tuple[Tensor, Tensor | None]:
    z = z.to(reference.compute_dtype(z.dtype))
    if not normalize:
        return z, None
    u, norm = unit_rows(z)
    return u, norm


def _check_finite(op: str, z1: Tensor, z2: Tensor, names: tuple[str, str], lse: Tensor) -> None:
    """The value check, after the forward: a NaN or Inf input makes some row's log-sum-exp
    non-finite, so the inputs are scanned (to name the argument) only when one is."""
    if _checks.value_checks_enabled() and not bool(torch.isfinite(lse).all()):
        for name, z in zip(names, (z1, z2)):
            _checks.finite(op, name, z)


def forward(backend: str, z1: Tensor, z2: Tensor, temperature: float, normalize: bool) -> tuple[Tensor, Tensor]:
    """(per-row losses, per-row log-sum-exps), each (T, 2, 2N) in the accumulation dtype."""
    t_count, n = z1.shape[0], z1.shape[1]
    dtype = reference.compute_dtype(z1.dtype)
    loss = z1.new_zeros((t_count, 2, 2 * n), dtype=dtype)
    lse = z1.new_zeros((t_count, 2, 2 * n), dtype=dtype)
    if z1.numel() == 0:
        return loss, lse
    blocks = BLOCKS[_chosen(backend, z1)]
    u1, _ = _normalised(z1, normalize)
    u2, _ = _normalised(z2, normalize)
    m = t_count - 1
    anchors = (u2[m], u1[m])  # y of NCE (t, 0) and (t, 1)
    anchor_self = [blocks.self_lse(a, temperature) for a in anchors]  # once per call
    for t in range(t_count):
        for k in (0, 1) if t < m else (0,):
            x, y = (u1[t], u2[t])[k], anchors[k]
            x_self = anchor_self[1] if t == m else blocks.self_lse(x, temperature)
            rows, cols = blocks.cross_lse(x, y, temperature)
            lx = torch.logaddexp(rows, x_self)
            ly = torch.logaddexp(anchor_self[k], cols)
            positive = (x * y).sum(-1) / temperature
            loss[t, k] = torch.cat((lx - positive, ly - positive))
            lse[t, k] = torch.cat((lx, ly))
    loss[m, 1] = loss[m, 0].roll(n)
    lse[m, 1] = lse[m, 0].roll(n)
    return loss, lse


def _combine(pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(ĉ, shift) with Σ_t g_t e^{−L_t} = ĉ e^{−shift}: shift = min_t L_t, so every e^{S − shift} ≤ 1."""
    shift = torch.stack([lse for _, lse in pairs]).amin(0)
    c = sum(g * torch.exp(shift - lse) for g, lse in pairs)
    return c, shift


def backward(backend: str, grad: Tensor, z1: Tensor, z2: Tensor, lse: Tensor, temperature: float, normalize: bool) -> list[Tensor]:
    """[∂/∂z1, ∂/∂z2] of Σ grad · loss for grad (T, 2, 2N)."""
    if z1.numel() == 0:
        return [torch.zeros_like(z1), torch.zeros_like(z2)]
    t_count, n = z1.shape[0], z1.shape[1]
    m = t_count - 1
    blocks = BLOCKS[_chosen(backend, z1)]
    u1, norm1 = _normalised(z1, normalize)
    u2, norm2 = _normalised(z2, normalize)
    g = grad.to(u1.dtype).clone()
    g[m, 0] += g[m, 1].roll(n)
    lse = lse.to(u1.dtype)
    d = (torch.zeros_like(u1), torch.zeros_like(u2))
    anchors = (u2[m], u1[m])
    anchor_d = (d[1][m], d[0][m])
    # The anchors' self blocks: coefficients from every NCE that reads them, one pass each.
    anchor_terms: tuple[list, list] = ([], [])
    for t in range(t_count):
        for k in (0, 1) if t < m else (0,):
            x, y = (u1[t], u2[t])[k], anchors[k]
            gx, gy = g[t, k, :n], g[t, k, n:]
            lx, ly = lse[t, k, :n], lse[t, k, n:]
            dx, dy = blocks.cross_grad(x, y, gx, lx, gy, ly, temperature)
            both = (gx + gy)[:, None] / temperature
            dx = dx - both * y
            dy = dy - both * x
            dst_x = d[k][t]
            dst_x += dx
            anchor_d[k].add_(dy)
            anchor_terms[k].append((gy, ly))
            if t == m:
                anchor_terms[1].append((gx, lx))
            else:
                dst_x += blocks.self_grad(x, gx, lx, temperature)
    for k in (0, 1):
        c, shift = _combine(anchor_terms[k])
        anchor_d[k].add_(blocks.self_grad(anchors[k], c, shift, temperature))
    d1, d2 = d
    if normalize:
        d1, d2 = unit_rows_backward(d1, u1, norm1), unit_rows_backward(d2, u2, norm2)
    return [d1.to(z1.dtype), d2.to(z2.dtype)]


# ---- mmot::nt_xent ------------------------------------------------------------------------


@torch.library.custom_op("mmot::nt_xent", mutates_args=())
def nt_xent_op(x: Tensor, y: Tensor, temperature: float, normalize: bool, backend: str) -> tuple[Tensor, Tensor]:
    """Per-row losses (2N,) in x's dtype and the rows' log-sum-exps (2N,); other devices run the torch backend."""
    return _nt_xent_forward("torch", x, y, temperature, normalize)


def _nt_xent_forward(backend, x, y, temperature, normalize):
    loss, lse = forward(backend, x[None], y[None], temperature, normalize)
    _check_finite(OP, x, y, ("x", "y"), lse)
    return loss[0, 0].to(x.dtype), lse[0, 0]


@nt_xent_op.register_kernel(("cpu", "cuda"))
def _nt_xent_kernel(x, y, temperature, normalize, backend):
    return _nt_xent_forward(backend, x, y, temperature, normalize)


@nt_xent_op.register_fake
def _nt_xent_fake(x, y, temperature, normalize, backend):
    n = x.shape[0]
    return x.new_empty((2 * n,)), x.new_empty((2 * n,), dtype=reference.compute_dtype(x.dtype))


@torch.library.custom_op("mmot::nt_xent_backward", mutates_args=())
def nt_xent_backward_op(grad: Tensor, x: Tensor, y: Tensor, lse: Tensor, temperature: float, normalize: bool, backend: str) -> list[Tensor]:
    """Gradients for x and y from the saved log-sum-exps; other devices run the torch backend."""
    return _nt_xent_backward("torch", grad, x, y, lse, temperature, normalize)


def _nt_xent_backward(backend, grad, x, y, lse, temperature, normalize):
    full = torch.stack((grad, torch.zeros_like(grad)))[None]
    lse = torch.stack((lse, lse.roll(x.shape[0])))[None]
    dx, dy = backward(backend, full, x[None], y[None], lse, temperature, normalize)
    return [dx[0], dy[0]]


@nt_xent_backward_op.register_kernel(("cpu", "cuda"))
def _nt_xent_backward_kernel(grad, x, y, lse, temperature, normalize, backend):
    return _nt_xent_backward(backend, grad, x, y, lse, temperature, normalize)


@nt_xent_backward_op.register_fake
def _nt_xent_backward_fake(grad, x, y, lse, temperature, normalize, backend):
    return [torch.empty_like(x), torch.empty_like(y)]


def _nt_xent_setup(ctx, inputs, output):
    x, y, temperature, normalize, backend = inputs
    ctx.save_for_backward(x, y, output[1])
    ctx.params = (temperature, normalize, backend)


def _nt_xent_grad(ctx, grad, _grad_lse):
    x, y, lse = ctx.saved_tensors
    if grad is None:
        return None, None, None, None, None
    dx, dy = nt_xent_backward_op(grad.contiguous(), x, y, lse, *ctx.params)
    return dx, dy, None, None, None


nt_xent_op.register_autograd(_nt_xent_grad, setup_context=_nt_xent_setup)


# ---- mmot::comm_loss ----------------------------------------------------------------------


@torch.library.custom_op("mmot::comm_loss", mutates_args=())
def comm_loss_op(z1: Tensor, z2: Tensor, temperature: float, normalize: bool, backend: str) -> tuple[Tensor, Tensor]:
    """Per-row losses and log-sum-exps (M+1, 2, 2N) of CoMM's NCEs, in the accumulation dtype."""
    return _comm_forward("torch", z1, z2, temperature, normalize)


def _comm_forward(backend, z1, z2, temperature, normalize):
    loss, lse = forward(backend, z1, z2, temperature, normalize)
    _check_finite(OP_COMM, z1, z2, ("z1", "z2"), lse)
    return loss, lse


@comm_loss_op.register_kernel(("cpu", "cuda"))
def _comm_kernel(z1, z2, temperature, normalize, backend):
    return _comm_forward(backend, z1, z2, temperature, normalize)


@comm_loss_op.register_fake
def _comm_fake(z1, z2, temperature, normalize, backend):
    shape = (z1.shape[0], 2, 2 * z1.shape[1])
    dtype = reference.compute_dtype(z1.dtype)
    return z1.new_empty(shape, dtype=dtype), z1.new_empty(shape, dtype=dtype)


@torch.library.custom_op("mmot::comm_loss_backward", mutates_args=())
def comm_loss_backward_op(
    grad: Tensor, z1: Tensor, z2: Tensor, lse: Tensor, temperature: float, normalize: bool, backend: str
) -> list[Tensor]:
    """Gradients for z1 and z2 from the saved log-sum-exps; other devices run the torch backend."""
    return backward("torch", grad, z1, z2, lse, temperature, normalize)


@comm_loss_backward_op.register_kernel(("cpu", "cuda"))
def _comm_backward_kernel(grad, z1, z2, lse, temperature, normalize, backend):
    return backward(backend, grad, z1, z2, lse, temperature, normalize)


@comm_loss_backward_op.register_fake
def _comm_backward_fake(grad, z1, z2, lse, temperature, normalize, backend):
    return [torch.empty_like(z1), torch.empty_like(z2)]


def _comm_setup(ctx, inputs, output):
    z1, z2, temperature, normalize, backend = inputs
    ctx.save_for_backward(z1, z2, output[1])
    ctx.params = (temperature, normalize, backend)


def _comm_grad(ctx, grad, _grad_lse):
    z1, z2, lse = ctx.saved_tensors
    if grad is None:
        return None, None, None, None, None
    d1, d2 = comm_loss_backward_op(grad.contiguous(), z1, z2, lse, *ctx.params)
    return d1, d2, None, None, None


comm_loss_op.register_autograd(_comm_grad, setup_context=_comm_setup)
