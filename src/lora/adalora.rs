//! AdaLoRA (Zhang et al., 2023) as PEFT defines it (`AdaLoraConfig`, `SVDLinear`,
//! `RankAllocator`): each update is `B · (A ⊙ E) · alpha / (init_r + 1e-5)` with A `[r, in]`,
//! E `[r, 1]`, B `[out, r]` in SVD form; an orthogonality penalty keeps A's rows and B's columns
//! near orthonormal; and a rank allocator zeroes the least important singular values until a
//! budget of `target_r` per module (on average) is reached.
//!
//! The allocator, after each optimizer step: importance `|p · ∇p|` of every entry of A, E and B,
//! smoothed `Ī = β1·Ī + (1−β1)·I` and its uncertainty `Ū = β2·Ū + (1−β2)·|I − Ī|`; an entry's
//! score is `Ī·Ū`; a triplet `k` of a module scores `s(E_k) + mean_j s(A_kj) + mean_i s(B_ik)`.
//! The budget stays at the initial total rank through `tinit`, falls as a cube to
//! `target_r × modules` at `total_step − tfinal`, and every `deltaT` steps in between (and once
//! at the end of the fall) the triplets scoring at or below the `(initial − budget)`-th smallest
//! score get `E = 0`. After the fall the final pattern is re-applied each step.

use std::collections::BTreeMap;

use candle_core::{DType, Result, Tensor, D};

use super::LoraAdapter;

/// PEFT's `AdaLoraConfig` fields beyond LoRA's.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaLoraConfig {
    /// Initial rank of every module.
    pub init_r: usize,
    /// Average rank the budget falls to.
    pub target_r: usize,
    /// Steps at the initial budget.
    pub tinit: usize,
    /// Steps at the final budget.
    pub tfinal: usize,
    /// Steps between two allocations while the budget falls.
    pub delta_t: usize,
    /// EMA factor of the importance.
    pub beta1: f64,
    /// EMA factor of its uncertainty.
    pub beta2: f64,
    /// Weight of the orthogonality penalty in the loss.
    pub orth_reg_weight: f64,
    /// Steps of the run (the budget schedule's length).
    pub total_step: usize,
    /// Which singular values each module keeps (`model.layers.0.self_attn.q_proj` → mask of
    /// length `init_r`), once the allocator has masked; PEFT's `rank_pattern`.
    pub rank_pattern: Option<RankPattern>,
}

impl Default for AdaLoraConfig {
    /// PEFT's defaults (`total_step` must still be set).
    fn default() -> Self {
        Self {
            init_r: 12,
            target_r: 8,
            tinit: 0,
            tfinal: 0,
            delta_t: 1,
            beta1: 0.85,
            beta2: 0.85,
            orth_reg_weight: 0.5,
            total_step: 0,
            rank_pattern: None,
        }
    }
}

impl AdaLoraConfig {
    /// The scale of every module's update: `alpha / (init_r + 1e-5)` (PEFT divides by `ranknum`,
    /// which stays at `init_r` when a module is resized).
    pub fn scale(&self, alpha: f64) -> f64 {
        let alpha = if alpha > 0.0 {
            alpha
        } else {
            self.init_r as f64
        };
        alpha / (self.init_r as f64 + 1e-5)
    }

    /// Check the settings as PEFT does.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.init_r == 0 {
            return Err("init_r must be positive".into());
        }
        if self.total_step == 0 {
            return Err("total_step must be positive".into());
        }
        if self.tinit + self.tfinal >= self.total_step {
            return Err(format!(
                "tinit ({}) must be below total_step − tfinal ({} − {}) so the budget can fall",
                self.tinit, self.total_step, self.tfinal
            ));
        }
        if !(self.beta1 > 0.0 && self.beta1 < 1.0 && self.beta2 > 0.0 && self.beta2 < 1.0) {
            return Err(format!(
                "beta1 ({}) and beta2 ({}) must lie in (0, 1)",
                self.beta1, self.beta2
            ));
        }
        if self.orth_reg_weight < 0.0 || !self.orth_reg_weight.is_finite() {
            return Err(format!(
                "orth_reg_weight must be ≥ 0, got {}",
                self.orth_reg_weight
            ));
        }
        if self.delta_t == 0 {
            return Err("deltaT must be positive".into());
        }
        Ok(())
    }

    /// The rank a module keeps under `rank_pattern` (its count of kept values), else `init_r`.
    pub fn rank_of(&self, path: &str) -> usize {
        self.mask_of(path)
            .map_or(self.init_r, |m| m.iter().filter(|&&k| k).count())
    }

    /// A module's mask in `rank_pattern`.
    pub fn mask_of(&self, path: &str) -> Option<&[bool]> {
        self.rank_pattern
            .as_ref()?
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, m)| m.as_slice())
    }
}

