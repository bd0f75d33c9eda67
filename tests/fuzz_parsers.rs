//! Mutation fuzzing of every parser of outside bytes, on real fixture files: safetensors (header
//! and data ranges, through the model loader), GGUF (metadata, tokenizer, tensor table), the
//! bitsandbytes quant-state JSON, `adapter_config.json` + adapter weights, tokenizer files,
//! JSONL and parquet records, and the training TOML.
//!
//! Each input is a seed file changed by a seeded mutator (truncation, flipped bytes, random
//! ranges, spliced chunks, and for text: numbers and values swapped for extremes) and run
//! through the loader with a bound: no panic (caught and counted), at most `TIME_BOUND` per
//! input, at most `ALLOC_BOUND` bytes live at once (a counting allocator; an allocation above
//! it is refused, which aborts the process and fails the test). Errors are the expected outcome.
//!
//! `tests/fixtures/fuzz/<target>/` holds inputs that once failed a bound, replayed first on
//! every run. `QLORA_FUZZ_ITERS=N` sets the inputs per target (default 150, a CI-sized run);
//! the totals are printed at the end.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::fixtures;

const ALLOC_BOUND: usize = 512 << 20;
const TIME_BOUND: Duration = Duration::from_secs(5);

struct Bounded;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        if live > ALLOC_BOUND {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            return std::ptr::null_mut();
        }
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            let grow = new_size - layout.size();
            let live = LIVE.fetch_add(grow, Ordering::Relaxed) + grow;
            if live > ALLOC_BOUND {
                LIVE.fetch_sub(grow, Ordering::Relaxed);
                return std::ptr::null_mut();
            }
            PEAK.fetch_max(live, Ordering::Relaxed);
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Bounded = Bounded;

/// xorshift64*: a seeded, reproducible stream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const EXTREMES: [&str; 12] = [
    "-1",
    "0",
    "1e309",
    "-1e309",
    "18446744073709551615",
    "4294967297",
    "NaN",
    "null",
    "[]",
    "{}",
    "\"\"",
    "true",
];

/// One mutation of `seed`; `head` bounds where byte edits land (a header), `text` adds the
/// value swaps that reach a JSON or TOML parser's semantics.
fn mutate(seed: &[u8], rng: &mut Rng, head: usize, text: bool) -> Vec<u8> {
    let mut b = seed.to_vec();
    let span = head.min(b.len()).max(1);
    for _ in 0..1 + rng.below(3) {
        match rng.below(if text { 6 } else { 5 }) {
            0 => b.truncate(rng.below(b.len() + 1)),
            1 => {
                for _ in 0..1 + rng.below(8) {
                    if !b.is_empty() {
                        let i = rng.below(span.min(b.len()));
                        b[i] ^= 1 << rng.below(8);
                    }
                }
            }
            2 => {
                if !b.is_empty() {
                    let i = rng.below(span.min(b.len()));
                    let n = (1 + rng.below(16)).min(b.len() - i);
                    for x in &mut b[i..i + n] {
                        *x = rng.next() as u8;
                    }
                }
            }
            3 => {
                if b.len() > 2 {
                    let from = rng.below(b.len());
                    let n = (1 + rng.below(64)).min(b.len() - from);
                    let chunk = b[from..from + n].to_vec();
                    let at = rng.below(span.min(b.len()));
                    b.splice(at..at, chunk);
                }
            }
            4 => {
                // A digit changed or a number lengthened: sizes, offsets, shapes, counts.
                let digits: Vec<usize> = (0..span.min(b.len()))
                    .filter(|&i| b[i].is_ascii_digit())
                    .collect();
                if !digits.is_empty() {
                    let i = digits[rng.below(digits.len())];
                    if rng.below(2) == 0 {
                        b[i] = b'0' + rng.below(10) as u8;
                    } else {
                        b.splice(i..i, b"99999".iter().copied());
                    }
                }
            }
            _ => {
                // A JSON/TOML value swapped for an extreme one.
                let s = String::from_utf8_lossy(&b).into_owned();
                let cuts: Vec<usize> = s.match_indices([':', '=']).map(|(i, _)| i + 1).collect();
                if !cuts.is_empty() {
                    let at = cuts[rng.below(cuts.len())];
                    let rest = &s[at..];
                    let end = rest.find([',', '\n', '}', ']']).map_or(s.len(), |e| at + e);
                    let v = EXTREMES[rng.below(EXTREMES.len())];
                    b = format!("{}{v}{}", &s[..at], &s[end..]).into_bytes();
                }
            }
        }
    }
    b
}

