//! `nt_xent_forward` and `nt_xent_backward` (see `mmot_core::nt_xent_forward`).

use crate::arrays::{for_float_type, input, output};
use crate::run;
use mmot_core::NtXentParams;
use pyo3::prelude::*;

/// Per-row NT-Xent losses of `z = [x; y]` `[2N, D]`, written into `loss` and `lse` (`[2N]` each).
#[pyfunction]
#[pyo3(signature = (z, loss, lse, temperature, normalize, num_threads, check_finite=false))]
fn nt_xent_forward(
    z: &Bound<'_, PyAny>,
    loss: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    temperature: f64,
    normalize: bool,
    num_threads: i64,
    check_finite: bool,
) -> PyResult<()> {
    let params = NtXentParams {
        temperature,
        normalize,
        check_finite,
    };
    let py = z.py();
    for_float_type!(z, "z", T => {
        let z = input::<T, 2>(z, "z")?;
        let [n, d] = z.shape();
        let mut loss = output::<T, 1>(loss, "loss")?.shaped([n])?;
        let mut lse = output::<T, 1>(lse, "lse")?.shaped([n])?;
        let (zs, l, ls) = (z.data()?, loss.data()?, lse.data()?);
        run(py, num_threads, || mmot_core::nt_xent_forward(zs, n, d, l, ls, &params))
    })
}

/// The gradient of Σ grad·loss with respect to `z`, written into `grad_z`.
#[pyfunction]
#[pyo3(signature = (grad, z, lse, grad_z, temperature, normalize, num_threads))]
fn nt_xent_backward(
    grad: &Bound<'_, PyAny>,
    z: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    grad_z: &Bound<'_, PyAny>,
    temperature: f64,
    normalize: bool,
    num_threads: i64,
) -> PyResult<()> {
    let params = NtXentParams {
        temperature,
        normalize,
        check_finite: false,
    };
    let py = z.py();
    for_float_type!(z, "z", T => {
        let z = input::<T, 2>(z, "z")?;
        let [n, d] = z.shape();
        let grad = input::<T, 1>(grad, "grad")?.shaped([n])?;
        let lse = input::<T, 1>(lse, "lse")?.shaped([n])?;
        let mut grad_z = output::<T, 2>(grad_z, "grad_z")?.shaped([n, d])?;
        let (g, zs, ls, gz) = (grad.data()?, z.data()?, lse.data()?, grad_z.data()?);
        run(py, num_threads, || mmot_core::nt_xent_backward(g, zs, n, d, ls, gz, &params))
    })
}

/// Adds this file's functions to `mmot._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(nt_xent_forward, m)?)?;
    m.add_function(wrap_pyfunction!(nt_xent_backward, m)?)?;
    Ok(())
}
