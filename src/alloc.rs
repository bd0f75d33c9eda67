//! glibc `malloc` settings for a process that frees and reallocates megabytes of tensors on
//! every step.
//!
//! By default glibc serves each block above a dynamic threshold (128 KiB, rising to at most
//! 32 MiB) with its own `mmap`, and hands freed memory at the top of the heap back to the kernel
//! beyond 128 KiB. A training step frees and reallocates the same few hundred MiB of activations,
//! so it paid for every page again: a page fault and the kernel zeroing the page. Keeping blocks
//! up to 32 MiB in the heap and never trimming it removes that. Measured with `qlora train` on
//! SmolLM2-135M-Instruct, checkpointing on, `--val-split 0`, 3 steps (release build; the
//! defaults via `QLORA_MALLOC_DEFAULTS=1`): batch 4 × 512 114 vs 98 tokens/s, 2.8 vs 15.1 s in
//! the kernel, peak RSS 744 vs 739 MiB; batch 2 × 256 peak RSS 419 vs 372 MiB. The memory plan
//! (`qlora plan`) does not model what the heap keeps: at small shapes the measured peak is up
//! to ~50 MiB above it. Setting only one of glibc's `MALLOC_*_` variables is worse than either:
//! it switches off glibc's adaptive threshold (trim threshold alone: 60 tokens/s, 77 s in the
//! kernel).

/// Apply the settings (process-wide; call once, before the first large allocation). Does
/// nothing outside Linux with glibc, or when `QLORA_MALLOC_DEFAULTS` is set (to compare).
pub fn keep_freed_memory() {
    if std::env::var_os("QLORA_MALLOC_DEFAULTS").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; both values are in range.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
