//! Build a [`Model`] from an HF folder (16/32-bit or bitsandbytes 4-bit) or a GGUF file.
//!
//! Weights come in one tensor at a time from a memory map (or the GGUF reader); linear weights are
//! quantized to NF4/FP4 as they arrive, so the 16-bit model is never whole in memory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use qlora_quant::{Nf4Tensor, QuantType};
use serde_json::Value;

use super::bert::{Bert, BertConfig};
use super::checkpoint::SafetensorsDir;
use super::classifier::{ClassifierConfig, SequenceClassifier};
use super::config::{projection_path, LlamaConfig, PROJECTIONS};
use super::error::ModelError;
use super::gguf::GgufFile;
use super::gpt2::{Gpt2, Gpt2Config};
use super::linear::{BaseWeight, Linear};
use super::llama::{Attention, DecoderLayer, Llama, Mlp};
use super::transformer::{Model, WeightLayout};
use crate::data::tokenizer::TextTokenizer;

/// How the frozen base is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseFormat {
    /// 4-bit codes (NF4 or FP4).
    Quantized(QuantType),
    /// Full precision in the compute dtype (for comparison runs).
    Dense,
}

impl BaseFormat {
    /// Parse `nf4`, `fp4`, `none`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "nf4" => Ok(BaseFormat::Quantized(QuantType::Nf4)),
            "fp4" => Ok(BaseFormat::Quantized(QuantType::Fp4)),
            "none" => Ok(BaseFormat::Dense),
            other => Err(format!("unknown base format `{other}` (nf4, fp4, none)")),
        }
    }

    /// The name `parse` accepts.
    pub fn name(self) -> &'static str {
        match self {
            BaseFormat::Quantized(q) => q.name(),
            BaseFormat::Dense => "none",
        }
    }
}

/// Loading options.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// NF4 (default), FP4, or a dense base.
    pub base: BaseFormat,
    /// Blocksize of on-the-fly quantization.
    pub blocksize: usize,
    /// Double-quantize the absmax (QLoRA default).
    pub double_quant: bool,
    /// Dtype activations are computed in.
    pub compute_dtype: DType,
    /// Dtype dense weights (embeddings, norms, head, a dense base) are stored in; default the
    /// compute dtype. bf16 storage with f32 compute halves their memory.
    pub weight_dtype: Option<DType>,
    /// Device.
    pub device: Device,
    /// Longest sequence the RoPE tables cover (default: the config's, at most 8192).
    pub max_positions: Option<usize>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            base: BaseFormat::Quantized(QuantType::Nf4),
            blocksize: 64,
            double_quant: true,
            compute_dtype: DType::F32,
            weight_dtype: None,
            device: Device::Cpu,
            max_positions: None,
        }
    }
}

/// Where the weights were read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// HF folder with 16/32-bit safetensors.
    Safetensors,
    /// HF folder saved by transformers + bitsandbytes in 4-bit.
    Bnb4bit,
    /// GGUF file (llama.cpp).
    Gguf,
}

/// A loaded model with what came along with it.
pub struct LoadedModel {
    /// The model.
    pub model: Model,
    /// Its tokenizer, when the source has one.
    pub tokenizer: Option<TextTokenizer>,
    /// The kind of source.
    pub kind: SourceKind,
    /// The path it came from.
    pub path: PathBuf,
    /// HF-style config.json content (for exports).
    pub config_json: Value,
}

/// A source of HF-named tensors.
pub(crate) trait TensorSource {
    /// Dense tensor in f32 on the CPU.
    fn dense(&mut self, name: &str) -> Result<Tensor, ModelError>;
    /// A weight already stored in 4-bit, if the source has it that way.
    fn quantized(&mut self, prefix: &str) -> Result<Option<Nf4Tensor>, ModelError>;
    /// Whether a tensor exists.
    fn has(&self, name: &str) -> bool;
}

