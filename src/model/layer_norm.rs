//! LayerNorm (GPT-2, BERT): `(x − mean) / sqrt(var + eps) · w + b` over the last dimension,
//! computed in f32 as torch does for lower-precision inputs, result in the input dtype.

use candle_core::{DType, Result, Tensor, D};

/// A LayerNorm's weight, bias and epsilon.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// Scale `[hidden]`.
    pub weight: Tensor,
    /// Shift `[hidden]`.
    pub bias: Tensor,
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// Normalize `x` `[.., hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let centered = x32.broadcast_sub(&x32.mean_keepdim(D::Minus1)?)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight.to_dtype(DType::F32)?)?
            .broadcast_add(&self.bias.to_dtype(DType::F32)?)?
            .to_dtype(dt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_nn_layer_norm() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (3, 5, 16), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 16, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, 16, &dev).unwrap();
        let ours = LayerNorm {
            weight: w.clone(),
            bias: b.clone(),
            eps: 1e-5,
        }
        .forward(&x)
        .unwrap();
        let theirs = candle_nn::ops::layer_norm_slow(&x, &w, &b, 1e-5).unwrap();
        let d = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
    }
}
