//! Configs of well-known models by name, so a plan needs no download (numbers from each model's
//! published `config.json`), and reading a config from a model path.

use serde_json::{json, Value};

use super::shape::PlanModel;
use crate::model::config::LlamaConfig;
use crate::model::error::ModelError;
use crate::model::gguf::GgufFile;

/// Preset names `preset_config` knows.
pub const PRESETS: [&str; 4] = ["llama-2-7b", "llama-3-8b", "mistral-7b", "qwen2-7b"];

/// The published `config.json` of a preset (case-insensitive name).
pub fn preset_json(name: &str) -> Option<Value> {
    Some(match name.to_ascii_lowercase().as_str() {
        // meta-llama/Llama-2-7b-hf
        "llama-2-7b" => json!({"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 4096, "tie_word_embeddings": false,
            "bos_token_id": 1, "eos_token_id": 2}),
        // meta-llama/Meta-Llama-3-8B
        "llama-3-8b" => json!({"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": 8192, "tie_word_embeddings": false,
            "bos_token_id": 128000, "eos_token_id": 128001}),
        // mistralai/Mistral-7B-v0.1
        "mistral-7b" => json!({"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 32768, "sliding_window": 4096,
            "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2}),
        // Qwen/Qwen2-7B: q/k/v biases, untied head (only the 0.5B and 1.5B tie).
        "qwen2-7b" => json!({"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
            "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "max_position_embeddings": 131072, "sliding_window": 131072,
            "use_sliding_window": false, "tie_word_embeddings": false,
            "bos_token_id": 151643, "eos_token_id": 151643}),
        _ => return None,
    })
}

/// The config of a preset.
pub fn preset_config(name: &str) -> Option<LlamaConfig> {
    // The presets are well-formed; a parse failure would be a bug caught by the tests.
    preset_json(name).and_then(|v| LlamaConfig::from_json(&v).ok())
}

/// A config from a preset name, a `.gguf` file, an HF folder or a `config.json` path, as the
/// family it names.
pub fn resolve_config(model: &str) -> Result<PlanModel, ModelError> {
    if let Some(cfg) = preset_config(model) {
        return Ok(cfg.into());
    }
    let resolved = crate::hub::model_config_path(model).map_err(|e| ModelError::Config {
        path: model.to_string(),
        what: e.to_string(),
    })?;
    let path = resolved.as_path();
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        let gguf_err = |source| ModelError::Gguf {
            path: path.to_path_buf(),
            source: Box::new(source),
        };
        let v = GgufFile::open(path)
            .map_err(gguf_err)?
            .hf_config()
            .map_err(gguf_err)?;
        return PlanModel::from_json(&v).map_err(|what| ModelError::Config {
            path: path.display().to_string(),
            what,
        });
    }
    let file = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    if !file.is_file() {
        return Err(ModelError::Missing {
            path: file,
            hint: "give a preset (llama-2-7b, llama-3-8b, mistral-7b, qwen2-7b), a .gguf file, an HF model folder or its config.json",
        });
    }
    let text = std::fs::read_to_string(&file).map_err(|e| ModelError::io(&file, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: file.clone(),
        source,
    })?;
    PlanModel::from_json(&v).map_err(|what| ModelError::Config {
        path: file.display().to_string(),
        what,
    })
}
