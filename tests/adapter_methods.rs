//! Adapter methods beyond plain LoRA against PEFT itself (`tests/fixtures/methods/`, made by
//! `scripts/make_method_fixtures.py`): per-module ranks and alphas, `layers_to_transform` with
//! `exclude_modules`, and the refusal of PEFT fields this tool does not implement.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use common::{fixtures, input_ids, load_as, max_abs, safetensors};
use qlora::model::loader::BaseFormat;
use qlora::peft;
use qlora::quant::QuantType;

/// f32 logits against PEFT's (the standard's tolerance for f32 logits).
const TOL: f32 = 1e-4;

fn methods(name: &str) -> PathBuf {
    fixtures().join("methods").join(name)
}

/// `adapter_config.json` of `dir` as JSON.
fn config(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join(peft::io::CONFIG_FILE)).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn rank_alpha_patterns_and_layer_selection_give_pefts_logits() {
    let r = safetensors(&methods("patterns").join("reference.safetensors"));
    let ids = input_ids(&r);
    for name in ["patterns", "layers"] {
        let dir = methods("patterns").join(name);
        for base in [BaseFormat::Dense, BaseFormat::Quantized(QuantType::Nf4)] {
            let mut m = load_as(&fixtures().join("arch/llama3"), base);
            let cfg = peft::load_adapter(&mut m.model, &dir, None).unwrap();
            let got: Tensor = m.model.forward(&ids).unwrap();
            // On NF4: PEFT on the weights bitsandbytes' codes stand for (decoded by the format).
            let key = match base {
                BaseFormat::Dense => format!("logits_{name}"),
                _ => format!("logits_{name}_4bit_decoded"),
            };
            let d = max_abs(&got, &r[&key]);
            println!("{name} ({base:?}): logits within {d:.2e} of PEFT's");
            assert!(d <= TOL, "{name} ({base:?}): logits differ by {d}");
            // Written back as PEFT wrote it.
            let ours = peft::config_json(&cfg, &m.model, "../../arch/llama3");
            let theirs = config(&dir);
            for key in [
                "rank_pattern",
                "alpha_pattern",
                "layers_to_transform",
                "exclude_modules",
                "r",
                "lora_alpha",
                "target_modules",
            ] {
                assert_eq!(ours[key], theirs[key], "{name}: {key}");
            }
        }
    }
    // The patterns act: rank 8 on down_proj, 2 on layer 1's q_proj, 4 elsewhere; layer 0 and
    // k_proj carry nothing under `layers`.
    let mut m = load_as(&fixtures().join("arch/llama3"), BaseFormat::Dense);
    peft::load_adapter(&mut m.model, &methods("patterns").join("patterns"), None).unwrap();
    let ranks: Vec<(String, usize)> = m
        .model
        .linears()
        .iter()
        .filter_map(|l| Some((l.path.clone(), l.linear.adapter.as_ref()?.a.dims()[0])))
        .collect();
    let rank = |p: &str| ranks.iter().find(|(q, _)| q == p).map(|(_, r)| *r);
    assert_eq!(rank("model.layers.0.mlp.down_proj"), Some(8));
    assert_eq!(rank("model.layers.1.self_attn.q_proj"), Some(2));
    assert_eq!(rank("model.layers.0.self_attn.q_proj"), Some(4));
    let mut m = load_as(&fixtures().join("arch/llama3"), BaseFormat::Dense);
    peft::load_adapter(&mut m.model, &methods("patterns").join("layers"), None).unwrap();
    let adapted: Vec<String> = m
        .model
        .linears()
        .iter()
        .filter(|l| l.linear.adapter.is_some())
        .map(|l| l.path.clone())
        .collect();
    assert_eq!(
        adapted,
        [
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj",
            "model.layers.1.mlp.up_proj"
        ]
    );
}

/// A copy of the adapter folder `src` in a temp dir with its config edited by `edit`.
fn edited(src: &Path, edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in [peft::io::CONFIG_FILE, peft::io::WEIGHTS_FILE] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let mut v = config(src);
    edit(&mut v);
    std::fs::write(tmp.path().join(peft::io::CONFIG_FILE), v.to_string()).unwrap();
    tmp
}

