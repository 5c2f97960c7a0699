"""Type stubs for the Rust extension (rust/mmot-python).

Every function takes its input arrays, then its output arrays (written in place), then its
parameters, the thread count (<= 0: all cores) and, where the kernel checks values, the checks
flag. Arrays are C-contiguous numpy views sharing one float dtype (float32 or float64); index
arrays are int64. ``tests/stub_check.py`` checks these signatures against the compiled module.
"""

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "__version__",
    "sinkhorn",
    "sinkhorn_backward",
    "sinkhorn_ext_forward",
    "sinkhorn_ext_backward",
    "multi_sinkhorn",
    "multi_sinkhorn_backward",
    "multi_sinkhorn_ext_forward",
    "multi_sinkhorn_ext_backward",
    "sharded_sinkhorn",
    "sharded_sinkhorn_backward",
    "sharded_multi_sinkhorn",
    "sharded_multi_sinkhorn_backward",
    "similarity",
    "similarity_backward",
    "info_nce_forward",
    "info_nce_backward",
    "anchor_consistency_forward",
    "anchor_consistency_backward",
    "brownian_bridge_forward",
    "brownian_bridge_backward",
    "feature_separation_forward",
    "feature_separation_backward",
    "geometric_consistency_forward",
    "geometric_consistency_backward",
    "similarity_regression_forward",
    "similarity_regression_backward",
    "nt_xent_self_lse",
    "nt_xent_cross_lse",
    "nt_xent_self_grad",
    "nt_xent_cross_grad",
    "sinkhorn_implicit_backward",
    "multi_sinkhorn_implicit_backward",
]

__version__: str

def sinkhorn(
    scores: npt.NDArray[np.floating],
    row_mass: npt.NDArray[np.floating],
    col_mass: npt.NDArray[np.floating],
    out: npt.NDArray[np.floating],
    eps: float,
    n_iters: int,
    log_domain: str,
    num_threads: int,
    check_finite: bool = False,
) -> bool:
    """Sinkhorn on ``scores`` [B, N, K] into ``out``; returns whether the log domain was used."""

def sinkhorn_backward(
    grad: npt.NDArray[np.floating],
    scores: npt.NDArray[np.floating],
    row_mass: npt.NDArray[np.floating],
    col_mass: npt.NDArray[np.floating],
    out: npt.NDArray[np.floating],
    eps: float,
    n_iters: int,
    log_domain: str,
    num_threads: int,
) -> bool:
    """The gradient of ``sinkhorn`` w.r.t. ``scores`` into ``out``; returns the domain used."""

def sinkhorn_ext_forward(
    scores: npt.NDArray[np.floating],
    row_mass: npt.NDArray[np.floating],
    col_mass: npt.NDArray[np.floating],
    row_counts: npt.NDArray[np.int64],
    col_counts: npt.NDArray[np.int64],
    init_f: npt.NDArray[np.floating],
    eps_start: npt.NDArray[np.float64],
    iters: npt.NDArray[np.int64],
    plan: npt.NDArray[np.floating],
    f: npt.NDArray[np.floating],
    g: npt.NDArray[np.floating],
    err: npt.NDArray[np.floating],
    eps: float,
    decay: float,
    n_iters: int,
    tol: float,
    reach: float,
    log_domain: str,
    num_threads: int,
) -> None:
    """General Sinkhorn on a padded ragged batch ``scores`` [B, N, K] (problem b is
    ``[:row_counts[b], :col_counts[b]]``; ``eps_start`` is float64 whatever the float dtype):
    writes ``iters`` [B] (int64), ``plan`` [B, N, K] (its valid blocks only: pass it zero-filled),
    potentials ``f`` [B, N], ``g`` [B, K] and the marginal error ``err`` [B]."""

