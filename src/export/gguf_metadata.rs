//! GGUF metadata for an exported Llama, Qwen2 or GPT-2: `general.*`, `{llama,qwen2,gpt2}.*`
//! hyperparameters
//! (the keys llama.cpp's `convert_hf_to_gguf.py` writes, with the same value types) and the
//! tokenizer (`tokenizer.ggml.*` and the chat template).
//!
//! The tokenizer comes from the source GGUF's own `tokenizer.*` keys when the model was a GGUF,
//! else from the HF folder's `tokenizer.json` + `tokenizer_config.json` (byte-level BPE only, as
//! llama.cpp's `gpt2` vocabulary; the pre-tokenizer is recognised from its structure).

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

use super::gguf::GgufType;
use crate::model::config::{LlamaConfig, RopeScaling};
use crate::model::error::ModelError;
use crate::model::gguf::GgufFile;
use crate::model::gguf_tokenizer::{LLAMA3_SPLIT, QWEN2_SPLIT};
use crate::model::gpt2::Gpt2Config;
use crate::model::loader::{LoadedModel, SourceKind};
use crate::model::transformer::Model;

/// llama.cpp token types (`llama_token_type`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

/// All metadata of the exported file, `general.*` first.
pub fn model_metadata(
    loaded: &LoadedModel,
    ty: GgufType,
) -> Result<Vec<(String, Value)>, ModelError> {
    let target = super::gguf::target(loaded)?;
    let name = model_name(loaded);
    let mut md = match (&loaded.model, target.llama) {
        (Model::Gpt2(g), _) => gpt2_hyperparameters(&g.cfg, ty, &name)?,
        (_, Some(cfg)) => hyperparameters(cfg, ty, &name)?,
        (model, None) => {
            return Err(ModelError::invalid(
                loaded.path.display().to_string(),
                format!(
                    "GGUF export of a `{}` model is not supported",
                    model.info().model_type
                ),
            ))
        }
    };
    md.extend(tokenizer_metadata(loaded)?);
    Ok(md)
}

/// `general.*` keys.
fn general(arch: &str, ty: GgufType, name: &str) -> Vec<(String, Value)> {
    vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(ty.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
    ]
}

/// `general.*` and `gpt2.*` keys, as llama.cpp's converter writes them, except that
/// `feed_forward_length` is the config's `n_inner` (the converter assumes `4 * n_embd`, which
/// llama.cpp then rejects for a checkpoint with another width).
pub fn gpt2_hyperparameters(
    cfg: &Gpt2Config,
    ty: GgufType,
    name: &str,
) -> Result<Vec<(String, Value)>, ModelError> {
    let mut md = general("gpt2", ty, name);
    md.extend([
        ("gpt2.block_count".into(), u32_of("n_layer", cfg.n_layer)?),
        (
            "gpt2.context_length".into(),
            u32_of("n_positions", cfg.n_positions)?,
        ),
        (
            "gpt2.embedding_length".into(),
            u32_of("n_embd", cfg.n_embd)?,
        ),
        (
            "gpt2.feed_forward_length".into(),
            u32_of("n_inner", cfg.n_inner)?,
        ),
        (
            "gpt2.attention.head_count".into(),
            u32_of("n_head", cfg.n_head)?,
        ),
        (
            "gpt2.attention.layer_norm_epsilon".into(),
            Value::F32(cfg.layer_norm_epsilon as f32),
        ),
    ]);
    Ok(md)
}

fn model_name(loaded: &LoadedModel) -> String {
    let stem = loaded
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    format!("{stem} (merged)")
}

fn u32_of(name: &str, n: usize) -> Result<Value, ModelError> {
    u32::try_from(n)
        .map(Value::U32)
        .map_err(|_| ModelError::invalid(name, format!("{n} does not fit GGUF's u32")))
}

/// llama.cpp's architecture for a config: `llama` (Llama, Mistral) or `qwen2`.
pub fn gguf_architecture(cfg: &LlamaConfig) -> Result<&'static str, ModelError> {
    match cfg.model_type.as_str() {
        "llama" | "mistral" => Ok("llama"),
        "qwen2" => Ok("qwen2"),
        other => Err(ModelError::invalid(
            "config.json",
            format!(
                "model_type `{other}` has no GGUF export here (llama, mistral and qwen2 do); \
                 export --format safetensors and convert with llama.cpp's converter"
            ),
        )),
    }
}

