//! One problem's forward: the cold start `F_0`, then one row pass per iteration (the `Gam` and
//! `H` steps of each row, the plan's column sums, the `F` step), stopping at the cap or, with a
//! tolerance, once the marginal error is small enough at the final eps.

use super::rows::{gam_row, minmax_row, reduce, run_chunks, RowScratch, Rows, Source};
use super::{MultiSinkhornExtParams, Problem};
use crate::interrupt::Interrupt;
use crate::multi_sinkhorn::Normalize;
use crate::simd::Real;

/// One problem's outputs: `T`, `Gam` `[N, K]`, `F` `[G, K]`, `H` `[G, N]`.
pub(super) struct ProblemOut<'a, T> {
    pub target: &'a mut [T],
    pub gam: &'a mut [T],
    pub f: &'a mut [T],
    pub h: &'a mut [T],
}

/// The state of one problem's iteration.
pub(super) struct Solver<'p, 'a, T> {
    pub p: &'p Problem<'a, T>,
    /// Plain domain: `E_G = exp(w_G (S - colmax) / e)` of every row, `[n, Ga, k]`, and the
    /// potentials below are the scalings `u = exp((F + w colmax) / e)` and `v = exp(H / e)`.
    pub plain: bool,
    pub cache: Vec<T>,
    /// `F`, `[Ga, k]` (score units), or `u` (plain).
    pub f: Vec<T>,
    /// `H` after the last pass, `[n, Ga]`, or `v` (plain).
    pub h: Vec<T>,
    /// `H` before it.
    pub h_prev: Vec<T>,
    /// Per chunk: the plan's column sums at `e`, then at the next eps, `[2, Ga, k]`.
    partials: Vec<T>,
    /// Their reduction.
    pub sums: Vec<T>,
    scratch: RowScratch<T>,
}

/// Where a pass writes the result: `T` and `Gam`, `[N, K]` each (rows `..n` are written).
pub(super) struct Results<'o, T> {
    pub target: &'o mut [T],
    pub gam: &'o mut [T],
    pub normalize: Normalize,
}

impl<'p, 'a, T: Real> Solver<'p, 'a, T> {
    /// `plain`: run the plain domain (only where the eps is fixed and the exponent range small).
    pub fn new(p: &'p Problem<'a, T>, plain: bool) -> Self {
        let (n, k, ga) = (p.n, p.k, p.groups.len());
        Solver {
            p,
            plain,
            cache: Vec::new(),
            f: vec![T::ZERO; ga * k],
            h: vec![T::ZERO; n * ga],
            h_prev: vec![T::ZERO; n * ga],
            partials: vec![T::ZERO; p.n_chunks * 2 * ga * k],
            sums: vec![T::ZERO; 2 * ga * k],
            scratch: RowScratch::new(ga, k),
        }
    }

    /// The cold start at `e0`: `H = 0` and `F_G[a] = e0 log r - e0 LSE_n(w_G S[n,a] / e0)`, the
    /// LSE shifted by the column maxima `col_max`.
    pub fn start(&mut self, col_max: &[T], e0: f64) {
        let p = self.p;
        let (k, ga) = (p.k, p.groups.len());
        let inv_e = T::from_f64(1.0 / e0);
        let e = T::from_f64(e0);
        let start = if self.plain { T::ONE } else { T::ZERO };
        self.h.fill(start);
        self.h_prev.fill(start);
        let width = ga * k;
        let plain = self.plain;
        if plain {
            self.cache.clear();
            self.cache.resize(p.n * width, T::ZERO);
        }
        let cache = Rows {
            values: &mut self.cache[..],
            width: if plain { width } else { 0 },
        };
        run_chunks(
            p,
            [cache, empty(), empty()],
            &mut self.partials,
            width,
            &mut self.scratch,
            #[inline(always)]
            |chunk, _| {
                let cs = &mut chunk.partials[..width];
                cs.fill(T::ZERO);
                let first = chunk.rows.start;
                for i in chunk.rows {
                    let s = p.row(i);
                    for (g, grp) in p.groups.iter().enumerate() {
                        let csg = &mut cs[g * k..][..k];
                        let w = grp.w * inv_e;
                        if plain {
                            let eg = &mut chunk.a[(i - first) * width + g * k..][..k];
                            for a in 0..k {
                                let v = (w * (s[a] - col_max[a])).exp_fast();
                                eg[a] = v;
                                csg[a] += v;
                            }
                        } else {
                            for a in 0..k {
                                csg[a] += (w * (s[a] - col_max[a])).exp_fast();
                            }
                        }
                    }
                }
            },
        );
        let sums = &mut self.sums[..width];
        reduce(&self.partials, p.n_chunks, sums);
        for (g, grp) in p.groups.iter().enumerate() {
            for a in 0..k {
                self.f[g * k + a] = if plain {
                    p.r / sums[g * k + a]
                } else {
                    e * p.log_r - grp.w * col_max[a] - e * sums[g * k + a].ln()
                };
            }
        }
    }

