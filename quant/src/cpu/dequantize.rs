//! Whole-tensor dequantization, split across the rayon pool.

use rayon::prelude::*;

use super::decode::{decode, Element};
use super::isa::Isa;
use crate::tensor::Nf4Tensor;

/// Elements per rayon task: large enough that scheduling is noise, small enough (256 tasks for a
/// 4096² weight) that two threads finish together.
const TASK_ELEMENTS: usize = 1 << 16;

/// Outputs at least this large bypass the caches: they cannot stay in a 32 MiB L3 next to
/// everything else, and skipping the read-for-ownership saves a third of the memory traffic.
const STREAM_BYTES: usize = 16 << 20;

/// Dequantize all of `w` into `out`, in parallel.
pub(crate) fn dequantize_par<T: Element>(w: &Nf4Tensor, out: &mut [T]) {
    assert_eq!(
        out.len(),
        w.numel(),
        "dequantize: output has {} elements, the weight {:?} has {}",
        out.len(),
        w.shape(),
        w.numel()
    );
    let isa = Isa::detect();
    if out.len() <= TASK_ELEMENTS {
        decode(isa, w, 0, out, false);
        return;
    }
    let stream = std::mem::size_of_val(out) >= STREAM_BYTES;
    out.par_chunks_mut(TASK_ELEMENTS)
        .enumerate()
        .for_each(|(t, chunk)| decode(isa, w, t * TASK_ELEMENTS, chunk, stream));
}