/// What one target found.
#[derive(Default)]
struct Tally {
    inputs: usize,
    errors: usize,
    panics: Vec<String>,
    slow: Vec<String>,
    peak: usize,
    seconds: f64,
}

/// Run `check` on `iters` mutations of `seed` (written to `path` before each run), after the
/// regression inputs of `target`.
/// [`fuzz`] the file at `path` in place, seeded with its own bytes (edits within the first
/// `head(seed)` bytes, read as text), and put the file back as it was for the next target.
fn fuzz_in_place(
    target: &str,
    path: &Path,
    head: impl Fn(&[u8]) -> usize,
    iters: usize,
    check: &dyn Fn() -> Result<(), String>,
) -> Tally {
    let seed = std::fs::read(path).unwrap();
    let tally = fuzz(target, &seed, path, head(&seed), true, iters, check);
    std::fs::write(path, &seed).unwrap();
    tally
}

/// The length of a safetensors file's header (its 8-byte size and the JSON).
fn safetensors_head(seed: &[u8]) -> usize {
    8 + u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize
}

fn fuzz(
    target: &str,
    seed: &[u8],
    path: &Path,
    head: usize,
    text: bool,
    iters: usize,
    check: &dyn Fn() -> Result<(), String>,
) -> Tally {
    let mut t = Tally::default();
    let start = Instant::now();
    let corpus = fixtures().join("fuzz").join(target);
    let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&corpus)
        .map(|d| {
            let mut files: Vec<PathBuf> = d.filter_map(|e| e.ok()).map(|e| e.path()).collect();
            files.sort();
            files
                .into_iter()
                .filter_map(|p| std::fs::read(p).ok())
                .collect()
        })
        .unwrap_or_default();
    // FNV-1a of the target's name: each target its own stream.
    let seed_of = target.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut rng = Rng(seed_of | 1);
    let regression = inputs.len();
    let mut replay = inputs.drain(..);
    for i in 0..regression + iters {
        let input = match replay.next() {
            Some(known) => known,
            None => mutate(seed, &mut rng, head, text),
        };
        std::fs::write(path, &input).unwrap();
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let t0 = Instant::now();
        let r = catch_unwind(AssertUnwindSafe(check));
        let took = t0.elapsed();
        t.peak = t
            .peak
            .max(PEAK.load(Ordering::Relaxed).saturating_sub(base));
        t.inputs += 1;
        let keep = |why: &str| {
            let dir = std::env::temp_dir()
                .join("qlora-fuzz-findings")
                .join(target);
            std::fs::create_dir_all(&dir).ok();
            let f = dir.join(format!("{i:05}.bin"));
            std::fs::write(&f, &input).ok();
            format!("{why}: input {i} saved as {}", f.display())
        };
        match r {
            Ok(Ok(())) => {}
            Ok(Err(_)) => t.errors += 1,
            Err(_) => t.panics.push(keep("panic")),
        }
        if took > TIME_BOUND {
            t.slow.push(keep(&format!("{:.1} s", took.as_secs_f64())));
        }
    }
    t.seconds = start.elapsed().as_secs_f64();
    t
}

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