    /// `F` `[Ga, k]` and `H` `[n, Ga]` in score units (the plain domain's scalings converted).
    pub fn potentials(&self, col_max: &[T], e: f64) -> (Vec<T>, Vec<T>) {
        if !self.plain {
            return (self.f.clone(), self.h.clone());
        }
        let (k, e) = (self.p.k, T::from_f64(e));
        let mut f = self.f.clone();
        for (g, grp) in self.p.groups.iter().enumerate() {
            for a in 0..k {
                f[g * k + a] = e * f[g * k + a].ln() - grp.w * col_max[a];
            }
        }
        let h = self.h.iter().map(|&v| e * v.ln()).collect();
        (f, h)
    }

    /// One iteration's `Gam` and `H` steps at `e` over every row, from `F` and the current `H`
    /// (which becomes `h_prev`). Leaves the plan's column sums at `e` in `sums[..Ga k]` and, when
    /// `e_next != e`, those of `P^(e / e_next)` (the next `F` step's at `e_next`) after them.
    /// With `results`, writes `T` and `Gam`. Returns the marginal error.
    pub fn pass(&mut self, e: f64, e_next: f64, results: Option<Results<'_, T>>) -> T {
        std::mem::swap(&mut self.h, &mut self.h_prev);
        self.rows(e, e_next, results, true)
    }

    /// Writes `T` and `Gam` of the last pass (run again from `h_prev`, which gives the same
    /// values bit for bit).
    pub fn finish(&mut self, e: f64, results: Results<'_, T>) {
        self.rows(e, e, Some(results), false);
    }

    fn rows(&mut self, e: f64, e_next: f64, results: Option<Results<'_, T>>, sums: bool) -> T {
        let p = self.p;
        let (n, k, ga, stride) = (p.n, p.k, p.groups.len(), p.stride);
        let width = 2 * ga * k;
        let moved = e_next != e;
        let et = T::from_f64(e);
        let ratio = T::from_f64(e / e_next);
        let (f, h_prev, groups) = (&self.f[..], &self.h_prev[..], &p.groups[..]);
        let source = Source::new(self.plain.then_some(&self.cache[..]), e);
        let (normalize, target, gam) = match results {
            Some(r) => (
                Some(r.normalize),
                &mut r.target[..n * stride],
                &mut r.gam[..n * stride],
            ),
            None => (None, &mut [][..], &mut [][..]),
        };
        let out_width = if normalize.is_some() { stride } else { 0 };
        run_chunks(
            p,
            [
                Rows {
                    values: &mut self.h[..],
                    width: ga,
                },
                Rows {
                    values: target,
                    width: out_width,
                },
                Rows {
                    values: gam,
                    width: out_width,
                },
            ],
            &mut self.partials,
            width,
            &mut self.scratch,
            #[inline(always)]
            |chunk, sc| {
                let cs = &mut chunk.partials[..width];
                if sums {
                    cs.fill(T::ZERO);
                }
                let first = chunk.rows.start;
                for i in chunk.rows {
                    let local = i - first;
                    let hnew = &mut chunk.a[local * ga..][..ga];
                    source.step(p, i, f, &h_prev[i * ga..][..ga], sc, hnew);
                    if sums {
                        let (now, next) = cs.split_at_mut(ga * k);
                        for (c, &v) in now.iter_mut().zip(&sc.p[..ga * k]) {
                            *c += v;
                        }
                        if moved {
                            for (c, &v) in next.iter_mut().zip(&sc.p[..ga * k]) {
                                if v > T::ZERO {
                                    *c += (ratio * v.ln()).exp_fast();
                                }
                            }
                        }
                    }
                    if let Some(normalize) = normalize {
                        let row = &mut chunk.b[local * stride..][..k];
                        row.fill(T::ZERO);
                        for (g, grp) in groups.iter().enumerate() {
                            if grp.top > T::ZERO {
                                let pg = &sc.p[g * k..][..k];
                                for a in 0..k {
                                    row[a] += grp.top * pg[a];
                                }
                            }
                        }
                        if normalize == Normalize::MinMax {
                            minmax_row(row);
                        }
                        gam_row(&sc.m, &sc.z, et, &mut chunk.c[local * stride..][..k]);
                    }
                }
            },
        );
        if !sums {
            return T::ZERO;
        }
        reduce(&self.partials, p.n_chunks, &mut self.sums);
        let inv_r = T::ONE / p.r;
        let mut err = T::ZERO;
        for &v in &self.sums[..ga * k] {
            let d = (v - p.r) * inv_r;
            let d = d.fmax(-d);
            if d.to_f64().is_nan() || d > err {
                err = d;
            }
        }
        err
    }

