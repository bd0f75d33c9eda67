//! Folding an adapter into its layer's weight, and taking it out again.
//!
//! LoRA: `W' = W0 + s·B·A`. DoRA: `W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row`, the row norm taken
//! over the input dimension (PEFT's `merge`). All arithmetic is in f32 whatever the storage
//! dtype, so a merge followed by an unmerge returns `W0` up to f32 rounding (plus the storage
//! dtype's rounding when the base is kept in 16 bits).

use candle_core::{DType, Tensor, D};

use super::adapter::LoraAdapter;

/// An adapter that has been folded into its layer, kept so it can be subtracted again.
#[derive(Clone, Debug)]
pub struct MergedAdapter {
    /// The adapter that was merged.
    pub adapter: LoraAdapter,
    /// DoRA only: the per-row factor `m / ‖W0 + sBA‖` that was applied, `[out]`, f32.
    pub row_scale: Option<Tensor>,
}

/// `W0 + s·B·A` (LoRA) or DoRA's rescaled version, in f32, for a dense `w0` of shape `[out, in]`.
/// Also returns DoRA's per-row factor, which [`unmerge_weight`] needs.
pub fn merged_weight(
    w0: &Tensor,
    adapter: &LoraAdapter,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    let (out, inp) = adapter.shape();
    if w0.dims() != [out, inp] {
        candle_core::bail!(
            "adapter fits a [{out}, {inp}] weight, the base weight is {:?}",
            w0.dims()
        );
    }
    let w0 = w0.to_dtype(DType::F32)?;
    let delta = adapter.delta_weight()?.to_device(w0.device())?;
    let w = (w0 + delta)?;
    match &adapter.magnitude {
        None => Ok((w, None)),
        Some(m) => {
            let norm = w.sqr()?.sum(D::Minus1)?.sqrt()?;
            let scale = m.as_tensor().to_dtype(DType::F32)?.div(&norm)?;
            let merged = w.broadcast_mul(&scale.unsqueeze(1)?)?;
            Ok((merged, Some(scale)))
        }
    }
}

/// Inverse of [`merged_weight`]: `W0 = W' / row_scale - s·B·A`, in f32.
pub fn unmerge_weight(
    w: &Tensor,
    adapter: &LoraAdapter,
    row_scale: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let w = w.to_dtype(DType::F32)?;
    let w = match row_scale {
        Some(s) => w.broadcast_div(&s.unsqueeze(1)?)?,
        None => w,
    };
    let delta = adapter.delta_weight()?.to_device(w.device())?;
    w - delta
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn adapter(out: usize, inp: usize, r: usize, dora: bool) -> LoraAdapter {
        let dev = Device::Cpu;
        let var = |t: Tensor| Var::from_tensor(&t).unwrap();
        LoraAdapter {
            a: var(Tensor::randn(0f32, 0.3, (r, inp), &dev).unwrap()),
            b: var(Tensor::randn(0f32, 0.3, (out, r), &dev).unwrap()),
            scale: 2.0,
            dropout: 0.0,
            magnitude: dora.then(|| var(Tensor::rand(0.5f32, 1.5, out, &dev).unwrap())),
            e: None,
            dropout_key: 0,
            dropout_seed: Default::default(),
        }
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn lora_merge_is_w0_plus_scaled_ba_and_unmerges() {
        let w0 = Tensor::randn(0f32, 1.0, (12, 20), &Device::Cpu).unwrap();
        let a = adapter(12, 20, 4, false);
        let (w, scale) = merged_weight(&w0, &a).unwrap();
        assert!(scale.is_none());
        let ba =
            a.b.as_tensor()
                .matmul(a.a.as_tensor())
                .unwrap()
                .affine(2.0, 0.0)
                .unwrap();
        assert!(max_abs(&w, &(w0.clone() + ba).unwrap()) < 1e-6);
        let back = unmerge_weight(&w, &a, None).unwrap();
        assert!(max_abs(&back, &w0) < 1e-5);
    }

    #[test]
    fn dora_merge_has_row_norms_m_and_unmerges() {
        let w0 = Tensor::randn(0f32, 1.0, (12, 20), &Device::Cpu).unwrap();
        let a = adapter(12, 20, 4, true);
        let (w, scale) = merged_weight(&w0, &a).unwrap();
        let norms = w.sqr().unwrap().sum(D::Minus1).unwrap().sqrt().unwrap();
        let m = a.magnitude.as_ref().unwrap().as_tensor();
        assert!(max_abs(&norms, m) < 1e-5, "rows of W' have norm m");
        let back = unmerge_weight(&w, &a, scale.as_ref()).unwrap();
        assert!(max_abs(&back, &w0) < 1e-5);
    }

    #[test]
    fn wrong_shape_is_refused_with_both_shapes() {
        let w0 = Tensor::zeros((12, 21), DType::F32, &Device::Cpu).unwrap();
        let err = merged_weight(&w0, &adapter(12, 20, 4, false))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[12, 20]") && err.contains("[12, 21]"),
            "{err}"
        );
    }
}
