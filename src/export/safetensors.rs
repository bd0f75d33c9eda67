//! The merged model as an HF folder: `config.json` (without `quantization_config`, unless
//! re-quantized), `model.safetensors` or shards + `model.safetensors.index.json`, and the
//! tokenizer / generation files of the source.

use std::path::Path;

use candle_core::{DType, Tensor};
use safetensors::Dtype;
use serde_json::{json, Map, Value};

use super::tensors::{adapted_projections, read_merged, tensor_specs};
use super::{torch_dtype_name, ExportOptions, ExportProgress, ExportReport};
use crate::model::error::ModelError;
use crate::model::loader::{LoadedModel, SourceKind};
use crate::model::quantize::{copy_side_files, quantized_config, QuantizeOptions};
use crate::model::shard_writer::{ShardTensor, ShardWriter};
use crate::model::transformer::WeightLayout;
use crate::quant::{Nf4Tensor, StoredTensor};

/// Little-endian bytes of `t` converted to `dtype`, as a safetensors tensor.
pub fn stored_tensor(t: &Tensor, dtype: DType) -> Result<StoredTensor, ModelError> {
    let t = t.to_dtype(dtype)?.contiguous()?;
    let st_dtype = match dtype {
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        DType::F32 => Dtype::F32,
        other => {
            return Err(ModelError::invalid(
                "--dtype",
                format!("{other:?} is not an export dtype (bf16, f16, f32)"),
            ))
        }
    };
    let mut data = Vec::with_capacity(t.elem_count() * dtype.size_in_bytes());
    t.write_bytes(&mut data)?;
    Ok(StoredTensor {
        dtype: st_dtype,
        shape: t.dims().to_vec(),
        data,
    })
}

