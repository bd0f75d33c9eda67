//! Fields of the JSON files that come from outside (`config.json`, `adapter_config.json`), read
//! under one rule: an absent or null field takes its default; a field that is present with
//! another type is an error naming the field, its value and what was expected, never a silent
//! default.

use serde_json::Value;

/// `key` of `v` read with `read`: `None` when absent or null.
pub fn optional<T>(
    v: &Value,
    key: &str,
    read: impl Fn(&Value) -> Option<T>,
    expected: &str,
) -> Result<Option<T>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => read(x)
            .map(Some)
            .ok_or_else(|| format!("`{key}` is {x}, expected {expected}")),
    }
}

/// `key` of `v` read with `read`; absent or null is an error too.
pub fn required<T>(
    v: &Value,
    key: &str,
    read: impl Fn(&Value) -> Option<T>,
    expected: &str,
) -> Result<T, String> {
    optional(v, key, read, expected)?
        .ok_or_else(|| format!("the field `{key}` ({expected}) is missing"))
}

/// An optional non-negative integer.
pub fn opt_usize(v: &Value, key: &str) -> Result<Option<usize>, String> {
    optional(v, key, as_usize, "a non-negative integer")
}

/// A required non-negative integer.
pub fn usize_field(v: &Value, key: &str) -> Result<usize, String> {
    required(v, key, as_usize, "a non-negative integer")
}

/// An optional token id.
pub fn opt_u32(v: &Value, key: &str) -> Result<Option<u32>, String> {
    optional(
        v,
        key,
        |x| x.as_u64().and_then(|i| u32::try_from(i).ok()),
        "a token id",
    )
}

/// An optional boolean.
pub fn opt_bool(v: &Value, key: &str) -> Result<Option<bool>, String> {
    optional(v, key, Value::as_bool, "true or false")
}

/// An optional number.
pub fn opt_f64(v: &Value, key: &str) -> Result<Option<f64>, String> {
    optional(v, key, Value::as_f64, "a number")
}

fn as_usize(x: &Value) -> Option<usize> {
    x.as_u64().and_then(|i| usize::try_from(i).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn absent_and_null_default_and_wrong_types_are_named() {
        let v = json!({"a": 3, "b": null, "c": "3", "d": [1, 2], "e": -1});
        assert_eq!(opt_usize(&v, "a"), Ok(Some(3)));
        assert_eq!(opt_usize(&v, "b"), Ok(None));
        assert_eq!(opt_usize(&v, "zz"), Ok(None));
        assert_eq!(
            opt_usize(&v, "c"),
            Err("`c` is \"3\", expected a non-negative integer".into())
        );
        assert!(opt_bool(&v, "d").unwrap_err().contains("`d` is [1,2]"));
        assert!(usize_field(&v, "e").unwrap_err().contains("`e` is -1"));
        assert!(usize_field(&v, "zz").unwrap_err().contains("`zz`"));
        assert!(usize_field(&v, "zz").unwrap_err().contains("missing"));
    }
}
