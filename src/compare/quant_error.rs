//! How far a 4-bit base is from the full-precision weights it was made from.

use serde::{Deserialize, Serialize};

use crate::model::error::ModelError;
use crate::model::linear::BaseWeight;
use crate::model::transformer::Model;

/// Error of the dequantized 4-bit weights against the full-precision ones, over every
/// quantized linear weight of the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantError {
    /// Linear weights compared.
    pub weights: usize,
    /// Elements compared.
    pub elements: usize,
    /// Mean of |W - deq(W)| over every element.
    pub mean_abs: f64,
    /// Largest |W - deq(W)|.
    pub max_abs: f64,
    /// ||W - deq(W)||_F / ||W||_F over all the weights at once.
    pub rel_frobenius: f64,
}

/// Compare every projection's base of `quantized` (4-bit) with that of `full` (dense); both
/// must be the same model. Sums are taken in f64.
pub fn measure_quant_error(full: &Model, quantized: &Model) -> Result<QuantError, ModelError> {
    let (fl, ql) = (full.linears(), quantized.linears());
    if fl.len() != ql.len() {
        return Err(ModelError::invalid(
            "quantization error",
            format!(
                "the models differ: {} linear layers vs {}",
                fl.len(),
                ql.len()
            ),
        ));
    }
    let (mut weights, mut elements) = (0usize, 0usize);
    let (mut abs_sum, mut max_abs, mut diff_sq, mut ref_sq) = (0f64, 0f64, 0f64, 0f64);
    {
        for (fm, qm) in fl.iter().zip(&ql) {
            let (f, q) = (fm.linear, qm.linear);
            let name = fm.path.clone();
            let (BaseWeight::Dense(_), BaseWeight::Quantized(_)) = (&f.base, &q.base) else {
                return Err(ModelError::invalid(
                    name,
                    "expected a full-precision weight and a 4-bit one to compare",
                ));
            };
            if f.base.shape() != q.base.shape() {
                return Err(ModelError::Shape {
                    name,
                    expected: vec![f.base.shape().0, f.base.shape().1],
                    got: vec![q.base.shape().0, q.base.shape().1],
                });
            }
            let device = candle_core::Device::Cpu;
            let w = f
                .base
                .to_dense_f32(&device)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let d = q
                .base
                .to_dense_f32(&device)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (&a, &b) in w.iter().zip(&d) {
                let e = (f64::from(a) - f64::from(b)).abs();
                abs_sum += e;
                max_abs = max_abs.max(e);
                diff_sq += e * e;
                ref_sq += f64::from(a) * f64::from(a);
            }
            weights += 1;
            elements += w.len();
        }
    }
    if elements == 0 {
        return Err(ModelError::invalid(
            "quantization error",
            "the model has no linear weights",
        ));
    }
    Ok(QuantError {
        weights,
        elements,
        mean_abs: abs_sum / elements as f64,
        max_abs,
        rel_frobenius: (diff_sq / ref_sq.max(f64::MIN_POSITIVE)).sqrt(),
    })
}
