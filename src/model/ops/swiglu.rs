//! SwiGLU's elementwise core `silu(gate) · up` (f32) in one parallel pass, with its backward:
//! `d gate = dy · up · σ(g)(1 + g(1 - σ(g)))`, `d up = dy · silu(g)`.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::exp::exp_f32;
use super::{f32_slice, with_f32};

/// Elements per rayon task.
const CHUNK: usize = 16 * 1024;

/// `silu(gate) · up` as a differentiable candle op.
#[derive(Clone, Copy, Debug, Default)]
pub struct SiluMul;

/// `silu(gate) · up` for same-shaped f32 CPU tensors.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-g))
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _timed = crate::profile::part(crate::profile::Part::NormActivation);
        if l1.dims() != l2.dims() {
            candle_core::bail!(
                "silu-mul: gate {:?} and up {:?} differ",
                l1.dims(),
                l2.dims()
            );
        }
        let (g, u) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        let mut y = vec![0f32; g.len()];
        silu_mul_into(g, u, &mut y);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _timed = crate::profile::part(crate::profile::Part::NormActivation);
        let dy = grad_res.contiguous()?;
        let (dg, du) = with_f32(gate, |g| {
            with_f32(up, |u| {
                with_f32(&dy, |d| {
                    let mut dg = vec![0f32; g.len()];
                    let mut du = vec![0f32; g.len()];
                    silu_mul_grad_into(g, u, d, &mut dg, &mut du);
                    Ok((dg, du))
                })
            })
        })?;
        let dev = gate.device();
        Ok((
            Some(Tensor::from_vec(dg, gate.dims(), dev)?),
            Some(Tensor::from_vec(du, up.dims(), dev)?),
        ))
    }
}

/// `y = silu(g) · u`, elementwise over equal-length slices.
pub(crate) fn silu_mul_into(g: &[f32], u: &[f32], y: &mut [f32]) {
    let _timed = crate::profile::part(crate::profile::Part::NormActivation);
    y.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(yc, (gc, uc))| {
            for ((o, &a), &b) in yc.iter_mut().zip(gc).zip(uc) {
                *o = a * sigmoid(a) * b;
            }
        });
}

/// The gradients of `silu(g) · u` for the output gradient `d`.
pub(crate) fn silu_mul_grad_into(g: &[f32], u: &[f32], d: &[f32], dg: &mut [f32], du: &mut [f32]) {
    let _timed = crate::profile::part(crate::profile::Part::NormActivation);
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .zip(d.par_chunks(CHUNK))
        .for_each(|(((dgc, duc), (gc, uc)), dc)| {
            for i in 0..gc.len() {
                let (a, b, e) = (gc[i], uc[i], dc[i]);
                let s = sigmoid(a);
                duc[i] = e * a * s;
                dgc[i] = e * b * s * (1.0 + a * (1.0 - s));
            }
        });
}
