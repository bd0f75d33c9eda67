//! Launch geometry of the CUDA kernels: how many thread blocks of how many threads, and what one
//! thread does. Shared by the launch code and the CPU emulation, so both use the same numbers;
//! the kernels' `#define`s are checked against these constants by `tests/cuda_emulation.rs`.

/// Threads per block of `nf4_dequantize_*`.
pub const DEQ_THREADS: u32 = 256;
/// Consecutive elements one dequantization thread expands (a divisor of every blocksize, so
/// they share one scale).
pub const DEQ_ELEMS_PER_THREAD: usize = 8;
/// Largest `m` the GEMV kernels take; larger products dequantize into a workspace for cuBLAS.
pub const GEMV_MAX_ROWS: usize = 8;
/// Warps (= output features) per block of `nf4_gemv_*`.
pub const GEMV_WARPS: u32 = 4;
/// Consecutive columns a GEMV lane decodes before moving 32 runs on.
pub const GEMV_RUN: usize = 8;
/// Threads (= columns) per block of `nf4_gemv_t_*`.
pub const GEMV_T_THREADS: u32 = 256;
/// Threads of a warp.
pub const WARP: u32 = 32;

/// A kernel launch: `grid` blocks of `block` threads (1-D).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Thread blocks (`gridDim.x`).
    pub grid: u32,
    /// Threads per block (`blockDim.x`).
    pub block: u32,
}

/// Blocks needed to cover `items` with `per_block` each, or `None` past the 2³¹−1 grid limit.
fn blocks(items: usize, per_block: usize) -> Option<u32> {
    u32::try_from(items.div_ceil(per_block))
        .ok()
        .filter(|&g| g < (1 << 31))
}

/// Geometry of dequantizing `numel` weights.
pub fn dequantize_launch(numel: usize) -> Option<Launch> {
    let per_block = DEQ_THREADS as usize * DEQ_ELEMS_PER_THREAD;
    Some(Launch {
        grid: blocks(numel, per_block)?.max(1),
        block: DEQ_THREADS,
    })
}

/// Geometry of `y = x · deq(W)ᵀ` for a weight with `n` output features (one warp each).
pub fn gemv_launch(n: usize) -> Option<Launch> {
    Some(Launch {
        grid: blocks(n, GEMV_WARPS as usize)?.max(1),
        block: GEMV_WARPS * WARP,
    })
}

/// Geometry of `dx = dy · deq(W)` for a weight with `k` input features (one thread each).
pub fn gemv_t_launch(k: usize) -> Option<Launch> {
    Some(Launch {
        grid: blocks(k, GEMV_T_THREADS as usize)?.max(1),
        block: GEMV_T_THREADS,
    })
}

/// How the dequantized `[n, k]` workspace is shown to the matmul as its right-hand side:
/// `(shape, strides)` of `deq(W)ᵀ` (`[k, n]`, a transposed view) for the forward product, of
/// `deq(W)` itself (`[n, k]`) for the backward one. No copy either way: cuBLAS takes both.
pub fn workspace_rhs(n: usize, k: usize, transposed: bool) -> ([usize; 2], [usize; 2]) {
    if transposed {
        ([n, k], [k, 1])
    } else {
        ([k, n], [1, k])
    }
}
