//! `sinkhorn_ext_forward` and `sinkhorn_ext_backward` (see `mmot_core::sinkhorn_ext`): the
//! general Sinkhorn path on padded ragged batches.

use crate::arrays::{for_float_type, input, output, to_py, Input};
use crate::{check_iters, run};
use mmot_core::{Dims, LogDomain, SinkhornExtInput, SinkhornExtOutput, SinkhornExtParams};
use numpy::Element;
use pyo3::prelude::*;

/// The general Sinkhorn forward on `scores` `[B, N, K]` with per-problem sizes `row_counts`,
/// `col_counts` `[B]` (int64), initial row potentials `init_f` `[B, N]` and schedule starts
/// `eps_start` `[B]` (float64). Writes `iters` `[B]` (int64), the valid blocks of `plan`
/// `[B, N, K]` (given zero-filled), `f` `[B, N]`, `g` `[B, K]` and `err` `[B]`.
#[pyfunction]
#[pyo3(signature = (scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start, iters, plan, f, g, err, eps, decay, n_iters, tol, reach, log_domain, num_threads))]
#[allow(clippy::too_many_arguments)]
fn sinkhorn_ext_forward(
    scores: &Bound<'_, PyAny>,
    row_mass: &Bound<'_, PyAny>,
    col_mass: &Bound<'_, PyAny>,
    row_counts: &Bound<'_, PyAny>,
    col_counts: &Bound<'_, PyAny>,
    init_f: &Bound<'_, PyAny>,
    eps_start: &Bound<'_, PyAny>,
    iters: &Bound<'_, PyAny>,
    plan: &Bound<'_, PyAny>,
    f: &Bound<'_, PyAny>,
    g: &Bound<'_, PyAny>,
    err: &Bound<'_, PyAny>,
    eps: f64,
    decay: f64,
    n_iters: i64,
    tol: f64,
    reach: f64,
    log_domain: &str,
    num_threads: i64,
) -> PyResult<()> {
    let params = params(eps, decay, check_iters(n_iters)?, tol, reach, log_domain)?;
    let py = scores.py();
    for_float_type!(scores, "scores", T => {
        let ins = Inputs::<T>::borrow(scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start)?;
        let [b, n, k] = ins.scores.shape();
        let mut iters = output::<i64, 1>(iters, "iters")?.shaped([b])?;
        let mut plan = output::<T, 3>(plan, "plan")?.shaped([b, n, k])?;
        let mut f = output::<T, 2>(f, "f")?.shaped([b, n])?;
        let mut g = output::<T, 2>(g, "g")?.shaped([b, k])?;
        let mut err = output::<T, 1>(err, "err")?.shaped([b])?;
        let input = ins.input()?;
        let out = SinkhornExtOutput {
            iters: iters.data()?,
            plan: plan.data()?,
            f: f.data()?,
            g: g.data()?,
            err: err.data()?,
        };
        run(py, num_threads, || {
            mmot_core::sinkhorn_ext_forward(&input, out, Dims::new(b, n, k), &params)
        })
    })
}

/// Vector-Jacobian product of `sinkhorn_ext_forward`'s plan w.r.t. `scores`, for the unrolled
/// iteration that ran `iters[b]` iterations: `grad` `[B, N, K]` in, `out` the gradient (its
/// valid blocks; given zero-filled).
#[pyfunction]
#[pyo3(signature = (grad, scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start, iters, out, eps, decay, reach, log_domain, num_threads))]
#[allow(clippy::too_many_arguments)]
fn sinkhorn_ext_backward(
    grad: &Bound<'_, PyAny>,
    scores: &Bound<'_, PyAny>,
    row_mass: &Bound<'_, PyAny>,
    col_mass: &Bound<'_, PyAny>,
    row_counts: &Bound<'_, PyAny>,
    col_counts: &Bound<'_, PyAny>,
    init_f: &Bound<'_, PyAny>,
    eps_start: &Bound<'_, PyAny>,
    iters: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    eps: f64,
    decay: f64,
    reach: f64,
    log_domain: &str,
    num_threads: i64,
) -> PyResult<()> {
    let params = params(eps, decay, 1, -1.0, reach, log_domain)?;
    let py = scores.py();
    for_float_type!(scores, "scores", T => {
        let grad = input::<T, 3>(grad, "grad")?;
        let ins = Inputs::<T>::borrow(scores, row_mass, col_mass, row_counts, col_counts, init_f, eps_start)?;
        let [b, n, k] = ins.scores.shape();
        let grad = grad.shaped([b, n, k])?;
        let iters = input::<i64, 1>(iters, "iters")?.shaped([b])?;
        let mut out = output::<T, 3>(out, "out")?.shaped([b, n, k])?;
        let input = ins.input()?;
        let (gr, it, o) = (grad.data()?, iters.data()?, out.data()?);
        run(py, num_threads, || {
            mmot_core::sinkhorn_ext_backward(gr, &input, it, o, Dims::new(b, n, k), &params)
        })
    })
}

fn params(
    eps: f64,
    decay: f64,
    n_iters: usize,
    tol: f64,
    reach: f64,
    log_domain: &str,
) -> PyResult<SinkhornExtParams> {
    let log_domain: LogDomain = log_domain.parse().map_err(to_py)?;
    Ok(SinkhornExtParams {
        eps,
        decay,
        n_iters,
        tol,
        reach,
        log_domain,
    })
}

/// The arrays both functions read, shapes checked against `scores`.
struct Inputs<'py, T: Element> {
    scores: Input<'py, T, 3>,
    row_mass: Input<'py, T, 2>,
    col_mass: Input<'py, T, 2>,
    row_counts: Input<'py, i64, 1>,
    col_counts: Input<'py, i64, 1>,
    init_f: Input<'py, T, 2>,
    eps_start: Input<'py, f64, 1>,
}

impl<'py, T: Element> Inputs<'py, T> {
    fn borrow(
        scores: &Bound<'py, PyAny>,
        row_mass: &Bound<'py, PyAny>,
        col_mass: &Bound<'py, PyAny>,
        row_counts: &Bound<'py, PyAny>,
        col_counts: &Bound<'py, PyAny>,
        init_f: &Bound<'py, PyAny>,
        eps_start: &Bound<'py, PyAny>,
    ) -> PyResult<Self> {
        let scores = input::<T, 3>(scores, "scores")?;
        let [b, n, k] = scores.shape();
        Ok(Inputs {
            scores,
            row_mass: input::<T, 2>(row_mass, "row_mass")?.shaped([b, n])?,
            col_mass: input::<T, 2>(col_mass, "col_mass")?.shaped([b, k])?,
            row_counts: input::<i64, 1>(row_counts, "row_counts")?.shaped([b])?,
            col_counts: input::<i64, 1>(col_counts, "col_counts")?.shaped([b])?,
            init_f: input::<T, 2>(init_f, "init_f")?.shaped([b, n])?,
            eps_start: input::<f64, 1>(eps_start, "eps_start")?.shaped([b])?,
        })
    }

    fn input(&self) -> PyResult<SinkhornExtInput<'_, T>> {
        Ok(SinkhornExtInput {
            scores: self.scores.data()?,
            row_mass: self.row_mass.data()?,
            col_mass: self.col_mass.data()?,
            row_counts: self.row_counts.data()?,
            col_counts: self.col_counts.data()?,
            init_f: self.init_f.data()?,
            eps_start: self.eps_start.data()?,
        })
    }
}

/// Adds this file's functions to `mmot._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(sinkhorn_ext_forward, m)?)?;
    m.add_function(wrap_pyfunction!(sinkhorn_ext_backward, m)?)?;
    Ok(())
}
