//! Learning-rate schedules: constant, linear decay or cosine decay, each after a linear warmup.

/// Shape of the decay after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    /// Flat after warmup.
    Constant,
    /// Linear to zero at the last step.
    Linear,
    /// Half cosine to zero at the last step.
    Cosine,
}

impl ScheduleKind {
    /// Parse `constant`, `linear`, `cosine`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "constant" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            other => Err(format!(
                "unknown LR scheduler `{other}` (constant, linear, cosine)"
            )),
        }
    }
}

/// A learning-rate schedule over `total` optimizer steps (as transformers' schedulers).
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Decay shape.
    pub kind: ScheduleKind,
    /// Warmup steps (linear from 0).
    pub warmup: usize,
    /// Total optimizer steps.
    pub total: usize,
}

impl Schedule {
    /// Learning rate for optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * step as f64 / self.warmup.max(1) as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        match self.kind {
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Linear => self.lr * (1.0 - progress),
            ScheduleKind::Cosine => self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let s = Schedule {
            lr: 1.0,
            kind: ScheduleKind::Cosine,
            warmup: 10,
            total: 110,
        };
        assert_eq!(s.lr_at(0), 0.0);
        assert_eq!(s.lr_at(5), 0.5);
        assert_eq!(s.lr_at(10), 1.0);
        assert!((s.lr_at(60) - 0.5).abs() < 1e-12);
        assert!(s.lr_at(110).abs() < 1e-12);
        let l = Schedule {
            kind: ScheduleKind::Linear,
            ..s.clone()
        };
        assert!((l.lr_at(60) - 0.5).abs() < 1e-12);
        let c = Schedule {
            kind: ScheduleKind::Constant,
            ..s
        };
        assert_eq!(c.lr_at(100), 1.0);
    }
}
