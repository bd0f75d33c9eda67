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
    /// PEFT's `rank_pattern`: `(pattern, r)` in the config's order; the first pattern that
    /// matches a module's path (see [`pattern_key`]) sets its rank.
    pub rank_pattern: Vec<(String, usize)>,
    /// PEFT's `alpha_pattern`, as `rank_pattern` for alpha.
    pub alpha_pattern: Vec<(String, f64)>,
    /// PEFT's `layers_to_transform`: only modules in these layers get adapters (`None`: all).
    pub layers_to_transform: Option<Vec<usize>>,
    /// PEFT's `layers_pattern`: the path component before the layer index (`layers`, `h`);
    /// empty means the first numbered component after the second.
    pub layers_pattern: Vec<String>,
    /// PEFT's `exclude_modules` (list form): modules that match get no adapter.
    pub exclude_modules: Vec<String>,
    /// AdaLoRA (`peft_type: ADALORA`): SVD-form adapters of rank `init_r` and a rank budget.
    pub adalora: Option<super::adalora::AdaLoraConfig>,
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
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            layers_to_transform: None,
            layers_pattern: Vec::new(),
            exclude_modules: Vec::new(),
            adalora: None,
        }
    }
}

/// The regular expression PEFT matches a pattern key with: the whole path, or its last dotted
/// components (`re.match(rf"(.*\.)?({key})$", path)`).
fn pattern_regex(key: &str) -> Result<fancy_regex::Regex, String> {
    fancy_regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
        .map_err(|e| format!("pattern `{key}` is not a regular expression: {e}"))
}

/// The first of `keys` that matches module path `path`, as PEFT's `get_pattern_key` picks it.
pub fn pattern_key<'a>(keys: impl IntoIterator<Item = &'a str>, path: &str) -> Option<&'a str> {
    keys.into_iter().find(|k| {
        pattern_regex(k)
            .ok()
            .is_some_and(|re| re.is_match(path).unwrap_or(false))
    })
}

/// The value the first of `patterns` matching `path` gives it (PEFT's `rank_pattern` /
/// `alpha_pattern` lookup), if any.
pub fn pattern_value<'a, T>(patterns: &'a [(String, T)], path: &str) -> Option<&'a T> {
    let key = pattern_key(patterns.iter().map(|(k, _)| k.as_str()), path)?;
    patterns.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// Whether a target names `path` itself rather than through `all-linear`: how modules outside
/// the layers (the token embedding, the head) are chosen.
pub fn names_explicitly(targets: &[String], path: &str) -> bool {
    targets
        .iter()
        .any(|t| t != ALL_LINEAR && target_matches(t, path))
}

/// Whether `path` lies in one of `layers` (PEFT's `layers_to_transform`; `None` or empty: every
/// layer), its index read as [`layer_index`] reads it.
pub fn in_layers(layers: Option<&[usize]>, patterns: &[String], path: &str) -> bool {
    match layers {
        Some(l) if !l.is_empty() => layer_index(path, patterns).is_some_and(|i| l.contains(&i)),
        _ => true,
    }
}

/// The layer index PEFT reads from a module path for `layers_to_transform`: after one of
/// `patterns` (`layers.3.`), or with none given, the first number after the second component.
pub fn layer_index(path: &str, patterns: &[String]) -> Option<usize> {
    let parse = |re: &str| {
        fancy_regex::Regex::new(re)
            .ok()?
            .captures(path)
            .ok()??
            .get(1)?
            .as_str()
            .parse()
            .ok()
    };
    if patterns.is_empty() {
        return parse(r"^.*?\.[^.]*\.(\d+)\.");
    }
    patterns
        .iter()
        .find_map(|p| parse(&format!(r"^(?:|.*?\.){p}\.(\d+)\.")))
}

