//! Brownian-bridge loss without the N×N logits (math in `docs/structure_losses.md`).
//!
//! With x̂, ŷ, m̂ the rows of `a`, `b`, `mid` (L2-normalised when `normalize`), per row i a time
//! t_i, u_i = 1 − t_i and c_i = 1/(2σ²t_i u_i) (`scale`), the logits are the bridge's Gaussian
//! log-densities with the row constant c_i‖m̂_i‖² left out (it cancels in the loss):
//!
//! ```text
//! s[i,j]  = c_i (2u_i m̂_i·x̂_j + 2t_i m̂_i·ŷ_j − u_i² ‖x̂_j‖² − t_i² ‖ŷ_j‖² − 2u_i t_i x̂_j·ŷ_j)
//! loss[i] = lse[i] − s[i,i],   lse[i] = log Σ_j exp(s[i,j])
//! ```
//!
//! The forward walks row blocks of `mid` against column tiles of `a` and `b` (two GEMMs per
//! tile) keeping an online log-sum-exp per row. The backward recomputes the tiles: with
//! `G[i,j] = c_i g_i (exp(s[i,j] − lse[i]) − δ_ij)`,
//!
//! ```text
//! ∂m̂_i = 2u_i Σ_j G[i,j] x̂_j + 2t_i Σ_j G[i,j] ŷ_j
//! ∂x̂_j = 2 Σ_i G[i,j] u_i m̂_i − 2x̂_j Σ_i G[i,j] u_i² − 2ŷ_j Σ_i G[i,j] u_i t_i
//! ∂ŷ_j = 2 Σ_i G[i,j] t_i m̂_i − 2ŷ_j Σ_i G[i,j] t_i² − 2x̂_j Σ_i G[i,j] u_i t_i
//! ```
//!
//! the four sums over tiles as GEMMs and the three column sums beside them, in wavefront steps
//! as in `info_nce` (each output block receives its contributions in a fixed order). Normalised
//! copies are never written (`exec::row_norms`); extra memory is O(N) plus a few tiles per task.
//! Results do not depend on the thread count.
//!
//! With one time t for every row (the common case), the bridge points P_j = (1 − t)x̂_j + tŷ_j
//! do not depend on i: they are formed once (O(N·D) memory), a tile is the one product m̂·P
//! (s = c(2m̂·P − ‖P‖²)), and the backward makes two products per tile instead of four
//! (∂m̂ = 2GP, ∂P_j = 2Σ_i G[i,j] m̂_i − 2P_j Σ_i G[i,j], ∂x̂ = (1 − t)∂P, ∂ŷ = t∂P).

use crate::error::{check_len, not_finite, Result};
use crate::exec::row_norms::{unit_rows, UnitRows};
use crate::exec::shared_mut::SharedMut;
use crate::interrupt::Interrupt;
use crate::simd::gemm::{gemm, MatrixRef};
use crate::simd::{dispatch, dot, max, sum, Real, LANES};
use rayon::prelude::*;

/// Rows (of `mid`) and columns (pairs of `a`, `b`) per tile; equal, so that the backward's
/// wavefront blocks serve both.
const TILE: usize = 256;

/// The loss's flags.
#[derive(Clone, Copy, Debug)]
pub struct BrownianBridgeParams {
    /// L2-normalise the rows of a, b and mid first.
    pub normalize: bool,
    /// Return an error (not a result) for NaN or Inf in `a`, `b` or `mid`, found in the
    /// row-norm pass.
    pub check_finite: bool,
}

/// The arrays both passes read: row `i` of `mid` is the augmented view of pair `i`.
#[derive(Clone, Copy, Debug)]
pub struct BrownianBridgeInput<'a, T> {
    /// `[rows, features]` each.
    pub a: &'a [T],
    pub b: &'a [T],
    pub mid: &'a [T],
    /// `[rows]`: each row's bridge time, in (0, 1).
    pub t: &'a [T],
    /// `[rows]`: 1/(2σ² t(1 − t)).
    pub scale: &'a [T],
    pub rows: usize,
    pub features: usize,
}

