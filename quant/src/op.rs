//! The candle op `y = x · deq(W)ᵀ` over a frozen 4-bit weight.
//!
//! It is applied to the activations only: the weight is captured in the op, so autograd can only
//! ever produce a gradient for `x` (`dx = dy · deq(W)`, the same kernel family transposed). A
//! frozen base weight therefore costs no gradient memory at all.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

use crate::cpu;
use crate::tensor::Nf4Tensor;

/// Which product the op computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Orientation {
    /// `x[.., k] · deq(W)ᵀ -> [.., n]`
    Forward,
    /// `dy[.., n] · deq(W) -> [.., k]`
    Transposed,
}

/// `y = x · deq(W)ᵀ` as a candle custom op (f32, bf16 or f16 activations; f32 accumulation).
/// bf16 activations are multiplied with W dequantized to bf16 (bitsandbytes' bf16 compute, and
/// what the CUDA path's bf16 workspace holds); f32 and f16 ones with W in f32.
#[derive(Clone, Debug)]
pub struct Nf4MatMul {
    weight: Arc<Nf4Tensor>,
    orientation: Orientation,
}

impl Nf4MatMul {
    /// The forward product for `weight` (`[n, k]`).
    pub fn new(weight: Arc<Nf4Tensor>) -> Self {
        Self {
            weight,
            orientation: Orientation::Forward,
        }
    }

    fn transposed(&self) -> Self {
        Self {
            weight: self.weight.clone(),
            orientation: match self.orientation {
                Orientation::Forward => Orientation::Transposed,
                Orientation::Transposed => Orientation::Forward,
            },
        }
    }
}

/// `x · deq(W)ᵀ` for `x` of shape `[.., k]`; differentiable with respect to `x` only.
pub fn nf4_linear(x: &Tensor, weight: &Arc<Nf4Tensor>) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Nf4MatMul::new(weight.clone()))
}

fn to_f32(storage: &CpuStorage, start: usize, end: usize) -> Result<std::borrow::Cow<'_, [f32]>> {
    Ok(match storage {
        CpuStorage::F32(v) => std::borrow::Cow::Borrowed(&v[start..end]),
        CpuStorage::BF16(v) => {
            std::borrow::Cow::Owned(v[start..end].iter().map(|x| x.to_f32()).collect())
        }
        CpuStorage::F16(v) => {
            std::borrow::Cow::Owned(v[start..end].iter().map(|x| x.to_f32()).collect())
        }
        other => candle_core::bail!(
            "nf4-matmul: activations must be f32, bf16 or f16, got {:?}",
            other.dtype()
        ),
    })
}

impl Nf4MatMul {
    /// `(m, output features, output shape)` for an input of `layout`, after checking its last
    /// dimension against the weight; shared by the CPU and CUDA paths.
    fn check_input(&self, layout: &Layout) -> Result<(usize, usize, Shape)> {
        let (n, k) = self.weight.dims2().map_err(candle_core::Error::wrap)?;
        let (inner, outer) = match self.orientation {
            Orientation::Forward => (k, n),
            Orientation::Transposed => (n, k),
        };
        let dims = layout.shape().dims();
        let Some((&last, lead)) = dims.split_last() else {
            candle_core::bail!("{}: input must have at least one dimension", self.name())
        };
        if last != inner {
            candle_core::bail!(
                "{}: input has {last} features in its last dimension, the weight [{n}, {k}] needs {inner}",
                self.name()
            );
        }
        let m: usize = lead.iter().product();
        let mut out_dims = lead.to_vec();
        out_dims.push(outer);
        Ok((m, outer, Shape::from(out_dims)))
    }
}

impl CustomOp1 for Nf4MatMul {
    fn name(&self) -> &'static str {
        match self.orientation {
            Orientation::Forward => "nf4-matmul",
            Orientation::Transposed => "nf4-matmul-t",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, outer, out_shape) = self.check_input(layout)?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: input must be contiguous", self.name())
        };
        let mut y = vec![0f32; m * outer];
        match (storage, self.orientation) {
            // bf16 activations meet W dequantized to bf16, as bitsandbytes computes them.
            (CpuStorage::BF16(v), Orientation::Forward) => {
                cpu::matmul_bf16_into(&v[start..end], m, &self.weight, &mut y)
            }
            (CpuStorage::BF16(v), Orientation::Transposed) => {
                cpu::matmul_t_bf16_into(&v[start..end], m, &self.weight, &mut y)
            }
            (_, Orientation::Forward) => {
                cpu::matmul_into(&to_f32(storage, start, end)?, m, &self.weight, &mut y)
            }
            (_, Orientation::Transposed) => {
                cpu::matmul_t_into(&to_f32(storage, start, end)?, m, &self.weight, &mut y)
            }
        }
        .map_err(candle_core::Error::wrap)?;
        let out = match storage.dtype() {
            DType::BF16 => CpuStorage::BF16(y.iter().map(|&v| bf16::from_f32(v)).collect()),
            DType::F16 => CpuStorage::F16(y.iter().map(|&v| f16::from_f32(v)).collect()),
            _ => CpuStorage::F32(y),
        };
        Ok((out, out_shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, _, out_shape) = self.check_input(layout)?;
        let Some((start, _)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: input must be contiguous", self.name())
        };
        let transposed = self.orientation == Orientation::Transposed;
        let out = crate::cuda::forward(&self.weight, transposed, storage, start, m)?;
        Ok((out, out_shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(self.transposed())?))
    }
}
