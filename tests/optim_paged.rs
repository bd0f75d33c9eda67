//! Paged optimizer state: AdamW with its moments in 16 KiB pages under a 64 KiB resident budget
//! (several MiB of state, so nearly every page is evicted and read back each step) makes exactly
//! the updates of plain in-memory AdamW, and optimizer state exported mid-run resumes
//! bit-identically, in the same or another storage.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use qlora::optim::{AdamW, AdamWConfig, StateStorage};
use rand::rngs::StdRng;
use rand::SeedableRng;

const SHAPES: &[&[usize]] = &[&[512, 1024], &[1000, 7], &[3, 5], &[64, 2049], &[4096]];

fn cfg() -> AdamWConfig {
    AdamWConfig {
        lr: 1e-3,
        weight_decay: 0.01,
        ..AdamWConfig::default()
    }
}

/// Named variables of `SHAPES` with values from `seed`; the one 2-D odd shape is bf16 so the
/// dtype round trip is covered too.
fn vars(seed: u64) -> Vec<(String, Var)> {
    let mut rng = StdRng::seed_from_u64(seed);
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, &shape)| {
            let n: usize = shape.iter().product();
            let t = Tensor::from_vec(common::random_vec(&mut rng, n, 0.1), shape, &Device::Cpu)
                .unwrap();
            let t = if i == 1 {
                t.to_dtype(DType::BF16).unwrap()
            } else {
                t
            };
            (format!("p{i}.weight"), Var::from_tensor(&t).unwrap())
        })
        .collect()
}

/// Copies of `vars` with their current values (independent storage).
fn clone_vars(vars: &[(String, Var)]) -> Vec<(String, Var)> {
    vars.iter()
        .map(|(n, v)| {
            let t = v.as_tensor().copy().unwrap();
            (n.clone(), Var::from_tensor(&t).unwrap())
        })
        .collect()
}

/// Gradients of step `step`: random, one parameter without gradient every third step.
fn grads(step: usize) -> Vec<Option<Tensor>> {
    let mut rng = StdRng::seed_from_u64(1000 + step as u64);
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, &shape)| {
            if i == 2 && step.is_multiple_of(3) {
                return None;
            }
            let n: usize = shape.iter().product();
            let scale = 10f32.powi(i as i32 - 3);
            Some(
                Tensor::from_vec(common::random_vec(&mut rng, n, scale), shape, &Device::Cpu)
                    .unwrap(),
            )
        })
        .collect()
}

