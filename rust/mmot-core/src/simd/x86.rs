//! The x86-64 vector types: 512-bit (AVX-512) and 256-bit (AVX2+FMA) registers of f32 and f64.
//! Only [`Vectors::with_vector`](super::vector::Vectors::with_vector) names them, after the
//! runtime check of the instruction set.

use super::vector::Vector;
use std::arch::x86_64::*;

/// Implements [`Vector`] for a newtype over an intrinsic register type. The intrinsics are
/// target-feature functions; the level check in `with_vector` makes calling them sound.
macro_rules! intrinsic_vector {
    ($name:ident, $reg:ty, $t:ty, $lanes:expr, $set1:ident, $loadu:ident, $storeu:ident,
     $add:ident, $sub:ident, $mul:ident, $div:ident, $min:ident, $max:ident, $fmadd:ident,
     $recip:ident, $reduce:ident, $reduce4:ident, $reduce_min:ident, $reduce_max:ident) => {
        #[derive(Clone, Copy)]
        pub struct $name($reg);
        impl Vector<$t> for $name {
            const LANES: usize = $lanes;
            #[inline(always)]
            fn splat(x: $t) -> Self {
                unsafe { $name($set1(x)) }
            }
            #[inline(always)]
            unsafe fn load(p: *const $t) -> Self {
                $name($loadu(p))
            }
            #[inline(always)]
            unsafe fn store(self, p: *mut $t) {
                $storeu(p, self.0)
            }
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                unsafe { $name($add(self.0, o.0)) }
            }
            #[inline(always)]
            fn sub(self, o: Self) -> Self {
                unsafe { $name($sub(self.0, o.0)) }
            }
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                unsafe { $name($mul(self.0, o.0)) }
            }
            #[inline(always)]
            fn min(self, o: Self) -> Self {
                unsafe { $name($min(self.0, o.0)) }
            }
            #[inline(always)]
            fn max(self, o: Self) -> Self {
                unsafe { $name($max(self.0, o.0)) }
            }
            #[inline(always)]
            fn div(self, o: Self) -> Self {
                unsafe { $name($div(self.0, o.0)) }
            }
            #[inline(always)]
            fn mul_add(self, m: Self, a: Self) -> Self {
                unsafe { $name($fmadd(self.0, m.0, a.0)) }
            }
            #[inline(always)]
            fn recip(self) -> Self {
                unsafe { $name($recip(self.0)) }
            }
            #[inline(always)]
            fn sum(self) -> $t {
                unsafe { $reduce(self.0) }
            }
            #[inline(always)]
            fn sum4(v: [Self; 4]) -> [$t; 4] {
                unsafe { $reduce4(v.map(|x| x.0)) }
            }
            #[inline(always)]
            fn reduce_min(self) -> $t {
                unsafe { $reduce_min(self.0) }
            }
            #[inline(always)]
            fn reduce_max(self) -> $t {
                unsafe { $reduce_max(self.0) }
            }
        }
    };
}
// Horizontal sums in registers (halves added pairwise, a fixed order); going through memory
// instead would stall on store forwarding.
#[inline(always)]
unsafe fn reduce_add_256_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

#[inline(always)]
unsafe fn reduce_add_256_pd(v: __m256d) -> f64 {
    let s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
    _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)))
}

