//! Plan arithmetic against the real storage of what it counts, and the presets' known sizes.

use candle_core::DType;
use qlora_quant::{Nf4Tensor, QuantType};
use serde_json::json;

use super::estimate::{self, adapter_params, base_bytes, optimizer_bytes, quantized_bytes};
use super::presets::{preset_config, PRESETS};
use super::*;
use crate::device::DeviceSpec;
use crate::model::config::LlamaConfig;
use crate::model::loader::{BaseFormat, LoadOptions};
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

/// `bytes` of the item called `name` in `plan`.
fn item_bytes(plan: &MemoryPlan, name: &str) -> usize {
    plan.items
        .iter()
        .find(|i| i.name == name)
        .map(|i| i.bytes)
        .unwrap_or_else(|| panic!("no {name} in {plan}"))
}

const CUDA_ITEMS: [&str; 4] = [
    "dequantization workspace",
    "cuBLAS workspace",
    "CUDA kernel modules",
    "CUDA context",
];
const HOST_ITEMS: [&str; 2] = ["kernel scratch", "runtime"];

#[test]
fn for_device_takes_the_dtypes_a_run_there_loads() {
    assert_eq!(
        PlanSettings::for_device(DeviceSpec::Cpu, None),
        PlanSettings::default()
    );
    let gpu = PlanSettings::for_device(DeviceSpec::Cuda(1), None);
    assert_eq!(gpu.device, DeviceSpec::Cuda(1));
    assert_eq!(
        (gpu.compute_dtype, gpu.weight_dtype),
        (DType::BF16, DType::BF16)
    );
    let f32_gpu = PlanSettings::for_device(DeviceSpec::Cuda(0), Some(DType::F32));
    assert_eq!(
        (f32_gpu.compute_dtype, f32_gpu.weight_dtype),
        (DType::F32, DType::F32)
    );
}

#[test]
fn host_step_and_fused_ops_are_cpu_only() {
    let cfg = PlanModel::from(preset_config("llama-3-8b").unwrap());
    let at = |device, dtype| PlanSettings::for_device(device, Some(dtype));
    let cpu = at(DeviceSpec::Cpu, DType::F32);
    assert!(estimate::uses_fused_ops(&cpu) && estimate::uses_host_step(&cfg, &cpu));
    for s in [
        at(DeviceSpec::Cuda(0), DType::F32),
        at(DeviceSpec::Cuda(0), DType::BF16),
        at(DeviceSpec::Cpu, DType::BF16),
    ] {
        assert!(
            !estimate::uses_fused_ops(&s),
            "{:?} {:?}",
            s.device,
            s.compute_dtype
        );
        assert!(
            !estimate::uses_host_step(&cfg, &s),
            "{:?} {:?}",
            s.device,
            s.compute_dtype
        );
    }
}

#[test]
fn cuda_plan_has_the_device_items_and_none_of_the_host_ones() {
    let cfg = PlanModel::from(preset_config("llama-3-8b").unwrap());
    let s = PlanSettings {
        seq_len: 2048,
        batch_size: 2,
        threads: 2,
        ..PlanSettings::for_device(DeviceSpec::Cuda(0), None)
    };
    let gpu = plan_memory(&cfg, &s);
    let names: Vec<_> = gpu.items.iter().map(|i| i.name).collect();
    for name in CUDA_ITEMS {
        assert!(names.contains(&name), "{name} missing from {gpu}");
    }
    for name in HOST_ITEMS {
        assert!(!names.contains(&name), "{name} in {gpu}");
    }
    assert_eq!(item_bytes(&gpu, "CUDA context"), 500 << 20);
    assert_eq!(item_bytes(&gpu, "cuBLAS workspace"), 32 << 20);
    assert_eq!(item_bytes(&gpu, "CUDA kernel modules"), 16 << 20);
    // The largest quantized weight of Llama-3-8B is an MLP projection, 14336 x 4096, in bf16.
    assert_eq!(
        item_bytes(&gpu, "dequantization workspace"),
        14336 * 4096 * 2
    );
    // Embeddings and head in bf16 (2 x 128256 x 4096), 65 norms of 4096, RoPE f32 tables.
    assert_eq!(
        item_bytes(&gpu, "embeddings, head, norms"),
        2 * 128_256 * 4096 * 2 + 65 * 4096 * 2 + 2 * 2048 * 128 * 4
    );
    let text = gpu.to_string();
    assert!(
        text.contains("compute BF16, device memory of cuda:0 (host memory not counted)"),
        "{text}"
    );
    // The same run planned on the CPU in bf16 takes the same composite graph: only the items
    // the device adds differ.
    let cpu = plan_memory(
        &cfg,
        &PlanSettings {
            device: DeviceSpec::Cpu,
            ..s.clone()
        },
    );
    let names: Vec<_> = cpu.items.iter().map(|i| i.name).collect();
    for name in HOST_ITEMS {
        assert!(names.contains(&name), "{name} missing from {cpu}");
    }
    for name in CUDA_ITEMS {
        assert!(!names.contains(&name), "{name} in {cpu}");
    }
    let sum =
        |p: &MemoryPlan, names: &[&str]| names.iter().map(|n| item_bytes(p, n)).sum::<usize>();
    assert_eq!(
        gpu.peak - sum(&gpu, &CUDA_ITEMS),
        cpu.peak - sum(&cpu, &HOST_ITEMS)
    );
    assert!(cpu.to_string().contains("compute BF16, host memory (cpu)"));
}

