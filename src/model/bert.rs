//! BERT encoders (`BertModel`, `BertForSequenceClassification`), top to bottom as in the
//! equations:
//!
//! h0 = LayerNorm(word[ids] + position[pos] + token_type[types])
//! for each layer: a = LayerNorm(h + dense(attn(query(h), key(h), value(h))))     (post-norm)
//!                 h = LayerNorm(a + output(gelu(intermediate(a))))
//! pooled = tanh(pooler(h[:, 0]))                    (the `[CLS]` token)
//! logits = classifier(pooled)
//!
//! Attention is bidirectional over the real tokens of a row (padding keys hidden). In training
//! mode the config's dropouts apply: `hidden_dropout_prob` after the embeddings and each
//! sublayer, `attention_probs_dropout_prob` on the attention probabilities.

use candle_core::{DType, Device, Result, Tensor};
use serde_json::Value;

use super::attention::{attention, attention_with_dropout, Rope};
use super::classifier::SequenceClassifier;
use super::error::ModelError;
use super::gpt2::Activation;
use super::layer_norm::LayerNorm;
use super::linear::Linear;
use super::loader::{check_shape, load_linear, LoadOptions, TensorSource};
use super::transformer::{
    embedding_lookup, Family, LayerContext, ModelInfo, ModuleMut, ModuleRef, ParamRef,
    TokenEmbedding, TokenEmbeddingMut, WeightLayout,
};
use crate::lora::embedding::EmbeddingAdapter;
use crate::lora::DropoutSeed;

/// BERT's `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Feed-forward activation.
    pub hidden_act: Activation,
    /// Learned positions.
    pub max_position_embeddings: usize,
    /// Segment types.
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Dropout after the embeddings and each sublayer (training mode).
    pub hidden_dropout_prob: f32,
    /// Dropout on attention probabilities (training mode).
    pub attention_probs_dropout_prob: f32,
    /// Dropout before the classifier (`classifier_dropout`, else `hidden_dropout_prob`).
    pub classifier_dropout: f32,
    /// Std of transformers' initialisation of new weights (a new classifier).
    pub initializer_range: f64,
    /// Padding token.
    pub pad_token_id: Option<u32>,
}

impl BertConfig {
    /// Parse an HF BERT config; fields that change the math and are not implemented are refused
    /// by name.
    pub fn from_json(v: &Value) -> std::result::Result<Self, String> {
        use crate::json_fields::{opt_bool, opt_f64, opt_u32, opt_usize, optional};
        let usize_field = |k: &str| crate::json_fields::usize_field(v, k);
        let opt_str = |k: &str| optional(v, k, |x| x.as_str().map(str::to_string), "a string");
        let prob = |k: &str, default: f64| -> std::result::Result<f32, String> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(default as f32),
                Some(x) => x
                    .as_f64()
                    .filter(|p| (0.0..1.0).contains(p))
                    .map(|p| p as f32)
                    .ok_or(format!("`{k}` must be a probability in [0, 1), got {x}")),
            }
        };
        let hidden_size = usize_field("hidden_size")?;
        let heads = usize_field("num_attention_heads")?;
        if heads == 0 || hidden_size == 0 || hidden_size % heads != 0 {
            return Err(format!(
                "`hidden_size` ({hidden_size}) must be a positive multiple of `num_attention_heads` ({heads})"
            ));
        }
        let act = opt_str("hidden_act")?.unwrap_or_else(|| "gelu".into());
        let act = act.as_str();
        let hidden_act = Activation::parse(act).ok_or(format!(
            "`hidden_act` `{act}` is not supported (gelu, gelu_new, relu)"
        ))?;
        if let Some(p) = opt_str("position_embedding_type")? {
            if p != "absolute" {
                return Err(format!(
                    "`position_embedding_type` `{p}` is not supported (absolute)"
                ));
            }
        }
        if opt_bool(v, "is_decoder")? == Some(true) {
            return Err("`is_decoder: true` is not supported (BERT as an encoder)".into());
        }
        let eps = opt_f64(v, "layer_norm_eps")?.unwrap_or(1e-12);
        if !(eps > 0.0 && eps.is_finite()) {
            return Err(format!("`layer_norm_eps` must be positive, got {eps}"));
        }
        let hidden_dropout_prob = prob("hidden_dropout_prob", 0.1)?;
        Ok(Self {
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            num_hidden_layers: usize_field("num_hidden_layers")?,
            num_attention_heads: heads,
            intermediate_size: usize_field("intermediate_size")?,
            hidden_act,
            max_position_embeddings: usize_field("max_position_embeddings")?,
            type_vocab_size: opt_usize(v, "type_vocab_size")?.unwrap_or(2),
            layer_norm_eps: eps,
            hidden_dropout_prob,
            attention_probs_dropout_prob: prob("attention_probs_dropout_prob", 0.1)?,
            classifier_dropout: match v.get("classifier_dropout") {
                None | Some(Value::Null) => hidden_dropout_prob,
                Some(_) => prob("classifier_dropout", 0.0)?,
            },
            initializer_range: opt_f64(v, "initializer_range")?.unwrap_or(0.02),
            pad_token_id: opt_u32(v, "pad_token_id")?,
        })
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// One post-norm encoder layer.
#[derive(Clone, Debug)]
pub struct BertLayer {
    /// `attention.self.query`.
    pub query: Linear,
    /// `attention.self.key`.
    pub key: Linear,
    /// `attention.self.value`.
    pub value: Linear,
    /// `attention.output.dense`.
    pub attention_output: Linear,
    /// `attention.output.LayerNorm`.
    pub attention_norm: LayerNorm,
    /// `intermediate.dense`.
    pub intermediate: Linear,
    /// `output.dense`.
    pub output: Linear,
    /// `output.LayerNorm`.
    pub output_norm: LayerNorm,
}

