//! Classifying sequences with a model's classification head, and the metrics of a labelled set:
//! mean cross-entropy, accuracy, macro-F1 and the confusion matrix (regression heads: the mean
//! squared error).

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::data::example::Example;
use crate::model::error::ModelError;
use crate::model::transformer::Model;

/// Logits `[num_labels]` (f32) of each example, `batch_size` at a time, each batch padded with
/// `pad_id` to its longest sequence; `progress(done, total)` after each batch.
pub fn predict(
    model: &Model,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Vec<f32>>, ModelError> {
    let mut out = Vec::with_capacity(examples.len());
    let device = model.device().clone();
    for chunk in examples.chunks(batch_size.max(1)) {
        let t = chunk.iter().map(Example::len).max().unwrap_or(0);
        let (mut ids, mut keys) = (Vec::new(), Vec::new());
        for e in chunk {
            ids.extend(e.ids.iter().copied());
            ids.extend(std::iter::repeat_n(pad_id, t - e.len()));
            keys.extend(std::iter::repeat_n(1u32, e.len()));
            keys.extend(std::iter::repeat_n(0u32, t - e.len()));
        }
        let b = chunk.len();
        let ids = Tensor::from_vec(ids, (b, t), &device)?;
        let keys = Tensor::from_vec(keys, (b, t), &device)?;
        let logits = model.classify(&ids, &keys, None, false)?;
        out.extend(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?);
        progress(out.len(), examples.len());
    }
    Ok(out)
}

/// Softmax of one row of logits.
pub fn probabilities(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = logits.iter().map(|&x| f64::from(x - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|&x| (x / sum) as f32).collect()
}

/// Index of the largest logit (the first of ties).
pub fn argmax(logits: &[f32]) -> usize {
    logits
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// How a classifier did on a labelled set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassMetrics {
    /// Mean cross-entropy (regression: mean squared error).
    pub loss: f64,
    /// Share of examples whose most likely class is their label (`None` for regression).
    pub accuracy: Option<f64>,
    /// Mean over classes of F1 (a class with no example and no prediction counts as 0, as
    /// scikit-learn's `f1_score(average="macro", zero_division=0)`).
    pub macro_f1: Option<f64>,
    /// Examples.
    pub examples: usize,
    /// `confusion[label][predicted]` counts.
    pub confusion: Vec<Vec<usize>>,
}

/// Metrics of `logits` against `targets` (class indices, or values for a regression head).
pub fn metrics(logits: &[Vec<f32>], targets: &[f32], regression: bool) -> ClassMetrics {
    let n = logits.first().map_or(0, Vec::len);
    if regression {
        let mse = logits
            .iter()
            .zip(targets)
            .map(|(l, &t)| f64::from(l[0] - t).powi(2))
            .sum::<f64>()
            / targets.len().max(1) as f64;
        return ClassMetrics {
            loss: mse,
            accuracy: None,
            macro_f1: None,
            examples: targets.len(),
            confusion: Vec::new(),
        };
    }
    let mut confusion = vec![vec![0usize; n]; n];
    let mut nll = 0f64;
    for (l, &t) in logits.iter().zip(targets) {
        let t = t as usize;
        let p = probabilities(l);
        nll -= f64::from(p[t].max(f32::MIN_POSITIVE)).ln();
        confusion[t][argmax(l)] += 1;
    }
    let total = targets.len().max(1) as f64;
    let correct: usize = (0..n).map(|k| confusion[k][k]).sum();
    let f1: f64 = (0..n)
        .map(|k| {
            let tp = confusion[k][k] as f64;
            let predicted: usize = (0..n).map(|r| confusion[r][k]).sum();
            let actual: usize = confusion[k].iter().sum();
            if predicted + actual == 0 {
                0.0
            } else {
                2.0 * tp / (predicted + actual) as f64
            }
        })
        .sum::<f64>()
        / n.max(1) as f64;
    ClassMetrics {
        loss: nll / total,
        accuracy: Some(correct as f64 / total),
        macro_f1: Some(f1),
        examples: targets.len(),
        confusion,
    }
}

/// The confusion matrix as a text table, rows the true labels.
pub fn confusion_table(m: &ClassMetrics, names: &[String]) -> String {
    let w = names.iter().map(|n| n.len()).max().unwrap_or(4).max(6);
    let mut s = format!("{:>w$}  predicted →\n{:>w$}", "true ↓", "");
    for n in names {
        s.push_str(&format!(" {n:>w$}"));
    }
    s.push('\n');
    for (row, n) in m.confusion.iter().zip(names) {
        s.push_str(&format!("{n:>w$}"));
        for c in row {
            s.push_str(&format!(" {c:>w$}"));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_count_like_scikit_learn() {
        // Labels 0,0,1,2 predicted 0,1,1,1: accuracy 1/2; F1 = 2·tp / (predicted + actual):
        // class 0 = 2/3, class 1 = 2/4, class 2 = 0 -> macro 7/18.
        let logits = vec![
            vec![2.0, 0.0, 0.0],
            vec![0.0, 1.0, 0.0],
            vec![0.0, 3.0, 0.0],
            vec![0.0, 1.0, 0.5],
        ];
        let m = metrics(&logits, &[0.0, 0.0, 1.0, 2.0], false);
        assert_eq!(m.accuracy, Some(0.5));
        assert!((m.macro_f1.unwrap() - 7.0 / 18.0).abs() < 1e-12);
        assert_eq!(
            m.confusion,
            vec![vec![1, 1, 0], vec![0, 1, 0], vec![0, 1, 0]]
        );
        let want_nll = -(probabilities(&logits[0])[0].ln()
            + probabilities(&logits[1])[0].ln()
            + probabilities(&logits[2])[1].ln()
            + probabilities(&logits[3])[2].ln()) as f64
            / 4.0;
        assert!((m.loss - want_nll).abs() < 1e-6);
    }
}
