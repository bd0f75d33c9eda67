//! Helpers shared by the kernel test files: random weights whose block scales differ widely,
//! and the plain dequantization they are checked against.

use qlora_quant::blockwise::dequantize_reference;
use qlora_quant::{Nf4Tensor, QuantType, SourceDtype};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Roughly normal values; with `row > 0`, every `row` values a new spread (10^-2 .. 10^2), so
/// rows' block scales differ widely.
pub fn random_values(len: usize, row: usize, rng: &mut StdRng) -> Vec<f32> {
    let mut spread = 1.0f32;
    (0..len)
        .map(|i| {
            if row > 0 && i % row == 0 {
                spread = 10f32.powf(rng.random_range(-2.0..2.0));
            }
            let u: f32 = (0..4).map(|_| rng.random::<f32>()).sum::<f32>() - 2.0;
            u * spread
        })
        .collect()
}

/// A random weight of `shape` quantized with `bs`, `qtype` and optional double quantization.
pub fn weight(shape: &[usize], bs: usize, qtype: QuantType, double: bool, seed: u64) -> Nf4Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let numel: usize = shape.iter().product();
    let row = *shape.last().unwrap_or(&1);
    let data = random_values(numel, row, &mut rng);
    Nf4Tensor::quantize(&data, shape, SourceDtype::F32, qtype, bs, double).unwrap()
}

/// `w` dequantized by the format's plain reference.
pub fn reference(w: &Nf4Tensor) -> Vec<f32> {
    dequantize_reference(
        w.packed(),
        &w.absmax().to_f32(),
        w.numel(),
        w.blocksize(),
        w.qtype(),
    )
}
