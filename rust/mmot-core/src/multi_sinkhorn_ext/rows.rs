//! The row step shared by the forward and the backward's replay, the chunked row passes, and
//! the min-max rule.

use super::{Group, Problem};
use crate::simd::{dispatch, sum, Real};
use rayon::prelude::*;
use std::ops::Range;

/// One row's scratch: the plan before and after the `H` step, and per-column values.
pub(super) struct RowScratch<T> {
    /// `[Ga, k]`: `P^B_G = exp((w_G S + F_G + Gam + H_G^old) / e)` (before the `H` step).
    pub pb: Vec<T>,
    /// `[Ga, k]`: the plan `P_G` after the `H` step (rows sum to 1 per group).
    pub p: Vec<T>,
    /// `[k]`: `m[a] = max_G t_G[a]`, `t_G = (w_G S + F_G + H_G^old) / e`.
    pub m: Vec<T>,
    /// `[k]`: `z[a] = Σ_G c_G exp(t_G[a] - m[a])`, so that `Gam = -e (m + log z)`.
    pub z: Vec<T>,
    /// `[k]` of spare per-column values for the callers.
    pub col: Vec<T>,
    /// `[k]` more.
    pub col2: Vec<T>,
}

impl<T: Real> RowScratch<T> {
    pub fn new(n_groups: usize, k: usize) -> Self {
        RowScratch {
            pb: vec![T::ZERO; n_groups * k],
            p: vec![T::ZERO; n_groups * k],
            m: vec![T::ZERO; k],
            z: vec![T::ZERO; k],
            col: vec![T::ZERO; k],
            col2: vec![T::ZERO; k],
        }
    }
}

/// The `Gam` and `H` steps of one row at `e` (`inv_e = 1/e`): from the valid scores `s` (`[k]`),
/// `F` (`[Ga, k]`) and the row's previous `H` (`hold`, `[Ga]`), fills `scratch.pb`, `scratch.p`,
/// `scratch.m`, `scratch.z` and writes the new `H` into `hnew`. A row whose shifted sums left the
/// float range (a group dominated in every column at small eps) is redone with exact
/// log-sum-exps.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn row_step<T: Real>(
    s: &[T],
    f: &[T],
    hold: &[T],
    groups: &[Group<T>],
    e: T,
    inv_e: T,
    scratch: &mut RowScratch<T>,
    hnew: &mut [T],
) {
    let k = s.len();
    let ga = groups.len();
    let RowScratch { pb, p, m, z, .. } = scratch;
    let (m, z) = (&mut m[..k], &mut z[..k]);
    m.fill(T::NEG_INFINITY);
    for (g, grp) in groups.iter().enumerate() {
        let (w, hg) = (grp.w, hold[g]);
        let fg = &f[g * k..][..k];
        let t = &mut pb[g * k..][..k];
        for a in 0..k {
            let v = (w * s[a] + fg[a] + hg) * inv_e;
            t[a] = v;
            m[a] = m[a].fmax(v);
        }
    }
    z.fill(T::ZERO);
    for (g, grp) in groups.iter().enumerate() {
        let c = grp.c;
        let t = &mut pb[g * k..][..k];
        for a in 0..k {
            let q = (t[a] - m[a]).exp_fast();
            t[a] = q;
            z[a] += c * q;
        }
    }
    // p holds 1/z in its first row for now.
    {
        let iz = &mut p[..k];
        for a in 0..k {
            iz[a] = T::ONE / z[a];
        }
    }
    let mut rescue = false;
    for g in (0..ga).rev() {
        // Group 0 last: its p row holds 1/z until then.
        let (iz, rest) = p.split_at_mut(k);
        let q = &mut pb[g * k..][..k];
        for a in 0..k {
            q[a] *= iz[a];
        }
        // In vector lanes (a separate loop, so that the one above vectorises too).
        let rs = sum(q);
        rescue |= !(rs >= T::TINY && rs < T::INFINITY);
        let inv = T::ONE / rs;
        let out = if g == 0 {
            &mut iz[..k]
        } else {
            &mut rest[(g - 1) * k..][..k]
        };
        for a in 0..k {
            out[a] = q[a] * inv;
        }
        hnew[g] = hold[g] - e * rs.ln();
    }
    if rescue {
        exact_row(s, f, hold, groups, e, inv_e, scratch, hnew);
    }
}

