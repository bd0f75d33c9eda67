//! The decoder on the families the tiny transformers fixtures don't cover — Qwen2 (q/k/v biases)
//! and Llama 3's scaled RoPE — against candle-transformers' own implementations of the same
//! models, on seeded random checkpoints written as HF folders and read by both.
//!
//! Tolerance: f32 math, 1e-4 of the largest logit. Each case also checks that the feature under
//! test moves the logits far more than that, so the comparison can fail.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama as cl, qwen2 as cq};
use common::max_abs;
use qlora::model::loader::{load_model, BaseFormat, LoadOptions};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const SEQ: usize = 24;

fn random(rng: &mut SmallRng, shape: &[usize], std: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let a = std * 3f32.sqrt();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-a..a)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// HF-named random weights for `cfg`; norms near 1, biases on q/k/v when `qkv_bias`.
fn write_checkpoint(dir: &Path, cfg: &Value, qkv_bias: bool, seed: u64) {
    let n = |k: &str| cfg[k].as_u64().unwrap() as usize;
    let (v, h, i, heads) = (
        n("vocab_size"),
        n("hidden_size"),
        n("intermediate_size"),
        n("num_attention_heads"),
    );
    let kv = n("num_key_value_heads") * (h / heads);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut t = HashMap::new();
    t.insert(
        "model.embed_tokens.weight".into(),
        random(&mut rng, &[v, h], 1.0),
    );
    t.insert("lm_head.weight".into(), random(&mut rng, &[v, h], 0.1));
    let norm = |rng: &mut SmallRng| (random(rng, &[h], 0.1) + 1.0).unwrap();
    t.insert("model.norm.weight".into(), norm(&mut rng));
    for l in 0..n("num_hidden_layers") {
        let p = format!("model.layers.{l}");
        for (name, out, inp) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, h),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ] {
            let std = 1.0 / (inp as f32).sqrt();
            t.insert(
                format!("{p}.{name}.weight"),
                random(&mut rng, &[out, inp], std),
            );
            if qkv_bias
                && ["q_proj", "k_proj", "v_proj"]
                    .iter()
                    .any(|q| name.ends_with(q))
            {
                t.insert(format!("{p}.{name}.bias"), random(&mut rng, &[out], 0.5));
            }
        }
        t.insert(format!("{p}.input_layernorm.weight"), norm(&mut rng));
        t.insert(
            format!("{p}.post_attention_layernorm.weight"),
            norm(&mut rng),
        );
    }
    std::fs::create_dir_all(dir).unwrap();
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(cfg).unwrap(),
    )
    .unwrap();
}

fn ids() -> Vec<u32> {
    (0..SEQ as u32).map(|i| (i * 7 + 3) % 64).collect()
}

