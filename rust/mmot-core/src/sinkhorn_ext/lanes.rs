//! The plain domain for batches of small problems, `L` problems at a time (16 for f32, 8 for
//! f64), one problem per SIMD lane.
//!
//! Why: a problem of a few dozen rows and columns has rows of one to four blocks in the
//! per-problem scratch (`solve.rs`), so its time goes to each row's horizontal sum and
//! division and to per-problem setup, not to the multiply-adds. Here a group of `L` problems
//! shares a transposed scratch `[element][lane]`, as in `sinkhorn/small.rs`: every step is the
//! same vertical operation over the lanes (row dots and column sums accumulate lane-wise, never
//! across lanes) and one division serves `L` rows.
//!
//! Ragged groups: the problems are ordered by size (by rows, then by columns within runs of
//! groups) so that a group's problems are alike, and a group is padded to its largest rows and
//! columns. The padding is neutral and exact: its cached kernel entries, masses and scalings
//! are 0, and the scalings' denominators get +1 on padded rows and columns (so no 0/0), so a
//! padded entry adds an exact 0 to every sum. A lane's sums thus run over its own entries in
//! the same order whatever its group, lane, neighbours or the thread count: its results are
//! bitwise those of the problem alone. Early stopping is per lane: a lane that meets `tol`
//! keeps the scalings of that iteration while the others go on.
//!
//! Which problems ([`Problem::takes_lanes`]): the plain domain's (balanced, no schedule,
//! `log_domain` not "on") of at most [`LANE_MAX_ELEMS`] elements; the range and finiteness
//! test of [`Problem::route`] is made while gathering, and a lane that fails it is solved by
//! the per-problem path instead. The iteration is the per-problem plain domain's, formula for
//! formula; only the order of each row's sum differs, so results differ by rounding.

use super::solve::{nan_max, reset, Problem, Route, Workspace};
use super::{problem, One, SinkhornExtInput};
use crate::dims::Dims;
use crate::domain::LogDomain;
use crate::exec::lanes::lanes_only;
use crate::exec::shared_mut::SharedMut;
use crate::simd::{dispatch, lanes_to_rows, ln_fast, rows_to_lanes, Real};
use rayon::prelude::*;

/// Largest problem (`n * k`) the lane path takes: a group's scratch (`L` of them, padded to
/// the group's largest) then stays within L2.
pub(super) const LANE_MAX_ELEMS: usize = 1 << 12;

/// Rows per block of [`rows_step`]: their dot chains overlap and each column sum is loaded and
/// stored once per block.
const ROWS: usize = 4;

/// The forward's outputs as raw pointers, so that a group's tasks write its problems'
/// slices wherever they lie. Contract: every problem belongs to exactly one group, so no two
/// tasks write the same problem's slices, and nothing else holds the outputs meanwhile.
#[derive(Clone, Copy)]
pub(super) struct Outputs<T> {
    pub plan: SharedMut<T>,
    pub f: SharedMut<T>,
    pub g: SharedMut<T>,
    pub iters: SharedMut<i64>,
    pub err: SharedMut<T>,
}

impl<T: Real> Problem<T> {
    /// Whether a problem of `n` rows and `k` columns starting its schedule at `eps_start` goes
    /// to the lane path (where its range test may still send it back).
    #[inline(always)]
    pub(super) fn takes_lanes(&self, n: usize, k: usize, eps_start: f64) -> bool {
        self.balanced()
            && self.log_domain != LogDomain::On
            && eps_start <= self.eps
            && n * k <= LANE_MAX_ELEMS
    }

    /// Solves the problems `picks` in groups of lanes into `out`; returns whether some
    /// problem was forced into the plain domain where it is not safe.
    pub(super) fn forward_lanes(
        &self,
        input: &SinkhornExtInput<'_, T>,
        dims: Dims,
        picks: Vec<usize>,
        out: Outputs<T>,
    ) -> bool {
        // One 512-bit vector of lanes (two 256-bit ones without AVX-512).
        if std::mem::size_of::<T>() == 4 {
            self.forward_groups::<16>(input, dims, picks, out)
        } else {
            self.forward_groups::<8>(input, dims, picks, out)
        }
    }

    fn forward_groups<const L: usize>(
        &self,
        input: &SinkhornExtInput<'_, T>,
        dims: Dims,
        mut picks: Vec<usize>,
        out: Outputs<T>,
    ) -> bool {
        order(&mut picks, input.row_counts, input.col_counts, L);
        picks
            .par_chunks(L)
            .with_max_len(1)
            .map_init(Group::<T, L>::default, |gr, members| {
                dispatch(
                    #[inline(always)]
                    || self.solve_group(input, dims, members, gr, out),
                )
            })
            .reduce(|| false, |a, b| a || b)
    }

