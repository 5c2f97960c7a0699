//! PCMR's pairwise similarity regression through D×D Grams, never N×N without a margin (math
//! in `python/mmot/reverse/similarity_regression.py`).
//!
//! For modalities p < q with R the rows present in both (0/1 weights r), n = |R|,
//! K = n(n − 1), s_ij = â_i·b̂_j, t and u the match and non-match targets:
//!
//! ```text
//! match    = (1/n) Σ_R (s_ii − t)²
//! nonmatch = (1/K) [⟨G_a, G_b⟩ − Σ_R s_ii² − 2u (σ_a·σ_b − Σ_R s_ii) + K u²]
//! ```
//!
//! with G = Σ_R x̂ x̂ᵀ (D×D) and σ = Σ_R x̂. The non-match sum is clamped at 0 (NaN passes).
//! With every row present each modality's Gram serves all its pairs. With a margin μ the
//! non-match term is (1/K) Σ_{i≠j∈R} max(0, s_ij − u − μ)², summed over tiles of CHUNK rows by
//! TILE_COLS columns, recomputed in the backward. Grams are summed over fixed row parts (from
//! the shape alone) added in order, and every tile sum is added in order: results do not
//! depend on the thread count.

use crate::error::{check_len, not_finite, MmotError, Result};
use crate::exec::row_norms::{unit_rows, UnitRows};
use crate::interrupt::Interrupt;
use crate::simd::gemm::{gemm, MatrixRef};
use crate::simd::{dot, Real};
use rayon::prelude::*;

/// Rows per chunk: the unit of scratch copies, tiles and backward tasks.
const CHUNK: usize = 256;
/// Rows per Gram part at least (more when that would give over MAX_PARTS parts).
const PART_ROWS: usize = 2048;
/// At most this many Gram parts.
const MAX_PARTS: usize = 64;
/// Columns of a similarity tile in the margin path.
const TILE_COLS: usize = 1024;

/// The op's parameters.
#[derive(Clone, Copy, Debug)]
pub struct SimilarityRegressionParams {
    /// t, the target of an item's two embeddings' similarity.
    pub match_target: f64,
    /// u, the target of two different items' similarity.
    pub nonmatch_target: f64,
    /// μ ≥ 0 for the hinged non-match term, None for the regression.
    pub margin: Option<f64>,
    /// L2-normalise the rows first.
    pub normalize: bool,
    /// Return an error for NaN or Inf in the embeddings.
    pub check_finite: bool,
}

/// The embeddings `[modalities, rows, features]` and the presence mask `[modalities, rows]`
/// (non-zero: present).
#[derive(Clone, Copy, Debug)]
pub struct SimilarityRegressionInput<'a, T> {
    pub x: &'a [T],
    pub present: &'a [u8],
    pub modalities: usize,
    pub rows: usize,
    pub features: usize,
}

struct Prepared<'a, T: Real> {
    norms: Vec<UnitRows<'a, T>>,
    units: Vec<Vec<T>>,
    all_present: bool,
}

fn prepare<'a, T: Real>(
    input: &SimilarityRegressionInput<'a, T>,
    params: &SimilarityRegressionParams,
    check_finite: bool,
) -> Result<Prepared<'a, T>> {
    let (m, n, d) = (input.modalities, input.rows, input.features);
    check_len("embeddings", input.x.len(), [m, n, d])?;
    check_len("present", input.present.len(), [m, n])?;
    if let Some(mu) = params.margin {
        if !(mu >= 0.0 && mu.is_finite()) {
            return Err(MmotError::InvalidArgument(format!(
                "margin must be a finite number >= 0, got {mu}"
            )));
        }
    }
    let mut norms = Vec::with_capacity(m);
    let mut units = Vec::with_capacity(m);
    for k in 0..m {
        let data = &input.x[k * n * d..(k + 1) * n * d];
        let unit = unit_rows(data, n, d, params.normalize, check_finite);
        if !unit.finite {
            return Err(not_finite("embeddings"));
        }
        let mut rows = vec![T::ZERO; n * d];
        rows.par_chunks_mut(CHUNK * d.max(1))
            .enumerate()
            .for_each(|(c, out)| {
                for (r, row) in out.chunks_mut(d.max(1)).enumerate() {
                    let i = c * CHUNK + r;
                    let f = unit.unit[i];
                    for (o, &v) in row.iter_mut().zip(&unit.rows[i * d..(i + 1) * d]) {
                        *o = v * f;
                    }
                }
            });
        norms.push(unit);
        units.push(rows);
    }
    let all_present = input.present.iter().all(|&v| v != 0);
    Ok(Prepared {
        norms,
        units,
        all_present,
    })
}

