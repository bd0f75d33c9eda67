//! AVX-512 decoders: the 16 code values in one register, looked up with `vpermps` (f32) or
//! `vpermw` on per-block output tables (bf16, f16).

use std::arch::x86_64::*;

use super::{Element, Kind, Scales, BYTE_OF_LANE, SHIFT_OF_LANE};
use crate::tensor::Nf4Tensor;

/// Per-range constants of the 16-lane lookup.
#[derive(Clone, Copy)]
pub(crate) struct Lookup {
    table: __m512,
    ctrl: __m128i,
    shifts: __m512i,
}

impl Lookup {
    /// For groups whose first element has parity `start & 1`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(crate) unsafe fn new(code: &[f32; 16], start: usize) -> Self {
        let par = start & 1;
        Self {
            table: _mm512_loadu_ps(code.as_ptr()),
            ctrl: _mm_loadu_si128(BYTE_OF_LANE[par].as_ptr() as *const __m128i),
            shifts: _mm512_loadu_si512(SHIFT_OF_LANE[par].as_ptr() as *const __m512i),
        }
    }

    /// Code values of the 16 elements whose bytes start at `raw` (only 8 or 9 are used).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(crate) fn codes(&self, raw: __m128i) -> __m512 {
        let bytes = _mm_shuffle_epi8(raw, self.ctrl);
        // vpermps reads only the low 4 bits of each index, so the high nibble needs no mask.
        let idx = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(bytes), self.shifts);
        _mm512_permutexvar_ps(idx, self.table)
    }
}

/// Block scales of a group of `count` elements starting at flat element `e`.
pub(crate) struct GroupScales<'a> {
    scales: Scales<'a>,
    shift: u32,
    block: usize,
    vector: __m512,
}

impl<'a> GroupScales<'a> {
    #[inline(always)]
    pub(crate) unsafe fn new(w: &'a Nf4Tensor) -> Self {
        Self {
            scales: Scales::new(w.absmax()),
            shift: w.blocksize().trailing_zeros(),
            block: usize::MAX,
            vector: _mm512_setzero_ps(),
        }
    }

    /// Inlined by hand (`inline(always)` cannot carry `target_feature`); callers have the
    /// AVX-512 features enabled.
    #[inline(always)]
    pub(crate) unsafe fn get(&mut self, e: usize, count: usize) -> __m512 {
        let b0 = e >> self.shift;
        let b1 = (e + count - 1) >> self.shift;
        if b0 == b1 {
            if b0 != self.block {
                self.block = b0;
                self.vector = _mm512_set1_ps(self.scales.get(b0));
            }
            self.vector
        } else {
            let s0 = _mm512_set1_ps(self.scales.get(b0));
            let s1 = _mm512_set1_ps(self.scales.get(b1));
            let split = (b1 << self.shift) - e;
            _mm512_mask_blend_ps((u32::MAX << split) as u16, s0, s1)
        }
    }
}

/// Round 16 f32 to bf16, nearest-even, NaN kept quiet (what `half::bf16::from_f32` does).
/// `vcvtneps2bf16` would be one instruction but flushes subnormal inputs to zero.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) fn to_bf16(v: __m512) -> __m256i {
    let bits = _mm512_castps_si512(v);
    let high = _mm512_srli_epi32::<16>(bits);
    let lsb = _mm512_and_si512(high, _mm512_set1_epi32(1));
    let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(
        _mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)),
        lsb,
    ));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    let quiet = _mm512_or_si512(high, _mm512_set1_epi32(0x40));
    _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
fn to_f16(v: __m512) -> __m256i {
    _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v)
}

#[inline(always)]
unsafe fn store(dst: *mut f32, v: __m512, mask: u16, stream: bool) {
    if mask != u16::MAX {
        _mm512_mask_storeu_ps(dst, mask, v)
    } else if stream {
        _mm512_stream_ps(dst, v)
    } else {
        _mm512_storeu_ps(dst, v)
    }
}

/// Decode the `count <= 16` elements from flat element `e` to `dst`. Called from
/// AVX-512 code only; `inline(always)` (which cannot carry `target_feature`) keeps it in the
/// caller's loop.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn group(
    src: *const u8,
    nbytes: usize,
    lookup: &Lookup,
    scales: &mut GroupScales,
    e: usize,
    count: usize,
    dst: *mut f32,
    stream: bool,
) {
    let raw = load_bytes(src, nbytes, e / 2);
    let v = _mm512_mul_ps(lookup.codes(raw), scales.get(e, count));
    store(dst, v, lane_mask(count), stream);
}

/// Mask of the first `count` (≤ 16) of 16 lanes.
#[inline(always)]
pub(crate) fn lane_mask(count: usize) -> u16 {
    if count >= 16 {
        u16::MAX
    } else {
        (1u16 << count) - 1
    }
}

