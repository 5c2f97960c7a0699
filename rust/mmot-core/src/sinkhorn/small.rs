//! The small-problem path of [`super::sinkhorn`]: batches of many problems of at most
//! [`SMALL`] elements.
//!
//! One tiny problem's row dot, division and update form a short latency chain, so problems are
//! solved `L` at a time instead (16 for f32, 8 for f64): a group is gathered into a transposed
//! scratch `[element][lane]` (lane = problem), every step of the algorithm is the same vertical
//! operation over the `L` lanes (row and column sums are lane-wise accumulations over elements,
//! never cross-lane reductions), and the plans are scattered back. Lanes never mix, so a
//! problem's result does not depend on its group, its lane, the padding of a short last group
//! (the spare lanes repeat a real problem and are dropped) or the thread count. No allocation
//! per problem: each rayon task allocates one group's scratch.
//!
//! Both domains are the streaming path's algorithms, with the plain/log choice still made once
//! per call from the column ranges of the whole batch; the statistics pass is fused with the
//! solve (see [`Problem::solve_batch`]). Rows are processed four at a time so that their
//! reductions overlap; the log domain takes its logarithms with a vectorisable [`ln_fast`].

use super::{Problem, SinkhornParams, SMALL};
use crate::dims::Dims;
use crate::domain::{check_log_range, use_log_domain, LogDomain};
use crate::error::{not_finite, Result};
use crate::exec::lanes::{gather, lanes_only, scatter};
use crate::simd::{dispatch, ln_fast, Real};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Elements per rayon task (rounded to whole groups): enough that task overhead vanishes even
/// at 4×4, few enough that a task's scores stay in L2 between its statistics and its solve.
pub(super) const TASK_ELEMS: usize = 1 << 14;

/// [`super::sinkhorn`] for `dims.matrix_len() <= SMALL` (and a non-empty batch).
pub(super) fn sinkhorn<T: Real>(
    scores: &[T],
    row_mass: &[T],
    col_mass: &[T],
    out: &mut [T],
    dims: Dims,
    params: &SinkhornParams,
) -> Result<bool> {
    debug_assert!(!dims.is_empty() && dims.matrix_len() <= SMALL);
    let p = Problem::new(dims, params);
    let (log_domain, check_finite) = (params.log_domain, params.check_finite);
    let io = (scores, row_mass, col_mass, out);
    // One 512-bit vector of lanes (two 256-bit ones without AVX-512).
    let log = if std::mem::size_of::<T>() == 4 {
        p.solve_batch::<16>(io, log_domain, check_finite)
    } else {
        p.solve_batch::<8>(io, log_domain, check_finite)
    }?;
    p.interrupt.check()?;
    Ok(log)
}

/// `(scores, row_mass, col_mass, out)` of a batch or of one task.
type Io<'a, T> = (&'a [T], &'a [T], &'a [T], &'a mut [T]);

impl<T: Real> Problem<T> {
    /// The domain is decided from the statistics of the whole batch, but each task reads its
    /// scores for the statistics and solves them at once, while they are still in cache: in
    /// the domain forced by `log_domain`, or, under `Auto`, speculatively in the plain domain
    /// while no task has yet seen a reason for the log domain. Tasks not solved in the domain
    /// finally chosen are solved again afterwards (all of them when `Auto` ends in the log
    /// domain after a speculative start; none when it stays plain).
    fn solve_batch<const L: usize>(
        &self,
        (s, r, c, out): Io<T>,
        log_domain: LogDomain,
        check_finite: bool,
    ) -> Result<bool> {
        let (n, k) = (self.n, self.k);
        let per_task = (TASK_ELEMS / (n * k * L)).max(1) * L;
        let stop = AtomicBool::new(false);
        let first: Vec<(f64, bool, Option<bool>)> = tasks((s, r, c, &mut *out), n, k, per_task)
            .map(|(s, r, c, o)| {
                let (range, finite) = stats(s, n * k, k);
                let guess = match log_domain {
                    LogDomain::Auto => {
                        let plain = finite && !use_log_domain::<T>(log_domain, range / self.eps);
                        plain.then_some(false)
                    }
                    forced => Some(use_log_domain::<T>(forced, 0.0)),
                };
                if guess.is_none() || (check_finite && !finite) {
                    stop.store(true, Ordering::Relaxed);
                }
                let solved = guess.filter(|_| !stop.load(Ordering::Relaxed));
                if let Some(log) = solved {
                    self.solve_task::<L>((s, r, c, o), log);
                }
                (range, finite, solved)
            })
            .collect();
        let finite = first.iter().all(|t| t.1);
        if check_finite && !finite {
            return Err(not_finite("scores"));
        }
        // A non-finite input goes to the log domain, as on the streaming path.
        let range = first.iter().map(|t| t.0).fold(0.0, f64::max) / self.eps;
        if check_finite {
            check_log_range::<T>(range, self.eps)?;
        }
        let log = use_log_domain::<T>(log_domain, if finite { range } else { f64::NAN });
        tasks((s, r, c, out), n, k, per_task)
            .zip(first.par_iter())
            .filter(|(_, t)| t.2 != Some(log))
            .for_each(|(io, _)| self.solve_task::<L>(io, log));
        Ok(log)
    }

