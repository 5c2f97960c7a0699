//! Multi-Assignment Sinkhorn-Knopp in grouped form; `docs/multi_sinkhorn.md` derives it.
//!
//! The dense algorithm works on a `[K, N, K]` tensor. Slots of equal weight stay identical
//! throughout, so the plan factorises as `P[m,n,a] = E_G[n,a] f_G[a] g[n,a] h_G[n]` with one
//! `(f_G, h_G)` pair per distinct weight (a *group*); the kernel only ever holds `O(G·N·K)`
//! values.
//!
//! Each iteration is one streaming pass over rows. Row `n` needs the new `f`, the previous
//! `h_G[n]` and row `n` of the scores; it forms the slot values after the `g` step,
//! `q_G[a] = h_G E_G f_G / Σ_G' c_G' h_G' E_G' f_G'`, their row sums (which give the new
//! `h_G[n]`), and the slot values after the `h` step, `q_G / rowsum_G`, whose column sums over
//! `n` give the next `f_G` by `f_G *= r / colsum`. `g` itself is never stored. The last pass
//! writes the result `T = Σ_G top_G h_G q_G` (min-maxed per row) instead of column sums.
//!
//! Plain domain: `E_G = exp(w_G (S - colmax)/eps)` is computed once per call (pass 0) and
//! cached per row, so the iterations do no `exp`; with two groups only `D = E_1 / E_0` is
//! cached. Log domain: the same quantities from log potentials, `G` exponentials per element
//! per iteration, without overflow. `docs/numerics.md` gives the choice between them.
//!
//! The parts: this file holds the API, its checks and the slot groups; `forward` one problem's
//! passes; `layout` the per-row state blocks and the chunking of a pass; `rows` the row updates
//! for any group count in either domain; `two_groups` and `single_sweep` the SIMD row updates
//! of two plain groups (SSPC's case, the hot loop); `backward` the vector-Jacobian product,
//! whose two-plain-group case `two_groups_backward` runs on the forward's ratio layout;
//! `small` batches of tiny problems solved in SIMD lanes.

mod backward;
mod forward;
mod layout;
mod rows;
mod single_sweep;
mod small;
mod small_backward;
#[cfg(test)]
mod tests;
mod two_groups;
mod two_groups_backward;

use crate::dims::Dims;
use crate::domain::{check_forced_plain, check_log_range};
use crate::domain::{use_log_domain, LogDomain};
use crate::error::{check_eps_iters, check_len, not_finite, MmotError, Result};
use crate::exec::column_stats::batch_col_stats;
use crate::exec::spare::Spare;
use crate::interrupt::Interrupt;
use crate::simd::Real;
use crate::sinkhorn::poison_non_finite;
use backward::BackWorkspace;
use forward::Workspace;
use rayon::prelude::*;
use std::str::FromStr;

/// Row post-processing of the output `T`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalize {
    /// Each row becomes `(T - min) / (max - min)`; constant rows become 0 (the convention of
    /// sklearn's MinMaxScaler, which SSPC's targets follow).
    MinMax,
    None,
}

impl FromStr for Normalize {
    type Err = MmotError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "minmax" => Ok(Normalize::MinMax),
            "none" => Ok(Normalize::None),
            other => Err(MmotError::InvalidArgument(format!(
                "normalize must be 'minmax' or 'none', got {other:?}"
            ))),
        }
    }
}

/// Scalar parameters of a Multi-SK call.
#[derive(Debug, Clone)]
pub struct MultiSinkhornParams {
    pub eps: f64,
    pub n_iters: usize,
    /// One positive weight per slot (length K).
    pub slot_weights: Vec<f64>,
    /// Output = sum over the last `k` slots; `1 <= k <= K`.
    pub k: usize,
    pub normalize: Normalize,
    pub log_domain: LogDomain,
    /// Forward only: reject non-finite scores and bad anchor masses with an error.
    pub check_values: bool,
}

/// Grouped Multi-SK on a batch of `dims.problems` independent `[rows, cols]` problems (`cols` =
/// K anchors = slots).
///
/// `scores`, `out`: `[problems, rows, cols]`; `anchor_mass`: `[problems, cols]` (resolved by the
/// caller, each row summing to `rows`). Returns whether the log domain was used (decided once for
/// the call). With `params.check_values`, NaN or Inf in `scores` (found in the column-statistics
/// pass the kernel makes anyway) and anchor masses that are not positive and finite or do not sum
/// to `rows` (to a relative 1e-4) per problem are an error, not a result.
pub fn multi_sinkhorn<T: Real>(
    scores: &[T],
    anchor_mass: &[T],
    out: &mut [T],
    dims: Dims,
    params: &MultiSinkhornParams,
) -> Result<bool> {
    check_args(scores, anchor_mass, out, dims, params)?;
    if params.check_values {
        check_masses(anchor_mass, dims.cols, dims.rows)?;
    }
    let problem = Problem::new(dims, params);
    check_forced_plain(
        params.log_domain,
        scores,
        dims,
        params.eps,
        problem.groups.max_weight,
    )?;
    let log = solve(&problem, scores, anchor_mass, out, dims, params)?;
    problem.interrupt.check()?;
    if !params.check_values {
        poison_non_finite(scores, out, dims);
    }
    Ok(log)
}

