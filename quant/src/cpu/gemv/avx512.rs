//! AVX-512 GEMV kernels: whole 128-weight chunks per register, k-sliced so the activations
//! stay in L1.

use std::arch::x86_64::*;
use std::ops::Range;

use super::chunk_scales::ChunkScales;
use super::CHUNK;
use crate::cpu::decode::avx512::{lane_mask, load_bytes, GroupScales, Lookup};
use crate::cpu::decode::Scales;
use crate::tensor::Nf4Tensor;

/// The index vectors of a chunk's 8 vectors: vector `s` takes nibble `s` of every dword
/// (`vpermps` reads only the low 4 bits of an index, so no mask is needed).
#[inline(always)]
unsafe fn nibbles(raw: __m512i) -> [__m512i; 8] {
    [
        raw,
        _mm512_srli_epi32::<4>(raw),
        _mm512_srli_epi32::<8>(raw),
        _mm512_srli_epi32::<12>(raw),
        _mm512_srli_epi32::<16>(raw),
        _mm512_srli_epi32::<20>(raw),
        _mm512_srli_epi32::<24>(raw),
        _mm512_srli_epi32::<28>(raw),
    ]
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
    match m {
        1 => rows_m::<1>(w, xp, k, n, rows, y),
        2 => rows_m::<2>(w, xp, k, n, rows, y),
        3 => rows_m::<3>(w, xp, k, n, rows, y),
        4 => rows_m::<4>(w, xp, k, n, rows, y),
        5 => rows_m::<5>(w, xp, k, n, rows, y),
        6 => rows_m::<6>(w, xp, k, n, rows, y),
        7 => rows_m::<7>(w, xp, k, n, rows, y),
        8 => rows_m::<8>(w, xp, k, n, rows, y),
        _ => unreachable!("gemv is only used for 1 ≤ m ≤ 8"),
    }
}

/// Chunks per k-slice: the slice of M activation rows (or of M accumulator rows) stays in
/// a 32 KiB L1 while every W row of the task passes over it. Without slicing, 8 rows of 4096
/// (128 KiB) come from L2 at every chunk, which costs more than the FMAs.
fn slice_chunks(m: usize, chunks: usize) -> usize {
    const L1_BUDGET: usize = 24 * 1024;
    (L1_BUDGET / (m * CHUNK * 4)).clamp(1, chunks.max(1))
}

/// Bytes ahead of the current chunk to prefetch: the next row's piece when rows are walked
/// in slices (the hardware prefetcher loses a stream that jumps by a row), else a stretch of
/// the same sequential stream, far enough to cover DRAM latency at GEMV speed.
fn prefetch_distance(per_slice: usize, chunks: usize, k: usize) -> usize {
    if per_slice < chunks {
        k / 2
    } else {
        4096
    }
}

/// Up to this many activation rows, W rows go through the kernel in pairs: the pair shares
/// every activation load (loads, not arithmetic, would bound a lone row: eight 64-byte loads
/// of x per 64 bytes of codes), and two rows give the FMA chains independence. Past it the
/// accumulators of two rows no longer fit in the 32 registers.
const PAIR_MAX_M: usize = 2;

