//! Merging every adapter of a model into its weights and taking them out again (task
//! switching, eval on merged weights).

use candle_core::DType;

use crate::lora::embedding::EmbeddingAdapter;
use crate::lora::merge::{merged_weight, unmerge_weight, MergedAdapter};
use crate::lora::LoraAdapter;
use crate::model::error::ModelError;
use crate::model::linear::{BaseWeight, Linear};
use crate::model::transformer::Model;

/// The adapters of a whole model after [`merge_model`], one slot per linear layer in
/// [`crate::model::transformer::Family::linears`] order.
#[derive(Clone, Debug, Default)]
pub struct MergedModel {
    /// One slot per linear layer; `None` where the layer had no adapter.
    pub slots: Vec<Option<MergedAdapter>>,
    /// The token embedding's adapter, if it had one.
    pub embedding: Option<MergedEmbedding>,
    /// The untied head's adapter, if it had one.
    pub head: Option<LoraAdapter>,
}

/// Fold an untied head's adapter into the head.
fn merge_head(model: &mut Model) -> candle_core::Result<Option<LoraAdapter>> {
    let Some((head, slot)) = model.head_adapter_mut() else {
        return Ok(None);
    };
    let Some(adapter) = slot.take() else {
        return Ok(None);
    };
    let dtype = head.dtype();
    let delta = adapter.delta_weight()?.to_device(head.device())?;
    *head = (head.to_dtype(DType::F32)? + delta)?.to_dtype(dtype)?;
    Ok(Some(adapter))
}

/// Take it out again.
fn unmerge_head(
    model: &mut Model,
    adapter: LoraAdapter,
    reattach: bool,
) -> candle_core::Result<()> {
    let Some((head, slot)) = model.head_adapter_mut() else {
        candle_core::bail!("the model has no untied head to unmerge from");
    };
    let dtype = head.dtype();
    let delta = adapter.delta_weight()?.to_device(head.device())?;
    *head = (head.to_dtype(DType::F32)? - delta)?.to_dtype(dtype)?;
    *slot = reattach.then_some(adapter);
    Ok(())
}

/// A token-embedding adapter folded into its table.
#[derive(Clone, Debug)]
pub struct MergedEmbedding {
    /// The adapter.
    pub adapter: EmbeddingAdapter,
    /// The head was tied to the table and got its own copy of the unmerged table, so the
    /// merged model computes what base + adapter computed.
    pub untied: bool,
}

/// Fold the token embedding's adapter into the table (a tied head keeps the table as it was).
fn merge_embedding(model: &mut Model) -> candle_core::Result<Option<MergedEmbedding>> {
    let emb = model.token_embedding_mut();
    let Some(adapter) = emb.adapter.take() else {
        return Ok(None);
    };
    let untied = match emb.head {
        Some(slot) if slot.is_none() => {
            *slot = Some(emb.weight.clone());
            true
        }
        _ => false,
    };
    let delta = adapter.delta_weight()?.to_device(emb.weight.device())?;
    let dtype = emb.weight.dtype();
    *emb.weight = (emb.weight.to_dtype(DType::F32)? + delta)?.to_dtype(dtype)?;
    Ok(Some(MergedEmbedding { adapter, untied }))
}

/// Take a merged embedding adapter out of the table again (re-tying the head).
fn unmerge_embedding(
    model: &mut Model,
    merged: MergedEmbedding,
    reattach: bool,
) -> candle_core::Result<()> {
    let emb = model.token_embedding_mut();
    let delta = merged
        .adapter
        .delta_weight()?
        .to_device(emb.weight.device())?;
    let dtype = emb.weight.dtype();
    *emb.weight = (emb.weight.to_dtype(DType::F32)? - delta)?.to_dtype(dtype)?;
    if merged.untied {
        if let Some(slot) = emb.head {
            *slot = None;
        }
    }
    *emb.adapter = reattach.then_some(merged.adapter);
    Ok(())
}

/// Fold `lin`'s adapter into its weight. The base becomes dense (a 4-bit base is dequantized
/// first; a dense base keeps its dtype) and the adapter is detached and returned. `None` if the
/// layer had no adapter.
pub fn merge_linear(lin: &mut Linear) -> candle_core::Result<Option<MergedAdapter>> {
    let Some(adapter) = lin.adapter.clone() else {
        return Ok(None);
    };
    let (device, dtype) = match &lin.base {
        BaseWeight::Dense(t) => (t.device().clone(), t.dtype()),
        BaseWeight::Quantized(_) => (adapter.a.device().clone(), DType::F32),
    };
    let w0 = lin.base.to_dense_f32(&device)?;
    let (w, row_scale) = merged_weight(&w0, &adapter)?;
    lin.base = BaseWeight::Dense(w.to_dtype(dtype)?);
    lin.set_adapter(None)?;
    Ok(Some(MergedAdapter { adapter, row_scale }))
}

