//! GPT-2 against transformers, PEFT and bitsandbytes themselves: the tiny model and outputs in
//! `tests/fixtures/arch/gpt2/` were written by `scripts/make_task_fixtures.py` with
//! transformers 5.23.0, PEFT 0.21.2 and bitsandbytes 0.50.2.
//!
//! Tolerances: 1e-4 absolute on f32 logits and hidden states; the 4-bit codes byte for byte;
//! the 20-step loss curve 1e-3 relative at every step.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::{fixtures, input_ids as ids_of, load_as as load, max_abs, safetensors};
use qlora::model::linear::BaseWeight;
use qlora::model::loader::BaseFormat;
use qlora::model::transformer::{KvCache, Model};
use qlora::peft;
use qlora::quant::QuantType;
use safetensors::SafeTensors;

const TOL: f32 = 1e-4;

fn gpt2() -> PathBuf {
    fixtures().join("arch/gpt2")
}

fn reference() -> HashMap<String, candle_core::Tensor> {
    safetensors(&gpt2().join("reference.safetensors"))
}

#[test]
fn logits_hidden_states_and_cached_decode_match_transformers() {
    let r = reference();
    let m = load(&gpt2(), BaseFormat::Dense);
    assert!(matches!(m.model, Model::Gpt2(_)));
    let ids = ids_of(&r);
    let d = max_abs(&m.model.forward(&ids).unwrap(), &r["logits"]);
    println!("gpt2: logits within {d:.2e} of transformers'");
    assert!(d <= TOL, "logits differ by {d}");
    let hs = m.model.hidden_states(&ids).unwrap();
    assert_eq!(hs.len(), m.model.num_layers() + 1);
    for (i, h) in hs.iter().enumerate() {
        let d = max_abs(h, &r[&format!("hidden_states.{i}")]);
        assert!(d <= TOL, "hidden_states.{i} differs by {d}");
    }
    // One token at a time through the KV cache, with the learned positions offset.
    let row = ids.narrow(0, 0, 1).unwrap();
    let want = r["logits"].narrow(0, 0, 1).unwrap().squeeze(0).unwrap();
    let mut cache = KvCache::new(m.model.num_layers());
    for t in 0..row.dim(1).unwrap() {
        let y = m
            .model
            .forward_cached(&row.narrow(1, t, 1).unwrap(), &mut cache)
            .unwrap()
            .flatten_all()
            .unwrap();
        let d = max_abs(&y, &want.get(t).unwrap());
        assert!(d <= TOL, "cached decode at position {t} differs by {d}");
    }
}

#[test]
fn peft_adapter_on_conv1d_layers_gives_pefts_logits() {
    let r = reference();
    for base in [BaseFormat::Dense, BaseFormat::Quantized(QuantType::Nf4)] {
        let mut m = load(&gpt2(), base);
        let cfg = peft::load_adapter(&mut m.model, &gpt2().join("adapter"), None).unwrap();
        assert_eq!(
            m.model.adapted_linears(),
            8,
            "c_attn, c_proj (both), c_fc per block"
        );
        let logits = m.model.forward(&ids_of(&r)).unwrap();
        if base == BaseFormat::Dense {
            let d = max_abs(&logits, &r["logits_adapter"]);
            println!("gpt2 + PEFT adapter: logits within {d:.2e} of PEFT's");
            assert!(d <= TOL, "adapter logits differ by {d}");
            assert!(max_abs(&r["logits"], &r["logits_adapter"]) > 0.1);
        }
        // What we write back says fan_in_fan_out, as PEFT does for Conv1D.
        let json = peft::config_json(&cfg, &m.model, "..");
        assert_eq!(json["fan_in_fan_out"], true);
    }
}

/// transformers + bitsandbytes transpose each Conv1D weight to `[out, in]` before quantizing;
/// quantizing on load gives their checkpoint's bytes for every block and absmax.
#[test]
fn nf4_codes_equal_bitsandbytes_for_the_transposed_conv1d_weights() {
    let m = load(&gpt2(), BaseFormat::Quantized(QuantType::Nf4));
    let bytes = std::fs::read(gpt2().join("bnb4/model.safetensors")).unwrap();
    let theirs = SafeTensors::deserialize(&bytes).unwrap();
    let mut compared = 0;
    for module in m.model.linears() {
        let BaseWeight::Quantized(q) = &module.linear.base else {
            panic!("{} is not 4-bit", module.path)
        };
        let name = format!("{}.weight", module.path);
        let state = theirs
            .tensor(&format!("{name}.quant_state.bitsandbytes__nf4"))
            .unwrap();
        let state: serde_json::Value = serde_json::from_slice(state.data()).unwrap();
        assert_eq!(
            state["shape"],
            serde_json::json!(q.shape()),
            "{name}: [out, in]"
        );
        for (key, ours) in q.to_bnb_tensors(&name) {
            if key.contains("quant_state") {
                continue;
            }
            let t = theirs.tensor(&key).unwrap();
            assert_eq!(t.shape(), ours.shape.as_slice(), "{key}");
            assert!(t.data() == ours.data.as_slice(), "{key}: bytes differ");
            compared += 1;
        }
    }
    assert!(compared >= 8 * 4, "{compared} tensors compared");
    // Their saved checkpoint loads to the same model as quantizing on load, and runs as
    // transformers runs GPT-2 on the weights its codes stand for (`logits_4bit_decoded`).
    let r = reference();
    let q = load(&gpt2().join("bnb4"), BaseFormat::Quantized(QuantType::Nf4));
    let theirs = q.model.forward(&ids_of(&r)).unwrap();
    let ours = m.model.forward(&ids_of(&r)).unwrap();
    assert_eq!(max_abs(&ours, &theirs), 0.0);
    let d = max_abs(&ours, &r["logits_4bit_decoded"]);
    println!(
        "gpt2 4-bit: logits within {d:.2e} of transformers on the decoded codes \
         (bitsandbytes' CPU forward: {:.2e} away)",
        max_abs(&ours, &r["logits_4bit"])
    );
    assert!(d <= TOL, "4-bit logits differ by {d}");
    assert!(max_abs(&r["logits"], &r["logits_4bit_decoded"]) > 0.1);
}

#[test]
fn merge_equals_pefts_merge_and_unload() {
    // Conv1D weights come back `[in, out]`, as PEFT saves them.
    let (_tmp, out) = common::merge_like_peft(&gpt2());
    let r = reference();
    let m = load(&out, BaseFormat::Dense);
    let d = max_abs(&m.model.forward(&ids_of(&r)).unwrap(), &r["logits_merged"]);
    assert!(d <= TOL, "merged logits differ by {d}");
}

#[test]
fn twenty_training_steps_match_pefts_loss_curve() {
    let (_tmp, _out, worst) = common::train_like_peft(&gpt2(), 16);
    println!("gpt2 training: 20 losses within {worst:.2e} relative of PEFT's");
}
