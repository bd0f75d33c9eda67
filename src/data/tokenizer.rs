//! Text in and out: a `tokenizers` tokenizer plus the model's chat template (rendered with
//! minijinja, with Python string methods as HF templates use them).

use std::path::Path;

use serde::Serialize;
use serde_json::Value;
use tokenizers::Tokenizer;

use super::error::DataError;

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
        let inner = std::panic::catch_unwind(|| text.parse::<Tokenizer>())
            .map_err(|_| bad("the tokenizers library could not read this file".into()))?
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
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, DataError> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| DataError::invalid("tokenizer", e.to_string()))?;
        Ok(enc.get_ids().to_vec())
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
