//! AVX-512 GEMV kernels: whole 128-weight chunks per register, k-sliced so the activations
//! stay in L1.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{prefetch_distance, slice_chunks, CHUNK};
use crate::codebook::DYNAMIC8;
use crate::cpu::decode::avx512::{lane_mask, load_bytes, GroupScales, Lookup};
use crate::cpu::decode::Scales;
use crate::double_quant::NESTED_BLOCKSIZE;
use crate::tensor::Nf4Tensor;

/// The 16 lane scales of a chunk, from the scales of the blocks of the current stretch of a
/// row, computed up front (`table[i]` = scale of block `first + i`, zero-padded by 4): one
/// broadcast load when the chunk lies in one block, one load and a permute when it starts a
/// run of 32- or 64-blocks. The table covers one stretch only, so it stays in L1.
struct ChunkScales<'a> {
    scales: Scales<'a>,
    table: Vec<f32>,
    first: usize,
    shift: u32,
    /// Lane → block offset of a chunk that starts on a block boundary (blocksize < 128).
    pattern: __m512i,
}

impl<'a> ChunkScales<'a> {
    /// For stretches of up to `max_len` elements.
    #[inline(always)]
    unsafe fn new(w: &'a Nf4Tensor, max_len: usize) -> Self {
        let shift = w.blocksize().trailing_zeros();
        // Lane l covers weights 8l .. 8l + 8 of the chunk.
        let per_block = (w.blocksize() / 8).max(1) as i32;
        Self {
            scales: Scales::new(w.absmax()),
            table: vec![0.0; (max_len >> shift) + 2 + 4],
            first: 0,
            shift,
            pattern: lane_blocks(per_block),
        }
    }

    /// Compute the scales of the blocks of flat elements `start .. end`.
    #[inline(always)]
    unsafe fn fill(&mut self, start: usize, end: usize) {
        self.first = start >> self.shift;
        let count = ((end - 1) >> self.shift) - self.first + 1;
        block_scales(self.scales, self.first, &mut self.table[..count]);
        self.table[count..count + 4].fill(0.0);
    }

    #[inline(always)]
    unsafe fn get(&self, f: usize) -> __m512 {
        let b = f >> self.shift;
        let off = f & ((1 << self.shift) - 1);
        let s = self.table.as_ptr().add(b - self.first);
        if off + CHUNK <= 1 << self.shift {
            _mm512_set1_ps(*s)
        } else if off == 0 {
            _mm512_permutexvar_ps(self.pattern, _mm512_castps128_ps512(_mm_loadu_ps(s)))
        } else {
            self.straddling(f)
        }
    }

    /// A chunk that starts mid-block and ends in another (rows not a whole number of blocks).
    #[inline(never)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn straddling(&self, f: usize) -> __m512 {
        let lanes: [f32; 16] =
            std::array::from_fn(|l| self.table[((f + 8 * l) >> self.shift) - self.first]);
        // SAFETY: reads the 16 floats of a local array.
        unsafe { _mm512_loadu_ps(lanes.as_ptr()) }
    }
}

/// `out[i]` = scale of block `first + i`. Double-quantized scales 16 at a time: the 256-entry
/// dynamic code is looked up with eight 32-entry permutes and a 3-level blend on the high
/// index bits (gathers, and a scalar loop alike, cost a quarter of the GEMV's time at
/// blocksize 64); the nested scale of 16 consecutive blocks takes at most two values.
#[inline(always)]
unsafe fn block_scales(scales: Scales, first: usize, out: &mut [f32]) {
    match scales {
        Scales::Plain(a) => out.copy_from_slice(&a[first..first + out.len()]),
        Scales::Double {
            codes,
            nested,
            offset,
        } => {
            let codes = &codes[first..first + out.len()];
            let t: [__m512; 16] =
                std::array::from_fn(|q| _mm512_loadu_ps(DYNAMIC8.as_ptr().add(16 * q)));
            let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            let off = _mm512_set1_ps(offset);
            let mut i = 0;
            while i + 16 <= out.len() {
                let c =
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.as_ptr().add(i) as *const __m128i));
                let r: [__m512; 8] =
                    std::array::from_fn(|g| _mm512_permutex2var_ps(t[2 * g], c, t[2 * g + 1]));
                let bit = |b: i32| _mm512_test_epi32_mask(c, _mm512_set1_epi32(1 << b));
                let (m5, m6, m7) = (bit(5), bit(6), bit(7));
                let a: [__m512; 4] =
                    std::array::from_fn(|h| _mm512_mask_blend_ps(m5, r[2 * h], r[2 * h + 1]));
                let b0 = _mm512_mask_blend_ps(m6, a[0], a[1]);
                let b1 = _mm512_mask_blend_ps(m6, a[2], a[3]);
                let d = _mm512_mask_blend_ps(m7, b0, b1);
                let group = (first + i) / NESTED_BLOCKSIZE;
                let lanes = _mm512_add_epi32(_mm512_set1_epi32((first + i) as i32), iota);
                let next = _mm512_cmpge_epi32_mask(
                    lanes,
                    _mm512_set1_epi32(((group + 1) * NESTED_BLOCKSIZE) as i32),
                );
                let upper = nested.get(group + 1).copied().unwrap_or(0.0);
                let nest = _mm512_mask_blend_ps(
                    next,
                    _mm512_set1_ps(nested[group]),
                    _mm512_set1_ps(upper),
                );
                // Two roundings, as `DoubleQuant::absmax`.
                _mm512_storeu_ps(
                    out.as_mut_ptr().add(i),
                    _mm512_add_ps(_mm512_mul_ps(d, nest), off),
                );
                i += 16;
            }
            for (j, o) in out.iter_mut().enumerate().skip(i) {
                *o = scales.get(first + j);
            }
        }
    }
}

