//! Batched (cosine) similarity `scale · x̂ ŷᵀ`.
//!
//! The forward writes no normalised copies of `x` and `y`: only the inverse row norms (`O(N+M)`
//! values) are computed, and each dot product is scaled by `1/‖x_i‖ · 1/‖y_j‖`, then by `scale`
//! (in that order, so that the cosine is formed before a large scale meets small rows). Rows
//! whose squared norm would over- or underflow are first rescaled by a power of two in a copy
//! (`exec::row_norms`; no copy is made when no row needs it). The
//! backward's products are GEMMs against normalised rows: a copy of `y` and blocks of `x`. The
//! batch broadcast is resolved by the caller into index vectors, so one output problem may reuse
//! the same `x` or `y` problem many times without copies.

use crate::dims::Dims;
use crate::error::{check_len, not_finite, MmotError, Result};
use crate::exec::row_norms::{unit_rows, UnitRows};
use crate::interrupt::Interrupt;
use crate::simd::gemm::{gemm, MatrixRef};
use crate::simd::{dot, Real};
use rayon::prelude::*;

/// Rows of `x` normalised at a time in the backward's `gy` products (a scratch of this many
/// rows per task, reused across the blocks).
const X_BLOCK: usize = 256;
/// `gy` rows per parallel task in the backward: small, so that the few y rows of a typical
/// call (an anchor set) still make a task per thread.
const Y_TILE_ROWS: usize = 32;
/// Output rows per parallel task: one GEMM each, large enough to amortise its packing.
const ROWS_PER_TASK: usize = 256;

/// The shapes of a call: `x` is `[x_problems, x_rows, features]`, `y` is `[y_problems, y_rows,
/// features]`, and the output (or its adjoint) `[pairs, x_rows, y_rows]`, one problem per entry
/// of the index arrays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimilarityDims {
    pub x_problems: usize,
    pub x_rows: usize,
    pub y_problems: usize,
    pub y_rows: usize,
    pub features: usize,
}

impl SimilarityDims {
    fn x(&self) -> Dims {
        Dims::new(self.x_problems, self.x_rows, self.features)
    }
    fn y(&self) -> Dims {
        Dims::new(self.y_problems, self.y_rows, self.features)
    }
    fn out(&self, pairs: usize) -> Dims {
        Dims::new(pairs, self.x_rows, self.y_rows)
    }
}

/// The arrays a call reads: `x`, `y`, and for output problem `o` the problems `x_index[o]` of
/// `x` and `y_index[o]` of `y` it pairs.
#[derive(Clone, Copy, Debug)]
pub struct SimilarityInput<'a, T> {
    pub x: &'a [T],
    pub y: &'a [T],
    pub x_index: &'a [i64],
    pub y_index: &'a [i64],
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SimilarityParams {
    /// Divide rows by `max(‖row‖₂, 1e-12)` first (cosine similarity).
    pub normalize: bool,
    pub scale: f64,
    /// Return an error (not a result) for NaN or Inf in `x` or `y`, found in the row-norm pass
    /// (a pass of its own when `normalize` is off).
    pub check_finite: bool,
}

/// `out[o] = scale · x̂[x_index[o]] ŷ[y_index[o]]ᵀ`, `out` shaped `[pairs, x_rows, y_rows]`.
pub fn similarity<T: Real>(
    input: SimilarityInput<'_, T>,
    out: &mut [T],
    dims: SimilarityDims,
    params: &SimilarityParams,
) -> Result<()> {
    check_input(&input, ("out", out.len()), dims)?;
    let SimilarityInput {
        x_index, y_index, ..
    } = input;
    let (n, m, d) = (dims.x_rows, dims.y_rows, dims.features);
    let check_finite = params.check_finite;
    if out.is_empty() && !check_finite {
        return Ok(());
    }
    let (ux, uy) = checked_norms(&input, dims, params)?;
    if out.is_empty() {
        return Ok(());
    }
    let (x, y, ix, iy) = (&*ux.rows, &*uy.rows, &ux.unit, &uy.unit);
    let sc = T::from_f64(params.scale);
    // Ctrl-C: each task of rows reads it first.
    let stop = Interrupt::current();
    out.par_chunks_mut(n * m).enumerate().for_each(|(o, op)| {
        let xb = x_index[o] as usize;
        let yb = y_index[o] as usize;
        let xs = &x[xb * n * d..(xb + 1) * n * d];
        let ys = &y[yb * m * d..(yb + 1) * m * d];
        let ixs = &ix[xb * n..(xb + 1) * n];
        let iys = &iy[yb * m..(yb + 1) * m];
        op.par_chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(|(t, tile)| {
                if stop.requested() {
                    return;
                }
                let i0 = t * ROWS_PER_TASK;
                let rows = tile.len() / m;
                tile_kernel(
                    &xs[i0 * d..(i0 + rows) * d],
                    ys,
                    &ixs[i0..i0 + rows],
                    iys,
                    tile,
                    d,
                    sc,
                );
                if !params.normalize {
                    redo_overflowed(&xs[i0 * d..(i0 + rows) * d], ys, tile, d, params.scale);
                }
            });
    });
    stop.check()
}

