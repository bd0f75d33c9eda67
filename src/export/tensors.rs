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
    /// What an adapter on the token embedding does to this tensor.
    pub embedding: EmbeddingRole,
}

/// A tensor's part in merging a token-embedding adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbeddingRole {
    /// Not the token embedding.
    None,
    /// The token embedding, its adapter merged in.
    Merged,
    /// The head of a model whose head is tied to the embedding: the embedding as it was, so
    /// the merged model computes what base + adapter computed (PEFT's `merge_and_unload`
    /// changes a tied head with the embedding; its unmerged model does not).
    UntiedHead,
    /// An untied head with its own adapter merged in.
    HeadMerged,
}

impl TensorSpec {
    /// True for linear layers' weights (the ones 4-bit checkpoints quantize).
    pub fn is_linear_weight(&self) -> bool {
        self.linear_weight
    }
}

/// Every tensor of `model` in HF checkpoint order.
pub fn tensor_specs(model: &Model) -> Vec<TensorSpec> {
    let emb = model.token_embedding();
    let emb_name = format!("{}.weight", emb.path);
    let adapted = emb.adapter.is_some();
    let mut specs: Vec<TensorSpec> = model
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
            let embedding = if adapted && name == emb_name {
                EmbeddingRole::Merged
            } else if name == "lm_head.weight" && model.head_adapter().is_some() {
                EmbeddingRole::HeadMerged
            } else {
                EmbeddingRole::None
            };
            TensorSpec {
                name,
                index,
                shape,
                linear_weight,
                layout,
                embedding,
            }
        })
        .collect();
    if adapted && emb.tied_head {
        if let Some(table) = specs.iter().find(|s| s.embedding == EmbeddingRole::Merged) {
            specs.push(TensorSpec {
                name: "lm_head.weight".into(),
                embedding: EmbeddingRole::UntiedHead,
                ..table.clone()
            });
        }
    }
    specs
}

/// Whether the export writes the head apart from a tied embedding (see
/// [`EmbeddingRole::UntiedHead`]); its config must then say `tie_word_embeddings: false`.
pub fn unties_head(model: &Model) -> bool {
    let emb = model.token_embedding();
    emb.adapter.is_some() && emb.tied_head
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
    if *name != spec.name && spec.embedding != EmbeddingRole::UntiedHead {
        return Err(missing());
    }
    match *param {
        ParamRef::Dense(t) if spec.embedding == EmbeddingRole::Merged => {
            let adapter = model.token_embedding().adapter.ok_or_else(missing)?;
            Ok((f32_cpu(t)? + adapter.delta_weight()?.to_device(&cpu)?)?)
        }
        ParamRef::Dense(t) if spec.embedding == EmbeddingRole::HeadMerged => {
            let adapter = model.head_adapter().ok_or_else(missing)?;
            Ok((f32_cpu(t)? + adapter.delta_weight()?.to_device(&cpu)?)?)
        }
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

/// Linear layers (and the token embedding) of `model` that carry an adapter.
pub fn adapted_projections(model: &Model) -> usize {
    model.adapted_linears()
        + usize::from(model.token_embedding().adapter.is_some())
        + usize::from(model.head_adapter().is_some())
}
