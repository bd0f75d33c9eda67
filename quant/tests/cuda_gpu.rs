//! The real CUDA kernels against their CPU emulation and the CPU path (`cargo test --features
//! cuda`). Each test skips, printing why, when no CUDA device can be opened (as on machines
//! without a GPU, where the CUDA libraries are the build stubs of `scripts/cuda-env.sh`).
#![cfg(feature = "cuda")]

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use half::bf16;
use qlora_quant::cuda::emulate;
use qlora_quant::{nf4_linear, Nf4Tensor, QuantType, SourceDtype};

/// The first CUDA device, or `None` after printing why the test is skipped.
fn gpu(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            let why = e.to_string();
            let why = why.lines().next().unwrap_or("unknown error");
            eprintln!("skipping {test}: no CUDA device ({why})");
            None
        }
    }
}

fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
        })
        .collect()
}

fn weight(n: usize, k: usize, bs: usize, qtype: QuantType, double: bool) -> Arc<Nf4Tensor> {
    let w = Nf4Tensor::quantize(
        &values(n * k, 11),
        &[n, k],
        SourceDtype::F32,
        qtype,
        bs,
        double,
    );
    Arc::new(w.expect("valid weight"))
}

/// Awkward shapes: odd widths, rows straddling blocks, more than 256 blocks (nested scales).
fn weights() -> Vec<Arc<Nf4Tensor>> {
    vec![
        weight(37, 77, 32, QuantType::Nf4, true),
        weight(67, 520, 64, QuantType::Nf4, true),
        weight(20, 300, 128, QuantType::Fp4, false),
        weight(96, 257, 64, QuantType::Fp4, true),
    ]
}

#[test]
fn gpu_dequantize_is_bit_exact() {
    let Some(dev) = gpu("gpu_dequantize_is_bit_exact") else {
        return;
    };
    for w in weights() {
        let t = qlora_quant::cuda::dequantize_tensor(&w, DType::F32, &dev).unwrap();
        assert_eq!(t.dims(), w.shape());
        let got = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = emulate::dequantize::<f32>(&w).unwrap();
        assert!(got
            .iter()
            .zip(&want)
            .all(|(g, r)| g.to_bits() == r.to_bits()));
        let t = qlora_quant::cuda::dequantize_tensor(&w, DType::BF16, &dev).unwrap();
        let got = t.flatten_all().unwrap().to_vec1::<bf16>().unwrap();
        assert_eq!(got, emulate::dequantize::<bf16>(&w).unwrap());
    }
}

/// f32 GEMV on the GPU equals the emulation bit for bit (same operations in the same order).
#[test]
fn gpu_gemv_equals_emulation() {
    let Some(dev) = gpu("gpu_gemv_equals_emulation") else {
        return;
    };
    for w in weights() {
        let (n, k) = w.dims2().unwrap();
        for m in [1usize, 3, 8] {
            let x = values(m * k, m as u64);
            let xt = Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
            let y = nf4_linear(&xt, &w)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = emulate::gemv(&x, m, &w).unwrap();
            assert!(
                y.iter().zip(&want).all(|(g, r)| g.to_bits() == r.to_bits()),
                "gemv m {m}"
            );
            let dy = values(m * n, 99 + m as u64);
            let dyt = Var::from_vec(dy.clone(), (m, n), &dev).unwrap();
            let dx = emulate::gemv_t(&dy, m, &w).unwrap();
            let xv = Var::from_tensor(&xt).unwrap();
            let out = nf4_linear(xv.as_tensor(), &w).unwrap();
            let grads = (out * dyt.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let got = grads.get(xv.as_tensor()).unwrap().flatten_all().unwrap();
            let got = got.to_vec1::<f32>().unwrap();
            // d(sum(out * dy))/d(out) = dy exactly, so the op's backward runs gemv_t on dy.
            assert!(
                got.iter().zip(&dx).all(|(g, r)| g.to_bits() == r.to_bits()),
                "gemv_t m {m}"
            );
        }
    }
}

/// Training-size bf16 products (workspace + cuBLAS) against the CPU op in f32.
#[test]
fn gpu_workspace_matmul_matches_cpu() {
    let Some(dev) = gpu("gpu_workspace_matmul_matches_cpu") else {
        return;
    };
    for w in weights() {
        let (_, k) = w.dims2().unwrap();
        let m = 64;
        let x = Tensor::from_vec(values(m * k, 5), (m, k), &Device::Cpu).unwrap();
        let x16 = x.to_dtype(DType::BF16).unwrap();
        let want = nf4_linear(&x16.to_dtype(DType::F32).unwrap(), &w).unwrap();
        let got = nf4_linear(&x16.to_device(&dev).unwrap(), &w).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let got = got
            .to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (g, r) in got.iter().zip(&want) {
            // bf16 workspace and output: a few bf16 ulps of the largest output.
            assert!((g - r).abs() <= 2e-2 * scale, "{g} vs {r}");
        }
    }
}
