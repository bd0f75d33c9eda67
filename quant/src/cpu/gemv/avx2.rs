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
//! 16 byte shuffles, 32 unpacks and 16 FMAs, about 25 cycles on Zen 3 (the shuffle ports bind).
//!
//! The unpacks work within 128-bit lanes, so vector `q` of index set `h` (0: odd weights, 1:
//! even) holds in element `4ℓ + e` the byte `16ℓ + 4q + e` of the unit, i.e. weight
//! `2 (16ℓ + 4q + e) + 1 − h`; [`interleave`] lays the activations out the same way.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
#[cfg(target_arch = "x86_64")]
use std::mem::transmute;
#[cfg(target_arch = "x86_64")]
use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use super::scales::BlockScales;
#[cfg(target_arch = "x86_64")]
use super::{prefetch_distance, slice_chunks};
use crate::tensor::Nf4Tensor;

/// Weights per unit (32 packed bytes, one register).
pub(super) const UNIT: usize = 64;

/// Position inside its unit of element `p` of activation vector `v` (`v = 4h + q`).
#[inline(always)]
const fn unit_position(v: usize, p: usize) -> usize {
    2 * (16 * (p / 4) + 4 * (v % 4) + p % 4) + 1 - v / 4
}

/// Whether the kernel can take this product (x86-64; each unit must lie in one block).
pub(super) fn fits(w: &Nf4Tensor, k: usize) -> bool {
    cfg!(target_arch = "x86_64") && w.blocksize() >= UNIT && k.is_multiple_of(UNIT)
}

/// `m` rows of activations laid out for the kernel: unit by unit, within a unit row by row in
/// lookup order (`((u · m) + i) · 64 + 8 v + p`).
pub(super) fn interleave(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let units = k / UNIT;
    let mut out = vec![0f32; m * k];
    for (i, row) in x.chunks_exact(k).enumerate() {
        for u in 0..units {
            let dst = &mut out[(u * m + i) * UNIT..][..UNIT];
            let src = &row[u * UNIT..][..UNIT];
            for v in 0..8 {
                for p in 0..8 {
                    dst[8 * v + p] = src[unit_position(v, p)];
                }
            }
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
/// Byte plane `b` of the 16 code values, in both 128-bit lanes.
#[inline(always)]
unsafe fn byte_planes(values: &[f32; 16]) -> [__m256i; 4] {
    std::array::from_fn(|b| {
        let plane: [u8; 16] = std::array::from_fn(|c| values[c].to_bits().to_le_bytes()[b]);
        _mm256_broadcastsi128_si256(_mm_loadu_si128(plane.as_ptr() as *const __m128i))
    })
}

#[cfg(target_arch = "x86_64")]
/// The 32 code values selected by the byte indices `idx` (0..16), as four f32 vectors.
#[inline(always)]
unsafe fn lookup(idx: __m256i, planes: &[__m256i; 4]) -> [__m256; 4] {
    let p0 = _mm256_shuffle_epi8(planes[0], idx);
    let p1 = _mm256_shuffle_epi8(planes[1], idx);
    let p2 = _mm256_shuffle_epi8(planes[2], idx);
    let p3 = _mm256_shuffle_epi8(planes[3], idx);
    let lo01 = _mm256_unpacklo_epi8(p0, p1);
    let hi01 = _mm256_unpackhi_epi8(p0, p1);
    let lo23 = _mm256_unpacklo_epi8(p2, p3);
    let hi23 = _mm256_unpackhi_epi8(p2, p3);
    [
        transmute::<__m256i, __m256>(_mm256_unpacklo_epi16(lo01, lo23)),
        transmute::<__m256i, __m256>(_mm256_unpackhi_epi16(lo01, lo23)),
        transmute::<__m256i, __m256>(_mm256_unpacklo_epi16(hi01, hi23)),
        transmute::<__m256i, __m256>(_mm256_unpackhi_epi16(hi01, hi23)),
    ]
}

#[cfg(target_arch = "x86_64")]
/// Rows `rows` of `y[m, n] = x · deq(W)ᵀ`, with `xp` laid out by [`interleave`]. Requires
/// [`fits`].
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn gemv_rows(
    w: &Nf4Tensor,
    xp: &[f32],
    m: usize,
    k: usize,
    n: usize,
    rows: Range<usize>,
    y: *mut f32,
) {
    with_rows!(m, rows_m(w, xp, k, n, rows, y))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_m<const M: usize>(
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
    let planes = byte_planes(w.qtype().values());
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
                let odd = lookup(_mm256_and_si256(raw, nibble), &planes);
                let even = lookup(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(raw), nibble),
                    &planes,
                );
                let xu = x.add(u * M * UNIT);
                // Two sums for one row, so its FMAs form two chains (more rows are independent
                // enough, and need the registers); the block scale multiplies their total once
                // per unit. Constant bounds and indices, so the loops unroll and the sums stay
                // in registers.
                let mut part = [[_mm256_setzero_ps(); M]; 2];
                for v in 0..8 {
                    let codes = if v < 4 { odd[v] } else { even[v - 4] };
                    let a = if M == 1 { v & 1 } else { 0 };
                    for i in 0..M {
                        let xv = _mm256_loadu_ps(xu.add(i * UNIT + 8 * v));
                        part[a][i] = _mm256_fmadd_ps(codes, xv, part[a][i]);
                    }
                }
                let scale = _mm256_set1_ps(scales.get(f >> shift));
                for i in 0..M {
                    acc[i] = _mm256_fmadd_ps(_mm256_add_ps(part[0][i], part[1][i]), scale, acc[i]);
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
