//! `cargo bench --bench scale_7b`: one QLoRA training step of a Llama-2-7B-shaped model on this
//! CPU, peak memory next to the plan's prediction.
//!
//! The model (hidden 4096, 32 layers, 32 heads, ffn 11008, vocab 32000) is generated and
//! quantized to NF4 layer by layer in memory (never whole in 16/32 bits, never on disk); LoRA r 16
//! on all seven projections; one step (forward, loss, backward with checkpointing, AdamW) at
//! batch 1 × seq 512. Peak RSS is the process's `VmHWM`.
//!
//! Environment: `QLORA_SCALE_LAYERS` (default 32) for a quick check with fewer layers,
//! `QLORA_SCALE_SEQ` (512), `QLORA_SCALE_BATCH` (1), `QLORA_SCALE_WEIGHT_DTYPE` (f32, what
//! `qlora train` loads embeddings and head in on the CPU, or bf16), `QLORA_SCALE_DEVICE` (cpu, or
//! cuda[:N] in a `--features cuda` build: bf16 compute and weights, 1 warm-up step and
//! `QLORA_SCALE_STEPS` (2) timed ones; peak device memory is measured from outside, by
//! scripts/gpu-check.sh, since candle frees device memory as tensors drop).

use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use qlora::lora::LoraConfig;
use qlora::model::loader::LoadOptions;
use qlora::model::random_source::generate_model;
use qlora::optim::{AdamW, AdamWConfig, StateStorage};
use qlora::peft;
use qlora::plan::presets::preset_config;
use qlora::plan::rss::{current_rss_bytes, peak_rss_bytes};
use qlora::plan::{format_bytes, plan_memory, PlanSettings};
use qlora::train::layerwise::{loss_and_grads_layerwise, Checkpointing};
use qlora::train::step::Batch;

fn env_usize(key: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(key) {
        Ok(v) => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{key}={v}: expected a positive integer")),
        Err(_) => Ok(default),
    }
}

fn main() -> anyhow::Result<()> {
    qlora::alloc::keep_freed_memory();
    let layers = env_usize("QLORA_SCALE_LAYERS", 32)?;
    let seq = env_usize("QLORA_SCALE_SEQ", 512)?;
    let batch = env_usize("QLORA_SCALE_BATCH", 1)?;
    let spec = match std::env::var("QLORA_SCALE_DEVICE") {
        Ok(s) => qlora::device::DeviceSpec::parse(&s)?,
        Err(_) => qlora::device::DeviceSpec::Cpu,
    };
    let device = spec.open()?;
    let compute_dtype = spec.default_compute_dtype();
    let timed_steps = if device.is_cpu() {
        1
    } else {
        env_usize("QLORA_SCALE_STEPS", 2)?.max(1)
    };
    let weight_dtype = match std::env::var("QLORA_SCALE_WEIGHT_DTYPE").as_deref() {
        Err(_) => compute_dtype,
        Ok("f32") => DType::F32,
        Ok("bf16") => DType::BF16,
        Ok(other) => anyhow::bail!("QLORA_SCALE_WEIGHT_DTYPE={other}: expected f32 or bf16"),
    };
    let mut cfg =
        preset_config("llama-2-7b").ok_or_else(|| anyhow::anyhow!("llama-2-7b preset missing"))?;
    cfg.num_hidden_layers = layers;
    let settings = PlanSettings {
        seq_len: seq,
        batch_size: batch,
        weight_dtype,
        ..PlanSettings::for_device(spec, Some(compute_dtype))
    };
    let plan = plan_memory(&cfg.clone().into(), &settings);
    println!(
        "scale check: Llama-2-7B shape, {layers} layers, r 16 all-linear, NF4, batch {batch} x seq {seq}, checkpointing on, {spec} {compute_dtype:?}, {} rayon threads",
        rayon::current_num_threads()
    );
    println!("{plan}");

    let t0 = Instant::now();
    let opts = LoadOptions {
        max_positions: Some(seq),
        weight_dtype: Some(weight_dtype),
        compute_dtype,
        device: device.clone(),
        ..Default::default()
    };
    let mut model = generate_model(&cfg, &opts, 42)?;
    let load_s = t0.elapsed().as_secs_f64();
    let rss_loaded = current_rss_bytes().unwrap_or(0);
    let peak_loading = peak_rss_bytes().unwrap_or(0);
    peft::attach_new(&mut model, &LoraConfig::default(), 42)?;
    peft::share_dropout_seed(&mut model).set(1);
    let named = peft::trainable_vars(&model);
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::with_storage(named, AdamWConfig::default(), |_| 1.0, StateStorage::Plain)?;
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| ((i * 7919 + 13) % 32000) as u32)
        .collect();
    let batch_t = Batch {
        ids: Tensor::from_vec(ids.clone(), (batch, seq), &device)?,
        labels: ids.iter().map(|&x| x as i64).collect(),
        segments: None,
        positions: None,
        classes: None,
    };
    let step = |opt: &mut AdamW| -> anyhow::Result<f64> {
        let (loss, grads) =
            loss_and_grads_layerwise(&model, &batch_t, &vars, Checkpointing::all(true))?;
        opt.step(&grads, 2e-4)?;
        device.synchronize()?;
        Ok(loss)
    };
    if !device.is_cpu() {
        // Kernel modules load and cuBLAS initializes on the first step.
        step(&mut opt)?;
    }
    let t1 = Instant::now();
    let mut loss = 0.0;
    for _ in 0..timed_steps {
        loss = step(&mut opt)?;
    }
    let step_s = t1.elapsed().as_secs_f64() / timed_steps as f64;
    let peak = peak_rss_bytes().ok_or_else(|| anyhow::anyhow!("no /proc/self/status"))?;
    let load_avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "\ngenerate + quantize: {load_s:.1} s, RSS after load {} (peak while loading {}); step loss {loss:.4}; load average {}",
        format_bytes(rss_loaded),
        format_bytes(peak_loading),
        load_avg.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!("| what | plan | measured | plan / measured |");
    println!("| --- | ---: | ---: | ---: |");
    if device.is_cpu() {
        println!(
            "| peak RSS | {} | {} | {:.3} |",
            format_bytes(plan.peak),
            format_bytes(peak),
            plan.peak as f64 / peak as f64
        );
    } else {
        println!(
            "| peak device memory | {} | (nvidia-smi, from outside) | |",
            format_bytes(plan.peak)
        );
        println!("| peak host RSS | | {} | |", format_bytes(peak));
    }
    println!(
        "| step time (forward + loss + backward with recompute + AdamW) | | {step_s:.1} s | |"
    );
    println!("| tokens/s | | {:.1} | |", (batch * seq) as f64 / step_s);
    Ok(())
}
