//! RMSNorm `y = x / sqrt(mean(x²) + eps) · w` over the last dimension (f32), rows in parallel,
//! with its backward `dx = r·(w∘dy) - x·r³·mean(x∘w∘dy)`, `r = 1/sqrt(mean(x²) + eps)`. The
//! weight is frozen (norm weights are not trained), so it gets no gradient.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::f32_slice;

/// Rows per rayon task.
const ROWS_PER_TASK: usize = 16;

/// RMSNorm with a frozen weight, as a differentiable candle op.
#[derive(Clone, Debug)]
pub struct FusedRmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl FusedRmsNorm {
    /// For `weight` `[hidden]` and `eps`.
    pub fn new(weight: &Tensor, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: weight
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?,
            eps: eps as f32,
        })
    }

    /// `x` `[.., hidden]` (f32, CPU) normalized.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1(self.clone())
    }

    fn inv_rms(&self, row: &[f32]) -> f32 {
        let ss: f32 = row.iter().map(|v| v * v).sum();
        1.0 / (ss / row.len() as f32 + self.eps).sqrt()
    }

    fn check(&self, layout: &Layout) -> Result<()> {
        if layout.dims().last() != Some(&self.weight.len()) {
            candle_core::bail!(
                "rms-norm: input {:?} does not end in the weight's {}",
                layout.dims(),
                self.weight.len()
            );
        }
        Ok(())
    }
}

impl CustomOp1 for FusedRmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let _timed = crate::profile::part(crate::profile::Part::NormActivation);
        self.check(layout)?;
        let x = f32_slice(storage, layout)?;
        let mut y = vec![0f32; x.len()];
        self.forward_rows(x, &mut y);
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let _timed = crate::profile::part(crate::profile::Part::NormActivation);
        let g = grad_res.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(&g, &RmsNormGrad(self.clone()))?))
    }
}

/// `dx` from `(x, dy)` (an op only so it can read both storages without copies).
struct RmsNormGrad(FusedRmsNorm);

impl CustomOp2 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "fused-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _timed = crate::profile::part(crate::profile::Part::NormActivation);
        let op = &self.0;
        op.check(l1)?;
        if l1.dims() != l2.dims() {
            candle_core::bail!(
                "rms-norm: gradient {:?} for input {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let (x, dy) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        let mut dx = vec![0f32; x.len()];
        op.backward_rows(x, dy, &mut dx);
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

impl FusedRmsNorm {
    /// `y` = the normalized rows of `x` (both `[rows, hidden]` row-major).
    pub(crate) fn forward_rows(&self, x: &[f32], y: &mut [f32]) {
        let _timed = crate::profile::part(crate::profile::Part::NormActivation);
        let n = self.weight.len();
        y.par_chunks_mut(n * ROWS_PER_TASK)
            .zip(x.par_chunks(n * ROWS_PER_TASK))
            .for_each(|(yc, xc)| {
                for (yr, xr) in yc.chunks_exact_mut(n).zip(xc.chunks_exact(n)) {
                    let r = self.inv_rms(xr);
                    for ((o, &v), &w) in yr.iter_mut().zip(xr).zip(&self.weight) {
                        *o = v * r * w;
                    }
                }
            });
    }

    /// `dx` of the rows of `x` for the output gradient `dy`.
    pub(crate) fn backward_rows(&self, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        let _timed = crate::profile::part(crate::profile::Part::NormActivation);
        let op = self;
        let n = op.weight.len();
        let chunk = n * ROWS_PER_TASK;
        dx.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
            .for_each(|(dc, (xc, gc))| {
                for ((dr, xr), gr) in dc
                    .chunks_exact_mut(n)
                    .zip(xc.chunks_exact(n))
                    .zip(gc.chunks_exact(n))
                {
                    let r = op.inv_rms(xr);
                    let dot: f32 = xr
                        .iter()
                        .zip(gr)
                        .zip(&op.weight)
                        .map(|((&a, &b), &w)| a * b * w)
                        .sum();
                    let c = dot * r * r * r / n as f32;
                    for (((o, &a), &b), &w) in dr.iter_mut().zip(xr).zip(gr).zip(&op.weight) {
                        *o = r * w * b - a * c;
                    }
                }
            });
    }
}

/// RMSNorm of `x` (f32, CPU) with the frozen `weight`, differentiable with respect to `x`.
pub fn rms_norm_fused(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    FusedRmsNorm::new(weight, eps)?.forward(x)
}
