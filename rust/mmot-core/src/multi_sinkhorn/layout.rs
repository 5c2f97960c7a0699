//! The per-row state blocks a pass streams, and how a pass splits the rows into chunks.

use crate::exec::chunks::{balanced, n_chunks, rows_per_chunk};
use crate::simd::Real;

/// Where a row's values sit in its state block. In the plain domain the cached `E_G` rows come
/// first and the stride is a whole number of 64-byte lines, so that (with an aligned base, see
/// [`aligned_rows`]) every row's vector loads start on a line; the row scalars (`h_G`, or the
/// backward's adjoints of them) follow. The log domain keeps only the scalars.
///
/// With `ratio`, a two-group forward caches only `D = E_1 / E_0 = exp((w_1 - w_0) L)`: the slot
/// values depend on `E_0` and `E_1` only through that ratio (see `two_groups::slot_values`), so
/// the state each pass streams is halved and the row work is a quarter shorter.
#[derive(Clone, Copy)]
pub(super) struct StateLayout {
    /// Values per row.
    pub stride: usize,
    /// Offset of the `G` row scalars (after the cached `E_G` or `D`).
    pub scalars_at: usize,
    pub ratio: bool,
}

impl StateLayout {
    /// `group_cols` = G·K, the length of the cached `E_G` rows.
    pub fn new<T>(log: bool, n_groups: usize, group_cols: usize, ratio: bool) -> Self {
        if log {
            return StateLayout {
                stride: n_groups,
                scalars_at: 0,
                ratio: false,
            };
        }
        let line = (64 / std::mem::size_of::<T>()).max(1);
        let cached = if ratio {
            group_cols / n_groups
        } else {
            group_cols
        };
        StateLayout {
            stride: (cached + n_groups).next_multiple_of(line),
            scalars_at: cached,
            ratio,
        }
    }

    /// How the passes over `n` rows of `k` anchors split them into chunks.
    pub fn chunking(&self, n: usize, k: usize) -> Chunking {
        // The plain domain's chunks are four times the L1-sized default: its row work is short,
        // and fewer, larger tasks halve the fork-join and partial-sum overhead of the 20-odd
        // passes of a call.
        let rows = if self.scalars_at == 0 {
            rows_per_chunk(k)
        } else {
            4 * rows_per_chunk(self.stride)
        };
        let rows_per_chunk = balanced(n, rows);
        Chunking {
            rows_per_chunk,
            n_chunks: n_chunks(n, rows_per_chunk),
        }
    }
}

/// Rows per chunk of a pass, and the chunk count. It depends only on the problem's shape, so
/// results do not depend on the thread count.
#[derive(Clone, Copy)]
pub(super) struct Chunking {
    pub rows_per_chunk: usize,
    pub n_chunks: usize,
}

/// `len` values of `buf` starting on a 64-byte boundary, with whatever they held before: every
/// pass 0 writes all the state it later reads, so a reused buffer is not cleared (a fresh one
/// comes zeroed from the allocator, which is cheaper than filling it).
pub(super) fn aligned_rows<T: Real>(buf: &mut Vec<T>, len: usize) -> &mut [T] {
    let padded = len + 64 / std::mem::size_of::<T>();
    if buf.len() < padded {
        *buf = vec![T::ZERO; padded];
    }
    aligned_view(buf, len)
}

/// The `len` values of a buffer filled by [`aligned_rows`], without touching them.
pub(super) fn aligned_view<T: Real>(buf: &mut [T], len: usize) -> &mut [T] {
    let off = buf
        .as_ptr()
        .align_offset(64)
        .min(64 / std::mem::size_of::<T>());
    &mut buf[off..off + len]
}