/// The pair's row weights r (1 where present in both), or None when every row is present.
fn pair_weights<T: Real>(
    input: &SimilarityRegressionInput<'_, T>,
    all: bool,
    p: usize,
    q: usize,
) -> Option<Vec<T>> {
    if all {
        return None;
    }
    let n = input.rows;
    let (a, b) = (
        &input.present[p * n..(p + 1) * n],
        &input.present[q * n..(q + 1) * n],
    );
    Some(
        a.iter()
            .zip(b)
            .map(|(&x, &y)| if x != 0 && y != 0 { T::ONE } else { T::ZERO })
            .collect(),
    )
}

fn weight<T: Real>(r: Option<&[T]>, i: usize) -> T {
    r.map_or(T::ONE, |r| r[i])
}

/// Rows per Gram part, from the shape alone.
fn part_rows(n: usize) -> usize {
    PART_ROWS.max(n.div_ceil(MAX_PARTS).div_ceil(CHUNK) * CHUNK)
}

/// (G = Σ r_i x̂_i x̂_iᵀ `[d, d]`, σ = Σ r_i x̂_i `[d]`) over fixed row parts added in order.
fn gram<T: Real>(
    u: &[T],
    r: Option<&[T]>,
    n: usize,
    d: usize,
    stop: &Interrupt,
) -> (Vec<T>, Vec<T>) {
    let per = part_rows(n);
    let parts = n.div_ceil(per);
    let partials: Vec<(Vec<T>, Vec<T>)> = (0..parts)
        .into_par_iter()
        .map(|part| {
            let mut g = vec![T::ZERO; d * d];
            let mut s = vec![T::ZERO; d];
            let mut z = vec![T::ZERO; CHUNK * d];
            let last = n.min((part + 1) * per);
            for r0 in (part * per..last).step_by(CHUNK) {
                if stop.requested() {
                    break;
                }
                let rows = CHUNK.min(last - r0);
                for k in 0..rows {
                    let w = weight(r, r0 + k);
                    let src = &u[(r0 + k) * d..(r0 + k + 1) * d];
                    for ((o, &v), acc) in
                        z[k * d..(k + 1) * d].iter_mut().zip(src).zip(s.iter_mut())
                    {
                        *o = v * w;
                        *acc += *o;
                    }
                }
                // SAFETY: z holds rows × d values; g is d × d.
                unsafe {
                    gemm(
                        [d, rows, d],
                        MatrixRef::transpose_of(z.as_ptr(), d),
                        MatrixRef::row_major(z.as_ptr(), d),
                        T::ONE,
                        g.as_mut_ptr(),
                        d,
                    );
                }
            }
            (g, s)
        })
        .collect();
    let mut g = vec![T::ZERO; d * d];
    let mut s = vec![T::ZERO; d];
    for (pg, ps) in &partials {
        for (o, &v) in g.iter_mut().zip(pg) {
            *o += v;
        }
        for (o, &v) in s.iter_mut().zip(ps) {
            *o += v;
        }
    }
    (g, s)
}

/// s_ii = â_i·b̂_i for every row.
fn matched<T: Real>(a: &[T], b: &[T], n: usize, d: usize) -> Vec<T> {
    (0..n)
        .into_par_iter()
        .map(|i| dot(&a[i * d..(i + 1) * d], &b[i * d..(i + 1) * d]))
        .collect()
}

