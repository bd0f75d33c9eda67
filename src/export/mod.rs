//! Export: a base model with its adapter merged in, as an HF safetensors folder (optionally
//! re-quantized to bitsandbytes NF4/FP4) or as a llama.cpp GGUF file.
//!
//! The model is loaded the way it was trained against (4-bit base, dequantized on export) or
//! with its original 16/32-bit weights; merged tensors are then produced one at a time
//! ([`tensors`]) and streamed to the writer, so an export holds one merged weight (plus a
//! safetensors shard being assembled) on top of the loaded model.

pub mod gguf;
pub mod gguf_metadata;
pub mod safetensors;
pub mod tensors;

use std::path::{Path, PathBuf};

use candle_core::DType;
use serde_json::Value;

use crate::atomic_dir::AtomicDir;
use crate::eval::{evaluate, EvalReport};
use crate::model::error::ModelError;
use crate::model::loader::{load_model, BaseFormat, LoadOptions, LoadedModel, SourceKind};
use crate::model::shard_writer::DEFAULT_MAX_SHARD_BYTES;
use crate::peft;
use crate::quant::QuantType;

pub use gguf::GgufType;

/// Which base weights the adapter is merged into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeBase {
    /// The dequantized 4-bit (NF4/FP4) weights the adapter was trained against: the correct
    /// QLoRA export.
    Dequantized,
    /// The original 16/32-bit weights (not available from a bitsandbytes 4-bit checkpoint).
    Original,
}

impl MergeBase {
    /// Parse `dequantized` or `original`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "dequantized" => Ok(MergeBase::Dequantized),
            "original" => Ok(MergeBase::Original),
            other => Err(format!("unknown base `{other}` (dequantized, original)")),
        }
    }
}

/// Output file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// HF folder: config.json, (sharded) safetensors, tokenizer files.
    Safetensors,
    /// One llama.cpp GGUF file, `model.gguf`, in the output folder.
    Gguf,
}

impl ExportFormat {
    /// Parse `safetensors` or `gguf`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "safetensors" => Ok(ExportFormat::Safetensors),
            "gguf" => Ok(ExportFormat::Gguf),
            other => Err(format!("unknown format `{other}` (safetensors, gguf)")),
        }
    }
}

/// Parse an output dtype: `bf16`, `f16` or `f32`.
pub fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        "f32" => Ok(DType::F32),
        other => Err(format!("unknown dtype `{other}` (bf16, f16, f32)")),
    }
}

/// transformers' name of a dtype (`bfloat16`, ...), as written in config.json.
pub fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// The GGUF file name inside the output folder.
pub const GGUF_FILE: &str = "model.gguf";

/// How to merge and export.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Merge into the dequantized 4-bit base (default) or the original weights.
    pub base: MergeBase,
    /// The 4-bit format the adapter was trained against (dequantized base).
    pub quant: QuantType,
    /// Blocksize of that quantization.
    pub blocksize: usize,
    /// Double quantization of the absmax, as in training.
    pub double_quant: bool,
    /// Dtype of the written tensors (safetensors; also the GGUF default).
    pub dtype: DType,
    /// Safetensors folder or GGUF file.
    pub format: ExportFormat,
    /// Largest safetensors shard, in bytes of tensor data.
    pub max_shard_bytes: u64,
    /// GGUF tensor type of the matrices; `None` follows `dtype`.
    pub gguf_type: Option<GgufType>,
    /// Quantize the merged linear weights back to 4-bit (bitsandbytes layout, safetensors).
    pub requantize: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            base: MergeBase::Dequantized,
            quant: QuantType::Nf4,
            blocksize: 64,
            double_quant: true,
            dtype: DType::BF16,
            format: ExportFormat::Safetensors,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            gguf_type: None,
            requantize: false,
        }
    }
}

/// Progress events, in order: one `Started`, one `Tensor` per written tensor, one `Writing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportProgress<'a> {
    /// This many tensors will be written.
    Started {
        /// Tensors to write.
        tensors: usize,
    },
    /// A tensor was merged (if it is an adapted projection) and handed to the writer.
    Tensor {
        /// Its HF name.
        name: &'a str,
    },
    /// Small files are being written and the folder committed.
    Writing,
}

