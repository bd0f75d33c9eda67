//! The GGUF tokenizer reader on Llama 3 (`llama-bpe`) and Qwen2 vocabularies against the token
//! ids transformers' tokenizers give, using llama.cpp's own tokenizer test files
//! (`models/ggml-vocab-{llama-bpe,qwen2}.gguf` with `.inp`/`.out`, written by its
//! `convert_hf_to_gguf_update.py` from `AutoTokenizer.encode(text, add_special_tokens=False)`).
//!
//! The files come from the `llama-cpp-python` sdist on PyPI through `qlora::model::fetch` into
//! the cache (outside git). Without python3 or PyPI these tests fail with the reason.

use std::path::{Path, PathBuf};

use qlora::model::fetch;
use qlora::model::gguf::GgufFile;

fn vocab_dir() -> PathBuf {
    fetch::llama_cpp_vocabs().unwrap_or_else(|e| {
        panic!("cannot get llama.cpp's test vocabularies (needs python3 and PyPI): {e}")
    })
}

/// `(text, ids)` pairs of `ggml-vocab-{name}.gguf.inp/.out`, parsed as llama.cpp's
/// `test-tokenizer-0` does.
fn cases(dir: &Path, name: &str) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
    let texts: Vec<&str> = inp
        .strip_suffix("\n__ggml_vocab_test__\n")
        .expect("inp ends with the separator")
        .split("\n__ggml_vocab_test__\n")
        .collect();
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(texts.len(), ids.len(), "{name}: .inp and .out disagree");
    texts.into_iter().map(str::to_string).zip(ids).collect()
}

fn check(name: &str, pre: &str) {
    let dir = vocab_dir();
    let gguf = GgufFile::open(dir.join(format!("ggml-vocab-{name}.gguf"))).unwrap();
    assert_eq!(
        gguf.content().metadata["tokenizer.ggml.pre"]
            .to_string()
            .unwrap(),
        pre
    );
    let tok = gguf.tokenizer().unwrap_or_else(|e| panic!("{name}: {e}"));
    let cases = cases(&dir, name);
    assert!(cases.len() > 30, "{name}: only {} cases", cases.len());
    let mut failures = Vec::new();
    for (text, expected) in &cases {
        let got = tok.tokenizer.encode(text.as_str(), false).unwrap();
        if got.get_ids() != expected.as_slice() {
            failures.push(format!(
                "{text:?}\n    expected {expected:?}\n    got      {:?}",
                got.get_ids()
            ));
            continue;
        }
        // Decoding gives the text back (these vocabularies are byte-level, so losslessly).
        let back = tok.tokenizer.decode(expected, false).unwrap();
        if &back != text {
            failures.push(format!("{text:?} decodes to {back:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{name}: {} of {} cases differ from transformers:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn llama3_vocabulary_encodes_like_transformers() {
    check("llama-bpe", "llama-bpe");
    // The file has no add_bos_token key; like llama.cpp (and Llama 3's tokenizer.json), BOS
    // <|begin_of_text|> is added when special tokens are asked for.
    let gguf = GgufFile::open(vocab_dir().join("ggml-vocab-llama-bpe.gguf")).unwrap();
    let tok = gguf.tokenizer().unwrap();
    let ids = tok.tokenizer.encode("Hello world", true).unwrap();
    assert_eq!(ids.get_ids(), &[128000, 9906, 1917]);
}

#[test]
fn qwen2_vocabulary_encodes_like_transformers() {
    check("qwen2", "qwen2");
    // Qwen2's tokenizer.json normalizes to NFC (Llama 3's does not): a decomposed "é" encodes
    // as the composed one. llama.cpp's test strings have no such case.
    let ids = |name: &str, text: &str| {
        let gguf = GgufFile::open(vocab_dir().join(format!("ggml-vocab-{name}.gguf"))).unwrap();
        let tok = gguf.tokenizer().unwrap().tokenizer;
        tok.encode(text, false).unwrap().get_ids().to_vec()
    };
    assert_eq!(ids("qwen2", "caf\u{65}\u{301}"), ids("qwen2", "caf\u{e9}"));
    assert_ne!(
        ids("llama-bpe", "caf\u{65}\u{301}"),
        ids("llama-bpe", "caf\u{e9}")
    );
}
