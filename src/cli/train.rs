//! `qlora train`: fine-tune LoRA adapters on a frozen NF4 (or FP4, or full-precision) base.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::Context;
use candle_core::DType;
use clap::Args;
use serde::Deserialize;

use super::model_args::ModelArgs;
use crate::distributed::Collective;
use crate::lora::adalora::AdaLoraConfig;
use crate::lora::{parse_targets, LoraConfig, LoraInit};
use crate::model::classifier::{ClassifierConfig, SequenceClassifier};
use crate::model::loader::BaseFormat;
use crate::model::loader::LoadedModel;
use crate::model::transformer::Model;
use crate::optim::schedule::ScheduleKind;
use crate::optim::StateStorage;
use crate::peft;
use crate::train::checkpoint::check_checkpoint_dir;
use crate::train::layerwise::KeepLayers;
use crate::train::recipe::{TrainRecipe, Validation};
use crate::train::trainer::{check_output_dir, train};

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

/// Arguments of `qlora train`.
#[derive(Args, Debug)]
#[command(
    about = "Fine-tune LoRA adapters on a frozen 4-bit (NF4) base",
    long_about = "Fine-tune LoRA adapters on a frozen 4-bit (NF4) base model.\n\n\
Defaults are those of a 7B QLoRA: NF4 + double quantization, r 16, alpha 32, all linear \
projections, lr 2e-4 with cosine decay and 3% warmup, activation checkpointing on. Every option \
can also be set in a TOML file given with --config (keys are the flag names, e.g. `lr = 1e-4`, \
`lr-scheduler = \"linear\"`); flags win over the file.\n\n\
Writes OUT/metrics.jsonl (one JSON line per step and per validation), OUT/loss.svg and the \
adapter in PEFT format under OUT/adapter.",
    after_help = "Example:\n  qlora train --model SmolLM2-135M-Instruct.Q4_1.gguf --data data/sonnets/train.txt --out runs/sonnets --steps 60 --seq-len 256"
)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training data: .txt, .jsonl/.json or .parquet, a folder of shards, or a hub dataset
    /// `org/name[@revision][:split]`.
    #[arg(long, value_name = "FILE|DIR|ORG/NAME", value_parser = crate::hub::data_path)]
    pub data: PathBuf,
    /// Output folder (must not hold an adapter yet).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// TOML file with training options.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Start from this PEFT adapter instead of fresh adapters.
    #[arg(long, value_name = "DIR")]
    pub init_adapter: Option<PathBuf>,
    /// Continue exactly from a checkpoint folder (OUT/checkpoint-N) written by an earlier run
    /// with the same options.
    #[arg(long, value_name = "DIR", conflicts_with = "init_adapter")]
    pub resume: Option<PathBuf>,
    /// causal-lm (next-token prediction) or seq-cls (sequence classification) [default: what
    /// the checkpoint is: seq-cls for a *ForSequenceClassification model]. seq-cls on a model
    /// without a classification head adds one, initialised as transformers does.
    #[arg(long, value_name = "causal-lm|seq-cls", value_parser = ["causal-lm", "seq-cls"])]
    pub task: Option<String>,
    /// Classes of a new classification head (1: regression by mean squared error).
    #[arg(long, value_name = "N")]
    pub num_labels: Option<usize>,
    /// Names of the classes of a new head, in class-index order (`negative,positive`); string
    /// labels in the data are these names.
    #[arg(long, value_name = "A,B,...", value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
    #[command(flatten)]
    pub opts: TrainOptions,
    /// Time the parts of every step (base and adapter products, attention, norms, loss head,
    /// optimizer, the rest) and print the step-time budget at the end.
    #[arg(long)]
    pub profile: bool,
    /// Data-parallel training, one process per rank as a launcher started them: `mpirun -np N
    /// qlora train --distributed ...` on CPU hosts (MPI; binary built with `--features mpi`), one
    /// process per GPU on CUDA (NCCL; `--features nccl`; the GPU is the launcher's local rank).
    /// Each rank trains on --batch-size rows of every step, so a step covers N x batch-size
    /// rows; only rank 0 writes and prints.
    #[arg(long)]
    pub distributed: bool,
}