/// Take a merged adapter out of `lin`'s (dense) weight again; with `reattach` it is put back as a
/// separate adapter, otherwise the layer is left bare.
pub fn unmerge_linear(
    lin: &mut Linear,
    merged: MergedAdapter,
    reattach: bool,
) -> candle_core::Result<()> {
    let BaseWeight::Dense(w) = &lin.base else {
        candle_core::bail!("cannot unmerge from a 4-bit base: merging leaves the base dense")
    };
    let dtype = w.dtype();
    let w0 = unmerge_weight(w, &merged.adapter, merged.row_scale.as_ref())?;
    lin.base = BaseWeight::Dense(w0.to_dtype(dtype)?);
    lin.set_adapter(reattach.then_some(merged.adapter))
}

/// Merge every adapter of `model` into its weights (see [`merge_linear`]).
pub fn merge_model(model: &mut Model) -> Result<MergedModel, ModelError> {
    let mut slots = Vec::new();
    for m in model.linears_mut() {
        slots.push(merge_linear(m.linear).map_err(|e| {
            ModelError::invalid(
                format!("{}.weight", m.path),
                format!("cannot merge the adapter: {e}"),
            )
        })?);
    }
    let embedding = merge_embedding(model).map_err(|e| {
        ModelError::invalid(
            model.token_embedding().path,
            format!("cannot merge the embedding adapter: {e}"),
        )
    })?;
    let head = merge_head(model)
        .map_err(|e| ModelError::invalid("lm_head", format!("cannot merge the adapter: {e}")))?;
    Ok(MergedModel {
        slots,
        embedding,
        head,
    })
}

/// Subtract the adapters [`merge_model`] folded in; with `reattach` they become separate
/// adapters again, otherwise the model is left with its original (dense) weights only.
pub fn unmerge_model(
    model: &mut Model,
    merged: MergedModel,
    reattach: bool,
) -> Result<(), ModelError> {
    let mut linears = model.linears_mut();
    if merged.slots.len() != linears.len() {
        return Err(ModelError::invalid(
            "merged adapters",
            format!(
                "recorded for {} linear layers, the model has {}",
                merged.slots.len(),
                linears.len()
            ),
        ));
    }
    for (m, slot) in linears.iter_mut().zip(merged.slots) {
        if let Some(a) = slot {
            unmerge_linear(m.linear, a, reattach).map_err(|e| {
                ModelError::invalid(
                    format!("{}.weight", m.path),
                    format!("cannot unmerge the adapter: {e}"),
                )
            })?;
        }
    }
    drop(linears);
    if let Some(a) = merged.head {
        unmerge_head(model, a, reattach).map_err(|e| {
            ModelError::invalid("lm_head", format!("cannot unmerge the adapter: {e}"))
        })?;
    }
    if let Some(e) = merged.embedding {
        unmerge_embedding(model, e, reattach).map_err(|e| {
            ModelError::invalid(
                model.token_embedding().path,
                format!("cannot unmerge the embedding adapter: {e}"),
            )
        })?;
    }
    Ok(())
}

/// Task switching: take the merged adapters out of `model`, attach the adapters `next` carries
/// (a model with the same architecture whose layers hold the new adapters), and merge those.
pub fn switch_adapters(
    model: &mut Model,
    merged: MergedModel,
    next: &Model,
) -> Result<MergedModel, ModelError> {
    unmerge_model(model, merged, false)?;
    let from = next.linears();
    let mut to = model.linears_mut();
    if from.len() != to.len() {
        return Err(ModelError::invalid(
            "adapter model",
            format!(
                "has {} linear layers, the model has {}",
                from.len(),
                to.len()
            ),
        ));
    }
    for (m, src) in to.iter_mut().zip(&from) {
        m.linear.set_adapter(src.linear.adapter.clone())?;
    }
    drop(to);
    *model.token_embedding_mut().adapter = next.token_embedding().adapter.cloned();
    if let Some((_, slot)) = model.head_adapter_mut() {
        *slot = next.head_adapter().cloned();
    }
    merge_model(model)
}
