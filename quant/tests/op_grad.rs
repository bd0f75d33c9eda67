//! The candle op: forward equals a dense matmul with the dequantized weight, and autograd gives
//! `x` the right gradient (checked against a dense f64 reference and finite differences) while the
//! frozen weight gets none.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use qlora_quant::{nf4_linear, Nf4Tensor, QuantType, SourceDtype};

/// Deterministic pseudo-random values in [-1, 1) (an LCG, so the test needs no RNG crate state).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn weight(n: usize, k: usize, seed: u64) -> (Arc<Nf4Tensor>, Vec<f32>) {
    let w = Nf4Tensor::quantize(
        &values(n * k, seed),
        &[n, k],
        SourceDtype::F32,
        QuantType::Nf4,
        64,
        true,
    )
    .unwrap();
    let deq = w.dequantize_f32();
    (Arc::new(w), deq)
}

fn max_rel_diff(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()))
        / scale
}

#[test]
fn forward_and_input_gradient_match_dense_reference() {
    let dev = Device::Cpu;
    // Odd sizes, k not a multiple of the blocksize: blocks span rows.
    let (b, t, k, n) = (3, 5, 97, 41);
    let (w, deq) = weight(n, k, 7);
    let xv = values(b * t * k, 11);
    let x = Var::from_tensor(&Tensor::from_vec(xv.clone(), (b, t, k), &dev).unwrap()).unwrap();
    let r = values(b * t * n, 13);
    let y = nf4_linear(x.as_tensor(), &w).unwrap();
    assert_eq!(y.dims(), &[b, t, n]);
    let loss = (y.clone() * Tensor::from_vec(r.clone(), (b, t, n), &dev).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let gx = grads.get(x.as_tensor()).expect("x has a gradient");

    let m = b * t;
    let mut y_ref = vec![0f64; m * n];
    let mut gx_ref = vec![0f64; m * k];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f64;
            for p in 0..k {
                acc += xv[i * k + p] as f64 * deq[j * k + p] as f64;
                gx_ref[i * k + p] += r[i * n + j] as f64 * deq[j * k + p] as f64;
            }
            y_ref[i * n + j] = acc;
        }
    }
    let y_got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let gx_got = gx.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(max_rel_diff(&y_got, &y_ref) < 1e-5, "forward");
    assert!(max_rel_diff(&gx_got, &gx_ref) < 1e-5, "input gradient");
}

#[test]
fn input_gradient_matches_finite_differences() {
    let dev = Device::Cpu;
    let (m, k, n) = (2, 70, 9);
    let (w, _) = weight(n, k, 3);
    let xv: Vec<f64> = values(m * k, 5).iter().map(|&v| v as f64).collect();
    let r: Vec<f64> = values(m * n, 17).iter().map(|&v| v as f64).collect();
    // loss(x) = sum(r * (x · Wᵀ)), evaluated through the op in f32.
    let loss_at = |x: &[f64]| -> f64 {
        let xt = Tensor::from_vec(x.to_vec(), (m, k), &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let y = nf4_linear(&xt, &w).unwrap();
        let rt = Tensor::from_vec(r.clone(), (m, n), &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        (y * rt)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let x = Var::from_tensor(
        &Tensor::from_vec(xv.clone(), (m, k), &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
    )
    .unwrap();
    let rt = Tensor::from_vec(r.clone(), (m, n), &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let loss = (nf4_linear(x.as_tensor(), &w).unwrap() * rt)
        .unwrap()
        .sum_all()
        .unwrap();
    let gx = loss
        .backward()
        .unwrap()
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let h = 1e-2;
    for idx in [0, 1, 69, 70, 99, 139] {
        let mut xp = xv.clone();
        xp[idx] += h;
        let mut xm = xv.clone();
        xm[idx] -= h;
        let fd = (loss_at(&xp) - loss_at(&xm)) / (2.0 * h);
        // The loss is linear in x, so central differences are exact up to f32 evaluation noise.
        assert!(
            (fd - gx[idx] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
            "d loss / d x[{idx}]: finite difference {fd}, autograd {}",
            gx[idx]
        );
    }
}

#[test]
fn bf16_activations_give_bf16_output_close_to_f32() {
    let dev = Device::Cpu;
    let (w, _) = weight(33, 128, 21);
    let x = Tensor::from_vec(values(4 * 128, 23), (4, 128), &dev).unwrap();
    let y32 = nf4_linear(&x, &w).unwrap();
    let y16 = nf4_linear(&x.to_dtype(DType::BF16).unwrap(), &w).unwrap();
    assert_eq!(y16.dtype(), DType::BF16);
    let d = (y16.to_dtype(DType::F32).unwrap() - &y32)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = y32
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // bf16 has 8 significant bits: input rounding plus output rounding stays within ~2^-7.
    assert!(d / scale < 1.0 / 64.0, "bf16 vs f32: {d} (scale {scale})");
}

#[test]
fn wrong_feature_count_is_an_error() {
    let (w, _) = weight(8, 64, 1);
    let x = Tensor::zeros((2, 63), DType::F32, &Device::Cpu).unwrap();
    let err = nf4_linear(&x, &w).unwrap_err().to_string();
    assert!(err.contains("63 features"), "{err}");
}
