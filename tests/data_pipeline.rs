//! The training data pipeline on SmolLM2's real tokenizer and chat template: which tokens are
//! trained, EOS handling when pad == eos, truncation, packing, shuffling, the validation split,
//! resuming, and the errors bad files give.

use std::path::{Path, PathBuf};

use candle_core::Device;
use qlora::data::batches::{BatchOptions, BatchPosition, Batches};
use qlora::data::corpus::{Corpus, DataOptions};
use qlora::data::error::DataError;
use qlora::data::example::Example;
use qlora::data::format::DataFormat;
use qlora::data::packing::pack_sequences;
use qlora::data::prompt::alpaca_prompt;
use qlora::data::split::split_validation;
use qlora::data::tokenizer::{Message, TextTokenizer};
use qlora::train::loss::IGNORE_INDEX;
use qlora::train::step::Batch;

const VOCAB: usize = 49152;
/// SmolLM2's `<|im_end|>`: its EOS and its pad token.
const EOS: u32 = 2;

fn tokenizer() -> TextTokenizer {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2-135m");
    TextTokenizer::from_dir(&dir)
        .expect("fixture tokenizer loads")
        .expect("fixture has tokenizer.json")
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

fn load(path: &Path, seq_len: usize) -> Result<Corpus, DataError> {
    Corpus::load(path, Some(&tokenizer()), &DataOptions::new(seq_len, VOCAB))
}

/// Maximal runs of trained labels, as (start, end) token ranges.
fn trained_runs(e: &Example) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut start = None;
    for (i, &l) in e.labels.iter().chain([&IGNORE_INDEX]).enumerate() {
        match (l != IGNORE_INDEX, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                runs.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    runs
}

fn decode_runs(tok: &TextTokenizer, e: &Example) -> Vec<String> {
    trained_runs(e)
        .into_iter()
        .map(|(s, t)| tok.decode(&e.ids[s..t], false).unwrap())
        .collect()
}

fn labels_match_ids_where_trained(e: &Example) {
    for (i, (&id, &l)) in e.ids.iter().zip(&e.labels).enumerate() {
        assert!(
            l == IGNORE_INDEX || l == i64::from(id),
            "label {l} at {i} differs from id {id}"
        );
    }
}

#[test]
fn chat_trains_exactly_the_assistant_turns_and_their_end_tokens() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let conv = serde_json::json!({"messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "Thanks"}
    ]});
    let path = write(dir.path(), "chat.jsonl", &format!("{conv}\n"));
    let c = load(&path, 512).unwrap();
    assert_eq!(c.examples.len(), 1);
    let e = &c.examples[0];
    assert_eq!(
        decode_runs(&tok, e),
        vec![
            "Paris is the capital of France.<|im_end|>".to_string(),
            "Rome.<|im_end|>".to_string()
        ]
    );
    labels_match_ids_where_trained(e);

    // The ids are the tokenization of the whole rendering, without the trailing user turn, and
    // no second EOS is appended after the template's own `<|im_end|>`.
    let messages: Vec<Message> = serde_json::from_value(conv["messages"].clone()).unwrap();
    let text = tok.apply_chat_template(&messages[..4], false).unwrap();
    assert!(text.starts_with("<|im_start|>system\nYou are a helpful AI assistant"));
    assert_eq!(e.ids, tok.encode(&text, false).unwrap());
    assert_eq!(
        tok.decode(&e.ids[e.len() - 2..], false).unwrap(),
        "<|im_end|>\n"
    );
    assert_eq!(
        e.labels[e.len() - 1],
        IGNORE_INDEX,
        "the newline after <|im_end|>"
    );
    assert_eq!(
        e.labels[e.len() - 2],
        i64::from(EOS),
        "EOS trained although it is pad"
    );
}

