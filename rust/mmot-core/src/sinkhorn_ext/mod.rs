//! The general Sinkhorn path (issue 20, spec section 1): ragged padded batches, per-problem
//! early stopping with an iteration count and a marginal error, a geometric eps schedule, an
//! initial row potential, potentials out in score units and unbalanced marginals (`reach`),
//! with the exact vector-Jacobian product of the unrolled iteration.
//!
//! Problem `b` of a padded `[B, N, K]` batch is the block `scores[b, :n_b, :k_b]`; nothing
//! outside it is ever read (its values may be NaN). Padded potentials are written 0, but the
//! padding of the `[B, N, K]` outputs (the plan, the gradient) is never written: callers pass
//! those buffers zero-filled. A fresh zeroed allocation (calloc) maps no memory for the pages
//! that hold padding alone, so a ragged batch writes only about its valid entries, however
//! large the padded shape.
//!
//! Iteration (score units, `e = eps_t`, `tau = rho / (rho + e)`, 1 when balanced):
//! `g_j = e log c_j − tau e LSE_i((S_ij + f_i)/e)`, then
//! `f_i = e log r_i − tau e LSE_j((S_ij + g_j)/e)`; the plan is `exp((S + f + g)/e)` (with
//! `tau < 1`, the KL relaxation relative to `r ⊗ c` of POT's `sinkhorn_unbalanced`).
//!
//! Work layout: each rayon task takes one problem and copies its valid block into a per-worker
//! contiguous scratch whose rows are padded to whole blocks of [`W`] lanes (`solve.rs`), so the
//! inner loops are fixed-width vector operations and padding costs nothing beyond that
//! rounding. A problem is solved by one worker, in a fixed order: results do not depend on the
//! thread count or on the other problems of the batch. Small plain-domain problems (at most
//! 4096 elements, balanced, no schedule) are instead solved `L` at a time, one per SIMD lane, in
//! groups of alike sizes with neutral padding (`lanes.rs`), forward and backward; a lane's
//! results are bitwise those of its problem alone, so the same independence holds.
//!
//! Domains, per problem: the plain domain (cached `exp`, no `exp` per iteration) when the call
//! allows it (`log_domain` "auto" or "off"), the problem is balanced, has no eps schedule, and
//! its exponent range — the largest valid-column spread of `S + f0`, over eps — is within the
//! plain domain's limit ([`Real::PLAIN_RANGE_LIMIT`]); the log domain otherwise. Schedules and
//! finite `reach` always run in the log domain. "off" where the plain domain is not safe is an
//! error, as for `sinkhorn`.
//!
//! Files: the API, checks and the batch driver here; the per-problem forward (which the
//! backward replays to record its potentials) in `solve.rs`; the reverse pass in `reverse.rs`;
//! the lane path of small problems, forward and backward, in `lanes.rs`.

mod lanes;
mod reverse;
mod solve;
#[cfg(test)]
mod tests;

use crate::dims::Dims;
use crate::domain::LogDomain;
use crate::error::{check_len, MmotError, Result};
use crate::exec::shared_mut::SharedMut;
use crate::interrupt::Interrupt;
use crate::simd::Real;
use rayon::prelude::*;
use solve::{Problem, Workspace};
use std::sync::atomic::{AtomicBool, Ordering};

/// The parameters of a `sinkhorn_ext` call (forward or backward).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SinkhornExtParams {
    /// The final entropic regularisation, finite and > 0.
    pub eps: f64,
    /// The schedule's factor per iteration, in (0, 1).
    pub decay: f64,
    /// The iteration cap (>= 1). Unused by the backward, which takes per-problem counts.
    pub n_iters: usize,
    /// Stop a problem once its marginal error is <= tol (at the final eps); < 0: never.
    pub tol: f64,
    /// KL relaxation weight of both marginals, > 0; +inf: balanced.
    pub reach: f64,
    pub log_domain: LogDomain,
}

/// The inputs of a padded ragged batch `[B, N, K]`.
#[derive(Clone, Copy)]
pub struct SinkhornExtInput<'a, T> {
    /// `[B, N, K]`.
    pub scores: &'a [T],
    /// `[B, N]` row masses (positive on the valid rows).
    pub row_mass: &'a [T],
    /// `[B, K]` column masses (positive on the valid columns).
    pub col_mass: &'a [T],
    /// `[B]`, each in `1..=N`.
    pub row_counts: &'a [i64],
    /// `[B]`, each in `1..=K`.
    pub col_counts: &'a [i64],
    /// `[B, N]` initial row potentials (score units; zeros for a cold start).
    pub init_f: &'a [T],
    /// `[B]` first eps of each problem's schedule (finite; <= eps: no schedule).
    pub eps_start: &'a [f64],
}

/// The outputs of [`sinkhorn_ext_forward`].
pub struct SinkhornExtOutput<'a, T> {
    /// `[B, N, K]` the plan of the last iteration run, in the valid blocks (the padding is
    /// left as given: zeros).
    pub plan: &'a mut [T],
    /// `[B, N]`, `[B, K]` the potentials of that iteration (score units).
    pub f: &'a mut [T],
    pub g: &'a mut [T],
    /// `[B]` iterations run.
    pub iters: &'a mut [i64],
    /// `[B]` marginal error of the last iteration run.
    pub err: &'a mut [T],
}

