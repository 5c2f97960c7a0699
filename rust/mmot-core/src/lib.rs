//! Pure-Rust optimal-transport kernels behind `mmot._core` (layers in `docs/architecture.md`).
//!
//! This crate has no Python dependency so that `cargo test` and `cargo bench` run anywhere; the
//! `mmot-python` crate is a thin PyO3 layer over it. All kernels take flat row-major slices plus
//! explicit dimensions and a parameter struct, write into caller-provided outputs, and
//! parallelise with whatever rayon pool they are called from (the bindings install a dedicated
//! one).
//!
//! Layers, each using only those above it:
//! - [`dims`], [`domain`], [`error`], [`interrupt`]: the shapes, the plain/log domain choice, the
//!   errors the kernels share and how a caller stops a long call;
//! - [`simd`]: the element type [`Real`], vector registers, runtime dispatch, reductions, GEMM;
//! - `exec`: row chunks and how passes over them run, workspaces kept between calls, problems
//!   in SIMD lanes;
//! - the kernels, one module each: [`sinkhorn`](mod@sinkhorn),
//!   [`multi_sinkhorn`](mod@multi_sinkhorn), [`similarity`](mod@similarity), [`info_nce`],
//!   [`anchor_consistency`], [`brownian_bridge`], [`geometric_consistency`],
//!   [`feature_separation`].
//!
//! `cargo bench -p mmot-core --bench kernels` times them at the sizes that matter (see
//! `benches/kernels.rs`).

pub mod dims;
pub mod domain;
pub mod error;
mod exec;
pub mod interrupt;
pub mod simd;

pub mod anchor_consistency;
pub mod brownian_bridge;
pub mod feature_separation;
pub mod geometric_consistency;
pub mod implicit;
pub mod info_nce;
pub mod multi_sinkhorn;
pub mod multi_sinkhorn_ext;
pub mod nt_xent;
pub mod sharded_sinkhorn;
pub mod similarity;
pub mod similarity_regression;
pub mod sinkhorn;
pub mod sinkhorn_ext;

pub use anchor_consistency::{
    anchor_consistency_backward, anchor_consistency_forward, AnchorConsistencyParams,
};
pub use brownian_bridge::{
    brownian_bridge_backward, brownian_bridge_forward, BrownianBridgeInput, BrownianBridgeParams,
};
pub use dims::Dims;
pub use domain::LogDomain;
pub use error::{MmotError, Result};
pub use feature_separation::{
    feature_separation_backward, feature_separation_forward, FeatureSeparationInput,
    FeatureSeparationParams,
};
pub use geometric_consistency::{
    geometric_consistency_backward, geometric_consistency_forward, GeometricConsistencyInput,
    GeometricConsistencyParams,
};
pub use info_nce::{info_nce_backward, info_nce_forward, InfoNceInput, InfoNceParams};
pub use multi_sinkhorn::{multi_sinkhorn, multi_sinkhorn_backward, MultiSinkhornParams, Normalize};
pub use multi_sinkhorn_ext::{
    multi_sinkhorn_ext_backward, multi_sinkhorn_ext_forward, ExtDims, MultiSinkhornExtInput,
    MultiSinkhornExtOutput, MultiSinkhornExtParams,
};
pub use sharded_sinkhorn::{
    sharded_multi_sinkhorn, sharded_multi_sinkhorn_backward, sharded_sinkhorn,
    sharded_sinkhorn_backward, Collective, ShardedMultiParams, SlotGroup,
};
pub use simd::Real;
pub use similarity::{
    similarity, similarity_backward, SimilarityDims, SimilarityInput, SimilarityParams,
};
pub use similarity_regression::{
    similarity_regression_backward, similarity_regression_forward, SimilarityRegressionInput,
    SimilarityRegressionParams,
};
pub use sinkhorn::{sinkhorn, sinkhorn_backward, SinkhornParams};
pub use sinkhorn_ext::{
    sinkhorn_ext_backward, sinkhorn_ext_forward, SinkhornExtInput, SinkhornExtOutput,
    SinkhornExtParams,
};
