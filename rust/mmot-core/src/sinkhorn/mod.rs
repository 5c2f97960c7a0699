//! SwAV-style Sinkhorn-Knopp and its exact reverse pass (see `docs/numerics.md` for the
//! domains and `docs/gradients.md` for the reverse pass).
//!
//! Each iteration is a single streaming pass over rows: the column scaling `v` from the previous
//! pass's column sums is applied on the fly, the row scaling `u[n]` is computed, and the row's
//! contribution to the next column sums is accumulated. The last pass writes the output row.
//!
//! Plain domain: `E = exp((S - colmax)/eps)` is computed once and cached *in the output buffer*
//! (it has exactly the right size), so iterations never call `exp`; the column shift is absorbed
//! exactly by `v`. The first pass also takes the column statistics (max, range, finiteness), so
//! the scores are read once: each row chunk caches its `E` against its own column max, and the
//! per-chunk factors `exp((chunk max - colmax)/eps)` (bounded below by the plain domain's range
//! limit) are folded into `v` chunk by chunk.
//!
//! Log domain: nothing is cached; each row recomputes `t = (S - colmax)/eps + b` (b = log v),
//! shifts by its own row max and exponentiates once. The shifted exponentials divided by their
//! sum are exactly the row-normalised transport plan, whose column sums give the next `b` by a
//! multiplicative (log-additive) correction. This needs one `exp` per element per iteration and
//! no per-column log-sum-exp bookkeeping, because after a row normalisation every column mass is
//! bounded below by `col_mass * min(row_mass) / total`, so the sums cannot underflow.
//!
//! Files: the public API and its checks here; the streaming solver in `forward.rs`, its
//! per-chunk row kernels in `rows.rs`, the reverse pass in `backward.rs` and the path for
//! batches of tiny problems in `small.rs`.

mod backward;
mod forward;
mod rows;
mod small;
mod small_backward;

use crate::dims::Dims;
use crate::domain::{check_forced_plain, check_log_range, use_log_domain, LogDomain};
use crate::error::{check_eps_iters, check_len, not_finite, Result};
use crate::exec::column_stats::batch_col_stats;
use crate::interrupt::Interrupt;
use crate::simd::Real;
use backward::BackWorkspace;
use forward::{max_range, Workspace};
use rayon::prelude::*;

/// The parameters of a Sinkhorn call (forward or backward).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SinkhornParams {
    /// Entropic regularisation, finite and > 0.
    pub eps: f64,
    /// Iterations (each a column then a row normalisation), >= 1.
    pub n_iters: usize,
    pub log_domain: LogDomain,
    /// Return an error (not a result) for NaN or Inf in `scores`, found in the
    /// column-statistics pass the kernel makes anyway.
    pub check_finite: bool,
}

impl SinkhornParams {
    /// Parameters that do not check the scores for NaN or Inf.
    pub fn new(eps: f64, n_iters: usize, log_domain: LogDomain) -> Self {
        Self {
            eps,
            n_iters,
            log_domain,
            check_finite: false,
        }
    }
}

/// Sinkhorn on a batch of `dims.problems` independent `[rows, cols]` problems.
///
/// `scores`, `out`: `[problems, rows, cols]`; `row_mass`: `[problems, rows]`; `col_mass`:
/// `[problems, cols]` (already resolved by the caller: positive, with equal totals per
/// problem). Returns whether the log domain was used (decided once for the whole call).
///
/// Without `check_finite`, a problem with a NaN or Inf score gets an all-NaN result
/// ([`poison_non_finite`]); `log_domain: Off` where "auto" would pick the log domain is an error.
pub fn sinkhorn<T: Real>(
    scores: &[T],
    row_mass: &[T],
    col_mass: &[T],
    out: &mut [T],
    dims: Dims,
    params: &SinkhornParams,
) -> Result<bool> {
    check_len("scores", scores.len(), dims)?;
    check_len("out", out.len(), dims)?;
    check_masses(row_mass, col_mass, dims, params)?;
    check_forced_plain(params.log_domain, scores, dims, params.eps, 1.0)?;
    let log = solve(scores, row_mass, col_mass, out, dims, params)?;
    if !params.check_finite {
        poison_non_finite(scores, out, dims);
    }
    Ok(log)
}

/// Non-finite in, non-finite out: every problem whose scores hold a NaN or an Inf gets an
/// all-NaN `out`. The iteration alone would not ensure it: max-shifts and guarded divisions
/// turn such inputs into finite values. One pass over the scores, made only when unchecked.
pub(crate) fn poison_non_finite<T: Real>(scores: &[T], out: &mut [T], dims: Dims) {
    if dims.is_empty() {
        return;
    }
    let matrix = dims.matrix_len();
    out.par_chunks_mut(matrix)
        .zip(scores.par_chunks(matrix))
        .for_each(|(o, s)| {
            // 0·x is NaN exactly for x = ±Inf or NaN.
            if !s.iter().all(|x| T::ZERO * *x == T::ZERO) {
                o.fill(T::from_f64(f64::NAN));
            }
        });
}

