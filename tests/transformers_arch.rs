//! Qwen2, Mistral and Llama 3.1 against transformers itself (and PEFT / bitsandbytes for Qwen2):
//! the tiny models and outputs in `tests/fixtures/arch/` were written by
//! `scripts/make_arch_fixtures.py` with transformers 5.23.0, PEFT 0.21.2, bitsandbytes 0.50.2.
//!
//! Tolerance: 1e-4 absolute on logits and hidden states (f32 math; the largest logit is about
//! 3). Each test also shows that the feature it checks changes the output by far more than that
//! (biases, the sliding window, RoPE scaling, the adapter, 4-bit storage), so ignoring it fails.

mod common;

use common::{fixtures, input_ids as ids_of, load_as as load, max_abs, safetensors};
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Tensor;
use qlora::model::loader::{BaseFormat, LoadedModel, SourceKind};
use qlora::model::transformer::KvCache;
use qlora::peft;
use qlora::quant::QuantType;

const TOL: f32 = 1e-4;

fn arch(name: &str) -> PathBuf {
    fixtures().join("arch").join(name)
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    safetensors(&arch(name).join("reference.safetensors"))
}

/// Logits and every hidden state (embeddings, each layer's output, the final norm) within
/// [`TOL`] of transformers'.
fn assert_matches_transformers(m: &LoadedModel, r: &HashMap<String, Tensor>, what: &str) {
    let ids = ids_of(r);
    let d = max_abs(&m.model.forward(&ids).unwrap(), &r["logits"]);
    println!("{what}: logits within {d:.2e} of transformers'");
    assert!(d <= TOL, "{what}: logits differ by {d}");
    let hs = m.model.hidden_states(&ids).unwrap();
    assert_eq!(hs.len(), m.model.num_layers() + 1, "{what}: hidden states");
    for (i, h) in hs.iter().enumerate() {
        let d = max_abs(h, &r[&format!("hidden_states.{i}")]);
        assert!(d <= TOL, "{what}: hidden_states.{i} differs by {d}");
    }
}

/// Decoding one token at a time through the KV cache gives transformers' logits at every
/// position.
fn assert_cached_decode_matches(m: &LoadedModel, r: &HashMap<String, Tensor>, what: &str) {
    let ids = ids_of(r).narrow(0, 0, 1).unwrap();
    let want = r["logits"].narrow(0, 0, 1).unwrap().squeeze(0).unwrap();
    let mut cache = KvCache::new(m.model.num_layers());
    for t in 0..ids.dim(1).unwrap() {
        let y = m
            .model
            .forward_cached(&ids.narrow(1, t, 1).unwrap(), &mut cache)
            .unwrap()
            .flatten_all()
            .unwrap();
        let d = max_abs(&y, &want.get(t).unwrap());
        assert!(
            d <= TOL,
            "{what}: cached decode at position {t} differs by {d}"
        );
    }
}

#[test]
fn qwen2_with_biases_and_tied_head_matches_transformers() {
    let r = reference("qwen2");
    let m = load(&arch("qwen2"), BaseFormat::Dense);
    assert!(m.model.as_llama().unwrap().cfg.tie_word_embeddings);
    assert_matches_transformers(&m, &r, "qwen2");
    assert_cached_decode_matches(&m, &r, "qwen2");
    // The q/k/v biases matter: transformers' logits with them zeroed are far away.
    assert!(max_abs(&r["logits"], &r["logits_zero_bias"]) > 0.5);
}

#[test]
fn peft_adapters_match_peft() {
    for name in ["qwen2", "mistral", "llama3"] {
        let r = reference(name);
        let mut m = load(&arch(name), BaseFormat::Dense);
        let cfg = peft::load_adapter(&mut m.model, &arch(name).join("adapter"), None).unwrap();
        assert_eq!((cfg.rank, cfg.alpha), (4, 8.0));
        let d = max_abs(&m.model.forward(&ids_of(&r)).unwrap(), &r["logits_adapter"]);
        println!("{name} + PEFT adapter: logits within {d:.2e}");
        assert!(d <= TOL, "{name}: adapter logits differ by {d}");
        assert!(max_abs(&r["logits"], &r["logits_adapter"]) > 0.5);
    }
}

#[test]
fn qwen2_bnb_4bit_checkpoint_matches_bitsandbytes() {
    let r = reference("qwen2");
    let ids = ids_of(&r);
    let m = load(&arch("qwen2/bnb4"), BaseFormat::Quantized(QuantType::Nf4));
    assert_eq!(m.kind, SourceKind::Bnb4bit);
    let d = max_abs(&m.model.forward(&ids).unwrap(), &r["logits_4bit"]);
    println!("qwen2 bnb 4-bit: logits within {d:.2e}");
    assert!(d <= TOL, "bnb 4-bit logits differ by {d}");
    // Quantizing the f32 checkpoint on load gives bitsandbytes' model too (biases kept f32).
    let q = load(&arch("qwen2"), BaseFormat::Quantized(QuantType::Nf4));
    let d = max_abs(&q.model.forward(&ids).unwrap(), &r["logits_4bit"]);
    assert!(d <= TOL, "NF4 on load differs from bnb by {d}");
    assert!(max_abs(&r["logits"], &r["logits_4bit"]) > 0.5);
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    let r = reference("mistral");
    let m = load(&arch("mistral"), BaseFormat::Dense);
    assert_eq!(m.model.as_llama().unwrap().cfg.sliding_window, Some(6));
    assert_matches_transformers(&m, &r, "mistral");
    assert_cached_decode_matches(&m, &r, "mistral");
    assert!(max_abs(&r["logits"], &r["logits_no_window"]) > 0.5);
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    let r = reference("llama3");
    let m = load(&arch("llama3"), BaseFormat::Dense);
    assert_matches_transformers(&m, &r, "llama3");
    assert_cached_decode_matches(&m, &r, "llama3");
    assert!(max_abs(&r["logits"], &r["logits_default_rope"]) > 0.5);
}