/// What an export wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportReport {
    /// The output folder.
    pub out: PathBuf,
    /// Files written, relative to `out`.
    pub files: Vec<String>,
    /// Tensors written (a re-quantized weight counts once).
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub tensor_bytes: u64,
    /// Projections that had an adapter merged in.
    pub merged: usize,
    /// Linear weights quantized back to 4-bit.
    pub requantized: usize,
}

/// What a consumer of the export will not reproduce, one sentence each, for the CLI to print as
/// warnings before it writes anything.
pub fn caveats(cfg: &crate::model::config::LlamaConfig, opts: &ExportOptions) -> Vec<String> {
    let mut out = Vec::new();
    if opts.format == ExportFormat::Gguf {
        if let Some(w) = cfg
            .sliding_window
            .filter(|&w| w < cfg.max_position_embeddings)
        {
            out.push(format!(
                "the model attends to a sliding window of {w} keys; llama.cpp's `llama` \
                 architecture, which GGUF has for `{}`, attends to every key, so llama.cpp's \
                 outputs match this model's only up to {w} tokens",
                cfg.model_type
            ));
        }
    }
    out
}

/// Load `model` as `opts` says (4-bit for a dequantized merge, dense for an original one) and
/// put the adapter in `adapter` on it; every adapter shape is checked against the model.
pub fn load_for_merge(
    model: &Path,
    adapter: &Path,
    opts: &ExportOptions,
) -> Result<LoadedModel, ModelError> {
    let load = match opts.base {
        MergeBase::Dequantized => LoadOptions {
            base: BaseFormat::Quantized(opts.quant),
            blocksize: opts.blocksize,
            double_quant: opts.double_quant,
            ..Default::default()
        },
        MergeBase::Original => {
            refuse_bnb_original(model)?;
            LoadOptions {
                base: BaseFormat::Dense,
                weight_dtype: Some(lossless_storage_dtype(model)),
                ..Default::default()
            }
        }
    };
    let mut loaded = load_model(model, &load)?;
    if opts.base == MergeBase::Original && loaded.kind == SourceKind::Bnb4bit {
        return Err(no_original_weights(model));
    }
    peft::load_adapter(&mut loaded.model, adapter, None)?;
    Ok(loaded)
}

fn no_original_weights(model: &Path) -> ModelError {
    ModelError::Invalid {
        path: model.to_path_buf(),
        what: "--base original needs the original 16/32-bit weights, but this is a \
               bitsandbytes 4-bit checkpoint (only the quantized weights exist); use \
               --base dequantized, or point --model at the original model"
            .into(),
    }
}

/// Refuse early (before loading anything) when `model` is a bitsandbytes 4-bit folder.
fn refuse_bnb_original(model: &Path) -> Result<(), ModelError> {
    let cfg = model.join("config.json");
    if model.is_dir() && cfg.is_file() {
        let text = std::fs::read_to_string(&cfg).map_err(|e| ModelError::io(&cfg, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: cfg.clone(),
            source,
        })?;
        if v.get("quantization_config").is_some() {
            return Err(no_original_weights(model));
        }
    }
    Ok(())
}

/// The dtype the original weights are stored in when it is 16-bit (so keeping them in it is
/// lossless and halves memory), else f32.
fn lossless_storage_dtype(model: &Path) -> DType {
    let text = std::fs::read_to_string(model.join("config.json")).unwrap_or_default();
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    match ["torch_dtype", "dtype"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Value::as_str))
    {
        Some("bfloat16") => DType::BF16,
        Some("float16") => DType::F16,
        _ => DType::F32,
    }
}

