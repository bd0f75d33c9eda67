//! A linear layer over a frozen base (4-bit or dense) with an optional LoRA adapter.

use candle_core::{Device, Result, Tensor, D};

pub use crate::frozen::BaseWeight;
use crate::lora::LoraAdapter;

/// `y = x · W0ᵀ + bias + LoRA(x)`.
#[derive(Clone, Debug)]
pub struct Linear {
    /// The frozen weight.
    pub base: BaseWeight,
    /// Optional bias `[out]` (Qwen2's q/k/v), frozen.
    pub bias: Option<Tensor>,
    /// Optional trainable adapter.
    pub adapter: Option<LoraAdapter>,
    /// `‖W0_i‖²` per row, cached for DoRA.
    dora_row_sq: Option<Tensor>,
}

impl Linear {
    /// A layer with no adapter.
    pub fn new(base: BaseWeight, bias: Option<Tensor>) -> Self {
        Self {
            base,
            bias,
            adapter: None,
            dora_row_sq: None,
        }
    }

    /// Attach (or replace) the adapter; for DoRA the row norms of the base are computed once.
    pub fn set_adapter(&mut self, adapter: Option<LoraAdapter>) -> Result<()> {
        self.dora_row_sq = match &adapter {
            Some(a) if a.magnitude.is_some() => Some(self.base_row_sq_norms()?),
            _ => None,
        };
        self.adapter = adapter;
        Ok(())
    }

    /// `‖W0_i‖²` for each output row, f32.
    pub fn base_row_sq_norms(&self) -> Result<Tensor> {
        let device = match &self.base {
            BaseWeight::Dense(t) => t.device().clone(),
            BaseWeight::Quantized(_) => Device::Cpu,
        };
        self.base.to_dense_f32(&device)?.sqr()?.sum(D::Minus1)
    }

    /// Forward for `x` of shape `[.., in]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (_, inp) = self.base.shape();
        let x2 = x.reshape(((), inp))?;
        let fused = match &self.adapter {
            Some(a) => a.fused_output(&self.base, &x2, train)?,
            None => None,
        };
        let mut y = match (&self.adapter, fused) {
            (_, Some(y)) => y,
            (None, None) => self.base.matmul_t(&x2)?,
            (Some(a), None) => self.composite_output(a, &x2, train)?,
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.to_dtype(y.dtype())?)?;
        }
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = y.dim(1)?;
        y.reshape(out_dims)
    }

    /// Base product plus adapter from candle primitives (DoRA, other dtypes and devices).
    fn composite_output(&self, adapter: &LoraAdapter, x2: &Tensor, train: bool) -> Result<Tensor> {
        let base = self.base.matmul_t(x2)?;
        Ok(match adapter {
            a if a.magnitude.is_some() => {
                let row_sq = self
                    .dora_row_sq
                    .as_ref()
                    .ok_or_else(|| candle_core::Error::Msg("DoRA norms not prepared".into()))?;
                let a_w0t = self
                    .base
                    .matmul_t(&a.a.as_tensor().to_dtype(x2.dtype())?.detach())?;
                a.dora_output(x2, &base, row_sq, &a_w0t.detach(), train)?
            }
            a => (base + a.delta(x2, train)?)?,
        })
    }
}
