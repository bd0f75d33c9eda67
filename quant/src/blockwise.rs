//! Blockwise absmax 4-bit quantization in bitsandbytes' exact bit layout (`quantize_4bit`).
//!
//! This is the format logic: plain, scalar-clear code that the fast kernels in `cpu/` are tested
//! against. Quantization itself is parallel over blocks because loading a 7B model runs it on
//! billions of weights.

use rayon::prelude::*;

use crate::codebook::QuantType;
use crate::QuantError;

/// Blocksizes bitsandbytes accepts for 4-bit quantization.
pub const SUPPORTED_BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Check a blocksize against bitsandbytes' list.
pub fn check_blocksize(blocksize: usize) -> Result<(), QuantError> {
    if SUPPORTED_BLOCKSIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(QuantError::UnsupportedBlocksize(blocksize))
    }
}

/// Number of `blocksize` blocks covering `n` elements (the last one may be short).
pub fn block_count(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}

/// Packed 4-bit codes and the f32 absmax of every block.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantized {
    /// Two codes per byte: element `2k` in the high nibble, `2k + 1` in the low nibble; an odd
    /// count ends with the code of 0.0 as padding.
    pub packed: Vec<u8>,
    /// `max |x|` of each block.
    pub absmax: Vec<f32>,
}

/// Quantize `data` (flat, row-major) blockwise to 4 bits, exactly as bitsandbytes' CPU path does.
pub fn quantize(data: &[f32], blocksize: usize, qtype: QuantType) -> Result<Quantized, QuantError> {
    check_blocksize(blocksize)?;
    let n = data.len();
    let nblocks = block_count(n, blocksize);
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; nblocks];
    let rounding = qtype.rounding();
    // Blocksizes are even, so every block starts on a byte boundary.
    packed
        .par_chunks_mut(blocksize / 2)
        .zip(absmax.par_iter_mut())
        .zip(data.par_chunks(blocksize))
        .for_each(|((out, amax), block)| {
            let m = block.iter().fold(0f32, |m, &x| m.max(x.abs()));
            *amax = m;
            let denom = m.max(1e-38);
            // Full blocks multiply by the reciprocal, the short tail divides: the two can differ
            // in the last bit, and bnb does exactly this.
            let full = block.len() == blocksize;
            let recip = 1.0f32 / denom;
            let scale = |x: f32| {
                let s = if full { x * recip } else { x / denom };
                s.clamp(-1.0, 1.0)
            };
            for (byte, pair) in out.iter_mut().zip(block.chunks(2)) {
                let hi = rounding.nibble_of(scale(pair[0]));
                // bnb pads an odd count with the value 0.0 and quantizes it (NF4 nibble 7,
                // FP4 nibble 0), so the padding nibble is the code of zero, not a literal 0.
                let lo = rounding.nibble_of(pair.get(1).map_or(0.0, |&x| scale(x)));
                *byte = (hi << 4) | lo;
            }
        });
    Ok(Quantized { packed, absmax })
}

/// The 4-bit code of element `i`.
#[inline(always)]
pub fn nibble_at(packed: &[u8], i: usize) -> u8 {
    let byte = packed[i / 2];
    if i.is_multiple_of(2) {
        byte >> 4
    } else {
        byte & 0x0f
    }
}

/// Unpack all `n` codes (one per byte).
pub fn unpack_nibbles(packed: &[u8], n: usize) -> Vec<u8> {
    (0..n).map(|i| nibble_at(packed, i)).collect()
}

/// Reference dequantization: `out[i] = code[nibble_i] * absmax[i / blocksize]` in f32.
///
/// Plain and obviously right; `cpu::dequantize_into` is the fast version tested against it.
pub fn dequantize_reference(
    packed: &[u8],
    absmax: &[f32],
    n: usize,
    blocksize: usize,
    qtype: QuantType,
) -> Vec<f32> {
    let code = qtype.values();
    (0..n)
        .map(|i| code[nibble_at(packed, i) as usize] * absmax[i / blocksize])
        .collect()
}
