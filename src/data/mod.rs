//! Data: tokenizers and chat templates, dataset formats, packing and masking.

pub mod dataset;
pub mod tokenizer;