/// Module names of a layer's linear layers, in checkpoint order.
const LAYER_LINEARS: [&str; 6] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

impl BertLayer {
    fn linears(&self) -> [&Linear; 6] {
        [
            &self.query,
            &self.key,
            &self.value,
            &self.attention_output,
            &self.intermediate,
            &self.output,
        ]
    }

    fn linears_mut(&mut self) -> [&mut Linear; 6] {
        [
            &mut self.query,
            &mut self.key,
            &mut self.value,
            &mut self.attention_output,
            &mut self.intermediate,
            &mut self.output,
        ]
    }
}

/// A BERT encoder with its pooler and, for classification, the classifier.
#[derive(Clone, Debug)]
pub struct Bert {
    /// Configuration.
    pub cfg: BertConfig,
    /// `[vocab, hidden]`.
    pub word_embeddings: Tensor,
    /// `[max_positions, hidden]`.
    pub position_embeddings: Tensor,
    /// `[type_vocab, hidden]`.
    pub token_type_embeddings: Tensor,
    /// Norm of the summed embeddings.
    pub embeddings_norm: LayerNorm,
    /// Encoder layers.
    pub layers: Vec<BertLayer>,
    /// `pooler.dense` (a checkpoint without it has no pooled output).
    pub pooler: Option<Linear>,
    /// The classification head, when the model classifies.
    pub classifier: Option<SequenceClassifier>,
    /// LoRA on the word embeddings.
    pub embed_adapter: Option<EmbeddingAdapter>,
    /// Seed of the training-mode dropout masks (set by the trainer before each step).
    dropout_seed: DropoutSeed,
    rope: Rope,
    compute_dtype: DType,
    info: ModelInfo,
}

/// Dropout keys of BERT's own sites start here, clear of the adapters' keys.
const DROPOUT_SITES: u64 = 1 << 40;

/// Checkpoint path prefix of the encoder as transformers names it in every BERT task model.
const PREFIX: &str = "bert.";