fn check<T>(input: &BrownianBridgeInput<'_, T>) -> Result<()> {
    let (n, d) = (input.rows, input.features);
    check_len("a", input.a.len(), [n, d])?;
    check_len("b", input.b.len(), [n, d])?;
    check_len("mid", input.mid.len(), [n, d])?;
    check_len("t", input.t.len(), [n])?;
    check_len("scale", input.scale.len(), [n])
}

/// What both passes derive from the input: the rows as the kernels read them and the
/// per-column terms of ‖bridge point‖².
struct Prepared<'a, T: Real> {
    x: UnitRows<'a, T>,
    y: UnitRows<'a, T>,
    m: UnitRows<'a, T>,
    /// ‖x̂_j‖², ‖ŷ_j‖², x̂_j·ŷ_j.
    xx: Vec<T>,
    yy: Vec<T>,
    xy: Vec<T>,
    /// With one time for every row: the bridge points P_j = (1 − t)·x̂_j + t·ŷ_j (`[rows, d]`)
    /// and ‖P_j‖², so that a tile takes one product (m̂·P) instead of two.
    points: Option<(Vec<T>, Vec<T>)>,
    t: &'a [T],
    scale: &'a [T],
    d: usize,
    stop: Interrupt,
}

fn prepare<'a, T: Real>(
    input: &BrownianBridgeInput<'a, T>,
    params: &BrownianBridgeParams,
) -> Result<Prepared<'a, T>> {
    let (n, d, check) = (input.rows, input.features, params.check_finite);
    let read = |name, data| {
        let unit = unit_rows(data, n, d, params.normalize, check);
        if unit.finite {
            Ok(unit)
        } else {
            Err(not_finite(name))
        }
    };
    let (x, y, m) = (
        read("a", input.a)?,
        read("b", input.b)?,
        read("mid", input.mid)?,
    );
    let mut xx = vec![T::ZERO; n];
    let mut yy = vec![T::ZERO; n];
    let mut xy = vec![T::ZERO; n];
    xx.par_chunks_mut(TILE)
        .zip(yy.par_chunks_mut(TILE))
        .zip(xy.par_chunks_mut(TILE))
        .enumerate()
        .for_each(|(c, ((xx, yy), xy))| {
            for r in 0..xx.len() {
                let j = c * TILE + r;
                let (xr, yr) = (&x.rows[j * d..(j + 1) * d], &y.rows[j * d..(j + 1) * d]);
                let (fx, fy) = (x.unit[j], y.unit[j]);
                xx[r] = dot(xr, xr) * fx * fx;
                yy[r] = dot(yr, yr) * fy * fy;
                xy[r] = dot(xr, yr) * fx * fy;
            }
        });
    let points = uniform(input.t, input.scale).then(|| bridge_points(&x, &y, input.t[0], n, d));
    Ok(Prepared {
        x,
        y,
        m,
        xx,
        yy,
        xy,
        points,
        t: input.t,
        scale: input.scale,
        d,
        stop: Interrupt::current(),
    })
}

/// Whether every row has the same time (and so the same scale); NaN never is.
fn uniform<T: Real>(t: &[T], scale: &[T]) -> bool {
    !t.is_empty() && t.iter().all(|&v| v == t[0]) && scale.iter().all(|&v| v == scale[0])
}

/// P_j = (1 − t)·x̂_j + t·ŷ_j for every column, and ‖P_j‖².
fn bridge_points<T: Real>(
    x: &UnitRows<'_, T>,
    y: &UnitRows<'_, T>,
    t: T,
    n: usize,
    d: usize,
) -> (Vec<T>, Vec<T>) {
    let mut points = vec![T::ZERO; n * d];
    let mut norms = vec![T::ZERO; n];
    if d == 0 {
        return (points, norms);
    }
    let u = T::ONE - t;
    points
        .par_chunks_mut(TILE * d)
        .zip(norms.par_chunks_mut(TILE))
        .enumerate()
        .for_each(|(c, (pts, nn))| {
            for (r, (pr, out)) in pts.chunks_exact_mut(d).zip(nn.iter_mut()).enumerate() {
                let j = c * TILE + r;
                let (xr, yr) = (&x.rows[j * d..(j + 1) * d], &y.rows[j * d..(j + 1) * d]);
                let (kx, ky) = (u * x.unit[j], t * y.unit[j]);
                for q in 0..d {
                    pr[q] = kx * xr[q] + ky * yr[q];
                }
                *out = dot(pr, pr);
            }
        });
    (points, norms)
}

