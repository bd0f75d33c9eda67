//! Byte counts of each part of a training run, as our code actually stores them.
//!
//! Weights follow `model::loader` (linear weights as `Nf4Tensor`: packed codes + u8 absmax +
//! nested f32 absmax per 256 blocks + one f32 offset; embeddings, head and norms in the weight
//! dtype; biases in the compute dtype). Activations follow `model::llama`, `model::ops`,
//! `train::loss` and `train::layerwise`: with a LoRA adapter on a projection every op of a layer
//! is recorded for autograd, so a layer's graph keeps every tensor it computes; the counts below
//! list them op by op, for the fused f32 CPU ops and for the composite path other dtypes and
//! every CUDA step take.

use candle_core::DType;

use crate::device::DeviceSpec;
use crate::model::config::LlamaConfig;
use crate::model::loader::BaseFormat;

use super::shape::{PlanLinear, PlanModel};
use super::{OptimPlan, PlanSettings};

/// Second-level block of the double-quantized absmax (bitsandbytes' fixed 256).
const NESTED_BLOCK: usize = 256;

/// bitsandbytes' `min_8bit_size`, below which 8-bit AdamW keeps f32 state.
const MIN_8BIT_ELEMS: usize = 4096;

/// Values per absmax of the 8-bit optimizer state.
const OPTIM_8BIT_BLOCK: usize = 256;

/// Bytes of one `[rows, cols]` weight held as 4-bit codes, exactly as `Nf4Tensor` stores it.
pub fn quantized_bytes(numel: usize, blocksize: usize, double_quant: bool) -> usize {
    let blocks = numel.div_ceil(blocksize.max(1));
    let absmax = if double_quant {
        blocks + 4 * blocks.div_ceil(NESTED_BLOCK) + 4
    } else {
        4 * blocks
    };
    numel.div_ceil(2) + absmax
}

/// Size of one element of `dtype`.
fn size(dtype: DType) -> usize {
    dtype.size_in_bytes()
}

/// The frozen base: `(linear weights incl. biases, embeddings + head + norms)`.
pub fn base_bytes(model: &PlanModel, s: &PlanSettings) -> (usize, usize) {
    let bytes = |lin: &PlanLinear| {
        let w = match s.base {
            BaseFormat::Quantized(_) => {
                quantized_bytes(lin.out * lin.inp, s.blocksize, s.double_quant)
            }
            BaseFormat::Dense => lin.out * lin.inp * size(s.weight_dtype),
        };
        w + if lin.bias {
            lin.out * size(s.compute_dtype)
        } else {
            0
        }
    };
    let layer: usize = model.linears().iter().map(bytes).sum();
    let extra: usize = model.extra_linears().iter().map(bytes).sum();
    let dense = model.dense_elems() * size(s.weight_dtype);
    (model.layers() * layer + extra, dense)
}

/// RoPE cos and sin tables (f32, one row per position up to the sequence length).
pub fn rope_bytes(model: &PlanModel, s: &PlanSettings) -> usize {
    2 * s.seq_len * model.head_dim() * 4
}

/// Trainable adapter parameters (A `[r, in]` and B `[out, r]` on each targeted linear layer).
pub fn adapter_params(model: &PlanModel, s: &PlanSettings) -> Vec<usize> {
    let mut out = Vec::new();
    let extra = model.extra_linears();
    let all = (0..model.layers())
        .flat_map(|l| model.linears_in(l))
        .chain(extra);
    for lin in all.filter(|l| s.targets(&l.path)) {
        let r = s.rank_for(&lin.path);
        out.push(r * lin.inp);
        out.push(lin.out * r);
        if s.adalora {
            out.push(r);
        }
    }
    // LoRA on an untied head: A `[r, hidden]`, B `[vocab, r]`.
    if model.untied_head() && s.targets_embedding("lm_head") {
        let r = s.rank_for("lm_head");
        out.push(r * model.hidden());
        out.push(model.vocab() * r);
    }
    // LoRA on the token embedding: A `[r, vocab]`, B `[dim, r]`.
    let path = model.embedding_path();
    if s.targets_embedding(path) {
        let r = s.rank_for(path);
        out.push(r * model.vocab());
        out.push(model.hidden() * r);
    }
    out
}

