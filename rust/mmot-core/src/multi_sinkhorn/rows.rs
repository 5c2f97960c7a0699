//! Row updates for any number of groups, in either domain: pass 0's rows, and the iteration
//! rows that do not take the two-group SIMD path (the log domain, or G other than 2).

use super::forward::Sweep;
use super::{Inputs, Normalize, Problem};
use crate::simd::{extremes, max, sum, Real};
use std::ops::Range;

/// Groups whose per-row scalars live on the stack (the default SSPC weights make 2 groups).
const MAX_STACK_GROUPS: usize = 8;

/// One value per group, on the stack for up to [`MAX_STACK_GROUPS`] groups.
pub(super) struct PerGroup<T> {
    stack: [T; MAX_STACK_GROUPS],
    heap: Vec<T>,
    len: usize,
}

impl<T: Real> PerGroup<T> {
    pub fn new(len: usize) -> Self {
        let heap = if len > MAX_STACK_GROUPS {
            vec![T::ZERO; len]
        } else {
            Vec::new()
        };
        PerGroup {
            stack: [T::ZERO; MAX_STACK_GROUPS],
            heap,
            len,
        }
    }

    #[inline(always)]
    pub fn values(&mut self) -> &mut [T] {
        if self.len <= MAX_STACK_GROUPS {
            &mut self.stack[..self.len]
        } else {
            &mut self.heap
        }
    }
}

/// Pass 0 over a chunk of rows (`g = h = 1`): adds each row's `E_G` to `col_sums` (`[G, K]`)
/// and starts its `h_G` at 1 (log domain: `log h_G` at 0). The plain domain caches `E_G`, or
/// `D = E_1 / E_0` in the ratio layout. `logits` is scratch of length K.
#[inline(always)]
pub(super) fn pass_zero_chunk<T: Real>(
    sweep: &Sweep<T>,
    rows: Range<usize>,
    state: &mut [T],
    col_sums: &mut [T],
    logits: &mut [T],
) {
    let problem = sweep.problem;
    let (k, n_groups, layout) = (problem.anchors, problem.groups.len(), sweep.layout);
    let weights = &problem.groups.weights[..];
    // Re-sliced to exact lengths so that the loops carry no bounds checks.
    let (col_sums, logits) = (&mut col_sums[..n_groups * k], &mut logits[..k]);
    col_sums.fill(T::ZERO);
    for (i, row) in rows.enumerate() {
        problem.logits(sweep.input, row, logits);
        let row_state = &mut state[i * layout.stride..(i + 1) * layout.stride];
        let (cache, h) = row_state.split_at_mut(layout.scalars_at);
        let h = &mut h[..n_groups];
        if layout.ratio {
            h.fill(T::ONE);
            let (sums0, sums1) = col_sums.split_at_mut(k);
            let d = &mut cache[..k];
            match sweep.ratio_power {
                Some(1) => ratio_row::<T, 1>(logits, weights, d, sums0, sums1),
                Some(2) => ratio_row::<T, 2>(logits, weights, d, sums0, sums1),
                Some(3) => ratio_row::<T, 3>(logits, weights, d, sums0, sums1),
                _ => ratio_row::<T, 0>(logits, weights, d, sums0, sums1),
            }
            continue;
        }
        for g in 0..n_groups {
            let sums = &mut col_sums[g * k..(g + 1) * k];
            let w = weights[g];
            if sweep.log {
                h[g] = T::ZERO;
                for j in 0..k {
                    sums[j] += (w * logits[j]).exp_fast();
                }
            } else {
                h[g] = T::ONE;
                let e = &mut cache[g * k..(g + 1) * k];
                for j in 0..k {
                    let v = (w * logits[j]).exp_fast();
                    e[j] = v;
                    sums[j] += v;
                }
            }
        }
    }
}

