//! `multi_sinkhorn_ext_forward` and `multi_sinkhorn_ext_backward` (see
//! `mmot_core::multi_sinkhorn_ext`).

use crate::arrays::{for_float_type, input, output, to_py};
use crate::{check_iters, run};
use mmot_core::{
    ExtDims, LogDomain, MultiSinkhornExtInput, MultiSinkhornExtOutput, MultiSinkhornExtParams,
    Normalize,
};
use pyo3::prelude::*;

/// Multi-SK with options on a padded batch `scores` `[B, N, K]`: writes the target `[B, N, K]`,
/// the potentials `F` `[B, G, K]`, `Gam` `[B, N, K]`, `H` `[B, G, N]`, the iterations run `[B]`
/// (as floats) and the last marginal error `[B]`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (scores, row_counts, col_counts, counts, tops, target, f, gam, h, iters, err, weights, eps_start, eps, decay, n_iters, tol, normalize, log_domain, num_threads))]
fn multi_sinkhorn_ext_forward(
    scores: &Bound<'_, PyAny>,
    row_counts: &Bound<'_, PyAny>,
    col_counts: &Bound<'_, PyAny>,
    counts: &Bound<'_, PyAny>,
    tops: &Bound<'_, PyAny>,
    target: &Bound<'_, PyAny>,
    f: &Bound<'_, PyAny>,
    gam: &Bound<'_, PyAny>,
    h: &Bound<'_, PyAny>,
    iters: &Bound<'_, PyAny>,
    err: &Bound<'_, PyAny>,
    weights: Vec<f64>,
    eps_start: Vec<f64>,
    eps: f64,
    decay: f64,
    n_iters: i64,
    tol: f64,
    normalize: &str,
    log_domain: &str,
    num_threads: i64,
) -> PyResult<()> {
    let params = params(weights, eps, decay, n_iters, tol, normalize, log_domain)?;
    let py = scores.py();
    for_float_type!(scores, "scores", T => {
        let scores = input::<T, 3>(scores, "scores")?;
        let [b, n, k] = scores.shape();
        let g = params.weights.len();
        let row_counts = input::<i64, 1>(row_counts, "row_counts")?.shaped([b])?;
        let col_counts = input::<i64, 1>(col_counts, "col_counts")?.shaped([b])?;
        let counts = input::<T, 2>(counts, "counts")?.shaped([b, g])?;
        let tops = input::<T, 2>(tops, "tops")?.shaped([b, g])?;
        let mut target = output::<T, 3>(target, "target")?.shaped([b, n, k])?;
        let mut f = output::<T, 3>(f, "f")?.shaped([b, g, k])?;
        let mut gam = output::<T, 3>(gam, "gam")?.shaped([b, n, k])?;
        let mut h = output::<T, 3>(h, "h")?.shaped([b, g, n])?;
        let mut iters = output::<T, 1>(iters, "iters")?.shaped([b])?;
        let mut err = output::<T, 1>(err, "err")?.shaped([b])?;
        let input = MultiSinkhornExtInput {
            scores: scores.data()?,
            row_counts: row_counts.data()?,
            col_counts: col_counts.data()?,
            counts: counts.data()?,
            tops: tops.data()?,
            eps_start: &eps_start,
        };
        let mut ran = vec![0i64; b];
        let out = MultiSinkhornExtOutput {
            target: target.data()?,
            f: f.data()?,
            gam: gam.data()?,
            h: h.data()?,
            iters: &mut ran,
            err: err.data()?,
        };
        let dims = ExtDims { problems: b, rows: n, cols: k, groups: g };
        run(py, num_threads, || {
            mmot_core::multi_sinkhorn_ext_forward(input, out, dims, &params)
        })?;
        for (dst, &src) in iters.data()?.iter_mut().zip(&ran) {
            *dst = src as T;
        }
        Ok(())
    })
}

/// The VJP of `multi_sinkhorn_ext_forward`'s target w.r.t. `scores`, through `iters[b]`
/// (int64) unrolled iterations and the min-max step, into `out` `[B, N, K]`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (grad, scores, row_counts, col_counts, counts, tops, iters, out, weights, eps_start, eps, decay, normalize, log_domain, num_threads))]
fn multi_sinkhorn_ext_backward(
    grad: &Bound<'_, PyAny>,
    scores: &Bound<'_, PyAny>,
    row_counts: &Bound<'_, PyAny>,
    col_counts: &Bound<'_, PyAny>,
    counts: &Bound<'_, PyAny>,
    tops: &Bound<'_, PyAny>,
    iters: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    weights: Vec<f64>,
    eps_start: Vec<f64>,
    eps: f64,
    decay: f64,
    normalize: &str,
    log_domain: &str,
    num_threads: i64,
) -> PyResult<()> {
    let params = params(weights, eps, decay, 1, -1.0, normalize, log_domain)?;
    let py = scores.py();
    for_float_type!(scores, "scores", T => {
        let scores = input::<T, 3>(scores, "scores")?;
        let [b, n, k] = scores.shape();
        let g = params.weights.len();
        let grad = input::<T, 3>(grad, "grad")?.shaped([b, n, k])?;
        let row_counts = input::<i64, 1>(row_counts, "row_counts")?.shaped([b])?;
        let col_counts = input::<i64, 1>(col_counts, "col_counts")?.shaped([b])?;
        let counts = input::<T, 2>(counts, "counts")?.shaped([b, g])?;
        let tops = input::<T, 2>(tops, "tops")?.shaped([b, g])?;
        let iters = input::<i64, 1>(iters, "iters")?.shaped([b])?;
        let mut out = output::<T, 3>(out, "out")?.shaped([b, n, k])?;
        let input = MultiSinkhornExtInput {
            scores: scores.data()?,
            row_counts: row_counts.data()?,
            col_counts: col_counts.data()?,
            counts: counts.data()?,
            tops: tops.data()?,
            eps_start: &eps_start,
        };
        let (gr, it, o) = (grad.data()?, iters.data()?, out.data()?);
        let dims = ExtDims { problems: b, rows: n, cols: k, groups: g };
        run(py, num_threads, || {
            mmot_core::multi_sinkhorn_ext_backward(gr, input, it, o, dims, &params)
        })
    })
}

fn params(
    weights: Vec<f64>,
    eps: f64,
    decay: f64,
    n_iters: i64,
    tol: f64,
    normalize: &str,
    log_domain: &str,
) -> PyResult<MultiSinkhornExtParams> {
    Ok(MultiSinkhornExtParams {
        weights,
        eps,
        decay,
        n_iters: check_iters(n_iters)?,
        tol,
        normalize: normalize.parse::<Normalize>().map_err(to_py)?,
        log_domain: log_domain.parse::<LogDomain>().map_err(to_py)?,
    })
}

/// Adds this file's functions to `mmot._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(multi_sinkhorn_ext_forward, m)?)?;
    m.add_function(wrap_pyfunction!(multi_sinkhorn_ext_backward, m)?)?;
    Ok(())
}
