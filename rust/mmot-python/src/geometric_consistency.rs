//! `geometric_consistency_forward` and `geometric_consistency_backward` (see
//! `mmot_core::geometric_consistency`).

use crate::arrays::{for_float_type, input, output};
use crate::run;
use mmot_core::{GeometricConsistencyInput, GeometricConsistencyParams};
use pyo3::prelude::*;

/// The two geometric-consistency sums of the pairs (`a`, `b`: `[N, D]` each) into `terms`
/// (`[2]`), and the Grams x̂ᵀx̂, x̂ᵀ(ŷ − x̂), (ŷ − x̂)ᵀ(ŷ − x̂) into `grams` (`[3, D, D]`).
#[pyfunction]
#[pyo3(signature = (a, b, terms, grams, normalize, num_threads, check_finite=false))]
fn geometric_consistency_forward(
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    terms: &Bound<'_, PyAny>,
    grams: &Bound<'_, PyAny>,
    normalize: bool,
    num_threads: i64,
    check_finite: bool,
) -> PyResult<()> {
    let params = GeometricConsistencyParams {
        normalize,
        check_finite,
    };
    let py = a.py();
    for_float_type!(a, "a", T => {
        let a = input::<T, 2>(a, "a")?;
        let [n, d] = a.shape();
        let b = input::<T, 2>(b, "b")?.shaped([n, d])?;
        let mut terms = output::<T, 1>(terms, "terms")?.shaped([2])?;
        let mut grams = output::<T, 3>(grams, "grams")?.shaped([3, d, d])?;
        let rows = GeometricConsistencyInput {
            a: a.data()?,
            b: b.data()?,
            rows: n,
            features: d,
        };
        let (t, g) = (terms.data()?, grams.data()?);
        run(py, num_threads, || mmot_core::geometric_consistency_forward(rows, t, g, &params))
    })
}

/// Gradients of grad[0]·T1 + grad[1]·T2 with respect to `a` and `b` from the forward's
/// `grams`, written into `grad_a` and `grad_b`.
#[pyfunction]
#[pyo3(signature = (grad, a, b, grams, grad_a, grad_b, normalize, num_threads))]
fn geometric_consistency_backward(
    grad: &Bound<'_, PyAny>,
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    grams: &Bound<'_, PyAny>,
    grad_a: &Bound<'_, PyAny>,
    grad_b: &Bound<'_, PyAny>,
    normalize: bool,
    num_threads: i64,
) -> PyResult<()> {
    let params = GeometricConsistencyParams {
        normalize,
        check_finite: false,
    };
    let py = a.py();
    for_float_type!(a, "a", T => {
        let a = input::<T, 2>(a, "a")?;
        let [n, d] = a.shape();
        let b = input::<T, 2>(b, "b")?.shaped([n, d])?;
        let grad = input::<T, 1>(grad, "grad")?.shaped([2])?;
        let grams = input::<T, 3>(grams, "grams")?.shaped([3, d, d])?;
        let mut grad_a = output::<T, 2>(grad_a, "grad_a")?.shaped([n, d])?;
        let mut grad_b = output::<T, 2>(grad_b, "grad_b")?.shaped([n, d])?;
        let rows = GeometricConsistencyInput {
            a: a.data()?,
            b: b.data()?,
            rows: n,
            features: d,
        };
        let (g, s) = (grad.data()?, grams.data()?);
        let (ga, gb) = (grad_a.data()?, grad_b.data()?);
        run(py, num_threads, || {
            mmot_core::geometric_consistency_backward(g, rows, s, ga, gb, &params)
        })
    })
}

/// Adds this file's functions to `mmot._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(geometric_consistency_forward, m)?)?;
    m.add_function(wrap_pyfunction!(geometric_consistency_backward, m)?)?;
    Ok(())
}
