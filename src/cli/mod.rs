//! Command-line subcommands (one file each); each only parses and calls the library.

use clap::{Parser, Subcommand};

pub mod classify;
pub mod compare;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod merge;
pub mod model_args;
pub mod plan;
pub mod quantize;
pub mod train;
pub mod train_options;

/// QLoRA fine-tuning in Rust: NF4 + double-quantized frozen base, 16-bit LoRA adapters.
#[derive(Parser, Debug)]
#[command(
    name = "qlora",
    version,
    about = "QLoRA fine-tuning in Rust: a frozen 4-bit (NF4) base model with 16-bit LoRA adapters",
    long_about = "QLoRA fine-tuning in Rust: a frozen 4-bit (NF4) base model with 16-bit LoRA \
adapters.\n\nModels are Hugging Face folders (config.json + safetensors) or GGUF files; 4-bit \
checkpoints use the bitsandbytes layout, bit-exact, and adapters PEFT's format, so both \
interoperate with transformers + bitsandbytes + PEFT.\n\n\
Run `qlora <COMMAND> --help` for the options of each command."
)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Quantize an HF model folder to a bitsandbytes 4-bit (NF4/FP4) checkpoint.
    Quantize(quantize::QuantizeArgs),
    /// Fine-tune LoRA adapters on a frozen 4-bit base.
    Train(Box<train::TrainArgs>),
    /// Train the same adapters on a 4-bit and on the full-precision base, and compare.
    Compare(Box<compare::CompareArgs>),
    /// Mean token NLL and perplexity of a model (and adapter) on a dataset.
    Eval(eval::EvalArgs),
    /// Generate text with a model (and adapter), streaming tokens.
    Generate(generate::GenerateArgs),
    /// Show what a model folder, 4-bit checkpoint, GGUF file or adapter holds.
    Inspect(inspect::InspectArgs),
    /// Print the memory plan of a training run and whether it fits.
    Plan(plan::PlanArgs),
    /// Merge an adapter into its base model and export it (safetensors or GGUF).
    Merge(merge::MergeArgs),
    /// Classify each record of a dataset with a classification model (JSONL predictions).
    Classify(classify::ClassifyArgs),
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every boolean option of every subcommand is a switch: `--flag` alone parses (a value,
    /// where one is accepted at all, only as `--flag=false`).
    #[test]
    fn boolean_options_are_switches() {
        let cli = Cli::command();
        let mut checked = 0;
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                let is_bool = arg.get_value_parser().type_id()
                    == clap::builder::ValueParser::bool().type_id();
                let takes_none = matches!(
                    arg.get_action(),
                    clap::ArgAction::SetTrue | clap::ArgAction::SetFalse
                );
                if !(is_bool || takes_none) {
                    continue;
                }
                checked += 1;
                let min_values = arg.get_num_args().map_or(0, |n| n.min_values());
                assert!(
                    takes_none || min_values == 0,
                    "`qlora {} --{long}` demands a value",
                    sub.get_name()
                );
            }
        }
        assert!(checked >= 10, "only {checked} boolean options found");
        let parsed = Cli::try_parse_from([
            "qlora",
            "train",
            "--model",
            "m",
            "--data",
            "d",
            "--out",
            "o",
            "--no-shuffle",
            "--dora",
            "--rslora",
            "--optim-8bit",
            "--no-grad-checkpointing",
        ]);
        assert!(parsed.is_ok(), "{parsed:?}");
        let parsed = Cli::try_parse_from([
            "qlora",
            "train",
            "--model",
            "m",
            "--data",
            "d",
            "--out",
            "o",
            "--dora=false",
        ]);
        assert!(parsed.is_ok(), "{parsed:?}");
    }
}
