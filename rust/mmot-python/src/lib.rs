//! `mmot._core`: thin PyO3 bindings over `mmot-core`.
//!
//! The Python layer (`mmot.ops`) resolves defaults, checks values, makes inputs contiguous and
//! allocates outputs with torch; this layer only borrows the numpy views, checks shapes and
//! dtypes, releases the GIL and runs the kernel on the extension's own thread pool, stopping it
//! early on Ctrl-C. Every
//! function takes its input arrays, then its output arrays, then its parameters, the thread
//! count and (where the kernel checks values) the checks flag; `python/mmot/_core.pyi` states
//! the signatures and `tests/stub_check.py` holds the two together.

mod anchor_consistency;
mod arrays;
mod brownian_bridge;
mod feature_separation;
mod geometric_consistency;
mod implicit;
mod info_nce;
mod interrupt;
mod multi_sinkhorn;
mod multi_sinkhorn_ext;
mod nt_xent;
mod pool;
mod sharded_sinkhorn;
mod similarity;
mod similarity_regression;
mod sinkhorn;
mod sinkhorn_ext;

use arrays::to_py;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Runs `kernel` on the extension's pool for `num_threads`, with the GIL released; Ctrl-C
/// stops it (see `interrupt`).
fn run<R: Send>(
    py: Python<'_>,
    num_threads: i64,
    kernel: impl FnOnce() -> mmot_core::Result<R> + Send,
) -> PyResult<R> {
    let pool = pool::get(num_threads)?;
    interrupt::run(py, &pool, kernel)?.map_err(to_py)
}

fn check_iters(n_iters: i64) -> PyResult<usize> {
    if n_iters < 1 {
        return Err(PyValueError::new_err(format!(
            "n_iters must be >= 1, got {n_iters}"
        )));
    }
    Ok(n_iters as usize)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    sinkhorn::register(m)?;
    sinkhorn_ext::register(m)?;
    sharded_sinkhorn::register(m)?;
    multi_sinkhorn::register(m)?;
    multi_sinkhorn_ext::register(m)?;
    similarity::register(m)?;
    info_nce::register(m)?;
    anchor_consistency::register(m)?;
    brownian_bridge::register(m)?;
    feature_separation::register(m)?;
    geometric_consistency::register(m)?;
    similarity_regression::register(m)?;
    nt_xent::register(m)?;
    implicit::register(m)?;
    Ok(())
}
