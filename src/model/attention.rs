//! Self-attention shared by every family: which keys a query sees (the mask), rotary position
//! tables, and the attention core `softmax(q·kᵀ/√d + mask)·v` over grouped heads.
//!
//! The core runs as the fused CPU op ([`super::ops::attention`]) for f32 on the CPU without a
//! cache, and from candle primitives otherwise (other dtypes and devices, KV-cached
//! generation). Families without rotary embeddings (GPT-2, BERT) use identity tables
//! ([`Rope::identity`]), so one core serves them all.

use std::sync::Arc;

use candle_core::{Device, Result, Tensor, D};

use super::ops::{self, attention::FusedAttention};
use crate::lora::dropout::HashDropout;

/// Softmax over the last dimension; the max shift is detached (it cancels mathematically).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Precomputed rotary cos/sin tables `[max_positions, head_dim]` (HF's rotate-half layout).
#[derive(Clone, Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// The same tables as plain f32 vectors, for the fused attention op.
    cos_host: Arc<Vec<f32>>,
    sin_host: Arc<Vec<f32>>,
    /// False for [`Rope::identity`], whose `apply` is a no-op.
    rotates: bool,
}

impl Rope {
    /// Tables for every position below `max_positions` from the inverse frequencies
    /// (`head_dim / 2` of them).
    pub fn from_inv_freq(inv_freq: &[f32], max_positions: usize, device: &Device) -> Result<Self> {
        let d = inv_freq.len() * 2;
        let mut cos = Vec::with_capacity(max_positions * d);
        let mut sin = Vec::with_capacity(max_positions * d);
        for p in 0..max_positions {
            let angles: Vec<f32> = inv_freq.iter().map(|&f| p as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        Self::from_tables(cos, sin, max_positions, d, device)
    }

    /// Tables that rotate nothing (cos 1, sin 0): attention without rotary positions.
    pub fn identity(head_dim: usize, max_positions: usize, device: &Device) -> Result<Self> {
        let n = max_positions * head_dim;
        let mut rope =
            Self::from_tables(vec![1.0; n], vec![0.0; n], max_positions, head_dim, device)?;
        rope.rotates = false;
        Ok(rope)
    }

    fn from_tables(
        cos: Vec<f32>,
        sin: Vec<f32>,
        max_positions: usize,
        d: usize,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            cos: Tensor::from_vec(cos.clone(), (max_positions, d), device)?,
            sin: Tensor::from_vec(sin.clone(), (max_positions, d), device)?,
            cos_host: Arc::new(cos),
            sin_host: Arc::new(sin),
            rotates: true,
        })
    }

    /// The cos and sin tables `[positions, head_dim]` as host f32 vectors (for fused ops).
    pub fn host_tables(&self) -> (Arc<Vec<f32>>, Arc<Vec<f32>>) {
        (self.cos_host.clone(), self.sin_host.clone())
    }

    /// Number of positions the tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Rotate `x` of shape `[b, heads, t, d]` by the positions `pos` (`[b, t]`, u32).
    pub fn apply(&self, x: &Tensor, pos: &Tensor) -> Result<Tensor> {
        let (b, _, t, d) = x.dims4()?;
        if !self.rotates {
            return Ok(x.clone());
        }
        let flat = pos.flatten_all()?;
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, 1, t, d))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, 1, t, d))?;
        let dt = x.dtype();
        let half = d / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos.to_dtype(dt)?)? + rotated.broadcast_mul(&sin.to_dtype(dt)?)?
    }
}

