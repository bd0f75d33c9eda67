//! The fast CPU kernels against plain references, on random shapes including awkward ones: odd
//! sizes, rows that do not hold a whole number of blocks (so blocks span rows), a short last
//! block, every blocksize, NF4 and FP4, plain and double-quantized scales.
//!
//! Dequantization must be bit-exact (`blockwise::dequantize_reference`; bf16/f16 = that, rounded
//! to nearest even). Products are compared with an f64 dequantize-then-multiply reference,
//! elementwise: `|got - want| <= 1e-5 * sum_p |a_p| * |b_p|` over the terms of that output. The
//! bound is the natural scale of a dot product's rounding error (an f32 sum of k terms is off
//! by a few ulps of the sum of magnitudes), and it is tight enough that one wrong scale, nibble
//! or row in any term shows up: such a term is a whole `|a_p| |b_p|`, not 1e-5 of the sum.

mod common;

use common::{random_values, reference, weight};
use half::{bf16, f16};
use proptest::prelude::*;
use qlora_quant::blockwise::SUPPORTED_BLOCKSIZES;
use qlora_quant::{cpu, Nf4Tensor, QuantError, QuantType};
use rand::rngs::StdRng;
use rand::SeedableRng;

const TOLERANCE: f64 = 1e-5;

/// `(want, bound)`: `c[i, j] = sum_p a(i, p) * b(p, j)` in f64, and `sum_p |a| |b|`.
fn product(
    rows: usize,
    cols: usize,
    inner: usize,
    a: impl Fn(usize, usize) -> f32,
    b: impl Fn(usize, usize) -> f32,
) -> (Vec<f64>, Vec<f64>) {
    let mut want = vec![0f64; rows * cols];
    let mut bound = vec![0f64; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            let (mut s, mut t) = (0f64, 0f64);
            for p in 0..inner {
                let v = a(i, p) as f64 * b(p, j) as f64;
                s += v;
                t += v.abs();
            }
            want[i * cols + j] = s;
            bound[i * cols + j] = t;
        }
    }
    (want, bound)
}

