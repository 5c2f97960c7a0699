//! `sharded_sinkhorn`, `sharded_multi_sinkhorn` and their backwards (see
//! `mmot_core::sharded_sinkhorn`): the rows of a process group's shard, with the column sums
//! summed over the group by a Python callable between iterations.

use crate::arrays::{for_float_type, input, output};
use crate::{check_iters, run};
use mmot_core::{Collective, Dims, MmotError, ShardedMultiParams, SlotGroup};
use numpy::{Element, PyArray1, PyArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// The group's sums through `reduce(array)`, a Python callable that replaces a 1-D numpy array
/// in place by its sum over the processes (`torch.distributed.all_reduce`). The first Python
/// error is kept and raised once the kernel has returned.
struct PyCollective {
    reduce: Py<PyAny>,
    error: Option<PyErr>,
}

impl<T: Element + Copy> Collective<T> for PyCollective {
    fn sum(&mut self, buf: &mut [T]) -> mmot_core::Result<()> {
        let result = Python::attach(|py| -> PyResult<()> {
            let array = PyArray1::from_slice(py, buf);
            self.reduce.bind(py).call1((array.clone(),))?;
            let view = array.readonly();
            let summed = view
                .as_slice()
                .map_err(|_| PyValueError::new_err("reduce left a non-contiguous array"))?;
            buf.copy_from_slice(summed);
            Ok(())
        });
        result.map_err(|error| {
            self.error = Some(error);
            MmotError::InvalidArgument("the collective (reduce) failed".into())
        })
    }
}

fn finish<R>(result: PyResult<R>, comm: &mut PyCollective) -> PyResult<R> {
    match comm.error.take() {
        Some(error) => Err(error),
        None => result,
    }
}

/// This process's rows of Sinkhorn on `scores` `[B, n, K]` into `out`; `shift` `[B, K]` the
/// column maxima over the group, `log` the domain.
#[pyfunction]
#[pyo3(signature = (scores, shift, row_mass, col_mass, out, eps, n_iters, log, reduce, num_threads))]
#[allow(clippy::too_many_arguments)]
fn sharded_sinkhorn(
    scores: &Bound<'_, PyAny>,
    shift: &Bound<'_, PyAny>,
    row_mass: &Bound<'_, PyAny>,
    col_mass: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    eps: f64,
    n_iters: i64,
    log: bool,
    reduce: Py<PyAny>,
    num_threads: i64,
) -> PyResult<()> {
    let n_iters = check_iters(n_iters)?;
    let py = scores.py();
    let mut comm = PyCollective {
        reduce,
        error: None,
    };
    for_float_type!(scores, "scores", T => {
        let scores = input::<T, 3>(scores, "scores")?;
        let [b, n, k] = scores.shape();
        let shift = input::<T, 2>(shift, "shift")?.shaped([b, k])?;
        let row_mass = input::<T, 2>(row_mass, "row_mass")?.shaped([b, n])?;
        let col_mass = input::<T, 2>(col_mass, "col_mass")?.shaped([b, k])?;
        let mut out = output::<T, 3>(out, "out")?.shaped([b, n, k])?;
        let (s, sh, r, c) = (scores.data()?, shift.data()?, row_mass.data()?, col_mass.data()?);
        let o = out.data()?;
        let comm_ref = &mut comm;
        let result = run(py, num_threads, move || {
            mmot_core::sharded_sinkhorn(s, sh, r, c, o, Dims::new(b, n, k), eps, n_iters, log, comm_ref)
        });
        finish(result, &mut comm)
    })
}

/// The VJP of `sharded_sinkhorn` for this process's rows: `grad` in, `out` the gradient.
#[pyfunction]
#[pyo3(signature = (grad, scores, shift, row_mass, col_mass, out, eps, n_iters, reduce, num_threads))]
#[allow(clippy::too_many_arguments)]
fn sharded_sinkhorn_backward(
    grad: &Bound<'_, PyAny>,
    scores: &Bound<'_, PyAny>,
    shift: &Bound<'_, PyAny>,
    row_mass: &Bound<'_, PyAny>,
    col_mass: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    eps: f64,
    n_iters: i64,
    reduce: Py<PyAny>,
    num_threads: i64,
) -> PyResult<()> {
    let n_iters = check_iters(n_iters)?;
    let py = scores.py();
    let mut comm = PyCollective {
        reduce,
        error: None,
    };
    for_float_type!(scores, "scores", T => {
        let grad = input::<T, 3>(grad, "grad")?;
        let scores = input::<T, 3>(scores, "scores")?;
        let [b, n, k] = scores.shape();
        let grad = grad.shaped([b, n, k])?;
        let shift = input::<T, 2>(shift, "shift")?.shaped([b, k])?;
        let row_mass = input::<T, 2>(row_mass, "row_mass")?.shaped([b, n])?;
        let col_mass = input::<T, 2>(col_mass, "col_mass")?.shaped([b, k])?;
        let mut out = output::<T, 3>(out, "out")?.shaped([b, n, k])?;
        let (g, s, sh) = (grad.data()?, scores.data()?, shift.data()?);
        let (r, c) = (row_mass.data()?, col_mass.data()?);
        let o = out.data()?;
        let comm_ref = &mut comm;
        let result = run(py, num_threads, move || {
            mmot_core::sharded_sinkhorn_backward(g, s, sh, r, c, o, Dims::new(b, n, k), eps, n_iters, comm_ref)
        });
        finish(result, &mut comm)
    })
}

fn multi_params(
    eps: f64,
    n_iters: i64,
    weights: Vec<f64>,
    counts: Vec<usize>,
    tops: Vec<usize>,
    minmax: bool,
) -> PyResult<ShardedMultiParams> {
    if weights.len() != counts.len() || weights.len() != tops.len() {
        return Err(PyValueError::new_err(format!(
            "weights, counts and tops must have equal lengths, got {}, {} and {}",
            weights.len(),
            counts.len(),
            tops.len()
        )));
    }
    let groups = weights
        .iter()
        .zip(&counts)
        .zip(&tops)
        .map(|((&weight, &count), &top)| SlotGroup { weight, count, top })
        .collect();
    Ok(ShardedMultiParams {
        eps,
        n_iters: check_iters(n_iters)?,
        groups,
        minmax,
    })
}

/// This process's rows of grouped Multi-SK on `scores` `[B, n, K]` into `out`; the slot groups
/// as (weights, counts, tops) (`mmot.reference.slot_groups`).
#[pyfunction]
#[pyo3(signature = (scores, shift, anchor_mass, out, eps, n_iters, weights, counts, tops, minmax, log, reduce, num_threads))]
#[allow(clippy::too_many_arguments)]
fn sharded_multi_sinkhorn(
    scores: &Bound<'_, PyAny>,
    shift: &Bound<'_, PyAny>,
    anchor_mass: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    eps: f64,
    n_iters: i64,
    weights: Vec<f64>,
    counts: Vec<usize>,
    tops: Vec<usize>,
    minmax: bool,
    log: bool,
    reduce: Py<PyAny>,
    num_threads: i64,
) -> PyResult<()> {
    let params = multi_params(eps, n_iters, weights, counts, tops, minmax)?;
    let py = scores.py();
    let mut comm = PyCollective {
        reduce,
        error: None,
    };
    for_float_type!(scores, "scores", T => {
        let scores = input::<T, 3>(scores, "scores")?;
        let [b, n, k] = scores.shape();
        let shift = input::<T, 2>(shift, "shift")?.shaped([b, k])?;
        let anchor_mass = input::<T, 2>(anchor_mass, "anchor_mass")?.shaped([b, k])?;
        let mut out = output::<T, 3>(out, "out")?.shaped([b, n, k])?;
        let (s, sh, r) = (scores.data()?, shift.data()?, anchor_mass.data()?);
        let o = out.data()?;
        let comm_ref = &mut comm;
        let params = &params;
        let result = run(py, num_threads, move || {
            mmot_core::sharded_multi_sinkhorn(s, sh, r, o, Dims::new(b, n, k), params, log, comm_ref)
        });
        finish(result, &mut comm)
    })
}

/// The VJP of `sharded_multi_sinkhorn` for this process's rows (through the min-max step),
/// replaying the forward in the domain `log`.
#[pyfunction]
#[pyo3(signature = (grad, scores, shift, anchor_mass, out, eps, n_iters, weights, counts, tops, minmax, log, reduce, num_threads))]
#[allow(clippy::too_many_arguments)]
fn sharded_multi_sinkhorn_backward(
    grad: &Bound<'_, PyAny>,
    scores: &Bound<'_, PyAny>,
    shift: &Bound<'_, PyAny>,
    anchor_mass: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    eps: f64,
    n_iters: i64,
    weights: Vec<f64>,
    counts: Vec<usize>,
    tops: Vec<usize>,
    minmax: bool,
    log: bool,
    reduce: Py<PyAny>,
    num_threads: i64,
) -> PyResult<()> {
    let params = multi_params(eps, n_iters, weights, counts, tops, minmax)?;
    let py = scores.py();
    let mut comm = PyCollective {
        reduce,
        error: None,
    };
    for_float_type!(scores, "scores", T => {
        let grad = input::<T, 3>(grad, "grad")?;
        let scores = input::<T, 3>(scores, "scores")?;
        let [b, n, k] = scores.shape();
        let grad = grad.shaped([b, n, k])?;
        let shift = input::<T, 2>(shift, "shift")?.shaped([b, k])?;
        let anchor_mass = input::<T, 2>(anchor_mass, "anchor_mass")?.shaped([b, k])?;
        let mut out = output::<T, 3>(out, "out")?.shaped([b, n, k])?;
        let (g, s, sh, r) = (grad.data()?, scores.data()?, shift.data()?, anchor_mass.data()?);
        let o = out.data()?;
        let comm_ref = &mut comm;
        let params = &params;
        let result = run(py, num_threads, move || {
            mmot_core::sharded_multi_sinkhorn_backward(g, s, sh, r, o, Dims::new(b, n, k), params, log, comm_ref)
        });
        finish(result, &mut comm)
    })
}

/// Adds this file's functions to `mmot._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(sharded_sinkhorn, m)?)?;
    m.add_function(wrap_pyfunction!(sharded_sinkhorn_backward, m)?)?;
    m.add_function(wrap_pyfunction!(sharded_multi_sinkhorn, m)?)?;
    m.add_function(wrap_pyfunction!(sharded_multi_sinkhorn_backward, m)?)?;
    Ok(())
}
