//! Multi-Assignment Sinkhorn-Knopp, grouped form (DESIGN.md §2.2).
//!
//! The dense algorithm works on a `[K, N, K]` tensor. Slots with equal weight stay identical
//! throughout, so the plan factorises as `P[m,n,a] = E_G[n,a] f_G[a] g[n,a] h_G[n]` with one
//! `(f_G, h_G)` pair per distinct weight; this file only ever holds `O(G·N·K)` values.
//!
//! Each iteration is one streaming pass over rows. For row `n` the pass needs the new `f`, the
//! previous `h_G[n]` and row `n` of the scores; it computes the slot values after the `g`
//! update, `q_G[a] = h_G E_G f_G / Σ_G' c_G' h_G' E_G' f_G'`, their row sums (which give the
//! new `h_G[n]`), and the slot values after the `h` update, `q_G / rowsum_G`, whose column sums
//! over `n` give the next `f_G` by `f_G *= r / colsum`. `g` itself is never stored.
//!
//! Plain domain: `E_G = exp(w_G (S - colmax)/eps)` is cached once per call in a per-row
//! `[E_0[..K], E_1[..K], ..., h_G...]` state block, so iterations do no `exp`. With two groups
//! (SSPC's default) the forward caches only the ratio `D = E_1 / E_0`, all the slot values
//! depend on.
//! Log domain: the same quantities are formed from log potentials
//! `t_G = w_G (S - colmax)/eps + log f_G + log h_G`, shifted per element by `max_G t_G`, which
//! costs `G` exponentials per element per iteration but cannot overflow. The column sums of the
//! normalised slot values are bounded below (by roughly `r_a / (K² N)`), so, as in `sinkhorn`,
//! no column log-sum-exp is needed.

use crate::chunks::{
    balanced, batch_col_stats, n_chunks, not_finite, reduce_partials, rows_per_chunk, run_pass,
};
use crate::dims::Dims;
use crate::domain::{use_log_domain, LogDomain};
use crate::error::{check_eps_iters, check_len, MmotError, Result};
use crate::real::{extremes, max, sum, Real};
use crate::spare::{vec_bytes, Footprint, Spare};
use crate::vector::{Vector, VectorOp};
use rayon::prelude::*;
use std::str::FromStr;

/// Groups whose per-row scalars live on the stack (the default SSPC weights make 2 groups).
const MAX_STACK_GROUPS: usize = 8;

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

/// Slots grouped by equal weight (in order of first appearance).
#[derive(Debug, Clone)]
struct Groups<T> {
    /// Weight of each group.
    w: Vec<T>,
    /// Number of slots in each group.
    c: Vec<T>,
    /// Number of the last k slots in each group (the output's coefficients).
    t: Vec<T>,
    w_max: f64,
}

