//! `qlora classify`: predictions of a classification model (and adapter) for each record of a
//! dataset, as JSON Lines.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::model_args::ModelArgs;
use crate::classify::{argmax, predict, probabilities};
use crate::data::corpus::Corpus;
use crate::data::labelled::{load_labelled, LabelSpace};
use crate::model::loader::LoadedModel;

/// Arguments of `qlora classify`.
#[derive(Args, Debug)]
#[command(
    about = "Classify each record of a dataset; predictions as JSON Lines",
    long_about = "Classify each record of a JSONL dataset ({\"text\": ...} or {\"input_ids\": [...]}, \
a `label` is allowed and ignored) with a classification model: a *ForSequenceClassification \
checkpoint, or a base model with a SEQ_CLS adapter. Writes one line per record: \
{\"line\", \"label\", \"label_id\", \"probabilities\"} (regression heads: {\"line\", \"value\"}).",
    after_help = "Example:\n  qlora classify --model bert-base-uncased --adapter run/adapter --data test.jsonl --out predictions.jsonl"
)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Records to classify (.jsonl or .parquet with `text` or `input_ids`; a folder of shards,
    /// or a hub dataset `org/name[:split]`).
    #[arg(long, value_name = "FILE|DIR|ORG/NAME", value_parser = crate::hub::data_path)]
    pub data: PathBuf,

    /// Where to write the predictions (JSONL); standard output when absent.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,

    /// Longest sequence in tokens (longer ones are cut, keeping their start).
    /// [default: 512, or the model's context when shorter]
    #[arg(long)]
    pub seq_len: Option<usize>,

    /// Sequences per batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
}

/// The records of `data` as examples for `m`'s head, with the head's label names and task.
pub(crate) fn read_labelled(
    m: &LoadedModel,
    data: &Path,
    seq_len: usize,
    require_label: bool,
) -> anyhow::Result<(Corpus, Vec<String>, bool)> {
    let head = m
        .model
        .classifier()
        .context("this model has no classification head (load a *ForSequenceClassification checkpoint or a SEQ_CLS adapter)")?;
    let space = LabelSpace {
        names: head.config.labels.clone(),
        regression: head.config.regression,
    };
    let corpus = load_labelled(
        data,
        m.tokenizer.as_ref(),
        &space,
        seq_len,
        m.model.info().vocab_size,
        require_label,
    )
    .with_context(|| format!("reading {}", data.display()))?;
    Ok((corpus, space.names, space.regression))
}

/// The id batches are padded with: the config's `pad_token_id`, else 0 (BERT's `[PAD]`).
pub(crate) fn pad_id(m: &LoadedModel) -> u32 {
    m.model.info().pad_token_id.unwrap_or(0)
}

/// Run `qlora classify`.
pub fn run(args: ClassifyArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.seq_len.is_none_or(|n| n >= 1),
        "--seq-len must be at least 1"
    );
    anyhow::ensure!(args.batch_size >= 1, "--batch-size must be at least 1");
    let m = args.model.load(args.seq_len)?;
    let seq_len = args
        .seq_len
        .unwrap_or_else(|| m.model.info().max_position_embeddings.min(512));
    let (corpus, names, regression) = read_labelled(&m, &args.data, seq_len, false)?;
    let bar = ProgressBar::new(corpus.examples.len() as u64).with_style(
        ProgressStyle::with_template("classify [{bar:30}] {pos}/{len} sequences, ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let logits = predict(
        &m.model,
        &corpus.examples,
        args.batch_size,
        pad_id(&m),
        |done, _| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    let mut text = String::new();
    for (e, l) in corpus.examples.iter().zip(&logits) {
        let v = if regression {
            serde_json::json!({"line": e.line, "value": l[0]})
        } else {
            let k = argmax(l);
            serde_json::json!({"line": e.line, "label": names[k], "label_id": k,
                "probabilities": probabilities(l)})
        };
        text.push_str(&v.to_string());
        text.push('\n');
    }
    match &args.out {
        Some(path) => {
            // Written whole under a temporary name, then renamed: never a partial file.
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let mut tmp = tempfile::NamedTempFile::new_in(dir)
                .with_context(|| format!("creating a file in {}", dir.display()))?;
            tmp.write_all(text.as_bytes())?;
            tmp.persist(path)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("{} predictions written to {}", logits.len(), path.display());
        }
        None => print!("{text}"),
    }
    Ok(())
}
