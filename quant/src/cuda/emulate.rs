//! The CUDA kernels, thread by thread, on the CPU.
//!
//! No GPU is needed to test the kernels' logic: every function here walks the same grid the
//! launch code starts (`geometry`), and for each `(blockIdx, threadIdx)` computes exactly what
//! that thread computes in `quant/kernels/*.cu`, with the same index formulas, the same f32
//! operations in the same order (`mul_add` is the kernels' `fmaf`, the lane reduction replays
//! `__shfl_down_sync`). `tests/cuda_emulation.rs` checks these against the format's reference
//! on random shapes; the GPU tests check the real kernels against these, bit for bit in f32.

use half::{bf16, f16};

use super::geometry::{
    dequantize_launch, gemv_launch, gemv_t_launch, workspace_rhs, DEQ_ELEMS_PER_THREAD,
    GEMV_MAX_ROWS, GEMV_RUN, GEMV_WARPS, WARP,
};
use crate::codebook::DYNAMIC8;
use crate::double_quant::NESTED_BLOCKSIZE;
use crate::tensor::{Absmax, Nf4Tensor};
use crate::QuantError;

/// An element type the kernels read and write (`float`, `__nv_bfloat16`, `__half`).
pub trait KernelFloat: Copy + Send + Sync + 'static {
    /// The kernel's `from_f32`: round to nearest even.
    fn from_f32(v: f32) -> Self;
    /// The kernel's `to_f32` (exact).
    fn to_f32(self) -> f32;
}

impl KernelFloat for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl KernelFloat for bf16 {
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

impl KernelFloat for f16 {
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// The kernels' `QuantScales`: the per-block scales as uploaded to the device.
#[derive(Clone, Copy, Debug)]
pub struct Scales<'a> {
    absmax: &'a [f32],
    qabsmax: &'a [u8],
    nested: &'a [f32],
    offset: f32,
    double_quant: bool,
}

impl<'a> Scales<'a> {
    /// The scales of `w`, in the form the kernels read them (8-bit codes when double-quantized).
    pub fn of(w: &'a Nf4Tensor) -> Self {
        match w.absmax() {
            Absmax::Plain(a) => Scales {
                absmax: a,
                qabsmax: &[],
                nested: &[],
                offset: 0.0,
                double_quant: false,
            },
            Absmax::Double(d) => Scales {
                absmax: &[],
                qabsmax: &d.codes,
                nested: &d.nested_absmax,
                offset: d.offset,
                double_quant: true,
            },
        }
    }

