//! `nt_xent_self_lse`, `nt_xent_cross_lse`, `nt_xent_self_grad` and `nt_xent_cross_grad`: the
//! block primitives of NT-Xent and CoMM's loss (see `mmot_core::nt_xent`). Rows come in
//! normalised; the caller combines the blocks.

use crate::arrays::{for_float_type, input, output};
use crate::run;
use mmot_core::nt_xent;
use pyo3::prelude::*;

/// Row log-sum-exps of `z zᵀ / τ` without the diagonal into `out` (`[N]`).
#[pyfunction]
#[pyo3(signature = (z, out, temperature, num_threads))]
fn nt_xent_self_lse(
    z: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    temperature: f64,
    num_threads: i64,
) -> PyResult<()> {
    let py = z.py();
    for_float_type!(z, "z", T => {
        let z = input::<T, 2>(z, "z")?;
        let [n, d] = z.shape();
        let mut out = output::<T, 1>(out, "out")?.shaped([n])?;
        let (zs, o) = (z.data()?, out.data()?);
        run(py, num_threads, || nt_xent::self_lse(zs, n, d, temperature, o))
    })
}

/// Row and column log-sum-exps of `x yᵀ / τ` into `rows` and `cols` (`[N]` each).
#[pyfunction]
#[pyo3(signature = (x, y, rows, cols, temperature, num_threads))]
fn nt_xent_cross_lse(
    x: &Bound<'_, PyAny>,
    y: &Bound<'_, PyAny>,
    rows: &Bound<'_, PyAny>,
    cols: &Bound<'_, PyAny>,
    temperature: f64,
    num_threads: i64,
) -> PyResult<()> {
    let py = x.py();
    for_float_type!(x, "x", T => {
        let x = input::<T, 2>(x, "x")?;
        let [n, d] = x.shape();
        let y = input::<T, 2>(y, "y")?.shaped([n, d])?;
        let mut rows = output::<T, 1>(rows, "rows")?.shaped([n])?;
        let mut cols = output::<T, 1>(cols, "cols")?.shaped([n])?;
        let (xs, ys, r, c) = (x.data()?, y.data()?, rows.data()?, cols.data()?);
        run(py, num_threads, || nt_xent::cross_lse(xs, ys, n, d, temperature, r, c))
    })
}

/// A self block's gradient `(1/τ) Σ_{j≠i} (c_i e^{S_ij − l_i} + c_j e^{S_ij − l_j}) z_j` into `dz`.
#[pyfunction]
#[pyo3(signature = (z, c, l, dz, temperature, num_threads))]
fn nt_xent_self_grad(
    z: &Bound<'_, PyAny>,
    c: &Bound<'_, PyAny>,
    l: &Bound<'_, PyAny>,
    dz: &Bound<'_, PyAny>,
    temperature: f64,
    num_threads: i64,
) -> PyResult<()> {
    let py = z.py();
    for_float_type!(z, "z", T => {
        let z = input::<T, 2>(z, "z")?;
        let [n, d] = z.shape();
        let c = input::<T, 1>(c, "c")?.shaped([n])?;
        let l = input::<T, 1>(l, "l")?.shaped([n])?;
        let mut dz = output::<T, 2>(dz, "dz")?.shaped([n, d])?;
        let (zs, cs, ls, o) = (z.data()?, c.data()?, l.data()?, dz.data()?);
        run(py, num_threads, || nt_xent::self_grad(zs, cs, ls, n, d, temperature, o))
    })
}

/// A cross block's gradients with `G_ij = p_i e^{C_ij − lp_i} + q_j e^{C_ij − lq_j}` into `dx`, `dy`.
#[pyfunction]
#[pyo3(signature = (x, y, p, lp, q, lq, dx, dy, temperature, num_threads))]
#[allow(clippy::too_many_arguments)]
fn nt_xent_cross_grad(
    x: &Bound<'_, PyAny>,
    y: &Bound<'_, PyAny>,
    p: &Bound<'_, PyAny>,
    lp: &Bound<'_, PyAny>,
    q: &Bound<'_, PyAny>,
    lq: &Bound<'_, PyAny>,
    dx: &Bound<'_, PyAny>,
    dy: &Bound<'_, PyAny>,
    temperature: f64,
    num_threads: i64,
) -> PyResult<()> {
    let py = x.py();
    for_float_type!(x, "x", T => {
        let x = input::<T, 2>(x, "x")?;
        let [n, d] = x.shape();
        let y = input::<T, 2>(y, "y")?.shaped([n, d])?;
        let p = input::<T, 1>(p, "p")?.shaped([n])?;
        let lp = input::<T, 1>(lp, "lp")?.shaped([n])?;
        let q = input::<T, 1>(q, "q")?.shaped([n])?;
        let lq = input::<T, 1>(lq, "lq")?.shaped([n])?;
        let mut dx = output::<T, 2>(dx, "dx")?.shaped([n, d])?;
        let mut dy = output::<T, 2>(dy, "dy")?.shaped([n, d])?;
        let (xs, ys) = (x.data()?, y.data()?);
        let coef = [p.data()?, lp.data()?, q.data()?, lq.data()?];
        let (gx, gy) = (dx.data()?, dy.data()?);
        run(py, num_threads, || nt_xent::cross_grad(xs, ys, coef, n, d, temperature, gx, gy))
    })
}

/// Adds this file's functions to `mmot._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(nt_xent_self_lse, m)?)?;
    m.add_function(wrap_pyfunction!(nt_xent_cross_lse, m)?)?;
    m.add_function(wrap_pyfunction!(nt_xent_self_grad, m)?)?;
    m.add_function(wrap_pyfunction!(nt_xent_cross_grad, m)?)?;
    Ok(())
}
