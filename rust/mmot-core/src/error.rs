//! Error type for the core kernels.
//!
//! The core crate never panics on bad input: the bindings turn `Shape`/`InvalidArgument` into
//! Python `ValueError`s, so every message names the argument and what was expected.

use crate::dims::Dims;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MmotError {
    /// An array's length or shape does not match the dimensions it was declared with.
    Shape(String),
    /// A scalar parameter is out of range (eps <= 0, k outside 1..=K, unknown mode string, ...).
    InvalidArgument(String),
    /// The caller asked the call to stop ([`crate::interrupt`]); the outputs are unspecified.
    Interrupted,
}

impl fmt::Display for MmotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmotError::Shape(m) | MmotError::InvalidArgument(m) => f.write_str(m),
            MmotError::Interrupted => f.write_str("interrupted"),
        }
    }
}

impl std::error::Error for MmotError {}

pub type Result<T> = std::result::Result<T, MmotError>;

/// The shape an array was declared with: a batch of matrices ([`Dims`]) or a list of sizes.
pub(crate) trait Shape {
    fn element_count(&self) -> usize;
    /// `[a, b, ...]`, as error messages print a shape.
    fn describe(&self) -> String;
}

impl Shape for Dims {
    fn element_count(&self) -> usize {
        self.len()
    }
    fn describe(&self) -> String {
        Dims::describe(self)
    }
}

impl<const N: usize> Shape for [usize; N] {
    fn element_count(&self) -> usize {
        self.iter().product()
    }
    fn describe(&self) -> String {
        let sizes: Vec<String> = self.iter().map(usize::to_string).collect();
        format!("[{}]", sizes.join(", "))
    }
}

/// An error unless the array `name` has exactly the elements of `shape`.
pub(crate) fn check_len(name: &str, len: usize, shape: impl Shape) -> Result<()> {
    let expected = shape.element_count();
    if len != expected {
        return Err(MmotError::Shape(format!(
            "{name} has {len} elements, expected {expected} (shape {})",
            shape.describe()
        )));
    }
    Ok(())
}

/// The error a kernel returns for a non-finite input when asked to check.
pub(crate) fn not_finite(name: &str) -> MmotError {
    MmotError::InvalidArgument(format!(
        "argument '{name}' must be finite; found NaN or Inf"
    ))
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
