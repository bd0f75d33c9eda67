//! The trainer's data-parallel logic with two ranks in two threads of this process, joined by a
//! small in-memory [`Collective`] (the real engines, MPI and NCCL, are exercised by
//! tests/distributed_mpi.rs through `scripts/mpi-check.sh`, and on GPUs by
//! `scripts/gpu-check.sh`):
//! - 2 ranks of batch 2 give the bits of 1 process of batch 2 with 2 accumulated micro-batches
//!   (the same two half-gradients, summed in the same order), and the losses of 1 process of
//!   batch 4 within 1e-5 relative;
//! - only rank 0 writes; a 2-rank checkpoint resumes on 2 ranks to the same adapter;
//! - the trainer with the device-side optimizer (tensor ops, what runs on a GPU) on the CPU
//!   backend follows the host optimizer's run (LoRA+, clipping and weight decay on).

mod common;

use std::path::Path;
use std::rc::Rc;
use std::sync::{Arc, Barrier, Mutex};

use candle_core::{DType, Device, Tensor};
use qlora::data::batches::Batches;
use qlora::distributed::{Collective, DistributedError, Single};
use qlora::lora::LoraConfig;
use qlora::model::transformer::Model;
use qlora::optim::UpdateEngine;
use qlora::train::trainer::{train, TrainReport, TrainSettings};

/// Two ranks in one process: each operation posts this rank's values, waits for the other, and
/// both compute the result from the slots in rank order (so both get the same bits).
#[derive(Debug)]
struct Shared {
    barrier: Barrier,
    slots: Mutex<[Vec<f64>; 2]>,
}

#[derive(Debug)]
struct ThreadRank {
    rank: usize,
    shared: Arc<Shared>,
}

impl ThreadRank {
    fn pair() -> [ThreadRank; 2] {
        let shared = Arc::new(Shared {
            barrier: Barrier::new(2),
            slots: Mutex::new([Vec::new(), Vec::new()]),
        });
        [0, 1].map(|rank| ThreadRank {
            rank,
            shared: shared.clone(),
        })
    }

    /// Post `v`, then combine both ranks' posts with `f`.
    fn exchange(&self, v: Vec<f64>, f: impl Fn(&[Vec<f64>; 2]) -> Vec<f64>) -> Vec<f64> {
        self.shared.slots.lock().unwrap()[self.rank] = v;
        self.shared.barrier.wait();
        let out = f(&self.shared.slots.lock().unwrap());
        self.shared.barrier.wait();
        out
    }
}

fn sum(s: &[Vec<f64>; 2]) -> Vec<f64> {
    s[0].iter().zip(&s[1]).map(|(a, b)| a + b).collect()
}

fn as_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

fn back(v: Vec<f64>, like: &Tensor) -> Result<Tensor, DistributedError> {
    let v: Vec<f32> = v.into_iter().map(|x| x as f32).collect();
    Ok(Tensor::from_vec(v, like.shape(), like.device())?.to_dtype(like.dtype())?)
}

impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        2
    }
    fn engine(&self) -> &'static str {
        "threads"
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor, DistributedError> {
        // f32 values summed in f64 and rounded once: the same as an f32 sum of two terms.
        back(self.exchange(as_f64(t), sum), t)
    }
    fn broadcast(&self, t: &Tensor) -> Result<Tensor, DistributedError> {
        back(self.exchange(as_f64(t), |s| s[0].clone()), t)
    }
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<(), DistributedError> {
        let out = self.exchange(values.to_vec(), sum);
        values.copy_from_slice(&out);
        Ok(())
    }
}

fn lora_cfg() -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        dtype: DType::F32,
        ..Default::default()
    }
}

/// A fresh model with adapters: new ones from `seed` or those of a checkpoint.
fn model(resume: Option<&Path>, seed: u64) -> Model {
    common::tiny_model(&lora_cfg(), seed, resume, &Device::Cpu, DType::F32)
}

fn batches(batch_size: usize) -> Batches {
    common::sonnet_batches(batch_size, &Device::Cpu)
}

const STEPS: usize = 6;

