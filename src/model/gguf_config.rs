//! An HF `config.json` for a Llama, Qwen2 or GPT-2 GGUF, derived from its `{arch}.*` and
//! `tokenizer.*` metadata (and its `rope_freqs.weight`, see [`apply_rope_freqs`]).
//!
//! The output is a plain `serde_json::Value` in config.json form, so the same config parser reads
//! an HF folder and a GGUF file alike.

use candle_core::quantized::gguf_file::Content;
use serde_json::{json, Map, Value as Json};

use super::config::{llama3_scaling_from_factors, RopeScaling};
use super::gguf::{GgufError, Metadata, ROPE_FREQS};

/// HF-style config (`LlamaForCausalLM` or `Qwen2ForCausalLM`) from a llama or qwen2 GGUF's
/// metadata and tensor directory.
pub fn hf_config(content: &Content) -> Result<Json, GgufError> {
    let md = Metadata::new(&content.metadata);
    let arch = md.str("general.architecture")?;
    let (model_type, class) = match arch {
        "llama" => ("llama", "LlamaForCausalLM"),
        "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
        "gpt2" => return gpt2_config(content, &md),
        _ => return Err(GgufError::UnsupportedArchitecture(arch.into())),
    };
    let key = |name: &str| format!("{arch}.{name}");

    let hidden_size = md.usize(&key("embedding_length"))?;
    let num_heads = md.usize(&key("attention.head_count"))?;
    let num_kv_heads = md
        .opt_usize(&key("attention.head_count_kv"))?
        .unwrap_or(num_heads);
    let head_dim = match md.opt_usize(&key("attention.key_length"))? {
        Some(d) => d,
        None if num_heads > 0 => hidden_size / num_heads,
        None => return Err(GgufError::MissingMetadata(key("attention.head_count"))),
    };
    let vocab_size = match md.opt_usize(&key("vocab_size"))? {
        Some(n) => n,
        None => md
            .opt_array("tokenizer.ggml.tokens")?
            .map(<[_]>::len)
            .ok_or_else(|| GgufError::MissingMetadata(key("vocab_size")))?,
    };
    let rope_theta = md.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0);
    let rope_scaling = rope_scaling(&md, arch)?;
    let has_tensor = |name: &str| content.tensor_infos.contains_key(name);

    let mut rope_parameters = Map::new();
    rope_parameters.insert("rope_theta".into(), json!(rope_theta));
    match &rope_scaling {
        Json::Object(scaling) => rope_parameters.extend(scaling.clone()),
        _ => {
            rope_parameters.insert("rope_type".into(), json!("default"));
        }
    }

    let mut config = json!({
        "architectures": [class],
        "model_type": model_type,
        "hidden_size": hidden_size,
        "intermediate_size": md.usize(&key("feed_forward_length"))?,
        "num_hidden_layers": md.usize(&key("block_count"))?,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        // The f32 stored in GGUF, widened exactly (1e-5 reads as 9.999999747378752e-06, as in
        // configs converted from GGUF).
        "rms_norm_eps": md.f64(&key("attention.layer_norm_rms_epsilon"))?,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "vocab_size": vocab_size,
        "max_position_embeddings": md.opt_usize(&key("context_length"))?.unwrap_or(2048),
        // llama.cpp's converter drops `output.weight` when the embedding is shared.
        "tie_word_embeddings": !has_tensor("output.weight"),
        "attention_bias": has_tensor("blk.0.attn_q.bias"),
        "attention_dropout": 0.0,
        "mlp_bias": has_tensor("blk.0.ffn_up.bias"),
    });
    if let Json::Object(map) = &mut config {
        special_token_ids(&md, map)?;
    }
    Ok(config)
}

/// `bos_token_id`, `eos_token_id` and `pad_token_id` from the tokenizer metadata.
fn special_token_ids(md: &Metadata<'_>, map: &mut Map<String, Json>) -> Result<(), GgufError> {
    for (hf, gguf) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(id) = md.opt_usize(gguf)? {
            map.insert(hf.into(), json!(id));
        }
    }
    Ok(())
}

/// `GPT2LMHeadModel` config from a `gpt2` GGUF. llama.cpp's GPT-2 uses the tanh GELU
/// (`gelu_new`) and no dropout is stored, so the probabilities are transformers' defaults.
fn gpt2_config(content: &Content, md: &Metadata<'_>) -> Result<Json, GgufError> {
    let n_embd = md.usize("gpt2.embedding_length")?;
    let vocab_size = match md.opt_usize("gpt2.vocab_size")? {
        Some(n) => n,
        None => content
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .ok_or_else(|| GgufError::MissingTensor("token_embd.weight".into()))?,
    };
    let mut config = json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": md.usize("gpt2.context_length")?,
        "n_embd": n_embd,
        "n_layer": md.usize("gpt2.block_count")?,
        "n_head": md.usize("gpt2.attention.head_count")?,
        "n_inner": md.opt_usize("gpt2.feed_forward_length")?.unwrap_or(4 * n_embd),
        "activation_function": "gelu_new",
        "layer_norm_epsilon": md.f64("gpt2.attention.layer_norm_epsilon")?,
        "tie_word_embeddings": !content.tensor_infos.contains_key("output.weight"),
    });
    if let Json::Object(map) = &mut config {
        special_token_ids(md, map)?;
    }
    Ok(config)
}

