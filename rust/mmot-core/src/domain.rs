//! Plain- versus log-domain choice, shared by `sinkhorn` and `multi_sinkhorn`.
//!
//! The plain domain works on cached `exp` values and is the fast path; it is only safe while
//! the exponent range stays small enough for products of scalings to stay inside the float
//! range. The decision is made once per call (over all problems of the batch), so a whole
//! batch is computed one way and the returned flag describes the call.

use crate::error::{MmotError, Result};
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
