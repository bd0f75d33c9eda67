//! bitsandbytes' 8-bit dynamic codes for optimizer state: the signed one for the first moment,
//! the unsigned one (twice the resolution, no sign bit) for the second, and rounding to them.

use std::sync::OnceLock;

use qlora_quant::codebook::DYNAMIC8;

/// `bitsandbytes.functional.create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`,
/// sorted ascending.
///
/// For exponent i = 0..6 the code holds the midpoints of `linspace(0.1, 1, k + 1)` (k = 2^i
/// signed, 2^(i+1) unsigned) times `10^(i-6)`, both signs when signed, plus 0 and 1. torch's
/// f32 linspace is `start + step * i` (one rounding: fused) below the halfway index and
/// `end - step * (steps - 1 - i)` above it; with that, the signed map equals bnb's table
/// ([`DYNAMIC8`]) bit for bit.
pub fn create_dynamic_map(signed: bool) -> [f32; 256] {
    let mut data = Vec::with_capacity(256);
    for i in 0..7 {
        let items = if signed {
            1usize << i
        } else {
            1usize << (i + 1)
        };
        let b = linspace_f32(0.1, 1.0, items + 1);
        // torch multiplies the f32 tensor by the Python float 10**(i-6) rounded to f32.
        let scale = 10f64.powi(i - 6) as f32;
        for k in 0..items {
            let mean = (b[k] + b[k + 1]) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-(scale * mean));
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data.try_into().expect("the construction gives 256 values")
}

/// `torch.linspace(start, end, steps, dtype=float32)` as computed element by element on CPU.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// The signed dynamic code (index 127 = 0, 255 = 1.0, 0 = -0.99296874).
pub fn signed_dynamic8() -> &'static [f32; 256] {
    &DYNAMIC8
}

/// The unsigned dynamic code (index 0 = 0, 255 = 1.0).
pub fn unsigned_dynamic8() -> &'static [f32; 256] {
    static CODE: OnceLock<[f32; 256]> = OnceLock::new();
    CODE.get_or_init(|| create_dynamic_map(false))
}

/// Rounding of values in [-1, 1] to the nearest entry of a sorted 8-bit code, ties to the
/// lower entry (bnb's CUDA kernels and torch fallback; its CPU C++ kernel approximates this
/// with a 65536-entry lookup table, which is 1-3 codes off for about 0.15% of values).
#[derive(Debug)]
pub struct NearestCode {
    /// The code values, ascending; a byte is an index into it.
    pub values: &'static [f32; 256],
    midpoints: [f32; 255],
    /// `below[b]` = number of midpoints whose order key is below bucket `b`'s first key.
    below: Box<[u8; BUCKETS + 1]>,
    /// Index of the value 0.0 (what an all-zero block stores).
    pub zero: u8,
}

/// Bits of the order key dropped to pick a bucket: 2^14 buckets, 1/32 of an octave each, so
/// a bucket holds at most a couple of midpoints of these log-spaced codes.
const BUCKET_SHIFT: u32 = 18;
const BUCKETS: usize = 1 << (32 - BUCKET_SHIFT);

/// An unsigned key that orders non-NaN f32 as their values (-0 just below +0).
#[inline(always)]
fn order_key(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 0 {
        b | 0x8000_0000
    } else {
        !b
    }
}

impl NearestCode {
    fn new(values: &'static [f32; 256]) -> Self {
        let mut midpoints = [0f32; 255];
        for (k, m) in midpoints.iter_mut().enumerate() {
            *m = 0.5 * (values[k] + values[k + 1]);
        }
        let mut below = Box::new([0u8; BUCKETS + 1]);
        for (b, slot) in below.iter_mut().enumerate() {
            let first_key = (b as u64) << BUCKET_SHIFT;
            *slot = midpoints
                .iter()
                .filter(|&&m| (order_key(m) as u64) < first_key)
                .count() as u8;
        }
        let zero = values
            .iter()
            .position(|&v| v == 0.0)
            .expect("dynamic codes contain 0") as u8;
        Self {
            values,
            midpoints,
            below,
            zero,
        }
    }

