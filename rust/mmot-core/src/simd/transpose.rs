//! Rows of `L` problems to and from a lane layout `[element][lane]`, a `L`×`L` block at a time
//! in AVX-512 registers (16 f32 or 8 f64 lanes: one register).
//!
//! Why: element by element, each value of a row lands in its own cache line of the lane layout
//! (a lane layout's element is one 64-byte register), so the loop costs a scattered store or
//! load per value, and LLVM vectorises it with `vscatter`/`vgather`, slower still (AMD
//! microcodes them). A block transpose is 16 row loads, 64 shuffles and 16 stores for 256
//! values. Ragged rows use masked loads and stores, which never touch memory past a row's end.
//!
//! [`rows_to_lanes`] and [`lanes_to_rows`] return false where there is no such path (another
//! instruction set or lane count); the caller then runs its element loop.

use super::dispatch::{level, Level};
use super::Real;
use std::any::TypeId;

/// `dst[j][l] = row_l[j] + shift_l` for `j` below row `l`'s length, `fill` everywhere else
/// (every `j < dst.len()`, every lane: absent rows are all `fill`). Rows are at most
/// `dst.len()` long. Returns false, writing nothing, where there is no block path.
#[inline(always)]
pub(crate) fn rows_to_lanes<T: Real, const L: usize>(
    rows: &[Option<(&[T], T)>; L],
    fill: T,
    dst: &mut [[T; L]],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx512 {
        debug_assert!(rows.iter().flatten().all(|(r, _)| r.len() <= dst.len()));
        // SAFETY: the casts only rename T and L, checked equal to the target types; the
        // feature level was detected on this CPU.
        unsafe {
            if TypeId::of::<T>() == TypeId::of::<f32>() && L == 16 {
                let rows = &*(rows as *const _ as *const [Option<(&[f32], f32)>; 16]);
                let dst = std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast(), dst.len());
                x86::rows_to_lanes_ps(rows, *(&fill as *const T as *const f32), dst);
                return true;
            }
            if TypeId::of::<T>() == TypeId::of::<f64>() && L == 8 {
                let rows = &*(rows as *const _ as *const [Option<(&[f64], f64)>; 8]);
                let dst = std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast(), dst.len());
                x86::rows_to_lanes_pd(rows, *(&fill as *const T as *const f64), dst);
                return true;
            }
        }
    }
    let _ = (rows, fill, dst);
    false
}

