//! Evaluation: mean token negative log-likelihood and perplexity over a dataset.

use candle_core::Tensor;

use crate::data::dataset::TokenSequence;
use crate::train::loss::{dense_cross_entropy, summed_nll, IGNORE_INDEX};
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

/// Split each sequence (and its labels) into windows of at most `seq_len` tokens
/// (non-overlapping; each window predicts its own tokens after the first); windows with nothing
/// to score are left out.
pub fn windows(seqs: &[TokenSequence], seq_len: usize) -> Vec<TokenSequence> {
    let n = seq_len.max(2);
    let mut out = Vec::new();
    for s in seqs {
        for (i, ids) in s.ids.chunks(n).enumerate() {
            let labels = s
                .labels
                .as_ref()
                .map(|l| l[i * n..(i * n + ids.len()).min(l.len())].to_vec());
            let scored = match &labels {
                Some(l) => l.iter().skip(1).any(|&x| x != IGNORE_INDEX),
                None => ids.len() >= 2,
            };
            if scored {
                out.push(TokenSequence {
                    ids: ids.to_vec(),
                    labels,
                });
            }
        }
    }
    out
}

/// Summed NLL and count of the scored next-token predictions in `ids` (`[1, t]`): the next ids,
/// or `labels[1..]` where given (`-100` not scored), logits in chunks.
pub fn sequence_nll(
    model: &Model,
    ids: &[u32],
    labels: Option<&[i64]>,
) -> Result<(f64, usize), ModelError> {
    let t = ids.len();
    let x = Tensor::from_vec(ids.to_vec(), (1, t), model.device())?;
    let pos = model.positions(1, t, 0)?;
    let hidden =
        model.forward_hidden_eval(&x, &pos, &crate::model::attention::AttentionSpan::Causal)?;
    let hidden = hidden.squeeze(0)?.narrow(0, 0, t - 1)?;
    let targets: Vec<i64> = match labels {
        Some(l) if l.len() == t => l[1..].to_vec(),
        Some(l) => {
            return Err(ModelError::invalid(
                "eval data",
                format!(
                    "{} labels for {t} tokens; they must be the same length",
                    l.len()
                ),
            ))
        }
        None => ids[1..].iter().map(|&i| i as i64).collect(),
    };
    let scored = targets.iter().filter(|&&x| x != IGNORE_INDEX).count();
    let total = if model.head_adapter().is_some() {
        let mean = dense_cross_entropy(&model.head_logits(&hidden, false)?, &targets)?;
        mean.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? * scored as f64
    } else {
        summed_nll(&hidden, model.require_lm_head()?, &targets, LOGIT_ROWS)?
    };
    Ok((total, scored))
}

/// Mean NLL and perplexity of `model` over `seqs`, cut into `seq_len` windows; `progress` is
/// called after each window with (done, total).
pub fn evaluate(
    model: &Model,
    seqs: &[TokenSequence],
    seq_len: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<EvalReport, ModelError> {
    let wins = windows(seqs, seq_len);
    if wins.is_empty() {
        return Err(ModelError::invalid(
            "eval data",
            "no window has a token to score (two or more tokens, and labels other than -100)",
        ));
    }
    let (mut nll, mut count) = (0f64, 0usize);
    for (i, w) in wins.iter().enumerate() {
        let (s, n) = sequence_nll(model, &w.ids, w.labels.as_deref())?;
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