/// Optimizer state resident in memory for parameters of these sizes.
pub fn optimizer_bytes(params: &[usize], optim: &OptimPlan) -> usize {
    let plain: usize = params.iter().map(|n| 8 * n).sum();
    match optim {
        OptimPlan::Plain => plain,
        OptimPlan::Paged { resident_bytes } => plain.min(*resident_bytes),
        OptimPlan::EightBit => params
            .iter()
            .map(|&n| {
                if n < MIN_8BIT_ELEMS {
                    8 * n
                } else {
                    2 * n + 8 * n.div_ceil(OPTIM_8BIT_BLOCK)
                }
            })
            .sum(),
    }
}

/// Activation sizes of one step, in bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Activations {
    /// Layer inputs kept from the forward for the backward (`[b, t, hidden]` each).
    pub layer_inputs: usize,
    /// The additive attention mask shared by every layer.
    pub mask: usize,
    /// Everything one decoder layer's recorded graph keeps alive.
    pub layer_graph: usize,
    /// Gradients in flight while back-propagating through one layer (beyond its graph).
    pub layer_backward: usize,
    /// The loss head: final norm, a chunk of f32 logits, the hidden gradient.
    pub loss: usize,
}

/// Whether a step runs the fused f32 CPU ops (`model::ops`: attention, RMSNorm, SwiGLU, the
/// fused LoRA op) rather than the composite candle graph: f32 compute on the CPU. A CUDA step
/// takes the composite graph in any dtype (`cpu_tensor::fused_applies`).
pub fn uses_fused_ops(s: &PlanSettings) -> bool {
    s.device == DeviceSpec::Cpu && s.compute_dtype == DType::F32
}

/// Bytes a Llama-family RMSNorm over `elems` values keeps in the composite graph
/// (`rms_norm_composite`, computed in f32): x², x / rms and the output; in another dtype also the
/// f32 copy of x and the cast back before the weight (f32 → f32 casts are the same tensor).
fn rms_norm_composite_bytes(elems: usize, s: &PlanSettings) -> usize {
    if s.compute_dtype == DType::F32 {
        3 * elems * 4
    } else {
        elems * (3 * 4 + 2 * size(s.compute_dtype))
    }
}

/// Elements one projection's forward keeps in the graph (`Linear::forward`). On the fused f32
/// path (`lora::fused`) the output: the op regenerates the dropout mask and `x·Aᵀ` in its
/// backward. On the composite path (`LoraAdapter::delta`) the base product; with an adapter the
/// dropped-out input (the mask is a hash, never stored), `x·Aᵀ`, its scaling (on the rank-r
/// intermediate), `·Bᵀ` and the sum. On both, the adapter weights cast to the compute dtype, and
/// a bias adds one more.
fn projection_elems(s: &PlanSettings, lin: &PlanLinear) -> usize {
    let n = s.batch_size * s.seq_len;
    let (out, inp) = (lin.out, lin.inp);
    let mut e = n * out;
    if s.targets(&lin.path) {
        let r = s.rank_for(&lin.path);
        if s.adapter_dtype != s.compute_dtype {
            e += r * (inp + out);
        }
        if !uses_fused_ops(s) {
            e += 2 * n * r + 2 * n * out;
            if s.dropout {
                e += n * inp;
            }
        }
    }
    if lin.bias {
        e += n * out;
    }
    e
}

/// A Llama config's projections by short name (`q_proj`).
fn llama_projections(cfg: &LlamaConfig) -> impl Fn(&str) -> PlanLinear {
    let lins = PlanModel::Llama(cfg.clone()).linears();
    move |name: &str| {
        lins.iter()
            .find(|l| l.path.ends_with(name))
            .cloned()
            .unwrap_or_else(|| PlanLinear {
                path: name.into(),
                out: 0,
                inp: 0,
                bias: false,
            })
    }
}

/// Elements one decoder layer's graph keeps on the fused f32 path, op by op
/// (`DecoderLayer::forward` with `ops::rms_norm`, `ops::attention::FusedAttention`,
/// `ops::swiglu`): the layer-wise step's copy of the input (`Var::from_tensor` copies), two
/// norm outputs, seven projections, the attention output (no `[b, h, t, t]` tensor: its
/// backward recomputes the scores per block), `silu(gate)·up`, and the two residual sums.
pub fn fused_layer_graph_elems(cfg: &LlamaConfig, s: &PlanSettings) -> usize {
    let n = s.batch_size * s.seq_len;
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let projections: usize = PlanModel::Llama(cfg.clone())
        .linears()
        .iter()
        .map(|lin| projection_elems(s, lin))
        .sum();
    n * h + 2 * n * h + projections + n * q + n * i + 2 * n * h
}

