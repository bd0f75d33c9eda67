//! PEFT's on-disk adapter format: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Keys are `base_model.model.model.layers.<i>.<self_attn|mlp>.<proj>.lora_A.weight` (`[r, in]`),
//! `...lora_B.weight` (`[out, r]`) and, for DoRA, `...lora_magnitude_vector` (`[out]`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::{json, Value};

use super::adapter::LoraAdapter;
use super::config::{LoraConfig, LoraInit};
use crate::atomic_dir::AtomicDir;
use crate::model::config::{projection_path, PROJECTIONS};
use crate::model::error::ModelError;
use crate::model::llama::Llama;

/// File names of a PEFT adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// Weights file of a PEFT adapter folder.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

const PREFIX: &str = "base_model.model.";

/// PEFT key of a tensor of the adapter on `proj` in `layer`.
pub fn peft_key(layer: usize, proj: &str, suffix: &str) -> String {
    format!("{PREFIX}{}.{suffix}", projection_path(layer, proj))
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
    if let Some(t) = v.get("peft_type").and_then(Value::as_str) {
        if t != "LORA" {
            return Err(bad(format!("peft_type `{t}` is not supported (only LORA)")));
        }
    }
    let rank = v
        .get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("missing integer field `r`".into()))? as usize;
    if rank == 0 {
        return Err(bad("`r` must be positive".into()));
    }
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad("missing field `lora_alpha`".into()))?;
    let targets: Vec<String> = match v.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("`target_modules` must be a list of names".into()))?,
        Some(Value::String(s)) if s == "all-linear" => {
            PROJECTIONS.iter().map(|p| p.to_string()).collect()
        }
        other => {
            return Err(bad(format!(
                "`target_modules` {other:?} is not supported (a list of projection names, or \"all-linear\")"
            )))
        }
    };
    for t in &targets {
        if !PROJECTIONS.contains(&t.as_str()) {
            return Err(bad(format!(
                "target module `{t}` is not one of the decoder projections ({})",
                PROJECTIONS.join(", ")
            )));
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if v.get(key)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(bad(format!("`{key}` is not supported")));
        }
    }
    if v.get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        return Err(bad("`fan_in_fan_out: true` is not supported".into()));
    }
    if let Some(b) = v.get("bias").and_then(Value::as_str) {
        if b != "none" {
            return Err(bad(format!("bias `{b}` is not supported (only \"none\")")));
        }
    }
    if v.get("modules_to_save").is_some_and(|m| !m.is_null()) {
        return Err(bad("`modules_to_save` is not supported".into()));
    }
    let init = match v.get("init_lora_weights") {
        Some(Value::String(s)) if s.starts_with("pissa") => LoraInit::Pissa,
        Some(Value::String(s)) if s == "gaussian" => LoraInit::Gaussian,
        _ => LoraInit::Kaiming,
    };
    Ok(LoraConfig {
        rank,
        alpha,
        dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32,
        targets,
        use_rslora: v
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        use_dora: v.get("use_dora").and_then(Value::as_bool).unwrap_or(false),
        init,
        dtype: DType::F32,
    })
}

