//! SSPC's anchor-consistency loss: the mean over all entries of
//! BCE-with-logits(z, t) = softplus(z) − t·z with z = exp(sim/τ) (> 0, so
//! softplus(z) = z + ln(1 + e^{−z})), and its gradient (see `docs/gradients.md`).

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
    // Each chunk also sums `0 · x`, which is 0 for finite x and NaN otherwise: the value check
    // costs two operations an element in the pass the loss makes anyway.
    let partials: Vec<(f64, T, T)> = sim
        .par_chunks(TASK_LEN)
        .zip(target.par_chunks(TASK_LEN))
        .map(|(s, t)| {
            let (mut acc, mut sim_probe, mut target_probe) = (0.0f64, T::ZERO, T::ZERO);
            for (sv, tv) in s.iter().zip(t) {
                let z = (*sv * inv).exp_fast();
                let l = z + (T::ONE + (-z).exp_fast()).ln() - *tv * z;
                acc += l.to_f64();
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
    let total: f64 = partials.iter().map(|p| p.0).sum();
    Ok(total / sim.len() as f64)
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
    let g = T::from_f64(grad / sim.len() as f64) * inv;
    out.par_chunks_mut(TASK_LEN)
        .zip(sim.par_chunks(TASK_LEN).zip(target.par_chunks(TASK_LEN)))
        .for_each(|(o, (s, t))| {
            for ((ov, sv), tv) in o.iter_mut().zip(s).zip(t) {
                let z = (*sv * inv).exp_fast();
                let sig = T::ONE / (T::ONE + (-z).exp_fast());
                *ov = g * (sig - *tv) * z;
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
}
