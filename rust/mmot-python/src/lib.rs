//! `mmot._core`: thin PyO3 bindings over `mmot-core`.
//!
//! The Python layer (`mmot.ops`) resolves defaults, checks values, makes inputs contiguous and
//! allocates `out` with torch; this layer only borrows the numpy views, checks shapes and dtypes,
//! releases the GIL and runs the kernel on the extension's own thread pool.

mod arrays;
mod losses;
mod pool;

use arrays::ndarray_dim::{D1, D2, D3};
use arrays::{float_dtype, ro, rw, slice, slice_mut, to_py, Dtype};
use mmot_core::{Dims, LogDomain, MultiSinkhornParams, Normalize, Real};
use numpy::{Element, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

fn check_shape(name: &str, got: &[usize], want: &[usize]) -> PyResult<()> {
    if got != want {
        return Err(PyValueError::new_err(format!(
            "{name} must have shape {want:?}, got {got:?}"
        )));
    }
    Ok(())
}

fn check_iters(n_iters: i64) -> PyResult<usize> {
    if n_iters < 1 {
        return Err(PyValueError::new_err(format!(
            "n_iters must be >= 1, got {n_iters}"
        )));
    }
    Ok(n_iters as usize)
}

/// SwAV-style Sinkhorn on `scores` `[B, N, K]`, written into `out`. Returns whether the log
/// domain was used.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (scores, row_mass, col_mass, out, eps, n_iters, log_domain, num_threads, check_finite=false))]
fn sinkhorn(
    py: Python<'_>,
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
    let mode: LogDomain = log_domain.parse().map_err(to_py)?;
    let n_iters = check_iters(n_iters)?;
    match float_dtype(scores, "scores")? {
        Dtype::F32 => sinkhorn_t::<f32>(
            py,
            scores,
            row_mass,
            col_mass,
            out,
            eps,
            n_iters,
            mode,
            num_threads,
            check_finite,
        ),
        Dtype::F64 => sinkhorn_t::<f64>(
            py,
            scores,
            row_mass,
            col_mass,
            out,
            eps,
            n_iters,
            mode,
            num_threads,
            check_finite,
        ),
    }
}

#[allow(clippy::too_many_arguments)]
fn sinkhorn_t<T: Element + Real>(
    py: Python<'_>,
    scores: &Bound<'_, PyAny>,
    row_mass: &Bound<'_, PyAny>,
    col_mass: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    eps: f64,
    n_iters: usize,
    mode: LogDomain,
    num_threads: i64,
    check_finite: bool,
) -> PyResult<bool> {
    let s = ro::<T, D3>(scores, "scores")?;
    let r = ro::<T, D2>(row_mass, "row_mass")?;
    let c = ro::<T, D2>(col_mass, "col_mass")?;
    let mut o = rw::<T, D3>(out, "out")?;
    let (b, n, k) = (s.shape()[0], s.shape()[1], s.shape()[2]);
    check_shape("row_mass", r.shape(), &[b, n])?;
    check_shape("col_mass", c.shape(), &[b, k])?;
    check_shape("out", o.shape(), &[b, n, k])?;
    let (ss, rs, cs) = (
        slice(&s, "scores")?,
        slice(&r, "row_mass")?,
        slice(&c, "col_mass")?,
    );
    let os = slice_mut(&mut o, "out")?;
    let pool = pool::get(num_threads)?;
    py.detach(|| {
        pool.install(|| {
            mmot_core::sinkhorn_checked(ss, rs, cs, os, b, n, k, eps, n_iters, mode, check_finite)
        })
    })
    .map_err(to_py)
}

/// Vector-Jacobian product of `sinkhorn` w.r.t. `scores`: `grad` `[B, N, K]` in, `out` the
/// gradient of the scores. Returns whether the log domain was used.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (grad, scores, row_mass, col_mass, out, eps, n_iters, log_domain, num_threads))]
fn sinkhorn_backward(
    py: Python<'_>,
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
    let mode: LogDomain = log_domain.parse().map_err(to_py)?;
    let n_iters = check_iters(n_iters)?;
    let args = (grad, scores, row_mass, col_mass, out);
    match float_dtype(scores, "scores")? {
        Dtype::F32 => sinkhorn_backward_t::<f32>(py, args, eps, n_iters, mode, num_threads),
        Dtype::F64 => sinkhorn_backward_t::<f64>(py, args, eps, n_iters, mode, num_threads),
    }
}

type Arrays5<'a, 'py> = (
    &'a Bound<'py, PyAny>,
    &'a Bound<'py, PyAny>,
    &'a Bound<'py, PyAny>,
    &'a Bound<'py, PyAny>,
    &'a Bound<'py, PyAny>,
);

fn sinkhorn_backward_t<T: Element + Real>(
    py: Python<'_>,
    (grad, scores, row_mass, col_mass, out): Arrays5<'_, '_>,
    eps: f64,
    n_iters: usize,
    mode: LogDomain,
    num_threads: i64,
) -> PyResult<bool> {
    let g = ro::<T, D3>(grad, "grad")?;
    let s = ro::<T, D3>(scores, "scores")?;
    let r = ro::<T, D2>(row_mass, "row_mass")?;
    let c = ro::<T, D2>(col_mass, "col_mass")?;
    let mut o = rw::<T, D3>(out, "out")?;
    let (b, n, k) = (s.shape()[0], s.shape()[1], s.shape()[2]);
    check_shape("grad", g.shape(), &[b, n, k])?;
    check_shape("row_mass", r.shape(), &[b, n])?;
    check_shape("col_mass", c.shape(), &[b, k])?;
    check_shape("out", o.shape(), &[b, n, k])?;
    let (gs, ss, rs, cs) = (
        slice(&g, "grad")?,
        slice(&s, "scores")?,
        slice(&r, "row_mass")?,
        slice(&c, "col_mass")?,
    );
    let os = slice_mut(&mut o, "out")?;
    let pool = pool::get(num_threads)?;
    py.detach(|| {
        pool.install(|| {
            mmot_core::sinkhorn_backward(gs, ss, rs, cs, os, b, n, k, eps, n_iters, mode)
        })
    })
    .map_err(to_py)
}

/// Grouped Multi-Assignment Sinkhorn-Knopp on `scores` `[B, N, K]`, written into `out`.
/// Returns whether the log domain was used.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (scores, anchor_mass, out, eps, n_iters, slot_weights, k, normalize, log_domain, num_threads, check_values=false))]
fn multi_sinkhorn(
    py: Python<'_>,
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
        ..multi_params(eps, n_iters, slot_weights, k, normalize, log_domain)?
    };
    match float_dtype(scores, "scores")? {
        Dtype::F32 => multi_t::<f32>(py, scores, anchor_mass, out, &params, num_threads),
        Dtype::F64 => multi_t::<f64>(py, scores, anchor_mass, out, &params, num_threads),
    }
}

