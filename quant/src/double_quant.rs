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

/// The f32 mean of the absmax vector, bit for bit what `torch.mean` returns on CPU.
///
/// torch computes `sum(absmax) / n` in f32, and its sum is a cascade in f32 over 8-lane vectors
/// (the AVX2 kernels its x86 wheels dispatch to), reproduced by `torch_sum`. An f64 sum rounded once is 1 ulp
/// off for about one vector in five, so we follow torch's order instead. Exact whenever torch
/// reduces on one thread, which it does below 32768 values (`GRAIN_SIZE`, i.e. weights under
/// 2M elements at blocksize 64); above that a multi-threaded torch splits the sum per thread,
/// and the result can differ from this one by 1 ulp.
pub fn mean_offset(absmax: &[f32]) -> f32 {
    if absmax.is_empty() {
        return 0.0;
    }
    torch_sum(absmax) / absmax.len() as f32
}

/// Lanes of torch's `Vectorized<float>` in the kernels that computed the reference offsets.
const TORCH_LANES: usize = 8;

/// Rows of accumulators torch keeps live at once (`ilp_factor` in `SumKernel.cpp`).
const TORCH_ILP: usize = 4;

/// torch's f32 `cascade_sum` for a contiguous vector on one thread (`vectorized_inner_sum`):
/// whole 8-lane vectors are summed by [`cascade_rows`] in 4 interleaved accumulators, the
/// leftover vectors join accumulator 0, the four are added lane-wise; then the scalar tail is
/// summed from zero and the 8 lanes are added to it in order. Vectors shorter than 8 take
/// torch's scalar path, the same cascade over single floats.
fn torch_sum(x: &[f32]) -> f32 {
    if x.len() < TORCH_LANES {
        return row_sum::<1>(x)[0];
    }
    let whole = x.len() / TORCH_LANES * TORCH_LANES;
    let lanes = row_sum::<TORCH_LANES>(&x[..whole]);
    let mut total = x[whole..].iter().fold(0f32, |acc, &v| acc + v);
    for lane in lanes {
        total += lane;
    }
    total
}

/// torch's `row_sum` over `x` seen as vectors of `L` lanes (`x.len()` a multiple of `L`).
fn row_sum<const L: usize>(x: &[f32]) -> [f32; L] {
    let load = |i: usize| -> [f32; L] {
        let mut v = [0f32; L];
        v.copy_from_slice(&x[i * L..(i + 1) * L]);
        v
    };
    let vectors = x.len() / L;
    let rows = vectors / TORCH_ILP;
    let mut partial = cascade_rows(rows, load);
    for i in rows * TORCH_ILP..vectors {
        add_lanes(&mut partial[0], &load(i));
    }
    let [mut sum, p1, p2, p3] = partial;
    for p in [p1, p2, p3] {
        add_lanes(&mut sum, &p);
    }
    sum
}

/// torch's `multi_row_sum`: `rows` rows of [`TORCH_ILP`] vectors (vector `k` of row `i` is
/// `load(i * 4 + k)`), accumulated on 4 levels; level `j` is flushed into level `j + 1` every
/// `2^(j * level_power)` rows, so only partial sums of similar size are added together.
fn cascade_rows<const L: usize>(
    rows: usize,
    load: impl Fn(usize) -> [f32; L],
) -> [[f32; L]; TORCH_ILP] {
    const LEVELS: usize = 4;
    let level_power = 4.max(ceil_log2(rows) / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; L]; TORCH_ILP]; LEVELS];
    let mut i = 0;
    while i + level_step <= rows {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add_lanes(a, &load(i * TORCH_ILP + k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (below, above) = acc.split_at_mut(j);
            for (lower, upper) in below[j - 1].iter_mut().zip(above[0].iter_mut()) {
                let lower = std::mem::replace(lower, [0f32; L]);
                add_lanes(upper, &lower);
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    for i in i..rows {
        for (k, a) in acc[0].iter_mut().enumerate() {
            add_lanes(a, &load(i * TORCH_ILP + k));
        }
    }
    let [mut sum, l1, l2, l3] = acc;
    for level in [l1, l2, l3] {
        for (s, l) in sum.iter_mut().zip(level.iter()) {
            add_lanes(s, l);
        }
    }
    sum
}

#[inline(always)]
fn add_lanes<const L: usize>(acc: &mut [f32; L], v: &[f32; L]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a += b;
    }
}

/// ATen's `CeilLog2`: 1 for x <= 2, else the bit width of x - 1.
fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
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
