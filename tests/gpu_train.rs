//! Training on a CUDA device against the CPU, run by `scripts/check-cuda.sh` and
//! `scripts/gpu-check.sh` (`cargo test --features cuda -- gpu_`). Without a GPU each test says
//! that it skips; these tests have not run on a GPU yet.
//!
//! - the device-side AdamW (plain, 8-bit, paged through `CudaPageStore` with a budget smaller
//!   than the state) against the host update, as tests/optim_tensors.rs does on the CPU backend;
//! - a QLoRA run of tiny-llama on the GPU against the same run on the CPU: f32 losses within
//!   1e-3 relative (cuBLAS and candle's CUDA reductions sum in other orders), bf16 compute (the
//!   GPU default) within 3e-2 relative of the f32 CPU losses.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use qlora::lora::LoraConfig;
use qlora::optim::{AdamW, AdamWConfig, StateStorage, UpdateEngine};
use qlora::train::trainer::train;

fn cuda() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipping: no CUDA device ({e})");
            None
        }
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Run `steps` AdamW steps over parameters on `dev` with state `storage`; the parameters after.
fn adamw_run(dev: &Device, storage: StateStorage, engine: UpdateEngine) -> Vec<Vec<f32>> {
    let shapes: [&[usize]; 3] = [&[64, 300], &[16, 2049], &[3, 5]];
    let vars: Vec<(String, Var)> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n: usize = s.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|k| ((k * 37 + i) % 101) as f32 / 500.0 - 0.1)
                .collect();
            let t = Tensor::from_vec(v, *s, dev).unwrap();
            let name = if i == 1 {
                "x.lora_B.weight"
            } else {
                "x.lora_A.weight"
            };
            (format!("p{i}.{name}"), Var::from_tensor(&t).unwrap())
        })
        .collect();
    let cfg = AdamWConfig {
        weight_decay: 0.01,
        ..Default::default()
    };
    let scale = |n: &str| if n.contains("lora_B") { 16.0 } else { 1.0 };
    let mut opt = AdamW::with_engine(vars, cfg, scale, storage, engine).unwrap();
    for step in 0..5 {
        let grads: Vec<Option<Tensor>> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let n: usize = s.iter().product();
                let g: Vec<f32> = (0..n)
                    .map(|k| (((k * 7919 + step * 13 + i) % 997) as f32 / 997.0 - 0.5) * 1e-2)
                    .collect();
                Some(Tensor::from_vec(g, *s, dev).unwrap())
            })
            .collect();
        opt.step(&grads, 1e-3).unwrap();
    }
    opt.params
        .iter()
        .map(|p| values(p.var.as_tensor()))
        .collect()
}

#[test]
fn gpu_adamw_on_the_device_matches_the_host_update() {
    let Some(dev) = cuda() else { return };
    let host = adamw_run(&Device::Cpu, StateStorage::Plain, UpdateEngine::Host);
    let paged = StateStorage::Paged {
        resident_bytes: 16 << 10,
        page_bytes: 4 << 10,
        dir: None,
    };
    for (storage, tol) in [
        (StateStorage::Plain, 1e-5f32),
        (paged, 1e-5),
        (StateStorage::eight_bit(), 2e-4),
    ] {
        let got = adamw_run(&dev, storage.clone(), UpdateEngine::Tensors);
        for (i, (h, d)) in host.iter().zip(&got).enumerate() {
            let worst = h
                .iter()
                .zip(d)
                .map(|(a, b)| (a - b).abs() / (a.abs() + 1e-3))
                .fold(0f32, f32::max);
            assert!(
                worst <= tol,
                "{storage:?} parameter {i}: {worst:e} > {tol:e}"
            );
        }
    }
}

fn losses_on(device: &Device, compute: DType) -> Vec<f64> {
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        dtype: DType::F32,
        ..Default::default()
    };
    let mut m = common::tiny_model(&lora, 7, None, device, compute);
    let mut b = common::sonnet_batches(2, device);
    let settings = common::tiny_settings(6);
    let out = tempfile::tempdir().unwrap();
    train(&mut m, &lora, "tiny", &mut b, &[], &settings, out.path())
        .unwrap()
        .losses
}

#[test]
fn gpu_training_follows_the_cpu_run() {
    let Some(dev) = cuda() else { return };
    let cpu = losses_on(&Device::Cpu, DType::F32);
    let f32_gpu = losses_on(&dev, DType::F32);
    let bf16_gpu = losses_on(&dev, DType::BF16);
    println!("cpu f32 {cpu:?}\ngpu f32 {f32_gpu:?}\ngpu bf16 {bf16_gpu:?}");
    for (s, ((c, f), b)) in cpu.iter().zip(&f32_gpu).zip(&bf16_gpu).enumerate() {
        assert!(
            (c - f).abs() <= 1e-3 * c.abs(),
            "step {s}: cpu {c} gpu f32 {f}"
        );
        assert!(
            (c - b).abs() <= 3e-2 * c.abs(),
            "step {s}: cpu {c} gpu bf16 {b}"
        );
    }
}
