//! `qlora compare` on tiny-llama: every number of the report is checked against an independent
//! computation (a separate evaluation through the library, the runs' own metrics files, the
//! quantization error recomputed from the safetensors file with the reference dequantizer),
//! and the table, `compare.json` and the curve image say the same.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use qlora::cli::train::TrainOptions;
use qlora::compare::table::render_table;
use qlora::compare::{compare, write_outputs, CompareReport, CompareSpec};
use qlora::model::loader::{load_model, BaseFormat, LoadOptions};
use qlora::peft;
use qlora::quant::blockwise::dequantize_reference;
use qlora::quant::{Nf4Tensor, QuantType};
use qlora::train::recipe::TrainRecipe;
use qlora::train::step::Batch;
use qlora::train::trainer::validation_loss;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny() -> PathBuf {
    root().join("tests/fixtures/tiny-llama")
}

fn data() -> PathBuf {
    root().join("data/sonnets/valid.txt")
}

/// The training options, through the same resolution as the CLI's.
fn recipe() -> TrainRecipe {
    TrainOptions {
        steps: Some(4),
        batch_size: Some(2),
        seq_len: Some(32),
        lr: Some(5e-3),
        rank: Some(4),
        alpha: Some(8.0),
        dropout: Some(0.1),
        adapter_dtype: Some("f32".into()),
        val_split: Some(0.25),
        eval_every: Some(2),
        seed: Some(5),
        ..Default::default()
    }
    .recipe()
    .unwrap()
}

fn load(base: BaseFormat, adapter: Option<&Path>) -> qlora::model::loader::LoadedModel {
    let opts = LoadOptions {
        base,
        max_positions: Some(32),
        ..Default::default()
    };
    let mut m = load_model(&tiny(), &opts).unwrap();
    if let Some(dir) = adapter {
        peft::load_adapter(&mut m.model, dir, None).unwrap();
    }
    m
}

/// Validation batches built again from scratch, as a user of the library would.
fn val_batches() -> Vec<Batch> {
    let m = load(BaseFormat::Dense, None);
    recipe().load_data(&m, &data()).unwrap().val
}

/// Same computation on the same weights: equal up to summation-order noise.
fn assert_close(what: &str, got: f64, want: f64) {
    let rel = (got - want).abs() / want.abs().max(1e-30);
    assert!(rel <= 1e-9, "{what}: {got} vs {want} (rel {rel:.3e})");
}

/// (mean |W - deq(W)|, ||W - deq(W)||_F / ||W||_F, count of weights) from the safetensors file,
/// quantized with bitsandbytes' defaults and dequantized by the plain reference decoder.
fn direct_quant_error() -> (f64, f64, usize, usize) {
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(tiny().join("model.safetensors"), &Device::Cpu).unwrap();
    let (mut abs, mut diff_sq, mut ref_sq, mut n, mut weights) = (0f64, 0f64, 0f64, 0usize, 0);
    for (name, w) in &tensors {
        if !(name.contains("_proj.weight") && name.starts_with("model.layers.")) {
            continue;
        }
        let q = Nf4Tensor::from_tensor(w, QuantType::Nf4, 64, true).unwrap();
        let deq = dequantize_reference(
            q.packed(),
            &q.absmax().to_f32(),
            q.numel(),
            64,
            QuantType::Nf4,
        );
        let w = w
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for (a, b) in w.iter().zip(&deq) {
            let e = a - f64::from(*b);
            abs += e.abs();
            diff_sq += e * e;
            ref_sq += a * a;
        }
        n += w.len();
        weights += 1;
    }
    (abs / n as f64, (diff_sq / ref_sq).sqrt(), weights, n)
}

/// Train losses of a run's metrics.jsonl.
fn metrics_losses(dir: &Path) -> (Vec<f64>, Vec<(usize, f64)>, u64) {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let (mut train, mut val, mut tokens) = (Vec::new(), Vec::new(), 0);
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(l) = v["loss"].as_f64() {
            train.push(l);
            tokens = v["tokens"].as_u64().unwrap();
        }
        if let Some(l) = v["val_loss"].as_f64() {
            val.push((v["step"].as_u64().unwrap() as usize, l));
        }
    }
    (train, val, tokens)
}

