//! Raw access to f32 CPU tensors for the hand-written kernels (fused ops, dropout).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

/// The f32 contents of a contiguous CPU tensor, without copying.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("fused op: tensor is not on the CPU")
    };
    f(f32_slice(cpu, layout)?)
}

/// The f32 elements a contiguous layout addresses in a CPU storage.
pub(crate) fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = storage else {
        candle_core::bail!("fused op: expected f32, got {:?}", storage.dtype())
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused op: input must be contiguous")
    };
    Ok(&v[start..end])
}

/// Whether the fused ops apply to `t` (f32 on the CPU); other cases take the composite path.
pub fn fused_applies(t: &Tensor) -> bool {
    t.dtype() == candle_core::DType::F32 && t.device().is_cpu()
}

/// A raw output pointer that rayon tasks writing disjoint regions may share.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
// SAFETY: every user writes only the region its task owns (stated at each use).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the whole Send + Sync wrapper).
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}
