//! Batched (cosine) similarity `scale · x̂ ŷᵀ` (DESIGN.md §2.3).
//!
//! Normalised copies of `x` and `y` are never written: only the inverse row norms (`O(N+M)`
//! values) are computed, and each dot product is scaled by `scale · 1/‖x_i‖ · 1/‖y_j‖`. The batch
//! broadcast is resolved by the caller into index vectors, so one output problem may reuse the
//! same `x` or `y` problem many times without copies.

use crate::error::{check_len, MmotError, Result};
use crate::real::{Real, LANES};
use rayon::prelude::*;

/// x rows handled together: each `y` row loaded from cache serves this many dot products.
const IB: usize = 4;
/// y rows per block, so a block of `y` stays cache-resident while all `x` rows of a tile pass.
const JB: usize = 64;
/// Output rows per parallel task.
const ROWS_PER_TASK: usize = 32;

/// `out[o] = scale · x̂[x_index[o]] ŷ[y_index[o]]ᵀ`.
///
/// `x`: `[bx, n, d]`, `y`: `[by, m, d]`, `x_index`/`y_index`: `[bo]`, `out`: `[bo, n, m]`.
/// With `normalize`, rows are divided by `max(‖row‖₂, 1e-12)`.
#[allow(clippy::too_many_arguments)]
pub fn similarity<T: Real>(
    x: &[T],
    y: &[T],
    x_index: &[i64],
    y_index: &[i64],
    out: &mut [T],
    bx: usize,
    n: usize,
    by: usize,
    m: usize,
    d: usize,
    normalize: bool,
    scale: f64,
) -> Result<()> {
    check_len("x", x.len(), bx * n * d, &format!("[{bx}, {n}, {d}]"))?;
    check_len("y", y.len(), by * m * d, &format!("[{by}, {m}, {d}]"))?;
    let bo = x_index.len();
    if y_index.len() != bo {
        return Err(MmotError::Shape(format!(
            "x_index and y_index must have the same length, got {bo} and {}",
            y_index.len()
        )));
    }
    check_len("out", out.len(), bo * n * m, &format!("[{bo}, {n}, {m}]"))?;
    for (name, idx, lim) in [("x_index", x_index, bx), ("y_index", y_index, by)] {
        if let Some(bad) = idx.iter().find(|&&i| i < 0 || i as u64 >= lim as u64) {
            return Err(MmotError::InvalidArgument(format!(
                "{name} entries must be in 0..{lim}, got {bad}"
            )));
        }
    }
    if out.is_empty() {
        return Ok(());
    }
    let sc = T::from_f64(scale);
    let inv_norms = |a: &[T], rows: usize| -> Vec<T> {
        if !normalize {
            return vec![T::ONE; rows];
        }
        let tiny = T::from_f64(1e-12);
        let mut v = vec![T::ZERO; rows];
        v.par_chunks_mut(1024).enumerate().for_each(|(c, vs)| {
            for (i, vi) in vs.iter_mut().enumerate() {
                let r = c * 1024 + i;
                let row = &a[r * d..(r + 1) * d];
                *vi = T::ONE / crate::real::dot(row, row).sqrt().fmax(tiny);
            }
        });
        v
    };
    let ix = inv_norms(x, bx * n);
    let iy = inv_norms(y, by * m);

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
            });
    });
    Ok(())
}

/// One tile of output rows against all `m` columns.
fn tile_kernel<T: Real>(xs: &[T], ys: &[T], ix: &[T], iy: &[T], out: &mut [T], d: usize, sc: T) {
    let rows = ix.len();
    let m = iy.len();
    for j0 in (0..m).step_by(JB) {
        let j1 = (j0 + JB).min(m);
        let mut i = 0;
        while i + IB <= rows {
            let xr: [&[T]; IB] = std::array::from_fn(|u| &xs[(i + u) * d..(i + u + 1) * d]);
            for j in j0..j1 {
                let yr = &ys[j * d..(j + 1) * d];
                let dots = dot4(xr, yr);
                for u in 0..IB {
                    out[(i + u) * m + j] = dots[u] * (sc * ix[i + u] * iy[j]);
                }
            }
            i += IB;
        }
        while i < rows {
            let xr = &xs[i * d..(i + 1) * d];
            for j in j0..j1 {
                let yr = &ys[j * d..(j + 1) * d];
                out[i * m + j] = crate::real::dot(xr, yr) * (sc * ix[i] * iy[j]);
            }
            i += 1;
        }
    }
}

/// Four dot products sharing one `y` row, each with the same fixed lane order as `real::dot`.
#[inline(always)]
fn dot4<T: Real>(xr: [&[T]; IB], yr: &[T]) -> [T; IB] {
    let d = yr.len();
    let mut acc = [[T::ZERO; LANES]; IB];
    let full = d - d % LANES;
    let mut p = 0;
    while p < full {
        let yc = &yr[p..p + LANES];
        for u in 0..IB {
            let xc = &xr[u][p..p + LANES];
            for l in 0..LANES {
                acc[u][l] += xc[l] * yc[l];
            }
        }
        p += LANES;
    }
    std::array::from_fn(|u| {
        let a = acc[u];
        let mut s = T::ZERO;
        for q in full..d {
            s += xr[u][q] * yr[q];
        }
        (((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))) + s
    })
}
