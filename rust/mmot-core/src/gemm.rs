//! Dense matrix products through `matrixmultiply`, which picks AVX-512 / AVX2+FMA kernels at
//! run time. Its summation order depends only on the shapes, so results do not depend on the
//! thread count.

use crate::real::Real;

/// C (m×n, row stride `rsc`) = A (m×k) · B (k×n) + beta · C, for f32 or f64.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<T: Real>(
    m: usize,
    k: usize,
    n: usize,
    a: *const T,
    rsa: isize,
    csa: isize,
    b: *const T,
    rsb: isize,
    csb: isize,
    beta: T,
    c: *mut T,
    rsc: isize,
) {
    use std::any::TypeId;
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a as *const f32,
            rsa,
            csa,
            b as *const f32,
            rsb,
            csb,
            beta.to_f64() as f32,
            c as *mut f32,
            rsc,
            1,
        )
    } else if TypeId::of::<T>() == TypeId::of::<f64>() {
        matrixmultiply::dgemm(
            m,
            k,
            n,
            1.0,
            a as *const f64,
            rsa,
            csa,
            b as *const f64,
            rsb,
            csb,
            beta.to_f64(),
            c as *mut f64,
            rsc,
            1,
        )
    } else {
        unreachable!("Real is implemented for f32 and f64 only")
    }
}
