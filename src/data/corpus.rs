//! `Corpus`: a dataset file read, tokenized, checked against the model's vocabulary and fitted
//! to the sequence length, ready to be split, shuffled and batched.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::DataError;
use super::example::IGNORE_INDEX;
use super::example::{tokenize_record, EosPolicy, Example, Fit, TokenizedRecord};
use super::format::DataFormat;
use super::record::{for_each_record, is_plain_text, Record};
use super::tokenizer::TextTokenizer;

/// How a dataset file becomes examples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataOptions {
    /// Record format, or [`DataFormat::Auto`] to detect it per record.
    pub format: DataFormat,
    /// Longest example in tokens (the training sequence length).
    pub seq_len: usize,
    /// The model's vocabulary size: every id and label must be below it.
    pub vocab_size: usize,
    /// Append an EOS (trained) to each example so the model learns to stop. Pre-tokenized
    /// records with `labels` are always used as given.
    pub add_eos: bool,
    /// The EOS id to append; `None` takes the tokenizer's first EOS id.
    pub eos_token_id: Option<u32>,
}

impl DataOptions {
    /// Defaults: formats detected, EOS appended (the tokenizer's).
    pub fn new(seq_len: usize, vocab_size: usize) -> Self {
        Self {
            format: DataFormat::Auto,
            seq_len,
            vocab_size,
            add_eos: true,
            eos_token_id: None,
        }
    }
}

/// What loading a dataset did, for the user to check.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Records read from the file.
    pub records: usize,
    /// Examples kept (a long text record gives several windows).
    pub examples: usize,
    /// Supervised examples cut to the sequence length (their start kept).
    pub truncated: usize,
    /// Records dropped because nothing in them is trained (blank text, no assistant turn, or
    /// every trained token past the sequence length).
    pub dropped: usize,
    /// Tokens in the kept examples.
    pub tokens: usize,
    /// Labels the loss counts in the kept examples.
    pub trained_tokens: usize,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} examples from {} records ({} tokens, {} trained)",
            self.examples, self.records, self.tokens, self.trained_tokens
        )?;
        if self.truncated > 0 {
            write!(f, "; {} truncated to the sequence length", self.truncated)?;
        }
        if self.dropped > 0 {
            let s = if self.dropped == 1 { "" } else { "s" };
            write!(
                f,
                "; {} record{s} dropped with nothing to train",
                self.dropped
            )?;
        }
        Ok(())
    }
}

/// The examples of one dataset file.
#[derive(Clone, Debug)]
pub struct Corpus {
    /// The file they came from.
    pub path: PathBuf,
    /// The examples, in file order, each at most `seq_len` tokens.
    pub examples: Vec<Example>,
    /// Counts of what loading did.
    pub report: LoadReport,
}