#[test]
fn chat_with_system_prompt_and_no_assistant_turn() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let with_system = serde_json::json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}
    ]});
    let no_reply = serde_json::json!({"messages": [{"role": "user", "content": "Hi"}]});
    let path = write(
        dir.path(),
        "chat.jsonl",
        &format!("{with_system}\n{no_reply}\n"),
    );
    let c = load(&path, 512).unwrap();
    assert_eq!(c.examples.len(), 1);
    assert_eq!(
        c.report.dropped, 1,
        "the conversation without a reply trains nothing"
    );
    let e = &c.examples[0];
    assert_eq!(decode_runs(&tok, e), vec!["Hello!<|im_end|>".to_string()]);
    let prompt = tok.decode(&e.ids[..trained_runs(e)[0].0], false).unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn alpaca_trains_the_output_and_an_appended_eos() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let recs = [
        serde_json::json!({"instruction": "Add 2 and 3.", "output": "2 + 3 = 5."}),
        serde_json::json!({"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}),
    ];
    let text: String = recs.iter().map(|r| format!("{r}\n")).collect();
    let path = write(dir.path(), "alpaca.jsonl", &text);
    let c = load(&path, 512).unwrap();
    assert_eq!(c.examples.len(), 2);
    for (e, (instruction, input, output)) in c.examples.iter().zip([
        ("Add 2 and 3.", "", "2 + 3 = 5."),
        ("Translate to French.", "Good morning", "Bonjour"),
    ]) {
        assert_eq!(
            decode_runs(&tok, e),
            vec![format!("{output}<|im_end|>")],
            "trained span"
        );
        labels_match_ids_where_trained(e);
        let start = trained_runs(e)[0].0;
        let prompt = alpaca_prompt(instruction, input);
        assert_eq!(tok.decode(&e.ids[..start], false).unwrap(), prompt);
        assert_eq!(*e.ids.last().unwrap(), EOS);
        assert_eq!(*e.labels.last().unwrap(), i64::from(EOS));
    }
    let with_input = tok.decode(&c.examples[1].ids, false).unwrap();
    assert!(with_input.contains("paired with an input"));
    assert!(with_input.contains("### Input:\nGood morning\n\n### Response:\nBonjour"));
}

#[test]
fn text_is_all_trained_with_eos_even_when_eos_is_pad() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "text.json",
        "[{\"text\": \"The quick brown fox.\"}, {\"text\": \"Jumps.\"}]",
    );
    let c = load(&path, 64).unwrap();
    for (e, text) in c.examples.iter().zip(["The quick brown fox.", "Jumps."]) {
        let mut want = tok.encode(text, true).unwrap();
        want.push(EOS);
        assert_eq!(e.ids, want);
        assert_eq!(
            e.labels,
            want.iter().map(|&i| i64::from(i)).collect::<Vec<_>>()
        );
    }
    // Packed with pad == eos: the EOS keeps its label, padding does not get one.
    let opts = BatchOptions {
        shuffle: false,
        epochs: Some(1),
        ..BatchOptions::new(4, 64, EOS, 0)
    };
    let batch = Batches::new(c.examples.clone(), opts, &Device::Cpu)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let ids = batch.ids.flatten_all().unwrap().to_vec1::<u32>().unwrap();
    let n = c.examples[0].len() + c.examples[1].len();
    assert_eq!(ids.len(), 64);
    assert_eq!(ids[c.examples[0].len() - 1], EOS);
    assert_eq!(batch.labels[c.examples[0].len() - 1], i64::from(EOS));
    assert_eq!(batch.labels[n - 1], i64::from(EOS));
    assert!(
        ids[n..].iter().all(|&i| i == EOS),
        "padding written with the pad id"
    );
    assert!(batch.labels[n..].iter().all(|&l| l == IGNORE_INDEX));
}