#[test]
fn parsers_of_outside_bytes_survive_mutated_inputs() {
    use qlora::model::loader::{load_model, LoadOptions};
    // Panics are counted and their inputs saved; the default hook's report of each (including
    // those the loaders catch from third-party parsers) would flood the output.
    std::panic::set_hook(Box::new(|_| {}));
    let iters: usize = std::env::var("QLORA_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let tmp = tempfile::tempdir().unwrap();
    let copy_dir = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
            }
        }
    };
    let load = |dir: &Path| {
        load_model(dir, &LoadOptions::default())
            .map(drop)
            .map_err(err)
    };
    let mut report = Vec::new();

    // safetensors, through the loader (header, dtypes, shapes, data ranges).
    let model = tmp.path().join("model");
    copy_dir(&fixtures().join("tiny-llama"), &model);
    let weights = model.join("model.safetensors");
    report.push((
        "safetensors",
        fuzz_in_place("safetensors", &weights, safetensors_head, iters, &|| {
            load(&model)
        }),
    ));

    // config.json of the same model.
    let cfg = model.join("config.json");
    report.push((
        "config.json",
        fuzz_in_place("config", &cfg, <[u8]>::len, iters, &|| load(&model)),
    ));

    // Tokenizer files.
    let tok = model.join("tokenizer.json");
    let use_tok = || {
        let t = qlora::data::tokenizer::TextTokenizer::from_dir(&model).map_err(err)?;
        if let Some(t) = t {
            t.encode("Shall I compare thee", true).map_err(err)?;
        }
        Ok(())
    };
    report.push((
        "tokenizer.json",
        fuzz_in_place("tokenizer", &tok, <[u8]>::len, iters, &use_tok),
    ));
    let tok_cfg = model.join("tokenizer_config.json");
    report.push((
        "tokenizer_config.json",
        fuzz_in_place("tokenizer_config", &tok_cfg, <[u8]>::len, iters, &use_tok),
    ));

    // The bitsandbytes 4-bit checkpoint: its quant-state JSON and absmax/code tensors.
    let bnb = tmp.path().join("bnb");
    copy_dir(&fixtures().join("bnb4/model"), &bnb);
    let bnb_w = bnb.join("model.safetensors");
    // Edits land in the header and the first quant-state payloads after it.
    let bnb_head = |seed: &[u8]| safetensors_head(seed) + 4096;
    report.push((
        "bnb 4-bit checkpoint",
        fuzz_in_place("bnb", &bnb_w, bnb_head, iters, &|| load(&bnb)),
    ));

    // A PEFT adapter: adapter_config.json, then its weights, loaded onto tiny-llama.
    let adapter = tmp.path().join("adapter");
    copy_dir(&fixtures().join("lora/adapter"), &adapter);
    let attach = || {
        let mut m =
            load_model(&fixtures().join("tiny-llama"), &LoadOptions::default()).map_err(err)?;
        qlora::peft::load_adapter(&mut m.model, &adapter, None)
            .map(drop)
            .map_err(err)
    };
    let acfg = adapter.join("adapter_config.json");
    report.push((
        "adapter_config.json",
        fuzz_in_place("adapter_config", &acfg, <[u8]>::len, iters, &attach),
    ));
    let aw = adapter.join("adapter_model.safetensors");
    report.push((
        "adapter weights",
        fuzz_in_place("adapter_weights", &aw, safetensors_head, iters, &attach),
    ));

    // GGUF: tiny-llama exported by `qlora merge --format gguf`, loaded back.
    let gguf_dir = tmp.path().join("gguf");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(["merge", "--model"])
        .arg(fixtures().join("tiny-llama"))
        .arg("--adapter")
        .arg(fixtures().join("lora/adapter"))
        .arg("--out")
        .arg(&gguf_dir)
        .args(["--format", "gguf"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let seed = std::fs::read(gguf_dir.join("model.gguf")).unwrap();
    let g = tmp.path().join("fuzz.gguf");
    // The metadata (with the tokenizer) and the tensor table come first.
    let head = seed.len().min(64 << 10);
    let load_gguf = || {
        load_model(&g, &LoadOptions::default())
            .map(drop)
            .map_err(err)?;
        qlora::model::inspect::inspect(&g).map(drop).map_err(err)
    };
    report.push((
        "GGUF",
        fuzz("gguf", &seed, &g, head, false, iters, &load_gguf),
    ));

    // Records: JSONL of every format, and parquet.
    let tok = qlora::data::tokenizer::TextTokenizer::from_dir(&fixtures().join("smollm2-135m"))
        .unwrap()
        .unwrap();
    let records = |path: &Path| {
        let opts = qlora::data::corpus::DataOptions::new(64, 49152);
        qlora::data::corpus::Corpus::load(path, Some(&tok), &opts)
            .map(drop)
            .map_err(err)
    };
    for name in ["text", "alpaca", "messages", "input_ids"] {
        let f = tmp.path().join(format!("{name}.jsonl"));
        let seed = std::fs::read(fixtures().join(format!("parquet/{name}.jsonl"))).unwrap();
        report.push((
            "JSONL records",
            fuzz(
                &format!("jsonl_{name}"),
                &seed,
                &f,
                seed.len(),
                true,
                iters / 4,
                &|| records(&f),
            ),
        ));
        let f = tmp.path().join(format!("{name}.parquet"));
        let seed = std::fs::read(fixtures().join(format!("parquet/{name}.parquet"))).unwrap();
        report.push((
            "parquet records",
            fuzz(
                &format!("parquet_{name}"),
                &seed,
                &f,
                seed.len(),
                false,
                iters / 4,
                &|| records(&f),
            ),
        ));
    }

    // The training TOML, through the same merge and checks as `qlora train --config`.
    let toml_path = tmp.path().join("train.toml");
    let seed = b"steps = 20\nbatch-size = 4\nseq-len = 256\nlr = 2e-4\nlr-scheduler = \"cosine\"\n\
warmup-ratio = 0.03\nrank = 16\nalpha = 32.0\ndropout = 0.05\ntargets = \"all-linear\"\n\
rank-pattern = \"down_proj=32\"\nalpha-pattern = \"v_proj=8\"\nlayers-to-transform = \"0,1\"\n\
dora = true\nseed = 7\nval-split = 0.1\nweight-decay = 0.01\nmax-grad-norm = 1.0\n";
    let toml_check = || {
        let opts = qlora::cli::train::TrainOptions::default()
            .merged_with(Some(&toml_path))
            .map_err(err)?;
        opts.recipe().map(drop).map_err(err)
    };
    report.push((
        "training TOML",
        fuzz(
            "toml",
            seed,
            &toml_path,
            seed.len(),
            true,
            iters,
            &toml_check,
        ),
    ));

    // Totals per kind.
    let mut kinds: Vec<(&str, Tally)> = Vec::new();
    for (kind, t) in report {
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, sum)) => {
                sum.inputs += t.inputs;
                sum.errors += t.errors;
                sum.panics.extend(t.panics);
                sum.slow.extend(t.slow);
                sum.peak = sum.peak.max(t.peak);
                sum.seconds += t.seconds;
            }
            None => kinds.push((kind, t)),
        }
    }
    println!("| input kind | inputs | refused with an error | panics | over {} s | peak live MiB | seconds |", TIME_BOUND.as_secs());
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut failures = Vec::new();
    for (kind, t) in &kinds {
        println!(
            "| {kind} | {} | {} | {} | {} | {:.1} | {:.1} |",
            t.inputs,
            t.errors,
            t.panics.len(),
            t.slow.len(),
            t.peak as f64 / (1 << 20) as f64,
            t.seconds
        );
        failures.extend(t.panics.iter().map(|p| format!("{kind}: {p}")));
        failures.extend(t.slow.iter().map(|p| format!("{kind}: {p}")));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