/// Refuse a weight holding NaN or an infinity (one pass: the sum of a finite tensor of weights
/// is finite).
fn check_finite(t: &Tensor) -> Result<(), String> {
    let sum = t
        .sum_all()
        .and_then(|s| s.to_dtype(DType::F32))
        .and_then(|s| s.to_scalar::<f32>())
        .map_err(|e| e.to_string())?;
    if sum.is_finite() {
        Ok(())
    } else {
        Err("holds NaN or infinite values".into())
    }
}

struct StDir {
    dir: SafetensorsDir,
    bnb: bool,
}

impl TensorSource for StDir {
    fn dense(&mut self, name: &str) -> Result<Tensor, ModelError> {
        let raw = self.dir.read_tensor(name, &Device::Cpu)?;
        if !raw.dtype().is_float() {
            return Err(self.dir.tensor_error(
                name,
                format!(
                    "is stored as {:?}; a model weight must be a float (F32, F16, BF16)",
                    raw.dtype()
                ),
            ));
        }
        let t = raw
            .to_dtype(DType::F32)
            .map_err(|e| self.dir.tensor_error(name, e.to_string()))?;
        check_finite(&t).map_err(|what| self.dir.tensor_error(name, what))?;
        Ok(t)
    }
    fn quantized(&mut self, prefix: &str) -> Result<Option<Nf4Tensor>, ModelError> {
        if self.bnb
            && self
                .dir
                .names()
                .any(|n| n.starts_with(&format!("{prefix}.quant_state.")))
        {
            Ok(Some(self.dir.read_nf4(prefix)?))
        } else {
            Ok(None)
        }
    }
    fn has(&self, name: &str) -> bool {
        self.dir.contains(name)
    }
}

struct Gguf {
    file: GgufFile,
    names: Vec<String>,
}

impl TensorSource for Gguf {
    fn dense(&mut self, name: &str) -> Result<Tensor, ModelError> {
        let t = self
            .file
            .read_hf_tensor(name, &Device::Cpu)
            .map_err(|source| ModelError::Gguf {
                path: self.file.path().to_path_buf(),
                source: Box::new(source),
            })?;
        check_finite(&t).map_err(|what| {
            ModelError::invalid(
                self.file.path().display().to_string(),
                format!("`{name}` {what}"),
            )
        })?;
        Ok(t)
    }
    fn quantized(&mut self, _prefix: &str) -> Result<Option<Nf4Tensor>, ModelError> {
        Ok(None)
    }
    fn has(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }
}

/// The positions a model is built for: `opts.max_positions` (the run's sequence length) when
/// given, else `default`; refused when longer than the model's context (`field` of the config
/// is `context`), which its position embeddings or RoPE were trained for.
pub(crate) fn positions(
    opts: &LoadOptions,
    context: usize,
    field: &str,
    default: usize,
) -> Result<usize, ModelError> {
    match opts.max_positions {
        Some(p) if p > context => Err(ModelError::Config {
            path: "config.json".into(),
            what: format!(
                "a sequence length of {p} is longer than the model's context: `{field}` is \
                 {context} (give --seq-len {context} or less)"
            ),
        }),
        Some(p) => Ok(p),
        None => Ok(default.min(context)),
    }
}

