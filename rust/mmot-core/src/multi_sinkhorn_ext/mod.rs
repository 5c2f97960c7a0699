//! Multi-SK with options (issue 20, spec section 2): ragged padded batches, per-problem slot
//! group counts, a geometric eps schedule, per-problem early stopping with a report, and the
//! score-unit potentials `F`, `Gam`, `H` as outputs; with the exact VJP of the unrolled
//! iteration.
//!
//! Problem `b` is the block `scores[b, :n_b, :k_b]` of a padded `[B, N, K]` batch; its anchor
//! mass is `r = n_b / k_b`, its slot groups those with `counts[b, G] > 0`. In score units the
//! plan of group `G` is `P_G[n,a] = exp((w_G S + F_G[a] + Gam[n,a] + H_G[n]) / e)` and one
//! iteration at `e = eps_t` is
//!
//! ```text
//! F_G[a]   = e log r - e LSE_n((w_G S + Gam + H_G) / e)
//! Gam[n,a] = -e LSE_G(log c_G + (w_G S + F_G + H_G) / e)
//! H_G[n]   = -e LSE_a((w_G S + Gam + F_G) / e)
//! ```
//!
//! Each iteration is one streaming pass over rows (`forward`): a row's `Gam` and `H` steps
//! need only the current `F` and the row's previous `H`, and the column sums of the row's plan
//! give both the marginal error of the iteration and the next `F` (`F += e' (log r - log
//! colsum)`, with the plan raised to `e / e'` when the schedule moves `e` to `e'`). `Gam` is
//! never stored; the last pass writes it with the output. The backward (`backward`) replays the
//! forward, recording `F` and `H` of every iteration, then sweeps the iterations in reverse,
//! one row pass each (see the module `backward`). Problems with a schedule run the log domain
//! (it needs it); a problem without one whose exponent range is within the plain limit (today's
//! rule, measured on its own valid block) runs the plain domain on cached `exp(w_G (S - colmax)
//! / eps)` and scalings, which is exact to rounding and does no `exp` per iteration. Rows are
//! processed in chunks whose size depends only on the shape, so results do not depend on the
//! thread count; problems run in parallel, and so do the chunks of a large problem.

mod backward;
mod forward;
mod rows;
#[cfg(test)]
mod tests;

use crate::domain::LogDomain;
use crate::error::{MmotError, Result};
use crate::exec::chunks::{balanced, n_chunks, rows_per_chunk};
use crate::interrupt::Interrupt;
use crate::multi_sinkhorn::Normalize;
use crate::simd::Real;
use rayon::prelude::*;

/// The implicit backward (`crate::implicit`) applies the same min-max VJP.
pub(crate) use rows::minmax_row_vjp;

/// Scalar parameters of a `multi_sinkhorn_ext` call.
#[derive(Debug, Clone)]
pub struct MultiSinkhornExtParams {
    /// `w_G`, one positive weight per slot group (shared by the batch).
    pub weights: Vec<f64>,
    /// The final (and smallest) eps.
    pub eps: f64,
    /// The schedule's factor in (0, 1): `e_{t+1} = e_t * decay`, `eps_t = max(eps, e_t)`.
    pub decay: f64,
    /// The iteration cap.
    pub n_iters: usize,
    /// Stop a problem once `eps_t == eps` and its marginal error is `<= tol`; `< 0`: never.
    pub tol: f64,
    pub normalize: Normalize,
    /// `On`: the log domain everywhere; `Auto`: the plain domain for problems without a
    /// schedule whose exponent range allows it; `Off`: as `Auto`, and an error where the range
    /// is past the plain limit (problems with a schedule still run the log domain).
    pub log_domain: LogDomain,
}

/// The inputs of a call: `[B, N, K]` scores, `[B]` valid rows and columns, `[B, G]` group
/// counts and output coefficients, `[B]` schedule starts (float64).
#[derive(Clone, Copy)]
pub struct MultiSinkhornExtInput<'a, T> {
    pub scores: &'a [T],
    pub row_counts: &'a [i64],
    pub col_counts: &'a [i64],
    pub counts: &'a [T],
    pub tops: &'a [T],
    pub eps_start: &'a [f64],
}

