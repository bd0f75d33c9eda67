//! Reading a dataset file into typed records, each with the line it starts on.
//!
//! `.txt` files are one plain-text record; `.parquet` files are rows (Hugging Face datasets'
//! format). Anything else is JSON: a top-level array of objects, or JSON Lines (one object per
//! line, blank lines skipped). A folder of shards, or one split of a folder, reads as its files in
//! order.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::error::DataError;
use super::format::DataFormat;
use super::tokenizer::Message;

/// One dataset record, typed by its format.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// Plain text; every token is trained.
    Text(String),
    /// An Alpaca instruction (`input` is empty when absent).
    Alpaca {
        /// The task.
        instruction: String,
        /// Optional context for the task.
        input: String,
        /// The response to train on.
        output: String,
    },
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<Message>),
    /// Pre-tokenized ids, with labels when given (ids may be out of the vocabulary here: they
    /// are checked against the model when the example is built).
    Tokens {
        /// Token ids (as written: possibly negative or too large).
        input_ids: Vec<i64>,
        /// Labels, same length as `input_ids` when present.
        labels: Option<Vec<i64>>,
    },
}

/// A record and the 1-based line of the file it starts on.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceRecord {
    /// Line where the record starts.
    pub line: usize,
    /// The record.
    pub record: Record,
}

/// Whether `path` is read as one plain-text stream rather than JSON.
pub fn is_plain_text(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("txt"))
}

/// The data files a dataset argument names: a file; a folder of `.parquet` / `.jsonl` shards
/// (all of them, in name order; a folder holding several splits must be narrowed to one); or
/// `DIR/{split}`, the files of that split under `DIR` by the hub's naming
/// (`train-00000-of-00002.parquet`, `validation/0000.parquet`, ...).
pub fn dataset_files(path: &Path) -> Result<Vec<PathBuf>, DataError> {
    let hub_err = |e: crate::hub::HubError| DataError::Invalid {
        path: path.to_path_buf(),
        what: e.to_string(),
    };
    if path.is_dir() {
        let files = crate::hub::data_files_under(path).map_err(hub_err)?;
        if files.is_empty() {
            return Err(DataError::Empty {
                path: path.to_path_buf(),
                why: "the folder holds no .parquet or .jsonl files".into(),
            });
        }
        let splits: BTreeSet<String> = files
            .iter()
            .filter_map(|f| f.strip_prefix(path).ok().and_then(crate::hub::split_of))
            .collect();
        if splits.len() > 1 {
            let list: Vec<String> = splits.into_iter().collect();
            return Err(DataError::File {
                path: path.to_path_buf(),
                what: format!(
                    "the folder holds the splits {}; name one as {}",
                    list.join(", "),
                    path.join(&list[list.len() - 1]).display()
                ),
            });
        }
        return Ok(files);
    }
    if !path.exists() {
        if let (Some(dir), Some(split)) = (path.parent(), path.file_name().and_then(|s| s.to_str()))
        {
            if dir.is_dir() {
                let files = crate::hub::split_files(dir, split).map_err(hub_err)?;
                if !files.is_empty() {
                    return Ok(files);
                }
            }
        }
    }
    Ok(vec![path.to_path_buf()])
}

/// Call `f` with each raw record of a dataset (see [`dataset_files`]) in order: the file it is
/// in, its line (a parquet row's number), and the record as JSON. A parquet file is read one
/// row group at a time, so it is never in memory whole. Returns the number of records.
pub fn for_each_value(
    path: &Path,
    mut f: impl FnMut(&Path, usize, Value) -> Result<(), DataError>,
) -> Result<usize, DataError> {
    let mut n = 0;
    for file in dataset_files(path)? {
        let mut count = |line: usize, value: Value| {
            n += 1;
            f(&file, line, value)
        };
        if is_parquet(&file) {
            for_each_parquet_row(&file, &mut count)?;
        } else {
            let text = std::fs::read_to_string(&file).map_err(|source| DataError::Read {
                path: file.clone(),
                source,
            })?;
            let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
            for (line, value) in json_values(&file, text)? {
                count(line, value)?;
            }
        }
    }
    Ok(n)
}

