//! `sinkhorn_implicit_backward` and `multi_sinkhorn_implicit_backward` (see
//! `mmot_core::implicit`).

use crate::arrays::{for_float_type, input, output, to_py};
use crate::run;
use mmot_core::implicit::MultiImplicitParams;
use mmot_core::{Dims, Normalize};
use pyo3::prelude::*;

/// Implicit (fixed-point adjoint) gradient of the scores of converged Sinkhorn for `grad` =
/// ∂L/∂plan, all `[B, N, K]`, on a ragged padded batch; `iters` (`[B]` int64) receives each
/// problem's CG iterations. Returns the largest of them.
#[pyfunction]
#[pyo3(signature = (grad, plan, row_counts, col_counts, out, iters, eps, reach, num_threads))]
fn sinkhorn_implicit_backward(
    grad: &Bound<'_, PyAny>,
    plan: &Bound<'_, PyAny>,
    row_counts: &Bound<'_, PyAny>,
    col_counts: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    iters: &Bound<'_, PyAny>,
    eps: f64,
    reach: f64,
    num_threads: i64,
) -> PyResult<i64> {
    let py = plan.py();
    for_float_type!(plan, "plan", T => {
        let grad = input::<T, 3>(grad, "grad")?;
        let plan = input::<T, 3>(plan, "plan")?;
        let [b, n, k] = plan.shape();
        let grad = grad.shaped([b, n, k])?;
        let rows = input::<i64, 1>(row_counts, "row_counts")?.shaped([b])?;
        let cols = input::<i64, 1>(col_counts, "col_counts")?.shaped([b])?;
        let mut out = output::<T, 3>(out, "out")?.shaped([b, n, k])?;
        let mut iters = output::<i64, 1>(iters, "iters")?.shaped([b])?;
        let (g, p, rc, cc) = (grad.data()?, plan.data()?, rows.data()?, cols.data()?);
        let (o, it) = (out.data()?, iters.data()?);
        run(py, num_threads, || {
            mmot_core::implicit::sinkhorn_implicit_backward(
                g, p, rc, cc, o, it, Dims::new(b, n, k), eps, reach,
            )?;
            Ok(it.iter().copied().max().unwrap_or(0))
        })
    })
}

/// Implicit gradient of the scores of converged grouped Multi-SK for `grad` = ∂L/∂T (of the
/// min-max-normalised target with `normalize="minmax"`, of T_raw with "none"); `F` `[B, G, K]`,
/// `Gam` `[B, N, K]`, `H` `[B, G, N]`, `counts`/`tops` `[B, G]`. Returns the largest CG
/// iteration count.
#[pyfunction]
#[pyo3(signature = (grad, scores, f, gam, h, row_counts, col_counts, counts, tops, out, iters, weights, eps, normalize, num_threads))]
#[allow(clippy::too_many_arguments)]
fn multi_sinkhorn_implicit_backward(
    grad: &Bound<'_, PyAny>,
    scores: &Bound<'_, PyAny>,
    f: &Bound<'_, PyAny>,
    gam: &Bound<'_, PyAny>,
    h: &Bound<'_, PyAny>,
    row_counts: &Bound<'_, PyAny>,
    col_counts: &Bound<'_, PyAny>,
    counts: &Bound<'_, PyAny>,
    tops: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    iters: &Bound<'_, PyAny>,
    weights: Vec<f64>,
    eps: f64,
    normalize: &str,
    num_threads: i64,
) -> PyResult<i64> {
    let py = scores.py();
    let g = weights.len();
    let normalize = normalize.parse::<Normalize>().map_err(to_py)?;
    let params = MultiImplicitParams {
        eps,
        weights,
        normalize,
    };
    for_float_type!(scores, "scores", T => {
        let grad = input::<T, 3>(grad, "grad")?;
        let scores = input::<T, 3>(scores, "scores")?;
        let [b, n, k] = scores.shape();
        let grad = grad.shaped([b, n, k])?;
        let f = input::<T, 3>(f, "F")?.shaped([b, g, k])?;
        let gam = input::<T, 3>(gam, "Gam")?.shaped([b, n, k])?;
        let h = input::<T, 3>(h, "H")?.shaped([b, g, n])?;
        let rows = input::<i64, 1>(row_counts, "row_counts")?.shaped([b])?;
        let cols = input::<i64, 1>(col_counts, "col_counts")?.shaped([b])?;
        let counts = input::<T, 2>(counts, "counts")?.shaped([b, g])?;
        let tops = input::<T, 2>(tops, "tops")?.shaped([b, g])?;
        let mut out = output::<T, 3>(out, "out")?.shaped([b, n, k])?;
        let mut iters = output::<i64, 1>(iters, "iters")?.shaped([b])?;
        let (gr, s, fv, gm, hv) = (grad.data()?, scores.data()?, f.data()?, gam.data()?, h.data()?);
        let (rc, cc, cn, tp) = (rows.data()?, cols.data()?, counts.data()?, tops.data()?);
        let (o, it) = (out.data()?, iters.data()?);
        run(py, num_threads, || {
            mmot_core::implicit::multi_sinkhorn_implicit_backward(
                gr, s, fv, gm, hv, rc, cc, cn, tp, o, it, Dims::new(b, n, k), &params,
            )?;
            Ok(it.iter().copied().max().unwrap_or(0))
        })
    })
}

/// Adds this file's functions to `mmot._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(sinkhorn_implicit_backward, m)?)?;
    m.add_function(wrap_pyfunction!(multi_sinkhorn_implicit_backward, m)?)?;
    Ok(())
}
