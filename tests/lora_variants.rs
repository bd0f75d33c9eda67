//! DoRA, PiSSA, Gaussian init and rsLoRA against their defining equations, on tiny-llama.

mod common;

use common::max_abs;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var, D};
use qlora::lora::{LoraConfig, LoraInit};
use qlora::model::loader::{load_model, BaseFormat, LoadOptions};
use qlora::peft;
use qlora::quant::QuantType;

fn tiny(base: BaseFormat) -> qlora::model::transformer::Model {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    load_model(
        &dir,
        &LoadOptions {
            base,
            ..Default::default()
        },
    )
    .unwrap()
    .model
}

fn ids() -> Tensor {
    Tensor::from_vec(
        (0u32..24).map(|i| (i * 37 + 5) % 512).collect::<Vec<_>>(),
        (2, 12),
        &Device::Cpu,
    )
    .unwrap()
}

fn cfg(init: LoraInit, dora: bool) -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        init,
        use_dora: dora,
        dtype: DType::F32,
        ..Default::default()
    }
}

/// Give every B a non-zero value so adapters change the output.
fn perturb_b(model: &qlora::model::transformer::Model) {
    for (i, (_, v)) in peft::trainable_vars(model).iter().enumerate() {
        let t = v.as_tensor();
        if t.dims().len() == 2 && t.dims()[1] == 4 {
            let r = Tensor::randn(0f32, 0.05, t.dims(), &Device::Cpu).unwrap();
            v.set(&(r + i as f64 * 1e-4).unwrap()).unwrap();
        }
    }
}

#[test]
fn new_adapters_leave_the_output_unchanged() {
    for base in [BaseFormat::Dense, BaseFormat::Quantized(QuantType::Nf4)] {
        for (init, dora) in [
            (LoraInit::Kaiming, false),
            (LoraInit::Gaussian, false),
            (LoraInit::Kaiming, true),
        ] {
            let mut m = tiny(base);
            let before = m.forward(&ids()).unwrap();
            peft::attach_new(&mut m, &cfg(init, dora), 1).unwrap();
            let after = m.forward(&ids()).unwrap();
            let d = max_abs(&before, &after);
            assert!(d < 1e-4, "{base:?} {init:?} dora={dora}: {d}");
        }
    }
}

#[test]
fn pissa_base_residual_plus_adapter_reproduces_the_model() {
    let mut m = tiny(BaseFormat::Dense);
    let before = m.forward(&ids()).unwrap();
    let w0 = m.as_llama().unwrap().layers[0]
        .self_attn
        .q_proj
        .base
        .to_dense_f32(&Device::Cpu)
        .unwrap();
    peft::attach_new(&mut m, &cfg(LoraInit::Pissa, false), 1).unwrap();
    let lin = &m.as_llama().unwrap().layers[0].self_attn.q_proj;
    let residual = lin.base.to_dense_f32(&Device::Cpu).unwrap();
    let delta = lin.adapter.as_ref().unwrap().delta_weight().unwrap();
    // W = residual + s·B·A, and the adapter holds the principal part (it is not small).
    assert!(max_abs(&(residual.clone() + &delta).unwrap(), &w0) < 1e-5);
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt()
    };
    assert!(
        norm(&delta) > 0.2 * norm(&w0),
        "principal components carry real weight"
    );
    let after = m.forward(&ids()).unwrap();
    assert!(max_abs(&before, &after) < 1e-3);
}

#[test]
fn dora_forward_equals_its_definition() {
    // y = x · (m ⊙ (W0 + sBA) / ‖W0 + sBA‖_row)ᵀ
    let mut m = tiny(BaseFormat::Dense);
    peft::attach_new(&mut m, &cfg(LoraInit::Kaiming, true), 3).unwrap();
    perturb_b(&m);
    let lin = &mut m.as_llama_mut().unwrap().layers[1].mlp.down_proj;
    let a = lin.adapter.clone().unwrap();
    let mag = a.magnitude.clone().unwrap();
    mag.set(&(mag.as_tensor() * 1.3).unwrap()).unwrap();
    lin.set_adapter(Some(a.clone())).unwrap();
    let x = Tensor::randn(0f32, 1.0, (5, 192), &Device::Cpu).unwrap();
    let y = lin.forward(&x, false).unwrap();
    let w = (lin.base.to_dense_f32(&Device::Cpu).unwrap() + a.delta_weight().unwrap()).unwrap();
    let norms = w
        .sqr()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap()
        .sqrt()
        .unwrap();
    let w_dora = w
        .broadcast_div(&norms)
        .unwrap()
        .broadcast_mul(&mag.as_tensor().unsqueeze(1).unwrap())
        .unwrap();
    let want = x.matmul(&w_dora.t().unwrap()).unwrap();
    let d = max_abs(&y, &want);
    assert!(d < 1e-4, "DoRA forward {d}");
}

#[test]
fn dora_on_nf4_base_matches_dense_dequantized_definition_and_has_gradients() {
    let mut m = tiny(BaseFormat::Quantized(QuantType::Nf4));
    peft::attach_new(&mut m, &cfg(LoraInit::Kaiming, true), 3).unwrap();
    perturb_b(&m);
    let lin = &m.as_llama().unwrap().layers[0].self_attn.v_proj;
    let a = lin.adapter.clone().unwrap();
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu).unwrap()).unwrap();
    let y = lin.forward(x.as_tensor(), false).unwrap();
    let w = (lin.base.to_dense_f32(&Device::Cpu).unwrap() + a.delta_weight().unwrap()).unwrap();
    let norms = w
        .sqr()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap()
        .sqrt()
        .unwrap();
    let mag = a
        .magnitude
        .as_ref()
        .unwrap()
        .as_tensor()
        .unsqueeze(1)
        .unwrap();
    let want = x
        .as_tensor()
        .matmul(
            &w.broadcast_div(&norms)
                .unwrap()
                .broadcast_mul(&mag)
                .unwrap()
                .t()
                .unwrap(),
        )
        .unwrap();
    assert!(max_abs(&y, &want) < 1e-4);
    let grads = y.sum_all().unwrap().backward().unwrap();
    for (name, v) in a.parameters() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0,
            "{name}"
        );
    }
}

#[test]
fn rslora_scale_is_alpha_over_sqrt_rank_in_the_layer() {
    let mut m = tiny(BaseFormat::Dense);
    let c = LoraConfig {
        use_rslora: true,
        ..cfg(LoraInit::Kaiming, false)
    };
    peft::attach_new(&mut m, &c, 0).unwrap();
    let a = m.as_llama().unwrap().layers[0]
        .self_attn
        .q_proj
        .adapter
        .as_ref()
        .unwrap();
    assert_eq!(a.scale, 4.0);
}
