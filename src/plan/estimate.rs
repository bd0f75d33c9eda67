//! Byte counts of each part of a training run, as our code actually stores them.
//!
//! Weights follow `model::loader` (linear weights as `Nf4Tensor`: packed codes + u8 absmax +
//! nested f32 absmax per 256 blocks + one f32 offset; embeddings, head and norms in the weight
//! dtype; biases in the compute dtype). Activations follow `model::llama`, `model::ops`,
//! `train::loss` and `train::layerwise`: with a LoRA adapter on a projection every op of a layer
//! is recorded for autograd, so a layer's graph keeps every tensor it computes; the counts below
//! list them op by op, for the fused f32 CPU ops and for the composite path other dtypes take.

use candle_core::DType;

use crate::model::config::{LlamaConfig, PROJECTIONS};
use crate::model::loader::BaseFormat;

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

/// Whether projection `proj` has a bias under `cfg`.
fn has_bias(cfg: &LlamaConfig, proj: &str) -> bool {
    match proj {
        "q_proj" | "k_proj" | "v_proj" => cfg.attention_bias,
        "o_proj" => cfg.o_proj_bias,
        _ => cfg.mlp_bias,
    }
}

/// The frozen base: `(linear weights incl. biases, embeddings + head + norms)`.
pub fn base_bytes(cfg: &LlamaConfig, s: &PlanSettings) -> (usize, usize) {
    let mut linear = 0;
    for proj in PROJECTIONS {
        let Some((out, inp)) = cfg.projection_shape(proj) else {
            continue;
        };
        linear += match s.base {
            BaseFormat::Quantized(_) => quantized_bytes(out * inp, s.blocksize, s.double_quant),
            BaseFormat::Dense => out * inp * size(s.weight_dtype),
        };
        if has_bias(cfg, proj) {
            linear += out * size(s.compute_dtype);
        }
    }
    let (v, h, l) = (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers);
    let heads = if cfg.tie_word_embeddings { 1 } else { 2 };
    let dense = (heads * v * h + (2 * l + 1) * h) * size(s.weight_dtype);
    (l * linear, dense)
}

/// RoPE cos and sin tables (f32, one row per position up to the sequence length).
pub fn rope_bytes(cfg: &LlamaConfig, s: &PlanSettings) -> usize {
    2 * s.seq_len * cfg.head_dim * 4
}