/// Pass 0 of a row in the ratio layout: `E_0 = exp(w_0 L)` and `D = exp((w_1 - w_0) L)`, the
/// latter as `E_0^M` for `M` in 1..=3 (`M = 0`: by `exp`); caches `D` and adds `E_0` and
/// `E_1 = E_0 D` to the column sums `sums0`, `sums1`.
#[inline(always)]
fn ratio_row<T: Real, const M: usize>(
    logits: &[T],
    weights: &[T],
    d: &mut [T],
    sums0: &mut [T],
    sums1: &mut [T],
) {
    let k = logits.len();
    let (d, sums0, sums1) = (&mut d[..k], &mut sums0[..k], &mut sums1[..k]);
    let (w0, dw) = (weights[0], weights[1] - weights[0]);
    for j in 0..k {
        let e0 = (w0 * logits[j]).exp_fast();
        d[j] = match M {
            1 => e0,
            2 => e0 * e0,
            3 => e0 * e0 * e0,
            _ => (dw * logits[j]).exp_fast(),
        };
        sums0[j] += e0;
        sums1[j] += e0 * d[j];
    }
}

/// An iteration pass over rows for any group count, in either domain (two plain groups take
/// `two_groups` instead).
#[derive(Clone, Copy)]
pub(super) struct GeneralPass<'a, T> {
    pub sweep: Sweep<'a, T>,
    /// `f_G` (plain) or `log f_G` (log), `[G, K]`.
    pub f: &'a [T],
    /// Whether this pass writes the result rather than column sums.
    pub last: bool,
}

/// One row's working values in a [`GeneralPass`].
struct RowScratch<'s, T> {
    /// `[G, K]`: the slot values.
    slots: &'s mut [T],
    /// `[K]`: the `g` step's `1 / Σ_G c_G h_G E_G f_G`, or a running max.
    denom: &'s mut [T],
    /// `[K]`: the row's `L = (S - colmax) / eps`.
    logits: &'s mut [T],
    /// `[G]`: `1 / Σ_a q_G`, the `h` step's factor.
    inv_row_sums: &'s mut [T],
}

impl<T: Real> GeneralPass<'_, T> {
    /// The pass over one chunk: `state` holds its rows' state blocks, `out` its rows of the
    /// result, `col_sums` (zeroed) its `[G, K]` column sums; `scratch` holds `[G, K] + 2 K`.
    #[inline(always)]
    pub fn chunk(
        &self,
        rows: Range<usize>,
        state: &mut [T],
        out: &mut [T],
        col_sums: &mut [T],
        scratch: &mut [T],
    ) {
        let problem = self.sweep.problem;
        let (k, n_groups, layout) = (problem.anchors, problem.groups.len(), self.sweep.layout);
        let (slots, rest) = scratch.split_at_mut(n_groups * k);
        let (denom, logits) = rest.split_at_mut(k);
        let mut inv_row_sums = PerGroup::new(n_groups);
        let mut scratch = RowScratch {
            slots,
            denom,
            logits,
            inv_row_sums: inv_row_sums.values(),
        };
        let minmax = problem.normalize == Normalize::MinMax;
        for (i, row) in rows.enumerate() {
            let row_state = &mut state[i * layout.stride..(i + 1) * layout.stride];
            let (cache, h) = row_state.split_at_mut(layout.scalars_at);
            self.update_row(row, cache, &mut h[..n_groups], &mut scratch);
            let (slots, inv) = (&*scratch.slots, &*scratch.inv_row_sums);
            if self.last {
                let out_row = &mut out[i * k..(i + 1) * k];
                result_row(slots, inv, &problem.groups.top_counts, out_row);
                if minmax {
                    minmax_row(out_row);
                }
            } else {
                for (g, (sums, q)) in col_sums
                    .chunks_exact_mut(k)
                    .zip(slots.chunks_exact(k))
                    .enumerate()
                {
                    let ig = inv[g];
                    for j in 0..k {
                        sums[j] += q[j] * ig;
                    }
                }
            }
        }
    }

    /// The `g` and `h` steps of one row: leaves in `scratch.slots` the slot values `q_G` that,
    /// times `scratch.inv_row_sums[G]`, are the slot values after the `h` step, and updates the
    /// row's `h` (`log h` in the log domain). `cache` holds the row's `E_G` (plain domain).
    #[inline(always)]
    fn update_row(&self, row: usize, cache: &[T], h: &mut [T], scratch: &mut RowScratch<T>) {
        let (problem, f, log) = (self.sweep.problem, self.f, self.sweep.log);
        let counts = &problem.groups.counts[..];
        let RowScratch {
            slots,
            denom,
            logits,
            inv_row_sums: inv,
        } = scratch;
        let n_groups = counts.len();
        if !log && (n_groups == 3 || n_groups == 4) {
            if n_groups == 3 {
                plain_row_fused::<T, 3>(cache, f, counts, h, slots, inv);
            } else {
                plain_row_fused::<T, 4>(cache, f, counts, h, slots, inv);
            }
            // The new h = 1 / Σ_a E f g, which is exactly inv.
            h.copy_from_slice(inv);
            return;
        }
        if log {
            problem.logits(self.sweep.input, row, logits);
            log_slot_values(problem, logits, f, h, slots, denom);
        } else {
            plain_slot_values(problem, cache, f, h, slots, denom);
        }
        let k = problem.anchors;
        // The g step: q_G *= 1/den. With a single group the slot values are exactly 1/c
        // (setting them so keeps constant rows exactly constant).
        for q in slots.chunks_exact_mut(k) {
            if n_groups == 1 {
                q.fill(T::ONE / counts[0]);
            } else {
                for j in 0..k {
                    q[j] *= denom[j];
                }
            }
        }
        let mut rescue = false;
        for (g, q) in slots.chunks_exact(k).enumerate() {
            let row_sum = sum(q);
            // Only possible in the log domain's first iteration, before any row normalisation
            // (the normalised slot values are bounded below): fall back to exact LSEs.
            rescue |= !(row_sum >= T::TINY && row_sum < T::INFINITY);
            inv[g] = T::ONE / row_sum;
        }
        if log && rescue {
            exact_log_row(problem, self.sweep.input, row, f, h, scratch);
            scratch.inv_row_sums.fill(T::ONE);
            return;
        }
        for g in 0..n_groups {
            if log {
                h[g] += inv[g].ln();
            } else {
                h[g] *= inv[g];
            }
        }
    }
}

