//! The AdamW update as candle tensor ops, so it runs on whatever device holds the parameters (a
//! GPU's memory on CUDA, where copying every parameter to the host per step would be the cost).
//!
//! The rule and its f32 scalars are [`update`](super::update)'s, operation for operation in the
//! same order and roundings, except the first-moment lerp: the host path rounds it once (a fused
//! multiply-add, as torch's vectorised CPU kernel does), tensor ops round the product and the sum
//! separately. That is at most one ulp per step in `m`; `tests/optim_tensors.rs` compares the two
//! on the CPU backend through this same code.
//!
//! The 8-bit variant keeps bitsandbytes' blockwise layout (blocks of 256 values, an f32 absmax
//! each, codes into the dynamic maps) as `u8` and `f32` tensors, and rounds to the nearest code
//! exactly as the host's [`NearestCode::index`]: the number of midpoints strictly below the
//! scaled value, found here by an eight-step branchless binary search of the midpoints.

use candle_core::{DType, Device, Result, Tensor};

use super::blockwise8::{Blockwise8, BLOCK};
use super::dynamic_code::NearestCode;
use super::update::StepScalars;

/// One AdamW step on flat f32 tensors of one length: returns the new `(p, m, v)`.
pub fn update_tensors(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    s: &StepScalars,
) -> Result<(Tensor, Tensor, Tensor)> {
    let w = match s.decay {
        Some(d) => p.affine(d as f64, 0.0)?,
        None => p.clone(),
    };
    let diff = (g - m)?;
    let mn = if s.lerp_w < 0.5 {
        (diff.affine(s.lerp_w as f64, 0.0)? + m)?
    } else {
        (diff.affine((s.lerp_w - 1.0) as f64, 0.0)? + g)?
    };
    // v * b2 + ((1 - b2) * g) * g, left to right as on the host.
    let vn = (v.affine(s.beta2 as f64, 0.0)? + (g.affine(s.one_minus_beta2 as f64, 0.0)? * g)?)?;
    // A true division by sqrt(bc2) (a scalar tensor): `t / f64` would multiply by its inverse.
    let bc2 = Tensor::new(s.bc2_sqrt, p.device())?;
    let denom = vn.sqrt()?.broadcast_div(&bc2)?.affine(1.0, s.eps as f64)?;
    let pn = ((mn.affine(s.neg_step_size as f64, 0.0)? / &denom)? + w)?;
    Ok((pn, mn, vn))
}

/// A vector of f32 in bitsandbytes' blockwise 8-bit form, held as tensors on a device.
#[derive(Clone, Debug)]
pub struct TensorBlockwise8 {
    /// One code index per value (`u8`, `[n]`).
    pub codes: Tensor,
    /// Largest magnitude of each block of [`BLOCK`] values (`f32`, `[ceil(n / 256)]`).
    pub absmax: Tensor,
    /// Signed dynamic code (first moment) or unsigned (second moment).
    pub signed: bool,
}

/// The code values and padded midpoints of one dynamic code on a device.
struct CodeTables {
    values: Tensor,
    /// The 255 midpoints and `+inf`, so the binary search has 256 slots.
    midpoints: Tensor,
}

fn tables(signed: bool, device: &Device) -> Result<CodeTables> {
    let code = code_of(signed);
    let mut mids: Vec<f32> = code
        .values
        .windows(2)
        .map(|w| 0.5 * (w[0] + w[1]))
        .collect();
    mids.push(f32::INFINITY);
    Ok(CodeTables {
        values: Tensor::new(&code.values[..], device)?,
        midpoints: Tensor::new(mids.as_slice(), device)?,
    })
}

fn code_of(signed: bool) -> &'static NearestCode {
    if signed {
        NearestCode::signed()
    } else {
        NearestCode::unsigned()
    }
}

/// `x` (flat, `n` values) zero-padded to whole blocks and shaped `[blocks, BLOCK]`.
fn blocks_of(x: &Tensor) -> Result<Tensor> {
    let n = x.elem_count();
    let nb = n.div_ceil(BLOCK);
    x.pad_with_zeros(0, 0, nb * BLOCK - n)?.reshape((nb, BLOCK))
}

