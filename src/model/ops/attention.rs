//! Fused grouped-query self-attention with RoPE: `[b, t, heads·d]` projections in, `[b, t,
//! heads·d]` attention output out, ready for `o_proj`.
//!
//! Forward, per (batch row, head) on the rayon pool: rotate Q and K into a small scratch, then per
//! block of 64 queries `S = scale·Q Kᵀ + mask` over only the keys the mask lets that block see
//! (half the work for a causal mask), a row softmax, and `O = P V` written straight into the
//! output's columns. No `[b, heads, t, t]` tensor, no transposed copies, no separate RoPE
//! tensors. Backward (flash-attention style) recomputes `P` per block, so nothing but the
//! inputs and the output is kept between forward and backward:
//! `dV = Pᵀ dO`, `dS = P ∘ (dO Vᵀ - rowsum(dO ∘ O))·scale`, `dQ = dS K`, `dK = dSᵀ Q`, and the
//! inverse rotation takes dQ and dK back to the projections' space.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::exp::exp_f32;
use super::{f32_slice, with_f32, SharedMut};

/// Queries per block: the block's scores `[64, keys]` stay in L1/L2.
const BLOCK_Q: usize = 64;

/// Geometry and the fixed inputs of one attention call.
#[derive(Clone, Debug)]
pub struct FusedAttention {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    b: usize,
    t: usize,
    /// RoPE tables `[positions, d]`, rows picked by `pos`.
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    /// Position of each token, `[b * t]`.
    pos: Vec<u32>,
    /// Additive mask `[1 | b, t, t]` (0 or -inf), shared by all layers.
    mask: Tensor,
    mask_rows: usize,
}

impl FusedAttention {
    /// An op for `b × t` tokens: `cos`/`sin` are the RoPE tables `[positions, head_dim]`
    /// row-major, `pos` `[b, t]` (u32), `mask` the additive `[1 | b, 1, 1, t, t]` f32 mask.
    pub fn new(
        (heads, kv_heads, head_dim): (usize, usize, usize),
        cos: Arc<Vec<f32>>,
        sin: Arc<Vec<f32>>,
        pos: &Tensor,
        mask: &Tensor,
    ) -> Result<Self> {
        let (b, t) = pos.dims2()?;
        if kv_heads == 0 || heads % kv_heads != 0 || head_dim % 2 != 0 {
            candle_core::bail!(
                "fused attention: {heads} heads over {kv_heads} kv heads of width {head_dim}"
            );
        }
        let md = mask.dims();
        let mask_rows = md.first().copied().unwrap_or(0);
        if md.len() != 5 || (mask_rows != 1 && mask_rows != b) || md[3] != t || md[4] != t {
            candle_core::bail!("fused attention: mask {md:?} does not fit {b} x {t} tokens");
        }
        let pos: Vec<u32> = pos.flatten_all()?.to_vec1()?;
        let max_pos = pos.iter().copied().max().unwrap_or(0) as usize;
        if (max_pos + 1) * head_dim > cos.len().min(sin.len()) {
            candle_core::bail!("fused attention: position {max_pos} is past the RoPE table");
        }
        Ok(Self {
            heads,
            kv_heads,
            head_dim,
            b,
            t,
            cos,
            sin,
            pos,
            mask: mask.to_dtype(DType::F32)?.contiguous()?,
            mask_rows,
        })
    }

