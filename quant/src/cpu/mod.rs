//! CPU kernels: dequantization, fused `x · deq(W)ᵀ`, GEMV, and the transposed product.
//!
//! Every kernel reads the packed codes directly; none materializes the whole weight. The plain
//! references they are tested against are `blockwise::dequantize_reference` and
//! `decode::decode_scalar`.

mod decode;
mod dequantize;
mod gemm;
mod gemv;
mod isa;
#[cfg(test)]
mod reference;
mod scratch;

use half::{bf16, f16};

use crate::tensor::Nf4Tensor;
use crate::QuantError;

/// Dequantize all of `w` into `out` (f32, flat row-major).
///
/// # Panics
/// If `out.len()` is not the number of elements of `w`.
pub fn dequantize_into(w: &Nf4Tensor, out: &mut [f32]) {
    dequantize::dequantize_par(w, out);
}

/// Dequantize into bf16 (round to nearest even).
///
/// # Panics
/// If `out.len()` is not the number of elements of `w`.
pub fn dequantize_bf16_into(w: &Nf4Tensor, out: &mut [bf16]) {
    dequantize::dequantize_par(w, out);
}

/// Dequantize into f16 (round to nearest even).
///
/// # Panics
/// If `out.len()` is not the number of elements of `w`.
pub fn dequantize_f16_into(w: &Nf4Tensor, out: &mut [f16]) {
    dequantize::dequantize_par(w, out);
}

/// Up to this many activation rows a product is bound by streaming W, which the GEMV reads once
/// and never writes out; past it, FLOPs dominate and panels + `gemm` win.
const GEMV_MAX_ROWS: usize = 8;

/// `(n, k)` of the weight, after checking that `a` holds `m` rows of `a_cols(n, k)` and `b` holds
/// `m` rows of `b_cols(n, k)`.
fn check(
    w: &Nf4Tensor,
    m: usize,
    (a_name, a_len, a_cols): (&str, usize, fn(usize, usize) -> usize),
    (b_name, b_len, b_cols): (&str, usize, fn(usize, usize) -> usize),
) -> Result<(usize, usize), QuantError> {
    let (n, k) = w.dims2()?;
    for (name, len, cols) in [(a_name, a_len, a_cols(n, k)), (b_name, b_len, b_cols(n, k))] {
        let want = m.checked_mul(cols).ok_or_else(|| {
            QuantError::invalid(name, format!("{m} rows of {cols} overflow usize"))
        })?;
        if len != want {
            return Err(QuantError::invalid(
                name,
                format!(
                    "has {len} elements, but {m} rows against the weight [{n}, {k}] need {m} × {cols} = {want}"
                ),
            ));
        }
    }
    Ok((n, k))
}

/// `(n, k)` of a product with `m` rows after checking the lengths: `y[m, n] = x[m, k] · deq(W)ᵀ`,
/// or with `transposed` `dx[m, k] = dy[m, n] · deq(W)`. `None` when nothing is left to compute;
/// an empty inner dimension leaves `out` zero-filled.
fn product_shape(
    w: &Nf4Tensor,
    m: usize,
    transposed: bool,
    input_len: usize,
    out: &mut [f32],
) -> Result<Option<(usize, usize)>, QuantError> {
    let (n, k) = if transposed {
        check(
            w,
            m,
            ("dy", input_len, |n, _| n),
            ("dx", out.len(), |_, k| k),
        )?
    } else {
        check(w, m, ("x", input_len, |_, k| k), ("y", out.len(), |n, _| n))?
    };
    let (inner, outer) = if transposed { (n, k) } else { (k, n) };
    if m == 0 || outer == 0 {
        return Ok(None);
    }
    if inner == 0 {
        out.fill(0.0);
        return Ok(None);
    }
    Ok(Some((n, k)))
}

/// `y[m, n] = x[m, k] · deq(W)ᵀ` with `W: [n, k]`.
///
/// Up to 8 rows decode W in registers (GEMV, bound by memory bandwidth); more rows decode panels
/// of W into per-thread scratch for `gemm`.
pub fn matmul_into(x: &[f32], m: usize, w: &Nf4Tensor, y: &mut [f32]) -> Result<(), QuantError> {
    let Some((n, k)) = product_shape(w, m, false, x.len(), y)? else {
        return Ok(());
    };
    let isa = isa::Isa::detect();
    if m <= GEMV_MAX_ROWS {
        gemv::gemv(isa, x, m, w, n, k, y);
    } else {
        gemm::matmul(isa, x, m, w, n, k, y, false);
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
    let Some((n, k)) = product_shape(w, m, true, dy.len(), dx)? else {
        return Ok(());
    };
    let isa = isa::Isa::detect();
    if m <= GEMV_MAX_ROWS {
        gemv::gemv_t(isa, dy, m, w, n, k, dx, false);
    } else {
        gemm::matmul_t(isa, dy, m, w, n, k, dx, false);
    }
    Ok(())
}

/// `y[m, n] = x[m, k] · deq_bf16(W)ᵀ` for bf16 activations: W dequantized to bf16 as
/// [`dequantize_bf16_into`] does (what bitsandbytes multiplies with a bf16 compute dtype), every
/// product exact, sums in f32.
///
/// Up to 8 rows take the bf16 GEMV (AVX-512 BF16: 32 lookups and 32 products per instruction);
/// more rows widen x and multiply bf16-rounded panels of W with `gemm`.
pub fn matmul_bf16_into(
    x: &[bf16],
    m: usize,
    w: &Nf4Tensor,
    y: &mut [f32],
) -> Result<(), QuantError> {
    let Some((n, k)) = product_shape(w, m, false, x.len(), y)? else {
        return Ok(());
    };
    let isa = isa::Isa::detect();
    if m <= GEMV_MAX_ROWS {
        gemv::gemv_bf16(isa, x, m, w, n, k, y);
    } else {
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        gemm::matmul(isa, &xf, m, w, n, k, y, true);
    }
    Ok(())
}

/// `dx[m, k] = dy[m, n] · deq_bf16(W)` for bf16 gradients (the input gradient of
/// [`matmul_bf16_into`]), accumulated in f32.
pub fn matmul_t_bf16_into(
    dy: &[bf16],
    m: usize,
    w: &Nf4Tensor,
    dx: &mut [f32],
) -> Result<(), QuantError> {
    let Some((n, k)) = product_shape(w, m, true, dy.len(), dx)? else {
        return Ok(());
    };
    let isa = isa::Isa::detect();
    let dyf: Vec<f32> = dy.iter().map(|v| v.to_f32()).collect();
    if m <= GEMV_MAX_ROWS {
        gemv::gemv_t(isa, &dyf, m, w, n, k, dx, true);
    } else {
        gemm::matmul_t(isa, &dyf, m, w, n, k, dx, true);
    }
    Ok(())
}
