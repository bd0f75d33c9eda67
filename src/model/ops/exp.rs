//! A branch-free `exp` for f32 slices that the compiler vectorizes (16 lanes with AVX-512),
//! for softmax: libm's scalar `expf` was a visible share of a training step.
//!
//! Cody–Waite range reduction `x = n·ln2 + r` and a degree-6 polynomial for `e^r` on
//! `|r| ≤ ln2/2`; relative error below 4e-7 over the whole range (tested). Inputs below -87.3
//! give exactly 0 (so a -inf mask entry gives 0, as `expf` does); inputs above 88 saturate at
//! `e^88` (softmax only feeds it values ≤ 0).

/// `e^x`, accurate to ~2 ulp, written so that loops over it vectorize.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = x.clamp(-87.3, 88.0);
    // Round to nearest by adding and subtracting 1.5·2^23 (`f32::round` is a libm call that
    // keeps the loop scalar).
    const SHIFTER: f32 = 12_582_912.0;
    let n = (xc * LOG2E + SHIFTER) - SHIFTER;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // Taylor coefficients 1/k! to degree 6: |r| ≤ 0.347 leaves a remainder below 2e-8.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let bits = ((n as i32 + 127) as u32) << 23;
    let y = p * f32::from_bits(bits);
    if x < -87.3 {
        0.0
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libm_within_two_ulp_scale() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
    }
}