impl<T: Real> Prepared<'_, T> {
    /// The logits of rows `i0..i0 + rows` against columns `j0..j0 + cols` into `mx` (`[rows,
    /// TILE]`), with `my` as scratch for the second product.
    fn logits(&self, i0: usize, rows: usize, j0: usize, cols: usize, mx: &mut [T], my: &mut [T]) {
        let d = self.d;
        let ms = &self.m.rows[i0 * d..(i0 + rows) * d];
        if let Some((points, norms)) = &self.points {
            // One time t: s = c (2 m̂·P − ‖P‖²).
            dot_tile(ms, &points[j0 * d..(j0 + cols) * d], d, rows, cols, mx);
            let pp = &norms[j0..j0 + cols];
            let two = T::from_f64(2.0);
            dispatch(
                #[inline(always)]
                || {
                    for r in 0..rows {
                        let i = i0 + r;
                        let (c, k) = (self.scale[i], two * self.m.unit[i]);
                        for (v, &n2) in mx[r * TILE..r * TILE + cols].iter_mut().zip(pp) {
                            *v = c * (k * *v - n2);
                        }
                    }
                },
            );
            return;
        }
        dot_tile(ms, &self.x.rows[j0 * d..(j0 + cols) * d], d, rows, cols, mx);
        dot_tile(ms, &self.y.rows[j0 * d..(j0 + cols) * d], d, rows, cols, my);
        let (fx, fy) = (&self.x.unit[j0..j0 + cols], &self.y.unit[j0..j0 + cols]);
        let (xx, yy, xy) = (
            &self.xx[j0..j0 + cols],
            &self.yy[j0..j0 + cols],
            &self.xy[j0..j0 + cols],
        );
        dispatch(
            #[inline(always)]
            || {
                for r in 0..rows {
                    let i = i0 + r;
                    let (t, c, fm) = (self.t[i], self.scale[i], self.m.unit[i]);
                    let u = T::ONE - t;
                    let two = T::from_f64(2.0);
                    let (ku, kt) = (two * u * fm, two * t * fm);
                    let (uu, tt, ut) = (u * u, t * t, two * u * t);
                    let (sx, sy) = (&mut mx[r * TILE..r * TILE + cols], &my[r * TILE..]);
                    for q in 0..cols {
                        let cross = ku * (sx[q] * fx[q]) + kt * (sy[q] * fy[q]);
                        sx[q] = c * (cross - (uu * xx[q] + tt * yy[q] + ut * xy[q]));
                    }
                }
            },
        );
    }
}

