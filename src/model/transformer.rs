//! The interface every model family fits, and the forward passes written once over it.
//!
//! A family ([`super::llama::Llama`], [`super::gpt2::Gpt2`]) holds its own weights and says, in
//! its own file, how tokens become the first hidden state ([`Family::embed`]), what one layer
//! computes ([`Family::layer`]), what follows the last layer ([`Family::finish`]), and which
//! linear layers it has under which checkpoint names ([`Family::linears`]). Everything else —
//! the full forward, the KV-cached one, evaluation, the layer-by-layer trainer, adapter
//! walking, merging and export — is written once against [`Model`].

use std::ops::{Deref, DerefMut};

use candle_core::{DType, Device, IndexOp, Result, Tensor};

use super::attention::{attention_mask_windowed, AttentionSpan};
use super::bert::Bert;
use super::classifier::{last_real_token, SequenceClassifier};
use super::gpt2::Gpt2;
use super::linear::Linear;
use super::llama::Llama;
use crate::lora::embedding::EmbeddingAdapter;
use crate::lora::{DropoutSeed, LoraAdapter};

/// The numbers every family has, in the names of HF configs.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    /// `model_type` as written in config.json (llama, mistral, qwen2, gpt2).
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Longest context the position scheme covers.
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens.
    pub eos_token_ids: Vec<u32>,
    /// Padding token.
    pub pad_token_id: Option<u32>,
}

/// What every layer of one forward shares: positions `[b, t]` (u32) and the additive mask.
#[derive(Clone, Debug)]
pub struct LayerContext {
    /// Position of each token.
    pub pos: Tensor,
    /// Additive attention mask `[b|1, 1, 1, t, past + t]` in the compute dtype.
    pub mask: Tensor,
}

/// How a checkpoint stores a linear weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[out, in]` (`nn.Linear`).
    OutIn,
    /// `[in, out]` (GPT-2's `Conv1D`); PEFT calls such layers `fan_in_fan_out`.
    InOut,
}

/// One linear layer of a model.
#[derive(Debug)]
pub struct ModuleRef<'a> {
    /// Checkpoint path without `.weight` (`model.layers.3.mlp.up_proj`).
    pub path: String,
    /// Layer index.
    pub layer: usize,
    /// Index of the module within its layer.
    pub index: usize,
    /// How the checkpoint stores its weight.
    pub layout: WeightLayout,
    /// The layer.
    pub linear: &'a Linear,
}

/// One linear layer of a model, mutably (to attach or merge adapters).
#[derive(Debug)]
pub struct ModuleMut<'a> {
    /// Checkpoint path without `.weight`.
    pub path: String,
    /// Layer index.
    pub layer: usize,
    /// Index of the module within its layer.
    pub index: usize,
    /// How the checkpoint stores its weight.
    pub layout: WeightLayout,
    /// The layer.
    pub linear: &'a mut Linear,
}

/// A model's token embedding table and the adapter on it.
#[derive(Debug)]
pub struct TokenEmbedding<'a> {
    /// Checkpoint path without `.weight` (`model.embed_tokens`, `transformer.wte`).
    pub path: &'static str,
    /// `[vocab, dim]`.
    pub weight: &'a Tensor,
    /// LoRA on the lookup.
    pub adapter: Option<&'a EmbeddingAdapter>,
    /// The language-model head is this table (tied).
    pub tied_head: bool,
}

/// The token embedding, mutably (to attach, load or merge its adapter).
#[derive(Debug)]
pub struct TokenEmbeddingMut<'a> {
    /// See [`TokenEmbedding::path`].
    pub path: &'static str,
    /// `[vocab, dim]`.
    pub weight: &'a mut Tensor,
    /// LoRA on the lookup.
    pub adapter: &'a mut Option<EmbeddingAdapter>,
    /// A decoder's untied head slot (`None` inside: tied to `weight`); `None` for encoders.
    pub head: Option<&'a mut Option<Tensor>>,
}

