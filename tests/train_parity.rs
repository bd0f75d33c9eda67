//! Training parity with PEFT + bitsandbytes (`tests/fixtures/train/`): 20 AdamW steps from the
//! fixture's initial adapter on its NF4 base give the same loss at every step, the same step-0
//! gradients and (nearly) the same final adapter.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use qlora::model::loader::{load_model, LoadOptions};
use qlora::optim::{AdamW, AdamWConfig};
use qlora::peft;
use qlora::train::layerwise::{loss_and_grads_layerwise, Checkpointing};
use qlora::train::step::{loss_and_grads, Batch};

fn fx(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let s = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-12);
    d / s
}

#[test]
fn twenty_steps_match_peft() {
    run_parity(None);
}

#[test]
fn twenty_steps_match_peft_layerwise_with_and_without_checkpointing() {
    let a = run_parity(Some(Checkpointing::all(false)));
    let b = run_parity(Some(Checkpointing::all(true)));
    assert_eq!(a, b, "checkpointing on/off give bit-identical losses");
    // The fixture model has 2 layers: keep the top one, recompute the bottom one.
    let keep = Checkpointing {
        enabled: true,
        keep_layers: 1,
    };
    assert!(keep.recomputes(0, 2) && !keep.recomputes(1, 2));
    let c = run_parity(Some(keep));
    assert_eq!(
        a, c,
        "keeping the top layer's graph gives bit-identical losses"
    );
}

/// Runs the 20 steps; `layerwise`: None = one autograd graph, Some(ckpt) = layer by layer.
fn run_parity(layerwise: Option<Checkpointing>) -> Vec<f64> {
    let mut m = load_model(&fx("bnb4/model"), &LoadOptions::default())
        .unwrap()
        .model;
    peft::load_adapter(&mut m, &fx("train/adapter_init"), Some(DType::F32)).unwrap();
    let r: HashMap<String, Tensor> =
        candle_core::safetensors::load(fx("train/reference.safetensors"), &Device::Cpu).unwrap();
    let batch = Batch {
        ids: r["input_ids"].to_dtype(DType::U32).unwrap(),
        labels: r["labels"].flatten_all().unwrap().to_vec1::<i64>().unwrap(),
        segments: None,
        positions: None,
        classes: None,
    };
    let want: Vec<f64> = r["losses"].to_vec1::<f64>().unwrap();
    let named = peft::trainable_vars(&m);
    let vars: Vec<_> = named.iter().map(|(_, v)| v.clone()).collect();
    let cfg = AdamWConfig {
        lr: 1e-3,
        ..Default::default()
    };
    let mut opt = AdamW::new(named.clone(), cfg, |_| 1.0).unwrap();
    let mut losses = Vec::new();
    for (step, &want_loss) in want.iter().enumerate() {
        let (loss, grads) = match layerwise {
            None => loss_and_grads(&m, &batch, &vars, true).unwrap(),
            Some(ckpt) => loss_and_grads_layerwise(&m, &batch, &vars, ckpt).unwrap(),
        };
        losses.push(loss);
        let rel = (loss - want_loss).abs() / want_loss;
        assert!(
            rel < 1e-4,
            "step {step}: loss {loss} vs PEFT {want_loss} (rel {rel:e})"
        );
        if step == 0 {
            for ((name, _), g) in named.iter().zip(&grads) {
                let want_g = &r[&format!("grad.{name}")];
                let g = g.as_ref().unwrap_or_else(|| panic!("{name}: no gradient"));
                if name.contains("lora_B") {
                    let e = max_rel(g, want_g);
                    assert!(e < 1e-4, "step-0 gradient of {name}: rel {e:e}");
                } else {
                    // B = 0 at step 0, so A's gradient is exactly zero in both.
                    assert_eq!(
                        g.abs()
                            .unwrap()
                            .max_all()
                            .unwrap()
                            .to_scalar::<f32>()
                            .unwrap(),
                        0.0
                    );
                }
            }
        }
        opt.step(&grads, 1e-3).unwrap();
    }
    let final_ref: HashMap<String, Tensor> = candle_core::safetensors::load(
        fx("train/adapter_final/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut worst = 0f32;
    for (name, v) in &named {
        worst = worst.max(max_rel(v.as_tensor(), &final_ref[name]));
    }
    assert!(
        worst < 1e-3,
        "final adapter differs from PEFT's by rel {worst:e}"
    );
    eprintln!("final adapter: worst relative difference to PEFT {worst:e}");
    losses
}