    /// The `F` step at `e_next` from the last pass's column sums:
    /// `F += e_next (log r - log colsum)`.
    pub fn update_f(&mut self, e: f64, e_next: f64) {
        let gk = self.f.len();
        let sums = if e_next != e {
            &self.sums[gk..2 * gk]
        } else {
            &self.sums[..gk]
        };
        if self.plain {
            for (u, &s) in self.f.iter_mut().zip(sums) {
                *u *= self.p.r / s;
            }
            return;
        }
        let en = T::from_f64(e_next);
        for (f, &s) in self.f.iter_mut().zip(sums) {
            *f += en * (self.p.log_r - s.ln());
        }
    }
}

/// A row buffer with nothing in it.
pub(super) fn empty<'x, T>() -> Rows<'x, T> {
    Rows {
        values: &mut [],
        width: 0,
    }
}

/// Solves one problem into `out` (zeroed first, so padding is 0). Returns the iterations run
/// and the last marginal error; a problem with a non-finite valid score gets NaN outputs on its
/// valid block, `n_iters` and a NaN error.
pub(super) fn solve<T: Real>(
    p: &Problem<T>,
    params: &MultiSinkhornExtParams,
    out: ProblemOut<'_, T>,
    interrupt: &Interrupt,
) -> (usize, T) {
    let ProblemOut { target, gam, f, h } = out;
    target.fill(T::ZERO);
    gam.fill(T::ZERO);
    f.fill(T::ZERO);
    h.fill(T::ZERO);
    let (n, k, stride, nn) = (p.n, p.k, p.stride, p.rows);
    let (col_max, col_min, finite) = p.column_extremes();
    if !finite {
        let nan = T::from_f64(f64::NAN);
        for i in 0..n {
            target[i * stride..][..k].fill(nan);
            gam[i * stride..][..k].fill(nan);
        }
        for grp in &p.groups {
            f[grp.index * stride..][..k].fill(nan);
            h[grp.index * nn..][..n].fill(nan);
        }
        return (params.n_iters, nan);
    }
    let mut raw = p.eps_start;
    let plain = p.plain_domain(&col_max, &col_min, params);
    let mut solver = Solver::new(p, plain);
    solver.start(&col_max, params.eps.max(raw));
    let (mut n_run, mut err) = (0, T::ZERO);
    for t in 0..params.n_iters {
        let e = params.eps.max(raw);
        let last = t + 1 == params.n_iters;
        let e_next = if last {
            e
        } else {
            params.eps.max(raw * params.decay)
        };
        let results = last.then_some(Results {
            target: &mut *target,
            gam: &mut *gam,
            normalize: params.normalize,
        });
        err = solver.pass(e, e_next, results);
        n_run = t + 1;
        let converged = params.tol >= 0.0 && e == params.eps && err.to_f64() <= params.tol;
        if last || interrupt.requested() {
            break;
        }
        if converged {
            solver.finish(
                e,
                Results {
                    target: &mut *target,
                    gam: &mut *gam,
                    normalize: params.normalize,
                },
            );
            break;
        }
        solver.update_f(e, e_next);
        raw *= params.decay;
    }
    let ga = p.groups.len();
    let (f_out, h_out) = solver.potentials(&col_max, params.eps.max(raw));
    for (g, grp) in p.groups.iter().enumerate() {
        f[grp.index * stride..][..k].copy_from_slice(&f_out[g * k..][..k]);
        let hg = &mut h[grp.index * nn..][..n];
        for (i, v) in hg.iter_mut().enumerate() {
            *v = h_out[i * ga + g];
        }
    }
    (n_run, err)
}