fn multi_t<T: Element + Real>(
    py: Python<'_>,
    scores: &Bound<'_, PyAny>,
    anchor_mass: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    params: &MultiSinkhornParams,
    num_threads: i64,
) -> PyResult<bool> {
    let s = ro::<T, D3>(scores, "scores")?;
    let r = ro::<T, D2>(anchor_mass, "anchor_mass")?;
    let mut o = rw::<T, D3>(out, "out")?;
    let (b, n, kk) = (s.shape()[0], s.shape()[1], s.shape()[2]);
    check_shape("anchor_mass", r.shape(), &[b, kk])?;
    check_shape("out", o.shape(), &[b, n, kk])?;
    let (ss, rs) = (slice(&s, "scores")?, slice(&r, "anchor_mass")?);
    let os = slice_mut(&mut o, "out")?;
    let pool = pool::get(num_threads)?;
    let dims = Dims::new(b, n, kk);
    py.detach(|| pool.install(|| mmot_core::multi_sinkhorn(ss, rs, os, dims, params)))
        .map_err(to_py)
}

/// Vector-Jacobian product of `multi_sinkhorn` w.r.t. `scores` (through the min-max step).
/// Returns whether the log domain was used.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (grad, scores, anchor_mass, out, eps, n_iters, slot_weights, k, normalize, log_domain, num_threads))]
fn multi_sinkhorn_backward(
    py: Python<'_>,
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
    let params = multi_params(eps, n_iters, slot_weights, k, normalize, log_domain)?;
    match float_dtype(scores, "scores")? {
        Dtype::F32 => {
            multi_backward_t::<f32>(py, grad, scores, anchor_mass, out, &params, num_threads)
        }
        Dtype::F64 => {
            multi_backward_t::<f64>(py, grad, scores, anchor_mass, out, &params, num_threads)
        }
    }
}

