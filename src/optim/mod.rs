//! Optimizers over adapter parameters only.

pub mod adamw;

pub use adamw::{AdamW, AdamWConfig};
