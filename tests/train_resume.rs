//! Interrupt and resume: a run stopped at step k and resumed gives the same loss at every step
//! as the uninterrupted run (dropout on, shuffled data, checkpointing on), and a checkpoint from
//! another model is refused. Also: paged optimizer state changes nothing.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{DType, Device};
use qlora::data::batches::Batches;
use qlora::lora::LoraConfig;
use qlora::model::loader::{load_model, LoadOptions};
use qlora::model::transformer::Model;
use qlora::optim::StateStorage;
use qlora::peft;
use qlora::train::trainer::{train, TrainReport, TrainSettings};

fn lora_cfg() -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        dtype: DType::F32,
        ..Default::default()
    }
}

/// A fresh model with adapters: new ones (seeded) or those of a checkpoint.
fn model(resume: Option<&Path>) -> Model {
    common::tiny_model(&lora_cfg(), 7, resume, &Device::Cpu, DType::F32)
}

fn batches() -> Batches {
    common::sonnet_batches(2, &Device::Cpu)
}

fn settings(
    resume: Option<PathBuf>,
    save_every: usize,
    stop: bool,
    storage: StateStorage,
) -> TrainSettings {
    let mut s = common::tiny_settings(12);
    s.grad_accum = 2;
    s.schedule.warmup = 2;
    s.adamw.weight_decay = 0.01;
    s.optim_storage = storage;
    s.save_every = save_every;
    s.resume = resume;
    s.stop = Some(Arc::new(AtomicBool::new(stop)));
    s
}

fn run(
    out: &Path,
    resume: Option<PathBuf>,
    save_every: usize,
    stop: bool,
    storage: StateStorage,
) -> TrainReport {
    let mut m = model(resume.as_deref());
    let mut b = batches();
    train(
        &mut m,
        &lora_cfg(),
        "tiny",
        &mut b,
        &[],
        &settings(resume, save_every, stop, storage),
        out,
    )
    .unwrap()
}

#[test]
fn interrupted_and_resumed_run_equals_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let full = run(&tmp.path().join("a"), None, 0, false, StateStorage::Plain);
    assert_eq!(full.losses.len(), 12);
    assert!(
        full.losses[11] < full.losses[0],
        "training lowers the loss: {:?}",
        full.losses
    );

    // Periodic checkpoints change nothing; resuming from step 5 reproduces steps 6..12 exactly.
    let b_out = tmp.path().join("b");
    let with_ckpt = run(&b_out, None, 5, false, StateStorage::Plain);
    assert_eq!(with_ckpt.losses, full.losses);
    assert_eq!(with_ckpt.checkpoints.len(), 2);
    // (b finished and holds its final adapter, so the continuation writes elsewhere.)
    let resumed = run(
        &tmp.path().join("b2"),
        Some(b_out.join("checkpoint-5")),
        0,
        false,
        StateStorage::Plain,
    );
    assert_eq!(resumed.losses, full.losses, "resumed from step 5");

    // An interrupt (the Ctrl-C flag) saves a checkpoint after the current step and stops.
    let c_out = tmp.path().join("c");
    let stopped = run(&c_out, None, 0, true, StateStorage::Plain);
    assert!(stopped.interrupted && stopped.adapter_dir.is_none());
    assert_eq!(stopped.losses, full.losses[..1].to_vec());
    let resumed = run(
        &c_out,
        Some(c_out.join("checkpoint-1")),
        0,
        false,
        StateStorage::Plain,
    );
    assert_eq!(resumed.losses, full.losses, "resumed after an interrupt");

    // Paged optimizer state with a budget far below the state size: identical.
    let paged = run(
        &tmp.path().join("d"),
        None,
        0,
        false,
        StateStorage::Paged {
            resident_bytes: 8192,
            page_bytes: 4096,
            dir: None,
        },
    );
    assert_eq!(paged.losses, full.losses, "paged vs plain optimizer state");
}

#[test]
fn checkpoint_from_another_adapter_layout_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a");
    let mut s = settings(None, 0, true, StateStorage::Plain);
    s.steps = 3;
    let mut m = model(None);
    train(&mut m, &lora_cfg(), "tiny", &mut batches(), &[], &s, &out).unwrap();
    // Same base, but adapters on two projections only.
    let mut other = load_model(&common::tiny_llama(), &LoadOptions::default())
        .unwrap()
        .model;
    let cfg = LoraConfig {
        targets: vec!["q_proj".into(), "v_proj".into()],
        ..lora_cfg()
    };
    peft::attach_new(&mut other, &cfg, 1).unwrap();
    let mut s2 = settings(
        Some(out.join("checkpoint-1")),
        0,
        false,
        StateStorage::Plain,
    );
    s2.steps = 3;
    let err = train(&mut other, &cfg, "tiny", &mut batches(), &[], &s2, &out)
        .unwrap_err()
        .to_string();
    assert!(err.contains("another model or adapter layout"), "{err}");
}