impl Bert {
    /// Load from HF-named tensors: `bert.*` (task models) or unprefixed (`BertModel`, as
    /// sentence-transformers saves it). The classifier is loaded by the caller.
    pub(crate) fn load(
        cfg: &BertConfig,
        src: &mut dyn TensorSource,
        opts: &LoadOptions,
    ) -> std::result::Result<Self, ModelError> {
        let prefix = if src.has("bert.embeddings.word_embeddings.weight") {
            PREFIX
        } else {
            ""
        };
        let dev = &opts.device;
        let wdt = opts.weight_dtype.unwrap_or(opts.compute_dtype);
        let h = cfg.hidden_size;
        let dense = |src: &mut dyn TensorSource, name: &str, shape: &[usize]| {
            let name = format!("{prefix}{name}");
            let t = src.dense(&name)?;
            check_shape(&name, &t, shape)?;
            Ok::<_, ModelError>(t.to_dtype(wdt)?.to_device(dev)?)
        };
        let norm = |src: &mut dyn TensorSource, name: &str| {
            Ok::<_, ModelError>(LayerNorm {
                weight: dense(src, &format!("{name}.weight"), &[h])?,
                bias: dense(src, &format!("{name}.bias"), &[h])?,
                eps: cfg.layer_norm_eps,
            })
        };
        let word_embeddings = dense(
            src,
            "embeddings.word_embeddings.weight",
            &[cfg.vocab_size, h],
        )?;
        let position_embeddings = dense(
            src,
            "embeddings.position_embeddings.weight",
            &[cfg.max_position_embeddings, h],
        )?;
        let token_type_embeddings = dense(
            src,
            "embeddings.token_type_embeddings.weight",
            &[cfg.type_vocab_size, h],
        )?;
        let embeddings_norm = norm(src, "embeddings.LayerNorm")?;
        super::loader::refuse_extra_layer(src, cfg.num_hidden_layers, "num_hidden_layers", |n| {
            format!("{prefix}encoder.layer.{n}.attention.self.query.weight")
        })?;
        let mut layers = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let p = format!("{prefix}encoder.layer.{i}");
            let mut lin = |name: &str, out: usize, inp: usize| {
                load_linear(
                    src,
                    &format!("{p}.{name}"),
                    (out, inp),
                    true,
                    WeightLayout::OutIn,
                    opts,
                )
            };
            let inter = cfg.intermediate_size;
            let query = lin("attention.self.query", h, h)?;
            let key = lin("attention.self.key", h, h)?;
            let value = lin("attention.self.value", h, h)?;
            let attention_output = lin("attention.output.dense", h, h)?;
            let intermediate = lin("intermediate.dense", inter, h)?;
            let output = lin("output.dense", h, inter)?;
            layers.push(BertLayer {
                query,
                key,
                value,
                attention_output,
                attention_norm: norm(
                    src,
                    &format!("encoder.layer.{i}.attention.output.LayerNorm"),
                )?,
                intermediate,
                output,
                output_norm: norm(src, &format!("encoder.layer.{i}.output.LayerNorm"))?,
            });
        }
        let pooler_path = format!("{prefix}pooler.dense");
        let pooler = if src.has(&format!("{pooler_path}.weight")) {
            Some(load_linear(
                src,
                &pooler_path,
                (h, h),
                true,
                WeightLayout::OutIn,
                opts,
            )?)
        } else {
            None
        };
        let max_positions = super::loader::positions(
            opts,
            cfg.max_position_embeddings,
            "max_position_embeddings",
            cfg.max_position_embeddings,
        )?;
        let rope = Rope::identity(cfg.head_dim(), max_positions, dev)?;
        let info = ModelInfo {
            model_type: "bert".into(),
            vocab_size: cfg.vocab_size,
            hidden_size: h,
            intermediate_size: cfg.intermediate_size,
            num_layers: cfg.num_hidden_layers,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_attention_heads,
            max_position_embeddings: cfg.max_position_embeddings,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            pad_token_id: cfg.pad_token_id,
        };
        Ok(Self {
            cfg: cfg.clone(),
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embeddings_norm,
            layers,
            pooler,
            classifier: None,
            embed_adapter: None,
            dropout_seed: DropoutSeed::default(),
            rope,
            compute_dtype: opts.compute_dtype,
            info,
        })
    }

    /// Hidden dropout at site `site` (0: embeddings; then two per layer), in training mode.
    /// Masks come from the shared seed, so a recomputed layer drops what it dropped before.
    fn dropout(&self, x: Tensor, train: bool, site: u64) -> Result<Tensor> {
        let p = self.cfg.hidden_dropout_prob;
        if train && p > 0.0 {
            self.dropout_seed
                .dropout(p, DROPOUT_SITES + site)?
                .forward(&x.contiguous()?)
        } else {
            Ok(x)
        }
    }
}