#[test]
fn plain_text_file_is_one_stream_cut_into_windows() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let text =
        "Shall I compare thee to a summer's day?\n\nThou art more lovely and more temperate.\n";
    let path = write(dir.path(), "sonnet.txt", text);
    let c = load(&path, 8).unwrap();
    let mut all = tok.encode(text, true).unwrap();
    all.push(EOS);
    let joined: Vec<u32> = c.examples.iter().flat_map(|e| e.ids.clone()).collect();
    // Every window but a 1-token tail (nothing to predict in it) is kept.
    assert_eq!(joined[..], all[..joined.len()]);
    assert!(all.len() - joined.len() <= 1);
    assert!(c.examples.iter().all(|e| e.len() <= 8));
    assert!(c.examples[..c.examples.len() - 1]
        .iter()
        .all(|e| e.len() == 8));
    let docs: Vec<usize> = c.examples.iter().map(|e| e.doc).collect();
    assert_eq!(docs, (0..c.examples.len()).collect::<Vec<_>>());
}

#[test]
fn supervised_examples_are_truncated_and_dropped_when_nothing_trains() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let long_output = "word ".repeat(100);
    let recs = [
        serde_json::json!({"instruction": "Say it.", "output": long_output}),
        serde_json::json!({"instruction": "x ".repeat(200), "output": "unseen"}),
        serde_json::json!({"instruction": "Short.", "output": "Yes."}),
    ];
    let text: String = recs.iter().map(|r| format!("{r}\n")).collect();
    let path = write(dir.path(), "alpaca.jsonl", &text);
    let seq_len = 64;
    let c = load(&path, seq_len).unwrap();
    assert_eq!(c.report.records, 3);
    assert_eq!(c.report.truncated, 2);
    assert_eq!(c.report.dropped, 1);
    assert_eq!(c.examples.len(), 2);
    let e = &c.examples[0];
    assert_eq!(e.len(), seq_len);
    assert_eq!(e.line, 1);
    let full = tok
        .encode(
            &format!("{}{long_output}", alpaca_prompt("Say it.", "")),
            true,
        )
        .unwrap();
    assert_eq!(e.ids[..], full[..seq_len], "the start is kept");
    assert_ne!(*e.ids.last().unwrap(), EOS, "a cut example has no EOS");
    assert_eq!(c.examples[1].line, 3);
    assert!(c
        .report
        .to_string()
        .contains("2 truncated to the sequence length; 1 record dropped"));
}

fn hand_made(lens: &[usize]) -> Vec<Example> {
    let mut next = 100u32;
    lens.iter()
        .enumerate()
        .map(|(doc, &n)| {
            let ids: Vec<u32> = (0..n as u32).map(|k| next + k).collect();
            next += 100;
            Example {
                labels: ids.iter().map(|&i| i64::from(i)).collect(),
                ids,
                doc,
                line: doc + 1,
                target: None,
            }
        })
        .collect()
}

#[test]
fn packing_marks_segments_positions_and_segment_starts() {
    const I: i64 = IGNORE_INDEX;
    let rows = pack_sequences(&hand_made(&[3, 4, 2]), 8, 0);
    assert_eq!(rows.len(), 2);
    // 3 + 4 share row 0 (1 token left, padding); 2 does not fit and opens row 1.
    assert_eq!(rows[0].ids, vec![100, 101, 102, 200, 201, 202, 203, 0]);
    assert_eq!(rows[0].segments, vec![0, 0, 0, 1, 1, 1, 1, 2]);
    assert_eq!(rows[0].positions, vec![0, 1, 2, 0, 1, 2, 3, 0]);
    assert_eq!(rows[0].labels, vec![I, 101, 102, I, 201, 202, 203, I]);
    assert_eq!(rows[1].ids, vec![300, 301, 0, 0, 0, 0, 0, 0]);
    assert_eq!(rows[1].segments, vec![0, 0, 1, 1, 1, 1, 1, 1]);
    assert_eq!(rows[1].positions, vec![0, 1, 0, 1, 2, 3, 4, 5]);
    assert_eq!(rows[1].labels, vec![I, 301, I, I, I, I, I, I]);

    // The same through Batches, as tensors.
    let opts = BatchOptions {
        shuffle: false,
        epochs: Some(1),
        ..BatchOptions::new(2, 8, 0, 0)
    };
    let mut batches = Batches::new(hand_made(&[3, 4, 2]), opts, &Device::Cpu).unwrap();
    let b = batches.next().unwrap().unwrap();
    assert_eq!(b.ids.dims(), &[2, 8]);
    let segs = b.segments.as_ref().unwrap().to_vec2::<u32>().unwrap();
    let pos = b.positions.as_ref().unwrap().to_vec2::<u32>().unwrap();
    assert_eq!(segs[0], rows[0].segments);
    assert_eq!(pos[1], rows[1].positions);
    assert_eq!(b.labels[..8], rows[0].labels[..]);
    assert_eq!(b.predicted_tokens(), 6);
    assert!(batches.next().is_none(), "one epoch of one batch");
}

