//! A `tokenizers::Tokenizer` rebuilt from GGUF metadata, for byte-level BPE (`gpt2`) models.
//!
//! It mirrors what Hugging Face's `tokenizer.json` holds for the same model: a BPE over the
//! GGUF's tokens and merges, the pre-tokenizer that `tokenizer.ggml.pre` names, a byte-level
//! decoder, and control tokens as special added tokens. So the ids match the HF tokenizer's.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::sequence::Sequence as ProcessorSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, PostProcessorWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use super::gguf::{GgufError, Metadata};

/// The tokenizer of a GGUF model, with the ids and template a chat loop needs.
pub struct GgufTokenizer {
    /// Ready to encode/decode; adds BOS/EOS only if the GGUF asks for it.
    pub tokenizer: Tokenizer,
    /// `tokenizer.chat_template` (Jinja), if the file has one.
    pub chat_template: Option<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_token_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad_token_id: Option<u32>,
}

/// llama.cpp token types (`llama_token_type`) that HF treats as special added tokens.
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
/// User-defined tokens are matched whole, like HF's non-special added tokens.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Build the tokenizer described by a GGUF file's `tokenizer.*` metadata.
pub fn tokenizer_from_gguf(content: &Content) -> Result<GgufTokenizer, GgufError> {
    let md = Metadata::new(&content.metadata);
    let model = md.str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(GgufError::Tokenizer(format!(
            "tokenizer.ggml.model `{model}` is not supported; only byte-level BPE (`gpt2`) is"
        )));
    }
    let tokens = md.strings("tokenizer.ggml.tokens")?;
    let merges = md
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(split_merge)
        .collect::<Result<Merges, _>>()?;
    let token_id = |key: &str| -> Result<Option<u32>, GgufError> {
        let Some(id) = md.opt_usize(key)? else {
            return Ok(None);
        };
        match u32::try_from(id) {
            Ok(id) if (id as usize) < tokens.len() => Ok(Some(id)),
            _ => Err(GgufError::Tokenizer(format!(
                "{key} = {id} is outside the vocabulary of {} tokens",
                tokens.len()
            ))),
        }
    };
    let bos = token_id("tokenizer.ggml.bos_token_id")?;
    let eos = token_id("tokenizer.ggml.eos_token_id")?;
    let unk = token_id("tokenizer.ggml.unknown_token_id")?;
    let pad = token_id("tokenizer.ggml.padding_token_id")?;

    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.to_string(), id as u32))
        .collect();
    let pre = md.opt_str("tokenizer.ggml.pre")?;
    let family = PreTokenizerFamily::of(pre)?;
    let mut bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(family.ignore_merges());
    if let Some(unk) = unk {
        bpe = bpe.unk_token(tokens[unk as usize].to_string());
    }
    let bpe = bpe
        .build()
        .map_err(|e| GgufError::Tokenizer(format!("building the BPE model: {e}")))?;

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(family.pre_tokenizer()?));
    if family == PreTokenizerFamily::Qwen2 {
        tokenizer.with_normalizer(Some(NFC));
    }
    tokenizer.with_decoder(Some(ByteLevelDecoder::new(true, true, true)));
    // Absent key: llama.cpp adds BOS for Llama 3 (as its tokenizer.json does), not otherwise.
    let add_bos = md
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(family == PreTokenizerFamily::Llama3);
    let add_eos = md
        .opt_bool("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);
    let bos = bos.map(|id| (tokens[id as usize], id));
    let eos = eos.map(|id| (tokens[id as usize], id));
    tokenizer.with_post_processor(Some(post_processor(
        bos.filter(|_| add_bos),
        eos.filter(|_| add_eos),
    )?));

    let (special, user_defined) =
        added_tokens(&md, &tokens, [bos.map(|b| b.1), eos.map(|e| e.1), unk, pad])?;
    tokenizer.add_special_tokens(&special);
    tokenizer.add_tokens(&user_defined);

    Ok(GgufTokenizer {
        tokenizer,
        chat_template: md.opt_str("tokenizer.chat_template")?.map(str::to_string),
        bos_token_id: bos.map(|b| b.1),
        eos_token_id: eos.map(|e| e.1),
        pad_token_id: pad,
    })
}

