//! 4-bit code books (NF4, FP4) and the 8-bit dynamic code used for double quantization.
//!
//! Every value is the exact f32 that bitsandbytes 0.50.2 uses; tests compare them with
//! `tests/fixtures/nf4/codes.safetensors`.

use std::fmt;

/// Which 4-bit code a tensor uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// NormalFloat4: quantiles of N(0, 1), normalised to [-1, 1] (QLoRA).
    Nf4,
    /// 4-bit float: 1 sign, 2 exponent, 1 mantissa bit, bias 2, divided by 12.
    Fp4,
}

impl QuantType {
    /// The name bitsandbytes uses (`"nf4"`, `"fp4"`).
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// Parse bitsandbytes' name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "nf4" => Some(QuantType::Nf4),
            "fp4" => Some(QuantType::Fp4),
            _ => None,
        }
    }

    /// Value of each nibble as used when dequantizing (FP4 nibble 8 is -0.0, as in bnb's C++ LUT).
    pub fn values(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4,
            QuantType::Fp4 => &FP4,
        }
    }

    /// Value of each nibble as bitsandbytes stores it in `quant_map` (FP4 nibble 8 is +0.0 there).
    pub fn quant_map(self) -> [f32; 16] {
        let mut map = *self.values();
        if self == QuantType::Fp4 {
            map[8] = 0.0;
        }
        map
    }

    /// The 15 rounding thresholds and the nibble of each sorted position.
    pub fn rounding(self) -> &'static Rounding {
        match self {
            QuantType::Nf4 => &NF4_ROUNDING,
            QuantType::Fp4 => &FP4_ROUNDING,
        }
    }
}

impl fmt::Display for QuantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// NF4 values by nibble (sorted ascending, so the nibble is the sorted position).
// Written exactly as bitsandbytes prints them (f64 reprs of f32 values), so they can be checked
// against its source by eye; each rounds to the intended f32.
#[allow(clippy::excessive_precision)]
#[rustfmt::skip]
pub const NF4: [f32; 16] = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
];

/// FP4 values by nibble: raw `[0, 0.0625, 8, 12, 4, 6, 2, 3]` / 12, negated for nibbles 8..15.
#[rustfmt::skip]
pub const FP4: [f32; 16] = [
    0.0, 0.0625 / 12.0, 8.0 / 12.0, 1.0, 4.0 / 12.0, 6.0 / 12.0, 2.0 / 12.0, 3.0 / 12.0,
    -0.0, -0.0625 / 12.0, -8.0 / 12.0, -1.0, -4.0 / 12.0, -6.0 / 12.0, -2.0 / 12.0, -3.0 / 12.0,
];

/// Nearest-code rounding as `torch.bucketize(s, midpoints)`: the sorted position is the number of
/// midpoints strictly below `s` (a tie goes to the lower code), mapped to its nibble.
#[derive(Debug)]
pub struct Rounding {
    /// `(c[k] + c[k+1]) / 2` in f32 over the code sorted ascending.
    pub midpoints: [f32; 15],
    /// Nibble of each sorted position.
    pub nibble: [u8; 16],
}

impl Rounding {
    /// Nibble of the code nearest to `s` (already scaled into [-1, 1]).
    #[inline(always)]
    pub fn nibble_of(&self, s: f32) -> u8 {
        // Branch-free count: vectorises well and has no data-dependent branches.
        let mut pos = 0u8;
        for &m in &self.midpoints {
            pos += (m < s) as u8;
        }
        self.nibble[pos as usize]
    }
}

const fn midpoints_of(sorted: [f32; 16]) -> [f32; 15] {
    let mut mid = [0f32; 15];
    let mut k = 0;
    while k < 15 {
        mid[k] = (sorted[k] + sorted[k + 1]) / 2.0;
        k += 1;
    }
    mid
}

const FP4_SORTED_NIBBLES: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

const fn fp4_sorted() -> [f32; 16] {
    // bnb sorts its Python table, in which nibble 8 is +0.0 (stable: nibble 0 first).
    let mut out = [0f32; 16];
    let mut k = 0;
    while k < 16 {
        let nib = FP4_SORTED_NIBBLES[k] as usize;
        out[k] = if nib == 8 { 0.0 } else { FP4[nib] };
        k += 1;
    }
    out
}

static NF4_ROUNDING: Rounding = Rounding {
    midpoints: midpoints_of(NF4),
    nibble: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
};

static FP4_ROUNDING: Rounding = Rounding {
    midpoints: midpoints_of(fp4_sorted()),
    nibble: FP4_SORTED_NIBBLES,
};