impl<T: Real> Groups<T> {
    fn new(weights: &[f64], k: usize) -> Self {
        let kk = weights.len();
        let mut w: Vec<T> = Vec::new();
        let mut c: Vec<usize> = Vec::new();
        let mut t: Vec<usize> = Vec::new();
        let mut w_max = 0.0f64;
        for (m, &wm) in weights.iter().enumerate() {
            let wt = T::from_f64(wm);
            w_max = w_max.max(wt.to_f64());
            let g = match w.iter().position(|&x| x == wt) {
                Some(g) => g,
                None => {
                    w.push(wt);
                    c.push(0);
                    t.push(0);
                    w.len() - 1
                }
            };
            c[g] += 1;
            if m >= kk - k {
                t[g] += 1;
            }
        }
        let cv = |v: Vec<usize>| v.into_iter().map(|x| T::from_f64(x as f64)).collect();
        Groups {
            w,
            c: cv(c),
            t: cv(t),
            w_max,
        }
    }
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
    let (b, n, kk) = (dims.problems, dims.rows, dims.cols);
    let check_values = params.check_values;
    check_args(scores, anchor_mass, out, dims, params)?;
    if check_values {
        check_masses(anchor_mass, kk, n)?;
    }
    let groups = Groups::<T>::new(&params.slot_weights, params.k);
    if b * n == 0 {
        return Ok(use_log_domain::<T>(params.log_domain, 0.0));
    }
    let p = Problem {
        n,
        k: kk,
        inv_eps: T::from_f64(1.0 / params.eps),
        n_iters: params.n_iters,
        normalize: params.normalize,
        g: groups,
    };
    if small::applies(&p, params.log_domain)
        && small::solve(&p, scores, anchor_mass, out, params.eps, params.log_domain)
    {
        return Ok(false);
    }
    let mut cmax = vec![T::ZERO; b * kk];
    let (range, finite) = batch_col_stats(scores, b, n, kk, &mut cmax);
    if check_values && !finite {
        return Err(not_finite("scores"));
    }
    let log = use_log_domain::<T>(params.log_domain, range * p.g.w_max / params.eps);
    out.par_chunks_mut(n * kk)
        .zip(scores.par_chunks(n * kk))
        .zip(anchor_mass.par_chunks(kk))
        .zip(cmax.par_chunks(kk))
        .for_each_init(Spare::<Workspace<T>>::take, |ws, (((o, s), r), cm)| {
            p.solve(s, r, cm, o, ws, log, None)
        });
    Ok(log)
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

/// Checks the shapes and parameters shared by the forward and the backward.
fn check_args<T: Real>(
    scores: &[T],
    anchor_mass: &[T],
    out: &[T],
    dims: Dims,
    params: &MultiSinkhornParams,
) -> Result<()> {
    let (b, kk) = (dims.problems, dims.cols);
    let shape = dims.describe();
    check_len("scores", scores.len(), dims.len(), &shape)?;
    check_len("out", out.len(), dims.len(), &shape)?;
    check_len(
        "anchor_mass",
        anchor_mass.len(),
        b * kk,
        &format!("[{b}, {kk}]"),
    )?;
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

/// Pass 0 of a row in the ratio layout: `E_0 = exp(w_0 L)` and `D = exp((w_1 - w_0) L)`, the
/// latter as `E_0^M` for `M` in 1..=3 (`M = 0`: by `exp`); caches `D` and adds `E_0` and
/// `E_1 = E_0 D` to the column sums `p0`, `p1`.
#[inline(always)]
fn ratio_row<T: Real, const M: usize>(
    lrow: &[T],
    w: &[T],
    d: &mut [T],
    p0: &mut [T],
    p1: &mut [T],
) {
    let k = lrow.len();
    let (d, p0, p1) = (&mut d[..k], &mut p0[..k], &mut p1[..k]);
    let (w0, dw) = (w[0], w[1] - w[0]);
    for j in 0..k {
        let e0 = (w0 * lrow[j]).exp_fast();
        d[j] = match M {
            1 => e0,
            2 => e0 * e0,
            3 => e0 * e0 * e0,
            _ => (dw * lrow[j]).exp_fast(),
        };
        p0[j] += e0;
        p1[j] += e0 * d[j];
    }
}

/// Where a row's values sit in the per-row state block. In the plain domain the cached `E_G`
/// rows come first and the stride is a whole number of 64-byte lines, so that (with an aligned
/// base, see [`aligned_rows`]) every row's vector loads start on a line; the row scalars
/// (`h_G`, or the backward's adjoints of them) follow. The log domain keeps only the scalars.
///
/// With `ratio`, a two-group forward caches only `D = E_1 / E_0 = exp((w_1 - w_0) L)`: the slot
/// values depend on `E_0` and `E_1` only through that ratio (see [`slot_values`]), so the state
/// each pass streams is halved and the row work is a quarter shorter.
#[derive(Clone, Copy)]
struct StateLayout {
    stride: usize,
    /// Offset of the `G` row scalars.
    h: usize,
    ratio: bool,
}

impl StateLayout {
    /// Rows per chunk of a pass. The plain domain's chunks are four times the L1-sized
    /// default: its row work is short, and fewer, larger tasks halve the fork-join and
    /// partial-sum overhead of the 20-odd passes of a call.
    fn rows_per_chunk(&self, n: usize, k: usize) -> usize {
        let rpc = if self.h == 0 {
            rows_per_chunk(k)
        } else {
            4 * rows_per_chunk(self.stride)
        };
        balanced(n, rpc)
    }

    fn new<T>(log: bool, ng: usize, gk: usize, ratio: bool) -> Self {
        if log {
            StateLayout {
                stride: ng,
                h: 0,
                ratio: false,
            }
        } else {
            let line = (64 / std::mem::size_of::<T>()).max(1);
            let cached = if ratio { gk / ng } else { gk };
            StateLayout {
                stride: (cached + ng).next_multiple_of(line),
                h: cached,
                ratio,
            }
        }
    }
}

/// `len` values of `buf` starting on a 64-byte boundary, with whatever they held before: every
/// pass 0 writes all the state it later reads, so a reused buffer is not cleared (a fresh one
/// comes zeroed from the allocator, which is cheaper than filling it).
fn aligned_rows<T: Real>(buf: &mut Vec<T>, len: usize) -> &mut [T] {
    let padded = len + 64 / std::mem::size_of::<T>();
    if buf.len() < padded {
        *buf = vec![T::ZERO; padded];
    }
    aligned_view(buf, len)
}

/// The `len` values of a buffer filled by [`aligned_rows`], without touching them.
fn aligned_view<T: Real>(buf: &mut [T], len: usize) -> &mut [T] {
    let off = buf
        .as_ptr()
        .align_offset(64)
        .min(64 / std::mem::size_of::<T>());
    &mut buf[off..off + len]
}

struct Problem<T> {
    n: usize,
    k: usize,
    inv_eps: T,
    n_iters: usize,
    normalize: Normalize,
    g: Groups<T>,
}

#[derive(Default)]
struct Workspace<T> {
    /// Per row: `h_G` (plain) or `log h_G` (log) for each group, then, in the plain domain,
    /// the cached `E_G` rows.
    state: Vec<T>,
    partials: Vec<T>,
    acc: Vec<T>,
    /// `f_G` (plain) or `log f_G` (log), `[G, K]`.
    colpot: Vec<T>,
    /// `f_1 / f_0` when the state layout caches the ratio `D` (`[K]`).
    f10: Vec<T>,
    scratch: Vec<T>,
}

impl<T: Real> Footprint for Workspace<T> {
    fn bytes(&self) -> usize {
        let Workspace {
            state,
            partials,
            acc,
            colpot,
            f10,
            scratch,
        } = self;
        [state, partials, acc, colpot, f10, scratch]
            .into_iter()
            .map(vec_bytes)
            .sum()
    }
}

impl<T: Real> Problem<T> {
    /// With `hist`, also records the potentials of every iteration (for the backward).
    #[allow(clippy::too_many_arguments)]
    fn solve(
        &self,
        s: &[T],
        r: &[T],
        cmax: &[T],
        out: &mut [T],
        ws: &mut Workspace<T>,
        log: bool,
        mut hist: Option<&mut History<T>>,
    ) {
        let (n, k, inv_eps) = (self.n, self.k, self.inv_eps);
        let ng = self.g.w.len();
        let (w, c, t) = (&self.g.w[..], &self.g.c[..], &self.g.t[..]);
        let gk = ng * k;
        // The backward reads every E_G from the state, so its replay caches them all.
        let ratio = !log && ng == 2 && hist.is_none();
        let lay = StateLayout::new::<T>(log, ng, gk, ratio);
        // D = E_0^m when w_1 - w_0 = m w_0 (SSPC's 0.25 and 1 give m = 3): products, not an exp.
        let ratio_power = if ratio {
            (1..=3).find(|&m| T::from_f64(m as f64) * w[0] == w[1] - w[0])
        } else {
            None
        };
        let (sw, ho) = (lay.stride, lay.h);
        let rpc = lay.rows_per_chunk(n, k);
        let nch = n_chunks(n, rpc);
        let Workspace {
            state,
            partials,
            acc,
            colpot,
            f10,
            scratch,
        } = ws;
        let state = aligned_rows(state, n * sw);
        partials.clear();
        partials.resize(nch * gk, T::ZERO);
        acc.clear();
        acc.resize(gk, T::ZERO);
        colpot.clear();
        colpot.resize(gk, T::ZERO);

        // Pass 0 (g = h = 1): column sums of E_G. Plain caches E_G and sets h = 1; log sets
        // log h = 0. L = (S - colmax)/eps <= 0 with a 0 in each column, so the sums are >= 1.
        run_pass(
            n,
            rpc,
            state,
            sw,
            out,
            k,
            partials,
            gk,
            scratch,
            k,
            #[inline(always)]
            |rows, st, _o, p, lrow| {
                // Re-sliced to exact lengths so that the loops carry no bounds checks.
                let (p, lrow, cmax) = (&mut p[..gk], &mut lrow[..k], &cmax[..k]);
                p.fill(T::ZERO);
                for (i, row) in rows.enumerate() {
                    let srow = &s[row * k..(row + 1) * k];
                    for j in 0..k {
                        lrow[j] = (srow[j] - cmax[j]) * inv_eps;
                    }
                    let st = &mut st[i * sw..(i + 1) * sw];
                    let (cache, h) = st.split_at_mut(ho);
                    let h = &mut h[..ng];
                    if ratio {
                        h.fill(T::ONE);
                        let (p0, p1) = p.split_at_mut(k);
                        let d = &mut cache[..k];
                        match ratio_power {
                            Some(1) => ratio_row::<T, 1>(lrow, w, d, p0, p1),
                            Some(2) => ratio_row::<T, 2>(lrow, w, d, p0, p1),
                            Some(3) => ratio_row::<T, 3>(lrow, w, d, p0, p1),
                            _ => ratio_row::<T, 0>(lrow, w, d, p0, p1),
                        }
                        continue;
                    }
                    for g in 0..ng {
                        let pg = &mut p[g * k..(g + 1) * k];
                        let wg = w[g];
                        if log {
                            h[g] = T::ZERO;
                            for j in 0..k {
                                pg[j] += (wg * lrow[j]).exp_fast();
                            }
                        } else {
                            h[g] = T::ONE;
                            let eg = &mut cache[g * k..(g + 1) * k];
                            for j in 0..k {
                                let e = (wg * lrow[j]).exp_fast();
                                eg[j] = e;
                                pg[j] += e;
                            }
                        }
                    }
                }
            },
        );
        reduce_partials(partials, nch, acc);
        for g in 0..ng {
            for j in 0..k {
                let a = acc[g * k + j];
                colpot[g * k + j] = if log { r[j].ln() - a.ln() } else { r[j] / a };
            }
        }

        let normalize = self.normalize;
        if let Some(hs) = hist.as_deref_mut() {
            hs.row.clear();
            hs.row.resize((self.n_iters + 1) * n * ng, T::ZERO);
            hs.row[..n * ng].fill(if log { T::ZERO } else { T::ONE });
            hs.col.clear();
            hs.col.resize(self.n_iters * gk, T::ZERO);
        }
        for it in 0..self.n_iters {
            let last = it + 1 == self.n_iters;
            if let Some(hs) = hist.as_deref_mut() {
                hs.col[it * gk..(it + 1) * gk].copy_from_slice(colpot);
            }
            if ratio {
                f10.clear();
                f10.extend((0..k).map(|j| colpot[k + j] / colpot[j]));
            }
            let (f, f10): (&[T], &[T]) = (colpot, f10);
            run_pass(
                n,
                rpc,
                state,
                sw,
                out,
                k,
                partials,
                gk,
                scratch,
                // q [rows, G, K] for the two-group path; q [G, K] | den [K] | lrow [K] otherwise
                (rpc.min(n) * gk).max(gk + 2 * k),
                #[inline(always)]
                |rows, st, o, p, scr| {
                    p.fill(T::ZERO);
                    if !log && ng == 2 {
                        let (c, state, q) = ([c[0], c[1]], st, &mut scr[..rows.len() * gk]);
                        let output = last.then(|| Output {
                            rows: o,
                            t: [t[0], t[1]],
                            minmax: normalize == Normalize::MinMax,
                        });
                        return T::with_vector(PlainRowsTwo {
                            state,
                            lay,
                            k,
                            f,
                            f10,
                            c,
                            q,
                            p,
                            output,
                        });
                    }
                    let (q, rest) = scr.split_at_mut(gk);
                    let (den, lrow) = rest.split_at_mut(k);
                    for (i, row) in rows.enumerate() {
                        let st = &mut st[i * sw..(i + 1) * sw];
                        let (cache, h) = st.split_at_mut(ho);
                        let h = &mut h[..ng];
                        // inv[g]: the h update's 1 / row sum of q_G.
                        let mut inv = [T::ZERO; MAX_STACK_GROUPS];
                        let mut inv_heap = Vec::new();
                        let inv: &mut [T] = if ng <= MAX_STACK_GROUPS {
                            &mut inv[..ng]
                        } else {
                            inv_heap.resize(ng, T::ZERO);
                            &mut inv_heap
                        };
                        // (Two plain groups took the vector path above.)
                        let fused = !log
                            && match ng {
                                3 => plain_row_fused::<T, 3>(cache, f, c, h, q, inv),
                                4 => plain_row_fused::<T, 4>(cache, f, c, h, q, inv),
                                _ => false,
                            };
                        if fused {
                            // h_new = 1 / Σ_a E f g, which is exactly inv.
                            h.copy_from_slice(inv);
                        } else if log {
                            let srow = &s[row * k..(row + 1) * k];
                            for j in 0..k {
                                lrow[j] = (srow[j] - cmax[j]) * inv_eps;
                            }
                            // q_G = t_G, den = max_G t_G
                            den.fill(T::NEG_INFINITY);
                            for g in 0..ng {
                                let (wg, hg) = (w[g], h[g]);
                                let fg = &f[g * k..(g + 1) * k];
                                let qg = &mut q[g * k..(g + 1) * k];
                                for j in 0..k {
                                    let tv = wg * lrow[j] + fg[j] + hg;
                                    qg[j] = tv;
                                    den[j] = den[j].fmax(tv);
                                }
                            }
                            for g in 0..ng {
                                let qg = &mut q[g * k..(g + 1) * k];
                                for j in 0..k {
                                    qg[j] = (qg[j] - den[j]).exp_fast();
                                }
                            }
                            den.fill(T::ZERO);
                            for g in 0..ng {
                                let cg = c[g];
                                let qg = &q[g * k..(g + 1) * k];
                                for j in 0..k {
                                    den[j] += cg * qg[j];
                                }
                            }
                            for d in den.iter_mut() {
                                *d = T::ONE / *d;
                            }
                        } else {
                            den.fill(T::ZERO);
                            for g in 0..ng {
                                let ch = c[g] * h[g];
                                let hg = h[g];
                                let eg = &cache[g * k..(g + 1) * k];
                                let fg = &f[g * k..(g + 1) * k];
                                let qg = &mut q[g * k..(g + 1) * k];
                                for j in 0..k {
                                    let v = eg[j] * fg[j];
                                    qg[j] = hg * v;
                                    den[j] += ch * v;
                                }
                            }
                            for d in den.iter_mut() {
                                *d = T::ONE / *d;
                            }
                        }
                        if !fused {
                            // q_G *= 1/den: slot values after the g update. With a single group they
                            // are exactly 1/c (setting them so keeps constant rows exactly constant).
                            for g in 0..ng {
                                let qg = &mut q[g * k..(g + 1) * k];
                                if ng == 1 {
                                    qg.fill(T::ONE / c[0]);
                                } else {
                                    for j in 0..k {
                                        qg[j] *= den[j];
                                    }
                                }
                            }
                            let mut rescue = false;
                            for g in 0..ng {
                                let rs = sum(&q[g * k..(g + 1) * k]);
                                // Only possible in the log domain's first iteration, before any row
                                // normalisation (see the module docs): fall back to exact LSEs.
                                rescue |= !(rs >= T::TINY && rs < T::INFINITY);
                                inv[g] = T::ONE / rs;
                            }
                            if log && rescue {
                                let srow = &s[row * k..(row + 1) * k];
                                self.exact_log_row(srow, cmax, f, h, q, den, lrow);
                                inv.fill(T::ONE);
                            } else {
                                for g in 0..ng {
                                    if log {
                                        h[g] += inv[g].ln();
                                    } else {
                                        h[g] *= inv[g];
                                    }
                                }
                            }
                        }
                        let orow = &mut o[i * k..(i + 1) * k];
                        if last {
                            orow.fill(T::ZERO);
                        }
                        for g in 0..ng {
                            let qg = &q[g * k..(g + 1) * k];
                            if last {
                                if t[g] > T::ZERO {
                                    let coef = t[g] * inv[g];
                                    for j in 0..k {
                                        orow[j] += coef * qg[j];
                                    }
                                }
                            } else {
                                let pg = &mut p[g * k..(g + 1) * k];
                                let ig = inv[g];
                                for j in 0..k {
                                    pg[j] += qg[j] * ig;
                                }
                            }
                        }
                        if last && normalize == Normalize::MinMax {
                            minmax_row(orow);
                        }
                    }
                },
            );
            if let Some(hs) = hist.as_deref_mut() {
                let dst = &mut hs.row[(it + 1) * n * ng..(it + 2) * n * ng];
                for (d, st) in dst.chunks_exact_mut(ng).zip(state.chunks_exact(sw)) {
                    d.copy_from_slice(&st[ho..ho + ng]);
                }
            }
            if !last {
                reduce_partials(partials, nch, acc);
                for g in 0..ng {
                    for j in 0..k {
                        let ratio = r[j] / acc[g * k + j];
                        let fp = &mut colpot[g * k + j];
                        if log {
                            *fp += ratio.ln();
                        } else {
                            *fp *= ratio;
                        }
                    }
                }
            }
        }
    }
}

impl<T: Real> Problem<T> {
    /// Log-domain g and h updates of one row with full log-sum-exps: writes the normalised slot
    /// values (after the h update) into `q` and updates `eta = log h`. `den` and `lrow` are
    /// scratch of length K.
    #[allow(clippy::too_many_arguments)]
    fn exact_log_row(
        &self,
        srow: &[T],
        cmax: &[T],
        phi: &[T],
        eta: &mut [T],
        q: &mut [T],
        lse: &mut [T],
        lrow: &mut [T],
    ) {
        let k = self.k;
        let (w, c) = (&self.g.w[..], &self.g.c[..]);
        let ng = w.len();
        for j in 0..k {
            lrow[j] = (srow[j] - cmax[j]) * self.inv_eps;
        }
        // lse[a] = log Σ_G c_G exp(t_G[a]); q_G = t_G for now.
        lse.fill(T::NEG_INFINITY);
        for g in 0..ng {
            for j in 0..k {
                let tv = w[g] * lrow[j] + phi[g * k + j] + eta[g];
                q[g * k + j] = tv;
                lse[j] = lse[j].fmax(tv);
            }
        }
        for j in 0..k {
            let m = lse[j];
            let mut z = T::ZERO;
            for g in 0..ng {
                z += c[g] * (q[g * k + j] - m).exp_fast();
            }
            lse[j] = m + z.ln();
        }
        for g in 0..ng {
            let qg = &mut q[g * k..(g + 1) * k];
            // log of the slot values after the g update
            for j in 0..k {
                qg[j] -= lse[j];
            }
            let mu = max(qg);
            for x in qg.iter_mut() {
                *x = (*x - mu).exp_fast();
            }
            let z = sum(qg);
            eta[g] -= mu + z.ln();
            let iz = T::ONE / z;
            for x in qg.iter_mut() {
                *x *= iz;
            }
        }
    }
}

/// One plain-domain iteration over a chunk of rows with two weight groups (the SSPC default):
/// per row the g and h updates, then the row's contributions to the next column sums. Written
/// with explicit vectors: this loop is the whole cost of a call, and LLVM turns its row sums
/// into narrow shuffles.
struct PlainRowsTwo<'a, T> {
    /// The chunk's state rows (`StateLayout`): cached `E_0`, `E_1`, then `h_0`, `h_1`.
    state: &'a mut [T],
    lay: StateLayout,
    k: usize,
    /// `f_0`, `f_1` (`[2, K]`).
    f: &'a [T],
    /// `f_1 / f_0` when the layout caches `D`, else empty.
    f10: &'a [T],
    /// Slot counts `c_0`, `c_1`.
    c: [T; 2],
    /// Scratch for the chunk's slot values, `[rows, 2, K]`.
    q: &'a mut [T],
    /// The chunk's next column sums, `[2, K]`, accumulated.
    p: &'a mut [T],
    /// In the last iteration: where T goes instead of the column sums.
    output: Option<Output<'a, T>>,
}

/// The chunk's rows of `T = Σ_G t_G h_G q_G`, and their post-processing.
struct Output<'a, T> {
    rows: &'a mut [T],
    /// Number of the output's (last k) slots in each group.
    t: [T; 2],
    minmax: bool,
}

