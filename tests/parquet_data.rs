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
