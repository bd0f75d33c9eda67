//! `qlora inspect`: what a model folder, bnb checkpoint, GGUF file or adapter holds.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::model::inspect::inspect;

/// Arguments of `qlora inspect`.
#[derive(Args, Debug)]
#[command(
    about = "Show what a model folder, bnb 4-bit checkpoint, GGUF file or PEFT adapter holds",
    long_about = "Show what a model folder, bitsandbytes 4-bit checkpoint, GGUF file or PEFT adapter \
holds: architecture, tensors and their stored types, parameter count, size on disk and the memory \
the model takes once loaded with an NF4 base. Nothing is loaded beyond headers.",
    after_help = "Example:\n  qlora inspect runs/sonnets/adapter\n  qlora inspect HuggingFaceTB/SmolLM2-135M"
)]
pub struct InspectArgs {
    /// Model folder, .gguf file, adapter folder, .safetensors file, or a hub model name
    /// `org/name[@revision]`.
    #[arg(value_parser = crate::hub::model_path)]
    pub path: PathBuf,
}

/// Run `qlora inspect`.
pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let report =
        inspect(&args.path).with_context(|| format!("inspecting {}", args.path.display()))?;
    use std::io::Write;
    match write!(std::io::stdout(), "{report}") {
        // A closed pipe (`| head`) is not an error worth a message.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
