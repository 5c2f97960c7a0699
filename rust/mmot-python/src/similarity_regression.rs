//! `similarity_regression_forward` and `similarity_regression_backward` (see
//! `mmot_core::similarity_regression`).

use crate::arrays::{for_float_type, input, output};
use crate::run;
use mmot_core::{SimilarityRegressionInput, SimilarityRegressionParams};
use pyo3::prelude::*;

fn params(
    t: f64,
    u: f64,
    margin: f64,
    normalize: bool,
    check_finite: bool,
) -> SimilarityRegressionParams {
    SimilarityRegressionParams {
        match_target: t,
        nonmatch_target: u,
        margin: if margin < 0.0 { None } else { Some(margin) },
        normalize,
        check_finite,
    }
}

/// The [match, non-match] means of every pair of modalities of `x` (`[M, N, D]`) with the
/// presence mask `present` (`[M, N]` uint8) into `terms` (`[2, M, M]`); a negative `margin`
/// means none.
#[pyfunction]
#[pyo3(signature = (x, present, terms, match_target, nonmatch_target, margin, normalize, num_threads, check_finite=false))]
#[allow(clippy::too_many_arguments)]
fn similarity_regression_forward(
    x: &Bound<'_, PyAny>,
    present: &Bound<'_, PyAny>,
    terms: &Bound<'_, PyAny>,
    match_target: f64,
    nonmatch_target: f64,
    margin: f64,
    normalize: bool,
    num_threads: i64,
    check_finite: bool,
) -> PyResult<()> {
    let params = params(
        match_target,
        nonmatch_target,
        margin,
        normalize,
        check_finite,
    );
    let py = x.py();
    for_float_type!(x, "x", T => {
        let x = input::<T, 3>(x, "x")?;
        let [m, n, d] = x.shape();
        let present = input::<u8, 2>(present, "present")?.shaped([m, n])?;
        let mut terms = output::<T, 3>(terms, "terms")?.shaped([2, m, m])?;
        let rows = SimilarityRegressionInput { x: x.data()?, present: present.data()?, modalities: m, rows: n, features: d };
        let out = terms.data()?;
        run(py, num_threads, || mmot_core::similarity_regression_forward(rows, out, &params))
    })
}

/// The gradient of Σ grad ⊙ terms (`grad` `[2, M, M]`) with respect to `x`, into `grad_x`.
#[pyfunction]
#[pyo3(signature = (grad, x, present, grad_x, match_target, nonmatch_target, margin, normalize, num_threads))]
#[allow(clippy::too_many_arguments)]
fn similarity_regression_backward(
    grad: &Bound<'_, PyAny>,
    x: &Bound<'_, PyAny>,
    present: &Bound<'_, PyAny>,
    grad_x: &Bound<'_, PyAny>,
    match_target: f64,
    nonmatch_target: f64,
    margin: f64,
    normalize: bool,
    num_threads: i64,
) -> PyResult<()> {
    let params = params(match_target, nonmatch_target, margin, normalize, false);
    let py = x.py();
    for_float_type!(x, "x", T => {
        let x = input::<T, 3>(x, "x")?;
        let [m, n, d] = x.shape();
        let present = input::<u8, 2>(present, "present")?.shaped([m, n])?;
        let grad = input::<T, 3>(grad, "grad")?.shaped([2, m, m])?;
        let mut grad_x = output::<T, 3>(grad_x, "grad_x")?.shaped([m, n, d])?;
        let rows = SimilarityRegressionInput { x: x.data()?, present: present.data()?, modalities: m, rows: n, features: d };
        let (g, out) = (grad.data()?, grad_x.data()?);
        run(py, num_threads, || mmot_core::similarity_regression_backward(g, rows, out, &params))
    })
}

/// Adds this file's functions to `mmot._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(similarity_regression_forward, m)?)?;
    m.add_function(wrap_pyfunction!(similarity_regression_backward, m)?)?;
    Ok(())
}
