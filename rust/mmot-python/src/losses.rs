//! Bindings for the fused losses: `info_nce_forward`/`_backward` and
//! `anchor_consistency_forward`/`_backward` (see `mmot_core::info_nce`).
//!
//! Same contract as the other bindings: the Python layer checks values and allocates outputs
//! with torch; here the numpy views are borrowed zero-copy, shapes checked, the GIL released and
//! the kernel run on the extension's pool.

use crate::arrays::ndarray_dim::{D1, D2};
use crate::arrays::{float_dtype, ro, rw, slice, slice_mut, to_py, Dtype};
use crate::pool;
use mmot_core::info_nce::{self, InfoNceParams};
use mmot_core::Real;
use numpy::{Element, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

fn same_shape(name: &str, got: &[usize], want: &[usize]) -> PyResult<()> {
    if got != want {
        return Err(PyValueError::new_err(format!(
            "{name} must have shape {want:?}, got {got:?}"
        )));
    }
    Ok(())
}

/// Per-pair InfoNCE losses of `a`, `b` `[N, D]` with 0/1 `valid` `[N]`, written into `loss`,
/// `lse_a` and `lse_b` (`[N]` each).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (a, b, valid, loss, lse_a, lse_b, temperature, symmetric, normalize, num_threads, check_finite=false))]
fn info_nce_forward(
    py: Python<'_>,
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
    };
    let outs = [loss, lse_a, lse_b];
    match float_dtype(a, "a")? {
        Dtype::F32 => forward_t::<f32>(py, a, b, valid, outs, &params, num_threads, check_finite),
        Dtype::F64 => forward_t::<f64>(py, a, b, valid, outs, &params, num_threads, check_finite),
    }
}

#[allow(clippy::too_many_arguments)]
fn forward_t<T: Element + Real>(
    py: Python<'_>,
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    valid: &Bound<'_, PyAny>,
    outs: [&Bound<'_, PyAny>; 3],
    params: &InfoNceParams,
    num_threads: i64,
    check_finite: bool,
) -> PyResult<()> {
    let aa = ro::<T, D2>(a, "a")?;
    let ba = ro::<T, D2>(b, "b")?;
    let va = ro::<T, D1>(valid, "valid")?;
    let (n, d) = (aa.shape()[0], aa.shape()[1]);
    same_shape("b", ba.shape(), &[n, d])?;
    same_shape("valid", va.shape(), &[n])?;
    let mut lo = rw::<T, D1>(outs[0], "loss")?;
    let mut la = rw::<T, D1>(outs[1], "lse_a")?;
    let mut lb = rw::<T, D1>(outs[2], "lse_b")?;
    for (name, o) in [("loss", &lo), ("lse_a", &la), ("lse_b", &lb)] {
        same_shape(name, o.shape(), &[n])?;
    }
    let (xs, ys, ws) = (slice(&aa, "a")?, slice(&ba, "b")?, slice(&va, "valid")?);
    let los = slice_mut(&mut lo, "loss")?;
    let las = slice_mut(&mut la, "lse_a")?;
    let lbs = slice_mut(&mut lb, "lse_b")?;
    let pool = pool::get(num_threads)?;
    py.detach(|| {
        pool.install(|| {
            info_nce::info_nce_forward_checked(
                xs,
                ys,
                ws,
                n,
                d,
                params,
                los,
                las,
                lbs,
                check_finite,
            )
        })
    })
    .map_err(to_py)
}

/// Gradients of Σ grad·loss with respect to `a` and `b`, written into `grad_a`, `grad_b`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (grad, a, b, valid, lse_a, lse_b, grad_a, grad_b, temperature, symmetric, normalize, num_threads))]
fn info_nce_backward(
    py: Python<'_>,
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
    };
    let ins = [grad, a, b, valid, lse_a, lse_b];
    match float_dtype(a, "a")? {
        Dtype::F32 => backward_t::<f32>(py, ins, [grad_a, grad_b], &params, num_threads),
        Dtype::F64 => backward_t::<f64>(py, ins, [grad_a, grad_b], &params, num_threads),
    }
}

