//! The training loop: batches → loss → backward (layer by layer) → clip → AdamW step → log.
//!
//! It orchestrates and owns no math: the step is `layerwise`, the update `optim`, the curve
//! `plot`. Progress goes to an indicatif bar and `metrics.jsonl`; the run ends with a summary,
//! a loss-curve SVG and the adapter in PEFT format.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::json;

use super::checkpoint::{self, TrainerState};
use super::layerwise::{loss_and_grads_layerwise, Checkpointing};
use super::plot::draw_run_curves;
use super::step::Batch;
use crate::data::batches::Batches;
use crate::lora::adalora::{orth_reg, RankAllocator, Triplet};
use crate::lora::LoraConfig;
use crate::model::error::ModelError;
use crate::model::transformer::Model;
use crate::optim::schedule::Schedule;
use crate::optim::{AdamW, AdamWConfig, UpdateEngine};
use crate::peft;
use crate::train::data_parallel;

/// Settings of a run (everything but the data and the model).
#[derive(Clone, Debug)]
pub struct TrainSettings {
    /// Optimizer steps.
    pub steps: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Schedule (peak LR, shape, warmup, total).
    pub schedule: Schedule,
    /// AdamW hyperparameters (its `lr` is ignored; the schedule rules).
    pub adamw: AdamWConfig,
    /// LoRA+: learning-rate multiplier for B matrices (1 = plain LoRA).
    pub lora_plus_ratio: f64,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub max_grad_norm: f64,
    /// Recompute each layer in the backward instead of keeping activations.
    pub grad_checkpointing: bool,
    /// With checkpointing: keep the graphs of this many top layers (no recompute for them).
    pub keep_layers: usize,
    /// Validation every this many steps (0 = only at the start and end).
    pub eval_every: usize,
    /// Seed for dropout masks.
    pub seed: u64,
    /// Where the optimizer state lives (plain, paged with a resident budget, 8-bit).
    pub optim_storage: crate::optim::StateStorage,
    /// Show a progress bar.
    pub progress: bool,
    /// Write a checkpoint every this many steps (0 = only on interruption).
    pub save_every: usize,
    /// Continue from this checkpoint folder (its adapter must already be loaded on the model).
    pub resume: Option<PathBuf>,
    /// Set (e.g. by Ctrl-C) to save a checkpoint and stop after the current step.
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// The options that decide the run's numbers (`TrainRecipe::run_options`): written into
    /// every checkpoint, and a resumed run must have the same.
    pub run_options: std::collections::BTreeMap<String, String>,
    /// Time the parts of each step ([`crate::profile`]) and report the step-time budget.
    pub profile: bool,
    /// The ranks of a data-parallel run ([`crate::distributed::Single`] for one process): each
    /// rank takes its share of every step's batches, gradients are summed over ranks, and only
    /// the writing rank writes.
    pub collective: std::rc::Rc<dyn crate::distributed::Collective>,
    /// Where the optimizer update runs (`None`: by the parameters' device, the host update on
    /// CPU and tensor ops on a GPU).
    pub optim_engine: Option<crate::optim::UpdateEngine>,
}

impl TrainSettings {
    /// Which layers a step recomputes.
    pub fn checkpointing(&self) -> Checkpointing {
        Checkpointing {
            enabled: self.grad_checkpointing,
            keep_layers: self.keep_layers,
        }
    }
}

/// What a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    /// Steps taken.
    pub steps: usize,
    /// Loss of each step.
    pub losses: Vec<f64>,
    /// (step, validation loss) pairs.
    pub val_losses: Vec<(usize, f64)>,
    /// A classifier's validation accuracy at each validation (step, accuracy).
    pub val_accuracy: Vec<(f64, f64)>,
    /// Predicted tokens per second over the run.
    pub tokens_per_s: f64,
    /// Wall time.
    pub seconds: f64,
    /// Where the adapter was written (`None` when the run was interrupted).
    pub adapter_dir: Option<PathBuf>,
    /// Checkpoints written.
    pub checkpoints: Vec<PathBuf>,
    /// The run stopped early on request; the last checkpoint holds it.
    pub interrupted: bool,
    /// With `profile`: where the steps' time went.
    #[serde(skip)]
    pub budget: Option<crate::profile::Budget>,
}

