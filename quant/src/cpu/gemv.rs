//! Products with few activation rows (m ≤ 8, token-by-token decoding): `y = x · deq(W)ᵀ` and
//! `dx = dy · deq(W)`.
//!
//! W is never written anywhere: codes are decoded in registers and multiplied straight into the
//! activations, so the kernel streams 4 bits per weight and is bound by memory bandwidth.
//!
//! The AVX-512 path reads 64 packed bytes (a *chunk* of 128 weights) into one register and takes
//! the nibbles of all 16 dwords at once, one shift per nibble position, with no byte shuffles.
//! That yields the weights in a permuted order, so the activations are permuted the same way once
//! per call (they are tiny next to W); a dot product does not care about order. Lane `l` of
//! vector `s` holds weight `8l + p(s)` of the chunk, where `p = [1, 0, 3, 2, 5, 4, 7, 6]` (the low
//! nibble of a byte is the odd element). Eight consecutive weights share a lane group, and
//! blocks are multiples of 8 long, so one 16-lane scale vector serves the whole chunk, provided
//! rows start on a multiple of 8 (`k % 8 == 0`); other widths take the group-of-16 path.

use rayon::prelude::*;

use super::decode::{decode, ScaleCache};
use super::isa::Isa;
use crate::tensor::Nf4Tensor;

/// Weights per chunk (64 packed bytes).
pub(crate) const CHUNK: usize = 128;

/// Position inside its chunk of lane `l` of vector `s`.
#[inline(always)]
pub(crate) const fn chunk_position(s: usize, l: usize) -> usize {
    8 * l + 2 * (s / 2) + 1 - s % 2
}

/// Whether rows can be walked in whole chunks (see the module docs).
fn chunked(k: usize, isa: Isa) -> bool {
    isa == Isa::Avx512 && k % 8 == 0 && k >= CHUNK
}

/// `rows × k` activations with every full chunk of each row permuted into decode order.
fn permute_rows(x: &[f32], k: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    let full = k / CHUNK * CHUNK;
    for (row_in, row_out) in x.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        for (cin, cout) in row_in[..full]
            .chunks_exact(CHUNK)
            .zip(row_out[..full].chunks_exact_mut(CHUNK))
        {
            for s in 0..8 {
                for l in 0..16 {
                    cout[16 * s + l] = cin[chunk_position(s, l)];
                }
            }
        }
    }
    out
}

/// Inverse of [`permute_rows`].
fn unpermute_rows(xp: &[f32], k: usize, out: &mut [f32]) {
    out.copy_from_slice(xp);
    let full = k / CHUNK * CHUNK;
    for (row_in, row_out) in xp.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        for (cin, cout) in row_in[..full]
            .chunks_exact(CHUNK)
            .zip(row_out[..full].chunks_exact_mut(CHUNK))
        {
            for s in 0..8 {
                for l in 0..16 {
                    cout[chunk_position(s, l)] = cin[16 * s + l];
                }
            }
        }
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
    let xp = if chunked(k, isa) {
        permute_rows(x, k)
    } else {
        x.to_vec()
    };
    let out = Shared(y.as_mut_ptr());
    let per_task = rows_per_task(n, k);
    (0..n.div_ceil(per_task)).into_par_iter().for_each(|t| {
        let rows = t * per_task..((t + 1) * per_task).min(n);
        let out = out;
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Avx512 is only reported on CPUs that have it; every task writes the
            // columns of its own rows of W.
            Isa::Avx512 => unsafe { avx512::gemv_rows(w, &xp, m, k, n, rows, out.0) },
            _ => {
                let mut row = vec![0f32; k];
                for j in rows {
                    decode(isa, w, j * k, &mut row, false);
                    for i in 0..m {
                        // SAFETY: (i, j) is inside y and only this task writes column j.
                        unsafe { *out.0.add(i * n + j) = dot(&xp[i * k..(i + 1) * k], &row) };
                    }
                }
            }
        }
    });
}

