//! `qlora train`'s options: the flags, the `--config` TOML file that may set each of them, and
//! the recipe they make.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::DType;
use clap::Args;
use serde::Deserialize;

use crate::lora::adalora::AdaLoraConfig;
use crate::lora::{parse_targets, LoraConfig, LoraInit};
use crate::optim::schedule::ScheduleKind;
use crate::optim::StateStorage;
use crate::train::layerwise::KeepLayers;
use crate::train::recipe::{TrainRecipe, Validation};

/// Every training option; each may also come from the `--config` TOML file (same names, with
/// `-` or `_`). Command-line flags win over the file, the file over the defaults.
#[derive(Args, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TrainOptions {
    /// Optimizer steps (default: one epoch, or --epochs).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Epochs over the training data (used when --steps is not given; default 1).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Sequences per micro-batch [default: 4].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Tokens per sequence [default: 512].
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Peak learning rate [default: 2e-4].
    #[arg(long)]
    pub lr: Option<f64>,
    /// constant | linear | cosine [default: cosine].
    #[arg(long)]
    pub lr_scheduler: Option<String>,
    /// Warmup steps (overrides --warmup-ratio).
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Warmup as a fraction of the steps [default: 0.03].
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// Decoupled weight decay [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm (0 disables) [default: 1.0].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// LoRA+ learning-rate ratio for B [default: 1].
    #[arg(long)]
    pub lora_plus_ratio: Option<f64>,
    /// LoRA rank [default: 16].
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha [default: 32].
    #[arg(long)]
    pub alpha: Option<f64>,
    /// LoRA dropout [default: 0.05].
    #[arg(long)]
    pub dropout: Option<f32>,
    /// all-linear or a comma list of projections [default: all-linear].
    #[arg(long)]
    pub targets: Option<String>,
    /// Per-module ranks, PEFT's `rank_pattern`: `PATTERN=R,...` (`down_proj=32`); a pattern is a
    /// regular expression matched against the end of the module path at a dot.
    #[arg(long, value_name = "PATTERN=R,...")]
    pub rank_pattern: Option<String>,
    /// Per-module alphas, PEFT's `alpha_pattern`: `PATTERN=ALPHA,...`.
    #[arg(long, value_name = "PATTERN=ALPHA,...")]
    pub alpha_pattern: Option<String>,
    /// Adapt only these layers (PEFT's `layers_to_transform`): `0,1,5`.
    #[arg(long, value_name = "N,...")]
    pub layers_to_transform: Option<String>,
    /// AdaLoRA (PEFT's `AdaLoraConfig`): SVD-form adapters whose ranks are pruned from
    /// --init-r to an average of --target-r over the run.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub adalora: Option<bool>,
    /// AdaLoRA: initial rank of every module [default: 12].
    #[arg(long)]
    pub init_r: Option<usize>,
    /// AdaLoRA: average rank at the end [default: 8].
    #[arg(long)]
    pub target_r: Option<usize>,
    /// AdaLoRA: steps before the budget starts to fall [default: 0].
    #[arg(long)]
    pub tinit: Option<usize>,
    /// AdaLoRA: steps at the final budget [default: 0].
    #[arg(long)]
    pub tfinal: Option<usize>,
    /// AdaLoRA: steps between two rank allocations [default: 1].
    #[arg(long)]
    pub delta_t: Option<usize>,
    /// AdaLoRA: weight of the orthogonality penalty [default: 0.5].
    #[arg(long)]
    pub orth_reg_weight: Option<f64>,
    /// AdaLoRA: EMA factor of the importance [default: 0.85].
    #[arg(long)]
    pub beta1: Option<f64>,
    /// AdaLoRA: EMA factor of its uncertainty [default: 0.85].
    #[arg(long)]
    pub beta2: Option<f64>,
    /// Adapter weights dtype: bf16 | f32 [default: bf16].
    #[arg(long)]
    pub adapter_dtype: Option<String>,
    /// kaiming | gaussian | pissa [default: kaiming].
    #[arg(long)]
    pub init: Option<String>,
    /// Scale by alpha/sqrt(r) (rsLoRA).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub rslora: Option<bool>,
    /// DoRA adapters.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub dora: Option<bool>,
    /// Activation checkpointing per layer [default: on; `--grad-checkpointing=false` or
    /// `--no-grad-checkpointing` turns it off].
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub grad_checkpointing: Option<bool>,
    /// Turn activation checkpointing off (the same as `--grad-checkpointing=false`).
    #[arg(long, conflicts_with = "grad_checkpointing")]
    #[serde(skip)]
    pub no_grad_checkpointing: bool,
    /// With checkpointing: keep the autograd graphs of this many top layers instead of
    /// recomputing them (faster; one layer's activations of memory each, see `qlora plan`), or
    /// `auto`: as many as --memory-limit allows [default: 0].
    #[arg(long, value_name = "N|auto", value_parser = KeepLayers::parse)]
    pub keep_layers: Option<KeepLayers>,
    /// Random seed [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep the data order.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub no_shuffle: Option<bool>,
    /// Fraction of sequences held out for validation [default: 0.05].
    #[arg(long)]
    pub val_split: Option<f64>,
    /// Validation data instead of a split (as --data; a hub dataset as `org/name:validation`).
    #[arg(long, value_name = "FILE|DIR|ORG/NAME", value_parser = crate::hub::data_path)]
    pub val_data: Option<PathBuf>,
    /// Validate every N steps [default: 0 = start and end only].
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Page the optimizer state: keep at most this many MiB resident, the rest in a
    /// memory-mapped file (bit-identical results); with --device cuda, at most this many MiB in
    /// device memory, the rest in pinned host memory (QLoRA's paged optimizer).
    #[arg(long)]
    pub optim_resident_mb: Option<f64>,
    /// 8-bit blockwise optimizer state (as bitsandbytes' 8-bit AdamW).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub optim_8bit: Option<bool>,
    /// Write a checkpoint (adapter, optimizer, data position) every N steps [default: 0 = only
    /// on Ctrl-C].
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Refuse to start when the memory plan's peak exceeds this (e.g. 8GiB, 16G, 12GB).
    #[arg(long, value_name = "SIZE")]
    pub memory_limit: Option<String>,
}

