//! The 16 lane scales of each chunk the GEMV kernels multiply.
//!
//! Lane `l` of a chunk's vectors covers weights `8l .. 8l + 8` of the chunk (see the module
//! docs of `gemv`); chunked rows start on a multiple of 8, as blocks do, so each lane lies in
//! one block. The scales of a stretch of a row are looked up once into a small array, then
//! each chunk's vector is built from it with broadcast loads and at most one blend or permute.

use std::arch::x86_64::*;

use super::CHUNK;
use crate::codebook::DYNAMIC8;
use crate::cpu::decode::Scales;
use crate::double_quant::NESTED_BLOCKSIZE;

/// Block scales of one stretch of a row.
pub(super) struct ChunkScales<'a> {
    scales: Scales<'a>,
    shift: u32,
    /// First block of the stretch; `blocks[i]` is the scale of block `first + i`.
    first: usize,
    blocks: Vec<f32>,
    /// Lane → block offset of a chunk that starts on a block boundary (blocksize < 128).
    pattern: [i32; 16],
    /// All 256 scales a double-quantized code can give in nested group `group`
    /// (`DYNAMIC8[c] * nested[group] + offset`), so a block's scale is one load.
    group: usize,
    table: Box<[f32; 256]>,
}

impl<'a> ChunkScales<'a> {
    /// For blocks of `blocksize` weights and stretches of up to `max_len` weights.
    pub(super) fn new(scales: Scales<'a>, blocksize: usize, max_len: usize) -> Self {
        let per_block = (blocksize / 8).max(1) as i32;
        Self {
            scales,
            shift: blocksize.trailing_zeros(),
            first: 0,
            // Two more for a stretch that starts and ends mid-block, and padding for the
            // 4-wide load of `get`.
            blocks: vec![0.0; max_len / blocksize + 2 + 4],
            pattern: std::array::from_fn(|l| l as i32 / per_block),
            group: usize::MAX,
            table: Box::new([0.0; 256]),
        }
    }

    /// Look up the scales of the blocks of flat elements `start .. end`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) fn fill(&mut self, start: usize, end: usize) {
        let b0 = start >> self.shift;
        let b1 = ((end - 1) >> self.shift) + 1;
        self.first = b0;
        let mut b = b0;
        while b < b1 {
            // Blocks up to the end of the range or of b's nested group, which share a table.
            match self.scales {
                Scales::Plain(a) => {
                    self.blocks[..b1 - b0].copy_from_slice(&a[b0..b1]);
                    b = b1;
                }
                Scales::Double { codes, .. } => {
                    let stop = ((b / NESTED_BLOCKSIZE + 1) * NESTED_BLOCKSIZE).min(b1);
                    self.load_table(b / NESTED_BLOCKSIZE);
                    let table = &self.table;
                    for (o, &c) in self.blocks[b - b0..stop - b0]
                        .iter_mut()
                        .zip(&codes[b..stop])
                    {
                        *o = table[c as usize];
                    }
                    b = stop;
                }
            }
        }
    }

    /// Make `table` hold nested group `group`'s scales.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn load_table(&mut self, group: usize) {
        let Scales::Double { nested, offset, .. } = self.scales else {
            return;
        };
        if group == self.group {
            return;
        }
        self.group = group;
        let n = _mm512_set1_ps(nested[group]);
        let o = _mm512_set1_ps(offset);
        for (t, d) in self
            .table
            .chunks_exact_mut(16)
            .zip(DYNAMIC8.chunks_exact(16))
        {
            // SAFETY: both chunks hold 16 floats. Two roundings, as `DoubleQuant::absmax`
            // (a multiply, then an add; no FMA).
            unsafe {
                let v = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(d.as_ptr()), n), o);
                _mm512_storeu_ps(t.as_mut_ptr(), v);
            }
        }
    }

    /// The 16 lane scales of the chunk at flat element `f`: one broadcast when the chunk lies
    /// in one block; for blocks of 64, two broadcasts and a blend (no shuffle-port work).
    ///
    /// # Safety
    /// The chunk must lie in the stretch of the last [`Self::fill`]; AVX-512 must be enabled
    /// in the caller.
    #[inline(always)]
    pub(super) unsafe fn get(&self, f: usize) -> __m512 {
        let b = f >> self.shift;
        let off = f & ((1 << self.shift) - 1);
        let s = self.blocks.as_ptr().add(b - self.first);
        if off + CHUNK <= 1 << self.shift {
            _mm512_set1_ps(*s)
        } else if off == 0 && self.shift == 6 {
            _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(*s), _mm512_set1_ps(*s.add(1)))
        } else if off == 0 {
            let pattern = _mm512_loadu_si512(self.pattern.as_ptr() as *const __m512i);
            _mm512_permutexvar_ps(pattern, _mm512_castps128_ps512(_mm_loadu_ps(s)))
        } else {
            self.straddling(f)
        }
    }

    /// [`Self::get`] when blocks are 64 long and the chunk starts on a block boundary (the
    /// caller checks): two broadcasts and a blend, no branch.
    ///
    /// # Safety
    /// As [`Self::get`].
    #[inline(always)]
    pub(super) unsafe fn get_pair(&self, f: usize) -> __m512 {
        let s = self.blocks.as_ptr().add((f >> 6) - self.first);
        _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(*s), _mm512_set1_ps(*s.add(1)))
    }

    /// Whether every chunk of rows of `k` takes [`Self::get_pair`].
    pub(super) fn pairs_only(&self, k: usize) -> bool {
        self.shift == 6 && k.is_multiple_of(64)
    }

    /// A chunk that starts mid-block and ends in another (rows not a whole number of blocks).
    #[inline(never)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn straddling(&self, f: usize) -> __m512 {
        let lanes: [f32; 16] =
            std::array::from_fn(|l| self.blocks[((f + 8 * l) >> self.shift) - self.first]);
        // SAFETY: reads the 16 floats of a local array.
        unsafe { _mm512_loadu_ps(lanes.as_ptr()) }
    }
}