fn assert_close(got: &[f32], want: &[f64], bound: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (idx, ((&g, &r), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        let err = (g as f64 - r).abs();
        assert!(
            err <= TOLERANCE * b,
            "{what}: element {idx}: got {g}, want {r}, |diff| {err:e} > {TOLERANCE} × {b:e}"
        );
    }
}

fn qtype_of(fp4: bool) -> QuantType {
    if fp4 {
        QuantType::Fp4
    } else {
        QuantType::Nf4
    }
}

fn blocksize() -> impl Strategy<Value = usize> {
    prop::sample::select(SUPPORTED_BLOCKSIZES.to_vec())
}

/// Row widths: anything small and odd, multiples of 8 (the chunked GEMV path needs those) with
/// and without a partial 128-chunk, multiples of 64 (the AVX2 and bf16 GEMV kernels'), and a few
/// model-like widths.
fn width() -> impl Strategy<Value = usize> {
    prop_oneof![
        1usize..300,
        (16usize..90).prop_map(|c| 8 * c),
        (1usize..40).prop_map(|c| 64 * c),
        prop::sample::select(vec![128usize, 1000, 1024, 1032, 2048]),
    ]
}

/// Checks `matmul_into` and `matmul_t_into` on one case.
fn check_products(m: usize, w: &Nf4Tensor, seed: u64) {
    let (n, k) = w.dims2().unwrap();
    let wd = reference(w);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let x = random_values(m * k, 0, &mut rng);
    let mut y = vec![f32::NAN; m * n];
    cpu::matmul_into(&x, m, w, &mut y).unwrap();
    let (want, bound) = product(m, n, k, |i, p| x[i * k + p], |p, j| wd[j * k + p]);
    assert_close(&y, &want, &bound, &format!("matmul m {m} n {n} k {k}"));

    let dy = random_values(m * n, 0, &mut rng);
    let mut dx = vec![f32::NAN; m * k];
    cpu::matmul_t_into(&dy, m, w, &mut dx).unwrap();
    let (want, bound) = product(m, k, n, |i, j| dy[i * n + j], |j, p| wd[j * k + p]);
    assert_close(&dx, &want, &bound, &format!("matmul_t m {m} n {n} k {k}"));

    // bf16 activations meet W dequantized to bf16 (bitsandbytes' bf16 compute): the same
    // bound against that reference. A path that kept W in f32 is off by ~2^-9 of each term.
    let wd16: Vec<f32> = wd.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    let x16: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut y = vec![f32::NAN; m * n];
    cpu::matmul_bf16_into(&x16, m, w, &mut y).unwrap();
    let (want, bound) = product(
        m,
        n,
        k,
        |i, p| x16[i * k + p].to_f32(),
        |p, j| wd16[j * k + p],
    );
    assert_close(&y, &want, &bound, &format!("matmul_bf16 m {m} n {n} k {k}"));
    let dy16: Vec<bf16> = dy.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut dx = vec![f32::NAN; m * k];
    cpu::matmul_t_bf16_into(&dy16, m, w, &mut dx).unwrap();
    let (want, bound) = product(
        m,
        k,
        n,
        |i, j| dy16[i * n + j].to_f32(),
        |j, p| wd16[j * k + p],
    );
    assert_close(
        &dx,
        &want,
        &bound,
        &format!("matmul_t_bf16 m {m} n {n} k {k}"),
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn dequantize_is_bit_exact(
        n in 1usize..24,
        k in width(),
        bs in blocksize(),
        fp4 in any::<bool>(),
        double in any::<bool>(),
        flat in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let shape = if flat { vec![n * k] } else { vec![n, k] };
        let w = weight(&shape, bs, qtype_of(fp4), double, seed);
        let want = reference(&w);
        let mut got = vec![f32::NAN; w.numel()];
        cpu::dequantize_into(&w, &mut got);
        for (i, (g, r)) in got.iter().zip(&want).enumerate() {
            prop_assert_eq!(g.to_bits(), r.to_bits(), "f32 element {}", i);
        }
        let mut got = vec![bf16::NAN; w.numel()];
        cpu::dequantize_bf16_into(&w, &mut got);
        for (i, (g, r)) in got.iter().zip(&want).enumerate() {
            prop_assert_eq!(g.to_bits(), bf16::from_f32(*r).to_bits(), "bf16 element {}", i);
        }
        let mut got = vec![f16::NAN; w.numel()];
        cpu::dequantize_f16_into(&w, &mut got);
        for (i, (g, r)) in got.iter().zip(&want).enumerate() {
            prop_assert_eq!(g.to_bits(), f16::from_f32(*r).to_bits(), "f16 element {}", i);
        }
    }

    /// Few rows (the GEMV path) and many (the panel + gemm path), both orientations.
    #[test]
    fn products_match_f64_reference(
        m in prop_oneof![1usize..=8, 9usize..40],
        n in 1usize..40,
        k in width(),
        bs in blocksize(),
        fp4 in any::<bool>(),
        double in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let w = weight(&[n, k], bs, qtype_of(fp4), double, seed);
        check_products(m, &w, seed);
    }
}

/// Shapes big enough to use several panels, column ranges and GEMV tasks per thread, with k not
/// a multiple of the blocksize and a partial 128-chunk at the end of each row.
#[test]
fn products_on_multi_panel_shapes() {
    for (i, &(m, n, k, bs, double)) in [
        (37, 601, 1000, 64, true),
        (9, 300, 1032, 128, false),
        (1, 2000, 4104, 64, true),
        (8, 700, 1030, 32, false),
        (3, 513, 520, 4096, true),
        (12, 2100, 136, 128, true),
        (2, 1500, 576, 64, true),
        (1, 600, 4160, 256, true),
    ]
    .iter()
    .enumerate()
    {
        let w = weight(&[n, k], bs, QuantType::Nf4, double, i as u64);
        check_products(m, &w, i as u64);
    }
}

/// Outputs past the size where dequantization switches to streaming stores, at an odd width and
/// from a misaligned start, so alignment heads and block-straddling groups all occur.
#[test]
fn large_dequantize_is_bit_exact() {
    let w = weight(&[1031, 4100], 64, QuantType::Nf4, true, 7);
    let want = reference(&w);
    let mut buf = vec![0f32; w.numel() + 3];
    for offset in [0, 1, 3] {
        let out = &mut buf[offset..offset + w.numel()];
        cpu::dequantize_into(&w, out);
        if let Some(i) = out
            .iter()
            .zip(&want)
            .position(|(a, b)| a.to_bits() != b.to_bits())
        {
            panic!(
                "offset {offset} first bad {i} ptr {:p} got {} want {}",
                out.as_ptr(),
                out[i],
                want[i]
            );
        }
    }
    let mut buf = vec![bf16::ZERO; w.numel() + 1];
    for offset in [0, 1] {
        let out = &mut buf[offset..offset + w.numel()];
        cpu::dequantize_bf16_into(&w, out);
        let bad = out
            .iter()
            .zip(&want)
            .position(|(a, b)| a.to_bits() != bf16::from_f32(*b).to_bits());
        assert_eq!(
            bad, None,
            "bf16 output at offset {offset}: first differing element"
        );
    }
}

#[test]
fn wrong_lengths_are_errors_that_name_the_argument() {
    let w = weight(&[5, 70], 64, QuantType::Nf4, false, 1);
    let named = |r: Result<(), QuantError>, name: &str| match r {
        Err(QuantError::Invalid { name: got, .. }) => assert_eq!(got, name),
        other => panic!("expected an error about `{name}`, got {other:?}"),
    };
    let mut y = vec![0f32; 2 * 5];
    named(cpu::matmul_into(&[0.0; 139], 2, &w, &mut y), "x");
    named(cpu::matmul_into(&[0.0; 140], 2, &w, &mut y[..9]), "y");
    let mut dx = vec![0f32; 2 * 70];
    named(cpu::matmul_t_into(&[0.0; 11], 2, &w, &mut dx), "dy");
    named(cpu::matmul_t_into(&[0.0; 10], 2, &w, &mut dx[..1]), "dx");
    let flat = weight(&[350], 64, QuantType::Nf4, false, 1);
    assert!(cpu::matmul_into(&[0.0; 350], 1, &flat, &mut [0.0]).is_err());
}