    /// Solves one task's problems, `L` at a time.
    fn solve_task<const L: usize>(&self, (s, r, c, o): Io<T>, log: bool) {
        let (n, k) = (self.n, self.k);
        let nk = n * k;
        let mut g = Group::<T, L>::new(n, k);
        dispatch(
            #[inline(always)]
            || {
                for p0 in (0..o.len() / nk).step_by(L) {
                    let m = (o.len() / nk - p0).min(L);
                    gather(&mut g.x, &s[p0 * nk..], nk, m);
                    gather(&mut g.r, &r[p0 * n..], n, m);
                    gather(&mut g.c, &c[p0 * k..], k, m);
                    if log {
                        self.solve_log_lanes(&mut g);
                    } else {
                        self.solve_plain_lanes(&mut g);
                    }
                    scatter(&g.x, &mut o[p0 * nk..], nk, m);
                }
            },
        )
    }

    /// [`Problem::solve_plain`] on `L` problems: `E = exp((S - colmax)/eps)` is cached
    /// in `x`, which ends up holding the plan.
    #[inline(always)]
    fn solve_plain_lanes<const L: usize>(&self, g: &mut Group<T, L>) {
        let (n, k) = (self.n, self.k);
        let (x, r, c) = (&mut g.x[..n * k], &g.r[..n], &g.c[..k]);
        let (acc, v) = (&mut g.acc[..k], &mut g.col[..k]);
        col_max(x, acc);
        exp_shifted(x, acc, self.inv_eps, v);
        ratio(c, v);
        for it in 0..self.n_iters {
            if self.interrupt.requested() {
                break;
            }
            let last = it + 1 == self.n_iters;
            acc.fill([T::ZERO; L]);
            // Rows four at a time: their dot chains overlap and each column sum is loaded
            // and stored once per four rows.
            let mut rows = x.chunks_exact_mut(ROWS * k);
            let mut rr = r.chunks_exact(ROWS);
            for (xb, rb) in (&mut rows).zip(&mut rr) {
                plain_rows::<T, L, ROWS>(xb, rb, v, acc, last);
            }
            let rows = rows.into_remainder().chunks_exact_mut(k);
            for (xb, rb) in rows.zip(rr.remainder().chunks_exact(1)) {
                plain_rows::<T, L, 1>(xb, rb, v, acc, last);
            }
            if !last {
                v.copy_from_slice(acc);
                ratio(c, v);
            }
        }
    }

