//! `qlora train` on bad input, through the binary as a user runs it: every case ends with a
//! clear error (exit status 1, never a panic) naming the file, line or field, and leaves nothing
//! half-written. Long sequences are not an error: their documented handling is checked.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use qlora::data::tokenizer::TextTokenizer;

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// `qlora train --model MODEL --data DATA --out OUT` with small settings and `extra` flags.
fn train(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qlora"));
    cmd.arg("train")
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(["--seq-len", "32", "--batch-size", "2", "--steps", "2"])
        .args(["--rank", "4", "--val-split", "0"])
        .args(extra);
    let o = cmd.output().expect("running qlora");
    let run = Run {
        ok: o.status.success(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    };
    if !run.ok {
        assert_eq!(
            o.status.code(),
            Some(1),
            "an error, not a panic:\n{}",
            run.stderr
        );
        assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    }
    run
}

/// `ids.jsonl` in `dir`: 8 pre-tokenized records of 8 ids each.
fn eight_id_records(dir: &Path) -> PathBuf {
    let lines: Vec<String> = (0..8)
        .map(|i| format!("{{\"input_ids\": [{}, 5, 6, 7, 8, 9, 10, 11]}}", 20 + i))
        .collect();
    write(dir, "ids.jsonl", &(lines.join("\n") + "\n"))
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p
}

/// The run failed with every `parts` in its error.
fn assert_fails_with(run: &Run, parts: &[&str]) {
    assert!(!run.ok, "expected a failure; stdout:\n{}", run.stdout);
    for p in parts {
        assert!(
            run.stderr.contains(p),
            "expected {p:?} in the error:\n{}",
            run.stderr
        );
    }
}

/// A model folder: tiny-llama's weights with another config or tokenizer.
fn model_variant(dir: &Path, config: Option<&str>, tokenizer_from: Option<&Path>) -> PathBuf {
    let m = dir.join("model");
    fs::create_dir_all(&m).unwrap();
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        fs::copy(tiny().join(f), m.join(f)).unwrap();
    }
    if let Some(c) = config {
        fs::write(m.join("config.json"), c).unwrap();
    }
    if let Some(src) = tokenizer_from {
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            fs::copy(src.join(f), m.join(f)).unwrap();
        }
    }
    m
}

#[test]
fn empty_datasets_are_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("empty.txt", ""),
        ("blank.txt", " \n\n"),
        ("empty.jsonl", ""),
    ] {
        let data = write(tmp.path(), name, text);
        let out = tmp.path().join(format!("out-{name}"));
        let run = train(&tiny(), &data, &out, &[]);
        assert_fails_with(
            &run,
            &[&format!(
                "dataset {} is empty: it holds no records",
                data.display()
            )],
        );
        assert!(!out.exists(), "nothing written for {name}");
    }
    // Records that all produce no tokens: blank texts and empty token lists.
    let data = write(
        tmp.path(),
        "nothing.jsonl",
        "{\"text\": \"\"}\n{\"text\": \"  \\n \"}\n{\"input_ids\": []}\n",
    );
    let out = tmp.path().join("out-nothing");
    let run = train(&tiny(), &data, &out, &[]);
    assert_fails_with(
        &run,
        &[&format!(
            "dataset {} is empty: none of its 3 records has a token to train within 32 tokens \
             (3 dropped)",
            data.display()
        )],
    );
    assert!(!out.exists());
}

#[test]
fn a_record_without_the_expected_fields_names_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write(
        tmp.path(),
        "d.jsonl",
        "{\"text\": \"Shall I compare thee\"}\n\n{\"prompt\": \"x\", \"completion\": \"y\"}\n",
    );
    let out = tmp.path().join("out");
    let run = train(&tiny(), &data, &out, &[]);
    assert_fails_with(
        &run,
        &[&format!(
            "{}:3: record has none of the expected fields: `messages` (chat), `instruction` + \
             `output` (alpaca), `input_ids` (tokens), or `text`",
            data.display()
        )],
    );
    assert!(!out.exists());
}