/// Join the data-parallel job when `--distributed` asks for it: the collective, and the device
/// this rank computes on. A rank other than 0 prints nothing on standard output from here on
/// (errors still reach standard error).
fn join_job(args: &mut TrainArgs) -> anyhow::Result<Rc<dyn Collective>> {
    if !args.distributed {
        return Ok(Rc::new(crate::distributed::Single));
    }
    let (collective, device) = crate::distributed::connect(args.model.device)?;
    args.model.device = device;
    if collective.rank() != 0 {
        silence_stdout()?;
    } else {
        println!(
            "distributed: {} ranks over {}, {} on rank 0",
            collective.world_size(),
            collective.engine(),
            device
        );
    }
    Ok(collective)
}

/// Send this process's standard output to /dev/null.
fn silence_stdout() -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .context("opening /dev/null")?;
    // SAFETY: dup2 onto the process's own stdout descriptor with a valid open descriptor.
    if unsafe { libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO) } < 0 {
        anyhow::bail!(
            "redirecting standard output: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Put a new classification head on `m` when `--task seq-cls` asks for one (and check the
/// options against a head the checkpoint has).
fn prepare_task(args: &TrainArgs, m: &mut LoadedModel, seed: u64) -> anyhow::Result<()> {
    let has_head = m.model.classifier().is_some();
    match args.task.as_deref() {
        Some("causal-lm") if has_head => anyhow::bail!(
            "--task causal-lm: {} is a sequence classifier ({} labels)",
            args.model.model.display(),
            m.model.classifier().map_or(0, |c| c.num_labels())
        ),
        Some("seq-cls") if !has_head => {
            let config = match (&args.labels, args.num_labels) {
                (Some(names), n) => {
                    anyhow::ensure!(
                        n.is_none_or(|n| n == names.len()),
                        "--labels names {} classes, --num-labels says {}",
                        names.len(),
                        n.unwrap_or(0)
                    );
                    let mut c = ClassifierConfig::with_num_labels(names.len());
                    c.labels = names.clone();
                    c
                }
                (None, Some(n)) => ClassifierConfig::with_num_labels(n),
                (None, None) => anyhow::bail!(
                    "--task seq-cls on a model without a classification head needs --num-labels N \
                     (or --labels A,B,...)"
                ),
            };
            anyhow::ensure!(!config.labels.is_empty(), "--num-labels must be at least 1");
            let (module, bias, range, dropout) = match &m.model {
                Model::Bert(b) => (
                    "classifier",
                    true,
                    b.cfg.initializer_range,
                    b.cfg.classifier_dropout,
                ),
                _ => ("score", false, 0.02, 0.0),
            };
            let hidden = m.model.info().hidden_size;
            let mut head = SequenceClassifier::init(
                module,
                hidden,
                bias,
                config,
                range,
                seed,
                m.model.device(),
            )?;
            head.dropout = dropout;
            m.model.set_classifier(Some(head))?;
        }
        _ if has_head && (args.num_labels.is_some() || args.labels.is_some()) => anyhow::bail!(
            "--num-labels / --labels describe a new head, and {} has one already",
            args.model.model.display()
        ),
        _ => {}
    }
    Ok(())
}

macro_rules! merge {
    ($cli:expr, $file:expr, [$($f:ident),*]) => {
        TrainOptions { $($f: $cli.$f.take().or($file.$f.take()),)* no_grad_checkpointing: false }
    };
}

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

/// A flag set by the first Ctrl-C (the trainer then saves a checkpoint and stops); a second
/// Ctrl-C exits at once.
fn interrupt_flag() -> anyhow::Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    ctrlc::set_handler(move || {
        if f.swap(true, Ordering::Relaxed) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit now)");
    })
    .context("installing the Ctrl-C handler")?;
    Ok(flag)
}

