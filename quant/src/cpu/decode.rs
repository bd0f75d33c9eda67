//! Nibble → value decode of any flat element range, to f32, bf16 or f16.
//!
//! Work goes in groups of 16 consecutive elements (8 or 9 packed bytes). A group starts wherever
//! the caller's range starts, so it may begin on an odd element (a low nibble) and may straddle a
//! block boundary (blocks are at least 32 long, so it touches at most two blocks). That freedom
//! is what lets panels start mid-block and lets the output be aligned for streaming stores.
//!
//! The scalar path is the reference; it computes `code[nibble] * absmax` exactly like
//! `blockwise::dequantize_reference`, and so do the SIMD paths (one f32 multiply per element).

use half::{bf16, f16};

use super::isa::Isa;
use crate::tensor::{Absmax, Nf4Tensor};

/// What a decoded value is stored as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    F32,
    Bf16,
    F16,
}

/// An output element type of the decoders.
pub(crate) trait Element: Copy + Send + Sync + 'static {
    const KIND: Kind;
    /// Round an f32 to this type (nearest, ties to even).
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const KIND: Kind = Kind::F32;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for bf16 {
    const KIND: Kind = Kind::Bf16;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl Element for f16 {
    const KIND: Kind = Kind::F16;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// The scale of the most recently used block, so a run of groups in one block looks it up once
/// (a double-quantized scale costs two loads, a multiply and an add).
pub(crate) struct ScaleCache<'a> {
    absmax: &'a Absmax,
    block: usize,
    scale: f32,
}

impl<'a> ScaleCache<'a> {
    pub(crate) fn new(absmax: &'a Absmax) -> Self {
        Self {
            absmax,
            block: usize::MAX,
            scale: 0.0,
        }
    }

    #[inline(always)]
    pub(crate) fn get(&mut self, block: usize) -> f32 {
        if block != self.block {
            self.block = block;
            self.scale = self.absmax.get(block);
        }
        self.scale
    }
}

/// Decode elements `start .. start + out.len()` of `w` (flat, row-major) into `out`.
///
/// `stream` asks for non-temporal stores: right when `out` is far larger than the caches and is
/// not read back soon, wrong otherwise (it evicts the data the next step wants).
pub(crate) fn decode<T: Element>(
    isa: Isa,
    w: &Nf4Tensor,
    start: usize,
    out: &mut [T],
    stream: bool,
) {
    assert!(
        start + out.len() <= w.numel(),
        "decode range {start}..{} is outside the tensor's {} elements",
        start + out.len(),
        w.numel()
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` only reports levels whose features the CPU has.
        Isa::Avx512 => unsafe { avx512::decode(w, start, out, stream) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { avx2::decode(w, start, out) },
        _ => decode_scalar(w, start, out),
    }
}

/// The plain version: one element at a time.
pub(crate) fn decode_scalar<T: Element>(w: &Nf4Tensor, start: usize, out: &mut [T]) {
    let code = w.qtype().values();
    let packed = w.packed();
    let shift = w.blocksize().trailing_zeros();
    let mut scales = ScaleCache::new(w.absmax());
    for (i, o) in out.iter_mut().enumerate() {
        let e = start + i;
        let byte = packed[e / 2];
        let nib = if e % 2 == 0 { byte >> 4 } else { byte & 0x0f };
        *o = T::from_f32(code[nib as usize] * scales.get(e >> shift));
    }
}

/// `pshufb` control per parity of the first element: which byte each of the 16 lanes reads.
/// Even start: lanes 2j and 2j+1 both read byte j. Odd start: lane 0 reads byte 0 (low nibble),
/// then lanes 2j-1, 2j read byte j.
#[cfg(target_arch = "x86_64")]
const BYTE_OF_LANE: [[u8; 16]; 2] = [
    [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7],
    [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8],
];

/// Right shift per lane that brings its nibble to the low bits (element 2k is the high nibble).
#[cfg(target_arch = "x86_64")]
const SHIFT_OF_LANE: [[u32; 16]; 2] = [
    [4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0],
    [0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4],
];

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::{Element, Kind, ScaleCache, BYTE_OF_LANE, SHIFT_OF_LANE};
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
        cache: ScaleCache<'a>,
        shift: u32,
        block: usize,
        vector: __m512,
    }

    impl<'a> GroupScales<'a> {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        pub(crate) fn new(w: &'a Nf4Tensor) -> Self {
            Self {
                cache: ScaleCache::new(w.absmax()),
                shift: w.blocksize().trailing_zeros(),
                block: usize::MAX,
                vector: _mm512_setzero_ps(),
            }
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        pub(crate) fn get(&mut self, e: usize, count: usize) -> __m512 {
            let b0 = e >> self.shift;
            let b1 = (e + count - 1) >> self.shift;
            if b0 == b1 {
                if b0 != self.block {
                    self.block = b0;
                    self.vector = _mm512_set1_ps(self.cache.get(b0));
                }
                self.vector
            } else {
                let s0 = _mm512_set1_ps(self.cache.get(b0));
                let s1 = _mm512_set1_ps(self.cache.get(b1));
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

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn store<T: Element>(dst: *mut T, v: __m512, mask: u16, stream: bool) {
        match T::KIND {
            Kind::F32 => {
                let p = dst as *mut f32;
                if mask != u16::MAX {
                    _mm512_mask_storeu_ps(p, mask, v)
                } else if stream {
                    _mm512_stream_ps(p, v)
                } else {
                    _mm512_storeu_ps(p, v)
                }
            }
            Kind::Bf16 | Kind::F16 => {
                let h = if T::KIND == Kind::Bf16 {
                    to_bf16(v)
                } else {
                    to_f16(v)
                };
                let p = dst as *mut __m256i;
                if mask != u16::MAX {
                    _mm256_mask_storeu_epi16(p as *mut i16, mask, h)
                } else if stream {
                    _mm256_stream_si256(p, h)
                } else {
                    _mm256_storeu_si256(p, h)
                }
            }
        }
    }

    /// Decode the `count <= 16` elements from flat element `e` to `dst`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn group<T: Element>(
        src: *const u8,
        nbytes: usize,
        lookup: &Lookup,
        scales: &mut GroupScales,
        e: usize,
        count: usize,
        dst: *mut T,
        stream: bool,
    ) {
        let raw = load_bytes(src, nbytes, e / 2);
        let v = _mm512_mul_ps(lookup.codes(raw), scales.get(e, count));
        let mask = if count == 16 {
            u16::MAX
        } else {
            (1u16 << count) - 1
        };
        store(dst, v, mask, stream);
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
    pub(crate) unsafe fn decode<T: Element>(
        w: &Nf4Tensor,
        start: usize,
        out: &mut [T],
        stream: bool,
    ) {
        let packed = w.packed();
        let nbytes = packed.len();
        let src = packed.as_ptr();
        let lookup = Lookup::new(w.qtype().values(), start);
        let mut scales = GroupScales::new(w);
        let len = out.len();
        let dst = out.as_mut_ptr();
        let mut i = 0;
        if stream {
            // Streaming stores need 16 * size_of::<T>()-aligned addresses; a short first group
            // gets there.
            let align = 16 * std::mem::size_of::<T>();
            let head = ((align - dst as usize % align) % align) / std::mem::size_of::<T>();
            let head = head.min(len);
            if head > 0 {
                group(src, nbytes, &lookup, &mut scales, start, head, dst, false);
                i = head;
            }
        }
        // An odd head flips the parity of every following group.
        let lookup = Lookup::new(w.qtype().values(), start);
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
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Element, Kind, ScaleCache, BYTE_OF_LANE, SHIFT_OF_LANE};
    use crate::tensor::Nf4Tensor;

    /// Round 8 f32 to bf16 (nearest-even, NaN kept quiet), in the low 16 bits of each lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn to_bf16_lanes(v: __m256) -> __m256i {
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

    /// See [`super::decode`]; no streaming variant (AVX2 machines are the fallback).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn decode<T: Element>(w: &Nf4Tensor, start: usize, out: &mut [T]) {
        let packed = w.packed();
        let nbytes = packed.len();
        let code = w.qtype().values();
        let tab_lo = _mm256_loadu_ps(code.as_ptr());
        let tab_hi = _mm256_loadu_ps(code.as_ptr().add(8));
        let par = start & 1;
        let ctrl = _mm_loadu_si128(BYTE_OF_LANE[par].as_ptr() as *const __m128i);
        let sh_lo = _mm256_loadu_si256(SHIFT_OF_LANE[par].as_ptr() as *const __m256i);
        let sh_hi = sh_lo;
        let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let shift = w.blocksize().trailing_zeros();
        let mut cache = ScaleCache::new(w.absmax());
        let len = out.len();
        let mut i = 0;
        while i < len {
            let e = start + i;
            let count = (len - i).min(16);
            let byte = e / 2;
            let raw = if byte + 16 <= nbytes {
                _mm_loadu_si128(packed.as_ptr().add(byte) as *const __m128i)
            } else {
                let mut buf = [0u8; 16];
                let avail = nbytes - byte;
                buf[..avail].copy_from_slice(&packed[byte..]);
                _mm_loadu_si128(buf.as_ptr() as *const __m128i)
            };
            let bytes = _mm_shuffle_epi8(raw, ctrl);
            let idx_lo = _mm256_srlv_epi32(_mm256_cvtepu8_epi32(bytes), sh_lo);
            let idx_hi = _mm256_srlv_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(bytes)), sh_hi);
            let b0 = e >> shift;
            let b1 = (e + count - 1) >> shift;
            let s0 = _mm256_set1_ps(cache.get(b0));
            let (scale_lo, scale_hi) = if b0 == b1 {
                (s0, s0)
            } else {
                let s1 = _mm256_set1_ps(cache.get(b1));
                let split = _mm256_set1_epi32(((b1 << shift) - e) as i32);
                let pick = |lanes: __m256i| {
                    // Lanes at or past the block boundary take the next block's scale.
                    let past =
                        _mm256_cmpgt_epi32(_mm256_add_epi32(lanes, _mm256_set1_epi32(1)), split);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockwise::{dequantize_reference, SUPPORTED_BLOCKSIZES};
    use crate::codebook::QuantType;
    use crate::tensor::SourceDtype;

    fn tensor(n: usize, bs: usize, qtype: QuantType, double: bool, seed: u64) -> Nf4Tensor {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let data: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
            })
            .collect();
        Nf4Tensor::quantize(&data, &[n], SourceDtype::F32, qtype, bs, double).unwrap()
    }

    /// Every ISA, every parity of start, short and straddling ranges, every output type.
    #[test]
    fn every_isa_matches_the_reference_on_any_range() {
        for (t, &bs) in SUPPORTED_BLOCKSIZES.iter().enumerate() {
            for (qtype, double) in [
                (QuantType::Nf4, false),
                (QuantType::Fp4, true),
                (QuantType::Nf4, true),
            ] {
                let n = 3 * bs + 37;
                let w = tensor(n, bs, qtype, double, t as u64);
                let absmax = w.absmax().to_f32();
                let want = dequantize_reference(w.packed(), &absmax, n, bs, qtype);
                for isa in Isa::available() {
                    for (start, len) in [
                        (0, n),
                        (1, n - 1),
                        (bs - 5, 40),
                        (n - 17, 17),
                        (n - 3, 3),
                        (7, 0),
                    ] {
                        for (stream, offset) in [(false, 0), (true, 0), (true, 1), (true, 3)] {
                            // Misaligned outputs make streaming start with a short group.
                            let mut buf = vec![f32::NAN; len + offset];
                            let out = &mut buf[offset..];
                            decode(isa, &w, start, out, stream);
                            let same = out
                                .iter()
                                .zip(&want[start..start + len])
                                .all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(same, "{isa:?} f32 bs {bs} {qtype} start {start} len {len}");
                            let mut hb = vec![bf16::ZERO; len + offset];
                            let hb = &mut hb[offset..];
                            decode(isa, &w, start, hb, stream);
                            let mut hf = vec![f16::ZERO; len + offset];
                            let hf = &mut hf[offset..];
                            decode(isa, &w, start, hf, stream);
                            for (i, &r) in want[start..start + len].iter().enumerate() {
                                assert_eq!(
                                    hb[i].to_bits(),
                                    bf16::from_f32(r).to_bits(),
                                    "{isa:?} bf16"
                                );
                                assert_eq!(
                                    hf[i].to_bits(),
                                    f16::from_f32(r).to_bits(),
                                    "{isa:?} f16"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
