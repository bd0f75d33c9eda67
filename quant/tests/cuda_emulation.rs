//! The CUDA kernels' logic, tested without a GPU: `cuda::emulate` replays every thread of every
//! block of the launch grid with the kernels' index formulas and f32 operations, and is compared
//! here with the format's plain reference on random shapes, including awkward ones (odd sizes,
//! rows that do not hold a whole number of blocks, a short last block, every blocksize, NF4 and
//! FP4, plain and double-quantized scales).
//!
//! Dequantization must be bit-exact (bf16/f16 = the f32 reference rounded to nearest even).
//! Products are compared with an f64 reference elementwise:
//! `|got - want| <= tol × sum_p |a_p| |b_p|`, tol = 1e-5 for f32 (a few ulps of the sum of
//! magnitudes, far below one wrong term) and 2⁻⁸ for bf16 / 2⁻¹⁰ for f16 outputs (their rounding
//! of the result, half an ulp, plus the f32 accumulation), with widths kept small enough that
//! f16 cannot overflow.

mod common;

use common::{random_values, reference};
use half::{bf16, f16};
use proptest::prelude::*;
use qlora_quant::blockwise::SUPPORTED_BLOCKSIZES;
use qlora_quant::cuda::emulate::{self, KernelFloat};
use qlora_quant::cuda::geometry;
use qlora_quant::{Nf4Tensor, QuantType};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn weight(n: usize, k: usize, bs: usize, fp4: bool, double: bool, seed: u64) -> Nf4Tensor {
    let qtype = if fp4 { QuantType::Fp4 } else { QuantType::Nf4 };
    common::weight(&[n, k], bs, qtype, double, seed)
}

/// `|got - want| <= tol × sum_p |a_p b_p|` for `out[i, j] = sum_p a(i, p) b(p, j)`.
#[allow(clippy::too_many_arguments)]
fn assert_product(
    got: &[f32],
    rows: usize,
    cols: usize,
    inner: usize,
    a: impl Fn(usize, usize) -> f32,
    b: impl Fn(usize, usize) -> f32,
    tol: f64,
    what: &str,
) {
    assert_eq!(got.len(), rows * cols, "{what}: length");
    for i in 0..rows {
        for j in 0..cols {
            let (mut s, mut t) = (0f64, 0f64);
            for p in 0..inner {
                let v = a(i, p) as f64 * b(p, j) as f64;
                s += v;
                t += v.abs();
            }
            let g = got[i * cols + j] as f64;
            // 6e-8: one step of f16's subnormal range, where relative bounds stop holding.
            assert!(
                (g - s).abs() <= tol * t + 6e-8,
                "{what}: [{i}, {j}] got {g}, want {s}, |diff| {:e} > {tol} × {t:e}",
                (g - s).abs()
            );
        }
    }
}

fn to_f32s<T: KernelFloat>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

fn from_f32s<T: KernelFloat>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

/// The kernels' products in dtype `T` for one weight and `m`, against the f64 reference of the
/// same (already `T`-rounded) inputs.
fn check_products<T: KernelFloat>(w: &Nf4Tensor, m: usize, seed: u64, tol: f64) {
    let (n, k) = w.dims2().unwrap();
    let wd = reference(w);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let x: Vec<T> = from_f32s(&random_values(m * k, 0, &mut rng));
    let dy: Vec<T> = from_f32s(&random_values(m * n, 0, &mut rng));
    let (xf, dyf) = (to_f32s(&x), to_f32s(&dy));
    // The workspace holds deq(W) rounded to T, which is what cuBLAS multiplies by.
    let wt: Vec<f32> = to_f32s(&from_f32s::<T>(&wd));
    let what = format!("m {m} n {n} k {k} bs {} {:?}", w.blocksize(), w.qtype());
    if m <= geometry::GEMV_MAX_ROWS {
        let y = to_f32s(&emulate::gemv(&x, m, w).unwrap());
        let fwd = |i: usize, p: usize| xf[i * k + p];
        assert_product(
            &y,
            m,
            n,
            k,
            fwd,
            |p, j| wd[j * k + p],
            tol,
            &format!("gemv {what}"),
        );
        let dx = to_f32s(&emulate::gemv_t(&dy, m, w).unwrap());
        let bwd = |i: usize, p: usize| dyf[i * n + p];
        assert_product(
            &dx,
            m,
            k,
            n,
            bwd,
            |p, j| wd[p * k + j],
            tol,
            &format!("gemv_t {what}"),
        );
    }
    let y = emulate::matmul_via_workspace(&x, m, w, false).unwrap();
    let fwd = |i: usize, p: usize| xf[i * k + p];
    assert_product(
        &y,
        m,
        n,
        k,
        fwd,
        |p, j| wt[j * k + p],
        1e-6,
        &format!("workspace {what}"),
    );
    let dx = emulate::matmul_via_workspace(&dy, m, w, true).unwrap();
    let bwd = |i: usize, p: usize| dyf[i * n + p];
    assert_product(
        &dx,
        m,
        k,
        n,
        bwd,
        |p, j| wt[p * k + j],
        1e-6,
        &format!("workspace_t {what}"),
    );
}