/// The outputs of the forward: `T` `[B, N, K]`, `F` `[B, G, K]`, `Gam` `[B, N, K]`,
/// `H` `[B, G, N]`, iterations run `[B]` and the last marginal error `[B]`.
pub struct MultiSinkhornExtOutput<'a, T> {
    pub target: &'a mut [T],
    pub f: &'a mut [T],
    pub gam: &'a mut [T],
    pub h: &'a mut [T],
    pub iters: &'a mut [i64],
    pub err: &'a mut [T],
}

/// `[B, N, K]` with `G` slot groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtDims {
    pub problems: usize,
    pub rows: usize,
    pub cols: usize,
    pub groups: usize,
}

/// The forward of Multi-SK with options (see the module documentation); padded outputs are 0.
pub fn multi_sinkhorn_ext_forward<T: Real>(
    input: MultiSinkhornExtInput<'_, T>,
    out: MultiSinkhornExtOutput<'_, T>,
    dims: ExtDims,
    params: &MultiSinkhornExtParams,
) -> Result<()> {
    check_args(&input, dims, params)?;
    let (nn, kk, gg) = (dims.rows, dims.cols, dims.groups);
    check_out("target", out.target.len(), dims.problems * nn * kk)?;
    check_out("gam", out.gam.len(), dims.problems * nn * kk)?;
    check_out("f", out.f.len(), dims.problems * gg * kk)?;
    check_out("h", out.h.len(), dims.problems * gg * nn)?;
    check_out("iters", out.iters.len(), dims.problems)?;
    check_out("err", out.err.len(), dims.problems)?;
    let problems = problems(&input, dims, params)?;
    check_domain(&problems, params)?;
    let interrupt = Interrupt::current();
    if dims.problems == 0 {
        return Ok(());
    }
    let MultiSinkhornExtOutput {
        target,
        f,
        gam,
        h,
        iters,
        err,
    } = out;
    let matrix = nn * kk;
    // Chunks of zero length would make `par_chunks_mut` panic: keep at least one element.
    let jobs = problems
        .par_iter()
        .zip(target.par_chunks_mut(matrix.max(1)))
        .zip(gam.par_chunks_mut(matrix.max(1)))
        .zip(f.par_chunks_mut((gg * kk).max(1)))
        .zip(h.par_chunks_mut((gg * nn).max(1)))
        .zip(iters.par_iter_mut())
        .zip(err.par_iter_mut());
    jobs.for_each(|((((((p, target), gam), f), h), iters), err)| {
        let out = forward::ProblemOut { target, gam, f, h };
        let (n_run, e) = forward::solve(p, params, out, &interrupt);
        *iters = n_run as i64;
        *err = e;
    });
    interrupt.check()
}

/// The exact VJP of [`multi_sinkhorn_ext_forward`]'s `T` with respect to the scores, through
/// `iters[b]` unrolled iterations of the same schedule and the min-max step, into `out`
/// (`[B, N, K]`, padded entries 0; padded entries of `grad` are not read).
pub fn multi_sinkhorn_ext_backward<T: Real>(
    grad: &[T],
    input: MultiSinkhornExtInput<'_, T>,
    iters: &[i64],
    out: &mut [T],
    dims: ExtDims,
    params: &MultiSinkhornExtParams,
) -> Result<()> {
    check_args(&input, dims, params)?;
    let (nn, kk) = (dims.rows, dims.cols);
    check_out("grad", grad.len(), dims.problems * nn * kk)?;
    check_out("out", out.len(), dims.problems * nn * kk)?;
    check_out("iters", iters.len(), dims.problems)?;
    if let Some(bad) = iters.iter().find(|&&t| t < 1) {
        return Err(MmotError::InvalidArgument(format!(
            "iters must be >= 1 for every problem, got {bad}"
        )));
    }
    let problems = problems(&input, dims, params)?;
    let interrupt = Interrupt::current();
    let matrix = (nn * kk).max(1);
    problems
        .par_iter()
        .zip(out.par_chunks_mut(matrix))
        .zip(grad.par_chunks(matrix))
        .zip(iters.par_iter())
        .for_each(|(((p, out), grad), &iters)| {
            backward::backward(p, params, grad, iters as usize, out, &interrupt);
        });
    interrupt.check()
}

fn check_out(name: &str, len: usize, want: usize) -> Result<()> {
    if len != want {
        return Err(MmotError::Shape(format!(
            "{name} has {len} elements, expected {want}"
        )));
    }
    Ok(())
}