/// `row_l[j] = src[j][l]` for every present row `l` and `j` below its length (at most
/// `src.len()`). Returns false, writing nothing, where there is no block path.
#[inline(always)]
pub(crate) fn lanes_to_rows<T: Real, const L: usize>(
    src: &[[T; L]],
    rows: &mut [Option<&mut [T]>; L],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx512 {
        debug_assert!(rows.iter().flatten().all(|r| r.len() <= src.len()));
        // SAFETY: as in `rows_to_lanes`.
        unsafe {
            if TypeId::of::<T>() == TypeId::of::<f32>() && L == 16 {
                let src = std::slice::from_raw_parts(src.as_ptr().cast(), src.len());
                let rows = &mut *(rows as *mut _ as *mut [Option<&mut [f32]>; 16]);
                x86::lanes_to_rows_ps(src, rows);
                return true;
            }
            if TypeId::of::<T>() == TypeId::of::<f64>() && L == 8 {
                let src = std::slice::from_raw_parts(src.as_ptr().cast(), src.len());
                let rows = &mut *(rows as *mut _ as *mut [Option<&mut [f64]>; 8]);
                x86::lanes_to_rows_pd(src, rows);
                return true;
            }
        }
    }
    let _ = (src, rows);
    false
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The mask of the first `min(n, 16)` lanes.
    #[inline(always)]
    fn first(n: usize) -> u16 {
        if n >= 16 {
            u16::MAX
        } else {
            (1u16 << n) - 1
        }
    }

    /// The mask of the first `min(n, 8)` lanes.
    #[inline(always)]
    fn first8(n: usize) -> u8 {
        first(n) as u8
    }

    /// 16×16 f32 transpose: `out[j]` lane `l` is `r[l]` lane `j`. Pairs of rows interleave
    /// (32-bit, then 64-bit units), which leaves 4×4 blocks transposed within each 128-bit
    /// quarter; two rounds of quarter shuffles put the quarters in place.
    #[inline(always)]
    unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        // Loops, not closures: a closure would not inherit the caller's target features, and
        // the intrinsics would become calls.
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // u[4q + c]: rows 4q..4q+4 of columns c, c+4, c+8, c+12 (one per quarter).
        let mut u = [_mm512_setzero_ps(); 16];
        for q in 0..4 {
            for h in 0..2 {
                let a = _mm512_castps_pd(t[4 * q + h]);
                let b = _mm512_castps_pd(t[4 * q + 2 + h]);
                u[4 * q + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
                u[4 * q + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
            }
        }
        let mut out = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            let even_lo = _mm512_shuffle_f32x4::<0b10_00_10_00>(u[c], u[4 + c]);
            let odd_lo = _mm512_shuffle_f32x4::<0b11_01_11_01>(u[c], u[4 + c]);
            let even_hi = _mm512_shuffle_f32x4::<0b10_00_10_00>(u[8 + c], u[12 + c]);
            let odd_hi = _mm512_shuffle_f32x4::<0b11_01_11_01>(u[8 + c], u[12 + c]);
            out[c] = _mm512_shuffle_f32x4::<0b10_00_10_00>(even_lo, even_hi);
            out[c + 8] = _mm512_shuffle_f32x4::<0b11_01_11_01>(even_lo, even_hi);
            out[c + 4] = _mm512_shuffle_f32x4::<0b10_00_10_00>(odd_lo, odd_hi);
            out[c + 12] = _mm512_shuffle_f32x4::<0b11_01_11_01>(odd_lo, odd_hi);
        }
        out
    }

    /// 8×8 f64 transpose: pairs of rows interleave, then two rounds of 128-bit quarter shuffles.
    #[inline(always)]
    unsafe fn transpose8(r: [__m512d; 8]) -> [__m512d; 8] {
        // t[2m + p]: rows 2m, 2m+1 of the columns of parity p.
        let mut t = [_mm512_setzero_pd(); 8];
        for m in 0..4 {
            t[2 * m] = _mm512_unpacklo_pd(r[2 * m], r[2 * m + 1]);
            t[2 * m + 1] = _mm512_unpackhi_pd(r[2 * m], r[2 * m + 1]);
        }
        let mut out = [_mm512_setzero_pd(); 8];
        for p in 0..2 {
            let even_lo = _mm512_shuffle_f64x2::<0b10_00_10_00>(t[p], t[2 + p]);
            let odd_lo = _mm512_shuffle_f64x2::<0b11_01_11_01>(t[p], t[2 + p]);
            let even_hi = _mm512_shuffle_f64x2::<0b10_00_10_00>(t[4 + p], t[6 + p]);
            let odd_hi = _mm512_shuffle_f64x2::<0b11_01_11_01>(t[4 + p], t[6 + p]);
            out[p] = _mm512_shuffle_f64x2::<0b10_00_10_00>(even_lo, even_hi);
            out[p + 4] = _mm512_shuffle_f64x2::<0b11_01_11_01>(even_lo, even_hi);
            out[p + 2] = _mm512_shuffle_f64x2::<0b10_00_10_00>(odd_lo, odd_hi);
            out[p + 6] = _mm512_shuffle_f64x2::<0b11_01_11_01>(odd_lo, odd_hi);
        }
        out
    }

    /// Implements the two row functions for one element type; `$mask` turns a count into the
    /// mask of that many first lanes.
    macro_rules! row_transposes {
        ($to_lanes:ident, $to_rows:ident, $t:ty, $lanes:expr, $mask:ident,
         $transpose:ident, $set1:ident, $zero:ident, $maskz_load:ident, $mask_add:ident,
         $load:ident, $store:ident, $mask_store:ident) => {
            /// # Safety
            /// AVX-512F must be available; every row is at most `dst.len()` long.
            #[target_feature(enable = "avx512f")]
            pub(super) unsafe fn $to_lanes(
                rows: &[Option<(&[$t], $t)>; $lanes],
                fill: $t,
                dst: &mut [[$t; $lanes]],
            ) {
                let fillv = $set1(fill);
                for (b, out) in dst.chunks_mut($lanes).enumerate() {
                    let j0 = b * $lanes;
                    let mut r = [fillv; $lanes];
                    for (v, row) in r.iter_mut().zip(rows) {
                        if let Some((row, shift)) = row.filter(|(row, _)| j0 < row.len()) {
                            let m = $mask(row.len() - j0);
                            let x = $maskz_load(m, row.as_ptr().add(j0));
                            *v = $mask_add(fillv, m, x, $set1(shift));
                        }
                    }
                    for (o, v) in out.iter_mut().zip($transpose(r)) {
                        $store(o.as_mut_ptr(), v);
                    }
                }
            }

            /// # Safety
            /// AVX-512F must be available; every row is at most `src.len()` long.
            #[target_feature(enable = "avx512f")]
            pub(super) unsafe fn $to_rows(
                src: &[[$t; $lanes]],
                rows: &mut [Option<&mut [$t]>; $lanes],
            ) {
                for (b, block) in src.chunks($lanes).enumerate() {
                    let j0 = b * $lanes;
                    let mut r = [$zero(); $lanes];
                    for (v, x) in r.iter_mut().zip(block) {
                        *v = $load(x.as_ptr());
                    }
                    for (row, v) in rows.iter_mut().zip($transpose(r)) {
                        if let Some(row) = row.as_deref_mut().filter(|row| j0 < row.len()) {
                            $mask_store(row.as_mut_ptr().add(j0), $mask(row.len() - j0), v);
                        }
                    }
                }
            }
        };
    }

    row_transposes!(
        rows_to_lanes_ps,
        lanes_to_rows_ps,
        f32,
        16,
        first,
        transpose16,
        _mm512_set1_ps,
        _mm512_setzero_ps,
        _mm512_maskz_loadu_ps,
        _mm512_mask_add_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_mask_storeu_ps
    );
    row_transposes!(
        rows_to_lanes_pd,
        lanes_to_rows_pd,
        f64,
        8,
        first8,
        transpose8,
        _mm512_set1_pd,
        _mm512_setzero_pd,
        _mm512_maskz_loadu_pd,
        _mm512_mask_add_pd,
        _mm512_loadu_pd,
        _mm512_storeu_pd,
        _mm512_mask_storeu_pd
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct values everywhere, rows of every length from 0 to `len` (and absent ones), a
    /// buffer of `len` elements that is not a multiple of the block: each path against the
    /// element loop it replaces.
    fn round_trip<T: Real, const L: usize>(len: usize) {
        if level() != Level::Avx512 {
            return;
        }
        let data: Vec<Vec<T>> = (0..L)
            .map(|l| {
                (0..len)
                    .map(|j| T::from_f64((l * 1000 + j) as f64 + 0.5))
                    .collect()
            })
            .collect();
        let lens: [usize; L] = std::array::from_fn(|l| (l * 7 + 3) % (len + 1));
        let rows: [Option<(&[T], T)>; L] = std::array::from_fn(|l| {
            (l % 5 != 4).then(|| (&data[l][..lens[l]], T::from_f64(l as f64 * 0.25)))
        });
        let fill = T::from_f64(-7.0);
        let mut dst = vec![[T::from_f64(99.0); L]; len];
        assert!(rows_to_lanes(&rows, fill, &mut dst));
        for (j, d) in dst.iter().enumerate() {
            for l in 0..L {
                let want = match rows[l] {
                    Some((row, shift)) if j < row.len() => row[j] + shift,
                    _ => fill,
                };
                assert_eq!(d[l].to_f64(), want.to_f64(), "lane {l}, element {j}");
            }
        }
        let sentinel = T::from_f64(-1.0);
        let mut back: Vec<Vec<T>> = (0..L).map(|_| vec![sentinel; len + 3]).collect();
        let mut outs: [Option<&mut [T]>; L] = std::array::from_fn(|_| None);
        for (l, (o, b)) in outs.iter_mut().zip(back.iter_mut()).enumerate() {
            if rows[l].is_some() {
                *o = Some(&mut b[..lens[l]]);
            }
        }
        assert!(lanes_to_rows(&dst, &mut outs));
        for l in 0..L {
            for (j, &v) in back[l].iter().enumerate() {
                let want = match rows[l] {
                    Some((row, shift)) if j < row.len() => row[j] + shift,
                    _ => sentinel,
                };
                assert_eq!(v.to_f64(), want.to_f64(), "lane {l}, element {j}");
            }
        }
    }

    #[test]
    fn block_transposes_match_the_element_loops() {
        for len in [0, 1, 5, 8, 15, 16, 17, 33, 64] {
            round_trip::<f32, 16>(len);
            round_trip::<f64, 8>(len);
        }
    }

    #[test]
    fn other_lane_counts_have_no_block_path() {
        let rows: [Option<(&[f32], f32)>; 8] = [None; 8];
        assert!(!rows_to_lanes(&rows, 0.0, &mut [[0f32; 8]; 3]));
    }
}