impl<T: Real> VectorOp<T> for PlainRowsTwo<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run<V: Vector<T>>(self) {
        let k = self.k;
        let lanes = V::LANES;
        let full = k - k % lanes;
        let (f0, f1) = self.f[..2 * k].split_at(k);
        let cols = ColumnScales {
            f0,
            f1,
            f10: self.f10,
        };
        if fusable::<T, V>(k) {
            let sink = match self.output {
                None => Sink::ColumnSums(&mut self.p[..2 * k]),
                Some(out) => Sink::Output(out),
            };
            if self.lay.ratio {
                fused_chunk::<T, V, true>(self.state, self.lay, cols, self.c, sink, k)
            } else {
                fused_chunk::<T, V, false>(self.state, self.lay, cols, self.c, sink, k)
            }
            return;
        }
        // Two sweeps over the chunk: first every row's g and h updates, two rows at a time so
        // that their dependency chains (division, row sums) interleave, then the column sums,
        // which need each row's new h.
        if self.lay.ratio {
            update_chunk::<T, V, true>(self.state, self.q, self.lay, cols, self.c, k)
        } else {
            update_chunk::<T, V, false>(self.state, self.q, self.lay, cols, self.c, k)
        }
        if let Some(out) = self.output {
            let rows = self.state.chunks_exact(self.lay.stride);
            let rows = rows.zip(self.q.chunks_exact(2 * k));
            for ((st, q), orow) in rows.zip(out.rows.chunks_exact_mut(k)) {
                let (q0, q1) = q.split_at(k);
                let orow = &mut orow[..k];
                orow.fill(T::ZERO);
                for (g, qg) in [q0, q1].into_iter().enumerate() {
                    if out.t[g] > T::ZERO {
                        let coef = out.t[g] * st[self.lay.h + g];
                        for j in 0..k {
                            orow[j] += coef * qg[j];
                        }
                    }
                }
                if out.minmax {
                    minmax_row(orow);
                }
            }
            return;
        }
        // Column sums p_G += Σ_rows h_G q_G, a block of columns at a time held in registers
        // (accumulating through memory would chain every row's loads on the previous stores).
        const BLOCK: usize = 4;
        let (p0, p1) = self.p[..2 * k].split_at_mut(k);
        let rows = || {
            self.state
                .chunks_exact(self.lay.stride)
                .map(|st| (st[self.lay.h], st[self.lay.h + 1]))
                .zip(self.q.chunks_exact(2 * k))
        };
        let mut j0 = 0;
        while j0 < full {
            let nv = ((full - j0) / lanes).min(BLOCK);
            let mut acc = [[V::splat(T::ZERO); BLOCK]; 2];
            for ((h0, h1), q) in rows() {
                let (vh0, vh1) = (V::splat(h0), V::splat(h1));
                // A constant trip count with a guard (not `0..nv`) keeps `acc` in registers.
                #[allow(clippy::needless_range_loop)]
                for u in 0..BLOCK {
                    if u < nv {
                        let j = j0 + u * lanes;
                        // SAFETY: q has length 2k and j + lanes <= full <= k.
                        unsafe {
                            acc[0][u] = V::load(q.as_ptr().add(j)).mul_add(vh0, acc[0][u]);
                            acc[1][u] = V::load(q.as_ptr().add(k + j)).mul_add(vh1, acc[1][u]);
                        }
                    }
                }
            }
            for (u, (a0, a1)) in acc[0].iter().zip(&acc[1]).take(nv).enumerate() {
                let j = j0 + u * lanes;
                // SAFETY: p0 and p1 have length k.
                unsafe {
                    let (pp0, pp1) = (p0.as_mut_ptr().add(j), p1.as_mut_ptr().add(j));
                    V::load(pp0).add(*a0).store(pp0);
                    V::load(pp1).add(*a1).store(pp1);
                }
            }
            j0 += nv * lanes;
        }
        for ((h0, h1), q) in rows() {
            for j in full..k {
                p0[j] += q[j] * h0;
                p1[j] += q[k + j] * h1;
            }
        }
    }
}