/// Index of the nearest code of each value of `s` (in [-1, 1]): the count of midpoints below it.
fn nearest_codes(s: &Tensor, midpoints: &Tensor) -> Result<Tensor> {
    let dev = s.device();
    let mut idx = Tensor::zeros(s.shape(), DType::U32, dev)?;
    for step in [128u32, 64, 32, 16, 8, 4, 2, 1] {
        let cand = idx.broadcast_add(&Tensor::new(step, dev)?)?;
        let probe = cand.broadcast_sub(&Tensor::new(1u32, dev)?)?;
        let mid = midpoints.index_select(&probe, 0)?;
        idx = mid.lt(s)?.where_cond(&cand, &idx)?;
    }
    idx.to_dtype(DType::U8)
}

impl TensorBlockwise8 {
    /// `n` zeros on `device`.
    pub fn zeros(n: usize, signed: bool, device: &Device) -> Result<Self> {
        Self::from_host(&Blockwise8::zeros(n, signed), device)
    }

    /// Upload host 8-bit state.
    pub fn from_host(q: &Blockwise8, device: &Device) -> Result<Self> {
        Ok(Self {
            codes: Tensor::new(q.codes.as_slice(), device)?,
            absmax: Tensor::new(q.absmax.as_slice(), device)?,
            signed: q.signed,
        })
    }

    /// Download to host 8-bit state.
    pub fn to_host(&self) -> Result<Blockwise8> {
        Blockwise8::from_parts(
            self.codes.to_vec1::<u8>()?,
            self.absmax.to_vec1::<f32>()?,
            self.signed,
        )
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.codes.elem_count()
    }

    /// Whether there is no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held: one per value plus four per block.
    pub fn bytes(&self) -> usize {
        self.codes.elem_count() + 4 * self.absmax.elem_count()
    }

    /// The f32 values (flat): `code[c] * absmax` of the value's block.
    pub fn dequantize(&self) -> Result<Tensor> {
        let n = self.len();
        let t = tables(self.signed, self.codes.device())?;
        let values = t
            .values
            .index_select(&self.codes.to_dtype(DType::U32)?, 0)?;
        blocks_of(&values)?
            .broadcast_mul(&self.absmax.unsqueeze(1)?)?
            .flatten_all()?
            .narrow(0, 0, n)
    }

    /// Quantize flat f32 `x` (>= 0 for the unsigned code): per block, `clamp(x * (1 / absmax),
    /// -1, 1)` rounded to the nearest code; an all-zero block stores the code of 0.
    pub fn quantize(x: &Tensor, signed: bool) -> Result<Self> {
        let n = x.elem_count();
        let dev = x.device();
        let t = tables(signed, dev)?;
        let blocks = blocks_of(x)?;
        let absmax = blocks.abs()?.max_keepdim(1)?;
        // An all-zero block scales by 1: its values stay 0 and round to the code of 0.
        let zero = absmax.eq(0f32)?;
        let safe = zero.where_cond(&absmax.ones_like()?, &absmax)?;
        let scaled = blocks.broadcast_mul(&safe.recip()?)?.clamp(-1f32, 1f32)?;
        let codes = nearest_codes(&scaled.flatten_all()?, &t.midpoints)?.narrow(0, 0, n)?;
        Ok(Self {
            codes,
            absmax: absmax.flatten_all()?,
            signed,
        })
    }
}

/// One AdamW step with 8-bit moments: dequantize, update in f32 as [`update_tensors`],
/// requantize with each block's new absmax (bitsandbytes' blockwise 8-bit rule).
pub fn update_tensors_8bit(
    p: &Tensor,
    g: &Tensor,
    m: &mut TensorBlockwise8,
    v: &mut TensorBlockwise8,
    s: &StepScalars,
) -> Result<Tensor> {
    let (pn, mn, vn) = update_tensors(p, g, &m.dequantize()?, &v.dequantize()?, s)?;
    *m = TensorBlockwise8::quantize(&mn, m.signed)?;
    *v = TensorBlockwise8::quantize(&vn, v.signed)?;
    Ok(pn)
}
