//! SSPC's anchor-consistency loss: the mean over all entries of
//! BCE-with-logits(z, t) = softplus(z) − t·z with z = exp(sim/τ) (> 0, so
//! softplus(z) = z + ln(1 + e^{−z})), and its gradient (see `docs/gradients.md`).
//!
//! The term is evaluated as (1 − t)·z + ln(1 + e^{−z}); where (1 − t)·z overflows the input
//! type it is recomputed in f64 as ±e^{x + ln|1 − t|}, x = sim/τ, so the loss and gradient are
//! finite wherever the exact values are (0 at t = 1 however large z is) and ±inf only where the
//! exact value overflows. The gradient falls back to an f64 form (`gradient_term`) wherever its
//! product in T would lose it to underflow (e^x below T's normal range with a tiny τ still gives
//! a normal gradient). With the finiteness check off, NaN or ±inf in `sim` or `target`
//! gives a NaN loss and NaN gradient entries there.

use crate::error::{check_len, not_finite, MmotError, Result};
use crate::simd::Real;
use rayon::prelude::*;

/// Elements per task in the reductions (fixed, so sums are deterministic).
const TASK_LEN: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AnchorConsistencyParams {
    /// τ > 0: the logits are `exp(sim / τ)`.
    pub temperature: f64,
    /// The forward reports NaN or Inf in `sim` or `target` as an error (the backward ignores it).
    pub check_finite: bool,
}

fn check(sim_len: usize, target_len: usize, params: &AnchorConsistencyParams) -> Result<()> {
    let temperature = params.temperature;
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(MmotError::InvalidArgument(format!(
            "temperature must be a finite number > 0, got {temperature}"
        )));
    }
    check_len("target", target_len, [sim_len])
}

/// The loss of `sim` against `target` (same length). Partial sums are taken per fixed chunk in
/// f64 and added in order. Returns 0 for empty input.
pub fn anchor_consistency_forward<T: Real>(
    sim: &[T],
    target: &[T],
    params: &AnchorConsistencyParams,
) -> Result<f64> {
    check(sim.len(), target.len(), params)?;
    if sim.is_empty() {
        return Ok(0.0);
    }
    let inv = T::from_f64(1.0 / params.temperature);
    let inv64 = 1.0 / params.temperature;
    // Each chunk also sums `0 · x`, which is 0 for finite x and NaN otherwise: the value check
    // costs two operations an element in the pass the loss makes anyway, and without the check
    // the probe makes the loss NaN (non-finite in, non-finite out).
    let partials: Vec<(f64, T, T)> = sim
        .par_chunks(TASK_LEN)
        .zip(target.par_chunks(TASK_LEN))
        .map(|(s, t)| {
            let (mut acc, mut sim_probe, mut target_probe) = (0.0f64, T::ZERO, T::ZERO);
            for (sv, tv) in s.iter().zip(t) {
                let z = (*sv * inv).exp_fast();
                let lin = (T::ONE - *tv) * z;
                let lin = if lin.to_f64().is_finite() {
                    lin.to_f64()
                } else {
                    linear_term(sv.to_f64() * inv64, tv.to_f64())
                };
                acc += lin + softplus_neg(z).to_f64();
                sim_probe += *sv * T::ZERO;
                target_probe += *tv * T::ZERO;
            }
            (acc, sim_probe, target_probe)
        })
        .collect();
    if params.check_finite {
        if partials.iter().any(|p| p.1 != T::ZERO) {
            return Err(not_finite("sim"));
        }
        if partials.iter().any(|p| p.2 != T::ZERO) {
            return Err(not_finite("target"));
        }
    }
    let total: f64 = partials.iter().map(|p| p.0 + (p.1 + p.2).to_f64()).sum();
    Ok(total / sim.len() as f64)
}

/// `(1 − t)·e^x` without forming e^x, so it is finite wherever the product is (0 for t = 1
/// exactly, ±inf only where the product overflows f64).
fn linear_term(x: f64, t: f64) -> f64 {
    let one_minus = 1.0 - t;
    if one_minus == 0.0 {
        return 0.0;
    }
    (x + one_minus.abs().ln()).exp().copysign(one_minus)
}