/// The signed 8-bit dynamic code (`F.create_dynamic_map()`), index order: 127 is 0.0, 255 is 1.0.
///
/// Embedded rather than recomputed: bnb builds it from `linspace`, and recomputing can be 1 ulp off.
#[rustfmt::skip]
pub const DYNAMIC8: [f32; 256] = [
    -0.99296874, -0.9789063, -0.96484375, -0.9507812, -0.93671876, -0.92265624, -0.9085938, -0.89453125,
    -0.8804687, -0.86640626, -0.85234374, -0.8382813, -0.82421875, -0.8101562, -0.79609376, -0.78203124,
    -0.7679688, -0.75390625, -0.7398437, -0.72578126, -0.7117188, -0.6976563, -0.68359375, -0.6695312,
    -0.65546876, -0.6414063, -0.6273438, -0.61328125, -0.5992187, -0.58515626, -0.5710938, -0.5570313,
    -0.54296875, -0.5289062, -0.5148437, -0.50078124, -0.4867187, -0.47265625, -0.45859373, -0.44453126,
    -0.43046874, -0.41640624, -0.40234375, -0.38828123, -0.37421876, -0.36015624, -0.34609374, -0.33203125,
    -0.31796873, -0.30390626, -0.28984374, -0.27578127, -0.26171875, -0.24765624, -0.23359375, -0.21953125,
    -0.20546874, -0.19140625, -0.17734376, -0.16328125, -0.14921875, -0.13515624, -0.12109375, -0.107031256,
    -0.09859375, -0.09578126, -0.092968754, -0.09015625, -0.08734375, -0.08453125, -0.08171876, -0.07890625,
    -0.07609375, -0.07328125, -0.070468746, -0.067656256, -0.06484375, -0.06203125, -0.059218753, -0.05640625,
    -0.05359375, -0.05078125, -0.04796875, -0.04515625, -0.042343747, -0.03953125, -0.036718752, -0.03390625,
    -0.03109375, -0.028281251, -0.02546875, -0.02265625, -0.019843752, -0.01703125, -0.01421875, -0.01140625,
    -0.00971875, -0.009156249, -0.00859375, -0.00803125, -0.00746875, -0.00690625, -0.00634375, -0.00578125,
    -0.0052187503, -0.0046562497, -0.00409375, -0.0035312497, -0.00296875, -0.00240625, -0.00184375, -0.0012812499,
    -0.0009437501, -0.00083125, -0.00071875006, -0.0006062501, -0.00049375003, -0.00038125002, -0.00026875004, -0.00015625001,
    -8.875e-05, -6.625e-05, -4.375e-05, -2.1249998e-05, -7.75e-06, -3.2500002e-06, -5.5000004e-07, 0.0,
    5.5000004e-07, 3.2500002e-06, 7.75e-06, 2.1249998e-05, 4.375e-05, 6.625e-05, 8.875e-05, 0.00015625001,
    0.00026875004, 0.00038125002, 0.00049375003, 0.0006062501, 0.00071875006, 0.00083125, 0.0009437501, 0.0012812499,
    0.00184375, 0.00240625, 0.00296875, 0.0035312497, 0.00409375, 0.0046562497, 0.0052187503, 0.00578125,
    0.00634375, 0.00690625, 0.00746875, 0.00803125, 0.00859375, 0.009156249, 0.00971875, 0.01140625,
    0.01421875, 0.01703125, 0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375, 0.03390625,
    0.036718752, 0.03953125, 0.042343747, 0.04515625, 0.04796875, 0.05078125, 0.05359375, 0.05640625,
    0.059218753, 0.06203125, 0.06484375, 0.067656256, 0.070468746, 0.07328125, 0.07609375, 0.07890625,
    0.08171876, 0.08453125, 0.08734375, 0.09015625, 0.092968754, 0.09578126, 0.09859375, 0.107031256,
    0.12109375, 0.13515624, 0.14921875, 0.16328125, 0.17734376, 0.19140625, 0.20546874, 0.21953125,
    0.23359375, 0.24765624, 0.26171875, 0.27578127, 0.28984374, 0.30390626, 0.31796873, 0.33203125,
    0.34609374, 0.36015624, 0.37421876, 0.38828123, 0.40234375, 0.41640624, 0.43046874, 0.44453126,
    0.45859373, 0.47265625, 0.4867187, 0.50078124, 0.5148437, 0.5289062, 0.54296875, 0.5570313,
    0.5710938, 0.58515626, 0.5992187, 0.61328125, 0.6273438, 0.6414063, 0.65546876, 0.6695312,
    0.68359375, 0.6976563, 0.7117188, 0.72578126, 0.7398437, 0.75390625, 0.7679688, 0.78203124,
    0.79609376, 0.8101562, 0.82421875, 0.8382813, 0.85234374, 0.86640626, 0.8804687, 0.89453125,
    0.9085938, 0.92265624, 0.93671876, 0.9507812, 0.96484375, 0.9789063, 0.99296874, 1.0,
];
