//! `DataError`: what can go wrong turning a dataset file into training batches.
//!
//! Errors about one record name the file and the line the record starts on, so the user can
//! open the file at the right place.

use std::path::PathBuf;

/// Errors of the training data pipeline.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A tokenizer, chat template or named input is unusable (the same message as the model
    /// layer's `Invalid`: the thing, then what is wrong).
    #[error("{}: {what}", path.display())]
    Invalid {
        /// The file or thing.
        path: PathBuf,
        /// What is wrong, and what was expected.
        what: String,
    },
    /// A JSON side file (tokenizer_config.json) could not be parsed.
    #[error("{} is not valid JSON", path.display())]
    JsonFile {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// An I/O error on a path.
    #[error("I/O error on {}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The dataset file could not be read.
    #[error("cannot read dataset {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A record (JSONL line or JSON array element) is not valid JSON.
    #[error("{}:{line}:{column}: invalid JSON: {what}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// The parser's message.
        what: String,
    },
    /// A record has none of the fields its format needs.
    #[error("{}:{line}: record has none of the expected fields: {expected}", path.display())]
    MissingFields {
        /// The file.
        path: PathBuf,
        /// 1-based line where the record starts.
        line: usize,
        /// The fields (or field combinations) that would have been accepted.
        expected: String,
    },
    /// A record has the right fields with the wrong content (types, roles, lengths).
    #[error("{}:{line}: {what}", path.display())]
    Record {
        /// The file.
        path: PathBuf,
        /// 1-based line where the record starts.
        line: usize,
        /// What is wrong, and what was expected.
        what: String,
    },
    /// `input_ids` and `labels` of a pre-tokenized record differ in length.
    #[error(
        "{}:{line}: `input_ids` has {ids} tokens but `labels` has {labels}; they must be the \
         same length (use -100 for tokens that are not trained)",
        path.display()
    )]
    LengthMismatch {
        /// The file.
        path: PathBuf,
        /// 1-based line where the record starts.
        line: usize,
        /// Length of `input_ids`.
        ids: usize,
        /// Length of `labels`.
        labels: usize,
    },
    /// A token id (given, or produced by the tokenizer) is not in the model's vocabulary.
    #[error(
        "{}:{line}: token id {id} is outside the model's vocabulary of {vocab_size} \
         (was the data tokenized for another model?)",
        path.display()
    )]
    TokenOutOfVocab {
        /// The file.
        path: PathBuf,
        /// 1-based line where the record starts.
        line: usize,
        /// The offending id.
        id: i64,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
    /// The tokenizer produced an id the model has no embedding for: tokenizer and model do not
    /// belong together.
    #[error(
        "{}:{line}: the tokenizer produced token id {id}, outside the model's vocabulary of \
         {vocab_size}: the tokenizer (vocabulary of {tokenizer_vocab}) does not belong to this \
         model; use the tokenizer the model was trained with",
        path.display()
    )]
    TokenizerOutOfVocab {
        /// The file.
        path: PathBuf,
        /// 1-based line where the record starts.
        line: usize,
        /// The offending id.
        id: i64,
        /// The model's vocabulary size.
        vocab_size: usize,
        /// The tokenizer's vocabulary size (added tokens included).
        tokenizer_vocab: usize,
    },
    /// Tokenizing or rendering a record with the chat template failed.
    #[error("{}:{line}: cannot tokenize the record", path.display())]
    Tokenize {
        /// The file.
        path: PathBuf,
        /// 1-based line where the record starts.
        line: usize,
        /// The tokenizer's or template's error.
        source: Box<DataError>,
    },
    /// The dataset holds nothing to train on.
    #[error("dataset {} is empty: {why}", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
        /// Why (no records, or every example dropped).
        why: String,
    },
    /// The whole file is unusable as asked (e.g. a `.txt` file with a JSON format forced, or
    /// text records without a tokenizer).
    #[error("{}: {what}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong, and what to do.
        what: String,
    },
    /// Pipeline settings that cannot work (zero batch size, a split fraction outside [0, 1)).
    #[error("invalid data settings: {0}")]
    Options(String),
    /// A saved position that does not fit this dataset (resuming with other data or settings).
    #[error("cannot resume the data order at epoch {epoch}, row {index}: {what}")]
    Seek {
        /// The saved epoch.
        epoch: usize,
        /// The saved row index.
        index: usize,
        /// Why it does not fit.
        what: String,
    },
    /// Building a batch tensor failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl DataError {
    /// [`DataError::Json`] from a parser error in a text that starts at `first_line` of `path`.
    pub(crate) fn json(path: &std::path::Path, first_line: usize, e: &serde_json::Error) -> Self {
        let msg = e.to_string();
        // serde_json appends " at line L column C"; we report the position in the file instead.
        let what = match msg.rfind(" at line ") {
            Some(i) => msg[..i].to_string(),
            None => msg,
        };
        DataError::Json {
            path: path.to_path_buf(),
            line: first_line + e.line().max(1) - 1,
            column: e.column(),
            what,
        }
    }
}

impl DataError {
    /// Shorthand for [`DataError::Invalid`] about a named thing.
    pub fn invalid(name: impl Into<String>, what: impl Into<String>) -> Self {
        DataError::Invalid {
            path: PathBuf::from(name.into()),
            what: what.into(),
        }
    }

    /// Shorthand for [`DataError::Io`].
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
