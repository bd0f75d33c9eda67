//! Text in and out: a `tokenizers` tokenizer plus the model's chat template (rendered with
//! minijinja, with Python string methods as HF templates use them).

use std::path::Path;

use serde::Serialize;
use serde_json::Value;
use tokenizers::Tokenizer;

use super::error::DataError;

/// Token ids and the byte range of each in the text (`(0, 0)` for added special tokens).
pub type IdsAndOffsets = (Vec<u32>, Vec<(usize, usize)>);

/// The special ids a post-processor puts before and after a sequence.
type SpecialFrame = (Vec<u32>, Vec<u32>);

/// Texts longer than this many bytes are tokenized in pieces of about this size.
pub const PIECE_BYTES: usize = 64 * 1024;

/// The first byte index at or after `from` where a piece may end: a space with a non-space
/// character on each side; the end of the text if there is none.
fn next_cut(text: &str, from: usize) -> usize {
    let bytes = text.as_bytes();
    let mut i = from.max(1);
    while i + 1 < bytes.len() {
        if bytes[i] == b' ' {
            let before = text[..i].chars().next_back();
            let after = text[i + 1..].chars().next();
            if before.is_some_and(|c| !c.is_whitespace())
                && after.is_some_and(|c| !c.is_whitespace())
            {
                return i;
            }
        }
        i += 1;
    }
    text.len()
}

/// One chat turn.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A tokenizer with the special ids and chat template of its model.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    chat_template: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .finish()
    }
}

impl TextTokenizer {
    /// Wrap a tokenizer.
    pub fn new(
        inner: Tokenizer,
        chat_template: Option<String>,
        bos_token_id: Option<u32>,
        eos_token_ids: Vec<u32>,
    ) -> Self {
        // A tokenizer.json may carry padding and truncation settings (sentence-transformers'
        // pad every text to 128 tokens); transformers resets both on each call unless asked,
        // and so do we: batches are padded, and sequences cut, by the data pipeline.
        let mut inner = inner;
        inner.with_padding(None);
        let _ = inner.with_truncation(None);
        Self {
            inner,
            chat_template,
            bos_token_id,
            eos_token_ids,
        }
    }