/// Our logits `[SEQ, vocab]` for the folder.
fn ours(dir: &Path) -> Tensor {
    let m = load_model(
        dir,
        &LoadOptions {
            base: BaseFormat::Dense,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{} loads: {e}", dir.display()));
    let ids = Tensor::new(ids(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.model.forward(&ids).unwrap().squeeze(0).unwrap()
}

fn var_builder(dir: &Path) -> VarBuilder<'static> {
    let files = [dir.join("model.safetensors")];
    // SAFETY: the file is this test's own and is not modified while mapped.
    unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }.unwrap()
}

/// Largest difference relative to the largest reference logit.
fn rel_gap(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    max_abs(a, b) / scale
}

fn qwen2_config(tied: bool) -> Value {
    json!({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 64,
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "sliding_window": 128, "max_window_layers": 2, "use_sliding_window": false,
        "tie_word_embeddings": tied, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "torch_dtype": "float32"})
}

/// candle-transformers' Qwen2 logits `[SEQ, vocab]`: its base model gives every position's
/// hidden state, the head is applied here (its causal-LM wrapper keeps only the last).
fn candle_qwen2(dir: &Path, cfg: &Value) -> Tensor {
    let c: cq::Config = serde_json::from_value(cfg.clone()).unwrap();
    let vb = var_builder(dir);
    let mut model = cq::Model::new(&c, vb.clone()).unwrap();
    let ids = Tensor::new(ids(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let hidden = model.forward(&ids, 0, None).unwrap().squeeze(0).unwrap();
    let head = if c.tie_word_embeddings {
        vb.get((64, 64), "model.embed_tokens.weight").unwrap()
    } else {
        vb.get((64, 64), "lm_head.weight").unwrap()
    };
    hidden.matmul(&head.t().unwrap()).unwrap()
}

#[test]
fn qwen2_logits_match_candle_transformers_qwen2() {
    for tied in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = qwen2_config(tied);
        write_checkpoint(tmp.path(), &cfg, true, 11);
        if tied {
            // A tied checkpoint has no head of its own.
            let path = tmp.path().join("model.safetensors");
            let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
            t.remove("lm_head.weight");
            candle_core::safetensors::save(&t, &path).unwrap();
        }
        let theirs = candle_qwen2(tmp.path(), &cfg);
        let mine = ours(tmp.path());
        let gap = rel_gap(&mine, &theirs);
        assert!(
            gap <= 1e-4,
            "tied={tied}: logits differ by {gap} of the largest"
        );

        // The biases matter: the same checkpoint with them zeroed gives clearly different logits.
        let nobias = tmp.path().join("zero-bias");
        std::fs::create_dir_all(&nobias).unwrap();
        std::fs::copy(tmp.path().join("config.json"), nobias.join("config.json")).unwrap();
        let t = candle_core::safetensors::load(tmp.path().join("model.safetensors"), &Device::Cpu)
            .unwrap();
        let t: HashMap<String, Tensor> = t
            .into_iter()
            .map(|(k, v)| match k.ends_with(".bias") {
                true => (k, v.zeros_like().unwrap()),
                false => (k, v),
            })
            .collect();
        candle_core::safetensors::save(&t, nobias.join("model.safetensors")).unwrap();
        let without = candle_qwen2(&nobias, &cfg);
        assert!(
            rel_gap(&without, &theirs) > 1e-2,
            "q/k/v biases barely change the logits; the test would not see them ignored"
        );
    }
}

/// A Llama 3 config whose RoPE bands fall inside a short sequence: with head_dim 16, θ = 10⁴ and
/// an original context of 64, the wavelengths 6.3 / 20 / 63 / 199 / ... put one pair below the
/// high-frequency cut (16), two in the smoothed band and five in the scaled one.
fn llama3_config(scaling: bool) -> Value {
    let mut cfg = json!({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": [2, 3], "hidden_act": "silu"});
    if scaling {
        cfg["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64});
    }
    cfg
}

/// candle-transformers' Llama logits `[SEQ, vocab]`: it returns the last position's logits, so
/// each prefix is run on its own (no KV cache).
fn candle_llama(dir: &Path, cfg: &Value) -> Tensor {
    let c: cl::LlamaConfig = serde_json::from_value(cfg.clone()).unwrap();
    let c = c.into_config(false);
    let model = cl::Llama::load(var_builder(dir), &c).unwrap();
    let ids = ids();
    let rows: Vec<Tensor> = (1..=SEQ)
        .map(|t| {
            let mut cache = cl::Cache::new(false, DType::F32, &c, &Device::Cpu).unwrap();
            let x = Tensor::new(&ids[..t], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            model
                .forward(&x, 0, &mut cache)
                .unwrap()
                .squeeze(0)
                .unwrap()
        })
        .collect();
    Tensor::stack(&rows, 0).unwrap()
}

#[test]
fn llama3_rope_scaling_matches_candle_transformers_llama() {
    let tmp = tempfile::tempdir().unwrap();
    let scaled = llama3_config(true);
    write_checkpoint(tmp.path(), &scaled, false, 5);
    let theirs = candle_llama(tmp.path(), &scaled);
    let mine = ours(tmp.path());
    let gap = rel_gap(&mine, &theirs);
    assert!(gap <= 1e-4, "logits differ by {gap} of the largest");

    // Same weights, plain RoPE: clearly different, so the scaling is really exercised.
    let plain = tmp.path().join("plain");
    write_checkpoint(&plain, &llama3_config(false), false, 5);
    let unscaled = ours(&plain);
    assert!(
        rel_gap(&unscaled, &theirs) > 1e-2,
        "rope scaling barely changes the logits; the test would not see it ignored"
    );
    // The argmax tokens agree too (a coarse check that reads well in a failure).
    let a = mine.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
    let b = theirs.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
    assert_eq!(a, b);
}