def sinkhorn_ext_backward(
    grad: npt.NDArray[np.floating],
    scores: npt.NDArray[np.floating],
    row_mass: npt.NDArray[np.floating],
    col_mass: npt.NDArray[np.floating],
    row_counts: npt.NDArray[np.int64],
    col_counts: npt.NDArray[np.int64],
    init_f: npt.NDArray[np.floating],
    eps_start: npt.NDArray[np.float64],
    iters: npt.NDArray[np.int64],
    out: npt.NDArray[np.floating],
    eps: float,
    decay: float,
    reach: float,
    log_domain: str,
    num_threads: int,
) -> None:
    """The gradient of ``sinkhorn_ext_forward``'s plan w.r.t. ``scores`` into the valid blocks of
    ``out`` (pass it zero-filled), for the unrolled iteration that ran ``iters[b]`` iterations."""

def multi_sinkhorn(
    scores: npt.NDArray[np.floating],
    anchor_mass: npt.NDArray[np.floating],
    out: npt.NDArray[np.floating],
    eps: float,
    n_iters: int,
    slot_weights: Sequence[float],
    k: int,
    normalize: str,
    log_domain: str,
    num_threads: int,
    check_values: bool = False,
) -> bool:
    """Grouped Multi-SK on ``scores`` [B, N, K] into ``out``; returns whether the log domain was used."""

def multi_sinkhorn_backward(
    grad: npt.NDArray[np.floating],
    scores: npt.NDArray[np.floating],
    anchor_mass: npt.NDArray[np.floating],
    out: npt.NDArray[np.floating],
    eps: float,
    n_iters: int,
    slot_weights: Sequence[float],
    k: int,
    normalize: str,
    log_domain: str,
    num_threads: int,
) -> bool:
    """The gradient of ``multi_sinkhorn`` w.r.t. ``scores`` into ``out``; returns the domain used."""

def multi_sinkhorn_ext_forward(
    scores: npt.NDArray[np.floating],
    row_counts: npt.NDArray[np.int64],
    col_counts: npt.NDArray[np.int64],
    counts: npt.NDArray[np.floating],
    tops: npt.NDArray[np.floating],
    target: npt.NDArray[np.floating],
    f: npt.NDArray[np.floating],
    gam: npt.NDArray[np.floating],
    h: npt.NDArray[np.floating],
    iters: npt.NDArray[np.floating],
    err: npt.NDArray[np.floating],
    weights: Sequence[float],
    eps_start: Sequence[float],
    eps: float,
    decay: float,
    n_iters: int,
    tol: float,
    normalize: str,
    log_domain: str,
    num_threads: int,
) -> None:
    """Multi-SK with options on a padded batch ``scores`` [B, N, K] (valid block ``[:row_counts[b],
    :col_counts[b]]``, groups ``counts``/``tops`` [B, G]): writes the target [B, N, K], the
    potentials ``f`` [B, G, K], ``gam`` [B, N, K], ``h`` [B, G, N], the iterations run [B] (as
    floats) and the last marginal error [B]."""

def multi_sinkhorn_ext_backward(
    grad: npt.NDArray[np.floating],
    scores: npt.NDArray[np.floating],
    row_counts: npt.NDArray[np.int64],
    col_counts: npt.NDArray[np.int64],
    counts: npt.NDArray[np.floating],
    tops: npt.NDArray[np.floating],
    iters: npt.NDArray[np.int64],
    out: npt.NDArray[np.floating],
    weights: Sequence[float],
    eps_start: Sequence[float],
    eps: float,
    decay: float,
    normalize: str,
    log_domain: str,
    num_threads: int,
) -> None:
    """The gradient of ``multi_sinkhorn_ext_forward``'s target w.r.t. ``scores`` through ``iters``
    [B] (int64) unrolled iterations, into ``out``."""

# The sharded forms (``process_group=``): this process's rows; ``shift`` [B, K] holds the column
# maxima over the group and ``reduce(array)`` replaces a 1-D array in place by its sum over the
# group (torch.distributed.all_reduce), called once per iteration by every process.

def sharded_sinkhorn(
    scores: npt.NDArray[np.floating],
    shift: npt.NDArray[np.floating],
    row_mass: npt.NDArray[np.floating],
    col_mass: npt.NDArray[np.floating],
    out: npt.NDArray[np.floating],
    eps: float,
    n_iters: int,
    log: bool,
    reduce: Callable[[npt.NDArray[np.floating]], object],
    num_threads: int,
) -> None:
    """This process's rows of Sinkhorn on ``scores`` [B, n, K] into ``out``, in the domain ``log``."""