#[test]
fn dequant_workspace_is_the_largest_quantized_weight_in_the_compute_dtype() {
    let workspace = |name: &str, s: &PlanSettings| {
        runtime::dequant_workspace_bytes(&PlanModel::from(preset_config(name).unwrap()), s)
    };
    let bf16 = PlanSettings::for_device(DeviceSpec::Cuda(0), None);
    let f32 = PlanSettings::for_device(DeviceSpec::Cuda(0), Some(DType::F32));
    assert_eq!(workspace("llama-3-8b", &bf16), 117_440_512);
    assert_eq!(workspace("llama-3-8b", &f32), 234_881_024);
    assert_eq!(workspace("llama-2-7b", &bf16), 11008 * 4096 * 2);
    assert_eq!(workspace("mistral-7b", &bf16), 14336 * 4096 * 2);
    assert_eq!(workspace("qwen2-7b", &bf16), 18944 * 3584 * 2);
    // The head and embeddings stay dense: the 128256 x 4096 head is not the largest weight.
    assert!(workspace("llama-3-8b", &bf16) < 128_256 * 4096 * 2);
    let dense = PlanSettings {
        base: BaseFormat::Dense,
        ..bf16.clone()
    };
    assert_eq!(workspace("llama-3-8b", &dense), 0);
}

#[test]
fn bf16_gpu_activations_are_about_half_of_f32_on_the_composite_path() {
    let cfg = PlanModel::from(preset_config("llama-3-8b").unwrap());
    let at = |dtype| PlanSettings {
        seq_len: 2048,
        batch_size: 1,
        ..PlanSettings::for_device(DeviceSpec::Cuda(0), Some(dtype))
    };
    let (a16, a32) = (
        estimate::activations(&cfg, &at(DType::BF16)),
        estimate::activations(&cfg, &at(DType::F32)),
    );
    let n = 2048;
    // 33 checkpointed layer inputs [2048, 4096] and one [2048, 2048] mask, in the compute dtype.
    assert_eq!(a16.layer_inputs, 33 * n * 4096 * 2);
    assert_eq!(a32.layer_inputs, 2 * a16.layer_inputs);
    assert_eq!(a32.mask, 2 * a16.mask);
    // One layer's graph, counted by hand from `composite_layer_graph_elems`: six [32, 2048,
    // 2048] score-sized tensors, and per token 348,384 values: r16 projections with dropout
    // (3·out + 2·r + 2·in each: q 20512, k 11296, v 11296, o 20512, gate 51232, up 51232, down
    // 40992), two RMSNorms of 8·4096 (in bf16: f32 copy, x², x/rms, then the cast and the
    // weight), RoPE 18688 + 4864, per-head copies 4096 + 3·1024, probs·v and the merge 2·4096,
    // SwiGLU 2·14336 and two residuals 2·4096. In f32 a norm is 3·4096: 307,424 per token,
    // and the bf16 adapters are cast to f32 once per projection: 16 · Σ(in + out) values.
    let scores = 6 * 32 * 2048 * 2048;
    assert_eq!(a16.layer_graph, (scores + n * 348_384) * 2);
    let casts = 16 * (2 * 8192 + 2 * 5120 + 3 * 18432);
    assert_eq!(a32.layer_graph, (scores + n * 307_424 + casts) * 4);
    let ratio = |a: usize, b: usize| a as f64 / b as f64;
    let graph = ratio(a16.layer_graph, a32.layer_graph);
    assert!((0.5..0.55).contains(&graph), "{graph}");
    // The whole step's activation peak: the loss's f32 logits do not halve, so a little more.
    let peak = ratio(
        activation_peak(&cfg, &at(DType::BF16)),
        activation_peak(&cfg, &at(DType::F32)),
    );
    assert!((0.5..0.6).contains(&peak), "{peak}");
}
