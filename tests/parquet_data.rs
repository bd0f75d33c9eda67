//! Parquet datasets (Hugging Face `datasets`' format) load to the same examples as the same
//! records in JSON Lines, for every record format: `tests/fixtures/parquet/`, written by pyarrow
//! (`scripts/make_parquet_fixtures.py`), two row groups each.

use std::path::PathBuf;

use qlora::data::corpus::{Corpus, DataOptions};
use qlora::data::labelled::{load_labelled, LabelSpace};
use qlora::data::tokenizer::TextTokenizer;

const VOCAB: usize = 49152;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tokenizer() -> TextTokenizer {
    TextTokenizer::from_dir(&dir().join("smollm2-135m"))
        .expect("fixture tokenizer loads")
        .expect("fixture has tokenizer.json")
}

#[test]
fn parquet_records_load_as_their_json_lines_do() {
    let tok = tokenizer();
    for name in ["text", "alpaca", "messages", "input_ids"] {
        let load = |ext: &str| {
            let path = dir().join(format!("parquet/{name}.{ext}"));
            Corpus::load(&path, Some(&tok), &DataOptions::new(64, VOCAB))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        };
        let (p, j) = (load("parquet"), load("jsonl"));
        assert_eq!(p.report.records, j.report.records, "{name}");
        assert_eq!(p.examples.len(), j.examples.len(), "{name}");
        for (a, b) in p.examples.iter().zip(&j.examples) {
            assert_eq!(
                (&a.ids, &a.labels, a.line),
                (&b.ids, &b.labels, b.line),
                "{name}"
            );
        }
    }
    let labels = LabelSpace {
        names: vec!["comedy".into(), "tragedy".into()],
        regression: false,
    };
    for name in ["labelled", "labelled_names"] {
        let load = |ext: &str| {
            let path = dir().join(format!("parquet/{name}.{ext}"));
            load_labelled(&path, Some(&tok), &labels, 64, VOCAB, true)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        };
        let (p, j) = (load("parquet"), load("jsonl"));
        assert_eq!(p.examples.len(), j.examples.len(), "{name}");
        for (a, b) in p.examples.iter().zip(&j.examples) {
            assert_eq!((&a.ids, a.target), (&b.ids, b.target), "{name}");
        }
    }
}

#[test]
fn a_file_that_is_not_parquet_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("broken.parquet");
    std::fs::write(&path, b"PAR1 not really").unwrap();
    let e = Corpus::load(&path, Some(&tokenizer()), &DataOptions::new(64, VOCAB))
        .expect_err("not parquet")
        .to_string();
    assert!(e.contains("broken.parquet") && e.contains("parquet"), "{e}");
}

/// A folder of shards reads as its files in name order; `DIR/{split}` reads the files of that
/// split by the hub's naming; a folder holding several splits must be narrowed to one; an error
/// in a shard names the shard.
#[test]
fn shard_folders_and_splits_read_as_their_files_in_order() {
    let tok = tokenizer();
    let opts = DataOptions::new(64, VOCAB);
    let one = Corpus::load(&dir().join("parquet/text.parquet"), Some(&tok), &opts).unwrap();
    let other = Corpus::load(&dir().join("parquet/alpaca.parquet"), Some(&tok), &opts).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    std::fs::create_dir_all(&shards).unwrap();
    std::fs::copy(
        dir().join("parquet/text.parquet"),
        shards.join("part-0.parquet"),
    )
    .unwrap();
    std::fs::copy(
        dir().join("parquet/alpaca.parquet"),
        shards.join("part-1.parquet"),
    )
    .unwrap();
    let both = Corpus::load(&shards, Some(&tok), &opts).unwrap();
    assert_eq!(
        both.report.records,
        one.report.records + other.report.records
    );
    let ids = |c: &Corpus| c.examples.iter().map(|e| e.ids.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&both), [ids(&one), ids(&other)].concat());

    // A dataset repository's layout: data/{split}-NNNNN-of-NNNNN.parquet.
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(repo.join("data")).unwrap();
    let shard = |from: &str, to: &str| {
        std::fs::copy(dir().join("parquet").join(from), repo.join("data").join(to)).unwrap();
    };
    shard("text.parquet", "train-00000-of-00002.parquet");
    shard("alpaca.parquet", "train-00001-of-00002.parquet");
    shard("text.parquet", "test-00000-of-00001.parquet");
    let train = Corpus::load(&repo.join("train"), Some(&tok), &opts).unwrap();
    assert_eq!(ids(&train), ids(&both));
    let test = Corpus::load(&repo.join("test"), Some(&tok), &opts).unwrap();
    assert_eq!(ids(&test), ids(&one));
    let e = Corpus::load(&repo, Some(&tok), &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("splits test, train"), "{e}");

    std::fs::write(shards.join("part-2.parquet"), b"PAR1 not really").unwrap();
    let e = Corpus::load(&shards, Some(&tok), &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("part-2.parquet"), "{e}");
}
