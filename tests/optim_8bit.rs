//! 8-bit blockwise AdamW state (bitsandbytes' Adam8bit layout: signed dynamic code for m,
//! unsigned for v, 256 values per absmax) tracks 32-bit AdamW closely and takes ~4x less memory.

use candle_core::{DType, Device, Tensor, Var};
use qlora::optim::{AdamW, AdamWConfig, StateStorage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn norm(x: impl Iterator<Item = f32>) -> f64 {
    x.map(|v| (v as f64).powi(2)).sum::<f64>().sqrt()
}

fn var(values: Vec<f32>, shape: &[usize]) -> Var {
    Var::from_tensor(&Tensor::from_vec(values, shape, &Device::Cpu).unwrap()).unwrap()
}

/// Minimise sum_i a_i (x_i - c_i)^2 / 2 (curvatures over two decades) from x = 0.
fn quadratic_run(storage: StateStorage, steps: usize) -> (Vec<f32>, f64) {
    let mut rng = StdRng::seed_from_u64(7);
    let n = 64 * 128;
    let a: Vec<f32> = (0..n)
        .map(|_| 10f32.powf(rng.random::<f32>() * 2.0 - 1.0))
        .collect();
    let c: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    let x = var(vec![0.0; n], &[64, 128]);
    let cfg = AdamWConfig {
        lr: 1e-2,
        ..AdamWConfig::default()
    };
    let mut opt =
        AdamW::with_storage(vec![("x".into(), x.clone())], cfg, |_| 1.0, storage).unwrap();
    let loss = |xv: &[f32]| -> f64 {
        xv.iter()
            .zip(&a)
            .zip(&c)
            .map(|((x, a), c)| 0.5 * (*a as f64) * ((x - c) as f64).powi(2))
            .sum()
    };
    for _ in 0..steps {
        let xv = to_vec(x.as_tensor());
        let g: Vec<f32> = xv
            .iter()
            .zip(&a)
            .zip(&c)
            .map(|((x, a), c)| a * (x - c))
            .collect();
        let g = Tensor::from_vec(g, &[64, 128], &Device::Cpu).unwrap();
        opt.step(&[Some(g)], 1e-2).unwrap();
    }
    let xv = to_vec(x.as_tensor());
    let l = loss(&xv);
    (xv, l)
}

#[test]
fn eight_bit_tracks_32_bit_on_a_quadratic() {
    let (_, l0) = quadratic_run(StateStorage::Plain, 0);
    let (x32, l32) = quadratic_run(StateStorage::Plain, 300);
    let (x8, l8) = quadratic_run(StateStorage::eight_bit(), 300);
    let dist = norm(x32.iter().zip(&x8).map(|(a, b)| a - b)) / norm(x32.iter().copied());
    eprintln!("quadratic: loss {l0:.4} -> 32-bit {l32:.3e}, 8-bit {l8:.3e}; |x8 - x32| / |x32| = {dist:.3e}");
    assert!(l32 < 1e-2 * l0, "32-bit did not converge: {l32} from {l0}");
    assert!(l8 < 1e-5 * l0, "8-bit did not converge: {l8} from {l0}");
    assert!(
        dist < 1e-2,
        "8-bit ended {dist:e} (relative) away from 32-bit"
    );
}

#[test]
fn eight_bit_tracks_32_bit_over_random_steps() {
    // Gradients with row scales over four decades, so blocks mix large and tiny moments.
    let (rows, cols, steps) = (128, 256, 300);
    let mut rng = StdRng::seed_from_u64(11);
    let scale: Vec<f32> = (0..rows)
        .map(|_| 10f32.powf(rng.random::<f32>() * 4.0 - 4.0))
        .collect();
    let p0: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random::<f32>() * 0.2 - 0.1)
        .collect();
    let grads: Vec<Tensor> = (0..steps)
        .map(|_| {
            // A persistent direction plus noise, as in training.
            let g: Vec<f32> = (0..rows * cols)
                .map(|i| scale[i / cols] * (0.3 + rng.random::<f32>() * 2.0 - 1.0))
                .collect();
            Tensor::from_vec(g, &[rows, cols], &Device::Cpu).unwrap()
        })
        .collect();
    let run = |storage: StateStorage| {
        let x = var(p0.clone(), &[rows, cols]);
        let cfg = AdamWConfig {
            weight_decay: 0.01,
            ..AdamWConfig::default()
        };
        let mut opt =
            AdamW::with_storage(vec![("x".into(), x.clone())], cfg, |_| 1.0, storage).unwrap();
        for g in &grads {
            opt.step(&[Some(g.clone())], 1e-3).unwrap();
        }
        let state = opt.state_tensors().unwrap();
        (to_vec(x.as_tensor()), opt, state)
    };
    let (x32, opt32, _) = run(StateStorage::Plain);
    let (x8, opt8, state8) = run(StateStorage::eight_bit());
    let moved = norm(x32.iter().zip(&p0).map(|(a, b)| a - b));
    let dist = norm(x32.iter().zip(&x8).map(|(a, b)| a - b)) / moved;
    let worst = x32
        .iter()
        .zip(&x8)
        .zip(&p0)
        .map(|((a, b), p)| ((a - b).abs() / (a - p).abs().max(1e-4)) as f64)
        .fold(0f64, f64::max);
    eprintln!(
        "random steps: |x8 - x32| / |x32 - x0| = {dist:.3e}, worst element {worst:.3e}; \
         state 32-bit {} B, 8-bit {} B ({:.2}x)",
        opt32.state_bytes(),
        opt8.state_bytes(),
        opt32.state_bytes() as f64 / opt8.state_bytes() as f64
    );
    assert!(
        dist < 2e-2,
        "8-bit trajectory {dist:e} (relative) away from 32-bit"
    );
    assert!(worst < 0.1, "an element's 8-bit update is {worst:e} off");

    // Exported as bnb's state1/absmax1 (codes shaped like the parameter, one absmax per 256).
    let names: Vec<&str> = state8.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["step", "x.state1", "x.absmax1", "x.state2", "x.absmax2"]
    );
    assert_eq!(state8[1].1.dtype(), DType::U8);
    assert_eq!(state8[1].1.dims(), [rows, cols]);
    assert_eq!(state8[2].1.dims(), [rows * cols / 256]);
    // m in the signed code (zero at 127, both signs used); v >= 0 in the unsigned code, whose
    // top decade [0.1, 1] of the absmax has 128 codes (the signed code has 64 there).
    let codes = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let (c1, c2) = (codes(&state8[1].1), codes(&state8[3].1));
    assert!(c1.iter().any(|&c| c < 127) && c1.iter().any(|&c| c > 127));
    // Here v spans about one decade per block: 59 distinct codes (30 in the signed code).
    let distinct = c2.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(distinct > 45, "v uses only {distinct} codes");

    // ~4x smaller: 2 bytes + 8 per 256 values against 8 bytes.
    let ratio = opt32.state_bytes() as f64 / opt8.state_bytes() as f64;
    assert_eq!(opt8.state_bytes(), 2 * rows * cols + 8 * rows * cols / 256);
    assert!(ratio > 3.9 && ratio < 4.0, "ratio {ratio}");
}

