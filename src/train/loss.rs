//! Causal-LM cross-entropy computed in chunks of rows, so the `[tokens, vocab]` f32 logits never
//! exist at once: the forward keeps only per-row log-sum-exp, and the backward recomputes each
//! chunk's logits to form `dh = (softmax - onehot) · W / n`. The head is frozen, so it gets no
//! gradient.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

/// Label value that is not predicted (prompt tokens, padding), as in transformers.
pub const IGNORE_INDEX: i64 = -100;

/// Rows of logits materialized at once.
pub const DEFAULT_CHUNK_ROWS: usize = 1024;

/// Mean cross-entropy of `h · headᵀ` against `targets` over the rows whose target is not
/// [`IGNORE_INDEX`]. `h`: `[n, hidden]` (differentiable), `head`: `[vocab, hidden]` (frozen).
pub fn chunked_cross_entropy(
    h: &Tensor,
    head: &Tensor,
    targets: &[i64],
    chunk_rows: usize,
) -> Result<Tensor> {
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
    let op = ChunkedCrossEntropy {
        head: head.detach().to_dtype(DType::F32)?,
        targets: targets.to_vec(),
        chunk_rows: chunk_rows.max(1),
    };
    h.contiguous()?.apply_op1(op)
}

/// Summed (not mean) cross-entropy of `h · headᵀ` over the counted targets, accumulated in
/// f64 chunk by chunk; no gradient (evaluation).
pub fn summed_nll(h: &Tensor, head: &Tensor, targets: &[i64], chunk_rows: usize) -> Result<f64> {
    let op = ChunkedCrossEntropy {
        head: head.detach().to_dtype(DType::F32)?,
        targets: targets.to_vec(),
        chunk_rows: chunk_rows.max(1),
    };
    op.summed_nll(&h.detach())
}

#[derive(Clone)]
struct ChunkedCrossEntropy {
    head: Tensor,
    targets: Vec<i64>,
    chunk_rows: usize,
}

impl ChunkedCrossEntropy {
    fn counted(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE_INDEX).count()
    }

    /// Calls `f(start, len, logits[len, vocab] f32)` for each chunk of rows.
    fn for_each_chunk(
        &self,
        h: &Tensor,
        mut f: impl FnMut(usize, usize, &Tensor) -> Result<()>,
    ) -> Result<()> {
        let n = h.dim(0)?;
        let mut start = 0;
        while start < n {
            let len = self.chunk_rows.min(n - start);
            let hc = h.narrow(0, start, len)?.to_dtype(DType::F32)?;
            let logits = hc.matmul(&self.head.t()?)?;
            f(start, len, &logits)?;
            start += len;
        }
        Ok(())
    }

    /// Σ over counted rows of `logsumexp(logits) - logits[target]`, in f64.
    fn summed_nll(&self, h: &Tensor) -> Result<f64> {
        let dev = h.device().clone();
        let mut total = 0f64;
        self.for_each_chunk(h, |start, len, logits| {
            let lse = log_sum_exp(logits)?;
            let picked = logits
                .gather(&self.targets_of(start, len, &dev)?, 1)?
                .squeeze(1)?;
            let nll = ((lse - picked)? * self.mask_of(start, len, &dev)?)?;
            total += nll.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
            Ok(())
        })?;
        Ok(total)
    }

    fn targets_of(&self, start: usize, len: usize, dev: &candle_core::Device) -> Result<Tensor> {
        let t: Vec<u32> = self.targets[start..start + len]
            .iter()
            .map(|&t| if t == IGNORE_INDEX { 0 } else { t as u32 })
            .collect();
        Tensor::from_vec(t, (len, 1), dev)
    }

    fn mask_of(&self, start: usize, len: usize, dev: &candle_core::Device) -> Result<Tensor> {
        let m: Vec<f32> = self.targets[start..start + len]
            .iter()
            .map(|&t| (t != IGNORE_INDEX) as u8 as f32)
            .collect();
        Tensor::from_vec(m, len, dev)
    }
}

fn log_sum_exp(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?;
    let s = logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?;
    (s + max)?.squeeze(D::Minus1)
}

impl CustomOp1 for ChunkedCrossEntropy {
    fn name(&self) -> &'static str {
        "chunked-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = cpu_tensor(storage, layout)?;
        let total = self.summed_nll(&h)?;
        let loss = (total / self.counted().max(1) as f64) as f32;
        let out = match storage.dtype() {
            DType::BF16 => CpuStorage::BF16(vec![half::bf16::from_f32(loss)]),
            DType::F16 => CpuStorage::F16(vec![half::f16::from_f32(loss)]),
            _ => CpuStorage::F32(vec![loss]),
        };
        Ok((out, Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let h = arg.detach();
        let dev = h.device().clone();
        let scale = grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64
            / self.counted().max(1) as f64;
        let mut parts = Vec::new();
        self.for_each_chunk(&h, |start, len, logits| {
            let max = logits.max_keepdim(D::Minus1)?;
            let e = logits.broadcast_sub(&max)?.exp()?;
            let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
            let onehot = Tensor::zeros(p.dims(), DType::F32, &dev)?.scatter_add(
                &self.targets_of(start, len, &dev)?,
                &Tensor::ones((len, 1), DType::F32, &dev)?,
                1,
            )?;
            let dlogits =
                (p - onehot)?.broadcast_mul(&self.mask_of(start, len, &dev)?.unsqueeze(1)?)?;
            parts.push((dlogits.matmul(&self.head)? * scale)?);
            Ok(())
        })?;
        Ok(Some(Tensor::cat(&parts, 0)?.to_dtype(arg.dtype())?))
    }
}

/// A CPU storage slice as an untracked tensor.
fn cpu_tensor(storage: &CpuStorage, layout: &Layout) -> Result<Tensor> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("chunked-cross-entropy: input must be contiguous")
    };
    let dims = layout.shape().dims();
    let dev = candle_core::Device::Cpu;
    match storage {
        CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], dims, &dev),
        CpuStorage::BF16(v) => Tensor::from_slice(&v[start..end], dims, &dev),
        CpuStorage::F16(v) => Tensor::from_slice(&v[start..end], dims, &dev),
        _ => candle_core::bail!("chunked-cross-entropy: hidden states must be a float type"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Loss and gradient equal the plain (unchunked) cross-entropy, for any chunk size.
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
        for chunk in [1, 3, 7, 100] {
            let got = chunked_cross_entropy(h.as_tensor(), &head, &targets, chunk).unwrap();
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
    }
}