fn check_args<T: Real>(
    input: &MultiSinkhornExtInput<'_, T>,
    dims: ExtDims,
    params: &MultiSinkhornExtParams,
) -> Result<()> {
    let ExtDims {
        problems: b,
        rows: nn,
        cols: kk,
        groups: gg,
    } = dims;
    check_out("scores", input.scores.len(), b * nn * kk)?;
    check_out("row_counts", input.row_counts.len(), b)?;
    check_out("col_counts", input.col_counts.len(), b)?;
    check_out("counts", input.counts.len(), b * gg)?;
    check_out("tops", input.tops.len(), b * gg)?;
    check_out("eps_start", input.eps_start.len(), b)?;
    if params.weights.len() != gg {
        return Err(MmotError::InvalidArgument(format!(
            "weights must have G={gg} entries, got {}",
            params.weights.len()
        )));
    }
    if let Some(w) = params
        .weights
        .iter()
        .find(|w| !(w.is_finite() && **w > 0.0))
    {
        return Err(MmotError::InvalidArgument(format!(
            "weights must be finite and > 0, got {w}"
        )));
    }
    if !(params.eps.is_finite() && params.eps > 0.0) {
        return Err(MmotError::InvalidArgument(format!(
            "eps must be a finite number > 0, got {}",
            params.eps
        )));
    }
    if !(params.decay > 0.0 && params.decay < 1.0) {
        return Err(MmotError::InvalidArgument(format!(
            "decay must be in (0, 1), got {}",
            params.decay
        )));
    }
    if params.n_iters == 0 {
        return Err(MmotError::InvalidArgument(
            "n_iters must be >= 1, got 0".into(),
        ));
    }
    if let Some(e) = input
        .eps_start
        .iter()
        .find(|e| !(e.is_finite() && **e > 0.0))
    {
        return Err(MmotError::InvalidArgument(format!(
            "eps_start must be finite and > 0, got {e}"
        )));
    }
    for (name, counts, limit) in [
        ("row_counts", input.row_counts, nn),
        ("col_counts", input.col_counts, kk),
    ] {
        if let Some(c) = counts.iter().find(|&&c| c < 1 || c as usize > limit) {
            return Err(MmotError::InvalidArgument(format!(
                "{name} must be in 1..={limit}, got {c}"
            )));
        }
    }
    for (name, values) in [("counts", input.counts), ("tops", input.tops)] {
        if let Some(v) = values
            .iter()
            .find(|v| !(v.to_f64() >= 0.0 && v.to_f64() < f64::INFINITY))
        {
            return Err(MmotError::InvalidArgument(format!(
                "{name} must be finite and >= 0, got {v:?}"
            )));
        }
    }
    Ok(())
}

/// One active slot group of a problem.
#[derive(Debug, Clone, Copy)]
pub(super) struct Group<T> {
    /// `w_G`.
    pub w: T,
    /// `c_G > 0`, the group's slot count.
    pub c: T,
    /// `top_G`, its coefficient in the output.
    pub top: T,
    /// Its index among the call's `G` groups (the layout of `F` and `H` out).
    pub index: usize,
}

/// One problem of a call: its valid block, groups, mass and row chunking.
pub(super) struct Problem<'a, T> {
    /// `[N, K]`, row stride `stride`; only `[:n, :k]` is read.
    pub scores: &'a [T],
    /// Valid rows and columns.
    pub n: usize,
    pub k: usize,
    /// N and K of the padded batch.
    pub rows: usize,
    pub stride: usize,
    pub groups: Vec<Group<T>>,
    /// `r = n / k` and `log r`.
    pub r: T,
    pub log_r: T,
    pub eps_start: f64,
    pub rows_per_chunk: usize,
    pub n_chunks: usize,
}

impl<T: Real> Problem<'_, T> {
    /// Valid scores of row `i`, `[k]`.
    #[inline(always)]
    pub fn row(&self, i: usize) -> &[T] {
        &self.scores[i * self.stride..i * self.stride + self.k]
    }

    /// `(colmax, colmin)` of the valid block, `[k]` each, and whether every valid score is finite.
    pub fn column_extremes(&self) -> (Vec<T>, Vec<T>, bool) {
        let mut hi = vec![T::NEG_INFINITY; self.k];
        let mut lo = vec![T::INFINITY; self.k];
        let mut finite = true;
        for i in 0..self.n {
            for (a, &s) in self.row(i).iter().enumerate() {
                finite &= s.to_f64().is_finite();
                hi[a] = hi[a].fmax(s);
                lo[a] = lo[a].fmin(s);
            }
        }
        (hi, lo, finite)
    }
}