/// PEFT's orthogonality penalty over `adapters`: the mean, over every A and every B, of
/// `‖AAᵀ − I‖_F` and `‖BᵀB − I‖_F` (a differentiable f32 scalar).
pub fn orth_reg(adapters: &[&LoraAdapter]) -> Result<Tensor> {
    let mut terms = Vec::new();
    for a in adapters {
        let am = a.a.as_tensor().to_dtype(DType::F32)?;
        let bm = a.b.as_tensor().to_dtype(DType::F32)?;
        for cov in [am.matmul(&am.t()?)?, bm.t()?.matmul(&bm)?] {
            let n = cov.dim(0)?;
            let eye = Tensor::eye(n, DType::F32, cov.device())?;
            terms.push((cov - eye)?.sqr()?.sum_all()?.sqrt()?);
        }
    }
    if terms.is_empty() {
        candle_core::bail!("AdaLoRA's orthogonality penalty needs at least one adapter");
    }
    let n = terms.len() as f64;
    Tensor::stack(&terms, 0)?.sum_all()? / n
}

/// PEFT's `rank_pattern` of AdaLoRA: per module path, which singular values it keeps.
pub type RankPattern = Vec<(String, Vec<bool>)>;

/// Smoothed importance and uncertainty of one tensor.
#[derive(Clone, Debug)]
struct Ema {
    ipt: Tensor,
    unc: Tensor,
}

/// The allocator's state over a run.
#[derive(Debug)]
pub struct RankAllocator {
    cfg: AdaLoraConfig,
    /// Total rank at the start (sum of every module's A rows).
    init_bgt: usize,
    /// `target_r ×` modules.
    target_bgt: usize,
    /// Per module path, per tensor (`A`, `E`, `B`).
    ema: BTreeMap<(String, char), Ema>,
}

/// One module as the allocator sees it: path, adapter, and the step's gradients of A, E, B.
pub struct Triplet<'a> {
    /// Checkpoint path of the module.
    pub path: &'a str,
    /// Its adapter (AdaLoRA form: `e` is set).
    pub adapter: &'a LoraAdapter,
    /// Gradients of A, E and B at this step.
    pub grads: [&'a Tensor; 3],
}

impl RankAllocator {
    /// An allocator for modules of the given ranks.
    pub fn new(cfg: AdaLoraConfig, ranks: &[usize]) -> Self {
        Self {
            init_bgt: ranks.iter().sum(),
            target_bgt: cfg.target_r * ranks.len(),
            cfg,
            ema: BTreeMap::new(),
        }
    }

    /// `(budget, mask now)` at `step` (0-based, as PEFT's loop passes it).
    pub fn budget_schedule(&self, step: usize) -> (usize, bool) {
        let c = &self.cfg;
        if step <= c.tinit {
            (self.init_bgt, false)
        } else if step > c.total_step - c.tfinal {
            (self.target_bgt, true)
        } else {
            let span = (c.total_step - c.tfinal - c.tinit) as f64;
            let mul = 1.0 - (step - c.tinit) as f64 / span;
            let budget = ((self.init_bgt as f64 - self.target_bgt as f64) * mul.powi(3)
                + self.target_bgt as f64) as usize;
            (budget, step.is_multiple_of(c.delta_t))
        }
    }

