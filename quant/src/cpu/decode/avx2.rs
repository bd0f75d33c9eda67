//! AVX2 decoder. Runs of 64 elements that start on a multiple of 64 inside one block look the
//! code values up by byte planes ([`lookup`]: `vpshufb` does 32 lookups per instruction, twice
//! per cycle on Zen 3); anything else goes in groups of 16 with the 16-entry lookup as two
//! 8-entry permutes and a blend (a permute issues once per cycle).

use std::arch::x86_64::*;

use super::{Element, Kind, Scales, BYTE_OF_LANE, SHIFT_OF_LANE};
use crate::tensor::Nf4Tensor;

/// Round 8 f32 to bf16 (nearest-even, NaN kept quiet), in the low 16 bits of each lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn to_bf16_lanes(v: __m256) -> __m256i {
    let bits = _mm256_castps_si256(v);
    let high = _mm256_srli_epi32::<16>(bits);
    let lsb = _mm256_and_si256(high, _mm256_set1_epi32(1));
    let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(
        _mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)),
        lsb,
    ));
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    let quiet = _mm256_or_si256(high, _mm256_set1_epi32(0x40));
    _mm256_blendv_epi8(rounded, quiet, nan)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store16<T: Element>(dst: *mut T, lo: __m256, hi: __m256) {
    match T::KIND {
        Kind::F32 => {
            _mm256_storeu_ps(dst as *mut f32, lo);
            _mm256_storeu_ps((dst as *mut f32).add(8), hi);
        }
        Kind::Bf16 => {
            // packus works within 128-bit lanes; the permute puts the 16 halves in order.
            let packed = _mm256_packus_epi32(to_bf16_lanes(lo), to_bf16_lanes(hi));
            let ordered = _mm256_permute4x64_epi64::<0b11_01_10_00>(packed);
            _mm256_storeu_si256(dst as *mut __m256i, ordered)
        }
        Kind::F16 => {
            const R: i32 = _MM_FROUND_TO_NEAREST_INT;
            _mm_storeu_si128(dst as *mut __m128i, _mm256_cvtps_ph::<R>(lo));
            _mm_storeu_si128((dst as *mut __m128i).add(1), _mm256_cvtps_ph::<R>(hi));
        }
    }
}

/// 8-entry permutes on both table halves, then bit 3 of the index (moved to the sign bit)
/// picks the half.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lookup8(idx: __m256i, lo: __m256, hi: __m256) -> __m256 {
    let a = _mm256_permutevar8x32_ps(lo, idx);
    let b = _mm256_permutevar8x32_ps(hi, idx);
    _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx)))
}

/// Byte plane `b` of the 16 code values, in both 128-bit lanes.
#[inline(always)]
pub(crate) unsafe fn byte_planes(values: &[f32; 16]) -> [__m256i; 4] {
    std::array::from_fn(|b| {
        let plane: [u8; 16] = std::array::from_fn(|c| values[c].to_bits().to_le_bytes()[b]);
        _mm256_broadcastsi128_si256(_mm_loadu_si128(plane.as_ptr() as *const __m128i))
    })
}

/// The 32 code values selected by the byte indices `idx` (0..16), as four f32 vectors: four
/// byte-plane `vpshufb` and two rounds of unpacking, which work within 128-bit lanes, so
/// vector `q` holds in element `4ℓ + e` the value of index byte `16ℓ + 4q + e`.
#[inline(always)]
pub(crate) unsafe fn lookup(idx: __m256i, planes: &[__m256i; 4]) -> [__m256; 4] {
    let p0 = _mm256_shuffle_epi8(planes[0], idx);
    let p1 = _mm256_shuffle_epi8(planes[1], idx);
    let p2 = _mm256_shuffle_epi8(planes[2], idx);
    let p3 = _mm256_shuffle_epi8(planes[3], idx);
    let lo01 = _mm256_unpacklo_epi8(p0, p1);
    let hi01 = _mm256_unpackhi_epi8(p0, p1);
    let lo23 = _mm256_unpacklo_epi8(p2, p3);
    let hi23 = _mm256_unpackhi_epi8(p2, p3);
    [
        _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23)),
        _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23)),
        _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23)),
        _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23)),
    ]
}