    /// Attention output `[b, t, heads·d]` of the projections `q` `[b, t, heads·d]`, `k` and `v`
    /// `[b, t, kv_heads·d]` (f32, CPU); differentiable with respect to all three.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, self.clone())
    }

    fn check(&self, dims: &[usize], heads: usize, what: &str) -> Result<()> {
        if dims != [self.b, self.t, heads * self.head_dim] {
            candle_core::bail!(
                "fused attention: {what} is {dims:?}, expected [{}, {}, {}]",
                self.b,
                self.t,
                heads * self.head_dim
            );
        }
        Ok(())
    }

    fn rope_rows(&self, token: usize) -> (&[f32], &[f32]) {
        let d = self.head_dim;
        let p = self.pos[token] as usize;
        (&self.cos[p * d..(p + 1) * d], &self.sin[p * d..(p + 1) * d])
    }

    /// Rotated rows `[t, d]` of head column `col` (of `width` columns) of batch row `bi`.
    fn rotate_head(&self, x: &[f32], width: usize, bi: usize, col: usize, out: &mut [f32]) {
        let (t, d) = (self.t, self.head_dim);
        for i in 0..t {
            let tok = bi * t + i;
            let (cos, sin) = self.rope_rows(tok);
            let src = &x[tok * width + col * d..][..d];
            rotate(src, cos, sin, &mut out[i * d..(i + 1) * d]);
        }
    }

    /// Key range `[lo, hi)` each query row of `mask_row` may see (`lo >= hi`: none).
    fn key_ranges(&self, mask: &[f32]) -> Vec<(usize, usize)> {
        let t = self.t;
        (0..self.mask_rows * t)
            .map(|r| {
                let row = &mask[r * t..(r + 1) * t];
                let lo = row.iter().position(|m| m.is_finite()).unwrap_or(t);
                let hi = row.iter().rposition(|m| m.is_finite()).map_or(0, |j| j + 1);
                (lo, hi)
            })
            .collect()
    }

    /// The key span of query block `i0..i1` of batch row `bi`.
    fn block_span(ranges: &[(usize, usize)], base: usize, i0: usize, i1: usize) -> (usize, usize) {
        let rs = &ranges[base + i0..base + i1];
        let lo = rs.iter().map(|r| r.0).min().unwrap_or(0);
        let hi = rs.iter().map(|r| r.1).max().unwrap_or(0);
        (lo, hi)
    }

    /// `P = softmax(scale·Q_blk Kᵀ + mask)` over keys `lo..hi` into `p` (`[nq, hi - lo]`).
    #[allow(clippy::too_many_arguments)]
    fn probabilities(
        &self,
        qrot: &[f32],
        krot: &[f32],
        mask: &[f32],
        mask_base: usize,
        i0: usize,
        nq: usize,
        lo: usize,
        nk: usize,
        p: &mut [f32],
    ) {
        let (t, d) = (self.t, self.head_dim);
        let scale = 1.0 / (d as f32).sqrt();
        // SAFETY: p holds nq × nk; qrot rows i0.. and krot rows lo.. hold d floats each.
        unsafe {
            gemm_serial(
                nq,
                nk,
                d,
                p.as_mut_ptr(),
                1,
                nk as isize,
                false,
                qrot.as_ptr().add(i0 * d),
                1,
                d as isize,
                krot.as_ptr().add(lo * d),
                d as isize,
                1,
                0.0,
                1.0,
            )
        }
        for ii in 0..nq {
            let row = &mut p[ii * nk..(ii + 1) * nk];
            let m = &mask[(mask_base + i0 + ii) * t + lo..][..nk];
            softmax_row(row, m, scale);
        }
    }

    pub(crate) fn forward_cpu(&self, q: &[f32], k: &[f32], v: &[f32], mask: &[f32]) -> Vec<f32> {
        let _timed = crate::profile::part(crate::profile::Part::Attention);
        let (b, t, d, h) = (self.b, self.t, self.head_dim, self.heads);
        let (qw, kw) = (h * d, self.kv_heads * d);
        let g = h / self.kv_heads;
        let ranges = self.key_ranges(mask);
        let mut out = vec![0f32; b * t * qw];
        let optr = SharedMut(out.as_mut_ptr());
        (0..b * h).into_par_iter().for_each(|task| {
            let (bi, hi) = (task / h, task % h);
            let kv = hi / g;
            let mut qrot = vec![0f32; t * d];
            let mut krot = vec![0f32; t * d];
            let mut p = vec![0f32; BLOCK_Q * t];
            self.rotate_head(q, qw, bi, hi, &mut qrot);
            self.rotate_head(k, kw, bi, kv, &mut krot);
            let mask_base = if self.mask_rows == 1 { 0 } else { bi * t };
            for i0 in (0..t).step_by(BLOCK_Q) {
                let nq = BLOCK_Q.min(t - i0);
                let (lo, hi_k) = Self::block_span(&ranges, mask_base, i0, i0 + nq);
                if hi_k <= lo {
                    continue;
                }
                let nk = hi_k - lo;
                self.probabilities(&qrot, &krot, mask, mask_base, i0, nq, lo, nk, &mut p);
                // SAFETY: this task alone writes rows bi·t + i0.. of head column hi of `out`
                // ([b·t, qw] row-major); v rows lo.. of kv head `kv` are read with stride kw.
                unsafe {
                    gemm_serial(
                        nq,
                        d,
                        nk,
                        optr.ptr().add((bi * t + i0) * qw + hi * d),
                        1,
                        qw as isize,
                        false,
                        p.as_ptr(),
                        1,
                        nk as isize,
                        v.as_ptr().add((bi * t + lo) * kw + kv * d),
                        1,
                        kw as isize,
                        0.0,
                        1.0,
                    )
                }
            }
        });
        out
    }

    /// `(dq, dk, dv)` for the inputs `q, k, v`, output `o` and output gradient `dout`.
    pub(crate) fn backward_cpu(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o: &[f32],
        dout: &[f32],
        mask: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let _timed = crate::profile::part(crate::profile::Part::Attention);
        let (b, t, d, h, kvh) = (self.b, self.t, self.head_dim, self.heads, self.kv_heads);
        let (qw, kw) = (h * d, kvh * d);
        let g = h / kvh;
        let scale = 1.0 / (d as f32).sqrt();
        let ranges = self.key_ranges(mask);
        let mut dq = vec![0f32; b * t * qw];
        let mut dk = vec![0f32; b * t * kw];
        let mut dv = vec![0f32; b * t * kw];
        let (dqp, dkp, dvp) = (
            SharedMut(dq.as_mut_ptr()),
            SharedMut(dk.as_mut_ptr()),
            SharedMut(dv.as_mut_ptr()),
        );
        (0..b * kvh).into_par_iter().for_each(|task| {
            let (bi, kv) = (task / kvh, task % kvh);
            let mask_base = if self.mask_rows == 1 { 0 } else { bi * t };
            let mut krot = vec![0f32; t * d];
            let mut qrot = vec![0f32; t * d];
            let mut dk_acc = vec![0f32; t * d];
            let mut dv_acc = vec![0f32; t * d];
            let mut dq_h = vec![0f32; t * d];
            let mut p = vec![0f32; BLOCK_Q * t];
            let mut ds = vec![0f32; BLOCK_Q * t];
            let mut rowdot = vec![0f32; t];
            self.rotate_head(k, kw, bi, kv, &mut krot);
            let vbase = v[(bi * t) * kw + kv * d..].as_ptr();
            for hi in kv * g..(kv + 1) * g {
                self.rotate_head(q, qw, bi, hi, &mut qrot);
                let off = (bi * t) * qw + hi * d;
                for (i, r) in rowdot.iter_mut().enumerate() {
                    let a = &dout[off + i * qw..][..d];
                    let c = &o[off + i * qw..][..d];
                    *r = a.iter().zip(c).map(|(x, y)| x * y).sum();
                }
                for i0 in (0..t).step_by(BLOCK_Q) {
                    let nq = BLOCK_Q.min(t - i0);
                    let (lo, hi_k) = Self::block_span(&ranges, mask_base, i0, i0 + nq);
                    if hi_k <= lo {
                        dq_h[i0 * d..(i0 + nq) * d].fill(0.0);
                        continue;
                    }
                    let nk = hi_k - lo;
                    self.probabilities(&qrot, &krot, mask, mask_base, i0, nq, lo, nk, &mut p);
                    let dob = dout[off + i0 * qw..].as_ptr();
                    // SAFETY (all four products): buffers are task-local with the sizes
                    // allocated above; dout and v are read with their row strides qw and kw
                    // inside rows bi·t .. bi·t + t.
                    unsafe {
                        // dP = dO_blk · V[lo..hi]ᵀ  -> ds
                        gemm_serial(
                            nq,
                            nk,
                            d,
                            ds.as_mut_ptr(),
                            1,
                            nk as isize,
                            false,
                            dob,
                            1,
                            qw as isize,
                            vbase.add(lo * kw),
                            kw as isize,
                            1,
                            0.0,
                            1.0,
                        );
                        // dV[lo..hi] += Pᵀ · dO_blk
                        gemm_serial(
                            nk,
                            d,
                            nq,
                            dv_acc.as_mut_ptr().add(lo * d),
                            1,
                            d as isize,
                            true,
                            p.as_ptr(),
                            nk as isize,
                            1,
                            dob,
                            1,
                            qw as isize,
                            1.0,
                            1.0,
                        );
                    }
                    for ii in 0..nq {
                        let rd = rowdot[i0 + ii];
                        let pr = &p[ii * nk..(ii + 1) * nk];
                        for (s, &pv) in ds[ii * nk..(ii + 1) * nk].iter_mut().zip(pr) {
                            *s = pv * (*s - rd) * scale;
                        }
                    }
                    unsafe {
                        // dQ_blk = dS · K[lo..hi]
                        gemm_serial(
                            nq,
                            d,
                            nk,
                            dq_h.as_mut_ptr().add(i0 * d),
                            1,
                            d as isize,
                            false,
                            ds.as_ptr(),
                            1,
                            nk as isize,
                            krot.as_ptr().add(lo * d),
                            1,
                            d as isize,
                            0.0,
                            1.0,
                        );
                        // dK[lo..hi] += dSᵀ · Q_blk
                        gemm_serial(
                            nk,
                            d,
                            nq,
                            dk_acc.as_mut_ptr().add(lo * d),
                            1,
                            d as isize,
                            true,
                            ds.as_ptr(),
                            nk as isize,
                            1,
                            qrot.as_ptr().add(i0 * d),
                            1,
                            d as isize,
                            1.0,
                            1.0,
                        );
                    }
                }
                for i in 0..t {
                    let (cos, sin) = self.rope_rows(bi * t + i);
                    // SAFETY: this task alone owns head column hi of batch row bi in dq.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(dqp.ptr().add((bi * t + i) * qw + hi * d), d)
                    };
                    unrotate(&dq_h[i * d..(i + 1) * d], cos, sin, dst);
                }
            }
            for i in 0..t {
                let (cos, sin) = self.rope_rows(bi * t + i);
                let at = (bi * t + i) * kw + kv * d;
                // SAFETY: this task alone owns kv head column kv of batch row bi in dk and dv.
                let (dkr, dvr) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(dkp.ptr().add(at), d),
                        std::slice::from_raw_parts_mut(dvp.ptr().add(at), d),
                    )
                };
                unrotate(&dk_acc[i * d..(i + 1) * d], cos, sin, dkr);
                dvr.copy_from_slice(&dv_acc[i * d..(i + 1) * d]);
            }
        });
        (dq, dk, dv)
    }
}

