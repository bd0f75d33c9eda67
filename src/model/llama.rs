//! The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM), top to bottom as in the equations,
//! every op differentiable.
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

use candle_core::{DType, Device, Result, Tensor, D};

use super::attention::{attention, Rope};
use super::classifier::SequenceClassifier;
use super::config::{base_inv_freq, projection_path, LlamaConfig, RopeScaling};
use super::linear::Linear;
use super::ops;
use super::transformer::{
    embedding_lookup, Family, LayerContext, ModelInfo, ModuleMut, ModuleRef, ParamRef,
    TokenEmbedding, TokenEmbeddingMut, WeightLayout,
};
use crate::lora::embedding::EmbeddingAdapter;
use crate::lora::LoraAdapter;

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
    /// `(heads, kv_heads, head_dim)`.
    pub fn heads(&self) -> (usize, usize, usize) {
        (self.n_heads, self.n_kv, self.head_dim)
    }

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
    /// from [`super::attention::attention_mask`]; `cache`: this layer's past keys/values.
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
        let out = attention((h, kvh, d), &q, &k, &v, rope, pos, mask, cache)?;
        self.o_proj.forward(&out.reshape((b, t, h * d))?, train)
    }
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
    /// The norms' epsilon.
    pub fn eps(&self) -> f64 {
        self.eps
    }

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
    /// LoRA on the token embedding.
    pub embed_adapter: Option<EmbeddingAdapter>,
    /// LoRA on the untied head.
    pub head_adapter: Option<LoraAdapter>,
    /// RoPE tables.
    pub rope: Rope,
    /// Dtype activations are computed in.
    pub compute_dtype: DType,
    /// The `score` head of `LlamaForSequenceClassification`-style models.
    pub classifier: Option<SequenceClassifier>,
    info: ModelInfo,
}

impl Llama {
    /// Assemble the model; RoPE tables cover `max_positions` positions.
    pub fn new(
        cfg: LlamaConfig,
        embed_tokens: Tensor,
        layers: Vec<DecoderLayer>,
        norm: Tensor,
        lm_head: Option<Tensor>,
        max_positions: usize,
        compute_dtype: DType,
    ) -> Result<Self> {
        let rope = Rope::from_inv_freq(&rope_inv_freq(&cfg), max_positions, embed_tokens.device())?;
        let info = ModelInfo {
            model_type: cfg.model_type.clone(),
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_layers: cfg.num_hidden_layers,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            max_position_embeddings: cfg.max_position_embeddings,
            bos_token_id: cfg.bos_token_id,
            eos_token_ids: cfg.eos_token_ids.clone(),
            pad_token_id: cfg.pad_token_id,
        };
        Ok(Self {
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            embed_adapter: None,
            head_adapter: None,
            rope,
            compute_dtype,
            classifier: None,
            info,
        })
    }
}

impl Family for Llama {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    fn sliding_window(&self) -> Option<usize> {
        self.cfg.sliding_window
    }

    /// `embed_tokens[ids]`; positions enter through RoPE inside each layer.
    fn embed(
        &self,
        ids: &Tensor,
        _pos: &Tensor,
        _token_types: Option<&Tensor>,
        _train: bool,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        embedding_lookup(
            &self.embed_tokens,
            self.embed_adapter.as_ref(),
            &ids.flatten_all()?,
            self.compute_dtype,
        )?
        .reshape((b, t, self.cfg.hidden_size))
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn layer(
        &self,
        i: usize,
        h: &Tensor,
        ctx: &LayerContext,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        train: bool,
    ) -> Result<Tensor> {
        let layer = self
            .layers
            .get(i)
            .ok_or_else(|| candle_core::Error::Msg(format!("no layer {i}")))?;
        layer.forward(h, &self.rope, &ctx.pos, &ctx.mask, cache, train)
    }

    fn finish(&self, h: &Tensor) -> Result<Tensor> {
        rms_norm(h, &self.norm, self.cfg.rms_norm_eps)
    }

    fn token_embedding(&self) -> TokenEmbedding<'_> {
        TokenEmbedding {
            path: "model.embed_tokens",
            weight: &self.embed_tokens,
            adapter: self.embed_adapter.as_ref(),
            tied_head: self.lm_head.is_none() && self.lm_head().is_some(),
        }
    }

    fn head_adapter(&self) -> Option<&LoraAdapter> {
        self.head_adapter.as_ref()
    }

    fn head_adapter_mut(&mut self) -> Option<(&mut Tensor, &mut Option<LoraAdapter>)> {
        self.lm_head.as_mut().map(|h| (h, &mut self.head_adapter))
    }

    fn token_embedding_mut(&mut self) -> TokenEmbeddingMut<'_> {
        let decoder_head = !self.cfg.sequence_classification || self.cfg.tie_word_embeddings;
        TokenEmbeddingMut {
            path: "model.embed_tokens",
            weight: &mut self.embed_tokens,
            adapter: &mut self.embed_adapter,
            head: decoder_head.then_some(&mut self.lm_head),
        }
    }

    /// The LM head; a `*ForSequenceClassification` checkpoint (untied, no `lm_head.weight`)
    /// has none.
    fn lm_head(&self) -> Option<&Tensor> {
        match &self.lm_head {
            Some(h) => Some(h),
            None if self.cfg.sequence_classification && !self.cfg.tie_word_embeddings => None,
            None => Some(&self.embed_tokens),
        }
    }

    fn linears(&self) -> Vec<ModuleRef<'_>> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for (li, layer) in self.layers.iter().enumerate() {
            for (index, (proj, linear)) in layer.projections().into_iter().enumerate() {
                out.push(ModuleRef {
                    path: projection_path(li, proj),
                    layer: li,
                    index,
                    layout: WeightLayout::OutIn,
                    linear,
                });
            }
        }
        out
    }

    fn linears_mut(&mut self) -> Vec<ModuleMut<'_>> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for (li, layer) in self.layers.iter_mut().enumerate() {
            for (index, (proj, linear)) in layer.projections_mut().into_iter().enumerate() {
                out.push(ModuleMut {
                    path: projection_path(li, proj),
                    layer: li,
                    index,
                    layout: WeightLayout::OutIn,
                    linear,
                });
            }
        }
        out
    }

    fn classifier(&self) -> Option<&SequenceClassifier> {
        self.classifier.as_ref()
    }

    fn classifier_mut(&mut self) -> Option<&mut SequenceClassifier> {
        self.classifier.as_mut()
    }

    fn set_classifier(&mut self, classifier: Option<SequenceClassifier>) -> Result<()> {
        self.classifier = classifier;
        Ok(())
    }

    fn params(&self) -> Vec<(String, ParamRef<'_>)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            ParamRef::Dense(&self.embed_tokens),
        )];
        for (li, layer) in self.layers.iter().enumerate() {
            out.push((
                format!("model.layers.{li}.input_layernorm.weight"),
                ParamRef::Dense(&layer.input_layernorm),
            ));
            for (proj, lin) in layer.projections() {
                let path = projection_path(li, proj);
                out.push((
                    format!("{path}.weight"),
                    ParamRef::Weight(lin, WeightLayout::OutIn),
                ));
                if lin.bias.is_some() {
                    out.push((format!("{path}.bias"), ParamRef::Bias(lin)));
                }
            }
            out.push((
                format!("model.layers.{li}.post_attention_layernorm.weight"),
                ParamRef::Dense(&layer.post_attention_layernorm),
            ));
        }
        out.push(("model.norm.weight".to_string(), ParamRef::Dense(&self.norm)));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), ParamRef::Dense(head)));
        }
        out
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
}