/// Elements per unit of the byte-plane path (32 packed bytes).
const UNIT: usize = 64;

/// Decode the 64 elements of one unit (`raw`, all in the block of `scale`) to `dst`, in order.
#[inline(always)]
unsafe fn decode_unit<T: Element>(
    raw: __m256i,
    planes: &[__m256i; 4],
    nibble: __m256i,
    scale: __m256,
    dst: *mut T,
) {
    // Element 2j is the high nibble of byte j. Interleaving within lanes gives the indices of
    // elements 0..16 and 32..48 (`first`), 16..32 and 48..64 (`second`).
    let odd = _mm256_and_si256(raw, nibble);
    let even = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), nibble);
    let first = lookup(_mm256_unpacklo_epi8(even, odd), planes);
    let second = lookup(_mm256_unpackhi_epi8(even, odd), planes);
    // Vector q of `first` holds elements 4q..4q+4 (low lane) and 32+4q.. (high lane); joining
    // the low lanes of vectors 0, 1 gives elements 0..8, and so on.
    for (half, d) in [(first, 0usize), (second, 16)] {
        let v: [__m256; 4] = std::array::from_fn(|q| _mm256_mul_ps(half[q], scale));
        store16(
            dst.add(d),
            _mm256_permute2f128_ps::<0x20>(v[0], v[1]),
            _mm256_permute2f128_ps::<0x20>(v[2], v[3]),
        );
        store16(
            dst.add(d + 32),
            _mm256_permute2f128_ps::<0x31>(v[0], v[1]),
            _mm256_permute2f128_ps::<0x31>(v[2], v[3]),
        );
    }
}

/// See [`super::decode`]; no streaming variant (AVX2 machines are the fallback).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn decode<T: Element>(w: &Nf4Tensor, start: usize, out: &mut [T]) {
    let packed = w.packed();
    let nbytes = packed.len();
    let code = w.qtype().values();
    let tab_lo = _mm256_loadu_ps(code.as_ptr());
    let tab_hi = _mm256_loadu_ps(code.as_ptr().add(8));
    // Per parity of a group's first element (a unit can end a group early and change it).
    let ctrl: [__m128i; 2] =
        std::array::from_fn(|p| _mm_loadu_si128(BYTE_OF_LANE[p].as_ptr() as *const __m128i));
    let shifts: [__m256i; 2] =
        std::array::from_fn(|p| _mm256_loadu_si256(SHIFT_OF_LANE[p].as_ptr() as *const __m256i));
    let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let shift = w.blocksize().trailing_zeros();
    let scales = Scales::new(w.absmax());
    let len = out.len();
    // 64-element units lie in one block when blocks are at least 64 (powers of two).
    let units = w.blocksize() >= UNIT;
    let planes = byte_planes(code);
    let nibble = _mm256_set1_epi8(0x0F);
    let mut i = 0;
    while i < len {
        let e = start + i;
        if units && e.is_multiple_of(UNIT) && len - i >= UNIT {
            let raw = _mm256_loadu_si256(packed.as_ptr().add(e / 2) as *const __m256i);
            let scale = _mm256_set1_ps(scales.get(e >> shift));
            decode_unit(raw, &planes, nibble, scale, out.as_mut_ptr().add(i));
            i += UNIT;
            continue;
        }
        // Groups of 16 stop at the next unit boundary, so a range that starts mid-unit gets
        // back to units.
        let to_unit = if units { UNIT - e % UNIT } else { 16 };
        let count = (len - i).min(16).min(to_unit);
        let byte = e / 2;
        let raw = if byte + 16 <= nbytes {
            _mm_loadu_si128(packed.as_ptr().add(byte) as *const __m128i)
        } else {
            let mut buf = [0u8; 16];
            let avail = nbytes - byte;
            buf[..avail].copy_from_slice(&packed[byte..]);
            _mm_loadu_si128(buf.as_ptr() as *const __m128i)
        };
        let par = e & 1;
        let bytes = _mm_shuffle_epi8(raw, ctrl[par]);
        let idx_lo = _mm256_srlv_epi32(_mm256_cvtepu8_epi32(bytes), shifts[par]);
        let idx_hi = _mm256_srlv_epi32(
            _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(bytes)),
            shifts[par],
        );
        let b0 = e >> shift;
        let b1 = (e + count - 1) >> shift;
        let s0 = _mm256_set1_ps(scales.get(b0));
        let (scale_lo, scale_hi) = if b0 == b1 {
            (s0, s0)
        } else {
            let s1 = _mm256_set1_ps(scales.get(b1));
            let split = _mm256_set1_epi32(((b1 << shift) - e) as i32);
            let pick = |lanes: __m256i| {
                // Lanes at or past the block boundary take the next block's scale.
                let past = _mm256_cmpgt_epi32(_mm256_add_epi32(lanes, _mm256_set1_epi32(1)), split);
                _mm256_blendv_ps(s0, s1, _mm256_castsi256_ps(past))
            };
            (
                pick(iota),
                pick(_mm256_add_epi32(iota, _mm256_set1_epi32(8))),
            )
        };
        let lo = _mm256_mul_ps(lookup8(idx_lo, tab_lo, tab_hi), scale_lo);
        let hi = _mm256_mul_ps(lookup8(idx_hi, tab_lo, tab_hi), scale_hi);
        if count == 16 {
            store16(out.as_mut_ptr().add(i), lo, hi);
        } else {
            let mut tmp = [T::from_f32(0.0); 16];
            store16(tmp.as_mut_ptr(), lo, hi);
            out[i..i + count].copy_from_slice(&tmp[..count]);
        }
        i += count;
    }
}