#[test]
fn unimplemented_or_inconsistent_peft_fields_are_refused_by_name() {
    let src = methods("patterns").join("patterns");
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("lora_bias", serde_json::json!(true), "lora_bias"),
        ("use_qalora", serde_json::json!(true), "use_qalora"),
        (
            "layer_replication",
            serde_json::json!([[0, 1]]),
            "layer_replication",
        ),
        (
            "trainable_token_indices",
            serde_json::json!([5, 6]),
            "trainable_token_indices",
        ),
        ("init_lora_weights", serde_json::json!("olora"), "olora"),
        (
            "exclude_modules",
            serde_json::json!(".*k_proj"),
            "exclude_modules",
        ),
        ("rank_pattern", serde_json::json!({"(": 3}), "rank_pattern"),
        ("rank_pattern", serde_json::json!({"down_proj": 0}), "rank"),
        (
            "some_future_field",
            serde_json::json!(1.5),
            "some_future_field",
        ),
    ];
    for (key, value, expect) in cases {
        let tmp = edited(&src, |v| v[key] = value.clone());
        let mut m = load_as(&fixtures().join("arch/llama3"), BaseFormat::Dense);
        let e = peft::load_adapter(&mut m.model, tmp.path(), None)
            .expect_err(key)
            .to_string();
        assert!(
            e.contains(expect) && e.contains("adapter_config.json"),
            "{key}: {e}"
        );
    }
    // A rank pattern the stored tensors disagree with names the tensor and both shapes.
    let tmp = edited(&src, |v| v["rank_pattern"]["down_proj"] = 6.into());
    let mut m = load_as(&fixtures().join("arch/llama3"), BaseFormat::Dense);
    let e = peft::load_adapter(&mut m.model, tmp.path(), None)
        .expect_err("shape")
        .to_string();
    assert!(e.contains("down_proj.lora_A.weight"), "{e}");
}

/// `qlora train --model MODEL --data <the embedding fixture's 8 records> --out OUT ARGS...`.
fn train_on(model: &Path, out: &Path, args: &[&str]) -> std::process::Output {
    let data = methods("embedding").join("train/data.jsonl");
    let mut all = vec![
        "train",
        "--model",
        common::arg(model),
        "--data",
        common::arg(&data),
        "--out",
        common::arg(out),
    ];
    all.extend_from_slice(args);
    common::qlora(&all)
}

