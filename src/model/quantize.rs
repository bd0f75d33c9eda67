//! Quantize an HF model folder to a bitsandbytes 4-bit checkpoint, byte-compatible with what
//! transformers + bitsandbytes write (`from_pretrained(..., BitsAndBytesConfig(load_in_4bit=True))`
//! then `save_pretrained`), so the output loads in transformers as a pre-quantized model and in
//! our own loader.
//!
//! Memory: the input is memory-mapped; each linear weight is read, widened to f32, quantized,
//! and only the 4-bit result is kept; tensors that stay as they are (embeddings, norms,
//! `lm_head`) are written straight from the map. Peak memory is one f32 weight plus the 4-bit
//! tensors of the shard being assembled (at most `max_shard_bytes`).

use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::{Map, Value};

use super::checkpoint::SafetensorsDir;
use super::error::ModelError;
use super::shard_writer::{ShardTensor, ShardWriter, DEFAULT_MAX_SHARD_BYTES};
use crate::atomic_dir::AtomicDir;
use crate::quant::blockwise::check_blocksize;
use crate::quant::{Nf4Tensor, QuantType, SourceDtype};

/// The projections transformers replaces with `bnb.nn.Linear4bit` in a Llama-style decoder.
const ATTENTION_PROJECTIONS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];
const MLP_PROJECTIONS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// Files copied unchanged from the input folder when present (tokenizer, chat template,
/// generation defaults); `*.txt` and `*.jinja` files are copied too.
pub const COPIED_FILES: [&str; 8] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "chat_template.json",
];

/// How to quantize.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantizeOptions {
    /// NF4 or FP4.
    pub quant_type: QuantType,
    /// Elements per absmax block; bitsandbytes accepts 32..4096 (powers of two). transformers
    /// always uses 64; other values are recorded in each weight's quant state.
    pub blocksize: usize,
    /// Double-quantize the absmax vectors (`bnb_4bit_use_double_quant`).
    pub double_quant: bool,
    /// Start a new output shard past this many bytes of tensor data.
    pub max_shard_bytes: u64,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        Self {
            quant_type: QuantType::Nf4,
            blocksize: 64,
            double_quant: true,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
        }
    }
}

/// What [`quantize_model_dir`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantizeReport {
    /// The output folder.
    pub out: PathBuf,
    /// Linear weights quantized.
    pub quantized: usize,
    /// Tensors copied unchanged.
    pub copied: usize,
    /// Bytes of tensor data read.
    pub bytes_in: u64,
    /// Bytes of tensor data written.
    pub bytes_out: u64,
    /// Weight files written (shards, and the index if sharded), relative to `out`.
    pub weight_files: Vec<String>,
    /// Non-weight files copied from the input, relative to `out`.
    pub copied_files: Vec<String>,
    /// `bnb_4bit_compute_dtype` written into `config.json`.
    pub compute_dtype: String,
}

/// Progress events, in order: one `Started`, one `Tensor` per input tensor, one `Writing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantizeProgress<'a> {
    /// The input was checked; this many tensors will be processed.
    Started {
        /// Tensors in the input.
        tensors: usize,
    },
    /// A tensor was processed.
    Tensor {
        /// Its name.
        name: &'a str,
        /// Quantized (true) or copied (false).
        quantized: bool,
    },
    /// The last weight file and the small files are being written.
    Writing,
}

/// True for the weights a 4-bit checkpoint stores quantized:
/// `model.layers.<i>.self_attn.{q,k,v,o}_proj.weight` and `model.layers.<i>.mlp.{gate,up,down}_proj.weight`.
pub fn is_quantized_linear(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return false;
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return false;
    };
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let Some(module) = rest.strip_suffix(".weight") else {
        return false;
    };
    match module.split_once('.') {
        Some(("self_attn", proj)) => ATTENTION_PROJECTIONS.contains(&proj),
        Some(("mlp", proj)) => MLP_PROJECTIONS.contains(&proj),
        _ => false,
    }
}

