//! Optimizers over adapter parameters only, with their state in plain memory, in pages under a
//! resident budget, or in 8 bits.

pub mod adamw;
pub mod blockwise8;
#[cfg(feature = "cuda")]
pub mod cuda_page_store;
#[cfg(feature = "cuda")]
mod device_window;
pub mod dynamic_code;
pub mod mmap_page_store;
pub mod page_store;
pub mod residency;
pub mod schedule;
pub mod state;
pub mod tensor_update;
pub mod update;

pub use adamw::{AdamW, AdamWConfig};
#[cfg(feature = "cuda")]
pub use cuda_page_store::CudaPageStore;
pub use mmap_page_store::MmapPageStore;
pub use page_store::{PageStats, PageStore, Region};
pub use state::{StateStorage, UpdateEngine};
