//! The tensors of a loaded model under their HF names, with adapters merged in, produced one
//! at a time in f32 so a writer never needs the whole merged model in memory.

use candle_core::{DType, Device, Tensor};

use crate::lora::merge::merged_weight;
use crate::model::error::ModelError;
use crate::model::transformer::{Model, ParamRef, WeightLayout};

/// One tensor to export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// HF name.
    pub name: String,
    /// Index in the model's [`crate::model::transformer::Family::params`].
    pub index: usize,
    /// HF shape (`[in, out]` for a weight the checkpoint stores that way).
    pub shape: Vec<usize>,
    /// A linear layer's weight (what 4-bit checkpoints quantize).
    pub linear_weight: bool,
    /// How the checkpoint stores it (`[in, out]` for GPT-2's Conv1D weights).
    pub layout: WeightLayout,
}

impl TensorSpec {
    /// True for linear layers' weights (the ones 4-bit checkpoints quantize).
    pub fn is_linear_weight(&self) -> bool {
        self.linear_weight
    }
}

/// Every tensor of `model` in HF checkpoint order.
pub fn tensor_specs(model: &Model) -> Vec<TensorSpec> {
    model
        .checkpoint_params()
        .into_iter()
        .enumerate()
        .map(|(index, (name, p))| {
            let (shape, linear_weight, layout) = match p {
                ParamRef::Dense(t) => (t.dims().to_vec(), false, WeightLayout::OutIn),
                ParamRef::Weight(lin, layout) => {
                    let (o, i) = lin.base.shape();
                    let shape = match layout {
                        WeightLayout::OutIn => vec![o, i],
                        WeightLayout::InOut => vec![i, o],
                    };
                    (shape, true, layout)
                }
                ParamRef::Bias(lin) => (vec![lin.base.shape().0], false, WeightLayout::OutIn),
            };
            TensorSpec {
                name,
                index,
                shape,
                linear_weight,
                layout,
            }
        })
        .collect()
}

/// The tensor `spec` names, in f32 on the CPU; a linear weight with an adapter comes merged
/// (`W0 + s·B·A`, or DoRA's rescaled form) into the base the model holds (dequantized if 4-bit),
/// in the checkpoint's layout.
pub fn read_merged(model: &Model, spec: &TensorSpec) -> Result<Tensor, ModelError> {
    let cpu = Device::Cpu;
    let f32_cpu =
        |t: &Tensor| -> Result<Tensor, ModelError> { Ok(t.to_dtype(DType::F32)?.to_device(&cpu)?) };
    let missing = || ModelError::invalid(spec.name.clone(), "not in the model");
    let params = model.checkpoint_params();
    let (name, param) = params.get(spec.index).ok_or_else(missing)?;
    if *name != spec.name {
        return Err(missing());
    }
    match *param {
        ParamRef::Dense(t) => f32_cpu(t),
        ParamRef::Bias(lin) => f32_cpu(lin.bias.as_ref().ok_or_else(missing)?),
        ParamRef::Weight(lin, layout) => {
            let w0 = lin.base.to_dense_f32(&cpu)?.to_device(&cpu)?;
            let w = match &lin.adapter {
                None => w0,
                Some(adapter) => {
                    let (w, _) = merged_weight(&w0, adapter).map_err(|e| {
                        ModelError::invalid(
                            spec.name.clone(),
                            format!("cannot merge the adapter: {e}"),
                        )
                    })?;
                    w.to_device(&cpu)?
                }
            };
            Ok(match layout {
                WeightLayout::OutIn => w,
                WeightLayout::InOut => w.t()?.contiguous()?,
            })
        }
    }
}

/// Linear layers of `model` that carry an adapter.
pub fn adapted_projections(model: &Model) -> usize {
    model.adapted_linears()
}