/// The similarity tile a[r0..r0+rows] · b[c0..c0+cols]ᵀ into `s` (`rows × cols`).
#[allow(clippy::too_many_arguments)]
fn tile<T: Real>(
    a: &[T],
    b: &[T],
    d: usize,
    r0: usize,
    rows: usize,
    c0: usize,
    cols: usize,
    s: &mut [T],
) {
    // SAFETY: a holds rows × d values from r0, b cols × d from c0, s rows × cols.
    unsafe {
        gemm(
            [rows, d, cols],
            MatrixRef::row_major(a[r0 * d..].as_ptr(), d),
            MatrixRef::transpose_of(b[c0 * d..].as_ptr(), d),
            T::ZERO,
            s.as_mut_ptr(),
            cols,
        );
    }
}

/// The hinge h_ij = max(0, s_ij − shift) of a tile entry, 0 on the diagonal and outside R.
fn hinge<T: Real>(s: T, shift: T, i: usize, j: usize, r: Option<&[T]>) -> T {
    if i == j || weight(r, i) == T::ZERO || weight(r, j) == T::ZERO {
        return T::ZERO;
    }
    let v = s - shift;
    // A NaN fails the comparison and passes.
    if v <= T::ZERO {
        T::ZERO
    } else {
        v
    }
}

/// Σ_{i≠j∈R} max(0, s_ij − shift)² over tiles, the row tiles' sums added in order.
fn hinge_sum<T: Real>(
    a: &[T],
    b: &[T],
    r: Option<&[T]>,
    n: usize,
    d: usize,
    shift: T,
    stop: &Interrupt,
) -> T {
    let partials: Vec<T> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let (r0, rows) = (c * CHUNK, CHUNK.min(n - c * CHUNK));
            let mut s = vec![T::ZERO; CHUNK * TILE_COLS];
            let mut total = T::ZERO;
            for c0 in (0..n).step_by(TILE_COLS) {
                if stop.requested() {
                    break;
                }
                let cols = TILE_COLS.min(n - c0);
                tile(a, b, d, r0, rows, c0, cols, &mut s);
                for k in 0..rows {
                    let mut row = T::ZERO;
                    for l in 0..cols {
                        let h = hinge(s[k * cols + l], shift, r0 + k, c0 + l, r);
                        row += h * h;
                    }
                    total += row;
                }
            }
            total
        })
        .collect();
    partials.into_iter().fold(T::ZERO, |acc, v| acc + v)
}

/// grad_a += coef · H b with H_ij = max(0, s_ij − shift) off the diagonal in R, tile by tile.
#[allow(clippy::too_many_arguments)]
fn hinge_grad<T: Real>(
    a: &[T],
    b: &[T],
    r: Option<&[T]>,
    n: usize,
    d: usize,
    shift: T,
    coef: T,
    grad: &mut [T],
    stop: &Interrupt,
) {
    grad.par_chunks_mut(CHUNK * d)
        .enumerate()
        .for_each(|(c, out)| {
            let (r0, rows) = (c * CHUNK, out.len() / d);
            let mut s = vec![T::ZERO; CHUNK * TILE_COLS];
            for c0 in (0..n).step_by(TILE_COLS) {
                if stop.requested() {
                    return;
                }
                let cols = TILE_COLS.min(n - c0);
                tile(a, b, d, r0, rows, c0, cols, &mut s);
                for k in 0..rows {
                    for l in 0..cols {
                        s[k * cols + l] = coef * hinge(s[k * cols + l], shift, r0 + k, c0 + l, r);
                    }
                }
                // SAFETY: s is rows × cols, b holds cols × d from c0, out rows × d.
                unsafe {
                    gemm(
                        [rows, cols, d],
                        MatrixRef::row_major(s.as_ptr(), cols),
                        MatrixRef::row_major(b[c0 * d..].as_ptr(), d),
                        T::ONE,
                        out.as_mut_ptr(),
                        d,
                    );
                }
            }
        });
}

