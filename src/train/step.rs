//! One training step's math: the causal-LM loss of a batch, and its gradients for the adapters.

use candle_core::{Tensor, Var};

use super::loss::{chunked_cross_entropy, DEFAULT_CHUNK_ROWS, IGNORE_INDEX};
use crate::model::llama::{AttentionSpan, Llama};

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
}

/// Mean next-token cross-entropy of `batch` (transformers' causal-LM loss: position `i`
/// predicts label `i + 1`).
pub fn batch_loss(model: &Llama, batch: &Batch, train: bool) -> candle_core::Result<Tensor> {
    let (b, t) = batch.ids.dims2()?;
    let pos = match &batch.positions {
        Some(p) => p.clone(),
        None => model.positions(b, t, 0)?,
    };
    let span = match &batch.segments {
        Some(s) => AttentionSpan::CausalSegments(s),
        None => AttentionSpan::Causal,
    };
    let h = model.forward_hidden(&batch.ids, &pos, &span, None, train)?;
    let hidden = h.dim(2)?;
    let h = h.narrow(1, 0, t - 1)?.reshape((b * (t - 1), hidden))?;
    let targets: Vec<i64> = (0..b)
        .flat_map(|r| (1..t).map(move |i| r * t + i))
        .map(|i| batch.labels[i])
        .collect();
    chunked_cross_entropy(&h, model.head(), &targets, DEFAULT_CHUNK_ROWS)
}

/// Loss and the gradient of each of `vars` (`None` where the loss does not depend on it).
pub fn loss_and_grads(
    model: &Llama,
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