/// Load, merge and write: `model` + `adapter` → the new folder `out` (refused if it exists;
/// written under a temporary name and renamed at the end, so a failed export leaves nothing).
pub fn export_merged(
    model: &Path,
    adapter: &Path,
    out: &Path,
    opts: &ExportOptions,
    progress: &mut dyn FnMut(ExportProgress<'_>),
) -> Result<ExportReport, ModelError> {
    // Checked first so a long load is not wasted on an output that cannot be written.
    if std::fs::symlink_metadata(out).is_ok() {
        return Err(crate::atomic_dir::AtomicDirError::Exists(out.to_path_buf()).into());
    }
    let loaded = load_for_merge(model, adapter, opts)?;
    export_loaded(&loaded, out, opts, progress)
}

/// Write `loaded` (with whatever adapters it carries, merged on the way) to the new folder
/// `out` in the format `opts` asks for.
pub fn export_loaded(
    loaded: &LoadedModel,
    out: &Path,
    opts: &ExportOptions,
    progress: &mut dyn FnMut(ExportProgress<'_>),
) -> Result<ExportReport, ModelError> {
    if opts.requantize && opts.format == ExportFormat::Gguf {
        return Err(ModelError::invalid(
            "--requantize",
            "re-quantizing to NF4 writes the bitsandbytes safetensors layout; GGUF has no \
             NF4 type (use --gguf-type q8_0 for a quantized GGUF)",
        ));
    }
    let staging = AtomicDir::new(out)?;
    let written = match opts.format {
        ExportFormat::Safetensors => {
            safetensors::write_folder(loaded, staging.path(), opts, progress)?
        }
        ExportFormat::Gguf => {
            let gguf_type = opts
                .gguf_type
                .unwrap_or_else(|| GgufType::from_dtype(opts.dtype));
            gguf::write_file(loaded, &staging.path().join(GGUF_FILE), gguf_type, progress)?
        }
    };
    progress(ExportProgress::Writing);
    let out = staging.commit()?;
    Ok(ExportReport { out, ..written })
}

/// Perplexity of the merged model kept dense (the adapters of `loaded` merged in memory, f32)
/// and of the re-quantized export in `out`, on `seqs` in windows of `seq_len`.
pub fn compare_requantized(
    mut loaded: LoadedModel,
    out: &Path,
    opts: &ExportOptions,
    seqs: &[crate::data::dataset::TokenSequence],
    seq_len: usize,
) -> Result<(EvalReport, EvalReport), ModelError> {
    crate::peft::merge::merge_model(&mut loaded.model)?;
    let dense = evaluate(&loaded.model, seqs, seq_len, |_, _| {})?;
    drop(loaded);
    let requantized = load_model(
        out,
        &LoadOptions {
            base: BaseFormat::Quantized(opts.quant),
            blocksize: opts.blocksize,
            double_quant: opts.double_quant,
            max_positions: Some(seq_len),
            ..Default::default()
        },
    )?;
    let requant = evaluate(&requantized.model, seqs, seq_len, |_, _| {})?;
    Ok((dense, requant))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::LlamaConfig;

    fn config(extra: serde_json::Value) -> LlamaConfig {
        let mut v = serde_json::json!({"model_type": "mistral", "vocab_size": 32, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "max_position_embeddings": 64, "rms_norm_eps": 1e-6});
        for (k, x) in extra.as_object().into_iter().flatten() {
            v[k] = x.clone();
        }
        LlamaConfig::from_json(&v).unwrap()
    }

    #[test]
    fn a_sliding_window_is_a_gguf_caveat_only_when_it_binds() {
        let gguf = ExportOptions {
            format: ExportFormat::Gguf,
            ..Default::default()
        };
        let windowed = config(serde_json::json!({"sliding_window": 6}));
        let notes = caveats(&windowed, &gguf);
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("window of 6 keys") && notes[0].contains("`mistral`"));
        // Safetensors keeps `sliding_window` in config.json: nothing lost.
        assert!(caveats(&windowed, &ExportOptions::default()).is_empty());
        // A window as long as the context never binds (Qwen2's usual config), nor does none.
        assert!(caveats(&config(serde_json::json!({"sliding_window": 64})), &gguf).is_empty());
        assert!(caveats(&config(serde_json::json!({})), &gguf).is_empty());
    }
}
