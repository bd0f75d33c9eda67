//! LoRA adapter math, knowing no model: configuration, the adapter on one linear layer (LoRA,
//! rsLoRA, DoRA), its dropout and fused CPU op, initialisation, and folding it into one weight.
//! Walking a model to attach, load, save or merge adapters is [`crate::peft`]'s job.

pub mod adalora;
pub mod adapter;
pub mod config;
pub mod dropout;
pub mod embedding;
pub mod fused;
pub mod init;
pub mod merge;

pub use adapter::{DropoutSeed, LoraAdapter};
pub use config::{parse_targets, LoraConfig, LoraInit};

use qlora_quant::QuantError;

/// What can go wrong creating an adapter.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// A setting does not fit the layer.
    #[error("{what}: {why}")]
    Invalid {
        /// The setting or step.
        what: String,
        /// What is wrong.
        why: String,
    },
    /// Re-quantizing the base (PiSSA on a 4-bit layer) failed.
    #[error(transparent)]
    Quant(#[from] QuantError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl LoraError {
    /// An invalid setting.
    pub fn invalid(what: impl Into<String>, why: impl Into<String>) -> Self {
        Self::Invalid {
            what: what.into(),
            why: why.into(),
        }
    }
}