/// grad_i += r_i (x̂_i W + v) for W `[d, d]`, v `[d]`, one GEMM per chunk.
fn add_product<T: Real>(
    u: &[T],
    r: Option<&[T]>,
    w: &[T],
    v: &[T],
    d: usize,
    grad: &mut [T],
    stop: &Interrupt,
) {
    grad.par_chunks_mut(CHUNK * d)
        .enumerate()
        .for_each(|(c, out)| {
            if stop.requested() {
                return;
            }
            let (r0, rows) = (c * CHUNK, out.len() / d);
            let mut tmp = vec![T::ZERO; rows * d];
            // SAFETY: u holds rows × d values from r0, W d × d, tmp rows × d.
            unsafe {
                gemm(
                    [rows, d, d],
                    MatrixRef::row_major(u[r0 * d..].as_ptr(), d),
                    MatrixRef::row_major(w.as_ptr(), d),
                    T::ZERO,
                    tmp.as_mut_ptr(),
                    d,
                );
            }
            for k in 0..rows {
                let wk = weight(r, r0 + k);
                if wk == T::ZERO {
                    continue;
                }
                for ((o, &t), &vv) in out[k * d..(k + 1) * d]
                    .iter_mut()
                    .zip(&tmp[k * d..(k + 1) * d])
                    .zip(v)
                {
                    *o += wk * (t + vv);
                }
            }
        });
}

fn pairs(m: usize) -> Vec<(usize, usize)> {
    (0..m)
        .flat_map(|p| (p + 1..m).map(move |q| (p, q)))
        .collect()
}

/// The pair's row count n as a number, and K = n(n − 1).
fn counts<T: Real>(r: Option<&[T]>, n: usize) -> (T, T) {
    let count = r.map_or(T::from_f64(n as f64), |r| {
        r.iter().fold(T::ZERO, |a, &v| a + v)
    });
    (count, count * (count - T::ONE))
}

/// `terms` `[2, M, M]`: the match and non-match means of each pair p < q (0 elsewhere).
pub fn similarity_regression_forward<T: Real>(
    input: SimilarityRegressionInput<'_, T>,
    terms: &mut [T],
    params: &SimilarityRegressionParams,
) -> Result<()> {
    let (m, n, d) = (input.modalities, input.rows, input.features);
    check_len("terms", terms.len(), [2, m, m])?;
    let prep = prepare(&input, params, params.check_finite)?;
    terms.fill(T::ZERO);
    let stop = Interrupt::current();
    let (t, u) = (
        T::from_f64(params.match_target),
        T::from_f64(params.nonmatch_target),
    );
    let mut cache: Vec<Option<(Vec<T>, Vec<T>)>> = (0..m).map(|_| None).collect();
    for (p, q) in pairs(m) {
        let r = pair_weights(&input, prep.all_present, p, q);
        let r = r.as_deref();
        let (count, k) = counts(r, n);
        if count == T::ZERO {
            continue;
        }
        let (a, b) = (&prep.units[p], &prep.units[q]);
        let diag = matched(a, b, n, d);
        let (mut dev, mut sq, mut sum) = (T::ZERO, T::ZERO, T::ZERO);
        for (i, &s) in diag.iter().enumerate() {
            let w = weight(r, i);
            dev += w * (s - t) * (s - t);
            sq += w * s * s;
            sum += w * s;
        }
        terms[p * m + q] = dev / count;
        if k == T::ZERO {
            continue;
        }
        let nonmatch = if let Some(mu) = params.margin {
            hinge_sum(a, b, r, n, d, u + T::from_f64(mu), &stop) / k
        } else {
            let (ga, sa, gb, sb);
            let (fa, fb);
            if prep.all_present {
                for idx in [p, q] {
                    if cache[idx].is_none() {
                        cache[idx] = Some(gram(&prep.units[idx], None, n, d, &stop));
                    }
                }
                let (ca, cb) = (cache[p].as_ref().unwrap(), cache[q].as_ref().unwrap());
                (ga, sa, gb, sb) = (&ca.0, &ca.1, &cb.0, &cb.1);
            } else {
                fa = gram(a, r, n, d, &stop);
                fb = gram(b, r, n, d, &stop);
                (ga, sa, gb, sb) = (&fa.0, &fa.1, &fb.0, &fb.1);
            }
            let two = T::from_f64(2.0);
            let total = dot(ga, gb) - sq - two * u * (dot(sa, sb) - sum) + k * u * u;
            (if total < T::ZERO { T::ZERO } else { total }) / k
        };
        terms[m * m + p * m + q] = nonmatch;
    }
    stop.check()?;
    Ok(())
}

