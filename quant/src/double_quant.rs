//! Double quantization: the f32 absmax vector itself stored as 8-bit dynamic codes.
//!
//! bitsandbytes subtracts the mean, then quantizes blockwise (blocksize 256) with the signed dynamic
//! code. Its CPU quantizer rounds through a 65536-entry lookup table rather than an exact nearest
//! search; we reproduce the table so the codes match bnb's CPU output bit for bit.

use std::sync::OnceLock;

use crate::codebook::DYNAMIC8;

/// Second-level blocksize; fixed by `quantize_4bit`.
pub const NESTED_BLOCKSIZE: usize = 256;

/// An absmax vector in double-quantized form.
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuant {
    /// One 8-bit dynamic code per first-level block (`weight.absmax` in a checkpoint).
    pub codes: Vec<u8>,
    /// f32 absmax of each group of 256 codes (`weight.nested_absmax`).
    pub nested_absmax: Vec<f32>,
    /// The mean that was subtracted before quantizing (`nested_offset`).
    pub offset: f32,
}

impl DoubleQuant {
    /// Reconstructed absmax of block `b`: `f32(dynamic[code] * nested) + offset`, two roundings.
    #[inline(always)]
    pub fn absmax(&self, b: usize) -> f32 {
        dequantize_one(
            self.codes[b],
            self.nested_absmax[b / NESTED_BLOCKSIZE],
            self.offset,
        )
    }

    /// Every reconstructed absmax.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.codes.len()).map(|b| self.absmax(b)).collect()
    }
}

/// `f32(dynamic[code] * nested) + offset`, kept unfused so it rounds twice as bnb does.
#[inline(always)]
pub fn dequantize_one(code: u8, nested: f32, offset: f32) -> f32 {
    let scaled = std::hint::black_box(DYNAMIC8[code as usize] * nested);
    scaled + offset
}

/// The f32 mean of the absmax vector, as close to `torch.mean` as a portable sum gets.
///
/// torch sums in a vectorised order; an f64 sum rounded once matches it in most cases and is at
/// most 1 ulp away otherwise (bnb's own fixtures document this).
pub fn mean_offset(absmax: &[f32]) -> f32 {
    if absmax.is_empty() {
        return 0.0;
    }
    let sum: f64 = absmax.iter().map(|&a| a as f64).sum();
    (sum / absmax.len() as f64) as f32
}

/// Double-quantize `absmax` with a given offset (normally [`mean_offset`]).
pub fn quantize_with_offset(absmax: &[f32], offset: f32) -> DoubleQuant {
    let lut = lookup_table();
    let mut codes = Vec::with_capacity(absmax.len());
    let mut nested_absmax = Vec::with_capacity(absmax.len().div_ceil(NESTED_BLOCKSIZE));
    for block in absmax.chunks(NESTED_BLOCKSIZE) {
        let centred: Vec<f32> = block.iter().map(|&a| a - offset).collect();
        let m = centred.iter().fold(0f32, |m, &v| m.max(v.abs()));
        nested_absmax.push(m);
        if m == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let recip = 1.0f32 / m;
        codes.extend(centred.iter().map(|&v| {
            let s = (v * recip).clamp(-1.0, 1.0);
            lut[lut_index(s)]
        }));
    }
    DoubleQuant {
        codes,
        nested_absmax,
        offset,
    }
}

/// Double-quantize `absmax` (offset = its mean).
pub fn quantize(absmax: &[f32]) -> DoubleQuant {
    quantize_with_offset(absmax, mean_offset(absmax))
}

/// `(u16)((s + 1) * 0.5 * 65535 + 0.5)`, each step an f32 operation, truncating cast.
#[inline(always)]
fn lut_index(s: f32) -> usize {
    let t = std::hint::black_box((s + 1.0) * 0.5f32 * 65535.0f32);
    (t + 0.5f32) as u16 as usize
}

/// `lut[i]` = number of dynamic-code midpoints strictly below `-1 + 2i / 65535` (f32).
fn lookup_table() -> &'static [u8; 65536] {
    static LUT: OnceLock<Box<[u8; 65536]>> = OnceLock::new();
    LUT.get_or_init(|| {
        let mids: Vec<f32> = DYNAMIC8
            .windows(2)
            .map(|w| 0.5f32 * (w[0] + w[1]))
            .collect();
        let mut lut = Box::new([0u8; 65536]);
        for (i, slot) in lut.iter_mut().enumerate() {
            let x = -1.0f32 + (2.0f32 * i as f32) / 65535.0f32;
            *slot = mids.iter().filter(|&&m| m < x).count() as u8;
        }
        lut
    })
}

/// Exact nearest-code search (what bnb's CUDA kernel does); used to show where the LUT differs.
pub fn nearest_code(s: f32) -> u8 {
    let mut pos = 0u8;
    for w in DYNAMIC8.windows(2) {
        pos += (0.5f32 * (w[0] + w[1]) < s) as u8;
    }
    pos
}