// Four horizontal sums of 512-bit vectors as one tree: pairs of vectors are folded
// 512 -> 256 bits into one register, those pairs 256 -> 128, and each 128-bit quarter is
// then summed in place; lane 4i ends up holding the sum of vector i.
#[inline(always)]
unsafe fn reduce_add4_512_ps(v: [__m512; 4]) -> [f32; 4] {
    let fold = |a: __m512, b: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
        )
    };
    let (ab, cd) = (fold(v[0], v[1]), fold(v[2], v[3]));
    let t = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b10_00_10_00>(ab, cd),
        _mm512_shuffle_f32x4::<0b11_01_11_01>(ab, cd),
    );
    let t = _mm512_add_ps(t, _mm512_permute_ps::<0b01_00_11_10>(t));
    let t = _mm512_add_ps(t, _mm512_permute_ps::<0b10_11_00_01>(t));
    let mut lanes = [0f32; 16];
    _mm512_storeu_ps(lanes.as_mut_ptr(), t);
    [lanes[0], lanes[4], lanes[8], lanes[12]]
}
#[inline(always)]
unsafe fn reduce_add4_512_pd(v: [__m512d; 4]) -> [f64; 4] {
    let fold = |a: __m512d, b: __m512d| {
        _mm512_add_pd(
            _mm512_shuffle_f64x2::<0b01_00_01_00>(a, b),
            _mm512_shuffle_f64x2::<0b11_10_11_10>(a, b),
        )
    };
    let (ab, cd) = (fold(v[0], v[1]), fold(v[2], v[3]));
    let t = _mm512_add_pd(
        _mm512_shuffle_f64x2::<0b10_00_10_00>(ab, cd),
        _mm512_shuffle_f64x2::<0b11_01_11_01>(ab, cd),
    );
    let t = _mm512_add_pd(t, _mm512_permute_pd::<0b0101_0101>(t));
    let mut lanes = [0f64; 8];
    _mm512_storeu_pd(lanes.as_mut_ptr(), t);
    [lanes[0], lanes[2], lanes[4], lanes[6]]
}
#[inline(always)]
unsafe fn reduce_add4_256_ps(v: [__m256; 4]) -> [f32; 4] {
    v.map(|x| reduce_add_256_ps(x))
}
#[inline(always)]
unsafe fn reduce_add4_256_pd(v: [__m256d; 4]) -> [f64; 4] {
    v.map(|x| reduce_add_256_pd(x))
}
// Horizontal min and max of the 256-bit types, by halving as the sums do.
#[inline(always)]
unsafe fn reduce_min_256_ps(v: __m256) -> f32 {
    let s = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_min_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_min_ss(s, _mm_movehdup_ps(s)))
}
#[inline(always)]
unsafe fn reduce_max_256_ps(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
}
#[inline(always)]
unsafe fn reduce_min_256_pd(v: __m256d) -> f64 {
    let s = _mm_min_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
    _mm_cvtsd_f64(_mm_min_sd(s, _mm_unpackhi_pd(s, s)))
}
#[inline(always)]
unsafe fn reduce_max_256_pd(v: __m256d) -> f64 {
    let s = _mm_max_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
    _mm_cvtsd_f64(_mm_max_sd(s, _mm_unpackhi_pd(s, s)))
}
// Reciprocals: the f32 estimates (14 and 12 bits) are refined by one Newton step,
// r' = r (2 - x r), to within about an ulp, at a fraction of a division's cost. f64 keeps
// the exact division (two Newton steps would cost about as much).
#[inline(always)]
unsafe fn recip_512_ps(x: __m512) -> __m512 {
    let r = _mm512_rcp14_ps(x);
    _mm512_mul_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(2.0)))
}

#[inline(always)]
unsafe fn recip_256_ps(x: __m256) -> __m256 {
    let r = _mm256_rcp_ps(x);
    _mm256_mul_ps(r, _mm256_fnmadd_ps(x, r, _mm256_set1_ps(2.0)))
}

#[inline(always)]
unsafe fn recip_512_pd(x: __m512d) -> __m512d {
    _mm512_div_pd(_mm512_set1_pd(1.0), x)
}

#[inline(always)]
unsafe fn recip_256_pd(x: __m256d) -> __m256d {
    _mm256_div_pd(_mm256_set1_pd(1.0), x)
}

intrinsic_vector!(
    F32x16,
    __m512,
    f32,
    16,
    _mm512_set1_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_add_ps,
    _mm512_sub_ps,
    _mm512_mul_ps,
    _mm512_div_ps,
    _mm512_min_ps,
    _mm512_max_ps,
    _mm512_fmadd_ps,
    recip_512_ps,
    _mm512_reduce_add_ps,
    reduce_add4_512_ps,
    _mm512_reduce_min_ps,
    _mm512_reduce_max_ps
);
intrinsic_vector!(
    F32x8,
    __m256,
    f32,
    8,
    _mm256_set1_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_add_ps,
    _mm256_sub_ps,
    _mm256_mul_ps,
    _mm256_div_ps,
    _mm256_min_ps,
    _mm256_max_ps,
    _mm256_fmadd_ps,
    recip_256_ps,
    reduce_add_256_ps,
    reduce_add4_256_ps,
    reduce_min_256_ps,
    reduce_max_256_ps
);
intrinsic_vector!(
    F64x8,
    __m512d,
    f64,
    8,
    _mm512_set1_pd,
    _mm512_loadu_pd,
    _mm512_storeu_pd,
    _mm512_add_pd,
    _mm512_sub_pd,
    _mm512_mul_pd,
    _mm512_div_pd,
    _mm512_min_pd,
    _mm512_max_pd,
    _mm512_fmadd_pd,
    recip_512_pd,
    _mm512_reduce_add_pd,
    reduce_add4_512_pd,
    _mm512_reduce_min_pd,
    _mm512_reduce_max_pd
);
intrinsic_vector!(
    F64x4,
    __m256d,
    f64,
    4,
    _mm256_set1_pd,
    _mm256_loadu_pd,
    _mm256_storeu_pd,
    _mm256_add_pd,
    _mm256_sub_pd,
    _mm256_mul_pd,
    _mm256_div_pd,
    _mm256_min_pd,
    _mm256_max_pd,
    _mm256_fmadd_pd,
    recip_256_pd,
    reduce_add_256_pd,
    reduce_add4_256_pd,
    reduce_min_256_pd,
    reduce_max_256_pd
);