/// A merge rule `"left right"`; split at the first space after the first byte, as llama.cpp does.
fn split_merge(merge: &str) -> Result<(String, String), GgufError> {
    merge
        .char_indices()
        .find(|&(i, c)| i > 0 && c == ' ')
        .map(|(i, _)| (merge[..i].to_string(), merge[i + 1..].to_string()))
        .ok_or_else(|| GgufError::Tokenizer(format!("merge rule `{merge}` has no space")))
}

/// The GPT-4-style split of Llama 3's `tokenizer.json` (numbers in runs of up to three digits).
pub const LLAMA3_SPLIT: &str =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| \
     ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/// Qwen2's split: Llama 3's, but every digit on its own.
pub const QWEN2_SPLIT: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| \
     ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/// The byte-level BPE families this reader knows by their `tokenizer.ggml.pre` name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PreTokenizerFamily {
    /// `gpt-2` (also the default when the key is absent): GPT-2's byte-level regex.
    Gpt2,
    /// `smollm`: every digit alone, then GPT-2's.
    Smollm,
    /// `llama-bpe` (Llama 3): [`LLAMA3_SPLIT`], whole-word vocabulary hits skip the merges.
    Llama3,
    /// `qwen2`: NFC, then [`QWEN2_SPLIT`].
    Qwen2,
}

impl PreTokenizerFamily {
    fn of(pre: Option<&str>) -> Result<Self, GgufError> {
        match pre.unwrap_or("gpt-2") {
            "gpt-2" => Ok(Self::Gpt2),
            "smollm" => Ok(Self::Smollm),
            "llama-bpe" | "llama3" | "llama-v3" => Ok(Self::Llama3),
            "qwen2" => Ok(Self::Qwen2),
            other => Err(GgufError::Tokenizer(format!(
                "tokenizer.ggml.pre `{other}` is not supported (supported: gpt-2, smollm, \
                 llama-bpe, qwen2)"
            ))),
        }
    }

    /// As in the family's `tokenizer.json` (llama.cpp sets the same for `llama-bpe`).
    fn ignore_merges(self) -> bool {
        self == Self::Llama3
    }

