//! `qlora generate`: sample text from a model (and adapter), streaming tokens as they come.

use std::io::Write;

use anyhow::Context;
use clap::Args;

use super::model_args::ModelArgs;
use crate::data::tokenizer::Message;
use crate::model::generate::{generate, SamplingOptions};

/// Arguments of `qlora generate`.
#[derive(Args, Debug)]
#[command(
    about = "Generate text (greedy at temperature 0), with a KV cache, streaming tokens",
    after_help = "Example:\n  qlora generate --model SmolLM2-135M-Instruct.Q4_1.gguf --chat --prompt \"What is the capital of France?\""
)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// The prompt text.
    #[arg(long)]
    pub prompt: String,

    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,

    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,

    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,

    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,

    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Run `qlora generate`.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.top_p > 0.0 && args.top_p <= 1.0,
        "--top-p must be in (0, 1], got {}",
        args.top_p
    );
    anyhow::ensure!(
        args.temperature.is_finite() && args.temperature >= 0.0,
        "--temperature must be a number >= 0 (0 is greedy), got {}",
        args.temperature
    );
    let m = args.model.load(None)?;
    let tok = m
        .tokenizer
        .as_ref()
        .context("this model has no tokenizer (tokenizer.json or GGUF tokenizer metadata)")?;
    let text = if args.chat {
        tok.apply_chat_template(
            &[Message {
                role: "user".into(),
                content: args.prompt.clone(),
            }],
            true,
        )?
    } else {
        args.prompt.clone()
    };
    let ids = tok.encode(&text, true)?;
    let mut stop = tok.eos_token_ids().to_vec();
    stop.extend(m.model.info().eos_token_ids.iter().copied());
    let opts = SamplingOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        stop_ids: stop,
    };
    // Decode the growing output and print only the new characters, so multi-token characters
    // come out whole.
    let mut generated = Vec::new();
    let mut printed = 0usize;
    let mut out = std::io::stdout();
    generate(&m.model, &ids, &opts, |id| {
        generated.push(id);
        if let Ok(s) = tok.decode(&generated, true) {
            if s.len() > printed && s.is_char_boundary(printed) {
                let _ = write!(out, "{}", &s[printed..]);
                let _ = out.flush();
                printed = s.len();
            }
        }
        true
    })?;
    println!();
    Ok(())
}