/// `general.*` and `{arch}.*` keys for `cfg`.
pub fn hyperparameters(
    cfg: &LlamaConfig,
    ty: GgufType,
    name: &str,
) -> Result<Vec<(String, Value)>, ModelError> {
    let arch = gguf_architecture(cfg)?;
    let key = |name: &str| format!("{arch}.{name}");
    let mut md = general(arch, ty, name);
    md.extend([
        (key("vocab_size"), u32_of("vocab_size", cfg.vocab_size)?),
        (
            key("context_length"),
            u32_of("max_position_embeddings", cfg.max_position_embeddings)?,
        ),
        (
            key("embedding_length"),
            u32_of("hidden_size", cfg.hidden_size)?,
        ),
        (
            key("block_count"),
            u32_of("num_hidden_layers", cfg.num_hidden_layers)?,
        ),
        (
            key("feed_forward_length"),
            u32_of("intermediate_size", cfg.intermediate_size)?,
        ),
        (
            key("rope.dimension_count"),
            u32_of("head_dim", cfg.head_dim)?,
        ),
        (
            key("attention.head_count"),
            u32_of("num_attention_heads", cfg.num_attention_heads)?,
        ),
        (
            key("attention.head_count_kv"),
            u32_of("num_key_value_heads", cfg.num_key_value_heads)?,
        ),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (key("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
    ]);
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size {
        for name in ["key_length", "value_length"] {
            md.push((
                key(&format!("attention.{name}")),
                u32_of("head_dim", cfg.head_dim)?,
            ));
        }
    }
    match cfg.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            md.push((key("rope.scaling.type"), Value::String("linear".into())));
            md.push((key("rope.scaling.factor"), Value::F32(factor as f32)));
        }
        // As llama.cpp's converter: no keys, the factors go in the `rope_freqs.weight` tensor.
        RopeScaling::Llama3 { .. } => {}
    }
    Ok(md)
}

/// The `tokenizer.*` keys: copied from a GGUF source, or built from an HF folder.
pub fn tokenizer_metadata(loaded: &LoadedModel) -> Result<Vec<(String, Value)>, ModelError> {
    if loaded.kind == SourceKind::Gguf {
        let file = GgufFile::open(&loaded.path).map_err(|source| ModelError::Gguf {
            path: loaded.path.clone(),
            source: Box::new(source),
        })?;
        let mut keys: Vec<(String, Value)> = file
            .content()
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        return Ok(keys);
    }
    hf_tokenizer_metadata(
        &loaded.path,
        loaded.model.info().vocab_size,
        &loaded.config_json,
    )
}

fn read_json(path: &Path) -> Result<Json, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// The string of a special-token entry in tokenizer_config.json (`"<s>"` or `{"content": ...}`).
fn token_string(v: Option<&Json>) -> Option<&str> {
    let v = v?;
    v.as_str()
        .or_else(|| v.get("content").and_then(Json::as_str))
}