#[test]
fn compare_report_agrees_with_independent_computations() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cmp");
    let spec = CompareSpec {
        model: tiny(),
        load: LoadOptions::default(),
        data: data(),
        recipe: recipe(),
        out: out.clone(),
        progress: false,
    };
    let mut lines = Vec::new();
    let r = compare(&spec, &mut |l| lines.push(l.to_string())).unwrap();
    write_outputs(&r, &out).unwrap();

    // The bases alone, each adapter on its own base, and the cross case, evaluated again.
    let val = val_batches();
    let tokens: usize = val.iter().map(|b| b.predicted_tokens()).sum();
    assert_eq!(r.val_tokens, tokens);
    let nf4 = BaseFormat::Quantized(QuantType::Nf4);
    let eval = |base, adapter: Option<&Path>| validation_loss(&load(base, adapter).model, &val);
    let nf4_adapter = out.join("nf4/adapter");
    let full_adapter = out.join("full/adapter");
    let cases = [
        ("nf4 base", &r.quant_base, eval(nf4, None)),
        ("full base", &r.full_base, eval(BaseFormat::Dense, None)),
        (
            "nf4 adapter on nf4",
            &r.quant_adapter_on_quant,
            eval(nf4, Some(&nf4_adapter)),
        ),
        (
            "full adapter on full",
            &r.full_adapter_on_full,
            eval(BaseFormat::Dense, Some(&full_adapter)),
        ),
        (
            "nf4 adapter on full",
            &r.quant_adapter_on_full,
            eval(BaseFormat::Dense, Some(&nf4_adapter)),
        ),
    ];
    for (what, got, want) in &cases {
        assert_close(what, got.val_loss, *want.as_ref().unwrap());
        assert_close(what, got.perplexity, got.val_loss.exp());
    }
    // Training moved the adapters, and the bases differ, so the five numbers are not one.
    assert!(r.quant_adapter_on_quant.val_loss < r.quant_base.val_loss);
    assert!(r.full_adapter_on_full.val_loss < r.full_base.val_loss);
    assert_ne!(r.quant_base.val_loss, r.full_base.val_loss);
    assert_ne!(
        r.quant_adapter_on_full.val_loss,
        r.full_adapter_on_full.val_loss
    );

    // Each run's curve is its own metrics file; both saw the same batches (same token count)
    // and started from the same adapters (B = 0: the step-0 validation is the base alone).
    for (run, base) in [(&r.quant_run, &r.quant_base), (&r.full_run, &r.full_base)] {
        let (train, val, _) = metrics_losses(&run.out);
        assert_eq!(run.train_losses, train);
        assert_eq!(run.val_losses, val);
        assert_eq!(run.steps, 4);
        assert_eq!(
            val.iter().map(|v| v.0).collect::<Vec<_>>(),
            vec![0, 2, 4],
            "validation at the start, every 2 steps and the end"
        );
        assert_close("step-0 validation = base alone", val[0].1, base.val_loss);
        assert_close("final validation", val[2].1, {
            if run.base == "nf4" {
                r.quant_adapter_on_quant.val_loss
            } else {
                r.full_adapter_on_full.val_loss
            }
        });
        assert!(run.tokens_per_s > 0.0 && run.train_seconds > 0.0);
        let peak = run.peak_rss_bytes.expect("Linux reports VmHWM");
        assert!(peak > 1 << 20, "peak {peak}");
    }
    assert_eq!(r.quant_run.base, "nf4");
    assert_eq!(r.full_run.base, "none");
    assert_eq!(
        metrics_losses(&r.quant_run.out).2,
        metrics_losses(&r.full_run.out).2
    );
    let (q1, f1) = (r.quant_run.train_losses[0], r.full_run.train_losses[0]);
    assert!(q1 != f1 && (q1 - f1).abs() < 0.05, "first losses {q1} {f1}");

    // Quantization error against the reference dequantizer on the file's weights.
    let (mean_abs, rel_fro, weights, elements) = direct_quant_error();
    assert_eq!(r.quant_error.weights, weights);
    assert_eq!(r.quant_error.weights, 14);
    assert_eq!(r.quant_error.elements, elements);
    assert_close("mean |W - deq(W)|", r.quant_error.mean_abs, mean_abs);
    assert_close(
        "relative Frobenius error",
        r.quant_error.rel_frobenius,
        rel_fro,
    );
    assert!(r.quant_error.max_abs >= r.quant_error.mean_abs);

    // compare.json holds exactly the report; the table prints its numbers; one image, 4 curves.
    let text = std::fs::read_to_string(out.join("compare.json")).unwrap();
    assert_eq!(text, serde_json::to_string_pretty(&r).unwrap());
    let json: CompareReport = serde_json::from_str(&text).unwrap();
    assert_eq!(json.quant_run, r.quant_run);
    assert_close("json", json.quant_error.rel_frobenius, rel_fro);
    let table = render_table(&r);
    for needle in [
        format!(
            "| base alone: val loss | {:.4} (ppl {:.2}) | {:.4} (ppl {:.2}) |",
            r.quant_base.val_loss,
            r.quant_base.perplexity,
            r.full_base.val_loss,
            r.full_base.perplexity
        ),
        format!(
            "| NF4-trained adapter: val loss | {:.4} (ppl {:.2}) | {:.4} (ppl {:.2}) |",
            r.quant_adapter_on_quant.val_loss,
            r.quant_adapter_on_quant.perplexity,
            r.quant_adapter_on_full.val_loss,
            r.quant_adapter_on_full.perplexity
        ),
        format!("mean |W - deq(W)| = {:.6e}", mean_abs),
        format!("||W - deq(W)||_F / ||W||_F = {:.6e}", rel_fro),
        format!("validation: {tokens} predicted tokens; 4 steps per run"),
    ] {
        assert!(table.contains(&needle), "{needle}\nnot in\n{table}");
    }
    let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    for name in [
        "nf4 base: train",
        "nf4 base: validation",
        "full-precision base: train",
        "full-precision base: validation",
    ] {
        assert!(svg.contains(name), "{name} missing from the curves");
    }
    assert!(lines.iter().any(|l| l.contains("nf4 base alone")));

    // The folder now holds a comparison: a second one is refused before any work.
    let err = compare(&spec, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("already holds an adapter"), "{err}");
}

#[test]
fn compare_without_a_validation_set_says_what_to_give() {
    let tmp = tempfile::tempdir().unwrap();
    let mut recipe = recipe();
    recipe.validation = qlora::train::recipe::Validation::Split(0.0);
    let spec = CompareSpec {
        model: tiny(),
        load: LoadOptions::default(),
        data: data(),
        recipe,
        out: tmp.path().join("cmp"),
        progress: false,
    };
    let err = compare(&spec, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("compare needs a validation set"), "{err}");
    assert!(err.contains("--val-data"), "{err}");
    assert!(!tmp.path().join("cmp").exists(), "nothing written");
}