#[test]
fn unpacked_rows_are_padded_to_the_longest_in_the_batch() {
    const I: i64 = IGNORE_INDEX;
    let opts = BatchOptions {
        packing: false,
        shuffle: false,
        epochs: Some(1),
        ..BatchOptions::new(2, 8, 9, 0)
    };
    let mut batches = Batches::new(hand_made(&[3, 5, 4, 4]), opts, &Device::Cpu).unwrap();
    let b = batches.next().unwrap().unwrap();
    assert_eq!(
        b.ids.to_vec2::<u32>().unwrap(),
        vec![vec![100, 101, 102, 9, 9], vec![200, 201, 202, 203, 204]]
    );
    assert_eq!(b.labels, vec![100, 101, 102, I, I, 200, 201, 202, 203, 204]);
    assert_eq!(
        b.segments.unwrap().to_vec2::<u32>().unwrap(),
        vec![vec![0, 0, 0, 1, 1], vec![0, 0, 0, 0, 0]]
    );
    assert!(b.positions.is_none());
    let b = batches.next().unwrap().unwrap();
    assert_eq!(b.ids.dims(), &[2, 4]);
    assert!(b.segments.is_none(), "no padding, no segments");
    assert!(batches.next().is_none());
}

fn ids_of(batches: impl Iterator<Item = Result<Batch, DataError>>) -> Vec<Vec<u32>> {
    batches
        .map(|b| {
            b.unwrap()
                .ids
                .flatten_all()
                .unwrap()
                .to_vec1::<u32>()
                .unwrap()
        })
        .collect()
}

fn packed(examples: Vec<Example>, seed: u64) -> Batches {
    let opts = BatchOptions::new(2, 16, 0, seed);
    Batches::new(examples, opts, &Device::Cpu).unwrap()
}

#[test]
fn shuffling_is_deterministic_per_seed_and_differs_by_epoch() {
    let lens: Vec<usize> = (0..40).map(|i| 2 + (i * 7) % 11).collect();
    let run = |seed| ids_of(packed(hand_made(&lens), seed).take(12));
    let a = run(1);
    assert_eq!(a, run(1));
    assert_ne!(a, run(2));
    let b = packed(hand_made(&lens), 1);
    let per_epoch = b.batches_in_epoch(0);
    assert!(per_epoch < 12, "the run crosses an epoch");
    assert_ne!(
        a[..per_epoch.min(3)],
        a[per_epoch..per_epoch + 3.min(per_epoch)]
    );
    // Every token of every example appears exactly once per epoch.
    let mut seen: Vec<u32> = a[..per_epoch]
        .concat()
        .into_iter()
        .filter(|&i| i != 0)
        .collect();
    seen.sort_unstable();
    let mut want: Vec<u32> = hand_made(&lens).into_iter().flat_map(|e| e.ids).collect();
    want.sort_unstable();
    assert_eq!(seen, want);
}

