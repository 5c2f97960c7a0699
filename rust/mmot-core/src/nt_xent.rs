//! Block primitives of NT-Xent (SimCLR's 2N-way loss) and CoMM's loss, without N×N logits.
//!
//! With Z = [x̂; ŷ] the NT-Xent logits ZZᵀ/τ split into self blocks ẑẑᵀ/τ (diagonal excluded)
//! and a cross block x̂ŷᵀ/τ. The caller (python/mmot/ops/nt_xent.py) normalises the rows,
//! combines the blocks' log-sum-exps into each row's and adds the positives; this module does
//! every O(N²·D) part:
//!
//! ```text
//! self_lse:   l[i]            = log Σ_{j≠i} exp(z_i·z_j / τ)
//! cross_lse:  r[i], c[j]      = log Σ_j exp(x_i·y_j / τ), log Σ_i exp(x_i·y_j / τ)
//! self_grad:  dz_i            = (1/τ) Σ_{j≠i} (c_i e^{S_ij − l_i} + c_j e^{S_ij − l_j}) z_j
//! cross_grad: dx_i, dy_j      = (1/τ) Σ_j G_ij y_j, (1/τ) Σ_i G_ij x_i,
//!             G_ij            = p_i e^{C_ij − lp_i} + q_j e^{C_ij − lq_j}
//! ```
//!
//! Exponents of the gradients are capped at 0: every l is at least the log-sum-exp of the
//! block it scales. Logit tiles are TR × TR; row blocks are owned by one task each (the cross
//! block's two-sided passes visit the tile grid in wavefront steps, step k taking the tiles
//! (I, (I + k) mod nb), so that within a step no two tasks touch the same rows of either side).
//! Every output row receives its contributions in a fixed order, so results do not depend on
//! the thread count. Extra memory: one tile per task, O(N) for the running maxima and sums.

use crate::error::{check_len, MmotError, Result};
use crate::interrupt::Interrupt;
use crate::simd::gemm::{gemm, MatrixRef};
use crate::simd::{dispatch, max, sum, Real, LANES};
use rayon::prelude::*;

/// Rows (and columns) of a logit tile.
const TR: usize = 256;

fn check_temperature(temperature: f64) -> Result<()> {
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(MmotError::InvalidArgument(format!(
            "temperature must be a finite number > 0, got {temperature}"
        )));
    }
    Ok(())
}

/// `tile[r * TR + q] = (x_r · y_q) · scale` for the rows of `xs` (rows × d) and `ys` (cols × d).
fn logit_tile<T: Real>(
    xs: &[T],
    ys: &[T],
    d: usize,
    rows: usize,
    cols: usize,
    scale: T,
    tile: &mut [T],
) {
    assert!(xs.len() >= rows * d && ys.len() >= cols * d && tile.len() >= TR * TR);
    // SAFETY: the bounds above cover every element the strides reach; tile overlaps neither.
    unsafe {
        gemm(
            [rows, d, cols],
            MatrixRef::row_major(xs.as_ptr(), d),
            MatrixRef::transpose_of(ys.as_ptr(), d),
            T::ZERO,
            tile.as_mut_ptr(),
            TR,
        )
    }
    dispatch(
        #[inline(always)]
        || {
            for r in 0..rows {
                for v in &mut tile[r * TR..r * TR + cols] {
                    *v *= scale;
                }
            }
        },
    );
}

/// `Σ_q exp(t[q] − shift)` in a fixed lane order.
#[inline(always)]
fn exp_sum<T: Real>(t: &[T], shift: T) -> T {
    let mut acc = [T::ZERO; LANES];
    let mut it = t.chunks_exact(LANES);
    for ch in &mut it {
        for l in 0..LANES {
            acc[l] += (ch[l] - shift).exp_fast();
        }
    }
    let mut tail = T::ZERO;
    for v in it.remainder() {
        tail += (*v - shift).exp_fast();
    }
    sum(&acc) + tail
}