/// grad/count · e^x·((1 − t) − σ(−e^x))/τ in f64 (`log_c` = ln|grad/(count·τ)|), formed so that
/// it under- or overflows only where the result does: the product where its factors are
/// normal, else ±e^{x + log_c + ln|b|}, b = (1 − t) − σ(−z), ln|b| = −softplus(z) for t = 1.
fn gradient_term(x: f64, t: f64, grad: f64, log_c: f64) -> f64 {
    if grad == 0.0 {
        return 0.0;
    }
    let z = x.exp();
    let e = (-z).exp();
    let b = (1.0 - t) - e / (1.0 + e);
    let direct = log_c.exp().copysign(grad) * (z * b);
    let normal = |v: f64| v.abs() >= f64::MIN_POSITIVE && v.is_finite();
    if normal(direct) && normal(z) && (t != 1.0 || normal(e)) {
        return direct;
    }
    let (log_b, sign_b) = if t == 1.0 {
        (-(z + e.ln_1p()), -1.0)
    } else {
        (b.abs().ln(), b.signum())
    };
    if log_b == f64::NEG_INFINITY {
        return 0.0; // b = 0, or t = 1 where z overflowed: e^{x − z} = 0
    }
    (x + log_c + log_b).exp().copysign(sign_b * grad)
}

/// `ln(1 + e^{−z})` for z ≥ 0, accurate where e^{−z} is tiny (the `t = 1` loss lives there).
fn softplus_neg<T: Real>(z: T) -> T {
    let e = (-z).exp_fast();
    if e < T::from_f64(1e-4) {
        e * (T::ONE - T::from_f64(0.5) * e)
    } else {
        (T::ONE + e).ln()
    }
}

