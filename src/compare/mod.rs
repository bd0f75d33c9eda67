//! The QLoRA experiment in one call: the same adapters trained on a 4-bit base and on the
//! full-precision base, then every (base, adapter) pair evaluated on one validation set.
//!
//! Both runs use identical data (one read, one validation split, the same batch order), seed
//! (so the same initial adapters) and hyperparameters. The phases run one after another in this
//! process, each with its own peak-memory measurement ([`peak_memory`]):
//! 1. 4-bit base: load, evaluate the base alone, train (`OUT/<quant>/`).
//! 2. full-precision base: load, evaluate the base alone, train (`OUT/full/`).
//! 3. the 4-bit-trained adapter on the full-precision base (the cross case), and the
//!    quantization error of the base (the 4-bit model loaded again, compared weight by weight).
//!
//! [`write_outputs`] then writes `OUT/compare.json` and both runs' loss curves in `OUT/loss.svg`.

pub mod peak_memory;
pub mod quant_error;
pub mod table;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use self::peak_memory::PeakMemory;
use self::quant_error::{measure_quant_error, QuantError};
use crate::model::error::ModelError;
use crate::model::loader::{load_model, BaseFormat, LoadOptions};
use crate::peft;
use crate::train::plot::{draw_styled, Series, Style, Styled};
use crate::train::recipe::{RunData, TrainRecipe};
use crate::train::trainer::{check_output_dir, train, validation_loss, TrainReport};

/// File of the comparison's results inside the output folder.
pub const REPORT_FILE: &str = "compare.json";
/// Image with both runs' loss curves inside the output folder.
pub const CURVES_FILE: &str = "loss.svg";
/// Sub-folder of the full-precision run.
pub const FULL_DIR: &str = "full";

/// What to compare.
#[derive(Clone, Debug)]
pub struct CompareSpec {
    /// Model (HF folder or GGUF file).
    pub model: PathBuf,
    /// How to load it for the 4-bit run (`base` must be NF4 or FP4); the full-precision run
    /// uses the same options with a dense base.
    pub load: LoadOptions,
    /// Training data file.
    pub data: PathBuf,
    /// Training choices shared by both runs (validation comes from here too).
    pub recipe: TrainRecipe,
    /// Output folder: `<quant>/` and `full/` runs, `compare.json`, `loss.svg`.
    pub out: PathBuf,
    /// Show progress bars while training.
    pub progress: bool,
}

/// Validation loss of one (base, adapter) pair.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Mean token loss over the validation batches.
    pub val_loss: f64,
    /// `exp(val_loss)`.
    pub perplexity: f64,
}

impl Evaluation {
    fn of(val_loss: f64) -> Self {
        Self {
            val_loss,
            perplexity: val_loss.exp(),
        }
    }
}

/// One training run of the comparison.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Base format it trained on (`nf4`, `fp4`, `none`).
    pub base: String,
    /// Its output folder (adapter, metrics.jsonl, loss.svg).
    pub out: PathBuf,
    /// Optimizer steps.
    pub steps: usize,
    /// Loss of every step.
    pub train_losses: Vec<f64>,
    /// (step, validation loss) pairs.
    pub val_losses: Vec<(usize, f64)>,
    /// Wall time of the training call (validation included).
    pub train_seconds: f64,
    /// Trained tokens per second (training steps only).
    pub tokens_per_s: f64,
    /// Peak resident memory of the phase (load, base evaluation, training), when known.
    pub peak_rss_bytes: Option<u64>,
}

impl RunSummary {
    fn new(base: BaseFormat, out: PathBuf, r: &TrainReport, peak: Option<u64>) -> Self {
        Self {
            base: base.name().to_string(),
            out,
            steps: r.steps,
            train_losses: r.losses.clone(),
            val_losses: r.val_losses.clone(),
            train_seconds: r.seconds,
            tokens_per_s: r.tokens_per_s,
            peak_rss_bytes: peak,
        }
    }
}

