//! Feature-separation (orthogonality) loss between shared and modality-specific features.
//!
//! With Ŝ the rows of `shared` (`[N, D_s]`) and Ĥ those of `specific` (`[N, D_h]`), each
//! L2-normalised when `normalize`, and C = ŜᵀĤ (`[D_s, D_h]`):
//!
//! ```text
//! L  = ‖C‖²_F / N²
//! ∂Ŝ = (2g/N²) Ĥ Cᵀ,   ∂Ĥ = (2g/N²) Ŝ C
//! ```
//!
//! then through the normalisation. The forward makes one pass over fixed row chunks, each a
//! GEMM into its own partial Gram; the partials are added in chunk order. The chunking depends
//! only on N, so results do not depend on the thread count. The backward is two GEMMs per row
//! block against the saved C. Normalised copies are never written (`exec::row_norms`).

use crate::error::{check_len, not_finite, Result};
use crate::exec::row_norms::{unit_rows, UnitRows};
use crate::interrupt::Interrupt;
use crate::simd::gemm::{gemm, MatrixRef};
use crate::simd::{dot, Real};
use rayon::prelude::*;

/// Rows per backward block, and the fewest rows of a forward chunk.
const TILE: usize = 256;
/// The forward keeps at most this many partial Grams (chunks grow with N beyond it), which
/// bounds its extra memory at 32·D_s·D_h values.
const MAX_PARTIALS: usize = 32;
/// Gram elements per task of the partials' reduction.
const REDUCE_BLOCK: usize = 4096;

/// The loss's flags.
#[derive(Clone, Copy, Debug)]
pub struct FeatureSeparationParams {
    /// L2-normalise the rows of both inputs first.
    pub normalize: bool,
    /// Return an error (not a result) for NaN or Inf in either input, found in the row-norm
    /// pass.
    pub check_finite: bool,
}

/// The arrays both passes read: row `i` of each belongs to the same sample.
#[derive(Clone, Copy, Debug)]
pub struct FeatureSeparationInput<'a, T> {
    /// `[rows, shared_dim]`.
    pub shared: &'a [T],
    /// `[rows, specific_dim]`.
    pub specific: &'a [T],
    pub rows: usize,
    pub shared_dim: usize,
    pub specific_dim: usize,
}

struct Prepared<'a, T: Real> {
    s: UnitRows<'a, T>,
    h: UnitRows<'a, T>,
    n: usize,
    ds: usize,
    dh: usize,
    stop: Interrupt,
}

fn prepare<'a, T: Real>(
    input: &FeatureSeparationInput<'a, T>,
    params: &FeatureSeparationParams,
) -> Result<Prepared<'a, T>> {
    let (n, ds, dh) = (input.rows, input.shared_dim, input.specific_dim);
    check_len("shared", input.shared.len(), [n, ds])?;
    check_len("specific", input.specific.len(), [n, dh])?;
    let read = |name, data, d| {
        let unit = unit_rows(data, n, d, params.normalize, params.check_finite);
        if unit.finite {
            Ok(unit)
        } else {
            Err(not_finite(name))
        }
    };
    Ok(Prepared {
        s: read("shared", input.shared, ds)?,
        h: read("specific", input.specific, dh)?,
        n,
        ds,
        dh,
        stop: Interrupt::current(),
    })
}

/// Rows per forward chunk: a function of N alone (never of the thread count).
fn chunk_rows(n: usize) -> usize {
    TILE.max(n.div_ceil(MAX_PARTIALS))
}