/// HF's rotate-half RoPE of one head row: `x·cos + rotate_half(x)·sin`.
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        out[i] = x[i] * cos[i] - x[i + half] * sin[i];
        out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
    }
}

/// The transpose of [`rotate`] (its inverse), for gradients.
fn unrotate(dy: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = dy.len() / 2;
    for i in 0..half {
        out[i] = dy[i] * cos[i] + dy[i + half] * sin[i + half];
        out[i + half] = dy[i + half] * cos[i + half] - dy[i] * sin[i];
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _timed = crate::profile::part(crate::profile::Part::Attention);
        self.check(l1.dims(), self.heads, "q")?;
        self.check(l2.dims(), self.kv_heads, "k")?;
        self.check(l3.dims(), self.kv_heads, "v")?;
        if s1.dtype() != DType::F32 {
            candle_core::bail!("fused attention: f32 only, got {:?}", s1.dtype());
        }
        let (q, k, v) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let out = with_f32(&self.mask, |m| Ok(self.forward_cpu(q, k, v, m)))?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _timed = crate::profile::part(crate::profile::Part::Attention);
        let grad = grad_res.contiguous()?;
        let (dq, dk, dv) = with_f32(q, |q| {
            with_f32(k, |k| {
                with_f32(v, |v| {
                    with_f32(res, |o| {
                        with_f32(&grad, |dout| {
                            with_f32(&self.mask, |m| Ok(self.backward_cpu(q, k, v, o, dout, m)))
                        })
                    })
                })
            })
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.dims(), dev)?),
            Some(Tensor::from_vec(dk, k.dims(), dev)?),
            Some(Tensor::from_vec(dv, v.dims(), dev)?),
        ))
    }
}