/// Without normalisation, the entries of a tile that came out ±inf or NaN (a product or a
/// partial sum overflowed: `[1e20, 1e20]·[1e20, −1e20]` in f32) are recomputed by
/// [`stepped_dot`], so they are ±inf only where the exact value overflows. Unit rows cannot
/// overflow a product, so the normalised path needs no such pass.
fn redo_overflowed<T: Real>(xs: &[T], ys: &[T], tile: &mut [T], d: usize, scale: f64) {
    if d == 0 || all_finite(tile) {
        return;
    }
    let m = ys.len() / d;
    for (x, row) in xs.chunks_exact(d).zip(tile.chunks_exact_mut(m)) {
        for (y, v) in ys.chunks_exact(d).zip(row.iter_mut()) {
            if !v.to_f64().is_finite() {
                *v = T::from_f64(stepped_dot(x, y, scale));
            }
        }
    }
}

/// Whether every value is finite: `v · 0` is 0 for finite `v` and NaN otherwise, summed in
/// independent lanes so that the scan vectorises (a small fraction of the GEMM's time).
#[allow(clippy::needless_range_loop)]
fn all_finite<T: Real>(values: &[T]) -> bool {
    const LANES: usize = 16;
    let mut probe = [T::ZERO; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            probe[l] += c[l] * T::ZERO;
        }
    }
    let rest = chunks
        .remainder()
        .iter()
        .fold(T::ZERO, |a, v| a + *v * T::ZERO);
    probe.iter().fold(rest, |a, v| a + *v) == T::ZERO
}

/// `scale · x·y` in f64 from the rows scaled down by powers of two (exact) so that no entry
/// passes 2^h, h = (1021 − ⌈log2 D⌉)/2: no product of two entries nor any partial sum of D of
/// them overflows. f32 rows never need a step (their products fit f64). The sum is scaled back
/// with `scale` first where it is below 1, so the partial result overflows only where the
/// result does.
fn stepped_dot<T: Real>(x: &[T], y: &[T], scale: f64) -> f64 {
    let h = ((1021.0 - (x.len() as f64).log2().ceil()) / 2.0).floor();
    // A row of zeros or a NaN gives no step (f64::max ignores NaN); inf gives an inf step, NaN out.
    let step = |r: &[T]| {
        let top = r.iter().fold(0.0f64, |a, v| a.max(v.to_f64().abs()));
        (top.log2().floor() + 1.0 - h).max(0.0) as i32
    };
    let (sx, sy) = (step(x), step(y));
    let (fx, fy) = (2f64.powi(-sx), 2f64.powi(-sy));
    let sum: f64 = x
        .iter()
        .zip(y)
        .map(|(a, b)| (a.to_f64() * fx) * (b.to_f64() * fy))
        .sum();
    let back = |v: f64| v * 2f64.powi(sx) * 2f64.powi(sy);
    if scale.abs() < 1.0 {
        back(sum * scale)
    } else {
        back(sum) * scale
    }
}