/// The forward solve, with the argument checks done.
fn solve<T: Real>(
    scores: &[T],
    row_mass: &[T],
    col_mass: &[T],
    out: &mut [T],
    dims: Dims,
    params: &SinkhornParams,
) -> Result<bool> {
    let Dims {
        problems: b,
        rows: n,
        cols: k,
    } = dims;
    let log_domain = params.log_domain;
    if dims.is_empty() {
        return Ok(use_log_domain::<T>(log_domain, 0.0));
    }
    if dims.matrix_len() <= SMALL {
        return small::sinkhorn(scores, row_mass, col_mass, out, dims, params);
    }
    let p = Problem::new(dims, params);
    let mut cmax = vec![T::ZERO; b * k];
    let log = if log_domain == LogDomain::On {
        let (range, finite) = batch_col_stats(scores, b, n, k, &mut cmax);
        if params.check_finite && !finite {
            return Err(not_finite("scores"));
        }
        if params.check_finite {
            check_log_range::<T>(range / params.eps, params.eps)?;
        }
        true
    } else {
        // The plain domain goes first: its first pass also takes the column statistics that
        // decide the domain. In the rare call that turns out to need the log domain, the plain
        // results are discarded (a problem stops after that pass once it knows).
        let auto = log_domain == LogDomain::Auto;
        let range = out
            .par_chunks_mut(n * k)
            .zip(problems(scores, row_mass, col_mass, dims))
            .zip(cmax.par_chunks_mut(k))
            .map_init(Workspace::default, |ws, ((o, input), cm)| {
                p.solve_plain(input, cm, o, ws, None, auto)
            })
            .reduce(|| 0.0, max_range);
        p.interrupt.check()?;
        if params.check_finite && range.is_nan() {
            return Err(not_finite("scores"));
        }
        if params.check_finite {
            check_log_range::<T>(range / params.eps, params.eps)?;
        }
        use_log_domain::<T>(log_domain, range / params.eps)
    };
    if log {
        out.par_chunks_mut(n * k)
            .zip(problems(scores, row_mass, col_mass, dims))
            .zip(cmax.par_chunks(k))
            .for_each_init(Workspace::default, |ws, ((o, input), cm)| {
                p.solve_log(input, cm, o, ws, None)
            });
    }
    p.interrupt.check()?;
    Ok(log)
}

/// The exact vector-Jacobian product of [`sinkhorn`] with respect to `scores`: `out =
/// (∂P/∂scores)ᵀ grad` for the unrolled `n_iters` iterations, `grad` and `out` shaped as
/// `scores`. The domain is chosen exactly as in the forward, so the gradient is as stable as
/// the forward; `check_finite` works as there. The algorithm is in `backward.rs`.
pub fn sinkhorn_backward<T: Real>(
    grad: &[T],
    scores: &[T],
    row_mass: &[T],
    col_mass: &[T],
    out: &mut [T],
    dims: Dims,
    params: &SinkhornParams,
) -> Result<bool> {
    check_len("grad", grad.len(), dims)?;
    check_len("scores", scores.len(), dims)?;
    check_len("out", out.len(), dims)?;
    check_masses(row_mass, col_mass, dims, params)?;
    let Dims {
        problems: b,
        rows: n,
        cols: k,
    } = dims;
    if dims.is_empty() {
        return Ok(use_log_domain::<T>(params.log_domain, 0.0));
    }
    let mut cmax = vec![T::ZERO; b * k];
    let (range, finite) = batch_col_stats(scores, b, n, k, &mut cmax);
    if params.check_finite && !finite {
        return Err(not_finite("scores"));
    }
    let log = use_log_domain::<T>(params.log_domain, range / params.eps);
    let p = Problem::new(dims, params);
    if !log && dims.matrix_len() <= SMALL {
        small_backward::backward(grad, scores, row_mass, col_mass, out, dims, params);
        p.interrupt.check()?;
        poison_non_finite(scores, out, dims);
        return Ok(log);
    }
    out.par_chunks_mut(n * k)
        .zip(grad.par_chunks(n * k))
        .zip(problems(scores, row_mass, col_mass, dims))
        .zip(cmax.par_chunks(k))
        .for_each_init(BackWorkspace::default, |bw, (((o, g), input), cm)| {
            p.backward(g, input, cm, o, bw, log)
        });
    p.interrupt.check()?;
    poison_non_finite(scores, out, dims);
    Ok(log)
}

/// The checks the forward and the backward share: the masses' lengths and the parameters.
fn check_masses<T>(
    row_mass: &[T],
    col_mass: &[T],
    dims: Dims,
    params: &SinkhornParams,
) -> Result<()> {
    check_len("row_mass", row_mass.len(), [dims.problems, dims.rows])?;
    check_len("col_mass", col_mass.len(), [dims.problems, dims.cols])?;
    check_eps_iters(params.eps, params.n_iters)
}

/// Problems of at most this many elements take the small-problem path (`small.rs`).
const SMALL: usize = 1024;

/// One problem's inputs: scores `[n, k]`, row masses `[n]`, column masses `[k]`.
#[derive(Clone, Copy)]
struct Input<'a, T> {
    scores: &'a [T],
    row_mass: &'a [T],
    col_mass: &'a [T],
}

/// The batch's problems, in order.
fn problems<'a, T: Real>(
    scores: &'a [T],
    row_mass: &'a [T],
    col_mass: &'a [T],
    dims: Dims,
) -> impl IndexedParallelIterator<Item = Input<'a, T>> {
    scores
        .par_chunks(dims.matrix_len())
        .zip(row_mass.par_chunks(dims.rows))
        .zip(col_mass.par_chunks(dims.cols))
        .map(|((scores, row_mass), col_mass)| Input {
            scores,
            row_mass,
            col_mass,
        })
}

/// What every problem of a call shares: its shape `[n, k]` and the parameters.
struct Problem<T> {
    n: usize,
    k: usize,
    eps: f64,
    inv_eps: T,
    n_iters: usize,
    interrupt: Interrupt,
}

impl<T: Real> Problem<T> {
    fn new(dims: Dims, params: &SinkhornParams) -> Self {
        Problem {
            n: dims.rows,
            k: dims.cols,
            eps: params.eps,
            inv_eps: T::from_f64(1.0 / params.eps),
            n_iters: params.n_iters,
            interrupt: Interrupt::current(),
        }
    }
}
