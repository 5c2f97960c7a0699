//! `sinkhorn` and `sinkhorn_backward` (see `mmot_core::sinkhorn`).

use crate::arrays::{for_float_type, input, output, to_py};
use crate::{check_iters, run};
use mmot_core::{Dims, LogDomain, SinkhornParams};
use pyo3::prelude::*;

/// SwAV-style Sinkhorn on `scores` `[B, N, K]`, written into `out`. Returns whether the log
/// domain was used.
#[pyfunction]
#[pyo3(signature = (scores, row_mass, col_mass, out, eps, n_iters, log_domain, num_threads, check_finite=false))]
fn sinkhorn(
    scores: &Bound<'_, PyAny>,
    row_mass: &Bound<'_, PyAny>,
    col_mass: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    eps: f64,
    n_iters: i64,
    log_domain: &str,
    num_threads: i64,
    check_finite: bool,
) -> PyResult<bool> {
    let params = SinkhornParams {
        check_finite,
        ..params(eps, n_iters, log_domain)?
    };
    let py = scores.py();
    for_float_type!(scores, "scores", T => {
        let scores = input::<T, 3>(scores, "scores")?;
        let [b, n, k] = scores.shape();
        let row_mass = input::<T, 2>(row_mass, "row_mass")?.shaped([b, n])?;
        let col_mass = input::<T, 2>(col_mass, "col_mass")?.shaped([b, k])?;
        let mut out = output::<T, 3>(out, "out")?.shaped([b, n, k])?;
        let (s, r, c) = (scores.data()?, row_mass.data()?, col_mass.data()?);
        let o = out.data()?;
        run(py, num_threads, || {
            mmot_core::sinkhorn(s, r, c, o, Dims::new(b, n, k), &params)
        })
    })
}

/// Vector-Jacobian product of `sinkhorn` w.r.t. `scores`: `grad` `[B, N, K]` in, `out` the
/// gradient of the scores. Returns whether the log domain was used.
#[pyfunction]
#[pyo3(signature = (grad, scores, row_mass, col_mass, out, eps, n_iters, log_domain, num_threads))]
fn sinkhorn_backward(
    grad: &Bound<'_, PyAny>,
    scores: &Bound<'_, PyAny>,
    row_mass: &Bound<'_, PyAny>,
    col_mass: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    eps: f64,
    n_iters: i64,
    log_domain: &str,
    num_threads: i64,
) -> PyResult<bool> {
    let params = params(eps, n_iters, log_domain)?;
    let py = scores.py();
    for_float_type!(scores, "scores", T => {
        let grad = input::<T, 3>(grad, "grad")?;
        let scores = input::<T, 3>(scores, "scores")?;
        let [b, n, k] = scores.shape();
        let grad = grad.shaped([b, n, k])?;
        let row_mass = input::<T, 2>(row_mass, "row_mass")?.shaped([b, n])?;
        let col_mass = input::<T, 2>(col_mass, "col_mass")?.shaped([b, k])?;
        let mut out = output::<T, 3>(out, "out")?.shaped([b, n, k])?;
        let (g, s) = (grad.data()?, scores.data()?);
        let (r, c) = (row_mass.data()?, col_mass.data()?);
        let o = out.data()?;
        run(py, num_threads, || {
            mmot_core::sinkhorn_backward(g, s, r, c, o, Dims::new(b, n, k), &params)
        })
    })
}

fn params(eps: f64, n_iters: i64, log_domain: &str) -> PyResult<SinkhornParams> {
    let log_domain: LogDomain = log_domain.parse().map_err(to_py)?;
    Ok(SinkhornParams::new(eps, check_iters(n_iters)?, log_domain))
}

/// Adds this file's functions to `mmot._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(sinkhorn, m)?)?;
    m.add_function(wrap_pyfunction!(sinkhorn_backward, m)?)?;
    Ok(())
}