/// A `TrainOptions` whose every listed field is the command line's value, else the file's.
macro_rules! merge {
    ($cli:expr, $file:expr, [$($f:ident),*]) => {
        TrainOptions { $($f: $cli.$f.take().or($file.$f.take()),)* no_grad_checkpointing: false }
    };
}

/// The options a `--config` TOML file sets.
fn read_config(path: &Path) -> anyhow::Result<TrainOptions> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut opts: TrainOptions = toml::from_str(&text)
        .with_context(|| format!("{}: not a valid training config", path.display()))?;
    // `val-data` in the file names data as the flag does: a path, or a hub dataset.
    if let Some(v) = opts.val_data.take() {
        let resolved = crate::hub::data_path(&v.to_string_lossy())
            .with_context(|| format!("{}: `val-data`", path.display()))?;
        opts.val_data = Some(resolved);
    }
    Ok(opts)
}

/// Parse `PATTERN=VALUE,...` (a piece without `=` continues the previous pattern, so a
/// regular expression may hold commas).
fn parse_pattern<T>(
    s: Option<&str>,
    flag: &str,
    value: impl Fn(&str) -> Option<T>,
) -> anyhow::Result<Vec<(String, T)>> {
    let Some(s) = s else {
        return Ok(Vec::new());
    };
    let mut pieces: Vec<String> = Vec::new();
    for piece in s.split(',') {
        match pieces.last_mut() {
            Some(last) if !piece.contains('=') => {
                last.push(',');
                last.push_str(piece);
            }
            _ => pieces.push(piece.to_string()),
        }
    }
    pieces
        .iter()
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (k, v) = p
                .rsplit_once('=')
                .ok_or_else(|| anyhow::anyhow!("{flag} `{p}`: expected PATTERN=VALUE"))?;
            let v = value(v.trim()).ok_or_else(|| {
                anyhow::anyhow!("{flag} `{p}`: `{}` is not a valid value", v.trim())
            })?;
            Ok((k.trim().to_string(), v))
        })
        .collect()
}

impl TrainOptions {
    /// These options (flags) over those of the `config` TOML file: a flag wins over the file.
    pub fn merged_with(mut self, config: Option<&Path>) -> anyhow::Result<TrainOptions> {
        if self.no_grad_checkpointing {
            self.grad_checkpointing = Some(false);
        }
        let mut file = match config {
            Some(p) => read_config(p)?,
            None => TrainOptions::default(),
        };
        Ok(merge!(
            self,
            file,
            [
                steps,
                epochs,
                batch_size,
                grad_accum,
                seq_len,
                lr,
                lr_scheduler,
                warmup_steps,
                warmup_ratio,
                weight_decay,
                max_grad_norm,
                lora_plus_ratio,
                rank,
                alpha,
                dropout,
                targets,
                rank_pattern,
                alpha_pattern,
                layers_to_transform,
                adalora,
                init_r,
                target_r,
                tinit,
                tfinal,
                delta_t,
                orth_reg_weight,
                beta1,
                beta2,
                adapter_dtype,
                init,
                rslora,
                dora,
                grad_checkpointing,
                keep_layers,
                seed,
                no_shuffle,
                val_split,
                val_data,
                eval_every,
                optim_resident_mb,
                optim_8bit,
                save_every,
                memory_limit
            ]
        ))
    }

