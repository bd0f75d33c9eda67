//! Inverted dropout whose mask is a pure function of `(seed, element index)`: a counter-based
//! hash (SplitMix64's finalizer) instead of a sequential RNG stream, so masks are generated in
//! parallel, never stored, and regenerated bit-identically by the backward, by activation
//! checkpointing's recompute and by a resumed run.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 16 * 1024;

/// `x · mask / (1 - p)`, with `mask_i = 0` with probability `p`.
#[derive(Clone, Copy, Debug)]
pub struct HashDropout {
    seed: u64,
    /// Elements with a hash below this are dropped (`p · 2^32`).
    threshold: u64,
    keep_scale: f32,
}

impl HashDropout {
    /// Dropout with probability `p` (in `[0, 1)`) and mask seed `seed`.
    pub fn new(p: f32, seed: u64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("dropout probability {p} is outside [0, 1)");
        }
        Ok(Self {
            seed,
            threshold: (p as f64 * (1u64 << 32) as f64) as u64,
            keep_scale: 1.0 / (1.0 - p),
        })
    }

    /// The 64-bit hash of element pair `j` (elements `2j` and `2j + 1`).
    #[inline(always)]
    fn pair_hash(&self, j: usize) -> u64 {
        mix(self.seed ^ (j as u64).wrapping_mul(GOLDEN))
    }

    /// Whether element `i` is kept: one hash serves two elements, the even one compares its
    /// high 32 bits with the threshold, the odd one its low 32 bits (SplitMix64's output bits
    /// are all well mixed, so the two draws are independent for our purposes; half the
    /// 64-bit multiplies, which CPUs without AVX-512 emulate).
    #[inline(always)]
    pub fn keeps(&self, i: usize) -> bool {
        let h = self.pair_hash(i >> 1);
        let bits = if i & 1 == 0 { h >> 32 } else { h & 0xFFFF_FFFF };
        bits >= self.threshold
    }

    /// The mask factor of element `i`: 0 or `1 / (1 - p)`.
    #[inline(always)]
    pub fn factor(&self, i: usize) -> f32 {
        if self.keeps(i) {
            self.keep_scale
        } else {
            0.0
        }
    }

    /// Apply to `x` (differentiable: the gradient goes through the same mask).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype() == DType::F32 && x.device().is_cpu() {
            return x.contiguous()?.apply_op1(*self);
        }
        let mask: Vec<f32> = (0..x.elem_count()).map(|i| self.factor(i)).collect();
        let mask = Tensor::from_vec(mask, x.dims(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }
}

impl HashDropout {
    /// `yc[i] = xc[i] · factor(base + i)`, or with `ACC` `yc[i] += xc[i] · factor(base + i)`;
    /// `base` is even, so element pairs line up with the hash pairs.
    #[inline(always)]
    fn apply<const ACC: bool>(&self, base: usize, xc: &[f32], yc: &mut [f32]) {
        debug_assert!(base.is_multiple_of(2));
        let put = |o: &mut f32, v: f32, keep: bool| {
            let d = if keep { v * self.keep_scale } else { 0.0 };
            *o = if ACC { *o + d } else { d };
        };
        let (x2, xt) = xc.split_at(xc.len() & !1);
        let (y2, yt) = yc.split_at_mut(x2.len());
        for (j, (o, v)) in y2.chunks_exact_mut(2).zip(x2.chunks_exact(2)).enumerate() {
            let h = self.pair_hash(base / 2 + j);
            put(&mut o[0], v[0], h >> 32 >= self.threshold);
            put(&mut o[1], v[1], h & 0xFFFF_FFFF >= self.threshold);
        }
        if let (Some(o), Some(&v)) = (yt.first_mut(), xt.first()) {
            put(o, v, self.keeps(base + x2.len()));
        }
    }