/// Per-row losses and log-sum-exps (`loss`, `lse`: `[rows]` each).
pub fn brownian_bridge_forward<T: Real>(
    input: BrownianBridgeInput<'_, T>,
    loss: &mut [T],
    lse: &mut [T],
    params: &BrownianBridgeParams,
) -> Result<()> {
    check(&input)?;
    let n = input.rows;
    check_len("loss", loss.len(), [n])?;
    check_len("lse", lse.len(), [n])?;
    let p = prepare(&input, params)?;
    loss.par_chunks_mut(TILE)
        .zip(lse.par_chunks_mut(TILE))
        .enumerate()
        .for_each(|(c, (loss, lse))| {
            if p.stop.requested() {
                return;
            }
            let (i0, rows) = (c * TILE, loss.len());
            let mut mx = vec![T::ZERO; TILE * TILE];
            let mut my = vec![T::ZERO; TILE * TILE];
            let mut run_max = [T::NEG_INFINITY; TILE];
            let mut run_sum = [T::ZERO; TILE];
            for j0 in (0..n).step_by(TILE) {
                let cols = TILE.min(n - j0);
                p.logits(i0, rows, j0, cols, &mut mx, &mut my);
                dispatch(
                    #[inline(always)]
                    || {
                        for r in 0..rows {
                            let s = &mx[r * TILE..r * TILE + cols];
                            let i = i0 + r;
                            if (j0..j0 + cols).contains(&i) {
                                loss[r] = s[i - j0]; // the diagonal logit, until the end
                            }
                            let top = max(s); // in vector lanes: a scalar fold is one long dependency chain
                            if top > run_max[r] {
                                run_sum[r] *= (run_max[r] - top).exp_fast();
                                run_max[r] = top;
                            }
                            run_sum[r] += exp_sum(s, run_max[r]);
                        }
                    },
                );
            }
            for r in 0..rows {
                lse[r] = run_max[r] + run_sum[r].ln();
                loss[r] = lse[r] - loss[r];
            }
        });
    p.stop.check()
}

/// Gradients of `Σ_i grad[i]·loss[i]` with respect to `a`, `b` and `mid` (`[rows, features]`
/// each), recomputing the logits tile by tile from the saved `lse`.
pub fn brownian_bridge_backward<T: Real>(
    grad: &[T],
    input: BrownianBridgeInput<'_, T>,
    lse: &[T],
    grad_a: &mut [T],
    grad_b: &mut [T],
    grad_mid: &mut [T],
    params: &BrownianBridgeParams,
) -> Result<()> {
    check(&input)?;
    let (n, d) = (input.rows, input.features);
    check_len("grad", grad.len(), [n])?;
    check_len("lse", lse.len(), [n])?;
    check_len("grad_a", grad_a.len(), [n, d])?;
    check_len("grad_b", grad_b.len(), [n, d])?;
    check_len("grad_mid", grad_mid.len(), [n, d])?;
    let p = prepare(&input, params)?;
    for out in [&mut *grad_a, &mut *grad_b, &mut *grad_mid] {
        out.par_chunks_mut(TILE * d.max(1))
            .for_each(|c| c.fill(T::ZERO));
    }
    if n == 0 || d == 0 {
        return Ok(());
    }
    // Σ_i G[i,j] u_i², Σ_i G[i,j] t_i², Σ_i G[i,j] u_i t_i per column.
    let mut sums = [vec![T::ZERO; n], vec![T::ZERO; n], vec![T::ZERO; n]];
    let outs = Outputs {
        x: SharedMut(grad_a.as_mut_ptr()),
        y: SharedMut(grad_b.as_mut_ptr()),
        m: SharedMut(grad_mid.as_mut_ptr()),
        sums: sums.each_mut().map(|s| SharedMut(s.as_mut_ptr())),
    };
    let nb = n.div_ceil(TILE);
    for k in 0..nb {
        if p.stop.requested() {
            break;
        }
        (0..nb).into_par_iter().for_each_init(
            || (vec![T::ZERO; TILE * TILE], vec![T::ZERO; TILE * TILE]),
            |(g, scratch), bi| {
                let bj = (bi + k) % nb;
                // SAFETY: in this step row block bi of grad_mid and column block bj of grad_a,
                // grad_b and the sums belong to this task alone ((bi + k) mod nb is a
                // bijection), and steps are separated by the join of the parallel loop.
                unsafe { backward_tile(&p, grad, lse, bi * TILE, bj * TILE, g, scratch, outs) };
            },
        );
    }
    p.stop.check()?;
    match &p.points {
        Some((points, _)) => finish_points(&p, points, &sums[0], grad_a, grad_b),
        None => finish_columns(&p, &sums, grad_a, grad_b),
    }
    let one = T::ONE;
    p.x.finish_gradient(d, one, params.normalize, grad_a);
    p.y.finish_gradient(d, one, params.normalize, grad_b);
    p.m.finish_gradient(d, one, params.normalize, grad_mid);
    Ok(())
}

