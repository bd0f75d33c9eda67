//! Walking a model's linear layers to attach, load, save and merge adapters, by PEFT's names.
//!
//! Sits above both [`crate::lora`] (the math of one adapter) and [`crate::model`] (the families
//! and their layers): it matches PEFT's `target_modules` against each layer's checkpoint path
//! and keys the adapter tensors `base_model.model.<path>.<tensor>`.

pub mod io;
pub mod merge;

pub use io::{
    adapter_tensors, config_json, load_adapter, peft_key, read_config, save_adapter, CONFIG_FILE,
    WEIGHTS_FILE,
};

use candle_core::Var;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::lora::config::{target_matches, ALL_LINEAR};
use crate::lora::embedding::EmbeddingAdapter;
use crate::lora::init::init_adapter;
use crate::lora::{DropoutSeed, LoraConfig};
use crate::model::error::ModelError;
use crate::model::transformer::Model;

/// PEFT's module name of a language-model head.
pub const HEAD: &str = "lm_head";

/// Refuse targets that name no linear layer of `model` (a typo would otherwise train nothing
/// there without a word).
pub fn check_targets(model: &Model, targets: &[String]) -> Result<(), String> {
    let mut paths: Vec<String> = model.linears().into_iter().map(|m| m.path).collect();
    paths.push(model.token_embedding().path.to_string());
    if model.lm_head().is_some() && !model.token_embedding().tied_head {
        paths.push(HEAD.to_string());
    }
    for t in targets.iter().filter(|t| t.as_str() != ALL_LINEAR) {
        if !paths.iter().any(|p| target_matches(t, p)) {
            let mut names: Vec<&str> = paths
                .iter()
                .map(|p| p.rsplit('.').next().unwrap_or(p))
                .collect();
            names.sort_unstable();
            names.dedup();
            return Err(format!(
                "target module `{t}` names no linear layer of this {} model (its layers: {})",
                model.info().model_type,
                names.join(", ")
            ));
        }
    }
    Ok(())
}

/// Put fresh adapters on every targeted linear layer of `model` (deterministic for a `seed`).
pub fn attach_new(model: &mut Model, cfg: &LoraConfig, seed: u64) -> Result<(), ModelError> {
    cfg.validate_patterns()
        .map_err(|why| ModelError::invalid("--rank-pattern/--alpha-pattern", why))?;
    check_targets(model, &cfg.targets).map_err(|why| ModelError::invalid("--target", why))?;
    let layers = model.num_layers();
    if let Some(l) = cfg
        .layers_to_transform
        .iter()
        .flatten()
        .find(|&&l| l >= layers)
    {
        return Err(ModelError::invalid(
            "--layers-to-transform (layers_to_transform)",
            format!(
                "layer {l} does not exist: the model has layers 0..{}",
                layers.saturating_sub(1)
            ),
        ));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let device = model.device().clone();
    let mut adapted = 0usize;
    for m in model.linears_mut() {
        adapted += usize::from(cfg.targets_module(&m.path));
        let adapter = if cfg.targets_module(&m.path) {
            let module = cfg.for_module(&m.path);
            Some(init_adapter(
                &module,
                &mut m.linear.base,
                &mut rng,
                &device,
            )?)
        } else {
            None
        };
        m.linear.set_adapter(adapter)?;
    }
    if let Some((head, slot)) = model.head_adapter_mut() {
        *slot = if cfg.targets_embedding(HEAD) {
            if cfg.adalora.is_some() || cfg.use_dora || cfg.init == crate::lora::LoraInit::Pissa {
                return Err(ModelError::invalid(
                    HEAD,
                    "LoRA on the head takes plain LoRA (not AdaLoRA, DoRA or PiSSA)",
                ));
            }
            let mut base = crate::frozen::BaseWeight::Dense(head.clone());
            Some(init_adapter(
                &cfg.for_module(HEAD),
                &mut base,
                &mut rng,
                &device,
            )?)
        } else {
            None
        };
    }
    let emb = model.token_embedding_mut();
    if cfg.adalora.is_some() && cfg.targets_embedding(emb.path) {
        return Err(ModelError::invalid(
            emb.path,
            "AdaLoRA on a token embedding is not supported (nor by PEFT)",
        ));
    }
    *emb.adapter = if cfg.targets_embedding(emb.path) {
        let module = cfg.for_module(emb.path);
        Some(EmbeddingAdapter::new(
            module.rank,
            emb.weight.dims2()?,
            module.scale(),
            cfg.dtype,
            &mut rng,
            &device,
        )?)
    } else {
        None
    };
    adapted += usize::from(emb.adapter.is_some());
    if let Some((_, slot)) = model.head_adapter_mut() {
        adapted += usize::from(slot.is_some());
    }
    if adapted == 0 {
        // As PEFT ("Target modules ... not found in the base model"): nothing would train.
        return Err(ModelError::invalid(
            "--target",
            format!(
                "no module of the model is selected by target_modules {:?}{}{}",
                cfg.targets,
                cfg.layers_to_transform
                    .as_ref()
                    .map_or(String::new(), |l| format!(", layers_to_transform {l:?}")),
                if cfg.exclude_modules.is_empty() {
                    String::new()
                } else {
                    format!(", exclude_modules {:?}", cfg.exclude_modules)
                },
            ),
        ));
    }
    Ok(())
}

/// Give every adapter of `model` a distinct dropout key and one shared seed handle, which the
/// trainer sets before each forward.
pub fn share_dropout_seed(model: &mut Model) -> DropoutSeed {
    let seed = DropoutSeed::default();
    model.share_dropout_seed(&seed);
    if let Some(c) = model.classifier_mut() {
        c.dropout_seed = seed.clone();
    }
    for m in model.linears_mut() {
        if let Some(a) = m.linear.adapter.as_mut() {
            a.dropout_key = (m.layer * 8 + m.index) as u64 + 1;
            a.dropout_seed = seed.clone();
        }
    }
    if let Some((_, Some(a))) = model.head_adapter_mut() {
        // Clear of every layer's keys.
        a.dropout_key = 1 << 32;
        a.dropout_seed = seed.clone();
    }
    seed
}

/// Every trainable variable of the model's adapters, and of its classification head (trained in
/// full, PEFT's `modules_to_save`), with its PEFT key.
/// The name of the first tensor holding a NaN or an infinity (float tensors only), if any.
pub fn first_non_finite<'a>(
    tensors: impl IntoIterator<Item = (&'a String, &'a candle_core::Tensor)>,
) -> Result<Option<&'a str>, candle_core::Error> {
    for (name, t) in tensors {
        if !t.dtype().is_float() {
            continue;
        }
        let v = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if v.iter().any(|x| !x.is_finite()) {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

pub fn trainable_vars(model: &Model) -> Vec<(String, Var)> {
    let mut out = Vec::new();
    for m in model.linears() {
        if let Some(a) = &m.linear.adapter {
            for (suffix, var) in a.parameters() {
                out.push((peft_key(&m.path, suffix), var.clone()));
            }
        }
    }
    let emb = model.token_embedding();
    if let Some(a) = emb.adapter {
        for (suffix, var) in a.parameters() {
            out.push((peft_key(emb.path, suffix), var.clone()));
        }
    }
    if let Some(a) = model.head_adapter() {
        for (suffix, var) in a.parameters() {
            out.push((peft_key(HEAD, suffix), var.clone()));
        }
    }
    if let Some(c) = model.classifier() {
        for (suffix, var) in c.parameters() {
            out.push((
                format!("base_model.model.{}.{suffix}", c.module),
                var.clone(),
            ));
        }
    }
    out
}