/// The plain-domain [`row_step`]: the row's cached `E_G = exp(w_G (S - colmax) / e)` (`[Ga, k]`),
/// the column scalings `u_G = exp((F_G + w_G colmax) / e)` (`[Ga, k]`) and the row scalings
/// `v_G = exp(H_G / e)` (`hold`, `[Ga]`) give the same plans with no `exp`; `z` is then
/// `exp(-Gam / e)` and `m` is 0, so that [`gam_row`] reads them alike. The new `v` goes to `hnew`.
#[inline(always)]
pub(super) fn row_step_plain<T: Real>(
    cache: &[T],
    u: &[T],
    hold: &[T],
    groups: &[Group<T>],
    scratch: &mut RowScratch<T>,
    hnew: &mut [T],
) {
    let k = scratch.m.len();
    let ga = groups.len();
    let RowScratch { pb, p, m, z, .. } = scratch;
    let (m, z) = (&mut m[..k], &mut z[..k]);
    m.fill(T::ZERO);
    z.fill(T::ZERO);
    for (g, grp) in groups.iter().enumerate() {
        let (c, vg) = (grp.c, hold[g]);
        let (eg, ug) = (&cache[g * k..][..k], &u[g * k..][..k]);
        let q = &mut pb[g * k..][..k];
        for a in 0..k {
            let v = eg[a] * ug[a] * vg;
            q[a] = v;
            z[a] += c * v;
        }
    }
    {
        let iz = &mut p[..k];
        for a in 0..k {
            iz[a] = T::ONE / z[a];
        }
    }
    for g in (0..ga).rev() {
        let (iz, rest) = p.split_at_mut(k);
        let q = &mut pb[g * k..][..k];
        for a in 0..k {
            q[a] *= iz[a];
        }
        // In vector lanes (a separate loop, so that the one above vectorises too).
        let rs = sum(q);
        let inv = T::ONE / rs;
        let out = if g == 0 {
            &mut iz[..k]
        } else {
            &mut rest[(g - 1) * k..][..k]
        };
        for a in 0..k {
            out[a] = q[a] * inv;
        }
        hnew[g] = hold[g] * inv;
    }
}

/// How a row's plans are formed: from the scores at `e` (log domain), or from the cached
/// `E_G` rows (plain domain, `[n, Ga, k]`).
#[derive(Clone, Copy)]
pub(super) enum Source<'a, T> {
    Log { e: T, inv_e: T },
    Plain { cache: &'a [T] },
}

impl<'a, T: Real> Source<'a, T> {
    pub fn new(plain: Option<&'a [T]>, e: f64) -> Self {
        match plain {
            Some(cache) => Source::Plain { cache },
            None => Source::Log {
                e: T::from_f64(e),
                inv_e: T::from_f64(1.0 / e),
            },
        }
    }

    /// [`row_step`] or [`row_step_plain`] for row `i` of `p`.
    #[inline(always)]
    pub fn step(
        &self,
        p: &Problem<T>,
        i: usize,
        f: &[T],
        hold: &[T],
        scratch: &mut RowScratch<T>,
        hnew: &mut [T],
    ) {
        match *self {
            Source::Log { e, inv_e } => {
                row_step(p.row(i), f, hold, &p.groups, e, inv_e, scratch, hnew)
            }
            Source::Plain { cache } => {
                let gk = p.groups.len() * p.k;
                row_step_plain(&cache[i * gk..][..gk], f, hold, &p.groups, scratch, hnew)
            }
        }
    }
}

