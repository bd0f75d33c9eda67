//! The AdamW update over f32 slices, element by element in the order and f32 roundings of
//! `torch.optim.AdamW(foreach=False)` on CPU. Every state storage runs this one function, so a
//! paged run is bit-identical to a plain one however its windows fall.

use rayon::prelude::*;

use super::adamw::AdamWConfig;
use super::blockwise8::{dequantize_block, quantize_block, Blockwise8, BLOCK};

/// Elements per rayon task: small enough to spread a LoRA matrix over the cores, large enough
/// that scheduling is noise next to the arithmetic.
const PAR_GRAIN: usize = 1 << 14;

/// The scalars of one step for one parameter, rounded to f32 where torch rounds them (Python
/// floats meet f32 tensors as f32 scalars).
#[derive(Clone, Copy, Debug)]
pub struct StepScalars {
    pub(crate) decay: Option<f32>,
    pub(crate) lerp_w: f32,
    pub(crate) beta2: f32,
    pub(crate) one_minus_beta2: f32,
    pub(crate) bc2_sqrt: f32,
    pub(crate) eps: f32,
    pub(crate) neg_step_size: f32,
}

impl StepScalars {
    /// Scalars of step `step` (1-based) at learning rate `lr`.
    pub fn new(cfg: &AdamWConfig, lr: f64, step: u64) -> Self {
        // torch's step counter is a float and Python's `**` is C `pow`.
        let t = step as f64;
        let bias_correction1 = 1.0 - cfg.beta1.powf(t);
        let bias_correction2 = 1.0 - cfg.beta2.powf(t);
        Self {
            decay: (cfg.weight_decay != 0.0).then_some((1.0 - lr * cfg.weight_decay) as f32),
            lerp_w: (1.0 - cfg.beta1) as f32,
            beta2: cfg.beta2 as f32,
            one_minus_beta2: (1.0 - cfg.beta2) as f32,
            bc2_sqrt: bias_correction2.sqrt() as f32,
            eps: cfg.eps as f32,
            neg_step_size: (-(lr / bias_correction1)) as f32,
        }
    }
}

/// One element: `p *= 1 - lr wd; m.lerp_(g, 1 - b1); v = v b2 + (1 - b2) g g;
/// p += -step_size m / (sqrt(v) / sqrt(bc2) + eps)`.
#[inline(always)]
fn update_element(p: &mut f32, g: f32, m: &mut f32, v: &mut f32, s: &StepScalars) {
    let mut w = *p;
    if let Some(d) = s.decay {
        w *= d;
    }
    // torch's vectorised lerp is one fused multiply-add from the nearer end.
    let diff = g - *m;
    let mn = if s.lerp_w < 0.5 {
        s.lerp_w.mul_add(diff, *m)
    } else {
        (s.lerp_w - 1.0).mul_add(diff, g)
    };
    // mul_ then addcmul_ (value * t1 * t2, left to right, as written in torch's kernel). The PEFT
    // fixture cannot tell fused from unfused forms here (every variant of m, v and p lands
    // within 2.6e-5 worst / 2.6e-8 rms of its final adapter), so we follow torch's source.
    let vn = *v * s.beta2 + s.one_minus_beta2 * g * g;
    let denom = vn.sqrt() / s.bc2_sqrt + s.eps;
    // addcdiv_: self + value * t1 / t2.
    *p = w + s.neg_step_size * mn / denom;
    *m = mn;
    *v = vn;
}

#[inline(always)]
fn update_slices(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &StepScalars) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        update_element(p, g, m, v, s);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn update_slices_fma(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    s: &StepScalars,
) {
    update_slices(p, g, m, v, s)
}

/// Update on the calling thread. `mul_add` is exact either way; with FMA hardware it is one
/// instruction and the loop vectorises, without it a libm call.
pub fn update_serial(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &StepScalars) {
    assert!(g.len() == p.len() && m.len() == p.len() && v.len() == p.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { update_slices_fma(p, g, m, v, s) };
    }
    update_slices(p, g, m, v, s)
}

/// Update `p` (parameter), `m`, `v` in place from gradient `g`, all of one length, on the rayon
/// pool when the slices are long.
pub fn update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &StepScalars) {
    assert!(g.len() == p.len() && m.len() == p.len() && v.len() == p.len());
    if p.len() < 2 * PAR_GRAIN {
        return update_serial(p, g, m, v, s);
    }
    p.par_chunks_mut(PAR_GRAIN)
        .zip(g.par_chunks(PAR_GRAIN))
        .zip(m.par_chunks_mut(PAR_GRAIN))
        .zip(v.par_chunks_mut(PAR_GRAIN))
        .for_each(|(((p, g), m), v)| update_serial(p, g, m, v, s));
}

