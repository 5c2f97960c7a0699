//! The implicit reverse pass of Sinkhorn: CG on the Schur complement in the column adjoint.
//!
//! With `P` the plan, `R`/`C` its row/column sums, `τ = ρ/(ρ + eps)` (1 balanced) and
//! `a = (P⊙G)1`, the row adjoint is `α = τ(a − Pβ)/R` and `β` solves
//! `Mβ = (C/τ)β − Pᵀ(τ/R ⊙ Pβ) = (P⊙G)ᵀ1 − Pᵀ(τa/R)`, then `∂S = P⊙(G − α − β)/eps`.
//!
//! Passes over the plan (each a [`run_pass`] over row chunks): one setup pass (`R`, `a`, `C`
//! and the right-hand side), one per CG iteration (per row `w = τ⟨P_i, p⟩/R_i`, then `w P_i`
//! into the column partials: `Mp = (C/τ)p − Σ_i w_i P_i`), and the output pass.

use super::{check_counts, check_eps, update, Cg};
use crate::dims::Dims;
use crate::error::{check_len, Result};
use crate::exec::chunks::{n_chunks, reduce_partials, rows_per_chunk, run_pass, Scratch, Strided};
use crate::interrupt::Interrupt;
use crate::simd::{dot, sum, Real};
use rayon::prelude::*;

/// The gradient of the scores of converged Sinkhorn, `out = P⊙(G − α − β)/eps`, for the
/// upstream `grad` = ∂L/∂plan, on a padded ragged batch (`grad`, `plan`, `out`: `dims`;
/// `row_counts`, `col_counts`: `[problems]`). `reach` is `ρ` (`f64::INFINITY`: balanced).
/// Writes each problem's CG iteration count into `iters` (`[problems]`).
#[allow(clippy::too_many_arguments)]
pub fn sinkhorn_implicit_backward<T: Real>(
    grad: &[T],
    plan: &[T],
    row_counts: &[i64],
    col_counts: &[i64],
    out: &mut [T],
    iters: &mut [i64],
    dims: Dims,
    eps: f64,
    reach: f64,
) -> Result<()> {
    check_len("grad", grad.len(), dims)?;
    check_len("plan", plan.len(), dims)?;
    check_len("out", out.len(), dims)?;
    check_len("iters", iters.len(), [dims.problems])?;
    check_counts("row_counts", row_counts, dims.problems, dims.rows)?;
    check_counts("col_counts", col_counts, dims.problems, dims.cols)?;
    check_eps(eps)?;
    if reach.is_nan() || reach <= 0.0 {
        return Err(crate::error::MmotError::InvalidArgument(format!(
            "reach must be > 0 (inf: balanced), got {reach}"
        )));
    }
    if dims.is_empty() {
        iters.fill(0);
        return Ok(());
    }
    let tau = if reach.is_infinite() {
        1.0
    } else {
        reach / (reach + eps)
    };
    let interrupt = Interrupt::current();
    let m = dims.matrix_len();
    out.par_chunks_mut(m)
        .zip(grad.par_chunks(m))
        .zip(plan.par_chunks(m))
        .zip(iters.par_iter_mut())
        .enumerate()
        .for_each_init(Work::default, |ws, (b, (((o, g), p), it))| {
            let shape = Shape {
                n: row_counts[b] as usize,
                k: col_counts[b] as usize,
                stride: dims.cols,
            };
            *it = solve(g, p, o, shape, eps, tau, ws, &interrupt) as i64;
        });
    interrupt.check()
}

#[derive(Clone, Copy)]
struct Shape {
    /// Valid rows and columns.
    n: usize,
    k: usize,
    /// The padded row length.
    stride: usize,
}

#[derive(Default)]
struct Work<T> {
    /// Per row `[τ/R_i, a_i]`.
    rows: Vec<T>,
    partials: Vec<T>,
    scratch: Vec<T>,
    acc: Vec<T>,
    col_sum: Vec<T>,
    pre: Vec<T>,
    x: Vec<T>,
    r: Vec<T>,
    z: Vec<T>,
    p: Vec<T>,
    q: Vec<T>,
}

