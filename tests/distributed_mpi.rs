//! Data-parallel training over MPI, with real ranks from `mpirun -np 2` on this host:
//! - 2 ranks of batch b make the losses of 1 process of batch 2b within 1e-5 relative, and its
//!   final adapter within 1e-5 relative in norm (the two sum the same gradients in another
//!   order; Adam divides each element's step by that element's own gradient scale, so a
//!   near-zero gradient's rounding shows up in single elements: up to 4e-4 of a tensor's largest
//!   value was seen, which is why the adapter is compared as a whole);
//! - 2 ranks of batch b are bit-identical to 1 process of batch b with 2 accumulated
//!   micro-batches, which sums the very same two half-gradients;
//! - only rank 0 writes, a 2-rank checkpoint resumes to the same adapter, it does not resume in
//!   one process, and ranks that disagree stop with an error naming the cause.
//!
//! Needs the `mpi` feature and Open MPI's `mpirun` (`scripts/mpi-check.sh` installs both and
//! runs this file).
#![cfg(feature = "mpi")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

fn fixture(p: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(p)
        .display()
        .to_string()
}

/// The options of every run here: f32 adapters (bf16 would round each rank's gradient before
/// the sum), no dropout (its masks are drawn per batch position), clipping and LoRA+ on.
fn common(batch: usize, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "train",
        "--model",
        &fixture("tests/fixtures/tiny-llama"),
        "--data",
        &fixture("data/sonnets/valid.txt"),
        "--steps",
        "6",
        "--seq-len",
        "32",
        "--dropout",
        "0",
        "--adapter-dtype",
        "f32",
        "--seed",
        "5",
        "--lr",
        "5e-3",
        "--max-grad-norm",
        "0.5",
        "--lora-plus-ratio",
        "4",
        "--val-split",
        "0",
        "--save-every",
        "3",
        "--batch-size",
        &batch.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn check(o: Output, what: &str) -> Output {
    assert!(
        o.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Two ranks, each in its own working folder, `--out` relative: whatever a rank writes lands in
/// its own folder. `args1` are rank 1's arguments (rank 0's unless a test wants them to differ).
fn mpirun(wdirs: [&Path; 2], args0: &[String], args1: &[String]) -> Output {
    let exe = env!("CARGO_BIN_EXE_qlora");
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe"]);
    for (i, (dir, args)) in wdirs.iter().zip([args0, args1]).enumerate() {
        if i > 0 {
            cmd.arg(":");
        }
        cmd.args(["-np", "1", "-wdir"]).arg(dir).arg(exe).args(args);
    }
    cmd.output()
        .expect("mpirun not found: install Open MPI (scripts/mpi-check.sh does)")
}

fn single(dir: &Path, args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qlora"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
        .collect()
}

fn adapter(run: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(run.join("adapter/adapter_model.safetensors"), &Device::Cpu)
        .unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `|a - b| / |a|` over all tensors of two adapters taken as one vector.
fn adapter_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (k, x) in a {
        for (p, q) in values(x).iter().zip(values(&b[k])) {
            num += (p - q) * (p - q);
            den += p * p;
        }
    }
    (num / den).sqrt()
}

/// Largest element-wise difference of two adapters.
fn adapter_max_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f64 {
    a.iter()
        .flat_map(|(k, x)| {
            values(x)
                .into_iter()
                .zip(values(&b[k]))
                .map(|(p, q)| (p - q).abs())
        })
        .fold(0f64, f64::max)
}

fn is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

#[test]
fn two_ranks_of_batch_b_train_as_one_process_of_batch_2b() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, r0, r1) = (
        tmp.path().join("one"),
        tmp.path().join("r0"),
        tmp.path().join("r1"),
    );
    for d in [&one, &r0, &r1] {
        std::fs::create_dir_all(d).unwrap();
    }
    check(
        single(&one, &common(4, &["--out", "run"])),
        "1 process, batch 4",
    );
    let accum = common(2, &["--out", "accum", "--grad-accum", "2"]);
    check(single(&one, &accum), "1 process, batch 2, 2 micro-batches");
    let dist = common(2, &["--out", "run", "--distributed"]);
    let o = check(mpirun([&r0, &r1], &dist, &dist), "2 ranks, batch 2");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("distributed: 2 ranks over MPI"), "{stdout}");
    // Rank 1 printed nothing: the summary line is there once.
    assert_eq!(stdout.matches("done: 6 steps").count(), 1, "{stdout}");

    // Only rank 0 wrote.
    assert!(is_empty(&r1), "rank 1 wrote into its folder");
    for f in [
        "metrics.jsonl",
        "loss.svg",
        "adapter/adapter_model.safetensors",
        "checkpoint-3",
    ] {
        assert!(r0.join("run").join(f).exists(), "rank 0 did not write {f}");
    }

    let (a, b) = (losses(&one.join("run")), losses(&r0.join("run")));
    assert_eq!(a.len(), 6);
    assert_eq!(b.len(), 6);
    for (s, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs(),
            "step {}: loss {x} vs {y}",
            s + 1
        );
    }
    // The run learned something (the comparison is not of two runs that stood still).
    assert!(a[5] < a[0] - 0.1, "losses {a:?}");
    let d = adapter_diff(&adapter(&one.join("run")), &adapter(&r0.join("run")));
    assert!(d <= 1e-5, "final adapters differ by {d:e} relative");
    // The same two half-batch gradients summed in one process: the same bits.
    let d = adapter_max_diff(&adapter(&one.join("accum")), &adapter(&r0.join("run")));
    assert_eq!(d, 0.0, "2 ranks vs 2 accumulated micro-batches");
    assert_eq!(losses(&one.join("accum")), b);

    // Resume the 2-rank run from its step-3 checkpoint: the same final adapter and losses.
    let ckpt = r0.join("run/checkpoint-3").display().to_string();
    let resumed = common(2, &["--out", "resumed", "--distributed", "--resume", &ckpt]);
    check(mpirun([&r0, &r1], &resumed, &resumed), "2-rank resume");
    assert!(is_empty(&r1), "rank 1 wrote while resuming");
    let d = adapter_max_diff(&adapter(&r0.join("run")), &adapter(&r0.join("resumed")));
    assert_eq!(d, 0.0, "resumed adapter differs");
    let tail = losses(&r0.join("resumed"));
    assert_eq!(tail.len(), 3, "the resumed run logs steps 4 to 6");
    assert_eq!(tail[..], b[3..]);

    // A 2-rank checkpoint does not resume in one process: a step would cover other rows.
    let o = single(&one, &common(2, &["--out", "other", "--resume", &ckpt]));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("world_size"), "{err}");
}

#[test]
fn ranks_with_different_options_stop_with_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (r0, r1) = (tmp.path().join("r0"), tmp.path().join("r1"));
    for d in [&r0, &r1] {
        std::fs::create_dir_all(d).unwrap();
    }
    let a = common(2, &["--out", "run", "--distributed"]);
    let mut b = a.clone();
    let lr = b.iter().position(|x| x == "--lr").unwrap();
    b[lr + 1] = "1e-3".into();
    let o = mpirun([&r0, &r1], &a, &b);
    assert!(!o.status.success(), "mismatched ranks trained");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("do not run the same model"), "{err}");
    // Nothing trained, so no adapter was written.
    assert!(!r0.join("run/adapter").exists());
    assert!(is_empty(&r1));
}
