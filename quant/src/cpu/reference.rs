//! Plain references the kernels of each instruction-set level are tested against: dequantize
//! with `blockwise::dequantize_reference`, then multiply in f64.

use crate::blockwise::dequantize_reference;
use crate::codebook::QuantType;
use crate::tensor::{Nf4Tensor, SourceDtype};

/// A random `[n, k]` weight whose rows differ in scale by orders of magnitude.
pub(crate) fn weight(
    n: usize,
    k: usize,
    bs: usize,
    qtype: QuantType,
    double: bool,
    seed: u64,
) -> Nf4Tensor {
    let data = values(n * k, seed)
        .iter()
        .enumerate()
        .map(|(i, v)| v * 10f32.powi((i / k.max(1)) as i32 % 5 - 2))
        .collect::<Vec<_>>();
    Nf4Tensor::quantize(&data, &[n, k], SourceDtype::F32, qtype, bs, double).unwrap()
}

/// Deterministic values in [-1.5, 1.5).
pub(crate) fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
        })
        .collect()
}

fn dequantized(w: &Nf4Tensor) -> Vec<f32> {
    dequantize_reference(
        w.packed(),
        &w.absmax().to_f32(),
        w.numel(),
        w.blocksize(),
        w.qtype(),
    )
}

/// Assert `got = x · deq(W)ᵀ` (or `x · deq(W)` when `transposed`) elementwise within
/// `1e-5 · Σ|x||w|` of the f64 product.
pub(crate) fn assert_product(
    x: &[f32],
    m: usize,
    w: &Nf4Tensor,
    transposed: bool,
    got: &[f32],
    what: &str,
) {
    assert_product_against(x, m, w, &dequantized(w), transposed, got, what);
}

/// [`assert_product`] with W dequantized to bf16 (`deq_bf16(W)`, the products of the bf16
/// paths); `x` must hold bf16 values.
pub(crate) fn assert_product_bf16(
    x: &[f32],
    m: usize,
    w: &Nf4Tensor,
    transposed: bool,
    got: &[f32],
    what: &str,
) {
    let wd: Vec<f32> = dequantized(w)
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect();
    assert_product_against(x, m, w, &wd, transposed, got, what);
}

fn assert_product_against(
    x: &[f32],
    m: usize,
    w: &Nf4Tensor,
    wd: &[f32],
    transposed: bool,
    got: &[f32],
    what: &str,
) {
    let (n, k) = w.dims2().unwrap();
    let (inner, outer) = if transposed { (n, k) } else { (k, n) };
    for i in 0..m {
        for o in 0..outer {
            let (mut s, mut t) = (0f64, 0f64);
            for p in 0..inner {
                let wv = if transposed {
                    wd[p * k + o]
                } else {
                    wd[o * k + p]
                };
                let v = x[i * inner + p] as f64 * wv as f64;
                s += v;
                t += v.abs();
            }
            let g = got[i * outer + o] as f64;
            assert!(
                (g - s).abs() <= 1e-5 * t,
                "{what}: [{i}, {o}] got {g}, want {s} (Σ|x||w| {t})"
            );
        }
    }
}
