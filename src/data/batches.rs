//! `Batches`: training batches drawn from examples in a seeded, per-epoch shuffled order,
//! packed or padded, with a position that can be saved and restored so a resumed run sees
//! exactly the batches it would have seen.
//!
//! The order of epoch `e` is a function of `(seed, e)` only, and so is its packing plan; the
//! position is `(epoch, index of the next row in that epoch's rows)`. A row is one example
//! (padded mode) or one packed group of examples (packed mode).

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::batch::{Batch, ClassTargets};
use super::error::DataError;
use super::example::Example;
use super::packing::{pack_row, pad_row, plan_packing, Row};

/// How examples become batches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchOptions {
    /// Rows per batch (the last batch of an epoch may have fewer).
    pub batch_size: usize,
    /// Row length when packing, and the longest example allowed.
    pub seq_len: usize,
    /// Pack several examples per row (with segments and positions); otherwise one example
    /// per row, padded to the longest in the batch.
    pub packing: bool,
    /// Id written on padding (its labels are ignored and it is its own segment, so the value
    /// only has to be a valid embedding row).
    pub pad_id: u32,
    /// Shuffle the examples each epoch; otherwise keep their order (e.g. for validation).
    pub shuffle: bool,
    /// Seed of the shuffles.
    pub seed: u64,
    /// Stop after this many epochs; `None` cycles forever.
    pub epochs: Option<usize>,
}

impl BatchOptions {
    /// Shuffled, packed training batches that cycle forever.
    pub fn new(batch_size: usize, seq_len: usize, pad_id: u32, seed: u64) -> Self {
        Self {
            batch_size,
            seq_len,
            packing: true,
            pad_id,
            shuffle: true,
            seed,
            epochs: None,
        }
    }
}

/// Where a [`Batches`] is in its data: the epoch and the index of the next row of that epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BatchPosition {
    /// Epoch, from 0.
    pub epoch: usize,
    /// Next row within the epoch's (shuffled, packed) rows.
    pub index: usize,
}

/// The example order of epoch `epoch`: a permutation of `0..n` drawn from `(seed, epoch)`.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let stream = splitmix64(seed ^ splitmix64(epoch as u64));
    order.shuffle(&mut StdRng::seed_from_u64(stream));
    order
}

/// One step of SplitMix64: decorrelates nearby seeds and epochs.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The rows of one epoch, as indices into the examples.
#[derive(Clone, Debug)]
struct EpochPlan {
    epoch: usize,
    rows: Vec<Vec<usize>>,
}

/// Batches over a set of examples; an iterator of `Result<Batch, DataError>`.
#[derive(Clone, Debug)]
pub struct Batches {
    examples: Vec<Example>,
    opts: BatchOptions,
    device: Device,
    position: BatchPosition,
    plan: Option<EpochPlan>,
}

impl Batches {
    /// Batches of `examples` (each at most `opts.seq_len` tokens) on `device`, from the start.
    pub fn new(
        examples: Vec<Example>,
        opts: BatchOptions,
        device: &Device,
    ) -> Result<Self, DataError> {
        if opts.batch_size == 0 {
            return Err(DataError::Options(
                "the batch size must be at least 1".into(),
            ));
        }
        if examples.is_empty() {
            return Err(DataError::Options(
                "there are no examples to make batches of".into(),
            ));
        }
        if let Some(e) = examples.iter().find(|e| e.len() > opts.seq_len) {
            return Err(DataError::Options(format!(
                "an example (line {}) has {} tokens, more than the sequence length {}; build \
                 examples with the same sequence length",
                e.line,
                e.len(),
                opts.seq_len
            )));
        }
        Ok(Self {
            examples,
            opts,
            device: device.clone(),
            position: BatchPosition::default(),
            plan: None,
        })
    }

    /// Bytes the examples hold in memory (their token ids and labels).
    pub fn resident_bytes(&self) -> usize {
        self.examples
            .iter()
            .map(|e| {
                std::mem::size_of::<Example>()
                    + e.ids.capacity() * std::mem::size_of::<u32>()
                    + e.labels.capacity() * std::mem::size_of::<i64>()
            })
            .sum()
    }

    /// The examples, in file order.
    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// The options in use.
    pub fn options(&self) -> &BatchOptions {
        &self.opts
    }

    /// Where the next batch starts; save it with a checkpoint.
    pub fn position(&self) -> BatchPosition {
        self.position
    }

    /// Continue from a saved `position` (the same examples and options must be used).
    pub fn seek(&mut self, position: BatchPosition) -> Result<(), DataError> {
        let err = |what: String| DataError::Seek {
            epoch: position.epoch,
            index: position.index,
            what,
        };
        if let Some(limit) = self.opts.epochs {
            if position.epoch > limit || (position.epoch == limit && position.index > 0) {
                return Err(err(format!("the run is set to {limit} epochs")));
            }
        }
        let plan = self.take_plan(position.epoch);
        let rows = if self.opts.packing {
            plan.rows.len()
        } else {
            self.examples.len()
        };
        self.plan = Some(plan);
        if position.index > rows {
            return Err(err(format!(
                "that epoch has only {rows} rows (was the run started with other data, \
                 sequence length or seed?)"
            )));
        }
        self.position = position;
        self.normalize();
        Ok(())
    }

    /// Rows (examples, or packed groups of them) in epoch `epoch`.
    pub fn rows_in_epoch(&self, epoch: usize) -> usize {
        if !self.opts.packing {
            return self.examples.len();
        }
        match &self.plan {
            Some(p) if p.epoch == epoch => p.rows.len(),
            _ => self.plan_epoch(epoch).rows.len(),
        }
    }