impl Family for Bert {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        self.word_embeddings.device()
    }

    fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    fn bidirectional(&self) -> bool {
        true
    }

    /// `LayerNorm(word[ids] + position[pos] + token_type[types])`.
    fn embed(
        &self,
        ids: &Tensor,
        pos: &Tensor,
        token_types: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let h = self.cfg.hidden_size;
        let dt = self.word_embeddings.dtype();
        let words = embedding_lookup(
            &self.word_embeddings,
            self.embed_adapter.as_ref(),
            &ids.flatten_all()?,
            dt,
        )?;
        let at = self
            .position_embeddings
            .index_select(&pos.flatten_all()?, 0)?;
        let types = match token_types {
            Some(tt) => self
                .token_type_embeddings
                .index_select(&tt.to_dtype(DType::U32)?.flatten_all()?, 0)?,
            None => self
                .token_type_embeddings
                .get(0)?
                .unsqueeze(0)?
                .broadcast_as((b * t, h))?,
        };
        let sum = ((words + at)? + types)?.reshape((b, t, h))?;
        let e = self
            .embeddings_norm
            .forward(&sum)?
            .to_dtype(self.compute_dtype)?;
        self.dropout(e, train, 0)
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn layer(
        &self,
        i: usize,
        x: &Tensor,
        ctx: &LayerContext,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        train: bool,
    ) -> Result<Tensor> {
        let l = self
            .layers
            .get(i)
            .ok_or_else(|| candle_core::Error::Msg(format!("no layer {i}")))?;
        let (q, k, v) = (
            l.query.forward(x, train)?,
            l.key.forward(x, train)?,
            l.value.forward(x, train)?,
        );
        let n = self.cfg.num_attention_heads;
        let heads = (n, n, self.cfg.head_dim());
        let p = self.cfg.attention_probs_dropout_prob;
        let site = 3 * i as u64;
        let ctx_out = if train && p > 0.0 {
            let drop = self.dropout_seed.dropout(p, DROPOUT_SITES + site + 1)?;
            attention_with_dropout(heads, &q, &k, &v, &self.rope, &ctx.pos, &ctx.mask, drop)?
        } else {
            attention(heads, &q, &k, &v, &self.rope, &ctx.pos, &ctx.mask, cache)?
        };
        let attn = self.dropout(
            l.attention_output.forward(&ctx_out, train)?,
            train,
            site + 2,
        )?;
        let a = l.attention_norm.forward(&(attn + x)?)?;
        let inner = self
            .cfg
            .hidden_act
            .forward(&l.intermediate.forward(&a, train)?)?;
        let out = self.dropout(l.output.forward(&inner, train)?, train, site + 3)?;
        l.output_norm.forward(&(out + a)?)
    }

    /// Post-norm: the last layer's output is final.
    fn finish(&self, h: &Tensor) -> Result<Tensor> {
        Ok(h.clone())
    }

    fn lm_head(&self) -> Option<&Tensor> {
        None
    }

    fn token_embedding(&self) -> TokenEmbedding<'_> {
        TokenEmbedding {
            path: "bert.embeddings.word_embeddings",
            weight: &self.word_embeddings,
            adapter: self.embed_adapter.as_ref(),
            tied_head: false,
        }
    }

    fn token_embedding_mut(&mut self) -> TokenEmbeddingMut<'_> {
        TokenEmbeddingMut {
            path: "bert.embeddings.word_embeddings",
            weight: &mut self.word_embeddings,
            adapter: &mut self.embed_adapter,
            head: None,
        }
    }

    fn linears(&self) -> Vec<ModuleRef<'_>> {
        let mut out = Vec::new();
        for (li, layer) in self.layers.iter().enumerate() {
            for (index, (name, linear)) in LAYER_LINEARS.iter().zip(layer.linears()).enumerate() {
                out.push(ModuleRef {
                    path: format!("{PREFIX}encoder.layer.{li}.{name}"),
                    layer: li,
                    index,
                    layout: WeightLayout::OutIn,
                    linear,
                });
            }
        }
        if let Some(linear) = &self.pooler {
            out.push(ModuleRef {
                path: format!("{PREFIX}pooler.dense"),
                layer: self.layers.len(),
                index: 0,
                layout: WeightLayout::OutIn,
                linear,
            });
        }
        out
    }

    fn linears_mut(&mut self) -> Vec<ModuleMut<'_>> {
        let n = self.layers.len();
        let mut out = Vec::new();
        for (li, layer) in self.layers.iter_mut().enumerate() {
            for (index, (name, linear)) in LAYER_LINEARS.iter().zip(layer.linears_mut()).enumerate()
            {
                out.push(ModuleMut {
                    path: format!("{PREFIX}encoder.layer.{li}.{name}"),
                    layer: li,
                    index,
                    layout: WeightLayout::OutIn,
                    linear,
                });
            }
        }
        if let Some(linear) = &mut self.pooler {
            out.push(ModuleMut {
                path: format!("{PREFIX}pooler.dense"),
                layer: n,
                index: 0,
                layout: WeightLayout::OutIn,
                linear,
            });
        }
        out
    }

    fn params(&self) -> Vec<(String, ParamRef<'_>)> {
        fn norm<'a>(out: &mut Vec<(String, ParamRef<'a>)>, path: String, n: &'a LayerNorm) {
            out.push((format!("{path}.weight"), ParamRef::Dense(&n.weight)));
            out.push((format!("{path}.bias"), ParamRef::Dense(&n.bias)));
        }
        fn linear<'a>(out: &mut Vec<(String, ParamRef<'a>)>, path: String, l: &'a Linear) {
            out.push((
                format!("{path}.weight"),
                ParamRef::Weight(l, WeightLayout::OutIn),
            ));
            out.push((format!("{path}.bias"), ParamRef::Bias(l)));
        }
        let e = format!("{PREFIX}embeddings");
        let mut out: Vec<(String, ParamRef<'_>)> = vec![
            (
                format!("{e}.word_embeddings.weight"),
                ParamRef::Dense(&self.word_embeddings),
            ),
            (
                format!("{e}.position_embeddings.weight"),
                ParamRef::Dense(&self.position_embeddings),
            ),
            (
                format!("{e}.token_type_embeddings.weight"),
                ParamRef::Dense(&self.token_type_embeddings),
            ),
        ];
        norm(&mut out, format!("{e}.LayerNorm"), &self.embeddings_norm);
        for (li, l) in self.layers.iter().enumerate() {
            let p = format!("{PREFIX}encoder.layer.{li}");
            linear(&mut out, format!("{p}.attention.self.query"), &l.query);
            linear(&mut out, format!("{p}.attention.self.key"), &l.key);
            linear(&mut out, format!("{p}.attention.self.value"), &l.value);
            linear(
                &mut out,
                format!("{p}.attention.output.dense"),
                &l.attention_output,
            );
            norm(
                &mut out,
                format!("{p}.attention.output.LayerNorm"),
                &l.attention_norm,
            );
            linear(&mut out, format!("{p}.intermediate.dense"), &l.intermediate);
            linear(&mut out, format!("{p}.output.dense"), &l.output);
            norm(&mut out, format!("{p}.output.LayerNorm"), &l.output_norm);
        }
        if let Some(pooler) = &self.pooler {
            linear(&mut out, format!("{PREFIX}pooler.dense"), pooler);
        }
        out
    }

    fn share_dropout_seed(&mut self, seed: &DropoutSeed) {
        self.dropout_seed = seed.clone();
    }

    fn classifier(&self) -> Option<&SequenceClassifier> {
        self.classifier.as_ref()
    }

    fn classifier_mut(&mut self) -> Option<&mut SequenceClassifier> {
        self.classifier.as_mut()
    }

    fn set_classifier(&mut self, classifier: Option<SequenceClassifier>) -> Result<()> {
        if classifier.is_some() && self.pooler.is_none() {
            candle_core::bail!(
                "this BERT checkpoint has no pooler (`pooler.dense`) to classify from"
            );
        }
        self.classifier = classifier;
        Ok(())
    }

    /// `tanh(pooler(h[:, 0]))`: the `[CLS]` token through the pooler.
    fn pool(&self, h: &Tensor, _ids: &Tensor, train: bool) -> Result<Tensor> {
        let pooler = self
            .pooler
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("no pooler (`pooler.dense`)".into()))?;
        let first = h.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?;
        pooler.forward(&first, train)?.tanh()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_defaults_and_refusals() {
        let base = json!({"model_type": "bert", "vocab_size": 30522, "hidden_size": 384,
            "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
            "max_position_embeddings": 512});
        let c = BertConfig::from_json(&base).unwrap();
        assert_eq!(c.hidden_act, Activation::GeluErf);
        assert_eq!(c.classifier_dropout, 0.1);
        let mut bad = base.clone();
        bad["position_embedding_type"] = json!("relative_key");
        assert!(BertConfig::from_json(&bad)
            .unwrap_err()
            .contains("relative_key"));
        let mut bad = base;
        bad["hidden_dropout_prob"] = json!(1.5);
        assert!(BertConfig::from_json(&bad)
            .unwrap_err()
            .contains("hidden_dropout_prob"));
    }
}
