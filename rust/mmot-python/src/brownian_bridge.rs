//! `brownian_bridge_forward` and `brownian_bridge_backward` (see `mmot_core::brownian_bridge`).

use crate::arrays::{for_float_type, input, output};
use crate::run;
use mmot_core::{BrownianBridgeInput, BrownianBridgeParams};
use pyo3::prelude::*;

/// Per-row Brownian-bridge losses of `mid` against the bridges from `a` to `b` (`[N, D]` each)
/// at times `t` with scales `scale` (`[N]` each), written into `loss` and `lse` (`[N]` each).
#[pyfunction]
#[pyo3(signature = (a, b, mid, t, scale, loss, lse, normalize, num_threads, check_finite=false))]
fn brownian_bridge_forward(
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    mid: &Bound<'_, PyAny>,
    t: &Bound<'_, PyAny>,
    scale: &Bound<'_, PyAny>,
    loss: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    normalize: bool,
    num_threads: i64,
    check_finite: bool,
) -> PyResult<()> {
    let params = BrownianBridgeParams {
        normalize,
        check_finite,
    };
    let py = a.py();
    for_float_type!(a, "a", T => {
        let a = input::<T, 2>(a, "a")?;
        let [n, d] = a.shape();
        let b = input::<T, 2>(b, "b")?.shaped([n, d])?;
        let mid = input::<T, 2>(mid, "mid")?.shaped([n, d])?;
        let t = input::<T, 1>(t, "t")?.shaped([n])?;
        let scale = input::<T, 1>(scale, "scale")?.shaped([n])?;
        let mut loss = output::<T, 1>(loss, "loss")?.shaped([n])?;
        let mut lse = output::<T, 1>(lse, "lse")?.shaped([n])?;
        let rows = BrownianBridgeInput {
            a: a.data()?,
            b: b.data()?,
            mid: mid.data()?,
            t: t.data()?,
            scale: scale.data()?,
            rows: n,
            features: d,
        };
        let (l, s) = (loss.data()?, lse.data()?);
        run(py, num_threads, || mmot_core::brownian_bridge_forward(rows, l, s, &params))
    })
}

/// Gradients of Σ grad·loss with respect to `a`, `b` and `mid`, written into `grad_a`,
/// `grad_b` and `grad_mid`.
#[pyfunction]
#[pyo3(signature = (grad, a, b, mid, t, scale, lse, grad_a, grad_b, grad_mid, normalize, num_threads))]
fn brownian_bridge_backward(
    grad: &Bound<'_, PyAny>,
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    mid: &Bound<'_, PyAny>,
    t: &Bound<'_, PyAny>,
    scale: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    grad_a: &Bound<'_, PyAny>,
    grad_b: &Bound<'_, PyAny>,
    grad_mid: &Bound<'_, PyAny>,
    normalize: bool,
    num_threads: i64,
) -> PyResult<()> {
    let params = BrownianBridgeParams {
        normalize,
        check_finite: false,
    };
    let py = a.py();
    for_float_type!(a, "a", T => {
        let a = input::<T, 2>(a, "a")?;
        let [n, d] = a.shape();
        let b = input::<T, 2>(b, "b")?.shaped([n, d])?;
        let mid = input::<T, 2>(mid, "mid")?.shaped([n, d])?;
        let grad = input::<T, 1>(grad, "grad")?.shaped([n])?;
        let t = input::<T, 1>(t, "t")?.shaped([n])?;
        let scale = input::<T, 1>(scale, "scale")?.shaped([n])?;
        let lse = input::<T, 1>(lse, "lse")?.shaped([n])?;
        let mut grad_a = output::<T, 2>(grad_a, "grad_a")?.shaped([n, d])?;
        let mut grad_b = output::<T, 2>(grad_b, "grad_b")?.shaped([n, d])?;
        let mut grad_mid = output::<T, 2>(grad_mid, "grad_mid")?.shaped([n, d])?;
        let rows = BrownianBridgeInput {
            a: a.data()?,
            b: b.data()?,
            mid: mid.data()?,
            t: t.data()?,
            scale: scale.data()?,
            rows: n,
            features: d,
        };
        let (g, s) = (grad.data()?, lse.data()?);
        let (ga, gb, gm) = (grad_a.data()?, grad_b.data()?, grad_mid.data()?);
        run(py, num_threads, || {
            mmot_core::brownian_bridge_backward(g, rows, s, ga, gb, gm, &params)
        })
    })
}

/// Adds this file's functions to `mmot._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(brownian_bridge_forward, m)?)?;
    m.add_function(wrap_pyfunction!(brownian_bridge_backward, m)?)?;
    Ok(())
}
