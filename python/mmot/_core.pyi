"""Type stubs for the Rust extension (rust/mmot-python). Arrays are C-contiguous and share one float dtype."""

import numpy as np
import numpy.typing as npt

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
) -> bool: ...
def multi_sinkhorn(
    scores: npt.NDArray[np.floating],
    anchor_mass: npt.NDArray[np.floating],
    out: npt.NDArray[np.floating],
    eps: float,
    n_iters: int,
    slot_weights: list[float],
    k: int,
    normalize: str,
    log_domain: str,
    num_threads: int,
    check_values: bool = False,
) -> bool: ...
def similarity(
    x: npt.NDArray[np.floating],
    y: npt.NDArray[np.floating],
    x_index: npt.NDArray[np.int64],
    y_index: npt.NDArray[np.int64],
    out: npt.NDArray[np.floating],
    normalize: bool,
    scale: float,
    num_threads: int,
) -> None: ...
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
) -> bool: ...
def multi_sinkhorn_backward(
    grad: npt.NDArray[np.floating],
    scores: npt.NDArray[np.floating],
    anchor_mass: npt.NDArray[np.floating],
    out: npt.NDArray[np.floating],
    eps: float,
    n_iters: int,
    slot_weights: list[float],
    k: int,
    normalize: str,
    log_domain: str,
    num_threads: int,
) -> bool: ...
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
) -> None: ...