/// Rows `ids` (flat u32) of `weight` with `adapter`'s update, in `dtype`: `[n, dim]`.
pub fn embedding_lookup(
    weight: &Tensor,
    adapter: Option<&EmbeddingAdapter>,
    ids: &Tensor,
    dtype: DType,
) -> Result<Tensor> {
    let rows = weight.index_select(ids, 0)?.to_dtype(dtype)?;
    match adapter {
        Some(a) => rows + a.delta(ids, dtype)?,
        None => Ok(rows),
    }
}

/// A checkpoint tensor, by where its value lives in the model.
#[derive(Clone, Copy, Debug)]
pub enum ParamRef<'a> {
    /// A tensor held as it is saved (embeddings, norms, head).
    Dense(&'a Tensor),
    /// A linear layer's weight (with its adapter merged in on export).
    Weight(&'a Linear, WeightLayout),
    /// A linear layer's bias.
    Bias(&'a Linear),
}

/// What a model family provides; see the module docs.
pub trait Family: std::fmt::Debug + Send + Sync {
    /// Its numbers.
    fn info(&self) -> &ModelInfo;
    /// Device its weights live on.
    fn device(&self) -> &Device;
    /// Dtype activations are computed in.
    fn compute_dtype(&self) -> DType;
    /// Positions the position scheme covers (RoPE table or learned position rows).
    fn max_positions(&self) -> usize;
    /// Sliding attention window, if the family has one (Mistral).
    fn sliding_window(&self) -> Option<usize> {
        None
    }
    /// First hidden state `[b, t, hidden]` of `ids` at positions `pos` (both `[b, t]`), with
    /// BERT's segment ids `token_types` (`[b, t]`, zeros when `None`; other families have none);
    /// `train` turns on the family's embedding dropout, if it has one.
    fn embed(
        &self,
        ids: &Tensor,
        pos: &Tensor,
        token_types: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor>;
    /// Whether every token attends to every other (encoders) rather than to earlier ones.
    fn bidirectional(&self) -> bool {
        false
    }
    /// Number of layers.
    fn num_layers(&self) -> usize;
    /// Layer `i` on `h`, extending `cache` (its keys and values) when given.
    fn layer(
        &self,
        i: usize,
        h: &Tensor,
        ctx: &LayerContext,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        train: bool,
    ) -> Result<Tensor>;
    /// What follows the last layer (the final norm).
    fn finish(&self, h: &Tensor) -> Result<Tensor>;
    /// Language-model head `[vocab, hidden]` (the embeddings when tied); `None` for encoders.
    fn lm_head(&self) -> Option<&Tensor>;
    /// Every linear layer with its checkpoint path, in checkpoint order.
    fn linears(&self) -> Vec<ModuleRef<'_>>;
    /// Every linear layer, mutably, in the order of [`Family::linears`].
    fn linears_mut(&mut self) -> Vec<ModuleMut<'_>>;
    /// Every checkpoint tensor under its HF name, in checkpoint order (the classifier apart).
    fn params(&self) -> Vec<(String, ParamRef<'_>)>;
    /// The token embedding and its adapter.
    fn token_embedding(&self) -> TokenEmbedding<'_>;
    /// LoRA on an untied language-model head (PEFT's `lm_head` target).
    fn head_adapter(&self) -> Option<&LoraAdapter> {
        None
    }
    /// The slot of that adapter and the head's weight; `None` when the head is tied to the
    /// embedding or absent.
    fn head_adapter_mut(&mut self) -> Option<(&mut Tensor, &mut Option<LoraAdapter>)> {
        None
    }
    /// The token embedding, mutably.
    fn token_embedding_mut(&mut self) -> TokenEmbeddingMut<'_>;
    /// Take the trainer's dropout seed handle (families whose own layers drop activations in
    /// training mode: BERT).
    fn share_dropout_seed(&mut self, _seed: &DropoutSeed) {}
    /// The sequence classification head, when the model classifies.
    fn classifier(&self) -> Option<&SequenceClassifier> {
        None
    }
    /// The head, mutably.
    fn classifier_mut(&mut self) -> Option<&mut SequenceClassifier> {
        None
    }
    /// Put a classification head on the model (or take it off).
    fn set_classifier(&mut self, classifier: Option<SequenceClassifier>) -> Result<()> {
        match classifier {
            None => Ok(()),
            Some(_) => candle_core::bail!(
                "sequence classification on a `{}` model is not supported (bert, llama, mistral, qwen2)",
                self.info().model_type
            ),
        }
    }
    /// One feature vector `[b, hidden]` per sequence for the classifier, from the final hidden
    /// states `h`: decoders take each row's last token that is not padding.
    fn pool(&self, h: &Tensor, ids: &Tensor, _train: bool) -> Result<Tensor> {
        last_real_token(h, ids, self.info().pad_token_id)
    }
}

/// A loaded model of any supported family.
#[derive(Clone, Debug)]
pub enum Model {
    /// Llama, Mistral, Qwen2, SmolLM.
    Llama(Llama),
    /// GPT-2.
    Gpt2(Gpt2),
    /// BERT encoders.
    Bert(Bert),
}

impl Deref for Model {
    type Target = dyn Family;
    fn deref(&self) -> &(dyn Family + 'static) {
        match self {
            Model::Llama(m) => m,
            Model::Gpt2(m) => m,
            Model::Bert(m) => m,
        }
    }
}

impl DerefMut for Model {
    fn deref_mut(&mut self) -> &mut (dyn Family + 'static) {
        match self {
            Model::Llama(m) => m,
            Model::Gpt2(m) => m,
            Model::Bert(m) => m,
        }
    }
}

/// Keys and values of the positions seen so far, per layer (generation).
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<(Tensor, Tensor)>>,
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

impl Model {
    /// The Llama-family decoder, if this is one (GGUF export and the memory plan read its
    /// config).
    pub fn as_llama(&self) -> Option<&Llama> {
        match self {
            Model::Llama(m) => Some(m),
            _ => None,
        }
    }

    /// The Llama-family decoder, mutably, if this is one.
    pub fn as_llama_mut(&mut self) -> Option<&mut Llama> {
        match self {
            Model::Llama(m) => Some(m),
            _ => None,
        }
    }

    /// The language-model head, or an error naming the family that has none.
    pub fn require_lm_head(&self) -> Result<&Tensor> {
        self.lm_head().ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "a `{}` model has no language-model head (it classifies sequences)",
                self.info().model_type
            ))
        })
    }

    /// Positions `offset..offset + t` for every row, `[b, t]`.
    pub fn positions(&self, b: usize, t: usize, offset: usize) -> Result<Tensor> {
        let row: Vec<u32> = (offset as u32..(offset + t) as u32).collect();
        Tensor::from_vec(row, (1, t), self.device())?.repeat((b, 1))
    }

    /// The positions and mask every layer of a forward over `ids` shares.
    pub fn context(
        &self,
        ids: &Tensor,
        pos: &Tensor,
        span: &AttentionSpan<'_>,
        past: usize,
    ) -> Result<LayerContext> {
        let (b, t) = ids.dims2()?;
        let max_pos = pos.max_all()?.to_scalar::<u32>()? as usize;
        if max_pos >= self.max_positions() {
            candle_core::bail!(
                "position {max_pos} is past the model's context ({} positions)",
                self.max_positions()
            );
        }
        let mask = attention_mask_windowed(b, t, past, span, self.sliding_window(), self.device())?
            .to_dtype(self.compute_dtype())?;
        Ok(LayerContext {
            pos: pos.clone(),
            mask,
        })
    }

    /// Hidden states after the last layer's [`Family::finish`], `[b, t, hidden]`.
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
        let past = cache.as_deref().map_or(0, KvCache::len);
        let ctx = self.context(ids, pos, span, past)?;
        let mut h = self.embed(ids, pos, None, train)?;
        for i in 0..self.num_layers() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            h = self.layer(i, &h, &ctx, slot, train)?;
            if !track_grads {
                // Cut the autograd graph here: the adapters are `Var`s, so without this every
                // layer's intermediates would stay alive until the end of an evaluation pass.
                h = h.detach();
            }
        }
        self.finish(&h)
    }

    /// Hidden states for evaluation: no dropout, and no autograd graph kept across layers, so
    /// peak memory is one layer's activations, not the whole model's.
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
        let out = self.head_logits(&h2, false)?;
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = out.dim(1)?;
        out.reshape(out_dims)
    }

    /// `[n, hidden]` rows to f32 logits `[n, vocab]`, with the head's adapter (its dropout in
    /// training mode); differentiable in the adapter and in `h2`.
    pub fn head_logits(&self, h2: &Tensor, train: bool) -> Result<Tensor> {
        let h2 = h2.to_dtype(DType::F32)?;
        let head = self.require_lm_head()?.to_dtype(DType::F32)?;
        let out = h2.matmul(&head.t()?)?;
        match self.head_adapter() {
            Some(a) => out + a.delta(&h2, train)?,
            None => Ok(out),
        }
    }

    /// Logits of the last position only (cheap head for generation): `[b, vocab]`.
    pub fn last_logits(&self, h: &Tensor) -> Result<Tensor> {
        let t = h.dim(1)?;
        self.logits(&h.i((.., t - 1, ..))?.contiguous()?)
    }

    /// Hidden states as transformers reports them with `output_hidden_states`: the embeddings,
    /// the output of each layer but the last, and the last one after [`Family::finish`].
    pub fn hidden_states(&self, ids: &Tensor) -> Result<Vec<Tensor>> {
        let (b, t) = ids.dims2()?;
        let pos = self.positions(b, t, 0)?;
        let ctx = self.context(ids, &pos, &AttentionSpan::Causal, 0)?;
        let mut h = self.embed(ids, &pos, None, false)?;
        let mut out = vec![h.clone()];
        for i in 0..self.num_layers() {
            h = self.layer(i, &h, &ctx, None, false)?;
            out.push(h.clone());
        }
        let last = out.len() - 1;
        out[last] = self.finish(&h)?;
        Ok(out)
    }

    /// Which keys a classifier's forward over `ids` attends to: the real tokens (`keys` `[b, t]`,
    /// 1 = real, 0 = padding), both ways for encoders, causally for decoders.
    pub fn padded_span<'a>(&self, keys: &'a Tensor) -> AttentionSpan<'a> {
        if self.bidirectional() {
            AttentionSpan::Bidirectional(keys)
        } else {
            AttentionSpan::CausalPadded(keys)
        }
    }

    /// Classifier logits `[b, num_labels]` (f32) of padded sequences `ids` (`keys` as in
    /// [`Model::padded_span`], BERT's `token_types` optional).
    pub fn classify(
        &self,
        ids: &Tensor,
        keys: &Tensor,
        token_types: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let classifier = self.classifier().ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "this `{}` model has no classification head",
                self.info().model_type
            ))
        })?;
        let (b, t) = ids.dims2()?;
        let pos = self.positions(b, t, 0)?;
        let ctx = self.context(ids, &pos, &self.padded_span(keys), 0)?;
        let mut h = self.embed(ids, &pos, token_types, train)?;
        for i in 0..self.num_layers() {
            h = self.layer(i, &h, &ctx, None, train)?;
        }
        let h = self.finish(&h)?;
        classifier.logits(&self.pool(&h, ids, train)?, train)
    }

    /// Every checkpoint tensor, the classification head's included (`classifier.weight`,
    /// `score.weight`), in checkpoint order.
    pub fn checkpoint_params(&self) -> Vec<(String, ParamRef<'_>)> {
        let mut out = self.params();
        if let Some(c) = self.classifier() {
            for (suffix, var) in c.parameters() {
                out.push((
                    format!("{}.{suffix}", c.module),
                    ParamRef::Dense(var.as_tensor()),
                ));
            }
        }
        out
    }

    /// Linear layers that carry an adapter.
    pub fn adapted_linears(&self) -> usize {
        self.linears()
            .iter()
            .filter(|m| m.linear.adapter.is_some())
            .count()
    }
}