fn backward_t<T: Element + Real>(
    py: Python<'_>,
    ins: [&Bound<'_, PyAny>; 6],
    outs: [&Bound<'_, PyAny>; 2],
    params: &InfoNceParams,
    num_threads: i64,
) -> PyResult<()> {
    let aa = ro::<T, D2>(ins[1], "a")?;
    let ba = ro::<T, D2>(ins[2], "b")?;
    let (n, d) = (aa.shape()[0], aa.shape()[1]);
    same_shape("b", ba.shape(), &[n, d])?;
    let names = ["grad", "valid", "lse_a", "lse_b"];
    let vecs = [
        ro::<T, D1>(ins[0], names[0])?,
        ro::<T, D1>(ins[3], names[1])?,
        ro::<T, D1>(ins[4], names[2])?,
        ro::<T, D1>(ins[5], names[3])?,
    ];
    for (name, v) in names.iter().zip(&vecs) {
        same_shape(name, v.shape(), &[n])?;
    }
    let mut ga = rw::<T, D2>(outs[0], "grad_a")?;
    let mut gb = rw::<T, D2>(outs[1], "grad_b")?;
    same_shape("grad_a", ga.shape(), &[n, d])?;
    same_shape("grad_b", gb.shape(), &[n, d])?;
    let (xs, ys) = (slice(&aa, "a")?, slice(&ba, "b")?);
    let g = slice(&vecs[0], "grad")?;
    let w = slice(&vecs[1], "valid")?;
    let la = slice(&vecs[2], "lse_a")?;
    let lb = slice(&vecs[3], "lse_b")?;
    let gas = slice_mut(&mut ga, "grad_a")?;
    let gbs = slice_mut(&mut gb, "grad_b")?;
    let pool = pool::get(num_threads)?;
    py.detach(|| {
        pool.install(|| info_nce::info_nce_backward(g, xs, ys, w, la, lb, n, d, params, gas, gbs))
    })
    .map_err(to_py)
}

/// Mean of BCE-with-logits(exp(sim/τ), target) over the flat arrays `sim` and `target`.
#[pyfunction]
#[pyo3(signature = (sim, target, temperature, num_threads))]
fn anchor_consistency_forward(
    py: Python<'_>,
    sim: &Bound<'_, PyAny>,
    target: &Bound<'_, PyAny>,
    temperature: f64,
    num_threads: i64,
) -> PyResult<f64> {
    match float_dtype(sim, "sim")? {
        Dtype::F32 => acl_forward_t::<f32>(py, sim, target, temperature, num_threads),
        Dtype::F64 => acl_forward_t::<f64>(py, sim, target, temperature, num_threads),
    }
}

fn acl_forward_t<T: Element + Real>(
    py: Python<'_>,
    sim: &Bound<'_, PyAny>,
    target: &Bound<'_, PyAny>,
    temperature: f64,
    num_threads: i64,
) -> PyResult<f64> {
    let s = ro::<T, D1>(sim, "sim")?;
    let t = ro::<T, D1>(target, "target")?;
    same_shape("target", t.shape(), s.shape())?;
    let (ss, ts) = (slice(&s, "sim")?, slice(&t, "target")?);
    let pool = pool::get(num_threads)?;
    py.detach(|| pool.install(|| info_nce::anchor_consistency_forward(ss, ts, temperature)))
        .map_err(to_py)
}

/// Gradient of grad · anchor_consistency with respect to `sim`, written into `out`.
#[pyfunction]
#[pyo3(signature = (grad, sim, target, out, temperature, num_threads))]
fn anchor_consistency_backward(
    py: Python<'_>,
    grad: f64,
    sim: &Bound<'_, PyAny>,
    target: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    temperature: f64,
    num_threads: i64,
) -> PyResult<()> {
    match float_dtype(sim, "sim")? {
        Dtype::F32 => acl_backward_t::<f32>(py, grad, sim, target, out, temperature, num_threads),
        Dtype::F64 => acl_backward_t::<f64>(py, grad, sim, target, out, temperature, num_threads),
    }
}

fn acl_backward_t<T: Element + Real>(
    py: Python<'_>,
    grad: f64,
    sim: &Bound<'_, PyAny>,
    target: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    temperature: f64,
    num_threads: i64,
) -> PyResult<()> {
    let s = ro::<T, D1>(sim, "sim")?;
    let t = ro::<T, D1>(target, "target")?;
    let mut o = rw::<T, D1>(out, "out")?;
    same_shape("target", t.shape(), s.shape())?;
    same_shape("out", o.shape(), s.shape())?;
    let (ss, ts) = (slice(&s, "sim")?, slice(&t, "target")?);
    let os = slice_mut(&mut o, "out")?;
    let pool = pool::get(num_threads)?;
    py.detach(|| {
        pool.install(|| info_nce::anchor_consistency_backward(grad, ss, ts, temperature, os))
    })
    .map_err(to_py)
}

/// Adds this file's functions to `mmot._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(info_nce_forward, m)?)?;
    m.add_function(wrap_pyfunction!(info_nce_backward, m)?)?;
    m.add_function(wrap_pyfunction!(anchor_consistency_forward, m)?)?;
    m.add_function(wrap_pyfunction!(anchor_consistency_backward, m)?)?;
    Ok(())
}
