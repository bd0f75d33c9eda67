//! PEFT's on-disk adapter format: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Keys are `base_model.model.<module path>.lora_A.weight` (`[r, in]`), `...lora_B.weight`
//! (`[out, r]`) and, for DoRA, `...lora_magnitude_vector` (`[out]`), where the module path is
//! the layer's checkpoint path (`model.layers.0.self_attn.q_proj`, `transformer.h.0.attn.c_attn`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::json_fields::optional;
use candle_core::{DType, Device, Tensor, Var};
use serde_json::{json, Value};

use super::check_targets;
use crate::atomic_dir::AtomicDir;
use crate::lora::adalora::AdaLoraConfig;
use crate::lora::config::ALL_LINEAR;
use crate::lora::embedding::{EmbeddingAdapter, EMBEDDING_A, EMBEDDING_B};
use crate::lora::{LoraAdapter, LoraConfig, LoraInit};
use crate::model::classifier::{ClassifierConfig, SequenceClassifier};
use crate::model::error::ModelError;
use crate::model::transformer::{Model, WeightLayout};

/// File names of a PEFT adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// Weights file of a PEFT adapter folder.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

const PREFIX: &str = "base_model.model.";

/// PEFT key of tensor `suffix` (`lora_A.weight`) of the adapter on the module at `path`.
pub fn peft_key(path: &str, suffix: &str) -> String {
    format!("{PREFIX}{path}.{suffix}")
}

