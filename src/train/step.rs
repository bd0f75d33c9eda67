//! One training step's math: the causal-LM loss of a batch, and its gradients for the adapters.

use candle_core::{Tensor, Var};

use super::loss::{
    chunked_cross_entropy, classification_loss, dense_cross_entropy, DEFAULT_CHUNK_ROWS,
};
pub use crate::data::batch::{Batch, ClassTargets};
use crate::model::attention::AttentionSpan;
use crate::model::transformer::Model;

/// What a batch means to a model (its positions and attention span); the batch itself is the
/// data pipeline's ([`crate::data::batch`]).
impl Batch {
    /// RoPE positions `[b, t]`: the batch's own (packed documents), else `0..t` per row.
    pub fn positions_for(&self, model: &Model) -> candle_core::Result<Tensor> {
        let (b, t) = self.ids.dims2()?;
        match &self.positions {
            Some(p) => Ok(p.clone()),
            None => model.positions(b, t, 0),
        }
    }

    /// Which keys each query of `model` may attend to: a classification batch's real tokens
    /// (both ways for encoders), else [`Batch::span`].
    pub fn span_for<'a>(&'a self, model: &Model) -> AttentionSpan<'a> {
        match &self.classes {
            Some(c) => model.padded_span(&c.keys),
            None => self.span(),
        }
    }

    /// Which keys each query may attend to.
    pub fn span(&self) -> AttentionSpan<'_> {
        match &self.segments {
            Some(s) => AttentionSpan::CausalSegments(s),
            None => AttentionSpan::Causal,
        }
    }
}

/// Hidden states `[b, t, h]` without their last position, as `[b * (t - 1), h]` rows that line
/// up with [`Batch::shifted_targets`].
pub fn shifted_rows(h: &Tensor) -> candle_core::Result<Tensor> {
    let (b, t, hidden) = h.dims3()?;
    h.narrow(1, 0, t - 1)?.reshape((b * (t - 1), hidden))
}

/// The loss of `batch` from the model's final hidden states `h` (after
/// [`crate::model::transformer::Family::finish`]): mean next-token cross-entropy (transformers'
/// causal-LM loss: position `i` predicts label `i + 1`), or for a classification batch the
/// classifier's loss on the pooled sequences.
pub fn head_loss(
    model: &Model,
    h: &Tensor,
    batch: &Batch,
    train: bool,
) -> candle_core::Result<Tensor> {
    match &batch.classes {
        Some(c) => {
            let head = model.classifier().ok_or_else(|| {
                candle_core::Error::Msg("a classification batch needs a classification head".into())
            })?;
            let logits = head.logits(&model.pool(h, &batch.ids, train)?, train)?;
            classification_loss(&logits, &c.targets, head.config.regression)
        }
        // A head with an adapter: its logits, then the loss, as a plain graph.
        None if model.head_adapter().is_some() => dense_cross_entropy(
            &model.head_logits(&shifted_rows(h)?, train)?,
            &batch.shifted_targets()?,
        ),
        None => chunked_cross_entropy(
            &shifted_rows(h)?,
            model.require_lm_head()?,
            &batch.shifted_targets()?,
            DEFAULT_CHUNK_ROWS,
        ),
    }
}

/// The mean loss of `batch` (see [`head_loss`]).
pub fn batch_loss(model: &Model, batch: &Batch, train: bool) -> candle_core::Result<Tensor> {
    let pos = batch.positions_for(model)?;
    let h = model.forward_hidden(&batch.ids, &pos, &batch.span_for(model), None, train)?;
    head_loss(model, &h, batch, train)
}

/// Mean loss of a batch for validation: no dropout and no autograd graph kept (see
/// [`Model::forward_hidden_eval`]), so it costs one layer's activations.
pub fn eval_loss(model: &Model, batch: &Batch) -> candle_core::Result<Tensor> {
    let pos = batch.positions_for(model)?;
    let h = model.forward_hidden_eval(&batch.ids, &pos, &batch.span_for(model))?;
    head_loss(model, &h, batch, false)
}

/// Loss and the gradient of each of `vars` (`None` where the loss does not depend on it).
pub fn loss_and_grads(
    model: &Model,
    batch: &Batch,
    vars: &[Var],
    train: bool,
) -> candle_core::Result<(f64, Vec<Option<Tensor>>)> {
    let loss = batch_loss(model, batch, train)?;
    let grads = loss.backward()?;
    let g = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).cloned())
        .collect();
    Ok((
        loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?,
        g,
    ))
}
