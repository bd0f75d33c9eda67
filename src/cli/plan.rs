//! `qlora plan`: the memory a training run will need, before running it.

use anyhow::Context;
use candle_core::DType;
use clap::Args;

use crate::device::{parse_compute_dtype, DeviceSpec};
use crate::lora::parse_targets;
use crate::model::loader::BaseFormat;
use crate::plan::presets::{resolve_config, PRESETS};
use crate::plan::rss::total_memory_bytes;
use crate::plan::{
    format_bytes, largest_batch, largest_keep_layers, largest_seq_len, parse_bytes, plan_memory,
    OptimPlan, PlanSettings,
};

/// The GPU memory a CUDA plan is held against unless `--device-memory` says otherwise (a device
/// cannot be queried without the `cuda` feature; 24 GiB is the common consumer card).
const DEFAULT_GPU_MEMORY: usize = 24 << 30;

/// Arguments of `qlora plan`.
#[derive(Args, Debug)]
#[command(
    about = "Print the memory plan of a training run and whether it fits",
    long_about = "Print the memory plan of a QLoRA training run: the frozen base as it is stored \
(NF4 codes + double-quantized scales, embeddings, head), adapters and their gradients, optimizer \
state, activations with or without checkpointing, the loss's logits chunk, and what the device \
adds; whether the peak fits --device-memory, and the longest sequence and largest batch that \
do.\n\nWith --device cpu (the default) the plan is of host memory: f32 Llama steps take the \
fused CPU kernels, plus their per-thread scratch and the process's measured baseline. With \
--device cuda[:N] it is of that GPU's memory: candle's graph in bf16 by default, plus the CUDA \
context, the kernel modules, cuBLAS's workspace and the NF4 dequantization workspace (the \
largest 4-bit weight in the compute dtype); the host memory of a GPU run is not in it. Planning \
for CUDA needs neither a GPU nor a CUDA build; without --device-memory a 24 GiB GPU is assumed. \
The context, modules and cuBLAS figures are documented estimates: no GPU has run this yet.\n\n\
MODEL is a preset (llama-2-7b, llama-3-8b, mistral-7b, qwen2-7b), an HF folder or config.json, \
or a .gguf file (only its metadata is read).",
    after_help = "Examples:\n  qlora plan --model llama-2-7b --seq-len 512 --batch-size 1 --device-memory 8GiB\n  \
qlora plan --model llama-3-8b --device cuda --seq-len 2048 --batch-size 2 --device-memory 24GiB"
)]
pub struct PlanArgs {
    /// Preset name, HF model folder, config.json, .gguf file, or a hub name in the local
    /// Hugging Face cache.
    #[arg(long, value_name = "PATH|PRESET")]
    pub model: String,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// all-linear or a comma list of projections.
    #[arg(long, default_value = "all-linear")]
    pub targets: String,
    /// Activation checkpointing per layer [default: on; `--grad-checkpointing=false` or
    /// `--no-grad-checkpointing` turns it off], as `qlora train` has it.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub grad_checkpointing: Option<bool>,
    /// Turn activation checkpointing off.
    #[arg(long, conflicts_with = "grad_checkpointing")]
    pub no_grad_checkpointing: bool,
    /// With checkpointing: top layers whose graphs are kept instead of recomputed.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_layers: usize,
    /// Optimizer state: plain (f32 m + v), paged (f32, --optim-resident-mb in memory) or 8bit.
    #[arg(long, value_name = "plain|paged|8bit", default_value = "plain")]
    pub optim: String,
    /// Resident budget of paged optimizer state, MiB.
    #[arg(long, default_value_t = 64.0)]
    pub optim_resident_mb: f64,
    /// Device the run trains on: cpu, or cuda[:N] (plans GPU memory; needs no GPU).
    #[arg(long, value_name = "cpu|cuda[:N]", default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceSpec,
    /// Memory available (e.g. 24GiB, 8G, 16GB) [default: this machine's RAM on cpu, 24GiB on
    /// cuda].
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    pub device_memory: Option<usize>,
    /// Base weights: nf4, fp4 or none (full precision).
    #[arg(long, value_name = "nf4|fp4|none", default_value = "nf4", value_parser = BaseFormat::parse)]
    pub quant: BaseFormat,
    /// Blocksize of the 4-bit weights.
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
    /// Keep the absmax in f32 instead of double-quantizing it.
    #[arg(long)]
    pub no_double_quant: bool,
    /// Activations' dtype [default: f32 on cpu, bf16 on cuda].
    #[arg(long, value_name = "f32|bf16|f16", value_parser = parse_compute_dtype)]
    pub compute_dtype: Option<DType>,
    /// Embeddings, head and norms (and a full-precision base) [default: the compute dtype].
    #[arg(long, value_name = "f32|bf16", value_parser = parse_dtype)]
    pub weight_dtype: Option<DType>,
    /// Adapter weights' dtype.
    #[arg(long, value_name = "bf16|f32", default_value = "bf16", value_parser = parse_dtype)]
    pub adapter_dtype: DType,
    /// No LoRA dropout (saves a mask and a masked copy of each adapter input).
    #[arg(long)]
    pub no_dropout: bool,
    /// AdaLoRA adapters of initial rank --rank (their singular values and the rank allocator's
    /// state).
    #[arg(long)]
    pub adalora: bool,
}

fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    DeviceSpec::parse(s).map_err(|e| e.to_string())
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        other => Err(format!("`{other}`: expected f32 or bf16")),
    }
}

/// Run `qlora plan`.
pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let cfg = resolve_config(&args.model).with_context(|| {
        format!(
            "reading the config of `{}` (presets: {})",
            args.model,
            PRESETS.join(", ")
        )
    })?;
    anyhow::ensure!(
        args.seq_len >= 2 && args.batch_size >= 1 && args.rank >= 1,
        "--seq-len must be >= 2, --batch-size and --rank >= 1"
    );
    anyhow::ensure!(
        args.seq_len <= cfg.max_positions(),
        "--seq-len {} is longer than the model's context of {} positions",
        args.seq_len,
        cfg.max_positions()
    );
    anyhow::ensure!(
        args.batch_size <= 1 << 20,
        "--batch-size {} is beyond what any machine trains",
        args.batch_size
    );
    anyhow::ensure!(
        args.optim_resident_mb.is_finite() && args.optim_resident_mb > 0.0,
        "--optim-resident-mb must be a positive number of MiB"
    );
    let optim = match args.optim.as_str() {
        "plain" => OptimPlan::Plain,
        "paged" => OptimPlan::Paged {
            resident_bytes: (args.optim_resident_mb * 1048576.0) as usize,
        },
        "8bit" => OptimPlan::EightBit,
        other => anyhow::bail!("--optim `{other}`: expected plain, paged or 8bit"),
    };
    let compute_dtype = args
        .compute_dtype
        .unwrap_or_else(|| args.device.default_compute_dtype());
    let s = PlanSettings {
        device: args.device,
        seq_len: args.seq_len,
        batch_size: args.batch_size,
        rank: args.rank,
        targets: parse_targets(&args.targets).map_err(anyhow::Error::msg)?,
        dropout: !args.no_dropout,
        adalora: args.adalora,
        grad_checkpointing: args.grad_checkpointing.unwrap_or(true) && !args.no_grad_checkpointing,
        keep_layers: args.keep_layers,
        optim,
        base: args.quant,
        blocksize: args.blocksize,
        double_quant: !args.no_double_quant,
        compute_dtype,
        weight_dtype: args.weight_dtype.unwrap_or(compute_dtype),
        adapter_dtype: args.adapter_dtype,
        ..Default::default()
    };
    let plan = plan_memory(&cfg, &s);
    println!("model {}: {}", args.model, cfg.describe());
    println!("{plan}");
    let limit = match args.device {
        DeviceSpec::Cpu => args.device_memory.or_else(total_memory_bytes),
        DeviceSpec::Cuda(_) => {
            if args.device_memory.is_none() {
                println!("(no --device-memory: a 24 GiB GPU assumed)");
            }
            Some(args.device_memory.unwrap_or(DEFAULT_GPU_MEMORY))
        }
    };
    let limit = match limit {
        Some(l) => l,
        None => {
            println!("(give --device-memory to check the fit)");
            return Ok(());
        }
    };
    println!(
        "{} {} of memory ({:.0}%)",
        if plan.fits(limit) {
            "fits in"
        } else {
            "DOES NOT FIT in"
        },
        format_bytes(limit),
        100.0 * plan.peak as f64 / limit as f64
    );
    let seq_max = cfg.max_positions();
    match largest_seq_len(&cfg, &s, limit, 64, seq_max) {
        Some(t) => println!(
            "longest seq-len that fits at batch {}: {t} (multiples of 64, up to {seq_max})",
            args.batch_size
        ),
        None => println!("no seq-len fits at batch {}", args.batch_size),
    }
    match largest_batch(&cfg, &s, limit, 4096) {
        Some(b) => println!("largest batch that fits at seq-len {}: {b}", args.seq_len),
        None => println!("no batch fits at seq-len {}", args.seq_len),
    }
    if s.grad_checkpointing {
        if let Some(kept) = largest_keep_layers(&cfg, &s, limit) {
            println!(
                "most layers --keep-layers can keep (no recompute) within it: {kept} of {}",
                cfg.layers()
            );
        }
    }
    Ok(())
}