    /// `tokenizer.json` + `tokenizer_config.json` of an HF folder; `None` if there is no
    /// `tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>, DataError> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Ok(None);
        }
        let bad = |what: String| DataError::invalid(tok_path.display().to_string(), what);
        let text = std::fs::read_to_string(&tok_path).map_err(|e| bad(e.to_string()))?;
        // The tokenizers crate panics on some malformed files (its decoder section is parsed
        // with an unwrap): the JSON is checked here first, and a panic left is an error too.
        serde_json::from_str::<Value>(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let inner = crate::contained::contained(|| text.parse::<Tokenizer>())
            .map_err(|why| bad(format!("the tokenizers library could not read it: {why}")))?
            .map_err(|e| bad(e.to_string()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|source| DataError::JsonFile {
                path: cfg_path.clone(),
                source,
            })?,
            Err(_) => Value::Null,
        };
        let token_id = |key: &str| -> Option<u32> {
            let v = cfg.get(key)?;
            let s = v
                .as_str()
                .or_else(|| v.get("content").and_then(Value::as_str))?;
            inner.token_to_id(s)
        };
        let mut chat_template = cfg
            .get("chat_template")
            .and_then(Value::as_str)
            .map(str::to_string);
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.is_file() {
            chat_template =
                Some(std::fs::read_to_string(&jinja).map_err(|e| DataError::io(&jinja, e))?);
        }
        let bos = token_id("bos_token");
        let eos: Vec<u32> = token_id("eos_token").into_iter().collect();
        Ok(Some(Self::new(inner, chat_template, bos, eos)))
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Beginning-of-sequence id.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// End-of-sequence ids (the first is the one appended to training examples).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Use these end-of-sequence ids (e.g. from the model config).
    pub fn set_eos_token_ids(&mut self, ids: Vec<u32>) {
        self.eos_token_ids = ids;
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Token ids of `text`; `add_special` applies the tokenizer's post-processor (e.g. BOS).
    ///
    /// Long texts are tokenized in pieces (see [`TextTokenizer::encode_with_offsets`]), so the
    /// memory this takes is bounded by the piece size, not by the length of the text.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, DataError> {
        Ok(self.encode_with_offsets(text, add_special)?.0)
    }

    /// Token ids of `text` and each token's byte range in it (`(0, 0)` for the special tokens
    /// the post-processor adds).
    ///
    /// A text longer than [`PIECE_BYTES`] is cut into pieces of about that size, each just
    /// before a space that follows a non-space character and precedes one, and every piece is
    /// tokenized with the word before it as context, whose tokens are then dropped. Every
    /// tokenizer family in use (byte-level BPE, SentencePiece BPE, WordPiece, Unigram) ends a
    /// token at such a space, and the cut is checked on the tokens themselves: if one crosses
    /// it, the text is tokenized whole instead. The result equals tokenizing the text whole
    /// (`tests` compare both on every tokenizer the repository ships).
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special: bool,
    ) -> Result<IdsAndOffsets, DataError> {
        if text.len() > PIECE_BYTES {
            if let Some(done) = self.encode_in_pieces(text, add_special)? {
                return Ok(done);
            }
        }
        let enc = self.encode_whole(text, add_special)?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    fn encode_whole(
        &self,
        text: &str,
        add_special: bool,
    ) -> Result<tokenizers::Encoding, DataError> {
        self.inner
            .encode(text, add_special)
            .map_err(|e| DataError::invalid("tokenizer", e.to_string()))
    }

    /// The special ids the post-processor puts before and after a single sequence, found by
    /// encoding a one-letter probe with and without them; `None` if they do not frame it.
    fn special_frame(&self) -> Result<Option<SpecialFrame>, DataError> {
        let with = self.encode_whole("a", true)?;
        let without = self.encode_whole("a", false)?;
        let (with, without) = (with.get_ids(), without.get_ids());
        if without.is_empty() || without.len() > with.len() {
            return Ok(None);
        }
        Ok((0..=with.len() - without.len())
            .find(|&at| &with[at..at + without.len()] == without)
            .map(|at| (with[..at].to_vec(), with[at + without.len()..].to_vec())))
    }

    /// [`TextTokenizer::encode_with_offsets`] piece by piece, whatever the length of `text`;
    /// `None` when the text has to be tokenized whole (no frame for the special tokens, or a
    /// token crossing a cut).
    pub fn encode_in_pieces(
        &self,
        text: &str,
        add_special: bool,
    ) -> Result<Option<IdsAndOffsets>, DataError> {
        let (prefix, suffix) = if add_special {
            match self.special_frame()? {
                Some(frame) => frame,
                None => return Ok(None),
            }
        } else {
            (Vec::new(), Vec::new())
        };
        let mut ids = prefix;
        let mut offsets = vec![(0, 0); ids.len()];
        // `start..end` is the piece's own text, `context..start` the word before it.
        let (mut context, mut start) = (0, 0);
        while start < text.len() {
            let end = next_cut(text, start + PIECE_BYTES);
            let enc = self.encode_whole(&text[context..end], false)?;
            let own = start - context;
            for (&id, &(a, b)) in enc.get_ids().iter().zip(enc.get_offsets()) {
                if a < own && b > own {
                    return Ok(None);
                }
                if a >= own {
                    ids.push(id);
                    offsets.push((a + context, b + context));
                }
            }
            context = text[..end]
                .char_indices()
                .rev()
                .find(|(_, c)| c.is_whitespace())
                .map_or(start, |(w, c)| w + c.len_utf8())
                .max(start);
            start = end;
        }
        offsets.extend(std::iter::repeat_n((0, 0), suffix.len()));
        ids.extend(suffix);
        Ok(Some((ids, offsets)))
    }

    /// Text of `ids` (special tokens skipped when `skip_special`).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, DataError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| DataError::invalid("tokenizer", e.to_string()))
    }

    /// Render `messages` with the chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, DataError> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            DataError::invalid(
                "chat template",
                "this model's tokenizer has no chat template (tokenizer_config.json `chat_template`)",
            )
        })?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| DataError::invalid("chat template", e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| DataError::invalid("chat template", e.to_string()))?;
        let token = |id: Option<u32>| {
            id.and_then(|i| self.inner.id_to_token(i))
                .unwrap_or_default()
        };
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => token(self.bos_token_id),
            eos_token => token(self.eos_token_ids.first().copied()),
        })
        .map_err(|e| DataError::invalid("chat template", e.to_string()))
    }
}
