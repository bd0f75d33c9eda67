//! Products with few activation rows (m ≤ 8, token-by-token decoding): `y = x · deq(W)ᵀ` and
//! `dx = dy · deq(W)`.
//!
//! W is never written anywhere: codes are decoded in registers and multiplied straight into the
//! activations, so the kernel streams 4 bits per weight and is bound by memory bandwidth.
//!
//! The AVX-512 path reads 64 packed bytes (a *chunk* of 128 weights) into one register and takes
//! the nibbles of all 16 dwords at once, one shift per nibble position, with no byte shuffles.
//! That yields the weights in a permuted order, so the activations are permuted the same way once
//! per call (they are tiny next to W; see [`interleave`]); a dot product does not care about
//! order. Lane `l` of vector `s` holds weight `8l + p(s)` of the chunk, where
//! `p = [1, 0, 3, 2, 5, 4, 7, 6]` (the low nibble of a byte is the odd element). Eight
//! consecutive weights share a lane group, and blocks are multiples of 8 long, so one 16-lane
//! scale vector serves the whole chunk, provided rows start on a multiple of 8 (`k % 8 == 0`);
//! other widths, and the last `k % 128` weights of each row, take the group-of-16 decoder.

use rayon::prelude::*;

use super::decode::{decode, round_to_bf16};
use super::isa::Isa;
use crate::tensor::Nf4Tensor;

/// Weights per chunk (64 packed bytes).
pub(crate) const CHUNK: usize = 128;

/// Position inside its chunk of lane `l` of vector `s`.
#[inline(always)]
pub(crate) const fn chunk_position(s: usize, l: usize) -> usize {
    8 * l + 2 * (s / 2) + 1 - s % 2
}

/// Full chunks per row of W the kernels walk (0 when rows cannot be walked in chunks, see the
/// module docs).
fn chunk_count(k: usize, isa: Isa) -> usize {
    if isa == Isa::Avx512 && k.is_multiple_of(8) {
        k / CHUNK
    } else {
        0
    }
}

/// `m` activation rows laid out for the kernels: chunk by chunk, and within a chunk row by row
/// in decode order (`((c * m) + i) * 128 + 16 s + l`), so the slice of all rows a kernel keeps
/// in L1 is contiguous; then each row's remaining `k - 128 c` values as they are.
fn interleave(x: &[f32], m: usize, k: usize, chunks: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * k];
    let tail = k - chunks * CHUNK;
    let (body, rest) = out.split_at_mut(chunks * m * CHUNK);
    for (i, row) in x.chunks_exact(k).enumerate() {
        for c in 0..chunks {
            let dst = &mut body[(c * m + i) * CHUNK..][..CHUNK];
            let src = &row[c * CHUNK..][..CHUNK];
            for s in 0..8 {
                for l in 0..16 {
                    dst[16 * s + l] = src[chunk_position(s, l)];
                }
            }
        }
        rest[i * tail..][..tail].copy_from_slice(&row[chunks * CHUNK..]);
    }
    out
}

/// Inverse of [`interleave`].
fn deinterleave(xp: &[f32], m: usize, k: usize, chunks: usize, out: &mut [f32]) {
    let tail = k - chunks * CHUNK;
    let (body, rest) = xp.split_at(chunks * m * CHUNK);
    for (i, row) in out.chunks_exact_mut(k).enumerate() {
        for c in 0..chunks {
            let src = &body[(c * m + i) * CHUNK..][..CHUNK];
            let dst = &mut row[c * CHUNK..][..CHUNK];
            for s in 0..8 {
                for l in 0..16 {
                    dst[chunk_position(s, l)] = src[16 * s + l];
                }
            }
        }
        row[chunks * CHUNK..].copy_from_slice(&rest[i * tail..][..tail]);
    }
}

/// Chunks per k-slice: the slice of `m` activation rows (or of `m` accumulator rows),
/// `chunk_bytes` per row and chunk, stays in a 32 KiB L1 while every W row of the task passes
/// over it. Without slicing, 8 f32 rows of 4096 (128 KiB) come from L2 at every chunk, which
/// costs more than the FMAs.
fn slice_chunks(m: usize, chunks: usize, chunk_bytes: usize) -> usize {
    const L1_BUDGET: usize = 24 * 1024;
    (L1_BUDGET / (m * chunk_bytes)).clamp(1, chunks.max(1))
}