#[test]
fn train_writes_rank_and_alpha_patterns_peft_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let llama3 = fixtures().join("arch/llama3");
    let o = train_on(
        &llama3,
        &out,
        &[
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--val-split",
            "0",
            "--rank",
            "4",
            "--rank-pattern",
            "down_proj=8,layers\\.1\\..*q_proj=2",
            "--alpha-pattern",
            "v_proj=3",
            "--layers-to-transform",
            "1",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let adapter = out.join("adapter");
    let v = config(&adapter);
    assert_eq!(
        v["rank_pattern"],
        serde_json::json!({"down_proj": 8, "layers\\.1\\..*q_proj": 2})
    );
    assert_eq!(v["alpha_pattern"], serde_json::json!({"v_proj": 3}));
    assert_eq!(v["layers_to_transform"], serde_json::json!([1]));
    let t = safetensors(&adapter.join(peft::io::WEIGHTS_FILE));
    let dims = |k: &str| t[&format!("base_model.model.model.layers.{k}.lora_A.weight")].dims()[0];
    assert_eq!(dims("1.mlp.down_proj"), 8);
    assert_eq!(dims("1.self_attn.q_proj"), 2);
    assert_eq!(dims("1.self_attn.k_proj"), 4);
    assert!(
        !t.keys().any(|k| k.contains("layers.0.")),
        "layer 0 adapted"
    );
    // A bad pattern is refused before anything is written.
    let bad = tmp.path().join("bad");
    let o = train_on(&llama3, &bad, &["--rank-pattern", "down_proj=zero"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--rank-pattern"), "{e}");
    assert!(!bad.exists());
}

/// The reference's input ids of `name` as u32.
fn ids_of(r: &std::collections::HashMap<String, Tensor>, name: &str) -> Tensor {
    r[&format!("input_ids_{name}")]
        .to_dtype(candle_core::DType::U32)
        .unwrap()
}

#[test]
fn embedding_lora_gives_pefts_logits_on_full_precision_and_4bit_bases() {
    let r = safetensors(&methods("embedding").join("reference.safetensors"));
    for name in ["qwen2", "llama3"] {
        let ids = ids_of(&r, name);
        let mut m = load_as(&fixtures().join("arch").join(name), BaseFormat::Dense);
        let plain = m.model.forward(&ids).unwrap();
        peft::load_adapter(&mut m.model, &methods("embedding").join(name), None).unwrap();
        assert!(m.model.token_embedding().adapter.is_some());
        let got = m.model.forward(&ids).unwrap();
        let d = max_abs(&got, &r[&format!("logits_{name}")]);
        println!("{name} + embedding adapter: logits within {d:.2e} of PEFT's");
        assert!(d <= TOL, "{name}: {d}");
        assert!(
            max_abs(&plain, &got) > 0.1,
            "{name}: the adapter barely shows"
        );
    }
    // bitsandbytes' 4-bit Qwen2 with the same adapter (the embedding stays full precision),
    // against PEFT on the weights its codes stand for (bitsandbytes' CPU forward is off for the
    // `[64, 96]` down projections, see tests/fixtures/arch/README.md).
    let ids = ids_of(&r, "qwen2");
    let mut q = load_as(
        &fixtures().join("arch/qwen2/bnb4"),
        BaseFormat::Quantized(QuantType::Nf4),
    );
    peft::load_adapter(&mut q.model, &methods("embedding").join("qwen2"), None).unwrap();
    let got = q.model.forward(&ids).unwrap();
    let d = max_abs(&got, &r["logits_qwen2_4bit_decoded"]);
    println!(
        "qwen2 bnb 4-bit + embedding adapter: logits within {d:.2e} of PEFT's on the decoded \
         codes (bitsandbytes' CPU forward: {:.2e} away)",
        max_abs(&got, &r["logits_qwen2_4bit"])
    );
    assert!(d <= TOL, "4-bit: {d}");
}

/// 20 steps through `qlora train` from PEFT's initial embedding adapter give PEFT's loss at every
/// step, and its final embedding adapter.
#[test]
fn embedding_lora_trains_as_peft_does() {
    let train = methods("embedding").join("train");
    let (_tmp, out, worst) =
        common::train_like_peft_from(&fixtures().join("arch/qwen2"), &train, 16, "none");
    println!("embedding LoRA, 20 steps: worst loss difference {worst:.2e} relative");
    let ours = safetensors(&out.join("adapter").join(peft::io::WEIGHTS_FILE));
    let theirs = safetensors(&train.join("adapter_final").join(peft::io::WEIGHTS_FILE));
    let mut keys: Vec<&String> = theirs.keys().collect();
    keys.sort();
    assert_eq!(ours.len(), theirs.len(), "{keys:?}");
    for k in keys {
        let d = max_abs(&ours[k], &theirs[k]);
        assert!(d < 1e-4, "{k}: {d}");
    }
}

/// `qlora merge --base original --dtype f32` of the embedding adapters. Llama 3 (untied head):
/// PEFT's `merge_and_unload`. Qwen2 (head tied to the embedding): PEFT's merge changes the head
/// with the embedding, and its merged model's logits move 0.43 from the adapter's; ours writes
/// the head apart (`tie_word_embeddings: false`), so the merged model computes base + adapter,
/// with PEFT's merged embedding.
#[test]
fn embedding_merge_equals_peft_and_keeps_a_tied_head() {
    let r = safetensors(&methods("embedding").join("reference.safetensors"));
    for name in ["llama3", "qwen2"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let o = common::qlora(&[
            "merge",
            "--model",
            common::arg(&fixtures().join("arch").join(name)),
            "--adapter",
            common::arg(&methods("embedding").join(name)),
            "--out",
            common::arg(&out),
            "--base",
            "original",
            "--dtype",
            "f32",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let merged = load_as(&out, BaseFormat::Dense);
        assert!(merged.model.token_embedding().adapter.is_none());
        let got = merged.model.forward(&ids_of(&r, name)).unwrap();
        let emb = merged.model.token_embedding().weight.clone();
        let d_emb = max_abs(&emb, &r[&format!("embed_{name}_merged")]);
        assert!(d_emb < 1e-6, "{name}: merged embedding differs by {d_emb}");
        let head = merged.model.lm_head().unwrap().clone();
        let (want, want_head) = if name == "qwen2" {
            // Untied on export: the head is the original table.
            let text = std::fs::read_to_string(out.join("config.json")).unwrap();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["tie_word_embeddings"], false);
            assert!(
                max_abs(&got, &r["logits_qwen2_merged"]) > 0.1,
                "PEFT's tied merge"
            );
            (format!("logits_{name}"), format!("head_{name}"))
        } else {
            (
                format!("logits_{name}_merged"),
                format!("head_{name}_merged"),
            )
        };
        let d = max_abs(&got, &r[&want]);
        println!("{name}: merged logits within {d:.2e} of PEFT's `{want}`");
        assert!(d <= TOL, "{name}: merged logits differ by {d}");
        assert!(max_abs(&head, &r[&want_head]) < 1e-6, "{name}: head");
    }
}

/// loralib's `merge_weights`: merged for eval (same outputs), unmerged for training (the table
/// and a tied head back as they were, up to f32 rounding of `E + Δ − Δ`).
#[test]
fn embedding_merge_in_memory_is_reversible() {
    let r = safetensors(&methods("embedding").join("reference.safetensors"));
    for name in ["qwen2", "llama3"] {
        let ids = ids_of(&r, name);
        let mut m = load_as(&fixtures().join("arch").join(name), BaseFormat::Dense);
        let table = m.model.token_embedding().weight.clone();
        let tied = m.model.token_embedding().tied_head;
        peft::load_adapter(&mut m.model, &methods("embedding").join(name), None).unwrap();
        let before = m.model.forward(&ids).unwrap();
        let merged = peft::merge::merge_model(&mut m.model).unwrap();
        let d = max_abs(&m.model.forward(&ids).unwrap(), &before);
        assert!(d < 1e-5, "{name}: merged outputs differ by {d}");
        peft::merge::unmerge_model(&mut m.model, merged, true).unwrap();
        let emb = m.model.token_embedding();
        assert!(emb.adapter.is_some());
        assert_eq!(emb.tied_head, tied, "{name}: the head is tied again");
        let d = max_abs(emb.weight, &table);
        assert!(d < 1e-6, "{name}: table restored within {d}");
        let d = max_abs(&m.model.forward(&ids).unwrap(), &before);
        assert!(d < 1e-5, "{name}: unmerged outputs differ by {d}");
    }
}

/// PEFT loads an adapter `qlora train` wrote and gives our logits with it: `ours/<case>/` is
/// what the run below wrote (`scripts/peft_reads_ours.py`, the same arguments), `peft_logits`
/// what PEFT computes with it. The same run again writes the same tensors (within f32
/// summation order across CPUs).
fn peft_reads_ours(case: &str, base: &str, ids_file: &str, extra: &[&str]) {
    let ours = methods("ours").join(case);
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let model = fixtures().join(base);
    let mut args = vec![
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--seq-len",
        "16",
        "--lr",
        "1e-2",
        "--val-split",
        "0",
        "--no-shuffle",
        "--adapter-dtype",
        "f32",
        "--quant",
        "none",
        "--seed",
        "7",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--dropout",
        "0",
    ];
    args.extend_from_slice(extra);
    let o = train_on(&model, &run, &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let again = safetensors(&run.join("adapter").join(peft::io::WEIGHTS_FILE));
    let kept = safetensors(&ours.join(peft::io::WEIGHTS_FILE));
    assert_eq!(again.len(), kept.len());
    for (k, t) in &kept {
        let d = max_abs(&again[k], t);
        assert!(d < 1e-5, "{case} {k}: the run wrote other values ({d})");
    }
    let r = safetensors(&fixtures().join(ids_file));
    let mut m = load_as(&model, BaseFormat::Dense);
    peft::load_adapter(&mut m.model, &ours, None).unwrap();
    let got = m.model.forward(&input_ids(&r)).unwrap();
    let peft_logits = &safetensors(&ours.join("peft_logits.safetensors"))["logits"];
    let d = max_abs(&got, peft_logits);
    println!("our {case} adapter in PEFT: logits within {d:.2e} of ours");
    assert!(d <= TOL, "{case}: {d}");
}

#[test]
fn peft_reads_our_embedding_and_adalora_adapters() {
    peft_reads_ours(
        "embedding",
        "arch/qwen2",
        "arch/qwen2/reference.safetensors",
        &["--targets", "embed_tokens,q_proj,v_proj"],
    );
    peft_reads_ours(
        "adalora",
        "tiny-llama",
        "lora/reference.safetensors",
        &[
            "--targets",
            "q_proj,v_proj",
            "--adalora",
            "--init-r",
            "4",
            "--target-r",
            "2",
            "--tinit",
            "0",
            "--tfinal",
            "1",
            "--delta-t",
            "1",
        ],
    );
}

/// 20 AdaLoRA steps on bitsandbytes' 4-bit tiny-llama from PEFT's initial AdaLoRA adapter: every
/// step's loss (PEFT's `output.loss`, the orthogonality penalty included) and penalty, the
/// final `rank_pattern` (budget 24 → 12 triplets, masked at steps 4, 6, ..., 15) and the pruned
/// adapter PEFT saves.
#[test]
fn adalora_trains_as_peft_does() {
    let d = methods("adalora");
    let (_tmp, out, worst) =
        common::train_like_peft_from(&fixtures().join("bnb4/model"), &d, 16, "nf4");
    println!("AdaLoRA, 20 steps: worst loss difference {worst:.2e} relative");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("losses.json")).unwrap()).unwrap();
    let regs: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("orth_reg").and_then(|x| x.as_f64()))
        .collect();
    let want_regs: Vec<f64> = want["orth_reg"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(regs.len(), 20);
    for (step, (g, w)) in regs.iter().zip(&want_regs).enumerate() {
        assert!(
            (g - w).abs() / w < 1e-4,
            "step {step}: orth_reg {g} vs PEFT {w}"
        );
    }
    let adapter = out.join("adapter");
    let ours = config(&adapter);
    let theirs = config(&d.join("adapter_final"));
    assert_eq!(ours["peft_type"], "ADALORA");
    assert_eq!(
        ours["rank_pattern"], theirs["rank_pattern"],
        "final rank pattern"
    );
    for key in [
        "init_r",
        "target_r",
        "tinit",
        "tfinal",
        "deltaT",
        "total_step",
        "orth_reg_weight",
    ] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    let ours = safetensors(&adapter.join(peft::io::WEIGHTS_FILE));
    let theirs = safetensors(&d.join("adapter_final").join(peft::io::WEIGHTS_FILE));
    assert_eq!(ours.len(), theirs.len());
    let mut worst_t = 0f32;
    for (k, t) in &theirs {
        assert_eq!(ours[k].dims(), t.dims(), "{k}");
        worst_t = worst_t.max(max_abs(&ours[k], t));
    }
    println!("AdaLoRA final adapter within {worst_t:.2e} of PEFT's");
    assert!(worst_t < 1e-4, "{worst_t}");
}

/// PEFT's final (pruned) AdaLoRA adapter for eval on the f32 and the 4-bit base, and merged.
#[test]
fn pefts_adalora_adapter_evaluates_and_merges_as_in_peft() {
    let d = methods("adalora");
    let r = safetensors(&d.join("reference.safetensors"));
    let ids = input_ids(&r);
    let final_ = d.join("adapter_final");
    let mut m = load_as(&fixtures().join("tiny-llama"), BaseFormat::Dense);
    let cfg = peft::load_adapter(&mut m.model, &final_, None).unwrap();
    assert_eq!(
        cfg.adalora
            .as_ref()
            .unwrap()
            .rank_of("model.layers.1.self_attn.q_proj"),
        1
    );
    let dd = max_abs(&m.model.forward(&ids).unwrap(), &r["logits_final"]);
    println!("PEFT's AdaLoRA adapter: logits within {dd:.2e} (f32 base)");
    assert!(dd <= TOL, "{dd}");
    let mut q = load_as(
        &fixtures().join("bnb4/model"),
        BaseFormat::Quantized(QuantType::Nf4),
    );
    peft::load_adapter(&mut q.model, &final_, None).unwrap();
    let dq = max_abs(&q.model.forward(&ids).unwrap(), &r["logits_final_4bit"]);
    println!("PEFT's AdaLoRA adapter: logits within {dq:.2e} (bnb 4-bit base)");
    assert!(dq <= TOL, "{dq}");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let o = common::qlora(&[
        "merge",
        "--model",
        common::arg(&fixtures().join("tiny-llama")),
        "--adapter",
        common::arg(&final_),
        "--out",
        common::arg(&out),
        "--base",
        "original",
        "--dtype",
        "f32",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let merged = load_as(&out, BaseFormat::Dense);
    let dm = max_abs(
        &merged.model.forward(&ids).unwrap(),
        &r["logits_final_merged"],
    );
    println!("merged AdaLoRA: logits within {dm:.2e} of PEFT's merge_and_unload");
    assert!(dm <= TOL, "{dm}");
}

/// An AdaLoRA adapter whose masks or tensors disagree is refused, naming the file and key.
#[test]
fn inconsistent_adalora_adapters_are_refused() {
    let src = methods("adalora").join("adapter_final");
    // A mask of the wrong length.
    let tmp = edited(&src, |v| {
        v["rank_pattern"]["model.layers.0.self_attn.q_proj.lora_E"] =
            serde_json::json!([true, false]);
    });
    let mut m = load_as(&fixtures().join("tiny-llama"), BaseFormat::Dense);
    let e = peft::load_adapter(&mut m.model, tmp.path(), None)
        .expect_err("mask length")
        .to_string();
    assert!(
        e.contains("rank_pattern") && e.contains("init_r") && e.contains("adapter_config.json"),
        "{e}"
    );
    // A mask that keeps another number of values than the tensors hold.
    let tmp = edited(&src, |v| {
        v["rank_pattern"]["model.layers.1.self_attn.q_proj.lora_E"] =
            serde_json::json!([true, true, false, false, false, false]);
    });
    let e = peft::load_adapter(&mut m.model, tmp.path(), None)
        .expect_err("tensor shape")
        .to_string();
    assert!(e.contains("layers.1.self_attn.q_proj.lora_A"), "{e}");
    // A budget that cannot fall.
    let tmp = edited(&src, |v| v["tinit"] = 18.into());
    let e = peft::load_adapter(&mut m.model, tmp.path(), None)
        .expect_err("schedule")
        .to_string();
    assert!(e.contains("tinit"), "{e}");
}

/// `qlora compare` takes the method flags: NF4 vs full precision for AdaLoRA is one command.
#[test]
fn compare_runs_adalora_on_both_bases() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cmp");
    let data = methods("embedding").join("train/data.jsonl");
    let o = common::qlora(&[
        "compare",
        "--model",
        common::arg(&fixtures().join("tiny-llama")),
        "--data",
        common::arg(&data),
        "--out",
        common::arg(&out),
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--val-split",
        "0.25",
        "--adalora",
        "--init-r",
        "4",
        "--target-r",
        "2",
        "--tinit",
        "0",
        "--tfinal",
        "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("compare.json").is_file());
    for run in ["nf4", "full"] {
        let v = config(&out.join(run).join("adapter"));
        assert_eq!(v["peft_type"], "ADALORA", "{run}");
        assert_eq!(v["total_step"], 4, "{run}");
        assert!(v["rank_pattern"].is_object(), "{run}: pruned");
    }
}

/// LoRA on Llama 3's untied `lm_head` (+ q_proj, v_proj): PEFT's logits, its merge, and 20
/// training steps from its initial adapter.
#[test]
fn head_lora_gives_pefts_logits_merge_and_training() {
    let d = methods("head");
    let r = safetensors(&d.join("reference.safetensors"));
    let ids = input_ids(&r);
    let mut m = load_as(&fixtures().join("arch/llama3"), BaseFormat::Dense);
    peft::load_adapter(&mut m.model, &d.join("adapter"), None).unwrap();
    assert!(m.model.head_adapter().is_some());
    let got = m.model.forward(&ids).unwrap();
    let dl = max_abs(&got, &r["logits"]);
    println!("lm_head LoRA: logits within {dl:.2e} of PEFT's");
    assert!(dl <= TOL, "{dl}");
    // In memory: merged gives the same outputs, unmerged gives the adapter back.
    let merged = peft::merge::merge_model(&mut m.model).unwrap();
    let dm = max_abs(&m.model.forward(&ids).unwrap(), &r["logits_merged"]);
    assert!(dm <= TOL, "merged in memory: {dm}");
    peft::merge::unmerge_model(&mut m.model, merged, true).unwrap();
    assert!(max_abs(&m.model.forward(&ids).unwrap(), &got) < 1e-5);
    // Exported.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let o = common::qlora(&[
        "merge",
        "--model",
        common::arg(&fixtures().join("arch/llama3")),
        "--adapter",
        common::arg(&d.join("adapter")),
        "--out",
        common::arg(&out),
        "--base",
        "original",
        "--dtype",
        "f32",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let exported = load_as(&out, BaseFormat::Dense);
    let de = max_abs(&exported.model.forward(&ids).unwrap(), &r["logits_merged"]);
    println!("lm_head LoRA merged: logits within {de:.2e} of PEFT's merge_and_unload");
    assert!(de <= TOL, "{de}");
    let (_t, _o, worst) = common::train_like_peft_from(
        &fixtures().join("arch/llama3"),
        &d.join("train"),
        16,
        "none",
    );
    println!("lm_head LoRA, 20 steps: worst loss difference {worst:.2e} relative");
}