    /// [`Problem::solve_log`] on `L` problems: `x` caches `(S - colmax)/eps`, then holds
    /// the plan.
    #[inline(always)]
    fn solve_log_lanes<const L: usize>(&self, g: &mut Group<T, L>) {
        let (n, k) = (self.n, self.k);
        let (x, r, c) = (&mut g.x[..n * k], &g.r[..n], &g.c[..k]);
        let (acc, bpot, t) = (&mut g.acc[..k], &mut g.col[..k], &mut g.row[..ROWS * k]);
        col_max(x, acc);
        log_kernel(x, acc, self.inv_eps, bpot);
        log_ratio(c, bpot);
        for it in 0..self.n_iters {
            if self.interrupt.requested() {
                break;
            }
            let last = it + 1 == self.n_iters;
            acc.fill([T::ZERO; L]);
            // Rows four at a time, as in the plain domain: their exponentials overlap.
            let mut rows = x.chunks_exact_mut(ROWS * k);
            let mut rr = r.chunks_exact(ROWS);
            for (xb, rb) in (&mut rows).zip(&mut rr) {
                log_rows::<T, L, ROWS>(xb, rb, bpot, t, acc, last);
            }
            let rows = rows.into_remainder().chunks_exact_mut(k);
            for (xb, rb) in rows.zip(rr.remainder().chunks_exact(1)) {
                log_rows::<T, L, 1>(xb, rb, bpot, t, acc, last);
            }
            if !last {
                // b_new = log c - LSE_n(L + a) = b + log(c / colsum(P)).
                update_log_pot(c, acc, bpot);
            }
        }
    }
}

/// The batch in tasks of `per_task` problems of `[n, k]`.
fn tasks<T: Real>(
    (s, r, c, o): Io<T>,
    n: usize,
    k: usize,
    per_task: usize,
) -> impl IndexedParallelIterator<Item = Io<T>> {
    o.par_chunks_mut(per_task * n * k)
        .zip(s.par_chunks(per_task * n * k))
        .zip(r.par_chunks(per_task * n))
        .zip(c.par_chunks(per_task * k))
        .map(|(((o, s), r), c)| (s, r, c, o))
}

/// The largest column range (max - min over rows) of the problems in `scores`, and whether
/// they are all finite.
fn stats<T: Real>(scores: &[T], nk: usize, k: usize) -> (f64, bool) {
    dispatch(
        #[inline(always)]
        || match k {
            16.. => stats_blocks::<T, 16>(scores, nk, k),
            8.. => stats_blocks::<T, 8>(scores, nk, k),
            4.. => stats_blocks::<T, 4>(scores, nk, k),
            2.. => stats_blocks::<T, 2>(scores, nk, k),
            _ => stats_blocks::<T, 1>(scores, nk, k),
        },
    )
}

/// [`stats`] of whole problems in blocks of `W <= k` columns whose accumulators stay in
/// registers; a last partial block is shifted left to end at column `k` (overlapping columns
/// are harmless for a maximum, a minimum and a finiteness test).
#[inline(always)]
#[allow(clippy::eq_op)]
fn stats_blocks<T: Real, const W: usize>(sc: &[T], nk: usize, k: usize) -> (f64, bool) {
    // Column ranges and the finiteness sums, folded over problems lane-wise.
    let mut range = [T::ZERO; W];
    // NaN for NaN and for ±Inf, 0 otherwise.
    let mut nf = [T::ZERO; W];
    for s in sc.chunks_exact(nk) {
        for j0 in (0..k).step_by(W).map(|j| j.min(k - W)) {
            let mut mx = [T::NEG_INFINITY; W];
            let mut mn = [T::INFINITY; W];
            for row in s.chunks_exact(k) {
                lanes_only();
                let row: [T; W] = row[j0..j0 + W].try_into().unwrap();
                for j in 0..W {
                    mx[j] = mx[j].fmax(row[j]);
                    mn[j] = mn[j].fmin(row[j]);
                    nf[j] += row[j] - row[j];
                }
            }
            for j in 0..W {
                range[j] = range[j].fmax(mx[j] - mn[j]);
            }
        }
    }
    let finite = nf.iter().all(|&x| x == T::ZERO);
    (range.iter().fold(0.0, |a, x| a.max(x.to_f64())), finite)
}

/// One task's scratch for a group of `L` problems, every buffer `[index][lane]`.
struct Group<T, const L: usize> {
    /// `[n * k]`: the scores, then what the solver caches, then the plan.
    x: Vec<[T; L]>,
    /// `[n]` row masses and `[k]` column masses.
    r: Vec<[T; L]>,
    c: Vec<[T; L]>,
    /// `[k]`: column maxima, then column sums.
    acc: Vec<[T; L]>,
    /// `[k]`: v (plain) or b = log v (log domain).
    col: Vec<[T; L]>,
    /// `[ROWS * k]`: the rows being normalised (log domain).
    row: Vec<[T; L]>,
}

