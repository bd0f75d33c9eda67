//! A LoRA linear layer as one CPU op: `y = x · W0ᵀ + s · (dropout(x) · Aᵀ) · Bᵀ`.
//!
//! The composite version (`LoraAdapter::delta` plus an add) is seven graph nodes: the base
//! product, the dropout, two casts, two matmuls, a scale and the sum. Each large one allocates a
//! fresh `[m, out]` or `[m, in]` tensor, and in the backward candle zeroes and sums a gradient
//! for every one of them, and sums the two input gradients (base and adapter) of `x`. Here the
//! forward adds the low-rank term into the base product's buffer, and the backward computes
//! `dx`, `dA` and `dB` in one pass: the dropout mask is a pure function of the element index
//! (see [`HashDropout`]), so it is regenerated rather than kept, and `dx` takes the adapter's
//! share in place.
//!
//! With `u = dropout(x) · Aᵀ` (`[m, r]`) and `du = s · dy · B`:
//! `dB = s · dyᵀ · u`, `dA = duᵀ · dropout(x)`, `dx = dy · W0 + mask ∘ (du · A)`.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use qlora_quant::{cpu as quant_cpu, Nf4Tensor};

use super::dropout::HashDropout;
use crate::cpu_tensor::{f32_slice, with_f32};
use crate::frozen::BaseWeight;

/// The frozen weight as the op multiplies it.
#[derive(Clone, Debug)]
enum Base {
    Quantized(Arc<Nf4Tensor>),
    /// Dense f32 `[out, in]`, contiguous.
    Dense(Tensor),
}

/// `x · W0ᵀ + s · (dropout(x) · Aᵀ) · Bᵀ` with its backward for `x`, `A` and `B`.
#[derive(Clone, Debug)]
pub struct FusedLoraLinear {
    base: Base,
    scale: f32,
    dropout: Option<HashDropout>,
    threads: usize,
}

impl FusedLoraLinear {
    /// The op for `base`, if it can run it: `x` f32 on the CPU and a base that is 4-bit or a
    /// contiguous f32 CPU tensor. `None` means: use the composite path.
    pub fn new(
        base: &BaseWeight,
        x: &Tensor,
        scale: f64,
        dropout: Option<HashDropout>,
    ) -> Option<Self> {
        if x.dtype() != DType::F32 || !x.device().is_cpu() {
            return None;
        }
        Self::on_host(base, scale, dropout)
    }

    /// The op for `base` on host f32 slices (the hand-written layer step), if the base is one
    /// the op multiplies.
    pub(crate) fn on_host(
        base: &BaseWeight,
        scale: f64,
        dropout: Option<HashDropout>,
    ) -> Option<Self> {
        let base = match base {
            BaseWeight::Quantized(w) => Base::Quantized(w.clone()),
            BaseWeight::Dense(w)
                if w.dtype() == DType::F32 && w.device().is_cpu() && w.is_contiguous() =>
            {
                Base::Dense(w.clone())
            }
            BaseWeight::Dense(_) => return None,
        };
        Some(Self {
            base,
            scale: scale as f32,
            dropout,
            threads: rayon::current_num_threads(),
        })
    }

    /// Apply to `x` `[m, in]` with the adapter's `a` `[r, in]` and `b` `[out, r]` (any float
    /// dtype: cast to f32 here, so the cast's backward rounds their gradients back).
    pub fn forward(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
        x.contiguous()?.apply_op3(&f32(a)?, &f32(b)?, self.clone())
    }

    /// `(out, in)` of the base.
    fn base_shape(&self) -> Result<(usize, usize)> {
        match &self.base {
            Base::Quantized(w) => w.dims2().map_err(candle_core::Error::wrap),
            Base::Dense(w) => w.dims2(),
        }
    }

    /// `(m, in, out, r)` after checking the three shapes against the base.
    fn dims(&self, x: &[usize], a: &[usize], b: &[usize]) -> Result<(usize, usize, usize, usize)> {
        let (out, inp) = self.base_shape()?;
        let (&[m, xi], &[r, ai], &[bo, br]) = (x, a, b) else {
            candle_core::bail!("fused lora: expected x [m, in], A [r, in], B [out, r], got x {x:?}, A {a:?}, B {b:?}")
        };
        if xi != inp || ai != inp || bo != out || br != r {
            candle_core::bail!(
                "fused lora: x {x:?}, A {a:?}, B {b:?} do not fit a base of [{out}, {inp}]"
            );
        }
        Ok((m, inp, out, r))
    }

    fn parallelism(&self) -> Parallelism {
        if self.threads > 1 {
            Parallelism::Rayon(self.threads)
        } else {
            Parallelism::None
        }
    }