/// Append a record to the metrics log (a rank that does not write has none).
fn write_jsonl(
    file: &mut Option<std::fs::File>,
    path: &Path,
    v: serde_json::Value,
) -> Result<(), ModelError> {
    match file {
        Some(f) => writeln!(f, "{v}").map_err(|e| ModelError::io(path, e)),
        None => Ok(()),
    }
}

/// Accuracy and macro-F1 of the classifier on classification `batches` (`None` for language
/// modelling or a regression head).
pub fn validation_metrics(
    model: &Model,
    batches: &[Batch],
) -> Result<Option<crate::classify::ClassMetrics>, ModelError> {
    let (mut logits, mut targets) = (Vec::new(), Vec::new());
    for b in batches {
        let Some(c) = &b.classes else { return Ok(None) };
        let l = model.classify(&b.ids, &c.keys, None, false)?;
        logits.extend(l.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?);
        targets.extend_from_slice(&c.targets);
    }
    match model.classifier() {
        Some(head) if !head.config.regression && !targets.is_empty() => {
            Ok(Some(crate::classify::metrics(&logits, &targets, false)))
        }
        _ => Ok(None),
    }
}

/// One validation: metrics.jsonl's record at `step` (loss, and for a classifier accuracy and
/// macro-F1), with the loss and accuracy for the curves.
fn validate(
    model: &Model,
    val: &[Batch],
    step: usize,
) -> Result<(serde_json::Value, f64, Option<f64>), ModelError> {
    let v = validation_loss(model, val)?;
    let mut rec = json!({"step": step, "val_loss": v});
    let m = validation_metrics(model, val)?;
    if let Some(m) = &m {
        rec["val_accuracy"] = json!(m.accuracy);
        rec["val_macro_f1"] = json!(m.macro_f1);
    }
    Ok((rec, v, m.and_then(|m| m.accuracy)))
}

/// Mean loss over `batches` (no dropout, no gradients kept).
pub fn validation_loss(model: &Model, batches: &[Batch]) -> Result<f64, ModelError> {
    let (mut sum, mut n) = (0f64, 0usize);
    for b in batches {
        // The mean over tokens for language modelling, over sequences for classification.
        let k = match &b.classes {
            Some(c) => c.targets.len(),
            None => b.predicted_tokens(),
        };
        let loss = super::step::eval_loss(model, b)?;
        sum += loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? * k as f64;
        n += k;
    }
    Ok(sum / n.max(1) as f64)
}

/// Check that `out` can become the output folder (it, or the nearest folder above it that
/// exists, takes new files) without creating anything, so a run fails before any work, and a
/// failed run leaves nothing behind.
pub fn check_output_dir(out: &Path) -> Result<(), ModelError> {
    let unusable = |why: String| ModelError::Invalid {
        path: out.to_path_buf(),
        what: format!("cannot be used as the output folder: {why}"),
    };
    let mut existing = out;
    while !existing.exists() {
        existing = match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
    }
    if !existing.is_dir() {
        return Err(unusable(format!(
            "{} is a file, not a folder",
            existing.display()
        )));
    }
    tempfile::NamedTempFile::new_in(existing)
        .map(drop)
        .map_err(|e| unusable(format!("cannot write in {}: {e}", existing.display())))
}

/// Global L2 norm of the gradients.
fn global_norm(grads: &[Option<Tensor>]) -> candle_core::Result<f64> {
    // Summed where the gradients are, read back once (one device sync per step on a GPU).
    let mut sq: Option<Tensor> = None;
    for g in grads.iter().flatten() {
        let s = g.to_dtype(candle_core::DType::F64)?.sqr()?.sum_all()?;
        sq = Some(match sq {
            Some(t) => (t + s)?,
            None => s,
        });
    }
    Ok(sq.map_or(Ok(0.0), |t| t.to_scalar::<f64>())?.sqrt())
}

/// Train `model`'s adapters on batches from `train` (cycling over epochs) for
/// AdaLoRA's orthogonality penalty over the model's adapters (its value), with
/// `weight ×` its gradient added to the A and B entries of `grads`.
fn adalora_penalty(
    model: &Model,
    vars: &[Var],
    grads: &mut [Option<Tensor>],
    weight: f64,
) -> Result<f64, ModelError> {
    let linears = model.linears();
    let adapters: Vec<&crate::lora::LoraAdapter> = linears
        .iter()
        .filter_map(|m| m.linear.adapter.as_ref())
        .collect();
    let reg = orth_reg(&adapters)?;
    let value = reg.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    let store = (reg * weight)?.backward()?;
    for (slot, v) in grads.iter_mut().zip(vars) {
        if let Some(g) = store.get(v.as_tensor()) {
            *slot = Some(match slot.take() {
                Some(x) => (x + g)?,
                None => g.clone(),
            });
        }
    }
    Ok(value)
}

