//! The chunked causal-LM cross-entropy as candle tensor ops, for hidden states the CPU kernel of
//! [`chunked_cross_entropy`](super::loss::chunked_cross_entropy) does not take: on a GPU, or in
//! bf16 (where it runs as on a GPU, which is what lets the CPU's bf16 backend stand in for a GPU
//! step in the memory plan's tests). Same contract and the same memory shape: per chunk of rows the logits `h · headᵀ` are
//! formed (in `h`'s dtype, then f32 for the softmax, as transformers upcasts them), the chunk's
//! summed negative log-likelihood and, when asked, `dh = (softmax - onehot) · head` are computed,
//! and the logits are dropped; only `dh` (`[tokens, hidden]`) is kept for the backward.
//!
//! The head stays in its dtype (no f32 copy: 2 GiB for a 128k vocabulary at hidden 4096); the
//! products run in `h`'s dtype and are widened to f32 after. A chunk holds about four f32
//! `[rows, vocab]` buffers at its peak (the logits, log-softmax's internals, the softmax) where the
//! CPU op holds one, so it takes a quarter of the CPU op's rows: the same bytes, which is what the
//! memory plan counts.
//!
//! The gradient reaches `h` through `a - a.detach()` with `a = Σ h ⊙ dh`: exactly zero in value,
//! `dh` in gradient, added to the loss value.

use candle_core::{DType, Result, Tensor, D};

use super::loss::IGNORE_INDEX;

/// The CPU op's rows per chunk divided by this: the same bytes (see the module doc).
pub const ROWS_DIVISOR: usize = 4;

/// Summed NLL over the counted rows, their count, and (with `want_grad`) `Σ_rows dh` in f32.
fn pass(
    h: &Tensor,
    head: &Tensor,
    targets: &[i64],
    chunk_rows: usize,
    want_grad: bool,
) -> Result<(f64, usize, Option<Tensor>)> {
    let (n, _hidden) = h.dims2()?;
    if targets.len() != n {
        candle_core::bail!("{} targets for {n} rows of hidden states", targets.len());
    }
    let dev = h.device();
    let h = h.detach();
    let head = head.detach().to_dtype(h.dtype())?;
    let chunk_rows = (chunk_rows / ROWS_DIVISOR).max(1);
    let mut nll = 0f64;
    let mut counted = 0usize;
    let mut dh = Vec::new();
    for start in (0..n).step_by(chunk_rows) {
        let len = chunk_rows.min(n - start);
        let t = &targets[start..start + len];
        let mask: Vec<f32> = t
            .iter()
            .map(|&x| f32::from(u8::from(x != IGNORE_INDEX)))
            .collect();
        let k = mask.iter().filter(|&&m| m > 0.0).count();
        if k == 0 {
            if want_grad {
                dh.push(Tensor::zeros((len, head.dim(1)?), DType::F32, dev)?);
            }
            continue;
        }
        counted += k;
        let idx: Vec<u32> = t.iter().map(|&x| x.max(0) as u32).collect();
        let idx = Tensor::from_vec(idx, len, dev)?;
        let mask = Tensor::from_vec(mask, (len, 1), dev)?;
        // Scoped so each [rows, vocab] buffer is freed as soon as the next exists.
        let lsm = {
            let logits = h
                .narrow(0, start, len)?
                .matmul(&head.t()?)?
                .to_dtype(DType::F32)?;
            candle_nn::ops::log_softmax(&logits, D::Minus1)?
        };
        let picked = lsm.gather(&idx.unsqueeze(1)?, 1)?;
        let s = (picked * &mask)?.sum_all()?.to_dtype(DType::F64)?;
        nll -= s.to_scalar::<f64>()?;
        if want_grad {
            let p = lsm.exp()?.broadcast_mul(&mask)?.to_dtype(h.dtype())?;
            drop(lsm);
            let onehot_head = head
                .index_select(&idx, 0)?
                .to_dtype(DType::F32)?
                .broadcast_mul(&mask)?;
            dh.push((p.matmul(&head)?.to_dtype(DType::F32)? - onehot_head)?);
        }
    }
    let dh = if want_grad {
        Some(Tensor::cat(&dh, 0)?)
    } else {
        None
    };
    Ok((nll, counted, dh))
}

/// Mean cross-entropy of `h · headᵀ` against `targets` over the counted rows, differentiable in
/// `h` (`[n, hidden]`), with `head` (`[vocab, hidden]`) frozen.
pub fn chunked_cross_entropy_ops(
    h: &Tensor,
    head: &Tensor,
    targets: &[i64],
    chunk_rows: usize,
) -> Result<Tensor> {
    let (nll, k, dh) = pass(h, head, targets, chunk_rows, h.track_op())?;
    if k == 0 {
        candle_core::bail!("no counted target in the batch");
    }
    let loss = Tensor::new((nll / k as f64) as f32, h.device())?;
    let Some(dh) = dh else { return Ok(loss) };
    let dh = (dh * (1.0 / k as f64))?.to_dtype(h.dtype())?;
    let a = (h * dh)?.to_dtype(DType::F32)?.sum_all()?;
    (a.clone() - a.detach())? + loss
}

/// Summed cross-entropy of `h · headᵀ` over the counted targets, in f64; no gradient.
pub fn summed_nll_ops(
    h: &Tensor,
    head: &Tensor,
    targets: &[i64],
    chunk_rows: usize,
) -> Result<f64> {
    Ok(pass(h, head, targets, chunk_rows, false)?.0)
}
