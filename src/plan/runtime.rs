//! What a run holds besides the model and the step, on the device the plan is for.
//!
//! On the CPU: the NF4 kernels' per-thread scratch and the process's measured baseline. On a
//! CUDA device: the driver's context, the kernel modules loaded into it, cuBLAS's workspace and
//! the NF4 op's dequantization workspace. A CUDA plan counts device memory only; the host side of
//! a GPU run (the binary, the host copy of the NF4 weights, tokenized data, paged optimizer
//! pages in pinned memory) is another budget and not in it. No GPU has run this code yet, so the
//! three driver and library figures below are documented estimates, not measurements.

use crate::device::DeviceSpec;
use crate::model::loader::BaseFormat;

use super::format_bytes;
use super::shape::PlanModel;
use super::{PlanItem, PlanSettings};

/// What the process uses besides the model and the step: the binary, its libraries, allocator
/// arenas, tokenizer, data. Measured: `qlora train` on the tiny-llama fixture (seq 32, batch 1)
/// peaks at 28.9 MiB RSS; rounded up.
pub const RUNTIME_BASELINE_BYTES: usize = 32 << 20;

/// Device memory of a CUDA context before any tensor: the driver's per-context state (local
/// memory reserved for the resident threads, printf and heap buffers, page tables) and the
/// kernels loaded so far, including cuBLAS's. With lazy module loading (the default on Linux
/// since CUDA 12.2: NVIDIA's programming guide, "Lazy Loading") only the kernels a run calls are
/// loaded; a context is then commonly reported at roughly 300–500 MiB in `nvidia-smi` on recent
/// drivers and large GPUs (more without lazy loading, which loads every kernel of every library
/// up front). We count the top of that range, 500 MiB; the first GPU run should measure it.
pub const CUDA_CONTEXT_BYTES: usize = 500 << 20;

/// cuBLAS's default workspace pool for a handle (candle holds one per device, on one stream):
/// 32 MiB on Hopper and later, 4 MiB on earlier GPUs (the cuBLAS documentation of
/// `cublasSetWorkspace`; PyTorch sizes its cuBLASLt workspace by the same rule). We count
/// 32 MiB, whatever the architecture: on an RTX 3090 or 4090 that is 28 MiB too many.
pub const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// Code of the kernel modules a training step loads: candle's elementwise, cast, reduce,
/// indexing and fill modules and our NF4 dequantize and GEMV modules, each JIT-compiled from
/// PTX when first used (with lazy loading, only the functions called). A few hundred small
/// kernels of some KiB of machine code each; 16 MiB is a generous bound, not a measurement.
pub const CUDA_MODULES_BYTES: usize = 16 << 20;

/// Bytes of the NF4 op's dequantization workspace on a CUDA device: for m > 8 rows the op
/// expands the whole weight into one per-device buffer of the input's dtype, grown to the
/// largest weight seen and reused by every layer (`matmul_via_workspace` in
/// `quant/src/cuda/launch.rs`), then hands it to cuBLAS. Inputs are in the compute dtype, so one
/// buffer: the largest quantized weight's elements × that dtype's size. None for a dense base.
pub fn dequant_workspace_bytes(model: &PlanModel, s: &PlanSettings) -> usize {
    match s.base {
        BaseFormat::Quantized(_) => {
            largest_quantized_weight(model).map_or(0, |(out, inp)| out * inp)
                * s.compute_dtype.size_in_bytes()
        }
        BaseFormat::Dense => 0,
    }
}

/// `(out, in)` of the largest linear weight the loader quantizes: every layer's linear layers
/// and a family's extra ones (BERT's pooler); embeddings and the head stay dense.
pub fn largest_quantized_weight(model: &PlanModel) -> Option<(usize, usize)> {
    model
        .linears()
        .iter()
        .chain(model.extra_linears().iter())
        .map(|l| (l.out, l.inp))
        .max_by_key(|&(out, inp)| out * inp)
}

/// The items after the step's own: per-thread kernel scratch and the process baseline on the
/// CPU; dequantization and cuBLAS workspaces, kernel modules and the context on CUDA.
pub fn runtime_items(model: &PlanModel, s: &PlanSettings) -> Vec<PlanItem> {
    match s.device {
        DeviceSpec::Cpu => host_items(model, s),
        DeviceSpec::Cuda(_) => cuda_items(model, s),
    }
}

fn host_items(model: &PlanModel, s: &PlanSettings) -> Vec<PlanItem> {
    // Forward panels are 64 rows x in; backward panels up to 2048 rows x 128 columns
    // (quant/src/cpu/gemm.rs); a thread keeps the largest it has used.
    let widest = model
        .linears()
        .iter()
        .map(|l| l.inp.max(l.out))
        .max()
        .unwrap_or(0);
    let scratch = match s.base {
        BaseFormat::Quantized(_) => s.threads * 4 * (64 * widest).max(widest.min(2048) * 128),
        BaseFormat::Dense => 0,
    };
    vec![
        PlanItem {
            name: "kernel scratch",
            detail: format!("{} threads x one decoded panel", s.threads),
            bytes: scratch,
        },
        PlanItem {
            name: "runtime",
            detail: "binary, libraries, allocator, tokenizer (measured on a tiny run)".to_string(),
            bytes: RUNTIME_BASELINE_BYTES,
        },
    ]
}

fn cuda_items(model: &PlanModel, s: &PlanSettings) -> Vec<PlanItem> {
    let workspace = PlanItem {
        name: "dequantization workspace",
        detail: match (s.base, largest_quantized_weight(model)) {
            (BaseFormat::Quantized(_), Some((out, inp))) => format!(
                "largest 4-bit weight [{out}, {inp}] as {:?} for cuBLAS, one reused buffer",
                s.compute_dtype
            ),
            _ => "none: the base is dense".to_string(),
        },
        bytes: dequant_workspace_bytes(model, s),
    };
    vec![
        workspace,
        PlanItem {
            name: "cuBLAS workspace",
            detail: format!(
                "cuBLAS's default for one handle: {} on Hopper, 4 MiB on older GPUs",
                format_bytes(CUBLAS_WORKSPACE_BYTES)
            ),
            bytes: CUBLAS_WORKSPACE_BYTES,
        },
        PlanItem {
            name: "CUDA kernel modules",
            detail: "candle's and the NF4 kernels, loaded on first use (estimate)".to_string(),
            bytes: CUDA_MODULES_BYTES,
        },
        PlanItem {
            name: "CUDA context",
            detail: "driver state and loaded kernels with lazy loading, 300-500 MiB (estimate)"
                .to_string(),
            bytes: CUDA_CONTEXT_BYTES,
        },
    ]
}