    /// Every choice resolved: the defaults applied and the names parsed.
    pub fn recipe(&self) -> anyhow::Result<TrainRecipe> {
        let o = self;
        let seq_len = o.seq_len.unwrap_or(512);
        let batch_size = o.batch_size.unwrap_or(4);
        anyhow::ensure!(
            seq_len >= 2 && batch_size >= 1,
            "--seq-len must be >= 2 and --batch-size >= 1"
        );
        let seed = o.seed.unwrap_or(42);
        let adapter_dtype = match o.adapter_dtype.as_deref().unwrap_or("bf16") {
            "bf16" => DType::BF16,
            "f32" => DType::F32,
            other => anyhow::bail!("--adapter-dtype `{other}`: expected bf16 or f32"),
        };
        let mut lora = LoraConfig {
            rank: o.rank.unwrap_or(16),
            alpha: o.alpha.unwrap_or(32.0),
            dropout: o.dropout.unwrap_or(0.05),
            targets: parse_targets(o.targets.as_deref().unwrap_or("all-linear"))
                .map_err(anyhow::Error::msg)?,
            use_rslora: o.rslora.unwrap_or(false),
            use_dora: o.dora.unwrap_or(false),
            init: LoraInit::parse(o.init.as_deref().unwrap_or("kaiming"))
                .map_err(anyhow::Error::msg)?,
            dtype: adapter_dtype,
            rank_pattern: parse_pattern(o.rank_pattern.as_deref(), "--rank-pattern", |v| {
                v.parse::<usize>().ok().filter(|&r| r > 0)
            })?,
            alpha_pattern: parse_pattern(o.alpha_pattern.as_deref(), "--alpha-pattern", |v| {
                v.parse::<f64>().ok().filter(|a| a.is_finite())
            })?,
            layers_to_transform: o
                .layers_to_transform
                .as_deref()
                .map(|s| {
                    s.split(',')
                        .map(|x| x.trim().parse::<usize>())
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|_| {
                            anyhow::anyhow!(
                                "--layers-to-transform `{s}`: expected layer indices like 0,1,5"
                            )
                        })
                })
                .transpose()?,
            adalora: o.adalora.unwrap_or(false).then(|| {
                let d = AdaLoraConfig::default();
                AdaLoraConfig {
                    init_r: o.init_r.unwrap_or(d.init_r),
                    target_r: o.target_r.unwrap_or(d.target_r),
                    tinit: o.tinit.unwrap_or(d.tinit),
                    tfinal: o.tfinal.unwrap_or(d.tfinal),
                    delta_t: o.delta_t.unwrap_or(d.delta_t),
                    beta1: o.beta1.unwrap_or(d.beta1),
                    beta2: o.beta2.unwrap_or(d.beta2),
                    orth_reg_weight: o.orth_reg_weight.unwrap_or(d.orth_reg_weight),
                    // The run's steps, set once the data is known.
                    total_step: 0,
                    rank_pattern: None,
                }
            }),
            ..Default::default()
        };
        if let Some(a) = &lora.adalora {
            anyhow::ensure!(
                !lora.use_dora && lora.rank_pattern.is_empty() && lora.alpha_pattern.is_empty(),
                "--adalora cannot be combined with --dora, --rank-pattern or --alpha-pattern"
            );
            lora.rank = a.init_r;
        }
        lora.validate_patterns().map_err(anyhow::Error::msg)?;
        if let Some(mb) = o.optim_resident_mb {
            anyhow::ensure!(
                mb.is_finite() && mb > 0.0,
                "--optim-resident-mb must be a positive number of MiB, not {mb}"
            );
        }
        let recipe = TrainRecipe {
            steps: o.steps,
            epochs: o.epochs.unwrap_or(1),
            batch_size,
            grad_accum: o.grad_accum.unwrap_or(1),
            seq_len,
            lr: o.lr.unwrap_or(2e-4),
            schedule: ScheduleKind::parse(o.lr_scheduler.as_deref().unwrap_or("cosine"))
                .map_err(anyhow::Error::msg)?,
            warmup_steps: o.warmup_steps,
            warmup_ratio: o.warmup_ratio.unwrap_or(0.03),
            weight_decay: o.weight_decay.unwrap_or(0.0),
            max_grad_norm: o.max_grad_norm.unwrap_or(1.0),
            lora_plus_ratio: o.lora_plus_ratio.unwrap_or(1.0),
            lora,
            grad_checkpointing: o.grad_checkpointing.unwrap_or(true) && !o.no_grad_checkpointing,
            keep_layers: o.keep_layers.unwrap_or_default(),
            seed,
            shuffle: !o.no_shuffle.unwrap_or(false),
            validation: match &o.val_data {
                Some(p) => Validation::File(p.clone()),
                None => Validation::Split(o.val_split.unwrap_or(0.05)),
            },
            eval_every: o.eval_every.unwrap_or(0),
            optim_storage: match (o.optim_8bit.unwrap_or(false), o.optim_resident_mb) {
                (true, Some(_)) => {
                    anyhow::bail!("--optim-8bit and --optim-resident-mb cannot be combined yet")
                }
                (true, None) => StateStorage::eight_bit(),
                (false, Some(mb)) => StateStorage::paged((mb * 1048576.0) as usize),
                (false, None) => StateStorage::Plain,
            },
            save_every: o.save_every.unwrap_or(0),
        };
        recipe.validate().map_err(anyhow::Error::msg)?;
        Ok(recipe)
    }
}