/// Trainable adapter parameters (A `[r, in]` and B `[out, r]` on each targeted projection).
pub fn adapter_params(cfg: &LlamaConfig, s: &PlanSettings) -> Vec<usize> {
    let mut out = Vec::new();
    for _ in 0..cfg.num_hidden_layers {
        for proj in PROJECTIONS {
            if !s.targets_projection(proj) {
                continue;
            }
            if let Some((o, i)) = cfg.projection_shape(proj) {
                out.push(s.rank * i);
                out.push(o * s.rank);
            }
        }
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

/// Whether a step runs the fused f32 CPU ops (`model::ops`: attention, RMSNorm, SwiGLU) rather
/// than the composite candle graph; we plan CPU runs, so this is the compute dtype.
pub fn uses_fused_ops(s: &PlanSettings) -> bool {
    s.compute_dtype == DType::F32
}

/// Elements one projection's forward keeps in the graph (`Linear::forward`). On the fused f32
/// path (`lora::fused`) the output: the op regenerates the dropout mask and `x·Aᵀ` in its
/// backward. On the composite path (`LoraAdapter::delta`) the base product; with an adapter the
/// dropped-out input (the mask is a hash, never stored), `x·Aᵀ`, its scaling (on the rank-r
/// intermediate), `·Bᵀ` and the sum. On both, the adapter weights cast to the compute dtype, and
/// a bias adds one more.
fn projection_elems(
    cfg: &LlamaConfig,
    s: &PlanSettings,
    proj: &str,
    out: usize,
    inp: usize,
) -> usize {
    let n = s.batch_size * s.seq_len;
    let mut e = n * out;
    if s.targets_projection(proj) {
        if s.adapter_dtype != s.compute_dtype {
            e += s.rank * (inp + out);
        }
        if !uses_fused_ops(s) {
            e += 2 * n * s.rank + 2 * n * out;
            if s.dropout {
                e += n * inp;
            }
        }
    }
    if has_bias(cfg, proj) {
        e += n * out;
    }
    e
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
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let projections = projection_elems(cfg, s, "q_proj", q, h)
        + projection_elems(cfg, s, "k_proj", kv, h)
        + projection_elems(cfg, s, "v_proj", kv, h)
        + projection_elems(cfg, s, "o_proj", h, q)
        + projection_elems(cfg, s, "gate_proj", i, h)
        + projection_elems(cfg, s, "up_proj", i, h)
        + projection_elems(cfg, s, "down_proj", h, i);
    n * h + 2 * n * h + projections + n * q + n * i + 2 * n * h
}

/// Elements of every tensor one decoder layer's forward allocates and its graph keeps on the
/// composite path (other compute dtypes), op by op (see `attention_composite`, `Rope::apply`,
/// `rms_norm_composite`, `softmax_last_dim`): `(attention-score sized, row sized)`.
pub fn composite_layer_graph_elems(cfg: &LlamaConfig, s: &PlanSettings) -> (usize, usize) {
    let n = s.batch_size * s.seq_len;
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let scores = s.batch_size * cfg.num_attention_heads * s.seq_len * s.seq_len;
    let linear = |proj: &str, out: usize, inp: usize| {
        // The composite dropout multiplies by a stored mask: one more input-sized tensor.
        let dropout_mask = if s.dropout && s.targets_projection(proj) {
            n * inp
        } else {
            0
        };
        projection_elems(cfg, s, proj, out, inp) + dropout_mask
    };
    // RMSNorm: x², x / rms, · weight.
    let norm = 3 * n * h;
    // RoPE: -x2, cat, x·cos, rot·sin, sum (the negated half counts half) + gathered cos/sin.
    let rope = |width: usize| 9 * n * width / 2 + 2 * n * cfg.head_dim;
    let attention = linear("q_proj", q, h)
        + linear("k_proj", kv, h)
        + linear("v_proj", kv, h)
        // q, k, v made contiguous per head, and kᵀ made contiguous.
        + n * q
        + 3 * n * kv
        + rope(q)
        + rope(kv)
        // probs · v, then heads back to [b, t, h·d].
        + 2 * n * q
        + linear("o_proj", h, q);
    // silu(gate), silu · up.
    let mlp =
        linear("gate_proj", i, h) + linear("up_proj", i, h) + 2 * n * i + linear("down_proj", h, i);
    // Two norms, two residual sums; scores, · 1/√d, + mask, - max, exp, / sum.
    (6 * scores, 2 * norm + attention + mlp + 2 * n * h)
}

/// Activation bytes of one micro-batch.
pub fn activations(cfg: &LlamaConfig, s: &PlanSettings) -> Activations {
    let cd = size(s.compute_dtype);
    let n = s.batch_size * s.seq_len;
    let (h, l) = (cfg.hidden_size, cfg.num_hidden_layers);
    // With checkpointing each layer input is a fresh tensor; without, a layer's input is the
    // previous layer's output, which its kept graph already holds.
    let layer_inputs = if s.grad_checkpointing {
        (l + 1) * n * h * cd
    } else {
        n * h * cd
    };
    // One `[t, t]` mask per row (packed or padded batches; a plain causal batch shares one).
    let mask = s.batch_size * s.seq_len * s.seq_len * cd;
    let (layer_graph, layer_backward) = if uses_fused_ops(s) {
        let graph = fused_layer_graph_elems(cfg, s) * cd;
        // Per thread, the attention backward's block buffers: rotated q and k, dq, dk, dv of
        // one head `[t, d]`, and `P`, `dS` for 64 queries.
        let (t, d) = (s.seq_len, cfg.head_dim);
        let attention_scratch = s.threads * (5 * t * d + 2 * 64 * t + t) * 4;
        (
            graph,
            FUSED_BACKWARD_PER_100 * graph / 100 + attention_scratch,
        )
    } else {
        let (score_elems, row_elems) = composite_layer_graph_elems(cfg, s);
        (
            (score_elems + row_elems) * cd,
            (COMPOSITE_BACKWARD_SCORES_PER_10 * score_elems
                + COMPOSITE_BACKWARD_ROWS_PER_10 * row_elems)
                * cd
                / 10,
        )
    };
    // Loss (`train::loss`, one pass per chunk): the top hidden state's copy, its norm, the
    // shifted rows' copy, one reused `[chunk, vocab]` f32 logits buffer and the hidden gradient
    // it fills (f32, kept for the backward); an f32 copy of the head when it is held in another
    // dtype.
    let rows = s.chunk_rows.min(n).max(1);
    let head_f32 = if s.weight_dtype == DType::F32 {
        0
    } else {
        cfg.vocab_size * h * 4
    };
    let loss = 3 * n * h * cd + rows * cfg.vocab_size * 4 + n * h * 4 + head_f32;
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

/// The composite path's backward, in tenths of the score-sized and row-sized parts of the
/// graph; fitted with the counting allocator before the fused ops existed (f32 then took this
/// path) and not re-measured since, as no CPU run takes it in training now.
pub const COMPOSITE_BACKWARD_SCORES_PER_10: usize = 13;
/// See [`COMPOSITE_BACKWARD_SCORES_PER_10`].
pub const COMPOSITE_BACKWARD_ROWS_PER_10: usize = 8;
