//! The device-side AdamW (candle tensor ops, what runs in GPU memory under `--device cuda`)
//! against the host update (torch's CPU AdamW to the bit), both on the CPU backend through the
//! same `AdamW` code: plain f32 moments, 8-bit blockwise moments, paged moments, LoRA+ learning
//! rate multipliers and weight decay, several steps, a parameter without gradient on some steps.
//!
//! The two differ only in how the first-moment lerp rounds (one fused multiply-add on the host,
//! two roundings as tensor ops): at most an ulp per step in `m`, which is what the tolerances
//! below allow for. The 8-bit rounding itself (absmax, scaling, nearest code) must agree exactly.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use qlora::optim::blockwise8::Blockwise8;
use qlora::optim::tensor_update::TensorBlockwise8;
use qlora::optim::{AdamW, AdamWConfig, StateStorage, UpdateEngine};
use rand::rngs::StdRng;
use rand::SeedableRng;

const SHAPES: &[&[usize]] = &[&[64, 300], &[1000, 7], &[3, 5], &[16, 2049], &[4096]];
const STEPS: usize = 6;

/// Named variables of `SHAPES`; the second is bf16 (the default adapter dtype).
fn vars(seed: u64) -> Vec<(String, Var)> {
    let mut rng = StdRng::seed_from_u64(seed);
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, &shape)| {
            let n: usize = shape.iter().product();
            let t = Tensor::from_vec(common::random_vec(&mut rng, n, 0.1), shape, &Device::Cpu)
                .unwrap();
            let t = if i == 1 {
                t.to_dtype(DType::BF16).unwrap()
            } else {
                t
            };
            let name = if i == 3 {
                "x.lora_B.weight"
            } else {
                "x.lora_A.weight"
            };
            (format!("p{i}.{name}"), Var::from_tensor(&t).unwrap())
        })
        .collect()
}

/// Gradients of step `step`, of scales spanning four decades; parameter 2 has none every third
/// step.
fn grads(step: usize) -> Vec<Option<Tensor>> {
    let mut rng = StdRng::seed_from_u64(1000 + step as u64);
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, &shape)| {
            if i == 2 && step.is_multiple_of(3) {
                return None;
            }
            let n: usize = shape.iter().product();
            let scale = 10f32.powi(i as i32 - 3);
            Some(
                Tensor::from_vec(common::random_vec(&mut rng, n, scale), shape, &Device::Cpu)
                    .unwrap(),
            )
        })
        .collect()
}

/// LoRA+: B learns 16 times faster.
fn lr_scale(name: &str) -> f64 {
    if name.contains("lora_B") {
        16.0
    } else {
        1.0
    }
}

