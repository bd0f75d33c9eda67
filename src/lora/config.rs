//! What adapters to build: rank, alpha, targets, dropout, scaling rule, DoRA, initialisation.

use candle_core::DType;

/// How a new adapter's A and B start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LoraInit {
    /// PEFT's default: A Kaiming-uniform (`U(-1/√in, 1/√in)`), B zero.
    Kaiming,
    /// A ~ N(0, 1/r), B zero.
    Gaussian,
    /// PiSSA: A and B from the top-r singular vectors of the (dequantized) base, which then
    /// keeps only the residual.
    Pissa,
}

impl LoraInit {
    /// Parse `kaiming` (alias `default`), `gaussian`, `pissa`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "kaiming" | "default" | "true" => Ok(LoraInit::Kaiming),
            "gaussian" => Ok(LoraInit::Gaussian),
            "pissa" => Ok(LoraInit::Pissa),
            other => Err(format!(
                "unknown LoRA init `{other}` (kaiming, gaussian, pissa)"
            )),
        }
    }

    /// The value PEFT writes as `init_lora_weights`.
    pub fn peft_value(self) -> serde_json::Value {
        match self {
            LoraInit::Kaiming => serde_json::Value::Bool(true),
            LoraInit::Gaussian => "gaussian".into(),
            LoraInit::Pissa => "pissa".into(),
        }
    }
}

/// Adapter hyperparameters (PEFT's `LoraConfig`, the parts this tool implements).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank r.
    pub rank: usize,
    /// Alpha; the update is scaled by `alpha / r` (or `alpha / √r` with rsLoRA).
    pub alpha: f64,
    /// Dropout on the adapter input during training.
    pub dropout: f32,
    /// Short projection names the adapters go on (`q_proj`, ...).
    pub targets: Vec<String>,
    /// rsLoRA scaling `alpha / √r`.
    pub use_rslora: bool,
    /// DoRA: weight-decomposed adaptation with a trainable magnitude per output row.
    pub use_dora: bool,
    /// Initialisation of new adapters.
    pub init: LoraInit,
    /// Storage dtype of A and B (bf16 by default; f32 on request).
    pub dtype: DType,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            dropout: 0.05,
            targets: vec![ALL_LINEAR.to_string()],
            use_rslora: false,
            use_dora: false,
            init: LoraInit::Kaiming,
            dtype: DType::BF16,
        }
    }
}

impl LoraConfig {
    /// The scale applied to `B·A`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// True when adapters go on the linear layer at checkpoint path `path`
    /// (`model.layers.0.self_attn.q_proj`): PEFT's rule, a target names the whole path or its
    /// last dotted components, and `all-linear` names every layer but the output head.
    pub fn targets_module(&self, path: &str) -> bool {
        self.targets.iter().any(|t| target_matches(t, path))
    }
}

/// PEFT's `target_modules` value for every linear layer except the output head.
pub const ALL_LINEAR: &str = "all-linear";

/// Whether target `t` names the module at `path` (see [`LoraConfig::targets_module`]).
pub fn target_matches(t: &str, path: &str) -> bool {
    t == ALL_LINEAR || path == t || path.strip_suffix(t).is_some_and(|rest| rest.ends_with('.'))
}

/// Parse a target list: `all-linear`, or comma-separated module names (`q_proj,v_proj`,
/// `c_attn`); whether each names a layer of the model is checked when adapters are attached.
pub fn parse_targets(s: &str) -> Result<Vec<String>, String> {
    if s.trim() == ALL_LINEAR {
        return Ok(vec![ALL_LINEAR.to_string()]);
    }
    let mut out: Vec<String> = Vec::new();
    for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        if t == ALL_LINEAR {
            return Err("`all-linear` cannot be combined with module names".into());
        }
        if !out.iter().any(|o| o == t) {
            out.push(t.to_string());
        }
    }
    if out.is_empty() {
        return Err("no target module given".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_match_like_peft() {
        assert_eq!(parse_targets("all-linear").unwrap(), vec![ALL_LINEAR]);
        assert_eq!(
            parse_targets("q_proj, v_proj").unwrap(),
            vec!["q_proj", "v_proj"]
        );
        assert!(parse_targets(" , ").is_err());
        assert!(parse_targets("q_proj,all-linear").is_err());
        let c = LoraConfig {
            targets: vec!["c_proj".into(), "mlp.up_proj".into()],
            ..Default::default()
        };
        assert!(c.targets_module("transformer.h.0.attn.c_proj"));
        assert!(c.targets_module("transformer.h.3.mlp.c_proj"));
        assert!(c.targets_module("model.layers.0.mlp.up_proj"));
        assert!(!c.targets_module("model.layers.0.mlp.gate_proj"));
        // A suffix must end at a dot: `proj` does not name `c_proj`.
        assert!(!target_matches("proj", "transformer.h.0.attn.c_proj"));
    }

    #[test]
    fn rslora_scales_by_sqrt_rank() {
        let mut c = LoraConfig {
            rank: 16,
            alpha: 32.0,
            ..Default::default()
        };
        assert_eq!(c.scale(), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scale(), 8.0);
    }
}
