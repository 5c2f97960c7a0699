//! Borrowing numpy arrays as slices, with the error messages the Python layer forwards.
//!
//! Everything is zero-copy: torch tensors arrive as `tensor.numpy()` views and are borrowed
//! through rust-numpy's dynamic borrow checker, which also rejects `out` aliasing an input.

use mmot_core::MmotError;
use numpy::{
    Element, PyArrayDescrMethods, PyReadonlyArray, PyReadwriteArray, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// Float dtype of a call, taken from its first float array.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F64,
}

pub fn float_dtype(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Dtype> {
    let arr = untyped(obj, name)?;
    let dt = arr.dtype();
    let py = obj.py();
    if dt.is_equiv_to(&numpy::dtype::<f32>(py)) {
        Ok(Dtype::F32)
    } else if dt.is_equiv_to(&numpy::dtype::<f64>(py)) {
        Ok(Dtype::F64)
    } else {
        Err(PyTypeError::new_err(format!(
            "{name} must be a float32 or float64 array, got dtype {dt}"
        )))
    }
}

fn untyped<'a, 'py>(
    obj: &'a Bound<'py, PyAny>,
    name: &str,
) -> PyResult<&'a Bound<'py, PyUntypedArray>> {
    obj.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a numpy array, got {}",
            obj.get_type()
                .name()
                .map_or_else(|_| "?".to_string(), |n| n.to_string())
        ))
    })
}

/// Explains why `obj` is not a C-contiguous `ndim`-D array of `T`.
fn mismatch<T: Element>(obj: &Bound<'_, PyAny>, name: &str, ndim: usize) -> PyErr {
    let arr = match untyped(obj, name) {
        Ok(a) => a,
        Err(e) => return e,
    };
    let want = numpy::dtype::<T>(obj.py());
    if !arr.dtype().is_equiv_to(&want) {
        return PyTypeError::new_err(format!(
            "{name} must have dtype {want} (the same float dtype as the other arrays), got {}",
            arr.dtype()
        ));
    }
    if arr.ndim() != ndim {
        return PyValueError::new_err(format!(
            "{name} must be {ndim}-D, got shape {:?}",
            arr.shape()
        ));
    }
    PyValueError::new_err(format!(
        "{name} could not be borrowed (is it writeable and not aliased by another argument?)"
    ))
}

pub fn ro<'py, T: Element, D: ndarray_dim::Dim>(
    obj: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<PyReadonlyArray<'py, T, D::Ix>> {
    obj.extract::<PyReadonlyArray<'py, T, D::Ix>>()
        .map_err(|_| mismatch::<T>(obj, name, D::NDIM))
}

pub fn rw<'py, T: Element, D: ndarray_dim::Dim>(
    obj: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<PyReadwriteArray<'py, T, D::Ix>> {
    obj.extract::<PyReadwriteArray<'py, T, D::Ix>>()
        .map_err(|_| mismatch::<T>(obj, name, D::NDIM))
}

/// Dimension markers, so call sites say `ro::<f32, D3>(..)`.
pub mod ndarray_dim {
    pub trait Dim {
        type Ix: numpy::ndarray::Dimension;
        const NDIM: usize;
    }
    pub struct D1;
    pub struct D2;
    pub struct D3;
    impl Dim for D1 {
        type Ix = numpy::Ix1;
        const NDIM: usize = 1;
    }
    impl Dim for D2 {
        type Ix = numpy::Ix2;
        const NDIM: usize = 2;
    }
    impl Dim for D3 {
        type Ix = numpy::Ix3;
        const NDIM: usize = 3;
    }
}

pub fn slice<'a, T: Element, D: numpy::ndarray::Dimension>(
    a: &'a PyReadonlyArray<'_, T, D>,
    name: &str,
) -> PyResult<&'a [T]> {
    // `as_slice` also accepts Fortran order, which would silently transpose the data.
    if !a.is_c_contiguous() {
        return Err(not_c_contiguous(name));
    }
    a.as_slice().map_err(|_| not_c_contiguous(name))
}

/// The slice of an output array (the bindings use it for nothing else), with huge-page advice
/// for a large one ([`advise_huge_pages`]).
pub fn slice_mut<'a, T: Element, D: numpy::ndarray::Dimension>(
    a: &'a mut PyReadwriteArray<'_, T, D>,
    name: &str,
) -> PyResult<&'a mut [T]> {
    if !a.is_c_contiguous() {
        return Err(not_c_contiguous(name));
    }
    let s = a.as_slice_mut().map_err(|_| not_c_contiguous(name))?;
    advise_huge_pages(s);
    Ok(s)
}

/// Outputs at least this large get huge-page advice (a few 2 MiB pages' worth).
const HUGE_ADVICE_MIN_BYTES: usize = 8 << 20;

/// Asks the kernel to back the 2 MiB-aligned interior of a large output with transparent huge
/// pages. Fresh large torch outputs come straight from `mmap` (they are above glibc's mmap
/// threshold) and would otherwise fault in 4 KiB at a time as the kernel first writes them:
/// ~12,000 faults for a 49 MB result, which can cost more than the kernel itself. With THP in
/// `madvise` mode (the common default) nothing happens without this. Only advice: errors are
/// ignored, and pages that are already present are unaffected.
fn advise_huge_pages<T>(s: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = std::mem::size_of_val(s);
        if bytes < HUGE_ADVICE_MIN_BYTES {
            return;
        }
        let start = (s.as_mut_ptr() as usize).next_multiple_of(HUGE);
        let end = (s.as_mut_ptr() as usize + bytes) / HUGE * HUGE;
        if end > start {
            // SAFETY: [start, end) lies inside `s`, which is mapped; the advice changes no
            // contents.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (s, HUGE_ADVICE_MIN_BYTES);
}

fn not_c_contiguous(name: &str) -> PyErr {
    PyValueError::new_err(format!("{name} must be C-contiguous"))
}

pub fn to_py(e: MmotError) -> PyErr {
    PyValueError::new_err(e.to_string())
}
