//! Rows of a batch: examples packed several to a row, or one per row padded.
//!
//! Packed rows are exactly `seq_len` tokens. Each example is a segment (document index within
//! the row, from 0) with positions restarting at 0, so with `AttentionSpan::CausalSegments`
//! and per-document RoPE positions it trains as if alone. The label of each segment's first
//! token is ignored: the loss would predict it from the previous document's last token, which
//! a document trained alone never does. Examples are never split across rows (a response keeps
//! its prompt); what a row cannot fit is padding, a segment of its own with ignored labels.
//! Overlong text was already cut into windows when the corpus was built, each window its own
//! document with positions from 0.

use std::collections::BTreeSet;

use super::example::Example;
use super::example::IGNORE_INDEX;

/// One row of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Labels ([`IGNORE_INDEX`] on padding, prompts and segment starts).
    pub labels: Vec<i64>,
    /// Document index of each token within the row, from 0; padding is one more segment.
    pub segments: Vec<u32>,
    /// Position of each token within its document (restarts at 0 per segment).
    pub positions: Vec<u32>,
}

impl Row {
    fn with_capacity(n: usize) -> Self {
        Self {
            ids: Vec::with_capacity(n),
            labels: Vec::with_capacity(n),
            segments: Vec::with_capacity(n),
            positions: Vec::with_capacity(n),
        }
    }

    /// Append `ids`/`labels` as segment `segment`.
    fn push_segment(&mut self, ids: &[u32], labels: &[i64], segment: u32) {
        self.ids.extend_from_slice(ids);
        self.labels.extend(
            labels
                .iter()
                .enumerate()
                .map(|(i, &l)| if i == 0 { IGNORE_INDEX } else { l }),
        );
        self.segments
            .extend(std::iter::repeat_n(segment, ids.len()));
        self.positions.extend(0..ids.len() as u32);
    }

    /// Pad with `pad_id` up to `len` tokens as a segment of its own.
    fn pad_to(&mut self, len: usize, pad_id: u32, segment: u32) {
        let n = len.saturating_sub(self.ids.len());
        self.ids.extend(std::iter::repeat_n(pad_id, n));
        self.labels.extend(std::iter::repeat_n(IGNORE_INDEX, n));
        self.segments.extend(std::iter::repeat_n(segment, n));
        self.positions.extend(0..n as u32);
    }

    /// Tokens that are not padding.
    pub fn real_tokens(&self, pad_segment: u32) -> usize {
        self.segments.iter().filter(|&&s| s != pad_segment).count()
    }
}

/// Assign sequences of `lengths` (in this order) to rows of `seq_len` tokens, best fit: each
/// goes into the fullest row it fits in, else a new row. Returns each row's indices into
/// `lengths`, in the order they were placed. Lengths over `seq_len` get a row of their own.
pub fn plan_packing(lengths: &[usize], seq_len: usize) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    // (free tokens, row index) of rows with room left.
    let mut free: BTreeSet<(usize, usize)> = BTreeSet::new();
    for (i, &len) in lengths.iter().enumerate() {
        let fit = free.range((len, 0)..).next().copied();
        let (room, row) = match fit {
            Some(slot) => {
                free.remove(&slot);
                slot
            }
            None => {
                rows.push(Vec::new());
                (seq_len, rows.len() - 1)
            }
        };
        rows[row].push(i);
        let left = room.saturating_sub(len);
        if left > 0 {
            free.insert((left, row));
        }
    }
    rows
}

/// One packed row of `seq_len` tokens from `examples` (which must fit together).
pub fn pack_row(examples: &[&Example], seq_len: usize, pad_id: u32) -> Row {
    let mut row = Row::with_capacity(seq_len);
    for (segment, e) in examples.iter().enumerate() {
        row.push_segment(&e.ids, &e.labels, segment as u32);
    }
    row.pad_to(seq_len, pad_id, examples.len() as u32);
    row
}

/// Pack `examples` in order into rows of exactly `seq_len` tokens (see [`plan_packing`]).
pub fn pack_sequences(examples: &[Example], seq_len: usize, pad_id: u32) -> Vec<Row> {
    let lengths: Vec<usize> = examples.iter().map(Example::len).collect();
    plan_packing(&lengths, seq_len)
        .into_iter()
        .map(|row| {
            let members: Vec<&Example> = row.iter().map(|&i| &examples[i]).collect();
            pack_row(&members, seq_len, pad_id)
        })
        .collect()
}

/// One example alone in a row of `len` tokens: segment 0, then padding as segment 1. Its first
/// label is kept (nothing predicts it, so the loss never reads it).
pub fn pad_row(example: &Example, len: usize, pad_id: u32) -> Row {
    let mut row = Row::with_capacity(len.max(example.len()));
    row.ids.extend_from_slice(&example.ids);
    row.labels.extend_from_slice(&example.labels);
    row.segments.extend(std::iter::repeat_n(0, example.len()));
    row.positions.extend(0..example.len() as u32);
    row.pad_to(len, pad_id, 1);
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_fit_fills_the_fullest_row_that_has_room() {
        // seq_len 10: 6 opens row 0 (4 left), 7 opens row 1 (3 left), 3 fits both and goes to
        // the fuller row 1, 4 fills row 0, 5 opens row 2.
        assert_eq!(
            plan_packing(&[6, 7, 3, 4, 5], 10),
            vec![vec![0, 3], vec![1, 2], vec![4]]
        );
        assert_eq!(plan_packing(&[12, 1], 10), vec![vec![0], vec![1]]);
        assert!(plan_packing(&[], 10).is_empty());
    }
}
