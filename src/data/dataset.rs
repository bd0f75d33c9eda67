//! Reading datasets for evaluation: each record as one token sequence, nothing masked.

use std::path::Path;

use super::conversation::tokenize_conversation;
use super::error::DataError;
use super::format::DataFormat;
use super::prompt::alpaca_prompt;
use super::record::{for_each_record, Record};
use super::tokenizer::TextTokenizer;

/// One document's tokens, with the labels its record gave (`-100` marks a token not scored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSequence {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Per-token labels as in transformers (`labels[i]` is scored at position `i`, predicted
    /// from the tokens before it), when the record has them; otherwise every next token counts.
    pub labels: Option<Vec<i64>>,
}

/// Token sequences of a dataset file, one per document (a `.txt` file is one document).
///
/// `.txt` is tokenized whole; `.jsonl`/`.json` records may be `text` (tokenized with the
/// tokenizer's special tokens), `input_ids` (used as given), Alpaca `instruction`/`output`
/// (prompt and response as one text) or chat `messages` (rendered with the chat template).
/// Errors name the file and line.
pub fn read_token_sequences(
    path: &Path,
    tokenizer: Option<&TextTokenizer>,
) -> Result<Vec<TokenSequence>, DataError> {
    let need_tok = || {
        tokenizer.ok_or_else(|| {
            DataError::invalid(
                path.display().to_string(),
                "text data needs a tokenizer, and this model has none (give pre-tokenized `input_ids`)",
            )
        })
    };
    let mut out = Vec::new();
    for_each_record(path, DataFormat::Auto, |file, rec| {
        let at = |e: DataError| {
            DataError::invalid(format!("{}:{}", file.display(), rec.line), e.to_string())
        };
        let mut labels = None;
        let ids = match &rec.record {
            Record::Text(t) => need_tok()?.encode(t, true).map_err(at)?,
            Record::Alpaca {
                instruction,
                input,
                output,
            } => {
                let text = format!("{}{output}", alpaca_prompt(instruction, input));
                need_tok()?.encode(&text, true).map_err(at)?
            }
            Record::Chat(messages) => {
                tokenize_conversation(need_tok()?, messages)
                    .map_err(at)?
                    .ids
            }
            Record::Tokens {
                input_ids,
                labels: given,
            } => {
                labels.clone_from(given);
                input_ids
                    .iter()
                    .map(|&i| u32::try_from(i))
                    .collect::<Result<Vec<u32>, _>>()
                    .map_err(|_| {
                        DataError::invalid(
                            format!("{}:{}", file.display(), rec.line),
                            "`input_ids` must be non-negative token ids",
                        )
                    })?
            }
        };
        out.push(TokenSequence { ids, labels });
        Ok(())
    })?;
    out.retain(|s| !s.ids.is_empty());
    if out.is_empty() {
        return Err(DataError::invalid(
            path.display().to_string(),
            "the dataset is empty",
        ));
    }
    Ok(out)
}