/// Which keys each query may attend to.
#[derive(Clone, Debug)]
pub enum AttentionSpan<'a> {
    /// Causal over the whole row (after anything already in the cache).
    Causal,
    /// Causal within documents: `segments` `[b, t]` (u32) names each token's document; tokens
    /// attend only to earlier tokens of the same document (sequence packing).
    CausalSegments(&'a Tensor),
    /// Causal, and never to padding: `keys` `[b, t]` (u32) is 1 on real tokens, 0 on padding
    /// (a decoder classifying padded sequences).
    CausalPadded(&'a Tensor),
    /// Every real token of the row, in both directions (encoders); `keys` as above.
    Bidirectional(&'a Tensor),
}

/// Additive mask `[b, 1, 1, t, past + t]`: 0 where attention is allowed, -inf elsewhere.
/// Built once per forward and shared by every layer.
pub fn attention_mask(
    b: usize,
    t: usize,
    past: usize,
    span: &AttentionSpan<'_>,
    device: &Device,
) -> Result<Tensor> {
    attention_mask_windowed(b, t, past, span, None, device)
}

/// [`attention_mask`] with an optional sliding window (Mistral): query `i` sees keys
/// `i - window + 1 ..= i` only.
///
/// A padding query that would see no key at all (left padding under a causal span) is let see
/// itself, so its softmax stays finite; nothing reads its output.
pub fn attention_mask_windowed(
    b: usize,
    t: usize,
    past: usize,
    span: &AttentionSpan<'_>,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let s = past + t;
    let (causal, seg, keys) = match span {
        AttentionSpan::Causal => (true, None, None),
        AttentionSpan::CausalSegments(seg) => {
            (true, Some(seg.flatten_all()?.to_vec1::<u32>()?), None)
        }
        AttentionSpan::CausalPadded(k) => (true, None, Some(k.flatten_all()?.to_vec1::<u32>()?)),
        AttentionSpan::Bidirectional(k) => (false, None, Some(k.flatten_all()?.to_vec1::<u32>()?)),
    };
    let rows = if seg.is_some() || keys.is_some() {
        b
    } else {
        1
    };
    for (what, v) in [("segments", &seg), ("padding mask", &keys)] {
        if let Some(v) = v {
            if v.len() != b * t {
                candle_core::bail!("{what} hold {} entries for {b} x {t} tokens", v.len());
            }
        }
    }
    let mut m = vec![0f32; rows * t * s];
    for r in 0..rows {
        for i in 0..t {
            let q = past + i;
            let row = &mut m[(r * t + i) * s..(r * t + i + 1) * s];
            for (j, slot) in row.iter_mut().enumerate() {
                let order_ok = !causal || (j <= q && window.is_none_or(|w| q - j < w));
                let same_doc = match &seg {
                    // Segments cover the new tokens only; packing is a training-time feature.
                    Some(sg) if j >= past => sg[r * t + (j - past)] == sg[r * t + i],
                    _ => true,
                };
                let real_key = match &keys {
                    Some(k) if j >= past => k[r * t + (j - past)] != 0,
                    _ => true,
                };
                if !(order_ok && same_doc && real_key) {
                    *slot = f32::NEG_INFINITY;
                }
            }
            if row.iter().all(|v| v.is_infinite()) {
                row[q] = 0.0;
            }
        }
    }
    Tensor::from_vec(m, (rows, 1, 1, t, s), device)
}

/// The attention core: projections `q` `[b, t, heads·d]`, `k`, `v` `[b, t, kv_heads·d]` to the
/// output `[b, t, heads·d]`, rotated by `rope` at `pos`, masked by `mask` (from
/// [`attention_mask`]); extends `cache` when given.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    heads: (usize, usize, usize),
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: &Rope,
    pos: &Tensor,
    mask: &Tensor,
    cache: Option<&mut Option<(Tensor, Tensor)>>,
) -> Result<Tensor> {
    match cache {
        None if ops::fused_applies(q) => {
            let (cos, sin) = rope.host_tables();
            FusedAttention::new(heads, cos, sin, pos, mask)?.forward(q, k, v)
        }
        cache => attention_composite(heads, q, k, v, rope, pos, mask, cache),
    }
}

/// [`attention`] in training mode with `dropout` on the attention probabilities (BERT's
/// `attention_probs_dropout_prob`).
#[allow(clippy::too_many_arguments)]
pub fn attention_with_dropout(
    heads: (usize, usize, usize),
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: &Rope,
    pos: &Tensor,
    mask: &Tensor,
    dropout: HashDropout,
) -> Result<Tensor> {
    composite(heads, q, k, v, rope, pos, mask, None, Some(dropout))
}

/// [`attention`] from candle's primitive ops (the reference for [`FusedAttention`], and the
/// generation path).
#[allow(clippy::too_many_arguments)]
pub fn attention_composite(
    heads: (usize, usize, usize),
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: &Rope,
    pos: &Tensor,
    mask: &Tensor,
    cache: Option<&mut Option<(Tensor, Tensor)>>,
) -> Result<Tensor> {
    composite(heads, q, k, v, rope, pos, mask, cache, None)
}

#[allow(clippy::too_many_arguments)]
fn composite(
    (h, kvh, d): (usize, usize, usize),
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: &Rope,
    pos: &Tensor,
    mask: &Tensor,
    cache: Option<&mut Option<(Tensor, Tensor)>>,
    probs_dropout: Option<HashDropout>,
) -> Result<Tensor> {
    let (b, t, _) = q.dims3()?;
    let q = q.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?;
    let k = k.reshape((b, t, kvh, d))?.transpose(1, 2)?.contiguous()?;
    let v = v.reshape((b, t, kvh, d))?.transpose(1, 2)?.contiguous()?;
    let q = rope.apply(&q, pos)?;
    let mut k = rope.apply(&k, pos)?;
    let mut v = v;
    let past = match cache {
        Some(slot) => {
            let past = slot.as_ref().map_or(0, |(pk, _)| pk.dims()[2]);
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
            past
        }
        None => 0,
    };
    let s = k.dims()[2];
    // Group query heads by their key/value head instead of copying k and v per group:
    // q [b, kv, g*t, d] · kᵀ [b, kv, d, s].
    let g = h / kvh;
    let qg = q.reshape((b, kvh, g * t, d))?;
    let scores = (qg.matmul(&k.t()?.contiguous()?)? * (1.0 / (d as f64).sqrt()))?;
    let scores = scores.reshape((b, kvh, g, t, s))?;
    if mask.dim(D::Minus1)? != past + t {
        candle_core::bail!(
            "attention mask covers {} keys, expected {}",
            mask.dim(D::Minus1)?,
            past + t
        );
    }
    let scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
    let probs = softmax_last_dim(&scores)?.reshape((b, kvh, g * t, s))?;
    let probs = match probs_dropout {
        Some(d) => d.forward(&probs.contiguous()?)?,
        None => probs,
    };
    let out = probs.matmul(&v)?.reshape((b, h, t, d))?;
    out.transpose(1, 2)?.reshape((b, t, h * d))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which (query, key) pairs of a 4-token mask are allowed, row-major, for row `r`.
    fn allowed(span: &AttentionSpan<'_>, window: Option<usize>, r: usize) -> Vec<bool> {
        attention_mask_windowed(2, 4, 0, span, window, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .skip(r * 16)
            .take(16)
            .map(|v| v.is_finite())
            .collect()
    }

    #[test]
    fn mask_is_causal_per_segment_and_windowed() {
        let seg = Tensor::new(&[[0u32, 0, 1, 1], [0, 0, 1, 1]], &Device::Cpu).unwrap();
        #[rustfmt::skip]
        let want = [true, false, false, false,
                    true, true, false, false,
                    false, false, true, false,
                    false, false, true, true];
        assert_eq!(allowed(&AttentionSpan::CausalSegments(&seg), None, 0), want);
        #[rustfmt::skip]
        let want = [true, false, false, false,
                    true, true, false, false,
                    false, true, true, false,
                    false, false, true, true];
        assert_eq!(allowed(&AttentionSpan::Causal, Some(2), 0), want);
    }

    #[test]
    fn padding_keys_are_hidden_both_ways() {
        let keys = Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 0, 0]], &Device::Cpu).unwrap();
        #[rustfmt::skip]
        let want = [true, true, false, false,
                    true, true, false, false,
                    true, true, false, false,
                    true, true, false, false];
        assert_eq!(allowed(&AttentionSpan::Bidirectional(&keys), None, 1), want);
        assert!(allowed(&AttentionSpan::Bidirectional(&keys), None, 0)
            .iter()
            .all(|&a| a));
        #[rustfmt::skip]
        let want = [true, false, false, false,
                    true, true, false, false,
                    true, true, false, false,
                    true, true, false, false];
        assert_eq!(allowed(&AttentionSpan::CausalPadded(&keys), None, 1), want);
        // Left padding: the first query sees no real key, so it is let see itself.
        let left = Tensor::new(&[[0u32, 1, 1, 1], [1, 1, 1, 1]], &Device::Cpu).unwrap();
        let got = allowed(&AttentionSpan::CausalPadded(&left), None, 0);
        assert_eq!(&got[..4], &[true, false, false, false]);
        assert_eq!(&got[4..8], &[false, true, false, false]);
    }

    #[test]
    fn identity_rope_rotates_nothing() {
        let rope = Rope::identity(4, 8, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 2, 3, 4), &Device::Cpu).unwrap();
        let pos = Tensor::new(&[[0u32, 5, 7]], &Device::Cpu).unwrap();
        let y = rope.apply(&x, &pos).unwrap();
        let d = (y - &x).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }
}
