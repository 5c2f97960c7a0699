//! `anchor_consistency_forward` and `anchor_consistency_backward` (see
//! `mmot_core::anchor_consistency`).

use crate::arrays::{for_float_type, input, output};
use crate::run;
use mmot_core::AnchorConsistencyParams;
use pyo3::prelude::*;

/// Mean of BCE-with-logits(exp(sim/τ), target) over the flat arrays `sim` and `target`; with
/// `check_finite`, NaN or Inf in either is a ValueError.
#[pyfunction]
#[pyo3(signature = (sim, target, temperature, num_threads, check_finite=false))]
fn anchor_consistency_forward(
    sim: &Bound<'_, PyAny>,
    target: &Bound<'_, PyAny>,
    temperature: f64,
    num_threads: i64,
    check_finite: bool,
) -> PyResult<f64> {
    let params = AnchorConsistencyParams {
        temperature,
        check_finite,
    };
    let py = sim.py();
    for_float_type!(sim, "sim", T => {
        let sim = input::<T, 1>(sim, "sim")?;
        let target = input::<T, 1>(target, "target")?.shaped(sim.shape())?;
        let (s, t) = (sim.data()?, target.data()?);
        run(py, num_threads, || mmot_core::anchor_consistency_forward(s, t, &params))
    })
}

/// Gradient of grad · anchor_consistency with respect to `sim`, written into `out`.
#[pyfunction]
#[pyo3(signature = (grad, sim, target, out, temperature, num_threads))]
fn anchor_consistency_backward(
    grad: f64,
    sim: &Bound<'_, PyAny>,
    target: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    temperature: f64,
    num_threads: i64,
) -> PyResult<()> {
    let params = AnchorConsistencyParams {
        temperature,
        check_finite: false,
    };
    let py = sim.py();
    for_float_type!(sim, "sim", T => {
        let sim = input::<T, 1>(sim, "sim")?;
        let target = input::<T, 1>(target, "target")?.shaped(sim.shape())?;
        let mut out = output::<T, 1>(out, "out")?.shaped(sim.shape())?;
        let (s, t, o) = (sim.data()?, target.data()?, out.data()?);
        run(py, num_threads, || {
            mmot_core::anchor_consistency_backward(grad, s, t, o, &params)
        })
    })
}

/// Adds this file's functions to `mmot._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(anchor_consistency_forward, m)?)?;
    m.add_function(wrap_pyfunction!(anchor_consistency_backward, m)?)?;
    Ok(())
}