/// What every stretch of a GEMV call shares.
struct Gemv<'a> {
    src: *const u8,
    nbytes: usize,
    code: &'a [f32; 16],
    table: __m512,
    x: *const f32,
    k: usize,
    chunks: usize,
    tail: usize,
    ahead: usize,
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
    let code = w.qtype().values();
    let chunks = if k.is_multiple_of(8) { k / CHUNK } else { 0 };
    let per_slice = slice_chunks(M, chunks);
    let g = Gemv {
        src: packed.as_ptr(),
        nbytes: packed.len(),
        code,
        table: _mm512_loadu_ps(code.as_ptr()),
        x: xp.as_ptr(),
        k,
        chunks,
        tail: k - chunks * CHUNK,
        ahead: prefetch_distance(per_slice, chunks, k),
    };
    let mut scales: [ChunkScales; 2] = std::array::from_fn(|_| {
        ChunkScales::new(Scales::new(w.absmax()), w.blocksize(), per_slice * CHUNK)
    });
    let mut group_scales = GroupScales::new(w);
    let mut sums = vec![0f32; rows.len() * M];
    // A branch-free scale per chunk keeps the unrolled kernel in registers.
    let pairs = scales[0].pairs_only(k);
    let mut c0 = 0;
    loop {
        let c1 = (c0 + per_slice).min(chunks);
        let mut j = rows.start;
        while j < rows.end {
            let r = j - rows.start;
            let (s, gs, c) = (&mut scales, &mut group_scales, c0..c1);
            if M <= PAIR_MAX_M && j + 2 <= rows.end {
                let out = &mut sums[r * M..(r + 2) * M];
                if pairs {
                    stretch::<M, 2, true>(&g, j, c, s, gs, out);
                } else {
                    stretch::<M, 2, false>(&g, j, c, s, gs, out);
                }
                j += 2;
            } else {
                let out = &mut sums[r * M..(r + 1) * M];
                if pairs {
                    stretch::<M, 1, true>(&g, j, c, &mut s[..1], gs, out);
                } else {
                    stretch::<M, 1, false>(&g, j, c, &mut s[..1], gs, out);
                }
                j += 1;
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

/// Chunks `cs` of the `R` rows from `j0`, added into `sums[r * M + i]`; the rest of each row
/// too when `cs` ends at the last chunk.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn stretch<const M: usize, const R: usize, const PAIRS: bool>(
    g: &Gemv,
    j0: usize,
    cs: Range<usize>,
    scales: &mut [ChunkScales],
    group_scales: &mut GroupScales,
    sums: &mut [f32],
) {
    let f0: [usize; R] = std::array::from_fn(|r| (j0 + r) * g.k);
    if !cs.is_empty() {
        for r in 0..R {
            scales[r].fill(f0[r] + cs.start * CHUNK, f0[r] + cs.end * CHUNK);
        }
    }
    let last = cs.end == g.chunks;
    let mut acc = [[_mm512_setzero_ps(); M]; R];
    for c in cs {
        let xc = g.x.add(c * M * CHUNK);
        let idx: [[__m512i; 8]; R] = std::array::from_fn(|r| {
            let f = f0[r] + c * CHUNK;
            _mm_prefetch::<_MM_HINT_T0>(g.src.wrapping_add(f / 2 + g.ahead) as *const i8);
            nibbles(_mm512_loadu_si512(g.src.add(f / 2) as *const __m512i))
        });
        // The chunk's dot product per row, scaled once at the end (its lanes hold whole
        // blocks' worth of 8 weights each, see `ChunkScales`).
        let mut part = [[_mm512_setzero_ps(); M]; R];
        for s in 0..8 {
            let xv: [__m512; M] =
                std::array::from_fn(|i| _mm512_loadu_ps(xc.add(i * CHUNK + 16 * s)));
            for r in 0..R {
                let codes = _mm512_permutexvar_ps(idx[r][s], g.table);
                for i in 0..M {
                    part[r][i] = if s == 0 {
                        _mm512_mul_ps(codes, xv[i])
                    } else {
                        _mm512_fmadd_ps(codes, xv[i], part[r][i])
                    };
                }
            }
        }
        for r in 0..R {
            let f = f0[r] + c * CHUNK;
            let scale = if PAIRS {
                scales[r].get_pair(f)
            } else {
                scales[r].get(f)
            };
            for i in 0..M {
                acc[r][i] = _mm512_fmadd_ps(part[r][i], scale, acc[r][i]);
            }
        }
    }
    if last {
        // The rest of each row (all of it when not chunked), 16 at a time from any parity.
        for r in 0..R {
            let mut p = g.chunks * CHUNK;
            let lookup = Lookup::new(g.code, f0[r] + p);
            while p < g.k {
                let count = (g.k - p).min(16);
                let mask = lane_mask(count);
                let e = f0[r] + p;
                let codes = lookup.codes(load_bytes(g.src, g.nbytes, e / 2));
                let wv = _mm512_maskz_mul_ps(mask, codes, group_scales.get(e, count));
                let xt = g.x.add(g.chunks * M * CHUNK + p - g.chunks * CHUNK);
                for i in 0..M {
                    let xv = _mm512_maskz_loadu_ps(mask, xt.add(i * g.tail));
                    acc[r][i] = _mm512_fmadd_ps(wv, xv, acc[r][i]);
                }
                p += count;
            }
        }
    }
    for r in 0..R {
        for i in 0..M {
            sums[r * M + i] += _mm512_reduce_add_ps(acc[r][i]);
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
    match m {
        1 => rows_t_m::<1>(w, dy, k, n, rows, acc),
        2 => rows_t_m::<2>(w, dy, k, n, rows, acc),
        3 => rows_t_m::<3>(w, dy, k, n, rows, acc),
        4 => rows_t_m::<4>(w, dy, k, n, rows, acc),
        5 => rows_t_m::<5>(w, dy, k, n, rows, acc),
        6 => rows_t_m::<6>(w, dy, k, n, rows, acc),
        7 => rows_t_m::<7>(w, dy, k, n, rows, acc),
        8 => rows_t_m::<8>(w, dy, k, n, rows, acc),
        _ => unreachable!("gemv_t is only used for 1 ≤ m ≤ 8"),
    }
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
    let per_slice = slice_chunks(M, chunks);
    let mut chunk_scales =
        ChunkScales::new(Scales::new(w.absmax()), w.blocksize(), per_slice * CHUNK);
    let mut group_scales = GroupScales::new(w);
    let a = acc.as_mut_ptr();
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
                _mm_prefetch::<_MM_HINT_T0>(src.wrapping_add(f / 2 + ahead) as *const i8);
                let raw = _mm512_loadu_si512(src.add(f / 2) as *const __m512i);
                let scale = chunk_scales.get(f);
                let gs: [__m512; M] = std::array::from_fn(|i| _mm512_mul_ps(g[i], scale));
                let ac = a.add(c * M * CHUNK);
                let idx = nibbles(raw);
                for s in 0..8 {
                    let codes = _mm512_permutexvar_ps(idx[s], table);
                    for i in 0..M {
                        let p = ac.add(i * CHUNK + 16 * s);
                        _mm512_storeu_ps(p, _mm512_fmadd_ps(codes, gs[i], _mm512_loadu_ps(p)));
                    }
                }
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
