//! Third-party parsers that panic on some malformed inputs (the tokenizers crate on a bad
//! decoder section, the parquet crate on out-of-range lengths) run inside [`contained`]: their
//! panic becomes an error carrying its message, and nothing is printed by the panic hook.

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    static CONTAINED: Cell<bool> = const { Cell::new(false) };
}

static QUIET_HOOK: Once = Once::new();

/// Run `f`; a panic inside it is returned as `Err(message)` and not printed. Panics elsewhere,
/// and on other threads, are reported by the hook as before.
pub fn contained<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    QUIET_HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !CONTAINED.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let outer = CONTAINED.with(|c| c.replace(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CONTAINED.with(|c| c.set(outer));
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message() {
        assert_eq!(contained(|| 3), Ok(3));
        let e = contained(|| -> u8 { panic!("bad length {}", 7) }).unwrap_err();
        assert_eq!(e, "bad length 7");
        let e = contained(|| -> u8 { std::panic::panic_any(5u8) }).unwrap_err();
        assert_eq!(e, "a panic without a message");
    }
}
