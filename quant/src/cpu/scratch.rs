//! Per-thread scratch buffers that outlive a call.
//!
//! A fused matmul decodes panels of W into a few MiB of scratch per thread; allocating (and
//! page-faulting) that afresh on every call costs more than decoding into it, so each rayon
//! worker keeps its buffer. A thread holds at most the largest panel it has decoded.

use std::cell::Cell;

thread_local! {
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Run `f` with this thread's scratch buffer, grown to at least `len` elements.
///
/// The buffer is taken out of the thread-local for the duration, so a nested call on the same
/// thread (e.g. rayon running another task while this one waits) gets its own buffer rather than
/// a double borrow.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.with(Cell::take);
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let out = f(&mut buf[..len]);
    SCRATCH.with(|s| {
        // A nested call may have left a buffer behind meanwhile; keep the larger.
        let other = s.take();
        s.set(if other.len() > buf.len() { other } else { buf });
    });
    out
}
