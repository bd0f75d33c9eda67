//! Causal-LM cross-entropy computed in chunks of rows, so the `[tokens, vocab]` f32 logits never
//! exist at once. One pass per chunk does everything: `logits = h · headᵀ` (gemm on the rayon
//! pool), each row's log-sum-exp and picked logit (rows in parallel, a vectorized `exp`), and,
//! when `h` needs a gradient, `dh = (softmax - onehot) · head` from the same logits buffer, kept
//! until the backward (it is only `[tokens, hidden]`). The backward then only scales it: the
//! logits are computed once per step instead of twice. The head is frozen, so it gets no
//! gradient.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::model::ops::exp::exp_f32;
use crate::model::ops::with_f32;

pub use crate::data::example::IGNORE_INDEX;

/// Rows of logits materialized at once (`256 × 49152` f32 is 48 MiB).
pub const DEFAULT_CHUNK_ROWS: usize = 256;

/// Mean cross-entropy of `h · headᵀ` against `targets` over the rows whose target is not
/// [`IGNORE_INDEX`]. `h`: `[n, hidden]` (differentiable), `head`: `[vocab, hidden]` (frozen).
pub fn chunked_cross_entropy(
    h: &Tensor,
    head: &Tensor,
    targets: &[i64],
    chunk_rows: usize,
) -> Result<Tensor> {
    if !h.device().is_cpu() || h.dtype() != DType::F32 {
        return super::device_loss::chunked_cross_entropy_ops(h, head, targets, chunk_rows);
    }
    let op = ChunkedCrossEntropy::new(h, head, targets, chunk_rows, h.track_op())?;
    h.contiguous()?.apply_op1(op)
}

/// Mean cross-entropy of full `logits` `[n, vocab]` (differentiable) against `targets` over the
/// rows whose target is not [`IGNORE_INDEX`]: the path for a head with an adapter, whose logits
/// are not only `h · headᵀ`.
pub fn dense_cross_entropy(logits: &Tensor, targets: &[i64]) -> Result<Tensor> {
    let (rows, tgt): (Vec<u32>, Vec<u32>) = targets
        .iter()
        .enumerate()
        .filter(|(_, &t)| t != IGNORE_INDEX)
        .map(|(i, &t)| (i as u32, t as u32))
        .unzip();
    if rows.is_empty() {
        candle_core::bail!("no counted target in the batch");
    }
    let dev = logits.device();
    let k = rows.len();
    let picked = logits.index_select(&Tensor::from_vec(rows, k, dev)?, 0)?;
    let lsm = candle_nn::ops::log_softmax(&picked.to_dtype(DType::F32)?, candle_core::D::Minus1)?;
    let nll = lsm.gather(&Tensor::from_vec(tgt, (k, 1), dev)?, 1)?;
    nll.sum_all()? * (-1.0 / k as f64)
}

/// Summed (not mean) cross-entropy of `h · headᵀ` over the counted targets, accumulated in
/// f64; no gradient (evaluation).
pub fn summed_nll(h: &Tensor, head: &Tensor, targets: &[i64], chunk_rows: usize) -> Result<f64> {
    if !h.device().is_cpu() || h.dtype() != DType::F32 {
        return super::device_loss::summed_nll_ops(h, head, targets, chunk_rows);
    }
    let op = ChunkedCrossEntropy::new(h, head, targets, chunk_rows, false)?;
    let h32 = h.detach().to_dtype(DType::F32)?.contiguous()?;
    with_f32(&h32, |hv| Ok(op.pass(hv)?.0))
}

#[derive(Clone)]
struct ChunkedCrossEntropy {
    /// `[vocab, hidden]` f32, contiguous.
    head: Tensor,
    hidden: usize,
    targets: Arc<Vec<i64>>,
    chunk_rows: usize,
    want_grad: bool,
    /// `Σ (softmax - onehot) · head` per row (not yet divided by the count), from the forward.
    grad: Arc<Mutex<Option<Vec<f32>>>>,
}

impl ChunkedCrossEntropy {
    fn new(
        h: &Tensor,
        head: &Tensor,
        targets: &[i64],
        chunk_rows: usize,
        want_grad: bool,
    ) -> Result<Self> {
        let (n, hidden) = h.dims2()?;
        if targets.len() != n {
            candle_core::bail!("{} targets for {n} rows", targets.len());
        }
        let vocab = head.dim(0)?;
        if let Some(t) = targets
            .iter()
            .find(|&&t| t != IGNORE_INDEX && (t < 0 || t as usize >= vocab))
        {
            candle_core::bail!("target id {t} is outside the vocabulary of {vocab}");
        }
        if head.dim(1)? != hidden {
            candle_core::bail!("head has width {}, hidden states {hidden}", head.dim(1)?);
        }
        Ok(Self {
            head: head.detach().to_dtype(DType::F32)?.contiguous()?,
            hidden,
            targets: Arc::new(targets.to_vec()),
            chunk_rows: chunk_rows.max(1),
            want_grad,
            grad: Arc::new(Mutex::new(None)),
        })
    }

