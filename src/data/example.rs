//! `Example`: one training sequence (token ids and labels), built from a record.
//!
//! Labels follow transformers: label `i` is the token expected at position `i` (the loss shifts),
//! [`IGNORE_INDEX`] where nothing is trained. Labels come from what a record says is trained
//! (the output, the assistant turns), never from comparing ids with the pad id, so an EOS that
//! is also the pad token is still trained.

use super::conversation::tokenize_conversation;
use super::error::DataError;
use super::prompt::alpaca_prompt;
use super::record::Record;
use super::tokenizer::TextTokenizer;

/// Label value that is not predicted (prompt tokens, padding), as in transformers.
pub const IGNORE_INDEX: i64 = -100;

/// One training sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Label per token ([`IGNORE_INDEX`] = not trained), same length as `ids`.
    pub labels: Vec<i64>,
    /// Index of the document (record, or window of a `.txt` stream) it came from; windows of one
    /// long text record share it, so a validation split never divides a document.
    pub doc: usize,
    /// Line of the file where its record starts.
    pub line: usize,
    /// The sequence's class index (or regression value) for sequence classification; `None`
    /// for language modelling.
    pub target: Option<f32>,
}

impl Example {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether it has no tokens.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Labels the loss counts: every trained label but the first position's, which no earlier
    /// token predicts.
    pub fn trained_tokens(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }

    /// Keep the first `max_len` tokens.
    pub fn truncate(&mut self, max_len: usize) {
        self.ids.truncate(max_len);
        self.labels.truncate(max_len);
    }

    /// Cut into consecutive windows of `len` tokens (the last may be shorter); each window is a
    /// sequence of its own, with positions restarting at 0.
    pub fn windows(self, len: usize) -> Vec<Example> {
        let len = len.max(1);
        if self.ids.len() <= len {
            return vec![self];
        }
        self.ids
            .chunks(len)
            .zip(self.labels.chunks(len))
            .map(|(ids, labels)| Example {
                ids: ids.to_vec(),
                labels: labels.to_vec(),
                doc: self.doc,
                line: self.line,
                target: self.target,
            })
            .collect()
    }
}

/// How a record's tokens are fitted to the sequence length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    /// Unsupervised text: cut into windows, nothing lost.
    Window,
    /// Supervised (prompt + response): keep the start, so the response keeps its prompt.
    Truncate,
}

/// Tokens and labels of one record, before fitting to the sequence length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizedRecord {
    /// Token ids (not yet checked against the model's vocabulary).
    pub ids: Vec<i64>,
    /// Labels, same length.
    pub labels: Vec<i64>,
    /// How to fit it to the sequence length.
    pub fit: Fit,
}

/// End-of-sequence handling: which id to append, and which ids already end a sequence.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EosPolicy {
    /// Id appended (and trained) after each example's trained tokens; `None` appends nothing.
    pub append: Option<u32>,
    /// Ids that count as an end of sequence already there (the tokenizer's EOS ids).
    pub known: Vec<u32>,
}

impl EosPolicy {
    fn ends(&self, id: i64) -> bool {
        u32::try_from(id).is_ok_and(|id| self.known.contains(&id) || Some(id) == self.append)
    }

    /// Make the last token a trained EOS: mark it trained if it is one, else append one.
    fn finish(&self, ids: &mut Vec<i64>, labels: &mut Vec<i64>) {
        let Some(eos) = self.append else { return };
        match (ids.last(), labels.last_mut()) {
            (Some(&last), Some(label)) if self.ends(last) => *label = last,
            _ => {
                ids.push(i64::from(eos));
                labels.push(i64::from(eos));
            }
        }
    }
}