/// The same update with 8-bit blockwise moments: per block, dequantize `m` and `v`, update
/// in f32 exactly as [`update`], requantize with the block's new absmax (what bitsandbytes'
/// CPU 8-bit blockwise optimizer does).
pub fn update_blockwise8(
    p: &mut [f32],
    g: &[f32],
    m: &mut Blockwise8,
    v: &mut Blockwise8,
    s: &StepScalars,
) {
    assert!(g.len() == p.len() && m.len() == p.len() && v.len() == p.len());
    let (mcode, vcode) = (m.code(), v.code());
    p.par_chunks_mut(BLOCK)
        .zip(g.par_chunks(BLOCK))
        .zip(m.codes.par_chunks_mut(BLOCK))
        .zip(v.codes.par_chunks_mut(BLOCK))
        .zip(m.absmax.par_iter_mut())
        .zip(v.absmax.par_iter_mut())
        .with_min_len(PAR_GRAIN / BLOCK)
        .for_each(|(((((p, g), mc), vc), ma), va)| {
            let n = p.len();
            let (mut mf, mut vf) = ([0f32; BLOCK], [0f32; BLOCK]);
            let (mf, vf) = (&mut mf[..n], &mut vf[..n]);
            dequantize_block(mc, *ma, mcode, mf);
            dequantize_block(vc, *va, vcode, vf);
            update_serial(p, g, mf, vf, s);
            *ma = quantize_block(mf, mcode, mc);
            *va = quantize_block(vf, vcode, vc);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torch's formula written out with no attention to speed, as the reference.
    fn reference(p: f32, g: f32, m: f32, v: f32, cfg: &AdamWConfig, lr: f64, t: u64) -> [f32; 3] {
        let s = StepScalars::new(cfg, lr, t);
        let p = match s.decay {
            Some(d) => p * d,
            None => p,
        };
        let m = m + (1.0 - cfg.beta1) as f32 * (g - m);
        let v = v * cfg.beta2 as f32 + (1.0 - cfg.beta2) as f32 * g * g;
        let step_size = lr / (1.0 - cfg.beta1.powf(t as f64));
        let bc2 = (1.0 - cfg.beta2.powf(t as f64)).sqrt();
        let p = p - step_size as f32 * m / (v.sqrt() / bc2 as f32 + cfg.eps as f32);
        [p, m, v]
    }

    #[test]
    fn matches_the_written_out_formula_closely_and_itself_exactly() {
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let n = 3 * PAR_GRAIN + 5;
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let mut p: Vec<f32> = (0..n).map(|i| ((i * 13) % 97) as f32 / 97.0).collect();
        let (mut m, mut v) = (vec![0.01f32; n], vec![0.002f32; n]);
        let (p0, m0, v0) = (p.clone(), m.clone(), v.clone());
        let s = StepScalars::new(&cfg, 1e-3, 3);
        update(&mut p, &g, &mut m, &mut v, &s);
        for i in 0..n {
            let [rp, rm, rv] = reference(p0[i], g[i], m0[i], v0[i], &cfg, 1e-3, 3);
            assert!((p[i] - rp).abs() <= 1e-6 * rp.abs().max(1e-3), "p[{i}]");
            assert!((m[i] - rm).abs() <= 2e-7 * rm.abs() + 1e-8, "m[{i}]");
            assert_eq!(v[i], rv, "v[{i}]");
        }
        // Serial, in odd-sized pieces: the same bits.
        let (mut p2, mut m2, mut v2) = (p0.clone(), m0.clone(), v0.clone());
        let mut off = 0;
        for len in [1, 4095, 7, 20000, n] {
            let e = (off + len).min(n);
            update_serial(
                &mut p2[off..e],
                &g[off..e],
                &mut m2[off..e],
                &mut v2[off..e],
                &s,
            );
            off = e;
        }
        assert_eq!(off, n);
        assert!(p.iter().zip(&p2).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(m.iter().zip(&m2).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn scalars_round_like_torch() {
        let s = StepScalars::new(&AdamWConfig::default(), 1e-3, 1);
        assert_eq!(s.lerp_w, 0.1f32);
        assert_eq!(s.one_minus_beta2, 0.001f32);
        assert!(s.decay.is_none());
        // Step 1: bias corrections make the first update lr * sign(g) (up to eps).
        let (mut p, mut m, mut v) = ([1.0f32], [0f32], [0f32]);
        update(&mut p, &[0.5], &mut m, &mut v, &s);
        assert!((p[0] - (1.0 - 1e-3)).abs() < 1e-7, "{}", p[0]);
    }
}
