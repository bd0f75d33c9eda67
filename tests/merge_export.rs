//! `qlora merge` / `qlora::export`: merged weights against PEFT's `merge_and_unload`, merged
//! exports against base + adapter, GGUF read back by our loader and by candle's llama.cpp-style
//! `quantized_llama`, DoRA, merge → unmerge, and bad inputs.

mod common;

use common::{fixtures, max_abs};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor, D};
use qlora::eval::evaluate;
use qlora::export::{
    export_loaded, export_merged, load_for_merge, ExportFormat, ExportOptions, ExportProgress,
    GgufType, MergeBase, GGUF_FILE,
};
use qlora::lora::LoraConfig;
use qlora::model::checkpoint::SafetensorsDir;
use qlora::model::error::ModelError;
use qlora::model::loader::{load_model, BaseFormat, LoadOptions, LoadedModel};
use qlora::peft::{self, merge};
use qlora::quant::QuantType;

fn tiny() -> PathBuf {
    fixtures().join("tiny-llama")
}

fn adapter() -> PathBuf {
    fixtures().join("lora/adapter")
}

fn load(path: &Path, base: BaseFormat) -> LoadedModel {
    load_model(
        path,
        &LoadOptions {
            base,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

fn with_adapter(path: &Path, base: BaseFormat, adapter_dir: &Path) -> LoadedModel {
    let mut m = load(path, base);
    peft::load_adapter(&mut m.model, adapter_dir, None).expect("adapter loads");
    m
}

fn opts(base: MergeBase, dtype: DType, format: ExportFormat) -> ExportOptions {
    ExportOptions {
        base,
        dtype,
        format,
        ..Default::default()
    }
}

fn export(model: &Path, adapter_dir: &Path, out: &Path, o: &ExportOptions) {
    export_merged(model, adapter_dir, out, o, &mut |_| {})
        .unwrap_or_else(|e| panic!("export into {}: {}", out.display(), chain(&e)));
}

fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Largest difference between two models' logits on [`ids`].
fn logits_gap(a: &LoadedModel, b: &LoadedModel) -> f32 {
    max_abs(
        &a.model.forward(&ids()).unwrap(),
        &b.model.forward(&ids()).unwrap(),
    )
}

fn ids() -> Tensor {
    let r =
        candle_core::safetensors::load(fixtures().join("lora/reference.safetensors"), &Device::Cpu)
            .unwrap();
    r["input_ids"].to_dtype(DType::U32).unwrap()
}

/// Token sequences for evaluation: the fixture's two rows plus a longer synthetic one.
fn eval_seqs() -> Vec<qlora::data::dataset::TokenSequence> {
    let mut seqs = ids().to_vec2::<u32>().unwrap();
    seqs.push((0u32..64).map(|i| (i * 37 + 11) % 512).collect());
    seqs.into_iter()
        .map(|ids| qlora::data::dataset::TokenSequence { ids, labels: None })
        .collect()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn original_f32_merge_equals_peft_merge_and_unload() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    export(
        &tiny(),
        &adapter(),
        &out,
        &opts(MergeBase::Original, DType::F32, ExportFormat::Safetensors),
    );
    let ours = SafetensorsDir::open(&out).unwrap();
    let reference = SafetensorsDir::open(fixtures().join("lora/merged")).unwrap();
    assert_eq!(ours.len(), reference.len());
    let mut worst = 0f32;
    for name in reference.names() {
        let want = reference.read_tensor(name, &Device::Cpu).unwrap();
        let got = ours.read_tensor(name, &Device::Cpu).unwrap();
        assert_eq!(got.dtype(), DType::F32, "{name}");
        assert_eq!(got.dims(), want.dims(), "{name}");
        worst = worst.max(max_abs(&got, &want));
    }
    assert!(worst <= 1e-6, "max |ours - PEFT merged| = {worst}");

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(config.get("quantization_config").is_none());
    assert_eq!(config["dtype"], "float32");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(tiny().join(f)).unwrap(),
            "{f} copied unchanged"
        );
    }
}

#[test]
fn merged_exports_evaluate_like_base_plus_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let seqs = eval_seqs();
    // (merge base, how the unmerged reference is loaded)
    for (base, reference_base) in [
        (MergeBase::Original, BaseFormat::Dense),
        (
            MergeBase::Dequantized,
            BaseFormat::Quantized(QuantType::Nf4),
        ),
        (
            MergeBase::Dequantized,
            BaseFormat::Quantized(QuantType::Fp4),
        ),
    ] {
        let mut o = opts(base, DType::F32, ExportFormat::Safetensors);
        if reference_base == BaseFormat::Quantized(QuantType::Fp4) {
            o.quant = QuantType::Fp4;
        }
        let out = tmp
            .path()
            .join(format!("{base:?}-{}", reference_base.name()));
        export(&tiny(), &adapter(), &out, &o);
        let merged = load(&out, BaseFormat::Dense);
        let reference = with_adapter(&tiny(), reference_base, &adapter());
        let a = evaluate(&merged.model, &seqs, 32, |_, _| {}).unwrap();
        let b = evaluate(&reference.model, &seqs, 32, |_, _| {}).unwrap();
        assert_eq!(a.tokens, b.tokens);
        let rel = (a.mean_nll - b.mean_nll).abs() / b.mean_nll;
        assert!(
            rel < 1e-4,
            "{base:?} vs {reference_base:?}: merged {} vs base+adapter {}",
            a.mean_nll,
            b.mean_nll
        );
        let d = logits_gap(&merged, &reference);
        assert!(d < 1e-4, "{base:?}: logits differ by {d}");
    }
}

