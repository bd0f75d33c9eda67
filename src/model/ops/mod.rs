//! Fused CPU forward/backward ops for the decoder's non-matmul math (f32).
//!
//! The composite versions in `llama.rs` (built from candle primitives) stay as the reference and
//! the path for other dtypes and devices; these ops compute the same values in one
//! multi-threaded pass each and carry their own backward, so a training step does not spend its
//! time in candle's single-threaded elementwise kernels and their fresh allocations.

pub mod attention;
pub mod exp;
pub mod rms_norm;
pub mod swiglu;

pub use crate::cpu_tensor::fused_applies;
pub(crate) use crate::cpu_tensor::{f32_slice, with_f32, SharedMut};