    /// Rounding to the signed dynamic code.
    pub fn signed() -> &'static Self {
        static C: OnceLock<NearestCode> = OnceLock::new();
        C.get_or_init(|| Self::new(signed_dynamic8()))
    }

    /// Rounding to the unsigned dynamic code.
    pub fn unsigned() -> &'static Self {
        static C: OnceLock<NearestCode> = OnceLock::new();
        C.get_or_init(|| Self::new(unsigned_dynamic8()))
    }

    /// Index of the code nearest to `s`: the number of midpoints strictly below it. Midpoints
    /// below `s`'s bucket all count, those above none; only the bucket's own few are compared.
    #[inline]
    pub fn index(&self, s: f32) -> u8 {
        let b = (order_key(s) >> BUCKET_SHIFT) as usize;
        let (mut i, end) = (self.below[b] as usize, self.below[b + 1] as usize);
        while i < end && self.midpoints[i] < s {
            i += 1;
        }
        i as u8
    }

    /// [`NearestCode::index`] by plain binary search (the reference it is tested against).
    pub fn index_by_search(&self, s: f32) -> u8 {
        self.midpoints.partition_point(|&m| m < s) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn construction_reproduces_bnb_signed_table() {
        let ours = create_dynamic_map(true);
        for (i, (a, b)) in ours.iter().zip(DYNAMIC8.iter()).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "index {i}: {a} vs bnb {b}");
        }
    }

    #[test]
    fn unsigned_code_known_values() {
        let u = unsigned_dynamic8();
        assert_eq!(u[0], 0.0);
        assert_eq!(u[255], 1.0);
        assert!(u.windows(2).all(|w| w[0] < w[1]), "strictly ascending");
        assert!(u.iter().all(|&x| x >= 0.0));
        // Exponent 6 (scale 1): midpoints of linspace(0.1, 1, 129), step 0.9 / 128, the top 127
        // entries below 1.0; the largest is 1 - 0.9 / 256 and the smallest 0.1 + 0.9 / 256.
        let close = |a: f32, b: f64| ((a as f64) - b).abs() <= b * 5e-7;
        assert!(close(u[254], 1.0 - 0.9 / 256.0), "{}", u[254]);
        assert!(close(u[127], 0.1 + 0.9 / 256.0), "{}", u[127]);
        assert!(close(u[128], 0.1 + 3.0 * 0.9 / 256.0), "{}", u[128]);
        // Exponent 0 (scale 1e-6): two midpoints of linspace(0.1, 1, 3).
        assert!(close(u[1], 1e-6 * 0.325), "{}", u[1]);
        assert!(close(u[2], 1e-6 * 0.775), "{}", u[2]);
        // Exponent 1 (scale 1e-5): four midpoints of linspace(0.1, 1, 5), the first 0.2125e-5.
        assert!(close(u[3], 1e-5 * 0.2125), "{}", u[3]);
        // Each decade i holds 2^(i+1) values.
        let per_decade: Vec<usize> = (0..7)
            .map(|i| {
                let (lo, hi) = (10f32.powi(i - 7), 10f32.powi(i - 6));
                u.iter().filter(|&&x| x > lo && x < hi).count()
            })
            .collect();
        assert_eq!(per_decade, [2, 4, 8, 16, 32, 64, 128]);
    }

    #[test]
    fn nearest_code_rounds_to_nearest_ties_low() {
        let c = NearestCode::signed();
        assert_eq!(c.zero, 127);
        assert_eq!(c.index(0.0), 127);
        assert_eq!(c.index(1.0), 255);
        assert_eq!(c.index(-1.0), 0);
        for k in 0..255 {
            let (lo, hi) = (c.values[k], c.values[k + 1]);
            let mid = 0.5 * (lo + hi);
            assert_eq!(c.index(mid) as usize, k, "tie at {mid} goes low");
            assert_eq!(c.index(lo) as usize, k);
            assert_eq!(c.index(hi) as usize, k + 1);
        }
        let u = NearestCode::unsigned();
        assert_eq!(u.zero, 0);
        // The bucketed lookup agrees with binary search everywhere, midpoints and their
        // neighbouring floats included.
        for code in [c, u] {
            let mut probes: Vec<f32> = (0..200_001).map(|i| i as f32 / 100_000.0 - 1.0).collect();
            for &m in &code.midpoints {
                probes.extend([m, m.next_down(), m.next_up(), -m]);
            }
            probes.extend([0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, f32::MIN_POSITIVE]);
            for s in probes {
                assert_eq!(code.index(s), code.index_by_search(s), "s = {s:e}");
            }
        }
        assert_eq!(u.index(0.0), 0);
        assert_eq!(u.index(1.0), 255);
        assert_eq!(u.index(0.5e-6), 1);
    }
}