#[test]
fn sharded_export_has_an_index_and_the_same_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let one = tmp.path().join("one");
    let many = tmp.path().join("many");
    let mut o = opts(MergeBase::Original, DType::BF16, ExportFormat::Safetensors);
    export(&tiny(), &adapter(), &one, &o);
    o.max_shard_bytes = 60_000;
    export(&tiny(), &adapter(), &many, &o);
    let names = entries(&many);
    assert!(
        names.contains(&"model.safetensors.index.json".to_string()),
        "{names:?}"
    );
    assert!(
        names.iter().filter(|n| n.ends_with(".safetensors")).count() > 2,
        "{names:?}"
    );
    let a = SafetensorsDir::open(&one).unwrap();
    let b = SafetensorsDir::open(&many).unwrap();
    assert_eq!(a.len(), b.len());
    for name in a.names() {
        let (x, y) = (a.view(name).unwrap(), b.view(name).unwrap());
        assert_eq!(x.dtype(), safetensors::Dtype::BF16);
        assert_eq!(x.data(), y.data(), "{name}");
    }
}

/// Last-position logits of candle's llama.cpp-convention GGUF model (interleaved RoPE, llama.cpp
/// names and metadata) for every prefix length in `lens`.
fn candle_gguf_logits(path: &Path, ids: &[u32], lens: &[usize]) -> Vec<Tensor> {
    use candle_transformers::models::quantized_llama::ModelWeights;
    let mut out = Vec::new();
    for &t in lens {
        let mut f = std::fs::File::open(path).unwrap();
        let content = gguf_file::Content::read(&mut f).unwrap();
        let mut model = ModelWeights::from_gguf(content, &mut f, &Device::Cpu)
            .unwrap_or_else(|e| panic!("candle's quantized_llama rejects the GGUF: {e}"));
        let x = Tensor::new(&ids[..t], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        out.push(model.forward(&x, 0).unwrap().squeeze(0).unwrap());
    }
    out
}

#[test]
fn gguf_export_reads_back_in_our_loader_and_candles_llama() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = ids();
    let row: Vec<u32> = ids.get(0).unwrap().to_vec1().unwrap();
    let lens = [1usize, 7, 16];
    // Safetensors exports to compare with, per dtype. GGUF keeps norms in F32 (as llama.cpp
    // does), so the f16 reference takes its norms from the f32 export: same weights exactly.
    let mut st_logits = HashMap::new();
    let mut norms: Option<LoadedModel> = None;
    for dtype in [DType::F32, DType::F16] {
        let out = tmp.path().join(format!("st-{dtype:?}"));
        export(
            &tiny(),
            &adapter(),
            &out,
            &opts(MergeBase::Original, dtype, ExportFormat::Safetensors),
        );
        let m = load_model(
            &out,
            &LoadOptions {
                base: BaseFormat::Dense,
                ..Default::default()
            },
        )
        .unwrap();
        let mut m = m;
        if let Some(f32_model) = &norms {
            m.model.as_llama_mut().unwrap().norm = f32_model.model.as_llama().unwrap().norm.clone();
            for (l, src) in m
                .model
                .as_llama_mut()
                .unwrap()
                .layers
                .iter_mut()
                .zip(&f32_model.model.as_llama().unwrap().layers)
            {
                l.input_layernorm = src.input_layernorm.clone();
                l.post_attention_layernorm = src.post_attention_layernorm.clone();
            }
        }
        st_logits.insert(dtype, m.model.forward(&ids).unwrap());
        if dtype == DType::F32 {
            norms = Some(m);
        }
    }
    // (gguf type, safetensors export compared with, tolerance)
    for (ty, dtype, tol) in [
        (GgufType::F32, DType::F32, 1e-3f32),
        (GgufType::F16, DType::F16, 1e-3),
        (GgufType::BF16, DType::F32, 5e-2),
        // Q8_0: 8-bit weights (and candle quantizes activations to 8 bits too); measured
        // 0.096 for our loader on logits whose largest magnitude is a few units. A wrong
        // q/k permutation or name shows as differences of order 1.
        (GgufType::Q8_0, DType::F32, 0.25),
    ] {
        let out = tmp.path().join(format!("gguf-{ty:?}"));
        let mut o = opts(MergeBase::Original, DType::F32, ExportFormat::Gguf);
        o.gguf_type = Some(ty);
        export(&tiny(), &adapter(), &out, &o);
        let path = out.join(GGUF_FILE);
        assert_eq!(entries(&out), vec![GGUF_FILE.to_string()]);
        let reference = &st_logits[&dtype];

        // Our own GGUF loader (undoes the permutation, rebuilds config and tokenizer).
        let ours = load(&path, BaseFormat::Dense);
        let d = max_abs(&ours.model.forward(&ids).unwrap(), reference);
        assert!(
            d < tol,
            "{ty:?}: our GGUF loader's logits differ by {d} (tolerance {tol})"
        );

        // candle's reader and its llama.cpp-style model.
        let theirs = candle_gguf_logits(&path, &row, &lens);
        for (t, logits) in lens.iter().zip(theirs) {
            let want = reference.get(0).unwrap().get(t - 1).unwrap();
            let d = max_abs(&logits, &want);
            assert!(
                d < tol,
                "{ty:?} prefix {t}: candle quantized_llama differs by {d}"
            );
        }

        // Metadata a llama.cpp loader needs, with llama.cpp's value types.
        let mut f = std::fs::File::open(&path).unwrap();
        let c = gguf_file::Content::read(&mut f).unwrap();
        let md = &c.metadata;
        assert_eq!(md["general.architecture"].to_string().unwrap(), "llama");
        assert_eq!(md["llama.block_count"].to_u32().unwrap(), 2);
        assert_eq!(md["llama.context_length"].to_u32().unwrap(), 128);
        assert_eq!(md["llama.embedding_length"].to_u32().unwrap(), 64);
        assert_eq!(md["llama.feed_forward_length"].to_u32().unwrap(), 192);
        assert_eq!(md["llama.attention.head_count_kv"].to_u32().unwrap(), 2);
        assert_eq!(md["llama.vocab_size"].to_u32().unwrap(), 512);
        assert_eq!(md["llama.rope.freq_base"].to_f32().unwrap(), 10000.0);
        assert_eq!(md["tokenizer.ggml.model"].to_string().unwrap(), "gpt2");
        assert_eq!(md["tokenizer.ggml.bos_token_id"].to_u32().unwrap(), 1);
        assert_eq!(md["tokenizer.ggml.eos_token_id"].to_u32().unwrap(), 2);
        assert_eq!(md["tokenizer.ggml.tokens"].to_vec().unwrap().len(), 512);
        assert!(c.tensor_infos.contains_key("blk.1.attn_q.weight"));
        assert!(c.tensor_infos.contains_key("output.weight"));
        assert_eq!(
            c.tensor_infos["blk.0.attn_norm.weight"].ggml_dtype,
            candle_core::quantized::GgmlDType::F32
        );

        // The tokenizer rebuilt from the GGUF encodes like tokenizer.json.
        let hf = tokenizers::Tokenizer::from_file(tiny().join("tokenizer.json")).unwrap();
        let gguf_tok = ours.tokenizer.as_ref().unwrap();
        for text in [
            "Permission is hereby granted, free of charge",
            "  the GNU  General\n",
        ] {
            assert_eq!(
                gguf_tok.encode(text, true).unwrap(),
                hf.encode(text, true).unwrap().get_ids(),
                "{text:?}"
            );
        }
    }
}

