//! Sequence classification against transformers, PEFT and bitsandbytes themselves:
//! `BertForSequenceClassification` and `LlamaForSequenceClassification` in
//! `tests/fixtures/arch/{bert-cls,llama-cls}/`, written by `scripts/make_task_fixtures.py`
//! (transformers 5.23.0, PEFT 0.21.2, bitsandbytes 0.50.2).
//!
//! Tolerances: 1e-4 absolute on f32 logits; the 20-step loss curves 1e-3 relative.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Tensor};
use common::{arg as s, fixtures, load_as as load, max_abs, qlora, safetensors};
use qlora::model::loader::BaseFormat;
use qlora::model::transformer::Model;
use qlora::peft;
use qlora::quant::QuantType;

const TOL: f32 = 1e-4;

fn dir(name: &str) -> PathBuf {
    fixtures().join("arch").join(name)
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    safetensors(&dir(name).join("reference.safetensors"))
}

fn u32s(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

/// Our logits of the reference inputs (BERT with its token types).
fn logits(m: &Model, r: &HashMap<String, Tensor>) -> Tensor {
    let types = r.get("token_type_ids").map(u32s);
    m.classify(
        &u32s(&r["input_ids"]),
        &u32s(&r["attention_mask"]),
        types.as_ref(),
        false,
    )
    .unwrap()
}

fn check_family(name: &str) {
    let r = reference(name);
    let m = load(&dir(name), BaseFormat::Dense);
    let c = m.model.classifier().expect("a classification head");
    assert_eq!(c.config.labels, ["negative", "neutral", "positive"]);
    let d = max_abs(&logits(&m.model, &r), &r["logits"]);
    println!("{name}: logits within {d:.2e} of transformers'");
    assert!(d <= TOL, "{name}: logits differ by {d}");

    // PEFT adapter with a redrawn head (modules_to_save) on the full-precision and 4-bit bases.
    for base in [BaseFormat::Dense, BaseFormat::Quantized(QuantType::Nf4)] {
        let mut m = load(&dir(name), base);
        peft::load_adapter(&mut m.model, &dir(name).join("adapter"), None).unwrap();
        let got = logits(&m.model, &r);
        if base == BaseFormat::Dense {
            let d = max_abs(&got, &r["logits_adapter"]);
            println!("{name} + PEFT adapter and head: logits within {d:.2e} of PEFT's");
            assert!(d <= TOL, "{name}: adapter logits differ by {d}");
            assert!(max_abs(&r["logits"], &r["logits_adapter"]) > 0.1);
        }
        let json = peft::config_json(
            &peft::read_config(&dir(name).join("adapter")).unwrap(),
            &m.model,
            "..",
        );
        assert_eq!(json["task_type"], "SEQ_CLS");
    }

    // bitsandbytes' 4-bit checkpoint (its head quantized too) runs as transformers runs the
    // weights its codes stand for (`logits_4bit_decoded`; bitsandbytes' own CPU forward is off
    // for the `[64, 96]` layers, see tests/fixtures/arch/README.md).
    let q = load(
        &dir(name).join("bnb4"),
        BaseFormat::Quantized(QuantType::Nf4),
    );
    let got = logits(&q.model, &r);
    let d = max_abs(&got, &r["logits_4bit_decoded"]);
    println!(
        "{name} bnb 4-bit: logits within {d:.2e} of transformers on the decoded codes \
         (bitsandbytes' CPU forward: {:.2e} away)",
        max_abs(&got, &r["logits_4bit"])
    );
    assert!(d <= TOL, "{name}: 4-bit logits differ by {d}");
    assert!(max_abs(&r["logits"], &r["logits_4bit_decoded"]) > 0.05);

    // Merge equals PEFT's merge_and_unload, head included.
    let (_tmp, out) = common::merge_like_peft(&dir(name));
    let merged = load(&out, BaseFormat::Dense);
    let d = max_abs(&logits(&merged.model, &r), &r["logits_merged"]);
    assert!(d <= TOL, "{name}: merged logits differ by {d}");
}

#[test]
fn bert_classifier_matches_transformers_peft_and_bitsandbytes() {
    check_family("bert-cls");
    // Token types matter: transformers' logits without them are far away.
    let r = reference("bert-cls");
    assert!(max_abs(&r["logits"], &r["logits_no_token_types"]) > 0.05);
}

#[test]
fn llama_classifier_matches_transformers_peft_and_bitsandbytes() {
    check_family("llama-cls");
}

#[test]
fn task_mismatch_between_adapter_and_model_is_refused() {
    let mut causal = load(&fixtures().join("arch/qwen2"), BaseFormat::Dense);
    let e = peft::load_adapter(&mut causal.model, &dir("llama-cls").join("adapter"), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("SEQ_CLS") && e.contains("adapter_config.json"),
        "{e}"
    );
    let mut cls = load(&dir("llama-cls"), BaseFormat::Dense);
    let e = peft::load_adapter(
        &mut cls.model,
        &fixtures().join("arch/llama3/adapter"),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("CAUSAL_LM"), "{e}");
}

/// llama.cpp has no form for a classification head here, nor for BERT: GGUF export refuses both
/// by name and leaves no output folder.
#[test]
fn gguf_export_of_classifiers_is_refused() {
    for (name, what) in [("bert-cls", "bert"), ("llama-cls", "score")] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let o = qlora(&[
            "merge",
            "--model",
            s(&dir(name)),
            "--adapter",
            s(&dir(name).join("adapter")),
            "--out",
            s(&out),
            "--format",
            "gguf",
            "--base",
            "original",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{name}: {err}");
        assert!(
            err.contains("GGUF export") && err.contains(what) && err.contains("safetensors"),
            "{name}: {err}"
        );
        assert!(!out.exists(), "{name}: {} was written", out.display());
    }
}

/// 20 steps through `qlora train` from PEFT's initial adapter give PEFT's loss at every step and
/// its final adapter and head.
fn training_matches_peft(name: &str) {
    let (_tmp, out, worst) = common::train_like_peft(&dir(name), 32);
    println!("{name} training: 20 losses within {worst:.2e} relative of PEFT's");
    let train = dir(name).join("train");
    let ours = safetensors(&out.join("adapter/adapter_model.safetensors"));
    let theirs = safetensors(&train.join("adapter_final/adapter_model.safetensors"));
    assert_eq!(
        ours.keys().collect::<std::collections::BTreeSet<_>>(),
        theirs.keys().collect::<std::collections::BTreeSet<_>>(),
        "{name}: the saved keys (adapters and head) are PEFT's"
    );
    for (k, want) in &theirs {
        let d = max_abs(&ours[k], want);
        assert!(d < 1e-4, "{name}: final {k} differs from PEFT's by {d}");
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(
        cfg["modules_to_save"],
        serde_json::json!(["classifier", "score"])
    );
}

#[test]
fn bert_classifier_trains_as_peft_does() {
    training_matches_peft("bert-cls");
}

#[test]
fn llama_classifier_trains_as_peft_does() {
    training_matches_peft("llama-cls");
}

/// Bad labelled records stop `qlora train` before anything is written, naming the file and line.
#[test]
fn bad_labels_are_refused_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            "{\"input_ids\": [1, 5], \"label\": 7}",
            "outside the model's 3 labels",
        ),
        (
            "{\"input_ids\": [1, 5], \"label\": \"joyful\"}",
            "\"joyful\" is not one of the model's labels",
        ),
        ("{\"input_ids\": [1, 5]}", "has no `label`"),
        (
            "{\"input_ids\": [1, 5], \"label\": 1.5}",
            "is not a class index",
        ),
    ];
    for (i, (bad, want)) in cases.iter().enumerate() {
        let data = tmp.path().join(format!("bad{i}.jsonl"));
        std::fs::write(
            &data,
            format!("{{\"input_ids\": [1, 9, 10], \"label\": \"positive\"}}\n{bad}\n"),
        )
        .unwrap();
        let out = tmp.path().join(format!("out{i}"));
        let o = qlora(&[
            "train",
            "--model",
            s(&dir("bert-cls")),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--steps",
            "1",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "case {i} was accepted");
        assert!(
            err.contains(&format!("bad{i}.jsonl:2")) && err.contains(want),
            "case {i}: {err}"
        );
        assert!(!out.exists(), "case {i}: {} was written", out.display());
    }
    // A classification adapter on a causal LM is refused through the CLI too, naming the file.
    let o = qlora(&[
        "eval",
        "--model",
        s(&fixtures().join("arch/qwen2")),
        "--adapter",
        s(&dir("llama-cls").join("adapter")),
        "--data",
        s(&dir("llama-cls").join("train/data.jsonl")),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("adapter_config.json") && err.contains("SEQ_CLS"),
        "{err}"
    );
}

/// `qlora eval --json` on a classifier: loss, accuracy, macro-F1, examples, as `classify`
/// predicts them.
#[test]
fn eval_json_and_classify_agree() {
    let data = dir("bert-cls").join("train/data.jsonl");
    let o = qlora(&[
        "eval",
        "--model",
        s(&dir("bert-cls")),
        "--data",
        s(&data),
        "--json",
        "--seq-len",
        "32",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for key in ["loss", "accuracy", "macro_f1", "examples", "confusion"] {
        assert!(v.get(key).is_some(), "{key} missing from {v}");
    }
    assert_eq!(v["examples"], 8);
    let o = qlora(&[
        "classify",
        "--model",
        s(&dir("bert-cls")),
        "--data",
        s(&data),
        "--seq-len",
        "32",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let preds: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(preds.len(), 8);
    let labels: Vec<i64> = std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["label"]
                .as_i64()
                .unwrap()
        })
        .collect();
    let correct = preds
        .iter()
        .zip(&labels)
        .filter(|(p, &l)| p["label_id"].as_i64() == Some(l))
        .count();
    assert!((v["accuracy"].as_f64().unwrap() - correct as f64 / 8.0).abs() < 1e-12);
    let p: f64 = preds[0]["probabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .sum();
    assert!((p - 1.0).abs() < 1e-5);
}