/// Read `adapter_config.json` into a [`LoraConfig`]; features this tool does not implement are
/// refused by name rather than silently ignored.
pub fn read_config(dir: &Path) -> Result<LoraConfig, ModelError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::invalid(path.display().to_string(), format!("not JSON: {e}")))?;
    let bad = |what: String| ModelError::Config {
        path: path.display().to_string(),
        what,
    };
    let adalora = match v.get("peft_type").and_then(Value::as_str) {
        None | Some("LORA") => None,
        Some("ADALORA") => Some(read_adalora(&v).map_err(&bad)?),
        Some(t) => {
            return Err(bad(format!(
                "peft_type `{t}` is not supported (LORA, ADALORA)"
            )))
        }
    };
    // AdaLoRA ignores `r` (PEFT writes its default 8): every module starts at `init_r`.
    let rank = match &adalora {
        Some(a) => a.init_r,
        None => optional(&v, "r", Value::as_u64, "a positive integer")
            .map_err(&bad)?
            .ok_or_else(|| bad("the field `r` (the LoRA rank) is missing".into()))?
            as usize,
    };
    if rank == 0 {
        return Err(bad("`r` must be positive".into()));
    }
    let alpha = optional(&v, "lora_alpha", Value::as_f64, "a number")
        .map_err(&bad)?
        .ok_or_else(|| bad("the field `lora_alpha` is missing".into()))?;
    let targets: Vec<String> = match v.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("`target_modules` must be a list of names".into()))?,
        Some(Value::String(s)) if s == ALL_LINEAR => vec![ALL_LINEAR.to_string()],
        other => {
            return Err(bad(format!(
                "`target_modules` {} is not supported (a list of module names, or \"all-linear\"; \
                 a regular expression is not)",
                other.map_or("(missing)".to_string(), Value::to_string)
            )))
        }
    };
    refuse_unimplemented(&v).map_err(bad)?;
    let patterns: Patterns = if adalora.is_some() {
        // AdaLoRA's `rank_pattern` is its masks, read with its other fields.
        Patterns::default()
    } else {
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?
    };
    let rank_pattern = patterns
        .rank_pattern
        .0
        .into_iter()
        .map(|(k, r)| match r.as_u64() {
            Some(r) => Ok((k, r as usize)),
            None => Err(bad(format!("rank_pattern `{k}`: {r} is not a rank"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let alpha_pattern = patterns
        .alpha_pattern
        .0
        .into_iter()
        .map(|(k, a)| match a.as_f64() {
            Some(a) => Ok((k, a)),
            None => Err(bad(format!("alpha_pattern `{k}`: {a} is not a number"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let layers_to_transform = match v.get("layers_to_transform") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(vec![n
            .as_u64()
            .ok_or_else(|| bad(format!("layers_to_transform {n} is not a layer index")))?
            as usize]),
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|x| x.as_u64().map(|i| i as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("layers_to_transform must list layer indices".into()))?,
        ),
        Some(other) => {
            return Err(bad(format!(
                "layers_to_transform {other} is not a layer list"
            )))
        }
    };
    let strings = |key: &str| -> Result<Vec<String>, ModelError> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::String(s)) if key == "layers_pattern" => Ok(vec![s.clone()]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad(format!("`{key}` must be a list of names"))),
            Some(other) => Err(bad(format!(
                "`{key}` {other} is not supported (a list of module names; a regular expression \
                 is not)"
            ))),
        }
    };
    let layers_pattern = strings("layers_pattern")?;
    let exclude_modules = strings("exclude_modules")?;
    // `fan_in_fan_out` only says how the base layer stores its weight (GPT-2's Conv1D); the
    // model knows that per layer, and A and B have the same shapes either way.
    if let Some(b) = v.get("bias").and_then(Value::as_str) {
        if b != "none" {
            return Err(bad(format!("bias `{b}` is not supported (only \"none\")")));
        }
    }
    let init = match v.get("init_lora_weights") {
        Some(Value::String(s)) if s.starts_with("pissa") => LoraInit::Pissa,
        Some(Value::String(s)) if s == "gaussian" => LoraInit::Gaussian,
        // Methods that also rewrite the base weights (OLoRA, CorDA, LoftQ, ...) or that need
        // data to initialise (EVA): the saved adapter is meaningless without them.
        Some(Value::String(s)) => {
            return Err(bad(format!(
                "init_lora_weights `{s}` is not supported (true, false, gaussian, pissa)"
            )))
        }
        _ => LoraInit::Kaiming,
    };
    let dropout = optional(&v, "lora_dropout", Value::as_f64, "a probability in [0, 1)")
        .map_err(&bad)?
        .unwrap_or(0.0);
    if !(0.0..1.0).contains(&dropout) {
        return Err(bad(format!(
            "`lora_dropout` is {dropout}, expected a probability in [0, 1)"
        )));
    }
    let dropout = dropout as f32;
    let cfg = LoraConfig {
        rank,
        alpha,
        dropout,
        targets,
        use_rslora: optional(&v, "use_rslora", Value::as_bool, "true or false")
            .map_err(&bad)?
            .unwrap_or(false),
        use_dora: optional(&v, "use_dora", Value::as_bool, "true or false")
            .map_err(&bad)?
            .unwrap_or(false),
        init,
        dtype: DType::F32,
        rank_pattern,
        alpha_pattern,
        layers_to_transform,
        layers_pattern,
        exclude_modules,
        adalora,
    };
    cfg.validate_patterns().map_err(&bad)?;
    if cfg.adalora.is_some() && cfg.use_dora {
        return Err(bad(
            "AdaLoRA with `use_dora` is not supported (nor is it by PEFT)".into(),
        ));
    }
    Ok(cfg)
}

/// AdaLoRA's fields of `adapter_config.json`; `rank_pattern` is `{"<module>.lora_E": [kept,
/// ...]}` (or null before any masking).
fn read_adalora(v: &Value) -> Result<AdaLoraConfig, String> {
    let int = |k: &str| -> Result<usize, String> {
        optional(v, k, Value::as_u64, "a non-negative integer")?
            .map(|x| x as usize)
            .ok_or(format!("the AdaLoRA field `{k}` is missing"))
    };
    let float = |k: &str| -> Result<f64, String> {
        optional(v, k, Value::as_f64, "a number")?
            .ok_or(format!("the AdaLoRA field `{k}` is missing"))
    };
    let init_r = int("init_r")?;
    let rank_pattern = match v.get("rank_pattern") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) if m.is_empty() => None,
        Some(Value::Object(m)) => Some(
            m.iter()
                .map(|(k, mask)| {
                    let path = k.strip_suffix(".lora_E").ok_or(format!(
                        "rank_pattern key `{k}` is not an AdaLoRA module's `<path>.lora_E`"
                    ))?;
                    let mask: Vec<bool> = mask
                        .as_array()
                        .and_then(|a| a.iter().map(Value::as_bool).collect())
                        .ok_or(format!("rank_pattern `{k}` is not a list of booleans"))?;
                    if mask.len() != init_r {
                        return Err(format!(
                            "rank_pattern `{k}` has {} entries, init_r is {init_r}",
                            mask.len()
                        ));
                    }
                    Ok((path.to_string(), mask))
                })
                .collect::<Result<Vec<_>, String>>()?,
        ),
        Some(other) => return Err(format!("rank_pattern {other} is not an object")),
    };
    let cfg = AdaLoraConfig {
        init_r,
        target_r: int("target_r")?,
        tinit: int("tinit")?,
        tfinal: int("tfinal")?,
        delta_t: int("deltaT")?,
        beta1: float("beta1")?,
        beta2: float("beta2")?,
        orth_reg_weight: float("orth_reg_weight")?,
        total_step: int("total_step")?,
        rank_pattern,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// A JSON object's entries in file order (PEFT tries `rank_pattern` keys in that order).
#[derive(Default)]
struct Ordered(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Ordered {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_unit<E>(self) -> Result<Ordered, E> {
                Ok(Ordered::default())
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut m: M,
            ) -> Result<Ordered, M::Error> {
                let mut out = Vec::new();
                while let Some(entry) = m.next_entry::<String, Value>()? {
                    out.push(entry);
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_any(Visit)
    }
}

/// The two pattern maps of `adapter_config.json`, in file order.
#[derive(serde::Deserialize, Default)]
struct Patterns {
    #[serde(default)]
    rank_pattern: Ordered,
    #[serde(default)]
    alpha_pattern: Ordered,
}

/// `adapter_config.json` keys this tool reads, or that do not change the math.
const KNOWN_KEYS: &[&str] = &[
    "alpha_pattern",
    "auto_mapping",
    "base_model_name_or_path",
    "bias",
    "exclude_modules",
    "fan_in_fan_out",
    "inference_mode",
    "init_lora_weights",
    "layers_pattern",
    "layers_to_transform",
    "lora_alpha",
    "lora_dropout",
    "megatron_core",
    "modules_to_save",
    "peft_type",
    "peft_version",
    "r",
    "rank_pattern",
    "revision",
    "target_modules",
    "task_type",
    "use_dora",
    "use_rslora",
    // Only read with `use_qalora` / a LoftQ init, both refused.
    "qalora_group_size",
    "loftq_config",
    // AdaLoRA's, read when `peft_type` is ADALORA.
    "init_r",
    "target_r",
    "tinit",
    "tfinal",
    "deltaT",
    "beta1",
    "beta2",
    "orth_reg_weight",
    "total_step",
];

/// Refuse every other key unless it holds PEFT's default (`null`, `false`, `{}` or `[]`): a
/// feature this tool does not implement (`lora_bias`, `use_qalora`, `layer_replication`,
/// `trainable_token_indices`, `target_parameters`, `megatron_config`, ...) is named, never
/// ignored.
fn refuse_unimplemented(v: &Value) -> Result<(), String> {
    let Some(map) = v.as_object() else {
        return Err("is not a JSON object".into());
    };
    for (key, value) in map {
        if KNOWN_KEYS.contains(&key.as_str()) {
            continue;
        }
        let default = match value {
            Value::Null | Value::Bool(false) => true,
            Value::Object(o) => o.is_empty(),
            Value::Array(a) => a.is_empty(),
            _ => false,
        };
        if !default {
            return Err(format!(
                "`{key}: {value}` is not supported by qlora (remove it, or set it to PEFT's \
                 default, to load the rest)"
            ));
        }
    }
    Ok(())
}

/// Load a PEFT adapter folder onto `model` (replacing any adapters it has). Tensors are kept in
/// their stored dtype unless `dtype` is given. Every shape is checked against the model, every
/// target must name a layer, and every tensor in the file must be used.
pub fn load_adapter(
    model: &mut Model,
    dir: &Path,
    dtype: Option<DType>,
) -> Result<LoraConfig, ModelError> {
    let mut cfg = read_config(dir)?;
    let cfg_path = dir.join(CONFIG_FILE);
    check_targets(model, &cfg.targets).map_err(|what| ModelError::Config {
        path: cfg_path.display().to_string(),
        what,
    })?;
    let head_modules = check_task(model, &cfg_path)?;
    let path = dir.join(WEIGHTS_FILE);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| {
        ModelError::invalid(
            path.display().to_string(),
            format!("cannot read adapter weights: {e}"),
        )
    })?;
    if let Some(name) = super::first_non_finite(&tensors)? {
        return Err(ModelError::invalid(
            path.display().to_string(),
            format!("tensor `{name}` holds NaN or infinite values"),
        ));
    }
    if model.classifier().is_none() && !head_modules.is_empty() {
        attach_head_from(model, dir, &head_modules, &tensors)?;
    }
    let device = model.device().clone();
    let mut store = AdapterTensors {
        tensors: &tensors,
        file: &path,
        used: std::collections::BTreeSet::new(),
    };
    let mut stored_dtype = None;
    for m in model.linears_mut() {
        if !cfg.targets_module(&m.path) {
            m.linear.set_adapter(None)?;
            continue;
        }
        let (out, inp) = m.linear.base.shape();
        // PEFT has saved DoRA's magnitude with and without `.weight`.
        let magnitude_key = if store.has(&m.path, "lora_magnitude_vector") {
            "lora_magnitude_vector"
        } else {
            "lora_magnitude_vector.weight"
        };
        let mut fetch = |suffix: &str, shape: &[usize]| store.take(&m.path, suffix, shape);
        let module = cfg.for_module(&m.path);
        let ada = cfg.adalora.is_some();
        let (sa, sb) = if ada {
            ("lora_A", "lora_B")
        } else {
            ("lora_A.weight", "lora_B.weight")
        };
        let a = fetch(sa, &[module.rank, inp])?;
        let b = fetch(sb, &[out, module.rank])?;
        let e = if ada {
            Some(fetch("lora_E", &[module.rank, 1])?)
        } else {
            None
        };
        stored_dtype.get_or_insert(a.dtype());
        let magnitude = if cfg.use_dora {
            Some(fetch(magnitude_key, &[out])?)
        } else {
            None
        };
        let dt = dtype.unwrap_or(a.dtype());
        let var = |t: Tensor| trainable(t, dt, &device);
        let adapter = LoraAdapter {
            a: var(a)?,
            b: var(b)?,
            scale: module.scale(),
            dropout: cfg.dropout,
            magnitude: magnitude.map(var).transpose()?,
            e: e.map(var).transpose()?,
            dropout_key: 0,
            dropout_seed: Default::default(),
        };
        m.linear.set_adapter(Some(adapter))?;
    }
    load_embedding_adapter(model, &cfg, &mut store, dtype)?;
    load_head_adapter(model, &cfg, &mut store, dtype)?;
    if let Some(c) = model.classifier_mut() {
        if head_modules.contains(&c.module) {
            for (suffix, var) in c.parameters() {
                let t = store.take(&c.module, suffix, var.dims())?;
                var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
            }
        }
    }
    let used = store.used;
    let extra: Vec<&String> = tensors.keys().filter(|k| !used.contains(*k)).collect();
    if !extra.is_empty() {
        return Err(ModelError::invalid(
            path.display().to_string(),
            format!(
                "holds {} tensors that do not fit this {}-layer {} model or its target modules, e.g. {:?}",
                extra.len(),
                model.num_layers(),
                model.info().model_type,
                &extra[..extra.len().min(3)],
            ),
        ));
    }
    cfg.dtype = dtype.or(stored_dtype).unwrap_or(DType::F32);
    Ok(cfg)
}

/// The tensors of an adapter file, handed out by key with their shapes checked, remembering
/// which were used (every tensor of the file must be).
struct AdapterTensors<'a> {
    tensors: &'a HashMap<String, Tensor>,
    file: &'a Path,
    used: std::collections::BTreeSet<String>,
}

impl AdapterTensors<'_> {
    /// Tensor `suffix` of the module at `path`, which must have `shape`.
    fn take(&mut self, path: &str, suffix: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let key = peft_key(path, suffix);
        let t = self
            .tensors
            .get(&key)
            .ok_or_else(|| ModelError::TensorNotFound {
                name: key.clone(),
                dir: self.file.to_path_buf(),
            })?;
        if t.dims() != shape {
            return Err(ModelError::Shape {
                name: key,
                expected: shape.to_vec(),
                got: t.dims().to_vec(),
            });
        }
        self.used.insert(key);
        Ok(t.clone())
    }

    /// Whether the file has tensor `suffix` of the module at `path`.
    fn has(&self, path: &str, suffix: &str) -> bool {
        self.tensors.contains_key(&peft_key(path, suffix))
    }

    /// PEFT saves the whole table beside an adapted embedding or head (`base_layer.weight`)
    /// and copies it over the model's when it loads the adapter; so does this, into `table`.
    fn load_base_table(&mut self, path: &str, table: &mut Tensor) -> Result<(), ModelError> {
        if self.has(path, EMBEDDING_BASE) {
            let t = self.take(path, EMBEDDING_BASE, table.dims())?;
            *table = t.to_dtype(table.dtype())?.to_device(table.device())?;
        }
        Ok(())
    }
}

/// A trainable copy of `t` in `dtype` on `device`.
fn trainable(t: Tensor, dtype: DType, device: &Device) -> Result<Var, ModelError> {
    Ok(Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?)?)
}

/// LoRA on an untied head (`lm_head.lora_A.weight` `[r, hidden]`, `lora_B.weight`
/// `[vocab, r]`); PEFT saves the head beside it (`lm_head.base_layer.weight`), which replaces the
/// model's as PEFT loads it.
fn load_head_adapter(
    model: &mut Model,
    cfg: &LoraConfig,
    store: &mut AdapterTensors<'_>,
    dtype: Option<DType>,
) -> Result<(), ModelError> {
    let device = model.device().clone();
    let Some((head, slot)) = model.head_adapter_mut() else {
        return Ok(());
    };
    if !cfg.targets_embedding(super::HEAD) {
        *slot = None;
        return Ok(());
    }
    let (vocab, hidden) = head.dims2()?;
    let module = cfg.for_module(super::HEAD);
    let a = store.take(super::HEAD, "lora_A.weight", &[module.rank, hidden])?;
    let b = store.take(super::HEAD, "lora_B.weight", &[vocab, module.rank])?;
    store.load_base_table(super::HEAD, head)?;
    let dt = dtype.unwrap_or(a.dtype());
    *slot = Some(LoraAdapter {
        a: trainable(a, dt, &device)?,
        b: trainable(b, dt, &device)?,
        scale: module.scale(),
        dropout: cfg.dropout,
        magnitude: None,
        e: None,
        dropout_key: 0,
        dropout_seed: Default::default(),
    });
    Ok(())
}

/// PEFT's key of the full embedding table it saves beside an embedding adapter.
pub const EMBEDDING_BASE: &str = "base_layer.weight";

/// The adapter on the token embedding, when `cfg` targets it: `lora_embedding_A` `[r, vocab]`,
/// `lora_embedding_B` `[dim, r]`. PEFT also saves the whole table (`base_layer.weight`) and, when
/// it loads the adapter, copies it over the model's, so a table that differs replaces the
/// model's here too (and, as in PEFT, a head tied to it).
fn load_embedding_adapter(
    model: &mut Model,
    cfg: &LoraConfig,
    store: &mut AdapterTensors<'_>,
    dtype: Option<DType>,
) -> Result<(), ModelError> {
    let device = model.device().clone();
    let emb = model.token_embedding_mut();
    if !cfg.targets_embedding(emb.path) {
        *emb.adapter = None;
        return Ok(());
    }
    if cfg.adalora.is_some() {
        return Err(ModelError::invalid(
            emb.path,
            "AdaLoRA on a token embedding is not supported (nor by PEFT)",
        ));
    }
    let (vocab, dim) = emb.weight.dims2()?;
    let module = cfg.for_module(emb.path);
    let a = store.take(emb.path, EMBEDDING_A, &[module.rank, vocab])?;
    let b = store.take(emb.path, EMBEDDING_B, &[dim, module.rank])?;
    store.load_base_table(emb.path, emb.weight)?;
    let dt = dtype.unwrap_or(a.dtype());
    *emb.adapter = Some(EmbeddingAdapter {
        a: trainable(a, dt, &device)?,
        b: trainable(b, dt, &device)?,
        scale: module.scale(),
    });
    Ok(())
}

/// PEFT's names of a classification head in `modules_to_save` (`SEQ_CLS` lists both).
const HEAD_MODULES: [&str; 2] = ["classifier", "score"];

/// Check the adapter's `task_type` and `modules_to_save` against `model`; returns the modules to
/// save. A classification adapter on a model without a head (or a causal-LM adapter on a
/// classifier) is refused, and so is any module to save other than the head.
fn check_task(model: &Model, cfg_path: &Path) -> Result<Vec<String>, ModelError> {
    let text = std::fs::read_to_string(cfg_path).map_err(|e| ModelError::io(cfg_path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| {
        ModelError::invalid(cfg_path.display().to_string(), format!("not JSON: {e}"))
    })?;
    let bad = |what: String| ModelError::Config {
        path: cfg_path.display().to_string(),
        what,
    };
    let kind = model.info().model_type.clone();
    let headless = model.classifier().is_none() && model.lm_head().is_none();
    match (
        v.get("task_type").and_then(Value::as_str),
        model.classifier(),
    ) {
        // An encoder without any head (`BertModel`) takes the adapter's classifier.
        (Some("SEQ_CLS"), None) if headless => {}
        (Some("SEQ_CLS"), None) => {
            return Err(bad(format!(
            "`task_type: SEQ_CLS` is a sequence-classification adapter, and this `{kind}` model \
                 has no classification head (load a *ForSequenceClassification checkpoint, or \
                 train one with --task seq-cls)"
        )))
        }
        (Some("CAUSAL_LM"), Some(_)) => {
            return Err(bad(format!(
                "`task_type: CAUSAL_LM` is a language-model adapter, and this `{kind}` model \
                 classifies sequences"
            )))
        }
        (Some("SEQ_CLS" | "CAUSAL_LM") | None, _) => {}
        (Some(other), _) => {
            return Err(bad(format!(
                "`task_type` `{other}` is not supported (CAUSAL_LM, SEQ_CLS)"
            )))
        }
    }
    let modules: Vec<String> = match v.get("modules_to_save") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("`modules_to_save` must be a list of names".into()))?,
        Some(other) => return Err(bad(format!("`modules_to_save` {other} is not a list"))),
    };
    for m in &modules {
        if !HEAD_MODULES.contains(&m.as_str()) {
            return Err(bad(format!(
                "`modules_to_save` `{m}` is not supported (only the classification head: {})",
                HEAD_MODULES.join(", ")
            )));
        }
    }
    if let Some(c) = model.classifier() {
        if !modules.contains(&c.module) {
            return Err(bad(format!(
                "the model classifies sequences, and `modules_to_save` does not hold its head \
                 `{}` (PEFT trains and saves it with every SEQ_CLS adapter)",
                c.module
            )));
        }
    }
    Ok(modules)
}

/// Label names saved beside an adapter whose model classifies (`id2label` of the head).
pub const LABELS_FILE: &str = "labels.json";

/// Put the classification head a SEQ_CLS adapter carries (`base_model.model.classifier.weight`)
/// on a model that has none, with the class names of `labels.json` when present.
fn attach_head_from(
    model: &mut Model,
    dir: &Path,
    modules: &[String],
    tensors: &HashMap<String, Tensor>,
) -> Result<(), ModelError> {
    let path = dir.join(WEIGHTS_FILE);
    let Some((module, weight)) = modules
        .iter()
        .find_map(|m| tensors.get(&format!("{PREFIX}{m}.weight")).map(|w| (m, w)))
    else {
        return Err(ModelError::invalid(
            path.display().to_string(),
            "a SEQ_CLS adapter for a model without a classification head must carry the head \
             (`base_model.model.classifier.weight`)",
        ));
    };
    let (n, hidden) = weight.dims2()?;
    if hidden != model.info().hidden_size {
        return Err(ModelError::Shape {
            name: format!("{PREFIX}{module}.weight"),
            expected: vec![n, model.info().hidden_size],
            got: vec![n, hidden],
        });
    }
    let mut config = ClassifierConfig::with_num_labels(n);
    let labels_path = dir.join(LABELS_FILE);
    if labels_path.is_file() {
        let text =
            std::fs::read_to_string(&labels_path).map_err(|e| ModelError::io(&labels_path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            ModelError::invalid(labels_path.display().to_string(), format!("not JSON: {e}"))
        })?;
        let wrapped = json!({"architectures": ["ForSequenceClassification"], "num_labels": n,
            "id2label": v.get("id2label").cloned().unwrap_or(Value::Null)});
        config = ClassifierConfig::from_json(&wrapped)
            .map_err(|what| ModelError::Config {
                path: labels_path.display().to_string(),
                what,
            })?
            .unwrap_or(config);
    }
    let bias = tensors.get(&format!("{PREFIX}{module}.bias"));
    let dropout = match &*model {
        Model::Bert(b) => b.cfg.classifier_dropout,
        _ => 0.0,
    };
    let head = SequenceClassifier::new(module, weight, bias, config, dropout)?;
    model.set_classifier(Some(head))?;
    Ok(())
}

/// `labels.json` for `model`'s head, if it has one.
fn labels_json(model: &Model) -> Option<Value> {
    let c = model.classifier()?;
    let id2label: serde_json::Map<String, Value> = c
        .config
        .labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), json!(l)))
        .collect();
    let label2id: serde_json::Map<String, Value> = c
        .config
        .labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), json!(i)))
        .collect();
    Some(json!({"id2label": id2label, "label2id": label2id,
        "problem_type": if c.config.regression { "regression" } else { "single_label_classification" }}))
}