/// The column scalings a two-group pass reads.
#[derive(Clone, Copy)]
struct ColumnScales<'a, T> {
    f0: &'a [T],
    f1: &'a [T],
    /// `f_1 / f_0`, read only when the layout caches `D`.
    f10: &'a [T],
}

/// The g and h updates of a chunk's rows, two rows at a time so that their dependency chains
/// (division, row sums) interleave. `RATIO` is the layout's `ratio`.
#[inline(always)]
fn update_chunk<T: Real, V: Vector<T>, const RATIO: bool>(
    state: &mut [T],
    q: &mut [T],
    lay: StateLayout,
    f: ColumnScales<T>,
    c: [T; 2],
    k: usize,
) {
    const ROWS: usize = 2;
    let (stride, two_k) = (lay.stride, 2 * k);
    let mut pairs = state.chunks_exact_mut(ROWS * stride);
    let mut q_pairs = q.chunks_exact_mut(ROWS * two_k);
    for (st, q) in (&mut pairs).zip(&mut q_pairs) {
        let mut st = st.chunks_exact_mut(stride);
        let mut q = q.chunks_exact_mut(two_k);
        let st: [&mut [T]; ROWS] = std::array::from_fn(|_| st.next().unwrap());
        let q: [&mut [T]; ROWS] = std::array::from_fn(|_| q.next().unwrap());
        update_rows::<T, V, ROWS, RATIO>(st, q, f, c, lay.h, k);
    }
    let rest = pairs.into_remainder().chunks_exact_mut(stride);
    for (st, q) in rest.zip(q_pairs.into_remainder().chunks_exact_mut(two_k)) {
        update_rows::<T, V, 1, RATIO>([st], [q], f, c, lay.h, k);
    }
}