/// A DoRA adapter on tiny-llama with non-trivial B and magnitudes, saved in PEFT format.
fn dora_adapter(dir: &Path) {
    let mut m = load(&tiny(), BaseFormat::Dense);
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_dora: true,
        dtype: DType::F32,
        ..Default::default()
    };
    peft::attach_new(&mut m.model, &cfg, 7).unwrap();
    for (key, var) in peft::trainable_vars(&m.model) {
        let t = var.as_tensor();
        let noise = Tensor::randn(0f32, 0.05, t.dims(), &Device::Cpu).unwrap();
        if key.ends_with("lora_B.weight") {
            var.set(&noise).unwrap();
        } else if key.ends_with("lora_magnitude_vector") {
            var.set(&(t * (noise + 1.0).unwrap()).unwrap()).unwrap();
        }
    }
    peft::save_adapter(&m.model, &cfg, "tiny-llama", dir).unwrap();
}

#[test]
fn dora_merges_to_the_same_outputs_as_base_plus_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let dora = tmp.path().join("dora");
    dora_adapter(&dora);
    for (base, reference_base) in [
        (MergeBase::Original, BaseFormat::Dense),
        (
            MergeBase::Dequantized,
            BaseFormat::Quantized(QuantType::Nf4),
        ),
    ] {
        let out = tmp.path().join(format!("merged-{base:?}"));
        export(
            &tiny(),
            &dora,
            &out,
            &opts(base, DType::F32, ExportFormat::Safetensors),
        );
        let merged = load(&out, BaseFormat::Dense);
        let reference = with_adapter(&tiny(), reference_base, &dora);
        let base_only = load(&tiny(), reference_base);
        let want = reference.model.forward(&ids()).unwrap();
        let d = max_abs(&merged.model.forward(&ids()).unwrap(), &want);
        assert!(d < 1e-4, "{base:?}: merged DoRA logits differ by {d}");
        let effect = max_abs(&base_only.model.forward(&ids()).unwrap(), &want);
        assert!(
            effect > 1e-2,
            "the DoRA adapter must change the outputs ({effect})"
        );
        // The merged rows have norm m, DoRA's definition.
        let w = SafetensorsDir::open(&out)
            .unwrap()
            .read_tensor("model.layers.1.mlp.down_proj.weight", &Device::Cpu)
            .unwrap();
        let m = candle_core::safetensors::load(dora.join(peft::WEIGHTS_FILE), &Device::Cpu)
            .unwrap()["base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"]
            .clone();
        let norms = w.sqr().unwrap().sum(D::Minus1).unwrap().sqrt().unwrap();
        assert!(max_abs(&norms, &m) < 1e-5);
    }
}

