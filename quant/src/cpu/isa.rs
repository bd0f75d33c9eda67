//! Which instruction set the kernels run with, detected once at run time.

use std::sync::OnceLock;

/// The SIMD level a kernel is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512 F + BW + VL: the 16 code values live in one register (`vpermps`).
    Avx512,
    /// AVX2 + FMA + F16C: two 8-entry permutes and a blend per lookup.
    Avx2,
    /// Portable code; also the reference the SIMD paths are tested against.
    Scalar,
}

impl Isa {
    /// The best level this CPU supports (cached: detection is not free and kernels ask often).
    pub(crate) fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(detect_uncached)
    }

    /// Every level this CPU can run, best first (tests cover each).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Isa> {
        let mut all = vec![Isa::Scalar];
        let best = Isa::detect();
        if best != Isa::Scalar {
            all.insert(0, Isa::Avx2);
        }
        if best == Isa::Avx512 {
            all.insert(0, Isa::Avx512);
        }
        all
    }
}

/// Whether the CPU also has AVX-512 BF16 (`vdpbf16ps`, `vcvtne2ps2bf16`), which the bf16
/// GEMV uses on top of [`Isa::Avx512`] (cached like [`Isa::detect`]).
pub(crate) fn has_avx512_bf16() -> bool {
    static BF16: OnceLock<bool> = OnceLock::new();
    *BF16.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            Isa::detect() == Isa::Avx512 && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

#[cfg(target_arch = "x86_64")]
fn detect_uncached() -> Isa {
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("f16c")
    {
        Isa::Avx512
    } else if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        Isa::Avx2
    } else {
        Isa::Scalar
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_uncached() -> Isa {
    Isa::Scalar
}