/// The forward of the general Sinkhorn path on a padded ragged batch (see the module docs).
/// A problem with a non-finite valid score gets NaN in its valid plan, f and g, `iters =
/// n_iters` and a NaN error.
pub fn sinkhorn_ext_forward<T: Real>(
    input: &SinkhornExtInput<'_, T>,
    output: SinkhornExtOutput<'_, T>,
    dims: Dims,
    params: &SinkhornExtParams,
) -> Result<()> {
    check_input(input, dims, params)?;
    check_len("plan", output.plan.len(), dims)?;
    check_len("f", output.f.len(), [dims.problems, dims.rows])?;
    check_len("g", output.g.len(), [dims.problems, dims.cols])?;
    check_len("iters", output.iters.len(), [dims.problems])?;
    check_len("err", output.err.len(), [dims.problems])?;
    if dims.problems == 0 {
        return Ok(());
    }
    let Dims {
        rows: n, cols: k, ..
    } = dims;
    let p = Problem::<T>::new(params);
    let too_wide = AtomicBool::new(false);
    let SinkhornExtOutput {
        plan,
        f,
        g,
        iters,
        err,
    } = output;
    let lanes = |b: usize| {
        let (rows, cols) = (input.row_counts[b], input.col_counts[b]);
        p.takes_lanes(rows as usize, cols as usize, input.eps_start[b])
    };
    let picks: Vec<usize> = (0..dims.problems).filter(|&b| lanes(b)).collect();
    // The per-problem path, for the problems the lanes do not take.
    if picks.len() < dims.problems {
        plan.par_chunks_mut(n * k)
            .zip(f.par_chunks_mut(n))
            .zip(g.par_chunks_mut(k))
            .zip(iters.par_iter_mut())
            .zip(err.par_iter_mut())
            .enumerate()
            .with_max_len(1)
            .for_each_init(Workspace::default, |ws, (b, ((((pl, fo), go), it), er))| {
                if lanes(b) {
                    return;
                }
                let one = problem(input, dims, b);
                let res = p.forward(&one, ws, (pl, fo, go));
                if res.too_wide {
                    too_wide.store(true, Ordering::Relaxed);
                }
                *it = res.iters as i64;
                *er = res.err;
            });
    }
    if !picks.is_empty() {
        // The lane problems were skipped above; each is written by its group's task alone.
        let out = lanes::Outputs {
            plan: SharedMut(plan.as_mut_ptr()),
            f: SharedMut(f.as_mut_ptr()),
            g: SharedMut(g.as_mut_ptr()),
            iters: SharedMut(iters.as_mut_ptr()),
            err: SharedMut(err.as_mut_ptr()),
        };
        if p.forward_lanes(input, dims, picks, out) {
            too_wide.store(true, Ordering::Relaxed);
        }
    }
    p.interrupt.check()?;
    if too_wide.load(Ordering::Relaxed) {
        return Err(forced_plain_error::<T>());
    }
    Ok(())
}

/// The exact vector-Jacobian product of [`sinkhorn_ext_forward`]'s plan with respect to
/// `scores`: `out = (∂plan/∂scores)ᵀ grad` for the unrolled iteration that ran `iters[b]`
/// iterations of the same schedule from the same `init_f` (masses and `init_f` are constants).
/// `grad`, `out`: `[B, N, K]`; padded `grad` entries are never read, padded `out` entries are
/// never written (zeros given).
/// `params.n_iters` and `params.tol` are not used.
pub fn sinkhorn_ext_backward<T: Real>(
    grad: &[T],
    input: &SinkhornExtInput<'_, T>,
    iters: &[i64],
    out: &mut [T],
    dims: Dims,
    params: &SinkhornExtParams,
) -> Result<()> {
    let params = SinkhornExtParams {
        n_iters: 1,
        tol: -1.0,
        ..*params
    };
    check_input(input, dims, &params)?;
    check_len("grad", grad.len(), dims)?;
    check_len("iters", iters.len(), [dims.problems])?;
    check_len("out", out.len(), dims)?;
    if let Some(bad) = iters.iter().find(|&&t| t < 1) {
        return Err(MmotError::InvalidArgument(format!(
            "iters must be >= 1 for every problem, got {bad}"
        )));
    }
    if dims.problems == 0 {
        return Ok(());
    }
    let Dims {
        rows: n, cols: k, ..
    } = dims;
    let p = Problem::<T>::new(&params);
    let too_wide = AtomicBool::new(false);
    let lanes = |b: usize| {
        let (rows, cols) = (input.row_counts[b], input.col_counts[b]);
        p.takes_lanes(rows as usize, cols as usize, input.eps_start[b])
    };
    let picks: Vec<usize> = (0..dims.problems).filter(|&b| lanes(b)).collect();
    if picks.len() < dims.problems {
        out.par_chunks_mut(n * k)
            .zip(grad.par_chunks(n * k))
            .zip(iters.par_iter())
            .enumerate()
            .with_max_len(1)
            .for_each_init(Workspace::default, |ws, (b, ((o, gr), &it))| {
                if lanes(b) {
                    return;
                }
                let one = problem(input, dims, b);
                if p.backward(&one, gr, it as usize, ws, o) {
                    too_wide.store(true, Ordering::Relaxed);
                }
            });
    }
    // The lane problems were skipped above; each is written by its group's task alone.
    if !picks.is_empty()
        && p.backward_lanes(grad, input, iters, dims, picks, SharedMut(out.as_mut_ptr()))
    {
        too_wide.store(true, Ordering::Relaxed);
    }
    p.interrupt.check()?;
    if too_wide.load(Ordering::Relaxed) {
        return Err(forced_plain_error::<T>());
    }
    Ok(())
}