/// The AdaLoRA modules of `linears` with this step's gradients of A, E and B (found among
/// `vars` by identity).
fn adalora_triplets<'a>(
    linears: &'a [crate::model::transformer::ModuleRef<'a>],
    vars: &[Var],
    grads: &'a [Option<Tensor>],
) -> Result<Vec<Triplet<'a>>, ModelError> {
    let grad_of = |v: &Var| -> Result<&'a Tensor, ModelError> {
        vars.iter()
            .position(|x| x.as_tensor().id() == v.as_tensor().id())
            .and_then(|i| grads[i].as_ref())
            .ok_or_else(|| ModelError::invalid("AdaLoRA", "an adapter tensor has no gradient"))
    };
    let mut out = Vec::new();
    for m in linears {
        let Some(a) = m.linear.adapter.as_ref() else {
            continue;
        };
        let Some(e) = a.e.as_ref() else { continue };
        out.push(Triplet {
            path: &m.path,
            adapter: a,
            grads: [grad_of(&a.a)?, grad_of(e)?, grad_of(&a.b)?],
        });
    }
    Ok(out)
}

/// `settings.steps` optimizer steps, validating on `val`; writes `metrics.jsonl`, `loss.svg`
/// and the PEFT adapter under `out`.
pub fn train(
    model: &mut Model,
    lora_cfg: &LoraConfig,
    base_name: &str,
    train: &mut Batches,
    val: &[Batch],
    settings: &TrainSettings,
    out: &Path,
) -> Result<TrainReport, ModelError> {
    if lora_cfg.adalora.is_some() && settings.resume.is_some() {
        return Err(ModelError::invalid(
            "--resume",
            "resuming an AdaLoRA run is not supported: its rank allocator's importance averages \
             are not in the checkpoint, so the resumed run would allocate differently",
        ));
    }
    let mut lora_cfg = lora_cfg.clone();
    if let Some(a) = lora_cfg.adalora.as_mut() {
        // A new AdaLoRA run's budget schedule spans the run.
        if a.total_step == 0 {
            a.total_step = settings.steps;
        }
        a.validate()
            .map_err(|e| ModelError::invalid("AdaLoRA settings", e))?;
    }
    let mut allocator = lora_cfg.adalora.clone().map(|a| {
        let ranks: Vec<usize> = model
            .linears()
            .iter()
            .filter_map(|m| m.linear.adapter.as_ref().map(|a| a.rank()))
            .collect();
        RankAllocator::new(a, &ranks)
    });
    // A checkpoint from another model is refused before anything is written.
    let resumed = match &settings.resume {
        Some(dir) => {
            let state = checkpoint::read_trainer_state(dir, model)?;
            checkpoint::check_resume(dir, &state, &settings.run_options, settings.steps)?;
            Some(state)
        }
        None => None,
    };
    let collective = settings.collective.as_ref();
    let writer = collective.writes();
    let fingerprint = checkpoint::fingerprint(model);
    // Ranks that disagree stop here, before anything is written.
    data_parallel::check_same_run(
        collective,
        &format!(
            "{fingerprint:?} {:?} {}",
            settings.run_options, settings.steps
        ),
    )?;
    let metrics_path = out.join("metrics.jsonl");
    // Only the writing rank of a data-parallel run touches the output folder.
    let mut metrics = if writer {
        check_output_dir(out)?;
        std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
        // A resumed run continues the log of the run it resumes (when it writes to the same
        // folder).
        Some(
            std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(resumed.is_some())
                .truncate(resumed.is_none())
                .open(&metrics_path)
                .map_err(|e| ModelError::io(&metrics_path, e))?,
        )
    } else {
        None
    };
    let dropout = peft::share_dropout_seed(model);
    let named = peft::trainable_vars(model);
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let ratio = settings.lora_plus_ratio;
    let engine = settings.optim_engine.unwrap_or_else(|| {
        vars.first()
            .map_or(UpdateEngine::Host, |v| UpdateEngine::for_device(v.device()))
    });
    let mut opt = AdamW::with_engine(
        named,
        settings.adamw.clone(),
        |name| {
            if name.contains("lora_B") {
                ratio
            } else {
                1.0
            }
        },
        settings.optim_storage.clone(),
        engine,
    )?;

    let bar = if settings.progress && writer {
        ProgressBar::new(settings.steps as u64).with_style(
            ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {msg} ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        )
    } else {
        ProgressBar::hidden()
    };
    let start = Instant::now();
    let mut val_losses = Vec::new();
    let mut val_accuracy: Vec<(f64, f64)> = Vec::new();
    let mut losses = Vec::with_capacity(settings.steps);
    let mut tokens = 0usize;
    let mut train_secs = 0f64;
    let mut first_step = 0usize;
    // Every rank starts from rank 0's adapters (however each initialised or loaded them).
    data_parallel::broadcast_vars(collective, &vars)?;
    if let (Some(dir), Some(state)) = (&settings.resume, resumed) {
        checkpoint::load_optimizer(dir, &mut opt)?;
        train.seek(state.data_position)?;
        first_step = state.step;
        losses = state.losses;
        val_losses = state.val_losses;
        tokens = state.tokens;
        train_secs = state.train_seconds;
        bar.set_position(first_step as u64);
    } else if !val.is_empty() && writer {
        let (rec, v, acc) = validate(model, val, 0)?;
        val_losses.push((0, v));
        if let Some(a) = acc {
            val_accuracy.push((0.0, a));
        }
        write_jsonl(&mut metrics, &metrics_path, rec)?;
    }
    let mut checkpoints = Vec::new();
    let mut interrupted = false;
    crate::profile::enable(settings.profile);
    let mut profiled = crate::profile::Totals::new();
    for step in first_step..settings.steps {
        // Validation between steps is not part of the budget.
        let _ = crate::profile::take();
        let cpu_start = crate::profile::process_cpu_seconds();
        let step_start = Instant::now();
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut step_loss = 0f64;
        let mut step_tokens = 0usize;
        for micro in 0..settings.grad_accum {
            let batch = data_parallel::next_local_batch(train, collective)?
                .ok_or_else(|| ModelError::invalid("training data", "ran out of batches"))?;
            let batch = &batch;
            dropout.set(settings.seed ^ ((step * settings.grad_accum + micro) as u64 + 1));
            let (loss, grads) =
                loss_and_grads_layerwise(model, batch, &vars, settings.checkpointing())?;
            step_loss += loss / settings.grad_accum as f64;
            step_tokens += batch.predicted_tokens();
            for (a, g) in acc.iter_mut().zip(grads) {
                *a = match (a.take(), g) {
                    (Some(x), Some(y)) => Some((x + y)?),
                    (x, y) => x.or(y),
                };
            }
        }
        let clip_timed = crate::profile::part(crate::profile::Part::Optimizer);
        let scale = 1.0 / settings.grad_accum as f64;
        let grads: Vec<Option<Tensor>> = acc
            .into_iter()
            .map(|g| g.map(|g| g * scale).transpose())
            .collect::<candle_core::Result<_>>()?;
        let grads = data_parallel::fill_missing(grads, &vars, collective.world_size())?;
        let asked_to_stop = settings
            .stop
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed));
        let reduced =
            data_parallel::reduce_step(collective, step_loss, step_tokens, grads, asked_to_stop)?;
        let (mut step_loss, mut grads, stop) = (reduced.loss, reduced.grads, reduced.stop);
        tokens += reduced.tokens;
        if !step_loss.is_finite() {
            bar.abandon();
            return Err(ModelError::invalid(
                "training",
                format!("loss became {step_loss} at step {step}; stopping (lower --lr, or check the data)"),
            ));
        }
        // AdaLoRA: PEFT adds its orthogonality penalty to every forward's loss.
        let orth = match &lora_cfg.adalora {
            Some(a) => {
                let reg = adalora_penalty(model, &vars, &mut grads, a.orth_reg_weight)?;
                step_loss += a.orth_reg_weight * reg;
                Some(reg)
            }
            None => None,
        };
        let norm = global_norm(&grads)?;
        // A non-finite gradient would poison the weights and every later checkpoint.
        if !norm.is_finite() {
            bar.abandon();
            return Err(ModelError::invalid(
                "training",
                format!(
                    "the gradient norm became {norm} at step {step} (loss {step_loss}); stopping \
                     before the weights change (lower --lr, or check the data)"
                ),
            ));
        }
        if settings.max_grad_norm > 0.0 && norm > settings.max_grad_norm {
            let c = settings.max_grad_norm / (norm + 1e-6);
            grads = grads
                .into_iter()
                .map(|g| g.map(|g| g * c).transpose())
                .collect::<candle_core::Result<_>>()?;
        }
        let lr = settings.schedule.lr_at(step);
        opt.step(&grads, lr)?;
        drop(clip_timed);
        if let (Some(alloc), Some(a)) = (allocator.as_mut(), lora_cfg.adalora.as_mut()) {
            let linears = model.linears();
            let triplets = adalora_triplets(&linears, &vars, &grads)?;
            if let Some(p) =
                alloc.update_and_allocate(step, &triplets, a.rank_pattern.as_deref())?
            {
                a.rank_pattern = Some(p);
            }
        }
        losses.push(step_loss);
        // Throughput counts training time only, not validation.
        let step_secs = step_start.elapsed().as_secs_f64();
        train_secs += step_secs;
        if settings.profile {
            profiled.add_step(step_secs, cpu_start);
        }
        let elapsed = start.elapsed().as_secs_f64();
        let tps = tokens as f64 / train_secs;
        let mut rec = json!({"step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": norm,
                   "tokens": tokens, "tokens_per_s": tps, "elapsed_s": elapsed});
        if let (Some(reg), Some(a)) = (orth, &lora_cfg.adalora) {
            rec["orth_reg"] = json!(reg);
            if let Some(p) = &a.rank_pattern {
                rec["adalora_rank"] = json!(p.iter().flat_map(|(_, m)| m).filter(|&&k| k).count());
            }
        }
        write_jsonl(&mut metrics, &metrics_path, rec)?;
        bar.set_message(format!("loss {step_loss:.4} | {tps:.0} tok/s"));
        bar.inc(1);
        let last = step + 1 == settings.steps;
        if !val.is_empty()
            && writer
            && (last || (settings.eval_every > 0 && (step + 1) % settings.eval_every == 0))
        {
            let (rec, v, acc) = validate(model, val, step + 1)?;
            val_losses.push((step + 1, v));
            if let Some(a) = acc {
                val_accuracy.push(((step + 1) as f64, a));
                bar.println(format!(
                    "step {}: validation loss {v:.4}, accuracy {a:.4}",
                    step + 1
                ));
            }
            write_jsonl(&mut metrics, &metrics_path, rec)?;
        }
        let due = settings.save_every > 0 && (step + 1) % settings.save_every == 0;
        if (due || stop) && !last && writer {
            let state = TrainerState {
                step: step + 1,
                data_position: Batches::position(train),
                losses: losses.clone(),
                val_losses: val_losses.clone(),
                tokens,
                train_seconds: train_secs,
                fingerprint: fingerprint.clone(),
                options: settings.run_options.clone(),
            };
            let dir = checkpoint::save_checkpoint(out, model, &lora_cfg, base_name, &opt, &state)?;
            bar.println(format!("checkpoint: {}", dir.display()));
            checkpoints.push(dir);
        }
        if stop && !last {
            interrupted = true;
            break;
        }
    }
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    crate::profile::enable(false);
    let budget = settings
        .profile
        .then(|| profiled.budget(rayon::current_num_threads()))
        .flatten();
    let mut report = TrainReport {
        budget,
        steps: losses.len(),
        checkpoints,
        interrupted,
        losses,
        val_losses,
        val_accuracy,
        tokens_per_s: tokens as f64 / train_secs.max(1e-9),
        seconds,
        adapter_dir: None,
    };
    if !writer {
        return Ok(report);
    }
    let lr: Vec<(f64, f64)> = (0..settings.steps)
        .map(|s| ((s + 1) as f64, settings.schedule.lr_at(s)))
        .collect();
    draw_run_curves(
        out,
        &report.losses,
        &report.val_losses,
        &report.val_accuracy,
        &lr,
    )?;

    if !report.interrupted {
        let dir = out.join("adapter");
        peft::save_adapter(model, &lora_cfg, base_name, &dir)?;
        report.adapter_dir = Some(dir);
    }
    Ok(report)
}