impl<T: Real> Problem<'_, T> {
    /// Whether this problem runs the plain domain: no schedule (`eps_start <= eps`), not forced
    /// to the log domain, and its exponent range (max − min of a valid column, `hi − lo`, times
    /// its largest group weight, over eps) within the dtype's plain limit, the rule of today's
    /// kernels, measured on this problem alone (so that a batch equals per-problem calls).
    pub fn plain_domain(&self, hi: &[T], lo: &[T], params: &MultiSinkhornExtParams) -> bool {
        if params.log_domain == LogDomain::On || self.eps_start > params.eps {
            return false;
        }
        let w = self.groups.iter().map(|g| g.w.to_f64()).fold(0.0, f64::max);
        let range = hi
            .iter()
            .zip(lo)
            .map(|(h, l)| (h.to_f64() - l.to_f64()) * w / params.eps)
            .fold(0.0, f64::max);
        range <= T::PLAIN_RANGE_LIMIT
    }
}

/// The schedule `eps_t` for `t < len` (float64, by repeated multiplication).
pub(super) fn schedule(eps_start: f64, eps: f64, decay: f64, len: usize) -> Vec<f64> {
    let mut e = eps_start;
    let mut out = Vec::with_capacity(len);
    for _ in 0..len {
        out.push(eps.max(e));
        e *= decay;
    }
    out
}

/// The per-problem views of a call.
fn problems<'a, T: Real>(
    input: &MultiSinkhornExtInput<'a, T>,
    dims: ExtDims,
    params: &MultiSinkhornExtParams,
) -> Result<Vec<Problem<'a, T>>> {
    let ExtDims {
        problems: b,
        rows: nn,
        cols: kk,
        groups: gg,
    } = dims;
    let mut out = Vec::with_capacity(b);
    for p in 0..b {
        let (n, k) = (input.row_counts[p] as usize, input.col_counts[p] as usize);
        let groups: Vec<Group<T>> = (0..gg)
            .filter(|&g| input.counts[p * gg + g] > T::ZERO)
            .map(|g| Group {
                w: T::from_f64(params.weights[g]),
                c: input.counts[p * gg + g],
                top: input.tops[p * gg + g],
                index: g,
            })
            .collect();
        if groups.is_empty() {
            return Err(MmotError::InvalidArgument(format!(
                "problem {p} has no slot group with a count > 0"
            )));
        }
        let width = k * groups.len();
        let rows_per_chunk = balanced(n, rows_per_chunk(width));
        let r = n as f64 / k as f64;
        out.push(Problem {
            scores: &input.scores[p * nn * kk..(p + 1) * nn * kk],
            n,
            k,
            rows: nn,
            stride: kk,
            groups,
            r: T::from_f64(r),
            log_r: T::from_f64(r.ln()),
            eps_start: input.eps_start[p],
            rows_per_chunk,
            n_chunks: n_chunks(n, rows_per_chunk),
        });
    }
    Ok(out)
}

/// `log_domain = "off"` is an error where the plain domain would not be exact: a problem's
/// exponent range (max − min of a valid column, times the largest weight of its groups, over
/// `eps`, the smallest eps of any schedule) past the dtype's plain limit.
fn check_domain<T: Real>(problems: &[Problem<T>], params: &MultiSinkhornExtParams) -> Result<()> {
    if params.log_domain != LogDomain::Off {
        return Ok(());
    }
    let mut range = 0.0f64;
    for p in problems {
        let (hi, lo, _) = p.column_extremes();
        let w = p.groups.iter().map(|g| g.w.to_f64()).fold(0.0, f64::max);
        for (h, l) in hi.iter().zip(&lo) {
            range = range.max((h.to_f64() - l.to_f64()) * w / params.eps);
        }
    }
    if range > T::PLAIN_RANGE_LIMIT {
        return Err(MmotError::InvalidArgument(format!(
            "log_domain=False forces the plain domain, where exp would under- or overflow: the \
             exponent range (max - min of a score column) * weight / eps is {range:.1} here \
             (eps = {}), above the plain domain's limit of {} for this dtype; use \
             log_domain=\"auto\" (or True)",
            params.eps,
            T::PLAIN_RANGE_LIMIT,
        )));
    }
    Ok(())
}