/// Whether a training step under `s` takes the hand-written Llama-family step
/// (`train::llama_step`): f32 compute on the CPU and plain LoRA (not AdaLoRA); never on CUDA.
pub fn uses_host_step(model: &PlanModel, s: &PlanSettings) -> bool {
    matches!(model, PlanModel::Llama(_)) && uses_fused_ops(s) && !s.adalora
}

/// Elements one layer's tape holds on the hand-written step: its input, q, k, v, the attention
/// output, the residual after attention, gate and up.
pub fn host_layer_tape_elems(cfg: &LlamaConfig, s: &PlanSettings) -> usize {
    let n = s.batch_size * s.seq_len;
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    n * (h + q + 2 * kv + q + h + 2 * i)
}

/// What the hand-written step's backward of one layer holds beyond its tape, at its peak in
/// the MLP: the recomputed activation, its gradient, the fused op's dropped-out input, and
/// input-sized gradients (the upstream one, the residual's, the norm's).
pub fn host_layer_backward_elems(cfg: &LlamaConfig, s: &PlanSettings) -> usize {
    let n = s.batch_size * s.seq_len;
    3 * n * cfg.intermediate_size + 3 * n * cfg.hidden_size
}

/// Elements of every tensor one decoder layer's forward allocates and its graph keeps on the
/// composite path (other compute dtypes, and CUDA), in units of the compute dtype, op by op
/// (see `attention_composite`, `Rope::apply`, `rms_norm_composite`, `softmax_last_dim`):
/// `(attention-score sized, row sized)`.
pub fn composite_layer_graph_elems(cfg: &LlamaConfig, s: &PlanSettings) -> (usize, usize) {
    let n = s.batch_size * s.seq_len;
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let scores = s.batch_size * cfg.num_attention_heads * s.seq_len * s.seq_len;
    let proj = llama_projections(cfg);
    let linear = |name: &str| {
        let lin = proj(name);
        // The composite dropout multiplies by a stored mask: one more input-sized tensor.
        let dropout_mask = if s.dropout && s.targets(&lin.path) {
            n * lin.inp
        } else {
            0
        };
        projection_elems(s, &lin) + dropout_mask
    };
    // RMSNorm, in units of the compute dtype (exact for 2- and 4-byte dtypes).
    let norm = rms_norm_composite_bytes(n * h, s) / size(s.compute_dtype);
    // RoPE: -x2, cat, x·cos, rot·sin, sum (the negated half counts half) + gathered cos/sin.
    let rope = |width: usize| 9 * n * width / 2 + 2 * n * cfg.head_dim;
    let attention = linear("q_proj")
        + linear("k_proj")
        + linear("v_proj")
        // q, k, v made contiguous per head, and kᵀ made contiguous.
        + n * q
        + 3 * n * kv
        + rope(q)
        + rope(kv)
        // probs · v, then heads back to [b, t, h·d].
        + 2 * n * q
        + linear("o_proj");
    // silu(gate), silu · up.
    let mlp = linear("gate_proj") + linear("up_proj") + 2 * n * i + linear("down_proj");
    // Two norms, two residual sums; scores, · 1/√d, + mask, - max, exp, / sum.
    (6 * scores, 2 * norm + attention + mlp + 2 * n * h)
}

/// Bytes one GPT-2 or BERT layer's graph keeps, op by op (`Gpt2::layer`, `Bert::layer`,
/// `LayerNorm::forward`, `attention`): `(attention-score sized, row sized)`. LayerNorm computes
/// in f32 whatever the compute dtype: its mean, centred input, square, normalised input, scale
/// and shift (and, for another dtype, the f32 copy in and the cast back).
pub fn layer_norm_family_graph_bytes(model: &PlanModel, s: &PlanSettings) -> (usize, usize) {
    let drops_probs = model.drops_attention_probs();
    let cd = size(s.compute_dtype);
    let n = s.batch_size * s.seq_len;
    let (h, i) = (model.hidden(), model.intermediate());
    let fused = uses_fused_ops(s);
    let projections: usize = model
        .linears()
        .iter()
        .map(|lin| {
            let dropout_mask = if !fused && s.dropout && s.targets(&lin.path) {
                n * lin.inp
            } else {
                0
            };
            projection_elems(s, lin) + dropout_mask
        })
        .sum();
    // GPT-2 splits its fused qkv output into three contiguous copies.
    let split = if matches!(model, PlanModel::Gpt2(_)) {
        3 * n * h
    } else {
        0
    };
    let scores = s.batch_size * model.heads() * s.seq_len * s.seq_len;
    let (score_elems, attention) = if fused && !drops_probs {
        (0, n * h)
    } else {
        // q, k, v per head and kᵀ made contiguous, probs · v, heads back to [b, t, h]; scores,
        // · 1/√d, + mask, - max, exp, / sum, and the dropped-out probabilities.
        let dropped = usize::from(drops_probs);
        ((6 + dropped) * scores, 6 * n * h)
    };
    let sublayer_dropouts = if model.drops_sublayer_outputs() {
        2 * n * h
    } else {
        0
    };
    let norm_bytes = if s.compute_dtype == DType::F32 {
        (5 * n * h + 4 * n) * 4
    } else {
        (6 * n * h + 4 * n) * 4 + n * h * cd
    };
    // The input's copy, the activation, two residual sums.
    let rows = n * h + projections + split + attention + sublayer_dropouts + n * i + 2 * n * h;
    (score_elems * cd, rows * cd + 2 * norm_bytes)
}