/// [`row_step`] with exact log-sum-exps over the row.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn exact_row<T: Real>(
    s: &[T],
    f: &[T],
    hold: &[T],
    groups: &[Group<T>],
    e: T,
    inv_e: T,
    scratch: &mut RowScratch<T>,
    hnew: &mut [T],
) {
    let k = s.len();
    let RowScratch { pb, p, m, z, .. } = scratch;
    for (g, grp) in groups.iter().enumerate() {
        let (w, hg) = (grp.w, hold[g]);
        let fg = &f[g * k..][..k];
        let (pbg, pg) = (&mut pb[g * k..][..k], &mut p[g * k..][..k]);
        let mut mu = T::NEG_INFINITY;
        for a in 0..k {
            let lq = (w * s[a] + fg[a] + hg) * inv_e - m[a] - z[a].ln();
            pg[a] = lq;
            mu = mu.fmax(lq);
        }
        let mut rs = T::ZERO;
        for a in 0..k {
            pbg[a] = pg[a].exp_fast();
            pg[a] = (pg[a] - mu).exp_fast();
            rs += pg[a];
        }
        let inv = T::ONE / rs;
        for x in pg.iter_mut() {
            *x *= inv;
        }
        hnew[g] = hold[g] - e * (mu + rs.ln());
    }
}

/// `Gam = -e (m + log z)` of the row last passed to [`row_step`] at `e`, from its `m` and `z`,
/// into `out` (`[k]`).
#[inline(always)]
pub(super) fn gam_row<T: Real>(m: &[T], z: &[T], e: T, out: &mut [T]) {
    for (o, (&m, &z)) in out.iter_mut().zip(m.iter().zip(z)) {
        *o = -e * (m + z.ln());
    }
}

/// Relative spread at or below which a min-max row counts as constant, in units of the
/// accumulation dtype's machine epsilon: the rule of `multi_sinkhorn` (and of
/// `reference.constant_rows`).
const CONSTANT_ROW_ULPS: f64 = 1024.0;

/// Whether a row with extremes `lo`, `hi` is constant; NaN extremes are not.
#[inline(always)]
pub(super) fn constant_row<T: Real>(lo: T, hi: T) -> bool {
    let epsilon = if std::mem::size_of::<T>() == 4 {
        f32::EPSILON as f64
    } else {
        f64::EPSILON
    };
    let scale = lo.fmax(-lo).fmax(hi.fmax(-hi));
    hi - lo <= T::from_f64(CONSTANT_ROW_ULPS * epsilon) * scale
}

/// `(min, max)` of a row, NaN if it holds one.
#[inline(always)]
fn extremes<T: Real>(x: &[T]) -> (T, T) {
    let (mut lo, mut hi) = (T::INFINITY, T::NEG_INFINITY);
    let mut nan = false;
    for &v in x {
        nan |= v.to_f64().is_nan();
        lo = lo.fmin(v);
        hi = hi.fmax(v);
    }
    if nan {
        let q = T::from_f64(f64::NAN);
        return (q, q);
    }
    (lo, hi)
}

/// `(x - min) / (max - min)` in place; a constant row becomes 0.
#[inline(always)]
pub(super) fn minmax_row<T: Real>(row: &mut [T]) {
    let (lo, hi) = extremes(row);
    if constant_row(lo, hi) {
        row.fill(T::ZERO);
        return;
    }
    let d = hi - lo;
    for x in row.iter_mut() {
        *x = (*x - lo) / d;
    }
}

