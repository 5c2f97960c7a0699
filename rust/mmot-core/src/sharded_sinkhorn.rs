//! Sinkhorn and Multi-SK with the rows (samples) sharded over processes (`docs/distributed.md`).
//!
//! Each process holds some rows of every problem and runs the same iteration as the
//! single-process kernels on them. Everything a step needs from other rows is a sum over rows
//! of one column (anchor) vector, so the kernels here hand those partial sums to a
//! [`Collective`] once per iteration, forward and backward, and carry on with the totals. The
//! caller (the PyO3 layer) implements it with `torch.distributed.all_reduce`.
//!
//! Formulation. The logits are centred by `shift`, the column maximum over *all* ranks (the
//! caller all-reduces it): L = (S − shift)/eps, floored at −(dtype max)/8 as in
//! `mmot.reference.centered_logits`. The column shift is absorbed by the first column scaling.
//!
//! - Plain domain (`log = false`, chosen by the caller exactly as the single-process op would,
//!   from the all-reduced exponent range): `E = exp(L)` is cached once and every iteration is
//!   products and sums, the reference's plain iteration.
//! - Log domain: the stable formulation of the Triton kernels (column log-potentials corrected
//!   multiplicatively from the column sums of the row-normalised plan; one `exp` per entry and
//!   iteration).
//!
//! The backward always replays the forward in the log form (the same function; the exact
//! gradient of the unrolled iteration) recording the potentials, then runs one reverse pass per
//! iteration whose column sums are all-reduced (`docs/distributed.md` has the recurrences).
//!
//! Rows are processed in fixed chunks and the chunks' partial sums are added in chunk order, so
//! results do not depend on the thread count.

// Several equally long per-column and per-row arrays are walked together by index.
#![allow(clippy::needless_range_loop)]

use crate::dims::Dims;
use crate::error::{check_eps_iters, check_len, MmotError, Result};
use crate::simd::{dispatch, dot, max, sum, Real};
use rayon::prelude::*;

/// Sums over all processes of a group: `buf` is replaced, element by element, by the sum of
/// every process's `buf`. Every process calls it the same number of times with equal lengths.
pub trait Collective<T> {
    fn sum(&mut self, buf: &mut [T]) -> Result<()>;
}

/// A [`Collective`] over a single process: the sums are the local ones (tests, one rank).
pub struct Alone;

impl<T> Collective<T> for Alone {
    fn sum(&mut self, _buf: &mut [T]) -> Result<()> {
        Ok(())
    }
}

/// Rows per chunk of a pass (fixed, so that sums do not depend on the thread count).
const CHUNK: usize = 32;

/// Runs `f(first_row, a_rows, b_rows, c_rows, partial)` on every chunk of [`CHUNK`] rows of the
/// three row-major buffers (row widths `wa`, `wb`, `wc`; all hold the same number of rows) and
/// returns the chunks' `plen`-long partials, summed in chunk order.
#[allow(clippy::too_many_arguments)]
fn pass<T: Real, F>(
    a: &mut [T],
    wa: usize,
    b: &mut [T],
    wb: usize,
    c: &mut [T],
    wc: usize,
    plen: usize,
    f: F,
) -> Vec<T>
where
    F: Fn(usize, &mut [T], &mut [T], &mut [T], &mut [T]) + Sync + Send,
{
    let mut total = vec![T::ZERO; plen];
    if a.is_empty() {
        return total;
    }
    let parts: Vec<Vec<T>> = a
        .par_chunks_mut(CHUNK * wa)
        .zip(b.par_chunks_mut(CHUNK * wb))
        .zip(c.par_chunks_mut(CHUNK * wc))
        .enumerate()
        .map(|(index, ((ra, rb), rc))| {
            let mut part = vec![T::ZERO; plen];
            // Compiled for the widest instruction set here (the bodies are inlined).
            dispatch(
                #[inline(always)]
                || f(index * CHUNK, ra, rb, rc, &mut part),
            );
            part
        })
        .collect();
    for part in parts {
        for (t, p) in total.iter_mut().zip(part) {
            *t += p;
        }
    }
    total
}

/// The unfloored centred logit 2·((s/2 − shift/2)/eps): halved so that a difference of two
/// finite scores cannot overflow, as in `mmot.reference.centered_logits`.
#[inline(always)]
fn half_logit<T: Real>(s: T, shift: T, inv_eps: T) -> T {
    let half = T::from_f64(0.5);
    T::from_f64(2.0) * ((half * s - half * shift) * inv_eps)
}

#[inline(always)]
fn floor<T: Real>() -> T {
    T::from_f64(-T::LOG_RANGE_LIMIT)
}

fn check_common<T>(
    scores: &[T],
    shift: &[T],
    out: &[T],
    dims: Dims,
    eps: f64,
    n_iters: usize,
) -> Result<()> {
    check_len("scores", scores.len(), dims)?;
    check_len("out", out.len(), dims)?;
    check_len("shift", shift.len(), [dims.problems, dims.cols])?;
    check_eps_iters(eps, n_iters)
}

// ------------------------------------------------------------------------------------------
// Sinkhorn
// ------------------------------------------------------------------------------------------