/// llama.cpp's name for the pre-tokenizer (`tokenizer.ggml.pre`), from tokenizer.json's
/// `pre_tokenizer`.
fn pre_tokenizer_name(pre: &Json) -> Option<&'static str> {
    let is_byte_level = |p: &Json| {
        p.get("type").and_then(Json::as_str) == Some("ByteLevel")
            && p.get("add_prefix_space").and_then(Json::as_bool) != Some(true)
            && p.get("use_regex").and_then(Json::as_bool) != Some(false)
    };
    if is_byte_level(pre) {
        return Some("gpt-2");
    }
    let parts = pre.get("pretokenizers").and_then(Json::as_array)?;
    // Llama 3 / Qwen2: a regex split, then a byte-level step that only maps bytes.
    let split_regex = |p: &Json| -> Option<String> {
        let isolated = p.get("type").and_then(Json::as_str) == Some("Split")
            && p.get("behavior").and_then(Json::as_str) == Some("Isolated")
            && p.get("invert").and_then(Json::as_bool) != Some(true);
        isolated
            .then(|| p.get("pattern")?.get("Regex")?.as_str().map(str::to_string))
            .flatten()
    };
    let bytes_only = |p: &Json| {
        p.get("type").and_then(Json::as_str) == Some("ByteLevel")
            && p.get("add_prefix_space").and_then(Json::as_bool) != Some(true)
            && p.get("use_regex").and_then(Json::as_bool) == Some(false)
    };
    if let [split, byte_level] = parts.as_slice() {
        if bytes_only(byte_level) {
            match split_regex(split).as_deref() {
                Some(LLAMA3_SPLIT) => return Some("llama-bpe"),
                Some(QWEN2_SPLIT) => return Some("qwen2"),
                _ => {}
            }
        }
    }
    match parts.as_slice() {
        [digits, byte_level]
            if digits.get("type").and_then(Json::as_str) == Some("Digits")
                && digits.get("individual_digits").and_then(Json::as_bool) == Some(true)
                && is_byte_level(byte_level) =>
        {
            Some("smollm")
        }
        [byte_level] if is_byte_level(byte_level) => Some("gpt-2"),
        _ => None,
    }
}

/// Whether tokenizer.json's post-processor puts `token` first (BOS) or last (EOS) of a single
/// sequence.
fn template_adds(post: &Json, token: &str, first: bool) -> bool {
    if let Some(list) = post.get("processors").and_then(Json::as_array) {
        return list.iter().any(|p| template_adds(p, token, first));
    }
    let Some(single) = post.get("single").and_then(Json::as_array) else {
        return false;
    };
    let end = if first { single.first() } else { single.last() };
    end.and_then(|e| e.get("SpecialToken"))
        .and_then(|s| s.get("id"))
        .and_then(Json::as_str)
        == Some(token)
}

