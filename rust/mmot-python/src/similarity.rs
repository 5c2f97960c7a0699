//! `similarity` and `similarity_backward` (see `mmot_core::similarity`).

use crate::arrays::{for_float_type, input, output, Input};
use crate::run;
use mmot_core::{SimilarityDims, SimilarityInput, SimilarityParams};
use numpy::Element;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// `out[o] = scale · x̂[x_index[o]] ŷ[y_index[o]]ᵀ` for `x` `[Bx, N, D]`, `y` `[By, M, D]`.
#[pyfunction]
#[pyo3(signature = (x, y, x_index, y_index, out, normalize, scale, num_threads, check_finite=false))]
fn similarity(
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
    let params = SimilarityParams {
        normalize,
        scale,
        check_finite,
    };
    let py = x.py();
    for_float_type!(x, "x", T => {
        let pairs = Pairs::<T>::borrow(x, y, x_index, y_index)?;
        let dims = pairs.dims()?;
        let mut out = output::<T, 3>(out, "out")?.shaped([pairs.count(), dims.x_rows, dims.y_rows])?;
        let input = pairs.input()?;
        let o = out.data()?;
        run(py, num_threads, || mmot_core::similarity(input, o, dims, &params))
    })
}

/// Gradients of `similarity`: `grad` `[Bo, N, M]` in; `gx` `[Bx, N, D]` and `gy` `[By, M, D]`
/// are written (summed over the output problems sharing an input problem).
#[pyfunction]
#[pyo3(signature = (grad, x, y, x_index, y_index, gx, gy, normalize, scale, num_threads))]
fn similarity_backward(
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
    let params = SimilarityParams {
        normalize,
        scale,
        check_finite: false,
    };
    let py = x.py();
    for_float_type!(x, "x", T => {
        let grad = input::<T, 3>(grad, "grad")?;
        let pairs = Pairs::<T>::borrow(x, y, x_index, y_index)?;
        let dims = pairs.dims()?;
        let grad = grad.shaped([pairs.count(), dims.x_rows, dims.y_rows])?;
        let [x_shape, y_shape] = [pairs.x.shape(), pairs.y.shape()];
        let mut gx = output::<T, 3>(gx, "gx")?.shaped(x_shape)?;
        let mut gy = output::<T, 3>(gy, "gy")?.shaped(y_shape)?;
        let (g, input) = (grad.data()?, pairs.input()?);
        let (gxs, gys) = (gx.data()?, gy.data()?);
        run(py, num_threads, || {
            mmot_core::similarity_backward(g, input, gxs, gys, dims, &params)
        })
    })
}

/// The arrays both functions read: `x`, `y` and the index arrays pairing their problems.
struct Pairs<'py, T: Element> {
    x: Input<'py, T, 3>,
    y: Input<'py, T, 3>,
    x_index: Input<'py, i64, 1>,
    y_index: Input<'py, i64, 1>,
}

impl<'py, T: Element> Pairs<'py, T> {
    fn borrow(
        x: &Bound<'py, PyAny>,
        y: &Bound<'py, PyAny>,
        x_index: &Bound<'py, PyAny>,
        y_index: &Bound<'py, PyAny>,
    ) -> PyResult<Self> {
        Ok(Pairs {
            x: input(x, "x")?,
            y: input(y, "y")?,
            x_index: input(x_index, "x_index")?,
            y_index: input(y_index, "y_index")?,
        })
    }

    /// Output problems: one per entry of the index arrays.
    fn count(&self) -> usize {
        self.x_index.shape()[0]
    }

    /// The call's shapes, if `x` and `y` have the same row length and the index arrays the
    /// same length.
    fn dims(&self) -> PyResult<SimilarityDims> {
        let [x_problems, x_rows, features] = self.x.shape();
        let [y_problems, y_rows, y_features] = self.y.shape();
        if y_features != features {
            return Err(PyValueError::new_err(format!(
                "x and y must have the same last dimension, got {features} and {y_features}"
            )));
        }
        crate::arrays::check_shape("y_index", &self.y_index.shape(), &[self.count()])?;
        Ok(SimilarityDims {
            x_problems,
            x_rows,
            y_problems,
            y_rows,
            features,
        })
    }

    fn input(&self) -> PyResult<SimilarityInput<'_, T>> {
        Ok(SimilarityInput {
            x: self.x.data()?,
            y: self.y.data()?,
            x_index: self.x_index.data()?,
            y_index: self.y_index.data()?,
        })
    }
}

/// Adds this file's functions to `mmot._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(similarity, m)?)?;
    m.add_function(wrap_pyfunction!(similarity_backward, m)?)?;
    Ok(())
}
