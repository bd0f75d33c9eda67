//! Fused products for many activation rows: `y = x · deq(W)ᵀ` and `dx = dy · deq(W)`.
//!
//! A panel of W is decoded into a per-thread scratch buffer and handed to the `gemm` crate, so
//! each weight is decoded once per product and W never exists whole in f32. Threads take
//! disjoint panels and write disjoint outputs; each `gemm` call is single-threaded (two threads
//! splitting one small `gemm` synchronize far more often than two independent panels do).
//!
//! Layouts are chosen so `gemm` finds W column-major in its left operand (its micro-panels are
//! columns of W rows) and need not gather it: the forward panel is decoded transposed, `[k, rows]`;
//! the backward panel `[rows, cols]` already is, seen from `gemm`'s side.

use gemm::Parallelism;
use rayon::prelude::*;

use super::decode::{decode, decode_transposed, round_to_bf16};
use super::isa::Isa;
use super::scratch::with_scratch;
use crate::tensor::Nf4Tensor;

/// A pointer that tasks writing disjoint elements may share.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: only used for writes to disjoint regions, joined before the owner reads.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// By-value access, so closures capture the whole `Shared` (which is `Send`), not the field.
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// Rows of W per forward panel: 64 rows × k = 4096 is 1 MiB of f32, about an L2, and one `gemm`
/// call's worth of work (2·m·64·k FLOP) dwarfs its setup. Measured 48..256 within noise.
const PANEL_ROWS: usize = 64;

/// Backward panels: 128 columns of W × up to 2048 rows is 1 MiB of f32.
const PANEL_COLS: usize = 128;
const PANEL_COL_ROWS: usize = 2048;

/// Fewest activation rows a task multiplies when panels are split by rows (below this the
/// repeated decode and `gemm` setup would outweigh the balance gained).
const MIN_CHUNK_ROWS: usize = 32;

/// Row ranges of x each panel is split into, so that `panels × chunks` tasks divide evenly over
/// the rayon threads. A small model's projections have few panels (SmolLM2's k/v: 3, its q/o: 9)
/// and one panel per task left a thread idle for a third or a ninth of the product on two
/// threads; a split panel is decoded once per range (a 1/m share of the work).
fn row_chunks(panels: usize, m: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let (mut a, mut b) = (panels.max(1), threads);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    (threads / a).min(m / MIN_CHUNK_ROWS).max(1)
}

/// Rows `[start, end)` of range `q` of `chunks` over `m` rows.
fn chunk_rows(m: usize, chunks: usize, q: usize) -> (usize, usize) {
    (m * q / chunks, m * (q + 1) / chunks)
}