fn lr_scale(name: &str) -> f64 {
    if name.starts_with("p3") {
        16.0
    } else {
        1.0
    }
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn assert_same_params(a: &AdamW, b: &AdamW, when: &str) {
    for (pa, pb) in a.params.iter().zip(&b.params) {
        assert_eq!(pa.var.dtype(), pb.var.dtype());
        let (x, y) = (bits(pa.var.as_tensor()), bits(pb.var.as_tensor()));
        let diff = x.iter().zip(&y).filter(|(p, q)| p != q).count();
        assert_eq!(
            diff,
            0,
            "{when}: {} differs in {diff} of {} values",
            pa.name,
            x.len()
        );
    }
}

fn assert_same_state(a: &AdamW, b: &AdamW, when: &str) {
    let (sa, sb) = (a.state_tensors().unwrap(), b.state_tensors().unwrap());
    assert_eq!(sa.len(), sb.len());
    for ((na, ta), (nb, tb)) in sa.iter().zip(&sb) {
        assert_eq!(na, nb);
        assert_eq!(ta.dims(), tb.dims(), "{when}: {na}");
        if ta.dtype() == DType::I64 || ta.dtype() == DType::U8 {
            let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            let d = (f(ta) - f(tb)).unwrap().abs().unwrap().sum_all().unwrap();
            assert_eq!(d.to_scalar::<f64>().unwrap(), 0.0, "{when}: {na}");
        } else {
            assert!(bits(ta) == bits(tb), "{when}: state {na} differs");
        }
    }
}

const BUDGET: usize = 64 << 10;
const PAGE: usize = 16 << 10;

fn paged() -> StateStorage {
    StateStorage::Paged {
        resident_bytes: BUDGET,
        page_bytes: PAGE,
        dir: None,
    }
}

#[test]
fn paged_adamw_is_bit_identical_to_plain() {
    let mut plain = AdamW::new(vars(1), cfg(), lr_scale).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let storage = StateStorage::Paged {
        resident_bytes: BUDGET,
        page_bytes: PAGE,
        dir: Some(dir.path().to_path_buf()),
    };
    let mut paged = AdamW::with_storage(vars(1), cfg(), lr_scale, storage).unwrap();
    let elems: usize = SHAPES.iter().map(|s| s.iter().product::<usize>()).sum();
    assert_eq!(plain.state_bytes(), 8 * elems);
    assert_eq!(paged.state_bytes(), 8 * elems);
    assert!(plain.page_stats().is_none());

    let steps = 40;
    for step in 0..steps {
        let g = grads(step);
        let lr = 1e-3 * (1.0 + step as f64 / 10.0);
        plain.step(&g, lr).unwrap();
        paged.step(&g, lr).unwrap();
        if step % 10 == 9 {
            assert_same_params(&plain, &paged, &format!("after step {}", step + 1));
        }
    }
    // The parameters moved (a broken update that did nothing to either would also "match").
    let moved = (vars(1)[0].1.as_tensor() - plain.params[0].var.as_tensor())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(moved > 1e-3, "parameters barely moved ({moved})");
    assert_same_state(&plain, &paged, "end");

    let st = paged.page_stats().unwrap();
    eprintln!(
        "state {:.2} MiB, {} steps: {st}",
        paged.state_bytes() as f64 / (1 << 20) as f64,
        steps
    );
    assert_eq!(st.page_bytes, PAGE);
    assert_eq!(st.budget_bytes, BUDGET);
    assert!(st.peak_resident_bytes <= BUDGET, "{st:?}");
    assert!(st.resident_bytes <= BUDGET, "{st:?}");
    // Each step touches every page of state; all but the resident few must go out and come back.
    let pages_per_step = (st.allocated_bytes / PAGE) as u64;
    let floor = (steps as u64 - 1) * (pages_per_step - (BUDGET / PAGE) as u64);
    assert!(
        st.evictions >= floor,
        "{} evictions, expected >= {floor}",
        st.evictions
    );
    assert!(
        st.page_ins >= floor,
        "{} page-ins, expected >= {floor}",
        st.page_ins
    );
    assert!(st.bytes_paged_out >= floor * PAGE as u64);
    assert_eq!(st.bytes_paged_in, st.page_ins * PAGE as u64);
}

#[test]
fn exported_state_resumes_bit_identically_across_storages() {
    let dir = tempfile::tempdir().unwrap();
    for (from, to) in [
        (StateStorage::Plain, StateStorage::Plain),
        (StateStorage::Plain, paged()),
        (paged(), StateStorage::Plain),
        (StateStorage::eight_bit(), StateStorage::eight_bit()),
    ] {
        let what = format!("{from:?} -> {to:?}");
        let mut a = AdamW::with_storage(vars(2), cfg(), lr_scale, from).unwrap();
        for step in 0..7 {
            a.step(&grads(step), 2e-3).unwrap();
        }
        // Through a safetensors file, as a checkpoint would go.
        let path = dir.path().join("optimizer.safetensors");
        let state = a.state_tensors().unwrap();
        assert_eq!(state[0].0, "step");
        let map: std::collections::HashMap<_, _> = state.into_iter().collect();
        candle_core::safetensors::save(&map, &path).unwrap();
        let loaded = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();

        let mut b = AdamW::with_storage(clone_vars(&vars_of(&a)), cfg(), lr_scale, to).unwrap();
        b.load_state_tensors(loaded).unwrap();
        assert_eq!(b.step, 7, "{what}");
        assert_same_state(&a, &b, &format!("{what}, loaded"));
        for step in 7..15 {
            let g = grads(step);
            a.step(&g, 2e-3).unwrap();
            b.step(&g, 2e-3).unwrap();
        }
        assert_same_params(&a, &b, &format!("{what}, resumed"));
        assert_same_state(&a, &b, &format!("{what}, resumed"));
    }
}

fn vars_of(o: &AdamW) -> Vec<(String, Var)> {
    o.params
        .iter()
        .map(|p| (p.name.clone(), p.var.clone()))
        .collect()
}

#[test]
fn fresh_state_does_not_resume_identically() {
    // The resume test above must be able to fail: dropping the moments changes the run.
    let mut a = AdamW::new(vars(3), cfg(), lr_scale).unwrap();
    for step in 0..5 {
        a.step(&grads(step), 2e-3).unwrap();
    }
    let mut b = AdamW::new(clone_vars(&vars_of(&a)), cfg(), lr_scale).unwrap();
    b.step = a.step;
    let g = grads(5);
    a.step(&g, 2e-3).unwrap();
    b.step(&g, 2e-3).unwrap();
    let differ = bits(a.params[0].var.as_tensor()) != bits(b.params[0].var.as_tensor());
    assert!(differ);
}

#[test]
fn loading_incomplete_state_fails_and_changes_nothing() {
    let mut a = AdamW::with_storage(vars(4), cfg(), lr_scale, paged()).unwrap();
    a.step(&grads(0), 1e-3).unwrap();
    let before = a.state_tensors().unwrap();
    let mut partial = before.clone();
    partial.retain(|(n, _)| n != "p3.weight.exp_avg_sq");
    let e = a.load_state_tensors(partial).unwrap_err();
    assert!(e.to_string().contains("p3.weight.exp_avg_sq"), "{e}");
    let mut wrong = before.clone();
    for (n, t) in wrong.iter_mut() {
        if n == "p1.weight.exp_avg" {
            *t = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
        }
    }
    assert!(a.load_state_tensors(wrong).is_err());
    let after = a.state_tensors().unwrap();
    for ((_, x), (_, y)) in before.iter().zip(&after) {
        if x.dtype() == DType::F32 {
            assert!(bits(x) == bits(y));
        }
    }
    assert_eq!(a.step, 1);
}

#[test]
fn resident_budget_below_two_pages_is_refused() {
    let storage = StateStorage::Paged {
        resident_bytes: PAGE,
        page_bytes: PAGE,
        dir: None,
    };
    let e = AdamW::with_storage(vars(5), cfg(), lr_scale, storage).unwrap_err();
    assert!(e.to_string().contains("--optim-resident-mb"), "{e}");
}