    fn counted(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE_INDEX).count()
    }

    /// Σ over counted rows of `logsumexp(logits) - logits[target]` (f64), and the unscaled
    /// `dh` when a gradient is wanted.
    fn pass(&self, h: &[f32]) -> Result<(f64, Option<Vec<f32>>)> {
        let hidden = self.hidden;
        let n = h.len() / hidden.max(1);
        with_f32(&self.head, |head| {
            let vocab = head.len() / hidden.max(1);
            let rows = self.chunk_rows.min(n).max(1);
            let mut logits = vec![0f32; rows * vocab];
            let mut dh = if self.want_grad {
                vec![0f32; n * hidden]
            } else {
                Vec::new()
            };
            let threads = rayon::current_num_threads();
            let par = if threads > 1 {
                Parallelism::Rayon(threads)
            } else {
                Parallelism::None
            };
            let mut total = 0f64;
            for start in (0..n).step_by(rows) {
                let len = rows.min(n - start);
                // SAFETY: logits holds rows × vocab ≥ len × vocab; h rows start.. and the head
                // [vocab, hidden] are read within their lengths.
                unsafe {
                    gemm::gemm(
                        len,
                        vocab,
                        hidden,
                        logits.as_mut_ptr(),
                        1,
                        vocab as isize,
                        false,
                        h.as_ptr().add(start * hidden),
                        1,
                        hidden as isize,
                        head.as_ptr(),
                        hidden as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    )
                }
                let tg = &self.targets[start..start + len];
                let want_grad = self.want_grad;
                total += logits[..len * vocab]
                    .par_chunks_mut(vocab)
                    .zip(tg.par_iter())
                    .map(|(row, &t)| row_loss(row, t, want_grad))
                    .sum::<f64>();
                if want_grad {
                    // SAFETY: dh rows start .. start + len are [len, hidden] inside dh; the
                    // logits buffer now holds dlogits [len, vocab].
                    unsafe {
                        gemm::gemm(
                            len,
                            hidden,
                            vocab,
                            dh.as_mut_ptr().add(start * hidden),
                            1,
                            hidden as isize,
                            false,
                            logits.as_ptr(),
                            1,
                            vocab as isize,
                            head.as_ptr(),
                            1,
                            hidden as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            par,
                        )
                    }
                }
            }
            Ok((total, self.want_grad.then_some(dh)))
        })
    }
}

/// The NLL of one row of logits against target `t` (0 when ignored); with `want_grad` the row
/// is overwritten by `softmax - onehot(t)` (zeros when ignored).
fn row_loss(row: &mut [f32], t: i64, want_grad: bool) -> f64 {
    if t == IGNORE_INDEX {
        if want_grad {
            row.fill(0.0);
        }
        return 0.0;
    }
    let picked = row[t as usize];
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    // 16 partial sums, so the loop vectorizes.
    let mut acc = [0f32; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v = exp_f32(*v - max);
            *a += *v;
        }
    }
    for v in chunks.into_remainder() {
        *v = exp_f32(*v - max);
        acc[0] += *v;
    }
    let sum: f64 = acc.iter().map(|&a| a as f64).sum();
    let lse = max as f64 + sum.ln();
    if want_grad {
        let inv = (1.0 / sum) as f32;
        for v in row.iter_mut() {
            *v *= inv;
        }
        row[t as usize] -= 1.0;
    }
    lse - picked as f64
}

impl CustomOp1 for ChunkedCrossEntropy {
    fn name(&self) -> &'static str {
        "chunked-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("chunked-cross-entropy: input must be contiguous")
        };
        let (total, dh) = match storage {
            CpuStorage::F32(v) => self.pass(&v[start..end])?,
            CpuStorage::BF16(v) => {
                self.pass(&v[start..end].iter().map(|x| x.to_f32()).collect::<Vec<_>>())?
            }
            CpuStorage::F16(v) => {
                self.pass(&v[start..end].iter().map(|x| x.to_f32()).collect::<Vec<_>>())?
            }
            _ => candle_core::bail!("chunked-cross-entropy: hidden states must be a float type"),
        };
        if let Some(dh) = dh {
            *self
                .grad
                .lock()
                .map_err(|_| candle_core::Error::Msg("cross-entropy gradient lock".into()))? =
                Some(dh);
        }
        let loss = (total / self.counted().max(1) as f64) as f32;
        let out = match storage.dtype() {
            DType::BF16 => CpuStorage::BF16(vec![half::bf16::from_f32(loss)]),
            DType::F16 => CpuStorage::F16(vec![half::f16::from_f32(loss)]),
            _ => CpuStorage::F32(vec![loss]),
        };
        Ok((out, Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let dh = self
            .grad
            .lock()
            .map_err(|_| candle_core::Error::Msg("cross-entropy gradient lock".into()))?
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg(
                    "chunked-cross-entropy: backward of a forward that kept no gradient".into(),
                )
            })?;
        let scale = grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64
            / self.counted().max(1) as f64;
        let dh = Tensor::from_vec(dh, arg.dims(), arg.device())?;
        Ok(Some((dh * scale)?.to_dtype(arg.dtype())?))
    }
}

