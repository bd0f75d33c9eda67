//! Initialising new adapters: PEFT's Kaiming-uniform, Gaussian, and PiSSA (SVD of the base).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use faer::Mat;
use qlora_quant::Nf4Tensor;
use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Distribution, Normal};

use super::adapter::LoraAdapter;
use super::config::{LoraConfig, LoraInit};
use super::LoraError;
use crate::frozen::BaseWeight;

/// Create a new adapter for a layer whose frozen weight is `base` (for PiSSA, `base` is
/// replaced by the residual).
pub fn init_adapter(
    cfg: &LoraConfig,
    base: &mut BaseWeight,
    rng: &mut StdRng,
    device: &Device,
) -> Result<LoraAdapter, LoraError> {
    let (out, inp) = base.shape();
    let r = cfg.rank;
    if r > out.min(inp) {
        return Err(LoraError::invalid(
            "rank",
            format!("rank {r} is larger than the layer ({out} x {inp})"),
        ));
    }
    if cfg.adalora.is_some() {
        return adalora_adapter(cfg, (out, inp), rng, device);
    }
    let (a, b) = match cfg.init {
        LoraInit::Kaiming => {
            // kaiming_uniform_(a=√5) on [r, in] has bound gain·√(3/fan_in) = 1/√in.
            let bound = 1.0 / (inp as f32).sqrt();
            let a: Vec<f32> = (0..r * inp)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            (a, vec![0f32; out * r])
        }
        LoraInit::Gaussian => {
            let normal = Normal::new(0.0f32, 1.0 / r as f32)
                .map_err(|e| LoraError::invalid("gaussian init", e.to_string()))?;
            let a: Vec<f32> = (0..r * inp).map(|_| normal.sample(rng)).collect();
            (a, vec![0f32; out * r])
        }
        LoraInit::Pissa => pissa(cfg, base, device)?,
    };
    let to_var = |v: Vec<f32>, shape: (usize, usize)| -> Result<Var, LoraError> {
        Ok(Var::from_tensor(
            &Tensor::from_vec(v, shape, device)?.to_dtype(cfg.dtype)?,
        )?)
    };
    let mut adapter = LoraAdapter {
        a: to_var(a, (r, inp))?,
        b: to_var(b, (out, r))?,
        scale: cfg.scale(),
        dropout: cfg.dropout,
        magnitude: None,
        e: None,
        dropout_key: 0,
        dropout_seed: Default::default(),
    };
    if cfg.use_dora {
        // m starts at ‖W0 + sBA‖ per row, so the layer's output is unchanged at step 0.
        let row_sq = base.row_sq_norms()?;
        let a_w0t = base.matmul_t(&adapter.a.as_tensor().to_dtype(DType::F32)?)?;
        let norms = adapter.weight_row_norms(&row_sq, &a_w0t)?;
        adapter.magnitude = Some(Var::from_tensor(&norms.to_dtype(cfg.dtype)?)?);
    }
    Ok(adapter)
}

/// AdaLoRA's start (PEFT's `reset_lora_parameters`): A and B `N(0, 0.02)`, E zero, so the
/// layer is unchanged at step 0.
fn adalora_adapter(
    cfg: &LoraConfig,
    (out, inp): (usize, usize),
    rng: &mut StdRng,
    device: &Device,
) -> Result<LoraAdapter, LoraError> {
    if cfg.use_dora {
        return Err(LoraError::invalid(
            "AdaLoRA",
            "DoRA adapters cannot be AdaLoRA's",
        ));
    }
    let r = cfg.rank;
    let normal =
        Normal::new(0.0f32, 0.02).map_err(|e| LoraError::invalid("AdaLoRA init", e.to_string()))?;
    let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| normal.sample(rng)).collect() };
    let to_var = |v: Vec<f32>, shape: (usize, usize)| -> Result<Var, LoraError> {
        Ok(Var::from_tensor(
            &Tensor::from_vec(v, shape, device)?.to_dtype(cfg.dtype)?,
        )?)
    };
    Ok(LoraAdapter {
        a: to_var(draw(r * inp), (r, inp))?,
        b: to_var(draw(out * r), (out, r))?,
        e: Some(to_var(vec![0f32; r], (r, 1))?),
        scale: cfg.scale(),
        dropout: cfg.dropout,
        magnitude: None,
        dropout_key: 0,
        dropout_seed: Default::default(),
    })
}

/// PiSSA: `W = U S Vᵀ`; `A = √S_r V_rᵀ / √s`, `B = U_r √S_r / √s`; the base becomes
/// `W - s·B·A` (re-quantized with the same format when the base is 4-bit).
fn pissa(
    cfg: &LoraConfig,
    base: &mut BaseWeight,
    device: &Device,
) -> Result<(Vec<f32>, Vec<f32>), LoraError> {
    let (out, inp) = base.shape();
    let r = cfg.rank;
    let w = base
        .to_dense_f32(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let m = Mat::<f32>::from_fn(out, inp, |i, j| w[i * inp + j]);
    let svd = m
        .thin_svd()
        .map_err(|e| LoraError::invalid("PiSSA", format!("SVD did not converge: {e:?}")))?;
    let (u, s, v) = (svd.U(), svd.S(), svd.V());
    let scale = cfg.scale() as f32;
    let root: Vec<f32> = (0..r).map(|k| (s[k] / scale).max(0.0).sqrt()).collect();
    let a: Vec<f32> = (0..r)
        .flat_map(|k| (0..inp).map(move |j| (k, j)))
        .map(|(k, j)| root[k] * v[(j, k)])
        .collect();
    let b: Vec<f32> = (0..out)
        .flat_map(|i| (0..r).map(move |k| (i, k)))
        .map(|(i, k)| u[(i, k)] * root[k])
        .collect();
    let mut residual = w;
    for i in 0..out {
        for k in 0..r {
            let bik = scale * b[i * r + k];
            let row = &mut residual[i * inp..(i + 1) * inp];
            for (x, &akj) in row.iter_mut().zip(&a[k * inp..(k + 1) * inp]) {
                *x -= bik * akj;
            }
        }
    }
    *base = match &*base {
        BaseWeight::Quantized(q) => BaseWeight::Quantized(Arc::new(
            Nf4Tensor::quantize(
                &residual,
                &[out, inp],
                q.source_dtype(),
                q.qtype(),
                q.blocksize(),
                matches!(q.absmax(), qlora_quant::Absmax::Double(_)),
            )
            .map_err(LoraError::Quant)?,
        )),
        BaseWeight::Dense(t) => {
            BaseWeight::Dense(Tensor::from_vec(residual, (out, inp), device)?.to_dtype(t.dtype())?)
        }
    };
    Ok((a, b))
}