    /// `block_scale`: two separate f32 roundings, as `__fmul_rn` then `__fadd_rn`.
    fn block_scale(&self, b: usize) -> f32 {
        if !self.double_quant {
            return self.absmax[b];
        }
        let scaled = DYNAMIC8[self.qabsmax[b] as usize] * self.nested[b / NESTED_BLOCKSIZE];
        scaled + self.offset
    }
}

/// `nibble_at`: element `2j` is the high nibble of byte `j`.
fn nibble_at(packed: &[u8], i: usize) -> usize {
    let byte = packed[i >> 1];
    (if i & 1 == 1 { byte & 0x0f } else { byte >> 4 }) as usize
}

/// The decoded weight `i` as a GEMV thread computes it: block `i >> shift` (blocksizes are
/// powers of two; the kernel takes `shift = __ffs(blocksize) - 1`), `__fmul_rn(code, scale)`.
fn weight_at(w: &Nf4Tensor, code: &[f32; 16], scales: &Scales<'_>, i: usize) -> f32 {
    let shift = w.blocksize().trailing_zeros();
    code[nibble_at(w.packed(), i)] * scales.block_scale(i >> shift)
}

fn too_large(what: &str) -> QuantError {
    QuantError::invalid(
        "weight",
        format!("{what} exceeds the CUDA grid or 32-bit index limits"),
    )
}

/// `nf4_dequantize_*`: every element of `w`, flat row-major, in `T`.
pub fn dequantize<T: KernelFloat>(w: &Nf4Tensor) -> Result<Vec<T>, QuantError> {
    let n = w.numel();
    let launch = dequantize_launch(n).ok_or_else(|| too_large("element count"))?;
    let code = w.qtype().values();
    let scales = Scales::of(w);
    let bs = w.blocksize();
    let mut out = vec![T::from_f32(0.0); n];
    for block_idx in 0..launch.grid as usize {
        for thread_idx in 0..launch.block as usize {
            let first = (block_idx * launch.block as usize + thread_idx) * DEQ_ELEMS_PER_THREAD;
            if first >= n {
                continue;
            }
            // The kernel reads one scale for its whole run: the run must not straddle blocks.
            let last = (first + DEQ_ELEMS_PER_THREAD - 1).min(n - 1);
            if first / bs != last / bs {
                return Err(QuantError::invalid(
                    "weight",
                    format!("blocksize {bs} is not a multiple of {DEQ_ELEMS_PER_THREAD}"),
                ));
            }
            let scale = scales.block_scale(first / bs);
            for j in 0..DEQ_ELEMS_PER_THREAD {
                let i = first + j;
                if i < n {
                    out[i] = T::from_f32(code[nibble_at(w.packed(), i)] * scale);
                }
            }
        }
    }
    Ok(out)
}

/// `(n, k)` of `w` after checking `m` against the GEMV limit and the input length.
fn gemv_dims(
    w: &Nf4Tensor,
    m: usize,
    input: usize,
    inner_is_k: bool,
) -> Result<(usize, usize), QuantError> {
    let (n, k) = w.dims2()?;
    if m > GEMV_MAX_ROWS {
        return Err(QuantError::invalid(
            "x",
            format!("{m} rows: the GEMV kernels take at most {GEMV_MAX_ROWS}"),
        ));
    }
    if u32::try_from(n).is_err() || u32::try_from(k).is_err() {
        return Err(too_large("a dimension"));
    }
    let inner = if inner_is_k { k } else { n };
    if input != m * inner {
        return Err(QuantError::invalid(
            "x",
            format!("has {input} elements, {m} rows of {inner} expected"),
        ));
    }
    Ok((n, k))
}

/// `__shfl_down_sync` tree over one warp's partial sums; lane 0's result.
fn warp_reduce(mut lanes: [f32; WARP as usize]) -> f32 {
    let mut off = WARP as usize / 2;
    while off > 0 {
        let before = lanes;
        for (lane, v) in lanes.iter_mut().enumerate() {
            // Out-of-range source lanes return the caller's own value.
            let src = if lane + off < WARP as usize {
                lane + off
            } else {
                lane
            };
            *v += before[src];
        }
        off /= 2;
    }
    lanes[0]
}

/// `nf4_gemv_*`: `y[m, n] = x[m, k] · deq(W)ᵀ` for `m <= 8`.
pub fn gemv<T: KernelFloat>(x: &[T], m: usize, w: &Nf4Tensor) -> Result<Vec<T>, QuantError> {
    let (n, k) = gemv_dims(w, m, x.len(), true)?;
    let launch = gemv_launch(n).ok_or_else(|| too_large("n"))?;
    let code = w.qtype().values();
    let scales = Scales::of(w);
    let mut y = vec![T::from_f32(0.0); m * n];
    for block_idx in 0..launch.grid as usize {
        for warp in 0..GEMV_WARPS as usize {
            let o = block_idx * GEMV_WARPS as usize + warp;
            if o >= n {
                continue;
            }
            let row = o * k;
            let mut acc = [[0f32; WARP as usize]; GEMV_MAX_ROWS];
            for lane in 0..WARP as usize {
                let mut c0 = lane * GEMV_RUN;
                while c0 < k {
                    for j in 0..GEMV_RUN {
                        let c = c0 + j;
                        if c < k {
                            let wv = weight_at(w, code, &scales, row + c);
                            for (r, a) in acc.iter_mut().enumerate().take(m) {
                                a[lane] = x[r * k + c].to_f32().mul_add(wv, a[lane]);
                            }
                        }
                    }
                    c0 += WARP as usize * GEMV_RUN;
                }
            }
            for (r, a) in acc.iter().enumerate().take(m) {
                y[r * n + o] = T::from_f32(warp_reduce(*a));
            }
        }
    }
    Ok(y)
}

/// `nf4_gemv_t_*`: `dx[m, k] = dy[m, n] · deq(W)` for `m <= 8`.
pub fn gemv_t<T: KernelFloat>(dy: &[T], m: usize, w: &Nf4Tensor) -> Result<Vec<T>, QuantError> {
    let (n, k) = gemv_dims(w, m, dy.len(), false)?;
    let launch = gemv_t_launch(k).ok_or_else(|| too_large("k"))?;
    let code = w.qtype().values();
    let scales = Scales::of(w);
    let mut dx = vec![T::from_f32(0.0); m * k];
    for block_idx in 0..launch.grid as usize {
        for thread_idx in 0..launch.block as usize {
            let c = block_idx * launch.block as usize + thread_idx;
            if c >= k {
                continue;
            }
            let mut acc = [0f32; GEMV_MAX_ROWS];
            for o in 0..n {
                let wv = weight_at(w, code, &scales, o * k + c);
                for (r, a) in acc.iter_mut().enumerate().take(m) {
                    *a = dy[r * n + o].to_f32().mul_add(wv, *a);
                }
            }
            for (r, a) in acc.iter().enumerate().take(m) {
                dx[r * k + c] = T::from_f32(*a);
            }
        }
    }
    Ok(dx)
}

/// The training-size path: dequantize into a `T` workspace, then the product cuBLAS is asked
/// for, reading the workspace through the strided view the launch code builds
/// (`geometry::workspace_rhs`). cuBLAS's own summation order is its business, so this sums in
/// f64 and the result is compared with a tolerance, not bit for bit.
///
/// `transposed = false`: `y[m, n] = x[m, k] · deq(W)ᵀ`; `true`: `dx[m, k] = dy[m, n] · deq(W)`.
pub fn matmul_via_workspace<T: KernelFloat>(
    a: &[T],
    m: usize,
    w: &Nf4Tensor,
    transposed: bool,
) -> Result<Vec<f32>, QuantError> {
    let (n, k) = w.dims2()?;
    let workspace = dequantize::<T>(w)?;
    let ([inner, outer], [s_inner, s_outer]) = workspace_rhs(n, k, transposed);
    if a.len() != m * inner {
        return Err(QuantError::invalid(
            "x",
            format!("has {} elements, {m} rows of {inner} expected", a.len()),
        ));
    }
    let mut out = vec![0f32; m * outer];
    for r in 0..m {
        for j in 0..outer {
            let sum: f64 = (0..inner)
                .map(|p| {
                    a[r * inner + p].to_f32() as f64
                        * workspace[p * s_inner + j * s_outer].to_f32() as f64
                })
                .sum();
            out[r * outer + j] = sum as f32;
        }
    }
    Ok(out)
}
