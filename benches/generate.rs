//! `cargo bench --bench generate`: greedy generation on SmolLM2-135M-Instruct from its Q4_1
//! GGUF, `qlora`'s decoder (NF4 + double quantization, and the full-precision base) next to
//! candle-transformers' quantized Llama reading the same file with candle's own Q4_1 matmul, in
//! one run: prompt tokens/s (prefill) and new tokens/s (decode, one token at a time with a KV
//! cache), the best of `QLORA_BENCH_GENERATE_REPEATS` (default 3) runs of 64 new tokens.

use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use qlora::model::generate::{generate, SamplingOptions};
use qlora::model::loader::{load_model, BaseFormat, LoadOptions};
use qlora::quant::QuantType;

const NEW_TOKENS: usize = 64;
const PROMPT: &str = "Shall I compare thee to a summer's day? Thou art more lovely and more \
                      temperate: rough winds do shake the darling buds of May, and summer's \
                      lease hath all too short a date.";

/// Prefill and decode speed of one run.
#[derive(Clone, Copy)]
struct Speed {
    prefill: f64,
    decode: f64,
}

fn best(runs: &[Speed]) -> Speed {
    Speed {
        prefill: runs.iter().map(|s| s.prefill).fold(0.0, f64::max),
        decode: runs.iter().map(|s| s.decode).fold(0.0, f64::max),
    }
}

fn main() -> anyhow::Result<()> {
    qlora::alloc::keep_freed_memory();
    let repeats: usize = std::env::var("QLORA_BENCH_GENERATE_REPEATS")
        .ok()
        .map(|s| s.parse())
        .transpose()
        .context("QLORA_BENCH_GENERATE_REPEATS: expected a number")?
        .unwrap_or(3)
        .max(1);
    let gguf = qlora::model::fetch::smollm2_gguf()?;
    let mut rows: Vec<(String, Speed, Vec<u32>)> = Vec::new();
    let mut prompt: Vec<u32> = Vec::new();
    for (name, base) in [
        (
            "qlora, NF4 + double quant",
            BaseFormat::Quantized(QuantType::Nf4),
        ),
        ("qlora, full precision (f32)", BaseFormat::Dense),
    ] {
        let opts = LoadOptions {
            base,
            ..Default::default()
        };
        let m = load_model(&gguf, &opts)?;
        let tok = m.tokenizer.as_ref().context("the GGUF has no tokenizer")?;
        prompt = tok.encode(PROMPT, true)?;
        let sampling = SamplingOptions {
            max_new_tokens: NEW_TOKENS,
            ..Default::default()
        };
        let mut runs = Vec::new();
        let mut ids = Vec::new();
        for _ in 0..repeats {
            let start = Instant::now();
            let mut stamps = Vec::with_capacity(NEW_TOKENS);
            ids = generate(&m.model, &prompt, &sampling, |_| {
                stamps.push(Instant::now());
                true
            })?;
            runs.push(speeds(start, &stamps, prompt.len()));
        }
        rows.push((name.to_string(), best(&runs), ids));
    }

    // candle-transformers' quantized Llama on the same file: Q4_1 kept as it is stored.
    let mut file = std::fs::File::open(&gguf)?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
    let mut model = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
    let mut runs = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..repeats {
        model.clear_kv_cache();
        let start = Instant::now();
        let mut stamps = Vec::with_capacity(NEW_TOKENS);
        ids.clear();
        let mut input = prompt.clone();
        let mut pos = 0;
        while ids.len() < NEW_TOKENS {
            let x = Tensor::new(input.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let logits = model.forward(&x, pos)?.squeeze(0)?.to_vec1::<f32>()?;
            pos += input.len();
            let next = logits
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                )
                .0 as u32;
            stamps.push(Instant::now());
            ids.push(next);
            input = vec![next];
        }
        runs.push(speeds(start, &stamps, prompt.len()));
    }
    rows.push((
        "candle-transformers quantized_llama, Q4_1 (GGUF as stored)".to_string(),
        best(&runs),
        ids,
    ));

    let reference = rows.last().map(|r| r.1).context("no rows")?;
    println!(
        "\nGreedy generation, SmolLM2-135M-Instruct GGUF (Q4_1), prompt {} tokens, {NEW_TOKENS} new \
         tokens, best of {repeats}; {} rayon threads",
        prompt.len(),
        rayon::current_num_threads()
    );
    println!("| engine | prompt tokens/s | new tokens/s | new tokens/s vs candle | same first 16 tokens as candle |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let candle_ids = rows.last().map(|r| r.2.clone()).unwrap_or_default();
    for (name, s, ids) in &rows {
        let same = ids
            .iter()
            .zip(&candle_ids)
            .take(16)
            .take_while(|(a, b)| a == b)
            .count();
        println!(
            "| {name} | {:.0} | {:.1} | {:.2} | {same} |",
            s.prefill,
            s.decode,
            s.decode / reference.decode
        );
    }
    Ok(())
}

/// Prefill: prompt tokens over the time to the first new token; decode: the new tokens after
/// the first over the time from the first to the last.
fn speeds(start: Instant, stamps: &[Instant], prompt: usize) -> Speed {
    let first = stamps.first().map_or(0.0, |t| (*t - start).as_secs_f64());
    let rest = match (stamps.first(), stamps.last()) {
        (Some(a), Some(b)) if stamps.len() > 1 => {
            (*b - *a).as_secs_f64() / (stamps.len() - 1) as f64
        }
        _ => f64::NAN,
    };
    Speed {
        prefill: prompt as f64 / first.max(1e-9),
        decode: 1.0 / rest,
    }
}