/// Folds a tile row into a running (max, sum).
#[inline(always)]
fn online<T: Real>(t: &[T], run_max: &mut T, run_sum: &mut T) {
    let m = max(t);
    if m == T::NEG_INFINITY {
        return;
    }
    if m > *run_max {
        *run_sum *= (*run_max - m).exp_fast();
        *run_max = m;
    }
    *run_sum += exp_sum(t, *run_max);
}

#[inline(always)]
fn finish<T: Real>(run_max: T, run_sum: T) -> T {
    if run_max == T::NEG_INFINITY {
        T::NEG_INFINITY
    } else {
        run_max + run_sum.ln()
    }
}

/// A raw pointer shared by the wavefront tasks; within a step each task writes rows no other
/// task of that step touches, and steps are separated by joins.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: used only as described on the type.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    fn at(self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}

/// Runs `f(bi, bj)` over the nb × nb tile grid in nb wavefront steps (see the module docs).
fn wavefront(nb: usize, stop: &Interrupt, f: impl Fn(usize, usize) + Sync) {
    for k in 0..nb {
        if stop.requested() {
            return;
        }
        (0..nb).into_par_iter().for_each(|bi| f(bi, (bi + k) % nb));
    }
}

/// The unordered tile pairs {I, (I + k) mod nb} of a symmetric block in steps k = 0..=nb/2:
/// `f(k, count)` runs step k, whose tasks are I < count (at k = nb/2 for even nb, only half of
/// them: the other half are the same pairs).
fn symmetric_steps(nb: usize, stop: &Interrupt, mut f: impl FnMut(usize, usize)) {
    for k in 0..=nb / 2 {
        if stop.requested() {
            return;
        }
        let count = if k > 0 && 2 * k == nb { nb / 2 } else { nb };
        f(k, count);
    }
}

/// Merges a partial (max, sum) into a running one.
#[inline(always)]
fn merge<T: Real>(run_max: &mut T, run_sum: &mut T, m: T, s: T) {
    if m == T::NEG_INFINITY {
        return;
    }
    if m > *run_max {
        *run_sum = *run_sum * (*run_max - m).exp_fast() + s;
        *run_max = m;
    } else {
        *run_sum += s * (m - *run_max).exp_fast();
    }
}

