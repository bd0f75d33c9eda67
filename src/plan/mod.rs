//! The memory plan of a training run: where the bytes of a QLoRA step go, before it runs.
//!
//! As llm.c plans a step's memory up front, `plan_memory` adds up the frozen base (as the loader
//! stores it), adapters, their gradients, optimizer state, activations (with or without
//! checkpointing), the loss's logits chunks, and what the device adds (`runtime`: kernel scratch
//! and the process's baseline on the CPU; the CUDA context, cuBLAS's and the NF4 op's workspaces
//! on a GPU), and says whether the peak fits a budget. A CPU plan is of host memory, a CUDA plan
//! of device memory. `qlora plan` prints it; `qlora train` prints it and refuses a run over
//! `--memory-limit`.

pub mod budget;
pub mod estimate;
pub mod presets;
pub mod rss;
pub mod runtime;
pub mod shape;
pub mod size;

use std::fmt;

use candle_core::DType;

use crate::device::DeviceSpec;
use crate::lora::config::{in_layers, names_explicitly, pattern_value, target_matches};
use crate::model::config::PROJECTIONS;
use crate::model::loader::BaseFormat;
use crate::quant::QuantType;
use crate::train::layerwise::Checkpointing;
use crate::train::loss::DEFAULT_CHUNK_ROWS;

pub use budget::{most_kept_layers, plan_for_training, OverBudget};
pub use runtime::RUNTIME_BASELINE_BYTES;
pub use shape::{PlanLinear, PlanModel};
pub use size::{format_bytes, parse_bytes};

/// How the optimizer's moments are held.
#[derive(Clone, Debug, PartialEq)]
pub enum OptimPlan {
    /// f32 m and v in memory (8 bytes per parameter).
    Plain,
    /// Paged f32 state with at most this many bytes resident.
    Paged {
        /// Resident budget in bytes.
        resident_bytes: usize,
    },
    /// 8-bit blockwise state (about 2 bytes per parameter).
    EightBit,
}

impl From<&crate::optim::StateStorage> for OptimPlan {
    fn from(s: &crate::optim::StateStorage) -> Self {
        use crate::optim::StateStorage;
        match s {
            StateStorage::Plain => OptimPlan::Plain,
            StateStorage::Paged { resident_bytes, .. } => OptimPlan::Paged {
                resident_bytes: *resident_bytes,
            },
            StateStorage::EightBit { .. } => OptimPlan::EightBit,
        }
    }
}

/// Everything about a run that decides its memory.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanSettings {
    /// Where the step runs: the CPU (the plan is of host memory; f32 Llama steps take the fused
    /// ops) or a CUDA device (the plan is of device memory; every step takes candle's graph).
    pub device: DeviceSpec,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// LoRA rank.
    pub rank: usize,
    /// Projections carrying adapters (short names).
    pub targets: Vec<String>,
    /// PEFT's `rank_pattern` (`(pattern, r)`), overriding `rank` per module.
    pub rank_pattern: Vec<(String, usize)>,
    /// PEFT's `layers_to_transform`: only these layers carry adapters.
    pub layers_to_transform: Option<Vec<usize>>,
    /// AdaLoRA adapters (`rank` is their initial rank): singular values E `[r, 1]` beside A and
    /// B, and the rank allocator's importance and uncertainty averages.
    pub adalora: bool,
    /// LoRA dropout is on (it keeps a masked copy of each adapter input; the composite path a
    /// mask too).
    pub dropout: bool,
    /// Activation checkpointing per layer.
    pub grad_checkpointing: bool,
    /// With checkpointing: top layers whose graphs are kept instead of recomputed.
    pub keep_layers: usize,
    /// Optimizer state storage.
    pub optim: OptimPlan,
    /// How the frozen linear weights are held.
    pub base: BaseFormat,
    /// Blocksize of the 4-bit weights.
    pub blocksize: usize,
    /// Double-quantized absmax.
    pub double_quant: bool,
    /// Activations' dtype.
    pub compute_dtype: DType,
    /// Dtype of embeddings, head, norms (and a dense base).
    pub weight_dtype: DType,
    /// Dtype of adapter weights (and so of their gradients).
    pub adapter_dtype: DType,
    /// Rows of logits the chunked loss materializes at once.
    pub chunk_rows: usize,
    /// Threads that keep a kernel scratch buffer.
    pub threads: usize,
}

