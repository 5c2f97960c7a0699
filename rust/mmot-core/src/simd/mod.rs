//! Arithmetic building blocks, the bottom layer of the crate: the element type [`Real`], explicit
//! vector registers (`Vector`) with the runtime choice of instruction set ([`dispatch`]), the
//! reductions built on them, and dense matrix products. Nothing here knows about a kernel.
//!
//! The files depend on each other one way: `dispatch` <- `vector` (+ `x86`) <- `real` <-
//! `reduce`, `gemm`, `ln`, `transpose`.

mod dispatch;
pub(crate) mod gemm;
mod ln;
mod real;
mod reduce;
mod transpose;
mod vector;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use dispatch::{dispatch, level, Level};
pub(crate) use ln::ln_fast;
pub use real::Real;
pub(crate) use reduce::{dot, extremes, max, sum, LANES};
pub(crate) use transpose::{lanes_to_rows, rows_to_lanes};
pub(crate) use vector::{Vector, VectorOp};