def sharded_sinkhorn_backward(
    grad: npt.NDArray[np.floating],
    scores: npt.NDArray[np.floating],
    shift: npt.NDArray[np.floating],
    row_mass: npt.NDArray[np.floating],
    col_mass: npt.NDArray[np.floating],
    out: npt.NDArray[np.floating],
    eps: float,
    n_iters: int,
    reduce: Callable[[npt.NDArray[np.floating]], object],
    num_threads: int,
) -> None:
    """The gradient of ``sharded_sinkhorn`` w.r.t. this process's ``scores`` into ``out``."""

def sharded_multi_sinkhorn(
    scores: npt.NDArray[np.floating],
    shift: npt.NDArray[np.floating],
    anchor_mass: npt.NDArray[np.floating],
    out: npt.NDArray[np.floating],
    eps: float,
    n_iters: int,
    weights: Sequence[float],
    counts: Sequence[int],
    tops: Sequence[int],
    minmax: bool,
    log: bool,
    reduce: Callable[[npt.NDArray[np.floating]], object],
    num_threads: int,
) -> None:
    """This process's rows of grouped Multi-SK (slot groups as weights, counts, tops) into ``out``."""

def sharded_multi_sinkhorn_backward(
    grad: npt.NDArray[np.floating],
    scores: npt.NDArray[np.floating],
    shift: npt.NDArray[np.floating],
    anchor_mass: npt.NDArray[np.floating],
    out: npt.NDArray[np.floating],
    eps: float,
    n_iters: int,
    weights: Sequence[float],
    counts: Sequence[int],
    tops: Sequence[int],
    minmax: bool,
    log: bool,
    reduce: Callable[[npt.NDArray[np.floating]], object],
    num_threads: int,
) -> None:
    """The gradient of ``sharded_multi_sinkhorn`` w.r.t. this process's ``scores`` into ``out``."""

def similarity(
    x: npt.NDArray[np.floating],
    y: npt.NDArray[np.floating],
    x_index: npt.NDArray[np.int64],
    y_index: npt.NDArray[np.int64],
    out: npt.NDArray[np.floating],
    normalize: bool,
    scale: float,
    num_threads: int,
    check_finite: bool = False,
) -> None:
    """``out[o] = scale * x̂[x_index[o]] @ ŷ[y_index[o]].T`` for ``x`` [Bx, N, D], ``y`` [By, M, D]."""

def similarity_backward(
    grad: npt.NDArray[np.floating],
    x: npt.NDArray[np.floating],
    y: npt.NDArray[np.floating],
    x_index: npt.NDArray[np.int64],
    y_index: npt.NDArray[np.int64],
    gx: npt.NDArray[np.floating],
    gy: npt.NDArray[np.floating],
    normalize: bool,
    scale: float,
    num_threads: int,
) -> None:
    """The gradients of ``similarity`` into ``gx`` and ``gy``, summed over shared problems."""

def info_nce_forward(
    a: npt.NDArray[np.floating],
    b: npt.NDArray[np.floating],
    valid: npt.NDArray[np.floating],
    loss: npt.NDArray[np.floating],
    lse_a: npt.NDArray[np.floating],
    lse_b: npt.NDArray[np.floating],
    temperature: float,
    symmetric: bool,
    normalize: bool,
    num_threads: int,
    check_finite: bool = False,
) -> None:
    """Per-pair InfoNCE losses of ``a``, ``b`` [N, D] into ``loss``, and the log-sum-exps [N]."""

def info_nce_backward(
    grad: npt.NDArray[np.floating],
    a: npt.NDArray[np.floating],
    b: npt.NDArray[np.floating],
    valid: npt.NDArray[np.floating],
    lse_a: npt.NDArray[np.floating],
    lse_b: npt.NDArray[np.floating],
    grad_a: npt.NDArray[np.floating],
    grad_b: npt.NDArray[np.floating],
    temperature: float,
    symmetric: bool,
    normalize: bool,
    num_threads: int,
) -> None:
    """The gradients of ``sum(grad * loss)`` w.r.t. ``a`` and ``b`` into ``grad_a``, ``grad_b``."""