/// The loss (`loss`: `[1]`) and the Gram C = ŜᵀĤ (`gram`: `[shared_dim, specific_dim]`) that
/// the backward reads.
pub fn feature_separation_forward<T: Real>(
    input: FeatureSeparationInput<'_, T>,
    loss: &mut [T],
    gram: &mut [T],
    params: &FeatureSeparationParams,
) -> Result<()> {
    let p = prepare(&input, params)?;
    let (n, ds, dh) = (p.n, p.ds, p.dh);
    check_len("loss", loss.len(), [1])?;
    check_len("gram", gram.len(), [ds, dh])?;
    let width = ds * dh;
    let rows_per = chunk_rows(n);
    let chunks = n.div_ceil(rows_per);
    if width == 0 || chunks == 0 {
        gram.fill(T::ZERO);
        loss[0] = T::ZERO;
        return Ok(());
    }
    let mut partials = vec![T::ZERO; chunks * width];
    partials
        .par_chunks_mut(width)
        .enumerate()
        .for_each(|(c, part)| {
            if p.stop.requested() {
                return;
            }
            let i0 = c * rows_per;
            let rows = rows_per.min(n - i0);
            // Ĥ rows times both unit factors, so that one GEMM of the raw Ŝ rows gives ŜᵀĤ.
            let mut scaled = vec![T::ZERO; rows * dh];
            for (r, out) in scaled.chunks_exact_mut(dh).enumerate() {
                let i = i0 + r;
                let k = p.s.unit[i] * p.h.unit[i];
                for (o, &v) in out.iter_mut().zip(&p.h.rows[i * dh..(i + 1) * dh]) {
                    *o = k * v;
                }
            }
            // SAFETY: A is rows × ds of `shared` read transposed (ds × rows), B the rows × dh
            // scratch, C this chunk's own ds × dh partial; the slices cover every element.
            unsafe {
                gemm(
                    [ds, rows, dh],
                    MatrixRef::transpose_of(p.s.rows[i0 * ds..].as_ptr(), ds),
                    MatrixRef::row_major(scaled.as_ptr(), dh),
                    T::ZERO,
                    part.as_mut_ptr(),
                    dh,
                )
            }
        });
    p.stop.check()?;
    // Each Gram element sums its partials in chunk order.
    gram.par_chunks_mut(REDUCE_BLOCK)
        .enumerate()
        .for_each(|(b, out)| {
            let e0 = b * REDUCE_BLOCK;
            out.copy_from_slice(&partials[e0..e0 + out.len()]);
            for c in 1..chunks {
                let part = &partials[c * width + e0..c * width + e0 + out.len()];
                for (o, &v) in out.iter_mut().zip(part) {
                    *o += v;
                }
            }
        });
    // ‖C/N‖²: divided first, so that only a loss beyond the dtype overflows.
    let inv_n = T::ONE / T::from_f64(n as f64);
    let scaled: Vec<T> = gram.iter().map(|&v| v * inv_n).collect();
    loss[0] = dot(&scaled, &scaled);
    Ok(())
}

/// Gradients of `grad[0]·L` with respect to `shared` and `specific` from the forward's `gram`.
pub fn feature_separation_backward<T: Real>(
    grad: &[T],
    input: FeatureSeparationInput<'_, T>,
    gram: &[T],
    grad_shared: &mut [T],
    grad_specific: &mut [T],
    params: &FeatureSeparationParams,
) -> Result<()> {
    let params = FeatureSeparationParams {
        check_finite: false,
        ..*params
    };
    let p = prepare(&input, &params)?;
    let (n, ds, dh) = (p.n, p.ds, p.dh);
    check_len("grad", grad.len(), [1])?;
    check_len("gram", gram.len(), [ds, dh])?;
    check_len("grad_shared", grad_shared.len(), [n, ds])?;
    check_len("grad_specific", grad_specific.len(), [n, dh])?;
    if n == 0 {
        return Ok(());
    }
    if ds == 0 || dh == 0 {
        // No Gram: the loss is 0 whatever the rows.
        grad_shared.fill(T::ZERO);
        grad_specific.fill(T::ZERO);
        return Ok(());
    }
    // ∂Ŝ_i = ĥ_i Cᵀ (B = Cᵀ, dh × ds) and ∂Ĥ_i = ŝ_i C (B = C, ds × dh), each ĥ_i or ŝ_i read as
    // its raw row times its unit factor.
    let sides = [
        (
            &mut *grad_shared,
            &p.h,
            dh,
            ds,
            MatrixRef::transpose_of(gram.as_ptr(), dh),
        ),
        (
            &mut *grad_specific,
            &p.s,
            ds,
            dh,
            MatrixRef::row_major(gram.as_ptr(), dh),
        ),
    ];
    for (out, other, d_in, d_out, b) in sides {
        let b = SharedRef(b);
        out.par_chunks_mut(TILE * d_out)
            .enumerate()
            .for_each(|(c, block)| {
                if p.stop.requested() {
                    return;
                }
                let (i0, rows) = (c * TILE, block.len() / d_out);
                // SAFETY: A is rows × d_in of the other input from row i0, B the d_in × d_out
                // Gram (as given), C this task's own block of rows.
                unsafe {
                    gemm(
                        [rows, d_in, d_out],
                        MatrixRef::row_major(other.rows[i0 * d_in..].as_ptr(), d_in),
                        b.get(),
                        T::ZERO,
                        block.as_mut_ptr(),
                        d_out,
                    )
                }
                for (r, row) in block.chunks_exact_mut(d_out).enumerate() {
                    let k = other.unit[i0 + r];
                    row.iter_mut().for_each(|v| *v *= k);
                }
            });
    }
    p.stop.check()?;
    // 2g/N², applied last by finish_gradient.
    let inv_n = T::ONE / T::from_f64(n as f64);
    let scale = T::from_f64(2.0) * grad[0] * inv_n * inv_n;
    p.s.finish_gradient(ds, scale, params.normalize, grad_shared);
    p.h.finish_gradient(dh, scale, params.normalize, grad_specific);
    Ok(())
}

