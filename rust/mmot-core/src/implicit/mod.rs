//! Implicit reverse passes of the Sinkhorn ops: the adjoint of the converged fixed point
//! (issue 20, spec section 3).
//!
//! The unrolled reverse pass replays the forward's iterations; these differentiate the fixed
//! point itself, so they keep `O(N·K)` memory and take a time independent of the forward's
//! `n_iters`. Both reduce the adjoint equations to a symmetric positive semidefinite system
//! (the normal equations of a weighted least squares in the potentials' adjoints), eliminate
//! the block that is diagonal, and solve the rest by conjugate gradients with a diagonal
//! preconditioner, warm-started at 0. One CG iteration is one streaming pass over the plan.
//! `python/mmot/reverse/implicit.py` derives both systems.
//!
//! - [`sinkhorn_implicit_backward`] (`sinkhorn.rs`): the Schur complement in the column
//!   adjoint `β` (`K` unknowns), preconditioned by `diag(C/τ)`.
//! - [`multi_sinkhorn_implicit_backward`] (`multi.rs`): the per-element sample adjoint is
//!   eliminated, CG runs on the per-group anchor and row adjoints (`G·(K + N)` unknowns).
//!
//! Batches are padded and ragged: problem `b` is the block `[..row_counts[b], ..col_counts[b]]`
//! of its `[rows, cols]` matrix; nothing outside it is read into a result (it may hold NaN)
//! and the outputs there are 0. Problems run in parallel, and the rows of one problem in
//! fixed chunks whose partial sums add in chunk order, so results do not depend on the
//! thread count. A problem stops when its residual's 2-norm falls to `tol` times its initial
//! one (1e-7 in f64, 1e-5 in f32) or after [`MAX_ITERS`] iterations; its count is returned.

mod multi;
mod sinkhorn;

pub use multi::{multi_sinkhorn_implicit_backward, MultiImplicitParams};
pub use sinkhorn::sinkhorn_implicit_backward;

use crate::error::{MmotError, Result};
use crate::simd::{dot, Real};

/// The CG iteration cap of both solvers.
pub const MAX_ITERS: usize = 1000;

/// The relative residual at which the solvers stop, by element type.
pub fn tolerance<T: Real>() -> f64 {
    if std::mem::size_of::<T>() == 8 {
        1e-7
    } else {
        1e-5
    }
}

/// Checks ragged counts: `counts.len() == problems`, each in `1..=size`.
pub(crate) fn check_counts(name: &str, counts: &[i64], problems: usize, size: usize) -> Result<()> {
    if counts.len() != problems {
        return Err(MmotError::Shape(format!(
            "{name} has {} elements, expected {problems}",
            counts.len()
        )));
    }
    if let Some(c) = counts.iter().find(|&&c| c < 1 || c as usize > size) {
        return Err(MmotError::InvalidArgument(format!(
            "{name} must be in 1..={size}, got {c}"
        )));
    }
    Ok(())
}

pub(crate) fn check_eps(eps: f64) -> Result<()> {
    if !(eps.is_finite() && eps > 0.0) {
        return Err(MmotError::InvalidArgument(format!(
            "eps must be a finite number > 0, got {eps}"
        )));
    }
    Ok(())
}

/// The state of one problem's preconditioned CG on `x` (the solver's vectors that are not
/// kept per row; a caller with per-row blocks keeps those itself and adds their dots).
pub(crate) struct Cg<T> {
    /// `‖r‖²` at which the solve stops.
    pub stop: T,
    /// `⟨r, z⟩` of the current iterate.
    pub rz: T,
    pub iters: usize,
}

impl<T: Real> Cg<T> {
    /// Starts from `x = 0`, `r = rhs`, given `⟨r, z⟩` and `⟨r, r⟩` of the right-hand side.
    /// Returns `None` when there is nothing to solve.
    pub fn start(rz: T, rr: T) -> Option<Self> {
        let tol = T::from_f64(tolerance::<T>());
        let stop = tol * tol * rr;
        (rr > stop && rz > T::ZERO).then_some(Cg { stop, rz, iters: 0 })
    }

    /// The step `rz / pq`, or `None` at a breakdown.
    pub fn step(&self, pq: T) -> Option<T> {
        (pq > T::ZERO).then(|| self.rz / pq)
    }

    /// After the update, with `⟨r, z⟩` and `⟨r, r⟩` of the new residual: the coefficient of
    /// `p` in the next direction, or `None` when converged (or out of iterations).
    pub fn next(&mut self, rz_new: T, rr: T) -> Option<T> {
        self.iters += 1;
        if rr <= self.stop || rz_new <= T::ZERO || rr.to_f64().is_nan() || self.iters >= MAX_ITERS {
            return None;
        }
        let beta = rz_new / self.rz;
        self.rz = rz_new;
        Some(beta)
    }
}

/// `x += s·p; r -= s·q; z = m·r`; returns `(⟨r, z⟩, ⟨r, r⟩)`.
pub(crate) fn update<T: Real>(
    s: T,
    x: &mut [T],
    r: &mut [T],
    z: &mut [T],
    p: &[T],
    q: &[T],
    m: &[T],
) -> (T, T) {
    for j in 0..x.len() {
        x[j] += s * p[j];
        r[j] -= s * q[j];
        z[j] = m[j] * r[j];
    }
    (dot(r, z), dot(r, r))
}

#[cfg(test)]
mod tests;