    /// `y[m, out] = x · W0ᵀ`, or with `transposed` `dx[m, in] = dy · W0`.
    pub(crate) fn base_product(
        &self,
        input: &[f32],
        m: usize,
        output: &mut [f32],
        transposed: bool,
    ) -> Result<()> {
        let _timed = crate::profile::part(crate::profile::Part::BaseProduct);
        match &self.base {
            Base::Quantized(w) => if transposed {
                quant_cpu::matmul_t_into(input, m, w, output)
            } else {
                quant_cpu::matmul_into(input, m, w, output)
            }
            .map_err(candle_core::Error::wrap),
            Base::Dense(w) => with_f32(w, |w| {
                let (k, n) = (input.len() / m.max(1), output.len() / m.max(1));
                let (_, inp) = self.base_shape()?;
                // W is [out, in] row-major: read as Wᵀ for the forward.
                let rhs = if transposed {
                    Mat::row_major(w, inp)
                } else {
                    Mat::transposed(w, inp)
                };
                self.gemm((m, n, k), output, false, Mat::row_major(input, k), rhs, 1.0);
                Ok(())
            }),
        }
    }

    /// `dst[m, n] (+)= beta · lhs[m, k] · rhs[k, n]`, `dst` row-major. Panics if an operand's
    /// slice is too short for its shape and strides (a bug in this file, not bad input: every
    /// shape was checked against the base by [`Self::dims`]).
    fn gemm(
        &self,
        (m, n, k): (usize, usize, usize),
        dst: &mut [f32],
        accumulate: bool,
        lhs: Mat<'_>,
        rhs: Mat<'_>,
        beta: f32,
    ) {
        assert!(
            dst.len() >= m * n && lhs.holds(m, k) && rhs.holds(k, n),
            "fused lora: gemm operands too short for {m} x {k} x {n}"
        );
        // SAFETY: the assertion above: every element the strides address lies in its slice.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                accumulate,
                lhs.data.as_ptr(),
                lhs.cs,
                lhs.rs,
                rhs.data.as_ptr(),
                rhs.cs,
                rhs.rs,
                1.0,
                beta,
                false,
                false,
                false,
                self.parallelism(),
            )
        }
    }

    /// `dropout(x)` if the op drops, else `x` itself.
    fn dropped<'a>(&self, x: &'a [f32], scratch: &'a mut Vec<f32>) -> &'a [f32] {
        match &self.dropout {
            Some(d) => {
                scratch.resize(x.len(), 0.0);
                d.apply_par::<false>(x, scratch);
                scratch
            }
            None => x,
        }
    }

    /// `u = dropout(x) · Aᵀ` (`[m, r]`) from the dropped-out input `xd`.
    fn down(&self, xd: &[f32], a: &[f32], dims: Dims) -> Vec<f32> {
        let Dims { m, inp, r, .. } = dims;
        let mut u = vec![0f32; m * r];
        let (lhs, rhs) = (Mat::row_major(xd, inp), Mat::transposed(a, inp));
        self.gemm((m, r, inp), &mut u, false, lhs, rhs, 1.0);
        u
    }

    pub(crate) fn forward_cpu(
        &self,
        x: &[f32],
        a: &[f32],
        b: &[f32],
        dims: Dims,
    ) -> Result<Vec<f32>> {
        let _timed = crate::profile::part(crate::profile::Part::AdapterProduct);
        let Dims { m, out, r, .. } = dims;
        let mut y = vec![0f32; m * out];
        self.base_product(x, m, &mut y, false)?;
        let mut scratch = Vec::new();
        let u = self.down(self.dropped(x, &mut scratch), a, dims);
        // y += s · u · Bᵀ
        let (lhs, rhs) = (Mat::row_major(&u, r), Mat::transposed(b, r));
        self.gemm((m, out, r), &mut y, true, lhs, rhs, self.scale);
        Ok(y)
    }

    /// `(dx, dA, dB)` for the upstream gradient `dy` `[m, out]`.
    pub(crate) fn backward_cpu(
        &self,
        x: &[f32],
        a: &[f32],
        b: &[f32],
        dy: &[f32],
        dims: Dims,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let _timed = crate::profile::part(crate::profile::Part::AdapterProduct);
        let Dims { m, inp, out, r } = dims;
        let mut scratch = Vec::new();
        let xd = self.dropped(x, &mut scratch);
        let u = self.down(xd, a, dims);
        let (mut du, mut da, mut db) =
            (vec![0f32; m * r], vec![0f32; r * inp], vec![0f32; out * r]);
        // du = s · dy · B
        let (dy_m, b_m) = (Mat::row_major(dy, out), Mat::row_major(b, r));
        self.gemm((m, r, out), &mut du, false, dy_m, b_m, self.scale);
        // dB = s · dyᵀ · u
        let (dyt, u_m) = (Mat::transposed(dy, out), Mat::row_major(&u, r));
        self.gemm((out, r, m), &mut db, false, dyt, u_m, self.scale);
        // dA = duᵀ · xd
        let (dut, xd_m) = (Mat::transposed(&du, r), Mat::row_major(xd, inp));
        self.gemm((r, inp, m), &mut da, false, dut, xd_m, 1.0);

        let mut dx = vec![0f32; m * inp];
        self.base_product(dy, m, &mut dx, true)?;
        // dx += mask ∘ (du · A): straight into dx without dropout, else through the scratch
        // (xd is no longer needed) and the mask.
        let (du_m, a_m) = (Mat::row_major(&du, r), Mat::row_major(a, inp));
        match &self.dropout {
            None => self.gemm((m, inp, r), &mut dx, true, du_m, a_m, 1.0),
            Some(d) => {
                let mut t = scratch;
                t.resize(m * inp, 0.0);
                self.gemm((m, inp, r), &mut t, false, du_m, a_m, 1.0);
                d.apply_par::<true>(&t, &mut dx);
            }
        }
        Ok((dx, da, db))
    }
}

