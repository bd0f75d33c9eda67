//! GPT-2 (`GPT2LMHeadModel`), top to bottom as in the equations:
//!
//! h0 = wte[ids] + wpe[pos]
//! for each block: a = h + c_proj(attn(split₃(c_attn(ln_1(h)))))
//!                 h = a + mlp.c_proj(gelu_new(c_fc(ln_2(a))))
//! logits = ln_f(h) · wteᵀ          (the head is tied to the token embeddings)
//!
//! In training mode the config's dropouts apply (`embd_pdrop`, `attn_pdrop`, `resid_pdrop`), with
//! masks from the trainer's seed.
//!
//! GPT-2's checkpoints store every projection as a `Conv1D` weight `[in, out]`; the loader
//! transposes them to `[out, in]` once (as transformers does before quantizing them to 4-bit),
//! so the projections are ordinary [`Linear`] layers, and [`WeightLayout::InOut`] tells the
//! exporter and PEFT (`fan_in_fan_out`) to write them back the checkpoint's way.

use candle_core::{DType, Device, Result, Tensor};
use serde_json::Value;

use super::attention::{attention, attention_with_dropout, Rope};
use super::error::ModelError;
use super::layer_norm::LayerNorm;
use super::linear::Linear;
use super::loader::{check_shape, load_linear, LoadOptions, TensorSource};
use super::transformer::{
    embedding_lookup, Family, LayerContext, ModelInfo, ModuleMut, ModuleRef, ParamRef,
    TokenEmbedding, TokenEmbeddingMut, WeightLayout,
};
use crate::lora::dropout::HashDropout;
use crate::lora::embedding::EmbeddingAdapter;
use crate::lora::DropoutSeed;
use crate::lora::LoraAdapter;

/// The MLP activations GPT-2 checkpoints name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact erf form.
    GeluErf,
    /// `relu`.
    Relu,
}

impl Activation {
    /// Parse transformers' `activation_function` / `hidden_act` names.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            "gelu" => Some(Self::GeluErf),
            "relu" => Some(Self::Relu),
            _ => None,
        }
    }

    /// Apply it.
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::GeluTanh => x.gelu(),
            Self::GeluErf => x.gelu_erf(),
            Self::Relu => x.relu(),
        }
    }
}

/// GPT-2's `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct Gpt2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Learned positions (`n_positions`).
    pub n_positions: usize,
    /// Width (`n_embd`).
    pub n_embd: usize,
    /// Blocks (`n_layer`).
    pub n_layer: usize,
    /// Heads (`n_head`).
    pub n_head: usize,
    /// MLP width (`n_inner`, default 4 · n_embd).
    pub n_inner: usize,
    /// MLP activation (`activation_function`).
    pub activation: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f64,
    /// The head shares the token embeddings.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token.
    pub eos_token_id: Option<u32>,
    /// Padding token.
    pub pad_token_id: Option<u32>,
    /// Dropout on the summed embeddings in training mode (`embd_pdrop`).
    pub embd_pdrop: f32,
    /// Dropout on the attention probabilities in training mode (`attn_pdrop`).
    pub attn_pdrop: f32,
    /// Dropout on each block's attention and MLP outputs in training mode (`resid_pdrop`).
    pub resid_pdrop: f32,
}

