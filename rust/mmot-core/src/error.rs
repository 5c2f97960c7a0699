//! Error type for the core kernels.
//!
//! The core crate never panics on bad input: the bindings turn `Shape`/`InvalidArgument` into
//! Python `ValueError`s, so every message names the argument and what was expected.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MmotError {
    /// An array's length or shape does not match the dimensions it was declared with.
    Shape(String),
    /// A scalar parameter is out of range (eps <= 0, k outside 1..=K, unknown mode string, ...).
    InvalidArgument(String),
}

impl fmt::Display for MmotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmotError::Shape(m) | MmotError::InvalidArgument(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for MmotError {}

pub type Result<T> = std::result::Result<T, MmotError>;

pub(crate) fn check_len(name: &str, len: usize, expected: usize, shape: &str) -> Result<()> {
    if len != expected {
        return Err(MmotError::Shape(format!(
            "{name} has {len} elements, expected {expected} (shape {shape})"
        )));
    }
    Ok(())
}

pub(crate) fn check_eps_iters(eps: f64, n_iters: usize) -> Result<()> {
    if !(eps.is_finite() && eps > 0.0) {
        return Err(MmotError::InvalidArgument(format!(
            "eps must be a finite number > 0, got {eps}"
        )));
    }
    if n_iters == 0 {
        return Err(MmotError::InvalidArgument(
            "n_iters must be >= 1, got 0".to_string(),
        ));
    }
    Ok(())
}