/// Shapes of one call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub(crate) m: usize,
    pub(crate) inp: usize,
    pub(crate) out: usize,
    pub(crate) r: usize,
}

/// A matrix operand: its data and `gemm`'s column and row strides.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    cs: isize,
    rs: isize,
}

impl<'a> Mat<'a> {
    /// Row-major with `cols` columns.
    fn row_major(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            cs: 1,
            rs: cols as isize,
        }
    }

    /// The transpose of a row-major matrix with `cols` columns.
    fn transposed(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            cs: cols as isize,
            rs: 1,
        }
    }

    /// Whether the slice holds every element of a `rows × cols` view with these strides.
    fn holds(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (rows - 1) * (self.rs as usize) + (cols - 1) * (self.cs as usize) < self.data.len()
    }
}

impl CustomOp3 for FusedLoraLinear {
    fn name(&self) -> &'static str {
        "fused-lora-linear"
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
        let _timed = crate::profile::part(crate::profile::Part::AdapterProduct);
        let (m, inp, out, r) = self.dims(l1.dims(), l2.dims(), l3.dims())?;
        let (x, a, b) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let y = self.forward_cpu(x, a, b, Dims { m, inp, out, r })?;
        Ok((CpuStorage::F32(y), Shape::from((m, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _timed = crate::profile::part(crate::profile::Part::AdapterProduct);
        let (m, inp, out, r) = self.dims(x.dims(), a.dims(), b.dims())?;
        let dims = Dims { m, inp, out, r };
        let dy = grad_res.contiguous()?;
        let (dx, da, db) = with_f32(x, |x| {
            with_f32(a, |a| {
                with_f32(b, |b| {
                    with_f32(&dy, |dy| self.backward_cpu(x, a, b, dy, dims))
                })
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (m, inp), dev)?),
            Some(Tensor::from_vec(da, (r, inp), dev)?),
            Some(Tensor::from_vec(db, (out, r), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::{DropoutSeed, LoraAdapter};
    use candle_core::{Device, Var};
    use qlora_quant::{QuantType, SourceDtype};

    fn adapter(out: usize, inp: usize, r: usize, dropout: f32, dtype: DType) -> LoraAdapter {
        let dev = Device::Cpu;
        let var = |t: Tensor| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap();
        let seed = DropoutSeed::default();
        seed.set(11);
        LoraAdapter {
            a: var(Tensor::randn(0f32, 0.3, (r, inp), &dev).unwrap()),
            b: var(Tensor::randn(0f32, 0.3, (out, r), &dev).unwrap()),
            scale: 1.75,
            dropout,
            magnitude: None,
            e: None,
            dropout_key: 5,
            dropout_seed: seed,
        }
    }

    fn bases(out: usize, inp: usize) -> Vec<BaseWeight> {
        let w = Tensor::randn(0f32, 0.5, (out, inp), &Device::Cpu).unwrap();
        let flat = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let q = Nf4Tensor::quantize(
            &flat,
            &[out, inp],
            SourceDtype::F32,
            QuantType::Nf4,
            64,
            true,
        )
        .unwrap();
        vec![BaseWeight::Dense(w), BaseWeight::Quantized(Arc::new(q))]
    }

    /// Largest |a - b| over the largest |b|.
    fn rel_gap(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.to_dtype(DType::F32).unwrap();
        let b = b.to_dtype(DType::F32).unwrap();
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let gap = (a - &b).unwrap().abs().unwrap().max_all().unwrap();
        gap.to_scalar::<f32>().unwrap() / scale.max(f32::MIN_POSITIVE)
    }

    /// Output and the gradients of `Σ y ⊙ g` for x, A and B.
    fn run(
        base: &BaseWeight,
        ad: &LoraAdapter,
        x: &Var,
        g: &Tensor,
        fused: bool,
        train: bool,
    ) -> [Tensor; 4] {
        let xt = x.as_tensor();
        let y = if fused {
            ad.fused_output(base, xt, train)
                .unwrap()
                .expect("fused op applies")
        } else {
            (base.matmul_t(xt).unwrap() + ad.delta(xt, train).unwrap()).unwrap()
        };
        let grads = (y.clone() * g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let get = |t: &Tensor| grads.get(t).expect("gradient").clone();
        [y, get(xt), get(ad.a.as_tensor()), get(ad.b.as_tensor())]
    }

    #[test]
    fn equals_the_composite_layer_and_its_gradients() {
        // Odd sizes, short NF4 blocks, the GEMV path (m = 3) and the panel path (m = 37).
        let (out, inp, r) = (45, 70, 5);
        for base in bases(out, inp) {
            for m in [3, 37] {
                for (dropout, train) in [(0.0, true), (0.25, true), (0.25, false)] {
                    let ad = adapter(out, inp, r, dropout, DType::F32);
                    let x = Var::randn(0f32, 1.0, (m, inp), &Device::Cpu).unwrap();
                    let g = Tensor::randn(0f32, 1.0, (m, out), &Device::Cpu).unwrap();
                    let want = run(&base, &ad, &x, &g, false, train);
                    let got = run(&base, &ad, &x, &g, true, train);
                    for (what, (w, h)) in ["y", "dx", "dA", "dB"].iter().zip(want.iter().zip(&got))
                    {
                        let gap = rel_gap(h, w);
                        assert!(
                            gap < 1e-5,
                            "{what}: gap {gap} (m {m}, dropout {dropout}, train {train}, {})",
                            matches!(base, BaseWeight::Quantized(_))
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn dropout_in_training_changes_the_output_and_is_regenerated_in_the_backward() {
        let (out, inp, r, m) = (16, 32, 4, 9);
        let base = bases(out, inp).remove(1);
        let ad = adapter(out, inp, r, 0.5, DType::F32);
        let x = Var::randn(0f32, 1.0, (m, inp), &Device::Cpu).unwrap();
        let g = Tensor::randn(0f32, 1.0, (m, out), &Device::Cpu).unwrap();
        let [train, ..] = run(&base, &ad, &x, &g, true, true);
        let [eval, ..] = run(&base, &ad, &x, &g, true, false);
        assert!(rel_gap(&train, &eval) > 1e-3);
        // A new seed draws a new mask; the old seed the old one.
        ad.dropout_seed.set(12);
        let [other, ..] = run(&base, &ad, &x, &g, true, true);
        assert!(rel_gap(&other, &train) > 1e-3);
        ad.dropout_seed.set(11);
        let [again, ..] = run(&base, &ad, &x, &g, true, true);
        assert_eq!(rel_gap(&again, &train), 0.0);
    }

    #[test]
    fn bf16_adapters_get_bf16_gradients() {
        let (out, inp, r, m) = (24, 40, 8, 13);
        let base = bases(out, inp).remove(1);
        let ad = adapter(out, inp, r, 0.1, DType::BF16);
        let x = Var::randn(0f32, 1.0, (m, inp), &Device::Cpu).unwrap();
        let g = Tensor::randn(0f32, 1.0, (m, out), &Device::Cpu).unwrap();
        let want = run(&base, &ad, &x, &g, false, true);
        let got = run(&base, &ad, &x, &g, true, true);
        // y and dx are f32 math on the same bf16 weights: 1e-5. dA and dB are f32 sums in
        // another order, then rounded to bf16: at most one bf16 step (2^-8) of the largest.
        for (i, (w, h)) in want.iter().zip(&got).enumerate() {
            assert_eq!(h.dtype(), w.dtype());
            let limit = if i < 2 { 1e-5 } else { 1.0 / 256.0 };
            assert!(rel_gap(h, w) < limit, "output {i}: {}", rel_gap(h, w));
        }
        assert_eq!(got[2].dtype(), DType::BF16);
    }

    #[test]
    fn refuses_shapes_that_do_not_fit_the_base() {
        let base = bases(6, 8).remove(0);
        let op = FusedLoraLinear::new(
            &base,
            &Tensor::zeros((2, 8), DType::F32, &Device::Cpu).unwrap(),
            1.0,
            None,
        )
        .unwrap();
        let x = Tensor::zeros((2, 8), DType::F32, &Device::Cpu).unwrap();
        let a = Tensor::zeros((3, 7), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((6, 3), DType::F32, &Device::Cpu).unwrap();
        let err = op.forward(&x, &a, &b).unwrap_err().to_string();
        assert!(err.contains("do not fit a base of [6, 8]"), "{err}");
    }
}
