//! Labelled sequences for classification: JSON Lines records `{"text": ..., "label": ...}` or
//! `{"input_ids": [...], "label": ...}`, one example per record (never packed or windowed), cut
//! to the sequence length keeping the start, as transformers' tokenizers truncate.
//!
//! A label is a class index (`0 <= label < num_labels`), a label name (`id2label`'s), or, for a
//! one-output head (regression), a number.

use std::path::Path;

use serde_json::Value;

use super::corpus::{Corpus, LoadReport};
use super::error::DataError;
use super::example::Example;
use super::example::IGNORE_INDEX;
use super::record::for_each_value;
use super::tokenizer::TextTokenizer;

/// The classes a head predicts.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelSpace {
    /// Name of each class index.
    pub names: Vec<String>,
    /// One output, trained by mean squared error on numeric labels.
    pub regression: bool,
}

impl LabelSpace {
    fn parse(&self, label: &Value) -> Result<f32, String> {
        let n = self.names.len();
        match label {
            Value::Number(x) if self.regression => x
                .as_f64()
                .filter(|v| v.is_finite())
                .map(|v| v as f32)
                .ok_or_else(|| format!("`label` {x} is not a finite number")),
            Value::Number(x) => match x.as_u64() {
                Some(k) if (k as usize) < n => Ok(k as f32),
                Some(k) => Err(format!(
                    "`label` {k} is outside the model's {n} labels (0..{})",
                    n - 1
                )),
                None => Err(format!("`label` {x} is not a class index (0..{})", n - 1)),
            },
            Value::String(s) => self
                .names
                .iter()
                .position(|l| l == s)
                .map(|k| k as f32)
                .ok_or_else(|| {
                    format!(
                        "`label` \"{s}\" is not one of the model's labels ({})",
                        self.names.join(", ")
                    )
                }),
            Value::Null => Err("`label` is null".into()),
            other => Err(format!("`label` {other} is not a class index or name")),
        }
    }
}

/// Read the labelled records of `path` into examples (labels of every token ignored: the loss is
/// the classifier's). `vocab_size` bounds the ids; text is tokenized with the tokenizer's special
/// tokens (BERT's `[CLS]` and `[SEP]`), as `tokenizer(text)` does. Without `require_label`,
/// records may leave the label out (sequences to classify).
pub fn load_labelled(
    path: &Path,
    tokenizer: Option<&TextTokenizer>,
    labels: &LabelSpace,
    seq_len: usize,
    vocab_size: usize,
    require_label: bool,
) -> Result<Corpus, DataError> {
    let mut examples = Vec::new();
    let mut report = LoadReport::default();
    report.records = for_each_value(path, |file, line, v| {
        let record_err = |line: usize, what: String| DataError::Record {
            path: file.to_path_buf(),
            line,
            what,
        };
        let Value::Object(obj) = v else {
            return Err(record_err(line, "a record must be a JSON object".into()));
        };
        let target = match obj.get("label") {
            Some(label) => Some(labels.parse(label).map_err(|what| record_err(line, what))?),
            None if !require_label => None,
            None => {
                return Err(record_err(
                    line,
                    "the record has no `label` (a classification record needs `text` or \
                     `input_ids`, and `label`)"
                        .into(),
                ))
            }
        };
        let ids: Vec<i64> = match (obj.get("text"), obj.get("input_ids")) {
            (Some(Value::String(t)), None) => {
                let tok = tokenizer.ok_or_else(|| {
                    record_err(
                        line,
                        "`text` needs a tokenizer, and this model has none (give `input_ids`)"
                            .into(),
                    )
                })?;
                tok.encode(t, true)
                    .map_err(|e| record_err(line, format!("cannot tokenize `text`: {e}")))?
                    .into_iter()
                    .map(i64::from)
                    .collect()
            }
            (None, Some(Value::Array(a))) => a
                .iter()
                .map(|x| x.as_i64())
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| record_err(line, "`input_ids` must be a list of integers".into()))?,
            (Some(_), Some(_)) => {
                return Err(record_err(
                    line,
                    "give `text` or `input_ids`, not both".into(),
                ))
            }
            _ => {
                return Err(record_err(
                    line,
                    "a classification record needs `text` (a string) or `input_ids` (a list), \
                     and `label`"
                        .into(),
                ))
            }
        };
        if ids.is_empty() {
            return Err(record_err(line, "the record has no tokens".into()));
        }
        if let Some(&bad) = ids
            .iter()
            .find(|&&id| !(0..vocab_size as i64).contains(&id))
        {
            return Err(DataError::TokenOutOfVocab {
                path: file.to_path_buf(),
                line,
                id: bad,
                vocab_size,
            });
        }
        let mut ids: Vec<u32> = ids.into_iter().map(|i| i as u32).collect();
        if ids.len() > seq_len {
            ids.truncate(seq_len);
            report.truncated += 1;
        }
        report.tokens += ids.len();
        examples.push(Example {
            labels: vec![IGNORE_INDEX; ids.len()],
            ids,
            doc: examples.len(),
            line,
            target,
        });
        Ok(())
    })?;
    if examples.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
            why: "it holds no records".into(),
        });
    }
    report.examples = examples.len();
    // Every token is input to the classifier.
    report.trained_tokens = report.tokens;
    Ok(Corpus {
        path: path.to_path_buf(),
        examples,
        report,
    })
}
