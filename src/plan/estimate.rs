//! Byte counts of each part of a training run, as our code actually stores them.
//!
//! Weights follow `model::loader` (linear weights as `Nf4Tensor`: packed codes + u8 absmax +
//! nested f32 absmax per 256 blocks + one f32 offset; embeddings, head and norms in the weight
//! dtype; biases in the compute dtype). Activations follow `model::llama` and
//! `train::layerwise`: with a LoRA adapter on a projection every op of a layer is recorded for
//! autograd, so a layer's graph keeps every intermediate it computes; the counts below list them
//! op by op.

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
            if !s.targets.iter().any(|t| t == proj) {
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
    /// The loss head: final norm, chunks of f32 logits and their softmax, the hidden gradient.
    pub loss: usize,
}

/// Elements of every tensor one decoder layer's forward allocates and its graph keeps, op by op
/// (see `DecoderLayer::forward`, `Attention::forward`, `Linear::forward`, `LoraAdapter::delta`,
/// `Rope::apply`, `rms_norm`, `softmax_last_dim`): `(attention-score sized, row sized)`.
pub fn layer_graph_elems(cfg: &LlamaConfig, s: &PlanSettings) -> (usize, usize) {
    let n = s.batch_size * s.seq_len;
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let scores = s.batch_size * cfg.num_attention_heads * s.seq_len * s.seq_len;
    // One projection: the base product; with an adapter x·Aᵀ, (x·Aᵀ)·Bᵀ, its scaling and the
    // sum, plus (with dropout) the mask and the masked input; a bias adds one more.
    let linear = |proj: &str, out: usize, inp: usize| {
        let mut e = n * out;
        if s.targets.iter().any(|t| t == proj) {
            e += n * s.rank + 3 * n * out;
            if s.dropout {
                e += 2 * n * inp;
            }
        }
        if has_bias(cfg, proj) {
            e += n * out;
        }
        e
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
    let mask = s.batch_size * s.seq_len * s.seq_len * cd;
    let (score_elems, row_elems) = layer_graph_elems(cfg, s);
    let layer_graph = (score_elems + row_elems) * cd;
    let layer_backward =
        (BACKWARD_SCORES_PER_10 * score_elems + BACKWARD_ROWS_PER_10 * row_elems) * cd / 10;
    // Loss: final norm graph and the shifted rows, then per chunk of rows the f32 logits with
    // up to four more of its size (shifted, exp, softmax, one-hot, difference), and the
    // gradient of the hidden states gathered per chunk then concatenated.
    let rows = s.chunk_rows.min(n).max(1);
    let head_f32 = if s.weight_dtype == DType::F32 {
        0
    } else {
        cfg.vocab_size * h * 4
    };
    let loss = 4 * n * h * cd + 5 * rows * cfg.vocab_size * 4 + 2 * n * h * 4 + head_f32;
    Activations {
        layer_inputs,
        mask,
        layer_graph,
        layer_backward,
        loss,
    }
}

/// A layer's backward holds, beyond its graph, gradients in proportion to it: the ones in flight,
/// and those candle keeps for every operand that needs none (attention mask, detached softmax
/// max, RoPE tables, norm weights, dropout masks), some of them views that pin a whole larger
/// gradient. We could not count these op by op, so the ratios (in tenths, of the score-sized and
/// row-sized parts of the graph) are measured with a counting allocator on two shapes and checked
/// on others in `tests/plan_memory.rs`.
pub const BACKWARD_SCORES_PER_10: usize = 13;
/// See [`BACKWARD_SCORES_PER_10`].
pub const BACKWARD_ROWS_PER_10: usize = 8;