/// A read-only matrix operand shared between rayon tasks.
#[derive(Clone, Copy)]
struct SharedRef<T>(MatrixRef<T>);
// SAFETY: it points into `gram`, which no task writes while the tasks run.
unsafe impl<T> Send for SharedRef<T> {}
unsafe impl<T> Sync for SharedRef<T> {}

impl<T> SharedRef<T> {
    /// A method, so that closures capture the whole wrapper and not the bare pointer.
    fn get(self) -> MatrixRef<T> {
        self.0
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

    /// The loss straight from the definition: normalised copies, C summed sample by sample.
    fn dense(s: &[f64], h: &[f64], n: usize, ds: usize, dh: usize, normalize: bool) -> f64 {
        let unit = |v: &[f64]| -> Vec<f64> {
            let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
            v.iter()
                .map(|a| if normalize { a / norm } else { *a })
                .collect()
        };
        let su: Vec<Vec<f64>> = (0..n).map(|i| unit(&s[i * ds..(i + 1) * ds])).collect();
        let hu: Vec<Vec<f64>> = (0..n).map(|i| unit(&h[i * dh..(i + 1) * dh])).collect();
        let mut c = vec![0.0; ds * dh];
        for (si, hi) in su.iter().zip(&hu) {
            for (row, &sa) in c.chunks_exact_mut(dh).zip(si) {
                for (v, &hb) in row.iter_mut().zip(hi) {
                    *v += sa * hb;
                }
            }
        }
        c.iter().map(|v| v * v).sum::<f64>() / (n * n) as f64
    }

    fn run(
        s: &[f64],
        h: &[f64],
        n: usize,
        ds: usize,
        dh: usize,
        normalize: bool,
        g: f64,
    ) -> (f64, Vec<f64>, Vec<f64>) {
        let params = FeatureSeparationParams {
            normalize,
            check_finite: true,
        };
        let input = FeatureSeparationInput {
            shared: s,
            specific: h,
            rows: n,
            shared_dim: ds,
            specific_dim: dh,
        };
        let (mut loss, mut gram) = ([f64::NAN], vec![f64::NAN; ds * dh]);
        feature_separation_forward(input, &mut loss, &mut gram, &params).unwrap();
        let (mut gs, mut gh) = (vec![f64::NAN; n * ds], vec![f64::NAN; n * dh]);
        feature_separation_backward(&[g], input, &gram, &mut gs, &mut gh, &params).unwrap();
        (loss[0], gs, gh)
    }

    #[test]
    fn feature_separation_matches_dense_and_finite_differences() {
        // 9000 rows: 32 chunks of 282 rows (a ragged last one), and 36 backward blocks.
        for (n, ds, dh) in [(9000, 7, 5), (300, 3, 11), (1, 4, 4)] {
            let mut seed = 5u64 + n as u64;
            let mut s: Vec<f64> = (0..n * ds).map(|_| lcg(&mut seed)).collect();
            let mut h: Vec<f64> = (0..n * dh).map(|_| lcg(&mut seed)).collect();
            for normalize in [true, false] {
                let g = 0.7;
                let (loss, gs, gh) = run(&s, &h, n, ds, dh, normalize, g);
                let want = dense(&s, &h, n, ds, dh, normalize);
                assert!(
                    (loss - want).abs() <= 1e-12 * want.max(1.0),
                    "{loss} vs {want}"
                );
                let step = 1e-6;
                for (which, e) in [(0, 0), (0, n * ds - 1), (1, 3), (1, n * dh - 2)] {
                    let vals = if which == 0 { &mut s } else { &mut h };
                    let keep = vals[e];
                    vals[e] = keep + step;
                    let up = dense(&s, &h, n, ds, dh, normalize);
                    let vals = if which == 0 { &mut s } else { &mut h };
                    vals[e] = keep - step;
                    let down = dense(&s, &h, n, ds, dh, normalize);
                    let vals = if which == 0 { &mut s } else { &mut h };
                    vals[e] = keep;
                    let fd = g * (up - down) / (2.0 * step);
                    let got = if which == 0 { gs[e] } else { gh[e] };
                    assert!(
                        (fd - got).abs() <= 1e-6 * fd.abs() + 1e-9,
                        "n={n} input {which}[{e}]: {fd} vs {got}"
                    );
                }
            }
        }
    }

    #[test]
    fn feature_separation_is_identical_across_thread_counts() {
        let (n, ds, dh) = (5000, 33, 17);
        let mut seed = 9u64;
        let s: Vec<f32> = (0..n * ds).map(|_| lcg(&mut seed) as f32).collect();
        let h: Vec<f32> = (0..n * dh).map(|_| lcg(&mut seed) as f32).collect();
        let params = FeatureSeparationParams {
            normalize: true,
            check_finite: true,
        };
        let once = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let input = FeatureSeparationInput {
                    shared: &s,
                    specific: &h,
                    rows: n,
                    shared_dim: ds,
                    specific_dim: dh,
                };
                let (mut loss, mut gram) = ([0.0f32], vec![0.0f32; ds * dh]);
                feature_separation_forward(input, &mut loss, &mut gram, &params).unwrap();
                let (mut gs, mut gh) = (vec![0.0f32; n * ds], vec![0.0f32; n * dh]);
                feature_separation_backward(&[1.0], input, &gram, &mut gs, &mut gh, &params)
                    .unwrap();
                (loss[0].to_bits(), gram, gs, gh)
            })
        };
        assert!(once(1) == once(3));
    }

    #[test]
    fn feature_separation_handles_empty_and_rejects_bad_input() {
        let params = FeatureSeparationParams {
            normalize: true,
            check_finite: true,
        };
        let input = |s: &'static [f32], h: &'static [f32], n| FeatureSeparationInput {
            shared: s,
            specific: h,
            rows: n,
            shared_dim: 2,
            specific_dim: 3,
        };
        let (mut loss, mut gram) = ([f32::NAN], [f32::NAN; 6]);
        feature_separation_forward(input(&[], &[], 0), &mut loss, &mut gram, &params).unwrap();
        assert!(loss[0] == 0.0 && gram.iter().all(|v| *v == 0.0));
        let err = feature_separation_forward(
            input(&[1.0; 4], &[1.0; 5], 2),
            &mut loss,
            &mut gram,
            &params,
        );
        assert!(err
            .unwrap_err()
            .to_string()
            .starts_with("specific has 5 elements"));
        let bad: &'static [f32] = &[1.0, 2.0, f32::NAN, 0.0];
        let err =
            feature_separation_forward(input(bad, &[1.0; 6], 2), &mut loss, &mut gram, &params);
        assert_eq!(
            err.unwrap_err().to_string(),
            "argument 'shared' must be finite; found NaN or Inf"
        );
        let unchecked = FeatureSeparationParams {
            check_finite: false,
            ..params
        };
        feature_separation_forward(input(bad, &[1.0; 6], 2), &mut loss, &mut gram, &unchecked)
            .unwrap();
        assert!(loss[0].is_nan());
    }
}
