//! `ModelError`: what can go wrong reading, converting or writing a model folder.
//!
//! Every variant names the file or tensor it is about; the underlying error, if any, is the
//! `source` (so `anyhow` prints it as "Caused by").

use std::path::{Path, PathBuf};

use crate::atomic_dir::AtomicDirError;
use crate::quant::QuantError;

/// Errors of the `model` module.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file the model folder needs is absent.
    #[error("{} not found: {hint}", path.display())]
    Missing {
        /// The path we looked for.
        path: PathBuf,
        /// What the file is for, and what to do.
        hint: &'static str,
    },
    /// Reading a file failed.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Writing a file failed.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A safetensors file could not be parsed.
    #[error("{} is not a valid safetensors file (truncated or corrupt)", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the safetensors parser found.
        source: safetensors::SafeTensorError,
    },
    /// Serializing a safetensors file failed.
    #[error("cannot write safetensors file {}", path.display())]
    SafetensorsWrite {
        /// The file.
        path: PathBuf,
        /// What the safetensors writer reported.
        source: safetensors::SafeTensorError,
    },
    /// A JSON file (config, index) could not be parsed.
    #[error("{} is not valid JSON", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A file parses but its content is wrong (an index naming a missing shard, a config that
    /// is not an object, ...).
    #[error("{}: {what}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, and what was expected.
        what: String,
    },
    /// A tensor was asked for by name and is not in the checkpoint.
    #[error("tensor `{name}` is not in {}", dir.display())]
    TensorNotFound {
        /// The tensor name.
        name: String,
        /// The model folder or file.
        dir: PathBuf,
    },
    /// A tensor is present but unusable (dtype, shape).
    #[error("tensor `{name}` in {}: {what}", path.display())]
    Tensor {
        /// The tensor name.
        name: String,
        /// The file holding it.
        path: PathBuf,
        /// What is wrong, and what was expected.
        what: String,
    },
    /// Quantizing a tensor failed.
    #[error("cannot quantize tensor `{name}`")]
    Quantize {
        /// The tensor name.
        name: String,
        /// The quantizer's error.
        source: QuantError,
    },
    /// A 4-bit weight stored in bitsandbytes layout could not be read back.
    #[error("cannot read the 4-bit weight `{prefix}` from {}", dir.display())]
    Nf4 {
        /// The weight's key (e.g. `model.layers.0.self_attn.q_proj.weight`).
        prefix: String,
        /// The model folder or file.
        dir: PathBuf,
        /// What `Nf4Tensor::from_bnb` found (boxed to keep `ModelError` small).
        source: Box<QuantError>,
    },
    /// Invalid quantization settings (e.g. an unsupported blocksize).
    #[error(transparent)]
    Settings(QuantError),
    /// The output folder could not be created or committed.
    #[error(transparent)]
    Output(#[from] AtomicDirError),
    /// An error from candle while building a tensor.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An adapter could not be created for a layer.
    #[error(transparent)]
    Lora(#[from] crate::lora::LoraError),
    /// An I/O error on a path, whatever the operation.
    #[error("I/O error on {}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A tensor disagrees with the config or the model it is loaded into.
    #[error("tensor `{name}` has shape {got:?}, but {expected:?} is needed")]
    Shape {
        /// The tensor.
        name: String,
        /// What the config implies.
        expected: Vec<usize>,
        /// What the file holds.
        got: Vec<usize>,
    },
    /// A `config.json` that is unreadable as a model configuration.
    #[error("{path}: {what}")]
    Config {
        /// The config file.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// A GGUF file could not be read (header, metadata, tensor or tokenizer).
    #[error("cannot read GGUF model {}", path.display())]
    Gguf {
        /// The GGUF file.
        path: PathBuf,
        /// What the GGUF reader found; it names the key or tensor at fault.
        source: Box<crate::model::gguf::GgufError>,
    },
    /// A model file could not be fetched into the cache.
    #[error(transparent)]
    Fetch(#[from] Box<crate::model::fetch::FetchError>),
}

impl ModelError {
    /// Shorthand for [`ModelError::Invalid`] about a named thing (file, tensor or field).
    pub fn invalid(name: impl Into<String>, what: impl Into<String>) -> Self {
        ModelError::Invalid {
            path: PathBuf::from(name.into()),
            what: what.into(),
        }
    }

    /// Shorthand for [`ModelError::Io`].
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<crate::data::error::DataError> for ModelError {
    /// Data errors surface through model-level APIs (e.g. `read_token_sequences`) as
    /// [`ModelError::Invalid`] about "dataset", keeping the whole message (file and line).
    fn from(e: crate::data::error::DataError) -> Self {
        match e {
            crate::data::error::DataError::Read { path, source } => {
                ModelError::Read { path, source }
            }
            crate::data::error::DataError::Invalid { path, what } => {
                ModelError::Invalid { path, what }
            }
            crate::data::error::DataError::JsonFile { path, source } => {
                ModelError::Json { path, source }
            }
            crate::data::error::DataError::Io { path, source } => ModelError::Io { path, source },
            crate::data::error::DataError::Candle(e) => ModelError::Candle(e),
            other => {
                let mut what = other.to_string();
                let mut cause = std::error::Error::source(&other);
                while let Some(c) = cause {
                    what = format!("{what}: {c}");
                    cause = c.source();
                }
                ModelError::invalid("dataset", what)
            }
        }
    }
}