impl<T: Real, const L: usize> Group<T, L> {
    fn new(n: usize, k: usize) -> Self {
        let buf = |len| vec![[T::ZERO; L]; len];
        Group {
            x: buf(n * k),
            r: buf(n),
            c: buf(k),
            acc: buf(k),
            col: buf(k),
            row: buf(ROWS * k),
        }
    }
}

/// Column maxima of an `[n, k]` group (column by column: the maximum stays in a register;
/// stored back per row, LLVM would make it a masked store that stalls the next row's load).
#[inline(always)]
pub(super) fn col_max<T: Real, const L: usize>(x: &[[T; L]], mx: &mut [[T; L]]) {
    let k = mx.len();
    for (j, mr) in mx.iter_mut().enumerate() {
        let mut m = [T::NEG_INFINITY; L];
        for e in x[j..].iter().step_by(k) {
            lanes_only();
            let e = *e;
            for l in 0..L {
                m[l] = m[l].fmax(e[l]);
            }
        }
        *mr = m;
    }
}

/// Plain pass 0: `x = exp((x - cmax) / eps)`, and its column sums into `colsum`.
#[inline(always)]
pub(super) fn exp_shifted<T: Real, const L: usize>(
    x: &mut [[T; L]],
    cmax: &[[T; L]],
    inv_eps: T,
    colsum: &mut [[T; L]],
) {
    colsum.fill([T::ZERO; L]);
    for row in x.chunks_exact_mut(cmax.len()) {
        for ((er, mr), sr) in row.iter_mut().zip(cmax).zip(colsum.iter_mut()) {
            lanes_only();
            let (mut e, m, mut s) = (*er, *mr, *sr);
            for l in 0..L {
                e[l] = ((e[l] - m[l]) * inv_eps).exp_fast();
                s[l] += e[l];
            }
            (*er, *sr) = (e, s);
        }
    }
}

/// `y = x / y` lane-wise.
#[inline(always)]
pub(super) fn ratio<T: Real, const L: usize>(x: &[[T; L]], y: &mut [[T; L]]) {
    for (yr, xr) in y.iter_mut().zip(x) {
        lanes_only();
        let (mut yi, xi) = (*yr, *xr);
        for l in 0..L {
            yi[l] = xi[l] / yi[l];
        }
        *yr = yi;
    }
}

/// Rows per block of [`plain_rows`].
pub(super) const ROWS: usize = 4;

/// One plain-domain row step for `R` rows `x` (`[R, k]`) with masses `r`: `u = r / (x · v)`,
/// then `acc += x * u` (the next column sums) or, in the `last` iteration, `x = x * v * u`
/// (the plan). Sums run over columns (and rows, for `acc`) in order.
#[inline(always)]
fn plain_rows<T: Real, const L: usize, const R: usize>(
    x: &mut [[T; L]],
    r: &[[T; L]],
    v: &[[T; L]],
    acc: &mut [[T; L]],
    last: bool,
) {
    let k = v.len();
    let mut rows = x.chunks_exact_mut(k);
    let rows: [&mut [[T; L]]; R] = std::array::from_fn(|_| rows.next().unwrap());
    let mut u = [[T::ZERO; L]; R];
    for j in 0..k {
        lanes_only();
        let vj = v[j];
        for i in 0..R {
            let e = rows[i][j];
            for l in 0..L {
                u[i][l] += e[l] * vj[l];
            }
        }
    }
    for i in 0..R {
        for l in 0..L {
            u[i][l] = r[i][l] / u[i][l];
        }
    }
    for j in 0..k {
        lanes_only();
        if last {
            let vj = v[j];
            for i in 0..R {
                let mut e = rows[i][j];
                for l in 0..L {
                    e[l] = e[l] * vj[l] * u[i][l];
                }
                rows[i][j] = e;
            }
        } else {
            let mut a = acc[j];
            for i in 0..R {
                let e = rows[i][j];
                for l in 0..L {
                    a[l] += e[l] * u[i][l];
                }
            }
            acc[j] = a;
        }
    }
}