/// The backward's outputs: the raw gradients with respect to x̂, ŷ (through the raw rows and
/// their unit factors, as read) and m̂, and the three column sums.
#[derive(Clone, Copy)]
struct Outputs<T> {
    x: SharedMut<T>,
    y: SharedMut<T>,
    m: SharedMut<T>,
    sums: [SharedMut<T>; 3],
}

/// One tile (rows `i0..`, columns `j0..`) of the backward: G, then its four products and
/// column sums added into `outs`.
///
/// # Safety
/// Rows `i0..i0 + TILE` of `outs.m` and columns `j0..j0 + TILE` of the others must be this
/// call's alone while it runs.
#[allow(clippy::too_many_arguments)]
#[allow(clippy::eq_op)]
unsafe fn backward_tile<T: Real>(
    p: &Prepared<'_, T>,
    grad: &[T],
    lse: &[T],
    i0: usize,
    j0: usize,
    g: &mut [T],
    scratch: &mut [T],
    outs: Outputs<T>,
) {
    let (n, d) = (lse.len(), p.d);
    let (rows, cols) = (TILE.min(n - i0), TILE.min(n - j0));
    p.logits(i0, rows, j0, cols, g, scratch);
    let two = T::from_f64(2.0);
    dispatch(
        #[inline(always)]
        || {
            for r in 0..rows {
                let i = i0 + r;
                let (li, ci) = (lse[i], p.scale[i] * grad[i]);
                let row = &mut g[r * TILE..r * TILE + cols];
                for v in row.iter_mut() {
                    // Exponents capped at 0 (s ≤ lse up to its rounding); `e − e` keeps a NaN.
                    let e = *v - li;
                    *v = ci * (e.fmin(T::ZERO).exp_fast() + (e - e));
                }
                if (j0..j0 + cols).contains(&i) {
                    row[i - j0] -= ci;
                }
            }
        },
    );
    let ms = &p.m.rows[i0 * d..(i0 + rows) * d];
    if let Some((points, _)) = &p.points {
        // ∂m̂_i += Σ_j 2G[i,j] P_j; ∂P_j += Σ_i 2fm_i G[i,j] m_i (into the ∂x̂ block) and Σ_i G[i,j].
        for r in 0..rows {
            let (src, dst) = (&g[r * TILE..r * TILE + cols], &mut scratch[r * TILE..]);
            for q in 0..cols {
                dst[q] = two * src[q];
            }
        }
        gemm(
            [rows, cols, d],
            MatrixRef::row_major(scratch.as_ptr(), TILE),
            MatrixRef::row_major(points[j0 * d..].as_ptr(), d),
            T::ONE,
            outs.m.at(i0 * d),
            d,
        );
        for r in 0..rows {
            let k = two * p.m.unit[i0 + r];
            let (src, dst) = (&g[r * TILE..r * TILE + cols], &mut scratch[r * TILE..]);
            for q in 0..cols {
                dst[q] = k * src[q];
            }
        }
        gemm(
            [cols, rows, d],
            MatrixRef::transpose_of(scratch.as_ptr(), TILE),
            MatrixRef::row_major(ms.as_ptr(), d),
            T::ONE,
            outs.x.at(j0 * d),
            d,
        );
        let total = outs.sums[0].at(j0);
        for r in 0..rows {
            for (q, &v) in g[r * TILE..r * TILE + cols].iter().enumerate() {
                *total.add(q) += v;
            }
        }
        return;
    }
    let (xs, ys) = (
        &p.x.rows[j0 * d..(j0 + cols) * d],
        &p.y.rows[j0 * d..(j0 + cols) * d],
    );
    // ∂m̂_i += Σ_j (2u_i G[i,j] fx_j) x_j + Σ_j (2t_i G[i,j] fy_j) y_j
    for (units, weight, cs) in [(&p.x.unit, false, xs), (&p.y.unit, true, ys)] {
        for r in 0..rows {
            let t = p.t[i0 + r];
            let k = two * if weight { t } else { T::ONE - t };
            let (src, dst) = (&g[r * TILE..r * TILE + cols], &mut scratch[r * TILE..]);
            for q in 0..cols {
                dst[q] = k * src[q] * units[j0 + q];
            }
        }
        gemm(
            [rows, cols, d],
            MatrixRef::row_major(scratch.as_ptr(), TILE),
            MatrixRef::row_major(cs.as_ptr(), d),
            T::ONE,
            outs.m.at(i0 * d),
            d,
        );
    }
    // ∂x̂_j += Σ_i (2u_i fm_i G[i,j]) m_i and ∂ŷ_j += Σ_i (2t_i fm_i G[i,j]) m_i, each as the
    // rows read them (divided by their unit factor, applied in finish_columns).
    for (weight, out) in [(false, outs.x), (true, outs.y)] {
        for r in 0..rows {
            let (t, fm) = (p.t[i0 + r], p.m.unit[i0 + r]);
            let k = two * fm * if weight { t } else { T::ONE - t };
            let (src, dst) = (&g[r * TILE..r * TILE + cols], &mut scratch[r * TILE..]);
            for q in 0..cols {
                dst[q] = k * src[q];
            }
        }
        gemm(
            [cols, rows, d],
            MatrixRef::transpose_of(scratch.as_ptr(), TILE),
            MatrixRef::row_major(ms.as_ptr(), d),
            T::ONE,
            out.at(j0 * d),
            d,
        );
    }
    let [suu, stt, sut] = outs.sums.map(|s| s.at(j0));
    for r in 0..rows {
        let t = p.t[i0 + r];
        let u = T::ONE - t;
        let (uu, tt, ut) = (u * u, t * t, u * t);
        let row = &g[r * TILE..r * TILE + cols];
        for (q, &v) in row.iter().enumerate() {
            *suu.add(q) += v * uu;
            *stt.add(q) += v * tt;
            *sut.add(q) += v * ut;
        }
    }
}