/// `dx[m, k] = dy[m, n] · deq(W)` for small `m`. Tasks take disjoint rows of W (so W streams
/// sequentially) and accumulate private copies of dx, summed at the end.
pub(crate) fn gemv_t(
    isa: Isa,
    dy: &[f32],
    m: usize,
    w: &Nf4Tensor,
    n: usize,
    k: usize,
    dx: &mut [f32],
) {
    let per_task = rows_per_task(n, k);
    let partial = (0..n.div_ceil(per_task))
        .into_par_iter()
        .fold(
            || vec![0f32; m * k],
            |mut acc, t| {
                let rows = t * per_task..((t + 1) * per_task).min(n);
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: Avx512 is only reported on CPUs that have it.
                    Isa::Avx512 => unsafe { avx512::gemv_t_rows(w, dy, m, k, n, rows, &mut acc) },
                    _ => {
                        let mut row = vec![0f32; k];
                        for j in rows {
                            decode(isa, w, j * k, &mut row, false);
                            for i in 0..m {
                                axpy(dy[i * n + j], &row, &mut acc[i * k..(i + 1) * k]);
                            }
                        }
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
    if chunked(k, isa) {
        unpermute_rows(&partial, k, dx);
    } else {
        dx.copy_from_slice(&partial);
    }
}

/// Dot product in 16 independent lanes (so it vectorizes without reassociation licence).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ac, ar) = a.split_at(a.len() / 16 * 16);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(16).zip(bc.chunks_exact(16)) {
        for l in 0..16 {
            lanes[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{ScaleCache, CHUNK};
    use crate::cpu::decode::avx512::{load_bytes, GroupScales, Lookup};
    use crate::tensor::Nf4Tensor;

    /// The 16 lane scales of the chunk starting at flat element `f` (`f % 8 == 0`).
    struct ChunkScales<'a> {
        cache: ScaleCache<'a>,
        shift: u32,
        block: usize,
        vector: __m512,
    }

    impl<'a> ChunkScales<'a> {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        fn new(w: &'a Nf4Tensor) -> Self {
            Self {
                cache: ScaleCache::new(w.absmax()),
                shift: w.blocksize().trailing_zeros(),
                block: usize::MAX,
                vector: _mm512_setzero_ps(),
            }
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        fn get(&mut self, f: usize) -> __m512 {
            let first = f >> self.shift;
            let last = (f + CHUNK - 1) >> self.shift;
            if first == last {
                if first != self.block {
                    self.block = first;
                    self.vector = _mm512_set1_ps(self.cache.get(first));
                }
                return self.vector;
            }
            let mut v = _mm512_set1_ps(self.cache.get(first));
            for b in first + 1..=last {
                let lane = ((b << self.shift) - f) / 8;
                v = _mm512_mask_blend_ps(
                    (u32::MAX << lane) as u16,
                    v,
                    _mm512_set1_ps(self.cache.get(b)),
                );
            }
            v
        }
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

    /// Rows `rows` of `y[m, n] = xp · deq(W)ᵀ`, `xp` from `permute_rows` when chunked.
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
        let chunked = k % 8 == 0 && k >= CHUNK;
        let chunks = if chunked { k / CHUNK } else { 0 };
        let mut chunk_scales = ChunkScales::new(w);
        let mut group_scales = GroupScales::new(w);
        let x = xp.as_ptr();
        for j in rows {
            let f0 = j * k;
            let mut acc = [_mm512_setzero_ps(); M];
            for c in 0..chunks {
                let f = f0 + c * CHUNK;
                let raw = _mm512_loadu_si512(src.add(f / 2) as *const __m512i);
                let scale = chunk_scales.get(f);
                let mut part = [_mm512_setzero_ps(); M];
                let xc = x.add(c * CHUNK);
                for_each_vector!(raw, table, |s, codes| {
                    for i in 0..M {
                        let xv = _mm512_loadu_ps(xc.add(i * k + 16 * s));
                        part[i] = _mm512_fmadd_ps(codes, xv, part[i]);
                    }
                });
                for i in 0..M {
                    acc[i] = _mm512_fmadd_ps(part[i], scale, acc[i]);
                }
            }
            // The rest of the row (all of it when not chunked) in groups of 16 from any parity.
            let mut p = chunks * CHUNK;
            let lookup = Lookup::new(code, f0 + p);
            while p < k {
                let count = (k - p).min(16);
                let mask = if count == 16 {
                    u16::MAX
                } else {
                    (1u16 << count) - 1
                };
                let e = f0 + p;
                let codes = lookup.codes(load_bytes(src, nbytes, e / 2));
                let wv = _mm512_maskz_mul_ps(mask, codes, group_scales.get(e, count));
                for i in 0..M {
                    let xv = _mm512_maskz_loadu_ps(mask, x.add(i * k + p));
                    acc[i] = _mm512_fmadd_ps(wv, xv, acc[i]);
                }
                p += count;
            }
            for i in 0..M {
                *y.add(i * n + j) = _mm512_reduce_add_ps(acc[i]);
            }
        }
    }

    /// Rows `rows` of W added into `acc[m, k]` as `acc += dy[:, rows] · deq(W)[rows, :]`, in
    /// the permuted chunk order when chunked.
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
        let chunked = k % 8 == 0 && k >= CHUNK;
        let chunks = if chunked { k / CHUNK } else { 0 };
        let mut chunk_scales = ChunkScales::new(w);
        let mut group_scales = GroupScales::new(w);
        let a = acc.as_mut_ptr();
        for j in rows {
            let f0 = j * k;
            let g: [__m512; M] = std::array::from_fn(|i| _mm512_set1_ps(dy[i * n + j]));
            for c in 0..chunks {
                let f = f0 + c * CHUNK;
                let raw = _mm512_loadu_si512(src.add(f / 2) as *const __m512i);
                let scale = chunk_scales.get(f);
                let gs: [__m512; M] = std::array::from_fn(|i| _mm512_mul_ps(g[i], scale));
                let ac = a.add(c * CHUNK);
                for_each_vector!(raw, table, |s, codes| {
                    for i in 0..M {
                        let p = ac.add(i * k + 16 * s);
                        _mm512_storeu_ps(p, _mm512_fmadd_ps(codes, gs[i], _mm512_loadu_ps(p)));
                    }
                });
            }
            let mut p = chunks * CHUNK;
            let lookup = Lookup::new(code, f0 + p);
            while p < k {
                let count = (k - p).min(16);
                let mask = if count == 16 {
                    u16::MAX
                } else {
                    (1u16 << count) - 1
                };
                let e = f0 + p;
                let codes = lookup.codes(load_bytes(src, nbytes, e / 2));
                let wv = _mm512_mul_ps(codes, group_scales.get(e, count));
                for i in 0..M {
                    let q = a.add(i * k + p);
                    let sum = _mm512_fmadd_ps(wv, g[i], _mm512_maskz_loadu_ps(mask, q));
                    _mm512_mask_storeu_ps(q, mask, sum);
                }
                p += count;
            }
        }
    }
}