/// Call `f` with each record of a dataset, typed by `format` (or detected per record for
/// [`DataFormat::Auto`]); a `.txt` file is one plain-text record. Returns the number of records.
pub fn for_each_record(
    path: &Path,
    format: DataFormat,
    mut f: impl FnMut(&Path, SourceRecord) -> Result<(), DataError>,
) -> Result<usize, DataError> {
    if is_plain_text(path) {
        if !matches!(format, DataFormat::Auto | DataFormat::Text) {
            return Err(DataError::File {
                path: path.to_path_buf(),
                what: format!(
                    "a .txt file is read as plain text, but the {format} format was asked for \
                     (give a .json or .jsonl file, or use the text format)"
                ),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        if text.trim().is_empty() {
            return Ok(0);
        }
        let record = Record::Text(text.to_string());
        f(path, SourceRecord { line: 1, record })?;
        return Ok(1);
    }
    for_each_value(path, |file, line, value| {
        let record = parse_record(value, format).map_err(|e| e.at(file, line))?;
        f(file, SourceRecord { line, record })
    })
}

/// The records of `path` (see [`for_each_record`]), collected.
pub fn read_records(path: &Path, format: DataFormat) -> Result<Vec<SourceRecord>, DataError> {
    let mut out = Vec::new();
    for_each_record(path, format, |_, r| {
        out.push(r);
        Ok(())
    })?;
    Ok(out)
}

/// Whether `path` is a parquet file (Hugging Face datasets' format), by its extension.
pub fn is_parquet(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// Call `f` with each row of a parquet file as a JSON object (column name → value; lists and
/// structs as JSON arrays and objects), numbered from 1, reading one row group at a time.
fn for_each_parquet_row(
    path: &Path,
    f: &mut impl FnMut(usize, Value) -> Result<(), DataError>,
) -> Result<(), DataError> {
    use parquet::file::reader::SerializedFileReader;
    use parquet::record::reader::RowIter;
    let bad = |what: String| DataError::File {
        path: path.to_path_buf(),
        what,
    };
    let file = std::fs::File::open(path).map_err(|source| DataError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    // The parquet crate panics on some corrupt files (out-of-range lengths in its metadata and
    // page decoders): such a panic is this file's error, not a crash.
    let read = crate::contained::contained(|| {
        let reader =
            SerializedFileReader::new(file).map_err(|e| bad(format!("not a parquet file: {e}")))?;
        for (i, row) in RowIter::from_file_into(Box::new(reader)).enumerate() {
            let row = row.map_err(|e| bad(format!("row {}: {e}", i + 1)))?;
            f(i + 1, row.to_json_value())?;
        }
        Ok(())
    });
    read.unwrap_or_else(|why| {
        Err(bad(format!(
            "corrupt: the parquet reader failed on its metadata or pages ({why})"
        )))
    })
}

/// The top-level values of a JSON array or JSON Lines text, with their starting lines.
fn json_values(path: &Path, text: &str) -> Result<Vec<(usize, Value)>, DataError> {
    if text.trim_start().starts_with('[') {
        let values: Vec<Value> =
            serde_json::from_str(text).map_err(|e| DataError::json(path, 1, &e))?;
        let starts = array_element_starts(text);
        let lines = line_numbers(text, &starts);
        return Ok(if lines.len() == values.len() {
            lines.into_iter().zip(values).collect()
        } else {
            // Unreachable for text serde_json accepted; never misreport, fall back to line 1.
            values.into_iter().map(|v| (1, v)).collect()
        });
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| {
            let mut err = DataError::json(path, i + 1, &e);
            if let DataError::Json { what, .. } = &mut err {
                if out.is_empty() && line.trim_start().starts_with('{') && e.is_eof() {
                    what.push_str(
                        " (JSON Lines needs one record per line; for one multi-line JSON value, \
                         use a top-level array)",
                    );
                }
            }
            err
        })?;
        out.push((i + 1, value));
    }
    Ok(out)
}

/// Byte offsets where the elements of a top-level JSON array start (`text` must be valid JSON).
fn array_element_starts(text: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    let (mut depth, mut in_string, mut escaped, mut expect) = (0usize, false, false, false);
    for (i, c) in text.bytes().enumerate() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        if c.is_ascii_whitespace() {
            continue;
        }
        if depth == 1 && expect && c != b']' && c != b',' {
            starts.push(i);
            expect = false;
        }
        match c {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth == 1 {
                    expect = true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => expect = true,
            _ => {}
        }
    }
    starts
}

/// 1-based line numbers of ascending byte offsets.
fn line_numbers(text: &str, offsets: &[usize]) -> Vec<usize> {
    let bytes = text.as_bytes();
    let (mut line, mut pos) = (1, 0);
    offsets
        .iter()
        .map(|&off| {
            line += bytes[pos..off.min(bytes.len())]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            pos = off.min(bytes.len()).max(pos);
            line
        })
        .collect()
}

/// A record error before the file and line are known.
enum FieldError {
    Missing(DataFormat),
    Invalid(String),
    LengthMismatch(usize, usize),
}

impl FieldError {
    fn at(self, path: &Path, line: usize) -> DataError {
        let path = path.to_path_buf();
        match self {
            FieldError::Missing(f) => DataError::MissingFields {
                path,
                line,
                expected: f.expected_fields().to_string(),
            },
            FieldError::Invalid(what) => DataError::Record { path, line, what },
            FieldError::LengthMismatch(ids, labels) => DataError::LengthMismatch {
                path,
                line,
                ids,
                labels,
            },
        }
    }
}

fn parse_record(value: Value, format: DataFormat) -> Result<Record, FieldError> {
    let Value::Object(obj) = value else {
        return Err(FieldError::Invalid(format!(
            "a record must be a JSON object with {}, not {}",
            format.expected_fields(),
            kind_of(&value)
        )));
    };
    let format = match format {
        DataFormat::Auto => DataFormat::detect(&obj).ok_or(FieldError::Missing(format))?,
        f if f.matches(&obj) => f,
        f => return Err(FieldError::Missing(f)),
    };
    match format {
        DataFormat::Auto | DataFormat::Text => Ok(Record::Text(string_field(&obj, "text")?)),
        DataFormat::Alpaca => Ok(Record::Alpaca {
            instruction: string_field(&obj, "instruction")?,
            input: match obj.get("input") {
                None | Some(Value::Null) => String::new(),
                Some(_) => string_field(&obj, "input")?,
            },
            output: string_field(&obj, "output")?,
        }),
        DataFormat::Chat => parse_messages(&obj).map(Record::Chat),
        DataFormat::Tokens => {
            let input_ids = int_list(&obj, "input_ids")?;
            let labels = match obj.get("labels") {
                None | Some(Value::Null) => None,
                Some(_) => Some(int_list(&obj, "labels")?),
            };
            if let Some(l) = &labels {
                if l.len() != input_ids.len() {
                    return Err(FieldError::LengthMismatch(input_ids.len(), l.len()));
                }
            }
            Ok(Record::Tokens { input_ids, labels })
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn string_field(obj: &Map<String, Value>, key: &str) -> Result<String, FieldError> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(FieldError::Invalid(format!(
            "`{key}` must be a string, not {}",
            kind_of(v)
        ))),
        None => Err(FieldError::Invalid(format!("the record has no `{key}`"))),
    }
}

fn int_list(obj: &Map<String, Value>, key: &str) -> Result<Vec<i64>, FieldError> {
    let bad = || FieldError::Invalid(format!("`{key}` must be a list of integers"));
    let Some(Value::Array(items)) = obj.get(key) else {
        return Err(bad());
    };
    items.iter().map(|x| x.as_i64().ok_or_else(bad)).collect()
}

fn parse_messages(obj: &Map<String, Value>) -> Result<Vec<Message>, FieldError> {
    let Some(Value::Array(items)) = obj.get("messages") else {
        return Err(FieldError::Invalid(
            "`messages` must be a list of {role, content} objects".into(),
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let field = |k: &str| match m.get(k) {
                Some(Value::String(s)) => Ok(s.clone()),
                _ => Err(FieldError::Invalid(format!(
                    "messages[{i}] needs a string `{k}` (each message is {{\"role\": ..., \
                     \"content\": ...}})"
                ))),
            };
            Ok(Message {
                role: field("role")?,
                content: field("content")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_elements_start_where_they_are_written() {
        let text =
            "[\n  {\"text\": \"a, [b] {c} \\\" ]\"},\n\n  {\"text\": \"d\"}, 3,\n  [1, 2]\n]";
        let starts = array_element_starts(text);
        assert_eq!(starts.len(), 4);
        assert_eq!(line_numbers(text, &starts), vec![2, 4, 4, 5]);
        assert_eq!(&text[starts[1]..starts[1] + 1], "{");
        assert_eq!(&text[starts[2]..starts[2] + 1], "3");
        assert!(array_element_starts("[]").is_empty());
    }

    #[test]
    fn tokens_records_keep_raw_ids_for_the_vocab_check() {
        let v = serde_json::json!({"input_ids": [1, -2, 70000], "labels": [-100, 5, 6]});
        let r = parse_record(v, DataFormat::Auto).ok();
        assert_eq!(
            r,
            Some(Record::Tokens {
                input_ids: vec![1, -2, 70000],
                labels: Some(vec![-100, 5, 6])
            })
        );
    }
}