/// Load a model from `path`: a `.gguf` file, or an HF folder (plain or bitsandbytes 4-bit).
pub fn load_model(path: &Path, opts: &LoadOptions) -> Result<LoadedModel, ModelError> {
    let is_gguf = path.is_file() && path.extension().is_some_and(|e| e == "gguf");
    if is_gguf {
        let gguf_err = |source: super::gguf::GgufError| ModelError::Gguf {
            path: path.to_path_buf(),
            source: Box::new(source),
        };
        let mut file = GgufFile::open(path).map_err(gguf_err)?;
        let config_json = file.hf_config().map_err(gguf_err)?;
        let config_error = |what| ModelError::Config {
            path: path.display().to_string(),
            what,
        };
        let tok = file.tokenizer().map_err(gguf_err)?;
        let tokenizer = TextTokenizer::new(
            tok.tokenizer,
            tok.chat_template,
            tok.bos_token_id,
            tok.eos_token_id.into_iter().collect(),
        );
        let names = file
            .tensor_entries()
            .map_err(gguf_err)?
            .into_iter()
            .map(|e| e.hf_name)
            .collect();
        let mut src = Gguf { file, names };
        let model = if config_json["model_type"] == "gpt2" {
            let cfg = Gpt2Config::from_json(&config_json).map_err(config_error)?;
            Model::Gpt2(Gpt2::load(&cfg, &mut src, opts)?)
        } else {
            let cfg = LlamaConfig::from_json(&config_json).map_err(config_error)?;
            Model::Llama(build(&cfg, &mut src, opts)?)
        };
        return Ok(LoadedModel {
            model,
            tokenizer: Some(tokenizer),
            kind: SourceKind::Gguf,
            path: path.to_path_buf(),
            config_json,
        });
    }
    if !path.is_dir() {
        return Err(ModelError::Missing {
            path: path.to_path_buf(),
            hint: "expected an HF model folder (config.json + *.safetensors) or a .gguf file",
        });
    }
    let cfg_path = path.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
    let config_json: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: cfg_path.clone(),
        source,
    })?;
    let config_error = |what| ModelError::Config {
        path: cfg_path.display().to_string(),
        what,
    };
    let bnb = match config_json.get("quantization_config") {
        None | Some(Value::Null) => false,
        Some(q) => match q.get("quant_method").and_then(Value::as_str) {
            Some("bitsandbytes") => true,
            other => {
                return Err(config_error(format!(
                    "`quantization_config.quant_method` is {}; of quantized checkpoints only \
                     bitsandbytes' are read (a dense or bitsandbytes 4-bit model, which qlora \
                     quantizes itself)",
                    other.map_or("missing".to_string(), |m| format!("`{m}`"))
                )))
            }
        },
    };
    let dir = SafetensorsDir::open(path)?;
    let tokenizer = TextTokenizer::from_dir(path)?;
    let mut src = StDir { dir, bnb };
    let mut model = match config_json.get("model_type").and_then(Value::as_str) {
        Some("gpt2") => {
            let cfg = Gpt2Config::from_json(&config_json).map_err(config_error)?;
            Model::Gpt2(Gpt2::load(&cfg, &mut src, opts)?)
        }
        Some("bert") => {
            let cfg = BertConfig::from_json(&config_json).map_err(config_error)?;
            Model::Bert(Bert::load(&cfg, &mut src, opts)?)
        }
        _ => {
            let cfg = LlamaConfig::from_json(&config_json).map_err(config_error)?;
            Model::Llama(build(&cfg, &mut src, opts)?)
        }
    };
    if let Some(task) = ClassifierConfig::from_json(&config_json).map_err(config_error)? {
        let classifier = load_classifier(&model, task, &mut src)?;
        model.set_classifier(Some(classifier))?;
    }
    Ok(LoadedModel {
        model,
        tokenizer,
        kind: if bnb {
            SourceKind::Bnb4bit
        } else {
            SourceKind::Safetensors
        },
        path: path.to_path_buf(),
        config_json,
    })
}

/// The head of a `*ForSequenceClassification` checkpoint: `classifier.{weight,bias}` (BERT) or
/// `score.weight` (decoders), `[num_labels, hidden]`, kept in f32.
fn load_classifier(
    model: &Model,
    task: ClassifierConfig,
    src: &mut dyn TensorSource,
) -> Result<SequenceClassifier, ModelError> {
    let (module, dropout) = match model {
        Model::Bert(b) => ("classifier", b.cfg.classifier_dropout),
        _ => ("score", 0.0),
    };
    let shape = [task.labels.len(), model.info().hidden_size];
    let w_name = format!("{module}.weight");
    // transformers + bitsandbytes quantize the head too (it is no output embedding); it is
    // trained in full, so a 4-bit head is dequantized.
    let weight = match src.quantized(&w_name)? {
        Some(q) => q
            .dequantize(DType::F32, &Device::Cpu)
            .map_err(ModelError::Settings)?,
        None => src.dense(&w_name)?,
    };
    check_shape(&w_name, &weight, &shape)?;
    let b_name = format!("{module}.bias");
    let bias = if src.has(&b_name) {
        let b = src.dense(&b_name)?;
        check_shape(&b_name, &b, &shape[..1])?;
        Some(b)
    } else {
        None
    };
    let dev = model.device();
    Ok(SequenceClassifier::new(
        module,
        &weight.to_device(dev)?,
        bias.map(|b| b.to_device(dev)).transpose()?.as_ref(),
        task,
        dropout,
    )?)
}

