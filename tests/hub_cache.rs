//! `--model org/name[@revision]` resolves in a Hugging Face cache laid out as `huggingface_hub`
//! writes it (`models--org--name/{refs,snapshots}`), offline, for every subcommand that takes a
//! model; a name missing from the cache is a clear error.

mod common;

use std::path::Path;
use std::process::Command;

use common::{arg, fixtures};

/// A cache with tiny-llama as `test-org/tiny-llama`: `main` → commit `c0ffee`.
fn fake_cache(root: &Path) {
    let snap = root.join("models--test-org--tiny-llama/snapshots/c0ffee");
    std::fs::create_dir_all(&snap).unwrap();
    for f in std::fs::read_dir(fixtures().join("tiny-llama")).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, snap.join(f.file_name().unwrap())).unwrap();
        }
    }
    let refs = root.join("models--test-org--tiny-llama/refs");
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::write(refs.join("main"), "c0ffee").unwrap();
}

fn qlora(cache: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(args)
        .env("HF_HUB_CACHE", cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

#[test]
fn hub_names_load_from_the_local_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    fake_cache(&cache);
    let data = fixtures().join("methods/embedding/train/data.jsonl");
    let o = qlora(
        &cache,
        &[
            "eval",
            "--model",
            "test-org/tiny-llama",
            "--data",
            arg(&data),
            "--seq-len",
            "16",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("perplexity"), "{out}");
    let o = qlora(
        &cache,
        &[
            "plan",
            "--model",
            "test-org/tiny-llama@main",
            "--seq-len",
            "16",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("llama, 2 layers"));
    // Not in the cache: the error names the cache and what it lacked.
    let o = qlora(
        &cache,
        &["eval", "--model", "test-org/other", "--data", arg(&data)],
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{e}");
    assert!(
        e.contains("models--test-org--other") && e.contains(cache.to_str().unwrap()),
        "{e}"
    );
}
