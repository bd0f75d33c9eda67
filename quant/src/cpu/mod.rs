//! CPU kernels: dequantization, fused `x · deq(W)ᵀ`, GEMV, and the transposed product.
//!
//! PLACEHOLDER BODIES: correct but not fast; replaced by the SIMD/fused kernels.

use half::{bf16, f16};

use crate::tensor::Nf4Tensor;
use crate::QuantError;

/// Dequantize all of `w` into `out` (f32, flat row-major).
pub fn dequantize_into(w: &Nf4Tensor, out: &mut [f32]) {
    let code = w.qtype().values();
    let bs = w.blocksize();
    for (i, o) in out.iter_mut().enumerate() {
        let nib = crate::blockwise::nibble_at(w.packed(), i);
        *o = code[nib as usize] * w.absmax().get(i / bs);
    }
}

/// Dequantize into bf16 (round to nearest even).
pub fn dequantize_bf16_into(w: &Nf4Tensor, out: &mut [bf16]) {
    let v = w.dequantize_f32();
    for (o, x) in out.iter_mut().zip(v) {
        *o = bf16::from_f32(x);
    }
}

/// Dequantize into f16 (round to nearest even).
pub fn dequantize_f16_into(w: &Nf4Tensor, out: &mut [f16]) {
    let v = w.dequantize_f32();
    for (o, x) in out.iter_mut().zip(v) {
        *o = f16::from_f32(x);
    }
}

fn check(
    w: &Nf4Tensor,
    a: usize,
    a_cols: usize,
    b: usize,
    b_cols: usize,
) -> Result<(usize, usize), QuantError> {
    let (n, k) = w.dims2()?;
    let _ = (a, a_cols, b, b_cols);
    Ok((n, k))
}

/// `y[m, n] = x[m, k] · deq(W)ᵀ` with `W: [n, k]`.
pub fn matmul_into(x: &[f32], m: usize, w: &Nf4Tensor, y: &mut [f32]) -> Result<(), QuantError> {
    let (n, k) = check(w, m, 0, 0, 0)?;
    let wd = w.dequantize_f32();
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            for p in 0..k {
                acc += x[i * k + p] * wd[j * k + p];
            }
            y[i * n + j] = acc;
        }
    }
    Ok(())
}

/// `dx[m, k] = dy[m, n] · deq(W)` with `W: [n, k]` (the input gradient of [`matmul_into`]).
pub fn matmul_t_into(
    dy: &[f32],
    m: usize,
    w: &Nf4Tensor,
    dx: &mut [f32],
) -> Result<(), QuantError> {
    let (n, k) = check(w, m, 0, 0, 0)?;
    let wd = w.dequantize_f32();
    dx.fill(0.0);
    for i in 0..m {
        for j in 0..n {
            let g = dy[i * n + j];
            for p in 0..k {
                dx[i * k + p] += g * wd[j * k + p];
            }
        }
    }
    Ok(())
}