/// The slot values `y_G = E_G f_G g` (after the g update) of lanes `j..j + LANES` of a row
/// whose cache `e` holds `[E_0, E_1]`, or `[D]` with `RATIO`, and `hs = [c_0 h_0, c_1 h_1]`.
///
/// # Safety
/// `e[0]` and `f10` (with `RATIO`) or `e[0]`, `e[1]`, `f0`, `f1` (without) hold at least
/// `j + LANES` values.
#[inline(always)]
unsafe fn slot_values<T: Real, V: Vector<T>, const RATIO: bool>(
    e: [&[T]; 2],
    f0: &[T],
    f1: &[T],
    f10: &[T],
    hs: [T; 2],
    j: usize,
) -> (V, V) {
    if !RATIO {
        let v0 = V::load(e[0].as_ptr().add(j)).mul(V::load(f0.as_ptr().add(j)));
        let v1 = V::load(e[1].as_ptr().add(j)).mul(V::load(f1.as_ptr().add(j)));
        let den = V::splat(hs[1]).mul_add(v1, V::splat(hs[0]).mul(v0));
        let gi = den.recip();
        (v0.mul(gi), v1.mul(gi))
    } else {
        // y_0 = v_0 / (a v_0 + b v_1) = 1 / (a + b ρ) with ρ = v_1 / v_0 = D f_1 / f_0.
        let rho = V::load(e[0].as_ptr().add(j)).mul(V::load(f10.as_ptr().add(j)));
        let y0 = V::splat(hs[1]).mul_add(rho, V::splat(hs[0])).recip();
        (y0, rho.mul(y0))
    }
}

/// Whether rows of `k` values take [`fused_chunk`]: whole vectors, at most four of them.
#[inline(always)]
fn fusable<T: Real, V: Vector<T>>(k: usize) -> bool {
    k.is_multiple_of(V::LANES) && k / V::LANES <= 4
}