/// `tokenizer.*` keys from an HF folder's byte-level BPE `tokenizer.json`.
pub fn hf_tokenizer_metadata(
    dir: &Path,
    vocab_size: usize,
    config_json: &Json,
) -> Result<Vec<(String, Value)>, ModelError> {
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(ModelError::Missing {
            path: tok_path,
            hint: "a GGUF export needs the model's tokenizer.json to write its vocabulary",
        });
    }
    let tok = read_json(&tok_path)?;
    let bad = |what: String| ModelError::Invalid {
        path: tok_path.clone(),
        what,
    };
    let model = &tok["model"];
    if model.get("type").and_then(Json::as_str) != Some("BPE") {
        return Err(bad(format!(
            "tokenizer model {} cannot be written to GGUF; only byte-level BPE (llama.cpp's gpt2 \
             vocabulary) is supported",
            model.get("type").unwrap_or(&Json::Null)
        )));
    }
    let pre = pre_tokenizer_name(&tok["pre_tokenizer"]).ok_or_else(|| {
        bad(format!(
            "pre_tokenizer {} is not one llama.cpp knows by name here (plain ByteLevel = gpt-2, \
             Digits + ByteLevel = smollm, Llama 3's or Qwen2's regex Split + ByteLevel = \
             llama-bpe or qwen2)",
            tok["pre_tokenizer"]
        ))
    })?;

    // id -> (token, type)
    let n = vocab_size;
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; n];
    let mut put = |id: u64, text: &str, ty: i32| -> Result<(), ModelError> {
        let slot = usize::try_from(id)
            .ok()
            .and_then(|i| tokens.get_mut(i))
            .ok_or_else(|| {
                bad(format!(
                    "token `{text}` has id {id}, outside the model's vocab_size {n}"
                ))
            })?;
        *slot = Some((text.to_string(), ty));
        Ok(())
    };
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| bad("model.vocab is not an object".into()))?;
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("vocab id of `{text}` is not an integer")))?;
        put(id, text, TOKEN_NORMAL)?;
    }
    for added in tok["added_tokens"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let (Some(id), Some(text)) = (
            added.get("id").and_then(Json::as_u64),
            added.get("content").and_then(Json::as_str),
        ) else {
            return Err(bad(format!("added token {added} lacks id or content")));
        };
        let special = added.get("special").and_then(Json::as_bool) == Some(true);
        put(
            id,
            text,
            if special {
                TOKEN_CONTROL
            } else {
                TOKEN_USER_DEFINED
            },
        )?;
    }
    let (token_list, types): (Vec<Value>, Vec<Value>) = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| match t {
            Some((text, ty)) => (Value::String(text), Value::I32(ty)),
            // As llama.cpp's converter pads a vocabulary shorter than the embedding matrix.
            None => (Value::String(format!("[PAD{i}]")), Value::I32(TOKEN_UNUSED)),
        })
        .unzip();
    let merges = model
        .get("merges")
        .and_then(Json::as_array)
        .ok_or_else(|| bad("model.merges is not a list".into()))?
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(Value::String(s.clone())),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(a), Json::String(b)] => Ok(Value::String(format!("{a} {b}"))),
                _ => Err(bad(format!("merge {m} is not a pair of strings"))),
            },
            other => Err(bad(format!("merge {other} is not a string or pair"))),
        })
        .collect::<Result<Vec<_>, _>>()?;

    let tcfg_path = dir.join("tokenizer_config.json");
    let tcfg = if tcfg_path.is_file() {
        read_json(&tcfg_path)?
    } else {
        Json::Null
    };
    let id_of = |text: Option<&str>| {
        text.and_then(|t| {
            vocab.get(t).and_then(Json::as_u64).or_else(|| {
                tok["added_tokens"].as_array().and_then(|a| {
                    a.iter()
                        .find(|x| x.get("content").and_then(Json::as_str) == Some(t))
                        .and_then(|x| x.get("id").and_then(Json::as_u64))
                })
            })
        })
    };
    let config_id = |key: &str| match config_json.get(key) {
        Some(Json::Array(a)) => a.first().and_then(Json::as_u64),
        Some(v) => v.as_u64(),
        None => None,
    };
    let bos_text = token_string(tcfg.get("bos_token"));
    let eos_text = token_string(tcfg.get("eos_token"));
    let bos = id_of(bos_text).or_else(|| config_id("bos_token_id"));
    let eos = id_of(eos_text).or_else(|| config_id("eos_token_id"));
    let pad = id_of(token_string(tcfg.get("pad_token"))).or_else(|| config_id("pad_token_id"));
    let unk = id_of(model.get("unk_token").and_then(Json::as_str));
    let add_bos = tcfg
        .get("add_bos_token")
        .and_then(Json::as_bool)
        .unwrap_or_else(|| {
            bos_text.is_some_and(|b| template_adds(&tok["post_processor"], b, true))
        });
    let add_eos = tcfg
        .get("add_eos_token")
        .and_then(Json::as_bool)
        .unwrap_or_else(|| {
            eos_text.is_some_and(|e| template_adds(&tok["post_processor"], e, false))
        });

    let mut md = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(token_list)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    for (key, id) in [
        ("bos_token_id", bos),
        ("eos_token_id", eos),
        ("unknown_token_id", unk),
        ("padding_token_id", pad),
    ] {
        if let Some(id) = id {
            md.push((format!("tokenizer.ggml.{key}"), u32_of(key, id as usize)?));
        }
    }
    md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    md.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(add_eos)));
    let jinja = dir.join("chat_template.jinja");
    let template = match tcfg.get("chat_template").and_then(Json::as_str) {
        Some(t) => Some(t.to_string()),
        None if jinja.is_file() => {
            Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?)
        }
        None => None,
    };
    if let Some(t) = template {
        md.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pre_tokenizers_are_recognised() {
        let bl = json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true});
        assert_eq!(pre_tokenizer_name(&bl), Some("gpt-2"));
        let smol = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, bl.clone()]});
        assert_eq!(pre_tokenizer_name(&smol), Some("smollm"));
        let other = json!({"type": "Metaspace"});
        assert_eq!(pre_tokenizer_name(&other), None);
    }

    #[test]
    fn bos_from_template_processing() {
        let post = json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}]});
        assert!(template_adds(&post, "<s>", true));
        assert!(!template_adds(&post, "</s>", false));
        let seq = json!({"type": "Sequence", "processors": [{"type": "ByteLevel"}, post]});
        assert!(template_adds(&seq, "<s>", true));
    }
}