    /// Batches in epoch `epoch` (counting a last, smaller one).
    pub fn batches_in_epoch(&self, epoch: usize) -> usize {
        self.rows_in_epoch(epoch).div_ceil(self.opts.batch_size)
    }

    /// The next batch, or `None` once the set number of epochs is done.
    pub fn next_batch(&mut self) -> Result<Option<Batch>, DataError> {
        if self
            .opts
            .epochs
            .is_some_and(|limit| self.position.epoch >= limit)
        {
            return Ok(None);
        }
        let BatchPosition { epoch, index } = self.position;
        let plan = self.take_plan(epoch);
        let end = (index + self.opts.batch_size).min(plan.rows.len());
        let members: Vec<Vec<&Example>> = plan.rows[index..end]
            .iter()
            .map(|r| r.iter().map(|&i| &self.examples[i]).collect())
            .collect();
        let batch = self.assemble(&members);
        self.plan = Some(plan);
        let batch = batch?;
        self.position.index = end;
        self.normalize();
        Ok(Some(batch))
    }

    /// Move past the next batch without assembling it (a data-parallel rank skips the other
    /// ranks' batches); `false` once the set number of epochs is done.
    pub fn skip_batch(&mut self) -> Result<bool, DataError> {
        if self
            .opts
            .epochs
            .is_some_and(|limit| self.position.epoch >= limit)
        {
            return Ok(false);
        }
        let plan = self.take_plan(self.position.epoch);
        let end = (self.position.index + self.opts.batch_size).min(plan.rows.len());
        self.plan = Some(plan);
        self.position.index = end;
        self.normalize();
        Ok(true)
    }

    /// Move past the end of an epoch to the start of the next.
    fn normalize(&mut self) {
        if self.position.index >= self.rows_in_epoch(self.position.epoch) {
            self.position = BatchPosition {
                epoch: self.position.epoch + 1,
                index: 0,
            };
        }
    }

    /// The plan of `epoch`, from the cache or computed (the caller puts it back).
    fn take_plan(&mut self, epoch: usize) -> EpochPlan {
        match self.plan.take() {
            Some(p) if p.epoch == epoch => p,
            _ => self.plan_epoch(epoch),
        }
    }

    fn plan_epoch(&self, epoch: usize) -> EpochPlan {
        let n = self.examples.len();
        let order = if self.opts.shuffle {
            epoch_order(n, self.opts.seed, epoch)
        } else {
            (0..n).collect()
        };
        let rows = if self.opts.packing {
            let lengths: Vec<usize> = order.iter().map(|&i| self.examples[i].len()).collect();
            plan_packing(&lengths, self.opts.seq_len)
                .into_iter()
                .map(|row| row.into_iter().map(|k| order[k]).collect())
                .collect()
        } else {
            order.into_iter().map(|i| vec![i]).collect()
        };
        EpochPlan { epoch, rows }
    }

    /// Tensors of a batch from its rows' examples.
    fn assemble(&self, members: &[Vec<&Example>]) -> Result<Batch, DataError> {
        let (pad, seq_len) = (self.opts.pad_id, self.opts.seq_len);
        let rows: Vec<Row> = if self.opts.packing {
            members.iter().map(|m| pack_row(m, seq_len, pad)).collect()
        } else {
            let width = members
                .iter()
                .flat_map(|m| m.iter().map(|e| e.len()))
                .max()
                .unwrap_or(0);
            members
                .iter()
                .flat_map(|m| m.iter().map(|e| pad_row(e, width, pad)))
                .collect()
        };
        let b = rows.len();
        let t = rows.first().map_or(0, |r| r.ids.len());
        let flat = |f: fn(&Row) -> &Vec<u32>| rows.iter().flat_map(f).copied().collect::<Vec<_>>();
        let ids = Tensor::from_vec(flat(|r| &r.ids), (b, t), &self.device)?;
        let labels: Vec<i64> = rows.iter().flat_map(|r| r.labels.iter().copied()).collect();
        let padded = rows.iter().any(|r| r.segments.iter().any(|&s| s != 0));
        let segments = if self.opts.packing || padded {
            Some(Tensor::from_vec(
                flat(|r| &r.segments),
                (b, t),
                &self.device,
            )?)
        } else {
            None
        };
        let positions = if self.opts.packing {
            Some(Tensor::from_vec(
                flat(|r| &r.positions),
                (b, t),
                &self.device,
            )?)
        } else {
            None
        };
        let targets: Option<Vec<f32>> = members
            .iter()
            .flat_map(|m| m.iter().map(|e| e.target))
            .collect();
        let classes = match targets {
            Some(targets) if !self.opts.packing => {
                let keys: Vec<u32> = rows
                    .iter()
                    .flat_map(|r| r.segments.iter().map(|&s| u32::from(s == 0)))
                    .collect();
                Some(ClassTargets {
                    keys: Tensor::from_vec(keys, (b, t), &self.device)?,
                    targets,
                })
            }
            _ => None,
        };
        Ok(Batch {
            ids,
            labels,
            segments,
            positions,
            classes,
        })
    }
}

impl Iterator for Batches {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_batch().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_orders_are_permutations_that_differ_by_epoch_and_seed() {
        let a = epoch_order(50, 1, 0);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(50, 1, 0));
        assert_ne!(a, epoch_order(50, 1, 1));
        assert_ne!(a, epoch_order(50, 2, 0));
    }
}