    /// [`Self::apply`] compiled for AVX-512, whose 64-bit multiply (`vpmullq`) the hash needs:
    /// the baseline build emulates it with 32-bit multiplies and spent 6.7% of a training step
    /// here. Integer arithmetic, so the mask is bit-identical.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    fn apply_avx512<const ACC: bool>(&self, base: usize, xc: &[f32], yc: &mut [f32]) {
        self.apply::<ACC>(base, xc, yc)
    }

    /// [`Self::apply`] for AVX2 CPUs without AVX-512, written out: the compiler keeps the
    /// emulated 64-bit multiplies scalar (it spent 5.7% of a training step here, one element
    /// pair at a time). Four hash pairs (eight elements) per iteration, each 64-bit multiply by
    /// a constant built from three 32-bit ones; integer arithmetic, so the mask is
    /// bit-identical to [`Self::keeps`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn apply_avx2<const ACC: bool>(&self, base: usize, xc: &[f32], yc: &mut [f32]) {
        use std::arch::x86_64::*;
        /// `a · b mod 2^64` per lane, `b_hi` = `b >> 32`.
        #[target_feature(enable = "avx2")]
        #[inline]
        fn mul64(a: __m256i, b: __m256i, b_hi: __m256i) -> __m256i {
            let lo = _mm256_mul_epu32(a, b);
            let cross = _mm256_add_epi64(
                _mm256_mul_epu32(_mm256_srli_epi64::<32>(a), b),
                _mm256_mul_epu32(a, b_hi),
            );
            _mm256_add_epi64(lo, _mm256_slli_epi64::<32>(cross))
        }
        let n = xc.len().min(yc.len());
        let n8 = n / 8 * 8;
        let c = |v: u64| _mm256_set1_epi64x(v as i64);
        let golden = c(GOLDEN);
        let (m1, m1_hi) = (c(MIX1), c(MIX1 >> 32));
        let (m2, m2_hi) = (c(MIX2), c(MIX2 >> 32));
        let seed = c(self.seed);
        let j0 = (base / 2) as u64;
        let jg = |k: u64| (j0 + k).wrapping_mul(GOLDEN) as i64;
        let mut pairs = _mm256_setr_epi64x(jg(0), jg(1), jg(2), jg(3));
        let step = c(GOLDEN.wrapping_mul(4));
        let threshold = _mm256_set1_epi32(self.threshold as u32 as i32);
        let scale = _mm256_set1_ps(self.keep_scale);
        for i in (0..n8).step_by(8) {
            // mix(seed ^ j·G) for the four pairs j of these eight elements.
            let z = _mm256_add_epi64(_mm256_xor_si256(seed, pairs), golden);
            let z = mul64(_mm256_xor_si256(z, _mm256_srli_epi64::<30>(z)), m1, m1_hi);
            let z = mul64(_mm256_xor_si256(z, _mm256_srli_epi64::<27>(z)), m2, m2_hi);
            let h = _mm256_xor_si256(z, _mm256_srli_epi64::<31>(z));
            // Element 2j takes the pair's high half, 2j + 1 its low half: swap the halves.
            let bits = _mm256_shuffle_epi32::<0xB1>(h);
            // Unsigned bits >= threshold.
            let keep = _mm256_cmpeq_epi32(_mm256_max_epu32(bits, threshold), bits);
            // SAFETY: i + 8 <= n8 <= both lengths.
            unsafe {
                let x = _mm256_loadu_ps(xc.as_ptr().add(i));
                let mut d = _mm256_and_ps(_mm256_mul_ps(x, scale), _mm256_castsi256_ps(keep));
                let out = yc.as_mut_ptr().add(i);
                if ACC {
                    d = _mm256_add_ps(_mm256_loadu_ps(out), d);
                }
                _mm256_storeu_ps(out, d);
            }
            pairs = _mm256_add_epi64(pairs, step);
        }
        self.apply::<ACC>(base + n8, &xc[n8..n], &mut yc[n8..n]);
    }

    /// `y = dropout(x)` (or `y += dropout(x)` with `ACC`) over whole contiguous buffers of the
    /// same length, multi-threaded; element `i` of `x` gets the mask of element `i`.
    pub fn apply_par<const ACC: bool>(&self, x: &[f32], y: &mut [f32]) {
        debug_assert_eq!(x.len(), y.len());
        #[cfg(target_arch = "x86_64")]
        let wide = is_x86_feature_detected!("avx512dq") && is_x86_feature_detected!("avx512vl");
        #[cfg(target_arch = "x86_64")]
        let avx2 = is_x86_feature_detected!("avx2");
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (yc, xc))| {
                #[cfg(target_arch = "x86_64")]
                if wide {
                    // SAFETY: the CPU has AVX-512 DQ and VL (checked above).
                    return unsafe { self.apply_avx512::<ACC>(c * CHUNK, xc, yc) };
                }
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: the CPU has AVX2 (checked above).
                    return unsafe { self.apply_avx2::<ACC>(c * CHUNK, xc, yc) };
                }
                self.apply::<ACC>(c * CHUNK, xc, yc)
            });
    }
}

