//! The CUDA backend of the NF4 kernels.
//!
//! Kernels live in `quant/kernels/*.cu` (one file per family: dequantization, small-m GEMV and
//! its transpose), compiled to PTX by `build.rs` when the `cuda` feature is on. The launch code
//! (`launch`, feature-gated) is what `Nf4MatMul::cuda_fwd` calls; the `geometry` it launches
//! with and the `emulate`d kernels are compiled always, so the index arithmetic is tested on
//! machines without a GPU.
//!
//! # Training-size products: workspace + cuBLAS, not a fused kernel
//!
//! For `m > 8` (training: m = batch × sequence, 512–4096) the choice is between dequantizing
//! tiles of W into shared memory inside our own matmul, and dequantizing all of W once into a
//! reused bf16 workspace and calling cuBLAS (through candle's matmul). Counting one
//! `[m = 2048, k = 4096] · [4096 × 4096]ᵀ` product on an RTX 3090 class GPU (936 GB/s;
//! ~71 TFLOP/s dense bf16 tensor-core peak, cuBLAS reaching ~60–65 % of it at this size; an
//! RTX 4090 is ~1 TB/s and ~165 TFLOP/s):
//!
//! - FLOPs: 2·m·n·k = 68.7 GFLOP → ~1.5 ms at what cuBLAS reaches on a 3090 (~0.7 ms on a 4090).
//! - Workspace path, extra traffic: read 8.4 MB of codes + scales, write 33.6 MB of bf16, and
//!   cuBLAS reads those 33.6 MB back: ~75 MB ≈ 0.08 ms, 5 % of the product (the dequantize
//!   kernel is a pure stream). Smaller m shrinks the FLOPs, not the 0.08 ms: at m = 512 the
//!   overhead is ~20 %, still small, and at m ≤ 8 the GEMV kernels take over anyway.
//! - Fused path: saves that 5–20 %, but only if our own tiled tensor-core kernel (ldmatrix/mma,
//!   multi-stage cp.async pipelines, swizzled shared memory, per-arch tuning for sm_80/86/89/90)
//!   matches cuBLAS; a straightforward shared-memory tiled kernel reaches 30–50 % of cuBLAS, which
//!   loses 2× on FLOPs to save 5 % on bytes. And it cannot be tuned or even run here.
//! - Memory: the workspace is one bf16 copy of the largest W (33.6 MB for 4096², 117 MB for a
//!   14336 × 4096 MLP weight), reused by every layer, which is small next to a 24 GB card.
//!
//! So the workspace path wins until someone writes (and can measure) a cuBLAS-class fused kernel;
//! bitsandbytes makes the same choice for its training path (dequantize, then `torch.matmul`).
//! The backward product `dy · deq(W)` reuses the same workspace read without transposition.

pub mod emulate;
pub mod geometry;
#[cfg(feature = "cuda")]
mod launch;

#[cfg(feature = "cuda")]
pub use launch::{dequantize_on_device, dequantize_tensor, forward};

/// The PTX of each kernel file, as compiled by `build.rs` (`NF4_DEQUANTIZE`, `NF4_GEMV`).
#[cfg(feature = "cuda")]
pub mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}
