//! The decoder and LoRA against transformers/PEFT references on the tiny Llama fixtures.

mod common;

use common::{fixtures, input_ids as ids_of, load_as, max_abs, safetensors as reference};

use candle_core::{DType, Device, Tensor};
use qlora::model::loader::{load_model, BaseFormat, LoadOptions, LoadedModel};
use qlora::peft;

fn load(dir: &str, base: BaseFormat) -> LoadedModel {
    load_as(&fixtures().join(dir), base)
}

#[test]
fn tiny_llama_f32_logits_and_hidden_states_match_transformers() {
    let m = load("tiny-llama", BaseFormat::Dense);
    let r = reference(&fixtures().join("tiny-llama/reference.safetensors"));
    let ids = ids_of(&r);
    let logits = m.model.forward(&ids).unwrap();
    let d = max_abs(&logits, &r["logits"]);
    assert!(d <= 1e-4, "logits differ by {d}");
    let hs = m.model.hidden_states(&ids).unwrap();
    assert_eq!(hs.len(), 3);
    for (i, h) in hs.iter().enumerate() {
        let d = max_abs(h, &r[&format!("hidden_states.{i}")]);
        assert!(d <= 1e-4, "hidden_states.{i} differs by {d}");
    }
}

#[test]
fn peft_adapter_logits_match_peft() {
    let mut m = load("tiny-llama", BaseFormat::Dense);
    let cfg = peft::load_adapter(&mut m.model, &fixtures().join("lora/adapter"), None).unwrap();
    assert_eq!((cfg.rank, cfg.alpha, cfg.scale()), (8, 16.0, 2.0));
    let r = reference(&fixtures().join("lora/reference.safetensors"));
    let logits = m.model.forward(&ids_of(&r)).unwrap();
    let d = max_abs(&logits, &r["logits_adapter"]);
    assert!(d <= 1e-4, "adapter logits differ by {d}");
    // And it really changes the output (so the comparison above means something).
    assert!(max_abs(&logits, &r["logits_base"]) > 1e-2);
}

#[test]
fn bnb_4bit_checkpoint_matches_bitsandbytes_with_and_without_adapter() {
    let mut m = load(
        "bnb4/model",
        BaseFormat::Quantized(qlora::quant::QuantType::Nf4),
    );
    assert_eq!(m.kind, qlora::model::loader::SourceKind::Bnb4bit);
    let r = reference(&fixtures().join("bnb4/reference.safetensors"));
    let ids = ids_of(&r);
    let d = max_abs(&m.model.forward(&ids).unwrap(), &r["logits_4bit"]);
    assert!(d <= 1e-4, "4-bit logits differ by {d}");
    peft::load_adapter(&mut m.model, &fixtures().join("lora/adapter"), None).unwrap();
    let d = max_abs(&m.model.forward(&ids).unwrap(), &r["logits_4bit_lora"]);
    assert!(d <= 1e-4, "QLoRA logits differ by {d}");
}

#[test]
fn quantizing_on_load_equals_the_bnb_checkpoint() {
    // tiny-llama quantized on the fly gives exactly bitsandbytes' 4-bit model.
    let m = load(
        "tiny-llama",
        BaseFormat::Quantized(qlora::quant::QuantType::Nf4),
    );
    let r = reference(&fixtures().join("bnb4/reference.safetensors"));
    let d = max_abs(&m.model.forward(&ids_of(&r)).unwrap(), &r["logits_4bit"]);
    assert!(d <= 1e-4, "on-the-fly NF4 logits differ by {d}");
}

#[test]
fn saved_adapter_has_peft_keys_and_loads_back_identically() {
    let mut m = load("tiny-llama", BaseFormat::Dense);
    let cfg = peft::load_adapter(&mut m.model, &fixtures().join("lora/adapter"), None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("adapter");
    peft::save_adapter(&m.model, &cfg, "../tiny-llama", &out).unwrap();
    let ours = reference(&out.join(peft::WEIGHTS_FILE));
    let theirs = reference(&fixtures().join("lora/adapter").join(peft::WEIGHTS_FILE));
    let mut a: Vec<_> = ours.keys().collect();
    let mut b: Vec<_> = theirs.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "same PEFT key names");
    for (k, t) in &theirs {
        assert_eq!(ours[k].dims(), t.dims(), "{k} shape");
        assert_eq!(max_abs(&ours[k], t), 0.0, "{k} values");
    }
    let saved_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(peft::CONFIG_FILE)).unwrap())
            .unwrap();
    let fixture_cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("lora/adapter").join(peft::CONFIG_FILE)).unwrap(),
    )
    .unwrap();
    for key in [
        "r",
        "lora_alpha",
        "target_modules",
        "peft_type",
        "task_type",
        "use_dora",
    ] {
        assert_eq!(
            saved_cfg[key], fixture_cfg[key],
            "adapter_config.json `{key}`"
        );
    }
    // Writing over an existing folder is refused.
    let err = peft::save_adapter(&m.model, &cfg, "x", &out).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
}