/// Where a single-sweep pass puts each row's slot values after its h update.
enum Sink<'a, T> {
    /// Added to the column sums `p` (`[2, K]`).
    ColumnSums(&'a mut [T]),
    /// The last pass: the chunk's rows of the result.
    Output(Output<'a, T>),
}

/// One pass over a chunk's rows in a single sweep, for [`fusable`] rows (SSPC's K = 64 in f32
/// with AVX-512): a row's slot values stay in registers while its new `h` is formed, and go
/// straight into the column sums or the result row, instead of through a scratch that a second
/// sweep reads back. Bitwise the same sums and results as the two sweeps.
#[inline(always)]
fn fused_chunk<T: Real, V: Vector<T>, const RATIO: bool>(
    state: &mut [T],
    lay: StateLayout,
    f: ColumnScales<T>,
    c: [T; 2],
    sink: Sink<T>,
    k: usize,
) {
    match k / V::LANES {
        1 => fused_rows::<T, V, RATIO, 1>(state, lay, f, c, sink, k),
        2 => fused_rows::<T, V, RATIO, 2>(state, lay, f, c, sink, k),
        3 => fused_rows::<T, V, RATIO, 3>(state, lay, f, c, sink, k),
        4 => fused_rows::<T, V, RATIO, 4>(state, lay, f, c, sink, k),
        _ => unreachable!("fused_chunk takes rows of one to four vectors"),
    }
}

/// The rows of [`fused_chunk`]. Into column sums two at a time: a row's reductions and
/// `1 / row sum` wait on a long dependency chain, and the slot values of an independent row
/// fill it.
#[inline(always)]
fn fused_rows<T: Real, V: Vector<T>, const RATIO: bool, const NV: usize>(
    state: &mut [T],
    lay: StateLayout,
    f: ColumnScales<T>,
    c: [T; 2],
    sink: Sink<T>,
    k: usize,
) {
    let f = ColumnScales {
        f0: &f.f0[..k],
        f1: &f.f1[..k],
        f10: if RATIO { &f.f10[..k] } else { f.f10 },
    };
    let p = match sink {
        Sink::ColumnSums(p) => p,
        Sink::Output(Output { rows, t, minmax }) => {
            let paired = state.len() / lay.stride / 2 * 2;
            let (state, st_rest) = state.split_at_mut(paired * lay.stride);
            let (rows, o_rest) = rows.split_at_mut(paired * k);
            let pairs = state
                .chunks_exact_mut(2 * lay.stride)
                .zip(rows.chunks_exact_mut(2 * k));
            for (pair, orows) in pairs {
                let (a, b) = pair.split_at_mut(lay.stride);
                let (oa, ob) = orows.split_at_mut(k);
                let (ya, yb) = (
                    row_slots::<T, V, RATIO, NV>(a, lay, f, c, k),
                    row_slots::<T, V, RATIO, NV>(b, lay, f, c, k),
                );
                let [sa, sb] = pair_sums(&ya.1, &yb.1);
                output_row(&mut a[lay.h..lay.h + 2], ya.0, sa, t, minmax, oa);
                output_row(&mut b[lay.h..lay.h + 2], yb.0, sb, t, minmax, ob);
            }
            let rest = st_rest
                .chunks_exact_mut(lay.stride)
                .zip(o_rest.chunks_exact_mut(k));
            for (st, orow) in rest {
                let (y, rowsum) = row_slots::<T, V, RATIO, NV>(st, lay, f, c, k);
                let sums = rowsum.map(V::sum);
                output_row(&mut st[lay.h..lay.h + 2], y, sums, t, minmax, orow);
            }
            return;
        }
    };
    let mut acc = [[V::splat(T::ZERO); NV]; 2];
    let mut pairs = state.chunks_exact_mut(2 * lay.stride);
    for pair in &mut pairs {
        let (a, b) = pair.split_at_mut(lay.stride);
        let (ya, yb) = (
            row_slots::<T, V, RATIO, NV>(a, lay, f, c, k),
            row_slots::<T, V, RATIO, NV>(b, lay, f, c, k),
        );
        let [sa, sb] = pair_sums(&ya.1, &yb.1);
        finish_row(&mut a[lay.h..lay.h + 2], ya.0, sa, &mut acc);
        finish_row(&mut b[lay.h..lay.h + 2], yb.0, sb, &mut acc);
    }
    for st in pairs.into_remainder().chunks_exact_mut(lay.stride) {
        let (y, rowsum) = row_slots::<T, V, RATIO, NV>(st, lay, f, c, k);
        finish_row(&mut st[lay.h..lay.h + 2], y, rowsum.map(V::sum), &mut acc);
    }
    for (g, pg) in p.chunks_exact_mut(k).enumerate() {
        for (u, a) in acc[g].iter().enumerate() {
            // SAFETY: pg holds k = NV * LANES values.
            unsafe {
                let at = pg.as_mut_ptr().add(u * V::LANES);
                V::load(at).add(*a).store(at);
            }
        }
    }
}

/// A row's slot values `y_G` after the g update (`NV` vectors per group, in registers) and
/// their lane-wise row sums.
#[inline(always)]
fn row_slots<T: Real, V: Vector<T>, const RATIO: bool, const NV: usize>(
    st: &[T],
    lay: StateLayout,
    f: ColumnScales<T>,
    c: [T; 2],
    k: usize,
) -> ([[V; NV]; 2], [V; 2]) {
    let cache = &st[..lay.h];
    let e = [
        &cache[..k],
        if RATIO { &cache[..k] } else { &cache[k..2 * k] },
    ];
    let hs = [c[0] * st[lay.h], c[1] * st[lay.h + 1]];
    let mut y = [[V::splat(T::ZERO); NV]; 2];
    let mut rowsum = [V::splat(T::ZERO); 2];
    let [y_0, y_1] = &mut y;
    for (u, (y0, y1)) in y_0.iter_mut().zip(y_1).enumerate() {
        // SAFETY: every slice read holds k = NV * LANES values.
        (*y0, *y1) = unsafe { slot_values::<T, V, RATIO>(e, f.f0, f.f1, f.f10, hs, u * V::LANES) };
        rowsum[0] = rowsum[0].add(*y0);
        rowsum[1] = rowsum[1].add(*y1);
    }
    (y, rowsum)
}

/// The row sums `[[Σ y_0, Σ y_1]; 2]` of a pair of rows from their lane-wise sums, in one
/// reduction tree. Every pass pairs rows the same way, from the start of each chunk.
#[inline(always)]
fn pair_sums<T: Real, V: Vector<T>>(a: &[V; 2], b: &[V; 2]) -> [[T; 2]; 2] {
    let [a0, a1, b0, b1] = V::sum4([a[0], a[1], b[0], b[1]]);
    [[a0, a1], [b0, b1]]
}

/// Sets a row's new `h_G = 1 / Σ_a E f g` (`sums` holds the two row sums) and adds its slot
/// values after the h update, `y_G · h_G`, to the column sums `acc`.
#[inline(always)]
fn finish_row<T: Real, V: Vector<T>, const NV: usize>(
    h: &mut [T],
    y: [[V; NV]; 2],
    sums: [T; 2],
    acc: &mut [[V; NV]; 2],
) {
    for g in 0..2 {
        h[g] = T::ONE / sums[g];
        let hv = V::splat(h[g]);
        for (a, yv) in acc[g].iter_mut().zip(&y[g]) {
            *a = yv.mul_add(hv, *a);
        }
    }
}

/// The last pass's [`finish_row`]: sets the row's new `h_G` and writes its result
/// `T = Σ_G t_G h_G y_G` (the same products and sums as the two-sweep output), min-maxed.
#[inline(always)]
fn output_row<T: Real, V: Vector<T>, const NV: usize>(
    h: &mut [T],
    y: [[V; NV]; 2],
    sums: [T; 2],
    t: [T; 2],
    minmax: bool,
    orow: &mut [T],
) {
    let mut o = [V::splat(T::ZERO); NV];
    for g in 0..2 {
        h[g] = T::ONE / sums[g];
        if t[g] > T::ZERO {
            let coef = V::splat(t[g] * h[g]);
            for (ov, yv) in o.iter_mut().zip(&y[g]) {
                *ov = ov.add(coef.mul(*yv));
            }
        }
    }
    if minmax {
        // minmax_row on the registers: the same (x - lo) / (hi - lo), and zeros for a constant row.
        let (lo, hi) = o[1..]
            .iter()
            .fold((o[0], o[0]), |(l, h), v| (l.min(*v), h.max(*v)));
        let (lo, hi) = (lo.reduce_min(), hi.reduce_max());
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        let degenerate = !(hi > lo);
        let (l, d) = (V::splat(lo), V::splat(hi - lo));
        for ov in &mut o {
            *ov = if degenerate {
                V::splat(T::ZERO)
            } else {
                ov.sub(l).div(d)
            };
        }
    }
    let orow = &mut orow[..NV * V::LANES];
    for (u, ov) in o.iter().enumerate() {
        // SAFETY: orow holds NV * LANES values.
        unsafe { ov.store(orow.as_mut_ptr().add(u * V::LANES)) };
    }
}

/// The g and h updates of `R` rows with two weight groups: writes each row's slot values
/// `q_G = E_G f_G g` (`[2, K]`, without the old `h_G` factor) and its new `h_G = 1 / Σ_a q_G`.
/// `states[r]` is the row's state block (cached `E_0`, `E_1`, or `D` with `RATIO`, and `h_0`,
/// `h_1` at `h_at`).
#[inline(always)]
fn update_rows<T: Real, V: Vector<T>, const R: usize, const RATIO: bool>(
    states: [&mut [T]; R],
    qs: [&mut [T]; R],
    f: ColumnScales<T>,
    c: [T; 2],
    h_at: usize,
    k: usize,
) {
    let lanes = V::LANES;
    let full = k - k % lanes;
    let (f0, f1) = (&f.f0[..k], &f.f1[..k]);
    let f10 = if RATIO { &f.f10[..k] } else { f.f10 };
    let mut rows = states.map(|st| {
        let (cache, h) = st.split_at_mut(h_at);
        (&*cache, h)
    });
    // With RATIO the second slice is a stand-in that is never read.
    let e: [[&[T]; 2]; R] = std::array::from_fn(|r| {
        let cache = rows[r].0;
        [
            &cache[..k],
            if RATIO { &cache[..k] } else { &cache[k..2 * k] },
        ]
    });
    let hs: [[T; 2]; R] = std::array::from_fn(|r| [c[0] * rows[r].1[0], c[1] * rows[r].1[1]]);
    for q in &qs {
        assert!(q.len() >= 2 * k);
    }
    let mut acc = [[V::splat(T::ZERO); 2]; R];
    let mut j = 0;
    while j < full {
        for r in 0..R {
            // SAFETY: e[r][g] and f0, f1 have length k, qs[r] at least 2k, j + lanes <= k.
            unsafe {
                let (y0, y1) = slot_values::<T, V, RATIO>(e[r], f0, f1, f10, hs[r], j);
                y0.store(qs[r].as_mut_ptr().add(j));
                y1.store(qs[r].as_mut_ptr().add(k + j));
                acc[r][0] = acc[r][0].add(y0);
                acc[r][1] = acc[r][1].add(y1);
            }
        }
        j += lanes;
    }
    // Pairs are summed as the single-sweep passes sum them, so both give the same bits.
    let sums: [[T; 2]; R] = if R == 2 {
        let [a, b] = pair_sums(&acc[0], &acc[1]);
        std::array::from_fn(|r| [a, b][r])
    } else {
        std::array::from_fn(|r| acc[r].map(V::sum))
    };
    for r in 0..R {
        let [mut s0, mut s1] = sums[r];
        let (q0, q1) = qs[r].split_at_mut(k);
        for j in full..k {
            // The same formula one lane wide. SAFETY: every slice read holds k > j values.
            let (y0, y1) =
                unsafe { slot_values::<T, T::Single, RATIO>(e[r], f0, f1, f10, hs[r], j) };
            (q0[j], q1[j]) = (y0.sum(), y1.sum());
            s0 += q0[j];
            s1 += q1[j];
        }
        // The new h is 1 / Σ_a E f g; the slot values after the h update are q · h_new.
        let h = &mut rows[r].1;
        h[0] = T::ONE / s0;
        h[1] = T::ONE / s1;
    }
}

/// Plain-domain g and h updates of one row for a compile-time group count, in one pass over the
/// anchors (the generic path makes six). Writes `q_G = E_G f_G g` (the slot values after the g
/// update, without the old `h_G` factor) and `inv[g] = 1 / Σ_a q_G`, which is the new `h_G`;
/// the slot values after the h update are `q_G · inv[g]`. Always returns true.
#[inline(always)]
fn plain_row_fused<T: Real, const NG: usize>(
    cache: &[T],
    f: &[T],
    c: &[T],
    h: &[T],
    q: &mut [T],
    inv: &mut [T],
) -> bool {
    let k = f.len() / NG;
    let ch: [T; NG] = std::array::from_fn(|g| c[g] * h[g]);
    // Every slice is cut to exactly k so that the loop below carries no bounds checks and
    // vectorises at the full register width.
    let e: [&[T]; NG] = std::array::from_fn(|g| &cache[g * k..][..k]);
    let fs: [&[T]; NG] = std::array::from_fn(|g| &f[g * k..][..k]);
    let mut qs = q[..NG * k].chunks_exact_mut(k);
    let qs: [&mut [T]; NG] = std::array::from_fn(|_| qs.next().unwrap());
    for j in 0..k {
        let mut den = T::ZERO;
        for g in 0..NG {
            den += ch[g] * (e[g][j] * fs[g][j]);
        }
        let gi = T::ONE / den;
        for g in 0..NG {
            qs[g][j] = e[g][j] * fs[g][j] * gi;
        }
    }
    for g in 0..NG {
        inv[g] = T::ONE / sum(qs[g]);
    }
    true
}

/// `(x - min) / (max - min)` per row; a constant row becomes all zeros. Inlined so that it is
/// compiled with the caller's vector width (out of line it ran as SSE2 code).
#[allow(clippy::neg_cmp_op_on_partial_ord)]
#[inline(always)]
fn minmax_row<T: Real>(row: &mut [T]) {
    let (lo, hi) = extremes(row);
    // Written as `!(hi > lo)` so that a degenerate row can never reach the division.
    if !(hi > lo) {
        row.fill(T::ZERO);
        return;
    }
    let d = hi - lo;
    for x in row.iter_mut() {
        *x = (*x - lo) / d;
    }
}

/// Potentials of every iteration of one problem, recorded by the backward's forward replay:
/// `row[t]` is `[N, G]` holding `h_G` (or `log h_G`) after iteration `t` (`t = 0` is the start),
/// `col[t-1]` is `[G, K]` holding `f_G` (or `log f_G`) of iteration `t`.
#[derive(Default)]
struct History<T> {
    row: Vec<T>,
    col: Vec<T>,
}

/// The exact vector-Jacobian product of [`multi_sinkhorn`] with respect to `scores`, through
/// the unrolled iteration and the min-max step (DESIGN.md §2.4).
///
/// In log form, with `L_G = w_G S / eps`, iteration `t` is
/// `φ_G = log r − LSE_n(L_G + γ + η_G)`, `γ = −log Σ_G c_G exp(L_G + φ_G + η_G)`,
/// `η_G = −LSE_a(L_G + γ + φ_G)`, with the plans `A_G`, `B_G`, `C_G` after each step. Each
/// step's adjoint is its input adjoint times minus the (c-weighted) softmax, i.e. the plan of
/// that step. The forward is replayed once, recording `f_G` and `h_G` per iteration
/// (`O(T·G·(N + K))`); `g` is recomputed per row. Reverse pass `t` does, for each row: the `f`
/// step of iteration `t + 1` (needs the finished column adjoint `φ̄^{t+1}`), then the `h` and `g`
/// steps of iteration `t`, which are row-local and yield the column partials of `φ̄^t`. That is
/// `T + 1` streaming passes. Min-max ties share the gradient equally, as `torch.amax` does.
pub fn multi_sinkhorn_backward<T: Real>(
    grad: &[T],
    scores: &[T],
    anchor_mass: &[T],
    out: &mut [T],
    dims: Dims,
    params: &MultiSinkhornParams,
) -> Result<bool> {
    let (b, n, kk) = (dims.problems, dims.rows, dims.cols);
    check_args(scores, anchor_mass, out, dims, params)?;
    check_len("grad", grad.len(), dims.len(), &dims.describe())?;
    let groups = Groups::<T>::new(&params.slot_weights, params.k);
    if b * n == 0 {
        return Ok(use_log_domain::<T>(params.log_domain, 0.0));
    }
    let mut cmax = vec![T::ZERO; b * kk];
    let range = batch_col_stats(scores, b, n, kk, &mut cmax).0 * groups.w_max / params.eps;
    let log = use_log_domain::<T>(params.log_domain, range);
    if groups.w.len() == 1 {
        // One group: g makes every slot value 1/c, so T = t/K whatever the scores.
        out.fill(T::ZERO);
        return Ok(log);
    }
    let p = Problem {
        n,
        k: kk,
        inv_eps: T::from_f64(1.0 / params.eps),
        n_iters: params.n_iters,
        normalize: params.normalize,
        g: groups,
    };
    out.par_chunks_mut(n * kk)
        .zip(grad.par_chunks(n * kk))
        .zip(scores.par_chunks(n * kk))
        .zip(anchor_mass.par_chunks(kk))
        .zip(cmax.par_chunks(kk))
        .for_each_init(
            Spare::<BackWorkspace<T>>::take,
            |bw, ((((o, gr), s), r), cm)| p.backward(gr, s, r, cm, o, bw, log),
        );
    Ok(log)
}

#[derive(Default)]
struct BackWorkspace<T> {
    fwd: Workspace<T>,
    hist: History<T>,
    /// `φ̄_G / r` of the last finished pass and `ρ_G = f_G^{t+1} / f_G^t`, both `[G, K]`.
    phr: Vec<T>,
    rho: Vec<T>,
}

impl<T: Real> Footprint for BackWorkspace<T> {
    fn bytes(&self) -> usize {
        let BackWorkspace {
            fwd,
            hist,
            phr,
            rho,
        } = self;
        fwd.bytes()
            + [&hist.row, &hist.col, phr, rho]
                .into_iter()
                .map(vec_bytes)
                .sum::<usize>()
    }
}

impl<T: Real> Problem<T> {
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        grad: &[T],
        s: &[T],
        r: &[T],
        cmax: &[T],
        out: &mut [T],
        bw: &mut BackWorkspace<T>,
        log: bool,
    ) {
        let (n, k, inv_eps, iters) = (self.n, self.k, self.inv_eps, self.n_iters);
        let ng = self.g.w.len();
        let gk = ng * k;
        let (w, c, tc) = (&self.g.w[..], &self.g.c[..], &self.g.t[..]);
        let BackWorkspace {
            fwd,
            hist,
            phr,
            rho,
        } = bw;
        // The replay writes T into `out`, which the sweep then overwrites row by row.
        self.solve(s, r, cmax, out, fwd, log, Some(hist));
        let lay = StateLayout::new::<T>(log, ng, gk, false);
        let (sw, ho) = (lay.stride, lay.h);
        let rpc = lay.rows_per_chunk(n, k);
        let nch = n_chunks(n, rpc);
        let Workspace {
            state,
            partials,
            acc,
            scratch,
            ..
        } = fwd;
        let state = aligned_view(state, n * sw);
        let hist: &History<T> = hist;
        phr.clear();
        phr.resize(gk, T::ZERO);
        rho.clear();
        rho.resize(gk, T::ZERO);
        let minmax = self.normalize == Normalize::MinMax;
        let wg: Vec<T> = w.iter().map(|&x| x * inv_eps).collect();
        let wg = &wg[..];

        // Row values of iteration t: B_G (after the g step) and C_G (after the h step).
        // `st` is the row's state block (its cached E_G in the plain domain).
        let recompute =
            |t: usize, row: usize, st: &[T], bm: &mut [T], cm: &mut [T], lrow: &mut [T]| {
                let f = &hist.col[(t - 1) * gk..t * gk];
                let h0 = &hist.row[((t - 1) * n + row) * ng..((t - 1) * n + row + 1) * ng];
                let h1 = &hist.row[(t * n + row) * ng..(t * n + row + 1) * ng];
                if log {
                    let srow = &s[row * k..(row + 1) * k];
                    for j in 0..k {
                        lrow[j] = (srow[j] - cmax[j]) * inv_eps;
                    }
                    // bm = arg_G, then the running max in cm[..k] ... reuse cm as scratch for arg.
                    let (mx, den) = lrow_split(cm, k);
                    mx.fill(T::NEG_INFINITY);
                    for g in 0..ng {
                        for j in 0..k {
                            let a = w[g] * lrow[j] + f[g * k + j] + h0[g];
                            bm[g * k + j] = a;
                            mx[j] = mx[j].fmax(a);
                        }
                    }
                    den.fill(T::ZERO);
                    for g in 0..ng {
                        for j in 0..k {
                            den[j] += c[g] * (bm[g * k + j] - mx[j]).exp_fast();
                        }
                    }
                    // lrow <- m + log den = -γ
                    for j in 0..k {
                        lrow[j] = mx[j] + den[j].ln();
                    }
                    for g in 0..ng {
                        let d = h1[g] - h0[g];
                        for j in 0..k {
                            let a = bm[g * k + j] - lrow[j];
                            bm[g * k + j] = a.exp_fast();
                            cm[g * k + j] = (a + d).exp_fast();
                        }
                    }
                } else {
                    let e = &st[..gk];
                    lrow.fill(T::ZERO);
                    for g in 0..ng {
                        let ch = c[g] * h0[g];
                        for j in 0..k {
                            let v = e[g * k + j] * f[g * k + j];
                            bm[g * k + j] = v;
                            lrow[j] += ch * v;
                        }
                    }
                    for x in lrow.iter_mut() {
                        *x = T::ONE / *x;
                    }
                    for g in 0..ng {
                        for j in 0..k {
                            let v = bm[g * k + j] * lrow[j];
                            bm[g * k + j] = v * h0[g];
                            cm[g * k + j] = v * h1[g];
                        }
                    }
                }
            };

        // scratch: B [G K] | C [G K] | D [G K] | γ̄ [K] | lrow [K] | gup [K]
        let scr_len = 3 * gk + 3 * k;
        for t in (0..=iters).rev() {
            let top = t == iters;
            let (phr_r, rho_r): (&[T], &[T]) = (phr, rho);
            run_pass(
                n,
                rpc,
                state,
                sw,
                out,
                k,
                partials,
                gk,
                scratch,
                scr_len,
                #[inline(always)]
                |rows, st, o, part, scr| {
                    part.fill(T::ZERO);
                    let (bm, rest) = scr.split_at_mut(gk);
                    let (cm, rest) = rest.split_at_mut(gk);
                    let (dm, rest) = rest.split_at_mut(gk);
                    let (gb, rest) = rest.split_at_mut(k);
                    let (lrow, gup) = rest.split_at_mut(k);
                    let mut eb = [T::ZERO; MAX_STACK_GROUPS];
                    let mut eb_heap = Vec::new();
                    let eb: &mut [T] = if ng <= MAX_STACK_GROUPS {
                        &mut eb[..ng]
                    } else {
                        eb_heap.resize(ng, T::ZERO);
                        &mut eb_heap
                    };
                    for (i, row) in rows.enumerate() {
                        let st = &mut st[i * sw..(i + 1) * sw];
                        let orow = &mut o[i * k..(i + 1) * k];
                        if t == 0 {
                            // f step of iteration 1: A_G = E_G f_G^1 (g = h = 1).
                            let f1 = &hist.col[..gk];
                            if log {
                                let srow = &s[row * k..(row + 1) * k];
                                for j in 0..k {
                                    lrow[j] = (srow[j] - cmax[j]) * inv_eps;
                                }
                            }
                            for g in 0..ng {
                                for j in 0..k {
                                    let a = if log {
                                        (w[g] * lrow[j] + f1[g * k + j]).exp_fast()
                                    } else {
                                        st[g * k + j] * f1[g * k + j]
                                    };
                                    orow[j] -= wg[g] * phr_r[g * k + j] * a;
                                }
                            }
                            continue;
                        }
                        recompute(t, row, st, bm, cm, lrow);
                        gb.fill(T::ZERO);
                        if top {
                            // The output T = Σ_G t_G C_G and its adjoint (through min-max).
                            let grow = &grad[row * k..(row + 1) * k];
                            gup.copy_from_slice(grow);
                            if minmax {
                                lrow.fill(T::ZERO);
                                for g in 0..ng {
                                    if tc[g] > T::ZERO {
                                        for j in 0..k {
                                            lrow[j] += tc[g] * cm[g * k + j];
                                        }
                                    }
                                }
                                minmax_row_backward(lrow, gup);
                            }
                            for g in 0..ng {
                                let mut se = T::ZERO;
                                for j in 0..k {
                                    let x = tc[g] * gup[j] * cm[g * k + j];
                                    dm[g * k + j] = x;
                                    part[g * k + j] += x;
                                    gb[j] += x;
                                    se += x;
                                }
                                eb[g] = se;
                            }
                            orow.fill(T::ZERO);
                        } else {
                            // f step of iteration t + 1: V_G = −(φ̄_G / r) C_G ρ_G.
                            for g in 0..ng {
                                let mut se = T::ZERO;
                                for j in 0..k {
                                    let v = -phr_r[g * k + j] * cm[g * k + j] * rho_r[g * k + j];
                                    dm[g * k + j] = v;
                                    gb[j] += v;
                                    se += v;
                                }
                                eb[g] = st[ho + g] + se;
                            }
                        }
                        // h step of iteration t: Z_G = −η̄_G C_G.
                        for g in 0..ng {
                            let e = eb[g];
                            for j in 0..k {
                                let z = -e * cm[g * k + j];
                                dm[g * k + j] += z;
                                part[g * k + j] += z;
                                gb[j] += z;
                            }
                        }
                        // g step of iteration t: W_G = −γ̄ c_G B_G; its row sums feed η̄^{t−1}.
                        for g in 0..ng {
                            let mut se = T::ZERO;
                            for j in 0..k {
                                let x = -gb[j] * c[g] * bm[g * k + j];
                                dm[g * k + j] += x;
                                part[g * k + j] += x;
                                se += x;
                            }
                            st[ho + g] = se;
                        }
                        for g in 0..ng {
                            for j in 0..k {
                                orow[j] += wg[g] * dm[g * k + j];
                            }
                        }
                    }
                },
            );
            if t > 0 {
                reduce_partials(partials, nch, acc);
                for g in 0..ng {
                    for j in 0..k {
                        phr[g * k + j] = acc[g * k + j] / r[j];
                    }
                }
                if t >= 2 {
                    let f1 = &hist.col[(t - 1) * gk..t * gk];
                    let f0 = &hist.col[(t - 2) * gk..(t - 1) * gk];
                    for x in 0..gk {
                        rho[x] = if log {
                            (f1[x] - f0[x]).exp_fast()
                        } else {
                            f1[x] / f0[x]
                        };
                    }
                }
            }
        }
    }
}

