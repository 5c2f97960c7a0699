//! Pure-Rust optimal-transport kernels behind `mmot._core` (DESIGN.md §2).
//!
//! This crate has no Python dependency so that `cargo test`/`cargo bench` run anywhere; the
//! `mmot-python` crate is a thin PyO3 layer over it. All kernels take flat row-major slices plus
//! explicit dimensions, write into caller-provided outputs, and parallelise with whatever rayon
//! pool they are called from (the bindings install a dedicated one).

mod chunks;
pub mod dims;
pub mod domain;
pub mod error;
mod gemm;
pub mod info_nce;
mod lanes;
pub mod multi_sinkhorn;
pub mod real;
pub mod simd;
pub mod similarity;
pub mod sinkhorn;
mod spare;
mod vector;

pub use dims::Dims;
pub use domain::LogDomain;
pub use error::{MmotError, Result};
pub use multi_sinkhorn::{multi_sinkhorn, multi_sinkhorn_backward, MultiSinkhornParams, Normalize};
pub use real::Real;
pub use similarity::{similarity, similarity_backward, similarity_checked};
pub use sinkhorn::{sinkhorn, sinkhorn_backward, sinkhorn_checked};
