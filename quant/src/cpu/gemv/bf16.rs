//! Few-row products with W dequantized to bf16, as bitsandbytes computes them for a bf16
//! compute dtype: `y = x · deq_bf16(W)ᵀ` for bf16 activations and `dx = dy · deq_bf16(W)`.
//!
//! `deq_bf16(W)` is [`crate::cpu::dequantize_bf16_into`] (`bf16(code · absmax)`); products of
//! two bf16 values are exact in f32, so only the f32 summation rounds. The forward product has
//! an AVX-512 BF16 kernel ([`super::avx512_bf16`]) for blocks of at least 64 and rows of
//! `k % 64 == 0` (every model shape with the default blocksize); anything else decodes a row to
//! bf16 at a time and takes plain dot products. The transposed product is `super::gemv_t` with
//! rounding.

use half::bf16;
use rayon::prelude::*;

use super::super::decode::decode;
use super::super::isa::{has_avx512_bf16, Isa};
use super::{portable, rows_per_task, Shared, CHUNK};
use crate::tensor::Nf4Tensor;

/// Weights per half chunk: the kernel needs each half to lie in one block (blocks of ≥ 64, rows
/// of `k % 64 == 0`).
pub(super) const HALF: usize = CHUNK / 2;

/// Weight position inside its chunk of word lane `q` of vector `s` (see [`super::avx512_bf16`]).
#[inline(always)]
const fn word_position(s: usize, q: usize) -> usize {
    4 * q + 2 * (s / 2) + 1 - s % 2
}

/// `m` rows of bf16 activations laid out for the kernel: chunk by chunk, within a chunk row by
/// row in decode order (`((c · m) + i) · 128 + 32 s + q`), zero past the end of a row (the
/// last chunk of a row of `k % 128 == 64` is half full).
pub(super) fn interleave(x: &[bf16], m: usize, k: usize) -> Vec<bf16> {
    let chunks = k.div_ceil(CHUNK);
    let mut out = vec![bf16::ZERO; chunks * m * CHUNK];
    for (i, row) in x.chunks_exact(k).enumerate() {
        for c in 0..chunks {
            let dst = &mut out[(c * m + i) * CHUNK..][..CHUNK];
            for s in 0..4 {
                for q in 0..32 {
                    let p = c * CHUNK + word_position(s, q);
                    if p < k {
                        dst[32 * s + q] = row[p];
                    }
                }
            }
        }
    }
    out
}

/// Whether the AVX-512 BF16 kernel takes this product.
pub(super) fn has_kernel(isa: Isa, w: &Nf4Tensor, k: usize) -> bool {
    cfg!(target_arch = "x86_64")
        && isa == Isa::Avx512
        && has_avx512_bf16()
        && w.blocksize() >= HALF
        && k.is_multiple_of(HALF)
}

/// `y[m, n] = x[m, k] · deq_bf16(W)ᵀ` for small `m`; shapes are checked by the caller.
pub(crate) fn gemv_bf16(
    isa: Isa,
    x: &[bf16],
    m: usize,
    w: &Nf4Tensor,
    n: usize,
    k: usize,
    y: &mut [f32],
) {
    let kernel = has_kernel(isa, w, k);
    let out = Shared(y.as_mut_ptr());
    let per_task = rows_per_task(n, k);
    let tasks = n.div_ceil(per_task);
    #[cfg(target_arch = "x86_64")]
    if kernel {
        let xp = interleave(x, m, k);
        (0..tasks).into_par_iter().for_each(|t| {
            let rows = t * per_task..((t + 1) * per_task).min(n);
            // SAFETY: `has_kernel` checked the CPU features and the shape; every task writes
            // the columns of its own rows of W.
            unsafe { super::avx512_bf16::gemv_rows(w, &xp, m, k, n, rows, out.ptr()) }
        });
        return;
    }
    let _ = kernel;
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 && super::avx2::fits(w, k) {
        let xp = super::avx2::interleave(&xf, m, k, true);
        (0..tasks).into_par_iter().for_each(|t| {
            let rows = t * per_task..((t + 1) * per_task).min(n);
            // SAFETY: Avx2 is only reported on CPUs with AVX2, FMA and F16C; `fits` checked the
            // shape; every task writes the columns of its own rows of W.
            unsafe { super::avx2::gemv_rows::<true>(w, &xp, m, k, n, rows, out.ptr()) }
        });
        return;
    }
    (0..tasks).into_par_iter().for_each(|t| {
        let rows = t * per_task..((t + 1) * per_task).min(n);
        let mut row16 = vec![bf16::ZERO; k];
        let mut row = vec![0f32; k];
        for j in rows {
            decode(isa, w, j * k, &mut row16, false);
            row.iter_mut()
                .zip(&row16)
                .for_each(|(r, v)| *r = v.to_f32());
            for i in 0..m {
                let v = portable::dot(isa, &xf[i * k..(i + 1) * k], &row);
                // SAFETY: (i, j) is inside y and only this task writes column j.
                unsafe { *out.ptr().add(i * n + j) = v };
            }
        }
    });
}