/// The forward solve, with the argument checks done.
fn solve<T: Real>(
    problem: &Problem<T>,
    scores: &[T],
    anchor_mass: &[T],
    out: &mut [T],
    dims: Dims,
    params: &MultiSinkhornParams,
) -> Result<bool> {
    if dims.problems * dims.rows == 0 {
        return Ok(use_log_domain::<T>(params.log_domain, 0.0));
    }
    if small::applies(problem, params.log_domain)
        && small::solve(problem, scores, anchor_mass, out, params)
    {
        return Ok(false);
    }
    let stats = ColumnStats::measure(scores, dims, &problem.groups, params);
    if params.check_values && !stats.finite {
        return Err(not_finite("scores"));
    }
    if params.check_values {
        check_log_range::<T>(stats.range, params.eps)?;
    }
    let log = stats.log;
    let matrix = dims.matrix_len();
    out.par_chunks_mut(matrix)
        .zip(scores.par_chunks(matrix))
        .zip(anchor_mass.par_chunks(dims.cols))
        .zip(stats.col_max.par_chunks(dims.cols))
        .for_each_init(
            Spare::<Workspace<T>>::take,
            |ws, (((out, scores), mass), col_max)| {
                let input = Inputs {
                    scores,
                    mass,
                    col_max,
                };
                problem.solve(input, out, ws, log, None)
            },
        );
    Ok(log)
}

/// The exact vector-Jacobian product of [`multi_sinkhorn`] with respect to `scores`, through
/// the unrolled iteration and the min-max step, written into `out` (`docs/gradients.md`).
/// `params.check_values` is not used. Min-max ties share the gradient equally, as
/// `torch.amax` does. Returns whether the log domain was used, as the forward decides it.
pub fn multi_sinkhorn_backward<T: Real>(
    grad: &[T],
    scores: &[T],
    anchor_mass: &[T],
    out: &mut [T],
    dims: Dims,
    params: &MultiSinkhornParams,
) -> Result<bool> {
    check_args(scores, anchor_mass, out, dims, params)?;
    check_len("grad", grad.len(), dims)?;
    let problem = Problem::new(dims, params);
    if dims.problems * dims.rows == 0 {
        return Ok(use_log_domain::<T>(params.log_domain, 0.0));
    }
    let stats = ColumnStats::measure(scores, dims, &problem.groups, params);
    let log = stats.log;
    if problem.groups.weights.len() == 1 {
        // One group: g makes every slot value 1/c, so T = top/K whatever the scores.
        out.fill(T::ZERO);
        poison_non_finite(scores, out, dims);
        return Ok(log);
    }
    if !log && small::applies(&problem, params.log_domain) {
        small_backward::backward(&problem, grad, scores, anchor_mass, out);
        problem.interrupt.check()?;
        poison_non_finite(scores, out, dims);
        return Ok(log);
    }
    let matrix = dims.matrix_len();
    out.par_chunks_mut(matrix)
        .zip(grad.par_chunks(matrix))
        .zip(scores.par_chunks(matrix))
        .zip(anchor_mass.par_chunks(dims.cols))
        .zip(stats.col_max.par_chunks(dims.cols))
        .for_each_init(
            Spare::<BackWorkspace<T>>::take,
            |bw, ((((out, grad), scores), mass), col_max)| {
                let input = Inputs {
                    scores,
                    mass,
                    col_max,
                };
                problem.backward(grad, input, out, bw, log)
            },
        );
    problem.interrupt.check()?;
    poison_non_finite(scores, out, dims);
    Ok(log)
}

/// Checks the shapes and parameters shared by the forward and the backward.
fn check_args<T: Real>(
    scores: &[T],
    anchor_mass: &[T],
    out: &[T],
    dims: Dims,
    params: &MultiSinkhornParams,
) -> Result<()> {
    let kk = dims.cols;
    check_len("scores", scores.len(), dims)?;
    check_len("out", out.len(), dims)?;
    check_len("anchor_mass", anchor_mass.len(), [dims.problems, kk])?;
    check_eps_iters(params.eps, params.n_iters)?;
    if params.slot_weights.len() != kk {
        return Err(MmotError::InvalidArgument(format!(
            "slot_weights must have K={kk} entries, got {}",
            params.slot_weights.len()
        )));
    }
    if let Some(w) = params
        .slot_weights
        .iter()
        .find(|w| !(w.is_finite() && **w > 0.0))
    {
        return Err(MmotError::InvalidArgument(format!(
            "slot_weights must be finite and > 0, got {w}"
        )));
    }
    if params.k < 1 || params.k > kk {
        return Err(MmotError::InvalidArgument(format!(
            "k must be in 1..={kk} (K), got {}",
            params.k
        )));
    }
    Ok(())
}