/// Refuse a checkpoint holding a layer past the config's count (`probe(n)` names a tensor of
/// layer `n`): its weights would be silently left out of the model.
pub(crate) fn refuse_extra_layer(
    src: &dyn TensorSource,
    layers: usize,
    field: &str,
    probe: impl Fn(usize) -> String,
) -> Result<(), ModelError> {
    let name = probe(layers);
    if src.has(&name) {
        return Err(ModelError::Config {
            path: "config.json".into(),
            what: format!(
                "`{field}` is {layers}, but the checkpoint has more layers (`{name}`); the \
                 config and the weights disagree"
            ),
        });
    }
    Ok(())
}

/// Refuse a tensor whose shape is not `expected`, naming it.
pub(crate) fn check_shape(name: &str, t: &Tensor, expected: &[usize]) -> Result<(), ModelError> {
    if t.dims() != expected {
        return Err(ModelError::Shape {
            name: name.to_string(),
            expected: expected.to_vec(),
            got: t.dims().to_vec(),
        });
    }
    Ok(())
}

/// Assemble a [`Llama`] from `src`, one tensor at a time (linear weights quantized as they come).
/// An untied output head must be in the checkpoint: its absence is named with the config field.
pub(crate) fn untied_head_present(src: &dyn TensorSource) -> Result<(), ModelError> {
    if src.has("lm_head.weight") {
        return Ok(());
    }
    Err(ModelError::invalid(
        "config.json",
        "`tie_word_embeddings` is false, but the checkpoint has no `lm_head.weight` for the \
         untied output head (set it true if the head shares the token embeddings)",
    ))
}

pub(crate) fn build(
    cfg: &LlamaConfig,
    src: &mut dyn TensorSource,
    opts: &LoadOptions,
) -> Result<Llama, ModelError> {
    let dev = &opts.device;
    let h = cfg.hidden_size;
    let wdt = opts.weight_dtype.unwrap_or(opts.compute_dtype);
    let dense = |src: &mut dyn TensorSource, name: &str, shape: &[usize]| {
        let t = src.dense(name)?;
        check_shape(name, &t, shape)?;
        Ok::<_, ModelError>(t.to_dtype(wdt)?.to_device(dev)?)
    };
    let embed_tokens = dense(src, "model.embed_tokens.weight", &[cfg.vocab_size, h])?;
    // As in transformers 5: tied unless the checkpoint stores its own `lm_head.weight`, which
    // is then used even when the config says tied.
    let lm_head =
        if cfg.sequence_classification || (cfg.tie_word_embeddings && !src.has("lm_head.weight")) {
            None
        } else {
            untied_head_present(src)?;
            Some(dense(src, "lm_head.weight", &[cfg.vocab_size, h])?)
        };
    let norm = dense(src, "model.norm.weight", &[h])?;
    refuse_extra_layer(src, cfg.num_hidden_layers, "num_hidden_layers", |n| {
        format!("model.layers.{n}.input_layernorm.weight")
    })?;
    let mut layers = Vec::new();
    for li in 0..cfg.num_hidden_layers {
        let mut lin = Vec::with_capacity(7);
        for proj in PROJECTIONS {
            let path = projection_path(li, proj);
            let shape = cfg.projection_shape(proj).unwrap_or((0, 0));
            let has_bias = match proj {
                "q_proj" | "k_proj" | "v_proj" => cfg.attention_bias,
                "o_proj" => cfg.o_proj_bias,
                _ => cfg.mlp_bias,
            };
            let bias_stored = src.has(&format!("{path}.bias"));
            lin.push(load_linear(
                src,
                &path,
                shape,
                has_bias || bias_stored,
                WeightLayout::OutIn,
                opts,
            )?);
        }
        let mut it = lin.into_iter();
        let mut next = || {
            it.next()
                .ok_or_else(|| ModelError::invalid("layer", "projection list exhausted"))
        };
        let attn = Attention::new(cfg, next()?, next()?, next()?, next()?);
        let mlp = Mlp {
            gate_proj: next()?,
            up_proj: next()?,
            down_proj: next()?,
        };
        let ln1 = dense(
            src,
            &format!("model.layers.{li}.input_layernorm.weight"),
            &[h],
        )?;
        let ln2 = dense(
            src,
            &format!("model.layers.{li}.post_attention_layernorm.weight"),
            &[h],
        )?;
        layers.push(DecoderLayer::new(cfg, ln1, attn, ln2, mlp));
    }
    let max_pos = positions(
        opts,
        cfg.max_position_embeddings,
        "max_position_embeddings",
        8192,
    )?;
    Ok(Llama::new(
        cfg.clone(),
        embed_tokens,
        layers,
        norm,
        lm_head,
        max_pos,
        opts.compute_dtype,
    )?)
}