/// Turns the accumulated Σ_i G[i,j] k_i m̂_i into ∂x̂_j (and ∂ŷ_j) in the rows' own scale: the
/// column terms −2x̂_j Σ G u² − 2ŷ_j Σ G u t (and −2ŷ_j Σ G t² − 2x̂_j Σ G u t).
fn finish_columns<T: Real>(p: &Prepared<'_, T>, sums: &[Vec<T>; 3], gx: &mut [T], gy: &mut [T]) {
    let d = p.d;
    let two = T::from_f64(2.0);
    let [suu, stt, sut] = sums;
    gx.par_chunks_mut(TILE * d)
        .zip(gy.par_chunks_mut(TILE * d))
        .enumerate()
        .for_each(|(c, (gx, gy))| {
            for (r, (ox, oy)) in gx
                .chunks_exact_mut(d)
                .zip(gy.chunks_exact_mut(d))
                .enumerate()
            {
                let j = c * TILE + r;
                let (fx, fy) = (p.x.unit[j], p.y.unit[j]);
                let (xr, yr) = (&p.x.rows[j * d..(j + 1) * d], &p.y.rows[j * d..(j + 1) * d]);
                let (axx, axy) = (two * suu[j] * fx, two * sut[j] * fy);
                let (ayy, ayx) = (two * stt[j] * fy, two * sut[j] * fx);
                for q in 0..d {
                    ox[q] = ox[q] - axx * xr[q] - axy * yr[q];
                    oy[q] = oy[q] - ayy * yr[q] - ayx * xr[q];
                }
            }
        });
}

