//! Problems in SIMD lanes: the small-problem paths solve `L` problems at once, each buffer laid
//! out `[element][lane]` (lane = problem), so that every step is one vertical operation over the
//! lanes and lanes never mix.
//!
//! Lane code works on copies of one element's lanes (`let x = *x_ref`), computes and stores
//! whole arrays: LLVM then vectorises the lanes without having to prove the buffers disjoint
//! (they are fields of one scratch struct). Loops over elements call [`lanes_only`].

use crate::simd::Real;

// The transposes are element by element: LLVM's shuffle networks for whole `L`×`L` blocks
// and its gathers and scatters both measured slower.

/// `dst[e][l] = src[l * len + e]` for the `m` problems in `src`; spare lanes repeat the last.
#[inline(always)]
pub(crate) fn gather<T: Real, const L: usize>(dst: &mut [[T; L]], src: &[T], len: usize, m: usize) {
    for l in 0..L {
        let p = &src[l.min(m - 1) * len..][..len];
        for (d, &v) in dst[..len].iter_mut().zip(p) {
            lanes_only();
            d[l] = v;
        }
    }
}

/// `dst[l * len + e] = src[e][l]` for the first `m` lanes.
#[inline(always)]
pub(crate) fn scatter<T: Real, const L: usize>(
    src: &[[T; L]],
    dst: &mut [T],
    len: usize,
    m: usize,
) {
    for l in 0..m {
        for (d, s) in dst[l * len..][..len].iter_mut().zip(&src[..len]) {
            lanes_only();
            *d = s[l];
        }
    }
}

/// Marks a loop over elements whose body works on the `L` lanes of each: LLVM must not
/// vectorise such a loop across elements (after fully unrolling a cheap lane loop it would,
/// with AVX-512 gathers and scatters, several times slower), so that it vectorises the lanes.
/// An empty `asm!` is a call the loop vectoriser cannot widen; it emits no instruction.
#[inline(always)]
pub(crate) fn lanes_only() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: an empty statement that touches no memory, stack or flags.
    unsafe {
        std::arch::asm!("", options(nomem, nostack, preserves_flags));
    }
}