/// Row log-sum-exps of `z zᵀ / τ` without the diagonal (`out`: `[n]`; −∞ for n = 1).
///
/// The block is symmetric, so each unordered tile pair {I, J} is computed once: in step k
/// (`symmetric_steps`) task I folds the rows of tile (I, J) into block I's running sums and
/// keeps the tile's column partials, which a second phase (after a join) folds into block J's.
pub fn self_lse<T: Real>(
    z: &[T],
    n: usize,
    d: usize,
    temperature: f64,
    out: &mut [T],
) -> Result<()> {
    check_temperature(temperature)?;
    check_len("z", z.len(), [n, d])?;
    check_len("out", out.len(), [n])?;
    let scale = T::from_f64(1.0 / temperature);
    let stop = Interrupt::current();
    let nb = n.div_ceil(TR);
    let mut state = vec![T::NEG_INFINITY; n];
    let mut sums = vec![T::ZERO; n];
    let mut partial = vec![T::ZERO; nb * 2 * TR];
    let (pm, ps, pp) = (
        SharedMut(state.as_mut_ptr()),
        SharedMut(sums.as_mut_ptr()),
        SharedMut(partial.as_mut_ptr()),
    );
    symmetric_steps(nb, &stop, |k, count| {
        (0..count).into_par_iter().for_each(|bi| {
            let bj = (bi + k) % nb;
            let (i0, j0) = (bi * TR, bj * TR);
            let (rows, cols) = (TR.min(n - i0), TR.min(n - j0));
            let mut tile = vec![T::ZERO; TR * TR];
            logit_tile(&z[i0 * d..], &z[j0 * d..], d, rows, cols, scale, &mut tile);
            if k == 0 {
                for r in 0..rows {
                    tile[r * TR + r] = T::NEG_INFINITY;
                }
            }
            // SAFETY: row block bi and partial slot bi belong to this task during the phase.
            let (rmax, rsum, part) = unsafe {
                (
                    std::slice::from_raw_parts_mut(pm.at(i0), rows),
                    std::slice::from_raw_parts_mut(ps.at(i0), rows),
                    std::slice::from_raw_parts_mut(pp.at(bi * 2 * TR), 2 * TR),
                )
            };
            dispatch(
                #[inline(always)]
                || {
                    for r in 0..rows {
                        online(&tile[r * TR..r * TR + cols], &mut rmax[r], &mut rsum[r]);
                    }
                    if k == 0 {
                        return;
                    }
                    let (cmax, csum) = part.split_at_mut(TR);
                    cmax[..cols].fill(T::NEG_INFINITY);
                    csum[..cols].fill(T::ZERO);
                    for r in 0..rows {
                        for (m, v) in cmax[..cols].iter_mut().zip(&tile[r * TR..r * TR + cols]) {
                            *m = m.fmax(*v);
                        }
                    }
                    for r in 0..rows {
                        for ((s, v), m) in csum[..cols]
                            .iter_mut()
                            .zip(&tile[r * TR..r * TR + cols])
                            .zip(&cmax[..cols])
                        {
                            *s += (*v - *m).exp_fast();
                        }
                    }
                },
            );
        });
        if k == 0 {
            return;
        }
        (0..count).into_par_iter().for_each(|bi| {
            let bj = (bi + k) % nb;
            let j0 = bj * TR;
            let cols = TR.min(n - j0);
            // SAFETY: within this phase, block bj of the running sums belongs to task bi only.
            let (rmax, rsum, part) = unsafe {
                (
                    std::slice::from_raw_parts_mut(pm.at(j0), cols),
                    std::slice::from_raw_parts_mut(ps.at(j0), cols),
                    std::slice::from_raw_parts(pp.at(bi * 2 * TR) as *const T, 2 * TR),
                )
            };
            for q in 0..cols {
                merge(&mut rmax[q], &mut rsum[q], part[q], part[TR + q]);
            }
        });
    });
    stop.check()?;
    for i in 0..n {
        out[i] = finish(state[i], sums[i]);
    }
    Ok(())
}

/// Row and column log-sum-exps of `x yᵀ / τ` (`rows`, `cols`: `[n]`; x and y `[n, d]`).
pub fn cross_lse<T: Real>(
    x: &[T],
    y: &[T],
    n: usize,
    d: usize,
    temperature: f64,
    rows_out: &mut [T],
    cols_out: &mut [T],
) -> Result<()> {
    check_temperature(temperature)?;
    check_len("x", x.len(), [n, d])?;
    check_len("y", y.len(), [n, d])?;
    check_len("rows", rows_out.len(), [n])?;
    check_len("cols", cols_out.len(), [n])?;
    let scale = T::from_f64(1.0 / temperature);
    let stop = Interrupt::current();
    let mut state = vec![T::NEG_INFINITY; 2 * n];
    let mut sums = vec![T::ZERO; 2 * n];
    // [row maxima | column maxima], [row sums | column sums]
    let (pm, ps) = (SharedMut(state.as_mut_ptr()), SharedMut(sums.as_mut_ptr()));
    let nb = n.div_ceil(TR);
    wavefront(nb, &stop, |bi, bj| {
        let (i0, j0) = (bi * TR, bj * TR);
        let (rows, cols) = (TR.min(n - i0), TR.min(n - j0));
        let mut tile = vec![T::ZERO; TR * TR];
        logit_tile(&x[i0 * d..], &y[j0 * d..], d, rows, cols, scale, &mut tile);
        // SAFETY: row block bi and column block bj belong to this task during the step.
        let (rmax, rsum, cmax, csum) = unsafe {
            (
                std::slice::from_raw_parts_mut(pm.at(i0), rows),
                std::slice::from_raw_parts_mut(ps.at(i0), rows),
                std::slice::from_raw_parts_mut(pm.at(n + j0), cols),
                std::slice::from_raw_parts_mut(ps.at(n + j0), cols),
            )
        };
        dispatch(
            #[inline(always)]
            || {
                for r in 0..rows {
                    online(&tile[r * TR..r * TR + cols], &mut rmax[r], &mut rsum[r]);
                }
                let mut tmax = [T::NEG_INFINITY; TR];
                for r in 0..rows {
                    for (m, v) in tmax[..cols].iter_mut().zip(&tile[r * TR..r * TR + cols]) {
                        *m = m.fmax(*v);
                    }
                }
                for q in 0..cols {
                    if tmax[q] > cmax[q] {
                        csum[q] *= (cmax[q] - tmax[q]).exp_fast();
                        cmax[q] = tmax[q];
                    }
                }
                for r in 0..rows {
                    for ((s, v), m) in csum[..cols]
                        .iter_mut()
                        .zip(&tile[r * TR..r * TR + cols])
                        .zip(&cmax[..cols])
                    {
                        *s += (*v - *m).exp_fast();
                    }
                }
            },
        );
    });
    stop.check()?;
    for i in 0..n {
        rows_out[i] = finish(state[i], sums[i]);
        cols_out[i] = finish(state[n + i], sums[n + i]);
    }
    Ok(())
}

