//! Optimizers over adapter parameters only.

pub mod adamw;
pub mod schedule;

pub use adamw::{AdamW, AdamWConfig};
