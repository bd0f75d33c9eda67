//! The Llama-family decoder, top to bottom as in the equations, every op differentiable.
//!
//! h0 = embed(ids)
//! for each layer: a = h + o_proj(attn(rope(q_proj(n1(h))), rope(k_proj(n1(h))), v_proj(n1(h))))
//!                 h = a + down_proj(silu(gate_proj(n2(a))) * up_proj(n2(a)))
//! logits = norm(h) · lm_headᵀ
//!
//! For f32 on the CPU, RMSNorm, SwiGLU's `silu(gate)·up` and the whole attention core (RoPE,
//! scores, mask, softmax, `P·V`) run as fused ops with their own backward (`super::ops`). The
//! composite versions, written with candle's primitive ops so they differentiate, remain the
//! reference and the path for other dtypes, devices and the KV-cached generation.

use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Result, Tensor, D};

use super::config::{base_inv_freq, LlamaConfig, RopeScaling};
use super::linear::Linear;
use super::ops::{self, attention::FusedAttention};

/// RMSNorm in f32 (as transformers does), result cast back to the input dtype, times the weight.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if ops::fused_applies(x) {
        return ops::rms_norm::rms_norm_fused(x, weight, eps);
    }
    rms_norm_composite(x, weight, eps)
}

/// [`rms_norm`] from candle's primitive ops (the reference for the fused op).
pub fn rms_norm_composite(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.to_dtype(dt)?.broadcast_mul(&weight.to_dtype(dt)?)
}

/// Softmax over the last dimension; the max shift is detached (it cancels mathematically).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// RoPE inverse frequencies with the config's scaling applied, in f32 as transformers has them.
pub fn rope_inv_freq(cfg: &LlamaConfig) -> Vec<f32> {
    let mut inv_freq = base_inv_freq(cfg.head_dim, cfg.rope_theta);
    match cfg.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            for f in &mut inv_freq {
                *f /= factor as f32;
            }
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            for f in &mut inv_freq {
                let freq = *f as f64;
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let scaled = if wavelen < high_wavelen {
                    freq
                } else if wavelen > low_wavelen {
                    freq / factor
                } else {
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * freq / factor + smooth * freq
                };
                *f = scaled as f32;
            }
        }
    }
    inv_freq
}

/// Precomputed RoPE cos/sin tables `[max_positions, head_dim]` (HF's rotate-half layout).
#[derive(Clone, Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// The same tables as plain f32 vectors, for the fused attention op.
    cos_host: Arc<Vec<f32>>,
    sin_host: Arc<Vec<f32>>,
}

impl Rope {
    /// Tables for every position up to `max_positions`.
    pub fn new(cfg: &LlamaConfig, max_positions: usize, device: &Device) -> Result<Self> {
        let d = cfg.head_dim;
        let inv_freq = rope_inv_freq(cfg);
        let mut cos = Vec::with_capacity(max_positions * d);
        let mut sin = Vec::with_capacity(max_positions * d);
        for p in 0..max_positions {
            let angles: Vec<f32> = inv_freq.iter().map(|&f| p as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos.clone(), (max_positions, d), device)?,
            sin: Tensor::from_vec(sin.clone(), (max_positions, d), device)?,
            cos_host: Arc::new(cos),
            sin_host: Arc::new(sin),
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

/// Keys and values of the positions seen so far, per layer (generation).
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache for `n_layers`.
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
        }
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dims()[2])
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
}

/// Self-attention with grouped-query heads.
#[derive(Clone, Debug)]
pub struct Attention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub o_proj: Linear,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
}

impl Attention {
    /// Build from the four projections.
    pub fn new(cfg: &LlamaConfig, q: Linear, k: Linear, v: Linear, o: Linear) -> Self {
        Self {
            q_proj: q,
            k_proj: k,
            v_proj: v,
            o_proj: o,
            n_heads: cfg.num_attention_heads,
            n_kv: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
        }
    }