/// `g[r * TR + q] = a_r e^{min(t − la_r, 0)} + b_q e^{min(t − lb_q, 0)}` over a tile, in place.
#[inline(always)]
fn coefficients<T: Real>(
    tile: &mut [T],
    rows: usize,
    cols: usize,
    a: &[T],
    la: &[T],
    b: &[T],
    lb: &[T],
) {
    for r in 0..rows {
        let (ar, lr) = (a[r], la[r]);
        for (q, v) in tile[r * TR..r * TR + cols].iter_mut().enumerate() {
            let s = *v;
            *v = ar * (s - lr).fmin(T::ZERO).exp_fast()
                + b[q] * (s - lb[q]).fmin(T::ZERO).exp_fast();
        }
    }
}

/// `out[rows, d] += G[rows, cols] · m[cols, d]` (G row-major with rows TR apart, or its
/// transpose when `transpose`).
fn accumulate<T: Real>(
    g: &[T],
    transpose: bool,
    m: &[T],
    rows: usize,
    cols: usize,
    d: usize,
    out: *mut T,
) {
    assert!(g.len() >= TR * TR && m.len() >= cols * d);
    let a = if transpose {
        MatrixRef::transpose_of(g.as_ptr(), TR)
    } else {
        MatrixRef::row_major(g.as_ptr(), TR)
    };
    // SAFETY: the caller owns out's rows × d block; g and m are read within their bounds.
    unsafe {
        gemm(
            [rows, cols, d],
            a,
            MatrixRef::row_major(m.as_ptr(), d),
            T::ONE,
            out,
            d,
        )
    }
}