impl Gpt2Config {
    /// Parse an HF GPT-2 config; fields that change the math and are not implemented are
    /// refused by name.
    pub fn from_json(v: &Value) -> std::result::Result<Self, String> {
        use crate::json_fields::{opt_f64, optional};
        let usize_field = |k: &str| crate::json_fields::usize_field(v, k);
        let opt_u32 = |k: &str| crate::json_fields::opt_u32(v, k);
        let flag = |k: &str| crate::json_fields::opt_bool(v, k);
        let n_embd = usize_field("n_embd")?;
        let n_head = usize_field("n_head")?;
        if n_head == 0 || n_embd == 0 || n_embd % n_head != 0 {
            return Err(format!(
                "`n_embd` ({n_embd}) must be a positive multiple of `n_head` ({n_head})"
            ));
        }
        let act_name = optional(
            v,
            "activation_function",
            |x| x.as_str().map(str::to_string),
            "a string",
        )?
        .unwrap_or_else(|| "gelu_new".into());
        let act_name = act_name.as_str();
        let activation = Activation::parse(act_name).ok_or(format!(
            "`activation_function` `{act_name}` is not supported (gelu_new, gelu, relu)"
        ))?;
        for (key, ok) in [
            ("scale_attn_weights", true),
            ("scale_attn_by_inverse_layer_idx", false),
            ("add_cross_attention", false),
        ] {
            if flag(key)?.is_some_and(|x| x != ok) {
                return Err(format!("`{key}: {}` is not supported", !ok));
            }
        }
        let prob = |k: &str| -> std::result::Result<f32, String> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(0.1),
                Some(x) => x
                    .as_f64()
                    .filter(|p| (0.0..1.0).contains(p))
                    .map(|p| p as f32)
                    .ok_or(format!("`{k}` must be a probability in [0, 1), got {x}")),
            }
        };
        let eps = opt_f64(v, "layer_norm_epsilon")?.unwrap_or(1e-5);
        if !(eps > 0.0 && eps.is_finite()) {
            return Err(format!("`layer_norm_epsilon` must be positive, got {eps}"));
        }
        Ok(Self {
            vocab_size: usize_field("vocab_size")?,
            n_positions: usize_field("n_positions")?,
            n_embd,
            n_layer: usize_field("n_layer")?,
            n_head,
            n_inner: match v.get("n_inner") {
                None | Some(Value::Null) => 4 * n_embd,
                Some(_) => usize_field("n_inner")?,
            },
            activation,
            layer_norm_epsilon: eps,
            tie_word_embeddings: flag("tie_word_embeddings")?.unwrap_or(true),
            bos_token_id: opt_u32("bos_token_id")?,
            eos_token_id: opt_u32("eos_token_id")?,
            pad_token_id: opt_u32("pad_token_id")?,
            embd_pdrop: prob("embd_pdrop")?,
            attn_pdrop: prob("attn_pdrop")?,
            resid_pdrop: prob("resid_pdrop")?,
        })
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
}

/// Causal self-attention with a fused `c_attn` (q, k, v stacked on the output axis).
#[derive(Clone, Debug)]
pub struct Gpt2Attention {
    /// `[3 · n_embd, n_embd]` (stored `[n_embd, 3 · n_embd]`).
    pub c_attn: Linear,
    /// Output projection.
    pub c_proj: Linear,
    n_head: usize,
    head_dim: usize,
}

impl Gpt2Attention {
    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        ctx: &LayerContext,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        train: bool,
        probs_dropout: Option<HashDropout>,
    ) -> Result<Tensor> {
        let width = self.n_head * self.head_dim;
        let qkv = self.c_attn.forward(x, train)?;
        let q = qkv.narrow(2, 0, width)?.contiguous()?;
        let k = qkv.narrow(2, width, width)?.contiguous()?;
        let v = qkv.narrow(2, 2 * width, width)?.contiguous()?;
        let heads = (self.n_head, self.n_head, self.head_dim);
        let out = match probs_dropout {
            Some(d) => attention_with_dropout(heads, &q, &k, &v, rope, &ctx.pos, &ctx.mask, d)?,
            None => attention(heads, &q, &k, &v, rope, &ctx.pos, &ctx.mask, cache)?,
        };
        self.c_proj.forward(&out, train)
    }
}

/// The MLP: `c_proj(act(c_fc(x)))`.
#[derive(Clone, Debug)]
pub struct Gpt2Mlp {
    /// Up projection.
    pub c_fc: Linear,
    /// Down projection.
    pub c_proj: Linear,
    activation: Activation,
}

/// One pre-LayerNorm block.
#[derive(Clone, Debug)]
pub struct Gpt2Block {
    /// Norm before attention.
    pub ln_1: LayerNorm,
    /// Attention.
    pub attn: Gpt2Attention,
    /// Norm before the MLP.
    pub ln_2: LayerNorm,
    /// MLP.
    pub mlp: Gpt2Mlp,
}

impl Gpt2Block {
    /// The four linear layers by their module names within the block.
    fn linears(&self) -> [(&'static str, &Linear); 4] {
        [
            ("attn.c_attn", &self.attn.c_attn),
            ("attn.c_proj", &self.attn.c_proj),
            ("mlp.c_fc", &self.mlp.c_fc),
            ("mlp.c_proj", &self.mlp.c_proj),
        ]
    }

    fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 4] {
        [
            ("attn.c_attn", &mut self.attn.c_attn),
            ("attn.c_proj", &mut self.attn.c_proj),
            ("mlp.c_fc", &mut self.mlp.c_fc),
            ("mlp.c_proj", &mut self.mlp.c_proj),
        ]
    }
}