#[test]
fn adapter_that_does_not_fit_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bad");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(
        fixtures().join("lora/adapter/adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    // Rank-8 adapter tensors with one A of the wrong input width.
    let mut t = reference(&fixtures().join("lora/adapter/adapter_model.safetensors"));
    let key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight";
    t.insert(
        key.into(),
        Tensor::zeros((8, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors")).unwrap();
    let mut m = load("tiny-llama", BaseFormat::Dense);
    let err = peft::load_adapter(&mut m.model, &dir, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains(key) && err.contains("[8, 192]"), "{err}");

    // A target module the model does not have.
    let cfg = std::fs::read_to_string(dir.join("adapter_config.json"))
        .unwrap()
        .replace("\"q_proj\"", "\"query_key_value\"");
    std::fs::write(dir.join("adapter_config.json"), cfg).unwrap();
    let err = peft::load_adapter(&mut m.model, &dir, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("query_key_value"), "{err}");
}

#[test]
fn bad_config_and_shape_mismatch_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(
        fixtures().join("tiny-llama/model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(fixtures().join("tiny-llama/config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"llama\"", "\"gpt_neox\""),
    )
    .unwrap();
    let err = load_model(&dir, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("unsupported architecture `gpt_neox`"), "{err}");

    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"intermediate_size\": 192", "\"intermediate_size\": 256"),
    )
    .unwrap();
    let err = load_model(&dir, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("gate_proj.weight") && err.contains("[256, 64]"),
        "{err}"
    );

    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"vocab_size\"", "\"vocab_sz\""),
    )
    .unwrap();
    let err = load_model(&dir, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("`vocab_size`"), "{err}");
}

#[test]
fn kv_cache_generation_equals_full_forward() {
    let m = load(
        "tiny-llama",
        BaseFormat::Quantized(qlora::quant::QuantType::Nf4),
    );
    let r = reference(&fixtures().join("tiny-llama/reference.safetensors"));
    let ids = ids_of(&r).narrow(0, 0, 1).unwrap();
    let full = m.model.forward(&ids).unwrap();
    let mut cache = qlora::model::transformer::KvCache::new(m.model.num_layers());
    let first = m
        .model
        .forward_cached(&ids.narrow(1, 0, 10).unwrap(), &mut cache)
        .unwrap();
    let d = max_abs(&first, &full.narrow(1, 9, 1).unwrap().squeeze(1).unwrap());
    assert!(d <= 1e-4, "prefill {d}");
    for t in 10..16 {
        let step = m
            .model
            .forward_cached(&ids.narrow(1, t, 1).unwrap(), &mut cache)
            .unwrap();
        let d = max_abs(&step, &full.narrow(1, t, 1).unwrap().squeeze(1).unwrap());
        assert!(d <= 1e-4, "cached step {t}: {d}");
    }
}

#[test]
fn tiny_llama_tokenizer_matches_reference_encodings() {
    let tok = qlora::data::tokenizer::TextTokenizer::from_dir(&fixtures().join("tiny-llama"))
        .unwrap()
        .expect("tokenizer.json");
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny-llama/tokenizer_reference.json")).unwrap(),
    )
    .unwrap();
    let samples = r["samples"].as_array().unwrap();
    assert!(!samples.is_empty());
    for s in samples {
        let text = s["text"].as_str().unwrap();
        let want: Vec<u32> = s["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text, true).unwrap(), want, "{text:?}");
        if let Some(decoded) = s.get("decoded").and_then(|d| d.as_str()) {
            assert_eq!(tok.decode(&want, true).unwrap(), decoded);
        }
    }
}

#[test]
fn eval_nll_equals_cross_entropy_of_transformers_logits() {
    let m = load("tiny-llama", BaseFormat::Dense);
    let r = reference(&fixtures().join("tiny-llama/reference.safetensors"));
    let ids: Vec<Vec<u32>> = r["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let logits: Vec<Vec<Vec<f32>>> = r["logits"].to_vec3().unwrap();
    let (mut sum, mut n) = (0f64, 0usize);
    for (row, lg) in ids.iter().zip(&logits) {
        for t in 0..row.len() - 1 {
            let l: Vec<f64> = lg[t].iter().map(|&v| v as f64).collect();
            let max = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + l.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            sum += lse - l[row[t + 1] as usize];
            n += 1;
        }
    }
    let want = sum / n as f64;
    let seqs: Vec<qlora::data::dataset::TokenSequence> = ids
        .iter()
        .map(|i| qlora::data::dataset::TokenSequence {
            ids: i.clone(),
            labels: None,
        })
        .collect();
    let report = qlora::eval::evaluate(&m.model, &seqs, 16, |_, _| {}).unwrap();
    assert_eq!(report.tokens, n);
    assert!(
        (report.mean_nll - want).abs() / want < 1e-5,
        "eval {} vs reference {want}",
        report.mean_nll
    );
}
