//! Reading datasets: plain text, JSONL with `text`, or JSONL with pre-tokenized `input_ids`.

use std::path::Path;

use serde_json::Value;

use super::tokenizer::TextTokenizer;
use crate::model::error::ModelError;

/// Token sequences of a dataset file, one per document (a `.txt` file is one document).
///
/// `.txt` is tokenized whole; `.jsonl`/`.json` records need a `text` string (tokenized with the
/// tokenizer's special tokens) or an `input_ids` list of integers (used as given). Errors name
/// the file and line.
pub fn read_token_sequences(
    path: &Path,
    tokenizer: Option<&TextTokenizer>,
) -> Result<Vec<Vec<u32>>, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let need_tok = || {
        tokenizer.ok_or_else(|| {
            ModelError::invalid(
                path.display().to_string(),
                "text data needs a tokenizer, and this model has none (give pre-tokenized `input_ids`)",
            )
        })
    };
    let is_txt = path.extension().is_some_and(|e| e == "txt");
    let mut out = Vec::new();
    if is_txt {
        out.push(need_tok()?.encode(&text, true)?);
    } else {
        let records: Vec<(usize, Value)> = if text.trim_start().starts_with('[') {
            let v: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: path.to_path_buf(),
                source,
            })?;
            v.as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(i, r)| (i + 1, r))
                .collect()
        } else {
            let mut recs = Vec::new();
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(line).map_err(|e| {
                    ModelError::invalid(
                        format!("{}:{}", path.display(), i + 1),
                        format!("not a JSON object: {e}"),
                    )
                })?;
                recs.push((i + 1, v));
            }
            recs
        };
        for (line, rec) in records {
            let at = || format!("{}:{line}", path.display());
            if let Some(ids) = rec.get("input_ids") {
                let ids = ids
                    .as_array()
                    .and_then(|a| {
                        a.iter()
                            .map(|x| x.as_u64().and_then(|v| u32::try_from(v).ok()))
                            .collect::<Option<Vec<u32>>>()
                    })
                    .ok_or_else(|| {
                        ModelError::invalid(at(), "`input_ids` must be a list of token ids")
                    })?;
                out.push(ids);
            } else if let Some(t) = rec.get("text").and_then(Value::as_str) {
                out.push(need_tok()?.encode(t, true)?);
            } else {
                return Err(ModelError::invalid(
                    at(),
                    "record has neither a `text` string nor `input_ids`",
                ));
            }
        }
    }
    out.retain(|s| !s.is_empty());
    if out.is_empty() {
        return Err(ModelError::invalid(
            path.display().to_string(),
            "the dataset is empty",
        ));
    }
    Ok(out)
}