#[test]
fn merge_unmerge_and_switch_adapters_in_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let dora = tmp.path().join("dora");
    dora_adapter(&dora);
    for base in [BaseFormat::Dense, BaseFormat::Quantized(QuantType::Nf4)] {
        let mut m = with_adapter(&tiny(), base, &adapter());
        let w0 = m.model.as_llama().unwrap().layers[0]
            .self_attn
            .k_proj
            .base
            .to_dense_f32(&Device::Cpu)
            .unwrap();
        let with_lora = m.model.forward(&ids()).unwrap();
        let merged = merge::merge_model(&mut m.model).unwrap();
        assert!(m.model.as_llama().unwrap().layers[0]
            .self_attn
            .k_proj
            .adapter
            .is_none());
        let d = max_abs(&m.model.forward(&ids()).unwrap(), &with_lora);
        assert!(d < 1e-4, "{base:?}: merged forward differs by {d}");

        // Task switch: out with the LoRA, in with the DoRA adapter.
        let dora_model = with_adapter(&tiny(), base, &dora);
        let with_dora = dora_model.model.forward(&ids()).unwrap();
        let merged = merge::switch_adapters(&mut m.model, merged, &dora_model.model).unwrap();
        let d = max_abs(&m.model.forward(&ids()).unwrap(), &with_dora);
        assert!(
            d < 1e-4,
            "{base:?}: after switching, forward differs by {d}"
        );

        // And out again: the base weights come back.
        merge::unmerge_model(&mut m.model, merged, false).unwrap();
        let back = m.model.as_llama().unwrap().layers[0]
            .self_attn
            .k_proj
            .base
            .to_dense_f32(&Device::Cpu)
            .unwrap();
        let d = max_abs(&back, &w0);
        assert!(d < 1e-5, "{base:?}: merge/unmerge changed W0 by {d}");
        let plain = load(&tiny(), base);
        let d = logits_gap(&m, &plain);
        assert!(
            d < 1e-4,
            "{base:?}: unmerged model differs from the base by {d}"
        );
    }
}