/// One problem: writes `out` (its whole padded matrix), returns the CG iterations.
#[allow(clippy::too_many_arguments)]
fn solve<T: Real>(
    grad: &[T],
    plan: &[T],
    out: &mut [T],
    sh: Shape,
    eps: f64,
    tau: f64,
    ws: &mut Work<T>,
    interrupt: &Interrupt,
) -> usize {
    let Shape { n, k, stride } = sh;
    out[n * stride..].fill(T::ZERO);
    let out = &mut out[..n * stride];
    let chunk_rows = rows_per_chunk(k);
    let chunks = n_chunks(n, chunk_rows);
    let t = T::from_f64(tau);
    let inv_t = T::from_f64(1.0 / tau);
    let Work {
        rows,
        partials,
        scratch,
        acc,
        col_sum,
        pre,
        x,
        r,
        z,
        p,
        q,
    } = ws;
    for v in [
        &mut *acc,
        &mut *col_sum,
        &mut *pre,
        &mut *x,
        &mut *r,
        &mut *z,
        &mut *p,
        &mut *q,
    ] {
        v.clear();
        v.resize(k, T::ZERO);
    }
    rows.clear();
    rows.resize(2 * n, T::ZERO);
    partials.clear();
    partials.resize(chunks * 2 * k, T::ZERO);
    let prow = |i: usize| &plan[i * stride..i * stride + k];
    let grow = |i: usize| &grad[i * stride..i * stride + k];

    // Setup: R_i, a_i per row; partials [C | (P⊙G)ᵀ1 − Pᵀ(τa/R)].
    run_pass(
        n,
        chunk_rows,
        Strided::new(rows, 2),
        Strided::new(out, stride),
        Strided::new(partials, 2 * k),
        Scratch::new(scratch, 0),
        #[inline(always)]
        |range, st, _o, part, _| {
            part.fill(T::ZERO);
            let (cs, bs) = part.split_at_mut(k);
            let first = range.start;
            for i in range {
                let (pi, gi) = (prow(i), grow(i));
                let rs = sum(pi);
                let a = dot(pi, gi);
                let w = if rs > T::ZERO { t / rs } else { T::ZERO };
                st[2 * (i - first)] = w;
                st[2 * (i - first) + 1] = a;
                let wa = w * a;
                for j in 0..k {
                    cs[j] += pi[j];
                    bs[j] += pi[j] * (gi[j] - wa);
                }
            }
        },
    );
    {
        let mut both = vec![T::ZERO; 2 * k];
        reduce_partials(partials, chunks, &mut both);
        col_sum.copy_from_slice(&both[..k]);
        r.copy_from_slice(&both[k..]);
    }
    if tau == 1.0 {
        // Balanced: M1 = 0; project the right-hand side off the null vector.
        let mean = sum(r) / T::from_f64(k as f64);
        for v in r.iter_mut() {
            *v -= mean;
        }
    }
    for j in 0..k {
        pre[j] = if col_sum[j] > T::ZERO {
            t / col_sum[j]
        } else {
            T::ZERO
        };
        z[j] = pre[j] * r[j];
        p[j] = z[j];
    }
    let mut iterations = 0;
    if let Some(mut cg) = Cg::start(dot(r, z), dot(r, r)) {
        loop {
            if interrupt.requested() {
                return cg.iters;
            }
            apply(plan, rows, out, partials, scratch, p, sh, chunk_rows);
            reduce_partials(partials, chunks, acc);
            for j in 0..k {
                q[j] = col_sum[j] * inv_t * p[j] - acc[j];
            }
            let Some(step) = cg.step(dot(p, q)) else {
                break;
            };
            let (rz, rr) = update(step, x, r, z, p, q, pre);
            match cg.next(rz, rr) {
                Some(beta) => {
                    for j in 0..k {
                        p[j] = z[j] + beta * p[j];
                    }
                }
                None => break,
            }
        }
        iterations = cg.iters;
    }

    // Output: α_i = τ/R_i (a_i − ⟨P_i, β⟩), ∂S = P (G − α − β)/eps.
    let inv_eps = T::from_f64(1.0 / eps);
    let beta: &[T] = x;
    run_pass(
        n,
        chunk_rows,
        Strided::new(rows, 2),
        Strided::new(out, stride),
        Strided::new(partials, 2 * k),
        Scratch::new(scratch, 0),
        #[inline(always)]
        |range, st, o, _, _| {
            let first = range.start;
            for i in range {
                let (pi, gi) = (prow(i), grow(i));
                let l = i - first;
                let alpha = st[2 * l] * (st[2 * l + 1] - dot(pi, beta));
                let orow = &mut o[l * stride..(l + 1) * stride];
                for j in 0..k {
                    orow[j] = pi[j] * (gi[j] - alpha - beta[j]) * inv_eps;
                }
                orow[k..].fill(T::ZERO);
            }
        },
    );
    iterations
}

/// One CG pass: the column partials of `Σ_i (τ⟨P_i, p⟩/R_i) P_i`.
#[allow(clippy::too_many_arguments)]
fn apply<T: Real>(
    plan: &[T],
    rows: &mut [T],
    out: &mut [T],
    partials: &mut [T],
    scratch: &mut Vec<T>,
    p: &[T],
    sh: Shape,
    chunk_rows: usize,
) {
    let Shape { n, k, stride } = sh;
    run_pass(
        n,
        chunk_rows,
        Strided::new(rows, 2),
        Strided::new(out, stride),
        Strided::new(partials, k),
        Scratch::new(scratch, 0),
        #[inline(always)]
        |range, st, _o, part, _| {
            part.fill(T::ZERO);
            let first = range.start;
            for i in range {
                let pi = &plan[i * stride..i * stride + k];
                let w = st[2 * (i - first)] * dot(pi, p);
                for j in 0..k {
                    part[j] += w * pi[j];
                }
            }
        },
    );
}
