//! `info_nce_forward` and `info_nce_backward` (see `mmot_core::info_nce`).

use crate::arrays::{for_float_type, input, output};
use crate::run;
use mmot_core::{InfoNceInput, InfoNceParams};
use pyo3::prelude::*;

/// Per-pair InfoNCE losses of `a`, `b` `[N, D]` with 0/1 `valid` `[N]`, written into `loss`,
/// `lse_a` and `lse_b` (`[N]` each).
#[pyfunction]
#[pyo3(signature = (a, b, valid, loss, lse_a, lse_b, temperature, symmetric, normalize, num_threads, check_finite=false))]
fn info_nce_forward(
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    valid: &Bound<'_, PyAny>,
    loss: &Bound<'_, PyAny>,
    lse_a: &Bound<'_, PyAny>,
    lse_b: &Bound<'_, PyAny>,
    temperature: f64,
    symmetric: bool,
    normalize: bool,
    num_threads: i64,
    check_finite: bool,
) -> PyResult<()> {
    let params = InfoNceParams {
        temperature,
        symmetric,
        normalize,
        check_finite,
    };
    let py = a.py();
    for_float_type!(a, "a", T => {
        let a = input::<T, 2>(a, "a")?;
        let [n, d] = a.shape();
        let b = input::<T, 2>(b, "b")?.shaped([n, d])?;
        let valid = input::<T, 1>(valid, "valid")?.shaped([n])?;
        let mut loss = output::<T, 1>(loss, "loss")?.shaped([n])?;
        let mut lse_a = output::<T, 1>(lse_a, "lse_a")?.shaped([n])?;
        let mut lse_b = output::<T, 1>(lse_b, "lse_b")?.shaped([n])?;
        let pairs = InfoNceInput {
            a: a.data()?,
            b: b.data()?,
            valid: valid.data()?,
            rows: n,
            features: d,
        };
        let (l, la, lb) = (loss.data()?, lse_a.data()?, lse_b.data()?);
        run(py, num_threads, || mmot_core::info_nce_forward(pairs, l, la, lb, &params))
    })
}

/// Gradients of Σ grad·loss with respect to `a` and `b`, written into `grad_a`, `grad_b`.
#[pyfunction]
#[pyo3(signature = (grad, a, b, valid, lse_a, lse_b, grad_a, grad_b, temperature, symmetric, normalize, num_threads))]
fn info_nce_backward(
    grad: &Bound<'_, PyAny>,
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    valid: &Bound<'_, PyAny>,
    lse_a: &Bound<'_, PyAny>,
    lse_b: &Bound<'_, PyAny>,
    grad_a: &Bound<'_, PyAny>,
    grad_b: &Bound<'_, PyAny>,
    temperature: f64,
    symmetric: bool,
    normalize: bool,
    num_threads: i64,
) -> PyResult<()> {
    let params = InfoNceParams {
        temperature,
        symmetric,
        normalize,
        check_finite: false,
    };
    let py = a.py();
    for_float_type!(a, "a", T => {
        let a = input::<T, 2>(a, "a")?;
        let [n, d] = a.shape();
        let b = input::<T, 2>(b, "b")?.shaped([n, d])?;
        let grad = input::<T, 1>(grad, "grad")?.shaped([n])?;
        let valid = input::<T, 1>(valid, "valid")?.shaped([n])?;
        let lse_a = input::<T, 1>(lse_a, "lse_a")?.shaped([n])?;
        let lse_b = input::<T, 1>(lse_b, "lse_b")?.shaped([n])?;
        let mut grad_a = output::<T, 2>(grad_a, "grad_a")?.shaped([n, d])?;
        let mut grad_b = output::<T, 2>(grad_b, "grad_b")?.shaped([n, d])?;
        let pairs = InfoNceInput {
            a: a.data()?,
            b: b.data()?,
            valid: valid.data()?,
            rows: n,
            features: d,
        };
        let (g, la, lb) = (grad.data()?, lse_a.data()?, lse_b.data()?);
        let (ga, gb) = (grad_a.data()?, grad_b.data()?);
        run(py, num_threads, || {
            mmot_core::info_nce_backward(g, pairs, la, lb, ga, gb, &params)
        })
    })
}

/// Adds this file's functions to `mmot._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(info_nce_forward, m)?)?;
    m.add_function(wrap_pyfunction!(info_nce_backward, m)?)?;
    Ok(())
}