/// Every number of the comparison.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompareReport {
    /// The model compared.
    pub model: String,
    /// The 4-bit format (`nf4` or `fp4`).
    pub quant: String,
    /// Predicted tokens in the validation set.
    pub val_tokens: usize,
    /// The 4-bit base alone.
    pub quant_base: Evaluation,
    /// The full-precision base alone.
    pub full_base: Evaluation,
    /// The 4-bit-trained adapter on its own (4-bit) base.
    pub quant_adapter_on_quant: Evaluation,
    /// The full-precision-trained adapter on its own (full-precision) base.
    pub full_adapter_on_full: Evaluation,
    /// The 4-bit-trained adapter on the full-precision base.
    pub quant_adapter_on_full: Evaluation,
    /// The 4-bit run.
    pub quant_run: RunSummary,
    /// The full-precision run.
    pub full_run: RunSummary,
    /// |W - deq(W)| over the quantized linear weights.
    pub quant_error: QuantError,
}

/// Validation loss after training: the trainer's last validation.
fn final_val_loss(r: &TrainReport) -> Result<f64, ModelError> {
    r.val_losses
        .last()
        .map(|&(_, v)| v)
        .ok_or_else(|| ModelError::invalid("compare", "the run recorded no validation loss"))
}

/// Run the comparison of `spec`; `log` receives one line per phase.
pub fn compare(spec: &CompareSpec, log: &mut dyn FnMut(&str)) -> Result<CompareReport, ModelError> {
    let BaseFormat::Quantized(qtype) = spec.load.base else {
        return Err(ModelError::invalid(
            "compare",
            "the 4-bit run needs a 4-bit base (nf4 or fp4), not `none`",
        ));
    };
    let quant = BaseFormat::Quantized(qtype);
    let quant_out = spec.out.join(quant.name());
    let full_out = spec.out.join(FULL_DIR);
    for dir in [&quant_out, &full_out] {
        if dir.join("adapter").exists() {
            return Err(ModelError::invalid(
                dir.display().to_string(),
                "already holds an adapter; choose another output folder",
            ));
        }
    }
    let report_path = spec.out.join(REPORT_FILE);
    if report_path.exists() {
        return Err(ModelError::invalid(
            report_path.display().to_string(),
            "a comparison is already there; choose another output folder",
        ));
    }
    // Every output folder must be writable before minutes of work.
    for dir in [&spec.out, &quant_out, &full_out] {
        check_output_dir(dir)?;
    }
    let base_name = spec.model.display().to_string();
    let load = |base: BaseFormat| {
        let opts = LoadOptions {
            base,
            max_positions: Some(spec.recipe.seq_len),
            ..spec.load.clone()
        };
        load_model(&spec.model, &opts)
    };

    // Phase 1: the 4-bit base.
    let phase = PeakMemory::start();
    let mut m = load(quant)?;
    let data: RunData = spec.recipe.load_data(&m, &spec.data)?;
    if data.val.is_empty() {
        return Err(ModelError::invalid(
            spec.data.display().to_string(),
            format!(
                "compare needs a validation set, and none was taken{}; give --val-data FILE \
                 (or a --val-split of a file with several documents)",
                data.note
                    .as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            ),
        ));
    }
    let val_tokens = data.val.iter().map(|b| b.predicted_tokens()).sum();
    log(&format!(
        "train data: {} | validation: {} batches, {val_tokens} predicted tokens",
        data.train_report,
        data.val.len()
    ));
    let quant_base = Evaluation::of(validation_loss(&m.model, &data.val)?);
    log(&format!(
        "{} base alone: val loss {:.4}",
        quant.name(),
        quant_base.val_loss
    ));
    let mut settings = spec.recipe.settings(&data.train);
    settings.progress = spec.progress;
    peft::attach_new(&mut m.model, &spec.recipe.lora, spec.recipe.seed)?;
    let mut batches = data.train.clone();
    let quant_report = train(
        &mut m.model,
        &spec.recipe.lora,
        &base_name,
        &mut batches,
        &data.val,
        &settings,
        &quant_out,
    )?;
    let quant_run = RunSummary::new(quant, quant_out.clone(), &quant_report, phase.peak_bytes());
    drop(m);
    log(&format!(
        "{} run: {} steps in {:.1} s, val loss {:.4}",
        quant.name(),
        quant_report.steps,
        quant_report.seconds,
        final_val_loss(&quant_report)?
    ));

    // Phase 2: the full-precision base, same data, seed and settings.
    let phase = PeakMemory::start();
    let mut full = load(BaseFormat::Dense)?;
    let full_base = Evaluation::of(validation_loss(&full.model, &data.val)?);
    log(&format!(
        "full-precision base alone: val loss {:.4}",
        full_base.val_loss
    ));
    peft::attach_new(&mut full.model, &spec.recipe.lora, spec.recipe.seed)?;
    let mut batches = data.train.clone();
    let full_report = train(
        &mut full.model,
        &spec.recipe.lora,
        &base_name,
        &mut batches,
        &data.val,
        &settings,
        &full_out,
    )?;
    let full_run = RunSummary::new(
        BaseFormat::Dense,
        full_out.clone(),
        &full_report,
        phase.peak_bytes(),
    );
    log(&format!(
        "full-precision run: {} steps in {:.1} s, val loss {:.4}",
        full_report.steps,
        full_report.seconds,
        final_val_loss(&full_report)?
    ));

    // Phase 3: the cross case, and the quantization error of the base.
    let quant_adapter = quant_out.join("adapter");
    peft::load_adapter(&mut full.model, &quant_adapter, None)?;
    let quant_adapter_on_full = Evaluation::of(validation_loss(&full.model, &data.val)?);
    log(&format!(
        "{}-trained adapter on the full-precision base: val loss {:.4}",
        quant.name(),
        quant_adapter_on_full.val_loss
    ));
    let again = load(quant)?;
    let quant_error = measure_quant_error(&full.model, &again.model)?;

    Ok(CompareReport {
        model: base_name,
        quant: quant.name().to_string(),
        val_tokens,
        quant_base,
        full_base,
        quant_adapter_on_quant: Evaluation::of(final_val_loss(&quant_report)?),
        full_adapter_on_full: Evaluation::of(final_val_loss(&full_report)?),
        quant_adapter_on_full,
        quant_run,
        full_run,
        quant_error,
    })
}

