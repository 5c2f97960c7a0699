//! Borrowing numpy arrays as slices, with the error messages the Python layer forwards.
//!
//! Everything is zero-copy: torch tensors arrive as `tensor.numpy()` views and are borrowed
//! through rust-numpy's dynamic borrow checker, which also rejects `out` aliasing an input.
//! Every binding does the same: [`input`] for each array it reads and [`output`] for each it
//! writes (in that order, so that an aliased `out` is the one refused), shapes checked with
//! [`Input::shaped`] / [`Output::shaped`], then the slices.

use mmot_core::MmotError;
use numpy::{
    Element, PyArrayDescrMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyKeyboardInterrupt, PyTypeError, PyValueError};
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

/// Runs `$body` with the type `$T` bound to the float type (f32 or f64) of the array `$array`
/// named `$name`: the one dtype dispatch of every binding.
macro_rules! for_float_type {
    ($array:expr, $name:expr, $T:ident => $body:expr) => {
        match $crate::arrays::float_dtype($array, $name)? {
            $crate::arrays::Dtype::F32 => {
                type $T = f32;
                $body
            }
            $crate::arrays::Dtype::F64 => {
                type $T = f64;
                $body
            }
        }
    };
}
pub(crate) use for_float_type;

/// An array a kernel reads: `N` dimensions of `T`, borrowed read-only.
pub struct Input<'py, T: Element, const N: usize> {
    array: PyReadonlyArrayDyn<'py, T>,
    name: &'static str,
}

/// An array a kernel writes: `N` dimensions of `T`, borrowed read-write.
pub struct Output<'py, T: Element, const N: usize> {
    array: PyReadwriteArrayDyn<'py, T>,
    name: &'static str,
}

/// Borrows `obj`, which must be an `N`-D array of `T`, for reading.
pub fn input<'py, T: Element, const N: usize>(
    obj: &Bound<'py, PyAny>,
    name: &'static str,
) -> PyResult<Input<'py, T, N>> {
    let array = obj
        .extract::<PyReadonlyArrayDyn<'py, T>>()
        .map_err(|_| mismatch::<T>(obj, name))?;
    check_ndim(name, array.shape(), N)?;
    Ok(Input { array, name })
}

/// Borrows `obj`, which must be an `N`-D array of `T`, for writing.
pub fn output<'py, T: Element, const N: usize>(
    obj: &Bound<'py, PyAny>,
    name: &'static str,
) -> PyResult<Output<'py, T, N>> {
    let array = obj
        .extract::<PyReadwriteArrayDyn<'py, T>>()
        .map_err(|_| mismatch::<T>(obj, name))?;
    check_ndim(name, array.shape(), N)?;
    Ok(Output { array, name })
}

impl<T: Element, const N: usize> Input<'_, T, N> {
    pub fn shape(&self) -> [usize; N] {
        self.array
            .shape()
            .try_into()
            .expect("ndim checked on borrowing")
    }

    /// The array, if its shape is `want`.
    pub fn shaped(self, want: [usize; N]) -> PyResult<Self> {
        check_shape(self.name, &self.shape(), &want)?;
        Ok(self)
    }

    pub fn data(&self) -> PyResult<&[T]> {
        // `as_slice` also accepts Fortran order, which would silently transpose the data.
        if !self.array.is_c_contiguous() {
            return Err(not_c_contiguous(self.name));
        }
        self.array
            .as_slice()
            .map_err(|_| not_c_contiguous(self.name))
    }
}

impl<T: Element, const N: usize> Output<'_, T, N> {
    pub fn shape(&self) -> [usize; N] {
        self.array
            .shape()
            .try_into()
            .expect("ndim checked on borrowing")
    }

    /// The array, if its shape is `want`.
    pub fn shaped(self, want: [usize; N]) -> PyResult<Self> {
        check_shape(self.name, &self.shape(), &want)?;
        Ok(self)
    }

    /// The slice to write, with huge-page advice for a large one ([`advise_huge_pages`]).
    pub fn data(&mut self) -> PyResult<&mut [T]> {
        if !self.array.is_c_contiguous() {
            return Err(not_c_contiguous(self.name));
        }
        let s = self
            .array
            .as_slice_mut()
            .map_err(|_| not_c_contiguous(self.name))?;
        advise_huge_pages(s);
        Ok(s)
    }
}

pub fn check_shape(name: &str, got: &[usize], want: &[usize]) -> PyResult<()> {
    if got != want {
        return Err(PyValueError::new_err(format!(
            "{name} must have shape {want:?}, got {got:?}"
        )));
    }
    Ok(())
}

fn check_ndim(name: &str, shape: &[usize], ndim: usize) -> PyResult<()> {
    if shape.len() != ndim {
        return Err(PyValueError::new_err(format!(
            "{name} must be {ndim}-D, got shape {shape:?}"
        )));
    }
    Ok(())
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

/// Explains why `obj` could not be borrowed as an array of `T`.
fn mismatch<T: Element>(obj: &Bound<'_, PyAny>, name: &str) -> PyErr {
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
    PyValueError::new_err(format!(
        "{name} could not be borrowed (is it writeable and not aliased by another argument?)"
    ))
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
    match e {
        MmotError::Interrupted => PyKeyboardInterrupt::new_err(()),
        e => PyValueError::new_err(e.to_string()),
    }
}