/// `dz_i = (1/τ) Σ_{j≠i} (c_i e^{S_ij − l_i} + c_j e^{S_ij − l_j}) z_j` (`dz`: `[n, d]`).
///
/// G is symmetric, so each unordered tile pair {I, J} is computed once: in step k task I adds
/// G_IJ z_J to block I and keeps G_IJ; after a join, it adds G_IJᵀ z_I to block J. Extra memory:
/// one tile per row block (N·TR values).
pub fn self_grad<T: Real>(
    z: &[T],
    c: &[T],
    l: &[T],
    n: usize,
    d: usize,
    temperature: f64,
    dz: &mut [T],
) -> Result<()> {
    check_temperature(temperature)?;
    check_len("z", z.len(), [n, d])?;
    check_len("c", c.len(), [n])?;
    check_len("l", l.len(), [n])?;
    check_len("dz", dz.len(), [n, d])?;
    dz.fill(T::ZERO);
    if d == 0 {
        return Ok(());
    }
    let scale = T::from_f64(1.0 / temperature);
    let stop = Interrupt::current();
    let nb = n.div_ceil(TR);
    let mut tiles = vec![T::ZERO; nb * TR * TR];
    let (pd, pt) = (SharedMut(dz.as_mut_ptr()), SharedMut(tiles.as_mut_ptr()));
    symmetric_steps(nb, &stop, |k, count| {
        (0..count).into_par_iter().for_each(|bi| {
            let bj = (bi + k) % nb;
            let (i0, j0) = (bi * TR, bj * TR);
            let (rows, cols) = (TR.min(n - i0), TR.min(n - j0));
            // SAFETY: tile slot bi and row block bi of dz belong to this task during the phase.
            let tile = unsafe { std::slice::from_raw_parts_mut(pt.at(bi * TR * TR), TR * TR) };
            logit_tile(&z[i0 * d..], &z[j0 * d..], d, rows, cols, scale, tile);
            dispatch(
                #[inline(always)]
                || coefficients(tile, rows, cols, &c[i0..], &l[i0..], &c[j0..], &l[j0..]),
            );
            if k == 0 {
                for r in 0..rows {
                    tile[r * TR + r] = T::ZERO;
                }
            }
            accumulate(tile, false, &z[j0 * d..], rows, cols, d, pd.at(i0 * d));
        });
        if k == 0 {
            return;
        }
        (0..count).into_par_iter().for_each(|bi| {
            let bj = (bi + k) % nb;
            let (i0, j0) = (bi * TR, bj * TR);
            let (rows, cols) = (TR.min(n - i0), TR.min(n - j0));
            // SAFETY: within this phase, row block bj of dz belongs to task bi only.
            let tile =
                unsafe { std::slice::from_raw_parts(pt.at(bi * TR * TR) as *const T, TR * TR) };
            accumulate(tile, true, &z[i0 * d..], cols, rows, d, pd.at(j0 * d));
        });
    });
    stop.check()?;
    for v in dz.iter_mut() {
        *v *= scale;
    }
    Ok(())
}

