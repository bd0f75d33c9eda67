//! `qlora quantize`: an HF model folder in, a bitsandbytes 4-bit model folder out.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use crate::model::quantize::{quantize_model_dir, QuantizeOptions, QuantizeProgress};
use crate::quant::QuantType;

/// The 4-bit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum QuantArg {
    /// NormalFloat4: quantiles of N(0, 1), the QLoRA default.
    Nf4,
    /// 4-bit float (1 sign, 2 exponent, 1 mantissa bit).
    Fp4,
}

impl From<QuantArg> for QuantType {
    fn from(q: QuantArg) -> Self {
        match q {
            QuantArg::Nf4 => QuantType::Nf4,
            QuantArg::Fp4 => QuantType::Fp4,
        }
    }
}

/// Arguments of `qlora quantize`.
#[derive(Args, Debug)]
#[command(
    about = "Quantize an HF model folder to a bitsandbytes 4-bit (NF4/FP4) checkpoint",
    long_about = "Quantize an HF model folder to a bitsandbytes 4-bit (NF4/FP4) checkpoint.\n\n\
Reads config.json and model.safetensors (or the shards listed in model.safetensors.index.json), \
quantizes the linear weights of every decoder layer (self_attn.{q,k,v,o}_proj and \
mlp.{gate,up,down}_proj) and keeps embeddings, norms, lm_head and biases in their stored dtype. \
The output folder has the layout transformers + bitsandbytes write for a 4-bit model \
(weight, weight.absmax, weight.quant_map, weight.nested_absmax, weight.nested_quant_map, \
weight.quant_state.bitsandbytes__nf4; config.json with a quantization_config block), bit-exact \
with bitsandbytes' CPU quantizer, so transformers loads it as a pre-quantized model. Tokenizer \
files, generation_config.json and chat templates (*.jinja, *.txt) are copied.\n\n\
Input weights may be F32, BF16 or F16. The input is memory-mapped and quantized one tensor at a \
time: peak memory is about one f32 weight plus the 4-bit output of one shard. The output is \
built in a hidden temporary folder next to --out and renamed at the end; --out must not exist, \
and a failed run leaves nothing behind.",
    after_help = "Example:\n  qlora quantize --model ./Llama-3.2-1B --out ./Llama-3.2-1B-nf4"
)]
pub struct QuantizeArgs {
    /// HF model folder to read (config.json + model.safetensors, or a sharded checkpoint), or a
    /// hub name `org/name[@revision]` in the local Hugging Face cache.
    #[arg(long, value_name = "DIR|ORG/NAME", value_parser = crate::hub::model_path)]
    pub model: PathBuf,

    /// Folder to create for the 4-bit model; must not exist yet (parents are created).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// 4-bit code (written as bnb_4bit_quant_type).
    #[arg(long, value_enum, default_value_t = QuantArg::Nf4)]
    pub quant: QuantArg,

    /// Weights per absmax block: 32, 64, 128, 256, 512, 1024, 2048 or 4096. transformers always
    /// uses 64; other sizes are recorded in each weight's quant state, which bitsandbytes reads.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub blocksize: usize,

    /// Store the per-block absmax as f32 instead of double-quantizing it to 8 bits (saves
    /// ~0.37 bits per weight when on; written as bnb_4bit_use_double_quant).
    #[arg(long)]
    pub no_double_quant: bool,

    /// Split the output into model-0000i-of-0000n.safetensors shards (plus an index) past this
    /// much tensor data, e.g. 5GB, 500MB, 2GiB; a smaller model is one model.safetensors.
    /// Also bounds peak memory, since a shard is assembled in memory before it is written.
    #[arg(long, value_name = "SIZE", default_value = "5GB", value_parser = parse_size)]
    pub max_shard_size: u64,
}

/// Run `qlora quantize`.
pub fn run(args: QuantizeArgs) -> anyhow::Result<()> {
    let options = QuantizeOptions {
        quant_type: args.quant.into(),
        blocksize: args.blocksize,
        double_quant: !args.no_double_quant,
        max_shard_bytes: args.max_shard_size,
    };
    let started = Instant::now();
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{spinner} [{elapsed}] {bar:30} {pos}/{len} tensors  {msg}")
            .context("progress bar template")?,
    );
    let report = quantize_model_dir(&args.model, &args.out, &options, &mut |event| match event {
        QuantizeProgress::Started { tensors } => bar.set_length(tensors as u64),
        QuantizeProgress::Tensor { name, .. } => {
            bar.set_message(name.to_string());
            bar.inc(1);
        }
        QuantizeProgress::Writing => bar.set_message("writing"),
    });
    bar.finish_and_clear();
    let report = report.with_context(|| {
        format!(
            "quantizing {} into {}",
            args.model.display(),
            args.out.display()
        )
    })?;

    let ratio = report.bytes_in as f64 / report.bytes_out.max(1) as f64;
    println!(
        "Quantized {} linear weights to {} (blocksize {}, double quant {}), copied {} tensors as they were.",
        report.quantized,
        QuantType::from(args.quant).name(),
        options.blocksize,
        if options.double_quant { "on" } else { "off" },
        report.copied,
    );
    println!(
        "  input  {} of tensors\n  output {} of tensors ({ratio:.2}x smaller) in {}: {}",
        HumanBytes(report.bytes_in),
        HumanBytes(report.bytes_out),
        report.out.display(),
        report.weight_files.join(", "),
    );
    if !report.copied_files.is_empty() {
        println!("  copied {}", report.copied_files.join(", "));
    }
    println!(
        "  compute dtype {}; done in {:.1} s",
        report.compute_dtype,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Parse a size like `5GB`, `500MB`, `2GiB` or a plain byte count (decimal units as in
/// transformers' `max_shard_size`, binary with `i`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 5GB, 500MB, 2GiB, 1000000)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            ))
        }
    };
    let bytes = number * scale as f64;
    if !(bytes >= 1.0 && bytes.is_finite()) {
        return Err(format!("size `{text}` must be at least one byte"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5kb"), Ok(1500));
        assert_eq!(parse_size("123"), Ok(123));
        // The CLI's default must be the library's.
        assert_eq!(
            parse_size("5GB").ok(),
            Some(crate::model::shard_writer::DEFAULT_MAX_SHARD_BYTES)
        );
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("GB").is_err());
    }
}
