//! The fused CPU ops (`qlora::model::ops`) against the composite candle implementations they
//! replace: values and gradients within 1e-5 relative (f32), on random and awkward shapes
//! (query blocks cut mid-way, grouped heads, causal / packed-segment / sliding-window masks).

use candle_core::{Device, Tensor, Var};
use qlora::model::attention::{attention_composite, attention_mask_windowed, AttentionSpan, Rope};
use qlora::model::config::LlamaConfig;
use qlora::model::llama::{rms_norm_composite, rope_inv_freq};
use qlora::model::ops::attention::FusedAttention;
use qlora::model::ops::rms_norm::rms_norm_fused;
use qlora::model::ops::swiglu::silu_mul;

const TOL: f32 = 1e-5;

/// max |a - b| / max |b|.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let s = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap().max(1e-30)
}

fn randn(shape: &[usize], seed: u64) -> Var {
    // candle's randn is not seedable on the CPU; a fixed LCG keeps the cases reproducible.
    let n: usize = shape.iter().product();
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
}

/// Gradients of `Σ out ∘ w` for each of `vars`.
fn grads(out: &Tensor, w: &Tensor, vars: &[&Var]) -> Vec<Tensor> {
    let g = (out * w).unwrap().sum_all().unwrap().backward().unwrap();
    vars.iter()
        .map(|v| g.get(v.as_tensor()).unwrap().clone())
        .collect()
}

fn config(heads: usize, kv: usize, d: usize) -> LlamaConfig {
    LlamaConfig::from_json(&serde_json::json!({
        "model_type": "llama", "vocab_size": 10, "hidden_size": heads * d,
        "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": heads,
        "num_key_value_heads": kv, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 256
    }))
    .unwrap()
}

#[test]
fn fused_attention_matches_composite_values_and_gradients() {
    let dev = Device::Cpu;
    // (b, t, heads, kv heads, head dim)
    for (case, &(b, t, h, kvh, d)) in [
        (2, 77, 6, 2, 8),
        (1, 130, 3, 3, 16),
        (3, 5, 4, 1, 4),
        (2, 64, 9, 3, 64),
    ]
    .iter()
    .enumerate()
    {
        let cfg = config(h, kvh, d);
        let rope = Rope::from_inv_freq(&rope_inv_freq(&cfg), 256, &dev).unwrap();
        // Packed rows: documents of uneven lengths, positions restarting per document.
        let mut seg = Vec::new();
        let mut pos = Vec::new();
        for r in 0..b {
            let (mut doc, mut p) = (0u32, 0u32);
            for i in 0..t {
                if i > 0 && (i * 7 + r * 3) % 23 == 0 {
                    doc += 1;
                    p = 0;
                }
                seg.push(doc);
                pos.push(p);
                p += 1;
            }
        }
        let seg = Tensor::from_vec(seg, (b, t), &dev).unwrap();
        let packed_pos = Tensor::from_vec(pos, (b, t), &dev).unwrap();
        let plain_pos = Tensor::arange(0u32, t as u32, &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .repeat((b, 1))
            .unwrap();
        let spans = [
            (AttentionSpan::Causal, None, &plain_pos),
            (AttentionSpan::CausalSegments(&seg), None, &packed_pos),
            (AttentionSpan::Causal, Some(9), &plain_pos),
        ];
        for (span, window, pos) in spans {
            let mask = attention_mask_windowed(b, t, 0, &span, window, &dev).unwrap();
            let seed = case as u64 * 10;
            let q = randn(&[b, t, h * d], seed + 1);
            let k = randn(&[b, t, kvh * d], seed + 2);
            let v = randn(&[b, t, kvh * d], seed + 3);
            let w = randn(&[b, t, h * d], seed + 4);
            let want = attention_composite(
                (h, kvh, d),
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                &rope,
                pos,
                &mask,
                None,
            )
            .unwrap();
            let (cos, sin) = rope.host_tables();
            let got = FusedAttention::new((h, kvh, d), cos, sin, pos, &mask)
                .unwrap()
                .forward(q.as_tensor(), k.as_tensor(), v.as_tensor())
                .unwrap();
            let what = format!("case {case} {span:?} window {window:?}");
            let e = rel(&got, &want);
            assert!(e < TOL, "{what}: output differs by {e}");
            let gw = grads(&want, w.as_tensor(), &[&q, &k, &v]);
            let gg = grads(&got, w.as_tensor(), &[&q, &k, &v]);
            for (name, (a, b)) in ["dq", "dk", "dv"].iter().zip(gg.iter().zip(&gw)) {
                let e = rel(a, b);
                assert!(e < TOL, "{what}: {name} differs by {e}");
            }
        }
    }
}

#[test]
fn fused_rms_norm_matches_composite() {
    for (i, shape) in [[3usize, 5, 33], [1, 1, 576], [2, 17, 7]]
        .iter()
        .enumerate()
    {
        let x = randn(shape, 100 + i as u64);
        let wt = randn(&shape[2..], 200 + i as u64);
        let w = randn(shape, 300 + i as u64);
        let want = rms_norm_composite(x.as_tensor(), wt.as_tensor(), 1e-5).unwrap();
        let got = rms_norm_fused(x.as_tensor(), wt.as_tensor(), 1e-5).unwrap();
        let e = rel(&got, &want);
        assert!(e < TOL, "{shape:?}: rms norm differs by {e}");
        let e = rel(
            &grads(&got, w.as_tensor(), &[&x])[0],
            &grads(&want, w.as_tensor(), &[&x])[0],
        );
        assert!(e < TOL, "{shape:?}: rms norm gradient differs by {e}");
    }
}

#[test]
fn fused_silu_mul_matches_composite() {
    for (i, shape) in [[7usize, 129], [1, 1], [3, 40_000]].iter().enumerate() {
        // Spread the gate over a wide range so both tails of the sigmoid are exercised.
        let g =
            Var::from_tensor(&(randn(shape, 400 + i as u64).as_tensor() * 12.0).unwrap()).unwrap();
        let u = randn(shape, 500 + i as u64);
        let w = randn(shape, 600 + i as u64);
        let want = (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
        let got = silu_mul(g.as_tensor(), u.as_tensor()).unwrap();
        let e = rel(&got, &want);
        assert!(e < TOL, "{shape:?}: silu·up differs by {e}");
        let gw = grads(&want, w.as_tensor(), &[&g, &u]);
        let gg = grads(&got, w.as_tensor(), &[&g, &u]);
        for (name, (a, b)) in ["dgate", "dup"].iter().zip(gg.iter().zip(&gw)) {
            let e = rel(a, b);
            assert!(e < TOL, "{shape:?}: {name} differs by {e}");
        }
    }
}