/// 16 bytes from `src + byte`, zero-filled past `nbytes` (masked loads do not fault).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn load_bytes(src: *const u8, nbytes: usize, byte: usize) -> __m128i {
    if byte + 16 <= nbytes {
        _mm_loadu_si128(src.add(byte) as *const __m128i)
    } else {
        let avail = (nbytes - byte).min(16);
        let mask = ((1u32 << avail) - 1) as u16;
        _mm_maskz_loadu_epi8(mask, src.add(byte) as *const i8)
    }
}

/// See [`super::decode`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(crate) unsafe fn decode<T: Element>(w: &Nf4Tensor, start: usize, out: &mut [T], stream: bool) {
    match T::KIND {
        Kind::F32 => decode_f32(
            w,
            start,
            std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut f32, out.len()),
            stream,
        ),
        Kind::Bf16 | Kind::F16 => decode_half(
            w,
            start,
            std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u16, out.len()),
            T::KIND,
            stream,
        ),
    }
}

/// The 16 possible outputs of one block as 16-bit values, in both halves of a register:
/// `round(code[i] * scale)`, exactly what converting each product would give.
#[inline(always)]
unsafe fn half_table(code: __m512, scale: f32, kind: Kind) -> __m512i {
    let v = _mm512_mul_ps(code, _mm512_set1_ps(scale));
    let h = if kind == Kind::Bf16 {
        to_bf16(v)
    } else {
        to_f16(v)
    };
    // vpermw reads 5 index bits and the low nibble's word still holds the high nibble above
    // it: a copy of the table in the upper half makes bit 4 irrelevant.
    _mm512_broadcast_i64x4(h)
}