#[test]
fn requantized_export_loads_as_bnb_4bit_and_stays_close() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("nf4");
    let mut o = opts(
        MergeBase::Dequantized,
        DType::F32,
        ExportFormat::Safetensors,
    );
    o.requantize = true;
    let loaded = load_for_merge(&tiny(), &adapter(), &o).unwrap();
    let report = export_loaded(&loaded, &out, &o, &mut |_| {}).unwrap();
    assert_eq!(report.requantized, 14);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization_config"]["bnb_4bit_quant_type"], "nf4");
    let st = SafetensorsDir::open(&out).unwrap();
    assert!(st.contains("model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"));
    let back = load(&out, BaseFormat::Quantized(QuantType::Nf4));
    assert_eq!(back.kind, qlora::model::loader::SourceKind::Bnb4bit);

    // The re-quantized weight is the NF4 rounding of the merged one: within half a code step
    // of its block's absmax (NF4's widest gap is 0.28 of the absmax).
    let merged_dense = load(&tmp_export_f32(&tmp), BaseFormat::Dense);
    let w = merged_dense.model.as_llama().unwrap().layers[1]
        .mlp
        .up_proj
        .base
        .to_dense_f32(&Device::Cpu)
        .unwrap();
    let q = back.model.as_llama().unwrap().layers[1]
        .mlp
        .up_proj
        .base
        .to_dense_f32(&Device::Cpu)
        .unwrap();
    let absmax = w
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(max_abs(&w, &q) <= 0.15 * absmax);

    let (dense, requant) =
        qlora::export::compare_requantized(loaded, &out, &o, &eval_seqs(), 32).unwrap();
    assert_eq!(dense.tokens, requant.tokens);
    assert!(
        (dense.mean_nll - requant.mean_nll).abs() < 0.5,
        "{dense:?} {requant:?}"
    );
    assert_ne!(
        dense.mean_nll, requant.mean_nll,
        "re-quantizing must round something"
    );
}

