//! `cargo bench --bench train`: QLoRA training throughput and peak memory on
//! SmolLM2-135M-Instruct, batch 4 × seq 512, r 16 alpha 32 on all 7 projections, f32 compute,
//! for the NF4 and the full-precision base with activation checkpointing on and off, next to
//! PEFT + bitsandbytes' figures (ANCHORS.md), in one table.
//!
//! Peak RSS is per process, so each configuration runs in a child: the bench re-executes itself
//! with `QLORA_BENCH_TRAIN_CONFIG` naming one configuration, and the child reports its step
//! times and `VmHWM` on one line of stdout. `QLORA_BENCH_TRAIN_STEPS` sets the timed steps
//! (default 3, after one warm-up step); `QLORA_BENCH_TRAIN_ONLY` (comma list of config names)
//! runs a subset.
//!
//! With `QLORA_BENCH_PEFT_PYTHON` naming a python that has the reference stack
//! (`scripts/peft-baseline.sh` builds one and prints it), PEFT + bitsandbytes run the same
//! configurations on this machine in the same run (`scripts/peft_baseline.py`, one process per
//! configuration, same result line), and the ratio columns compare against PEFT's NF4 run with
//! checkpointing from this machine instead of ANCHORS.md's figure from another one.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Var;
use qlora::data::batches::{BatchOptions, Batches};
use qlora::data::corpus::{Corpus, DataOptions};
use qlora::lora::LoraConfig;
use qlora::model::loader::{load_model, BaseFormat, LoadOptions};
use qlora::optim::{AdamW, AdamWConfig};
use qlora::peft;
use qlora::quant::QuantType;
use qlora::train::layerwise::{loss_and_grads_layerwise, Checkpointing};

const CONFIG_VAR: &str = "QLORA_BENCH_TRAIN_CONFIG";
const STEPS_VAR: &str = "QLORA_BENCH_TRAIN_STEPS";
const ONLY_VAR: &str = "QLORA_BENCH_TRAIN_ONLY";
const PEFT_VAR: &str = "QLORA_BENCH_PEFT_PYTHON";
const BATCH: usize = 4;
const SEQ: usize = 512;

/// PEFT + bitsandbytes, NF4 base, f32 compute, checkpointing on (ANCHORS.md, median).
const PEFT_TOKENS_PER_S: f64 = 148.0;
/// Its peak RSS, MiB.
const PEFT_RSS_MIB: f64 = 5446.0;

/// One benchmarked configuration.
struct Config {
    name: &'static str,
    label: &'static str,
    base: BaseFormat,
    checkpointing: Checkpointing,
}

/// Top layers kept (not recomputed) in the selective configuration: 12 of SmolLM2's 30 layer
/// graphs (~72 MB each at 4 x 512) keep the peak under 0.3x PEFT's RSS.
const KEEP_LAYERS: usize = 12;

const CONFIGS: [Config; 5] = [
    Config {
        name: "nf4-ckpt",
        label: "NF4 base, checkpointing on",
        base: BaseFormat::Quantized(QuantType::Nf4),
        checkpointing: Checkpointing {
            enabled: true,
            keep_layers: 0,
        },
    },
    Config {
        name: "nf4-keep",
        label: "NF4 base, checkpointing on, top 12 layers kept",
        base: BaseFormat::Quantized(QuantType::Nf4),
        checkpointing: Checkpointing {
            enabled: true,
            keep_layers: KEEP_LAYERS,
        },
    },
    Config {
        name: "nf4",
        label: "NF4 base, checkpointing off",
        base: BaseFormat::Quantized(QuantType::Nf4),
        checkpointing: Checkpointing {
            enabled: false,
            keep_layers: 0,
        },
    },
    Config {
        name: "fp-ckpt",
        label: "full-precision base, checkpointing on",
        base: BaseFormat::Dense,
        checkpointing: Checkpointing {
            enabled: true,
            keep_layers: 0,
        },
    },
    Config {
        name: "fp",
        label: "full-precision base, checkpointing off",
        base: BaseFormat::Dense,
        checkpointing: Checkpointing {
            enabled: false,
            keep_layers: 0,
        },
    },
];

/// What one child measured.
struct Measured {
    step_s: Vec<f64>,
    /// CPU seconds (user + system, all threads) of each timed step: robust to other jobs
    /// competing for the cores, unlike wall time.
    cpu_s: Vec<f64>,
    loss: f64,
    rss_mib: f64,
    /// Seconds in each [`qlora::profile::Part`] over the timed steps (ours only).
    parts: Option<Vec<f64>>,
}