impl Corpus {
    /// Read `path` and build its examples: text is cut into `seq_len` windows (a `.txt` file is
    /// one stream), supervised records are truncated to `seq_len` keeping their start, and
    /// examples with nothing left to train are dropped (counted in the report).
    pub fn load(
        path: &Path,
        tokenizer: Option<&TextTokenizer>,
        opts: &DataOptions,
    ) -> Result<Self, DataError> {
        if opts.seq_len < 2 {
            return Err(DataError::Options(format!(
                "the sequence length must be at least 2 tokens, not {}",
                opts.seq_len
            )));
        }
        let eos = eos_policy(path, tokenizer, opts)?;
        let stream = is_plain_text(path);
        let mut report = LoadReport::default();
        let mut examples = Vec::new();
        let mut doc = 0;
        let records = for_each_record(path, opts.format, |file, rec| {
            let this_doc = doc;
            doc += 1;
            let at = |source| DataError::Tokenize {
                path: file.to_path_buf(),
                line: rec.line,
                source: Box::new(source),
            };
            if matches!(&rec.record, Record::Text(t) if t.trim().is_empty()) {
                // A blank text would train only "BOS -> EOS": nothing of the data.
                report.dropped += 1;
                return Ok(());
            }
            let tokenized = tokenize_record(&rec.record, tokenizer, &eos).map_err(at)?;
            let from_tokenizer = !matches!(rec.record, Record::Tokens { .. });
            check_vocab(file, rec.line, &tokenized, opts).map_err(|e| match (e, tokenizer) {
                (
                    DataError::TokenOutOfVocab {
                        path,
                        line,
                        id,
                        vocab_size,
                    },
                    Some(t),
                ) if from_tokenizer => DataError::TokenizerOutOfVocab {
                    path,
                    line,
                    id,
                    vocab_size,
                    tokenizer_vocab: t.vocab_size(),
                },
                (e, _) => e,
            })?;
            let mut example = Example {
                ids: tokenized.ids.iter().map(|&i| i as u32).collect(),
                labels: tokenized.labels,
                doc: this_doc,
                line: rec.line,
                target: None,
            };
            let pieces = match tokenized.fit {
                Fit::Window => example.windows(opts.seq_len),
                Fit::Truncate => {
                    if example.len() > opts.seq_len {
                        example.truncate(opts.seq_len);
                        report.truncated += 1;
                    }
                    vec![example]
                }
            };
            // A window with nothing to predict (a text's last token alone) is skipped; only a
            // record with nothing trained at all counts as dropped.
            let before = examples.len();
            for mut piece in pieces {
                if piece.trained_tokens() == 0 {
                    continue;
                }
                if stream {
                    // A `.txt` file is one stream: its windows are the documents.
                    piece.doc = examples.len();
                }
                examples.push(piece);
            }
            if examples.len() == before {
                report.dropped += 1;
            }
            Ok(())
        })?;
        if records == 0 {
            return Err(DataError::Empty {
                path: path.to_path_buf(),
                why: "it holds no records".into(),
            });
        }
        report.records = records;
        if examples.is_empty() {
            return Err(DataError::Empty {
                path: path.to_path_buf(),
                why: format!(
                    "none of its {} records has a token to train within {} tokens \
                     ({} dropped)",
                    report.records, opts.seq_len, report.dropped
                ),
            });
        }
        report.examples = examples.len();
        report.tokens = examples.iter().map(Example::len).sum();
        report.trained_tokens = examples.iter().map(Example::trained_tokens).sum();
        Ok(Self {
            path: path.to_path_buf(),
            examples,
            report,
        })
    }
}

fn eos_policy(
    path: &Path,
    tokenizer: Option<&TextTokenizer>,
    opts: &DataOptions,
) -> Result<EosPolicy, DataError> {
    let known: Vec<u32> = tokenizer
        .map(|t| t.eos_token_ids().to_vec())
        .unwrap_or_default();
    let append = if opts.add_eos {
        let id = opts.eos_token_id.or_else(|| known.first().copied());
        if id.is_none() {
            return Err(DataError::File {
                path: path.to_path_buf(),
                what: "cannot append an end-of-sequence token: no EOS id is known (the model \
                       has no tokenizer with an eos_token); give one, or turn EOS appending off"
                    .into(),
            });
        }
        id
    } else {
        None
    };
    if let Some(id) = append {
        if id as usize >= opts.vocab_size {
            return Err(DataError::Options(format!(
                "the EOS id {id} is outside the model's vocabulary of {}",
                opts.vocab_size
            )));
        }
    }
    Ok(EosPolicy { append, known })
}

fn check_vocab(
    path: &Path,
    line: usize,
    tokenized: &TokenizedRecord,
    opts: &DataOptions,
) -> Result<(), DataError> {
    let vocab = opts.vocab_size as i64;
    let bad_id = tokenized.ids.iter().find(|&&i| !(0..vocab).contains(&i));
    let bad_label = tokenized
        .labels
        .iter()
        .find(|&&l| l != IGNORE_INDEX && !(0..vocab).contains(&l));
    match bad_id.or(bad_label) {
        Some(&id) => Err(DataError::TokenOutOfVocab {
            path: path.to_path_buf(),
            line,
            id,
            vocab_size: opts.vocab_size,
        }),
        None => Ok(()),
    }
}