/// Load a PEFT adapter folder onto `model` (replacing any adapters it has). Tensors are kept in
/// their stored dtype unless `dtype` is given. Every shape is checked against the model.
pub fn load_adapter(
    model: &mut Llama,
    dir: &Path,
    dtype: Option<DType>,
) -> Result<LoraConfig, ModelError> {
    let mut cfg = read_config(dir)?;
    let path = dir.join(WEIGHTS_FILE);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| {
        ModelError::invalid(
            path.display().to_string(),
            format!("cannot read adapter weights: {e}"),
        )
    })?;
    let device = model.device().clone();
    let mut used = 0usize;
    let n_layers = model.layers.len();
    let mut stored_dtype = None;
    for (li, layer) in model.layers.iter_mut().enumerate() {
        for (proj, lin) in layer.projections_mut() {
            if !cfg.targets_projection(proj) {
                lin.set_adapter(None)?;
                continue;
            }
            let (out, inp) = lin.base.shape();
            let fetch = |suffix: &str, shape: &[usize]| -> Result<Tensor, ModelError> {
                let key = peft_key(li, proj, suffix);
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| ModelError::TensorNotFound {
                        name: key.clone(),
                        dir: path.clone(),
                    })?;
                if t.dims() != shape {
                    return Err(ModelError::Shape {
                        name: key,
                        expected: shape.to_vec(),
                        got: t.dims().to_vec(),
                    });
                }
                Ok(t.clone())
            };
            let a = fetch("lora_A.weight", &[cfg.rank, inp])?;
            let b = fetch("lora_B.weight", &[out, cfg.rank])?;
            stored_dtype.get_or_insert(a.dtype());
            let magnitude = if cfg.use_dora {
                let key = peft_key(li, proj, "lora_magnitude_vector");
                let m = match tensors.get(&key) {
                    Some(_) => fetch("lora_magnitude_vector", &[out])?,
                    None => fetch("lora_magnitude_vector.weight", &[out])?,
                };
                used += 1;
                Some(m)
            } else {
                None
            };
            used += 2;
            let dt = dtype.unwrap_or(a.dtype());
            let var = |t: Tensor| -> Result<Var, ModelError> {
                Ok(Var::from_tensor(&t.to_dtype(dt)?.to_device(&device)?)?)
            };
            let adapter = LoraAdapter {
                a: var(a)?,
                b: var(b)?,
                scale: cfg.scale(),
                dropout: cfg.dropout,
                magnitude: magnitude.map(var).transpose()?,
                dropout_key: 0,
                dropout_seed: Default::default(),
            };
            lin.set_adapter(Some(adapter))?;
        }
    }
    if used != tensors.len() {
        let known: Vec<String> = (0..n_layers)
            .flat_map(|l| {
                PROJECTIONS.iter().flat_map(move |p| {
                    [
                        "lora_A.weight",
                        "lora_B.weight",
                        "lora_magnitude_vector",
                        "lora_magnitude_vector.weight",
                    ]
                    .map(|s| peft_key(l, p, s))
                })
            })
            .collect();
        let extra: Vec<&String> = tensors
            .keys()
            .filter(|k| !known.contains(k))
            .take(3)
            .collect();
        return Err(ModelError::invalid(
            path.display().to_string(),
            format!(
                "holds {} tensors that do not fit this {}-layer model or its target modules, e.g. {extra:?}",
                tensors.len() - used,
                n_layers
            ),
        ));
    }
    cfg.dtype = dtype.or(stored_dtype).unwrap_or(DType::F32);
    Ok(cfg)
}

/// The adapter tensors of `model` under PEFT's key names.
pub fn adapter_tensors(model: &Llama) -> Result<BTreeMap<String, Tensor>, ModelError> {
    let mut out = BTreeMap::new();
    for (li, layer) in model.layers.iter().enumerate() {
        for (proj, lin) in layer.projections() {
            if let Some(a) = &lin.adapter {
                for (suffix, var) in a.parameters() {
                    out.insert(
                        peft_key(li, proj, suffix),
                        var.as_tensor().to_device(&Device::Cpu)?,
                    );
                }
            }
        }
    }
    Ok(out)
}

/// `adapter_config.json` as PEFT writes it, for `cfg` on a model at `base_model`.
pub fn config_json(cfg: &LoraConfig, base_model: &str) -> Value {
    let mut targets = cfg.targets.clone();
    targets.sort();
    json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": cfg.init.peft_value(),
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "loftq_config": {},
        // PEFT writes an integral alpha as an integer.
        "lora_alpha": if cfg.alpha.fract() == 0.0 && cfg.alpha.abs() < 1e15 {
            json!(cfg.alpha as i64)
        } else {
            json!(cfg.alpha)
        },
        "lora_bias": false,
        "lora_dropout": cfg.dropout,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": cfg.rank,
        "rank_pattern": {},
        "revision": null,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": cfg.use_dora,
        "use_rslora": cfg.use_rslora,
    })
}

/// Write `model`'s adapters to a new folder `dir` in PEFT format, atomically (temp folder, then
/// rename); an existing `dir` is refused, never overwritten.
pub fn save_adapter(
    model: &Llama,
    cfg: &LoraConfig,
    base_model: &str,
    dir: &Path,
) -> Result<(), ModelError> {
    let tensors = adapter_tensors(model)?;
    let staging = AtomicDir::new(dir)
        .map_err(|e| ModelError::invalid(dir.display().to_string(), e.to_string()))?;
    let cfg_path = staging.path().join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&config_json(cfg, base_model))
        .map_err(|e| ModelError::invalid(CONFIG_FILE, e.to_string()))?;
    std::fs::write(&cfg_path, text).map_err(|e| ModelError::io(&cfg_path, e))?;
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
