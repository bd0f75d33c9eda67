//! The frozen base weight of a linear layer: 4-bit codes or a dense tensor.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use qlora_quant::{nf4_linear, Nf4Tensor};

/// The frozen weight of a projection, `[out, in]`.
#[derive(Clone, Debug)]
pub enum BaseWeight {
    /// NF4/FP4 codes, multiplied through the fused dequantizing kernel.
    Quantized(Arc<Nf4Tensor>),
    /// A dense tensor in the compute dtype (full-precision comparison runs).
    Dense(Tensor),
}

impl BaseWeight {
    /// `(out, in)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            BaseWeight::Quantized(w) => {
                let s = w.shape();
                (s[0], s[1])
            }
            BaseWeight::Dense(t) => (t.dims()[0], t.dims()[1]),
        }
    }

    /// `x · Wᵀ` for `x` of shape `[m, in]`.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            BaseWeight::Quantized(w) => nf4_linear(x, w),
            BaseWeight::Dense(w) => x.matmul(&w.to_dtype(x.dtype())?.t()?),
        }
    }

    /// The weight as a dense f32 tensor (dequantized if 4-bit).
    pub fn to_dense_f32(&self, device: &Device) -> Result<Tensor> {
        match self {
            BaseWeight::Quantized(w) => w
                .dequantize(DType::F32, device)
                .map_err(candle_core::Error::wrap),
            BaseWeight::Dense(t) => t.to_dtype(DType::F32),
        }
    }

    /// Bytes the frozen weight takes in memory.
    pub fn storage_bytes(&self) -> usize {
        match self {
            BaseWeight::Quantized(w) => w.storage_bytes(),
            BaseWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
        }
    }

    /// `‖W_i‖²` for each output row, f32 (DoRA's norms).
    pub fn row_sq_norms(&self) -> Result<Tensor> {
        let device = match self {
            BaseWeight::Dense(t) => t.device().clone(),
            BaseWeight::Quantized(_) => Device::Cpu,
        };
        self.to_dense_f32(&device)?
            .sqr()?
            .sum(candle_core::D::Minus1)
    }
}
