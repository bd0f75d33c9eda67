//! Plan arithmetic against the real storage of what it counts, and the presets' known sizes.

use candle_core::DType;
use qlora_quant::{Nf4Tensor, QuantType};
use serde_json::json;

use super::estimate::{self, adapter_params, base_bytes, optimizer_bytes, quantized_bytes};
use super::presets::{preset_config, PRESETS};
use super::*;
use crate::model::config::LlamaConfig;
use crate::model::loader::LoadOptions;
use crate::model::random_source::generate_model;

#[test]
fn quantized_bytes_equal_nf4_tensor_storage() {
    for &(rows, cols, bs, dq) in &[
        (64usize, 64usize, 64usize, true),
        (37, 1001, 64, true),
        (300, 130, 32, false),
        (129, 4097, 128, true),
        (1, 65_600, 64, true),
    ] {
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32) - 50.0)
            .collect();
        let t = Nf4Tensor::quantize(
            &data,
            &[rows, cols],
            qlora_quant::SourceDtype::F32,
            QuantType::Nf4,
            bs,
            dq,
        )
        .unwrap();
        assert_eq!(
            quantized_bytes(rows * cols, bs, dq),
            t.storage_bytes(),
            "{rows}x{cols} bs {bs} double {dq}"
        );
    }
}