    /// `x`: `[b, t, hidden]`; `pos`: `[b, t]` positions; `mask`: additive `[b|1, 1, 1, t, s]`
    /// from [`attention_mask`]; `cache`: this layer's past keys/values.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        pos: &Tensor,
        mask: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kvh, d) = (self.n_heads, self.n_kv, self.head_dim);
        let q = self.q_proj.forward(x, train)?;
        let k = self.k_proj.forward(x, train)?;
        let v = self.v_proj.forward(x, train)?;
        let out = match cache {
            None if ops::fused_applies(&q) => {
                let (cos, sin) = rope.host_tables();
                FusedAttention::new((h, kvh, d), cos, sin, pos, mask)?.forward(&q, &k, &v)?
            }
            cache => attention_composite((h, kvh, d), &q, &k, &v, rope, pos, mask, cache)?,
        };
        self.o_proj.forward(&out.reshape((b, t, h * d))?, train)
    }
}

/// The attention core from candle's primitive ops: projections `q` `[b, t, heads·d]`, `k`, `v`
/// `[b, t, kv_heads·d]` to the output `[b, t, heads·d]`, extending `cache` when given (the
/// reference for [`FusedAttention`], and the generation path).
#[allow(clippy::too_many_arguments)]
pub fn attention_composite(
    (h, kvh, d): (usize, usize, usize),
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: &Rope,
    pos: &Tensor,
    mask: &Tensor,
    cache: Option<&mut Option<(Tensor, Tensor)>>,
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
    let out = probs.matmul(&v)?.reshape((b, h, t, d))?;
    out.transpose(1, 2)?.reshape((b, t, h * d))
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
pub fn attention_mask_windowed(
    b: usize,
    t: usize,
    past: usize,
    span: &AttentionSpan<'_>,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let s = past + t;
    let seg: Option<Vec<u32>> = match span {
        AttentionSpan::Causal => None,
        AttentionSpan::CausalSegments(seg) => Some(seg.flatten_all()?.to_vec1::<u32>()?),
    };
    let rows = if seg.is_some() { b } else { 1 };
    let mut m = vec![0f32; rows * t * s];
    for r in 0..rows {
        for i in 0..t {
            for j in 0..s {
                let q = past + i;
                let causal_ok = j <= q && window.is_none_or(|w| q - j < w);
                let same_doc = match &seg {
                    // Segments cover the new tokens only; packing is a training-time feature.
                    Some(sg) if j >= past => sg[r * t + (j - past)] == sg[r * t + i],
                    _ => true,
                };
                if !(causal_ok && same_doc) {
                    m[(r * t + i) * s + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Tensor::from_vec(m, (rows, 1, 1, t, s), device)
}

/// SwiGLU MLP.
#[derive(Clone, Debug)]
pub struct Mlp {
    /// Gate projection.
    pub gate_proj: Linear,
    /// Up projection.
    pub up_proj: Linear,
    /// Down projection.
    pub down_proj: Linear,
}

impl Mlp {
    /// `down(silu(gate(x)) * up(x))`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x, train)?;
        let up = self.up_proj.forward(x, train)?;
        let act = if ops::fused_applies(&gate) {
            ops::swiglu::silu_mul(&gate, &up)?
        } else {
            (gate.silu()? * up)?
        };
        self.down_proj.forward(&act, train)
    }
}

/// One decoder layer.
#[derive(Clone, Debug)]
pub struct DecoderLayer {
    /// Norm before attention.
    pub input_layernorm: Tensor,
    /// Self-attention.
    pub self_attn: Attention,
    /// Norm before the MLP.
    pub post_attention_layernorm: Tensor,
    /// MLP.
    pub mlp: Mlp,
    eps: f64,
}

impl DecoderLayer {
    /// Assemble a layer.
    pub fn new(
        cfg: &LlamaConfig,
        input_layernorm: Tensor,
        self_attn: Attention,
        post_attention_layernorm: Tensor,
        mlp: Mlp,
    ) -> Self {
        Self {
            input_layernorm,
            self_attn,
            post_attention_layernorm,
            mlp,
            eps: cfg.rms_norm_eps,
        }
    }

    /// Residual attention block, then residual MLP block.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        pos: &Tensor,
        mask: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        train: bool,
    ) -> Result<Tensor> {
        let h = rms_norm(x, &self.input_layernorm, self.eps)?;
        let a = (x + self.self_attn.forward(&h, rope, pos, mask, cache, train)?)?;
        let h = rms_norm(&a, &self.post_attention_layernorm, self.eps)?;
        a + self.mlp.forward(&h, train)?
    }

    /// The seven projections by short name, mutably (to attach adapters).
    pub fn projections_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        let at = &mut self.self_attn;
        let mlp = &mut self.mlp;
        [
            ("q_proj", &mut at.q_proj),
            ("k_proj", &mut at.k_proj),
            ("v_proj", &mut at.v_proj),
            ("o_proj", &mut at.o_proj),
            ("gate_proj", &mut mlp.gate_proj),
            ("up_proj", &mut mlp.up_proj),
            ("down_proj", &mut mlp.down_proj),
        ]
    }

    /// The seven projections by short name.
    pub fn projections(&self) -> [(&'static str, &Linear); 7] {
        let at = &self.self_attn;
        let mlp = &self.mlp;
        [
            ("q_proj", &at.q_proj),
            ("k_proj", &at.k_proj),
            ("v_proj", &at.v_proj),
            ("o_proj", &at.o_proj),
            ("gate_proj", &mlp.gate_proj),
            ("up_proj", &mlp.up_proj),
            ("down_proj", &mlp.down_proj),
        ]
    }
}

/// The whole causal language model.
#[derive(Clone, Debug)]
pub struct Llama {
    /// Configuration.
    pub cfg: LlamaConfig,
    /// Token embeddings `[vocab, hidden]`, frozen.
    pub embed_tokens: Tensor,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Final norm weight.
    pub norm: Tensor,
    /// Output head `[vocab, hidden]`; `None` when tied to the embeddings.
    pub lm_head: Option<Tensor>,
    /// RoPE tables.
    pub rope: Rope,
    /// Dtype activations are computed in.
    pub compute_dtype: DType,
}

impl Llama {
    /// Device the model lives on.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// The output head (the embeddings when tied).
    pub fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Positions `offset..offset + t` for every row, `[b, t]`.
    pub fn positions(&self, b: usize, t: usize, offset: usize) -> Result<Tensor> {
        let row: Vec<u32> = (offset as u32..(offset + t) as u32).collect();
        Tensor::from_vec(row, (1, t), self.device())?.repeat((b, 1))
    }

    /// Embeddings of `ids` (`[b, t]`, u32) in the compute dtype.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let e = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?;
        e.reshape((b, t, self.cfg.hidden_size))?
            .to_dtype(self.compute_dtype)
    }

    /// Hidden states after the final norm, `[b, t, hidden]`.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        pos: &Tensor,
        span: &AttentionSpan<'_>,
        cache: Option<&mut KvCache>,
        train: bool,
    ) -> Result<Tensor> {
        self.forward_layers(ids, pos, span, cache, train, true)
    }

    fn forward_layers(
        &self,
        ids: &Tensor,
        pos: &Tensor,
        span: &AttentionSpan<'_>,
        mut cache: Option<&mut KvCache>,
        train: bool,
        track_grads: bool,
    ) -> Result<Tensor> {
        let max_pos = pos.max_all()?.to_scalar::<u32>()? as usize;
        if max_pos >= self.rope.max_positions() {
            candle_core::bail!(
                "position {max_pos} is past the model's RoPE table ({} positions)",
                self.rope.max_positions()
            );
        }
        let (b, t) = ids.dims2()?;
        let past = cache.as_deref().map_or(0, KvCache::len);
        let mask =
            attention_mask_windowed(b, t, past, span, self.cfg.sliding_window, self.device())?
                .to_dtype(self.compute_dtype)?;
        let mut h = self.embed(ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            h = layer.forward(&h, &self.rope, pos, &mask, slot, train)?;
            if !track_grads {
                // Cut the autograd graph here: the adapters are `Var`s, so without this every
                // layer's intermediates would stay alive until the end of an evaluation pass.
                h = h.detach();
            }
        }
        rms_norm(&h, &self.norm, self.cfg.rms_norm_eps)
    }

    /// Hidden states after the final norm for evaluation: no dropout, and no autograd graph
    /// kept across layers, so peak memory is one layer's activations, not the whole model's.
    pub fn forward_hidden_eval(
        &self,
        ids: &Tensor,
        pos: &Tensor,
        span: &AttentionSpan<'_>,
    ) -> Result<Tensor> {
        self.forward_layers(ids, pos, span, None, false, false)
    }

    /// Logits `[b, t, vocab]` (f32) for a causal batch starting at position 0, no cache.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let pos = self.positions(b, t, 0)?;
        let h = self.forward_hidden(ids, &pos, &AttentionSpan::Causal, None, false)?;
        self.logits(&h)
    }

    /// Logits `[b, vocab]` of the token after `ids`, continuing from what `cache` holds.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let pos = self.positions(b, t, cache.len())?;
        let h = self.forward_hidden(ids, &pos, &AttentionSpan::Causal, Some(cache), false)?;
        self.last_logits(&h)
    }

    /// `h · headᵀ` in f32: `[.., hidden] -> [.., vocab]`.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        let dims = h.dims().to_vec();
        let hidden = *dims.last().unwrap_or(&0);
        let h2 = h.reshape(((), hidden))?.to_dtype(DType::F32)?;
        let head = self.head().to_dtype(DType::F32)?;
        let out = h2.matmul(&head.t()?)?;
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.cfg.vocab_size;
        out.reshape(out_dims)
    }

    /// Hidden states as transformers reports them with `output_hidden_states`: the embeddings,
    /// the output of each layer but the last, and the final normed output.
    pub fn hidden_states(&self, ids: &Tensor) -> Result<Vec<Tensor>> {
        let (b, t) = ids.dims2()?;
        let pos = self.positions(b, t, 0)?;
        let mask = attention_mask_windowed(
            b,
            t,
            0,
            &AttentionSpan::Causal,
            self.cfg.sliding_window,
            self.device(),
        )?;
        let mut h = self.embed(ids)?;
        let mut out = vec![h.clone()];
        for layer in &self.layers {
            h = layer.forward(&h, &self.rope, &pos, &mask, None, false)?;
            out.push(h.clone());
        }
        let last = out.len() - 1;
        out[last] = rms_norm(&h, &self.norm, self.cfg.rms_norm_eps)?;
        Ok(out)
    }

    /// Logits of the last position only (cheap head for generation): `[b, vocab]`.
    pub fn last_logits(&self, h: &Tensor) -> Result<Tensor> {
        let t = h.dim(1)?;
        self.logits(&h.i((.., t - 1, ..))?.contiguous()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_cpp_rope_factors_divide_into_the_scaled_frequencies() {
        use crate::model::config::llama3_rope_factors;
        use serde_json::json;
        for (d, theta, factor, old) in [(128, 500000.0, 8.0, 8192.0), (16, 10000.0, 8.0, 64.0)] {
            let cfg = LlamaConfig::from_json(&json!({"model_type": "llama", "vocab_size": 8,
                "hidden_size": d * 2, "intermediate_size": 8, "num_hidden_layers": 1,
                "num_attention_heads": 2, "rope_theta": theta, "rms_norm_eps": 1e-5,
                "rope_scaling": {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": old}}))
            .unwrap();
            let plain = LlamaConfig {
                rope_scaling: RopeScaling::None,
                ..cfg.clone()
            };
            let factors = llama3_rope_factors(d, theta, factor, 1.0, 4.0, old);
            let scaled = rope_inv_freq(&cfg);
            for ((base, f), want) in rope_inv_freq(&plain).iter().zip(&factors).zip(&scaled) {
                let got = base / f;
                assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
            }
        }
    }

    /// Which (query, key) pairs of a 4-token mask are allowed, row-major.
    fn allowed(span: &AttentionSpan<'_>, window: Option<usize>) -> Vec<bool> {
        attention_mask_windowed(1, 4, 0, span, window, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.is_finite())
            .collect()
    }

    #[test]
    fn mask_is_causal_per_segment_and_windowed() {
        let seg = Tensor::new(&[[0u32, 0, 1, 1]], &Device::Cpu).unwrap();
        #[rustfmt::skip]
        let want = [true, false, false, false,
                    true, true, false, false,
                    false, false, true, false,
                    false, false, true, true];
        assert_eq!(allowed(&AttentionSpan::CausalSegments(&seg), None), want);
        #[rustfmt::skip]
        let want = [true, false, false, false,
                    true, true, false, false,
                    false, true, true, false,
                    false, false, true, true];
        assert_eq!(allowed(&AttentionSpan::Causal, Some(2)), want);
    }
}
