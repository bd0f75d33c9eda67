//! Training checkpoints: everything needed to continue a run exactly.
//!
//! `OUT/checkpoint-<step>/` holds the adapter (PEFT format), `optimizer.safetensors` (AdamW
//! moments and step) and `trainer_state.json` (step, data position, losses so far, and a
//! fingerprint of the model and adapter shapes so a checkpoint cannot be resumed onto another
//! model). Each is written into a temporary folder renamed into place, so a crash mid-write
//! never leaves a half checkpoint under the final name. Dropout masks are a function of
//! (seed, step), so no RNG state needs saving beyond the seed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::atomic_dir::AtomicDir;
use crate::data::batches::BatchPosition;
use crate::lora::LoraConfig;
use crate::model::error::ModelError;
use crate::model::transformer::Model;
use crate::optim::AdamW;
use crate::peft;

/// File of the optimizer state inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// File of the trainer state inside a checkpoint.
pub const STATE_FILE: &str = "trainer_state.json";

/// The loop's own state at a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    /// Where the training batches continue.
    pub data_position: BatchPosition,
    /// Loss of every step so far.
    pub losses: Vec<f64>,
    /// Validation losses so far.
    pub val_losses: Vec<(usize, f64)>,
    /// Predicted tokens so far.
    pub tokens: usize,
    /// Seconds of training so far.
    pub train_seconds: f64,
    /// Identifies the model and adapter layout the checkpoint belongs to.
    pub fingerprint: String,
    /// The options that decide the run's numbers, by flag name.
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
}

/// A short description of the model shape and adapter layout that must match on resume.
pub fn fingerprint(model: &Model) -> String {
    let c = model.info();
    let shapes: Vec<String> = crate::peft::trainable_vars(model)
        .iter()
        .map(|(n, v)| format!("{n}:{:?}", v.dims()))
        .collect();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in shapes.join(";").bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    format!(
        "{} L{} H{} I{} V{} heads{}/{} adapters{}:{h:016x}",
        c.model_type,
        c.num_layers,
        c.hidden_size,
        c.intermediate_size,
        c.vocab_size,
        c.num_heads,
        c.num_kv_heads,
        shapes.len()
    )
}

/// Write a checkpoint of `model`'s adapters, `opt` and `state` to `out/checkpoint-<step>`.
pub fn save_checkpoint(
    out: &Path,
    model: &Model,
    lora_cfg: &LoraConfig,
    base_name: &str,
    opt: &AdamW,
    state: &TrainerState,
) -> Result<PathBuf, ModelError> {
    let target = out.join(format!("checkpoint-{}", state.step));
    let staging = AtomicDir::new(&target)?;
    // The adapter goes in a sub-folder of the staging folder so it stays a plain PEFT folder.
    let adapter = staging.path().join("adapter");
    peft::save_adapter(model, lora_cfg, base_name, &adapter)?;
    let tensors = opt.state_tensors()?;
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let opt_path = staging.path().join(OPTIMIZER_FILE);
    safetensors::serialize_to_file(views, None, &opt_path).map_err(|source| {
        ModelError::SafetensorsWrite {
            path: opt_path.clone(),
            source,
        }
    })?;
    let state_path = staging.path().join(STATE_FILE);
    let text = serde_json::to_string_pretty(state)
        .map_err(|e| ModelError::invalid(STATE_FILE, e.to_string()))?;
    std::fs::write(&state_path, text).map_err(|e| ModelError::io(&state_path, e))?;
    Ok(staging.commit()?)
}