/// The adapter tensors of `model` under PEFT's key names, the classification head's included.
pub fn adapter_tensors(model: &Model) -> Result<BTreeMap<String, Tensor>, ModelError> {
    let mut out = BTreeMap::new();
    for (key, var) in super::trainable_vars(model) {
        out.insert(key, var.as_tensor().to_device(&Device::Cpu)?);
    }
    // As PEFT saves an adapted embedding or head: the whole table beside the adapter.
    let emb = model.token_embedding();
    if emb.adapter.is_some() {
        out.insert(
            peft_key(emb.path, EMBEDDING_BASE),
            emb.weight.to_device(&Device::Cpu)?,
        );
    }
    if let (Some(_), Some(head)) = (model.head_adapter(), model.lm_head()) {
        out.insert(
            peft_key(super::HEAD, EMBEDDING_BASE),
            head.to_device(&Device::Cpu)?,
        );
    }
    Ok(out)
}

/// `adapter_config.json` as PEFT writes it, for `cfg` on `model` (at `base_model`). Like PEFT,
/// it lists the targets resolved to the last name of each adapted layer (`all-linear` becomes
/// `q_proj`, `k_proj`, ...), and sets `fan_in_fan_out` when the adapted layers store their
/// weights `[in, out]`.
pub fn config_json(cfg: &LoraConfig, model: &Model, base_model: &str) -> Value {
    let adapted: Vec<_> = model
        .linears()
        .into_iter()
        .filter(|m| cfg.targets_module(&m.path))
        .collect();
    let mut targets: Vec<String> = if cfg.targets.iter().any(|t| t == ALL_LINEAR) {
        adapted
            .iter()
            .map(|m| m.path.rsplit('.').next().unwrap_or(&m.path).to_string())
            .collect()
    } else {
        cfg.targets.clone()
    };
    targets.sort();
    targets.dedup();
    let fan_in_fan_out = adapted.iter().any(|m| m.layout == WeightLayout::InOut);
    let pattern = |entries: Vec<(String, Value)>| Value::Object(entries.into_iter().collect());
    let mut v = json!({
        "alpha_pattern": pattern(cfg.alpha_pattern.iter().map(|(k, a)| (k.clone(), alpha_json(*a))).collect()),
        "exclude_modules": if cfg.exclude_modules.is_empty() {
            Value::Null
        } else {
            json!(cfg.exclude_modules)
        },
        "auto_mapping": null,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": true,
        "init_lora_weights": cfg.init.peft_value(),
        "layer_replication": null,
        "layers_pattern": if cfg.layers_pattern.is_empty() {
            Value::Null
        } else {
            json!(cfg.layers_pattern)
        },
        "layers_to_transform": cfg.layers_to_transform,
        "loftq_config": {},
        "lora_alpha": alpha_json(cfg.alpha),
        "lora_bias": false,
        "lora_dropout": f32_json(cfg.dropout),
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": if model.classifier().is_some() {
            json!(HEAD_MODULES)
        } else {
            Value::Null
        },
        "peft_type": "LORA",
        "r": cfg.rank,
        "rank_pattern": pattern(cfg.rank_pattern.iter().map(|(k, r)| (k.clone(), json!(r))).collect()),
        "revision": null,
        "target_modules": targets,
        "task_type": if model.classifier().is_some() { "SEQ_CLS" } else { "CAUSAL_LM" },
        "use_dora": cfg.use_dora,
        "use_rslora": cfg.use_rslora,
    });
    if let (Some(a), Value::Object(map)) = (&cfg.adalora, &mut v) {
        // PEFT's AdaLoraConfig: `r` keeps its (ignored) default, `rank_pattern` holds the masks.
        let pattern = a.rank_pattern.as_ref().map(|p| {
            Value::Object(
                p.iter()
                    .map(|(path, mask)| (format!("{path}.lora_E"), json!(mask)))
                    .collect(),
            )
        });
        for (k, x) in [
            ("peft_type", json!("ADALORA")),
            ("r", json!(8)),
            ("init_r", json!(a.init_r)),
            ("target_r", json!(a.target_r)),
            ("tinit", json!(a.tinit)),
            ("tfinal", json!(a.tfinal)),
            ("deltaT", json!(a.delta_t)),
            ("beta1", json!(a.beta1)),
            ("beta2", json!(a.beta2)),
            ("orth_reg_weight", json!(a.orth_reg_weight)),
            ("total_step", json!(a.total_step)),
            ("rank_pattern", pattern.unwrap_or(Value::Null)),
        ] {
            map.insert(k.to_string(), x);
        }
        map.remove("use_dora");
    }
    v
}

