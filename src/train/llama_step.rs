//! The training step of a Llama-family decoder (Llama, Mistral, Qwen2) written out on host f32
//! buffers, for f32 compute on the CPU with plain LoRA (on any of the seven projections of any
//! layer; the others run their frozen product alone).
//!
//! It runs the same kernels as the candle graph path (the fused LoRA linear, fused attention,
//! RMSNorm, SwiGLU) in the same order, so the forward is the same arithmetic; what it leaves
//! out is the graph. No per-node gradient bookkeeping (candle's zeros + add for every
//! gradient, the residual adds' copies), and a layer keeps only what its backward cannot
//! recompute cheaply: its input, q, k, v, the attention output, the residual after attention,
//! gate and up (5 760 floats per token for SmolLM2 against 9 600 kept by the graph). The norms'
//! outputs and the SwiGLU activation are recomputed in the backward. Gradients of a layer's
//! input add their parts in a fixed order, which need not be candle's, so the gradients agree
//! with the graph path to f32 rounding (`tests/train_parity.rs` holds both to PEFT).
//!
//! Any other configuration (DoRA, AdaLoRA, other dtypes or devices, other families) returns
//! `None` and takes the graph path.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Result, Tensor, TensorId, Var};
use rayon::prelude::*;

use crate::cpu_tensor::with_f32;
use crate::lora::fused::{Dims, FusedLoraLinear};
use crate::model::linear::Linear;
use crate::model::llama::{DecoderLayer, Llama};
use crate::model::ops::attention::FusedAttention;
use crate::model::ops::rms_norm::FusedRmsNorm;
use crate::model::ops::swiglu::{silu_mul_grad_into, silu_mul_into};
use crate::model::transformer::LayerContext;

/// A projection's plain LoRA adapter on host buffers.
struct HostAdapter {
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    a_var: Var,
    b_var: Var,
}

/// One projection, ready to multiply host slices: the frozen base, with or without an adapter.
struct Proj {
    op: FusedLoraLinear,
    adapter: Option<HostAdapter>,
    bias: Option<Vec<f32>>,
    inp: usize,
    out: usize,
}

impl Proj {
    fn new(linear: &Linear, train: bool) -> Result<Option<Self>> {
        let host =
            |t: &Tensor| -> Result<Vec<f32>> { t.to_dtype(DType::F32)?.flatten_all()?.to_vec1() };
        let (out, inp) = linear.base.shape();
        let bias = linear.bias.as_ref().map(host).transpose()?;
        let Some(ad) = &linear.adapter else {
            return Ok(
                FusedLoraLinear::on_host(&linear.base, 1.0, None).map(|op| Self {
                    op,
                    adapter: None,
                    bias,
                    inp,
                    out,
                }),
            );
        };
        if ad.magnitude.is_some() || ad.e.is_some() {
            return Ok(None);
        }
        let dropout = if train && ad.dropout > 0.0 {
            Some(ad.dropout_mask()?)
        } else {
            None
        };
        let Some(op) = FusedLoraLinear::on_host(&linear.base, ad.scale, dropout) else {
            return Ok(None);
        };
        let (r, _) = ad.a.as_tensor().dims2()?;
        Ok(Some(Self {
            op,
            adapter: Some(HostAdapter {
                a: host(ad.a.as_tensor())?,
                b: host(ad.b.as_tensor())?,
                r,
                a_var: ad.a.clone(),
                b_var: ad.b.clone(),
            }),
            bias,
            inp,
            out,
        }))
    }

    fn dims(&self, x: &[f32], r: usize) -> Dims {
        Dims {
            m: x.len() / self.inp,
            inp: self.inp,
            out: self.out,
            r,
        }
    }

    fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        let mut y = match &self.adapter {
            Some(ad) => self.op.forward_cpu(x, &ad.a, &ad.b, self.dims(x, ad.r))?,
            None => {
                let m = x.len() / self.inp;
                let mut y = vec![0f32; m * self.out];
                let _timed = crate::profile::part(crate::profile::Part::BaseProduct);
                self.op.base_product(x, m, &mut y, false)?;
                y
            }
        };
        if let Some(bias) = &self.bias {
            y.par_chunks_mut(self.out)
                .for_each(|row| row.iter_mut().zip(bias).for_each(|(o, b)| *o += b));
        }
        Ok(y)
    }

    /// `dx`, recording the adapter's `dA` and `dB` in `grads`.
    fn backward(&self, x: &[f32], dy: &[f32], grads: &mut Grads) -> Result<Vec<f32>> {
        let Some(ad) = &self.adapter else {
            let m = x.len() / self.inp;
            let mut dx = vec![0f32; m * self.inp];
            let _timed = crate::profile::part(crate::profile::Part::BaseProduct);
            self.op.base_product(dy, m, &mut dx, true)?;
            return Ok(dx);
        };
        let (dx, da, db) = self
            .op
            .backward_cpu(x, &ad.a, &ad.b, dy, self.dims(x, ad.r))?;
        grads.put(&ad.a_var, da, (ad.r, self.inp))?;
        grads.put(&ad.b_var, db, (self.out, ad.r))?;
        Ok(dx)
    }
}

/// Adapter gradients by variable, as candle tensors of the variable's dtype.
#[derive(Default)]
pub struct Grads(HashMap<TensorId, Tensor>);

impl Grads {
    fn put(&mut self, var: &Var, g: Vec<f32>, shape: (usize, usize)) -> Result<()> {
        let t = Tensor::from_vec(g, shape, var.device())?.to_dtype(var.dtype())?;
        self.0.insert(var.as_tensor().id(), t);
        Ok(())
    }

    /// The gradient of `var`, if this step computed one.
    pub fn take(&mut self, var: &Var) -> Option<Tensor> {
        self.0.remove(&var.as_tensor().id())
    }
}

/// What a layer's backward needs from its forward.
pub struct Tape {
    /// The layer's input.
    pub x: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: Vec<f32>,
    a: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

/// One decoder layer on host buffers.
pub struct HostLayer {
    norm1: FusedRmsNorm,
    norm2: FusedRmsNorm,
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    gate: Proj,
    up: Proj,
    down: Proj,
    attn: FusedAttention,
    mask: Arc<Vec<f32>>,
}

/// `y += x`, elementwise, in parallel.
fn add_into(y: &mut [f32], x: &[f32]) {
    y.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(yc, xc)| yc.iter_mut().zip(xc).for_each(|(o, v)| *o += v));
}

impl HostLayer {
    fn new(
        layer: &DecoderLayer,
        llama: &Llama,
        ctx: &LayerContext,
        mask: &Arc<Vec<f32>>,
        train: bool,
    ) -> Result<Option<Self>> {
        let sa = &layer.self_attn;
        let mlp = &layer.mlp;
        let projs = [
            &sa.q_proj,
            &sa.k_proj,
            &sa.v_proj,
            &sa.o_proj,
            &mlp.gate_proj,
            &mlp.up_proj,
            &mlp.down_proj,
        ];
        let mut ps = Vec::with_capacity(7);
        for p in projs {
            match Proj::new(p, train)? {
                Some(p) => ps.push(p),
                None => return Ok(None),
            }
        }
        let mut ps = ps.into_iter();
        let mut next = || ps.next().expect("seven projections");
        let (cos, sin) = llama.rope.host_tables();
        Ok(Some(Self {
            norm1: FusedRmsNorm::new(&layer.input_layernorm, layer.eps())?,
            norm2: FusedRmsNorm::new(&layer.post_attention_layernorm, layer.eps())?,
            q: next(),
            k: next(),
            v: next(),
            o: next(),
            gate: next(),
            up: next(),
            down: next(),
            attn: FusedAttention::new(sa.heads(), cos, sin, &ctx.pos, &ctx.mask)?,
            mask: mask.clone(),
        }))
    }

