//! Chat conversations as training examples: rendered with the model's chat template, with the
//! loss on the assistant turns only.
//!
//! Where each assistant turn lies is found by rendering prefixes of the conversation: the text
//! of `messages[..i]` with the generation prompt ends where assistant turn `i` starts, and the
//! text of `messages[..=i]` ends where it ends. Both must be prefixes of the whole rendering
//! (true of ChatML, Llama 3, Mistral, Gemma, Qwen 2.5 ...; not of templates that rewrite earlier
//! turns, e.g. ones dropping past reasoning, which are refused). Tokens are then mapped to turns
//! by their byte offsets in the tokenization of the whole conversation, so the ids are exactly
//! those of the full rendering, never a concatenation of separately tokenized pieces.

use super::error::DataError;
use super::tokenizer::{Message, TextTokenizer};

/// A tokenized conversation and which of its tokens are trained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizedConversation {
    /// Token ids of the rendered conversation.
    pub ids: Vec<u32>,
    /// Whether each token is trained (assistant content and its end-of-turn tokens).
    pub trained: Vec<bool>,
    /// Whether the last assistant turn already ends with an end-of-sequence id.
    pub ends_with_eos: bool,
}

/// The role whose turns are trained.
pub const ASSISTANT: &str = "assistant";

/// Render `messages` with `tokenizer`'s chat template and mark the assistant turns as trained.
///
/// Messages after the last assistant turn train nothing and are left out. Within a turn, tokens
/// after its last end-of-sequence id (e.g. the newline ChatML writes after `<|im_end|>`) belong
/// to the template's framing and are not trained.
pub fn tokenize_conversation(
    tokenizer: &TextTokenizer,
    messages: &[Message],
) -> Result<TokenizedConversation, DataError> {
    let Some(last) = messages.iter().rposition(|m| m.role == ASSISTANT) else {
        let text = tokenizer.apply_chat_template(messages, false)?;
        let ids = tokenizer.encode(&text, false)?;
        let trained = vec![false; ids.len()];
        return Ok(TokenizedConversation {
            ids,
            trained,
            ends_with_eos: false,
        });
    };
    let messages = &messages[..=last];
    let full = tokenizer.apply_chat_template(messages, false)?;
    let (ids, offsets) = tokenizer.encode_with_offsets(&full, false)?;
    let eos = tokenizer.eos_token_ids();
    let mut trained = vec![false; ids.len()];
    let mut ends_with_eos = false;
    for (i, m) in messages.iter().enumerate() {
        if m.role != ASSISTANT {
            continue;
        }
        let start = prefix_len(tokenizer, &full, &messages[..i], true, i)?;
        let end = prefix_len(tokenizer, &full, &messages[..=i], false, i)?;
        let span: Vec<usize> = (0..ids.len())
            .filter(|&t| overlaps(offsets[t], start, end))
            .collect();
        let last_eos = span.iter().rposition(|&t| eos.contains(&ids[t]));
        let kept = last_eos.map_or(span.len(), |p| p + 1);
        for &t in &span[..kept] {
            trained[t] = true;
        }
        ends_with_eos = last_eos.is_some();
    }
    Ok(TokenizedConversation {
        ids,
        trained,
        ends_with_eos,
    })
}

/// Byte length of the rendering of `prefix`, checked to be a prefix of the whole rendering.
fn prefix_len(
    tokenizer: &TextTokenizer,
    full: &str,
    prefix: &[Message],
    add_generation_prompt: bool,
    turn: usize,
) -> Result<usize, DataError> {
    let text = if prefix.is_empty() && !add_generation_prompt {
        String::new()
    } else {
        tokenizer.apply_chat_template(prefix, add_generation_prompt)?
    };
    if !full.starts_with(&text) {
        return Err(DataError::invalid(
            "chat template",
            format!(
                "cannot locate assistant turn {turn} (messages[{turn}]): the template renders \
                 the conversation up to it differently from the start of the whole \
                 conversation, so the trained span is ambiguous (templates that rewrite earlier \
                 turns are not supported; pre-tokenize with `input_ids` + `labels` instead)"
            ),
        ));
    }
    Ok(text.len())
}

/// Whether a token at byte `offsets` belongs to `[start, end)`: it overlaps it, or it is an
/// empty-width token placed inside it.
fn overlaps((s, e): (usize, usize), start: usize, end: usize) -> bool {
    if s == e {
        s >= start && s < end
    } else {
        s < end && e > start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_rule_covers_straddling_and_empty_tokens() {
        assert!(overlaps((3, 6), 5, 10));
        assert!(overlaps((9, 12), 5, 10));
        assert!(!overlaps((0, 5), 5, 10));
        assert!(!overlaps((10, 11), 5, 10));
        assert!(overlaps((5, 5), 5, 10));
        assert!(!overlaps((0, 0), 5, 10));
    }
}
