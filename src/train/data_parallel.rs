//! The trainer's side of data parallelism: which batches a rank takes, and how the ranks'
//! losses and gradients become the step's, so that N ranks of batch b make the updates one
//! process of batch N·b makes (up to the order of summation).
//!
//! Batches: the data stream is the same on every rank (same examples, seed and batch size);
//! rank r of N takes batch r of every N consecutive ones and skips the others, so one step
//! covers the rows one process with batch N·b would see, and the data position is the same on
//! every rank (a checkpoint of rank 0 resumes all of them).
//!
//! Gradients: each rank's loss is a mean over its predicted tokens (sequences for a
//! classifier). The step's loss over all ranks' tokens is `Σ n_r L_r / Σ n_r`, and its gradient
//! the same weighting of the ranks' gradients, which is what one process computes over the
//! whole batch. The weighted gradients are summed by the [`Collective`] in one flat f32 buffer.

use candle_core::{DType, Tensor};

use crate::data::batch::Batch;
use crate::data::batches::Batches;
use crate::distributed::Collective;
use crate::model::error::ModelError;

fn collective_err(e: crate::distributed::DistributedError) -> ModelError {
    ModelError::invalid("--distributed", e.to_string())
}

/// This rank's next micro-batch: batch `rank` of the next `world_size` in the stream.
pub fn next_local_batch(
    train: &mut Batches,
    collective: &dyn Collective,
) -> Result<Option<Batch>, ModelError> {
    let mut mine = None;
    for k in 0..collective.world_size() {
        if k == collective.rank() {
            mine = train.next_batch()?;
            if mine.is_none() {
                return Ok(None);
            }
        } else if !train.skip_batch()? {
            return Ok(None);
        }
    }
    Ok(mine)
}

/// A step's numbers over all ranks.
#[derive(Debug)]
pub struct ReducedStep {
    /// Token-weighted mean loss.
    pub loss: f64,
    /// Predicted tokens of all ranks.
    pub tokens: usize,
    /// Token-weighted mean gradients (`None` only in a single-process run, for parameters that
    /// got no gradient).
    pub grads: Vec<Option<Tensor>>,
    /// Some rank was asked to stop.
    pub stop: bool,
}

/// Combine this rank's mean `loss` over `tokens` predicted tokens, its gradients and its stop
/// request with the other ranks'. A single process returns its own numbers unchanged.
pub fn reduce_step(
    collective: &dyn Collective,
    loss: f64,
    tokens: usize,
    grads: Vec<Option<Tensor>>,
    stop: bool,
) -> Result<ReducedStep, ModelError> {
    let world = collective.world_size();
    if world == 1 {
        return Ok(ReducedStep {
            loss,
            tokens,
            grads,
            stop,
        });
    }
    let mut sums = [
        tokens as f64,
        tokens as f64 * loss,
        f64::from(u8::from(stop)),
    ];
    collective
        .all_reduce_sum_f64(&mut sums)
        .map_err(collective_err)?;
    let [all_tokens, weighted_loss, stops] = sums;
    // Ranks without predicted tokens (all labels masked) weigh nothing; if no rank has any, the
    // ranks count equally.
    let (weight, loss) = if all_tokens > 0.0 {
        (tokens as f64 / all_tokens, weighted_loss / all_tokens)
    } else {
        (1.0 / world as f64, loss)
    };
    // One buffer for all gradients, in one layout on every rank: a parameter without a gradient
    // must come as zeros ([`fill_missing`]), as DDP sends for unused parameters.
    let mut flat = Vec::with_capacity(grads.len());
    let mut shapes = Vec::with_capacity(grads.len());
    for (i, g) in grads.iter().enumerate() {
        let Some(g) = g else {
            return Err(ModelError::invalid(
                "--distributed",
                format!("parameter {i} has no gradient: fill_missing gives it zeros first"),
            ));
        };
        shapes.push((g.shape().clone(), g.dtype()));
        flat.push((g.to_dtype(DType::F32)?.flatten_all()? * weight)?);
    }
    let summed = collective
        .all_reduce_sum(&Tensor::cat(&flat, 0)?)
        .map_err(collective_err)?;
    let mut out = Vec::with_capacity(grads.len());
    let mut off = 0;
    for (shape, dtype) in shapes {
        let n = shape.elem_count();
        out.push(Some(
            summed.narrow(0, off, n)?.reshape(shape)?.to_dtype(dtype)?,
        ));
        off += n;
    }
    Ok(ReducedStep {
        loss,
        tokens: all_tokens as usize,
        grads: out,
        stop: stops > 0.0,
    })
}

/// Gradients with zeros for parameters that got none, when several ranks must send buffers of
/// one layout (`vars` gives the shapes).
pub fn fill_missing(
    grads: Vec<Option<Tensor>>,
    vars: &[candle_core::Var],
    world_size: usize,
) -> Result<Vec<Option<Tensor>>, ModelError> {
    if world_size == 1 {
        return Ok(grads);
    }
    grads
        .into_iter()
        .zip(vars)
        .map(|(g, v)| match g {
            Some(g) => Ok(Some(g)),
            None => Ok(Some(v.as_tensor().zeros_like()?)),
        })
        .collect()
}

/// Give every rank rank 0's values of `vars` (adapters initialised or loaded on each rank).
pub fn broadcast_vars(
    collective: &dyn Collective,
    vars: &[candle_core::Var],
) -> Result<(), ModelError> {
    if collective.world_size() == 1 {
        return Ok(());
    }
    for v in vars {
        let t = collective
            .broadcast(v.as_tensor())
            .map_err(collective_err)?;
        v.set(&t)?;
    }
    Ok(())
}

/// Stop with an error on every rank unless all ranks run the same model and options (`key`
/// hashes them): mismatched ranks would exchange gradients of different layouts.
pub fn check_same_run(collective: &dyn Collective, key: &str) -> Result<(), ModelError> {
    let world = collective.world_size();
    if world == 1 {
        return Ok(());
    }
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(key.as_bytes());
    // 16 bits, so that the sums of h and h² below are exact in f64 for any number of ranks.
    let h = f64::from(u16::from_le_bytes([d[0], d[1]]));
    let mut v = [h, h * h];
    collective
        .all_reduce_sum_f64(&mut v)
        .map_err(collective_err)?;
    // All equal iff the variance is zero: Σh² · N == (Σh)².
    if v[1] * world as f64 != v[0] * v[0] {
        return Err(ModelError::invalid(
            "--distributed",
            format!(
                "the {world} ranks do not run the same model, adapters and options (rank {} \
                 differs from some other): start every rank with the same command line",
                collective.rank()
            ),
        ));
    }
    Ok(())
}