/// This process's rows of the SwAV-style Sinkhorn of `mmot.sinkhorn` (`process_group=`).
///
/// `scores`, `out`: `[problems, rows, cols]` (this process's rows); `shift`: `[problems, cols]`
/// the column maxima over all processes; `row_mass`: `[problems, rows]` (this process's rows);
/// `col_mass`: `[problems, cols]`. `log` picks the domain (the caller decides it from the
/// all-reduced exponent range). Column sums are summed by `comm` once per iteration.
#[allow(clippy::too_many_arguments)]
pub fn sharded_sinkhorn<T: Real>(
    scores: &[T],
    shift: &[T],
    row_mass: &[T],
    col_mass: &[T],
    out: &mut [T],
    dims: Dims,
    eps: f64,
    n_iters: usize,
    log: bool,
    comm: &mut dyn Collective<T>,
) -> Result<()> {
    check_common(scores, shift, out, dims, eps, n_iters)?;
    check_len("row_mass", row_mass.len(), [dims.problems, dims.rows])?;
    check_len("col_mass", col_mass.len(), [dims.problems, dims.cols])?;
    if log {
        sinkhorn_log(
            scores, shift, row_mass, col_mass, out, None, dims, eps, n_iters, comm,
        )
    } else {
        sinkhorn_plain(
            scores, shift, row_mass, col_mass, out, dims, eps, n_iters, comm,
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn sinkhorn_plain<T: Real>(
    scores: &[T],
    shift: &[T],
    row_mass: &[T],
    col_mass: &[T],
    out: &mut [T],
    dims: Dims,
    eps: f64,
    n_iters: usize,
    comm: &mut dyn Collective<T>,
) -> Result<()> {
    let Dims {
        problems: nb,
        rows: n,
        cols: k,
    } = dims;
    let inv_eps = T::from_f64(1.0 / eps);
    let mut u = vec![T::ONE; nb * n];
    let mut dummy = vec![T::ZERO; nb * n];
    let mut col = vec![T::ZERO; nb * k];
    // Pass 0: E = exp(L), cached in `out`, and its column sums.
    for b in 0..nb {
        let s = &scores[b * n * k..(b + 1) * n * k];
        let sh = &shift[b * k..(b + 1) * k];
        let part = pass(
            &mut out[b * n * k..(b + 1) * n * k],
            k,
            &mut u[b * n..(b + 1) * n],
            1,
            &mut dummy[b * n..(b + 1) * n],
            1,
            k,
            #[inline(always)]
            |row0, o, _, _, part| {
                for (i, orow) in o.chunks_mut(k).enumerate() {
                    let srow = &s[(row0 + i) * k..(row0 + i + 1) * k];
                    for a in 0..k {
                        let e = half_logit(srow[a], sh[a], inv_eps).fmax(floor()).exp_fast();
                        orow[a] = e;
                        part[a] += e;
                    }
                }
            },
        );
        col[b * k..(b + 1) * k].copy_from_slice(&part);
    }
    comm.sum(&mut col)?;
    let mut v: Vec<T> = col.iter().zip(col_mass).map(|(&s, &c)| c / s).collect();
    for t in 1..=n_iters {
        let last = t == n_iters;
        for b in 0..nb {
            let vb = &v[b * k..(b + 1) * k];
            let r = &row_mass[b * n..(b + 1) * n];
            let part = pass(
                &mut out[b * n * k..(b + 1) * n * k],
                k,
                &mut u[b * n..(b + 1) * n],
                1,
                &mut dummy[b * n..(b + 1) * n],
                1,
                k,
                #[inline(always)]
                |row0, o, ur, _, part| {
                    for (i, orow) in o.chunks_mut(k).enumerate() {
                        let ui = r[row0 + i] / dot(orow, vb);
                        ur[i] = ui;
                        if last {
                            for (x, &v) in orow.iter_mut().zip(vb) {
                                *x = *x * ui * v;
                            }
                        } else {
                            for (p, &x) in part.iter_mut().zip(orow.iter()) {
                                *p += x * ui;
                            }
                        }
                    }
                },
            );
            col[b * k..(b + 1) * k].copy_from_slice(&part);
        }
        if !last {
            comm.sum(&mut col)?;
            for ((vv, &s), &c) in v.iter_mut().zip(&col).zip(col_mass) {
                *vv = c / s;
            }
        }
    }
    Ok(())
}

/// The potentials of the log-form replay: per row `2·T` values (a_t's row max and rest,
/// t = 1..T), per problem `(T + 1)·K` column potentials b_t (t = 1..T at offsets t·K).
struct SinkhornHistory<T> {
    rows: Vec<T>,
    cols: Vec<T>,
}

/// The log form; with `hist`, `out` keeps the logits L (not the plan) and the potentials are
/// recorded for the backward.
#[allow(clippy::too_many_arguments)]
fn sinkhorn_log<T: Real>(
    scores: &[T],
    shift: &[T],
    row_mass: &[T],
    col_mass: &[T],
    out: &mut [T],
    hist: Option<&mut SinkhornHistory<T>>,
    dims: Dims,
    eps: f64,
    n_iters: usize,
    comm: &mut dyn Collective<T>,
) -> Result<()> {
    let Dims {
        problems: nb,
        rows: n,
        cols: k,
    } = dims;
    let inv_eps = T::from_f64(1.0 / eps);
    let record = hist.is_some();
    let hw = if record { 2 * n_iters } else { 1 };
    let mut own = SinkhornHistory {
        rows: Vec::new(),
        cols: Vec::new(),
    };
    let h = hist.unwrap_or(&mut own);
    h.rows.clear();
    h.rows.resize(nb * n * hw, T::ZERO);
    h.cols.clear();
    h.cols
        .resize(if record { nb * (n_iters + 1) * k } else { 0 }, T::ZERO);
    let SinkhornHistory {
        rows: hist_rows,
        cols: hist_cols,
    } = h;
    let save_cols = |hist_cols: &mut Vec<T>, t: usize, pot: &[T]| {
        if record {
            for b in 0..nb {
                let at = (b * (n_iters + 1) + t) * k;
                hist_cols[at..at + k].copy_from_slice(&pot[b * k..(b + 1) * k]);
            }
        }
    };
    let mut dummy = vec![T::ZERO; nb * n];
    let mut col = vec![T::ZERO; nb * k];
    // Pass 0: L cached in `out`; Σ_n exp(L), which is >= 1 over all ranks (L's column max is 0).
    for b in 0..nb {
        let s = &scores[b * n * k..(b + 1) * n * k];
        let sh = &shift[b * k..(b + 1) * k];
        let part = pass(
            &mut out[b * n * k..(b + 1) * n * k],
            k,
            &mut hist_rows[b * n * hw..(b + 1) * n * hw],
            hw,
            &mut dummy[b * n..(b + 1) * n],
            1,
            k,
            #[inline(always)]
            |row0, o, _, _, part| {
                for (i, orow) in o.chunks_mut(k).enumerate() {
                    let srow = &s[(row0 + i) * k..(row0 + i + 1) * k];
                    for (((x, acc), &sv), &shv) in
                        orow.iter_mut().zip(part.iter_mut()).zip(srow).zip(sh)
                    {
                        let l = half_logit(sv, shv, inv_eps).fmax(floor());
                        *x = l;
                        *acc += l.exp_fast();
                    }
                }
            },
        );
        col[b * k..(b + 1) * k].copy_from_slice(&part);
    }
    comm.sum(&mut col)?;
    let log_c: Vec<T> = col_mass.iter().map(|c| c.ln()).collect();
    let mut pot: Vec<T> = col
        .iter()
        .zip(&log_c)
        .map(|(&s, &lc)| lc - s.ln())
        .collect();
    save_cols(hist_cols, 1, &pot);
    for t in 1..=n_iters {
        let last = t == n_iters;
        let write = last && !record;
        for b in 0..nb {
            let pb = &pot[b * k..(b + 1) * k];
            let r = &row_mass[b * n..(b + 1) * n];
            let part = pass(
                &mut out[b * n * k..(b + 1) * n * k],
                k,
                &mut hist_rows[b * n * hw..(b + 1) * n * hw],
                hw,
                &mut dummy[b * n..(b + 1) * n],
                1,
                k,
                #[inline(always)]
                |row0, o, hr, _, part| {
                    let mut p = vec![T::ZERO; k];
                    for (i, orow) in o.chunks_mut(k).enumerate() {
                        for ((x, &l), &bv) in p.iter_mut().zip(orow.iter()).zip(pb) {
                            *x = l + bv;
                        }
                        let m = max(&p);
                        for x in p.iter_mut() {
                            *x = (*x - m).exp_fast();
                        }
                        let sum = sum(&p);
                        let ri = r[row0 + i];
                        let scale = ri / sum;
                        if record {
                            hr[i * hw + 2 * (t - 1)] = m;
                            hr[i * hw + 2 * (t - 1) + 1] = ri.ln() - sum.ln();
                        }
                        if write {
                            for (x, &pv) in orow.iter_mut().zip(p.iter()) {
                                *x = pv * scale;
                            }
                        } else if !last {
                            for (acc, &pv) in part.iter_mut().zip(p.iter()) {
                                *acc += pv * scale;
                            }
                        }
                    }
                },
            );
            col[b * k..(b + 1) * k].copy_from_slice(&part);
        }
        if !last {
            comm.sum(&mut col)?;
            for j in 0..nb * k {
                pot[j] = pot[j] + log_c[j] - col[j].ln();
            }
            save_cols(hist_cols, t + 1, &pot);
        }
    }
    Ok(())
}

/// The exact vector-Jacobian product of [`sharded_sinkhorn`] for this process's rows: `out` =
/// the gradient of this process's `scores`, given `grad` = ∂loss/∂P of its rows. Every process
/// calls it together (the reverse passes sum column vectors through `comm`).
#[allow(clippy::too_many_arguments)]
pub fn sharded_sinkhorn_backward<T: Real>(
    grad: &[T],
    scores: &[T],
    shift: &[T],
    row_mass: &[T],
    col_mass: &[T],
    out: &mut [T],
    dims: Dims,
    eps: f64,
    n_iters: usize,
    comm: &mut dyn Collective<T>,
) -> Result<()> {
    check_common(scores, shift, out, dims, eps, n_iters)?;
    check_len("grad", grad.len(), dims)?;
    check_len("row_mass", row_mass.len(), [dims.problems, dims.rows])?;
    check_len("col_mass", col_mass.len(), [dims.problems, dims.cols])?;
    let Dims {
        problems: nb,
        rows: n,
        cols: k,
    } = dims;
    let mut logits = vec![T::ZERO; dims.len()];
    let mut hist = SinkhornHistory {
        rows: Vec::new(),
        cols: Vec::new(),
    };
    sinkhorn_log(
        scores,
        shift,
        row_mass,
        col_mass,
        &mut logits,
        Some(&mut hist),
        dims,
        eps,
        n_iters,
        comm,
    )?;
    let inv_eps = T::from_f64(1.0 / eps);
    let hw = 2 * n_iters;
    let big_t = n_iters;
    let mut bbar = vec![T::ZERO; nb * k];
    // Reverse passes t = T, ..., 1, then 0; `out` accumulates L̄.
    for t in (0..=big_t).rev() {
        for b in 0..nb {
            let g = &grad[b * n * k..(b + 1) * n * k];
            let r = &row_mass[b * n..(b + 1) * n];
            let c = &col_mass[b * k..(b + 1) * k];
            let cols = &hist.cols[b * (n_iters + 1) * k..(b + 1) * (n_iters + 1) * k];
            // −b̄_{t+1} e^{b_{t+1} − b_t} / c: the column factor of Y (t < T).
            let scale: Vec<T> = if t < big_t {
                let (bn, bp) = (
                    &cols[(t + 1) * k..(t + 2) * k],
                    &cols[t.max(1) * k..(t.max(1) + 1) * k],
                );
                (0..k)
                    .map(|a| -bbar[b * k + a] / c[a] * (bn[a] - bp[a]).exp_fast())
                    .collect()
            } else {
                Vec::new()
            };
            let bt = &cols[t.max(1) * k..(t.max(1) + 1) * k];
            let part = pass(
                &mut out[b * n * k..(b + 1) * n * k],
                k,
                &mut logits[b * n * k..(b + 1) * n * k],
                k,
                &mut hist.rows[b * n * hw..(b + 1) * n * hw],
                hw,
                k,
                #[inline(always)]
                |row0, d, lg, hr, part| {
                    let mut p = vec![T::ZERO; k];
                    for i in 0..lg.len() / k {
                        let l = &lg[i * k..(i + 1) * k];
                        let drow = &mut d[i * k..(i + 1) * k];
                        let ri = r[row0 + i];
                        if t == 0 {
                            // L̄ += −b̄_1 Q_1 / c with Q_1 = exp(L + b_1); ∂scores = L̄ / eps.
                            for (((d, &sv), &lv), &bv) in
                                drow.iter_mut().zip(scale.iter()).zip(l).zip(bt)
                            {
                                *d = (*d + sv * (lv + bv).exp_fast()) * inv_eps;
                            }
                            continue;
                        }
                        let (m, rest) = (hr[i * hw + 2 * (t - 1)], hr[i * hw + 2 * (t - 1) + 1]);
                        for ((x, &lv), &bv) in p.iter_mut().zip(l).zip(bt) {
                            *x = ((lv + bv) - m + rest).exp_fast();
                        }
                        if t == big_t {
                            let gr = &g[(row0 + i) * k..(row0 + i + 1) * k];
                            let f = dot(gr, &p) / ri;
                            for (((d, acc), &gv), &pv) in
                                drow.iter_mut().zip(part.iter_mut()).zip(gr).zip(p.iter())
                            {
                                let x = gv * pv - f * pv;
                                *d = x;
                                *acc += x;
                            }
                        } else {
                            let f = dot(&scale, &p) / ri;
                            for (((d, acc), &sv), &pv) in drow
                                .iter_mut()
                                .zip(part.iter_mut())
                                .zip(scale.iter())
                                .zip(p.iter())
                            {
                                let z = -f * pv;
                                *d += sv * pv + z;
                                *acc += z;
                            }
                        }
                    }
                },
            );
            bbar[b * k..(b + 1) * k].copy_from_slice(&part);
        }
        if t > 0 {
            comm.sum(&mut bbar)?;
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Multi-SK
// ------------------------------------------------------------------------------------------

/// One weight group of Multi-SK's slots (`mmot.reference.slot_groups`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlotGroup {
    pub weight: f64,
    /// Slots in the group (>= 1).
    pub count: usize,
    /// Of those, slots among the last k (summed into the result).
    pub top: usize,
}

/// The parameters of a sharded Multi-SK call.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardedMultiParams {
    pub eps: f64,
    pub n_iters: usize,
    pub groups: Vec<SlotGroup>,
    pub minmax: bool,
}

struct Groups<T> {
    w: Vec<T>,
    lc: Vec<T>,
    c: Vec<T>,
    top: Vec<T>,
}

impl<T: Real> Groups<T> {
    fn new(groups: &[SlotGroup]) -> Self {
        Groups {
            w: groups.iter().map(|g| T::from_f64(g.weight)).collect(),
            lc: groups
                .iter()
                .map(|g| T::from_f64((g.count as f64).ln()))
                .collect(),
            c: groups.iter().map(|g| T::from_f64(g.count as f64)).collect(),
            top: groups.iter().map(|g| T::from_f64(g.top as f64)).collect(),
        }
    }
    fn len(&self) -> usize {
        self.w.len()
    }
}

fn check_multi(params: &ShardedMultiParams) -> Result<()> {
    if params.groups.is_empty()
        || params
            .groups
            .iter()
            .any(|g| g.count == 0 || g.top > g.count || !(g.weight > 0.0 && g.weight.is_finite()))
    {
        return Err(MmotError::InvalidArgument(
            "groups must be non-empty (weight > 0, count >= 1, top <= count)".into(),
        ));
    }
    Ok(())
}

fn machine_eps<T: Real>() -> f64 {
    if std::mem::size_of::<T>() == 4 {
        f32::EPSILON as f64
    } else {
        f64::EPSILON
    }
}

/// Min-max rescaling of a row in place (`mmot.reference.minmax_rows`).
#[inline(always)]
fn minmax_row<T: Real>(row: &mut [T]) {
    let (lo, hi) = row_extremes(row);
    if constant_row(lo, hi) {
        row.fill(T::ZERO);
    } else {
        let spread = hi - lo;
        for x in row.iter_mut() {
            *x = (*x - lo) / spread;
        }
    }
}

#[inline(always)]
fn row_extremes<T: Real>(row: &[T]) -> (T, T) {
    let mut lo = T::INFINITY;
    let mut hi = T::NEG_INFINITY;
    for &x in row {
        lo = lo.fmin(x);
        hi = hi.fmax(x);
    }
    (lo, hi)
}

#[inline(always)]
fn constant_row<T: Real>(lo: T, hi: T) -> bool {
    let scale = lo.to_f64().abs().max(hi.to_f64().abs());
    (hi - lo).to_f64() <= 1024.0 * machine_eps::<T>() * scale
}

/// This process's rows of Multi-SK (`mmot.multi_sinkhorn` with `process_group=`), in the grouped
/// form. `scores`, `out`: `[problems, rows, cols]`; `shift`: `[problems, cols]` the column maxima
/// over all processes; `anchor_mass`: `[problems, cols]` (N/K, N the rows of all processes).
#[allow(clippy::too_many_arguments)]
pub fn sharded_multi_sinkhorn<T: Real>(
    scores: &[T],
    shift: &[T],
    anchor_mass: &[T],
    out: &mut [T],
    dims: Dims,
    params: &ShardedMultiParams,
    log: bool,
    comm: &mut dyn Collective<T>,
) -> Result<()> {
    check_common(scores, shift, out, dims, params.eps, params.n_iters)?;
    check_len("anchor_mass", anchor_mass.len(), [dims.problems, dims.cols])?;
    check_multi(params)?;
    if log {
        multi_log(scores, shift, anchor_mass, out, None, dims, params, comm)
    } else {
        multi_plain(scores, shift, anchor_mass, out, None, dims, params, comm)
    }
}

/// Writes the row's result Σ_top top_G C_G (min-max rescaled if asked) into `orow`.
#[inline(always)]
fn write_target<T: Real>(orow: &mut [T], plan: &[T], gr: &Groups<T>, k: usize, minmax: bool) {
    orow.fill(T::ZERO);
    for g in 0..gr.len() {
        if gr.top[g] > T::ZERO {
            for a in 0..k {
                orow[a] += gr.top[g] * plan[g * k + a];
            }
        }
    }
    if minmax {
        minmax_row(orow);
    }
}

/// What the plain-domain replay of the backward records: E_G per row (`G·K`), f_t per problem
/// (`(T + 1)·G·K`, f_t at `t·G·K`) and h_t per row (`(T + 1)·G`, h_0 = 1).
struct PlainHistory<T> {
    e: Vec<T>,
    f: Vec<T>,
    h: Vec<T>,
}

#[allow(clippy::too_many_arguments)]
fn multi_plain<T: Real>(
    scores: &[T],
    shift: &[T],
    anchor_mass: &[T],
    out: &mut [T],
    hist: Option<&mut PlainHistory<T>>,
    dims: Dims,
    params: &ShardedMultiParams,
    comm: &mut dyn Collective<T>,
) -> Result<()> {
    let Dims {
        problems: nb,
        rows: n,
        cols: k,
    } = dims;
    let gr = Groups::<T>::new(&params.groups);
    let ng = gr.len();
    let gk = ng * k;
    let n_iters = params.n_iters;
    let inv_eps = T::from_f64(1.0 / params.eps);
    let record = hist.is_some();
    let mut own = PlainHistory {
        e: Vec::new(),
        f: Vec::new(),
        h: Vec::new(),
    };
    let PlainHistory { e, f: fh, h: hh } = hist.unwrap_or(&mut own);
    // Per row: E_G (G·K); g (K) then h (G, or h_0..h_T when recording).
    let hw = if record { (n_iters + 1) * ng } else { ng };
    let sw = k + hw;
    e.clear();
    e.resize(nb * n * gk, T::ZERO);
    let mut state = vec![T::ONE; nb * n * sw];
    fh.clear();
    fh.resize(if record { nb * (n_iters + 1) * gk } else { 0 }, T::ZERO);
    let mut col = vec![T::ZERO; nb * gk];
    for b in 0..nb {
        let s = &scores[b * n * k..(b + 1) * n * k];
        let sh = &shift[b * k..(b + 1) * k];
        let part = pass(
            &mut e[b * n * gk..(b + 1) * n * gk],
            gk,
            &mut state[b * n * sw..(b + 1) * n * sw],
            sw,
            &mut out[b * n * k..(b + 1) * n * k],
            k,
            gk,
            #[inline(always)]
            |row0, er, _, _, part| {
                let mut l = vec![T::ZERO; k];
                for (i, ei) in er.chunks_exact_mut(gk).enumerate() {
                    let srow = &s[(row0 + i) * k..(row0 + i + 1) * k];
                    for ((x, &sv), &shv) in l.iter_mut().zip(srow).zip(sh) {
                        *x = half_logit(sv, shv, inv_eps);
                    }
                    for ((g, eg), pg) in ei
                        .chunks_exact_mut(k)
                        .enumerate()
                        .zip(part.chunks_exact_mut(k))
                    {
                        let w = gr.w[g];
                        for ((e, &lv), p) in eg.iter_mut().zip(&l).zip(pg.iter_mut()) {
                            *e = (w * lv).fmax(floor()).exp_fast();
                            *p += *e;
                        }
                    }
                }
            },
        );
        col[b * gk..(b + 1) * gk].copy_from_slice(&part);
    }
    comm.sum(&mut col)?;
    let mut f = vec![T::ZERO; nb * gk];
    let update_f = |f: &mut [T], col: &[T]| {
        for b in 0..nb {
            for g in 0..ng {
                for a in 0..k {
                    let j = b * gk + g * k + a;
                    f[j] = anchor_mass[b * k + a] / col[j];
                }
            }
        }
    };
    let save_f = |fh: &mut Vec<T>, t: usize, f: &[T]| {
        if record {
            for b in 0..nb {
                let at = (b * (n_iters + 1) + t) * gk;
                fh[at..at + gk].copy_from_slice(&f[b * gk..(b + 1) * gk]);
            }
        }
    };
    update_f(&mut f, &col);
    save_f(fh, 1, &f);
    for t in 1..=n_iters {
        let last = t == n_iters;
        let write = last && !record;
        let (prev_at, next_at) = if record {
            (k + (t - 1) * ng, k + t * ng)
        } else {
            (k, k)
        };
        for b in 0..nb {
            let fb = &f[b * gk..(b + 1) * gk];
            let part = pass(
                &mut e[b * n * gk..(b + 1) * n * gk],
                gk,
                &mut state[b * n * sw..(b + 1) * n * sw],
                sw,
                &mut out[b * n * k..(b + 1) * n * k],
                k,
                gk,
                #[inline(always)]
                |_, er, st, o, part| {
                    let mut ef = vec![T::ZERO; gk];
                    let mut plan = vec![T::ZERO; if write { gk } else { 0 }];
                    for i in 0..er.len() / gk {
                        let ei = &er[i * gk..(i + 1) * gk];
                        let row = &mut st[i * sw..(i + 1) * sw];
                        for (x, (&e, &f)) in ef.iter_mut().zip(ei.iter().zip(fb)) {
                            *x = e * f;
                        }
                        // g = 1 / Σ_G c_G E_G f_G h_{G,t−1}
                        let (gv, h) = row.split_at_mut(k);
                        gv.fill(T::ZERO);
                        for (g, efg) in ef.chunks_exact(k).enumerate() {
                            let ch = gr.c[g] * h[prev_at - k + g];
                            for (x, &y) in gv.iter_mut().zip(efg) {
                                *x += ch * y;
                            }
                        }
                        for x in gv.iter_mut() {
                            *x = T::ONE / *x;
                        }
                        // h_{G,t} = 1 / Σ_a E_G g f_G
                        for (g, efg) in ef.chunks_exact(k).enumerate() {
                            h[next_at - k + g] = T::ONE / dot(efg, gv);
                        }
                        if write {
                            for (g, (pg, efg)) in
                                plan.chunks_exact_mut(k).zip(ef.chunks_exact(k)).enumerate()
                            {
                                let hg = h[next_at - k + g];
                                for ((p, &y), &gg) in pg.iter_mut().zip(efg).zip(gv.iter()) {
                                    *p = y * gg * hg;
                                }
                            }
                            write_target(&mut o[i * k..(i + 1) * k], &plan, &gr, k, params.minmax);
                        } else if !last {
                            // The next column sums Σ_n E_G g h_G.
                            for (g, (pg, eg)) in
                                part.chunks_exact_mut(k).zip(ei.chunks_exact(k)).enumerate()
                            {
                                let hg = h[next_at - k + g];
                                for ((p, &y), &gg) in pg.iter_mut().zip(eg).zip(gv.iter()) {
                                    *p += y * gg * hg;
                                }
                            }
                        }
                    }
                },
            );
            col[b * gk..(b + 1) * gk].copy_from_slice(&part);
        }
        if !last {
            comm.sum(&mut col)?;
            update_f(&mut f, &col);
            save_f(fh, t + 1, &f);
        }
    }
    if record {
        hh.clear();
        hh.reserve(nb * n * hw);
        for row in state.chunks(sw) {
            hh.extend_from_slice(&row[k..]);
        }
    }
    Ok(())
}

/// γ (K) and, per group, ψ_G and C_G (G·K) of one row in the log form, given φ_t (G·K),
/// ψ_{t−1} of the row (G) and the row's unfloored logits.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn multi_row<T: Real>(
    l: &[T],
    phi: &[T],
    psi_prev: &[T],
    gr: &Groups<T>,
    le: &mut [T],
    gamma: &mut [T],
    psi: &mut [T],
    plan: &mut [T],
) {
    let k = l.len();
    for (g, leg) in le.chunks_exact_mut(k).enumerate() {
        let w = gr.w[g];
        for (x, &lv) in leg.iter_mut().zip(l) {
            *x = (w * lv).fmax(floor());
        }
    }
    // γ = −LSE_G(log c_G + lE_G + φ_G + ψ_{G,t−1}): the terms in `plan`, their maximum over
    // the groups in `gamma`, the sum of their exponentials in plan's first group.
    for (g, ((ug, leg), phig)) in plan
        .chunks_exact_mut(k)
        .zip(le.chunks_exact(k))
        .zip(phi.chunks_exact(k))
        .enumerate()
    {
        let c = gr.lc[g] + psi_prev[g];
        for ((u, &lev), &ph) in ug.iter_mut().zip(leg).zip(phig) {
            *u = c + lev + ph;
        }
    }
    let (first, rest) = plan.split_at_mut(k);
    gamma.copy_from_slice(first);
    for ug in rest.chunks_exact(k) {
        for (m, &u) in gamma.iter_mut().zip(ug) {
            *m = m.fmax(u);
        }
    }
    for (u, &m) in first.iter_mut().zip(gamma.iter()) {
        *u = (*u - m).exp_fast();
    }
    for ug in rest.chunks_exact(k) {
        for ((acc, &u), &m) in first.iter_mut().zip(ug).zip(gamma.iter()) {
            *acc += (u - m).exp_fast();
        }
    }
    for (m, &acc) in gamma.iter_mut().zip(first.iter()) {
        *m = -(*m + acc.ln());
    }
    // ψ_G = −LSE_a(lE_G + γ + φ_G), C_G = exp(lE_G + γ + φ_G + ψ_G)
    for (g, ((z, leg), phig)) in plan
        .chunks_exact_mut(k)
        .zip(le.chunks_exact(k))
        .zip(phi.chunks_exact(k))
        .enumerate()
    {
        for (((zv, &lev), &gv), &ph) in z.iter_mut().zip(leg).zip(gamma.iter()).zip(phig) {
            *zv = lev + gv + ph;
        }
        let m = max(z);
        for zv in z.iter_mut() {
            *zv = (*zv - m).exp_fast();
        }
        let total = sum(z);
        psi[g] = -(m + total.ln());
        let inv = T::ONE / total;
        for zv in z.iter_mut() {
            *zv *= inv;
        }
    }
}

/// The log-form potentials: φ per problem `(T + 1)·G·K` (φ_t at t·G·K, t = 1..T); per row
/// ψ_t for t = 0..T (`(T + 1)·G` values) in `state`.
#[allow(clippy::too_many_arguments)]
fn multi_log<T: Real>(
    scores: &[T],
    shift: &[T],
    anchor_mass: &[T],
    out: &mut [T],
    mut phi_hist: Option<(&mut Vec<T>, &mut Vec<T>)>,
    dims: Dims,
    params: &ShardedMultiParams,
    comm: &mut dyn Collective<T>,
) -> Result<()> {
    let Dims {
        problems: nb,
        rows: n,
        cols: k,
    } = dims;
    let gr = Groups::<T>::new(&params.groups);
    let ng = gr.len();
    let gk = ng * k;
    let n_iters = params.n_iters;
    let inv_eps = T::from_f64(1.0 / params.eps);
    let record = phi_hist.is_some();
    // Per row: ψ_0..ψ_T when recording (else ψ_prev only).
    let sw = if record { (n_iters + 1) * ng } else { ng };
    let mut own = (Vec::new(), Vec::new());
    let (phis, state) = match phi_hist.as_mut() {
        Some((p, s)) => (&mut **p, &mut **s),
        None => (&mut own.0, &mut own.1),
    };
    phis.clear();
    phis.resize(nb * (n_iters + 1) * gk, T::ZERO);
    state.clear();
    state.resize(nb * n * sw, T::ZERO);
    // Logits (unfloored, unweighted) cached in `out` until the last pass writes the result.
    let mut dummy = vec![T::ZERO; nb * n];
    let mut col = vec![T::ZERO; nb * gk];
    for b in 0..nb {
        let s = &scores[b * n * k..(b + 1) * n * k];
        let sh = &shift[b * k..(b + 1) * k];
        let part = pass(
            &mut out[b * n * k..(b + 1) * n * k],
            k,
            &mut state[b * n * sw..(b + 1) * n * sw],
            sw,
            &mut dummy[b * n..(b + 1) * n],
            1,
            gk,
            #[inline(always)]
            |row0, o, _, _, part| {
                for (i, orow) in o.chunks_mut(k).enumerate() {
                    let srow = &s[(row0 + i) * k..(row0 + i + 1) * k];
                    for a in 0..k {
                        let l = half_logit(srow[a], sh[a], inv_eps);
                        orow[a] = l;
                        for g in 0..ng {
                            part[g * k + a] += (gr.w[g] * l).fmax(floor()).exp_fast();
                        }
                    }
                }
            },
        );
        col[b * gk..(b + 1) * gk].copy_from_slice(&part);
    }
    comm.sum(&mut col)?;
    let log_r: Vec<T> = anchor_mass.iter().map(|r| r.ln()).collect();
    for b in 0..nb {
        for g in 0..ng {
            for a in 0..k {
                let j = b * gk + g * k + a;
                phis[b * (n_iters + 1) * gk + gk + g * k + a] = log_r[b * k + a] - col[j].ln();
            }
        }
    }
    for t in 1..=n_iters {
        let last = t == n_iters;
        let write = last && !record;
        for b in 0..nb {
            let base = b * (n_iters + 1) * gk;
            let phi = &phis[base + t * gk..base + (t + 1) * gk];
            let part = pass(
                &mut out[b * n * k..(b + 1) * n * k],
                k,
                &mut state[b * n * sw..(b + 1) * n * sw],
                sw,
                &mut dummy[b * n..(b + 1) * n],
                1,
                gk,
                #[inline(always)]
                |_, o, st, _, part| {
                    let mut le = vec![T::ZERO; gk];
                    let mut gamma = vec![T::ZERO; k];
                    let mut psi = vec![T::ZERO; ng];
                    let mut plan = vec![T::ZERO; gk];
                    for (i, orow) in o.chunks_mut(k).enumerate() {
                        let row_state = &mut st[i * sw..(i + 1) * sw];
                        let (prev_at, next_at) = if record {
                            ((t - 1) * ng, t * ng)
                        } else {
                            (0, 0)
                        };
                        multi_row(
                            orow,
                            phi,
                            &row_state[prev_at..prev_at + ng],
                            &gr,
                            &mut le,
                            &mut gamma,
                            &mut psi,
                            &mut plan,
                        );
                        row_state[next_at..next_at + ng].copy_from_slice(&psi);
                        if write {
                            write_target(orow, &plan, &gr, k, params.minmax);
                        } else if !last {
                            for j in 0..gk {
                                part[j] += plan[j];
                            }
                        }
                    }
                },
            );
            col[b * gk..(b + 1) * gk].copy_from_slice(&part);
        }
        if !last {
            comm.sum(&mut col)?;
            for b in 0..nb {
                let base = b * (n_iters + 1) * gk;
                for g in 0..ng {
                    for a in 0..k {
                        let j = g * k + a;
                        phis[base + (t + 1) * gk + j] =
                            phis[base + t * gk + j] + log_r[b * k + a] - col[b * gk + j].ln();
                    }
                }
            }
        }
    }
    Ok(())
}

/// The exact vector-Jacobian product of [`sharded_multi_sinkhorn`] for this process's rows
/// (through the min-max step when `params.minmax`), replaying the forward in the domain `log`
/// (the forward's). Every process calls it together.
#[allow(clippy::too_many_arguments)]
pub fn sharded_multi_sinkhorn_backward<T: Real>(
    grad: &[T],
    scores: &[T],
    shift: &[T],
    anchor_mass: &[T],
    out: &mut [T],
    dims: Dims,
    params: &ShardedMultiParams,
    log: bool,
    comm: &mut dyn Collective<T>,
) -> Result<()> {
    check_common(scores, shift, out, dims, params.eps, params.n_iters)?;
    check_len("grad", grad.len(), dims)?;
    check_len("anchor_mass", anchor_mass.len(), [dims.problems, dims.cols])?;
    check_multi(params)?;
    let Dims {
        problems: nb,
        rows: n,
        cols: k,
    } = dims;
    let gr = Groups::<T>::new(&params.groups);
    let ng = gr.len();
    let gk = ng * k;
    let n_iters = params.n_iters;
    let inv_eps = T::from_f64(1.0 / params.eps);
    // The replay. Log: logits per row (K), φ_t per problem, ψ_t per row. Plain: E_G per row
    // (G·K), f_t per problem, h_t per row. Either way a problem's column potentials are
    // `(T + 1)·G·K` long (index t) and a row's `(T + 1)·G` (index t).
    let (rows_cache, cache_w, col_pots, row_pots) = if log {
        let mut logits = vec![T::ZERO; dims.len()];
        let (mut phis, mut psis) = (Vec::new(), Vec::new());
        multi_log(
            scores,
            shift,
            anchor_mass,
            &mut logits,
            Some((&mut phis, &mut psis)),
            dims,
            params,
            comm,
        )?;
        (logits, k, phis, psis)
    } else {
        let mut hist = PlainHistory {
            e: Vec::new(),
            f: Vec::new(),
            h: Vec::new(),
        };
        let mut scratch = vec![T::ZERO; dims.len()];
        multi_plain(
            scores,
            shift,
            anchor_mass,
            &mut scratch,
            Some(&mut hist),
            dims,
            params,
            comm,
        )?;
        (hist.e, gk, hist.f, hist.h)
    };
    let mut rows_cache = rows_cache;
    let psw = (n_iters + 1) * ng;
    // Per row: the recorded row potentials, then the carried Σ_a Z_G of the later iteration.
    let sw = psw + ng;
    let mut state = vec![T::ZERO; nb * n * sw];
    for (dst, src) in state.chunks_mut(sw).zip(row_pots.chunks(psw)) {
        dst[..psw].copy_from_slice(src);
    }
    drop(row_pots);
    let mut phibar = vec![T::ZERO; nb * gk];
    for t in (0..=n_iters).rev() {
        for b in 0..nb {
            let base = b * (n_iters + 1) * gk;
            let g_in = &grad[b * n * k..(b + 1) * n * k];
            let r = &anchor_mass[b * k..(b + 1) * k];
            let pot_t = &col_pots[base + t.max(1) * gk..base + (t.max(1) + 1) * gk];
            let pot_next = if t < n_iters {
                &col_pots[base + (t + 1) * gk..base + (t + 2) * gk]
            } else {
                pot_t
            };
            // −φ̄_{G,t+1} / r: the column factor of W.
            let wscale: Vec<T> = (0..gk).map(|j| -phibar[b * gk + j] / r[j % k]).collect();
            let part = pass(
                &mut out[b * n * k..(b + 1) * n * k],
                k,
                &mut rows_cache[b * n * cache_w..(b + 1) * n * cache_w],
                cache_w,
                &mut state[b * n * sw..(b + 1) * n * sw],
                sw,
                gk,
                #[inline(always)]
                |row0, d, cache, st, part| {
                    let mut rw = ReverseRow::new(ng, k);
                    for i in 0..cache.len() / cache_w {
                        let c_row = &cache[i * cache_w..(i + 1) * cache_w];
                        let drow = &mut d[i * k..(i + 1) * k];
                        let row_state = &mut st[i * sw..(i + 1) * sw];
                        if t == 0 {
                            // W = −φ̄_1/r · A_1, A_1 = exp(lE + φ_1) = E f_1; ∂scores = L̄ / eps.
                            for g in 0..ng {
                                for a in 0..k {
                                    rw.w[g * k + a] = if log {
                                        (gr.w[g] * c_row[a]).fmax(floor()) + pot_t[g * k + a]
                                    } else {
                                        c_row[g * k + a] * pot_t[g * k + a]
                                    };
                                }
                            }
                            if log {
                                for x in rw.w.iter_mut() {
                                    *x = x.exp_fast();
                                }
                            }
                            for a in 0..k {
                                let mut acc = drow[a];
                                for g in 0..ng {
                                    acc += gr.w[g] * wscale[g * k + a] * rw.w[g * k + a];
                                }
                                drow[a] = acc * inv_eps;
                            }
                            continue;
                        }
                        let (prev, now) = (
                            &row_state[(t - 1) * ng..t * ng],
                            &row_state[t * ng..(t + 1) * ng],
                        );
                        // C_t, c_G B_t and, before the last iteration, A_{t+1}, into rw.
                        if log {
                            rw.fill_log(c_row, pot_t, pot_next, prev, now, &gr, t < n_iters);
                        } else {
                            rw.fill_plain(c_row, pot_t, pot_next, prev, now, &gr, t < n_iters);
                        }
                        if t == n_iters {
                            let grad_row = &g_in[(row0 + i) * k..(row0 + i + 1) * k];
                            target_vjp(grad_row, &rw.c, &gr, k, params.minmax, &mut rw.tbar);
                            for g in 0..ng {
                                for a in 0..k {
                                    rw.w[g * k + a] = gr.top[g] * rw.tbar[a] * rw.c[g * k + a];
                                }
                            }
                            rw.psibar.fill(T::ZERO);
                        } else {
                            for j in 0..gk {
                                rw.w[j] = wscale[j] * rw.a[j];
                            }
                            rw.psibar.copy_from_slice(&row_state[psw..psw + ng]);
                        }
                        rw.reverse(&gr, drow, part, t == n_iters);
                        row_state[psw..psw + ng].copy_from_slice(&rw.carry);
                    }
                },
            );
            phibar[b * gk..(b + 1) * gk].copy_from_slice(&part);
        }
        if t > 0 {
            comm.sum(&mut phibar)?;
        }
    }
    Ok(())
}

/// One row's plan entries of a reverse pass and the adjoint arithmetic they share in both
/// domains: C_{G,t}, c_G B_{G,t}, A_{G,t+1} (each `G·K`) and the row's adjoints.
struct ReverseRow<T> {
    k: usize,
    c: Vec<T>,
    cb: Vec<T>,
    a: Vec<T>,
    /// W (or X on the last iteration).
    w: Vec<T>,
    gamma: Vec<T>,
    gbar: Vec<T>,
    tbar: Vec<T>,
    le: Vec<T>,
    psi: Vec<T>,
    psibar: Vec<T>,
    carry: Vec<T>,
}

impl<T: Real> ReverseRow<T> {
    fn new(ng: usize, k: usize) -> Self {
        let v = |len| vec![T::ZERO; len];
        ReverseRow {
            k,
            c: v(ng * k),
            cb: v(ng * k),
            a: v(ng * k),
            w: v(ng * k),
            gamma: v(k),
            gbar: v(k),
            tbar: v(k),
            le: v(ng * k),
            psi: v(ng),
            psibar: v(ng),
            carry: v(ng),
        }
    }

    /// Log domain: from the row's logits, φ_t, φ_{t+1}, ψ_{t−1} and ψ_t.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn fill_log(
        &mut self,
        l: &[T],
        phi: &[T],
        phi_next: &[T],
        prev: &[T],
        now: &[T],
        gr: &Groups<T>,
        with_a: bool,
    ) {
        let k = self.k;
        multi_row(
            l,
            phi,
            prev,
            gr,
            &mut self.le,
            &mut self.gamma,
            &mut self.psi,
            &mut self.c,
        );
        for g in 0..gr.len() {
            for a in 0..k {
                let j = g * k + a;
                self.cb[j] = gr.lc[g] + self.le[j] + phi[j] + prev[g] + self.gamma[a];
                if with_a {
                    self.a[j] = self.le[j] + self.gamma[a] + now[g] + phi_next[j];
                }
            }
        }
        for x in self.cb.iter_mut() {
            *x = x.exp_fast();
        }
        if with_a {
            for x in self.a.iter_mut() {
                *x = x.exp_fast();
            }
        }
    }

    /// Plain domain: from the row's E_G, f_t, f_{t+1}, h_{t−1} and h_t (g_t recomputed).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn fill_plain(
        &mut self,
        e: &[T],
        f: &[T],
        f_next: &[T],
        prev: &[T],
        now: &[T],
        gr: &Groups<T>,
        with_a: bool,
    ) {
        let k = self.k;
        let gv = &mut self.gamma; // g_t, in the plain domain
        gv.fill(T::ZERO);
        for (g, (eg, fg)) in e.chunks_exact(k).zip(f.chunks_exact(k)).enumerate() {
            let ch = gr.c[g] * prev[g];
            for ((x, &ev), &fv) in gv.iter_mut().zip(eg).zip(fg) {
                *x += ch * ev * fv;
            }
        }
        for x in gv.iter_mut() {
            *x = T::ONE / *x;
        }
        let gv = &self.gamma;
        for (g, (((eg, fg), cg), cbg)) in e
            .chunks_exact(k)
            .zip(f.chunks_exact(k))
            .zip(self.c.chunks_exact_mut(k))
            .zip(self.cb.chunks_exact_mut(k))
            .enumerate()
        {
            let (ch, hn) = (gr.c[g] * prev[g], now[g]);
            for ((((c, cb), &ev), &fv), &gg) in
                cg.iter_mut().zip(cbg.iter_mut()).zip(eg).zip(fg).zip(gv)
            {
                let egf = ev * gg * fv;
                *c = egf * hn;
                *cb = ch * egf;
            }
        }
        if with_a {
            for (g, ((eg, fng), ag)) in e
                .chunks_exact(k)
                .zip(f_next.chunks_exact(k))
                .zip(self.a.chunks_exact_mut(k))
                .enumerate()
            {
                let hn = now[g];
                for (((av, &ev), &fv), &gg) in ag.iter_mut().zip(eg).zip(fng).zip(gv) {
                    *av = ev * gg * hn * fv;
                }
            }
        }
    }

    /// Given W (or X) in `w` and the carried part of ψ̄ in `psibar`: Y = −ψ̄ C, γ̄ = Σ_G (W + Y),
    /// Z = −γ̄ c_G B; L̄ += Σ_G w_G (W + Y + Z) (set on the last iteration), the column sums of
    /// Y + Z (and X on the last iteration) into `part`, Σ_a Z into `carry`. Overwrites C and c_G B.
    #[inline(always)]
    fn reverse(&mut self, gr: &Groups<T>, drow: &mut [T], part: &mut [T], last: bool) {
        let k = self.k;
        let ReverseRow {
            c,
            cb,
            w,
            gbar,
            psibar,
            carry,
            ..
        } = self;
        for (pb, wg) in psibar.iter_mut().zip(w.chunks_exact(k)) {
            *pb += sum(wg);
        }
        gbar.fill(T::ZERO);
        for ((cg, wg), &pb) in c
            .chunks_exact_mut(k)
            .zip(w.chunks_exact(k))
            .zip(psibar.iter())
        {
            for ((cv, &wv), gb) in cg.iter_mut().zip(wg).zip(gbar.iter_mut()) {
                let y = -pb * *cv;
                *cv = y; // C is not needed any more: Y takes its place
                *gb += wv + y;
            }
        }
        if last {
            drow.fill(T::ZERO);
        }
        for (g, (((cbg, yg), wg), pg)) in cb
            .chunks_exact_mut(k)
            .zip(c.chunks_exact(k))
            .zip(w.chunks_exact(k))
            .zip(part.chunks_exact_mut(k))
            .enumerate()
        {
            let weight = gr.w[g];
            for (((((cbv, &y), &wv), p), d), &gb) in cbg
                .iter_mut()
                .zip(yg)
                .zip(wg)
                .zip(pg.iter_mut())
                .zip(drow.iter_mut())
                .zip(gbar.iter())
            {
                let z = -gb * *cbv;
                *cbv = z; // Z takes the place of c_G B
                *d += weight * (wv + y + z);
                *p += if last { wv + y + z } else { y + z };
            }
            carry[g] = sum(cbg);
        }
    }
}

/// ∂loss/∂T_raw of a row from ∂loss/∂(result) = `grad`: the min-max VJP (constant rows get
/// none; ties of the extremes share their gradient evenly, as torch.amin/amax do) or `grad`.
#[inline(always)]
fn target_vjp<T: Real>(
    grad: &[T],
    plan: &[T],
    gr: &Groups<T>,
    k: usize,
    minmax: bool,
    tbar: &mut [T],
) {
    if !minmax {
        tbar.copy_from_slice(grad);
        return;
    }
    let mut target = vec![T::ZERO; k];
    write_target(&mut target, plan, gr, k, false);
    let (lo, hi) = row_extremes(&target);
    if constant_row(lo, hi) {
        tbar.fill(T::ZERO);
        return;
    }
    let spread = hi - lo;
    let (mut lobar, mut hibar) = (T::ZERO, T::ZERO);
    let (mut n_lo, mut n_hi) = (0usize, 0usize);
    for a in 0..k {
        tbar[a] = grad[a] / spread;
        lobar += grad[a] * (target[a] - hi);
        hibar -= grad[a] * (target[a] - lo);
        n_lo += usize::from(target[a] == lo);
        n_hi += usize::from(target[a] == hi);
    }
    let s2 = spread * spread;
    lobar = lobar / s2 / T::from_f64(n_lo.max(1) as f64);
    hibar = hibar / s2 / T::from_f64(n_hi.max(1) as f64);
    for a in 0..k {
        if target[a] == lo {
            tbar[a] += lobar;
        }
        if target[a] == hi {
            tbar[a] += hibar;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{multi_sinkhorn, multi_sinkhorn_backward, sinkhorn, sinkhorn_backward};
    use crate::{LogDomain, MultiSinkhornParams, Normalize, SinkhornParams};

    /// Deterministic scores in [-1, 1] (never zero everywhere).
    fn scores(len: usize, seed: u64) -> Vec<f64> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    fn column_max(s: &[f64], dims: Dims) -> Vec<f64> {
        let (n, k) = (dims.rows, dims.cols);
        let mut out = vec![f64::NEG_INFINITY; dims.problems * k];
        for b in 0..dims.problems {
            for i in 0..n {
                for a in 0..k {
                    out[b * k + a] = out[b * k + a].max(s[(b * n + i) * k + a]);
                }
            }
        }
        out
    }

    fn close(got: &[f64], want: &[f64], tol: f64) {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{g} vs {w}");
        }
    }

    #[test]
    fn one_process_equals_the_sinkhorn_kernel_in_both_domains() {
        let dims = Dims::new(2, 70, 5); // several row chunks
        let s = scores(dims.len(), 1);
        let g = scores(dims.len(), 2);
        let rows = vec![1.0; 2 * 70];
        let cols = vec![14.0; 2 * 5];
        let shift = column_max(&s, dims);
        let mut want = vec![0.0; dims.len()];
        sinkhorn(
            &s,
            &rows,
            &cols,
            &mut want,
            dims,
            &SinkhornParams::new(0.3, 4, LogDomain::Auto),
        )
        .unwrap();
        let mut want_grad = vec![0.0; dims.len()];
        let params = SinkhornParams::new(0.3, 4, LogDomain::Auto);
        sinkhorn_backward(&g, &s, &rows, &cols, &mut want_grad, dims, &params).unwrap();
        for log in [false, true] {
            let mut out = vec![f64::NAN; dims.len()];
            sharded_sinkhorn(
                &s, &shift, &rows, &cols, &mut out, dims, 0.3, 4, log, &mut Alone,
            )
            .unwrap();
            close(&out, &want, 1e-12);
        }
        let mut grad = vec![f64::NAN; dims.len()];
        sharded_sinkhorn_backward(
            &g, &s, &shift, &rows, &cols, &mut grad, dims, 0.3, 4, &mut Alone,
        )
        .unwrap();
        close(&grad, &want_grad, 1e-11);
    }

    #[test]
    fn one_process_equals_the_multi_sinkhorn_kernel_in_both_domains() {
        let dims = Dims::new(1, 75, 6);
        let s = scores(dims.len(), 3);
        let g = scores(dims.len(), 4);
        let mass = vec![75.0 / 6.0; 6];
        let shift = column_max(&s, dims);
        let weights = vec![0.25, 0.25, 0.25, 1.0, 1.0, 1.0];
        let reference = MultiSinkhornParams {
            eps: 0.2,
            n_iters: 5,
            slot_weights: weights,
            k: 3,
            normalize: Normalize::MinMax,
            log_domain: LogDomain::Auto,
            check_values: false,
        };
        let mut want = vec![0.0; dims.len()];
        multi_sinkhorn(&s, &mass, &mut want, dims, &reference).unwrap();
        let mut want_grad = vec![0.0; dims.len()];
        multi_sinkhorn_backward(&g, &s, &mass, &mut want_grad, dims, &reference).unwrap();
        let params = ShardedMultiParams {
            eps: 0.2,
            n_iters: 5,
            groups: vec![
                SlotGroup {
                    weight: 0.25,
                    count: 3,
                    top: 0,
                },
                SlotGroup {
                    weight: 1.0,
                    count: 3,
                    top: 3,
                },
            ],
            minmax: true,
        };
        for log in [false, true] {
            let mut out = vec![f64::NAN; dims.len()];
            sharded_multi_sinkhorn(&s, &shift, &mass, &mut out, dims, &params, log, &mut Alone)
                .unwrap();
            close(&out, &want, 1e-10);
            let mut grad = vec![f64::NAN; dims.len()];
            sharded_multi_sinkhorn_backward(
                &g, &s, &shift, &mass, &mut grad, dims, &params, log, &mut Alone,
            )
            .unwrap();
            close(&grad, &want_grad, 1e-9);
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let dims = Dims::new(1, 200, 7);
        let s = scores(dims.len(), 5);
        let g = scores(dims.len(), 6);
        let mass = vec![200.0 / 7.0; 7];
        let shift = column_max(&s, dims);
        let params = ShardedMultiParams {
            eps: 0.1,
            n_iters: 6,
            groups: vec![
                SlotGroup {
                    weight: 0.5,
                    count: 4,
                    top: 1,
                },
                SlotGroup {
                    weight: 1.0,
                    count: 3,
                    top: 3,
                },
            ],
            minmax: true,
        };
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut out = vec![0.0; dims.len()];
                let mut grad = vec![0.0; dims.len()];
                sharded_multi_sinkhorn(
                    &s, &shift, &mass, &mut out, dims, &params, false, &mut Alone,
                )
                .unwrap();
                sharded_multi_sinkhorn_backward(
                    &g, &s, &shift, &mass, &mut grad, dims, &params, true, &mut Alone,
                )
                .unwrap();
                (out, grad)
            })
        };
        assert_eq!(run(1), run(3));
    }

    /// Counts the collectives, as a group of one process.
    struct Counting(usize);

    impl<T> Collective<T> for Counting {
        fn sum(&mut self, _buf: &mut [T]) -> Result<()> {
            self.0 += 1;
            Ok(())
        }
    }

    #[test]
    fn one_collective_per_iteration() {
        let dims = Dims::new(1, 40, 4);
        let s = scores(dims.len(), 7);
        let shift = column_max(&s, dims);
        let (rows, cols) = (vec![1.0; 40], vec![10.0; 4]);
        let mut out = vec![0.0; dims.len()];
        let mut count = Counting(0);
        sharded_sinkhorn(
            &s, &shift, &rows, &cols, &mut out, dims, 0.5, 6, false, &mut count,
        )
        .unwrap();
        assert_eq!(count.0, 6); // pass 0 and iterations 1..T-1
        let mut count = Counting(0);
        sharded_sinkhorn_backward(
            &s, &s, &shift, &rows, &cols, &mut out, dims, 0.5, 6, &mut count,
        )
        .unwrap();
        assert_eq!(count.0, 12); // the replay, then reverse passes T..1
    }
}
