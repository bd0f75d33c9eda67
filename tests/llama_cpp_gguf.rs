//! Our GGUF exports as llama.cpp runs them. `tests/fixtures/llama_cpp/` holds llama.cpp's logits
//! (llama-cpp-python 0.3.36, the llama.cpp it vendors, f32 KV cache) on the GGUF files
//! `qlora merge --format gguf` wrote for each case, with each file's sha256
//! (`scripts/llama_cpp_logits.py`). Here each case is exported again through the CLI and must be
//! byte-identical to the file llama.cpp ran; then llama.cpp's logits are compared with PEFT's
//! (the unmerged adapter on the original model, in transformers) and with ours on the same file.
//!
//! Tolerances: f32 exports 1e-4 absolute (seen: ≤ 3.4e-6); f16 and q8_0 files are rounded, and
//! llama.cpp also rounds the activations it multiplies them with (to f16, to 8-bit blocks), so
//! those get bounds stated per case below. Every case also shows the adapter is really merged:
//! llama.cpp's logits are more than [`adapter_moves`] away from the model without it, and that
//! distance is over ten times the distance from PEFT.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Tensor;
use common::{fixtures, input_ids, load_as, max_abs, safetensors as tensors};
use qlora::model::loader::BaseFormat;
use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Deserialize)]
struct Case {
    model: String,
    adapter: String,
    input_ids: String,
    merge_args: Vec<String>,
    gguf_sha256: String,
    /// Key of the adapted model's logits (PEFT) in the `input_ids` file.
    reference: String,
    /// Key of the logits without the adapter there.
    reference_base: String,
}

#[derive(Deserialize)]
struct Manifest {
    cases: BTreeMap<String, Case>,
}

fn manifest() -> Manifest {
    let path = fixtures().join("llama_cpp/cases.json");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Export `case` with the CLI into `dir`; the GGUF file's path.
fn export(case: &Case, dir: &Path) -> PathBuf {
    let out = dir.join("out");
    let run = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .arg("merge")
        .arg("--model")
        .arg(fixtures().join(&case.model))
        .arg("--adapter")
        .arg(fixtures().join(&case.adapter))
        .arg("--out")
        .arg(&out)
        .args(&case.merge_args)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "qlora merge failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let gguf: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    assert_eq!(gguf.len(), 1, "one .gguf in {}", out.display());
    gguf[0].clone()
}

fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Our logits `[sequences, tokens, vocab]` on the GGUF file, every row its own sequence.
fn ours(gguf: &Path, ids: &Tensor) -> Tensor {
    load_as(gguf, BaseFormat::Dense).model.forward(ids).unwrap()
}

/// Bounds for (llama.cpp vs PEFT, ours vs llama.cpp), and how many leading positions the PEFT
/// comparison covers.
fn bounds(name: &str, tokens: usize) -> (f32, f32, usize) {
    match name {
        // f16 weights, and llama.cpp rounds activations to f16 for the products (2^-11
        // relative): seen 3.9e-3 from PEFT and 2.3e-3 from our f32-activation forward.
        n if n.ends_with("-f16") => (1e-2, 1e-2, tokens),
        // llama.cpp's CPU GELU reads a table indexed by the input rounded to f16
        // (`GGML_GELU_FP16`), so its f32 GPT-2 is a GELU of f16 inputs: seen 1.4e-3 from PEFT
        // and from ours.
        "gpt2-f32" => (5e-3, 5e-3, tokens),
        // 8-bit blocks of 32 for the weights, and llama.cpp quantizes the activations to the
        // same blocks (our forward keeps them f32): seen 0.106 from PEFT, 0.071 from ours, on
        // logits up to 3.1; the adapter moves them by 2.56.
        n if n.ends_with("-q8_0") => (0.2, 0.2, tokens),
        // bf16 keeps 8 mantissa bits (2^-9 relative), for the weights and, in llama.cpp, for
        // the activations: seen 0.040 from PEFT, 0.019 from ours.
        n if n.ends_with("-bf16") => (0.1, 0.1, tokens),
        // llama.cpp's `llama` architecture has no sliding window (the export warns), and neither
        // has the GGUF: PEFT is compared on the positions the window of 6 does not reach yet,
        // our forward of the same file on all of them.
        "mistral-f32" => (1e-4, 1e-4, 6),
        _ => (1e-4, 1e-4, tokens),
    }
}

/// How far the merged adapter must move each case's logits: 1 for the Llama-family fixtures
/// (their adapters move them by 1.45 to 5.35); GPT-2's fixture adapter moves its logits by 0.95.
fn adapter_moves(name: &str) -> f32 {
    if name.starts_with("gpt2") {
        0.5
    } else {
        1.0
    }
}

#[test]
fn llama_cpp_runs_our_gguf_exports_like_peft() {
    let m = manifest();
    assert!(m.cases.len() >= 8, "cases.json lists {}", m.cases.len());
    for (name, case) in &m.cases {
        let tmp = tempfile::tempdir().unwrap();
        let gguf = export(case, tmp.path());
        assert_eq!(
            sha256(&gguf),
            case.gguf_sha256,
            "{name}: the export is no longer the file llama.cpp ran (an exporter change, or the \
             merge's float arithmetic differs on this CPU); re-run scripts/llama_cpp_logits.py \
             if the change is intended"
        );
        let reference = tensors(&fixtures().join(&case.input_ids));
        let ids = input_ids(&reference);
        let llama_cpp = tensors(&fixtures().join(format!("llama_cpp/{name}.safetensors")))
            .remove("logits")
            .unwrap();
        let tokens = ids.dim(1).unwrap();
        let (to_peft, to_ours, n) = bounds(name, tokens);
        let first = |t: &Tensor| t.narrow(1, 0, n).unwrap();

        let peft = &reference[&case.reference];
        let d_peft = max_abs(&first(&llama_cpp), &first(peft));
        let d_ours = max_abs(&ours(&gguf, &ids), &llama_cpp);
        let d_base = max_abs(&llama_cpp, &reference[&case.reference_base]);
        println!(
            "{name}: llama.cpp vs PEFT {d_peft:.2e} (first {n} of {tokens} positions), vs ours \
             {d_ours:.2e}; vs the model without the adapter {d_base:.2}"
        );
        assert!(d_peft <= to_peft, "{name}: llama.cpp vs PEFT {d_peft}");
        assert!(d_ours <= to_ours, "{name}: ours vs llama.cpp {d_ours}");
        assert!(
            d_base > adapter_moves(name) && d_base > 10.0 * d_peft,
            "{name}: the adapter barely shows ({d_base}, vs {d_peft} from PEFT)"
        );
    }
}