def anchor_consistency_forward(
    sim: npt.NDArray[np.floating],
    target: npt.NDArray[np.floating],
    temperature: float,
    num_threads: int,
    check_finite: bool = False,
) -> float:
    """The mean of BCE-with-logits(exp(sim / temperature), target) over the flat arrays.

    With ``check_finite``, NaN or Inf in ``sim`` or ``target`` raises ValueError.
    """

def anchor_consistency_backward(
    grad: float,
    sim: npt.NDArray[np.floating],
    target: npt.NDArray[np.floating],
    out: npt.NDArray[np.floating],
    temperature: float,
    num_threads: int,
) -> None:
    """The gradient of ``grad * anchor_consistency_forward`` w.r.t. ``sim`` into ``out``."""

def brownian_bridge_forward(
    a: npt.NDArray[np.floating],
    b: npt.NDArray[np.floating],
    mid: npt.NDArray[np.floating],
    t: npt.NDArray[np.floating],
    scale: npt.NDArray[np.floating],
    loss: npt.NDArray[np.floating],
    lse: npt.NDArray[np.floating],
    normalize: bool,
    num_threads: int,
    check_finite: bool = False,
) -> None:
    """Per-row Brownian-bridge losses of ``mid`` against ``a``→``b`` [N, D] into ``loss``, and the log-sum-exps [N]."""

def brownian_bridge_backward(
    grad: npt.NDArray[np.floating],
    a: npt.NDArray[np.floating],
    b: npt.NDArray[np.floating],
    mid: npt.NDArray[np.floating],
    t: npt.NDArray[np.floating],
    scale: npt.NDArray[np.floating],
    lse: npt.NDArray[np.floating],
    grad_a: npt.NDArray[np.floating],
    grad_b: npt.NDArray[np.floating],
    grad_mid: npt.NDArray[np.floating],
    normalize: bool,
    num_threads: int,
) -> None:
    """The gradients of ``sum(grad * loss)`` w.r.t. ``a``, ``b`` and ``mid`` into ``grad_a``, ``grad_b``, ``grad_mid``."""

def feature_separation_forward(
    shared: npt.NDArray[np.floating],
    specific: npt.NDArray[np.floating],
    loss: npt.NDArray[np.floating],
    gram: npt.NDArray[np.floating],
    normalize: bool,
    num_threads: int,
    check_finite: bool = False,
) -> None:
    """The loss ‖ŜᵀĤ‖²/N² of ``shared`` [N, D_s] and ``specific`` [N, D_h] into ``loss`` [1], and the Gram [D_s, D_h] into ``gram``."""

def feature_separation_backward(
    grad: npt.NDArray[np.floating],
    shared: npt.NDArray[np.floating],
    specific: npt.NDArray[np.floating],
    gram: npt.NDArray[np.floating],
    grad_shared: npt.NDArray[np.floating],
    grad_specific: npt.NDArray[np.floating],
    normalize: bool,
    num_threads: int,
) -> None:
    """The gradients of ``grad[0] * loss`` w.r.t. ``shared`` and ``specific`` from ``gram`` into ``grad_shared``, ``grad_specific``."""

def geometric_consistency_forward(
    a: npt.NDArray[np.floating],
    b: npt.NDArray[np.floating],
    terms: npt.NDArray[np.floating],
    grams: npt.NDArray[np.floating],
    normalize: bool,
    num_threads: int,
    check_finite: bool = False,
) -> None:
    """The sums [Σ(S − Sᵀ)², Σ(P − Q)²] of ``a``, ``b`` [N, D] into ``terms`` [2], and the Grams [3, D, D] into ``grams``."""

def geometric_consistency_backward(
    grad: npt.NDArray[np.floating],
    a: npt.NDArray[np.floating],
    b: npt.NDArray[np.floating],
    grams: npt.NDArray[np.floating],
    grad_a: npt.NDArray[np.floating],
    grad_b: npt.NDArray[np.floating],
    normalize: bool,
    num_threads: int,
) -> None:
    """The gradients of ``grad[0]·T1 + grad[1]·T2`` w.r.t. ``a`` and ``b`` from ``grams`` into ``grad_a``, ``grad_b``."""

