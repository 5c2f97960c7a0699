//! `feature_separation_forward` and `feature_separation_backward` (see
//! `mmot_core::feature_separation`).

use crate::arrays::{for_float_type, input, output};
use crate::run;
use mmot_core::{FeatureSeparationInput, FeatureSeparationParams};
use pyo3::prelude::*;

/// The feature-separation loss of `shared` (`[N, D_s]`) and `specific` (`[N, D_h]`) into
/// `loss` (`[1]`), and the Gram ŜᵀĤ into `gram` (`[D_s, D_h]`).
#[pyfunction]
#[pyo3(signature = (shared, specific, loss, gram, normalize, num_threads, check_finite=false))]
fn feature_separation_forward(
    shared: &Bound<'_, PyAny>,
    specific: &Bound<'_, PyAny>,
    loss: &Bound<'_, PyAny>,
    gram: &Bound<'_, PyAny>,
    normalize: bool,
    num_threads: i64,
    check_finite: bool,
) -> PyResult<()> {
    let params = FeatureSeparationParams {
        normalize,
        check_finite,
    };
    let py = shared.py();
    for_float_type!(shared, "shared", T => {
        let shared = input::<T, 2>(shared, "shared")?;
        let [n, ds] = shared.shape();
        let specific = input::<T, 2>(specific, "specific")?;
        let [_, dh] = specific.shape();
        let specific = specific.shaped([n, dh])?;
        let mut loss = output::<T, 1>(loss, "loss")?.shaped([1])?;
        let mut gram = output::<T, 2>(gram, "gram")?.shaped([ds, dh])?;
        let rows = FeatureSeparationInput {
            shared: shared.data()?,
            specific: specific.data()?,
            rows: n,
            shared_dim: ds,
            specific_dim: dh,
        };
        let (l, g) = (loss.data()?, gram.data()?);
        run(py, num_threads, || mmot_core::feature_separation_forward(rows, l, g, &params))
    })
}

/// Gradients of grad[0]·loss with respect to `shared` and `specific` from the forward's
/// `gram`, written into `grad_shared` and `grad_specific`.
#[pyfunction]
#[pyo3(signature = (grad, shared, specific, gram, grad_shared, grad_specific, normalize, num_threads))]
fn feature_separation_backward(
    grad: &Bound<'_, PyAny>,
    shared: &Bound<'_, PyAny>,
    specific: &Bound<'_, PyAny>,
    gram: &Bound<'_, PyAny>,
    grad_shared: &Bound<'_, PyAny>,
    grad_specific: &Bound<'_, PyAny>,
    normalize: bool,
    num_threads: i64,
) -> PyResult<()> {
    let params = FeatureSeparationParams {
        normalize,
        check_finite: false,
    };
    let py = shared.py();
    for_float_type!(shared, "shared", T => {
        let shared = input::<T, 2>(shared, "shared")?;
        let [n, ds] = shared.shape();
        let specific = input::<T, 2>(specific, "specific")?;
        let [_, dh] = specific.shape();
        let specific = specific.shaped([n, dh])?;
        let grad = input::<T, 1>(grad, "grad")?.shaped([1])?;
        let gram = input::<T, 2>(gram, "gram")?.shaped([ds, dh])?;
        let mut grad_shared = output::<T, 2>(grad_shared, "grad_shared")?.shaped([n, ds])?;
        let mut grad_specific = output::<T, 2>(grad_specific, "grad_specific")?.shaped([n, dh])?;
        let rows = FeatureSeparationInput {
            shared: shared.data()?,
            specific: specific.data()?,
            rows: n,
            shared_dim: ds,
            specific_dim: dh,
        };
        let (g, c) = (grad.data()?, gram.data()?);
        let (gs, gh) = (grad_shared.data()?, grad_specific.data()?);
        run(py, num_threads, || {
            mmot_core::feature_separation_backward(g, rows, c, gs, gh, &params)
        })
    })
}

/// Adds this file's functions to `mmot._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(feature_separation_forward, m)?)?;
    m.add_function(wrap_pyfunction!(feature_separation_backward, m)?)?;
    Ok(())
}
