//! Optimizers over adapter parameters only, with their state in plain memory, in pages under a
//! resident budget, or in 8 bits.

pub mod adamw;
pub mod blockwise8;
pub mod dynamic_code;
pub mod mmap_page_store;
pub mod page_store;
pub mod schedule;
pub mod state;
pub mod update;

pub use adamw::{AdamW, AdamWConfig};
pub use mmap_page_store::MmapPageStore;
pub use page_store::{PageStats, PageStore, Region};
pub use state::StateStorage;