fn multi_params(
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

fn multi_backward_t<T: Element + Real>(
    py: Python<'_>,
    grad: &Bound<'_, PyAny>,
    scores: &Bound<'_, PyAny>,
    anchor_mass: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    params: &MultiSinkhornParams,
    num_threads: i64,
) -> PyResult<bool> {
    let g = ro::<T, D3>(grad, "grad")?;
    let s = ro::<T, D3>(scores, "scores")?;
    let r = ro::<T, D2>(anchor_mass, "anchor_mass")?;
    let mut o = rw::<T, D3>(out, "out")?;
    let (b, n, kk) = (s.shape()[0], s.shape()[1], s.shape()[2]);
    check_shape("grad", g.shape(), &[b, n, kk])?;
    check_shape("anchor_mass", r.shape(), &[b, kk])?;
    check_shape("out", o.shape(), &[b, n, kk])?;
    let (gs, ss, rs) = (
        slice(&g, "grad")?,
        slice(&s, "scores")?,
        slice(&r, "anchor_mass")?,
    );
    let os = slice_mut(&mut o, "out")?;
    let pool = pool::get(num_threads)?;
    let dims = Dims::new(b, n, kk);
    py.detach(|| pool.install(|| mmot_core::multi_sinkhorn_backward(gs, ss, rs, os, dims, params)))
        .map_err(to_py)
}

/// `out[o] = scale · x̂[x_index[o]] ŷ[y_index[o]]ᵀ` for `x` `[Bx, N, D]`, `y` `[By, M, D]`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (x, y, x_index, y_index, out, normalize, scale, num_threads, check_finite=false))]
fn similarity(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    y: &Bound<'_, PyAny>,
    x_index: &Bound<'_, PyAny>,
    y_index: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    normalize: bool,
    scale: f64,
    num_threads: i64,
    check_finite: bool,
) -> PyResult<()> {
    match float_dtype(x, "x")? {
        Dtype::F32 => similarity_t::<f32>(
            py,
            x,
            y,
            x_index,
            y_index,
            out,
            normalize,
            scale,
            num_threads,
            check_finite,
        ),
        Dtype::F64 => similarity_t::<f64>(
            py,
            x,
            y,
            x_index,
            y_index,
            out,
            normalize,
            scale,
            num_threads,
            check_finite,
        ),
    }
}

#[allow(clippy::too_many_arguments)]
fn similarity_t<T: Element + Real>(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    y: &Bound<'_, PyAny>,
    x_index: &Bound<'_, PyAny>,
    y_index: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    normalize: bool,
    scale: f64,
    num_threads: i64,
    check_finite: bool,
) -> PyResult<()> {
    let xa = ro::<T, D3>(x, "x")?;
    let ya = ro::<T, D3>(y, "y")?;
    let xi = ro::<i64, D1>(x_index, "x_index")?;
    let yi = ro::<i64, D1>(y_index, "y_index")?;
    let mut o = rw::<T, D3>(out, "out")?;
    let (bx, n, d) = (xa.shape()[0], xa.shape()[1], xa.shape()[2]);
    let (by, m, dy) = (ya.shape()[0], ya.shape()[1], ya.shape()[2]);
    if dy != d {
        return Err(PyValueError::new_err(format!(
            "x and y must have the same last dimension, got {d} and {dy}"
        )));
    }
    let bo = xi.shape()[0];
    check_shape("y_index", yi.shape(), &[bo])?;
    check_shape("out", o.shape(), &[bo, n, m])?;
    let (xs, ys) = (slice(&xa, "x")?, slice(&ya, "y")?);
    let (xis, yis) = (slice(&xi, "x_index")?, slice(&yi, "y_index")?);
    let os = slice_mut(&mut o, "out")?;
    let pool = pool::get(num_threads)?;
    py.detach(|| {
        pool.install(|| {
            mmot_core::similarity_checked(
                xs,
                ys,
                xis,
                yis,
                os,
                bx,
                n,
                by,
                m,
                d,
                normalize,
                scale,
                check_finite,
            )
        })
    })
    .map_err(to_py)
}

/// Gradients of `similarity`: `grad` `[Bo, N, M]` in; `gx` `[Bx, N, D]` and `gy` `[By, M, D]`
/// are written (summed over the output problems sharing an input problem).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (grad, x, y, x_index, y_index, gx, gy, normalize, scale, num_threads))]
fn similarity_backward(
    py: Python<'_>,
    grad: &Bound<'_, PyAny>,
    x: &Bound<'_, PyAny>,
    y: &Bound<'_, PyAny>,
    x_index: &Bound<'_, PyAny>,
    y_index: &Bound<'_, PyAny>,
    gx: &Bound<'_, PyAny>,
    gy: &Bound<'_, PyAny>,
    normalize: bool,
    scale: f64,
    num_threads: i64,
) -> PyResult<()> {
    let arrays = [grad, x, y, x_index, y_index, gx, gy];
    match float_dtype(x, "x")? {
        Dtype::F32 => similarity_backward_t::<f32>(py, arrays, normalize, scale, num_threads),
        Dtype::F64 => similarity_backward_t::<f64>(py, arrays, normalize, scale, num_threads),
    }
}

fn similarity_backward_t<T: Element + Real>(
    py: Python<'_>,
    [grad, x, y, x_index, y_index, gx, gy]: [&Bound<'_, PyAny>; 7],
    normalize: bool,
    scale: f64,
    num_threads: i64,
) -> PyResult<()> {
    let ga = ro::<T, D3>(grad, "grad")?;
    let xa = ro::<T, D3>(x, "x")?;
    let ya = ro::<T, D3>(y, "y")?;
    let xi = ro::<i64, D1>(x_index, "x_index")?;
    let yi = ro::<i64, D1>(y_index, "y_index")?;
    let mut gxa = rw::<T, D3>(gx, "gx")?;
    let mut gya = rw::<T, D3>(gy, "gy")?;
    let (bx, n, d) = (xa.shape()[0], xa.shape()[1], xa.shape()[2]);
    let (by, m, dy) = (ya.shape()[0], ya.shape()[1], ya.shape()[2]);
    if dy != d {
        return Err(PyValueError::new_err(format!(
            "x and y must have the same last dimension, got {d} and {dy}"
        )));
    }
    let bo = xi.shape()[0];
    check_shape("y_index", yi.shape(), &[bo])?;
    check_shape("grad", ga.shape(), &[bo, n, m])?;
    check_shape("gx", gxa.shape(), &[bx, n, d])?;
    check_shape("gy", gya.shape(), &[by, m, d])?;
    let (gs, xs, ys) = (slice(&ga, "grad")?, slice(&xa, "x")?, slice(&ya, "y")?);
    let (xis, yis) = (slice(&xi, "x_index")?, slice(&yi, "y_index")?);
    let gxs = slice_mut(&mut gxa, "gx")?;
    let gys = slice_mut(&mut gya, "gy")?;
    let pool = pool::get(num_threads)?;
    py.detach(|| {
        pool.install(|| {
            mmot_core::similarity_backward(
                gs, xs, ys, xis, yis, gxs, gys, bx, n, by, m, d, normalize, scale,
            )
        })
    })
    .map_err(to_py)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(sinkhorn, m)?)?;
    m.add_function(wrap_pyfunction!(sinkhorn_backward, m)?)?;
    m.add_function(wrap_pyfunction!(multi_sinkhorn, m)?)?;
    m.add_function(wrap_pyfunction!(multi_sinkhorn_backward, m)?)?;
    m.add_function(wrap_pyfunction!(similarity, m)?)?;
    m.add_function(wrap_pyfunction!(similarity_backward, m)?)?;
    losses::register(m)?;
    Ok(())
}
