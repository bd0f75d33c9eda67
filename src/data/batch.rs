//! `Batch`: the tensors of one training or validation batch, as the data pipeline builds them.

use candle_core::Tensor;

use super::example::IGNORE_INDEX;

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
    /// Sequence classification: one target per row and which tokens are real; `None` for
    /// language modelling.
    pub classes: Option<ClassTargets>,
}

/// The classification part of a padded batch.
#[derive(Clone, Debug)]
pub struct ClassTargets {
    /// `[b, t]` (u32): 1 on real tokens, 0 on padding.
    pub keys: Tensor,
    /// Class index (or regression value) of each row.
    pub targets: Vec<f32>,
}

impl Batch {
    /// Tokens whose next token is predicted (the loss's denominator); for a classification
    /// batch, its real tokens.
    pub fn predicted_tokens(&self) -> usize {
        if let Some(c) = &self.classes {
            return c
                .keys
                .sum_all()
                .and_then(|s| s.to_dtype(candle_core::DType::F64))
                .and_then(|s| s.to_scalar::<f64>())
                .map_or(0, |s| s as usize);
        }
        let (b, t) = self.ids.dims2().unwrap_or((0, 0));
        (0..b)
            .flat_map(|r| (1..t).map(move |i| r * t + i))
            .filter(|&i| self.labels.get(i).is_some_and(|&l| l != IGNORE_INDEX))
            .count()
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