/// Activation bytes of one micro-batch.
pub fn activations(model: &PlanModel, s: &PlanSettings) -> Activations {
    let cd = size(s.compute_dtype);
    let n = s.batch_size * s.seq_len;
    let (h, l) = (model.hidden(), model.layers());
    // With checkpointing each layer input is a fresh tensor; without, a layer's input is the
    // previous layer's output, which its kept graph already holds.
    let layer_inputs = if s.grad_checkpointing {
        (l + 1) * n * h * cd
    } else {
        n * h * cd
    };
    // One `[t, t]` mask per row (packed or padded batches; a plain causal batch shares one).
    let mask = s.batch_size * s.seq_len * s.seq_len * cd;
    // Per thread, the fused attention backward's block buffers: rotated q and k, dq, dk, dv of
    // one head `[t, d]`, and `P`, `dS` for 64 queries.
    let attention_scratch = {
        let (t, d) = (s.seq_len, model.head_dim());
        s.threads * (5 * t * d + 2 * 64 * t + t) * 4
    };
    let (layer_graph, layer_backward) = match model {
        PlanModel::Llama(cfg) if uses_host_step(model, s) => (
            host_layer_tape_elems(cfg, s) * cd,
            host_layer_backward_elems(cfg, s) * cd + attention_scratch,
        ),
        PlanModel::Llama(cfg) if uses_fused_ops(s) => {
            let graph = fused_layer_graph_elems(cfg, s) * cd;
            (
                graph,
                FUSED_BACKWARD_PER_100 * graph / 100 + attention_scratch,
            )
        }
        PlanModel::Llama(cfg) => {
            let (score_elems, row_elems) = composite_layer_graph_elems(cfg, s);
            (
                (score_elems + row_elems) * cd,
                (COMPOSITE_BACKWARD_SCORES_PER_10 * score_elems
                    + if s.compute_dtype == DType::F32 {
                        COMPOSITE_BACKWARD_ROWS_PER_10
                    } else {
                        COMPOSITE_BACKWARD_ROWS_PER_10_16BIT
                    } * row_elems)
                    * cd
                    / 10,
            )
        }
        _ => {
            let (score_bytes, row_bytes) = layer_norm_family_graph_bytes(model, s);
            let fit = match model {
                PlanModel::Gpt2(_) => GPT2_BACKWARD,
                _ => BERT_BACKWARD,
            };
            let (i, heads) = (model.intermediate(), model.heads());
            let rows_phase = cd * n * (fit.hidden * h + fit.ffn * i) / 100;
            let composite = !uses_fused_ops(s) || model.drops_attention_probs();
            let attention_phase = if composite {
                let scores = s.batch_size * heads * s.seq_len * s.seq_len;
                cd * (fit.scores * scores + fit.attention_hidden * n * h) / 100
            } else {
                0
            };
            (score_bytes + row_bytes, rows_phase.max(attention_phase))
        }
    };
    // Loss (`train::loss`, one pass per chunk): the top hidden state's copy, its norm, the
    // shifted rows' copy, one reused `[chunk, vocab]` f32 logits buffer and the hidden gradient
    // it fills (f32, kept for the backward); with f32 activations on the CPU an f32 copy of the
    // head when it is held in another dtype (the tensor-op loss, on a GPU or in bf16, keeps the
    // head's dtype and takes a quarter of the rows for its four buffers: the same bytes). An encoder's classification loss keeps
    // the top hidden state and its gradient.
    let loss = if model.vocab_loss() {
        let rows = s.chunk_rows.min(n).max(1);
        let head_f32 = if s.weight_dtype == DType::F32
            || s.compute_dtype != DType::F32
            || s.device != DeviceSpec::Cpu
        {
            0
        } else {
            model.vocab() * h * 4
        };
        // An adapter on the head takes the plain-graph loss: every row's logits at once, their
        // log-softmax, and the gradient of each.
        let rows = if model.untied_head() && s.targets_embedding("lm_head") {
            4 * n
        } else {
            rows
        };
        // The final norm as its layers' norms are counted on the composite path.
        let norm = match model {
            PlanModel::Llama(_) if !uses_fused_ops(s) => rms_norm_composite_bytes(n * h, s),
            _ => n * h * cd,
        };
        2 * n * h * cd + norm + rows * model.vocab() * 4 + n * h * 4 + head_f32
    } else {
        n * h * (cd + 4)
    };
    Activations {
        layer_inputs,
        mask,
        layer_graph,
        layer_backward,
        loss,
    }
}