fn settings(grad_accum: usize, collective: Rc<dyn Collective>) -> TrainSettings {
    let mut s = common::tiny_settings(STEPS);
    s.grad_accum = grad_accum;
    s.schedule.lr = 1e-2;
    s.adamw.weight_decay = 0.01;
    s.max_grad_norm = 0.5;
    s.save_every = 3;
    s.collective = collective;
    s
}

fn run_single(out: &Path, batch: usize, grad_accum: usize, engine: UpdateEngine) -> TrainReport {
    let mut m = model(None, 7);
    let mut s = settings(grad_accum, Rc::new(Single));
    s.optim_engine = Some(engine);
    train(
        &mut m,
        &lora_cfg(),
        "tiny",
        &mut batches(batch),
        &[],
        &s,
        out,
    )
    .unwrap()
}

/// Two ranks of batch 2 in two threads, writing (if at all) to `outs[rank]`. Rank 1's adapters
/// start from another seed: the trainer must broadcast rank 0's.
fn run_two_ranks(outs: [&Path; 2], resume: Option<&Path>) -> [TrainReport; 2] {
    let ranks = ThreadRank::pair();
    std::thread::scope(|scope| {
        let handles = ranks.map(|r| {
            let out = outs[r.rank].to_path_buf();
            scope.spawn(move || {
                let mut m = model(resume, 7 + r.rank as u64);
                let mut s = settings(1, Rc::new(r));
                s.resume = resume.map(Path::to_path_buf);
                train(&mut m, &lora_cfg(), "tiny", &mut batches(2), &[], &s, &out).unwrap()
            })
        });
        handles.map(|h| h.join().unwrap())
    })
}

fn adapter(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<(String, Vec<f32>)> =
        candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

#[test]
fn two_ranks_train_as_one_process_and_only_rank_0_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n);
    let accum = run_single(&p("accum"), 2, 2, UpdateEngine::Host);
    let whole = run_single(&p("whole"), 4, 1, UpdateEngine::Host);
    let [r0, r1] = run_two_ranks([&p("r0"), &p("r1")], None);

    assert_eq!(
        r0.losses, accum.losses,
        "2 ranks vs 2 accumulated micro-batches"
    );
    assert_eq!(r1.losses, r0.losses, "both ranks report the step's loss");
    for (x, y) in whole.losses.iter().zip(&r0.losses) {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs(),
            "batch 4: {x} vs 2 ranks: {y}"
        );
    }
    assert!(r0.losses[STEPS - 1] < r0.losses[0], "{:?}", r0.losses);
    let a = adapter(accum.adapter_dir.as_ref().unwrap());
    assert_eq!(adapter(r0.adapter_dir.as_ref().unwrap()), a);

    assert!(r1.adapter_dir.is_none() && r1.checkpoints.is_empty());
    assert!(!p("r1").exists(), "rank 1 wrote its output folder");
    assert_eq!(r0.checkpoints.len(), 1);

    // Resuming both ranks from rank 0's checkpoint ends where the uninterrupted run ended.
    let ckpt = r0.checkpoints[0].clone();
    let [q0, _] = run_two_ranks([&p("q0"), &p("q1")], Some(&ckpt));
    assert_eq!(q0.losses, r0.losses);
    assert_eq!(adapter(q0.adapter_dir.as_ref().unwrap()), a);
    assert!(!p("q1").exists());
}

#[test]
fn the_device_side_optimizer_follows_the_host_one_through_the_trainer() {
    let tmp = tempfile::tempdir().unwrap();
    let host = run_single(&tmp.path().join("host"), 2, 2, UpdateEngine::Host);
    let dev = run_single(&tmp.path().join("dev"), 2, 2, UpdateEngine::Tensors);
    for (x, y) in host.losses.iter().zip(&dev.losses) {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "host {x} vs tensors {y}");
    }
    let (a, b) = (
        adapter(host.adapter_dir.as_ref().unwrap()),
        adapter(dev.adapter_dir.as_ref().unwrap()),
    );
    let (mut num, mut den) = (0f64, 0f64);
    for ((_, x), (_, y)) in a.iter().zip(&b) {
        for (p, q) in x.iter().zip(y) {
            num += f64::from(p - q).powi(2);
            den += f64::from(*p).powi(2);
        }
    }
    let rel = (num / den).sqrt();
    assert!(rel <= 1e-5, "adapters differ by {rel:e} relative");
    assert!(rel > 0.0 || a == b);
}
