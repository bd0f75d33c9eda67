//! Helpers shared by the integration tests.

// Every test binary compiles its own copy of this module and uses part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use qlora::model::loader::{load_model, BaseFormat, LoadOptions, LoadedModel};

/// This crate's `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Every tensor of a safetensors file, on the CPU (panics naming the file).
pub fn safetensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A reference file's `input_ids` (int64) as u32.
pub fn input_ids(r: &HashMap<String, Tensor>) -> Tensor {
    r["input_ids"].to_dtype(DType::U32).unwrap()
}

/// The model at `dir` with its base in `base` (panics naming the folder).
pub fn load_as(dir: &Path, base: BaseFormat) -> LoadedModel {
    let opts = LoadOptions {
        base,
        ..Default::default()
    };
    load_model(dir, &opts).unwrap_or_else(|e| panic!("{} loads: {e}", dir.display()))
}

/// Largest absolute elementwise difference of two same-shaped tensors, compared in f32.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Run the `qlora` binary with `args`.
pub fn qlora(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(args)
        .output()
        .unwrap()
}

/// A path as a `&str` argument.
pub fn arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The training parity run of the acceptance criteria: `qlora train` on `model` from the PEFT
/// adapter `train/adapter_init` over `train/data.jsonl` for 20 constant-lr steps of batch 4,
/// f32 adapters, full-precision base, data in file order. Checks every step's loss against
/// `train/losses.json` (PEFT's) within 1e-3 relative and returns the run folder (kept alive by
/// the returned temp dir) and the worst relative difference.
pub fn train_like_peft(model: &Path, seq_len: usize) -> (tempfile::TempDir, PathBuf, f64) {
    train_like_peft_from(model, &model.join("train"), seq_len, "none")
}

/// [`train_like_peft`] with the PEFT run's files (`adapter_init/`, `data.jsonl`,
/// `losses.json`) in `train`.
pub fn train_like_peft_from(
    model: &Path,
    train: &Path,
    seq_len: usize,
    quant: &str,
) -> (tempfile::TempDir, PathBuf, f64) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (init, data) = (train.join("adapter_init"), train.join("data.jsonl"));
    let seq = seq_len.to_string();
    let o = qlora(&[
        "train",
        "--model",
        arg(model),
        "--init-adapter",
        arg(&init),
        "--data",
        arg(&data),
        "--out",
        arg(&out),
        "--steps",
        "20",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--lr-scheduler",
        "constant",
        "--warmup-steps",
        "0",
        "--weight-decay",
        "0",
        "--max-grad-norm",
        "0",
        "--no-shuffle",
        "--val-split",
        "0",
        "--adapter-dtype",
        "f32",
        "--seq-len",
        &seq,
        "--quant",
        quant,
    ]);
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(train.join("losses.json")).unwrap()).unwrap();
    let want: Vec<f64> = want["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let got: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("loss").and_then(|x| x.as_f64()))
        .collect();
    assert_eq!(got.len(), want.len(), "one loss per step");
    let mut worst = 0f64;
    for (step, (g, w)) in got.iter().zip(&want).enumerate() {
        let rel = (g - w).abs() / w.abs();
        worst = worst.max(rel);
        assert!(
            rel < 1e-3,
            "step {step}: loss {g} vs PEFT {w} (rel {rel:e})"
        );
    }
    assert!(
        (want[0] - want[19]).abs() / want[0] > 1e-3,
        "the curve moves"
    );
    (tmp, out, worst)
}