/// Bytes ahead of the current chunk to prefetch (into L2; the L1 prefetcher takes it from
/// there): the next row's piece when rows are walked in slices (the hardware prefetcher loses
/// a stream that jumps by a row), else a stretch of the same sequential stream, far enough to
/// cover DRAM latency at GEMV speed. Measured on the bf16 kernel out of cache, one thread:
/// 8 KiB ahead into L2 13.6-13.7 cycles per 64 B, 4 KiB 16.0, 16 KiB 15.1, 8 KiB into L1 16.5,
/// none 19.1.
fn prefetch_distance(per_slice: usize, chunks: usize, k: usize) -> usize {
    if per_slice < chunks {
        k / 2
    } else {
        8192
    }
}

/// Rows of W per rayon task: 64 rows of 4096 are 128 KiB of codes, plenty to amortize a task.
fn rows_per_task(n: usize, k: usize) -> usize {
    let by_size = (1usize << 18) / k.max(1);
    let by_balance = n.div_ceil(4 * rayon::current_num_threads()).max(1);
    by_size.clamp(1, by_balance.max(1))
}

/// A pointer that tasks writing disjoint elements may share.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: only used for writes to disjoint indices, joined before the owner reads.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// By-value access, so closures capture the whole `Shared` (which is `Send`), not the field.
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// `y[m, n] = x[m, k] · deq(W)ᵀ` for small `m`; shapes are checked by the caller.
pub(crate) fn gemv(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: &Nf4Tensor,
    n: usize,
    k: usize,
    y: &mut [f32],
) {
    let chunks = chunk_count(k, isa);
    let avx2_kernel = isa == Isa::Avx2 && avx2::fits(w, k);
    let xp = if chunks > 0 {
        interleave(x, m, k, chunks)
    } else if avx2_kernel {
        avx2::interleave(x, m, k, false)
    } else {
        x.to_vec()
    };
    let out = Shared(y.as_mut_ptr());
    let per_task = rows_per_task(n, k);
    (0..n.div_ceil(per_task)).into_par_iter().for_each(|t| {
        let rows = t * per_task..((t + 1) * per_task).min(n);
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Avx512 is only reported on CPUs that have it; every task writes the
            // columns of its own rows of W.
            Isa::Avx512 => unsafe { avx512::gemv_rows(w, &xp, m, k, n, rows, out.ptr()) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Avx2 is only reported on CPUs with AVX2, FMA and F16C; `fits` checked the
            // shape; every task writes the columns of its own rows of W.
            Isa::Avx2 if avx2_kernel => unsafe {
                avx2::gemv_rows::<false>(w, &xp, m, k, n, rows, out.ptr())
            },
            _ => {
                let mut row = vec![0f32; k];
                for j in rows {
                    decode(isa, w, j * k, &mut row, false);
                    for i in 0..m {
                        let v = portable::dot(isa, &xp[i * k..(i + 1) * k], &row);
                        // SAFETY: (i, j) is inside y and only this task writes column j.
                        unsafe { *out.ptr().add(i * n + j) = v };
                    }
                }
            }
        }
    });
}

/// `dx[m, k] = dy[m, n] · deq(W)` for small `m`. Tasks take disjoint rows of W (so W streams
/// sequentially) and accumulate private copies of dx, summed at the end. With `round_bf16` W
/// is `deq_bf16(W)` (the input gradient of [`gemv_bf16`]): rows are decoded and rounded to a
/// buffer, as on CPUs without AVX-512 (backward products with few rows are rare).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemv_t(
    isa: Isa,
    dy: &[f32],
    m: usize,
    w: &Nf4Tensor,
    n: usize,
    k: usize,
    dx: &mut [f32],
    round_bf16: bool,
) {
    let kernel = isa == Isa::Avx512 && !round_bf16;
    let per_task = rows_per_task(n, k);
    let partial = (0..n.div_ceil(per_task))
        .into_par_iter()
        .fold(
            || vec![0f32; m * k],
            |mut acc, t| {
                let rows = t * per_task..((t + 1) * per_task).min(n);
                #[cfg(target_arch = "x86_64")]
                if kernel {
                    // SAFETY: Avx512 is only reported on CPUs that have it.
                    unsafe { avx512::gemv_t_rows(w, dy, m, k, n, rows, &mut acc) };
                    return acc;
                }
                let mut row = vec![0f32; k];
                for j in rows {
                    decode(isa, w, j * k, &mut row, false);
                    if round_bf16 {
                        round_to_bf16(&mut row);
                    }
                    for i in 0..m {
                        portable::axpy(isa, dy[i * n + j], &row, &mut acc[i * k..(i + 1) * k]);
                    }
                }
                acc
            },
        )
        .reduce_with(|mut a, b| {
            a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
            a
        })
        .unwrap_or_else(|| vec![0f32; m * k]);
    let chunks = if kernel { chunk_count(k, isa) } else { 0 };
    if chunks > 0 {
        deinterleave(&partial, m, k, chunks, dx);
    } else {
        dx.copy_from_slice(&partial);
    }
}