/// AdaLoRA's adapters as PEFT saves them: only the singular triplets `pattern` keeps (rows of A
/// and E, columns of B); modules already of the kept size stay as they are.
fn prune_to_pattern(
    tensors: &mut BTreeMap<String, Tensor>,
    pattern: &[(String, Vec<bool>)],
) -> Result<(), ModelError> {
    for (path, keep) in pattern {
        let idx: Vec<u32> = (0..keep.len() as u32)
            .filter(|&k| keep[k as usize])
            .collect();
        for (suffix, dim) in [("lora_A", 0), ("lora_E", 0), ("lora_B", 1)] {
            let key = peft_key(path, suffix);
            let Some(t) = tensors.get(&key) else {
                return Err(ModelError::invalid(
                    key,
                    "is in the AdaLoRA rank pattern but has no adapter",
                ));
            };
            if t.dim(dim)? == idx.len() {
                continue;
            }
            if t.dim(dim)? != keep.len() {
                return Err(ModelError::Shape {
                    name: key,
                    expected: vec![keep.len()],
                    got: t.dims().to_vec(),
                });
            }
            let ids = Tensor::new(idx.as_slice(), t.device())?;
            let pruned = t.index_select(&ids, dim)?;
            tensors.insert(key, pruned);
        }
    }
    Ok(())
}

