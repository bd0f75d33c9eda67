//! The tensors of a loaded model under their HF names, with adapters merged in, produced one
//! at a time in f32 so a writer never needs the whole merged model in memory.

use candle_core::{DType, Device, Tensor};

use crate::lora::merge::merged_weight;
use crate::model::config::{projection_path, PROJECTIONS};
use crate::model::error::ModelError;
use crate::model::linear::Linear;
use crate::model::llama::Llama;

/// Which tensor of the model a name refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// `model.embed_tokens.weight`.
    Embed,
    /// `model.layers.N.input_layernorm.weight`.
    InputNorm(usize),
    /// `model.layers.N.post_attention_layernorm.weight`.
    PostNorm(usize),
    /// A projection's weight (layer, index in [`PROJECTIONS`]), adapter merged in.
    Weight(usize, usize),
    /// A projection's bias (layer, index in [`PROJECTIONS`]).
    Bias(usize, usize),
    /// `model.norm.weight`.
    Norm,
    /// `lm_head.weight` (absent when tied to the embeddings).
    Head,
}

/// One tensor to export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// HF name.
    pub name: String,
    /// Where it comes from.
    pub slot: Slot,
    /// HF shape.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// True for the seven projection weights of a layer (the ones 4-bit checkpoints quantize).
    pub fn is_linear_weight(&self) -> bool {
        matches!(self.slot, Slot::Weight(..))
    }
}

/// Every tensor of `model` in HF checkpoint order (embeddings, layers, final norm, head).
pub fn tensor_specs(model: &Llama) -> Vec<TensorSpec> {
    let h = model.cfg.hidden_size;
    let mut out = vec![TensorSpec {
        name: "model.embed_tokens.weight".into(),
        slot: Slot::Embed,
        shape: model.embed_tokens.dims().to_vec(),
    }];
    for (li, layer) in model.layers.iter().enumerate() {
        out.push(TensorSpec {
            name: format!("model.layers.{li}.input_layernorm.weight"),
            slot: Slot::InputNorm(li),
            shape: vec![h],
        });
        for (pi, (proj, lin)) in layer.projections().into_iter().enumerate() {
            let (o, i) = lin.base.shape();
            let path = projection_path(li, proj);
            out.push(TensorSpec {
                name: format!("{path}.weight"),
                slot: Slot::Weight(li, pi),
                shape: vec![o, i],
            });
            if lin.bias.is_some() {
                out.push(TensorSpec {
                    name: format!("{path}.bias"),
                    slot: Slot::Bias(li, pi),
                    shape: vec![o],
                });
            }
        }
        out.push(TensorSpec {
            name: format!("model.layers.{li}.post_attention_layernorm.weight"),
            slot: Slot::PostNorm(li),
            shape: vec![h],
        });
    }
    out.push(TensorSpec {
        name: "model.norm.weight".into(),
        slot: Slot::Norm,
        shape: vec![h],
    });
    if let Some(head) = &model.lm_head {
        out.push(TensorSpec {
            name: "lm_head.weight".into(),
            slot: Slot::Head,
            shape: head.dims().to_vec(),
        });
    }
    out
}

fn projection(model: &Llama, li: usize, pi: usize) -> Option<&Linear> {
    let layer = model.layers.get(li)?;
    layer.projections().into_iter().nth(pi).map(|(_, lin)| lin)
}

/// The tensor `spec` names, in f32 on the CPU; a projection with an adapter comes merged
/// (`W0 + s·B·A`, or DoRA's rescaled form) into the base the model holds (dequantized if 4-bit).
pub fn read_merged(model: &Llama, spec: &TensorSpec) -> Result<Tensor, ModelError> {
    let cpu = Device::Cpu;
    let f32_cpu =
        |t: &Tensor| -> Result<Tensor, ModelError> { Ok(t.to_dtype(DType::F32)?.to_device(&cpu)?) };
    let missing = || ModelError::invalid(spec.name.clone(), "not in the model");
    match spec.slot {
        Slot::Embed => f32_cpu(&model.embed_tokens),
        Slot::Norm => f32_cpu(&model.norm),
        Slot::Head => f32_cpu(model.lm_head.as_ref().ok_or_else(missing)?),
        Slot::InputNorm(li) => f32_cpu(&model.layers.get(li).ok_or_else(missing)?.input_layernorm),
        Slot::PostNorm(li) => f32_cpu(
            &model
                .layers
                .get(li)
                .ok_or_else(missing)?
                .post_attention_layernorm,
        ),
        Slot::Bias(li, pi) => {
            let lin = projection(model, li, pi).ok_or_else(missing)?;
            f32_cpu(lin.bias.as_ref().ok_or_else(missing)?)
        }
        Slot::Weight(li, pi) => {
            let lin = projection(model, li, pi).ok_or_else(missing)?;
            let w0 = lin.base.to_dense_f32(&cpu)?.to_device(&cpu)?;
            match &lin.adapter {
                None => Ok(w0),
                Some(adapter) => {
                    let (w, _) = merged_weight(&w0, adapter).map_err(|e| {
                        ModelError::invalid(
                            spec.name.clone(),
                            format!(
                                "cannot merge the adapter of {}: {e}",
                                PROJECTIONS.get(pi).copied().unwrap_or("?")
                            ),
                        )
                    })?;
                    Ok(w.to_device(&cpu)?)
                }
            }
        }
    }
}

/// Projections of `model` that carry an adapter.
pub fn adapted_projections(model: &Llama) -> usize {
    model
        .layers
        .iter()
        .flat_map(|l| l.projections())
        .filter(|(_, lin)| lin.adapter.is_some())
        .count()
}