/// The VJP of [`minmax_row`] at `x` for the upstream `gy`, into `gx`; ties of the minimum or
/// the maximum share its gradient equally (as `torch.amin` / `torch.amax` do).
#[inline(always)]
pub(crate) fn minmax_row_vjp<T: Real>(x: &[T], gy: &[T], gx: &mut [T]) {
    let (lo, hi) = extremes(x);
    if constant_row(lo, hi) {
        gx.fill(T::ZERO);
        return;
    }
    let d = hi - lo;
    let (mut s1, mut s2) = (T::ZERO, T::ZERO);
    let (mut n_lo, mut n_hi) = (0usize, 0usize);
    for (&v, &g) in x.iter().zip(gy) {
        s1 += g;
        s2 += g * ((v - lo) / d);
        n_lo += (v == lo) as usize;
        n_hi += (v == hi) as usize;
    }
    let lo_bar = (s2 - s1) / d / T::from_f64(n_lo.max(1) as f64);
    let hi_bar = -s2 / d / T::from_f64(n_hi.max(1) as f64);
    for ((o, &v), &g) in gx.iter_mut().zip(x).zip(gy) {
        let mut val = g / d;
        if v == lo {
            val += lo_bar;
        }
        if v == hi {
            val += hi_bar;
        }
        *o = val;
    }
}

/// A row-major buffer handed to a pass: `width` values per row.
pub(super) struct Rows<'a, T> {
    pub values: &'a mut [T],
    pub width: usize,
}

/// What each chunk of a pass gets: its rows, its rows of three row buffers, its partials
/// (`width` of the pass's) and a row scratch.
pub(super) struct Chunk<'a, T> {
    pub rows: Range<usize>,
    pub a: &'a mut [T],
    pub b: &'a mut [T],
    pub c: &'a mut [T],
    pub partials: &'a mut [T],
}

/// Runs `f` over the problem's row chunks (fixed by its shape): on this thread with `single`
/// as scratch when there is one chunk, in parallel otherwise; each chunk gets its own slice
/// of `partials` (`partial_width` each), which the caller reduces in chunk order.
pub(super) fn run_chunks<T: Real, F>(
    p: &Problem<T>,
    bufs: [Rows<'_, T>; 3],
    partials: &mut [T],
    partial_width: usize,
    single: &mut RowScratch<T>,
    f: F,
) where
    F: Fn(Chunk<'_, T>, &mut RowScratch<T>) + Sync,
{
    let [a, b, c] = bufs;
    let (mut a, mut b, mut c) = (
        (a.values, a.width),
        (b.values, b.width),
        (c.values, c.width),
    );
    let mut partials = &mut partials[..p.n_chunks * partial_width];
    let mut jobs = Vec::with_capacity(p.n_chunks);
    for chunk in 0..p.n_chunks {
        let first = chunk * p.rows_per_chunk;
        let rows = first..(first + p.rows_per_chunk).min(p.n);
        let len = rows.len();
        let (a0, a1) = std::mem::take(&mut a.0).split_at_mut(len * a.1);
        let (b0, b1) = std::mem::take(&mut b.0).split_at_mut(len * b.1);
        let (c0, c1) = std::mem::take(&mut c.0).split_at_mut(len * c.1);
        let (p0, p1) = std::mem::take(&mut partials).split_at_mut(partial_width);
        (a.0, b.0, c.0, partials) = (a1, b1, c1, p1);
        jobs.push(Chunk {
            rows,
            a: a0,
            b: b0,
            c: c0,
            partials: p0,
        });
    }
    if jobs.len() == 1 {
        let job = jobs.pop().expect("one job");
        dispatch(
            #[inline(always)]
            || f(job, single),
        );
        return;
    }
    let (ga, k) = (p.groups.len(), p.k);
    jobs.into_par_iter().for_each(|job| {
        let mut scratch = RowScratch::new(ga, k);
        dispatch(
            #[inline(always)]
            || f(job, &mut scratch),
        )
    });
}

/// `acc = Σ_c partials[c]` over `chunks` chunks of `acc.len()`, in chunk order.
pub(super) fn reduce<T: Real>(partials: &[T], chunks: usize, acc: &mut [T]) {
    let w = acc.len();
    acc.copy_from_slice(&partials[..w]);
    for c in 1..chunks {
        for (x, &y) in acc.iter_mut().zip(&partials[c * w..(c + 1) * w]) {
            *x += y;
        }
    }
}
