//! The AVX2 GEMV kernel: `y = x · deq(W)ᵀ` with f32 activations, for CPUs without AVX-512.
//!
//! AVX2 has no 16-entry float lookup: `vpermps` takes 8 entries, so a code costs two permutes
//! and a blend, and a permute issues once per cycle (Zen 3: ~50 cycles per 128 weights). Byte
//! shuffles issue twice per cycle and look up 32 entries at once, so the kernel looks up the
//! four bytes of each f32 code value separately and puts the words back together:
//!
//! A *unit* of 32 packed bytes is 64 weights of one block (blocks of ≥ 64, rows of
//! `k % 64 == 0`). `raw & 0xF` and `(raw >> 4) & 0xF` give 32 byte indices each (the odd and the
//! even weights; the low nibble of a byte is the odd element). For each, four `vpshufb` fetch
//! byte planes 0..3 of the code values, two rounds of unpacking (bytes to words, words to
//! dwords) interleave them into four vectors of 8 exact f32 code values, and four FMAs multiply
//! them into the activations. The block scale multiplies the unit's sum once. Per 128 weights:
//! 16 byte shuffles, 32 unpacks and 16 FMAs: 28-31 cycles on Zen 3 in the bench's
//! instruction-floor row (the shuffle ports bind), 32-37 in the kernel.
//!
//! The unpacks work within 128-bit lanes, so vector `q` of index set `h` (0: odd weights, 1:
//! even) holds in element `4ℓ + e` the byte `16ℓ + 4q + e` of the unit, i.e. weight
//! `2 (16ℓ + 4q + e) + 1 − h`; [`interleave`] lays the activations out the same way.
//!
//! bf16 activations (bitsandbytes' bf16 compute, `y = x · deq_bf16(W)ᵀ`) take the same walk with
//! a per-unit table of `bf16(code · scale)`, the dequantizer's rounding (round to nearest even
//! on the f32 product): two byte planes, one unpack round to bf16 words, and a shift or a mask
//! to widen each word to the f32 it equals. Products of two bf16 values are exact in f32, so
//! only the summation rounds, as with `vdpbf16ps`; unlike those instructions, subnormal weights
//! and products are kept. Vector `q` then holds in element `4ℓ + e` the byte
//! `16ℓ + 8 ⌊q/2⌋ + 2e + (q mod 2)`.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
#[cfg(target_arch = "x86_64")]
use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use super::scales::BlockScales;
#[cfg(target_arch = "x86_64")]
use super::{prefetch_distance, slice_chunks};
#[cfg(target_arch = "x86_64")]
use crate::cpu::decode::avx2::{byte_planes, lookup, to_bf16_lanes};
use crate::tensor::Nf4Tensor;

/// Weights per unit (32 packed bytes, one register).
pub(super) const UNIT: usize = 64;

/// Position inside its unit of element `p` of activation vector `v` (`v = 4h + q`), for f32
/// code values (`bf16 == false`) or bf16 weights.
#[inline(always)]
const fn unit_position(v: usize, p: usize, bf16: bool) -> usize {
    let (q, l, e) = (v % 4, p / 4, p % 4);
    let byte = if bf16 {
        16 * l + 8 * (q / 2) + 2 * e + q % 2
    } else {
        16 * l + 4 * q + e
    };
    2 * byte + 1 - v / 4
}

/// Whether the kernel can take this product (x86-64; each unit must lie in one block).
pub(super) fn fits(w: &Nf4Tensor, k: usize) -> bool {
    cfg!(target_arch = "x86_64") && w.blocksize() >= UNIT && k.is_multiple_of(UNIT)
}

/// `m` rows of activations laid out for the kernel (f32 code values, or bf16 weights): unit by
/// unit, within a unit row by row in lookup order (`((u · m) + i) · 64 + 8 v + p`).
pub(super) fn interleave(x: &[f32], m: usize, k: usize, bf16: bool) -> Vec<f32> {
    let units = k / UNIT;
    let mut out = vec![0f32; m * k];
    for (i, row) in x.chunks_exact(k).enumerate() {
        for u in 0..units {
            let dst = &mut out[(u * m + i) * UNIT..][..UNIT];
            let src = &row[u * UNIT..][..UNIT];
            for v in 0..8 {
                for p in 0..8 {
                    dst[8 * v + p] = src[unit_position(v, p, bf16)];
                }
            }
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
/// `bf16(code · scale)` of the 16 codes (`code` = values 0..8 and 8..16) as two byte planes,
/// low bytes and high bytes, each in both 128-bit lanes.
#[inline(always)]
unsafe fn bf16_planes(code: &[__m256; 2], scale: f32, select: &[__m256i; 2]) -> [__m256i; 2] {
    let s = _mm256_set1_ps(scale);
    let r0 = to_bf16_lanes(_mm256_mul_ps(code[0], s));
    let r1 = to_bf16_lanes(_mm256_mul_ps(code[1], s));
    // Lane 0: low bytes of codes 0..4 and 8..12, then their high bytes; lane 1: codes 4..8
    // and 12..16. The dword permute puts each plane's four dwords in code order.
    let t = _mm256_or_si256(
        _mm256_shuffle_epi8(r0, select[0]),
        _mm256_shuffle_epi8(r1, select[1]),
    );
    let t = _mm256_permutevar8x32_epi32(t, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    [
        _mm256_permute4x64_epi64::<0x44>(t),
        _mm256_permute4x64_epi64::<0xEE>(t),
    ]
}

/// The byte selections of [`bf16_planes`]: from `r0` (codes 0..8, a bf16 in the low half of
/// each dword), bytes 0 and 1 of each dword to bytes 0..4 and 8..12 of the lane; from `r1`, to
/// bytes 4..8 and 12..16.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn bf16_select() -> [__m256i; 2] {
    let lane = |at_lo: usize, at_hi: usize| {
        let mut sel = [0x80u8; 16];
        for d in 0..4 {
            sel[at_lo + d] = (4 * d) as u8;
            sel[at_hi + d] = (4 * d + 1) as u8;
        }
        sel
    };
    [lane(0, 8), lane(4, 12)]
        .map(|sel| _mm256_broadcastsi128_si256(_mm_loadu_si128(sel.as_ptr() as *const __m128i)))
}

/// The 32 bf16 weights selected by `idx` from the planes of [`bf16_planes`], as four f32
/// vectors (exact: a bf16 is the high half of the f32 it equals).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn lookup_bf16(idx: __m256i, planes: &[__m256i; 2]) -> [__m256; 4] {
    let lo = _mm256_shuffle_epi8(planes[0], idx);
    let hi = _mm256_shuffle_epi8(planes[1], idx);
    let w0 = _mm256_unpacklo_epi8(lo, hi);
    let w1 = _mm256_unpackhi_epi8(lo, hi);
    let top = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    [
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w0)),
        _mm256_castsi256_ps(_mm256_and_si256(w0, top)),
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w1)),
        _mm256_castsi256_ps(_mm256_and_si256(w1, top)),
    ]
}