/// The (scale-safe) rows and inverse row norms of `x` and `y` (ones without `normalize`), or
/// the error for a non-finite input when `check_finite` asks.
fn checked_norms<'a, T: Real>(
    input: &SimilarityInput<'a, T>,
    dims: SimilarityDims,
    params: &SimilarityParams,
) -> Result<(UnitRows<'a, T>, UnitRows<'a, T>)> {
    let (normalize, check) = (params.normalize, params.check_finite);
    let d = dims.features;
    let ux = unit_rows(input.x, dims.x_problems * dims.x_rows, d, normalize, check);
    let uy = unit_rows(input.y, dims.y_problems * dims.y_rows, d, normalize, check);
    if !ux.finite {
        return Err(not_finite("x"));
    }
    if !uy.finite {
        return Err(not_finite("y"));
    }
    Ok((ux, uy))
}

/// Shapes shared by the forward and the backward: `x`, `y`, the output (or its adjoint) named
/// `output.0`, and index arrays of one length whose entries address existing problems.
fn check_input<T>(
    input: &SimilarityInput<'_, T>,
    output: (&str, usize),
    dims: SimilarityDims,
) -> Result<()> {
    check_len("x", input.x.len(), dims.x())?;
    check_len("y", input.y.len(), dims.y())?;
    let pairs = input.x_index.len();
    if input.y_index.len() != pairs {
        return Err(MmotError::Shape(format!(
            "x_index and y_index must have the same length, got {pairs} and {}",
            input.y_index.len()
        )));
    }
    check_len(output.0, output.1, dims.out(pairs))?;
    for (name, idx, lim) in [
        ("x_index", input.x_index, dims.x_problems),
        ("y_index", input.y_index, dims.y_problems),
    ] {
        if let Some(bad) = idx.iter().find(|&&i| i < 0 || i as u64 >= lim as u64) {
            return Err(MmotError::InvalidArgument(format!(
                "{name} entries must be in 0..{lim}, got {bad}"
            )));
        }
    }
    Ok(())
}

/// One tile of output rows against all `m` columns: a GEMM, then the inverse norms and the
/// scale. `(dot · ix) · iy` is bounded by the cosine, so only a result beyond the dtype
/// overflows (an inf, never an inf · 0).
fn tile_kernel<T: Real>(xs: &[T], ys: &[T], ix: &[T], iy: &[T], out: &mut [T], d: usize, sc: T) {
    let rows = ix.len();
    let m = iy.len();
    if d == 0 {
        out.iter_mut().for_each(|o| *o = T::ZERO);
        return;
    }
    assert!(xs.len() >= rows * d && ys.len() >= m * d && out.len() >= rows * m);
    // SAFETY: the bounds above cover every element the strides reach.
    unsafe {
        gemm(
            [rows, d, m],
            MatrixRef::row_major(xs.as_ptr(), d),
            MatrixRef::transpose_of(ys.as_ptr(), d),
            T::ZERO,
            out.as_mut_ptr(),
            m,
        )
    }
    for (row, &xi) in out.chunks_exact_mut(m).zip(ix) {
        for (o, &yj) in row.iter_mut().zip(iy) {
            *o = *o * xi * yj * sc;
        }
    }
}