/// With one time t: ∂P_j = (accumulated Σ_i 2G[i,j] m̂_i, in `gx`) − 2P_j Σ_i G[i,j], then
/// ∂x̂_j = (1 − t)·∂P_j and ∂ŷ_j = t·∂P_j.
fn finish_points<T: Real>(
    p: &Prepared<'_, T>,
    points: &[T],
    total: &[T],
    gx: &mut [T],
    gy: &mut [T],
) {
    let d = p.d;
    let (t, two) = (p.t[0], T::from_f64(2.0));
    let u = T::ONE - t;
    gx.par_chunks_mut(TILE * d)
        .zip(gy.par_chunks_mut(TILE * d))
        .enumerate()
        .for_each(|(c, (gx, gy))| {
            for (r, (ox, oy)) in gx
                .chunks_exact_mut(d)
                .zip(gy.chunks_exact_mut(d))
                .enumerate()
            {
                let j = c * TILE + r;
                let (pr, k) = (&points[j * d..(j + 1) * d], two * total[j]);
                for q in 0..d {
                    let dp = ox[q] - k * pr[q];
                    ox[q] = u * dp;
                    oy[q] = t * dp;
                }
            }
        });
}

/// `Σ_q exp(s[q] − shift)` with a fixed 8-lane summation order; NaN if any `s[q]` is not finite
/// (`exp_fast` and `fmax` would pass a NaN over: `v − v` keeps it).
#[inline(always)]
#[allow(clippy::eq_op)]
fn exp_sum<T: Real>(s: &[T], shift: T) -> T {
    let mut acc = [T::ZERO; LANES];
    let mut chunks = s.chunks_exact(LANES);
    for ch in &mut chunks {
        for l in 0..LANES {
            acc[l] += (ch[l] - shift).exp_fast() + (ch[l] - ch[l]);
        }
    }
    let mut tail = T::ZERO;
    for &v in chunks.remainder() {
        tail += (v - shift).exp_fast() + (v - v);
    }
    sum(&acc) + tail
}