/// Log domain, before the `g` step's division: `q_G = exp(t_G - max_G t_G)` with
/// `t_G = w_G L + log f_G + log h_G`, and `denom = 1 / Σ_G c_G q_G`.
#[inline(always)]
fn log_slot_values<T: Real>(
    problem: &Problem<T>,
    logits: &[T],
    f: &[T],
    h: &[T],
    slots: &mut [T],
    denom: &mut [T],
) {
    let (k, groups) = (problem.anchors, &problem.groups);
    // denom holds max_G t_G first.
    denom.fill(T::NEG_INFINITY);
    for (g, (q, fg)) in slots.chunks_exact_mut(k).zip(f.chunks_exact(k)).enumerate() {
        let (w, hg) = (groups.weights[g], h[g]);
        for j in 0..k {
            let t = w * logits[j] + fg[j] + hg;
            q[j] = t;
            denom[j] = denom[j].fmax(t);
        }
    }
    for q in slots.chunks_exact_mut(k) {
        for j in 0..k {
            q[j] = (q[j] - denom[j]).exp_fast();
        }
    }
    denom.fill(T::ZERO);
    for (q, &c) in slots.chunks_exact(k).zip(&groups.counts) {
        for j in 0..k {
            denom[j] += c * q[j];
        }
    }
    for d in denom.iter_mut() {
        *d = T::ONE / *d;
    }
}

/// Plain domain, before the `g` step's division: `q_G = h_G E_G f_G` and
/// `denom = 1 / Σ_G c_G h_G E_G f_G`.
#[inline(always)]
fn plain_slot_values<T: Real>(
    problem: &Problem<T>,
    cache: &[T],
    f: &[T],
    h: &[T],
    slots: &mut [T],
    denom: &mut [T],
) {
    let (k, counts) = (problem.anchors, &problem.groups.counts);
    denom.fill(T::ZERO);
    for g in 0..counts.len() {
        let (ch, hg) = (counts[g] * h[g], h[g]);
        let e = &cache[g * k..(g + 1) * k];
        let fg = &f[g * k..(g + 1) * k];
        let q = &mut slots[g * k..(g + 1) * k];
        for j in 0..k {
            let v = e[j] * fg[j];
            q[j] = hg * v;
            denom[j] += ch * v;
        }
    }
    for d in denom.iter_mut() {
        *d = T::ONE / *d;
    }
}