/// Gradients of [`similarity`]: given `grad` `[bo, n, m]` (the adjoint of `out`), writes
/// `gx` `[bx, n, d]` and `gy` `[by, m, d]`, summed over the output problems that share an
/// input problem (the broadcast).
///
/// With `ŷ = y / ν_y`, the adjoint of `x̂` is `u = scale · G ŷ`; through the normalisation
/// `x̂ = x / max(‖x‖, 1e-12)` it becomes `(u − x̂ ⟨x̂, u⟩) / ‖x‖` (or `u / 1e-12` below the
/// clamp). The products are GEMMs over fixed row blocks, summed in a fixed order
/// (deterministic for any thread count). `check_finite` works as in the forward.
pub fn similarity_backward<T: Real>(
    grad: &[T],
    input: SimilarityInput<'_, T>,
    gx: &mut [T],
    gy: &mut [T],
    dims: SimilarityDims,
    params: &SimilarityParams,
) -> Result<()> {
    check_input(&input, ("grad", grad.len()), dims)?;
    check_len("gx", gx.len(), dims.x())?;
    check_len("gy", gy.len(), dims.y())?;
    let SimilarityInput {
        x_index, y_index, ..
    } = input;
    let (bx, by) = (dims.x_problems, dims.y_problems);
    let (n, m, d) = (dims.x_rows, dims.y_rows, dims.features);
    let normalize = params.normalize;
    let sc = T::from_f64(params.scale);
    let (ux, uy) = checked_norms(&input, dims, params)?;
    let (x, y) = (&*ux.rows, &*uy.rows);
    let (ix, iy) = (&ux.unit, &uy.unit);
    let (nx, ny) = (ux.inv(), uy.inv());
    // Output problems reading each input problem, in order.
    let users = |idx: &[i64], nb: usize| -> Vec<Vec<usize>> {
        let mut u = vec![Vec::new(); nb];
        for (o, &i) in idx.iter().enumerate() {
            u[i as usize].push(o);
        }
        u
    };
    let xu = users(x_index, bx);
    let yu = users(y_index, by);
    let nm = n * m;

    // gx[xb, i] = scale Σ_o Σ_j G_o[i, j] ŷ[j]: per block of x rows, one GEMM per output
    // problem against the normalised y (a copy of y's size, which is the small side).
    let y_hat = scaled_rows(y, iy, d);
    // Ctrl-C: each task reads it first, and before each block of x rows on the y side.
    let stop = Interrupt::current();
    if n * d > 0 {
        gx.par_chunks_mut(n * d).enumerate().for_each(|(xb, gxp)| {
            gxp.par_chunks_mut(ROWS_PER_TASK * d)
                .enumerate()
                .for_each(|(t, tile)| {
                    if stop.requested() {
                        return;
                    }
                    tile.fill(T::ZERO);
                    let (i0, rows) = (t * ROWS_PER_TASK, tile.len() / d);
                    for &o in &xu[xb] {
                        let yb = y_index[o] as usize;
                        let g = &grad[o * nm + i0 * m..o * nm + (i0 + rows) * m];
                        let yh = &y_hat[yb * m * d..(yb + 1) * m * d];
                        // SAFETY: g is rows × m, yh is m × d and tile rows × d, all row-major.
                        unsafe {
                            gemm(
                                [rows, m, d],
                                MatrixRef::row_major(g.as_ptr(), m),
                                MatrixRef::row_major(yh.as_ptr(), d),
                                T::ONE,
                                tile.as_mut_ptr(),
                                d,
                            )
                        };
                    }
                    let r0 = xb * n + i0;
                    finish_rows(tile, &x[r0 * d..], &ix[r0..], &nx[r0..], d, sc, normalize);
                });
        });
    }
    // gy[yb, j] = scale Σ_o Σ_i G_o[i, j] x̂[i]: per block of y rows, GEMMs of Gᵀ against
    // blocks of normalised x rows, formed one block at a time (x is the large side).
    if m * d > 0 {
        gy.par_chunks_mut(m * d).enumerate().for_each(|(yb, gyp)| {
            gyp.par_chunks_mut(Y_TILE_ROWS * d)
                .enumerate()
                .for_each(|(t, tile)| {
                    tile.fill(T::ZERO);
                    let (j0, rows) = (t * Y_TILE_ROWS, tile.len() / d);
                    let mut x_block = vec![T::ZERO; X_BLOCK * d];
                    for &o in &yu[yb] {
                        let xb = x_index[o] as usize;
                        for i0 in (0..n).step_by(X_BLOCK) {
                            if stop.requested() {
                                return;
                            }
                            let len = X_BLOCK.min(n - i0);
                            let xs = &x[(xb * n + i0) * d..(xb * n + i0 + len) * d];
                            let xh = &mut x_block[..len * d];
                            scale_rows_into(xs, &ix[xb * n + i0..xb * n + i0 + len], d, xh);
                            let g = &grad
                                [o * nm + i0 * m + j0..o * nm + (i0 + len - 1) * m + j0 + rows];
                            // SAFETY: Gᵀ is read as rows × len with strides (1, m) inside g;
                            // xh is len × d and tile rows × d, row-major.
                            unsafe {
                                gemm(
                                    [rows, len, d],
                                    MatrixRef::transpose_of(g.as_ptr(), m),
                                    MatrixRef::row_major(xh.as_ptr(), d),
                                    T::ONE,
                                    tile.as_mut_ptr(),
                                    d,
                                )
                            };
                        }
                    }
                    let r0 = yb * m + j0;
                    finish_rows(tile, &y[r0 * d..], &iy[r0..], &ny[r0..], d, sc, normalize);
                });
        });
    }
    stop.check()
}