/// One problem of the batch: its valid sizes, its slices of the padded inputs (row stride
/// `stride` = K) and its schedule start.
pub(crate) struct One<'a, T> {
    n: usize,
    k: usize,
    stride: usize,
    scores: &'a [T],
    row_mass: &'a [T],
    col_mass: &'a [T],
    init_f: &'a [T],
    eps_start: f64,
}

fn problem<'a, T>(input: &SinkhornExtInput<'a, T>, dims: Dims, b: usize) -> One<'a, T> {
    let Dims {
        rows: n, cols: k, ..
    } = dims;
    One {
        n: input.row_counts[b] as usize,
        k: input.col_counts[b] as usize,
        stride: k,
        scores: &input.scores[b * n * k..(b + 1) * n * k],
        row_mass: &input.row_mass[b * n..(b + 1) * n],
        col_mass: &input.col_mass[b * k..(b + 1) * k],
        init_f: &input.init_f[b * n..(b + 1) * n],
        eps_start: input.eps_start[b],
    }
}

/// The checks the forward and the backward share: lengths, counts and parameters.
fn check_input<T>(
    input: &SinkhornExtInput<'_, T>,
    dims: Dims,
    params: &SinkhornExtParams,
) -> Result<()> {
    let Dims {
        problems: b,
        rows: n,
        cols: k,
    } = dims;
    check_len("scores", input.scores.len(), dims)?;
    check_len("row_mass", input.row_mass.len(), [b, n])?;
    check_len("col_mass", input.col_mass.len(), [b, k])?;
    check_len("row_counts", input.row_counts.len(), [b])?;
    check_len("col_counts", input.col_counts.len(), [b])?;
    check_len("init_f", input.init_f.len(), [b, n])?;
    check_len("eps_start", input.eps_start.len(), [b])?;
    let invalid = |m: String| Err(MmotError::InvalidArgument(m));
    for (name, counts, max) in [
        ("row_counts", input.row_counts, n),
        ("col_counts", input.col_counts, k),
    ] {
        if let Some(bad) = counts.iter().find(|&&c| c < 1 || c as u64 > max as u64) {
            return invalid(format!(
                "{name} must lie in 1..={max} for every problem, got {bad}"
            ));
        }
    }
    if !(params.eps.is_finite() && params.eps > 0.0) {
        return invalid(format!(
            "eps must be a finite number > 0, got {}",
            params.eps
        ));
    }
    if !(params.decay > 0.0 && params.decay < 1.0) {
        return invalid(format!("decay must lie in (0, 1), got {}", params.decay));
    }
    if params.n_iters == 0 {
        return invalid("n_iters must be >= 1, got 0".to_string());
    }
    if params.tol.is_nan() {
        return invalid("tol must be a number (< 0 for none), got NaN".to_string());
    }
    if params.reach.is_nan() || params.reach <= 0.0 {
        return invalid(format!(
            "reach must be > 0 (+inf for balanced), got {}",
            params.reach
        ));
    }
    if let Some(bad) = input.eps_start.iter().find(|e| !e.is_finite()) {
        return invalid(format!(
            "eps_start must be finite for every problem (<= eps: no schedule), got {bad}"
        ));
    }
    Ok(())
}

fn forced_plain_error<T: Real>() -> MmotError {
    MmotError::InvalidArgument(format!(
        "log_domain='off' forces the plain domain, where exp would under- or overflow: the \
         exponent range (max - min of a valid column of scores + init_f) / eps of some problem \
         is above the plain domain's limit of {} for this dtype; use log_domain=\"auto\" (or \
         \"on\")",
        T::PLAIN_RANGE_LIMIT
    ))
}

/// What every problem of a call shares.
impl<T: Real> Problem<T> {
    fn new(params: &SinkhornExtParams) -> Self {
        Problem {
            eps: params.eps,
            decay: params.decay,
            n_iters: params.n_iters,
            tol: params.tol,
            reach: params.reach,
            log_domain: params.log_domain,
            interrupt: Interrupt::current(),
            _t: std::marker::PhantomData,
        }
    }
}