#[inline(always)]
fn lrow_split<T>(buf: &mut [T], k: usize) -> (&mut [T], &mut [T]) {
    let (a, b) = buf.split_at_mut(k);
    (a, &mut b[..k])
}

/// Adjoint of [`minmax_row`]: `x` holds the row before min-max, `g` the output's adjoint and
/// receives the input's. Ties at the min or max share their part equally (as `torch.amin`).
#[allow(clippy::neg_cmp_op_on_partial_ord)]
fn minmax_row_backward<T: Real>(x: &[T], g: &mut [T]) {
    let (lo, hi) = extremes(x);
    if !(hi > lo) {
        g.fill(T::ZERO);
        return;
    }
    let inv = T::ONE / (hi - lo);
    let (mut glo, mut ghi) = (T::ZERO, T::ZERO);
    let (mut nlo, mut nhi) = (T::ZERO, T::ZERO);
    for (xj, gj) in x.iter().zip(g.iter()) {
        let y = (*xj - lo) * inv;
        glo += *gj * (y - T::ONE);
        ghi -= *gj * y;
        if *xj == lo {
            nlo += T::ONE;
        }
        if *xj == hi {
            nhi += T::ONE;
        }
    }
    let (glo, ghi) = (glo * inv / nlo, ghi * inv / nhi);
    for (xj, gj) in x.iter().zip(g.iter_mut()) {
        let mut v = *gj * inv;
        if *xj == lo {
            v += glo;
        }
        if *xj == hi {
            v += ghi;
        }
        *gj = v;
    }
}

#[path = "multi_sinkhorn_small.rs"]
mod small;
