//! The AVX-512 BF16 GEMV kernel: `y = x · deq_bf16(W)ᵀ` with bf16 activations.
//!
//! A chunk of 64 packed bytes (128 weights) is read as 32 16-bit words. Shifting the words by
//! 0, 4, 8 and 12 bits puts one nibble of every word in its low bits; a ternary-logic op keeps
//! those four bits and sets bit 4 in the upper 16 words, which belong to the chunk's second half
//! (64 weights, one block). One `vpermw` then looks up 32 weights at once in a 32-entry bf16
//! table, `bf16(code · scale)` of the first half's block in entries 0..16 and of the second
//! half's in 16..32, so the rounding is the dequantizer's, and one `vdpbf16ps` multiplies them
//! into 32 activations exactly and adds pairs into 16 f32 sums. Per 128 weights that is 3
//! shifts, 4 ternary ops, 4 permutes, 2 table multiplies, 1 conversion and 4 dot products,
//! against 7 shifts, 8 permutes and 9 FMAs for f32 activations.
//!
//! The BF16 instructions treat subnormal inputs as zero and flush subnormal results (they ignore
//! MXCSR): a weight or activation below 2^-126 in magnitude counts as zero, and a product below
//! it is dropped, an absolute error under 2^-126 · |x| per weight.
//!
//! Word lane `q` of vector `s` holds weight `4q + [1, 0, 3, 2][s]` of the chunk (the low nibble
//! of a byte is the odd weight); [`super::bf16::interleave`] lays the activations out the same way.

use std::arch::x86_64::*;
use std::mem::transmute;
use std::ops::Range;

use half::bf16;

use super::bf16::HALF;
use super::scales::BlockScales;
use super::{prefetch_distance, slice_chunks, CHUNK};
use crate::tensor::Nf4Tensor;

/// `bf16(code · sa)` in words 0..16 and `bf16(code · sb)` in words 16..32.
#[inline(always)]
unsafe fn chunk_table(code: __m512, sa: f32, sb: f32) -> __m512i {
    let lo = _mm512_mul_ps(code, _mm512_set1_ps(sa));
    let hi = _mm512_mul_ps(code, _mm512_set1_ps(sb));
    // The second operand fills the low 16 words.
    transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
}

/// Rows `rows` of `y[m, n] = x · deq_bf16(W)ᵀ`, with `xp` laid out by
/// [`super::bf16::interleave`]. Requires blocks of at least 64 and `k % 64 == 0`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn gemv_rows(
    w: &Nf4Tensor,
    xp: &[bf16],
    m: usize,
    k: usize,
    n: usize,
    rows: Range<usize>,
    y: *mut f32,
) {
    with_rows!(m, rows_m(w, xp, k, n, rows, y))
}

/// Vector `s` of a chunk: the nibble `s` of every word as a table index, plus the half bit.
#[inline(always)]
unsafe fn index<const S: u32>(raw: __m512i, nibble: __m512i, half_bit: __m512i) -> __m512i {
    let v = if S == 0 {
        raw
    } else {
        _mm512_srli_epi16::<S>(raw)
    };
    // (v & nibble) | half_bit
    _mm512_ternarylogic_epi32::<0xEA>(v, nibble, half_bit)
}

/// Multiply one chunk (`raw` codes, its `table`) into `acc` against the activations at `xc`.
#[inline(always)]
unsafe fn chunk<const M: usize>(
    raw: __m512i,
    table: __m512i,
    xc: *const bf16,
    nibble: __m512i,
    half_bit: __m512i,
    acc: &mut [[__m512; M]; 4],
) {
    let idx = [
        index::<0>(raw, nibble, half_bit),
        index::<4>(raw, nibble, half_bit),
        index::<8>(raw, nibble, half_bit),
        index::<12>(raw, nibble, half_bit),
    ];
    for (s, &ix) in idx.iter().enumerate() {
        let wv = transmute::<__m512i, __m512bh>(_mm512_permutexvar_epi16(ix, table));
        // Independent sums per vector for one row (the dot products' latency would otherwise
        // serialize a chunk), per vector pair for two; more rows are independent enough.
        let a = match M {
            1 => s,
            2 => s & 1,
            _ => 0,
        };
        for i in 0..M {
            let xv = _mm512_loadu_si512(xc.add(i * CHUNK + 32 * s) as *const __m512i);
            acc[a][i] = _mm512_dpbf16_ps(acc[a][i], wv, transmute::<__m512i, __m512bh>(xv));
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn rows_m<const M: usize>(
    w: &Nf4Tensor,
    xp: &[bf16],
    k: usize,
    n: usize,
    rows: Range<usize>,
    y: *mut f32,
) {
    debug_assert!(k.is_multiple_of(HALF) && w.blocksize() >= HALF);
    if rows.is_empty() {
        return;
    }
    let packed = w.packed();
    let src = packed.as_ptr();
    let values = w.qtype().values();
    let code = _mm512_loadu_ps(values.as_ptr());
    let bs = w.blocksize();
    // Blocksizes are powers of two: a shift, not a division, per chunk.
    debug_assert!(bs.is_power_of_two());
    let shift = bs.trailing_zeros();
    let chunks = k.div_ceil(CHUNK);
    // With k % 128 == 64 the last chunk of a row is a half chunk.
    let half_last = !k.is_multiple_of(CHUNK);
    let scales = BlockScales::new(w.absmax(), rows.start * k / bs..(rows.end * k).div_ceil(bs));
    let nibble = _mm512_set1_epi16(0x000F);
    let half_bit = _mm512_mask_blend_epi16(
        0xFFFF_0000,
        _mm512_setzero_si512(),
        _mm512_set1_epi16(0x0010),
    );
    let x = xp.as_ptr();
    let per_slice = slice_chunks(M, chunks, CHUNK * 2);
    let ahead = prefetch_distance(per_slice, chunks, k);
    let mut sums = vec![0f32; rows.len() * M];
    let mut c0 = 0;
    loop {
        let c1 = (c0 + per_slice).min(chunks);
        for (r, j) in rows.clone().enumerate() {
            let f0 = j * k;
            let mut acc = [[_mm512_setzero_ps(); M]; 4];
            // Whole chunks; the half chunk that may end a row comes after, so the loop has
            // neither its branch nor its masked load.
            let full_end = if half_last { c1.min(chunks - 1) } else { c1 };
            for c in c0..full_end {
                let f = f0 + c * CHUNK;
                _mm_prefetch::<_MM_HINT_T1>(src.wrapping_add(f / 2 + ahead) as *const i8);
                let table = chunk_table(
                    code,
                    scales.get(f >> shift),
                    scales.get((f + HALF) >> shift),
                );
                let raw = _mm512_loadu_si512(src.add(f / 2) as *const __m512i);
                chunk::<M>(raw, table, x.add(c * M * CHUNK), nibble, half_bit, &mut acc);
            }
            if full_end < c1 {
                let f = f0 + full_end * CHUNK;
                let sa = scales.get(f >> shift);
                let table = chunk_table(code, sa, sa);
                let raw = _mm512_maskz_loadu_epi16(0xFFFF, src.add(f / 2) as *const i16);
                chunk::<M>(
                    raw,
                    table,
                    x.add(full_end * M * CHUNK),
                    nibble,
                    half_bit,
                    &mut acc,
                );
            }
            for i in 0..M {
                let t = _mm512_add_ps(
                    _mm512_add_ps(acc[0][i], acc[1][i]),
                    _mm512_add_ps(acc[2][i], acc[3][i]),
                );
                sums[r * M + i] += _mm512_reduce_add_ps(t);
            }
        }
        if c1 == chunks {
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
