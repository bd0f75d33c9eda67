//! Blockwise 8-bit storage of an f32 vector as bitsandbytes' 8-bit optimizers keep their state:
//! blocks of 256 values, one f32 absmax per block, each value an index into a dynamic code.

use candle_core::{bail, Result};

use super::dynamic_code::NearestCode;

/// Values per block. bitsandbytes' blockwise 8-bit optimizers use 256 since 0.45 (2048 before).
pub const BLOCK: usize = 256;

/// A vector of f32 stored as 8-bit codes with a per-block absmax.
#[derive(Clone, Debug, PartialEq)]
pub struct Blockwise8 {
    /// One code index per value.
    pub codes: Vec<u8>,
    /// Largest magnitude of each block of [`BLOCK`] values (0 for an all-zero block).
    pub absmax: Vec<f32>,
    /// Signed dynamic code (first moment) or unsigned (second moment).
    pub signed: bool,
}

impl Blockwise8 {
    /// `n` zeros.
    pub fn zeros(n: usize, signed: bool) -> Self {
        let zero = code_of(signed).zero;
        Self {
            codes: vec![zero; n],
            absmax: vec![0.0; n.div_ceil(BLOCK)],
            signed,
        }
    }

    /// Quantize `x` (values must be >= 0 for the unsigned code).
    pub fn quantize(x: &[f32], signed: bool) -> Self {
        let code = code_of(signed);
        let mut codes = vec![0u8; x.len()];
        let absmax = x
            .chunks(BLOCK)
            .zip(codes.chunks_mut(BLOCK))
            .map(|(xb, cb)| quantize_block(xb, code, cb))
            .collect();
        Self {
            codes,
            absmax,
            signed,
        }
    }

    /// Reassemble from stored parts, checking that they fit together.
    pub fn from_parts(codes: Vec<u8>, absmax: Vec<f32>, signed: bool) -> Result<Self> {
        if absmax.len() != codes.len().div_ceil(BLOCK) {
            bail!(
                "8-bit state of {} values needs {} absmax values (blocks of {BLOCK}), got {}",
                codes.len(),
                codes.len().div_ceil(BLOCK),
                absmax.len()
            );
        }
        Ok(Self {
            codes,
            absmax,
            signed,
        })
    }

    /// The f32 values.
    pub fn dequantize(&self) -> Vec<f32> {
        let code = self.code();
        let mut out = vec![0f32; self.codes.len()];
        for ((cb, ob), &a) in self
            .codes
            .chunks(BLOCK)
            .zip(out.chunks_mut(BLOCK))
            .zip(&self.absmax)
        {
            dequantize_block(cb, a, code, ob);
        }
        out
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.codes.len()
    }

    /// Whether there is no value.
    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }

    /// Bytes held: one per value plus four per block.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.absmax.len()
    }

    /// The code this vector is stored in.
    pub fn code(&self) -> &'static NearestCode {
        code_of(self.signed)
    }
}

fn code_of(signed: bool) -> &'static NearestCode {
    if signed {
        NearestCode::signed()
    } else {
        NearestCode::unsigned()
    }
}

/// Quantize one block into `out`, returning its absmax (bnb: `s = clamp(x * (1 / absmax), -1, 1)`,
/// then the nearest code).
#[inline]
pub fn quantize_block(x: &[f32], code: &NearestCode, out: &mut [u8]) -> f32 {
    let absmax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    if absmax == 0.0 || !absmax.is_finite() {
        // Nothing to scale by: store zeros rather than spreading a NaN or inf over the block.
        out.fill(code.zero);
        return if absmax.is_finite() { 0.0 } else { absmax };
    }
    let inv = 1.0 / absmax;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = code.index((v * inv).clamp(-1.0, 1.0));
    }
    absmax
}

/// Dequantize one block: `code[c] * absmax`.
#[inline]
pub fn dequantize_block(codes: &[u8], absmax: f32, code: &NearestCode, out: &mut [f32]) {
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = code.values[c as usize] * absmax;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_error_is_bounded_per_block() {
        let n = 3 * BLOCK + 17;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let q = Blockwise8::quantize(&x, true);
        assert_eq!(q.absmax.len(), 4);
        assert_eq!(q.bytes(), n + 16);
        let y = q.dequantize();
        for (b, (xb, yb)) in x.chunks(BLOCK).zip(y.chunks(BLOCK)).enumerate() {
            let a = q.absmax[b];
            assert_eq!(a, xb.iter().fold(0f32, |m, v| m.max(v.abs())));
            // The signed code's widest gap (near +-1) is 0.0140625 of the absmax.
            for (u, v) in xb.iter().zip(yb) {
                assert!((u - v).abs() <= 0.0071 * a, "{u} vs {v} (absmax {a})");
            }
        }
        let z = Blockwise8::zeros(10, false);
        assert_eq!(z.dequantize(), vec![0.0; 10]);
        let q0 = Blockwise8::quantize(&[0.0; 5], false);
        assert_eq!(q0, Blockwise8::zeros(5, false));
    }

    #[test]
    fn unsigned_code_resolution_follows_its_decades() {
        // Second moments span decades within a block: decade i (values in (10^(i-7), 10^(i-6))
        // of the absmax) holds 2^(i+1) evenly spaced codes, so the rounding error is at most
        // half that spacing.
        let x = [1.0f32, 0.3, 2e-2, 4e-3, 5e-4, 6e-5, 7e-6, 8e-7];
        let q = Blockwise8::quantize(&x, false);
        for (u, v) in x.iter().zip(q.dequantize()) {
            let scale = 10f32.powf(u.log10().ceil());
            let i = (scale.log10().round() as i32 + 6).min(6);
            let half_gap = 0.5 * 0.9 * scale / 2f32.powi(i + 1);
            assert!(
                (u - v).abs() <= half_gap * 1.001,
                "{u} vs {v} (half gap {half_gap})"
            );
            assert!(v > 0.0);
        }
    }
}