/// (step, loss) points of a curve.
type Curve = Vec<(f64, f64)>;

/// Points of a run's train and validation curves.
fn curve_points(run: &RunSummary) -> (Curve, Curve) {
    let train = run
        .train_losses
        .iter()
        .enumerate()
        .map(|(i, &l)| ((i + 1) as f64, l))
        .collect();
    let val = run.val_losses.iter().map(|&(s, l)| (s as f64, l)).collect();
    (train, val)
}

/// Write `out/compare.json` (temp file, then renamed) and both runs' train and validation
/// curves in one image, `out/loss.svg`.
pub fn write_outputs(report: &CompareReport, out: &Path) -> Result<(), ModelError> {
    let (qt, qv) = curve_points(&report.quant_run);
    let (ft, fv) = curve_points(&report.full_run);
    let names = [
        format!("{} base: train", report.quant),
        format!("{} base: validation", report.quant),
        "full-precision base: train".to_string(),
        "full-precision base: validation".to_string(),
    ];
    // Train losses as lines, validations (measured every few steps) as markers.
    let styles = [Style::Line, Style::Markers, Style::Line, Style::Markers];
    let series: Vec<Styled<'_>> = [&qt, &qv, &ft, &fv]
        .into_iter()
        .zip(&names)
        .zip(styles)
        .filter(|((p, _), _)| !p.is_empty())
        .map(|((points, name), style)| Styled {
            series: Series { name, points },
            style,
        })
        .collect();
    draw_styled(
        &out.join(CURVES_FILE),
        &format!("LoRA on a {} base vs the full-precision base", report.quant),
        "loss",
        &series,
        None,
    )?;
    let path = out.join(REPORT_FILE);
    let tmp = out.join(format!(".{REPORT_FILE}.tmp"));
    let text = serde_json::to_string_pretty(report)
        .map_err(|e| ModelError::invalid(REPORT_FILE, e.to_string()))?;
    std::fs::write(&tmp, text).map_err(|e| ModelError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| ModelError::io(&path, e))
}
