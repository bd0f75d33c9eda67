//! `qlora compare`: the same LoRA training on a 4-bit base and on the full-precision base,
//! side by side.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::model_args::ModelArgs;
use super::train::TrainOptions;
use crate::compare::table::render_table;
use crate::compare::{compare, write_outputs, CompareSpec, CURVES_FILE, REPORT_FILE};
use crate::model::loader::{BaseFormat, LoadOptions};

/// Arguments of `qlora compare`.
#[derive(Args, Debug)]
#[command(
    about = "Train the same adapters on a 4-bit base and on the full-precision base, and compare",
    long_about = "Train the same adapters on a 4-bit (NF4, or FP4 with --quant fp4) base and on \
the full-precision base (--quant none) with identical data, seed and hyperparameters, then \
evaluate on the validation set (--val-data, or --val-split of the training file): each base \
alone, each adapter on its own base, and the 4-bit-trained adapter on the full-precision base.\n\n\
Prints a side-by-side table (validation loss and perplexity, train time, tokens/s, peak memory of \
each phase, quantization error of the base) and writes OUT/compare.json, both runs (adapter, \
metrics.jsonl, loss.svg) under OUT/<quant> and OUT/full, and both runs' train and validation \
curves in OUT/loss.svg. Training options are those of `qlora train` (also from --config).",
    after_help = "Example:\n  qlora compare --model SmolLM2-135M-Instruct.Q4_1.gguf --data data/sonnets/train.txt --val-data data/sonnets/valid.txt --out runs/compare --steps 20 --seq-len 256"
)]
pub struct CompareArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training data: .txt, .jsonl/.json or .parquet, a folder of shards, or a hub dataset
    /// `org/name[@revision][:split]`.
    #[arg(long, value_name = "FILE|DIR|ORG/NAME", value_parser = crate::hub::data_path)]
    pub data: PathBuf,
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// TOML file with training options.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub opts: TrainOptions,
}

/// Run `qlora compare`.
pub fn run(args: CompareArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.model.quant != BaseFormat::Dense,
        "--quant none: compare trains on a 4-bit base and on the full-precision base; give \
         --quant nf4 or fp4 for the 4-bit one"
    );
    anyhow::ensure!(
        args.model.adapter.is_none(),
        "--adapter: compare trains fresh adapters and takes no adapter"
    );
    let opts = args.opts.merged_with(args.config.as_deref())?;
    let mut recipe = opts.recipe()?;
    // The default sequence length is 512, or the model's context when that is shorter.
    if opts.seq_len.is_none() {
        let cfg = crate::plan::presets::resolve_config(&args.model.model.display().to_string())?;
        recipe.seq_len = recipe.seq_len.min(cfg.max_positions());
    }
    anyhow::ensure!(
        recipe.keep_layers != crate::train::layerwise::KeepLayers::Auto,
        "--keep-layers auto: compare trains two bases of different sizes; give a number of layers"
    );
    let spec = CompareSpec {
        model: args.model.model.clone(),
        load: LoadOptions {
            base: args.model.quant,
            blocksize: args.model.blocksize,
            double_quant: !args.model.no_double_quant,
            ..Default::default()
        },
        data: args.data.clone(),
        recipe,
        out: args.out.clone(),
        progress: true,
    };
    let report = compare(&spec, &mut |line| println!("{line}"))
        .with_context(|| format!("comparing on {}", args.model.model.display()))?;
    write_outputs(&report, &args.out)
        .with_context(|| format!("writing the results under {}", args.out.display()))?;
    println!("\n{}", render_table(&report));
    println!(
        "results: {} | curves: {} | runs: {}, {}",
        args.out.join(REPORT_FILE).display(),
        args.out.join(CURVES_FILE).display(),
        report.quant_run.out.display(),
        report.full_run.out.display()
    );
    Ok(())
}