impl PlanSettings {
    /// Whether the run puts an adapter on the linear layer at checkpoint path `path`, by PEFT's
    /// target rule.
    pub fn targets(&self, path: &str) -> bool {
        self.targets.iter().any(|t| target_matches(t, path))
            && in_layers(self.layers_to_transform.as_deref(), &[], path)
    }

    /// Whether the run puts an adapter on the token embedding at `path` (named by a target;
    /// `all-linear` does not, nor does a run limited to some layers).
    pub fn targets_embedding(&self, path: &str) -> bool {
        self.layers_to_transform
            .as_ref()
            .is_none_or(|l| l.is_empty())
            && names_explicitly(&self.targets, path)
    }

    /// The rank of the adapter on the module at `path`.
    pub fn rank_for(&self, path: &str) -> usize {
        pattern_value(&self.rank_pattern, path).map_or(self.rank, |r| *r)
    }

    /// `qlora train`'s defaults on `device`, in the dtypes a run there loads: `compute_dtype`, or
    /// the device's default (f32 on the CPU, bf16 on CUDA), for activations and, as the loader
    /// has it, for embeddings, head and norms.
    pub fn for_device(device: DeviceSpec, compute_dtype: Option<DType>) -> Self {
        let dtype = compute_dtype.unwrap_or_else(|| device.default_compute_dtype());
        Self {
            device,
            compute_dtype: dtype,
            weight_dtype: dtype,
            ..Default::default()
        }
    }

    /// Which layers the planned step recomputes.
    pub fn checkpointing(&self) -> Checkpointing {
        Checkpointing {
            enabled: self.grad_checkpointing,
            keep_layers: self.keep_layers,
        }
    }
}

impl Default for PlanSettings {
    /// `qlora train`'s defaults on the CPU: 4 × 512, r 16 on all linear layers, dropout,
    /// checkpointing, plain f32 AdamW, NF4 blocksize 64 with double quantization, f32 compute and
    /// weights.
    fn default() -> Self {
        Self {
            device: DeviceSpec::Cpu,
            seq_len: 512,
            batch_size: 4,
            rank: 16,
            targets: PROJECTIONS.iter().map(|p| p.to_string()).collect(),
            rank_pattern: Vec::new(),
            layers_to_transform: None,
            adalora: false,
            dropout: true,
            grad_checkpointing: true,
            keep_layers: 0,
            optim: OptimPlan::Plain,
            base: BaseFormat::Quantized(QuantType::Nf4),
            blocksize: 64,
            double_quant: true,
            compute_dtype: DType::F32,
            weight_dtype: DType::F32,
            adapter_dtype: DType::BF16,
            chunk_rows: DEFAULT_CHUNK_ROWS,
            threads: rayon::current_num_threads(),
        }
    }
}

/// One line of the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanItem {
    /// What it is.
    pub name: &'static str,
    /// How it was counted.
    pub detail: String,
    /// Bytes at the peak of the step.
    pub bytes: usize,
}

/// A run's memory, part by part, and its peak.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    /// The parts alive at the peak, in the order printed.
    pub items: Vec<PlanItem>,
    /// Sum of the items: the planned peak resident memory.
    pub peak: usize,
    /// Trainable parameters.
    pub trainable: usize,
    /// The settings it was computed for.
    pub settings: PlanSettings,
}

impl MemoryPlan {
    /// Whether the peak fits in `limit` bytes.
    pub fn fits(&self, limit: usize) -> bool {
        self.peak <= limit
    }
}