/// Log-domain `g` and `h` steps of one row with full log-sum-exps, for rows whose shifted sums
/// left the float range: writes the normalised slot values (after the `h` step) into
/// `scratch.slots` and updates `eta = log h`.
fn exact_log_row<T: Real>(
    problem: &Problem<T>,
    input: Inputs<T>,
    row: usize,
    phi: &[T],
    eta: &mut [T],
    scratch: &mut RowScratch<T>,
) {
    let (k, groups) = (problem.anchors, &problem.groups);
    let n_groups = groups.len();
    let RowScratch {
        slots: q,
        denom: lse,
        logits,
        ..
    } = scratch;
    problem.logits(input, row, logits);
    // lse[a] = log Σ_G c_G exp(t_G[a]); q_G = t_G for now.
    lse.fill(T::NEG_INFINITY);
    for g in 0..n_groups {
        for j in 0..k {
            let t = groups.weights[g] * logits[j] + phi[g * k + j] + eta[g];
            q[g * k + j] = t;
            lse[j] = lse[j].fmax(t);
        }
    }
    for j in 0..k {
        let m = lse[j];
        let mut z = T::ZERO;
        for g in 0..n_groups {
            z += groups.counts[g] * (q[g * k + j] - m).exp_fast();
        }
        lse[j] = m + z.ln();
    }
    for g in 0..n_groups {
        let qg = &mut q[g * k..(g + 1) * k];
        // log of the slot values after the g step
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

/// Plain-domain `g` and `h` steps of one row for a compile-time group count, in one pass over
/// the anchors (the general path makes six). Writes `q_G = E_G f_G g` (the slot values after
/// the g step, without the old `h_G` factor) and `inv[g] = 1 / Σ_a q_G`, which is the new
/// `h_G`; the slot values after the h step are `q_G · inv[g]`.
#[inline(always)]
fn plain_row_fused<T: Real, const NG: usize>(
    cache: &[T],
    f: &[T],
    counts: &[T],
    h: &[T],
    slots: &mut [T],
    inv: &mut [T],
) {
    let k = f.len() / NG;
    let ch: [T; NG] = std::array::from_fn(|g| counts[g] * h[g]);
    // Every slice is cut to exactly k so that the loop below carries no bounds checks and
    // vectorises at the full register width.
    let e: [&[T]; NG] = std::array::from_fn(|g| &cache[g * k..][..k]);
    let fs: [&[T]; NG] = std::array::from_fn(|g| &f[g * k..][..k]);
    let mut qs = slots[..NG * k].chunks_exact_mut(k);
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
}

/// A row of the result, `T = Σ_G top_G inv_G q_G`, into `out_row`.
#[inline(always)]
fn result_row<T: Real>(slots: &[T], inv: &[T], top_counts: &[T], out_row: &mut [T]) {
    let k = out_row.len();
    out_row.fill(T::ZERO);
    for (g, q) in slots.chunks_exact(k).enumerate() {
        if top_counts[g] > T::ZERO {
            let coef = top_counts[g] * inv[g];
            for j in 0..k {
                out_row[j] += coef * q[j];
            }
        }
    }
}

/// Relative spread at or below which a min-max row counts as constant, in units of the
/// accumulation dtype's machine epsilon (`docs/numerics.md`). Equal slot weights make every row
/// constant in exact arithmetic; the iteration leaves up to about 100 ulps of rounding there,
/// which min-max would otherwise blow up into 0/1 targets.
const CONSTANT_ROW_ULPS: f64 = 1024.0;

/// Whether a row with extremes `lo`, `hi` is constant: `hi - lo <= 1024 ε max(|lo|, |hi|)`.
/// NaN extremes count as not constant, so that a NaN reaches the output.
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

/// `(x - min) / (max - min)` per row; a constant row ([`constant_row`]) becomes all zeros.
/// Inlined so that it is compiled with the caller's vector width (out of line it ran as SSE2 code).
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