#[test]
fn long_sequences_are_windowed_or_truncated_as_documented() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = TextTokenizer::from_dir(&tiny()).unwrap().unwrap();
    let text = "From fairest creatures we desire increase, that thereby beauty's rose might \
                never die, but as the riper should by time decease, his tender heir might bear \
                his memory.";
    // Text: cut into 32-token windows, nothing lost (a 1-token tail predicts nothing).
    let n = tok.encode(text, true).unwrap().len() + 1; // + the appended EOS
    assert!(n > 64, "the text is longer than two windows ({n} tokens)");
    let windows = n / 32 + usize::from(n % 32 >= 2);
    // Supervised records keep their start (truncated). A pre-tokenized one with labels keeps
    // 32 of its 40 tokens; an Alpaca record whose prompt template alone fills the 32 tokens has
    // nothing left to train and is dropped (counted), never an error.
    let ids: Vec<u32> = (1..=40).collect();
    let records = format!(
        "{}\n{}\n{}\n",
        serde_json::json!({"text": text}),
        serde_json::json!({"input_ids": ids, "labels": ids}),
        serde_json::json!({"instruction": "Repeat.", "output": "word ".repeat(60)})
    );
    let data = write(tmp.path(), "long.jsonl", &records);
    let out = tmp.path().join("out");
    let run = train(&tiny(), &data, &out, &[]);
    assert!(run.ok, "{}", run.stderr);
    let report = format!(
        "train data: {} examples from 3 records ({} tokens",
        windows + 1,
        n - usize::from(n % 32 == 1) + 32
    );
    assert!(
        run.stdout.contains(&report),
        "{report:?} in\n{}",
        run.stdout
    );
    // Only the Alpaca record is dropped; a text's 1-token tail window is not reported.
    let counts = "2 truncated to the sequence length; 1 record dropped with nothing to train";
    assert!(run.stdout.contains(counts), "{counts:?} in\n{}", run.stdout);
    assert!(run.stdout.contains("done: 2 steps"), "{}", run.stdout);
    assert!(out.join("adapter/adapter_model.safetensors").is_file());
}

#[test]
fn a_tokenizer_from_another_model_is_named_as_the_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let smol = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2-135m");
    // tiny-llama (vocabulary 512) with SmolLM2's tokenizer (49152 ids).
    let model = model_variant(tmp.path(), None, Some(&smol));
    let data = write(
        tmp.path(),
        "d.jsonl",
        "{\"text\": \"\"}\n{\"text\": \"Shall I compare thee to a summer's day?\"}\n",
    );
    let run = train(&model, &data, &tmp.path().join("out"), &[]);
    assert_fails_with(
        &run,
        &[
            &format!("{}:2: the tokenizer produced token id", data.display()),
            "outside the model's vocabulary of 512",
            "the tokenizer (vocabulary of 49152) does not belong to this model",
        ],
    );
    // Ids given in the data are the data's fault, and said so.
    let data = write(
        tmp.path(),
        "ids.jsonl",
        "{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [1, 600]}\n",
    );
    let run = train(&tiny(), &data, &tmp.path().join("out2"), &[]);
    assert_fails_with(
        &run,
        &[&format!(
            "{}:2: token id 600 is outside the model's vocabulary of 512 (was the data \
             tokenized for another model?)",
            data.display()
        )],
    );
    assert!(!tmp.path().join("out").exists() && !tmp.path().join("out2").exists());
}

#[test]
fn an_unusable_output_folder_fails_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/sonnets/valid.txt");
    let file = write(tmp.path(), "a-file", "keep me");
    for out in [file.join("out"), file.clone()] {
        let run = train(&tiny(), &data, &out, &[]);
        assert_fails_with(
            &run,
            &[
                &format!("{}: cannot be used as the output folder", out.display()),
                &format!("{} is a file, not a folder", file.display()),
            ],
        );
        assert!(
            !run.stdout.contains("train data"),
            "no work done: {}",
            run.stdout
        );
    }
    assert_eq!(fs::read_to_string(&file).unwrap(), "keep me");
    let left: Vec<_> = fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "nothing but the file: {left:?}");
}