fn run(storage: StateStorage, engine: UpdateEngine) -> (Vec<Vec<f32>>, Vec<(String, Tensor)>) {
    let cfg = AdamWConfig {
        lr: 1e-3,
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    let v = vars(7);
    let mut opt = AdamW::with_engine(v, cfg, lr_scale, storage, engine).unwrap();
    assert_eq!(opt.engine(), engine);
    for step in 0..STEPS {
        opt.step(&grads(step), 1e-3 * (1.0 - step as f64 / 10.0))
            .unwrap();
    }
    let params = opt
        .params
        .iter()
        .map(|p| {
            p.var
                .as_tensor()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    (params, opt.state_tensors().unwrap())
}

/// Largest |a - b| / (|b| + floor) over two equally long vectors.
fn max_rel(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (y.abs() + floor))
        .fold(0.0, f32::max)
}

fn close_params(host: &[Vec<f32>], dev: &[Vec<f32>], tol: f32) {
    for (i, (h, d)) in host.iter().zip(dev).enumerate() {
        let r = max_rel(d, h, 1e-3);
        assert!(
            r <= tol,
            "parameter {i}: max relative difference {r:e} > {tol:e}"
        );
    }
}

#[test]
fn tensor_adamw_matches_the_host_update_with_plain_state() {
    let (hp, hs) = run(StateStorage::Plain, UpdateEngine::Host);
    let (dp, ds) = run(StateStorage::Plain, UpdateEngine::Tensors);
    // bf16 parameters round both to the same bf16 value almost always; f32 within a few ulps.
    close_params(&hp, &dp, 1e-5);
    assert_eq!(hs.len(), ds.len());
    for ((hn, ht), (dn, dt)) in hs.iter().zip(&ds) {
        assert_eq!(hn, dn);
        let (h, d) = (
            ht.to_dtype(DType::F64).unwrap().flatten_all().unwrap(),
            dt.to_dtype(DType::F64).unwrap().flatten_all().unwrap(),
        );
        let (h, d): (Vec<f64>, Vec<f64>) = (h.to_vec1().unwrap(), d.to_vec1().unwrap());
        // m: an ulp per step of lerp rounding, relative to the moment's scale (the lerp's two
        // terms can nearly cancel); v has no lerp and is exact.
        let scale = h.iter().fold(0f64, |a, x| a.max(x.abs()));
        let tol = if hn.ends_with("exp_avg_sq") {
            0.0
        } else {
            1e-6 * scale
        };
        let worst = h
            .iter()
            .zip(&d)
            .map(|(x, y)| (x - y).abs())
            .fold(0f64, f64::max);
        assert!(worst <= tol, "{hn}: differs by {worst:e} (scale {scale:e})");
    }
    // Not a comparison of a thing with itself: the parameters moved.
    let start = vars(7);
    let moved = start[0]
        .1
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(max_rel(&hp[0], &moved, 1e-3) > 1e-3);
}

#[test]
fn tensor_adamw_matches_the_host_update_with_8bit_state() {
    let storage = StateStorage::EightBit { min_elems: 4096 };
    let (hp, hs) = run(storage.clone(), UpdateEngine::Host);
    let (dp, ds) = run(storage, UpdateEngine::Tensors);
    // A moment one ulp apart can round to the neighbouring 8-bit code; the parameter then moves
    // by a fraction of that code's gap times the step size.
    close_params(&hp, &dp, 2e-4);
    let mut codes = 0usize;
    let mut differ = 0usize;
    for ((hn, ht), (dn, dt)) in hs.iter().zip(&ds) {
        assert_eq!(hn, dn);
        assert_eq!(ht.dtype(), dt.dtype(), "{hn}");
        if ht.dtype() == DType::U8 {
            let (h, d) = (
                ht.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
                dt.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
            );
            codes += h.len();
            differ += h.iter().zip(&d).filter(|(a, b)| a != b).count();
        }
    }
    assert!(
        codes > 50_000,
        "the 8-bit path was exercised ({codes} codes)"
    );
    assert!(
        differ * 1000 <= codes,
        "{differ} of {codes} 8-bit codes differ between host and tensor updates"
    );
}

#[test]
fn tensor_adamw_matches_the_host_update_with_paged_state() {
    // 4 KiB pages, 16 KiB resident: every parameter is updated window by window.
    let paged = StateStorage::Paged {
        resident_bytes: 16 << 10,
        page_bytes: 4 << 10,
        dir: None,
    };
    let (hp, _) = run(StateStorage::Plain, UpdateEngine::Host);
    let (dp, ds) = run(paged, UpdateEngine::Tensors);
    close_params(&hp, &dp, 1e-5);
    assert!(ds.iter().any(|(n, _)| n.ends_with("exp_avg")));
}

#[test]
fn tensor_8bit_rounding_is_the_host_rounding_exactly() {
    let mut rng = StdRng::seed_from_u64(3);
    // Values across decades, exact zeros, an all-zero block, a short last block, and values on
    // the code's midpoints (where the rounding rule decides).
    let mut x = common::random_vec(&mut rng, 5 * 256 + 77, 1.0);
    for (i, v) in x.iter_mut().enumerate() {
        *v *= 10f32.powi(-((i % 7) as i32));
    }
    for v in &mut x[256..512] {
        *v = 0.0;
    }
    x[3] = 0.0;
    let code = qlora::optim::dynamic_code::signed_dynamic8();
    for (k, v) in x[600..700].iter_mut().enumerate() {
        *v = 0.5 * (code[k + 100] + code[k + 101]);
    }
    x[600] = 1.0; // the block's absmax, so the midpoints above are hit exactly
    for signed in [true, false] {
        let xs: Vec<f32> = if signed {
            x.clone()
        } else {
            x.iter().map(|v| v.abs()).collect()
        };
        let host = Blockwise8::quantize(&xs, signed);
        let t = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        let dev = TensorBlockwise8::quantize(&t, signed).unwrap();
        let back = dev.to_host().unwrap();
        assert!(
            back.absmax == host.absmax,
            "absmax differ (signed {signed})"
        );
        let differ = back.codes.iter().zip(&host.codes).position(|(a, b)| a != b);
        assert_eq!(differ, None, "first differing code (signed {signed})");
        let deq = dev.dequantize().unwrap().to_vec1::<f32>().unwrap();
        let host_deq = host.dequantize();
        let differ = deq
            .iter()
            .zip(&host_deq)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(
            differ, None,
            "first differing dequantized value (signed {signed})"
        );
    }
}

#[test]
fn tensor_adamw_state_exported_mid_run_resumes_to_the_same_bits() {
    for storage in [
        StateStorage::Plain,
        StateStorage::EightBit { min_elems: 4096 },
    ] {
        let cfg = AdamWConfig {
            lr: 1e-3,
            weight_decay: 0.01,
            ..AdamWConfig::default()
        };
        let engine = UpdateEngine::Tensors;
        let mut full =
            AdamW::with_engine(vars(7), cfg.clone(), lr_scale, storage.clone(), engine).unwrap();
        let mut first =
            AdamW::with_engine(vars(7), cfg.clone(), lr_scale, storage.clone(), engine).unwrap();
        for step in 0..STEPS {
            full.step(&grads(step), 1e-3).unwrap();
            if step < 3 {
                first.step(&grads(step), 1e-3).unwrap();
            }
        }
        // A fresh optimizer over the half-way parameters, given the half-way state.
        let params: Vec<(String, Var)> = first
            .params
            .iter()
            .map(|p| {
                let t = p.var.as_tensor().copy().unwrap();
                (p.name.clone(), Var::from_tensor(&t).unwrap())
            })
            .collect();
        let mut resumed =
            AdamW::with_engine(params, cfg, lr_scale, storage.clone(), engine).unwrap();
        resumed
            .load_state_tensors(first.state_tensors().unwrap())
            .unwrap();
        for step in 3..STEPS {
            resumed.step(&grads(step), 1e-3).unwrap();
        }
        for (a, b) in full.params.iter().zip(&resumed.params) {
            let (x, y) = (
                a.var
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
                b.var
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
            );
            let (x, y) = (x.to_vec1::<f32>().unwrap(), y.to_vec1::<f32>().unwrap());
            assert!(x == y, "{storage:?}: {} differs after resuming", a.name);
        }
    }
}