/// Tokenize `record`. Records that need text tokenized fail without a tokenizer.
pub fn tokenize_record(
    record: &Record,
    tokenizer: Option<&TextTokenizer>,
    eos: &EosPolicy,
) -> Result<TokenizedRecord, DataError> {
    let need = |what: &str| {
        tokenizer.ok_or_else(|| {
            DataError::invalid(
                "tokenizer",
                format!(
                    "{what} records need a tokenizer, and this model has none (give \
                     pre-tokenized `input_ids`)"
                ),
            )
        })
    };
    let widen = |ids: &[u32]| ids.iter().map(|&i| i64::from(i)).collect::<Vec<i64>>();
    match record {
        Record::Text(text) => {
            let mut ids = widen(&need("text")?.encode(text, true)?);
            let mut labels = ids.clone();
            eos.finish(&mut ids, &mut labels);
            Ok(TokenizedRecord {
                ids,
                labels,
                fit: Fit::Window,
            })
        }
        Record::Alpaca {
            instruction,
            input,
            output,
        } => {
            let tok = need("alpaca")?;
            let prompt = alpaca_prompt(instruction, input);
            let full = format!("{prompt}{output}");
            let (enc_ids, offsets) = tok.encode_with_offsets(&full, true)?;
            let mut ids = widen(&enc_ids);
            // Trained: tokens reaching into the response. Special tokens the post-processor
            // adds have empty offsets and stay untrained (a trailing EOS is handled below).
            let mut labels: Vec<i64> = ids
                .iter()
                .zip(&offsets)
                .map(|(&id, &(_, end))| if end > prompt.len() { id } else { IGNORE_INDEX })
                .collect();
            eos.finish(&mut ids, &mut labels);
            Ok(TokenizedRecord {
                ids,
                labels,
                fit: Fit::Truncate,
            })
        }
        Record::Chat(messages) => {
            let conv = tokenize_conversation(need("chat")?, messages)?;
            let mut ids = widen(&conv.ids);
            let mut labels: Vec<i64> = ids
                .iter()
                .zip(&conv.trained)
                .map(|(&id, &t)| if t { id } else { IGNORE_INDEX })
                .collect();
            if conv.trained.contains(&true) && !conv.ends_with_eos {
                if let Some(e) = eos.append {
                    ids.push(i64::from(e));
                    labels.push(i64::from(e));
                }
            }
            Ok(TokenizedRecord {
                ids,
                labels,
                fit: Fit::Truncate,
            })
        }
        Record::Tokens {
            input_ids,
            labels: Some(labels),
        } => Ok(TokenizedRecord {
            ids: input_ids.clone(),
            labels: labels.clone(),
            fit: Fit::Truncate,
        }),
        // Pre-tokenized records are trained exactly as written: no EOS is added.
        Record::Tokens {
            input_ids,
            labels: None,
        } => Ok(TokenizedRecord {
            ids: input_ids.clone(),
            labels: input_ids.clone(),
            fit: Fit::Window,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: Vec<u32>, labels: Vec<i64>) -> Example {
        Example {
            ids,
            labels,
            doc: 0,
            line: 1,
            target: None,
        }
    }

    #[test]
    fn first_label_is_never_counted() {
        let e = ex(vec![5, 6, 7], vec![5, IGNORE_INDEX, 7]);
        assert_eq!(e.trained_tokens(), 1);
    }

    #[test]
    fn windows_cover_every_token_once() {
        let e = ex((0..7).collect(), (0..7).collect());
        let w = e.windows(3);
        let lens: Vec<usize> = w.iter().map(Example::len).collect();
        assert_eq!(lens, vec![3, 3, 1]);
        assert_eq!(w[2].ids, vec![6]);
    }

    #[test]
    fn eos_is_appended_once_and_trained() {
        let p = EosPolicy {
            append: Some(2),
            known: vec![2],
        };
        let (mut ids, mut labels) = (vec![7, 8], vec![IGNORE_INDEX, 8]);
        p.finish(&mut ids, &mut labels);
        assert_eq!(
            (ids.clone(), labels.clone()),
            (vec![7, 8, 2], vec![-100, 8, 2])
        );
        let (mut ids, mut labels) = (vec![7, 2], vec![IGNORE_INDEX, IGNORE_INDEX]);
        p.finish(&mut ids, &mut labels);
        assert_eq!((ids, labels), (vec![7, 2], vec![-100, 2]));
        let none = EosPolicy::default();
        let (mut ids, mut labels) = (vec![7], vec![7]);
        none.finish(&mut ids, &mut labels);
        assert_eq!(ids, vec![7]);
    }
}