impl LoraConfig {
    /// The scale applied to `B·A`.
    pub fn scale(&self) -> f64 {
        if let Some(a) = &self.adalora {
            return a.scale(self.alpha);
        }
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// True when adapters go on the linear layer at checkpoint path `path`
    /// (`model.layers.0.self_attn.q_proj`): PEFT's rule, a target names the whole path or its
    /// last dotted components, and `all-linear` names every layer but the output head; then
    /// `exclude_modules` and `layers_to_transform` narrow it.
    pub fn targets_module(&self, path: &str) -> bool {
        if !self.targets.iter().any(|t| target_matches(t, path))
            || self.exclude_modules.iter().any(|t| target_matches(t, path))
        {
            return false;
        }
        in_layers(
            self.layers_to_transform.as_deref(),
            &self.layers_pattern,
            path,
        )
    }

    /// True when an adapter goes on the token embedding at `path` (`model.embed_tokens`): named
    /// by a target (`all-linear` does not), not excluded, and no `layers_to_transform` (the
    /// embedding is in no layer, so PEFT skips it then).
    pub fn targets_embedding(&self, path: &str) -> bool {
        names_explicitly(&self.targets, path)
            && !self.exclude_modules.iter().any(|t| target_matches(t, path))
            && self
                .layers_to_transform
                .as_ref()
                .is_none_or(|l| l.is_empty())
    }

    /// Rank of the adapter on the module at `path` (`rank_pattern`, else `r`; for AdaLoRA the
    /// singular values its pattern keeps, else `init_r`).
    pub fn rank_for(&self, path: &str) -> usize {
        if let Some(a) = &self.adalora {
            return a.rank_of(path);
        }
        pattern_value(&self.rank_pattern, path).map_or(self.rank, |r| *r)
    }

    /// Alpha of the adapter on the module at `path` (`alpha_pattern`, else `lora_alpha`).
    pub fn alpha_for(&self, path: &str) -> f64 {
        pattern_value(&self.alpha_pattern, path).map_or(self.alpha, |a| *a)
    }

    /// The config of the single module at `path`: its rank and alpha, no patterns.
    pub fn for_module(&self, path: &str) -> LoraConfig {
        LoraConfig {
            rank: self.rank_for(path),
            alpha: self.alpha_for(path),
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            ..self.clone()
        }
    }

    /// Check the patterns: every key a regular expression, every rank positive.
    pub fn validate_patterns(&self) -> Result<(), String> {
        for (k, r) in &self.rank_pattern {
            pattern_regex(k).map_err(|e| format!("rank_pattern: {e}"))?;
            if *r == 0 {
                return Err(format!("rank_pattern `{k}`: the rank must be positive"));
            }
        }
        for (k, a) in &self.alpha_pattern {
            pattern_regex(k).map_err(|e| format!("alpha_pattern: {e}"))?;
            if !a.is_finite() {
                return Err(format!(
                    "alpha_pattern `{k}`: alpha must be a finite number"
                ));
            }
        }
        Ok(())
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
    fn patterns_pick_ranks_and_alphas_like_peft() {
        let c = LoraConfig {
            rank: 8,
            alpha: 16.0,
            rank_pattern: vec![("down_proj".into(), 32), (r"layers\.1\..*q_proj".into(), 4)],
            alpha_pattern: vec![("mlp.down_proj".into(), 64.0)],
            ..Default::default()
        };
        c.validate_patterns().unwrap();
        assert_eq!(c.rank_for("model.layers.0.mlp.down_proj"), 32);
        assert_eq!(c.rank_for("model.layers.1.self_attn.q_proj"), 4);
        assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj"), 8);
        // A key matches whole dotted components only: `proj` does not name `down_proj`.
        let p = LoraConfig {
            rank_pattern: vec![("proj".into(), 2)],
            ..c.clone()
        };
        assert_eq!(p.rank_for("model.layers.0.mlp.down_proj"), 8);
        let m = c.for_module("model.layers.2.mlp.down_proj");
        assert_eq!((m.rank, m.alpha, m.scale()), (32, 64.0, 2.0));
        assert!(LoraConfig {
            rank_pattern: vec![("(".into(), 2)],
            ..Default::default()
        }
        .validate_patterns()
        .is_err());
    }

    #[test]
    fn layers_to_transform_reads_the_layer_index_like_peft() {
        assert_eq!(layer_index("model.layers.12.mlp.up_proj", &[]), Some(12));
        assert_eq!(layer_index("transformer.h.3.attn.c_attn", &[]), Some(3));
        assert_eq!(
            layer_index("bert.encoder.layer.5.attention.self.query", &[]),
            Some(5)
        );
        assert_eq!(
            layer_index("model.layers.7.mlp.up_proj", &["layers".into()]),
            Some(7)
        );
        assert_eq!(
            layer_index("model.layers.7.mlp.up_proj", &["h".into()]),
            None
        );
        let c = LoraConfig {
            layers_to_transform: Some(vec![0, 2]),
            exclude_modules: vec!["k_proj".into()],
            ..Default::default()
        };
        assert!(c.targets_module("model.layers.2.self_attn.q_proj"));
        assert!(!c.targets_module("model.layers.1.self_attn.q_proj"));
        assert!(!c.targets_module("model.layers.0.self_attn.k_proj"));
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