/// Write the merged model into the (existing, empty) folder `dir`.
pub fn write_folder(
    loaded: &LoadedModel,
    dir: &Path,
    opts: &ExportOptions,
    progress: &mut dyn FnMut(ExportProgress<'_>),
) -> Result<ExportReport, ModelError> {
    let model = &loaded.model;
    let specs = tensor_specs(model);
    progress(ExportProgress::Started {
        tensors: specs.len(),
    });
    let mut writer = ShardWriter::new(dir, opts.max_shard_bytes);
    let mut requantized = 0;
    for spec in &specs {
        let merged = read_merged(model, spec)?;
        if opts.requantize && spec.is_linear_weight() {
            // bitsandbytes quantizes the `[out, in]` form, also of weights a checkpoint stores
            // `[in, out]` (transformers transposes GPT-2's Conv1D before quantizing).
            let out_in = match spec.layout {
                WeightLayout::OutIn => merged,
                WeightLayout::InOut => merged.t()?.contiguous()?,
            };
            let nf4 = Nf4Tensor::from_tensor(
                &out_in.to_dtype(opts.dtype)?,
                opts.quant,
                opts.blocksize,
                opts.double_quant,
            )
            .map_err(|source| ModelError::Quantize {
                name: spec.name.clone(),
                source,
            })?;
            let group = nf4
                .to_bnb_tensors(&spec.name)
                .into_iter()
                .map(|(n, t)| (n, ShardTensor::Owned(t)))
                .collect();
            writer.add_group(group)?;
            requantized += 1;
        } else {
            let stored = stored_tensor(&merged, opts.dtype)?;
            writer.add(spec.name.clone(), ShardTensor::Owned(stored))?;
        }
        progress(ExportProgress::Tensor { name: &spec.name });
    }
    let tensor_bytes = writer.tensor_bytes();
    let written = writer.finish()?;
    let mut files: Vec<String> = written
        .files
        .iter()
        .filter_map(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .collect();

    let config = export_config(&loaded.config_json, &loaded.model, opts)?;
    let path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config).unwrap_or_default() + "\n";
    std::fs::write(&path, text).map_err(|source| ModelError::Write { path, source })?;
    files.push("config.json".into());
    files.extend(side_files(loaded, dir)?);
    Ok(ExportReport {
        out: dir.to_path_buf(),
        files,
        tensors: specs.len(),
        tensor_bytes,
        merged: adapted_projections(model),
        requantized,
    })
}

/// The source config with the export's dtype, without the source's `quantization_config`
/// (or with a fresh one describing the re-quantized weights).
fn export_config(
    source: &Value,
    model: &crate::model::transformer::Model,
    opts: &ExportOptions,
) -> Result<Value, ModelError> {
    let Value::Object(mut config) = source.clone() else {
        return Err(ModelError::invalid(
            "config.json",
            "the source config is not a JSON object",
        ));
    };
    config.remove("quantization_config");
    if super::tensors::unties_head(model) {
        config.insert("tie_word_embeddings".into(), json!(false));
    }
    // A model that classifies is saved as transformers' classifier of its family, with the
    // head's classes (a head added by training is not in the source config).
    if let Some(head) = model.classifier() {
        let arch = match model {
            crate::model::transformer::Model::Bert(_) => "BertForSequenceClassification",
            _ => match model.info().model_type.as_str() {
                "qwen2" => "Qwen2ForSequenceClassification",
                "mistral" => "MistralForSequenceClassification",
                _ => "LlamaForSequenceClassification",
            },
        };
        let labels = &head.config.labels;
        config.insert("architectures".into(), json!([arch]));
        config.insert(
            "id2label".into(),
            json!(labels
                .iter()
                .enumerate()
                .map(|(i, l)| (i.to_string(), json!(l)))
                .collect::<serde_json::Map<_, _>>()),
        );
        config.insert(
            "label2id".into(),
            json!(labels
                .iter()
                .enumerate()
                .map(|(i, l)| (l.clone(), json!(i)))
                .collect::<serde_json::Map<_, _>>()),
        );
        config.insert("num_labels".into(), json!(labels.len()));
        let problem = if head.config.regression {
            "regression"
        } else {
            "single_label_classification"
        };
        config.insert("problem_type".into(), json!(problem));
    }
    let dtype = json!(torch_dtype_name(opts.dtype));
    let mut set = false;
    for key in ["dtype", "torch_dtype"] {
        if config.contains_key(key) {
            config.insert(key.into(), dtype.clone());
            set = true;
        }
    }
    if !set {
        config.insert("torch_dtype".into(), dtype);
    }
    if opts.requantize {
        let q = QuantizeOptions {
            quant_type: opts.quant,
            blocksize: opts.blocksize,
            double_quant: opts.double_quant,
            max_shard_bytes: opts.max_shard_bytes,
        };
        return Ok(quantized_config(config, &q, torch_dtype_name(opts.dtype)));
    }
    Ok(Value::Object(config))
}

/// Copy the tokenizer files of an HF source; for a GGUF source (which has none) write a
/// `tokenizer.json` and a `tokenizer_config.json` from the tokenizer rebuilt from its metadata.
fn side_files(loaded: &LoadedModel, dir: &Path) -> Result<Vec<String>, ModelError> {
    if loaded.kind != SourceKind::Gguf {
        return copy_side_files(&loaded.path, dir);
    }
    let Some(tok) = &loaded.tokenizer else {
        return Ok(Vec::new());
    };
    let path = dir.join("tokenizer.json");
    tok.inner()
        .save(&path, true)
        .map_err(|e| ModelError::invalid(path.display().to_string(), e.to_string()))?;
    let name = |id: Option<u32>| {
        id.and_then(|id| tok.inner().id_to_token(id))
            .map(Value::String)
            .unwrap_or(Value::Null)
    };
    let mut cfg = Map::new();
    cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    cfg.insert("bos_token".into(), name(tok.bos_token_id()));
    cfg.insert(
        "eos_token".into(),
        name(tok.eos_token_ids().first().copied()),
    );
    if let Some(t) = tok.chat_template() {
        cfg.insert("chat_template".into(), json!(t));
    }
    let path = dir.join("tokenizer_config.json");
    let text = serde_json::to_string_pretty(&Value::Object(cfg)).unwrap_or_default() + "\n";
    std::fs::write(&path, text).map_err(|source| ModelError::Write { path, source })?;
    Ok(vec![
        "tokenizer.json".into(),
        "tokenizer_config.json".into(),
    ])
}
