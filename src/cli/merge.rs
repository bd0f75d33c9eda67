//! `qlora merge`: a base model + a PEFT adapter in, one merged model out (HF safetensors
//! folder, optionally re-quantized to NF4, or a GGUF file for llama.cpp).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::DType;
use clap::Args;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use super::quantize::{parse_size, QuantArg};
use crate::data::dataset::read_token_sequences;
use crate::export::{
    compare_requantized, export_loaded, load_for_merge, parse_dtype, ExportFormat, ExportOptions,
    ExportProgress, GgufType, MergeBase,
};

/// Arguments of `qlora merge`.
#[derive(Args, Debug)]
#[command(
    about = "Merge a LoRA/DoRA adapter into its base model and export it (safetensors or GGUF)",
    long_about = "Merge a LoRA/DoRA adapter into its base model and export it.\n\n\
LoRA adapters are folded in as W' = W0 + (alpha/r)·B·A; DoRA adapters as \
W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖ (row norms), as PEFT's merge_and_unload does.\n\n\
Bases (--base):\n  \
dequantized (default)  W0 is the 4-bit (NF4 or FP4, --quant) weight the adapter was trained \
against, dequantized: the correct QLoRA export; the merged model reproduces base + adapter.\n  \
original               W0 is the model's original 16/32-bit weight. Not possible from a \
bitsandbytes 4-bit checkpoint (its original weights are gone). The adapter learned to correct the \
4-bit base, so this is only right for adapters trained on a full-precision base.\n\n\
Formats (--format):\n  \
safetensors (default)  HF folder: config.json (without quantization_config), model.safetensors \
or model-0000i-of-0000n.safetensors + model.safetensors.index.json past --max-shard-size, and the \
tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json, \
generation_config.json, chat templates). Tensors in --dtype.\n  \
gguf                   OUT/model.gguf for llama.cpp: llama.cpp tensor names, q/k rows permuted \
for its RoPE layout, llama.* hyperparameters, the tokenizer (byte-level BPE) and chat template. \
Matrices in --gguf-type (default: --dtype), norms in F32.\n\n\
--requantize quantizes the merged linear weights back to NF4/FP4 in the bitsandbytes layout \
(loadable by transformers and by qlora). Rounding to 4 bits again changes the outputs; with \
--eval-data the perplexity of the merged dense model and of the re-quantized one are measured \
and printed.\n\n\
OUT must not exist; it is written under a temporary name beside it and renamed at the end, so a \
failed export leaves nothing behind.",
    after_help = "Examples:\n  \
qlora merge --model ./SmolLM2-135M --adapter runs/sonnets/adapter --out merged\n  \
qlora merge --model model.gguf --adapter adapter --out merged-gguf --format gguf --gguf-type q8_0\n  \
qlora merge --model ./tiny --adapter adapter --out merged-nf4 --requantize --eval-data valid.txt"
)]
pub struct MergeArgs {
    /// Base model: HF folder (safetensors or bitsandbytes 4-bit), a .gguf file, or a hub name
    /// `org/name[@revision]` in the local Hugging Face cache.
    #[arg(long, value_name = "PATH|ORG/NAME", value_parser = crate::hub::model_path)]
    pub model: PathBuf,

    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub adapter: PathBuf,

    /// Folder to create; must not exist yet.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Weights to merge into: dequantized (the 4-bit base the adapter trained on) or original.
    #[arg(long, value_name = "dequantized|original", default_value = "dequantized", value_parser = MergeBase::parse)]
    pub base: MergeBase,

    /// 4-bit code the adapter was trained against (with --base dequantized, and --requantize).
    #[arg(long, value_enum, default_value_t = QuantArg::Nf4)]
    pub quant: QuantArg,

    /// Blocksize of that quantization.
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,

    /// The base was quantized without double quantization of the absmax.
    #[arg(long)]
    pub no_double_quant: bool,

    /// Dtype of the written tensors.
    #[arg(long, value_name = "bf16|f16|f32", default_value = "bf16", value_parser = parse_dtype)]
    pub dtype: DType,

    /// Output format.
    #[arg(long, value_name = "safetensors|gguf", default_value = "safetensors", value_parser = ExportFormat::parse)]
    pub format: ExportFormat,

