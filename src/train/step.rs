//! One training step's math: the causal-LM loss of a batch, and its gradients for the adapters.

use candle_core::{Tensor, Var};

use super::loss::{chunked_cross_entropy, DEFAULT_CHUNK_ROWS, IGNORE_INDEX};
use crate::model::attention::AttentionSpan;
use crate::model::transformer::Model;

/// A batch: token ids `[b, t]` (u32) and labels (`b * t`, [`IGNORE_INDEX`] = not predicted),
/// optionally with packed-document segments `[b, t]` and per-document positions `[b, t]`.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Token ids `[b, t]`.
    pub ids: Tensor,
    /// Labels, row-major `b * t`; label `i` is the token expected at position `i`.
    pub labels: Vec<i64>,
    /// Document index of each token when sequences are packed.
    pub segments: Option<Tensor>,
    /// Position of each token within its document (restarts at 0 per packed document).
    pub positions: Option<Tensor>,
}

impl Batch {
    /// Tokens whose next token is predicted (the loss's denominator).
    pub fn predicted_tokens(&self) -> usize {
        let (b, t) = self.ids.dims2().unwrap_or((0, 0));
        (0..b)
            .flat_map(|r| (1..t).map(move |i| r * t + i))
            .filter(|&i| self.labels.get(i).is_some_and(|&l| l != IGNORE_INDEX))
            .count()
    }

    /// RoPE positions `[b, t]`: the batch's own (packed documents), else `0..t` per row.
    pub fn positions_for(&self, model: &Model) -> candle_core::Result<Tensor> {
        let (b, t) = self.ids.dims2()?;
        match &self.positions {
            Some(p) => Ok(p.clone()),
            None => model.positions(b, t, 0),
        }
    }

    /// Which keys each query may attend to.
    pub fn span(&self) -> AttentionSpan<'_> {
        match &self.segments {
            Some(s) => AttentionSpan::CausalSegments(s),
            None => AttentionSpan::Causal,
        }
    }

    /// Targets of positions `0..t-1` of every row (label `i + 1`), flattened row-major.
    pub fn shifted_targets(&self) -> candle_core::Result<Vec<i64>> {
        let (b, t) = self.ids.dims2()?;
        Ok((0..b)
            .flat_map(|r| (1..t).map(move |i| r * t + i))
            .map(|i| self.labels[i])
            .collect())
    }
}

/// Hidden states `[b, t, h]` without their last position, as `[b * (t - 1), h]` rows that line
/// up with [`Batch::shifted_targets`].
pub fn shifted_rows(h: &Tensor) -> candle_core::Result<Tensor> {
    let (b, t, hidden) = h.dims3()?;
    h.narrow(1, 0, t - 1)?.reshape((b * (t - 1), hidden))
}

/// Mean next-token cross-entropy of `batch` (transformers' causal-LM loss: position `i`
/// predicts label `i + 1`).
pub fn batch_loss(model: &Model, batch: &Batch, train: bool) -> candle_core::Result<Tensor> {
    let pos = batch.positions_for(model)?;
    let h = model.forward_hidden(&batch.ids, &pos, &batch.span(), None, train)?;
    let targets = batch.shifted_targets()?;
    chunked_cross_entropy(
        &shifted_rows(&h)?,
        model.require_lm_head()?,
        &targets,
        DEFAULT_CHUNK_ROWS,
    )
}

/// Mean loss of a batch for validation: no dropout and no autograd graph kept (see
/// [`Llama::forward_hidden_eval`]), so it costs one layer's activations.
pub fn eval_loss(model: &Model, batch: &Batch) -> candle_core::Result<Tensor> {
    let pos = batch.positions_for(model)?;
    let h = model.forward_hidden_eval(&batch.ids, &pos, &batch.span())?;
    let targets = batch.shifted_targets()?;
    chunked_cross_entropy(
        &shifted_rows(&h)?,
        model.require_lm_head()?,
        &targets,
        DEFAULT_CHUNK_ROWS,
    )
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
