//! The comparison as a side-by-side Markdown table (4-bit base | full-precision base).

use super::{CompareReport, Evaluation, RunSummary};

fn eval_cell(e: &Evaluation) -> String {
    format!("{:.4} (ppl {:.2})", e.val_loss, e.perplexity)
}

fn train_loss_cell(r: &RunSummary) -> String {
    match (r.train_losses.first(), r.train_losses.last()) {
        (Some(a), Some(b)) => format!("{a:.4} → {b:.4}"),
        _ => "n/a".into(),
    }
}

fn memory_cell(r: &RunSummary) -> String {
    match r.peak_rss_bytes {
        Some(b) => format!("{:.0} MiB", b as f64 / 1048576.0),
        None => "n/a".into(),
    }
}

/// The report as a Markdown table, one column per base, then the quantization error.
pub fn render_table(r: &CompareReport) -> String {
    let q = r.quant.to_uppercase();
    let rows: Vec<(String, String, String)> = vec![
        (
            "base alone: val loss".into(),
            eval_cell(&r.quant_base),
            eval_cell(&r.full_base),
        ),
        (
            "own adapter: val loss".into(),
            eval_cell(&r.quant_adapter_on_quant),
            eval_cell(&r.full_adapter_on_full),
        ),
        (
            format!("{q}-trained adapter: val loss"),
            eval_cell(&r.quant_adapter_on_quant),
            eval_cell(&r.quant_adapter_on_full),
        ),
        (
            "train loss (first → last step)".into(),
            train_loss_cell(&r.quant_run),
            train_loss_cell(&r.full_run),
        ),
        (
            "train time (s)".into(),
            format!("{:.1}", r.quant_run.train_seconds),
            format!("{:.1}", r.full_run.train_seconds),
        ),
        (
            "tokens/s".into(),
            format!("{:.1}", r.quant_run.tokens_per_s),
            format!("{:.1}", r.full_run.tokens_per_s),
        ),
        (
            "peak RSS of the phase".into(),
            memory_cell(&r.quant_run),
            memory_cell(&r.full_run),
        ),
    ];
    let mut out = format!("| | {q} base | full-precision base |\n| --- | ---: | ---: |\n");
    for (name, a, b) in rows {
        out.push_str(&format!("| {name} | {a} | {b} |\n"));
    }
    out.push_str(&format!(
        "\nquantization error of the {q} base over {} linear weights ({} values): mean |W - deq(W)| \
         = {:.6e}, max {:.6e}, ||W - deq(W)||_F / ||W||_F = {:.6e}\n\
         validation: {} predicted tokens; {} steps per run\n",
        r.quant_error.weights,
        r.quant_error.elements,
        r.quant_error.mean_abs,
        r.quant_error.max_abs,
        r.quant_error.rel_frobenius,
        r.val_tokens,
        r.quant_run.steps
    ));
    out
}
