//! Runtime SIMD dispatch: wheels are built for baseline x86-64, so the hot
//! loops are recompiled for AVX2+FMA and AVX-512 and chosen once per process with
//! `is_x86_feature_detected!`.
//!
//! [`dispatch`] runs a closure inside a `#[target_feature]` function. The kernels' row-chunk
//! bodies are `#[inline(always)]` closures over `#[inline(always)]` helpers, so LLVM inlines
//! them into the wrapper and vectorises them for the wider instruction set. Results may differ
//! in the last bits between instruction sets (FMA contraction is not used: LLVM keeps separate
//! multiplies and adds unless told otherwise), never between thread counts.
//! `MMOT_SIMD=generic|avx2|avx512` caps the level (for testing and benchmarking).

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Generic,
    Avx2,
    Avx512,
}

/// The widest level this CPU supports, capped by `MMOT_SIMD`; detected once.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("MMOT_SIMD").ok().as_deref() {
            Some("generic") => Level::Generic,
            Some("avx2") => Level::Avx2,
            _ => Level::Avx512,
        };
        detected().min(cap)
    })
}

#[cfg(target_arch = "x86_64")]
fn detected() -> Level {
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("fma")
    {
        Level::Avx512
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Level::Avx2
    } else {
        Level::Generic
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detected() -> Level {
    Level::Generic
}

/// Runs `f` compiled for the best available instruction set.
#[inline(always)]
pub fn dispatch<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        match level() {
            // SAFETY: the features were detected at runtime on this CPU.
            Level::Avx512 => unsafe { with_avx512(f) },
            Level::Avx2 => unsafe { with_avx2(f) },
            Level::Generic => f(),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        f()
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
unsafe fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}