    fn update_ipt(&mut self, modules: &[Triplet<'_>]) -> Result<()> {
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        for m in modules {
            let e = m.adapter.e.as_ref().ok_or_else(|| {
                candle_core::Error::Msg(format!("{}: not an AdaLoRA adapter", m.path))
            })?;
            for (name, p, g) in [
                ('A', &m.adapter.a, m.grads[0]),
                ('E', e, m.grads[1]),
                ('B', &m.adapter.b, m.grads[2]),
            ] {
                let p = p.as_tensor().to_dtype(DType::F32)?;
                let ipt = (p * g.to_dtype(DType::F32)?)?.abs()?;
                let key = (m.path.to_string(), name);
                let old = match self.ema.get(&key) {
                    Some(o) => o.clone(),
                    None => Ema {
                        ipt: ipt.zeros_like()?,
                        unc: ipt.zeros_like()?,
                    },
                };
                let avg = ((old.ipt * b1)? + (&ipt * (1.0 - b1))?)?;
                let unc = ((old.unc * b2)? + ((ipt - &avg)?.abs()? * (1.0 - b2))?)?;
                self.ema.insert(key, Ema { ipt: avg, unc });
            }
        }
        Ok(())
    }

    /// Score `[r]` of each triplet of `path`.
    fn triplet_scores(&self, path: &str) -> Result<Tensor> {
        let score = |name: char| -> Result<Tensor> {
            let e = self.ema.get(&(path.to_string(), name)).ok_or_else(|| {
                candle_core::Error::Msg(format!("{path}: no importance recorded yet"))
            })?;
            e.ipt.mul(&e.unc)
        };
        let a = score('A')?.mean(D::Minus1)?; // [r]
        let b = score('B')?.mean(0)?; // [r]
        let e = score('E')?.flatten_all()?; // [r]
        (e + (a + b)?)?.contiguous()
    }

    /// Zero the singular values of the lowest-scoring triplets so `budget` remain; returns the
    /// masks (PEFT's `rank_pattern`).
    fn mask_to_budget(&self, modules: &[Triplet<'_>], budget: usize) -> Result<RankPattern> {
        let mut scores = Vec::new();
        for m in modules {
            scores.push(self.triplet_scores(m.path)?.to_vec1::<f32>()?);
        }
        let k = self.init_bgt.saturating_sub(budget);
        // PEFT's threshold: the k-th smallest score (torch.kthvalue); k = 0 masks nothing.
        let threshold = if k == 0 {
            f32::NEG_INFINITY
        } else {
            let mut all: Vec<f32> = scores.iter().flatten().copied().collect();
            all.sort_by(f32::total_cmp);
            all[(k - 1).min(all.len().saturating_sub(1))]
        };
        let mut pattern = Vec::new();
        for (m, s) in modules.iter().zip(scores) {
            // PEFT masks `score <= threshold` (a NaN score is kept).
            let keep: Vec<bool> = s.iter().map(|&x| x > threshold || x.is_nan()).collect();
            apply_mask(m.adapter, &keep)?;
            pattern.push((m.path.to_string(), keep));
        }
        Ok(pattern)
    }

    /// PEFT's `update_and_allocate` after the optimizer step of `step` (0-based): importance
    /// updated while the budget falls, masks applied on schedule, the final pattern fixed at
    /// `total_step − tfinal` and re-applied after it. Returns the pattern when it changed.
    pub fn update_and_allocate(
        &mut self,
        step: usize,
        modules: &[Triplet<'_>],
        current: Option<&[(String, Vec<bool>)]>,
    ) -> Result<Option<RankPattern>> {
        let end = self.cfg.total_step - self.cfg.tfinal;
        if step < end {
            self.update_ipt(modules)?;
            let (budget, mask) = self.budget_schedule(step);
            return if mask {
                self.mask_to_budget(modules, budget).map(Some)
            } else {
                Ok(None)
            };
        }
        if step == end {
            let (budget, _) = self.budget_schedule(step);
            let pattern = self.mask_to_budget(modules, budget)?;
            self.ema.clear();
            return Ok(Some(pattern));
        }
        if let Some(pattern) = current {
            for m in modules {
                if let Some((_, keep)) = pattern.iter().find(|(p, _)| p == m.path) {
                    apply_mask(m.adapter, keep)?;
                }
            }
        }
        Ok(None)
    }
}

/// Set `E_k = 0` where `keep[k]` is false.
fn apply_mask(adapter: &LoraAdapter, keep: &[bool]) -> Result<()> {
    let Some(e) = &adapter.e else {
        candle_core::bail!("masking an adapter without singular values")
    };
    let mask: Vec<f32> = keep.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (keep.len(), 1), e.device())?.to_dtype(e.dtype())?;
    e.set(&e.as_tensor().mul(&mask)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AdaLoraConfig {
        AdaLoraConfig {
            init_r: 6,
            target_r: 3,
            tinit: 3,
            tfinal: 5,
            delta_t: 2,
            total_step: 20,
            ..Default::default()
        }
    }

    #[test]
    fn budget_falls_as_a_cube_between_tinit_and_tfinal() {
        let a = RankAllocator::new(cfg(), &[6, 6, 6, 6]);
        let b: Vec<(usize, bool)> = (0..20).map(|s| a.budget_schedule(s)).collect();
        assert_eq!(b[0], (24, false));
        assert_eq!(b[3], (24, false));
        // step 4: 1 − 1/12 cubed of the 12 to shed, floored.
        assert_eq!(b[4], (21, true));
        assert!(!b[5].1);
        assert_eq!(b[15], (12, false));
        assert_eq!(b[16], (12, true));
        assert!(cfg().validate().is_ok());
        let bad = AdaLoraConfig { tinit: 15, ..cfg() };
        assert!(bad.validate().unwrap_err().contains("tinit"));
    }
}