/// One single-threaded f32 `gemm` call (the caller already runs on a rayon task per head):
/// `dst = alpha·dst + beta·lhs·rhs` with explicit column/row strides, no conjugation.
///
/// # Safety
/// The pointers and strides must describe valid, non-overlapping `m × k`, `k × n` and `m × n`
/// matrices, exactly as for [`gemm::gemm`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_serial(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_cs: isize,
    dst_rs: isize,
    read_dst: bool,
    lhs: *const f32,
    lhs_cs: isize,
    lhs_rs: isize,
    rhs: *const f32,
    rhs_cs: isize,
    rhs_rs: isize,
    alpha: f32,
    beta: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs,
        dst_rs,
        read_dst,
        lhs,
        lhs_cs,
        lhs_rs,
        rhs,
        rhs_cs,
        rhs_rs,
        alpha,
        beta,
        false,
        false,
        false,
        Parallelism::None,
    )
}

/// Lanes of the softmax reductions: independent partial maxima and sums let the loops
/// vectorize (a single running `max`/`sum` is a serial chain the compiler may not reorder).
const LANES: usize = 16;

/// `row = softmax(row · scale + mask)` in place; a row masked out entirely becomes 0.
fn softmax_row(row: &mut [f32], mask: &[f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 F (checked above).
        return unsafe { softmax_row_avx512(row, mask, scale) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { softmax_row_avx2(row, mask, scale) };
    }
    softmax_row_lanes(row, mask, scale)
}

/// [`softmax_row_lanes`] compiled for AVX2 (8 lanes), for CPUs without AVX-512. No FMA: Rust
/// does not fuse a separate multiply and add, so every variant gives the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn softmax_row_avx2(row: &mut [f32], mask: &[f32], scale: f32) {
    softmax_row_lanes(row, mask, scale)
}

