//! Nibble → value decode of any flat element range, to f32, bf16 or f16.
//!
//! Work goes in groups of 16 consecutive elements (8 or 9 packed bytes). A group starts wherever
//! the caller's range starts, so it may begin on an odd element (a low nibble) and may straddle a
//! block boundary (blocks are at least 32 long, so it touches at most two blocks). That freedom
//! is what lets panels start mid-block and lets the output be aligned for streaming stores.
//!
//! The scalar path is the reference; it computes `code[nibble] * absmax` exactly like
//! `blockwise::dequantize_reference`, and so do the SIMD paths (one f32 multiply per element).

use half::{bf16, f16};

use super::isa::Isa;
use crate::codebook::DYNAMIC8;
use crate::double_quant::NESTED_BLOCKSIZE;
use crate::tensor::{Absmax, Nf4Tensor};

/// What a decoded value is stored as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    F32,
    Bf16,
    F16,
}

/// An output element type of the decoders.
pub(crate) trait Element: Copy + Send + Sync + 'static {
    const KIND: Kind;
    /// Round an f32 to this type (nearest, ties to even).
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const KIND: Kind = Kind::F32;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for bf16 {
    const KIND: Kind = Kind::Bf16;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl Element for f16 {
    const KIND: Kind = Kind::F16;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// Block scales, read without going through `Absmax::get` on every lookup.
#[derive(Clone, Copy)]
pub(crate) enum Scales<'a> {
    Plain(&'a [f32]),
    Double {
        codes: &'a [u8],
        nested: &'a [f32],
        offset: f32,
    },
}

impl<'a> Scales<'a> {
    pub(crate) fn new(absmax: &'a Absmax) -> Self {
        match absmax {
            Absmax::Plain(a) => Scales::Plain(a),
            Absmax::Double(d) => Scales::Double {
                codes: &d.codes,
                nested: &d.nested_absmax,
                offset: d.offset,
            },
        }
    }

    /// The scale of block `b`; the same two f32 roundings as `DoubleQuant::absmax` (Rust never
    /// contracts `a * b + c` into an FMA).
    #[inline(always)]
    pub(crate) fn get(&self, b: usize) -> f32 {
        match *self {
            Scales::Plain(a) => a[b],
            Scales::Double {
                codes,
                nested,
                offset,
            } => DYNAMIC8[codes[b] as usize] * nested[b / NESTED_BLOCKSIZE] + offset,
        }
    }
}

/// Decode elements `start .. start + out.len()` of `w` (flat, row-major) into `out`.
///
/// `stream` asks for non-temporal stores: right when `out` is far larger than the caches and is
/// not read back soon, wrong otherwise (it evicts the data the next step wants).
pub(crate) fn decode<T: Element>(
    isa: Isa,
    w: &Nf4Tensor,
    start: usize,
    out: &mut [T],
    stream: bool,
) {
    assert!(
        start + out.len() <= w.numel(),
        "decode range {start}..{} is outside the tensor's {} elements",
        start + out.len(),
        w.numel()
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` only reports levels whose features the CPU has.
        Isa::Avx512 => unsafe { avx512::decode(w, start, out, stream) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { avx2::decode(w, start, out) },
        _ => decode_scalar(w, start, out),
    }
}

/// Decode rows `rows` of the 2-D weight `w` (`[n, k]`) transposed: `out[p * ld + r] =
/// W[rows.start + r, p]`, with `ld >= rows.len()`; the other entries of `out` are left alone.
///
/// This is the layout `gemm` reads without repacking when W is the left operand of its
/// column-major product (its micro-panels are columns of rows).
pub(crate) fn decode_transposed(
    isa: Isa,
    w: &Nf4Tensor,
    k: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    assert!(ld >= rows.len() && out.len() >= k.saturating_sub(1) * ld + rows.len());
    assert!(rows.end * k <= w.numel());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` only reports levels whose features the CPU has; the asserts
        // keep every write inside `out`.
        Isa::Avx512 => unsafe { avx512::decode_transposed(w, k, rows, out, ld) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { avx2::decode_transposed(w, k, rows, out, ld) },
        _ => {
            let mut row = vec![0f32; k];
            for (r, j) in rows.enumerate() {
                decode(isa, w, j * k, &mut row, false);
                for (p, &v) in row.iter().enumerate() {
                    out[p * ld + r] = v;
                }
            }
        }
    }
}

/// Round every value to the nearest bf16 (ties to even), kept as f32: the f32 decode of a
/// range followed by this equals its bf16 decode widened.
pub(crate) fn round_to_bf16(values: &mut [f32]) {
    for v in values {
        *v = bf16::from_f32(*v).to_f32();
    }
}

/// The plain version: one element at a time.
pub(crate) fn decode_scalar<T: Element>(w: &Nf4Tensor, start: usize, out: &mut [T]) {
    let code = w.qtype().values();
    let packed = w.packed();
    let shift = w.blocksize().trailing_zeros();
    let scales = Scales::new(w.absmax());
    for (i, o) in out.iter_mut().enumerate() {
        let e = start + i;
        let byte = packed[e / 2];
        let nib = if e.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0f
        };
        *o = T::from_f32(code[nib as usize] * scales.get(e >> shift));
    }
}

/// `pshufb` control per parity of the first element: which byte each of the 16 lanes reads.
/// Even start: lanes 2j and 2j+1 both read byte j. Odd start: lane 0 reads byte 0 (low nibble),
/// then lanes 2j-1, 2j read byte j.
#[cfg(target_arch = "x86_64")]
const BYTE_OF_LANE: [[u8; 16]; 2] = [
    [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7],
    [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8],
];

/// Right shift per lane that brings its nibble to the low bits (element 2k is the high nibble).
#[cfg(target_arch = "x86_64")]
const SHIFT_OF_LANE: [[u32; 16]; 2] = [
    [4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0],
    [0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4],
];

#[cfg(target_arch = "x86_64")]
// Tiles of registers are indexed in lockstep with rows and columns; ranges read better there.
#[allow(clippy::needless_range_loop)]
pub(crate) mod avx512;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockwise::{dequantize_reference, SUPPORTED_BLOCKSIZES};
    use crate::codebook::QuantType;
    use crate::tensor::SourceDtype;

    fn tensor(n: usize, bs: usize, qtype: QuantType, double: bool, seed: u64) -> Nf4Tensor {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let data: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
            })
            .collect();
        Nf4Tensor::quantize(&data, &[n], SourceDtype::F32, qtype, bs, double).unwrap()
    }

    #[test]
    fn transposed_decode_matches_the_reference() {
        for (t, &(n, k, bs)) in [(37, 100, 64), (16, 16, 32), (5, 4099, 4096), (40, 33, 32)]
            .iter()
            .enumerate()
        {
            let w = tensor(n * k, bs, QuantType::Nf4, t % 2 == 0, t as u64);
            let w = Nf4Tensor::from_parts(
                w.qtype(),
                bs,
                vec![n, k],
                w.source_dtype(),
                w.packed().to_vec(),
                w.absmax().clone(),
            )
            .unwrap();
            let want = dequantize_reference(w.packed(), &w.absmax().to_f32(), n * k, bs, w.qtype());
            for isa in Isa::available() {
                for rows in [0..n, 1..n.min(20), 3..4] {
                    let ld = rows.len() + 3;
                    let mut out = vec![f32::NAN; k * ld];
                    decode_transposed(isa, &w, k, rows.clone(), &mut out, ld);
                    for p in 0..k {
                        for (r, j) in rows.clone().enumerate() {
                            assert_eq!(
                                out[p * ld + r].to_bits(),
                                want[j * k + p].to_bits(),
                                "{isa:?} n {n} k {k} rows {rows:?} at [{j}, {p}]"
                            );
                        }
                        assert!(out[p * ld + rows.len()].is_nan(), "wrote past the rows");
                    }
                }
            }
        }
    }

    /// Every ISA, every parity of start, short and straddling ranges, every output type.
    #[test]
    fn every_isa_matches_the_reference_on_any_range() {
        for (t, &bs) in SUPPORTED_BLOCKSIZES.iter().enumerate() {
            for (qtype, double) in [
                (QuantType::Nf4, false),
                (QuantType::Fp4, true),
                (QuantType::Nf4, true),
            ] {
                let n = 3 * bs + 37;
                let w = tensor(n, bs, qtype, double, t as u64);
                let absmax = w.absmax().to_f32();
                let want = dequantize_reference(w.packed(), &absmax, n, bs, qtype);
                for isa in Isa::available() {
                    for (start, len) in [
                        (0, n),
                        (1, n - 1),
                        (bs - 5, 40),
                        (n - 17, 17),
                        (n - 3, 3),
                        (7, 0),
                    ] {
                        for (stream, offset) in [(false, 0), (true, 0), (true, 1), (true, 3)] {
                            // Misaligned outputs make streaming start with a short group.
                            let mut buf = vec![f32::NAN; len + offset];
                            let out = &mut buf[offset..];
                            decode(isa, &w, start, out, stream);
                            let same = out
                                .iter()
                                .zip(&want[start..start + len])
                                .all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(same, "{isa:?} f32 bs {bs} {qtype} start {start} len {len}");
                            let mut hb = vec![bf16::ZERO; len + offset];
                            let hb = &mut hb[offset..];
                            decode(isa, &w, start, hb, stream);
                            let mut hf = vec![f16::ZERO; len + offset];
                            let hf = &mut hf[offset..];
                            decode(isa, &w, start, hf, stream);
                            for (i, &r) in want[start..start + len].iter().enumerate() {
                                assert_eq!(
                                    hb[i].to_bits(),
                                    bf16::from_f32(r).to_bits(),
                                    "{isa:?} bf16"
                                );
                                assert_eq!(
                                    hf[i].to_bits(),
                                    f16::from_f32(r).to_bits(),
                                    "{isa:?} f16"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
