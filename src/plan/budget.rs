//! A plan held against a memory budget: `qlora train --memory-limit` refuses a run that would
//! not fit, with the numbers and what would.

use super::{
    format_bytes, largest_keep_layers, largest_seq_len, plan_memory, MemoryPlan, OptimPlan,
    PlanModel, PlanSettings,
};

/// The most top layers whose graphs can be kept (`--keep-layers auto`) with the run's plan
/// still within `limit`: 0 when even full recompute does not fit (the plan then refuses the run).
pub fn most_kept_layers(
    model: &PlanModel,
    settings: &PlanSettings,
    optim_8bit: bool,
    optim_resident_mb: Option<f64>,
    limit: usize,
) -> usize {
    let s = training_settings(settings, optim_8bit, optim_resident_mb);
    largest_keep_layers(model, &s, limit).unwrap_or(0)
}

/// `settings` with the optimizer state `qlora train`'s flags choose.
fn training_settings(
    settings: &PlanSettings,
    optim_8bit: bool,
    optim_resident_mb: Option<f64>,
) -> PlanSettings {
    PlanSettings {
        optim: match (optim_8bit, optim_resident_mb) {
            (true, _) => OptimPlan::EightBit,
            (false, Some(mb)) => OptimPlan::Paged {
                resident_bytes: (mb * 1048576.0) as usize,
            },
            (false, None) => OptimPlan::Plain,
        },
        ..settings.clone()
    }
}

/// A run whose plan does not fit its budget.
#[derive(Debug, thiserror::Error)]
#[error(
    "the planned peak memory {} exceeds --memory-limit {} by {}; {hint}",
    format_bytes(*peak),
    format_bytes(*limit),
    format_bytes(peak - limit)
)]
pub struct OverBudget {
    /// Planned peak bytes.
    pub peak: usize,
    /// The budget.
    pub limit: usize,
    /// What would fit instead.
    pub hint: String,
}

/// The plan of a `qlora train` run (optimizer state as its flags choose it), checked against
/// `limit` when one is given.
pub fn plan_for_training(
    model: &PlanModel,
    settings: &PlanSettings,
    optim_8bit: bool,
    optim_resident_mb: Option<f64>,
    limit: Option<usize>,
) -> Result<MemoryPlan, OverBudget> {
    let s = training_settings(settings, optim_8bit, optim_resident_mb);
    let plan = plan_memory(model, &s);
    let Some(limit) = limit else {
        return Ok(plan);
    };
    if plan.fits(limit) {
        return Ok(plan);
    }
    let mut hints = Vec::new();
    if let Some(t) = largest_seq_len(model, &s, limit, 64, s.seq_len) {
        hints.push(format!("--seq-len {t} fits"));
    }
    if !s.grad_checkpointing {
        let on = PlanSettings {
            grad_checkpointing: true,
            ..s.clone()
        };
        if plan_memory(model, &on).fits(limit) {
            hints.push("--grad-checkpointing true fits".to_string());
        }
    }
    if s.batch_size > 1 {
        hints.push("a smaller --batch-size with --grad-accum keeps the effective batch".into());
    }
    let hint = if hints.is_empty() {
        "nothing at this model size fits; see `qlora plan`".to_string()
    } else {
        format!("{} (see `qlora plan`)", hints.join("; "))
    };
    Err(OverBudget {
        peak: plan.peak,
        limit,
        hint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::presets::preset_config;

    #[test]
    fn refuses_over_budget_with_the_numbers_and_a_fitting_seq_len() {
        let cfg = PlanModel::from(preset_config("llama-2-7b").unwrap());
        let s = PlanSettings {
            batch_size: 1,
            seq_len: 4096,
            threads: 2,
            ..Default::default()
        };
        let ok = plan_for_training(&cfg, &s, false, None, None).unwrap();
        let err = plan_for_training(&cfg, &s, false, None, Some(8 << 30)).unwrap_err();
        assert_eq!(err.peak, ok.peak);
        let msg = err.to_string();
        assert!(msg.contains("exceeds --memory-limit 8.00 GiB"), "{msg}");
        assert!(msg.contains("--seq-len "), "{msg}");
        assert!(plan_for_training(&cfg, &s, false, None, Some(ok.peak)).is_ok());
        // 8-bit state is smaller than plain f32 state.
        let eight = plan_for_training(&cfg, &s, true, None, None).unwrap();
        assert!(eight.peak < ok.peak);
    }
}
