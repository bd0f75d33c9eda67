//! `qlora`: QLoRA fine-tuning on a frozen NF4 base with 16-bit LoRA adapters.
//!
//! The 4-bit formats and kernels live in the `qlora-quant` crate (re-exported as [`quant`]);
//! this crate holds models, adapters, training, export and the CLI.

pub use qlora_quant as quant;

pub mod alloc;
pub mod atomic_dir;
pub mod classify;
pub mod cli;
pub mod compare;
pub mod contained;
pub mod cpu_tensor;
pub mod data;
pub mod device;
pub mod distributed;
pub mod eval;
pub mod export;
pub mod frozen;
pub mod hub;
pub mod json_fields;
pub mod lora;
pub mod model;
pub mod optim;
pub mod peft;
pub mod plan;
pub mod profile;
pub mod train;
