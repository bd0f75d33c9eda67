//! Evaluation: mean token negative log-likelihood and perplexity over a dataset.

use candle_core::Tensor;

use crate::train::loss::{dense_cross_entropy, summed_nll};
use serde::Serialize;

use crate::model::error::ModelError;
use crate::model::transformer::Model;

/// Result of an evaluation.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EvalReport {
    /// Mean negative log-likelihood per predicted token (nats).
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub perplexity: f64,
    /// Predicted tokens counted.
    pub tokens: usize,
    /// Windows run through the model.
    pub windows: usize,
}

/// Rows of logits computed at once: bounds the `[rows, vocab]` f32 buffer.
const LOGIT_ROWS: usize = 256;

/// Split each sequence into windows of at most `seq_len` tokens (non-overlapping; each window
/// predicts its own tokens after the first).
pub fn windows(seqs: &[Vec<u32>], seq_len: usize) -> Vec<Vec<u32>> {
    seqs.iter()
        .flat_map(|s| s.chunks(seq_len.max(2)))
        .filter(|w| w.len() >= 2)
        .map(|w| w.to_vec())
        .collect()
}

/// Summed NLL and count of the next-token predictions in `ids` (`[1, t]`), logits in chunks.
pub fn sequence_nll(model: &Model, ids: &[u32]) -> Result<(f64, usize), ModelError> {
    let t = ids.len();
    let x = Tensor::from_vec(ids.to_vec(), (1, t), model.device())?;
    let pos = model.positions(1, t, 0)?;
    let hidden =
        model.forward_hidden_eval(&x, &pos, &crate::model::attention::AttentionSpan::Causal)?;
    let hidden = hidden.squeeze(0)?.narrow(0, 0, t - 1)?;
    let targets: Vec<i64> = ids[1..].iter().map(|&i| i as i64).collect();
    let total = if model.head_adapter().is_some() {
        let mean = dense_cross_entropy(&model.head_logits(&hidden, false)?, &targets)?;
        mean.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? * targets.len() as f64
    } else {
        summed_nll(&hidden, model.require_lm_head()?, &targets, LOGIT_ROWS)?
    };
    Ok((total, t - 1))
}

/// Mean NLL and perplexity of `model` over `seqs`, cut into `seq_len` windows; `progress` is
/// called after each window with (done, total).
pub fn evaluate(
    model: &Model,
    seqs: &[Vec<u32>],
    seq_len: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<EvalReport, ModelError> {
    let wins = windows(seqs, seq_len);
    if wins.is_empty() {
        return Err(ModelError::invalid(
            "eval data",
            "no window has two or more tokens to predict from",
        ));
    }
    let (mut nll, mut count) = (0f64, 0usize);
    for (i, w) in wins.iter().enumerate() {
        let (s, n) = sequence_nll(model, w)?;
        nll += s;
        count += n;
        progress(i + 1, wins.len());
    }
    let mean_nll = nll / count as f64;
    Ok(EvalReport {
        mean_nll,
        perplexity: mean_nll.exp(),
        tokens: count,
        windows: wins.len(),
    })
}