/// Every problem's `k` masses are positive and finite and sum to `total` (to a relative 1e-4).
fn check_masses<T: Real>(masses: &[T], k: usize, total: usize) -> Result<()> {
    for problem in masses.chunks_exact(k) {
        let (mut sum, mut positive) = (0.0f64, true);
        for m in problem.iter().map(|m| m.to_f64()) {
            positive &= m > 0.0 && m < f64::INFINITY;
            sum += m;
        }
        if !positive {
            return Err(MmotError::InvalidArgument(
                "argument 'anchor_mass' must hold positive finite masses".into(),
            ));
        }
        let want = total as f64;
        if (sum - want).abs() > 1e-4 * want {
            return Err(MmotError::InvalidArgument(format!(
                "argument 'anchor_mass' must sum to N = {total} in every problem; \
                 got a sum of {sum:.6} where {want} was expected"
            )));
        }
    }
    Ok(())
}

/// Slots grouped by equal weight (in order of first appearance).
#[derive(Debug, Clone)]
struct Groups<T> {
    /// `w_G`: the weight of each group.
    weights: Vec<T>,
    /// `c_G`: the number of slots in each group.
    counts: Vec<T>,
    /// `top_G`: the number of the last k slots in each group (the output's coefficients).
    top_counts: Vec<T>,
    /// The largest slot weight, which scales the exponent range the domain choice measures.
    max_weight: f64,
}

impl<T: Real> Groups<T> {
    fn new(slot_weights: &[f64], k: usize) -> Self {
        let n_slots = slot_weights.len();
        let mut weights: Vec<T> = Vec::new();
        let mut counts: Vec<usize> = Vec::new();
        let mut top_counts: Vec<usize> = Vec::new();
        let mut max_weight = 0.0f64;
        for (slot, &weight) in slot_weights.iter().enumerate() {
            let weight = T::from_f64(weight);
            max_weight = max_weight.max(weight.to_f64());
            let group = match weights.iter().position(|&w| w == weight) {
                Some(group) => group,
                None => {
                    weights.push(weight);
                    counts.push(0);
                    top_counts.push(0);
                    weights.len() - 1
                }
            };
            counts[group] += 1;
            if slot >= n_slots - k {
                top_counts[group] += 1;
            }
        }
        let as_reals = |v: Vec<usize>| v.into_iter().map(|x| T::from_f64(x as f64)).collect();
        Groups {
            weights,
            counts: as_reals(counts),
            top_counts: as_reals(top_counts),
            max_weight,
        }
    }

    fn len(&self) -> usize {
        self.weights.len()
    }
}

/// What every problem of a call shares.
struct Problem<T> {
    /// N: rows (samples) per problem.
    rows: usize,
    /// K: anchors per row, which is also the number of slots.
    anchors: usize,
    inv_eps: T,
    n_iters: usize,
    normalize: Normalize,
    groups: Groups<T>,
    interrupt: Interrupt,
}

impl<T: Real> Problem<T> {
    fn new(dims: Dims, params: &MultiSinkhornParams) -> Self {
        Problem {
            rows: dims.rows,
            anchors: dims.cols,
            inv_eps: T::from_f64(1.0 / params.eps),
            n_iters: params.n_iters,
            normalize: params.normalize,
            groups: Groups::new(&params.slot_weights, params.k),
            interrupt: Interrupt::current(),
        }
    }

    /// `L = (S - colmax) / eps` of one row of `input`'s scores, into `logits` (`[K]`). Every
    /// value is `<= 0` and each column has a 0, so no exponential of `w_G L` overflows.
    #[inline(always)]
    fn logits(&self, input: Inputs<T>, row: usize, logits: &mut [T]) {
        let k = self.anchors;
        let scores = &input.scores[row * k..(row + 1) * k];
        let (col_max, logits) = (&input.col_max[..k], &mut logits[..k]);
        for j in 0..k {
            logits[j] = (scores[j] - col_max[j]) * self.inv_eps;
        }
    }
}

/// One problem's inputs.
#[derive(Clone, Copy)]
struct Inputs<'a, T> {
    /// `[N, K]`.
    scores: &'a [T],
    /// The anchor masses `r`, `[K]`.
    mass: &'a [T],
    /// The scores' column maxima, `[K]`.
    col_max: &'a [T],
}

/// The statistics pass over a whole call: each problem's column maxima, the domain the call
/// runs in, and whether every score is finite.
struct ColumnStats<T> {
    /// `[problems, K]`.
    col_max: Vec<T>,
    /// max_G w_G · (max − min of a column) / eps over the call.
    range: f64,
    log: bool,
    finite: bool,
}

impl<T: Real> ColumnStats<T> {
    fn measure(scores: &[T], dims: Dims, groups: &Groups<T>, params: &MultiSinkhornParams) -> Self {
        let mut col_max = vec![T::ZERO; dims.problems * dims.cols];
        let (range, finite) =
            batch_col_stats(scores, dims.problems, dims.rows, dims.cols, &mut col_max);
        // The widest exponent range the plain domain would meet: max_G w_G · range / eps.
        let range = range * groups.max_weight / params.eps;
        let log = use_log_domain::<T>(params.log_domain, range);
        ColumnStats {
            col_max,
            range,
            log,
            finite,
        }
    }
}