/// On the fused path a layer's backward holds, beyond its graph, the gradients candle's
/// `backward` keeps in its store (each node's until it is processed, each `or_insert` a zeros
/// tensor plus the sum, the gradient of the upstream `g` operand of the surrogate product), the
/// product itself, and the fused LoRA op's buffers (the regenerated dropped-out input and `dx`,
/// both input-sized). Their peak depends on candle's traversal order, which we do not replicate,
/// so this ratio (percent of the layer graph) is fitted with the counting allocator on the four
/// Llama-shaped (ffn ≈ 2.7 × hidden) configs of `tests/plan_memory.rs` (with it the whole step's
/// plan lands 0.2-3.7% above the allocator's peak there; the test allows 10%).
pub const FUSED_BACKWARD_PER_100: usize = 135;

/// What a GPT-2 or BERT layer's backward holds beyond its graph, in hundredths of a tensor of
/// each size: its peak is the larger of a phase in the MLP and LayerNorms (`[n, hidden]` and
/// `[n, ffn]` gradients; LayerNorm's composite backward makes one per broadcast op) and, when
/// the attention is composite (probability dropout, or a dtype other than f32), a phase in the
/// attention (`[b, heads, t, t]` and `[n, hidden]` gradients). The dropped-out copies add
/// nothing to either. Fitted with the counting allocator on `tests/plan_memory.rs`'s runs
/// (f32, two threads, whose fused-attention scratch is inside the fit): the row phase by least
/// squares over four shapes × two batch shapes (every point within 1%), the attention phase
/// on the two shapes where it dominates.
#[derive(Clone, Copy)]
pub struct LayerNormBackward {
    /// Per `[n, hidden]` tensor in the row phase, in hundredths.
    pub hidden: usize,
    /// Per `[n, ffn]` tensor in the row phase.
    pub ffn: usize,
    /// Per `[b, heads, t, t]` tensor in the attention phase.
    pub scores: usize,
    /// Per `[n, hidden]` tensor in the attention phase.
    pub attention_hidden: usize,
}

/// GPT-2's fit (21.39, 20.04; 9.35, 30.54).
pub const GPT2_BACKWARD: LayerNormBackward = LayerNormBackward {
    hidden: 2139,
    ffn: 2004,
    scores: 935,
    attention_hidden: 3054,
};

/// BERT's fit (14.70, 17.21; 9.45, 21.59).
pub const BERT_BACKWARD: LayerNormBackward = LayerNormBackward {
    hidden: 1470,
    ffn: 1721,
    scores: 945,
    attention_hidden: 2159,
};

/// The composite path's backward, in tenths of the score-sized and row-sized parts of the
/// graph, fitted with the counting allocator on f32 runs of this path (f32 CPU training takes
/// the fused ops instead, so no test run re-measures the f32 fit).
pub const COMPOSITE_BACKWARD_SCORES_PER_10: usize = 13;
/// See [`COMPOSITE_BACKWARD_SCORES_PER_10`].
pub const COMPOSITE_BACKWARD_ROWS_PER_10: usize = 8;
/// The row-sized part in a 16-bit compute dtype (a CUDA step's default), where RMSNorm's f32
/// intermediates get f32 gradients: fitted with the counting allocator on bf16 steps on the
/// CPU backend, the same graph a CUDA step records (`tests/plan_memory.rs`,
/// `planned_bf16_activations_match_allocated_bytes`: 4 shapes × 3 checkpointing modes within
/// 10%). The CPU's NF4 kernel adds an f32 output buffer cuBLAS does not, so on a GPU this
/// errs high.
pub const COMPOSITE_BACKWARD_ROWS_PER_10_16BIT: usize = 12;