/// The GPT-2 language model.
#[derive(Clone, Debug)]
pub struct Gpt2 {
    /// Configuration.
    pub cfg: Gpt2Config,
    /// Token embeddings `[vocab, n_embd]` (also the head).
    pub wte: Tensor,
    /// Position embeddings `[n_positions, n_embd]`.
    pub wpe: Tensor,
    /// Blocks.
    pub h: Vec<Gpt2Block>,
    /// Final norm.
    pub ln_f: LayerNorm,
    /// Untied head `[vocab, n_embd]`, if the checkpoint has one.
    pub lm_head: Option<Tensor>,
    /// LoRA on the token embedding.
    pub embed_adapter: Option<EmbeddingAdapter>,
    /// LoRA on the untied head.
    pub head_adapter: Option<LoraAdapter>,
    /// No rotation: GPT-2's positions are the learned `wpe` rows.
    rope: Rope,
    /// Seed of the training-mode dropout masks (set by the trainer before each step).
    dropout_seed: DropoutSeed,
    compute_dtype: DType,
    info: ModelInfo,
}

/// Checkpoint path of block `i`.
fn block_path(i: usize) -> String {
    format!("transformer.h.{i}")
}

impl Gpt2 {
    /// Load from a source of HF-named tensors. Checkpoints saved by transformers name the
    /// tensors `transformer.*`; the original OpenAI conversions leave the prefix out, and carry
    /// each block's causal-mask buffer `attn.bias`, which holds no weights.
    pub(crate) fn load(
        cfg: &Gpt2Config,
        src: &mut dyn TensorSource,
        opts: &LoadOptions,
    ) -> std::result::Result<Self, ModelError> {
        let prefix = if src.has("transformer.wte.weight") || !src.has("wte.weight") {
            "transformer."
        } else {
            ""
        };
        let dev = &opts.device;
        let wdt = opts.weight_dtype.unwrap_or(opts.compute_dtype);
        let (e, inner) = (cfg.n_embd, cfg.n_inner);
        let mut dense = |name: &str, shape: &[usize]| {
            let name = format!("{prefix}{name}");
            let t = src.dense(&name)?;
            check_shape(&name, &t, shape)?;
            Ok::<_, ModelError>(t.to_dtype(wdt)?.to_device(dev)?)
        };
        let wte = dense("wte.weight", &[cfg.vocab_size, e])?;
        let wpe = dense("wpe.weight", &[cfg.n_positions, e])?;
        let norm = |src: &mut dyn TensorSource, name: &str| {
            let read = |src: &mut dyn TensorSource, key: String| {
                let t = src.dense(&key)?;
                check_shape(&key, &t, &[e])?;
                Ok::<_, ModelError>(t.to_dtype(wdt)?.to_device(dev)?)
            };
            Ok::<_, ModelError>(LayerNorm {
                weight: read(src, format!("{prefix}{name}.weight"))?,
                bias: read(src, format!("{prefix}{name}.bias"))?,
                eps: cfg.layer_norm_epsilon,
            })
        };
        super::loader::refuse_extra_layer(src, cfg.n_layer, "n_layer", |n| {
            format!("{prefix}h.{n}.ln_1.weight")
        })?;
        let mut h = Vec::new();
        for i in 0..cfg.n_layer {
            let p = format!("{prefix}h.{i}");
            let mut lin = |name: &str, out: usize, inp: usize| {
                load_linear(
                    src,
                    &format!("{p}.{name}"),
                    (out, inp),
                    true,
                    WeightLayout::InOut,
                    opts,
                )
            };
            let c_attn = lin("attn.c_attn", 3 * e, e)?;
            let c_proj = lin("attn.c_proj", e, e)?;
            let c_fc = lin("mlp.c_fc", inner, e)?;
            let mlp_proj = lin("mlp.c_proj", e, inner)?;
            h.push(Gpt2Block {
                ln_1: norm(src, &format!("h.{i}.ln_1"))?,
                attn: Gpt2Attention {
                    c_attn,
                    c_proj,
                    n_head: cfg.n_head,
                    head_dim: cfg.head_dim(),
                },
                ln_2: norm(src, &format!("h.{i}.ln_2"))?,
                mlp: Gpt2Mlp {
                    c_fc,
                    c_proj: mlp_proj,
                    activation: cfg.activation,
                },
            });
        }
        let ln_f = norm(src, "ln_f")?;
        // As in transformers 5: a stored `lm_head.weight` is used even when the config ties it.
        let lm_head = if cfg.tie_word_embeddings && !src.has("lm_head.weight") {
            None
        } else {
            super::loader::untied_head_present(src)?;
            let t = src.dense("lm_head.weight")?;
            check_shape("lm_head.weight", &t, &[cfg.vocab_size, e])?;
            Some(t.to_dtype(wdt)?.to_device(dev)?)
        };
        let max_positions =
            super::loader::positions(opts, cfg.n_positions, "n_positions", cfg.n_positions)?;
        Ok(Self::new(
            cfg.clone(),
            wte,
            wpe,
            h,
            ln_f,
            lm_head,
            max_positions,
            opts.compute_dtype,
        )?)
    }

