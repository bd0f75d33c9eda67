//! `qlora eval`: mean token NLL and perplexity of a model (and adapter) on a dataset; for a
//! classifier, loss, accuracy, macro-F1 and the confusion matrix on labelled records.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::model_args::ModelArgs;
use crate::data::dataset::read_token_sequences;
use crate::eval::evaluate;

/// Arguments of `qlora eval`.
#[derive(Args, Debug)]
#[command(
    about = "Mean token negative log-likelihood and perplexity over a dataset",
    long_about = "Mean token negative log-likelihood and perplexity over a dataset.\n\n\
DATA may be plain text (.txt, tokenized whole), JSONL with a `text` field per line, or JSONL with \
pre-tokenized `input_ids` (lists of ints, used as given). Sequences are cut into non-overlapping \
windows of --seq-len tokens; every token after the first of a window is predicted and counted.

A classification model (a *ForSequenceClassification checkpoint, or a SEQ_CLS adapter) reads JSONL records {\"text\" or \"input_ids\", \"label\"} instead and reports the mean cross-entropy, accuracy, macro-F1 and the confusion matrix.",
    after_help = "Example:\n  qlora eval --model SmolLM2-135M-Instruct.Q4_1.gguf --data valid.txt --seq-len 512 --json"
)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Dataset: .txt, .jsonl/.json or .parquet, a folder of shards, or a hub dataset
    /// `org/name[@revision][:split]`.
    #[arg(long, value_name = "FILE|DIR|ORG/NAME", value_parser = crate::hub::data_path)]
    pub data: PathBuf,

    /// Window length in tokens.
    /// [default: 512, or the model's context when shorter]
    #[arg(long)]
    pub seq_len: Option<usize>,

    /// Print one JSON object instead of text: mean_nll, perplexity, tokens, windows,
    /// tokens_per_s; for a classifier loss, accuracy, macro_f1, examples, confusion.
    #[arg(long)]
    pub json: bool,

    /// Sequences per batch when classifying.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
}

/// Run `qlora eval`.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.seq_len.is_none_or(|n| n >= 2),
        "--seq-len must be at least 2"
    );
    let m = args.model.load(args.seq_len)?;
    let seq_len = args
        .seq_len
        .unwrap_or_else(|| m.model.info().max_position_embeddings.min(512));
    if m.model.classifier().is_some() {
        return run_classifier(&args, &m, seq_len);
    }
    let seqs = read_token_sequences(&args.data, m.tokenizer.as_ref())
        .with_context(|| format!("reading {}", args.data.display()))?;
    let vocab = m.model.info().vocab_size as u32;
    if let Some(bad) = seqs.iter().flat_map(|s| &s.ids).find(|&&t| t >= vocab) {
        anyhow::bail!(
            "{}: token id {bad} is outside the model's vocabulary of {vocab}",
            args.data.display()
        );
    }
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0).with_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} windows, ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        )
    };
    bar.set_message("eval");
    let start = Instant::now();
    let report = evaluate(&m.model, &seqs, seq_len, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let tps = report.tokens as f64 / secs;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["tokens_per_s"] = serde_json::json!(tps);
        v["seconds"] = serde_json::json!(secs);
        println!("{v}");
    } else {
        println!(
            "mean NLL {:.4}  perplexity {:.3}  over {} tokens in {} windows ({:.1} s, {:.0} tokens/s)",
            report.mean_nll, report.perplexity, report.tokens, report.windows, secs, tps
        );
    }
    Ok(())
}

/// `qlora eval` on a classifier.
fn run_classifier(
    args: &EvalArgs,
    m: &crate::model::loader::LoadedModel,
    seq_len: usize,
) -> anyhow::Result<()> {
    let (corpus, names, regression) = super::classify::read_labelled(m, &args.data, seq_len, true)?;
    let bar = progress_bar(args.json, corpus.examples.len());
    let start = Instant::now();
    let targets: Vec<f32> = corpus.examples.iter().filter_map(|e| e.target).collect();
    let logits = crate::classify::predict(
        &m.model,
        &corpus.examples,
        args.batch_size,
        super::classify::pad_id(m),
        |done, _| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let metrics = crate::classify::metrics(&logits, &targets, regression);
    if args.json {
        let mut v = serde_json::to_value(&metrics)?;
        v["labels"] = serde_json::json!(names);
        v["seconds"] = serde_json::json!(secs);
        println!("{v}");
    } else {
        match (metrics.accuracy, metrics.macro_f1) {
            (Some(acc), Some(f1)) => {
                println!(
                    "loss {:.4}  accuracy {:.4}  macro-F1 {:.4}  over {} examples ({:.1} s)",
                    metrics.loss, acc, f1, metrics.examples, secs
                );
                print!("{}", crate::classify::confusion_table(&metrics, &names));
            }
            _ => println!(
                "mean squared error {:.4} over {} examples ({:.1} s)",
                metrics.loss, metrics.examples, secs
            ),
        }
    }
    Ok(())
}

fn progress_bar(hidden: bool, len: usize) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    ProgressBar::new(len as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} sequences, ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    )
}