#[test]
fn small_parameters_keep_32_bit_state() {
    let big = var(vec![0.5; 4096], &[4096]);
    let small = var(vec![0.5; 4095], &[4095]);
    let opt = AdamW::with_storage(
        vec![("big".into(), big), ("small".into(), small)],
        AdamWConfig::default(),
        |_| 1.0,
        StateStorage::eight_bit(),
    )
    .unwrap();
    let names: Vec<String> = opt
        .state_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names.contains(&"big.state1".to_string()));
    assert!(names.contains(&"small.exp_avg".to_string()));
    assert_eq!(opt.state_bytes(), 2 * 4096 + 8 * 16 + 8 * 4095);
}

#[test]
fn f32_state_loads_into_8_bit_and_back() {
    let x = || var((0..5000).map(|i| i as f32 * 1e-4).collect(), &[5000]);
    let g = Tensor::from_vec(
        (0..5000)
            .map(|i| ((i % 17) as f32 - 8.0) * 1e-2)
            .collect::<Vec<_>>(),
        5000,
        &Device::Cpu,
    )
    .unwrap();
    let mut a = AdamW::new(vec![("x".into(), x())], AdamWConfig::default(), |_| 1.0).unwrap();
    for _ in 0..3 {
        a.step(&[Some(g.clone())], 1e-3).unwrap();
    }
    let mut b = AdamW::with_storage(
        vec![("x".into(), x())],
        AdamWConfig::default(),
        |_| 1.0,
        StateStorage::eight_bit(),
    )
    .unwrap();
    b.load_state_tensors(a.state_tensors().unwrap()).unwrap();
    let mut c = AdamW::new(vec![("x".into(), x())], AdamWConfig::default(), |_| 1.0).unwrap();
    c.load_state_tensors(b.state_tensors().unwrap()).unwrap();
    let (sa, sc) = (a.state_tensors().unwrap(), c.state_tensors().unwrap());
    for k in 1..3 {
        let (u, w) = (to_vec(&sa[k].1), to_vec(&sc[k].1));
        let amax = u.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = u
            .iter()
            .zip(&w)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            err <= 0.0071 * amax,
            "{}: err {err} of absmax {amax}",
            sa[k].0
        );
    }
    assert_eq!(c.step, 3);
}
