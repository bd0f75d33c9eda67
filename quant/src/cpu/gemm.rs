//! Fused products for many activation rows: `y = x · deq(W)ᵀ` and `dx = dy · deq(W)`.
//!
//! A panel of W is decoded into a per-thread scratch buffer and handed to the `gemm` crate, so
//! each weight is decoded once per product and W never exists whole in f32. Threads take
//! disjoint panels and write disjoint outputs; each `gemm` call is single-threaded.

use gemm::Parallelism;
use rayon::prelude::*;

use super::decode::decode;
use super::isa::Isa;
use super::scratch::with_scratch;
use crate::tensor::Nf4Tensor;

/// A pointer that tasks writing disjoint elements may share.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: only used for writes to disjoint regions, joined before the owner reads.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

fn tunable(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `y[m, n] = x[m, k] · deq(W)ᵀ`; shapes are checked by the caller.
pub(crate) fn matmul(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: &Nf4Tensor,
    n: usize,
    k: usize,
    y: &mut [f32],
) {
    let rows = tunable("QP_ROWS", 256).min(n).max(1);
    let out = Shared(y.as_mut_ptr());
    (0..n.div_ceil(rows)).into_par_iter().for_each(|p| {
        let j0 = p * rows;
        let nb = rows.min(n - j0);
        let out = out;
        with_scratch(nb * k, |panel| {
            decode(isa, w, j0 * k, panel, false);
            // SAFETY: y is [m, n] row-major and this task owns columns j0 .. j0 + nb; x is
            // [m, k], the panel [nb, k], read as its transpose [k, nb].
            unsafe {
                gemm::gemm(
                    m,
                    nb,
                    k,
                    out.0.add(j0),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    panel.as_ptr(),
                    k as isize,
                    1,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    Parallelism::None,
                )
            }
        });
    });
}

/// `dx[m, k] = dy[m, n] · deq(W)`; shapes are checked by the caller.
///
/// Tasks own column ranges of W (and so of dx). A range cuts each row of W mid-block wherever it
/// likes: the decoder starts at any element.
pub(crate) fn matmul_t(
    isa: Isa,
    dy: &[f32],
    m: usize,
    w: &Nf4Tensor,
    n: usize,
    k: usize,
    dx: &mut [f32],
) {
    let cols = tunable("QPT_COLS", 128).min(k).max(1);
    let out = Shared(dx.as_mut_ptr());
    (0..k.div_ceil(cols)).into_par_iter().for_each(|t| {
        let p0 = t * cols;
        let kw = cols.min(k - p0);
        let out = out;
        with_scratch(n * kw, |panel| {
            for (j, row) in panel.chunks_exact_mut(kw).enumerate() {
                decode(isa, w, j * k + p0, row, false);
            }
            // SAFETY: dx is [m, k] row-major and this task owns columns p0 .. p0 + kw; dy is
            // [m, n], the panel [n, kw].
            unsafe {
                gemm::gemm(
                    m,
                    kw,
                    n,
                    out.0.add(p0),
                    1,
                    k as isize,
                    false,
                    dy.as_ptr(),
                    1,
                    n as isize,
                    panel.as_ptr(),
                    1,
                    kw as isize,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    Parallelism::None,
                )
            }
        });
    });
}