/// Gradient of `grad · anchor_consistency_forward` with respect to `sim`:
/// out = grad/count · (σ(z) − t) · z / τ.
pub fn anchor_consistency_backward<T: Real>(
    grad: f64,
    sim: &[T],
    target: &[T],
    out: &mut [T],
    params: &AnchorConsistencyParams,
) -> Result<()> {
    check(sim.len(), target.len(), params)?;
    check_len("out", out.len(), [sim.len()])?;
    if sim.is_empty() {
        return Ok(());
    }
    let inv = T::from_f64(1.0 / params.temperature);
    let inv64 = 1.0 / params.temperature;
    let c = grad / sim.len() as f64 * inv64;
    let g = T::from_f64(c);
    // log|c| from its parts: c itself may over- or underflow where the gradient does not.
    let log_c = grad.abs().ln() - (sim.len() as f64).ln() - params.temperature.ln();
    // (σ(z) − t)·z = (1 − t)·z − z·σ(−z), formed in T where every factor is a normal number
    // (exp_fast gives 0 or a normal), and by `gradient_term` in f64 everywhere else: where z or
    // (for t = 1) e^{−z} underflowed, the product is below T::TINY, or it overflowed.
    out.par_chunks_mut(TASK_LEN)
        .zip(sim.par_chunks(TASK_LEN).zip(target.par_chunks(TASK_LEN)))
        .for_each(|(o, (s, t))| {
            for ((ov, sv), tv) in o.iter_mut().zip(s).zip(t) {
                let z = (*sv * inv).exp_fast();
                let e = (-z).exp_fast();
                let one_minus = T::ONE - *tv;
                let v = g * (one_minus * z - z * e / (T::ONE + e));
                let magnitude = v.to_f64().abs();
                let in_range = magnitude >= T::TINY.to_f64() && magnitude < f64::INFINITY;
                let v = if in_range && z != T::ZERO && (one_minus != T::ZERO || e != T::ZERO) {
                    v
                } else {
                    T::from_f64(gradient_term(sv.to_f64() * inv64, tv.to_f64(), grad, log_c))
                };
                // NaN where sim or target is not finite (exp_fast maps NaN to a finite value).
                *ov = v + (*sv + *tv) * T::ZERO;
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchor_consistency_matches_definition_and_finite_differences() {
        let sim: Vec<f64> = (0..9000).map(|i| ((i as f64) * 0.37).sin()).collect();
        let target: Vec<f64> = (0..9000).map(|i| ((i as f64) * 0.11).cos().abs()).collect();
        let tau = 0.1;
        let params = AnchorConsistencyParams {
            temperature: tau,
            check_finite: true,
        };
        let term = |s: f64, t: f64| {
            let z = (s / tau).exp();
            z + (-z).exp().ln_1p() - t * z
        };
        let loss = |s: &[f64]| {
            s.iter()
                .zip(&target)
                .map(|(s, t)| term(*s, *t))
                .sum::<f64>()
                / s.len() as f64
        };
        let got = anchor_consistency_forward(&sim, &target, &params).unwrap();
        assert!(
            (got - loss(&sim)).abs() < 1e-12 * got.abs(),
            "{got} vs {}",
            loss(&sim)
        );
        let mut g = vec![0.0; sim.len()];
        anchor_consistency_backward(2.0, &sim, &target, &mut g, &params).unwrap();
        for &k in &[0usize, 17, 4500, 8999] {
            // The loss is a sum of per-entry terms: difference the one that moves.
            let h = 1e-6;
            let fd = 2.0 / sim.len() as f64
                * (term(sim[k] + h, target[k]) - term(sim[k] - h, target[k]))
                / (2.0 * h);
            assert!(
                (fd - g[k]).abs() < 1e-8 + 1e-5 * g[k].abs(),
                "{k}: {fd} vs {}",
                g[k]
            );
        }
        assert!(anchor_consistency_forward(&sim, &target[..3], &params).is_err());
        let zero = AnchorConsistencyParams {
            temperature: 0.0,
            ..params
        };
        assert!(anchor_consistency_forward(&sim, &target, &zero).is_err());
    }

    #[test]
    fn anchor_consistency_reports_non_finite_values_when_asked() {
        let sim: Vec<f32> = (0..9000).map(|i| ((i as f32) * 0.37).sin()).collect();
        let target: Vec<f32> = (0..9000).map(|i| ((i as f32) * 0.11).cos().abs()).collect();
        let params = AnchorConsistencyParams {
            temperature: 0.1,
            check_finite: true,
        };
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            // In the second chunk, so that the check covers every chunk, not the first.
            let mut s = sim.clone();
            s[5000] = bad;
            let err = anchor_consistency_forward(&s, &target, &params).unwrap_err();
            assert!(err.to_string().contains("'sim'"), "{err}");
            let mut t = target.clone();
            t[8999] = bad;
            let err = anchor_consistency_forward(&sim, &t, &params).unwrap_err();
            assert!(err.to_string().contains("'target'"), "{err}");
            let unchecked = AnchorConsistencyParams {
                check_finite: false,
                ..params
            };
            assert!(anchor_consistency_forward(&s, &target, &unchecked).is_ok());
        }
        assert!(anchor_consistency_forward(&sim, &target, &params).is_ok());
    }

    #[test]
    fn anchor_consistency_stays_finite_where_exp_overflows() {
        // x = sim/τ up to 100: e^x overflows f32 (88.7) but the exact terms are finite.
        let sim: Vec<f32> = vec![1.0, 0.95, 0.9, 1.0, 0.3];
        let target: Vec<f32> = vec![1.0, 1.0, 0.99999994, 0.0, 0.5];
        let tau = 0.01;
        let params = AnchorConsistencyParams {
            temperature: tau,
            check_finite: true,
        };
        let exact = |s: f32, t: f32| {
            let (x, t) = (s as f64 / tau, t as f64);
            let z = x.exp();
            (
                (1.0 - t) * z + (-z).exp().ln_1p(),
                (1.0 / (1.0 + (-z).exp()) - t) * z / tau,
            )
        };
        // Finite where the mean is: drop the entry whose term alone overflows f32.
        let (s, t) = (&sim[..3], &target[..3]);
        let got = anchor_consistency_forward(s, t, &params).unwrap();
        let want: f64 = s.iter().zip(t).map(|(a, b)| exact(*a, *b).0).sum::<f64>() / 3.0;
        assert!(
            got.is_finite() && (got - want).abs() < 1e-5 * want.abs(),
            "{got} vs {want}"
        );
        let mut g = vec![0.0f32; 3];
        anchor_consistency_backward(1.0, s, t, &mut g, &params).unwrap();
        for k in 0..3 {
            let want = exact(s[k], t[k]).1 / 3.0;
            let ok = (g[k] as f64 - want).abs() <= 1e-5 * want.abs() + 1e-30;
            assert!(g[k].is_finite() && ok, "{k}: {} vs {want}", g[k]);
        }
        // A term beyond f64 (t = 0 at x = 100 is e^100, fine; x = 1e5 is not) is +inf, not NaN.
        let huge = anchor_consistency_forward(&[1000.0f32], &[0.0], &params).unwrap();
        assert_eq!(huge, f64::INFINITY);
        let mut g1 = [0.0f32];
        anchor_consistency_backward(1.0, &[1000.0f32], &[0.0], &mut g1, &params).unwrap();
        assert_eq!(g1[0], f32::INFINITY);
        anchor_consistency_backward(1.0, &[1000.0f32], &[1.0], &mut g1, &params).unwrap();
        assert_eq!(g1[0], 0.0);
    }

    #[test]
    fn anchor_consistency_gradient_survives_exp_underflow() {
        // Normal gradients whose e^x (x = -120 in f32, -800 in f64) or, for t = 1, e^{-z}
        // (x = 5, z = 148) underflows T: the exact value in f64 / by logarithms.
        let exact = |x: f64, t: f64, tau: f64, n: f64| {
            let z = x.exp();
            let sigma = if t == 1.0 {
                -(-(z + (-z).exp().ln_1p())).exp()
            } else {
                (1.0 - t) - 1.0 / (1.0 + z.exp())
            };
            (x.exp() * sigma) / tau / n
        };
        let tau = 8.48e-29;
        let sim = [
            (-120.0 * tau) as f32,
            (5.0 * tau) as f32,
            (0.5 * tau) as f32,
        ];
        let target = [0.3f32, 1.0, 0.6];
        let params = AnchorConsistencyParams {
            temperature: tau,
            check_finite: true,
        };
        let mut g = [0.0f32; 3];
        anchor_consistency_backward(1.0, &sim, &target, &mut g, &params).unwrap();
        for k in 0..3 {
            let want = exact(sim[k] as f64 / tau, target[k] as f64, tau, 3.0);
            assert!(want.abs() > 1e-36, "{want}");
            assert!(
                (g[k] as f64 - want).abs() <= 1e-4 * want.abs(),
                "{k}: {} vs {want}",
                g[k]
            );
        }
        let tau = 1e-300;
        let params = AnchorConsistencyParams {
            temperature: tau,
            ..params
        };
        let (sim, target) = ([-800.0 * tau], [0.25]);
        let mut g = [0.0f64];
        anchor_consistency_backward(1.0, &sim, &target, &mut g, &params).unwrap();
        // e^{-800}·(0.75 − 0.5)/τ = 0.25·e^{-800 + 300 ln 10}
        let want = 0.25 * (-800.0 + 300.0 * 10f64.ln()).exp();
        assert!((g[0] - want).abs() <= 1e-10 * want, "{} vs {want}", g[0]);
    }

    #[test]
    fn anchor_consistency_unchecked_non_finite_gives_nan() {
        let params = AnchorConsistencyParams {
            temperature: 0.1,
            check_finite: false,
        };
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut s = vec![0.5f32; 5000];
            s[4500] = bad;
            let t = vec![0.5f32; 5000];
            assert!(anchor_consistency_forward(&s, &t, &params)
                .unwrap()
                .is_nan());
            assert!(anchor_consistency_forward(&t, &s, &params)
                .unwrap()
                .is_nan());
            let mut g = vec![0.0f32; 5000];
            anchor_consistency_backward(1.0, &s, &t, &mut g, &params).unwrap();
            assert!(g[4500].is_nan() && g[0].is_finite());
        }
    }
}