#[cfg(test)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) fn block_scales_for_test(scales: Scales, first: usize, out: &mut [f32]) {
    // SAFETY: reads only `scales`' slices within `first .. first + out.len()`.
    unsafe { block_scales(scales, first, out) }
}

/// `[l / per_block for l in 0..16]`.
#[inline(always)]
unsafe fn lane_blocks(per_block: i32) -> __m512i {
    let lanes: [i32; 16] = std::array::from_fn(|l| l as i32 / per_block);
    _mm512_loadu_si512(lanes.as_ptr() as *const __m512i)
}

/// Decode the 8 vectors of a chunk and hand each, with its index `s`, to `f`.
macro_rules! for_each_vector {
    ($raw:expr, $table:expr, |$s:ident, $c:ident| $body:block) => {{
        let raw = $raw;
        let table = $table;
        {
            let $s = 0usize;
            let $c = _mm512_permutexvar_ps(raw, table);
            $body
        }
        for_each_vector!(@shift raw, table, $s, $c, $body, 1, 4);
        for_each_vector!(@shift raw, table, $s, $c, $body, 2, 8);
        for_each_vector!(@shift raw, table, $s, $c, $body, 3, 12);
        for_each_vector!(@shift raw, table, $s, $c, $body, 4, 16);
        for_each_vector!(@shift raw, table, $s, $c, $body, 5, 20);
        for_each_vector!(@shift raw, table, $s, $c, $body, 6, 24);
        for_each_vector!(@shift raw, table, $s, $c, $body, 7, 28);
    }};
    (@shift $raw:ident, $table:ident, $s:ident, $c:ident, $body:block, $idx:expr, $bits:expr) => {{
        let $s = $idx;
        let $c = _mm512_permutexvar_ps(_mm512_srli_epi32::<$bits>($raw), $table);
        $body
    }};
}

/// Rows `rows` of `y[m, n] = x · deq(W)ᵀ`, with `xp` = `x` laid out by [`super::interleave`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
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

#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn rows_m<const M: usize>(
    w: &Nf4Tensor,
    xp: &[f32],
    k: usize,
    n: usize,
    rows: Range<usize>,
    y: *mut f32,
) {
    let packed = w.packed();
    let src = packed.as_ptr();
    let nbytes = packed.len();
    let code = w.qtype().values();
    let table = _mm512_loadu_ps(code.as_ptr());
    let chunks = if k.is_multiple_of(8) { k / CHUNK } else { 0 };
    let tail = k - chunks * CHUNK;
    let mut chunk_scales = ChunkScales::new(w, slice_chunks(M, chunks, CHUNK * 4) * CHUNK);
    let mut group_scales = GroupScales::new(w);
    let x = xp.as_ptr();
    let mut sums = vec![0f32; rows.len() * M];
    let per_slice = slice_chunks(M, chunks, CHUNK * 4);
    let ahead = prefetch_distance(per_slice, chunks, k);
    let mut c0 = 0;
    loop {
        let c1 = (c0 + per_slice).min(chunks);
        let last = c1 == chunks;
        for (r, j) in rows.clone().enumerate() {
            let f0 = j * k;
            if c1 > c0 {
                chunk_scales.fill(f0 + c0 * CHUNK, f0 + c1 * CHUNK);
            }
            let mut acc = [_mm512_setzero_ps(); M];
            for c in c0..c1 {
                let f = f0 + c * CHUNK;
                _mm_prefetch::<_MM_HINT_T1>(src.wrapping_add(f / 2 + ahead) as *const i8);
                let raw = _mm512_loadu_si512(src.add(f / 2) as *const __m512i);
                let scale = chunk_scales.get(f);
                // Two chains per row (even and odd vectors) halve the FMA latency a chunk
                // waits on; with several rows there is independence enough already.
                let mut even = [_mm512_setzero_ps(); M];
                let mut odd = [_mm512_setzero_ps(); M];
                let xc = x.add(c * M * CHUNK);
                for_each_vector!(raw, table, |s, codes| {
                    for i in 0..M {
                        let xv = _mm512_loadu_ps(xc.add(i * CHUNK + 16 * s));
                        if M == 1 && s % 2 == 1 {
                            odd[i] = _mm512_fmadd_ps(codes, xv, odd[i]);
                        } else {
                            even[i] = _mm512_fmadd_ps(codes, xv, even[i]);
                        }
                    }
                });
                for i in 0..M {
                    let part = if M == 1 {
                        _mm512_add_ps(even[i], odd[i])
                    } else {
                        even[i]
                    };
                    acc[i] = _mm512_fmadd_ps(part, scale, acc[i]);
                }
            }
            if last {
                // The rest of the row (all of it when not chunked), 16 at a time from any
                // parity.
                let mut p = chunks * CHUNK;
                let lookup = Lookup::new(code, f0 + p);
                while p < k {
                    let count = (k - p).min(16);
                    let mask = lane_mask(count);
                    let e = f0 + p;
                    let codes = lookup.codes(load_bytes(src, nbytes, e / 2));
                    let wv = _mm512_maskz_mul_ps(mask, codes, group_scales.get(e, count));
                    let xt = x.add(chunks * M * CHUNK + p - chunks * CHUNK);
                    for i in 0..M {
                        let xv = _mm512_maskz_loadu_ps(mask, xt.add(i * tail));
                        acc[i] = _mm512_fmadd_ps(wv, xv, acc[i]);
                    }
                    p += count;
                }
            }
            for i in 0..M {
                sums[r * M + i] += _mm512_reduce_add_ps(acc[i]);
            }
        }
        if last {
            break;
        }
        c0 = c1;
    }
    for (r, j) in rows.enumerate() {
        for i in 0..M {
            *y.add(i * n + j) = sums[r * M + i];
        }
    }
}