/// The linear layer at checkpoint `path` with HF shape `(out, inp)`: a weight already stored in
/// 4-bit is taken as it is; a dense one (transposed first when the checkpoint stores it
/// `[in, out]`) is quantized or kept dense as `opts` says; the bias is read when `bias`.
pub(crate) fn load_linear(
    src: &mut dyn TensorSource,
    path: &str,
    (out, inp): (usize, usize),
    bias: bool,
    layout: WeightLayout,
    opts: &LoadOptions,
) -> Result<Linear, ModelError> {
    let wname = format!("{path}.weight");
    let stored = src.quantized(&wname)?;
    let dense_dtype = opts.weight_dtype.unwrap_or(opts.compute_dtype);
    let base = match (stored, opts.base) {
        (Some(q), BaseFormat::Quantized(_)) => {
            if q.shape() != [out, inp] {
                return Err(ModelError::Shape {
                    name: wname,
                    expected: vec![out, inp],
                    got: q.shape().to_vec(),
                });
            }
            BaseWeight::Quantized(Arc::new(q))
        }
        (Some(q), BaseFormat::Dense) => {
            // A 4-bit checkpoint asked to run dense: the dequantized weights are the base.
            BaseWeight::Dense(
                q.dequantize(DType::F32, &Device::Cpu)
                    .map_err(ModelError::Settings)?
                    .to_dtype(dense_dtype)?
                    .to_device(&opts.device)?,
            )
        }
        (None, format) => {
            let w = src.dense(&wname)?;
            let w = match layout {
                WeightLayout::OutIn => {
                    check_shape(&wname, &w, &[out, inp])?;
                    w
                }
                WeightLayout::InOut => {
                    check_shape(&wname, &w, &[inp, out])?;
                    w.t()?.contiguous()?
                }
            };
            match format {
                BaseFormat::Quantized(qt) => {
                    let q = Nf4Tensor::from_tensor(&w, qt, opts.blocksize, opts.double_quant)
                        .map_err(|source| ModelError::Quantize {
                            name: wname.clone(),
                            source,
                        })?;
                    BaseWeight::Quantized(Arc::new(q))
                }
                BaseFormat::Dense => {
                    BaseWeight::Dense(w.to_dtype(dense_dtype)?.to_device(&opts.device)?)
                }
            }
        }
    };
    let bias_name = format!("{path}.bias");
    let bias = if bias {
        let b = src.dense(&bias_name)?;
        check_shape(&bias_name, &b, &[out])?;
        Some(b.to_dtype(opts.compute_dtype)?.to_device(&opts.device)?)
    } else {
        None
    };
    Ok(Linear::new(base, bias))
}
