//! `qlora train`: fine-tune LoRA adapters on a frozen NF4 (or FP4, or full-precision) base.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::Context;
use candle_core::DType;
use clap::Args;

use super::model_args::ModelArgs;
pub use super::train_options::TrainOptions;
use crate::distributed::Collective;
use crate::model::classifier::{ClassifierConfig, SequenceClassifier};
use crate::model::loader::BaseFormat;
use crate::model::loader::LoadedModel;
use crate::model::transformer::Model;
use crate::peft;
use crate::train::checkpoint::check_checkpoint_dir;
use crate::train::layerwise::KeepLayers;
use crate::train::trainer::{check_output_dir, train};

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
