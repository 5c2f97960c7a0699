//! How the kernels run: rows split into fixed chunks that run in parallel and combine in a
//! fixed order ([`chunks`]), the column statistics those passes share ([`column_stats`]), the
//! row norms of the cosine kernels ([`row_norms`]), workspaces kept between calls ([`spare`]),
//! the output pointer wavefront tasks share ([`shared_mut`]),
//! and problems in SIMD lanes ([`lanes`]). Built on [`crate::simd`]; the kernels sit on top.

pub(crate) mod chunks;
pub(crate) mod column_stats;
pub(crate) mod lanes;
pub(crate) mod row_norms;
pub(crate) mod shared_mut;
pub(crate) mod spare;
