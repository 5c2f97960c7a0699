//! Plain- versus log-domain choice, shared by `sinkhorn` and `multi_sinkhorn`.
//!
//! The plain domain works on cached `exp` values and is the fast path; it is only safe while
//! the exponent range stays small enough for products of scalings to stay inside the float
//! range. The decision is made once per call (over all problems of the batch), so a whole
//! batch is computed one way and the returned flag describes the call.

use crate::dims::Dims;
use crate::error::{MmotError, Result};
use crate::exec::column_stats::batch_col_stats;
use crate::simd::Real;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogDomain {
    /// Decide from the data (see [`use_log_domain`]).
    Auto,
    On,
    Off,
}

impl FromStr for LogDomain {
    type Err = MmotError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(LogDomain::Auto),
            "on" => Ok(LogDomain::On),
            "off" => Ok(LogDomain::Off),
            other => Err(MmotError::InvalidArgument(format!(
                "log_domain must be one of 'auto', 'on', 'off', got {other:?}"
            ))),
        }
    }
}

/// `range` is R = max over problems and columns of (max_n S - min_n S) * w_max / eps.
/// Auto picks the plain domain iff R <= 50 (f32) or R <= 300 (f64).
pub fn use_log_domain<T: Real>(mode: LogDomain, range: f64) -> bool {
    match mode {
        LogDomain::On => true,
        LogDomain::Off => false,
        // `!(<=)` so that a NaN range (non-finite input) goes to the safer log domain.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        LogDomain::Auto => !(range <= T::PLAIN_RANGE_LIMIT),
    }
}

/// An error unless the exponent range `range` (max − min of a score column, times the largest
/// slot weight, over eps; +inf where the difference overflowed `T`) fits the log domain. Beyond [`Real::LOG_RANGE_LIMIT`] the centred logits would reach the floor the
/// kernels clamp them to and a row's order would be lost: a wrong answer, so a value check
/// refuses it. A NaN range (non-finite scores) is left to the finiteness rules.
pub(crate) fn check_log_range<T: Real>(range: f64, eps: f64) -> Result<()> {
    if range > T::LOG_RANGE_LIMIT {
        return Err(MmotError::InvalidArgument(format!(
            "argument 'eps' is too small for these scores: the exponent range (max - min of a \
             score column) * weight / eps is {range:.4e} here (eps = {eps}), beyond the {limit:.4e} \
             this dtype can represent; scale the scores down, raise eps or pass float64",
            limit = T::LOG_RANGE_LIMIT,
        )));
    }
    Ok(())
}

/// Forcing the plain domain (`Off`) where "auto" would leave it is an error, not a NaN result:
/// `exp` would under- or overflow there. `max_weight` is the largest slot weight (1 for
/// `sinkhorn`). The exponent
/// range is measured like "auto" measures it; a NaN range (non-finite scores) is left to the
/// finiteness rules. Costs one pass over the scores, and only when `Off` is forced.
pub(crate) fn check_forced_plain<T: Real>(
    mode: LogDomain,
    scores: &[T],
    dims: Dims,
    eps: f64,
    max_weight: f64,
) -> Result<()> {
    if mode != LogDomain::Off || dims.is_empty() {
        return Ok(());
    }
    let mut col_max = vec![T::ZERO; dims.problems * dims.cols];
    let (range, _) = batch_col_stats(scores, dims.problems, dims.rows, dims.cols, &mut col_max);
    let range = range * max_weight / eps;
    if range > T::PLAIN_RANGE_LIMIT {
        return Err(MmotError::InvalidArgument(format!(
            "log_domain=False forces the plain domain, where exp would under- or overflow: the \
             exponent range (max - min of a score column) * weight / eps is {range:.1} here \
             (eps = {eps}), above the plain domain's limit of {limit} for this dtype; use \
             log_domain=\"auto\" (or True)",
            limit = T::PLAIN_RANGE_LIMIT,
        )));
    }
    Ok(())
}