/// `tile[r*TILE + q] = x_r · y_q` for `rows` rows of `xs` and `cols` rows of `ys` (both `[·, d]`):
/// one GEMM, whose summation order depends only on the shapes.
fn dot_tile<T: Real>(xs: &[T], ys: &[T], d: usize, rows: usize, cols: usize, tile: &mut [T]) {
    assert!(xs.len() >= rows * d && ys.len() >= cols * d && tile.len() >= (rows - 1) * TILE + cols);
    // SAFETY: the bounds above cover every element the strides reach.
    unsafe {
        gemm(
            [rows, d, cols],
            MatrixRef::row_major(xs.as_ptr(), d),
            MatrixRef::transpose_of(ys.as_ptr(), d),
            T::ZERO,
            tile.as_mut_ptr(),
            TILE,
        )
    }
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

    /// The per-row losses straight from the definition: the bridge points and their distances.
    fn dense(x: &[&[f64]; 3], t: &[f64], sigma: f64, normalize: bool, d: usize) -> Vec<f64> {
        let n = t.len();
        let unit = |v: &[f64]| -> Vec<f64> {
            let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
            v.iter()
                .map(|a| if normalize { a / norm } else { *a })
                .collect()
        };
        let row = |k: usize, i: usize| unit(&x[k][i * d..(i + 1) * d]);
        let logit = |i: usize, j: usize| {
            let (m, a, b) = (row(2, i), row(0, j), row(1, j));
            let dist: f64 = (0..d)
                .map(|q| (m[q] - (1.0 - t[i]) * a[q] - t[i] * b[q]).powi(2))
                .sum();
            -dist / (2.0 * sigma * sigma * t[i] * (1.0 - t[i]))
        };
        (0..n)
            .map(|i| (0..n).map(|j| logit(i, j).exp()).sum::<f64>().ln() - logit(i, i))
            .collect()
    }

    #[test]
    fn matches_dense_and_finite_differences_over_several_tiles() {
        let (n, d, sigma) = (300, 7, 0.8);
        let mut seed = 3u64;
        let mut data: Vec<Vec<f64>> = (0..3)
            .map(|_| (0..n * d).map(|_| lcg(&mut seed)).collect())
            .collect();
        let t: Vec<f64> = (0..n).map(|_| 0.5 + 0.45 * lcg(&mut seed)).collect();
        let scale: Vec<f64> = t
            .iter()
            .map(|t| 1.0 / (2.0 * sigma * sigma * t * (1.0 - t)))
            .collect();
        let g: Vec<f64> = (0..n).map(|_| lcg(&mut seed)).collect();
        for normalize in [true, false] {
            let params = BrownianBridgeParams {
                normalize,
                check_finite: true,
            };
            let make = |data: &[Vec<f64>]| {
                let input = BrownianBridgeInput {
                    a: &data[0],
                    b: &data[1],
                    mid: &data[2],
                    t: &t,
                    scale: &scale,
                    rows: n,
                    features: d,
                };
                let (mut loss, mut lse) = (vec![0.0; n], vec![0.0; n]);
                brownian_bridge_forward(input, &mut loss, &mut lse, &params).unwrap();
                (loss, lse)
            };
            let (loss, lse) = make(&data);
            let input = BrownianBridgeInput {
                a: &data[0],
                b: &data[1],
                mid: &data[2],
                t: &t,
                scale: &scale,
                rows: n,
                features: d,
            };
            let want = dense(&[&data[0], &data[1], &data[2]], &t, sigma, normalize, d);
            for i in 0..n {
                assert!(
                    (loss[i] - want[i]).abs() < 1e-9,
                    "{i}: {} vs {}",
                    loss[i],
                    want[i]
                );
            }
            let mut grads = vec![vec![0.0; n * d]; 3];
            if let [ga, gb, gm] = &mut grads[..] {
                brownian_bridge_backward(&g, input, &lse, ga, gb, gm, &params).unwrap();
            }
            let objective = |data: &[Vec<f64>]| -> f64 {
                make(data).0.iter().zip(&g).map(|(l, g)| l * g).sum()
            };
            let h = 1e-6;
            for k in 0..3 {
                for &e in &[0usize, 5, 13 * d + 2, 257 * d + 3, n * d - 1] {
                    let keep = data[k][e];
                    data[k][e] = keep + h;
                    let up = objective(&data);
                    data[k][e] = keep - h;
                    let down = objective(&data);
                    data[k][e] = keep;
                    let fd = (up - down) / (2.0 * h);
                    assert!(
                        (fd - grads[k][e]).abs() < 1e-6 * (1.0 + fd.abs()),
                        "input {k}[{e}]: {fd} vs {}",
                        grads[k][e]
                    );
                }
            }
        }
    }

    #[test]
    fn rejects_bad_lengths_and_non_finite_rows() {
        let t = [0.5f32; 2];
        let mut rows = vec![1.0f32; 6];
        let (mut loss, mut lse) = ([0.0f32; 2], [0.0f32; 2]);
        let params = BrownianBridgeParams {
            normalize: true,
            check_finite: true,
        };
        fn input<'a>(
            a: &'a [f32],
            mid_len: usize,
            ts: &'a [f32; 2],
        ) -> BrownianBridgeInput<'a, f32> {
            BrownianBridgeInput {
                a: &a[..6],
                b: &a[..6],
                mid: &a[..mid_len],
                t: &ts[..],
                scale: &ts[..],
                rows: 2,
                features: 3,
            }
        }
        let err = brownian_bridge_forward(input(&rows, 5, &t), &mut loss, &mut lse, &params);
        assert!(err
            .unwrap_err()
            .to_string()
            .starts_with("mid has 5 elements"));
        rows[4] = f32::INFINITY;
        let err = brownian_bridge_forward(input(&rows, 6, &t), &mut loss, &mut lse, &params);
        assert_eq!(
            err.unwrap_err().to_string(),
            "argument 'a' must be finite; found NaN or Inf"
        );
        let unchecked = BrownianBridgeParams {
            check_finite: false,
            ..params
        };
        brownian_bridge_forward(input(&rows, 6, &t), &mut loss, &mut lse, &unchecked).unwrap();
        assert!(loss.iter().any(|l| l.is_nan()), "{loss:?}");
    }
}