/// Widths: small and odd (blocks span rows, nibbles start mid-byte), multiples of 8, and a few
/// wider than one 256-column sweep of a warp.
fn width() -> impl Strategy<Value = usize> {
    prop_oneof![
        1usize..80,
        (2usize..40).prop_map(|c| 8 * c),
        prop::sample::select(vec![255usize, 257, 512, 520]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn dequantize_emulation_is_bit_exact(
        n in 1usize..40, k in width(),
        bs in prop::sample::select(SUPPORTED_BLOCKSIZES.to_vec()),
        fp4: bool, double: bool, seed: u64,
    ) {
        let w = weight(n, k, bs, fp4, double, seed);
        let want = reference(&w);
        let got = emulate::dequantize::<f32>(&w).unwrap();
        prop_assert!(got.iter().zip(&want).all(|(g, r)| g.to_bits() == r.to_bits()));
        let got = emulate::dequantize::<bf16>(&w).unwrap();
        prop_assert!(got.iter().zip(&want).all(|(g, r)| *g == bf16::from_f32(*r)));
        let got = emulate::dequantize::<f16>(&w).unwrap();
        prop_assert!(got.iter().zip(&want).all(|(g, r)| g.to_bits() == f16::from_f32(*r).to_bits()));
    }

    #[test]
    fn product_emulation_matches_reference_f32(
        m in 1usize..12, n in 1usize..24, k in width(),
        bs in prop::sample::select(vec![32usize, 64, 128]),
        fp4: bool, double: bool, seed: u64,
    ) {
        let w = weight(n, k, bs, fp4, double, seed);
        check_products::<f32>(&w, m, seed, 1e-5);
    }

    #[test]
    fn product_emulation_matches_reference_half(
        m in 1usize..10, n in 1usize..16, k in 1usize..100,
        bs in prop::sample::select(vec![32usize, 64]),
        fp4: bool, double: bool, seed: u64,
    ) {
        let w = weight(n, k, bs, fp4, double, seed);
        check_products::<bf16>(&w, m, seed, 1.0 / 256.0);
        check_products::<f16>(&w, m, seed, 1.0 / 1024.0);
    }
}

/// More output features than one grid row of warps, more rows than GEMV_MAX_ROWS, and a
/// double-quantized weight with more than 256 blocks (so the nested scale index moves).
#[test]
fn larger_shapes_cross_grid_and_nested_block_boundaries() {
    let w = weight(67, 520, 64, false, true, 7);
    assert!(w.numel() / 64 > 256);
    check_products::<f32>(&w, 8, 1, 1e-5);
    check_products::<f32>(&w, 9, 2, 1e-5);
    let want = reference(&w);
    let got = emulate::dequantize::<f32>(&w).unwrap();
    assert!(got
        .iter()
        .zip(&want)
        .all(|(g, r)| g.to_bits() == r.to_bits()));
}

/// A wrong index formula must be caught: perturb one nibble of the packed codes and check the
/// emulated dequantization no longer matches the unperturbed reference (guards against a test
/// that compares a function with itself).
#[test]
fn emulation_sees_a_single_changed_nibble() {
    let w = weight(5, 77, 32, false, false, 3);
    let want = reference(&w);
    let mut packed = w.packed().to_vec();
    packed[100] ^= 0x10;
    let bad = Nf4Tensor::from_parts(
        w.qtype(),
        w.blocksize(),
        w.shape().to_vec(),
        w.source_dtype(),
        packed,
        w.absmax().clone(),
    )
    .unwrap();
    let got = emulate::dequantize::<f32>(&bad).unwrap();
    let diffs = got
        .iter()
        .zip(&want)
        .filter(|(g, r)| g.to_bits() != r.to_bits())
        .count();
    assert_eq!(diffs, 1);
}

#[test]
fn gemv_refuses_more_rows_than_it_holds_accumulators_for() {
    let w = weight(4, 64, 64, false, false, 1);
    let x = vec![0f32; 9 * 64];
    assert!(emulate::gemv(&x, 9, &w).is_err());
    assert!(emulate::gemv_t(&x[..9 * 4], 9, &w).is_err());
}

/// The `#define`s in the .cu files are the numbers the launch code and the emulation use.
#[test]
fn kernel_defines_match_geometry() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels");
    let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).unwrap();
    let define = |src: &str, name: &str| -> usize {
        src.lines()
            .find_map(|l| l.strip_prefix(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("#define {name} not found"))
            .trim()
            .parse()
            .unwrap()
    };
    let deq = read("nf4_dequantize.cu");
    assert_eq!(
        define(&deq, "QLORA_DEQ_THREADS"),
        geometry::DEQ_THREADS as usize
    );
    assert_eq!(
        define(&deq, "QLORA_DEQ_ELEMS_PER_THREAD"),
        geometry::DEQ_ELEMS_PER_THREAD
    );
    let gemv = read("nf4_gemv.cu");
    assert_eq!(
        define(&gemv, "QLORA_GEMV_MAX_ROWS"),
        geometry::GEMV_MAX_ROWS
    );
    assert_eq!(
        define(&gemv, "QLORA_GEMV_WARPS"),
        geometry::GEMV_WARPS as usize
    );
    assert_eq!(define(&gemv, "QLORA_GEMV_RUN"), geometry::GEMV_RUN);
    assert_eq!(
        define(&gemv, "QLORA_GEMV_T_THREADS"),
        geometry::GEMV_T_THREADS as usize
    );
    let decode = read("nf4_decode.cuh");
    assert_eq!(
        define(&decode, "QLORA_NESTED_BLOCKSIZE"),
        qlora_quant::double_quant::NESTED_BLOCKSIZE
    );
    // The GEMV kernels find a block with a shift: every blocksize must be a power of two.
    assert!(SUPPORTED_BLOCKSIZES.iter().all(|bs| bs.is_power_of_two()));
    // Every blocksize is a multiple of a dequantization thread's run (one scale per thread).
    assert!(SUPPORTED_BLOCKSIZES
        .iter()
        .all(|bs| bs % geometry::DEQ_ELEMS_PER_THREAD == 0));
    // The GEMV kernels must agree with the CPU kernels on where m stops being "small".
    assert_eq!(geometry::GEMV_MAX_ROWS, 8);
}

#[test]
fn launch_geometry_covers_exactly_the_work() {
    for numel in [1usize, 2047, 2048, 2049, 1 << 20] {
        let l = geometry::dequantize_launch(numel).unwrap();
        let per_block = l.block as usize * geometry::DEQ_ELEMS_PER_THREAD;
        assert!(l.grid as usize * per_block >= numel);
        assert!((l.grid as usize - 1) * per_block < numel);
    }
    for n in [1usize, 3, 4, 5, 4096] {
        let l = geometry::gemv_launch(n).unwrap();
        assert_eq!(l.block, geometry::GEMV_WARPS * geometry::WARP);
        assert_eq!(l.grid as usize, n.div_ceil(geometry::GEMV_WARPS as usize));
    }
    for k in [1usize, 255, 256, 257] {
        let l = geometry::gemv_t_launch(k).unwrap();
        assert_eq!(
            l.grid as usize,
            k.div_ceil(geometry::GEMV_T_THREADS as usize)
        );
    }
}