    /// The pre-tokenizer of the family's HF `tokenizer.json`.
    fn pre_tokenizer(self) -> Result<PreTokenizerWrapper, GgufError> {
        // add_prefix_space = false, trim_offsets = true, use_regex = true (the GPT-2 regex).
        let byte_level = ByteLevel::new(false, true, true);
        let split = |pattern: &str| -> Result<PreTokenizerWrapper, GgufError> {
            let split = Split::new(
                SplitPattern::Regex(pattern.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| GgufError::Tokenizer(format!("split pattern: {e}")))?;
            // The split did GPT-2's job, so the byte-level step only maps bytes.
            let bytes = ByteLevel::new(false, true, false);
            Ok(Sequence::new(vec![split.into(), bytes.into()]).into())
        };
        match self {
            Self::Gpt2 => Ok(byte_level.into()),
            Self::Smollm => {
                Ok(Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into())
            }
            Self::Llama3 => split(LLAMA3_SPLIT),
            Self::Qwen2 => split(QWEN2_SPLIT),
        }
    }
}

/// Byte-level offsets fix-up, plus BOS/EOS around each sequence when the GGUF asks for them.
fn post_processor(
    bos: Option<(&str, u32)>,
    eos: Option<(&str, u32)>,
) -> Result<PostProcessorWrapper, GgufError> {
    let byte_level = ByteLevel::new(true, false, true);
    if bos.is_none() && eos.is_none() {
        return Ok(byte_level.into());
    }
    let sequence = |seq: &str, type_id: u32| -> String {
        let mut pieces = Vec::new();
        pieces.extend(bos.map(|(t, _)| format!("{t}:{type_id}")));
        pieces.push(format!("${seq}:{type_id}"));
        pieces.extend(eos.map(|(t, _)| format!("{t}:{type_id}")));
        pieces.join(" ")
    };
    let specials: Vec<(String, u32)> = bos
        .into_iter()
        .chain(eos)
        .map(|(t, id)| (t.to_string(), id))
        .collect();
    let template = TemplateProcessing::builder()
        .try_single(sequence("A", 0))
        .and_then(|b| b.try_pair(format!("{} {}", sequence("A", 0), sequence("B", 1))))
        .map_err(|e| GgufError::Tokenizer(format!("BOS/EOS template: {e}")))?
        .special_tokens(specials)
        .build()
        .map_err(|e| GgufError::Tokenizer(format!("BOS/EOS template: {e}")))?;
    Ok(ProcessorSequence::new(vec![byte_level.into(), template.into()]).into())
}

/// Special tokens (control/unknown types, and the bos/eos/unk/pad ids) and user-defined ones,
/// in id order.
fn added_tokens(
    md: &Metadata<'_>,
    tokens: &[&str],
    special_ids: [Option<u32>; 4],
) -> Result<(Vec<AddedToken>, Vec<AddedToken>), GgufError> {
    let types = md.opt_array("tokenizer.ggml.token_type")?.unwrap_or(&[]);
    if !types.is_empty() && types.len() != tokens.len() {
        return Err(GgufError::Tokenizer(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    let mut special = Vec::new();
    let mut user_defined = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        let token_type = types.get(id).map(token_type).transpose()?;
        let is_special = matches!(token_type, Some(TOKEN_TYPE_UNKNOWN | TOKEN_TYPE_CONTROL))
            || special_ids.contains(&Some(id as u32));
        let added = AddedToken::from(token.to_string(), is_special).normalized(false);
        if is_special {
            special.push(added);
        } else if token_type == Some(TOKEN_TYPE_USER_DEFINED) {
            user_defined.push(added);
        }
    }
    Ok((special, user_defined))
}

fn token_type(value: &Value) -> Result<i64, GgufError> {
    match *value {
        Value::I32(t) => Ok(i64::from(t)),
        Value::U32(t) => Ok(i64::from(t)),
        Value::I8(t) => Ok(i64::from(t)),
        Value::U8(t) => Ok(i64::from(t)),
        ref other => Err(GgufError::Tokenizer(format!(
            "tokenizer.ggml.token_type holds {other:?}, expected integers"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_split_at_the_first_inner_space() {
        let (a, b) = split_merge("Ġ t").expect("split");
        assert_eq!((a.as_str(), b.as_str()), ("Ġ", "t"));
        assert!(split_merge("nospace").is_err());
        // A leading space belongs to the left token, as in llama.cpp's `find(' ', 1)`.
        let (a, b) = split_merge("  x").expect("split");
        assert_eq!((a.as_str(), b.as_str()), (" ", "x"));
    }

    /// The pieces `family` splits `text` into (before byte-level mapping).
    fn pieces(family: PreTokenizerFamily, text: &str) -> Vec<String> {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let mut s = PreTokenizedString::from(text);
        family
            .pre_tokenizer()
            .unwrap()
            .pre_tokenize(&mut s)
            .unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Char)
            .into_iter()
            .map(|(piece, _, _)| piece.to_string())
            .collect()
    }

    #[test]
    fn llama3_groups_digits_by_three_and_qwen2_splits_each() {
        // Byte-level maps the space to `Ġ`.
        assert_eq!(
            pieces(PreTokenizerFamily::Llama3, "x 12345"),
            ["x", "Ġ", "123", "45"]
        );
        assert_eq!(
            pieces(PreTokenizerFamily::Qwen2, "x 12345"),
            ["x", "Ġ", "1", "2", "3", "4", "5"]
        );
        assert_eq!(
            pieces(PreTokenizerFamily::Llama3, "I'LL go"),
            ["I", "'LL", "Ġgo"]
        );
    }

    #[test]
    fn unknown_pre_tokenizer_is_named() {
        let err = PreTokenizerFamily::of(Some("falcon")).expect_err("unsupported");
        assert!(err.to_string().contains("falcon"), "{err}");
    }
}