/// `y[m, n] = x[m, k] · deq(W)ᵀ`; shapes are checked by the caller. With `round_bf16` every
/// decoded weight is rounded to bf16 first (`deq_bf16(W)`, bitsandbytes' bf16 compute).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: &Nf4Tensor,
    n: usize,
    k: usize,
    y: &mut [f32],
    round_bf16: bool,
) {
    let rows = PANEL_ROWS.min(n);
    let out = Shared(y.as_mut_ptr());
    let panels = n.div_ceil(rows);
    let chunks = row_chunks(panels, m);
    (0..panels * chunks).into_par_iter().for_each(|task| {
        let (p, (r0, r1)) = (task / chunks, chunk_rows(m, chunks, task % chunks));
        let j0 = p * rows;
        let nb = rows.min(n - j0);
        with_scratch(nb * k, |panel| {
            decode_transposed(isa, w, k, j0..j0 + nb, panel, nb);
            if round_bf16 {
                round_to_bf16(panel);
            }
            // SAFETY: y is [m, n] row-major and this task owns rows r0 .. r1 of columns
            // j0 .. j0 + nb; x is [m, k]; the panel holds W[j0 .. j0 + nb, ..]ᵀ as [k, nb].
            unsafe {
                gemm::gemm(
                    r1 - r0,
                    nb,
                    k,
                    out.ptr().add(r0 * n + j0),
                    1,
                    n as isize,
                    false,
                    x.as_ptr().add(r0 * k),
                    1,
                    k as isize,
                    panel.as_ptr(),
                    1,
                    nb as isize,
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

/// `dx[m, k] = dy[m, n] · deq(W)`; shapes are checked by the caller (`round_bf16` as in
/// [`matmul`]).
///
/// Tasks own column ranges of W (and so of dx). A range cuts each row of W mid-block wherever it
/// likes: the decoder starts at any element.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_t(
    isa: Isa,
    dy: &[f32],
    m: usize,
    w: &Nf4Tensor,
    n: usize,
    k: usize,
    dx: &mut [f32],
    round_bf16: bool,
) {
    let cols = PANEL_COLS.min(k);
    let out = Shared(dx.as_mut_ptr());
    let panels = k.div_ceil(cols);
    let chunks = row_chunks(panels, m);
    (0..panels * chunks).into_par_iter().for_each(|task| {
        let (t, (r0, r1)) = (task / chunks, chunk_rows(m, chunks, task % chunks));
        let p0 = t * cols;
        let kw = cols.min(k - p0);
        let rows = PANEL_COL_ROWS.min(n);
        with_scratch(rows * kw, |scratch| {
            for j0 in (0..n).step_by(rows) {
                let nb = rows.min(n - j0);
                let panel = &mut scratch[..nb * kw];
                for (j, row) in panel.chunks_exact_mut(kw).enumerate() {
                    decode(isa, w, (j0 + j) * k + p0, row, false);
                }
                if round_bf16 {
                    round_to_bf16(panel);
                }
                // SAFETY: dx is [m, k] row-major and this task owns rows r0 .. r1 of columns
                // p0 .. p0 + kw; dy is [m, n], of which columns j0 .. j0 + nb meet the panel
                // W[j0 .. j0 + nb, p0 .. p0 + kw]. Later row ranges of W accumulate onto the first.
                unsafe {
                    gemm::gemm(
                        r1 - r0,
                        kw,
                        nb,
                        out.ptr().add(r0 * k + p0),
                        1,
                        k as isize,
                        j0 > 0,
                        dy.as_ptr().add(r0 * n + j0),
                        1,
                        n as isize,
                        panel.as_ptr(),
                        1,
                        kw as isize,
                        1.0f32,
                        1.0f32,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    )
                }
            }
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codebook::QuantType;
    use crate::cpu::reference::{assert_product, assert_product_bf16, values, weight};

    #[test]
    fn panels_split_by_rows_divide_over_the_threads_and_match_the_reference() {
        // n 150: 3 forward panels; k 300: 3 backward panels; m 160 rows to split.
        let (m, n, k) = (160, 150, 300);
        let w = weight(n, k, 64, QuantType::Nf4, true, 9);
        let (x, dy) = (values(m * k, 3), values(m * n, 4));
        for threads in [1, 2, 3, 4] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let chunks = row_chunks(3, m);
                assert_eq!(
                    (3 * chunks) % threads,
                    0,
                    "{threads} threads: {chunks} chunks"
                );
                assert_eq!(row_chunks(3, 40), 1, "too few rows to split");
                assert_eq!(row_chunks(8, m), if threads == 3 { 3 } else { 1 });
                for isa in Isa::available() {
                    let what = format!("{isa:?} {threads} threads, {chunks} row ranges");
                    let mut y = vec![f32::NAN; m * n];
                    matmul(isa, &x, m, &w, n, k, &mut y, false);
                    assert_product(&x, m, &w, false, &y, &what);
                    let mut dx = vec![f32::NAN; m * k];
                    matmul_t(isa, &dy, m, &w, n, k, &mut dx, false);
                    assert_product(&dy, m, &w, true, &dx, &what);
                }
            });
        }
        // Ranges cover every row once.
        let covered: Vec<(usize, usize)> = (0..3).map(|q| chunk_rows(100, 3, q)).collect();
        assert_eq!(covered, [(0, 33), (33, 66), (66, 100)]);
    }

    #[test]
    fn every_isa_matches_the_reference() {
        let shapes = [
            (9, 37, 1000, 64, true, QuantType::Nf4),
            (20, 300, 130, 32, false, QuantType::Fp4),
            (13, 5, 4097, 4096, true, QuantType::Nf4),
            (10, 2100, 40, 32, true, QuantType::Nf4),
        ];
        for isa in Isa::available() {
            for (t, &(m, n, k, bs, double, qtype)) in shapes.iter().enumerate() {
                let w = weight(n, k, bs, qtype, double, t as u64);
                let what = format!("{isa:?} m {m} n {n} k {k} bs {bs}");
                let x = values(m * k, 1);
                let mut y = vec![f32::NAN; m * n];
                matmul(isa, &x, m, &w, n, k, &mut y, false);
                assert_product(&x, m, &w, false, &y, &what);
                let dy = values(m * n, 2);
                let mut dx = vec![f32::NAN; m * k];
                matmul_t(isa, &dy, m, &w, n, k, &mut dx, false);
                assert_product(&dy, m, &w, true, &dx, &what);
                // The bf16 compute path: the same products against deq_bf16(W).
                matmul(isa, &x, m, &w, n, k, &mut y, true);
                assert_product_bf16(&x, m, &w, false, &y, &what);
                matmul_t(isa, &dy, m, &w, n, k, &mut dx, true);
                assert_product_bf16(&dy, m, &w, true, &dx, &what);
            }
        }
    }
}