#[test]
fn resuming_from_a_saved_position_continues_exactly() {
    let lens: Vec<usize> = (0..25).map(|i| 2 + (i * 5) % 13).collect();
    let reference = ids_of(packed(hand_made(&lens), 7).take(20));
    for stop in [0, 3, 5, 11] {
        let mut first = packed(hand_made(&lens), 7);
        let before = ids_of(first.by_ref().take(stop));
        let saved = serde_json::to_string(&first.position()).unwrap();
        let pos: BatchPosition = serde_json::from_str(&saved).unwrap();
        let mut resumed = packed(hand_made(&lens), 7);
        resumed.seek(pos).unwrap();
        assert_eq!(resumed.position(), pos);
        let after = ids_of(resumed.take(20 - stop));
        assert_eq!([before, after].concat(), reference, "stopped after {stop}");
    }
    let mut b = packed(hand_made(&lens), 7);
    let rows = b.rows_in_epoch(0);
    b.seek(BatchPosition {
        epoch: 0,
        index: rows,
    })
    .unwrap();
    assert_eq!(b.position(), BatchPosition { epoch: 1, index: 0 });
    let err = b
        .seek(BatchPosition {
            epoch: 0,
            index: rows + 1,
        })
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!("only {rows} rows")),
        "{err}"
    );
}

#[test]
fn validation_split_holds_out_whole_documents() {
    let dir = tempfile::tempdir().unwrap();
    let text: String = (0..30)
        .map(|i| {
            let body = format!("Document {i} says {}", "something long ".repeat(i % 4 * 5));
            format!("{}\n", serde_json::json!({ "text": body }))
        })
        .collect();
    let path = write(dir.path(), "docs.jsonl", &text);
    let c = load(&path, 16).unwrap();
    assert!(c.examples.len() > 30, "long documents are several windows");
    let split = |seed| split_validation(c.examples.clone(), 0.2, seed).unwrap();
    let (train, val) = split(3);
    let docs = |v: &[Example]| {
        v.iter()
            .map(|e| e.doc)
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(docs(&val).len(), 6);
    assert_eq!(docs(&train).len(), 24);
    assert!(docs(&train).is_disjoint(&docs(&val)));
    assert_eq!(train.len() + val.len(), c.examples.len());
    assert_eq!(split(3).1, val, "same seed, same split");
    assert_ne!(docs(&split(4).1), docs(&val), "another seed, another split");
}

fn err_of(name: &str, content: &str, format: DataFormat) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), name, content);
    let opts = DataOptions {
        format,
        ..DataOptions::new(32, VOCAB)
    };
    let e = Corpus::load(&path, Some(&tokenizer()), &opts).unwrap_err();
    let msg = e.to_string();
    let file = path.display().to_string();
    assert!(msg.contains(&file), "{msg}");
    msg.replace(&file, "FILE")
}

