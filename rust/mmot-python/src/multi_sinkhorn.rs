//! `multi_sinkhorn` and `multi_sinkhorn_backward` (see `mmot_core::multi_sinkhorn`).

use crate::arrays::{for_float_type, input, output, to_py};
use crate::{check_iters, run};
use mmot_core::{Dims, LogDomain, MultiSinkhornParams, Normalize};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Grouped Multi-Assignment Sinkhorn-Knopp on `scores` `[B, N, K]`, written into `out`.
/// Returns whether the log domain was used.
#[pyfunction]
#[pyo3(signature = (scores, anchor_mass, out, eps, n_iters, slot_weights, k, normalize, log_domain, num_threads, check_values=false))]
fn multi_sinkhorn(
    scores: &Bound<'_, PyAny>,
    anchor_mass: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    eps: f64,
    n_iters: i64,
    slot_weights: Vec<f64>,
    k: i64,
    normalize: &str,
    log_domain: &str,
    num_threads: i64,
    check_values: bool,
) -> PyResult<bool> {
    let params = MultiSinkhornParams {
        check_values,
        ..params(eps, n_iters, slot_weights, k, normalize, log_domain)?
    };
    let py = scores.py();
    for_float_type!(scores, "scores", T => {
        let scores = input::<T, 3>(scores, "scores")?;
        let [b, n, kk] = scores.shape();
        let anchor_mass = input::<T, 2>(anchor_mass, "anchor_mass")?.shaped([b, kk])?;
        let mut out = output::<T, 3>(out, "out")?.shaped([b, n, kk])?;
        let (s, r, o) = (scores.data()?, anchor_mass.data()?, out.data()?);
        run(py, num_threads, || {
            mmot_core::multi_sinkhorn(s, r, o, Dims::new(b, n, kk), &params)
        })
    })
}

/// Vector-Jacobian product of `multi_sinkhorn` w.r.t. `scores` (through the min-max step).
/// Returns whether the log domain was used.
#[pyfunction]
#[pyo3(signature = (grad, scores, anchor_mass, out, eps, n_iters, slot_weights, k, normalize, log_domain, num_threads))]
fn multi_sinkhorn_backward(
    grad: &Bound<'_, PyAny>,
    scores: &Bound<'_, PyAny>,
    anchor_mass: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    eps: f64,
    n_iters: i64,
    slot_weights: Vec<f64>,
    k: i64,
    normalize: &str,
    log_domain: &str,
    num_threads: i64,
) -> PyResult<bool> {
    let params = params(eps, n_iters, slot_weights, k, normalize, log_domain)?;
    let py = scores.py();
    for_float_type!(scores, "scores", T => {
        let grad = input::<T, 3>(grad, "grad")?;
        let scores = input::<T, 3>(scores, "scores")?;
        let [b, n, kk] = scores.shape();
        let grad = grad.shaped([b, n, kk])?;
        let anchor_mass = input::<T, 2>(anchor_mass, "anchor_mass")?.shaped([b, kk])?;
        let mut out = output::<T, 3>(out, "out")?.shaped([b, n, kk])?;
        let (g, s, r) = (grad.data()?, scores.data()?, anchor_mass.data()?);
        let o = out.data()?;
        run(py, num_threads, || {
            mmot_core::multi_sinkhorn_backward(g, s, r, o, Dims::new(b, n, kk), &params)
        })
    })
}

/// The parameters both functions share (`check_values` off).
fn params(
    eps: f64,
    n_iters: i64,
    slot_weights: Vec<f64>,
    k: i64,
    normalize: &str,
    log_domain: &str,
) -> PyResult<MultiSinkhornParams> {
    Ok(MultiSinkhornParams {
        eps,
        n_iters: check_iters(n_iters)?,
        slot_weights,
        k: usize::try_from(k)
            .map_err(|_| PyValueError::new_err(format!("k must be >= 1, got {k}")))?,
        normalize: normalize.parse::<Normalize>().map_err(to_py)?,
        log_domain: log_domain.parse::<LogDomain>().map_err(to_py)?,
        check_values: false,
    })
}

/// Adds this file's functions to `mmot._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(multi_sinkhorn, m)?)?;
    m.add_function(wrap_pyfunction!(multi_sinkhorn_backward, m)?)?;
    Ok(())
}