#[cfg(target_arch = "x86_64")]
/// Rows `rows` of `y[m, n] = x · deq(W)ᵀ` (or, with `BF16`, `x · deq_bf16(W)ᵀ` for bf16
/// activations passed as f32), with `xp` laid out by [`interleave`] for the same `BF16`.
/// Requires [`fits`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn gemv_rows<const BF16: bool>(
    w: &Nf4Tensor,
    xp: &[f32],
    m: usize,
    k: usize,
    n: usize,
    rows: Range<usize>,
    y: *mut f32,
) {
    with_rows!(m, rows_m::<BF16>(w, xp, k, n, rows, y))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_m<const BF16: bool, const M: usize>(
    w: &Nf4Tensor,
    xp: &[f32],
    k: usize,
    n: usize,
    rows: Range<usize>,
    y: *mut f32,
) {
    debug_assert!(fits(w, k));
    if rows.is_empty() {
        return;
    }
    let src = w.packed().as_ptr();
    let values = w.qtype().values();
    let planes = byte_planes(values);
    let code = [
        _mm256_loadu_ps(values.as_ptr()),
        _mm256_loadu_ps(values.as_ptr().add(8)),
    ];
    let select = bf16_select();
    let bs = w.blocksize();
    // Blocksizes are powers of two: a shift, not a division, per unit.
    let shift = bs.trailing_zeros();
    let units = k / UNIT;
    let scales = BlockScales::new(w.absmax(), rows.start * k / bs..(rows.end * k).div_ceil(bs));
    let nibble = _mm256_set1_epi8(0x0F);
    let x = xp.as_ptr();
    let per_slice = slice_chunks(M, units, UNIT * 4);
    let ahead = prefetch_distance(per_slice, units, k);
    let mut sums = vec![0f32; rows.len() * M];
    let mut u0 = 0;
    loop {
        let u1 = (u0 + per_slice).min(units);
        for (r, j) in rows.clone().enumerate() {
            let f0 = j * k;
            let mut acc = [_mm256_setzero_ps(); M];
            for u in u0..u1 {
                let f = f0 + u * UNIT;
                _mm_prefetch::<_MM_HINT_T1>(src.wrapping_add(f / 2 + ahead) as *const i8);
                let raw = _mm256_loadu_si256(src.add(f / 2) as *const __m256i);
                let odd_idx = _mm256_and_si256(raw, nibble);
                let even_idx = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), nibble);
                let scale = scales.get(f >> shift);
                let (odd, even) = if BF16 {
                    let planes = bf16_planes(&code, scale, &select);
                    (
                        lookup_bf16(odd_idx, &planes),
                        lookup_bf16(even_idx, &planes),
                    )
                } else {
                    (lookup(odd_idx, &planes), lookup(even_idx, &planes))
                };
                let xu = x.add(u * M * UNIT);
                // Two sums for one row, so its FMAs form two chains (more rows are independent
                // enough, and need the registers); the block scale of f32 code values
                // multiplies their total once per unit. Constant bounds and indices, so the
                // loops unroll and the sums stay in registers.
                let mut part = [[_mm256_setzero_ps(); M]; 2];
                for v in 0..8 {
                    let codes = if v < 4 { odd[v] } else { even[v - 4] };
                    let a = if M == 1 { v & 1 } else { 0 };
                    for i in 0..M {
                        let xv = _mm256_loadu_ps(xu.add(i * UNIT + 8 * v));
                        part[a][i] = _mm256_fmadd_ps(codes, xv, part[a][i]);
                    }
                }
                for i in 0..M {
                    let sum = _mm256_add_ps(part[0][i], part[1][i]);
                    acc[i] = if BF16 {
                        // The scale is in the bf16 weights already.
                        _mm256_add_ps(sum, acc[i])
                    } else {
                        _mm256_fmadd_ps(sum, _mm256_set1_ps(scale), acc[i])
                    };
                }
            }
            for i in 0..M {
                sums[r * M + i] += reduce(acc[i]);
            }
        }
        if u1 == units {
            break;
        }
        u0 = u1;
    }
    for (r, j) in rows.enumerate() {
        for i in 0..M {
            *y.add(i * n + j) = sums[r * M + i];
        }
    }
}

#[cfg(target_arch = "x86_64")]
/// Sum of the 8 lanes.
#[inline(always)]
unsafe fn reduce(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}