/// Quantize the model folder `src` into the new folder `out` (which must not exist). The output
/// appears atomically: it is built in a hidden temporary folder beside `out` and renamed at the
/// end; on any error nothing is left behind.
pub fn quantize_model_dir(
    src: &Path,
    out: &Path,
    options: &QuantizeOptions,
    progress: &mut dyn FnMut(QuantizeProgress<'_>),
) -> Result<QuantizeReport, ModelError> {
    check_blocksize(options.blocksize).map_err(ModelError::Settings)?;
    let config_path = src.join("config.json");
    let config = read_config(&config_path)?;
    let weights = SafetensorsDir::open(src)?;
    let compute_dtype = check_weights(&weights, &config)?;

    let staging = AtomicDir::new(out)?;
    progress(QuantizeProgress::Started {
        tensors: weights.len(),
    });
    let mut writer = ShardWriter::new(staging.path(), options.max_shard_bytes);
    let (mut quantized, mut copied) = (0, 0);
    for name in weights.names() {
        let view = weights.view(name)?;
        let is_linear = is_quantized_linear(name);
        if is_linear {
            let nf4 = quantize_weight(&weights, name, options)?;
            weights.release(name);
            let group = nf4
                .to_bnb_tensors(name)
                .into_iter()
                .map(|(n, t)| (n, ShardTensor::Owned(t)))
                .collect();
            writer.add_group(group)?;
            quantized += 1;
        } else {
            writer.add(name.to_string(), ShardTensor::Mapped(view))?;
            copied += 1;
        }
        progress(QuantizeProgress::Tensor {
            name,
            quantized: is_linear,
        });
    }
    progress(QuantizeProgress::Writing);
    let bytes_out = writer.tensor_bytes();
    let written = writer.finish()?;

    let config = quantized_config(config, options, &compute_dtype);
    let out_config = staging.path().join("config.json");
    let text = serde_json::to_string_pretty(&config).unwrap_or_default() + "\n";
    std::fs::write(&out_config, text).map_err(|source| ModelError::Write {
        path: out_config,
        source,
    })?;
    let copied_files = copy_side_files(src, staging.path())?;

    let weight_files = written
        .files
        .iter()
        .filter_map(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    let out = staging.commit()?;
    Ok(QuantizeReport {
        out,
        quantized,
        copied,
        bytes_in: weights.tensor_bytes(),
        bytes_out,
        weight_files,
        copied_files,
        compute_dtype,
    })
}

/// Read and quantize one linear weight (already checked by [`check_weights`]).
fn quantize_weight(
    weights: &SafetensorsDir,
    name: &str,
    options: &QuantizeOptions,
) -> Result<Nf4Tensor, ModelError> {
    let view = weights.view(name)?;
    let dtype = source_dtype(view.dtype())
        .ok_or_else(|| weights.tensor_error(name, dtype_message(view.dtype())))?;
    let data = weights.read_f32(name)?;
    Nf4Tensor::quantize(
        &data,
        view.shape(),
        dtype,
        options.quant_type,
        options.blocksize,
        options.double_quant,
    )
    .map_err(|source| ModelError::Quantize {
        name: name.to_string(),
        source,
    })
}

fn source_dtype(dtype: Dtype) -> Option<SourceDtype> {
    match dtype {
        Dtype::F32 => Some(SourceDtype::F32),
        Dtype::BF16 => Some(SourceDtype::BF16),
        Dtype::F16 => Some(SourceDtype::F16),
        _ => None,
    }
}

fn dtype_message(dtype: Dtype) -> String {
    format!("dtype {dtype} cannot be quantized; bitsandbytes takes F32, BF16 or F16 weights")
}

/// `config.json` as a JSON object; refuse a model that is already quantized.
fn read_config(path: &Path) -> Result<Map<String, Value>, ModelError> {
    if !path.is_file() {
        return Err(ModelError::Missing {
            path: path.to_path_buf(),
            hint: "a Hugging Face model folder needs its config.json",
        });
    }
    let bytes = std::fs::read(path).map_err(|source| ModelError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let Value::Object(config) = value else {
        return Err(ModelError::Invalid {
            path: path.to_path_buf(),
            what: "expected a JSON object".into(),
        });
    };
    if config.contains_key("quantization_config") {
        return Err(ModelError::Invalid {
            path: path.to_path_buf(),
            what: "the model is already quantized (config has a quantization_config); \
                   quantize the original 16/32-bit model instead"
                .into(),
        });
    }
    Ok(config)
}

/// Check every tensor before any work, so a bad input fails fast; returns the compute dtype
/// name: that of the linear weights, or the config's `dtype` if they are mixed.
fn check_weights(
    weights: &SafetensorsDir,
    config: &Map<String, Value>,
) -> Result<String, ModelError> {
    let mut dtypes = Vec::new();
    for name in weights.names() {
        if name.contains(".quant_state.bitsandbytes__") || name.ends_with(".weight.absmax") {
            return Err(weights.tensor_error(
                name,
                "the checkpoint is already 4-bit; quantize the original model instead".into(),
            ));
        }
        if !is_quantized_linear(name) {
            continue;
        }
        let view = weights.view(name)?;
        let dtype = source_dtype(view.dtype())
            .ok_or_else(|| weights.tensor_error(name, dtype_message(view.dtype())))?;
        if view.shape().len() != 2 {
            return Err(weights.tensor_error(
                name,
                format!(
                    "a linear weight must be 2-D [out, in], shape is {:?}",
                    view.shape()
                ),
            ));
        }
        if !dtypes.contains(&dtype) {
            dtypes.push(dtype);
        }
    }
    match dtypes[..] {
        [] => Err(ModelError::Invalid {
            path: weights.dir().to_path_buf(),
            what: "no linear weights to quantize: expected tensors named like \
                   model.layers.0.self_attn.q_proj.weight (a Llama-style decoder)"
                .into(),
        }),
        [one] => Ok(one.name().to_string()),
        _ => Ok(["dtype", "torch_dtype"]
            .iter()
            .find_map(|k| config.get(*k).and_then(Value::as_str))
            .and_then(SourceDtype::from_name)
            .unwrap_or(SourceDtype::F32)
            .name()
            .to_string()),
    }
}

/// The input config plus the `quantization_config` block transformers writes for a 4-bit
/// bitsandbytes model (same keys and values as `BitsAndBytesConfig.to_dict()` after loading).
pub fn quantized_config(
    mut config: Map<String, Value>,
    options: &QuantizeOptions,
    compute_dtype: &str,
) -> Value {
    let block = serde_json::json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": options.quant_type.name(),
        "bnb_4bit_use_double_quant": options.double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes",
    });
    config.insert("quantization_config".into(), block);
    sorted(Value::Object(config))
}

/// transformers writes config keys sorted; do the same whatever serde_json's map order is.
fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// Copy the tokenizer and generation files that exist in `src`; returns their names.
pub fn copy_side_files(src: &Path, dst: &Path) -> Result<Vec<String>, ModelError> {
    let entries = std::fs::read_dir(src).map_err(|source| ModelError::Read {
        path: src.to_path_buf(),
        source,
    })?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ModelError::Read {
            path: src.to_path_buf(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let wanted = COPIED_FILES.contains(&name.as_str())
            || name.ends_with(".txt")
            || name.ends_with(".jinja");
        if wanted && entry.path().is_file() {
            names.push(name);
        }
    }
    names.sort();
    for name in &names {
        let to = dst.join(name);
        std::fs::copy(src.join(name), &to)
            .map_err(|source| ModelError::Write { path: to, source })?;
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_seven_projections() {
        for name in [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.12.self_attn.o_proj.weight",
            "model.layers.3.mlp.gate_proj.weight",
            "model.layers.3.mlp.down_proj.weight",
        ] {
            assert!(is_quantized_linear(name), "{name}");
        }
        for name in [
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.input_layernorm.weight",
            "model.layers.x.mlp.up_proj.weight",
            "model.layers..mlp.up_proj.weight",
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.0.mlp.up_proj.weight.absmax",
            "model.layers.0.self_attn.rotary_emb.weight",
        ] {
            assert!(!is_quantized_linear(name), "{name}");
        }
    }
}