#[test]
fn resume_refuses_another_model_and_folders_that_are_not_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/sonnets/valid.txt");
    let first = tmp.path().join("first");
    let run = train(&tiny(), &data, &first, &["--save-every", "1"]);
    assert!(run.ok, "{}", run.stderr);
    let ckpt = first.join("checkpoint-1");
    assert!(ckpt.join("trainer_state.json").is_file());

    // Another model with the very same tensor shapes (2 heads of 32 and 1 KV head instead of
    // 4 and 2 heads of 16): the adapter loads, the fingerprint refuses it.
    let config = fs::read_to_string(tiny().join("config.json"))
        .unwrap()
        .replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 2")
        .replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 1")
        .replace("\"head_dim\": 16", "\"head_dim\": 32");
    let other = model_variant(tmp.path(), Some(&config), None);
    let out = tmp.path().join("resumed");
    let resume = ckpt.display().to_string();
    let run = train(&other, &data, &out, &["--resume", &resume]);
    assert_fails_with(
        &run,
        &[
            &format!("{resume}: this checkpoint belongs to another model or adapter layout"),
            "heads4/2",
            "heads2/1",
        ],
    );
    assert!(!out.exists(), "nothing written for a refused resume");

    // Folders that are not checkpoints: an empty one, the run's output folder (the checkpoint
    // inside is suggested), a path that does not exist.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let cases = [
        (
            empty.clone(),
            "is not a training checkpoint: it has no trainer_state.json, optimizer.safetensors, \
             adapter/adapter_config.json; --resume takes a checkpoint folder OUT/checkpoint-N"
                .to_string(),
        ),
        (
            first.clone(),
            format!("(this folder holds {}: resume from it?)", ckpt.display()),
        ),
        (tmp.path().join("nowhere"), "is not a folder".to_string()),
    ];
    for (dir, msg) in cases {
        let d = dir.display().to_string();
        let run = train(&tiny(), &data, &out, &["--resume", &d]);
        assert_fails_with(&run, &[&format!("{d}: "), &msg]);
        assert!(!run.stdout.contains("train data"), "{}", run.stdout);
        assert!(!out.exists());
    }
}

#[test]
fn keep_layers_auto_keeps_what_fits_in_the_limit_or_the_machine() {
    let tmp = tempfile::tempdir().unwrap();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/sonnets/valid.txt");
    // On the CPU without --memory-limit, the machine's memory is the limit.
    let run = train(
        &tiny(),
        &data,
        &tmp.path().join("a"),
        &["--keep-layers", "auto"],
    );
    assert!(run.ok, "{}", run.stderr);
    assert!(
        run.stdout
            .contains("--keep-layers auto: the top 2 of 2 layers keep their activations"),
        "{}",
        run.stdout
    );
    // tiny-llama's two layers are a few KiB of activations: both fit in 1 GiB.
    let args = ["--keep-layers", "auto", "--memory-limit", "1GiB"];
    let run = train(&tiny(), &data, &tmp.path().join("b"), &args);
    assert!(run.ok, "{}", run.stderr);
    for part in [
        "--keep-layers auto: the top 2 of 2 layers keep their activations within --memory-limit 1.00 GiB",
        "memory plan: batch 2 x seq 32, checkpointing on, top 2 layers kept,",
    ] {
        assert!(run.stdout.contains(part), "{part:?} in:\n{}", run.stdout);
    }
}

/// A validation split of a small record set says which records it took; the config's EOS id
/// serves a model folder without a tokenizer.
#[test]
fn a_small_validation_split_says_what_it_held_out() {
    let dir = tempfile::tempdir().unwrap();
    let data = eight_id_records(dir.path());
    let model = model_variant(dir.path(), None, None);
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        fs::remove_file(model.join(f)).unwrap();
    }
    let o = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(["train", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(dir.path().join("out"))
        .args([
            "--seq-len",
            "8",
            "--batch-size",
            "2",
            "--steps",
            "2",
            "--val-split",
            "0.25",
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{stderr}");
    assert!(
        stdout.contains("2 of the 8 records") && stdout.contains("held out"),
        "{stdout}"
    );
}

/// A bitsandbytes 4-bit folder with `config.json` and no tokenizer trains on pre-tokenized
/// records, used exactly as written (no EOS appended: 8 records of 8 ids are 64 tokens).
#[test]
fn a_bnb_folder_without_a_tokenizer_trains_on_input_ids_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bnb4/model");
    assert!(!model.join("tokenizer.json").exists());
    let data = eight_id_records(dir.path());
    let out = dir.path().join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(["train", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args([
            "--seq-len",
            "8",
            "--batch-size",
            "4",
            "--steps",
            "2",
            "--val-split",
            "0",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("train data: 8 examples from 8 records (64 tokens, 56 trained)"),
        "{stdout}"
    );
    assert!(out.join("adapter/adapter_model.safetensors").is_file());
}