    /// The layer's output for input `x` (`[m, hidden]`), and its tape (which holds `x`).
    pub fn forward(&self, x: Vec<f32>) -> Result<(Vec<f32>, Tape)> {
        let mut h1 = vec![0f32; x.len()];
        self.norm1.forward_rows(&x, &mut h1);
        let q = self.q.forward(&h1)?;
        let k = self.k.forward(&h1)?;
        let v = self.v.forward(&h1)?;
        drop(h1);
        let o = self.attn.forward_cpu(&q, &k, &v, &self.mask);
        let mut a = self.o.forward(&o)?;
        add_into(&mut a, &x);
        let mut h2 = vec![0f32; a.len()];
        self.norm2.forward_rows(&a, &mut h2);
        let gate = self.gate.forward(&h2)?;
        let up = self.up.forward(&h2)?;
        drop(h2);
        let mut act = vec![0f32; gate.len()];
        silu_mul_into(&gate, &up, &mut act);
        let mut out = self.down.forward(&act)?;
        drop(act);
        add_into(&mut out, &a);
        let tape = Tape {
            x,
            q,
            k,
            v,
            o,
            a,
            gate,
            up,
        };
        Ok((out, tape))
    }

    /// The gradient of the layer's input for the output gradient `dy`; the adapters' gradients
    /// go to `grads`.
    pub fn backward(&self, t: Tape, dy: Vec<f32>, grads: &mut Grads) -> Result<Vec<f32>> {
        // out = a + down(silu(gate) · up), gate/up = proj(norm2(a))
        let mut act = vec![0f32; t.gate.len()];
        silu_mul_into(&t.gate, &t.up, &mut act);
        let d_act = self.down.backward(&act, &dy, grads)?;
        drop(act);
        let (mut dg, mut du) = (vec![0f32; t.gate.len()], vec![0f32; t.up.len()]);
        silu_mul_grad_into(&t.gate, &t.up, &d_act, &mut dg, &mut du);
        drop((d_act, t.gate, t.up));
        let mut h2 = vec![0f32; t.a.len()];
        self.norm2.forward_rows(&t.a, &mut h2);
        let mut dh2 = self.gate.backward(&h2, &dg, grads)?;
        add_into(&mut dh2, &self.up.backward(&h2, &du, grads)?);
        drop((h2, dg, du));
        let mut d_a = vec![0f32; t.a.len()];
        self.norm2.backward_rows(&t.a, &dh2, &mut d_a);
        add_into(&mut d_a, &dy);
        drop((dh2, dy, t.a));
        // a = x + o_proj(attention(q, k, v)), q/k/v = proj(norm1(x))
        let d_o = self.o.backward(&t.o, &d_a, grads)?;
        let (dq, dk, dv) = self
            .attn
            .backward_cpu(&t.q, &t.k, &t.v, &t.o, &d_o, &self.mask);
        drop((d_o, t.q, t.k, t.v, t.o));
        let mut h1 = vec![0f32; t.x.len()];
        self.norm1.forward_rows(&t.x, &mut h1);
        let mut dh1 = self.q.backward(&h1, &dq, grads)?;
        add_into(&mut dh1, &self.k.backward(&h1, &dk, grads)?);
        add_into(&mut dh1, &self.v.backward(&h1, &dv, grads)?);
        drop((h1, dq, dk, dv));
        let mut dx = vec![0f32; t.x.len()];
        self.norm1.backward_rows(&t.x, &dh1, &mut dx);
        add_into(&mut dx, &d_a);
        Ok(dx)
    }
}

/// Every layer of `model` on host buffers for this step, or `None` when the graph path has to
/// run it (see the module notes).
pub fn host_layers(
    model: &crate::model::transformer::Model,
    ctx: &LayerContext,
    train: bool,
) -> Result<Option<Vec<HostLayer>>> {
    let Some(llama) = model.as_llama() else {
        return Ok(None);
    };
    if !crate::cpu_tensor::fused_applies(&ctx.mask) || llama.compute_dtype != DType::F32 {
        return Ok(None);
    }
    let mask = Arc::new(with_f32(&ctx.mask.contiguous()?, |m| Ok(m.to_vec()))?);
    let mut layers = Vec::with_capacity(llama.layers.len());
    for layer in &llama.layers {
        match HostLayer::new(layer, llama, ctx, &mask, train)? {
            Some(l) => layers.push(l),
            None => return Ok(None),
        }
    }
    Ok(Some(layers))
}
