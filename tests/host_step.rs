//! The hand-written Llama-family training step (`qlora::train::llama_step`) against candle's
//! graph of the same layers: the loss is the same arithmetic (bit-identical), the adapter
//! gradients agree to f32 rounding (the layer-input gradients add their parts in another
//! order), with dropout on, bf16 adapters, Qwen2's q/k/v biases and Mistral's sliding window,
//! adapters on some projections only (PEFT's default `q_proj`, `v_proj`), and checkpointing on
//! or off gives bit-identical results.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use qlora::lora::LoraConfig;
use qlora::model::loader::{load_model, LoadOptions};
use qlora::peft;
use qlora::train::layerwise::{loss_and_grads_graph, loss_and_grads_layerwise, Checkpointing};
use qlora::train::llama_step::host_layers;
use qlora::train::step::Batch;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
    let s = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap().max(1e-12)
}

fn check(dir: &str, dtype: DType, tolerance: f32) {
    check_targets(dir, dtype, tolerance, &["all-linear"]);
}

fn check_targets(dir: &str, dtype: DType, tolerance: f32, targets: &[&str]) {
    let mut m = load_model(&fixture(dir), &LoadOptions::default())
        .unwrap()
        .model;
    let cfg = LoraConfig {
        dropout: 0.1,
        dtype,
        targets: targets.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    };
    peft::attach_new(&mut m, &cfg, 5).unwrap();
    let seed = peft::share_dropout_seed(&mut m);
    seed.set(9);
    // B starts at zero: give it values, so that every gradient is non-trivial.
    let named = peft::trainable_vars(&m);
    for (name, v) in &named {
        if name.contains("lora_B") {
            let t = Tensor::randn(0f32, 0.05, v.dims(), &Device::Cpu).unwrap();
            v.set(&t.to_dtype(v.dtype()).unwrap()).unwrap();
        }
    }
    let vars: Vec<_> = named.iter().map(|(_, v)| v.clone()).collect();
    let vocab = m.as_llama().unwrap().cfg.vocab_size as u32;
    let ids: Vec<u32> = (0..2 * 24).map(|i| (i * 7919 + 13) % vocab).collect();
    let batch = Batch {
        ids: Tensor::from_vec(ids.clone(), (2, 24), &Device::Cpu).unwrap(),
        labels: ids.iter().map(|&i| i64::from(i)).collect(),
        segments: None,
        positions: None,
        classes: None,
    };
    let pos = batch.positions_for(&m).unwrap();
    let ctx = m.context(&batch.ids, &pos, &batch.span_for(&m), 0).unwrap();
    assert!(
        host_layers(&m, &ctx, true).unwrap().is_some(),
        "{dir}: the hand-written step applies"
    );
    let (l_graph, g_graph) =
        loss_and_grads_graph(&m, &batch, &vars, Checkpointing::all(false)).unwrap();
    let (l_host, g_host) =
        loss_and_grads_layerwise(&m, &batch, &vars, Checkpointing::all(false)).unwrap();
    assert_eq!(l_host, l_graph, "{dir}: same loss");
    let mut worst = 0f32;
    for ((name, _), (a, b)) in named.iter().zip(g_host.iter().zip(&g_graph)) {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        assert_eq!(a.dtype(), b.dtype(), "{dir} {name}");
        worst = worst.max(max_rel(a, b));
    }
    assert!(
        worst <= tolerance,
        "{dir} {dtype:?}: gradients differ by rel {worst:e}"
    );
    let (l_ckpt, g_ckpt) =
        loss_and_grads_layerwise(&m, &batch, &vars, Checkpointing::all(true)).unwrap();
    assert_eq!(l_ckpt, l_host, "{dir}: checkpointing on, same loss");
    for (a, b) in g_ckpt.iter().zip(&g_host) {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        assert_eq!(
            max_rel(a, b),
            0.0,
            "{dir}: checkpointing on, same gradients"
        );
    }
    eprintln!("{dir} {dtype:?}: gradients within rel {worst:e} of the graph path");
}

/// Adapters on all seven projections, in f32 (gradients within f32 rounding of the summation
/// order) and in bf16 (at most one unit in the last place of an element, 2^-8 relative, flips
/// in the rounding to bf16).
fn check_both_dtypes(dir: &str) {
    check(dir, DType::F32, 1e-5);
    check(dir, DType::BF16, 1.0 / 128.0);
}

#[test]
fn llama_step_matches_the_graph() {
    check_both_dtypes("tiny-llama");
}

#[test]
fn qwen2_step_with_biases_matches_the_graph() {
    check_both_dtypes("arch/qwen2");
}

#[test]
fn mistral_step_with_a_sliding_window_matches_the_graph() {
    check_both_dtypes("arch/mistral");
}

#[test]
fn step_with_adapters_on_q_and_v_only_matches_the_graph() {
    check_targets("tiny-llama", DType::F32, 1e-5, &["q_proj", "v_proj"]);
    check_targets("arch/qwen2", DType::F32, 1e-5, &["q_proj", "v_proj"]);
}