/// `grad` `[M, N, D]`: the gradient of Σ c ⊙ terms for the cotangents `c` `[2, M, M]`.
pub fn similarity_regression_backward<T: Real>(
    c: &[T],
    input: SimilarityRegressionInput<'_, T>,
    grad: &mut [T],
    params: &SimilarityRegressionParams,
) -> Result<()> {
    let (m, n, d) = (input.modalities, input.rows, input.features);
    check_len("grad", c.len(), [2, m, m])?;
    check_len("grad_embeddings", grad.len(), [m, n, d])?;
    let prep = prepare(&input, params, false)?;
    grad.fill(T::ZERO);
    if n == 0 || d == 0 {
        return Ok(());
    }
    let stop = Interrupt::current();
    let (t, u) = (
        T::from_f64(params.match_target),
        T::from_f64(params.nonmatch_target),
    );
    let two = T::from_f64(2.0);
    let shared = prep.all_present && params.margin.is_none();
    let grams: Vec<(Vec<T>, Vec<T>)> = if shared {
        (0..m)
            .map(|k| gram(&prep.units[k], None, n, d, &stop))
            .collect()
    } else {
        Vec::new()
    };
    let mut mixed = vec![T::ZERO; if shared { m * d * d } else { 0 }];
    let mut shifts = vec![T::ZERO; if shared { m * d } else { 0 }];
    let per = n * d;
    for (p, q) in pairs(m) {
        let r = pair_weights(&input, prep.all_present, p, q);
        let r = r.as_deref();
        let (count, k) = counts(r, n);
        if count == T::ZERO {
            continue;
        }
        let (c0, c1) = (
            c[p * m + q],
            if k == T::ZERO {
                T::ZERO
            } else {
                c[m * m + p * m + q]
            },
        );
        let (a, b) = (&prep.units[p], &prep.units[q]);
        let diag = matched(a, b, n, d);
        let g: Vec<T> = diag
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let mut v = two * c0 * (s - t) / count;
                if params.margin.is_none() && k != T::ZERO {
                    v -= two * c1 * (s - u) / k;
                }
                v * weight(r, i)
            })
            .collect();
        let (lo, hi) = grad.split_at_mut(q * per);
        let (gp, gq) = (&mut lo[p * per..(p + 1) * per], &mut hi[..per]);
        gp.par_chunks_mut(d)
            .zip(gq.par_chunks_mut(d))
            .enumerate()
            .for_each(|(i, (op, oq))| {
                let gi = g[i];
                for l in 0..d {
                    op[l] += gi * b[i * d + l];
                    oq[l] += gi * a[i * d + l];
                }
            });
        if k == T::ZERO {
            continue;
        }
        let scale = two * c1 / k;
        if let Some(mu) = params.margin {
            let shift = u + T::from_f64(mu);
            hinge_grad(a, b, r, n, d, shift, scale, gp, &stop);
            hinge_grad(b, a, r, n, d, shift, scale, gq, &stop);
        } else if shared {
            for (dst, src) in [(p, q), (q, p)] {
                let (gs, ss) = &grams[src];
                for (o, &v) in mixed[dst * d * d..(dst + 1) * d * d].iter_mut().zip(gs) {
                    *o += scale * v;
                }
                for (o, &v) in shifts[dst * d..(dst + 1) * d].iter_mut().zip(ss) {
                    *o -= scale * u * v;
                }
            }
        } else {
            let (ga, sa) = gram(a, r, n, d, &stop);
            let (gb, sb) = gram(b, r, n, d, &stop);
            let scaled = |g: &[T]| g.iter().map(|&v| scale * v).collect::<Vec<T>>();
            let shifted = |s: &[T]| s.iter().map(|&v| -(scale * u * v)).collect::<Vec<T>>();
            add_product(a, r, &scaled(&gb), &shifted(&sb), d, gp, &stop);
            add_product(b, r, &scaled(&ga), &shifted(&sa), d, gq, &stop);
        }
    }
    if shared {
        for (k, out) in grad.chunks_mut(per).enumerate() {
            add_product(
                &prep.units[k],
                None,
                &mixed[k * d * d..(k + 1) * d * d],
                &shifts[k * d..(k + 1) * d],
                d,
                out,
                &stop,
            );
        }
    }
    stop.check()?;
    for (k, out) in grad.chunks_mut(per).enumerate() {
        prep.norms[k].finish_gradient(d, T::ONE, params.normalize, out);
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

    /// The per-pair [match, non-match] means straight from the similarities, row pair by row pair.
    fn dense(
        x: &[f64],
        present: &[u8],
        m: usize,
        n: usize,
        d: usize,
        p: &SimilarityRegressionParams,
    ) -> Vec<f64> {
        let unit = |k: usize, i: usize| -> Vec<f64> {
            let row = &x[(k * n + i) * d..(k * n + i + 1) * d];
            let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
            row.iter()
                .map(|v| if p.normalize { v / norm } else { *v })
                .collect()
        };
        let mut out = vec![0.0; 2 * m * m];
        for a in 0..m {
            for b in a + 1..m {
                let rows: Vec<usize> = (0..n)
                    .filter(|&i| present[a * n + i] != 0 && present[b * n + i] != 0)
                    .collect();
                let k = rows.len() as f64;
                let (mut matched, mut other) = (0.0, 0.0);
                for &i in &rows {
                    for &j in &rows {
                        let s: f64 = unit(a, i).iter().zip(unit(b, j)).map(|(u, v)| u * v).sum();
                        if i == j {
                            matched += (s - p.match_target).powi(2);
                        } else {
                            let mut v = s - p.nonmatch_target;
                            if let Some(mu) = p.margin {
                                v = (v - mu).max(0.0);
                            }
                            other += v * v;
                        }
                    }
                }
                if k > 0.0 {
                    out[a * m + b] = matched / k;
                }
                if k > 1.0 {
                    out[m * m + a * m + b] = other / (k * (k - 1.0));
                }
            }
        }
        out
    }

    /// 300 rows: two 256-row chunks; a mask and a margin; the Gram form and the tiles against the
    /// literal sums.
    #[test]
    fn matches_the_dense_sums_over_several_chunks() {
        let (m, n, d) = (3, 300, 7);
        let mut seed = 5;
        let x: Vec<f64> = (0..m * n * d).map(|_| lcg(&mut seed)).collect();
        let all = vec![1u8; m * n];
        let masked: Vec<u8> = (0..m * n)
            .map(|_| u8::from(lcg(&mut seed) > -0.5))
            .collect();
        for present in [&all, &masked] {
            for margin in [None, Some(0.1)] {
                let params = SimilarityRegressionParams {
                    match_target: 0.8,
                    nonmatch_target: 0.05,
                    margin,
                    normalize: true,
                    check_finite: true,
                };
                let input = SimilarityRegressionInput {
                    x: &x,
                    present,
                    modalities: m,
                    rows: n,
                    features: d,
                };
                let mut terms = vec![f64::NAN; 2 * m * m];
                similarity_regression_forward(input, &mut terms, &params).unwrap();
                for (got, want) in terms.iter().zip(dense(&x, present, m, n, d, &params)) {
                    assert!(
                        (got - want).abs() <= 1e-12 * want.abs().max(1.0),
                        "{got} vs {want}"
                    );
                }
            }
        }
    }
}
