//! Data: tokenizers and chat templates, dataset formats, packing and masking.

pub mod batch;
pub mod batches;
pub mod conversation;
pub mod corpus;
pub mod dataset;
pub mod error;
pub mod example;
pub mod format;
pub mod labelled;
pub mod packing;
pub mod prompt;
pub mod record;
pub mod split;
pub mod tokenizer;