/// See [`super::decode_transposed`]: eight rows at a time are decoded into a small buffer (a
/// slice of columns at a time, so it stays in L1), and 8×8 blocks are transposed in registers,
/// so `out` gets whole 8-float stores instead of one scattered store per element.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn decode_transposed(
    w: &Nf4Tensor,
    k: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    const SLICE: usize = 256;
    let n = rows.len();
    let mut buf = [0f32; 8 * SLICE];
    let mut r0 = 0;
    while r0 < n {
        let nr = (n - r0).min(8);
        let mut p0 = 0;
        while p0 < k {
            let kw = (k - p0).min(SLICE);
            for i in 0..nr {
                let row = (rows.start + r0 + i) * k + p0;
                decode::<f32>(w, row, &mut buf[i * SLICE..i * SLICE + kw]);
            }
            let mut p = 0;
            if nr == 8 {
                while p + 8 <= kw {
                    let v: [__m256; 8] =
                        std::array::from_fn(|i| _mm256_loadu_ps(buf.as_ptr().add(i * SLICE + p)));
                    for (q, col) in transpose8(v).iter().enumerate() {
                        // In bounds: the caller checked out.len() >= (k - 1) * ld + n, and
                        // r0 + 8 <= n <= ld.
                        _mm256_storeu_ps(out.as_mut_ptr().add((p0 + p + q) * ld + r0), *col);
                    }
                    p += 8;
                }
            }
            for p in p..kw {
                for i in 0..nr {
                    out[(p0 + p) * ld + r0 + i] = buf[i * SLICE + p];
                }
            }
            p0 += kw;
        }
        r0 += nr;
    }
}

/// Columns of the 8×8 block whose rows are `v`.
#[inline(always)]
unsafe fn transpose8(v: [__m256; 8]) -> [__m256; 8] {
    let t: [__m256; 8] = std::array::from_fn(|i| {
        let (a, b) = (v[i / 2 * 2], v[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_ps(a, b)
        } else {
            _mm256_unpackhi_ps(a, b)
        }
    });
    // s[0..4] from rows 0..4, s[4..8] from rows 4..8: element pairs (0,1), (2,3) of each lane.
    let s: [__m256; 8] = std::array::from_fn(|i| {
        let base = 4 * (i / 4);
        let (a, b) = (t[base + (i % 4) / 2], t[base + 2 + (i % 4) / 2]);
        if i % 2 == 0 {
            _mm256_shuffle_ps::<0x44>(a, b)
        } else {
            _mm256_shuffle_ps::<0xEE>(a, b)
        }
    });
    std::array::from_fn(|q| {
        let (a, b) = (s[q % 4], s[4 + q % 4]);
        if q < 4 {
            _mm256_permute2f128_ps::<0x20>(a, b)
        } else {
            _mm256_permute2f128_ps::<0x31>(a, b)
        }
    })
}