/// Put the Llama 3 scaling that llama.cpp's `rope_freqs.weight` factors stand for into an
/// [`hf_config`] result (`rope_scaling` and `rope_parameters`).
pub fn apply_rope_freqs(config: &mut Json, factors: &[f32]) -> Result<(), GgufError> {
    let bad = |what: String| GgufError::InvalidTensor {
        tensor: ROPE_FREQS.into(),
        what,
    };
    let head_dim = config["head_dim"]
        .as_u64()
        .ok_or_else(|| bad("the config has no head_dim".into()))? as usize;
    let theta = config["rope_theta"].as_f64().unwrap_or(10_000.0);
    if !config["rope_scaling"].is_null() {
        return Err(bad(format!(
            "the metadata already names RoPE scaling {}; both cannot apply",
            config["rope_scaling"]
        )));
    }
    let Some(RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    }) = llama3_scaling_from_factors(head_dim, theta, factors).map_err(bad)?
    else {
        return Ok(());
    };
    let scaling = json!({
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low_freq_factor,
        "high_freq_factor": high_freq_factor,
        // A context length: an integer in HF configs.
        "original_max_position_embeddings": original_max_position_embeddings as u64,
    });
    if let (Json::Object(params), Json::Object(fields)) = (&mut config["rope_parameters"], &scaling)
    {
        params.remove("rope_type");
        params.extend(fields.clone());
    }
    config["rope_scaling"] = scaling;
    Ok(())
}

/// HF `rope_scaling` from `{arch}.rope.scaling.*`, or `null` when there is none.
///
/// llama3-style scaling is not in the metadata (llama.cpp stores its per-frequency factors as
/// the `rope_freqs.weight` tensor), so it cannot be expressed here.
fn rope_scaling(md: &Metadata<'_>, arch: &str) -> Result<Json, GgufError> {
    let key = |name: &str| format!("{arch}.rope.scaling.{name}");
    let kind = md.opt_str(&key("type"))?;
    let factor = match md.opt_f64(&key("factor"))? {
        Some(f) => Some(f),
        // Older files spell linear scaling as `rope.scale_linear`.
        None => md.opt_f64(&format!("{arch}.rope.scale_linear"))?,
    };
    let kind = match (kind, factor) {
        (Some("none"), _) | (None, None) => return Ok(Json::Null),
        (Some(kind), _) => kind,
        (None, Some(_)) => "linear",
    };
    let mut scaling = Map::new();
    scaling.insert("rope_type".into(), json!(kind));
    if let Some(factor) = factor {
        scaling.insert("factor".into(), json!(factor));
    }
    if let Some(n) = md.opt_usize(&key("original_context_length"))? {
        scaling.insert("original_max_position_embeddings".into(), json!(n));
    }
    Ok(Json::Object(scaling))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Value;
    use std::collections::HashMap;

    fn content(entries: &[(&str, Value)]) -> Content {
        let metadata: HashMap<String, Value> = entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        Content {
            magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
            metadata,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    fn minimal() -> Vec<(&'static str, Value)> {
        vec![
            ("general.architecture", Value::String("llama".into())),
            ("llama.embedding_length", Value::U32(64)),
            ("llama.feed_forward_length", Value::U32(128)),
            ("llama.block_count", Value::U32(2)),
            ("llama.attention.head_count", Value::U32(4)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
            ("llama.vocab_size", Value::U32(100)),
        ]
    }

    #[test]
    fn defaults_fill_optional_keys() {
        let config = hf_config(&content(&minimal())).expect("config");
        assert_eq!(config["num_key_value_heads"], 4);
        assert_eq!(config["head_dim"], 16);
        assert_eq!(config["rope_theta"], 10_000.0);
        assert_eq!(config["rope_scaling"], Json::Null);
        assert_eq!(config["rope_parameters"]["rope_type"], "default");
        assert_eq!(config["tie_word_embeddings"], true);
        assert!(config.get("bos_token_id").is_none());
    }

    #[test]
    fn linear_rope_scaling_is_carried() {
        let mut entries = minimal();
        entries.push(("llama.rope.scaling.type", Value::String("linear".into())));
        entries.push(("llama.rope.scaling.factor", Value::F32(4.0)));
        let config = hf_config(&content(&entries)).expect("config");
        assert_eq!(config["rope_scaling"]["rope_type"], "linear");
        assert_eq!(config["rope_scaling"]["factor"], 4.0);
        assert_eq!(config["rope_parameters"]["factor"], 4.0);
        assert_eq!(config["rope_parameters"]["rope_theta"], 10_000.0);
    }

    #[test]
    fn missing_required_key_is_named() {
        let entries: Vec<_> = minimal()
            .into_iter()
            .filter(|(k, _)| *k != "llama.block_count")
            .collect();
        let err = hf_config(&content(&entries)).expect_err("missing key");
        assert!(err.to_string().contains("llama.block_count"), "{err}");
    }

    #[test]
    fn other_architectures_are_refused() {
        let mut entries = minimal();
        entries[0].1 = Value::String("gemma".into());
        let err = hf_config(&content(&entries)).expect_err("gemma");
        assert!(err.to_string().contains("gemma"), "{err}");
    }

    #[test]
    fn qwen2_reads_its_own_keys() {
        let entries: Vec<(String, Value)> = minimal()
            .into_iter()
            .map(|(k, v)| match k {
                "general.architecture" => (k.to_string(), Value::String("qwen2".into())),
                _ => (k.replacen("llama.", "qwen2.", 1), v),
            })
            .collect();
        let refs: Vec<(&str, Value)> = entries
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let config = hf_config(&content(&refs)).expect("qwen2 config");
        assert_eq!(config["model_type"], "qwen2");
        assert_eq!(config["architectures"][0], "Qwen2ForCausalLM");
        assert_eq!(config["hidden_size"], 64);
    }
}