#[test]
fn bad_inputs_say_what_and_where() {
    let auto = DataFormat::Auto;
    assert_eq!(
        err_of("empty.jsonl", "\n\n", auto),
        "dataset FILE is empty: it holds no records"
    );
    assert_eq!(
        err_of("empty.txt", "  \n", auto),
        "dataset FILE is empty: it holds no records"
    );
    assert_eq!(
        err_of(
            "fields.jsonl",
            "{\"text\": \"ok\"}\n\n{\"prompt\": \"x\"}\n",
            auto
        ),
        "FILE:3: record has none of the expected fields: `messages` (chat), `instruction` + \
         `output` (alpaca), `input_ids` (tokens), or `text`"
    );
    assert_eq!(
        err_of("forced.jsonl", "{\"text\": \"ok\"}\n", DataFormat::Chat),
        "FILE:1: record has none of the expected fields: `messages` (a list of {role, content})"
    );
    assert_eq!(
        err_of(
            "bad.jsonl",
            "{\"text\": \"ok\"}\n{\"text\": \"unclosed}\n",
            auto
        ),
        "FILE:2:19: invalid JSON: EOF while parsing a string"
    );
    assert_eq!(
        err_of(
            "bad.json",
            "[\n  {\"text\": \"a\"},\n  {\"text\": \"b\",}\n]",
            auto
        ),
        "FILE:3:16: invalid JSON: trailing comma"
    );
    assert_eq!(
        err_of(
            "array.json",
            "[\n  {\"text\": \"a\"},\n\n  {\"input_ids\": [1, 2],\n   \"labels\": [1]}\n]",
            auto
        ),
        "FILE:4: `input_ids` has 2 tokens but `labels` has 1; they must be the same length \
         (use -100 for tokens that are not trained)"
    );
    assert_eq!(
        err_of("vocab.jsonl", "{\"input_ids\": [1, 49152, 3]}\n", auto),
        "FILE:1: token id 49152 is outside the model's vocabulary of 49152 (was the data \
         tokenized for another model?)"
    );
    assert_eq!(
        err_of(
            "neg.jsonl",
            "{\"input_ids\": [1, 2], \"labels\": [-100, -3]}\n",
            auto
        ),
        "FILE:1: token id -3 is outside the model's vocabulary of 49152 (was the data \
         tokenized for another model?)"
    );
    assert_eq!(
        err_of(
            "roles.jsonl",
            "{\"messages\": [{\"role\": \"user\"}]}\n",
            auto
        ),
        "FILE:1: messages[0] needs a string `content` (each message is {\"role\": ..., \
         \"content\": ...})"
    );
    assert_eq!(
        err_of("alpaca.jsonl", "{\"instruction\": \"x\"}\n", auto),
        "FILE:1: the record has no `output`"
    );
    assert_eq!(
        err_of("nothing.jsonl", "{\"messages\": []}\n", auto),
        "dataset FILE is empty: none of its 1 records has a token to train within 32 tokens \
         (1 dropped)"
    );
    assert!(err_of("multi.jsonl", "{\n\"text\": \"a\"\n}\n", auto)
        .contains("JSON Lines needs one record per line"));
    assert!(err_of("t.txt", "hello", DataFormat::Alpaca).contains("read as plain text"));
}

#[test]
fn pre_tokenized_records_are_used_as_given() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "tok.jsonl",
        "{\"input_ids\": [5, 6, 7, 8], \"labels\": [-100, -100, 7, 8]}\n{\"input_ids\": [9, 10]}\n",
    );
    let c = Corpus::load(
        &path,
        None,
        &DataOptions {
            eos_token_id: Some(EOS),
            ..DataOptions::new(32, VOCAB)
        },
    )
    .unwrap();
    assert_eq!(c.examples[0].ids, vec![5, 6, 7, 8]);
    assert_eq!(c.examples[0].labels, vec![-100, -100, 7, 8]);
    assert_eq!(
        c.examples[1].ids,
        vec![9, 10],
        "unlabelled ids train exactly as written, no EOS added"
    );
    assert_eq!(c.examples[1].labels, vec![9, 10]);
    // Without a tokenizer, text cannot be read, and an EOS to append must be named.
    let text = write(dir.path(), "t.jsonl", "{\"text\": \"hi\"}\n");
    let e = Corpus::load(
        &text,
        None,
        &DataOptions {
            eos_token_id: Some(EOS),
            ..DataOptions::new(32, VOCAB)
        },
    )
    .unwrap_err();
    let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(
        chain.contains("t.jsonl:1: cannot tokenize the record: "),
        "{chain}"
    );
    assert!(chain.contains("need a tokenizer"), "{chain}");
    let e = Corpus::load(&path, None, &DataOptions::new(32, VOCAB)).unwrap_err();
    assert!(e.to_string().contains("no EOS id is known"), "{e}");
}