impl Measured {
    fn median_step(&self) -> f64 {
        let mut s = self.step_s.clone();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    }
    fn median_cpu(&self) -> f64 {
        let mut s = self.cpu_s.clone();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    }
    fn tokens_per_s(&self) -> f64 {
        (BATCH * SEQ) as f64 / self.median_step()
    }
}

fn main() -> anyhow::Result<()> {
    qlora::alloc::keep_freed_memory();
    let steps: usize = match std::env::var(STEPS_VAR) {
        Ok(s) => s
            .parse()
            .with_context(|| format!("{STEPS_VAR}={s}: expected a number of steps"))?,
        Err(_) => 3,
    };
    if steps == 0 {
        bail!("{STEPS_VAR} must be at least 1");
    }
    if let Ok(name) = std::env::var(CONFIG_VAR) {
        let cfg = CONFIGS
            .iter()
            .find(|c| c.name == name)
            .with_context(|| format!("{CONFIG_VAR}={name}: unknown configuration"))?;
        return run_child(cfg, steps);
    }
    let only: Option<Vec<String>> = std::env::var(ONLY_VAR)
        .ok()
        .map(|s| s.split(',').map(|x| x.trim().to_string()).collect());
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let peft_python = std::env::var(PEFT_VAR).ok();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let t0 = Instant::now();
    let (mut rows, mut peft_rows) = (Vec::new(), Vec::new());
    for cfg in &CONFIGS {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|n| n == cfg.name))
        {
            continue;
        }
        // PEFT has no selective checkpointing by layer count: no PEFT row for that one.
        if let (Some(py), false) = (&peft_python, cfg.checkpointing.keep_layers > 0) {
            eprintln!("train bench: PEFT + bitsandbytes, {} ...", cfg.label);
            let gguf = qlora::model::fetch::smollm2_gguf()?;
            let mut cmd = Command::new(py);
            cmd.arg("scripts/peft_baseline.py")
                .arg(&gguf)
                .args(["data/sonnets/train.txt", "--config", cfg.name, "--steps"])
                .arg(steps.to_string())
                .arg("--threads")
                .arg(rayon::current_num_threads().to_string());
            peft_rows.push((cfg, run_measured(cmd, &format!("PEFT {}", cfg.name))?));
        }
        eprintln!("train bench: {} ...", cfg.label);
        let mut cmd = Command::new(&exe);
        cmd.env(CONFIG_VAR, cfg.name)
            .env(STEPS_VAR, steps.to_string());
        rows.push((cfg, run_measured(cmd, cfg.name)?));
    }
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    print_table(
        &rows,
        &peft_rows,
        steps,
        &load_before,
        &load_after,
        t0.elapsed().as_secs_f64(),
    );
    Ok(())
}