/// An alpha as PEFT writes it: an integer when integral.
/// An f32 option as JSON with its shortest decimal form (0.05, not 0.05000000074505806).
fn f32_json(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .map_or(Value::Null, |d| json!(d))
}

fn alpha_json(a: f64) -> Value {
    if a.fract() == 0.0 && a.abs() < 1e15 {
        json!(a as i64)
    } else {
        json!(a)
    }
}

/// Write `model`'s adapters to a new folder `dir` in PEFT format, atomically (temp folder, then
/// rename); an existing `dir` is refused, never overwritten.
pub fn save_adapter(
    model: &Model,
    cfg: &LoraConfig,
    base_model: &str,
    dir: &Path,
) -> Result<(), ModelError> {
    let mut tensors = adapter_tensors(model)?;
    // A NaN or infinite weight is never written: such an adapter is lost, not saved.
    if let Some(name) = super::first_non_finite(&tensors)? {
        return Err(ModelError::invalid(
            dir.display().to_string(),
            format!("not written: the adapter's `{name}` holds NaN or infinite values"),
        ));
    }
    if let Some(pattern) = cfg.adalora.as_ref().and_then(|a| a.rank_pattern.as_ref()) {
        prune_to_pattern(&mut tensors, pattern)?;
    }
    let staging = AtomicDir::new(dir)
        .map_err(|e| ModelError::invalid(dir.display().to_string(), e.to_string()))?;
    let cfg_path = staging.path().join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&config_json(cfg, model, base_model))
        .map_err(|e| ModelError::invalid(CONFIG_FILE, e.to_string()))?;
    std::fs::write(&cfg_path, text).map_err(|e| ModelError::io(&cfg_path, e))?;
    if let Some(labels) = labels_json(model) {
        let p = staging.path().join(LABELS_FILE);
        let text = serde_json::to_string_pretty(&labels)
            .map_err(|e| ModelError::invalid(LABELS_FILE, e.to_string()))?;
        std::fs::write(&p, text).map_err(|e| ModelError::io(&p, e))?;
    }
    let w_path = staging.path().join(WEIGHTS_FILE);
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let data: Vec<(String, Tensor)> = tensors.into_iter().collect();
    safetensors_save(&data, &meta, &w_path)?;
    staging
        .commit()
        .map_err(|e| ModelError::invalid(dir.display().to_string(), e.to_string()))?;
    Ok(())
}

fn safetensors_save(
    data: &[(String, Tensor)],
    meta: &HashMap<String, String>,
    path: &Path,
) -> Result<(), ModelError> {
    let views: Vec<(&str, &Tensor)> = data.iter().map(|(k, t)| (k.as_str(), t)).collect();
    safetensors::serialize_to_file(views, Some(meta.clone()), path)
        .map_err(|e| ModelError::invalid(path.display().to_string(), e.to_string()))
}