def similarity_regression_forward(
    x: npt.NDArray[np.floating],
    present: npt.NDArray[np.uint8],
    terms: npt.NDArray[np.floating],
    match_target: float,
    nonmatch_target: float,
    margin: float,
    normalize: bool,
    num_threads: int,
    check_finite: bool = False,
) -> None:
    """The [match, non-match] means [2, M, M] of every pair of modalities of ``x`` [M, N, D]
    with the mask ``present`` [M, N] into ``terms``; a negative ``margin`` means none."""

def similarity_regression_backward(
    grad: npt.NDArray[np.floating],
    x: npt.NDArray[np.floating],
    present: npt.NDArray[np.uint8],
    grad_x: npt.NDArray[np.floating],
    match_target: float,
    nonmatch_target: float,
    margin: float,
    normalize: bool,
    num_threads: int,
) -> None:
    """The gradient of Σ grad ⊙ terms (``grad`` [2, M, M]) with respect to ``x`` into ``grad_x`` [M, N, D]."""

def nt_xent_self_lse(z: npt.NDArray[np.floating], out: npt.NDArray[np.floating], temperature: float, num_threads: int) -> None:
    """Row log-sum-exps of z zᵀ/τ without the diagonal into out (N,)."""

def nt_xent_cross_lse(
    x: npt.NDArray[np.floating],
    y: npt.NDArray[np.floating],
    rows: npt.NDArray[np.floating],
    cols: npt.NDArray[np.floating],
    temperature: float,
    num_threads: int,
) -> None:
    """Row and column log-sum-exps of x yᵀ/τ into rows and cols (N,)."""

def nt_xent_self_grad(
    z: npt.NDArray[np.floating],
    c: npt.NDArray[np.floating],
    l: npt.NDArray[np.floating],
    dz: npt.NDArray[np.floating],
    temperature: float,
    num_threads: int,
) -> None:
    """A self block's gradient (1/τ) Σ_{j≠i} (c_i e^{S_ij − l_i} + c_j e^{S_ij − l_j}) z_j into dz."""

def nt_xent_cross_grad(
    x: npt.NDArray[np.floating],
    y: npt.NDArray[np.floating],
    p: npt.NDArray[np.floating],
    lp: npt.NDArray[np.floating],
    q: npt.NDArray[np.floating],
    lq: npt.NDArray[np.floating],
    dx: npt.NDArray[np.floating],
    dy: npt.NDArray[np.floating],
    temperature: float,
    num_threads: int,
) -> None:
    """A cross block's gradients, G_ij = p_i e^{C_ij − lp_i} + q_j e^{C_ij − lq_j}, into dx and dy."""

def sinkhorn_implicit_backward(
    grad: npt.NDArray[np.floating],
    plan: npt.NDArray[np.floating],
    row_counts: npt.NDArray[np.int64],
    col_counts: npt.NDArray[np.int64],
    out: npt.NDArray[np.floating],
    iters: npt.NDArray[np.int64],
    eps: float,
    reach: float,
    num_threads: int,
) -> int:
    """Implicit gradient of converged Sinkhorn's scores into ``out``; CG counts into ``iters``; returns the largest."""

def multi_sinkhorn_implicit_backward(
    grad: npt.NDArray[np.floating],
    scores: npt.NDArray[np.floating],
    f: npt.NDArray[np.floating],
    gam: npt.NDArray[np.floating],
    h: npt.NDArray[np.floating],
    row_counts: npt.NDArray[np.int64],
    col_counts: npt.NDArray[np.int64],
    counts: npt.NDArray[np.floating],
    tops: npt.NDArray[np.floating],
    out: npt.NDArray[np.floating],
    iters: npt.NDArray[np.int64],
    weights: Sequence[float],
    eps: float,
    normalize: str,
    num_threads: int,
) -> int:
    """Implicit gradient of converged grouped Multi-SK's scores for ``grad`` = ∂L/∂T (after min-max with
    ``normalize="minmax"``) into ``out``; CG counts into ``iters``; returns the largest."""
