//! `DataFormat`: which kind of record a dataset holds, detected per record from its fields or
//! forced for the whole file.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The kind of records in a dataset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// Detect per record from its fields (the first match of `messages`, `instruction`/`output`,
    /// `input_ids`, `text`); a `.txt` file is one plain-text stream.
    #[default]
    Auto,
    /// `text`: every token trained (a `.txt` file is one such text).
    Text,
    /// `instruction`, optional `input`, `output`: the Alpaca prompt, loss on the output only.
    Alpaca,
    /// `messages` (list of `{role, content}`) rendered with the model's chat template, loss on
    /// the assistant turns only.
    Chat,
    /// `input_ids` with optional `labels` (same length, -100 = not trained): used as given.
    Tokens,
}

impl DataFormat {
    /// Every concrete format, in detection order.
    pub const ALL: [DataFormat; 4] = [
        DataFormat::Chat,
        DataFormat::Alpaca,
        DataFormat::Tokens,
        DataFormat::Text,
    ];

    /// The format a record's fields indicate, if any.
    pub fn detect(record: &Map<String, Value>) -> Option<DataFormat> {
        Self::ALL.into_iter().find(|f| f.matches(record))
    }

    /// Whether `record` carries the field that identifies this format.
    pub fn matches(self, record: &Map<String, Value>) -> bool {
        let has = |k: &str| record.contains_key(k);
        match self {
            DataFormat::Auto => Self::detect(record).is_some(),
            DataFormat::Text => has("text"),
            DataFormat::Alpaca => has("instruction") || has("output"),
            DataFormat::Chat => has("messages"),
            DataFormat::Tokens => has("input_ids"),
        }
    }

    /// The fields a record of this format needs, for error messages.
    pub fn expected_fields(self) -> &'static str {
        match self {
            DataFormat::Auto => {
                "`messages` (chat), `instruction` + `output` (alpaca), `input_ids` (tokens), \
                 or `text`"
            }
            DataFormat::Text => "`text`",
            DataFormat::Alpaca => "`instruction` + `output` (and optionally `input`)",
            DataFormat::Chat => "`messages` (a list of {role, content})",
            DataFormat::Tokens => "`input_ids` (and optionally `labels`)",
        }
    }

    /// The name used on the command line and in configs.
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Auto => "auto",
            DataFormat::Text => "text",
            DataFormat::Alpaca => "alpaca",
            DataFormat::Chat => "chat",
            DataFormat::Tokens => "tokens",
        }
    }
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DataFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [DataFormat::Auto]
            .into_iter()
            .chain(Self::ALL)
            .find(|f| f.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!("unknown data format `{s}` (expected auto, text, alpaca, chat or tokens)")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn detection_prefers_the_richer_format() {
        let d = |v| DataFormat::detect(&obj(v));
        assert_eq!(
            d(serde_json::json!({"messages": [], "text": "x"})),
            Some(DataFormat::Chat)
        );
        assert_eq!(
            d(serde_json::json!({"instruction": "a", "output": "b"})),
            Some(DataFormat::Alpaca)
        );
        assert_eq!(
            d(serde_json::json!({"input_ids": [1], "text": "x"})),
            Some(DataFormat::Tokens)
        );
        assert_eq!(d(serde_json::json!({"text": "x"})), Some(DataFormat::Text));
        assert_eq!(d(serde_json::json!({"prompt": "x"})), None);
    }

    #[test]
    fn names_round_trip() {
        for f in [DataFormat::Auto].into_iter().chain(DataFormat::ALL) {
            assert_eq!(f.to_string().parse::<DataFormat>(), Ok(f));
        }
        assert!("sharegpt".parse::<DataFormat>().is_err());
    }
}