/// Plan the memory of training `model` with settings `s`.
pub fn plan_memory(model: &PlanModel, s: &PlanSettings) -> MemoryPlan {
    let (linear, dense) = estimate::base_bytes(model, s);
    let params = estimate::adapter_params(model, s);
    let trainable: usize = params.iter().sum();
    let adapter = trainable * s.adapter_dtype.size_in_bytes();
    let optim = estimate::optimizer_bytes(&params, &s.optim);
    let act = estimate::activations(model, s);
    let l = model.layers();
    let n = s.batch_size * s.seq_len;
    let base_name = match s.base {
        BaseFormat::Quantized(q) => format!(
            "{} blocksize {}{}",
            q.name(),
            s.blocksize,
            if s.double_quant {
                " + double quant"
            } else {
                ""
            }
        ),
        BaseFormat::Dense => format!("dense {:?}", s.weight_dtype),
    };
    let mut items = vec![
        PlanItem {
            name: "base linear weights",
            detail: format!(
                "{l} layers x {} linear layers, {base_name}",
                model.linears().len()
            ),
            bytes: linear,
        },
        PlanItem {
            name: "embeddings, head, norms",
            detail: format!(
                "{} x {} vocabulary, {} ({:?})",
                model.vocab(),
                model.hidden(),
                model.model_type(),
                s.weight_dtype
            ),
            bytes: dense
                + if model.rotary() {
                    estimate::rope_bytes(model, s)
                } else {
                    0
                },
        },
        PlanItem {
            name: "adapters",
            detail: format!(
                "r {} on {} ({} params, {:?})",
                s.rank,
                s.targets.join(","),
                trainable,
                s.adapter_dtype
            ),
            bytes: adapter,
        },
        PlanItem {
            name: "adapter gradients",
            detail: format!("{:?}", s.adapter_dtype),
            bytes: adapter,
        },
        PlanItem {
            name: "optimizer state",
            detail: match &s.optim {
                OptimPlan::Plain => "AdamW m + v, f32".to_string(),
                OptimPlan::Paged { resident_bytes } => format!(
                    "AdamW f32, paged, at most {} resident",
                    format_bytes(*resident_bytes)
                ),
                OptimPlan::EightBit => "AdamW 8-bit blockwise".to_string(),
            },
            bytes: optim,
        },
        PlanItem {
            name: "layer inputs kept",
            detail: if s.grad_checkpointing {
                format!("{} x [{n}, {}] (checkpointing)", l + 1, model.hidden())
            } else {
                format!("embeddings [{n}, {}]", model.hidden())
            },
            bytes: act.layer_inputs + act.mask,
        },
    ];
    if s.adalora {
        let at = items.len() - 1;
        items.insert(
            at,
            PlanItem {
                name: "AdaLoRA allocator",
                detail: "importance and uncertainty averages of every adapter value, f32"
                    .to_string(),
                // Two averages kept, and the step's importance while they are updated.
                bytes: 12 * trainable,
            },
        );
    }
    // The step's transient top. With checkpointing on every layer: the loss head (no layer graph
    // alive), or one recomputed layer graph plus the gradients flowing through it. Otherwise the
    // kept graphs (every layer's without checkpointing, the top N with `--keep-layers N`) are
    // alive through the loss and the first layer backward.
    let loss_item = PlanItem {
        name: "loss head",
        detail: if model.vocab_loss() {
            format!(
                "{} rows x {} vocab f32 logits, softmax, gradient",
                s.chunk_rows.min(n),
                model.vocab()
            )
        } else {
            "top hidden states, pooled classification loss".to_string()
        },
        bytes: act.loss,
    };
    let backward_item = PlanItem {
        name: "layer backward",
        detail: "gradients in flight through one layer".to_string(),
        bytes: act.layer_backward,
    };
    let kept = s.checkpointing().kept_graphs(l);
    if kept == 0 {
        if act.loss > act.layer_graph + act.layer_backward {
            items.push(loss_item);
        } else {
            items.push(PlanItem {
                name: "layer activations",
                detail: "one layer's graph, recomputed in the backward".to_string(),
                bytes: act.layer_graph,
            });
            items.push(backward_item);
        }
    } else {
        // Kept graphs are freed top-down in the backward before any recompute, so a recomputed
        // layer never meets them.
        items.push(PlanItem {
            name: "layer activations",
            detail: if kept == l {
                format!(
                    "{l} x {} (every layer's graph kept)",
                    format_bytes(act.layer_graph)
                )
            } else {
                format!(
                    "{kept} x {} (the top {kept} of {l} layers' graphs kept, the rest recomputed)",
                    format_bytes(act.layer_graph)
                )
            },
            bytes: kept * act.layer_graph,
        });
        items.push(if act.loss > act.layer_backward {
            loss_item
        } else {
            backward_item
        });
    }
    items.extend(runtime::runtime_items(model, s));
    let peak = items.iter().map(|i| i.bytes).sum();
    MemoryPlan {
        items,
        peak,
        trainable,
        settings: s.clone(),
    }
}