fn tmp_export_f32(tmp: &tempfile::TempDir) -> PathBuf {
    let out = tmp.path().join("dense-f32");
    export(
        &tiny(),
        &adapter(),
        &out,
        &opts(
            MergeBase::Dequantized,
            DType::F32,
            ExportFormat::Safetensors,
        ),
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Bad input

#[test]
fn adapter_of_another_model_names_tensor_and_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad-adapter");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(
        adapter().join(peft::CONFIG_FILE),
        bad.join(peft::CONFIG_FILE),
    )
    .unwrap();
    let mut tensors =
        candle_core::safetensors::load(adapter().join(peft::WEIGHTS_FILE), &Device::Cpu).unwrap();
    let key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight";
    let narrowed = tensors[key].narrow(1, 0, 48).unwrap();
    tensors.insert(key.to_string(), narrowed);
    candle_core::safetensors::save(&tensors, bad.join(peft::WEIGHTS_FILE)).unwrap();

    let out = tmp.path().join("out");
    let err = export_merged(
        &tiny(),
        &bad,
        &out,
        &opts(MergeBase::Original, DType::F32, ExportFormat::Safetensors),
        &mut |_| {},
    )
    .expect_err("a mismatched adapter must be refused");
    let msg = chain(&err);
    assert!(
        msg.contains(key) && msg.contains("[8, 48]") && msg.contains("[8, 64]"),
        "{msg}"
    );
    assert!(!out.exists());
}

#[test]
fn original_base_of_a_4bit_checkpoint_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let err = export_merged(
        &fixtures().join("bnb4/model"),
        &adapter(),
        &out,
        &opts(MergeBase::Original, DType::F32, ExportFormat::Safetensors),
        &mut |_| {},
    )
    .expect_err("no original weights in a bnb checkpoint");
    let msg = chain(&err);
    assert!(
        msg.contains("--base original") && msg.contains("bitsandbytes 4-bit"),
        "{msg}"
    );
    assert!(!out.exists());
    // The dequantized merge of the same checkpoint works and matches 4-bit base + adapter.
    export(
        &fixtures().join("bnb4/model"),
        &adapter(),
        &out,
        &opts(
            MergeBase::Dequantized,
            DType::F32,
            ExportFormat::Safetensors,
        ),
    );
    let merged = load(&out, BaseFormat::Dense);
    let reference = with_adapter(
        &fixtures().join("bnb4/model"),
        BaseFormat::Quantized(QuantType::Nf4),
        &adapter(),
    );
    let d = logits_gap(&merged, &reference);
    assert!(d < 1e-4, "{d}");
}

#[test]
fn existing_output_folder_is_refused_and_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    for format in [ExportFormat::Safetensors, ExportFormat::Gguf] {
        let err = export_merged(
            &tiny(),
            &adapter(),
            &out,
            &opts(MergeBase::Original, DType::F32, format),
            &mut |_| {},
        )
        .expect_err("existing output");
        assert!(matches!(err, ModelError::Output(_)), "{err:?}");
        assert!(err.to_string().contains("already exists"), "{err}");
    }
    assert_eq!(entries(&out), vec!["keep.txt".to_string()]);
}

#[test]
fn write_error_mid_export_leaves_nothing_under_the_final_name() {
    for format in [ExportFormat::Safetensors, ExportFormat::Gguf] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let mut o = opts(MergeBase::Original, DType::F32, format);
        o.max_shard_bytes = 50_000;
        let parent = tmp.path().to_path_buf();
        let mut seen = 0;
        // After a few tensors, the staging folder disappears under the writer (as on a
        // failing or full disk): the next shard or the final rename fails.
        let result = export_merged(&tiny(), &adapter(), &out, &o, &mut |event| {
            if let ExportProgress::Tensor { .. } = event {
                seen += 1;
                if seen == 3 {
                    for staging in entries(&parent) {
                        std::fs::remove_dir_all(parent.join(staging)).unwrap();
                    }
                }
            }
        });
        let err = result.expect_err("the export must fail");
        assert!(
            seen >= 3,
            "{format:?}: failed before the injected error: {err}"
        );
        assert!(
            !out.exists(),
            "{format:?}: partial output under the final name"
        );
        assert!(
            entries(&parent).is_empty(),
            "{format:?}: {:?}",
            entries(&parent)
        );
    }
}

#[test]
fn requantize_to_gguf_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut o = opts(MergeBase::Dequantized, DType::F32, ExportFormat::Gguf);
    o.requantize = true;
    let err = export_merged(&tiny(), &adapter(), &out, &o, &mut |_| {}).expect_err("refused");
    assert!(err.to_string().contains("--requantize"), "{err}");
    assert!(!out.exists());
}