/// SplitMix64's increment (the golden ratio) and its two multipliers.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
const MIX1: u64 = 0xBF58_476D_1CE4_E5B9;
const MIX2: u64 = 0x94D0_49BB_1331_11EB;

/// SplitMix64's output function: a bijective mix with full avalanche.
#[inline(always)]
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(MIX1);
    z = (z ^ (z >> 27)).wrapping_mul(MIX2);
    z ^ (z >> 31)
}

impl CustomOp1 for HashDropout {
    fn name(&self) -> &'static str {
        "hash-dropout"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = crate::cpu_tensor::f32_slice(storage, layout)?;
        let mut y = vec![0f32; x.len()];
        self.apply_par::<false>(x, &mut y);
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.forward(grad_res)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn drops_about_p_and_backward_uses_the_same_mask() {
        let n = 200_001; // odd: the last element has no pair partner
        let d = HashDropout::new(0.1, 7).unwrap();
        let dropped = (0..n).filter(|&i| !d.keeps(i)).count() as f64 / n as f64;
        assert!((dropped - 0.1).abs() < 0.005, "dropped fraction {dropped}");
        // The two elements of a hash pair are drawn independently: both dropped ~ p².
        let both = (0..n / 2)
            .filter(|&j| !d.keeps(2 * j) && !d.keeps(2 * j + 1))
            .count() as f64
            / (n / 2) as f64;
        assert!(
            (both - 0.01).abs() < 0.002,
            "both of a pair dropped: {both}"
        );
        let x = Var::from_tensor(&Tensor::ones(n, DType::F32, &Device::Cpu).unwrap()).unwrap();
        let y = d.forward(x.as_tensor()).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap();
        // d(sum(x·m))/dx = m = y for x = 1.
        let diff = (gx - &y).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        let yv = y.to_vec1::<f32>().unwrap();
        assert!(yv.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-7));
        // The op (vectorized where the CPU allows) drops exactly the elements `keeps` says.
        assert!(yv
            .iter()
            .enumerate()
            .all(|(i, &v)| (v != 0.0) == d.keeps(i)));
        // Another seed gives another mask; the same seed the same one.
        let other = HashDropout::new(0.1, 8).unwrap();
        assert!((0..1000).any(|i| other.keeps(i) != d.keeps(i)));
        let again = HashDropout::new(0.1, 7).unwrap();
        assert!((0..n).all(|i| again.keeps(i) == d.keeps(i)));
    }

    /// The accumulating form adds exactly `x · factor(i)` to what is there, element by element,
    /// for values that are not all one (so a wrong scale or a lost element shows).
    #[test]
    fn accumulating_apply_adds_the_masked_input() {
        let n = 3 * CHUNK + 13;
        let d = HashDropout::new(0.3, 11).unwrap();
        let x: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 0.25 - 3.0).collect();
        let y0: Vec<f32> = (0..n).map(|i| (i % 13) as f32).collect();
        let mut y = y0.clone();
        d.apply_par::<true>(&x, &mut y);
        for i in 0..n {
            let want = y0[i] + x[i] * d.factor(i);
            assert_eq!(y[i], want, "element {i}");
        }
        let mut z = vec![f32::NAN; n];
        d.apply_par::<false>(&x, &mut z);
        assert!((0..n).all(|i| z[i] == x[i] * d.factor(i)));
    }
}
