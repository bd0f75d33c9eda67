//! `TrainRecipe`: every training choice resolved to a value, and what turns it, a loaded model
//! and a data file into batches and [`TrainSettings`].
//!
//! `qlora train` and `qlora compare` both build one from their options, so the two commands
//! read data, split validation and schedule the learning rate the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::layerwise::KeepLayers;
use super::step::Batch;
use super::trainer::TrainSettings;
use crate::data::batches::{BatchOptions, Batches};
use crate::data::corpus::{Corpus, DataOptions, LoadReport};
use crate::data::labelled::{load_labelled, LabelSpace};
use crate::data::split::split_validation;
use crate::lora::LoraConfig;
use crate::model::error::ModelError;
use crate::model::loader::LoadedModel;
use crate::optim::schedule::{Schedule, ScheduleKind};
use crate::optim::{AdamWConfig, StateStorage};

/// Where the validation examples come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Validation {
    /// A separate file.
    File(PathBuf),
    /// This fraction of the training file's documents, held out (seeded).
    Split(f64),
}

/// Every training choice, defaults already applied.
#[derive(Clone, Debug)]
pub struct TrainRecipe {
    /// Optimizer steps; `None` runs `epochs` epochs.
    pub steps: Option<usize>,
    /// Epochs when `steps` is not given.
    pub epochs: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Shape of the learning-rate schedule.
    pub schedule: ScheduleKind,
    /// Warmup steps (overrides `warmup_ratio`).
    pub warmup_steps: Option<usize>,
    /// Warmup as a fraction of the steps.
    pub warmup_ratio: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 disables).
    pub max_grad_norm: f64,
    /// LoRA+ learning-rate ratio for B.
    pub lora_plus_ratio: f64,
    /// Fresh adapters to attach (ignored when starting from a saved adapter).
    pub lora: LoraConfig,
    /// Activation checkpointing per layer.
    pub grad_checkpointing: bool,
    /// With checkpointing: top layers whose graphs are kept instead of recomputed (`Auto` is
    /// resolved against the memory plan before training; unresolved it keeps none).
    pub keep_layers: KeepLayers,
    /// Seed of adapters, dropout, shuffles and the validation split.
    pub seed: u64,
    /// Shuffle the training examples each epoch.
    pub shuffle: bool,
    /// Validation examples.
    pub validation: Validation,
    /// Validate every this many steps (0 = start and end only).
    pub eval_every: usize,
    /// Where the optimizer state lives.
    pub optim_storage: StateStorage,
    /// Checkpoint every this many steps (0 = only on interruption).
    pub save_every: usize,
}

/// The batches of a run, and what loading the data did.
#[derive(Clone, Debug)]
pub struct RunData {
    /// Training batches (fresh: at the start of epoch 0).
    pub train: Batches,
    /// Validation batches, in file order (empty when there is no validation set).
    pub val: Vec<Batch>,
    /// What reading the training file did.
    pub train_report: LoadReport,
    /// What reading the validation file did (when one was given).
    pub val_report: Option<LoadReport>,
    /// A remark for the user (e.g. why no validation split was taken).
    pub note: Option<String>,
}

impl RunData {
    /// Bytes the training and validation data hold in memory for the whole run.
    pub fn resident_bytes(&self) -> usize {
        let tensor = |t: &candle_core::Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let val: usize = self
            .val
            .iter()
            .map(|b| {
                tensor(&b.ids)
                    + b.labels.len() * std::mem::size_of::<i64>()
                    + b.segments.as_ref().map_or(0, tensor)
                    + b.positions.as_ref().map_or(0, tensor)
            })
            .sum();
        self.train.resident_bytes() + val
    }
}