/// Sequence classification loss as transformers computes it: mean cross-entropy of `logits`
/// `[b, num_labels]` against class indices `targets`, or with `regression` (one output) the mean
/// squared error against the target values.
pub fn classification_loss(logits: &Tensor, targets: &[f32], regression: bool) -> Result<Tensor> {
    let (b, n) = logits.dims2()?;
    if targets.len() != b {
        candle_core::bail!("{} targets for {b} sequences", targets.len());
    }
    let logits = logits.to_dtype(candle_core::DType::F32)?;
    if regression {
        let t = Tensor::from_slice(targets, (b, 1), logits.device())?;
        return (logits - t)?.sqr()?.mean_all();
    }
    let idx: Vec<u32> = targets.iter().map(|&t| t as u32).collect();
    if let Some(bad) = idx.iter().find(|&&i| i as usize >= n) {
        candle_core::bail!("class {bad} is outside the {n} labels");
    }
    let idx = Tensor::from_vec(idx, b, logits.device())?;
    candle_nn::loss::cross_entropy(&logits, &idx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// Loss and gradient equal the plain (unchunked) cross-entropy, for any chunk size, on the
    /// CPU op and on the tensor-op version; the summed NLL of both equals the loss times the count.
    #[test]
    fn equals_dense_cross_entropy_and_its_gradient() {
        let dev = Device::Cpu;
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap()).unwrap();
        let head = Tensor::randn(0f32, 1.0, (11, 5), &dev).unwrap();
        let targets = vec![3, IGNORE_INDEX, 0, 10, 4, IGNORE_INDEX, 7];
        let logits = h.as_tensor().matmul(&head.t().unwrap()).unwrap();
        let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let keep: Vec<u32> = vec![0, 2, 3, 4, 6];
        let rows = lsm
            .index_select(&Tensor::new(keep.as_slice(), &dev).unwrap(), 0)
            .unwrap();
        let tg: Vec<u32> = keep.iter().map(|&i| targets[i as usize] as u32).collect();
        let want = rows
            .gather(&Tensor::from_vec(tg, (5, 1), &dev).unwrap(), 1)
            .unwrap()
            .mean_all()
            .unwrap()
            .neg()
            .unwrap();
        let gw = want.backward().unwrap();
        let gwant = gw.get(h.as_tensor()).unwrap();
        // The CPU op, and the tensor-op version a GPU runs (here on CPU tensors).
        type LossFn = fn(&Tensor, &Tensor, &[i64], usize) -> Result<Tensor>;
        let ops: LossFn = super::super::device_loss::chunked_cross_entropy_ops;
        let cpu: LossFn = chunked_cross_entropy;
        for (chunk, f) in [1, 3, 7, 100]
            .into_iter()
            .flat_map(|c| [(c, cpu), (c, ops)])
        {
            let got = f(h.as_tensor(), &head, &targets, chunk).unwrap();
            let d = (got.to_scalar::<f32>().unwrap() - want.to_scalar::<f32>().unwrap()).abs();
            assert!(d < 1e-5, "chunk {chunk}: loss differs by {d}");
            let g = got.backward().unwrap();
            let gh = g.get(h.as_tensor()).unwrap();
            let d = (gh - gwant)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-5, "chunk {chunk}: gradient differs by {d}");
        }
        let want_sum = f64::from(want.to_scalar::<f32>().unwrap()) * 5.0;
        for chunk in [2, 100] {
            let a = summed_nll(h.as_tensor(), &head, &targets, chunk).unwrap();
            let b =
                super::super::device_loss::summed_nll_ops(h.as_tensor(), &head, &targets, chunk)
                    .unwrap();
            assert!(
                (a - want_sum).abs() < 1e-4 && (b - want_sum).abs() < 1e-4,
                "{a} {b} {want_sum}"
            );
        }
    }
}