    /// One group: gather, iterate, write. Returns whether a member was forced plain where
    /// that is not safe.
    #[inline(always)]
    fn solve_group<const L: usize>(
        &self,
        input: &SinkhornExtInput<'_, T>,
        dims: Dims,
        members: &[usize],
        gr: &mut Group<T, L>,
        out: Outputs<T>,
    ) -> bool {
        let ones: [Option<One<'_, T>>; L] =
            std::array::from_fn(|l| members.get(l).map(|&b| problem(input, dims, b)));
        let (ng, kg, live) = self.prepare(&ones, gr);
        let (iters, err) = self.iterate(gr, ng, kg, live);
        // The plans of every lane: K v u, where each lane's u, v are those it stopped with.
        plan_lanes(&mut gr.x, &gr.vo, &gr.uo);
        let (big_n, big_k) = (dims.rows, dims.cols);
        // SAFETY (each unsafe block below): problem b belongs to this group only (`Outputs`).
        let mut plans: [Option<&mut [T]>; L] = std::array::from_fn(|l| {
            let b = *members.get(l)?;
            let len = big_n * big_k;
            Some(unsafe { std::slice::from_raw_parts_mut(out.plan.at(b * len), len) })
        });
        scatter_rows(&ones, &live, &gr.x, kg, &mut plans);
        // The potentials' logarithms, vertically over the lanes (the plans used the scalings).
        let eps = T::from_f64(self.eps);
        eps_ln(&mut gr.uo[..ng], eps);
        eps_ln(&mut gr.vo[..kg], eps);
        let mut too_wide = false;
        for (l, (&b, one)) in members.iter().zip(ones.iter().flatten()).enumerate() {
            let (f, g) = unsafe {
                (
                    std::slice::from_raw_parts_mut(out.f.at(b * big_n), big_n),
                    std::slice::from_raw_parts_mut(out.g.at(b * big_k), big_k),
                )
            };
            let (it, er) = if live[l] {
                self.write_potentials(one, gr, l, f, g);
                (iters[l], err[l])
            } else {
                // Not the plain domain after all (or not finite): the per-problem path.
                let plan = plans[l].take().expect("a member's plan");
                let res = self.forward(one, &mut gr.ws, (plan, f, g));
                too_wide |= res.too_wide;
                (res.iters, res.err)
            };
            unsafe {
                *out.iters.at(b) = it as i64;
                *out.err.at(b) = er;
            }
        }
        too_wide
    }

    /// A group's scratch for its members `ones`: `S + f0`, the statistics of each lane and, for
    /// the lanes that take the plain domain, their masses and column max. Returns the group's
    /// padded size `[ng, kg]` and which lanes take the plain domain.
    #[inline(always)]
    fn prepare<const L: usize>(
        &self,
        ones: &[Option<One<'_, T>>; L],
        gr: &mut Group<T, L>,
    ) -> (usize, usize, [bool; L]) {
        let ng = ones.iter().flatten().map(|o| o.n).max().unwrap_or(0);
        let kg = ones.iter().flatten().map(|o| o.k).max().unwrap_or(0);
        gr.reset(ng, kg);
        gather_rows(ones, kg, T::NEG_INFINITY, &mut gr.x, |one, i| {
            (&one.scores[i * one.stride..][..one.k], one.init_f[i])
        });
        let (finite, spread) = lane_stats(&gr.x, &mut gr.cmax, &mut gr.mn);
        let live: [bool; L] = std::array::from_fn(|l| {
            ones[l]
                .as_ref()
                .is_some_and(|one| self.route_lane(one, finite[l], spread[l]) == Route::Plain)
        });
        // The masses of the plain lanes (0 elsewhere), and 0 on their valid rows and columns
        // in the padding indicators (1 elsewhere).
        let plain = |l: usize| ones[l].as_ref().filter(|_| live[l]);
        let zeros = &gr.zeros[..ng.max(kg)];
        to_lanes(
            &std::array::from_fn(|l| plain(l).map(|o| (&o.row_mass[..o.n], T::ZERO))),
            T::ZERO,
            &mut gr.r,
        );
        to_lanes(
            &std::array::from_fn(|l| plain(l).map(|o| (&zeros[..o.n], T::ZERO))),
            T::ONE,
            &mut gr.rpad,
        );
        to_lanes(
            &std::array::from_fn(|l| plain(l).map(|o| (&o.col_mass[..o.k], T::ZERO))),
            T::ZERO,
            &mut gr.c,
        );
        to_lanes(
            &std::array::from_fn(|l| plain(l).map(|o| (&zeros[..o.k], T::ZERO))),
            T::ONE,
            &mut gr.cpad,
        );
        // The shift of padded columns (no valid entry: max `-inf`) is 0.
        for m in gr.cmax.iter_mut() {
            lanes_only();
            let mut mv = *m;
            for x in mv.iter_mut() {
                *x = if *x == T::NEG_INFINITY { T::ZERO } else { *x };
            }
            *m = mv;
        }
        (ng, kg, live)
    }

    /// A member's route from its lane's statistics (those of [`Problem::route`]: `finite` valid
    /// entries and the largest column `spread`).
    #[inline(always)]
    fn route_lane(&self, one: &One<'_, T>, finite: T, spread: T) -> Route {
        if finite.to_f64() != (one.n * one.k) as f64 {
            return Route::NonFinite;
        }
        self.route_of(one.eps_start, spread.to_f64())
    }

    /// The plain-domain iteration of every live lane (the others run on padding and are
    /// ignored): the cached kernel `K = exp((S + f0 − m)/eps)` in `x`, then up to `n_iters`
    /// row steps, each lane stopping on its own at `tol`. Leaves in `uo`, `vo` each lane's
    /// scalings of its last iteration; returns each lane's iterations and marginal error.
    #[inline(always)]
    fn iterate<const L: usize>(
        &self,
        gr: &mut Group<T, L>,
        ng: usize,
        kg: usize,
        mut live: [bool; L],
    ) -> ([usize; L], [T; L]) {
        let ie = T::from_f64(1.0 / self.eps);
        let Group {
            x,
            r,
            rpad,
            c,
            cpad,
            cmax,
            acc,
            u,
            v,
            uo,
            vo,
            ..
        } = gr;
        exp_kernel(x, cmax, ie, acc);
        ratio(c, acc, cpad, v);
        let (mut iters, mut err) = ([0usize; L], [T::ZERO; L]);
        for it in 0..self.n_iters {
            if !live.contains(&true) || self.interrupt.requested() {
                break;
            }
            row_pass(x, r, rpad, v, u, acc);
            let done = it + 1 == self.n_iters;
            // Without `tol` only the last iteration's error is reported: skip the others (a
            // division per column).
            let e = if done || self.tol >= 0.0 {
                marginal_error(v, acc, c, cpad)
            } else {
                [T::ZERO; L]
            };
            for l in 0..L {
                if live[l] && (done || (self.tol >= 0.0 && e[l].to_f64() <= self.tol)) {
                    live[l] = false;
                    (iters[l], err[l]) = (it + 1, e[l]);
                    for (o, s) in uo[..ng].iter_mut().zip(u.iter()) {
                        o[l] = s[l];
                    }
                    for (o, s) in vo[..kg].iter_mut().zip(v.iter()) {
                        o[l] = s[l];
                    }
                }
            }
            if !done {
                ratio(c, acc, cpad, v);
            }
        }
        (iters, err)
    }

    /// Lane `l`'s potentials into its padded slices, from `uo`, `vo` holding `eps ln u`,
    /// `eps ln v`: `f = f0 + eps ln u` and `g = eps ln v − m`, 0 on the padding.
    #[inline(always)]
    fn write_potentials<const L: usize>(
        &self,
        one: &One<'_, T>,
        gr: &Group<T, L>,
        l: usize,
        f: &mut [T],
        g: &mut [T],
    ) {
        let (n, k) = (one.n, one.k);
        for ((fi, &f0), u) in f[..n].iter_mut().zip(one.init_f).zip(&gr.uo) {
            *fi = f0 + u[l];
        }
        f[n..].fill(T::ZERO);
        for ((gj, v), m) in g[..k].iter_mut().zip(&gr.vo).zip(&gr.cmax) {
            *gj = v[l] - m[l];
        }
        g[k..].fill(T::ZERO);
    }
}

/// The members' rows into a `[ng, kg]` lane buffer, every entry written: row `i` of a member
/// is `row(one, i) = (values, shift)`, stored as `value + shift`, and `fill` is stored where a
/// member has no such entry (its padding, and absent members).
#[inline(always)]
fn gather_rows<'a, T: Real, const L: usize>(
    ones: &[Option<One<'a, T>>; L],
    kg: usize,
    fill: T,
    dst: &mut [[T; L]],
    row: impl Fn(&One<'a, T>, usize) -> (&'a [T], T),
) {
    if kg == 0 {
        return;
    }
    for (i, drow) in dst.chunks_exact_mut(kg).enumerate() {
        let rows = std::array::from_fn(|l| ones[l].as_ref().filter(|o| i < o.n).map(|o| row(o, i)));
        to_lanes(&rows, fill, drow);
    }
}

/// `dst[j][l] = row_l[j] + shift_l` for `j` below row `l`'s length, `fill` everywhere else
/// (rows at most `dst.len()` long): a block transpose where there is one.
#[inline(always)]
fn to_lanes<T: Real, const L: usize>(rows: &[Option<(&[T], T)>; L], fill: T, dst: &mut [[T; L]]) {
    if rows_to_lanes(rows, fill, dst) {
        return;
    }
    dst.fill([fill; L]);
    for (l, (src, shift)) in rows
        .iter()
        .enumerate()
        .filter_map(|(l, r)| Some((l, (*r)?)))
    {
        for (d, &v) in dst.iter_mut().zip(src) {
            // Element by element: vectorised, this loop would be a slow scatter.
            lanes_only();
            d[l] = v + shift;
        }
    }
}

/// Each lane's column max (into `mx`) and min (into `mn`) of its valid `S + f0` (the padding,
/// `-inf`, left out), its number of finite entries (the padding is not finite) and, where those
/// are all finite, its largest column spread `max − min` (padded columns give `-inf`): the
/// statistics of [`Problem::route`], vertically over the lanes.
#[inline(always)]
#[allow(clippy::eq_op)]
fn lane_stats<T: Real, const L: usize>(
    x: &[[T; L]],
    mx: &mut [[T; L]],
    mn: &mut [[T; L]],
) -> ([T; L], [T; L]) {
    mx.fill([T::NEG_INFINITY; L]);
    mn.fill([T::INFINITY; L]);
    let (mut finite, mut spread) = ([T::ZERO; L], [T::ZERO; L]);
    if mx.is_empty() {
        return (finite, spread);
    }
    for row in x.chunks_exact(mx.len()) {
        for ((er, ar), br) in row.iter().zip(mx.iter_mut()).zip(mn.iter_mut()) {
            lanes_only();
            let (e, mut a, mut b) = (*er, *ar, *br);
            for l in 0..L {
                a[l] = a[l].fmax(e[l]);
                let low = if e[l] == T::NEG_INFINITY {
                    T::INFINITY
                } else {
                    e[l]
                };
                b[l] = b[l].fmin(low);
                finite[l] += if e[l] - e[l] == T::ZERO {
                    T::ONE
                } else {
                    T::ZERO
                };
            }
            (*ar, *br) = (a, b);
        }
    }
    for (hi, lo) in mx.iter().zip(mn.iter()) {
        lanes_only();
        let (hi, lo) = (*hi, *lo);
        for l in 0..L {
            spread[l] = spread[l].fmax(hi[l] - lo[l]);
        }
    }
    (finite, spread)
}

/// The live lanes' valid blocks of `src` (`[ng, kg]`: plans or gradients) into their padded
/// `[N, K]` outputs, a row of every lane at a time. The padding is not written (see the module
/// docs of `sinkhorn_ext`).
#[inline(always)]
fn scatter_rows<T: Real, const L: usize>(
    ones: &[Option<One<'_, T>>; L],
    live: &[bool; L],
    src: &[[T; L]],
    kg: usize,
    plans: &mut [Option<&mut [T]>; L],
) {
    let ng = src.len().checked_div(kg).unwrap_or(0);
    for i in 0..ng {
        let xrow = &src[i * kg..][..kg];
        let mut rows: [Option<&mut [T]>; L] = std::array::from_fn(|_| None);
        for (l, (dst, (one, plan))) in rows
            .iter_mut()
            .zip(ones.iter().zip(plans.iter_mut()))
            .enumerate()
        {
            if let (Some(one), Some(plan), true) = (one, plan, live[l]) {
                if i < one.n {
                    *dst = Some(&mut plan[i * one.stride..][..one.k]);
                }
            }
        }
        if lanes_to_rows(xrow, &mut rows) {
            continue;
        }
        for (l, dst) in rows.iter_mut().enumerate() {
            for (p, x) in dst.iter_mut().flat_map(|d| d.iter_mut()).zip(xrow) {
                // Element by element: vectorised, this loop would be a slow gather.
                lanes_only();
                *p = x[l];
            }
        }
    }
}

/// `s = eps ln s` lane-wise.
#[inline(always)]
fn eps_ln<T: Real, const L: usize>(s: &mut [[T; L]], eps: T) {
    for r in s.iter_mut() {
        lanes_only();
        let mut v = *r;
        for x in v.iter_mut() {
            *x = eps * ln_fast(*x);
        }
        *r = v;
    }
}

/// Orders the problems `picks` so that each run of `L` is alike in size: by rows, then, within
/// runs of about √(count / L) groups, by columns (both sizes then vary by about as little
/// within a group). Ties go by index, so the order is a function of the batch alone.
fn order(picks: &mut [usize], rows: &[i64], cols: &[i64], lanes: usize) {
    picks.sort_unstable_by_key(|&b| (rows[b], cols[b], b));
    let groups = (picks.len() / lanes).max(1) as f64;
    let run = (groups.sqrt().round() as usize).max(1) * lanes;
    for r in picks.chunks_mut(run) {
        r.sort_unstable_by_key(|&b| (cols[b], rows[b], b));
    }
}

/// One task's scratch for a group of `L` problems padded to `[ng, kg]`, every buffer
/// `[index][lane]`.
#[derive(Default)]
struct Group<T, const L: usize> {
    kg: usize,
    /// `[ng * kg]`: `S + f0` (padding `-inf`), then the cached kernel `K`, then the plan.
    x: Vec<[T; L]>,
    /// `[ng]`: row masses, and 1 on padded rows (0 on valid ones).
    r: Vec<[T; L]>,
    rpad: Vec<[T; L]>,
    /// `[kg]`: column masses, and 1 on padded columns (0 on valid ones).
    c: Vec<[T; L]>,
    cpad: Vec<[T; L]>,
    /// `[kg]`: the column max `m` of `S + f0` (0 on padded columns), and the column min.
    cmax: Vec<[T; L]>,
    mn: Vec<[T; L]>,
    /// `[kg]`: column sums of `K u`.
    acc: Vec<[T; L]>,
    /// `[ng]`, `[kg]`: the scalings, and those each lane stopped with (then `eps ln` of them).
    u: Vec<[T; L]>,
    v: Vec<[T; L]>,
    uo: Vec<[T; L]>,
    vo: Vec<[T; L]>,
    /// The backward's gradient and result (`[ng * kg]`), column adjoints and weights (`[kg]`),
    /// and the replay's scalings of every iteration (`[count * ng]`, `[count * kg]`).
    gp: Vec<[T; L]>,
    gout: Vec<[T; L]>,
    bg: Vec<[T; L]>,
    nbg: Vec<[T; L]>,
    w: Vec<[T; L]>,
    hu: Vec<[T; L]>,
    hv: Vec<[T; L]>,
    /// At least `max(ng, kg)` zeros: the valid part of the padding indicators.
    zeros: Vec<T>,
    /// The per-problem path's buffers, for a member that leaves the lanes.
    ws: Workspace<T>,
}

impl<T: Real, const L: usize> Group<T, L> {
    /// Sizes for `[ng, kg]`: every lane all padding, except in `x`, `r`, `rpad`, `c` and
    /// `cpad`, which [`Problem::prepare`] overwrites whole (so their old contents stay).
    fn reset(&mut self, ng: usize, kg: usize) {
        self.kg = kg;
        let fill = |v: &mut Vec<[T; L]>, len: usize, x: T| reset(v, len, [x; L]);
        for v in [&mut self.r, &mut self.rpad] {
            v.resize(ng, [T::ZERO; L]);
        }
        for v in [&mut self.c, &mut self.cpad] {
            v.resize(kg, [T::ZERO; L]);
        }
        self.x.resize(ng * kg, [T::ZERO; L]);
        if self.zeros.len() < ng.max(kg) {
            self.zeros.resize(ng.max(kg), T::ZERO);
        }
        fill(&mut self.cmax, kg, T::ZERO);
        fill(&mut self.mn, kg, T::ZERO);
        fill(&mut self.acc, kg, T::ZERO);
        fill(&mut self.u, ng, T::ZERO);
        fill(&mut self.v, kg, T::ZERO);
        fill(&mut self.uo, ng, T::ZERO);
        fill(&mut self.vo, kg, T::ZERO);
    }
}

/// `x = exp((x − m)/eps)` with `m` the column max, and its column sums into `acc` (in row
/// order, as the per-problem path's).
#[inline(always)]
fn exp_kernel<T: Real, const L: usize>(
    x: &mut [[T; L]],
    cmax: &[[T; L]],
    ie: T,
    acc: &mut [[T; L]],
) {
    acc.fill([T::ZERO; L]);
    for row in x.chunks_exact_mut(cmax.len()) {
        for ((er, mr), ar) in row.iter_mut().zip(cmax).zip(acc.iter_mut()) {
            lanes_only();
            let (mut e, m, mut a) = (*er, *mr, *ar);
            for l in 0..L {
                e[l] = ((e[l] - m[l]) * ie).exp_fast();
                a[l] += e[l];
            }
            (*er, *ar) = (e, a);
        }
    }
}

/// `v = c / (sums + pad)`: the column scaling, 0 on padded columns.
#[inline(always)]
fn ratio<T: Real, const L: usize>(c: &[[T; L]], sums: &[[T; L]], pad: &[[T; L]], v: &mut [[T; L]]) {
    for (((vr, cr), sr), pr) in v.iter_mut().zip(c).zip(sums).zip(pad) {
        lanes_only();
        let (cv, sv, pv) = (*cr, *sr, *pr);
        let mut o = [T::ZERO; L];
        for l in 0..L {
            o[l] = cv[l] / (sv[l] + pv[l]);
        }
        *vr = o;
    }
}

/// The row step over all rows, [`ROWS`] at a time: `u`, and the column sums of `K u` in `acc`.
#[inline(always)]
fn row_pass<T: Real, const L: usize>(
    x: &[[T; L]],
    r: &[[T; L]],
    rpad: &[[T; L]],
    v: &[[T; L]],
    u: &mut [[T; L]],
    acc: &mut [[T; L]],
) {
    let kg = v.len();
    acc.fill([T::ZERO; L]);
    if kg == 0 {
        return;
    }
    let mut xb = x.chunks_exact(ROWS * kg);
    let (mut rb, mut pb, mut ub) = (
        r.chunks_exact(ROWS),
        rpad.chunks_exact(ROWS),
        u.chunks_exact_mut(ROWS),
    );
    for (((xs, rs), ps), us) in (&mut xb).zip(&mut rb).zip(&mut pb).zip(&mut ub) {
        rows_step::<T, L, ROWS>(xs, rs, ps, v, us, acc);
    }
    let xs = xb.remainder().chunks_exact(kg);
    let (rs, ps) = (
        rb.remainder().chunks_exact(1),
        pb.remainder().chunks_exact(1),
    );
    for (((xs, rs), ps), us) in xs
        .zip(rs)
        .zip(ps)
        .zip(ub.into_remainder().chunks_exact_mut(1))
    {
        rows_step::<T, L, 1>(xs, rs, ps, v, us, acc);
    }
}

/// One row step for `R` rows `x` (`[R, kg]`) with masses `r`: `u = r / (x · v + pad)`, then
/// `acc += x u` (rows in order).
#[inline(always)]
fn rows_step<T: Real, const L: usize, const R: usize>(
    x: &[[T; L]],
    r: &[[T; L]],
    pad: &[[T; L]],
    v: &[[T; L]],
    u: &mut [[T; L]],
    acc: &mut [[T; L]],
) {
    let kg = v.len();
    let mut d = [[T::ZERO; L]; R];
    for j in 0..kg {
        lanes_only();
        let vj = v[j];
        for i in 0..R {
            let e = x[i * kg + j];
            for l in 0..L {
                d[i][l] += e[l] * vj[l];
            }
        }
    }
    let mut ui = [[T::ZERO; L]; R];
    for i in 0..R {
        let (ri, pi) = (r[i], pad[i]);
        for l in 0..L {
            ui[i][l] = ri[l] / (d[i][l] + pi[l]);
        }
        u[i] = ui[i];
    }
    for j in 0..kg {
        lanes_only();
        let mut a = acc[j];
        for i in 0..R {
            let e = x[i * kg + j];
            for l in 0..L {
                a[l] += e[l] * ui[i][l];
            }
        }
        acc[j] = a;
    }
}

/// Each lane's marginal error `max_j |v_j sums_j − c_j| / c_j` (padded columns give 0).
#[inline(always)]
fn marginal_error<T: Real, const L: usize>(
    v: &[[T; L]],
    sums: &[[T; L]],
    c: &[[T; L]],
    pad: &[[T; L]],
) -> [T; L] {
    let mut e = [T::ZERO; L];
    for (((vr, sr), cr), pr) in v.iter().zip(sums).zip(c).zip(pad) {
        lanes_only();
        let (vv, sv, cv, pv) = (*vr, *sr, *cr, *pr);
        for l in 0..L {
            let d = (vv[l] * sv[l] - cv[l]) / (cv[l] + pv[l]);
            e[l] = nan_max(e[l], if d < T::ZERO { -d } else { d });
        }
    }
    e
}

/// `x = x v u` (the plan from the cached kernel and the scalings).
#[inline(always)]
fn plan_lanes<T: Real, const L: usize>(x: &mut [[T; L]], v: &[[T; L]], u: &[[T; L]]) {
    if v.is_empty() {
        return;
    }
    for (row, ur) in x.chunks_exact_mut(v.len()).zip(u) {
        let uv = *ur;
        for (er, vr) in row.iter_mut().zip(v) {
            lanes_only();
            let (mut e, vv) = (*er, *vr);
            for l in 0..L {
                e[l] = e[l] * vv[l] * uv[l];
            }
            *er = e;
        }
    }
}

/// The unrolled backward of the lane path: the forward replayed in the same lanes (so its
/// scalings are bitwise the forward's), then the reverse pass of `reverse.rs`'s plain domain,
/// formula for formula, vertically over the lanes. A group's lanes share one iteration count (the
/// problems are grouped by count first).
impl<T: Real> Problem<T> {
    /// The VJP of the problems `picks` (of counts `iters`) into `out` (`[B, N, K]`, each
    /// problem written by its group's task alone); returns whether some problem was forced
    /// into the plain domain where it is not safe.
    pub(super) fn backward_lanes(
        &self,
        grad: &[T],
        input: &SinkhornExtInput<'_, T>,
        iters: &[i64],
        dims: Dims,
        picks: Vec<usize>,
        out: SharedMut<T>,
    ) -> bool {
        if std::mem::size_of::<T>() == 4 {
            self.backward_groups::<16>(grad, input, iters, dims, picks, out)
        } else {
            self.backward_groups::<8>(grad, input, iters, dims, picks, out)
        }
    }

    fn backward_groups<const L: usize>(
        &self,
        grad: &[T],
        input: &SinkhornExtInput<'_, T>,
        iters: &[i64],
        dims: Dims,
        mut picks: Vec<usize>,
        out: SharedMut<T>,
    ) -> bool {
        // Groups within runs of one count, each run ordered by size.
        picks.sort_unstable_by_key(|&b| (iters[b], b));
        let mut groups = Vec::new();
        let mut start = 0;
        for run in picks.chunk_by_mut(|&a, &b| iters[a] == iters[b]) {
            order(run, input.row_counts, input.col_counts, L);
            groups.extend(
                (start..start + run.len())
                    .step_by(L)
                    .map(|g| (g, run.len() + start)),
            );
            start += run.len();
        }
        let picks = &picks[..];
        groups
            .par_iter()
            .with_max_len(1)
            .map_init(Group::<T, L>::default, |gr, &(g, end)| {
                let members = &picks[g..(g + L).min(end)];
                let count = iters[members[0]] as usize;
                dispatch(
                    #[inline(always)]
                    || self.reverse_group(grad, input, count, dims, members, gr, out),
                )
            })
            .reduce(|| false, |a, b| a || b)
    }

    /// One group of `count` iterations: replay, reverse, write. Returns whether a member was
    /// forced plain where that is not safe.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn reverse_group<const L: usize>(
        &self,
        grad: &[T],
        input: &SinkhornExtInput<'_, T>,
        count: usize,
        dims: Dims,
        members: &[usize],
        gr: &mut Group<T, L>,
        out: SharedMut<T>,
    ) -> bool {
        let ones: [Option<One<'_, T>>; L] =
            std::array::from_fn(|l| members.get(l).map(|&b| problem(input, dims, b)));
        let (ng, kg, live) = self.prepare(&ones, gr);
        let nk = dims.rows * dims.cols;
        let grad_of = |b: usize| &grad[b * nk..][..nk];
        let reversed = live.contains(&true) && self.replay(gr, count);
        if reversed {
            // The members' gradients, as `One`s whose scores are the gradient.
            let grads: [Option<One<'_, T>>; L] = std::array::from_fn(|l| {
                let b = *members.get(l)?;
                Some(One {
                    scores: grad_of(b),
                    ..problem(input, dims, b)
                })
            });
            // Overwritten whole by the gather.
            gr.gp.resize(ng * kg, [T::ZERO; L]);
            gather_rows(&grads, kg, T::ZERO, &mut gr.gp, |one, i| {
                (&one.scores[i * one.stride..][..one.k], T::ZERO)
            });
            self.reverse(gr, ng, kg, count);
        }
        // SAFETY: problem b belongs to this group only (see `Outputs`).
        let mut outs: [Option<&mut [T]>; L] = std::array::from_fn(|l| {
            let b = *members.get(l)?;
            Some(unsafe { std::slice::from_raw_parts_mut(out.at(b * nk), nk) })
        });
        if reversed {
            scatter_rows(&ones, &live, &gr.gout, kg, &mut outs);
        }
        let mut too_wide = false;
        for (l, (&b, one)) in members.iter().zip(ones.iter().flatten()).enumerate() {
            if !live[l] {
                // Not the plain domain after all (or not finite): the per-problem path.
                let o = outs[l].take().expect("a member's output");
                too_wide |= self.backward(one, grad_of(b), count, &mut gr.ws, o);
            }
        }
        too_wide
    }

    /// The forward of [`Problem::iterate`] for `count` iterations, without stopping, keeping
    /// every iteration's `u` and `v` in `hu`, `hv`. Returns false if interrupted.
    #[inline(always)]
    fn replay<const L: usize>(&self, gr: &mut Group<T, L>, count: usize) -> bool {
        let ie = T::from_f64(1.0 / self.eps);
        let Group {
            x,
            r,
            rpad,
            c,
            cpad,
            cmax,
            acc,
            u,
            v,
            hu,
            hv,
            ..
        } = gr;
        exp_kernel(x, cmax, ie, acc);
        ratio(c, acc, cpad, v);
        hu.clear();
        hv.clear();
        for t in 0..count {
            if self.interrupt.requested() {
                return false;
            }
            row_pass(x, r, rpad, v, u, acc);
            hu.extend_from_slice(u);
            hv.extend_from_slice(v);
            if t + 1 < count {
                ratio(c, acc, cpad, v);
            }
        }
        true
    }

    /// `reverse.rs`'s plain-domain reverse pass over the lanes: `x` holds `K`, `gp` the
    /// gradient, `hu`, `hv` the history; the result goes to `gout`.
    #[inline(always)]
    fn reverse<const L: usize>(&self, gr: &mut Group<T, L>, ng: usize, kg: usize, count: usize) {
        let ie = T::from_f64(1.0 / self.eps);
        let zero = [T::ZERO; L];
        let Group {
            x,
            r,
            rpad,
            c,
            cpad,
            gp,
            gout,
            bg,
            nbg,
            w,
            hu,
            hv,
            ..
        } = gr;
        for buf in [&mut *gout, &mut *bg, &mut *nbg, &mut *w] {
            buf.clear();
        }
        gout.resize(ng * kg, zero);
        bg.resize(kg, zero);
        nbg.resize(kg, zero);
        w.resize(kg, zero);
        if kg == 0 {
            return;
        }
        let last = count - 1;
        let (ut, vt) = (&hu[last * ng..][..ng], &hv[last * kg..][..kg]);
        // The plan's own adjoint, then the last row step; ḡ is the column sums of the result.
        for (i, orow) in gout.chunks_exact_mut(kg).enumerate() {
            let (xr, gr) = (&x[i * kg..][..kg], &gp[i * kg..][..kg]);
            let ui = ut[i];
            let mut bf = zero;
            for j in 0..kg {
                lanes_only();
                let (xv, vv, gv) = (xr[j], vt[j], gr[j]);
                let mut q = zero;
                for l in 0..L {
                    q[l] = gv[l] * (xv[l] * vv[l] * ui[l]) * ie;
                    bf[l] += q[l];
                }
                orow[j] = q;
            }
            let mut beta = zero;
            for l in 0..L {
                beta[l] = bf[l] / (r[i][l] + rpad[i][l]);
            }
            for j in 0..kg {
                lanes_only();
                let (xv, vv) = (xr[j], vt[j]);
                let (mut o, mut b) = (orow[j], bg[j]);
                for l in 0..L {
                    o[l] -= beta[l] * (xv[l] * vv[l] * ui[l]);
                    b[l] += o[l];
                }
                orow[j] = o;
                bg[j] = b;
            }
        }
        for t in (0..count).rev() {
            if self.interrupt.requested() {
                return;
            }
            let vt = &hv[t * kg..][..kg];
            for j in 0..kg {
                lanes_only();
                let (bv, vv, cv, pv) = (bg[j], vt[j], c[j], cpad[j]);
                let mut o = zero;
                for l in 0..L {
                    o[l] = bv[l] * vv[l] / (cv[l] + pv[l]);
                }
                w[j] = o;
            }
            nbg.fill(zero);
            let prev = (t > 0).then(|| (&hu[(t - 1) * ng..][..ng], &hv[(t - 1) * kg..][..kg]));
            for (i, orow) in gout.chunks_exact_mut(kg).enumerate() {
                let xr = &x[i * kg..][..kg];
                let a = prev.map_or([T::ONE; L], |(u, _)| u[i]);
                let mut d = zero;
                for j in 0..kg {
                    lanes_only();
                    let (xv, wv) = (xr[j], w[j]);
                    for l in 0..L {
                        d[l] += xv[l] * wv[l];
                    }
                }
                // f̄^{t−1}_i = −Σ_j ḡ_j B_ij.
                let mut bfp = zero;
                for l in 0..L {
                    bfp[l] = -(a[l] * d[l]);
                }
                match prev {
                    Some((_, vp)) => {
                        let mut gam = zero;
                        for l in 0..L {
                            gam[l] = a[l] * bfp[l] / (r[i][l] + rpad[i][l]);
                        }
                        for j in 0..kg {
                            lanes_only();
                            let (xv, wv, pv) = (xr[j], w[j], vp[j]);
                            let (mut o, mut nb) = (orow[j], nbg[j]);
                            for l in 0..L {
                                let av = xv[l] * pv[l] * gam[l];
                                o[l] -= xv[l] * (a[l] * wv[l]) + av;
                                nb[l] -= av;
                            }
                            orow[j] = o;
                            nbg[j] = nb;
                        }
                    }
                    None => {
                        for j in 0..kg {
                            lanes_only();
                            let (xv, wv) = (xr[j], w[j]);
                            let mut o = orow[j];
                            for l in 0..L {
                                o[l] -= xv[l] * (a[l] * wv[l]);
                            }
                            orow[j] = o;
                        }
                    }
                }
            }
            std::mem::swap(bg, nbg);
        }
    }
}