/// 16-bit outputs, 32 per step: the block's 16 possible outputs are computed once (a
/// multiply and a rounding for the whole block instead of per element), then each nibble
/// picks its output with one `vpermw`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn decode_half(w: &Nf4Tensor, start: usize, out: &mut [u16], kind: Kind, stream: bool) {
    let packed = w.packed();
    let nbytes = packed.len();
    let src = packed.as_ptr();
    let code = _mm512_loadu_ps(w.qtype().values().as_ptr());
    let scales = Scales::new(w.absmax());
    let shift = w.blocksize().trailing_zeros();
    // Two cached tables: a group touches at most two blocks, and the second is the next
    // group's first.
    let mut cached = [(usize::MAX, _mm512_setzero_si512()); 2];
    let mut table = |b: usize| {
        if cached[0].0 == b {
            return cached[0].1;
        }
        if cached[1].0 == b {
            return cached[1].1;
        }
        let t = half_table(code, scales.get(b), kind);
        cached[0] = cached[1];
        cached[1] = (b, t);
        t
    };
    let len = out.len();
    let dst = out.as_mut_ptr();
    // Byte of each lane within its 128-bit half, per parity of the group's first element;
    // the upper half is loaded from 8 bytes further on.
    let ctrl = [
        _mm256_broadcastsi128_si256(_mm_loadu_si128(BYTE_OF_LANE[0].as_ptr() as *const __m128i)),
        _mm256_broadcastsi128_si256(_mm_loadu_si128(BYTE_OF_LANE[1].as_ptr() as *const __m128i)),
    ];
    let shifts = [_mm512_set1_epi32(4), _mm512_set1_epi32(4 << 16)];

    let mut i = 0;
    while i < len {
        let count = if i == 0 && stream {
            // Streaming stores need 64-byte alignment: a short first group gets there.
            let head = ((64 - dst as usize % 64) % 64) / 2;
            if head == 0 {
                len.min(32)
            } else {
                head.min(len)
            }
        } else {
            (len - i).min(32)
        };
        let e = start + i;
        let byte = e / 2;
        let raw = if byte + 32 <= nbytes {
            _mm256_loadu_si256(src.add(byte) as *const __m256i)
        } else {
            let avail = (nbytes - byte).min(32);
            let mask = ((1u64 << avail) - 1) as u32;
            _mm256_maskz_loadu_epi8(mask, src.add(byte) as *const i8)
        };
        let par = e & 1;
        // Lanes 0..15 read bytes 0..8, lanes 16..31 bytes 8..16.
        let halves = _mm256_permute4x64_epi64::<0b10_01_01_00>(raw);
        let bytes = _mm256_shuffle_epi8(halves, ctrl[par]);
        let idx = _mm512_srlv_epi16(_mm512_cvtepu8_epi16(bytes), shifts[par]);
        let b0 = e >> shift;
        let b1 = (e + count - 1) >> shift;
        let mut v = _mm512_permutexvar_epi16(idx, table(b0));
        if b1 != b0 {
            let split = (b1 << shift) - e;
            let upper = _mm512_permutexvar_epi16(idx, table(b1));
            v = _mm512_mask_blend_epi16((u64::MAX << split) as u32, v, upper);
        }
        let p = dst.add(i);
        if count == 32 {
            if stream {
                _mm512_stream_si512(p as *mut __m512i, v)
            } else {
                _mm512_storeu_si512(p as *mut __m512i, v)
            }
        } else {
            _mm512_mask_storeu_epi16(p as *mut i16, ((1u64 << count) - 1) as u32, v);
        }
        i += count;
    }
    if stream {
        _mm_sfence();
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn decode_f32(w: &Nf4Tensor, start: usize, out: &mut [f32], stream: bool) {
    let packed = w.packed();
    let nbytes = packed.len();
    let src = packed.as_ptr();
    let lookup = Lookup::new(w.qtype().values(), start);
    let mut scales = GroupScales::new(w);
    let len = out.len();
    let dst = out.as_mut_ptr();
    let mut i = 0;
    if stream {
        // Streaming stores need 64-byte alignment; a short first group gets there.
        let head = ((64 - dst as usize % 64) % 64) / 4;
        let head = head.min(len);
        if head > 0 {
            group(src, nbytes, &lookup, &mut scales, start, head, dst, false);
            i = head;
        }
    }
    // An odd head flips the parity of every following group.
    let lookup = Lookup::new(w.qtype().values(), start + i);
    while i + 16 <= len {
        group(
            src,
            nbytes,
            &lookup,
            &mut scales,
            start + i,
            16,
            dst.add(i),
            stream,
        );
        i += 16;
    }
    if i < len {
        group(
            src,
            nbytes,
            &lookup,
            &mut scales,
            start + i,
            len - i,
            dst.add(i),
            false,
        );
    }
    if stream {
        // Non-temporal stores are weakly ordered: fence before another thread reads them.
        _mm_sfence();
    }
}

/// Transpose the 16×16 matrix held as 16 row registers.
#[inline(always)]
unsafe fn transpose16(r: &mut [__m512; 16]) {
    // 32-bit interleave within 128-bit lanes, then 64-bit, then 128-bit blocks twice.
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for i in 0..4 {
        for h in 0..2 {
            let a = _mm512_castps_pd(t[4 * i + h]);
            let b = _mm512_castps_pd(t[4 * i + 2 + h]);
            r[4 * i + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
            r[4 * i + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        }
    }
    for i in 0..2 {
        for h in 0..4 {
            t[8 * i + h] = _mm512_shuffle_f32x4::<0b10_00_10_00>(r[8 * i + h], r[8 * i + 4 + h]);
            t[8 * i + 4 + h] =
                _mm512_shuffle_f32x4::<0b11_01_11_01>(r[8 * i + h], r[8 * i + 4 + h]);
        }
    }
    for h in 0..8 {
        r[h] = _mm512_shuffle_f32x4::<0b10_00_10_00>(t[h], t[8 + h]);
        r[8 + h] = _mm512_shuffle_f32x4::<0b11_01_11_01>(t[h], t[8 + h]);
    }
}

/// See [`super::decode_transposed`]: 16×16 tiles decoded row-wise into registers, transposed
/// there, stored column-wise.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(crate) unsafe fn decode_transposed(
    w: &Nf4Tensor,
    k: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    let packed = w.packed();
    let nbytes = packed.len();
    let src = packed.as_ptr();
    let code = w.qtype().values();
    let lookups = [Lookup::new(code, 0), Lookup::new(code, 1)];
    let mut scales: [GroupScales; 16] = std::array::from_fn(|_| GroupScales::new(w));
    let dst = out.as_mut_ptr();
    let nrows = rows.len();
    let mut r0 = 0;
    while r0 < nrows {
        let rv = (nrows - r0).min(16);
        let row_mask = lane_mask(rv);
        let mut p = 0;
        while p < k {
            let cv = (k - p).min(16);
            let col_mask = lane_mask(cv);
            let mut tile = [_mm512_setzero_ps(); 16];
            for r in 0..rv {
                let e = (rows.start + r0 + r) * k + p;
                let raw = load_bytes(src, nbytes, e / 2);
                let codes = lookups[e & 1].codes(raw);
                tile[r] = _mm512_maskz_mul_ps(col_mask, codes, scales[r].get(e, cv));
            }
            transpose16(&mut tile);
            for c in 0..cv {
                let q = dst.add((p + c) * ld + r0);
                if rv == 16 {
                    _mm512_storeu_ps(q, tile[c]);
                } else {
                    _mm512_mask_storeu_ps(q, row_mask, tile[c]);
                }
            }
            p += cv;
        }
        r0 += rv;
    }
}