/// `dx_i = (1/τ) Σ_j G_ij y_j`, `dy_j = (1/τ) Σ_i G_ij x_i` with
/// `G_ij = p_i e^{C_ij − lp_i} + q_j e^{C_ij − lq_j}` (`dx`, `dy`: `[n, d]`).
#[allow(clippy::too_many_arguments)]
pub fn cross_grad<T: Real>(
    x: &[T],
    y: &[T],
    [p, lp, q, lq]: [&[T]; 4],
    n: usize,
    d: usize,
    temperature: f64,
    dx: &mut [T],
    dy: &mut [T],
) -> Result<()> {
    check_temperature(temperature)?;
    check_len("x", x.len(), [n, d])?;
    check_len("y", y.len(), [n, d])?;
    for (name, v) in [("p", p), ("lp", lp), ("q", q), ("lq", lq)] {
        check_len(name, v.len(), [n])?;
    }
    check_len("dx", dx.len(), [n, d])?;
    check_len("dy", dy.len(), [n, d])?;
    dx.fill(T::ZERO);
    dy.fill(T::ZERO);
    if d == 0 {
        return Ok(());
    }
    let scale = T::from_f64(1.0 / temperature);
    let stop = Interrupt::current();
    let (px, py) = (SharedMut(dx.as_mut_ptr()), SharedMut(dy.as_mut_ptr()));
    wavefront(n.div_ceil(TR), &stop, |bi, bj| {
        let (i0, j0) = (bi * TR, bj * TR);
        let (rows, cols) = (TR.min(n - i0), TR.min(n - j0));
        let mut tile = vec![T::ZERO; TR * TR];
        logit_tile(&x[i0 * d..], &y[j0 * d..], d, rows, cols, scale, &mut tile);
        dispatch(
            #[inline(always)]
            || {
                coefficients(
                    &mut tile,
                    rows,
                    cols,
                    &p[i0..],
                    &lp[i0..],
                    &q[j0..],
                    &lq[j0..],
                )
            },
        );
        // Row block bi of dx and bj of dy belong to this task during the step.
        accumulate(&tile, false, &y[j0 * d..], rows, cols, d, px.at(i0 * d));
        accumulate(&tile, true, &x[i0 * d..], cols, rows, d, py.at(j0 * d));
    });
    stop.check()?;
    for v in dx.iter_mut().chain(dy.iter_mut()) {
        *v *= scale;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    fn logit(a: &[f64], b: &[f64], i: usize, j: usize, d: usize, tau: f64) -> f64 {
        (0..d).map(|k| a[i * d + k] * b[j * d + k]).sum::<f64>() / tau
    }

    fn lse(v: impl Iterator<Item = f64>) -> f64 {
        let v: Vec<f64> = v.collect();
        let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            return m;
        }
        m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
    }

    /// Several tiles (n > TR, a partial last one): every primitive against the dense sums.
    #[test]
    fn primitives_match_dense_sums() {
        for n in [1, 2, TR + 37, 3 * TR + 5] {
            check_dense(n);
        }
    }

    fn check_dense(n: usize) {
        let (d, tau) = (5, 0.3);
        let mut seed = 7;
        let mut gen = |k: usize| (0..k).map(|_| lcg(&mut seed)).collect::<Vec<f64>>();
        let (x, y, p, q) = (gen(n * d), gen(n * d), gen(n), gen(n));
        let mut out = vec![0.0; n];
        self_lse(&x, n, d, tau, &mut out).unwrap();
        let mut rows = vec![0.0; n];
        let mut cols = vec![0.0; n];
        cross_lse(&x, &y, n, d, tau, &mut rows, &mut cols).unwrap();
        for i in 0..n {
            let want = lse((0..n)
                .filter(|&j| j != i)
                .map(|j| logit(&x, &x, i, j, d, tau)));
            assert!(out[i] == want || (out[i] - want).abs() < 1e-10, "self {i} of {n}");
            let r = lse((0..n).map(|j| logit(&x, &y, i, j, d, tau)));
            let c = lse((0..n).map(|j| logit(&x, &y, j, i, d, tau)));
            assert!(
                (rows[i] - r).abs() < 1e-10 && (cols[i] - c).abs() < 1e-10,
                "cross {i}"
            );
        }
        // Shifts at least the LSEs, as the caller passes them.
        let (la, lb): (Vec<f64>, Vec<f64>) = (rows.iter().map(|v| v + 1.0).collect(), cols.clone());
        let mut dx = vec![0.0; n * d];
        let mut dy = vec![0.0; n * d];
        cross_grad(&x, &y, [&p, &la, &q, &lb], n, d, tau, &mut dx, &mut dy).unwrap();
        let mut dz = vec![0.0; n * d];
        self_grad(&x, &p, &out, n, d, tau, &mut dz).unwrap();
        for i in (0..n).step_by(17) {
            for k in 0..d {
                let (mut gx, mut gy, mut gz) = (0.0, 0.0, 0.0);
                for j in 0..n {
                    let s = logit(&x, &y, i, j, d, tau);
                    gx += (p[i] * (s - la[i]).exp() + q[j] * (s - lb[j]).exp()) * y[j * d + k];
                    let t = logit(&x, &y, j, i, d, tau);
                    gy += (p[j] * (t - la[j]).exp() + q[i] * (t - lb[i]).exp()) * x[j * d + k];
                    if j != i {
                        let u = logit(&x, &x, i, j, d, tau);
                        gz +=
                            (p[i] * (u - out[i]).exp() + p[j] * (u - out[j]).exp()) * x[j * d + k];
                    }
                }
                assert!((dx[i * d + k] - gx / tau).abs() < 1e-9, "dx {i} {k}");
                assert!((dy[i * d + k] - gy / tau).abs() < 1e-9, "dy {i} {k}");
                assert!((dz[i * d + k] - gz / tau).abs() < 1e-9, "dz {i} {k}");
            }
        }
    }
}