/// Check that `dir` looks like a folder [`save_checkpoint`] wrote (its trainer state, optimizer
/// state and adapter), before anything is loaded from it; the error says what is missing and,
/// when `dir` is a run's output folder, which checkpoint in it to give instead.
pub fn check_checkpoint_dir(dir: &Path) -> Result<(), ModelError> {
    let not = |what: String| {
        ModelError::invalid(
            dir.display().to_string(),
            format!(
                "{what}; --resume takes a checkpoint folder OUT/checkpoint-N, written by `qlora \
                 train` every --save-every steps and on Ctrl-C"
            ),
        )
    };
    if !dir.is_dir() {
        return Err(not("is not a folder".into()));
    }
    let missing: Vec<&str> = [STATE_FILE, OPTIMIZER_FILE, "adapter/adapter_config.json"]
        .into_iter()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let latest = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path()
                .join(STATE_FILE)
                .is_file()
                .then_some((step, e.path()))
        })
        .max_by_key(|(step, _)| *step);
    let hint = latest
        .map(|(_, p)| format!(" (this folder holds {}: resume from it?)", p.display()))
        .unwrap_or_default();
    Err(not(format!(
        "is not a training checkpoint: it has no {}{hint}",
        missing.join(", ")
    )))
}

/// Read a checkpoint's trainer state, refusing one from another model or adapter layout.
pub fn read_trainer_state(dir: &Path, model: &Model) -> Result<TrainerState, ModelError> {
    check_checkpoint_dir(dir)?;
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.clone(),
        source,
    })?;
    let want = fingerprint(model);
    if state.fingerprint != want {
        return Err(ModelError::invalid(
            dir.display().to_string(),
            format!(
                "this checkpoint belongs to another model or adapter layout ({}), not this one ({want})",
                state.fingerprint
            ),
        ));
    }
    Ok(state)
}

/// Refuse to resume from `state` (read from `dir`) with options other than the run's, listing
/// each difference, and refuse a trainer state that does not hold together (a hand-edited or
/// damaged file): losses for exactly its steps, all finite, validation steps within them.
pub fn check_resume(
    dir: &Path,
    state: &TrainerState,
    options: &std::collections::BTreeMap<String, String>,
    steps: usize,
) -> Result<(), ModelError> {
    let file = dir.join(STATE_FILE).display().to_string();
    let mut wrong = Vec::new();
    if state.losses.len() != state.step {
        wrong.push(format!(
            "`step` is {} but `losses` holds {} values",
            state.step,
            state.losses.len()
        ));
    }
    if let Some(i) = state.losses.iter().position(|l| !l.is_finite()) {
        wrong.push(format!("`losses[{i}]` is not a finite number"));
    }
    if let Some((s, _)) = state
        .val_losses
        .iter()
        .find(|(s, l)| *s > state.step || !l.is_finite())
    {
        wrong.push(format!(
            "`val_losses` has an entry for step {s} that is past `step` or not finite"
        ));
    }
    if !(state.train_seconds.is_finite() && state.train_seconds >= 0.0) {
        wrong.push("`train_seconds` is not a non-negative number".into());
    }
    if !wrong.is_empty() {
        return Err(ModelError::invalid(file, wrong.join("; ")));
    }
    if state.step >= steps {
        return Err(ModelError::invalid(
            dir.display().to_string(),
            format!(
                "this checkpoint is at step {}, and the run takes {steps} steps: nothing is left \
                 to train (give a larger --steps to continue)",
                state.step
            ),
        ));
    }
    let differ: Vec<String> = options
        .iter()
        .filter_map(|(k, now)| {
            let then = state.options.get(k)?;
            (then != now).then(|| format!("--{k}: {then} in the checkpoint, {now} now"))
        })
        .collect();
    if differ.is_empty() {
        return Ok(());
    }
    Err(ModelError::invalid(
        dir.display().to_string(),
        format!(
            "the run would not continue the same training: {} (only --steps, --epochs, \
             --eval-every, --save-every, checkpointing, --keep-layers and paging may change on \
             --resume)",
            differ.join("; ")
        ),
    ))
}

/// Load the optimizer state of a checkpoint into `opt`.
pub fn load_optimizer(dir: &Path, opt: &mut AdamW) -> Result<(), ModelError> {
    let path = dir.join(OPTIMIZER_FILE);
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| ModelError::invalid(path.display().to_string(), e.to_string()))?;
    if let Some(name) = peft::first_non_finite(&tensors)? {
        return Err(ModelError::invalid(
            path.display().to_string(),
            format!("optimizer state `{name}` holds NaN or infinite values"),
        ));
    }
    opt.load_state_tensors(tensors)
        .map_err(|e| ModelError::invalid(path.display().to_string(), e.to_string()))
}