/// The fallback for CPUs without AVX-512: a row of W decoded to a buffer, then plain loops,
/// compiled for AVX2 when the CPU has it.
mod portable {
    use super::Isa;

    pub(super) fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx2 {
            // SAFETY: Avx2 is only reported on CPUs that have AVX2 and FMA.
            return unsafe { dot_avx2(a, b) };
        }
        let _ = isa;
        dot_lanes(a, b)
    }

    pub(super) fn axpy(isa: Isa, alpha: f32, x: &[f32], y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx2 {
            // SAFETY: as above.
            return unsafe { axpy_avx2(alpha, x, y) };
        }
        let _ = isa;
        axpy_plain(alpha, x, y)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        dot_lanes(a, b)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn axpy_avx2(alpha: f32, x: &[f32], y: &mut [f32]) {
        axpy_plain(alpha, x, y)
    }

    /// 16 independent partial sums, so it vectorizes without licence to reassociate.
    #[inline(always)]
    fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
        let mut lanes = [0f32; 16];
        let split = a.len() / 16 * 16;
        for (x, y) in a[..split].chunks_exact(16).zip(b[..split].chunks_exact(16)) {
            for l in 0..16 {
                lanes[l] += x[l] * y[l];
            }
        }
        let tail: f32 = a[split..].iter().zip(&b[split..]).map(|(x, y)| x * y).sum();
        lanes.iter().sum::<f32>() + tail
    }

    #[inline(always)]
    fn axpy_plain(alpha: f32, x: &[f32], y: &mut [f32]) {
        for (y, x) in y.iter_mut().zip(x) {
            *y += alpha * x;
        }
    }
}

/// `$kernel::<M>(args)` (or `$kernel::<G.., M>(args)` after other generic arguments `G`) for
/// the row count `$m` as a constant `M` in 1..=8 (the kernels keep one register per activation
/// row).
#[cfg(target_arch = "x86_64")]
macro_rules! with_rows {
    ($m:expr, $kernel:ident $(::<$($g:tt),+>)? ($($arg:expr),* $(,)?)) => {
        match $m {
            1 => $kernel::<$($($g,)+)? 1>($($arg),*),
            2 => $kernel::<$($($g,)+)? 2>($($arg),*),
            3 => $kernel::<$($($g,)+)? 3>($($arg),*),
            4 => $kernel::<$($($g,)+)? 4>($($arg),*),
            5 => $kernel::<$($($g,)+)? 5>($($arg),*),
            6 => $kernel::<$($($g,)+)? 6>($($arg),*),
            7 => $kernel::<$($($g,)+)? 7>($($arg),*),
            8 => $kernel::<$($($g,)+)? 8>($($arg),*),
            _ => unreachable!("the GEMV kernels take 1 ≤ m ≤ 8 rows"),
        }
    };
}

// The kernels index several per-row register arrays in lockstep; ranges read better there.
#[allow(clippy::needless_range_loop)]
mod avx2;
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx512;
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx512_bf16;
mod bf16;
#[cfg(target_arch = "x86_64")]
mod scales;

