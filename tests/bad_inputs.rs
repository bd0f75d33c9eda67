//! Bad inputs through the binary: each is refused with a non-zero exit and a message naming the
//! option, file or field, before anything is written; never accepted with a wrong result.
//! Options out of range (flags and TOML alike), an output folder holding an earlier run, a
//! resume with other options or a damaged trainer state, NaN in an optimizer state or adapter,
//! and Ctrl-C (exit 130, a checkpoint to resume from).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tiny() -> PathBuf {
    fixtures().join("tiny-llama")
}

fn data() -> PathBuf {
    fixtures().join("parquet/text.jsonl")
}

fn qlora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The command failed, and its error holds every one of `parts`.
fn assert_refused(o: &Output, parts: &[&str]) {
    let e = stderr(o);
    assert!(!o.status.success(), "accepted:\n{e}");
    for p in parts {
        assert!(e.contains(p), "{p:?} in:\n{e}");
    }
}

/// `qlora eval` of `model` on the text fixture at 16 tokens, with `extra` options.
fn eval(model: &Path, extra: &[&str]) -> Output {
    let d = data();
    let mut args = vec![
        "eval",
        "--model",
        s(model),
        "--data",
        s(&d),
        "--seq-len",
        "16",
    ];
    args.extend_from_slice(extra);
    qlora(&args)
}

/// `qlora train` on tiny-llama with `extra` options into `out`.
fn train(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["--seq-len", "16", "--batch-size", "2"];
    args.extend_from_slice(extra);
    train_on(&data(), out, &args)
}

/// `qlora train` of tiny-llama on `data` into `out`, with `extra` options only.
fn train_on(data: &Path, out: &Path, extra: &[&str]) -> Output {
    let m = tiny();
    let mut args = vec![
        "train",
        "--model",
        s(&m),
        "--data",
        s(data),
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    qlora(&args)
}

/// Every tensor of a safetensors file as (name, bytes, shape, dtype), to edit and write back.
type Tensors = Vec<(String, Vec<u8>, Vec<usize>, safetensors::Dtype)>;

fn read_tensors(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut t: Tensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec(), v.shape().to_vec(), v.dtype()))
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

fn write_tensors(path: &Path, tensors: &Tensors) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, sh, dt)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, sh.clone(), d).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn options_out_of_range_are_refused_by_name_from_flags_and_toml() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str)] = &[
        ("--rank=0", "--rank"),
        ("--lr=-1", "--lr"),
        ("--lr=nan", "--lr"),
        ("--dropout=-0.1", "--dropout"),
        ("--dropout=nan", "--dropout"),
        ("--dropout=1", "--dropout"),
        ("--weight-decay=-1", "--weight-decay"),
        ("--warmup-ratio=-0.5", "--warmup-ratio"),
        ("--grad-accum=0", "--grad-accum"),
        ("--alpha=0", "--alpha"),
        ("--lora-plus-ratio=0", "--lora-plus-ratio"),
        ("--max-grad-norm=nan", "--max-grad-norm"),
        ("--steps=0", "--steps"),
        ("--val-split=1.5", "--val-split"),
        ("--optim-resident-mb=-3", "--optim-resident-mb"),
        // tiny-llama has layers 0 and 1: no module selected, nothing would train.
        ("--layers-to-transform=5", "--layers-to-transform"),
    ];
    for (flag, name) in cases {
        let out = tmp.path().join("out");
        let o = train(&out, &[flag]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{flag}: {e}");
        assert!(e.contains(name), "{flag}: {e}");
        assert!(!out.exists(), "{flag}: nothing is created");
    }
    // The same rules hold for a TOML file.
    let cfg = tmp.path().join("train.toml");
    std::fs::write(&cfg, "lr = -0.001\ndropout = 2.0\n").unwrap();
    let out = tmp.path().join("out");
    let o = train(&out, &["--config", s(&cfg), "--steps", "1"]);
    assert_refused(&o, &["--lr", "--dropout"]);
    assert!(!out.exists());
}