/// Rows `rows` of W added into `acc[m, k]` as `acc += dy[:, rows] · deq(W)[rows, :]`, with
/// `acc` laid out as [`super::interleave`] does.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) unsafe fn gemv_t_rows(
    w: &Nf4Tensor,
    dy: &[f32],
    m: usize,
    k: usize,
    n: usize,
    rows: Range<usize>,
    acc: &mut [f32],
) {
    with_rows!(m, rows_t_m(w, dy, k, n, rows, acc))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn rows_t_m<const M: usize>(
    w: &Nf4Tensor,
    dy: &[f32],
    k: usize,
    n: usize,
    rows: Range<usize>,
    acc: &mut [f32],
) {
    let packed = w.packed();
    let src = packed.as_ptr();
    let nbytes = packed.len();
    let code = w.qtype().values();
    let table = _mm512_loadu_ps(code.as_ptr());
    let chunks = if k.is_multiple_of(8) { k / CHUNK } else { 0 };
    let tail = k - chunks * CHUNK;
    let mut chunk_scales = ChunkScales::new(w, slice_chunks(M, chunks, CHUNK * 4) * CHUNK);
    let mut group_scales = GroupScales::new(w);
    let a = acc.as_mut_ptr();
    let per_slice = slice_chunks(M, chunks, CHUNK * 4);
    let ahead = prefetch_distance(per_slice, chunks, k);
    let mut c0 = 0;
    loop {
        let c1 = (c0 + per_slice).min(chunks);
        let last = c1 == chunks;
        for j in rows.clone() {
            let f0 = j * k;
            if c1 > c0 {
                chunk_scales.fill(f0 + c0 * CHUNK, f0 + c1 * CHUNK);
            }
            let g: [__m512; M] = std::array::from_fn(|i| _mm512_set1_ps(dy[i * n + j]));
            for c in c0..c1 {
                let f = f0 + c * CHUNK;
                _mm_prefetch::<_MM_HINT_T1>(src.wrapping_add(f / 2 + ahead) as *const i8);
                let raw = _mm512_loadu_si512(src.add(f / 2) as *const __m512i);
                let scale = chunk_scales.get(f);
                let gs: [__m512; M] = std::array::from_fn(|i| _mm512_mul_ps(g[i], scale));
                let ac = a.add(c * M * CHUNK);
                for_each_vector!(raw, table, |s, codes| {
                    for i in 0..M {
                        let p = ac.add(i * CHUNK + 16 * s);
                        _mm512_storeu_ps(p, _mm512_fmadd_ps(codes, gs[i], _mm512_loadu_ps(p)));
                    }
                });
            }
            if last {
                let mut p = chunks * CHUNK;
                let lookup = Lookup::new(code, f0 + p);
                while p < k {
                    let count = (k - p).min(16);
                    let mask = lane_mask(count);
                    let e = f0 + p;
                    let codes = lookup.codes(load_bytes(src, nbytes, e / 2));
                    let wv = _mm512_mul_ps(codes, group_scales.get(e, count));
                    let at = a.add(chunks * M * CHUNK + p - chunks * CHUNK);
                    for i in 0..M {
                        let q = at.add(i * tail);
                        let sum = _mm512_fmadd_ps(wv, g[i], _mm512_maskz_loadu_ps(mask, q));
                        _mm512_mask_storeu_ps(q, mask, sum);
                    }
                    p += count;
                }
            }
        }
        if last {
            break;
        }
        c0 = c1;
    }
}