pub(crate) use bf16::gemv_bf16;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codebook::QuantType;
    use crate::cpu::decode::Scales;
    use crate::cpu::reference::{assert_product, assert_product_bf16, values, weight};

    /// The vectorized double-quant scale lookup is bit-exact, across nested-group boundaries.
    #[test]
    fn block_scales_are_exact() {
        if Isa::detect() != Isa::Avx512 {
            return;
        }
        // Every code value, and nested groups that differ, so any wrong lookup shows.
        let absmax = crate::tensor::Absmax::Double(crate::double_quant::DoubleQuant {
            codes: (0..1000u32).map(|b| (b * 7 % 256) as u8).collect(),
            nested_absmax: vec![0.5, 1.25, 3.0, 0.75],
            offset: 0.125,
        });
        let scales = Scales::new(&absmax);
        for first in [0, 5, 250, 500] {
            let mut out = vec![f32::NAN; 500];
            // SAFETY: the CPU has AVX-512 (checked above).
            unsafe { avx512::block_scales_for_test(scales, first, &mut out) };
            for (i, v) in out.iter().enumerate() {
                assert_eq!(
                    v.to_bits(),
                    absmax.get(first + i).to_bits(),
                    "block {}",
                    first + i
                );
            }
        }
    }

    /// bf16 activations against `deq_bf16(W)`: the AVX-512 BF16 kernel (where the CPU has it)
    /// and the row-decoding path, for full and half last chunks, blocks from 64 (one block per
    /// half chunk) to 4096 (rows crossing blocks), plain and double-quantized scales, nested
    /// groups changing inside a task, and the fallback shapes (blocksize 32, k % 64 != 0).
    #[test]
    fn bf16_products_match_the_bf16_reference() {
        let shapes = [
            (1, 37, 1024, 64, true, QuantType::Nf4),
            (2, 300, 576, 64, true, QuantType::Nf4),
            (3, 50, 192, 128, false, QuantType::Fp4),
            (8, 20, 4160, 256, true, QuantType::Nf4),
            (5, 9, 4096, 4096, false, QuantType::Nf4),
            (4, 7, 1088, 4096, true, QuantType::Fp4),
            (6, 17, 256, 32, true, QuantType::Nf4),
            (7, 5, 136, 64, false, QuantType::Nf4),
            (1, 700, 64, 64, true, QuantType::Nf4),
        ];
        for isa in Isa::available() {
            for (t, &(m, n, k, bs, double, qtype)) in shapes.iter().enumerate() {
                let w = weight(n, k, bs, qtype, double, 40 + t as u64);
                let x16: Vec<half::bf16> = values(m * k, 3)
                    .iter()
                    .map(|&v| half::bf16::from_f32(v))
                    .collect();
                let x: Vec<f32> = x16.iter().map(|v| v.to_f32()).collect();
                let kernel = bf16::has_kernel(isa, &w, k);
                let what = format!("{isa:?} kernel {kernel} m {m} n {n} k {k} bs {bs}");
                let mut y = vec![f32::NAN; m * n];
                gemv_bf16(isa, &x16, m, &w, n, k, &mut y);
                assert_product_bf16(&x, m, &w, false, &y, &what);
                let dy = values(m * n, 4);
                let mut dx = vec![f32::NAN; m * k];
                gemv_t(isa, &dy, m, &w, n, k, &mut dx, true);
                assert_product_bf16(&dy, m, &w, true, &dx, &format!("{isa:?} t m {m}"));
            }
        }
    }

    /// `data` as an `[n, k]` NF4 weight with plain (not double-quantized) block scales.
    fn plain_nf4(data: &[f32], n: usize, k: usize, bs: usize) -> Nf4Tensor {
        let f32 = crate::tensor::SourceDtype::F32;
        Nf4Tensor::quantize(data, &[n, k], f32, QuantType::Nf4, bs, false).unwrap()
    }

    /// One-hot activations pick single weights out of the bf16 GEMV, so every weight it uses
    /// must be `deq_bf16(W)` bit for bit, including the rounding ties of `code · absmax`
    /// (absmax values whose low 16 bits are 0x8000, with even and odd bit 16, times the ±1 codes).
    #[test]
    fn bf16_gemv_uses_the_dequantizers_weights_bit_for_bit() {
        let (n, k, bs) = (6, 256, 64);
        let ties = [0x3F80_8000u32, 0x3F81_8000, 0xC0A0_8000, 0xBF7F_8000];
        let data: Vec<f32> = values(n * k, 9)
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if i % bs == 0 {
                    f32::from_bits(ties[(i / bs) % ties.len()])
                } else {
                    v.clamp(-0.9, 0.9)
                }
            })
            .collect();
        let w = plain_nf4(&data, n, k, bs);
        let mut deq = vec![half::bf16::ZERO; n * k];
        crate::cpu::dequantize_bf16_into(&w, &mut deq);
        let m = 8;
        for isa in Isa::available() {
            for first in (0..k).step_by(m) {
                let mut x = vec![half::bf16::ZERO; m * k];
                for i in 0..m {
                    x[i * k + first + i] = half::bf16::ONE;
                }
                let mut y = vec![f32::NAN; m * n];
                gemv_bf16(isa, &x, m, &w, n, k, &mut y);
                for i in 0..m {
                    for j in 0..n {
                        let want = deq[j * k + first + i].to_f32();
                        assert_eq!(
                            y[i * n + j].to_bits(),
                            want.to_bits(),
                            "{isa:?} row {j} column {}",
                            first + i
                        );
                    }
                }
            }
        }
    }

    /// Blocks whose scale makes `code · scale` subnormal: the BF16 instructions count those
    /// weights as zero (documented in `avx512_bf16`); the error stays within that bound,
    /// 2^-126 · Σ|x| on top of the usual 1e-5 · Σ|x||w|.
    #[test]
    fn bf16_gemv_flushes_subnormal_weights_within_the_stated_bound() {
        let (n, k) = (3, 256);
        let data: Vec<f32> = values(n * k, 8)
            .iter()
            .enumerate()
            .map(|(i, v)| v * if (i / 64) % 2 == 0 { 1e-37 } else { 1.0 })
            .collect();
        let w = plain_nf4(&data, n, k, 64);
        let mut deq = vec![half::bf16::ZERO; n * k];
        crate::cpu::dequantize_bf16_into(&w, &mut deq);
        assert!(deq
            .iter()
            .any(|v| v.to_f32() != 0.0 && v.to_f32().abs() < f32::MIN_POSITIVE));
        // x large where the weights are tiny, so flushed weights show in the sum.
        let x16: Vec<half::bf16> = (0..k)
            .map(|p| half::bf16::from_f32(if (p / 64) % 2 == 0 { 1e30 } else { 0.5 }))
            .collect();
        for isa in Isa::available() {
            let kernel = bf16::has_kernel(isa, &w, k);
            let mut y = vec![f32::NAN; n];
            gemv_bf16(isa, &x16, 1, &w, n, k, &mut y);
            for (j, got) in y.iter().enumerate() {
                let (mut want, mut abs, mut xsum) = (0f64, 0f64, 0f64);
                for p in 0..k {
                    let (xv, wv) = (x16[p].to_f32() as f64, deq[j * k + p].to_f32() as f64);
                    want += xv * wv;
                    abs += (xv * wv).abs();
                    xsum += xv.abs();
                }
                let bound = 1e-5 * abs + xsum * f32::MIN_POSITIVE as f64;
                assert!(
                    (*got as f64 - want).abs() <= bound,
                    "kernel {kernel} row {j}: got {got}, want {want}, bound {bound}"
                );
            }
        }
    }

    #[test]
    fn every_isa_matches_the_reference() {
        let shapes = [
            (1, 37, 1000, 64, true, QuantType::Nf4),
            (8, 20, 256, 32, false, QuantType::Fp4),
            (3, 50, 131, 128, true, QuantType::Nf4),
            (5, 9, 4104, 4096, false, QuantType::Nf4),
            (2, 300, 136, 64, true, QuantType::Fp4),
            (7, 3, 8, 32, true, QuantType::Nf4),
            // The AVX2 kernel's shapes: one block per unit, rows crossing blocks (4160 % 256,
            // 1088 % 4096), nested groups changing inside a task, every row count.
            (1, 37, 1024, 64, true, QuantType::Nf4),
            (8, 20, 4160, 256, true, QuantType::Nf4),
            (4, 7, 1088, 4096, true, QuantType::Fp4),
            (2, 300, 576, 128, false, QuantType::Nf4),
            (3, 700, 64, 64, true, QuantType::Nf4),
            (5, 11, 192, 64, false, QuantType::Fp4),
            (6, 13, 320, 64, true, QuantType::Nf4),
        ];
        for isa in Isa::available() {
            for (t, &(m, n, k, bs, double, qtype)) in shapes.iter().enumerate() {
                let w = weight(n, k, bs, qtype, double, t as u64);
                let what = format!("{isa:?} m {m} n {n} k {k} bs {bs}");
                let x = values(m * k, 1);
                let mut y = vec![f32::NAN; m * n];
                gemv(isa, &x, m, &w, n, k, &mut y);
                assert_product(&x, m, &w, false, &y, &what);
                let dy = values(m * n, 2);
                let mut dx = vec![f32::NAN; m * k];
                gemv_t(isa, &dy, m, &w, n, k, &mut dx, false);
                assert_product(&dy, m, &w, true, &dx, &what);
            }
        }
    }
}