/// `out[r] = w[r] · src[r]` for rows of `d` values.
fn scale_rows_into<T: Real>(src: &[T], w: &[T], d: usize, out: &mut [T]) {
    for ((o, s), &wr) in out.chunks_exact_mut(d).zip(src.chunks_exact(d)).zip(w) {
        for (o, &s) in o.iter_mut().zip(s) {
            *o = wr * s;
        }
    }
}

/// A copy of `src` with row `r` scaled by `w[r]`, rows in parallel.
fn scaled_rows<T: Real>(src: &[T], w: &[T], d: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; src.len()];
    if d > 0 {
        out.par_chunks_mut(1024 * d)
            .zip(src.par_chunks(1024 * d))
            .zip(w.par_chunks(1024))
            .for_each(|((o, s), w)| scale_rows_into(s, w, d, o));
    }
    out
}

/// Scales the accumulated `u` rows by `scale` and applies the normalisation's adjoint:
/// `x̂ = xs · unit`, `inv = 1/max(‖x‖, 1e-12)`.
fn finish_rows<T: Real>(
    tile: &mut [T],
    xs: &[T],
    unit: &[T],
    inv: &[T],
    d: usize,
    sc: T,
    normalize: bool,
) {
    let clamp = T::from_f64(0.999e12);
    for (r, u) in tile.chunks_exact_mut(d).enumerate() {
        let iv = inv[r];
        if !normalize {
            for v in u.iter_mut() {
                *v *= sc;
            }
            continue;
        }
        if iv >= clamp {
            // ‖x‖ <= 1e-12: x̂ = x / 1e-12 is linear in x.
            for v in u.iter_mut() {
                *v = *v * iv * sc;
            }
            continue;
        }
        let xr = &xs[r * d..(r + 1) * d];
        let f = unit[r];
        let proj = dot(xr, u) * f;
        for p in 0..d {
            u[p] = (u[p] - xr[p] * f * proj) * iv * sc;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `scale · x yᵀ` without normalisation for one problem of each.
    fn raw<T: Real>(x: &[T], y: &[T], d: usize, scale: f64) -> Vec<T> {
        let (n, m) = (x.len() / d, y.len() / d);
        let mut out = vec![T::ZERO; n * m];
        let input = SimilarityInput {
            x,
            y,
            x_index: &[0],
            y_index: &[0],
        };
        let dims = SimilarityDims {
            x_problems: 1,
            x_rows: n,
            y_problems: 1,
            y_rows: m,
            features: d,
        };
        let params = SimilarityParams {
            normalize: false,
            scale,
            check_finite: true,
        };
        similarity(input, &mut out, dims, &params).unwrap();
        out
    }

    #[test]
    fn unnormalized_products_past_the_range_are_recomputed() {
        // [1e20, 1e20]·[1e20, −1e20] = 0 exactly, although each product overflows f32; the
        // second row's exact value 6e40 overflows f32 and stays inf.
        let x = [1e20f32, 1e20, 3e20, 1e20];
        let y = [1e20f32, -1e20];
        assert_eq!(raw(&x, &y, 2, 1.0), vec![0.0, 2e40f64 as f32]);
        // (3e40 − 6e20)·1e-10 = 3e30 fits f32 although its first product does not.
        let got = raw(&[3e20f32, 2.0], &[1e20f32, -3e20], 2, 1e-10);
        let want = (3e20f32 as f64 * 1e20f32 as f64 - 6e20) * 1e-10;
        assert!(
            (got[0] as f64 - want).abs() <= 1e-7 * want,
            "{} vs {want}",
            got[0]
        );
        // f64 rows of 1e200: stepped, then scaled back (scale below 1 first).
        let x = [1e200f64, 1e200, 1.5e200, -1e200];
        let y = [1e200f64, -0.5e200];
        let got = raw(&x, &y, 2, 1e-300);
        let want = [0.5e100, 2e100];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-15 * w, "{g} vs {w}");
        }
        assert_eq!(raw(&x, &y, 2, 1.0), vec![f64::INFINITY, f64::INFINITY]);
    }
}