/// Run one measuring child (ours or PEFT's) and read its result line.
fn run_measured(mut cmd: Command, what: &str) -> anyhow::Result<Measured> {
    let out = cmd
        .output()
        .with_context(|| format!("running the {what} child"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{what} child failed ({}):\n{}\n{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_child(&stdout)
}

fn print_table(
    rows: &[(&Config, Measured)],
    peft_rows: &[(&Config, Measured)],
    steps: usize,
    load_before: &str,
    load_after: &str,
    secs: f64,
) {
    let threads = rayon::current_num_threads();
    println!(
        "\nQLoRA training, SmolLM2-135M-Instruct, batch {BATCH} x seq {SEQ}, r 16 alpha 32 all 7 \
         projections, bf16 adapters, f32 compute, dropout 0.05; median of {steps} steps after 1 \
         warm-up; {threads} rayon threads; load average {} before, {} after; {secs:.0} s",
        load_before
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        load_after
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    );
    println!(
        "| config | s/step | CPU s/step | tokens/s | peak RSS MiB | tok/s / PEFT | RSS / PEFT | loss |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    // The reference of the ratio columns: PEFT's NF4 run with checkpointing from this machine
    // when it ran, else ANCHORS.md's.
    let (ref_tps, ref_rss, ref_name) = match peft_rows.iter().find(|(c, _)| c.name == "nf4-ckpt") {
        Some((_, m)) => (m.tokens_per_s(), m.rss_mib, "PEFT on this machine"),
        None => (PEFT_TOKENS_PER_S, PEFT_RSS_MIB, "PEFT (ANCHORS.md)"),
    };
    println!(
        "| PEFT + bnb, NF4, checkpointing on (ANCHORS.md, another machine) | {:.1} | | {PEFT_TOKENS_PER_S:.0} | {PEFT_RSS_MIB:.0} | {:.2} | {:.2} | |",
        (BATCH * SEQ) as f64 / PEFT_TOKENS_PER_S,
        PEFT_TOKENS_PER_S / ref_tps,
        PEFT_RSS_MIB / ref_rss
    );
    let labelled = peft_rows
        .iter()
        .map(|(c, m)| (format!("PEFT + bnb on this machine: {}", c.label), m))
        .chain(rows.iter().map(|(c, m)| (c.label.to_string(), m)));
    for (label, m) in labelled {
        println!(
            "| {label} | {:.2} | {:.2} | {:.1} | {:.0} | {:.2} | {:.2} | {:.4} |",
            m.median_step(),
            m.median_cpu(),
            m.tokens_per_s(),
            m.rss_mib,
            m.tokens_per_s() / ref_tps,
            m.rss_mib / ref_rss,
            m.loss
        );
    }
    println!("ratio columns against {ref_name}, NF4, checkpointing on");
    print_budgets(rows, threads);
    let find = |n: &str| rows.iter().find(|(c, _)| c.name == n).map(|(_, m)| m);
    for (nf4, fp, what) in [
        ("nf4-ckpt", "fp-ckpt", "checkpointing on"),
        ("nf4", "fp", "checkpointing off"),
    ] {
        if let (Some(a), Some(b)) = (find(nf4), find(fp)) {
            println!(
                "NF4 / full-precision step time, {what}: {:.2} wall, {:.2} CPU (target <= 1.1)",
                a.median_step() / b.median_step(),
                a.median_cpu() / b.median_cpu()
            );
        }
    }
    for (name, what) in [
        ("nf4-ckpt", "checkpointing on"),
        ("nf4-keep", "checkpointing on, top 12 layers kept"),
    ] {
        if let Some(m) = find(name) {
            println!(
                "targets (NF4, {what}): tokens/s {:.2}x {ref_name} (>= 2), peak RSS {:.2}x (<= 0.3)",
                m.tokens_per_s() / ref_tps,
                m.rss_mib / ref_rss
            );
        }
    }
}

/// Where each of our configurations spent its steps (`qlora::profile`), seconds per step.
fn print_budgets(rows: &[(&Config, Measured)], threads: usize) {
    let rows: Vec<_> = rows
        .iter()
        .filter_map(|(c, m)| m.parts.as_ref().map(|p| (c, m, p)))
        .collect();
    if rows.is_empty() {
        return;
    }
    println!("\nstep-time budget, s per step (share of the step):");
    let header: Vec<&str> = rows.iter().map(|(c, _, _)| c.name).collect();
    println!("| part | {} |", header.join(" | "));
    println!("| --- |{}", " ---: |".repeat(rows.len()));
    let n = |m: &Measured| m.step_s.len().max(1) as f64;
    let mut names: Vec<&str> = qlora::profile::Part::ALL.iter().map(|p| p.name()).collect();
    names.push("graph and other ops");
    for (i, name) in names.iter().enumerate() {
        let cells: Vec<String> = rows
            .iter()
            .map(|(_, m, p)| {
                let total: f64 = m.step_s.iter().sum();
                let s = if i < p.len() {
                    p[i]
                } else {
                    (total - p.iter().sum::<f64>()).max(0.0)
                };
                format!("{:.3} ({:.0}%)", s / n(m), 100.0 * s / total)
            })
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    let busy: Vec<String> = rows
        .iter()
        .map(|(_, m, _)| {
            let (w, c): (f64, f64) = (m.step_s.iter().sum(), m.cpu_s.iter().sum());
            format!("{:.0}%", 100.0 * c / (w * threads as f64))
        })
        .collect();
    println!("| threads busy | {} |", busy.join(" | "));
}

/// The child's one result line: `result <loss> <rss MiB> <steps> <wall s>... <cpu s>...`.
fn parse_child(stdout: &str) -> anyhow::Result<Measured> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("result "))
        .with_context(|| format!("child printed no result line:\n{stdout}"))?;
    let nums: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|s| s.parse::<f64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad result line `{line}`"))?;
    let steps = nums.get(2).copied().unwrap_or(0.0) as usize;
    if steps == 0 || nums.len() != 3 + 2 * steps {
        bail!("result line `{line}` does not hold its step times");
    }
    let parts = stdout
        .lines()
        .find_map(|l| l.strip_prefix("budget "))
        .map(|l| l.split_whitespace().map(str::parse::<f64>).collect())
        .transpose()
        .context("bad budget line")?;
    Ok(Measured {
        parts,
        loss: nums[0],
        rss_mib: nums[1],
        step_s: nums[3..3 + steps].to_vec(),
        cpu_s: nums[3 + steps..].to_vec(),
    })
}

/// Peak resident set of this process, MiB (`VmHWM`).
fn peak_rss_mib() -> anyhow::Result<f64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("/proc/self/status has no VmHWM line")?;
    let kb: f64 = line
        .split_whitespace()
        .nth(1)
        .context("VmHWM line has no value")?
        .parse()
        .context("VmHWM is not a number")?;
    Ok(kb / 1024.0)
}

/// CPU seconds this process has used (user + system, all threads).
fn cpu_seconds() -> anyhow::Result<f64> {
    qlora::profile::process_cpu_seconds().context("reading /proc/self/stat")
}

/// Load, attach adapters, run one warm-up and `steps` timed training steps (forward, backward,
/// AdamW update) and print the result line.
fn run_child(cfg: &Config, steps: usize) -> anyhow::Result<()> {
    let gguf = qlora::model::fetch::smollm2_gguf()?;
    let opts = LoadOptions {
        base: cfg.base,
        max_positions: Some(SEQ),
        ..Default::default()
    };
    let mut m = load_model(&gguf, &opts)?;
    let tok = m.tokenizer.clone();
    let dopts = DataOptions::new(SEQ, m.model.as_llama().unwrap().cfg.vocab_size);
    let corpus = Corpus::load(Path::new("data/sonnets/train.txt"), tok.as_ref(), &dopts)?;
    let pad = m
        .model
        .as_llama()
        .unwrap()
        .cfg
        .eos_token_ids
        .first()
        .copied()
        .unwrap_or(0);
    let device = m.model.device().clone();
    let mut batches = Batches::new(
        corpus.examples,
        BatchOptions::new(BATCH, SEQ, pad, 42),
        &device,
    )?;
    let lcfg = LoraConfig::default();
    peft::attach_new(&mut m.model, &lcfg, 42)?;
    let seed = peft::share_dropout_seed(&mut m.model);
    let named = peft::trainable_vars(&m.model);
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(named, AdamWConfig::default(), |_| 1.0)?;
    let mut times = Vec::with_capacity(steps);
    let mut cpu = Vec::with_capacity(steps);
    let mut loss = f64::NAN;
    let mut totals = qlora::profile::Totals::new();
    qlora::profile::enable(true);
    for step in 0..=steps {
        let batch = batches
            .next_batch()?
            .context("the data ran out of batches")?;
        let (b, t) = batch.ids.dims2()?;
        if (b, t) != (BATCH, SEQ) {
            bail!("batch is {b} x {t}, expected {BATCH} x {SEQ} (too little data?)");
        }
        seed.set(step as u64 + 1);
        let start = Instant::now();
        let cpu0 = cpu_seconds()?;
        let (l, grads) = loss_and_grads_layerwise(&m.model, &batch, &vars, cfg.checkpointing)?;
        opt.step(&grads, 2e-4)?;
        let secs = start.elapsed().as_secs_f64();
        let cpu_s = cpu_seconds()? - cpu0;
        eprintln!(
            "  {} step {step}: {secs:.2} s wall, {cpu_s:.2} s CPU, loss {l:.4}",
            cfg.name
        );
        if step > 0 {
            times.push(secs);
            cpu.push(cpu_s);
            totals.add_step(secs, Some(cpu0));
        } else {
            let _ = qlora::profile::take();
        }
        loss = l;
    }
    let rss = peak_rss_mib()?;
    let all: Vec<String> = times
        .iter()
        .chain(&cpu)
        .map(|t| format!("{t:.4}"))
        .collect();
    println!("result {loss} {rss} {steps} {}", all.join(" "));
    let parts: Vec<String> = totals.parts.iter().map(|t| format!("{t:.4}")).collect();
    println!("budget {}", parts.join(" "));
    Ok(())
}