#[test]
fn an_earlier_run_is_never_overwritten_and_resumes_only_with_the_same_options() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    // Ctrl-C: a checkpoint, then exit 130.
    let (m, d) = (tiny(), data());
    let child = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(["train", "--model", s(&m), "--data", s(&d), "--out", s(&out)])
        .args([
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--steps",
            "1000000",
            "--seed",
            "7",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training has begun (the metrics file gets its first step), then interrupt.
    let metrics = out.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(true, |t| t.lines().count() < 2) {
        assert!(t0.elapsed().as_secs() < 120, "training never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let ckpt = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("checkpoint-")
        })
        .expect("a checkpoint is written on Ctrl-C");
    assert!(stdout.contains("--resume"), "{stdout}");
    let metrics_before = std::fs::read(&metrics).unwrap();

    // The same --out again, without --resume: refused, naming what is there and how to go on.
    let o = train(&out, &["--steps", "3"]);
    let e = stderr(&o);
    assert!(!o.status.success(), "{e}");
    assert!(
        e.contains("earlier run") && e.contains("metrics.jsonl") && e.contains("--resume"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(&metrics).unwrap(),
        metrics_before,
        "nothing overwritten"
    );

    // --resume with other options: refused with each difference listed.
    let big = ckpt.file_name().unwrap().to_string_lossy()["checkpoint-".len()..]
        .parse::<usize>()
        .unwrap()
        + 2;
    let steps = big.to_string();
    let o = train(
        &out,
        &[
            "--resume",
            s(&ckpt),
            "--steps",
            &steps,
            "--seed",
            "8",
            "--lr",
            "1e-3",
        ],
    );
    let e = stderr(&o);
    assert!(!o.status.success(), "{e}");
    assert!(
        e.contains("--seed: 7 in the checkpoint, 8 now") && e.contains("--lr"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(&metrics).unwrap(),
        metrics_before,
        "nothing appended"
    );

    // A hand-edited trainer state is refused, naming the file and the field.
    let state_path = ckpt.join("trainer_state.json");
    let original = std::fs::read_to_string(&state_path).unwrap();
    let mut state: serde_json::Value = serde_json::from_str(&original).unwrap();
    state["step"] = serde_json::json!(state["step"].as_u64().unwrap() + 1);
    std::fs::write(&state_path, state.to_string()).unwrap();
    let o = train(
        &out,
        &["--resume", s(&ckpt), "--steps", &steps, "--seed", "7"],
    );
    assert_refused(&o, &["trainer_state.json", "`step`"]);
    std::fs::write(&state_path, &original).unwrap();

    // NaN in the optimizer state is refused on resume.
    let opt_path = ckpt.join("optimizer.safetensors");
    let opt_bytes = std::fs::read(&opt_path).unwrap();
    let mut tensors = read_tensors(&opt_path);
    let f32_tensor = tensors
        .iter_mut()
        .find(|t| t.3 == safetensors::Dtype::F32 && !t.1.is_empty())
        .unwrap();
    f32_tensor.1[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let poisoned = f32_tensor.0.clone();
    write_tensors(&opt_path, &tensors);
    let o = train(
        &out,
        &["--resume", s(&ckpt), "--steps", &steps, "--seed", "7"],
    );
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains(&poisoned) && e.contains("NaN"),
        "{e}"
    );
    std::fs::write(&opt_path, &opt_bytes).unwrap();

    // The same options: it continues to the end.
    let o = train(
        &out,
        &["--resume", s(&ckpt), "--steps", &steps, "--seed", "7"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("adapter/adapter_model.safetensors").is_file());
}

#[test]
fn an_adapter_holding_nan_is_refused_by_every_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = train(&out, &["--steps", "2", "--val-split", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let adapter = out.join("adapter");
    let w = adapter.join("adapter_model.safetensors");
    let mut tensors = read_tensors(&w);
    // bf16 NaN: exponent all ones, mantissa non-zero.
    tensors[0].1[..2].copy_from_slice(&[0xc1, 0x7f]);
    let name = tensors[0].0.clone();
    write_tensors(&w, &tensors);
    let (m, d) = (tiny(), data());
    let merged = tmp.path().join("merged");
    for args in [
        vec![
            "eval",
            "--model",
            s(&m),
            "--adapter",
            s(&adapter),
            "--data",
            s(&d),
            "--seq-len",
            "16",
        ],
        vec![
            "merge",
            "--model",
            s(&m),
            "--adapter",
            s(&adapter),
            "--out",
            s(&merged),
        ],
    ] {
        let o = qlora(&args);
        let e = stderr(&o);
        assert!(!o.status.success(), "{}: {e}", args[0]);
        assert!(e.contains(&name) && e.contains("NaN"), "{}: {e}", args[0]);
    }
    assert!(!merged.exists());
}

/// tiny-llama copied to `dir/name`, its config edited by `edit`, its weights by `weights`.
fn variant(
    dir: &Path,
    name: &str,
    edit: impl Fn(&mut serde_json::Value),
    weights: impl Fn(&mut Tensors),
) -> PathBuf {
    let m = dir.join(name);
    std::fs::create_dir_all(&m).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tiny().join(f), m.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny().join("config.json")).unwrap())
            .unwrap();
    edit(&mut cfg);
    std::fs::write(m.join("config.json"), cfg.to_string()).unwrap();
    let mut tensors = read_tensors(&tiny().join("model.safetensors"));
    weights(&mut tensors);
    write_tensors(&m.join("model.safetensors"), &tensors);
    m
}

fn nan_in(name: &'static str) -> impl Fn(&mut Tensors) {
    move |ts| {
        let t = ts.iter_mut().find(|t| t.0 == name).unwrap();
        assert_eq!(t.3, safetensors::Dtype::F32);
        t.1[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    }
}

#[test]
fn configs_and_weights_that_change_the_math_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let keep = |_: &mut Tensors| {};
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            variant(
                tmp.path(),
                "gelu",
                |c| c["hidden_act"] = "gelu".into(),
                keep,
            ),
            "`hidden_act`",
        ),
        (
            variant(
                tmp.path(),
                "eps",
                |c| c["rms_norm_eps"] = (-1e-6).into(),
                keep,
            ),
            "`rms_norm_eps`",
        ),
        (
            variant(
                tmp.path(),
                "theta",
                |c| match c.get_mut("rope_parameters") {
                    Some(r) => r["rope_theta"] = 0.0.into(),
                    None => c["rope_theta"] = 0.0.into(),
                },
                keep,
            ),
            "`rope_theta`",
        ),
        (
            variant(
                tmp.path(),
                "layers",
                |c| c["num_hidden_layers"] = 1.into(),
                keep,
            ),
            "`num_hidden_layers` is 1",
        ),
        (
            variant(
                tmp.path(),
                "nan-q",
                |_| {},
                nan_in("model.layers.0.self_attn.q_proj.weight"),
            ),
            "finite",
        ),
        (
            variant(tmp.path(), "nan-norm", |_| {}, nan_in("model.norm.weight")),
            "model.norm.weight",
        ),
        (
            variant(
                tmp.path(),
                "int",
                |_| {},
                |ts| {
                    let t = ts.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
                    t.3 = safetensors::Dtype::I32;
                },
            ),
            "must be a float",
        ),
        (
            variant(
                tmp.path(),
                "untied-without-head",
                |c| c["tie_word_embeddings"] = false.into(),
                |ts| ts.retain(|t| t.0 != "lm_head.weight"),
            ),
            "`tie_word_embeddings` is false",
        ),
    ];
    for (model, what) in &cases {
        let o = eval(model, &[]);
        let e = stderr(&o);
        assert!(!o.status.success(), "{}: {e}", model.display());
        assert!(e.contains(what), "{}: {what:?} in {e}", model.display());
    }
    // quantize refuses the NaN weight, and writes nothing.
    let out = tmp.path().join("q");
    let o = qlora(&["quantize", "--model", s(&cases[4].0), "--out", s(&out)]);
    assert_refused(&o, &["q_proj", "finite"]);
    assert!(!out.exists());
}

#[test]
fn lengths_and_sizes_beyond_the_model_or_the_machine_are_refused_before_work() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, d) = (tiny(), data());
    // tiny-llama's context is 128 positions.
    let out = tmp.path().join("out");
    let o = train_on(&d, &out, &["--seq-len", "100000", "--steps", "1"]);
    assert_refused(&o, &["max_position_embeddings"]);
    assert!(!out.exists());
    let o = qlora(&[
        "plan",
        "--model",
        s(&m),
        "--seq-len",
        "18446744073709551615",
    ]);
    assert_refused(&o, &["context of 128"]);
    // A plan past the machine's memory is refused unless a limit is given.
    let o = train_on(
        &d,
        &out,
        &[
            "--seq-len",
            "128",
            "--batch-size",
            "100000000",
            "--steps",
            "1",
        ],
    );
    assert_refused(&o, &["machine's memory"]);
    assert!(!out.exists());
    // One 6 MB line of text: tokenized in pieces, its 3.6 M tokens held in memory are counted
    // with the plan against the limit (36 MiB plan + 45 MiB of tokens > 64 MiB).
    let long = tmp.path().join("long.jsonl");
    let text = vec!["the quick brown fox"; 300_000].join(" ");
    std::fs::write(&long, format!("{{\"text\": \"{text}\"}}\n")).unwrap();
    let o = train_on(
        &long,
        &out,
        &["--seq-len", "64", "--steps", "1", "--memory-limit", "64MiB"],
    );
    assert_refused(&o, &["tokenized data", "--memory-limit 64.00 MiB"]);
    assert!(!out.exists());
    let o = qlora(&[
        "generate",
        "--model",
        s(&m),
        "--prompt",
        "hi",
        "--temperature",
        "nan",
    ]);
    assert_refused(&o, &["--temperature", "NaN"]);
    // merge reads --eval-data before writing anything.
    let run = tmp.path().join("run");
    assert!(train(&run, &["--steps", "1", "--val-split", "0"])
        .status
        .success());
    let merged = tmp.path().join("merged");
    let missing = tmp.path().join("missing.txt");
    let adapter = run.join("adapter");
    let o = qlora(&[
        "merge",
        "--model",
        s(&m),
        "--adapter",
        s(&adapter),
        "--out",
        s(&merged),
        "--requantize",
        "--eval-data",
        s(&missing),
    ]);
    assert_refused(&o, &["missing.txt"]);
    assert!(!merged.exists(), "nothing written");
}