/// `qlora merge --base original --dtype f32` of `model`'s `adapter/` equals PEFT's
/// `merge_and_unload` saved in `model/merged/`: every tensor present, same shape, within 1e-5.
/// Returns the merged folder (kept alive by the returned temp dir).
pub fn merge_like_peft(model: &Path) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let adapter = model.join("adapter");
    let o = qlora(&[
        "merge",
        "--model",
        arg(model),
        "--adapter",
        arg(&adapter),
        "--out",
        arg(&out),
        "--base",
        "original",
        "--dtype",
        "f32",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours = safetensors(&out.join("model.safetensors"));
    let theirs = safetensors(&model.join("merged/model.safetensors"));
    for (name, want) in &theirs {
        let got = ours
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing from our merge"));
        assert_eq!(got.dims(), want.dims(), "{name}: shape");
        let d = max_abs(got, want);
        assert!(d <= 1e-5, "{name}: differs from PEFT's merge by {d}");
    }
    (tmp, out)
}

/// tiny-llama, the two-layer random Llama of the fixtures.
pub fn tiny_llama() -> PathBuf {
    fixtures().join("tiny-llama")
}

/// tiny-llama on `device` in `compute` with adapters: new ones of `lora` from `seed`, or those
/// of the checkpoint `resume` (loaded as f32).
pub fn tiny_model(
    lora: &qlora::lora::LoraConfig,
    seed: u64,
    resume: Option<&Path>,
    device: &Device,
    compute: DType,
) -> qlora::model::transformer::Model {
    let opts = LoadOptions {
        device: device.clone(),
        compute_dtype: compute,
        ..Default::default()
    };
    let mut m = load_model(&tiny_llama(), &opts).unwrap().model;
    match resume {
        Some(dir) => {
            qlora::peft::load_adapter(&mut m, &dir.join("adapter"), Some(DType::F32)).unwrap();
        }
        None => qlora::peft::attach_new(&mut m, lora, seed).unwrap(),
    }
    m
}

/// The held-out sonnets as tiny-llama's packed batches of `batch_size` x 32 tokens (shuffle
/// seed 11) on `device`.
pub fn sonnet_batches(batch_size: usize, device: &Device) -> qlora::data::batches::Batches {
    use qlora::data::batches::{BatchOptions, Batches};
    use qlora::data::corpus::{Corpus, DataOptions};
    let tok = qlora::data::tokenizer::TextTokenizer::from_dir(&tiny_llama())
        .unwrap()
        .unwrap();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/sonnets/valid.txt");
    let corpus = Corpus::load(&data, Some(&tok), &DataOptions::new(32, 512)).unwrap();
    Batches::new(
        corpus.examples,
        BatchOptions::new(batch_size, 32, 2, 11),
        device,
    )
    .unwrap()
}

/// Settings of a short tiny-llama run: `steps` steps of 1 micro-batch, lr 5e-3 cosine with 1
/// warmup step, LoRA+ ratio 4, clipping at 1, checkpointing, seed 3, plain AdamW, one process,
/// no checkpoints, no progress bar. Tests change the fields they are about.
pub fn tiny_settings(steps: usize) -> qlora::train::trainer::TrainSettings {
    use qlora::optim::schedule::{Schedule, ScheduleKind};
    qlora::train::trainer::TrainSettings {
        steps,
        grad_accum: 1,
        schedule: Schedule {
            lr: 5e-3,
            kind: ScheduleKind::Cosine,
            warmup: 1,
            total: steps,
        },
        adamw: qlora::optim::AdamWConfig::default(),
        lora_plus_ratio: 4.0,
        max_grad_norm: 1.0,
        grad_checkpointing: true,
        keep_layers: 0,
        eval_every: 0,
        seed: 3,
        optim_storage: qlora::optim::StateStorage::Plain,
        progress: false,
        save_every: 0,
        resume: None,
        stop: Some(std::sync::Arc::new(std::sync::atomic::AtomicBool::new(
            false,
        ))),
        run_options: [("seed".to_string(), "3".to_string())].into(),
        profile: false,
        collective: std::rc::Rc::new(qlora::distributed::Single),
        optim_engine: None,
    }
}

/// `n` values uniform in [-scale, scale) from `rng`.
pub fn random_vec(rng: &mut rand::rngs::StdRng, n: usize, scale: f32) -> Vec<f32> {
    use rand::Rng;
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}