/// Refuse an `--out` folder that holds an earlier run (its adapter, metrics, curves or
/// checkpoints), so nothing of it is overwritten or mixed; `--resume` continues one.
fn refuse_earlier_run(out: &Path) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(());
    };
    let mut found: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            matches!(
                n.as_str(),
                "adapter" | "metrics.jsonl" | "loss.svg" | "loss.png" | "labels.json"
            ) || n.starts_with("checkpoint-")
        })
        .collect();
    if found.is_empty() {
        return Ok(());
    }
    found.sort();
    let last = found
        .iter()
        .filter_map(|n| n.strip_prefix("checkpoint-")?.parse::<usize>().ok())
        .max();
    let hint = match last {
        Some(n) => format!(
            "; continue it with --resume {}",
            out.join(format!("checkpoint-{n}")).display()
        ),
        None => String::new(),
    };
    anyhow::bail!(
        "{} holds an earlier run ({}); choose another --out{hint}",
        out.display(),
        found.join(", ")
    )
}

/// Run `qlora train`.
pub fn run(mut args: TrainArgs) -> anyhow::Result<()> {
    let opts = std::mem::take(&mut args.opts).merged_with(args.config.as_deref())?;
    let mut recipe = opts.recipe()?;
    let collective = join_job(&mut args)?;
    // Only rank 0 writes: the others neither check nor touch --out (rank 0 may already be
    // writing in it).
    if args.resume.is_none() && collective.writes() {
        refuse_earlier_run(&args.out)?;
    }
    if let Some(dir) = &args.resume {
        check_checkpoint_dir(dir)?;
    }
    // Fail on an unusable --out now, not after loading the model and the data.
    if collective.writes() {
        check_output_dir(&args.out)?;
    }
    let memory_limit = opts
        .memory_limit
        .as_deref()
        .map(crate::plan::parse_bytes)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--memory-limit {e}"))?;
    // On the CPU the machine's memory is the limit unless one is given: a run planned past it
    // would end in the allocator, not in a message.
    let memory_limit = memory_limit.or_else(|| {
        (args.model.device == crate::device::DeviceSpec::Cpu)
            .then(crate::plan::rss::total_memory_bytes)
            .flatten()
    });
    // Planned from the config alone, so an oversized run is refused before anything loads.
    let plan = {
        let cfg = crate::plan::presets::resolve_config(&args.model.model.display().to_string())?;
        // The default sequence length is 512, or the model's context when that is shorter.
        if opts.seq_len.is_none() {
            recipe.seq_len = recipe.seq_len.min(cfg.max_positions());
        }
        anyhow::ensure!(
            recipe.seq_len <= cfg.max_positions(),
            "--seq-len {} is longer than the model's context of {} positions (its config's \
             max_position_embeddings / n_positions)",
            recipe.seq_len,
            cfg.max_positions()
        );
        let mut plan_settings = crate::plan::PlanSettings {
            seq_len: recipe.seq_len,
            batch_size: recipe.batch_size,
            rank: recipe.lora.rank,
            targets: recipe.lora.targets.clone(),
            rank_pattern: recipe.lora.rank_pattern.clone(),
            layers_to_transform: recipe.lora.layers_to_transform.clone(),
            adalora: recipe.lora.adalora.is_some(),
            dropout: recipe.lora.dropout > 0.0,
            grad_checkpointing: recipe.grad_checkpointing,
            keep_layers: recipe.keep_layers.count(),
            base: args.model.quant,
            blocksize: args.model.blocksize,
            double_quant: !args.model.no_double_quant,
            adapter_dtype: recipe.lora.dtype,
            ..crate::plan::PlanSettings::for_device(args.model.device, args.model.compute_dtype)
        };
        let (optim_8bit, optim_resident_mb) =
            (opts.optim_8bit.unwrap_or(false), opts.optim_resident_mb);
        if recipe.keep_layers == KeepLayers::Auto {
            let limit = memory_limit.context(
            "--keep-layers auto keeps as many layers as --memory-limit SIZE allows; give the limit",
        )?;
            let n = crate::plan::most_kept_layers(
                &cfg,
                &plan_settings,
                optim_8bit,
                optim_resident_mb,
                limit,
            );
            println!(
            "--keep-layers auto: the top {n} of {} layers keep their activations within --memory-limit {}",
            cfg.layers(),
            crate::plan::format_bytes(limit)
        );
            recipe.keep_layers = KeepLayers::Count(n);
            plan_settings.keep_layers = n;
        }
        let plan = crate::plan::plan_for_training(
            &cfg,
            &plan_settings,
            optim_8bit,
            optim_resident_mb,
            memory_limit,
        )
        .with_context(|| {
            if opts.memory_limit.is_none() {
                "the limit is this machine's memory (MemTotal); a larger --memory-limit overrides it"
                    .to_string()
            } else {
                "checking the memory plan".to_string()
            }
        })?;
        println!("{plan}");
        Some(plan)
    };
    let (seq_len, batch_size) = (recipe.seq_len, recipe.batch_size);

    let mut m = args.model.load(Some(seq_len))?;

    prepare_task(&args, &mut m, recipe.seed)?;
    let init_from = args
        .resume
        .as_ref()
        .map(|d| d.join("adapter"))
        .or(args.init_adapter.clone());
    let adapter_dtype = recipe.lora.dtype;
    let lora_cfg = match &init_from {
        Some(dir) => peft::load_adapter(&mut m.model, dir, Some(adapter_dtype)).with_context(
            || match &args.resume {
                Some(r) => format!("loading the adapter of --resume {}", r.display()),
                None => format!("loading --init-adapter {}", dir.display()),
            },
        )?,
        None => {
            peft::attach_new(&mut m.model, &recipe.lora, recipe.seed)?;
            recipe.lora.clone()
        }
    };
    let data = recipe.load_data(&m, &args.data)?;
    println!("train data: {}", data.train_report);
    let plan = plan.map(|p| {
        // The plan covers the model and one step; the tokenized data stay in memory beside it.
        let data_bytes = data.resident_bytes();
        println!(
            "tokenized data in memory {} (planned peak with it {})",
            crate::plan::format_bytes(data_bytes),
            crate::plan::format_bytes(p.peak + data_bytes)
        );
        (p.peak, data_bytes)
    });
    if let Some(limit) = memory_limit {
        let limit_name = if opts.memory_limit.is_some() {
            "--memory-limit"
        } else {
            "the machine's memory"
        };
        if let Some((peak, data_bytes)) = plan.filter(|(p, d)| p + d > limit) {
            anyhow::bail!(
                "the planned peak memory {} plus the tokenized data {} is {}, over {limit_name} \
                 {}; train on a smaller --data or raise --memory-limit",
                crate::plan::format_bytes(peak),
                crate::plan::format_bytes(data_bytes),
                crate::plan::format_bytes(peak + data_bytes),
                crate::plan::format_bytes(limit),
            );
        }
        // Tokenizing holds a record's tokens in several forms at once: the peak so far counts.
        if let Some(loaded) = crate::plan::rss::peak_rss_bytes().filter(|&p| p > limit) {
            anyhow::bail!(
                "loading the model and the data already peaked at {}, over {limit_name} {}; \
                 train on a smaller --data (or split its longest records) or raise --memory-limit",
                crate::plan::format_bytes(loaded),
                crate::plan::format_bytes(limit),
            );
        }
    }
    if let Some(v) = &data.val_report {
        println!("validation data: {v}");
    }
    if let Some(note) = &data.note {
        println!("note: {note}");
    }
    let (mut train_batches, val_batches) = (data.train, data.val);
    let mut settings = recipe.settings(&train_batches);
    if let (Some(a), Some(_)) = (&lora_cfg.adalora, &init_from) {
        anyhow::ensure!(
            a.rank_pattern.is_none(),
            "--init-adapter: this AdaLoRA adapter's ranks are already pruned (it has a \
             rank_pattern); training it further is not supported"
        );
        if a.total_step != settings.steps {
            println!(
                "note: the AdaLoRA adapter's total_step is {}, this run takes {} steps; its \
                 budget schedule follows total_step",
                a.total_step, settings.steps
            );
        }
    }
    settings.resume = args.resume.clone();
    settings.run_options = recipe.run_options(&args.data, &format!("{:?}", args.model.quant));
    settings.stop = Some(interrupt_flag()?);
    settings.profile = args.profile;
    // A step's rows depend on the number of ranks: a checkpoint resumes only with as many.
    settings
        .run_options
        .insert("world_size".into(), collective.world_size().to_string());
    settings.collective = collective;
    let (steps, lr, kind, warmup) = (
        settings.steps,
        recipe.lr,
        recipe.schedule,
        settings.schedule.warmup,
    );
    let trainable: usize = peft::trainable_vars(&m.model)
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    println!(
        "model {} | base {} | {} layers | adapters r {} alpha {} on {} ({} trainable parameters, {})",
        args.model.model.display(),
        if args.model.quant == BaseFormat::Dense { "full precision".to_string() } else { args.model.quant.name().to_string() },
        m.model.num_layers(),
        lora_cfg.rank,
        lora_cfg.alpha,
        lora_cfg.targets.join(","),
        trainable,
        if adapter_dtype == DType::BF16 { "bf16" } else { "f32" },
    );
    println!(
        "{} train batches of {batch_size} x {seq_len} per epoch, {} validation batches | {steps} steps, lr {lr:e} {:?}, warmup {warmup}, checkpointing {}",
        train_batches.batches_in_epoch(0),
        val_batches.len(),
        kind,
        settings.checkpointing()
    );
    let report = train(
        &mut m.model,
        &lora_cfg,
        &args.model.model.display().to_string(),
        &mut train_batches,
        &val_batches,
        &settings,
        &args.out,
    )?;
    if let Some(peak) = crate::plan::rss::peak_rss_bytes() {
        match &plan {
            Some((planned, data_bytes)) => println!(
                "peak memory {} (planned {})",
                crate::plan::format_bytes(peak),
                crate::plan::format_bytes(planned + data_bytes)
            ),
            None => println!("peak memory {}", crate::plan::format_bytes(peak)),
        }
    }
    if let Some(budget) = &report.budget {
        println!("{budget}");
    }
    let first = report.losses.first().copied().unwrap_or(f64::NAN);
    let last = report.losses.last().copied().unwrap_or(f64::NAN);
    println!(
        "done: {} steps in {:.1} s ({:.0} tokens/s) | train loss {first:.4} -> {last:.4}",
        report.steps, report.seconds, report.tokens_per_s
    );
    let accuracy = (report.val_accuracy.first(), report.val_accuracy.last());
    if let (Some(a), Some(b), (Some(x), Some(y))) = (
        report.val_losses.first(),
        report.val_losses.last(),
        accuracy,
    ) {
        println!(
            "validation loss {:.4} -> {:.4} | accuracy {:.4} -> {:.4} (curve: {}, .png)",
            a.1,
            b.1,
            x.1,
            y.1,
            args.out.join("accuracy.svg").display()
        );
    } else if let (Some(a), Some(b)) = (report.val_losses.first(), report.val_losses.last()) {
        println!(
            "validation loss {:.4} (ppl {:.2}) -> {:.4} (ppl {:.2})",
            a.1,
            a.1.exp(),
            b.1,
            b.1.exp()
        );
    }
    if report.interrupted {
        let last = report
            .checkpoints
            .last()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        println!("interrupted: continue with --resume {last}");
        // An interrupted run is not a finished one: exit as a process stopped by SIGINT does.
        std::process::exit(130);
    }
    println!(
        "adapter: {} | metrics: {} | curve: {} (and .png)",
        report
            .adapter_dir
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        args.out.join("metrics.jsonl").display(),
        args.out.join("loss.svg").display()
    );
    Ok(())
}