/// The first `eos_token_id` of the generation_config.json beside a model folder's config, if any.
fn generation_eos(model: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(model.join("generation_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    match v.get("eos_token_id")? {
        serde_json::Value::Array(ids) => ids.first()?.as_u64(),
        id => id.as_u64(),
    }
    .and_then(|id| u32::try_from(id).ok())
}

/// Below this many records, the validation split says which it held out.
const SMALL_DATASET: usize = 20;

impl TrainRecipe {
    /// Check every option's range, naming the option as its flag (and TOML key) does: the one
    /// place CLI flags and config files are held to, before any file is created.
    pub fn validate(&self) -> Result<(), String> {
        let mut bad = Vec::new();
        let mut need = |ok: bool, what: String| {
            if !ok {
                bad.push(what);
            }
        };
        let frac = |x: f64| x.is_finite() && (0.0..1.0).contains(&x);
        need(
            self.steps != Some(0),
            "--steps must be at least 1 (leave it out to run --epochs)".into(),
        );
        need(self.epochs >= 1, "--epochs must be at least 1".into());
        need(
            self.batch_size >= 1,
            "--batch-size must be at least 1".into(),
        );
        need(
            self.grad_accum >= 1,
            "--grad-accum must be at least 1".into(),
        );
        need(
            self.seq_len >= 2,
            format!("--seq-len must be at least 2, not {}", self.seq_len),
        );
        need(
            self.lr.is_finite() && self.lr > 0.0,
            format!("--lr must be a positive number, not {}", self.lr),
        );
        need(
            frac(self.warmup_ratio),
            format!(
                "--warmup-ratio must be in [0, 1), not {}",
                self.warmup_ratio
            ),
        );
        need(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            format!("--weight-decay must be >= 0, not {}", self.weight_decay),
        );
        need(
            self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0,
            format!(
                "--max-grad-norm must be >= 0 (0 turns clipping off), not {}",
                self.max_grad_norm
            ),
        );
        need(
            self.lora_plus_ratio.is_finite() && self.lora_plus_ratio > 0.0,
            format!(
                "--lora-plus-ratio must be positive (1 is plain LoRA), not {}",
                self.lora_plus_ratio
            ),
        );
        let l = &self.lora;
        need(l.rank >= 1, "--rank must be at least 1".into());
        need(
            l.alpha.is_finite() && l.alpha > 0.0,
            format!("--alpha must be positive, not {}", l.alpha),
        );
        need(
            frac(f64::from(l.dropout)),
            format!("--dropout must be in [0, 1), not {}", l.dropout),
        );
        if let Validation::Split(f) = self.validation {
            need(frac(f), format!("--val-split must be in [0, 1), not {f}"));
        }
        if let Some(a) = &l.adalora {
            need(a.init_r >= 1, "--init-r must be at least 1".into());
            need(
                (1..=a.init_r).contains(&a.target_r),
                format!(
                    "--target-r must be between 1 and --init-r ({}), not {}",
                    a.init_r, a.target_r
                ),
            );
            need(a.delta_t >= 1, "--delta-t must be at least 1".into());
            need(
                frac(a.beta1),
                format!("--beta1 must be in [0, 1), not {}", a.beta1),
            );
            need(
                frac(a.beta2),
                format!("--beta2 must be in [0, 1), not {}", a.beta2),
            );
            need(
                a.orth_reg_weight.is_finite() && a.orth_reg_weight >= 0.0,
                format!("--orth-reg-weight must be >= 0, not {}", a.orth_reg_weight),
            );
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(bad.join("; "))
        }
    }

    /// Read `data` (and the validation file) with `model`'s tokenizer and vocabulary, split
    /// validation off, and build the batches.
    pub fn load_data(&self, model: &LoadedModel, data: &Path) -> Result<RunData, ModelError> {
        let tok = model.tokenizer.as_ref();
        let info = model.model.info();
        let mut dopts = DataOptions::new(self.seq_len, info.vocab_size);
        // Without a tokenizer, the config's `eos_token_id` is the end of a document (else
        // generation_config.json's, as transformers' `generate` reads it).
        if tok.is_none_or(|t| t.eos_token_ids().is_empty()) {
            dopts.eos_token_id = info
                .eos_token_ids
                .first()
                .copied()
                .or_else(|| generation_eos(&model.path));
        }
        // A classifier reads labelled records, one example per row, padded within a batch.
        let labels = model.model.classifier().map(|c| LabelSpace {
            names: c.config.labels.clone(),
            regression: c.config.regression,
        });
        if labels.is_some() && !model.model.bidirectional() && info.pad_token_id.is_none() {
            return Err(ModelError::Config {
                path: model.path.join("config.json").display().to_string(),
                what: "a decoder classifies padded batches at their last token that is not \
                       `pad_token_id`, and the config has none"
                    .into(),
            });
        }
        let read = |path: &Path| match &labels {
            Some(l) => load_labelled(path, tok, l, self.seq_len, info.vocab_size, true),
            None => Corpus::load(path, tok, &dopts),
        };
        let corpus = read(data)?;
        let train_report = corpus.report.clone();
        let mut note = None;
        let mut val_report = None;
        let (train_ex, val_ex) = match &self.validation {
            Validation::File(p) => {
                let v = read(p)?;
                val_report = Some(v.report);
                (corpus.examples, v.examples)
            }
            Validation::Split(frac) => {
                let docs = corpus
                    .examples
                    .iter()
                    .map(|e| e.doc)
                    .collect::<BTreeSet<_>>()
                    .len();
                if *frac > 0.0 && docs < 2 {
                    note = Some(format!(
                        "{} is one document, so no validation split is taken; give --val-data \
                         to validate",
                        data.display()
                    ));
                    (corpus.examples, Vec::new())
                } else {
                    let (train, val) = split_validation(corpus.examples, *frac, self.seed)?;
                    // With few records, a held-out one is a noticeable share of the data: say
                    // which.
                    if docs < SMALL_DATASET && !val.is_empty() {
                        let held: BTreeSet<usize> = val.iter().map(|e| e.doc + 1).collect();
                        let list: Vec<String> = held.iter().map(usize::to_string).collect();
                        note = Some(format!(
                            "{} of the {docs} records of {} are held out for validation \
                             (number {}); --val-split 0 trains on all of them, --val-data FILE \
                             validates on another file",
                            held.len(),
                            data.display(),
                            list.join(", ")
                        ));
                    }
                    (train, val)
                }
            }
        };
        let pad_id = model
            .model
            .info()
            .pad_token_id
            .or(model.model.info().eos_token_ids.first().copied())
            .unwrap_or(0);
        let device = model.model.device().clone();
        let mut bopts = BatchOptions::new(self.batch_size, self.seq_len, pad_id, self.seed);
        bopts.shuffle = self.shuffle;
        bopts.packing = labels.is_none();
        let train = Batches::new(train_ex, bopts.clone(), &device)?;
        let val = if val_ex.is_empty() {
            Vec::new()
        } else {
            let mut vopts = bopts;
            vopts.shuffle = false;
            vopts.epochs = Some(1);
            Batches::new(val_ex, vopts, &device)?.collect::<Result<Vec<_>, _>>()?
        };
        Ok(RunData {
            train,
            val,
            train_report,
            val_report,
            note,
        })
    }

    /// Optimizer steps of the run: `steps`, or `epochs` epochs of `train`.
    pub fn total_steps(&self, train: &Batches) -> usize {
        self.steps.unwrap_or_else(|| {
            (0..self.epochs)
                .map(|e| train.batches_in_epoch(e))
                .sum::<usize>()
                .div_ceil(self.grad_accum)
        })
    }

    /// The trainer's settings for a run over `train` (no resume, no stop flag, progress bar on).
    /// The options that decide a run's numbers, by flag name, for a resumed run to match: every
    /// one but those that change only speed, memory or length (`--steps`, `--epochs`,
    /// `--eval-every`, `--save-every`, checkpointing, `--keep-layers`, paging).
    pub fn run_options(&self, data: &Path, base: &str) -> BTreeMap<String, String> {
        let data = std::fs::canonicalize(data).unwrap_or_else(|_| data.to_path_buf());
        let l = &self.lora;
        let mut o = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            o.insert(k.to_string(), v);
        };
        put("data", data.display().to_string());
        put("quant", base.to_string());
        put("seq-len", self.seq_len.to_string());
        put("batch-size", self.batch_size.to_string());
        put("grad-accum", self.grad_accum.to_string());
        put("lr", self.lr.to_string());
        put("lr-scheduler", format!("{:?}", self.schedule));
        put("warmup-steps", format!("{:?}", self.warmup_steps));
        put("warmup-ratio", self.warmup_ratio.to_string());
        put("weight-decay", self.weight_decay.to_string());
        put("max-grad-norm", self.max_grad_norm.to_string());
        put("lora-plus-ratio", self.lora_plus_ratio.to_string());
        put("seed", self.seed.to_string());
        put("no-shuffle", (!self.shuffle).to_string());
        put("validation", format!("{:?}", self.validation));
        put("rank", l.rank.to_string());
        put("alpha", l.alpha.to_string());
        put("dropout", l.dropout.to_string());
        put("rslora", l.use_rslora.to_string());
        put("dora", l.use_dora.to_string());
        put("adapter-dtype", format!("{:?}", l.dtype));
        put(
            "optim-8bit",
            matches!(self.optim_storage, StateStorage::EightBit { .. }).to_string(),
        );
        o
    }

    pub fn settings(&self, train: &Batches) -> TrainSettings {
        let steps = self.total_steps(train);
        let warmup = self
            .warmup_steps
            .unwrap_or_else(|| (steps as f64 * self.warmup_ratio).round() as usize);
        TrainSettings {
            steps,
            grad_accum: self.grad_accum,
            schedule: Schedule {
                lr: self.lr,
                kind: self.schedule,
                warmup,
                total: steps,
            },
            adamw: AdamWConfig {
                lr: self.lr,
                weight_decay: self.weight_decay,
                ..Default::default()
            },
            lora_plus_ratio: self.lora_plus_ratio,
            max_grad_norm: self.max_grad_norm,
            grad_checkpointing: self.grad_checkpointing,
            keep_layers: self.keep_layers.count(),
            eval_every: self.eval_every,
            seed: self.seed,
            optim_storage: self.optim_storage.clone(),
            progress: true,
            save_every: self.save_every,
            resume: None,
            stop: None,
            run_options: BTreeMap::new(),
            profile: false,
            collective: std::rc::Rc::new(crate::distributed::Single),
            optim_engine: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::generation_eos;

    #[test]
    fn the_generation_config_gives_an_eos_id_when_the_config_has_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(generation_eos(dir.path()), None);
        let gen = dir.path().join("generation_config.json");
        std::fs::write(&gen, r#"{"eos_token_id": [7, 9]}"#).unwrap();
        assert_eq!(generation_eos(dir.path()), Some(7));
        std::fs::write(&gen, r#"{"bos_token_id": 1, "eos_token_id": 2}"#).unwrap();
        assert_eq!(generation_eos(dir.path()), Some(2));
    }
}