/// [`softmax_row_lanes`] compiled for AVX-512 (16 lanes per instruction; the baseline build
/// has 4): the scalar loops it replaced took 10% of a training step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn softmax_row_avx512(row: &mut [f32], mask: &[f32], scale: f32) {
    softmax_row_lanes(row, mask, scale)
}

#[inline(always)]
fn softmax_row_lanes(row: &mut [f32], mask: &[f32], scale: f32) {
    let split = row.len() / LANES * LANES;
    let mut maxes = [f32::NEG_INFINITY; LANES];
    for (s, m) in row[..split]
        .chunks_exact_mut(LANES)
        .zip(mask[..split].chunks_exact(LANES))
    {
        for l in 0..LANES {
            s[l] = s[l] * scale + m[l];
            maxes[l] = if s[l] > maxes[l] { s[l] } else { maxes[l] };
        }
    }
    let mut max = maxes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for (s, &m) in row[split..].iter_mut().zip(&mask[split..]) {
        *s = *s * scale + m;
        max = max.max(*s);
    }
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let mut sums = [0f32; LANES];
    for s in row[..split].chunks_exact_mut(LANES) {
        for l in 0..LANES {
            s[l] = exp_f32(s[l] - max);
            sums[l] += s[l];
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for s in row[split..].iter_mut() {
        *s = exp_f32(*s - max);
        sum += *s;
    }
    let inv = 1.0 / sum;
    for s in row.iter_mut() {
        *s *= inv;
    }
}