    /// Assemble the model; `max_positions` (at most `n_positions`) bounds the sequence length.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Gpt2Config,
        wte: Tensor,
        wpe: Tensor,
        h: Vec<Gpt2Block>,
        ln_f: LayerNorm,
        lm_head: Option<Tensor>,
        max_positions: usize,
        compute_dtype: DType,
    ) -> Result<Self> {
        let rope = Rope::identity(cfg.head_dim(), max_positions, wte.device())?;
        let info = ModelInfo {
            model_type: "gpt2".into(),
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.n_embd,
            intermediate_size: cfg.n_inner,
            num_layers: cfg.n_layer,
            num_heads: cfg.n_head,
            num_kv_heads: cfg.n_head,
            max_position_embeddings: cfg.n_positions,
            bos_token_id: cfg.bos_token_id,
            eos_token_ids: cfg.eos_token_id.into_iter().collect(),
            pad_token_id: cfg.pad_token_id,
        };
        Ok(Self {
            cfg,
            wte,
            wpe,
            h,
            ln_f,
            lm_head,
            embed_adapter: None,
            head_adapter: None,
            rope,
            dropout_seed: DropoutSeed::default(),
            compute_dtype,
            info,
        })
    }

    /// Dropout `p` at site `site` (0: embeddings; then three per block) in training mode, from
    /// the shared seed, so a recomputed block drops what it dropped before.
    fn dropout(&self, x: Tensor, p: f32, train: bool, site: u64) -> Result<Tensor> {
        if train && p > 0.0 {
            self.dropout_seed
                .dropout(p, DROPOUT_SITES + site)?
                .forward(&x.contiguous()?)
        } else {
            Ok(x)
        }
    }
}

/// Dropout keys of GPT-2's own sites start here, clear of the adapters' keys.
const DROPOUT_SITES: u64 = 1 << 40;

