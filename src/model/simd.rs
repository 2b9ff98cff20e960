//! Run-time choice of the widest vector instructions the CPU has, for the element-wise loops
//! of training (activations, the optimiser, clipping).
//!
//! [`multiversion!`](crate::model::simd) wraps a function whose body is plain scalar code over
//! slices: it compiles the body three times, with AVX-512, with AVX2 + FMA and for the baseline
//! target, and calls the widest one the CPU supports, so the compiler can vectorise the loops.
//! Results never depend on the choice: Rust never contracts a·b + c into an fma, so every lane
//! performs the scalar code's IEEE operations. The bodies should use plain `for` loops and
//! `#[inline(always)]` helpers, so that nothing in them is left out of line (and compiled
//! without the features).

/// Whether the CPU runs the AVX-512 versions (F, VL and DQ).
///
/// ```
/// let _ = vqx::model::simd::has_avx512();
/// ```
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU runs the AVX2 + FMA versions.
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `fn name(args) -> ret { body }` compiled for AVX-512, AVX2 + FMA and the baseline,
/// dispatched at run time (see the module's notes); arguments are passed through by value.
/// Used beyond training too: every hot element-wise loop of the crate (k-means sums, exact
/// distances, finiteness checks) would otherwise run on the baseline's SSE2.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                if $crate::model::simd::has_avx512() {
                    // SAFETY: the CPU has the features `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if $crate::model::simd::has_avx2() {
                    // SAFETY: as above, for AVX2 and FMA.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use multiversion;