    /// Split safetensors output into shards past this much tensor data (5GB, 500MB, 2GiB).
    #[arg(long, value_name = "SIZE", default_value = "5GB", value_parser = parse_size)]
    pub max_shard_size: u64,

    /// GGUF type of the matrices: f32, f16, bf16 or q8_0 (default: follows --dtype).
    #[arg(long, value_name = "f32|f16|bf16|q8_0", value_parser = GgufType::parse)]
    pub gguf_type: Option<GgufType>,

    /// Quantize the merged linear weights back to 4-bit (bitsandbytes layout; safetensors only).
    #[arg(long)]
    pub requantize: bool,

    /// With --requantize: measure perplexity of the merged dense and re-quantized models here.
    #[arg(long, value_name = "FILE", requires = "requantize")]
    pub eval_data: Option<PathBuf>,

    /// Window length for --eval-data.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
}

/// Run `qlora merge`.
pub fn run(args: MergeArgs) -> anyhow::Result<()> {
    let opts = ExportOptions {
        base: args.base,
        quant: args.quant.into(),
        blocksize: args.blocksize,
        double_quant: !args.no_double_quant,
        dtype: args.dtype,
        format: args.format,
        max_shard_bytes: args.max_shard_size,
        gguf_type: args.gguf_type,
        requantize: args.requantize,
    };
    anyhow::ensure!(
        !args.out.exists(),
        "output folder {} already exists; remove it or choose another --out",
        args.out.display()
    );
    let started = Instant::now();
    let loaded = load_for_merge(&args.model, &args.adapter, &opts).with_context(|| {
        format!(
            "loading {} with the adapter {}",
            args.model.display(),
            args.adapter.display()
        )
    })?;
    // The evaluation data is read before anything is written, so a bad file costs no export.
    let eval_seqs = args
        .eval_data
        .as_ref()
        .map(|data| {
            read_token_sequences(data, loaded.tokenizer.as_ref())
                .with_context(|| format!("reading --eval-data {}", data.display()))
        })
        .transpose()?;
    for caveat in loaded
        .model
        .as_llama()
        .map(|l| crate::export::caveats(&l.cfg, &opts))
        .unwrap_or_default()
    {
        eprintln!("warning: {caveat}");
    }
    if args.requantize {
        eprintln!(
            "warning: --requantize rounds the merged weights to 4 bits again; the result's outputs \
             differ from base + adapter (use --eval-data FILE to measure by how much)"
        );
    }
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{spinner} [{elapsed}] {bar:30} {pos}/{len} tensors  {msg}")
            .context("progress bar template")?,
    );
    let report = export_loaded(&loaded, &args.out, &opts, &mut |event| match event {
        ExportProgress::Started { tensors } => bar.set_length(tensors as u64),
        ExportProgress::Tensor { name } => {
            bar.set_message(name.to_string());
            bar.inc(1);
        }
        ExportProgress::Writing => bar.set_message("committing"),
    });
    bar.finish_and_clear();
    let report = report.with_context(|| format!("exporting into {}", args.out.display()))?;
    println!(
        "Merged {} adapted projections; wrote {} tensors, {} of tensor data, in {:.1} s to {}: {}",
        report.merged,
        report.tensors,
        HumanBytes(report.tensor_bytes),
        started.elapsed().as_secs_f64(),
        report.out.display(),
        report.files.join(", ")
    );
    if report.requantized > 0 {
        println!(
            "  {} linear weights re-quantized to {}",
            report.requantized,
            crate::quant::QuantType::from(args.quant).name()
        );
    }
    if let (Some(data), Some(seqs)) = (&args.eval_data, &eval_seqs) {
        let (dense, requant) = compare_requantized(loaded, &report.out, &opts, seqs, args.seq_len)
            .context("evaluating the merged and re-quantized models")?;
        println!(
            "  perplexity on {} ({} tokens): merged dense {:.3} (NLL {:.4}), re-quantized {:.3} (NLL {:.4})",
            data.display(),
            dense.tokens,
            dense.perplexity,
            dense.mean_nll,
            requant.perplexity,
            requant.mean_nll
        );
    }
    Ok(())
}