/// `eval` scores what `train` trains: a record's `labels` (-100 not scored), shifted as
/// transformers shifts them.
#[test]
fn eval_scores_only_the_labelled_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("masked.jsonl");
    std::fs::write(
        &f,
        "{\"input_ids\": [5, 6, 7, 8, 9], \"labels\": [-100, -100, 7, -100, 9]}\n\
         {\"input_ids\": [5, 6, 7, 8, 9]}\n",
    )
    .unwrap();
    let m = tiny();
    let o = qlora(&[
        "eval",
        "--model",
        s(&m),
        "--data",
        s(&f),
        "--seq-len",
        "16",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // 2 labelled tokens of the first record, 4 next tokens of the second.
    assert_eq!(v["tokens"], 6, "{v}");
}

/// A field present with the wrong type is named with its value, never read as its default:
/// in a model's config.json and in an adapter's adapter_config.json.
#[test]
fn fields_of_the_wrong_type_are_named_not_defaulted() {
    let tmp = tempfile::tempdir().unwrap();
    let keep = |_: &mut Tensors| {};
    for (name, edit, what) in [
        (
            "tie",
            serde_json::json!({"tie_word_embeddings": "yes"}),
            "`tie_word_embeddings` is \"yes\"",
        ),
        (
            "heads",
            serde_json::json!({"num_key_value_heads": 2.5}),
            "`num_key_value_heads` is 2.5",
        ),
        (
            "eos",
            serde_json::json!({"eos_token_id": [2, "x"]}),
            "`eos_token_id`",
        ),
        (
            "gptq",
            serde_json::json!({"quantization_config": {"quant_method": "gptq"}}),
            "`gptq`",
        ),
    ] {
        let m = variant(
            tmp.path(),
            name,
            |c| {
                for (k, v) in edit.as_object().unwrap() {
                    c[k] = v.clone();
                }
            },
            keep,
        );
        assert_refused(&eval(&m, &[]), &["config.json", what]);
    }
    let run = tmp.path().join("run");
    assert!(train(&run, &["--steps", "1", "--val-split", "0"])
        .status
        .success());
    let cfg_path = run.join("adapter/adapter_config.json");
    let original = std::fs::read_to_string(&cfg_path).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&original).unwrap();
    assert_eq!(
        cfg["lora_dropout"],
        serde_json::json!(0.05),
        "written as PEFT writes it"
    );
    for (key, value, what) in [
        (
            "r",
            serde_json::json!([1, 2, 3]),
            "`r` is [1,2,3], expected a positive integer",
        ),
        (
            "lora_alpha",
            serde_json::json!("16"),
            "`lora_alpha` is \"16\", expected a number",
        ),
        (
            "use_dora",
            serde_json::json!("true"),
            "`use_dora` is \"true\", expected true or false",
        ),
        (
            "lora_dropout",
            serde_json::json!(1.5),
            "`lora_dropout` is 1.5",
        ),
    ] {
        let mut bad = cfg.clone();
        bad[key] = value;
        std::fs::write(&cfg_path, bad.to_string()).unwrap();
        let adapter = run.join("adapter");
        assert_refused(
            &eval(&tiny(), &["--adapter", s(&adapter)]),
            &["adapter_config.json", what],
        );
    }
    std::fs::write(&cfg_path, original).unwrap();
}