#[test]
fn base_bytes_equal_what_the_loader_builds() {
    for tie in [false, true] {
        let cfg = LlamaConfig::from_json(&json!({"model_type": "qwen2", "vocab_size": 300,
            "hidden_size": 96, "intermediate_size": 200, "num_hidden_layers": 2,
            "num_attention_heads": 6, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": tie}))
        .unwrap();
        let m = generate_model(&cfg, &LoadOptions::default(), 1).unwrap();
        let mut linear = 0;
        for layer in &m.as_llama().unwrap().layers {
            for (_, lin) in layer.projections() {
                linear += lin.base.storage_bytes();
                linear += lin.bias.as_ref().map_or(0, |b| b.elem_count() * 4);
            }
        }
        let mut dense = m.as_llama().unwrap().embed_tokens.elem_count()
            + m.as_llama().unwrap().norm.elem_count();
        dense += m
            .as_llama()
            .unwrap()
            .lm_head
            .as_ref()
            .map_or(0, |h| h.elem_count());
        for layer in &m.as_llama().unwrap().layers {
            dense +=
                layer.input_layernorm.elem_count() + layer.post_attention_layernorm.elem_count();
        }
        let s = PlanSettings::default();
        assert_eq!(
            base_bytes(&PlanModel::from(cfg.clone()), &s),
            (linear, dense * 4),
            "tied {tie}"
        );
    }
}

#[test]
fn presets_have_their_published_sizes() {
    let want = [
        ("llama-2-7b", 6_738_415_616usize, 39_976_960usize),
        ("llama-3-8b", 8_030_261_248, 41_943_040),
        ("mistral-7b", 7_241_732_096, 41_943_040),
        // Qwen2-7B is 7,615,616,512 with its 129,024 q/k/v bias values.
        ("qwen2-7b", 7_615_616_512 - 129_024, 40_370_176),
    ];
    for (name, params, lora) in want {
        let cfg = preset_config(name).unwrap();
        assert_eq!(cfg.parameter_count(), params, "{name}");
        let s = PlanSettings::default();
        assert_eq!(
            adapter_params(&PlanModel::from(cfg.clone()), &s)
                .iter()
                .sum::<usize>(),
            lora,
            "{name} r16"
        );
    }
    assert_eq!(PRESETS.len(), 4);
    let q = preset_config("Qwen2-7B").unwrap();
    assert!(q.attention_bias && !q.o_proj_bias && !q.tie_word_embeddings);
    assert_eq!(q.vocab_size, 152_064);
    assert_eq!(preset_config("llama-3-8b").unwrap().vocab_size, 128_256);
    assert!(preset_config("gpt-2").is_none());
}

#[test]
fn optimizer_storage_kinds() {
    let params = [100usize, 10_000];
    assert_eq!(optimizer_bytes(&params, &OptimPlan::Plain), 8 * 10_100);
    assert_eq!(
        optimizer_bytes(
            &params,
            &OptimPlan::Paged {
                resident_bytes: 4096
            }
        ),
        4096
    );
    // Small tensors keep f32 state; large ones 2 bytes + two f32 absmax per 256 values.
    assert_eq!(
        optimizer_bytes(&params, &OptimPlan::EightBit),
        800 + 20_000 + 8 * 40
    );
}

#[test]
fn llama2_7b_plan_and_limits_are_the_largest_that_fit() {
    let cfg = preset_config("llama-2-7b").unwrap();
    let s = PlanSettings {
        batch_size: 1,
        threads: 2,
        ..Default::default()
    };
    let p = plan_memory(&PlanModel::from(cfg.clone()), &s);
    // 3.11 GiB of NF4 linear weights, 1 GiB of f32 embeddings + head, activations of one layer.
    assert!(p.peak > 5 << 30 && p.fits(7 << 30), "{p}");
    let bf16 = plan_memory(
        &PlanModel::from(cfg.clone()),
        &PlanSettings {
            weight_dtype: DType::BF16,
            ..s.clone()
        },
    );
    let item = |plan: &MemoryPlan, name: &str| {
        plan.items
            .iter()
            .find(|i| i.name == name)
            .map(|i| i.bytes)
            .unwrap_or_else(|| panic!("no {name} in {plan}"))
    };
    let dense = "embeddings, head, norms";
    assert_eq!(
        item(&p, dense) - item(&bf16, dense),
        2 * 32000 * 4096 * 2 + 65 * 4096 * 2,
        "{bf16}"
    );
    // A bf16 head is widened to f32 for the loss (500 MiB): with bf16 weights the loss head
    // is the peak of the step, with f32 ones the recomputed layer and its backward are.
    let loss = estimate::activations(&PlanModel::from(cfg.clone()), &bf16.settings).loss;
    assert_eq!(item(&bf16, "loss head"), loss, "{bf16}");
    assert!(loss > 32000 * 4096 * 4, "{bf16}");
    let layer = item(&p, "layer activations") + item(&p, "layer backward");
    assert!(
        layer > estimate::activations(&PlanModel::from(cfg.clone()), &s).loss,
        "{p}"
    );
    assert!(bf16.peak < p.peak, "{bf16}\n{p}");
    assert_eq!(p.peak, p.items.iter().map(|i| i.bytes).sum::<usize>());
    let limit = 8 << 30;
    let t = largest_seq_len(&PlanModel::from(cfg.clone()), &s, limit, 64, 65_536).unwrap();
    let fits = |t| {
        plan_memory(
            &PlanModel::from(cfg.clone()),
            &PlanSettings {
                seq_len: t,
                ..s.clone()
            },
        )
        .fits(limit)
    };
    assert!(fits(t) && !fits(t + 64), "seq {t}");
    let b = largest_batch(&PlanModel::from(cfg.clone()), &s, limit, 1024).unwrap();
    let fits = |b| {
        plan_memory(
            &PlanModel::from(cfg.clone()),
            &PlanSettings {
                batch_size: b,
                ..s.clone()
            },
        )
        .fits(limit)
    };
    assert!(fits(b) && !fits(b + 1), "batch {b}");
    assert_eq!(
        largest_batch(&PlanModel::from(cfg.clone()), &s, 1 << 30, 1024),
        None
    );
    // Checkpointing off keeps every layer's tape (32 x ~90 MiB on the hand-written step):
    // far more memory.
    let off = plan_memory(
        &PlanModel::from(cfg.clone()),
        &PlanSettings {
            grad_checkpointing: false,
            ..s.clone()
        },
    );
    assert!(off.peak > p.peak + (5 << 29), "{off}");
}

#[test]
fn each_kept_layer_adds_one_layer_graph() {
    let cfg = preset_config("llama-2-7b").unwrap();
    let with = |grad_checkpointing: bool, keep_layers: usize| {
        plan_memory(
            &PlanModel::from(cfg.clone()),
            &PlanSettings {
                batch_size: 1,
                grad_checkpointing,
                keep_layers,
                ..Default::default()
            },
        )
    };
    let graph =
        estimate::activations(&PlanModel::from(cfg.clone()), &with(true, 0).settings).layer_graph;
    assert_eq!(with(true, 4).peak - with(true, 3).peak, graph);
    assert!(with(true, 1).peak >= with(true, 0).peak);
    // Keeping all 32 (or more) is checkpointing off, plus the 32 layer inputs it keeps apart.
    let inputs = 32 * 512 * 4096 * 4;
    assert_eq!(with(true, 32).peak, with(false, 0).peak + inputs);
    assert_eq!(with(true, 99).peak, with(true, 32).peak);
    let text = with(true, 4).to_string();
    assert!(
        text.contains("checkpointing on, top 4 layers kept"),
        "{text}"
    );
    assert!(
        text.contains("the top 4 of 32 layers' graphs kept"),
        "{text}"
    );
}

#[test]
fn largest_keep_layers_is_the_most_that_fit() {
    let cfg = preset_config("llama-2-7b").unwrap();
    let s = PlanSettings {
        batch_size: 1,
        ..Default::default()
    };
    let peak = |n: usize| {
        plan_memory(
            &PlanModel::from(cfg.clone()),
            &PlanSettings {
                keep_layers: n,
                ..s.clone()
            },
        )
        .peak
    };
    // A limit between 7 and 8 kept layers keeps 7; one below full recompute keeps none.
    let limit = (peak(7) + peak(8)) / 2;
    assert_eq!(
        largest_keep_layers(&PlanModel::from(cfg.clone()), &s, limit),
        Some(7)
    );
    assert_eq!(
        largest_keep_layers(&PlanModel::from(cfg.clone()), &s, peak(32)),
        Some(32)
    );
    assert_eq!(
        largest_keep_layers(&PlanModel::from(cfg.clone()), &s, peak(0) - 1),
        None
    );
    assert_eq!(
        budget::most_kept_layers(&PlanModel::from(cfg.clone()), &s, false, None, limit),
        7
    );
    assert_eq!(
        budget::most_kept_layers(&PlanModel::from(cfg.clone()), &s, false, None, peak(0) - 1),
        0
    );
    // 8-bit optimizer state is smaller: the same limit keeps more layers.
    assert!(budget::most_kept_layers(&PlanModel::from(cfg.clone()), &s, true, None, limit) > 7);
}