/// Log pass 0 (a = 0): `x = (x - cmax) / eps <= 0`, with a 0 in every column, so the column
/// sums of `exp(x)` (into `colsum`) lie in `[1, n]` and need no further shift.
#[inline(always)]
fn log_kernel<T: Real, const L: usize>(
    x: &mut [[T; L]],
    cmax: &[[T; L]],
    inv_eps: T,
    colsum: &mut [[T; L]],
) {
    colsum.fill([T::ZERO; L]);
    for row in x.chunks_exact_mut(cmax.len()) {
        for ((er, mr), sr) in row.iter_mut().zip(cmax).zip(colsum.iter_mut()) {
            lanes_only();
            let (mut e, m, mut s) = (*er, *mr, *sr);
            for l in 0..L {
                e[l] = (e[l] - m[l]) * inv_eps;
                s[l] += e[l].exp_fast();
            }
            (*er, *sr) = (e, s);
        }
    }
}

/// `y = ln x - ln y` lane-wise.
#[inline(always)]
fn log_ratio<T: Real, const L: usize>(x: &[[T; L]], y: &mut [[T; L]]) {
    for (yr, xr) in y.iter_mut().zip(x) {
        lanes_only();
        let (mut yi, xi) = (*yr, *xr);
        for l in 0..L {
            yi[l] = ln_fast(xi[l]) - ln_fast(yi[l]);
        }
        *yr = yi;
    }
}

/// One log-domain row step for `R` rows `x` (`[R, k]`, holding `(S - colmax)/eps`) with
/// masses `r`: a row of the plan is `t = exp(x + b - max)` (in the scratch `t`, `[R, k]`)
/// times `r / sum(t)`; it is added to `acc` (the next column sums) or, in the `last`
/// iteration, written over `x`. The rows' exponentials are independent and overlap.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // `j` indexes each of the `R` rows
fn log_rows<T: Real, const L: usize, const R: usize>(
    x: &mut [[T; L]],
    r: &[[T; L]],
    b: &[[T; L]],
    t: &mut [[T; L]],
    acc: &mut [[T; L]],
    last: bool,
) {
    let k = b.len();
    let (mut xr, mut tr) = (x.chunks_exact_mut(k), t.chunks_exact_mut(k));
    let xs: [&mut [[T; L]]; R] = std::array::from_fn(|_| xr.next().unwrap());
    let ts: [&mut [[T; L]]; R] = std::array::from_fn(|_| tr.next().unwrap());
    let mut mx = [[T::NEG_INFINITY; L]; R];
    for j in 0..k {
        lanes_only();
        let bj = b[j];
        for i in 0..R {
            let (e, mut tj) = (xs[i][j], [T::ZERO; L]);
            for l in 0..L {
                tj[l] = e[l] + bj[l];
                mx[i][l] = mx[i][l].fmax(tj[l]);
            }
            ts[i][j] = tj;
        }
    }
    let mut scale = [[T::ZERO; L]; R];
    for j in 0..k {
        lanes_only();
        for i in 0..R {
            let mut tj = ts[i][j];
            for l in 0..L {
                tj[l] = (tj[l] - mx[i][l]).exp_fast();
                scale[i][l] += tj[l];
            }
            ts[i][j] = tj;
        }
    }
    for i in 0..R {
        for l in 0..L {
            scale[i][l] = r[i][l] / scale[i][l];
        }
    }
    for j in 0..k {
        lanes_only();
        if last {
            for i in 0..R {
                let (tj, mut e) = (ts[i][j], [T::ZERO; L]);
                for l in 0..L {
                    e[l] = tj[l] * scale[i][l];
                }
                xs[i][j] = e;
            }
        } else {
            let mut a = acc[j];
            for i in 0..R {
                let tj = ts[i][j];
                for l in 0..L {
                    a[l] += tj[l] * scale[i][l];
                }
            }
            acc[j] = a;
        }
    }
}

/// `b += ln(c / colsum)` lane-wise.
#[inline(always)]
fn update_log_pot<T: Real, const L: usize>(c: &[[T; L]], colsum: &[[T; L]], b: &mut [[T; L]]) {
    for ((br, cr), sr) in b.iter_mut().zip(c).zip(colsum) {
        lanes_only();
        let (mut bj, cj, sj) = (*br, *cr, *sr);
        for l in 0..L {
            bj[l] += ln_fast(cj[l] / sj[l]);
        }
        *br = bj;
    }
}