/// Mean loss of `examples` over the predicted tokens, batched by `opts`, on the tiny Llama.
fn mean_loss(
    model: &qlora::model::transformer::Model,
    examples: Vec<Example>,
    opts: BatchOptions,
) -> f64 {
    let (mut sum, mut count) = (0.0, 0usize);
    for batch in Batches::new(examples, opts, &Device::Cpu).unwrap() {
        let batch = batch.unwrap();
        let n = batch.predicted_tokens();
        let loss = qlora::train::step::batch_loss(model, &batch, false).unwrap();
        sum += loss.to_scalar::<f32>().unwrap() as f64 * n as f64;
        count += n;
    }
    sum / count as f64
}

#[test]
fn packed_and_padded_batches_give_the_loss_of_each_example_alone() {
    use qlora::model::loader::{load_model, BaseFormat, LoadOptions};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    let opts = LoadOptions {
        base: BaseFormat::Dense,
        ..Default::default()
    };
    let m = load_model(&dir, &opts).expect("tiny-llama loads");
    let examples: Vec<Example> = [(5usize, 1u32), (7, 40), (3, 90), (9, 200), (4, 300)]
        .iter()
        .enumerate()
        .map(|(doc, &(n, base))| {
            let ids: Vec<u32> = (0..n as u32).map(|k| (base + 37 * k) % 512).collect();
            let mut labels: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
            labels[1] = IGNORE_INDEX; // a prompt token
            Example {
                ids,
                labels,
                doc,
                line: doc + 1,
                target: None,
            }
        })
        .collect();
    let alone = |e: &Example| {
        let opts = BatchOptions {
            packing: false,
            shuffle: false,
            epochs: Some(1),
            ..BatchOptions::new(1, 16, 0, 0)
        };
        let n = e.trained_tokens() as f64;
        (mean_loss(&m.model, vec![e.clone()], opts) * n, n)
    };
    let (sum, n) = examples
        .iter()
        .map(alone)
        .fold((0.0, 0.0), |(s, c), (a, b)| (s + a, c + b));
    let want = sum / n;
    let packed = BatchOptions {
        epochs: Some(1),
        ..BatchOptions::new(2, 16, 0, 5)
    };
    let padded = BatchOptions {
        packing: false,
        ..packed.clone()
    };
    let got_packed = mean_loss(&m.model, examples.clone(), packed);
    let got_padded = mean_loss(&m.model, examples, padded);
    assert!(
        (got_packed - want).abs() < 1e-5 * want,
        "packed {got_packed} vs {want}"
    );
    assert!(
        (got_padded - want).abs() < 1e-5 * want,
        "padded {got_padded} vs {want}"
    );
}

#[test]
fn eval_reader_gives_one_unmasked_sequence_per_record() {
    use qlora::data::dataset::read_token_sequences;
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "eval.json",
        "[{\"text\": \"Hello there.\"},\n {\"input_ids\": [4, 5, 6]},\n \
         {\"input_ids\": [4, 5, 6], \"labels\": [-100, -100, 6]}]",
    );
    let seqs = read_token_sequences(&path, Some(&tok)).unwrap();
    let ids: Vec<Vec<u32>> = seqs.iter().map(|s| s.ids.clone()).collect();
    assert_eq!(
        ids,
        vec![
            tok.encode("Hello there.", true).unwrap(),
            vec![4, 5, 6],
            vec![4, 5, 6]
        ]
    );
    // Labels are kept for the eval to score as train does (-100 not scored).
    assert_eq!(seqs[1].labels, None);
    assert_eq!(seqs[2].labels, Some(vec![-100, -100, 6]));
    let bad = write(
        dir.path(),
        "bad.jsonl",
        "{\"text\": \"a\"}\n{\"txt\": \"b\"}\n",
    );
    let err = read_token_sequences(&bad, Some(&tok))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.jsonl:2: record has none of the expected fields"),
        "{err}"
    );
}
