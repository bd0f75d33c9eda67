//! Models: configs, loaders, the families (one file each) over one interface
//! ([`transformer::Family`]), and linear layers over 4-bit or dense bases.
pub mod attention;
pub mod bert;
pub mod checkpoint;
pub mod classifier;
pub mod config;
pub mod error;
pub mod fetch;
pub mod generate;
pub mod gguf;
pub mod gguf_config;
pub mod gguf_tokenizer;
pub mod gpt2;
pub mod inspect;
pub mod layer_norm;
pub mod linear;
pub mod llama;
pub mod loader;
pub mod ops;
pub mod quantize;
pub mod random_source;
pub mod shard_writer;
pub mod transformer;