impl Family for Gpt2 {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        self.wte.device()
    }

    fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    /// `wte[ids] + wpe[pos]`.
    fn embed(
        &self,
        ids: &Tensor,
        pos: &Tensor,
        _token_types: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let e = self.cfg.n_embd;
        let cd = self.compute_dtype;
        let tok = embedding_lookup(
            &self.wte,
            self.embed_adapter.as_ref(),
            &ids.flatten_all()?,
            cd,
        )?;
        let at = self
            .wpe
            .index_select(&pos.flatten_all()?, 0)?
            .to_dtype(cd)?;
        let h = (tok + at)?.reshape((b, t, e))?;
        self.dropout(h, self.cfg.embd_pdrop, train, 0)
    }

    fn num_layers(&self) -> usize {
        self.h.len()
    }

    fn layer(
        &self,
        i: usize,
        x: &Tensor,
        ctx: &LayerContext,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        train: bool,
    ) -> Result<Tensor> {
        let block = self
            .h
            .get(i)
            .ok_or_else(|| candle_core::Error::Msg(format!("no block {i}")))?;
        let site = 3 * i as u64;
        let p = self.cfg.resid_pdrop;
        let attn_drop = (train && self.cfg.attn_pdrop > 0.0)
            .then(|| {
                self.dropout_seed
                    .dropout(self.cfg.attn_pdrop, DROPOUT_SITES + site + 1)
            })
            .transpose()?;
        let h = block.ln_1.forward(x)?;
        let attn = block
            .attn
            .forward(&h, &self.rope, ctx, cache, train, attn_drop)?;
        let a = (x + self.dropout(attn, p, train, site + 2)?)?;
        let m = &block.mlp;
        let up = m.c_fc.forward(&block.ln_2.forward(&a)?, train)?;
        let down = m.c_proj.forward(&m.activation.forward(&up)?, train)?;
        a + self.dropout(down, p, train, site + 3)?
    }

    fn finish(&self, h: &Tensor) -> Result<Tensor> {
        self.ln_f.forward(h)
    }

    fn share_dropout_seed(&mut self, seed: &DropoutSeed) {
        self.dropout_seed = seed.clone();
    }

    fn lm_head(&self) -> Option<&Tensor> {
        Some(self.lm_head.as_ref().unwrap_or(&self.wte))
    }

    fn token_embedding(&self) -> TokenEmbedding<'_> {
        TokenEmbedding {
            path: "transformer.wte",
            weight: &self.wte,
            adapter: self.embed_adapter.as_ref(),
            tied_head: self.lm_head.is_none(),
        }
    }

    fn head_adapter(&self) -> Option<&LoraAdapter> {
        self.head_adapter.as_ref()
    }

    fn head_adapter_mut(&mut self) -> Option<(&mut Tensor, &mut Option<LoraAdapter>)> {
        self.lm_head.as_mut().map(|h| (h, &mut self.head_adapter))
    }

    fn token_embedding_mut(&mut self) -> TokenEmbeddingMut<'_> {
        TokenEmbeddingMut {
            path: "transformer.wte",
            weight: &mut self.wte,
            adapter: &mut self.embed_adapter,
            head: Some(&mut self.lm_head),
        }
    }

    fn linears(&self) -> Vec<ModuleRef<'_>> {
        let mut out = Vec::with_capacity(self.h.len() * 4);
        for (li, block) in self.h.iter().enumerate() {
            for (index, (name, linear)) in block.linears().into_iter().enumerate() {
                out.push(ModuleRef {
                    path: format!("{}.{name}", block_path(li)),
                    layer: li,
                    index,
                    layout: WeightLayout::InOut,
                    linear,
                });
            }
        }
        out
    }

    fn linears_mut(&mut self) -> Vec<ModuleMut<'_>> {
        let mut out = Vec::with_capacity(self.h.len() * 4);
        for (li, block) in self.h.iter_mut().enumerate() {
            for (index, (name, linear)) in block.linears_mut().into_iter().enumerate() {
                out.push(ModuleMut {
                    path: format!("{}.{name}", block_path(li)),
                    layer: li,
                    index,
                    layout: WeightLayout::InOut,
                    linear,
                });
            }
        }
        out
    }

    fn params(&self) -> Vec<(String, ParamRef<'_>)> {
        fn norm<'a>(out: &mut Vec<(String, ParamRef<'a>)>, path: String, n: &'a LayerNorm) {
            out.push((format!("{path}.weight"), ParamRef::Dense(&n.weight)));
            out.push((format!("{path}.bias"), ParamRef::Dense(&n.bias)));
        }
        let mut out: Vec<(String, ParamRef<'_>)> = vec![
            ("transformer.wte.weight".into(), ParamRef::Dense(&self.wte)),
            ("transformer.wpe.weight".into(), ParamRef::Dense(&self.wpe)),
        ];
        for (li, block) in self.h.iter().enumerate() {
            let p = block_path(li);
            norm(&mut out, format!("{p}.ln_1"), &block.ln_1);
            for (name, lin) in block.linears().into_iter().take(2) {
                out.push((
                    format!("{p}.{name}.weight"),
                    ParamRef::Weight(lin, WeightLayout::InOut),
                ));
                out.push((format!("{p}.{name}.bias"), ParamRef::Bias(lin)));
            }
            norm(&mut out, format!("{p}.ln_2"), &block.ln_2);
            for (name, lin) in block.linears().into_iter().skip(2) {
                out.push((
                    format!("{p}.{name}.weight"),
                    ParamRef::Weight(lin, WeightLayout::InOut),
                ));
                out.push((format!("{p}.{name}.bias"), ParamRef::Bias(lin)));
            }
        }
        norm(&mut out, "transformer.ln_f".into(), &self.ln_f);
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".into(), ParamRef::Dense(head)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_defaults_and_refusals() {
        let base = json!({"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024,
            "n_embd": 768, "n_layer": 12, "n_head": 12});
        let c = Gpt2Config::from_json(&base).unwrap();
        assert_eq!(c.n_inner, 3072);
        assert_eq!(c.activation, Activation::GeluTanh);
        assert!(c.tie_word_embeddings);
        let mut bad = base.clone();
        bad["scale_attn_by_inverse_layer_idx"] = json!(true);
        let e = Gpt2Config::from_json(&bad).unwrap_err();
        assert!(e.contains("scale_attn_by_inverse_layer_idx"), "{e}");
        let mut bad = base.clone();
        bad["activation_function"] = json!("swish");
        let e = Gpt2Config::from_json(&bad).unwrap_err();
        assert!(e.contains("`swish`"), "{e}");
        let mut bad = base;
        bad["n_head"] = json!(7);
        assert!(Gpt2Config::from_json(&bad).unwrap_err().contains("n_head"));
    }
}
