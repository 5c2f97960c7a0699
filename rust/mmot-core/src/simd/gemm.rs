//! Dense matrix products through `matrixmultiply`, which picks AVX-512 / AVX2+FMA kernels at
//! run time. Its summation order depends only on the shapes, so results do not depend on the
//! thread count.

use super::real::Real;
use std::any::TypeId;

/// A matrix operand in memory: element `(i, j)` is at `ptr + i * row_stride + j * col_stride`.
#[derive(Clone, Copy)]
pub(crate) struct MatrixRef<T> {
    pub ptr: *const T,
    pub row_stride: isize,
    pub col_stride: isize,
}

impl<T> MatrixRef<T> {
    /// A row-major matrix whose rows hold `row_len` values.
    pub fn row_major(ptr: *const T, row_len: usize) -> Self {
        Self {
            ptr,
            row_stride: row_len as isize,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix whose rows hold `row_len` values.
    pub fn transpose_of(ptr: *const T, row_len: usize) -> Self {
        Self {
            ptr,
            row_stride: 1,
            col_stride: row_len as isize,
        }
    }
}

/// `C = A · B + beta · C` for `A` m×k, `B` k×n and a row-major `C` (m×n, rows `c_row_len`
/// apart), in f32 or f64.
///
/// # Safety
/// Every element the shapes and strides reach must be readable (`A`, `B`) or writable (`C`),
/// and `C` must not overlap `A` or `B`.
pub(crate) unsafe fn gemm<T: Real>(
    [m, k, n]: [usize; 3],
    a: MatrixRef<T>,
    b: MatrixRef<T>,
    beta: T,
    c: *mut T,
    c_row_len: usize,
) {
    let (rsc, csc) = (c_row_len as isize, 1);
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.ptr as *const f32,
            a.row_stride,
            a.col_stride,
            b.ptr as *const f32,
            b.row_stride,
            b.col_stride,
            beta.to_f64() as f32,
            c as *mut f32,
            rsc,
            csc,
        )
    } else if TypeId::of::<T>() == TypeId::of::<f64>() {
        matrixmultiply::dgemm(
            m,
            k,
            n,
            1.0,
            a.ptr as *const f64,
            a.row_stride,
            a.col_stride,
            b.ptr as *const f64,
            b.row_stride,
            b.col_stride,
            beta.to_f64(),
            c as *mut f64,
            rsc,
            csc,
        )
    } else {
        unreachable!("Real is implemented for f32 and f64 only")
    }
}