/// Peak bytes of one step's activations (layer inputs, mask, layer graphs, the loss head and
/// the backward's gradients in flight), over what the model and optimizer already hold.
pub fn activation_peak(model: &PlanModel, s: &PlanSettings) -> usize {
    let a = estimate::activations(model, s);
    let inputs = a.layer_inputs + a.mask;
    match s.checkpointing().kept_graphs(model.layers()) {
        0 => inputs + a.loss.max(a.layer_graph + a.layer_backward),
        kept => inputs + kept * a.layer_graph + a.loss.max(a.layer_backward),
    }
}

/// The longest sequence (a multiple of `step`, at most `max`) whose plan fits `limit`, if any.
pub fn largest_seq_len(
    model: &PlanModel,
    s: &PlanSettings,
    limit: usize,
    step: usize,
    max: usize,
) -> Option<usize> {
    largest(step, max, limit, |t| {
        plan_memory(
            model,
            &PlanSettings {
                seq_len: t,
                ..s.clone()
            },
        )
        .peak
    })
}

/// The most top layers (`--keep-layers`) whose graphs fit `limit` with checkpointing on, if even
/// none (every layer recomputed) fits. Each kept layer adds one layer graph to the peak, so the
/// fit is monotone in the count.
pub fn largest_keep_layers(model: &PlanModel, s: &PlanSettings, limit: usize) -> Option<usize> {
    (0..=model.layers()).rev().find(|&n| {
        plan_memory(
            model,
            &PlanSettings {
                grad_checkpointing: true,
                keep_layers: n,
                ..s.clone()
            },
        )
        .fits(limit)
    })
}

/// The largest batch size (at most `max`) whose plan fits `limit`, if any.
pub fn largest_batch(
    model: &PlanModel,
    s: &PlanSettings,
    limit: usize,
    max: usize,
) -> Option<usize> {
    largest(1, max, limit, |b| {
        plan_memory(
            model,
            &PlanSettings {
                batch_size: b,
                ..s.clone()
            },
        )
        .peak
    })
}

/// Largest multiple of `step` in `step..=max` with `peak(x) <= limit` (peak grows with x).
fn largest(step: usize, max: usize, limit: usize, peak: impl Fn(usize) -> usize) -> Option<usize> {
    let (mut lo, mut hi) = (0usize, max / step.max(1));
    if hi == 0 || peak(step) > limit {
        return None;
    }
    // Invariant: lo = 0 or peak(lo·step) fits; everything above hi does not.
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if peak(mid * step) <= limit {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Some(lo * step)
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.settings;
        writeln!(
            f,
            "memory plan: batch {} x seq {}, checkpointing {}, compute {:?}, {}",
            s.batch_size,
            s.seq_len,
            s.checkpointing(),
            s.compute_dtype,
            match s.device {
                DeviceSpec::Cpu => "host memory (cpu)".to_string(),
                d @ DeviceSpec::Cuda(_) =>
                    format!("device memory of {d} (host memory not counted)"),
            }
        )?;
        let w = self.items.iter().map(|i| i.name.len()).max().unwrap_or(0);
        for i in &self.items {
            writeln!(
                f,
                "  {:<w$}  {:>10}  {}",
                i.name,
                format_bytes(i.bytes),
                i.detail
            )?;
        }
        write!(
            f,
            "  {:<w$}  {:>10}",
            "planned peak",
            format_bytes(self.peak)
        )
    }
}

#[cfg(test)]
mod tests;
