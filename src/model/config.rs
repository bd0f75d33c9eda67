//! The decoder configuration, read from an HF `config.json` (transformers 4.x and 5.x keys).

use std::path::Path;

use serde_json::Value;

use super::error::ModelError;

/// How RoPE frequencies are scaled.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Llama 3.x "llama3" scaling (low/high frequency bands, smooth interpolation between).
    Llama3 {
        /// Overall factor.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// Context length the model was pretrained with.
        original_max_position_embeddings: f64,
    },
    /// Linear position interpolation.
    Linear {
        /// Positions are divided by this.
        factor: f64,
    },
}

/// A Llama-family decoder (Llama 1/2/3, Mistral, Qwen2, SmolLM).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// `model_type` as written (llama, mistral, qwen2).
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// q/k/v projections have a bias (Qwen2).
    pub attention_bias: bool,
    /// o_proj has a bias too (rare; `attention_bias` on Llama covers all four).
    pub o_proj_bias: bool,
    /// MLP projections have a bias.
    pub mlp_bias: bool,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (Llama 3 has several).
    pub eos_token_ids: Vec<u32>,
    /// Padding token.
    pub pad_token_id: Option<u32>,
    /// Mistral's sliding attention window, if any.
    pub sliding_window: Option<usize>,
    /// The checkpoint is a `*ForSequenceClassification` model: a `score` head, no LM head.
    pub sequence_classification: bool,
}

const SUPPORTED: [&str; 3] = ["llama", "mistral", "qwen2"];

impl LlamaConfig {
    /// Read `config.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.display().to_string(),
            what: format!("not valid JSON: {e}"),
        })?;
        Self::from_json(&v).map_err(|what| ModelError::Config {
            path: path.display().to_string(),
            what,
        })
    }

    /// Parse an HF config object; the error says which field is missing or wrong.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or("missing field `model_type`")?
            .to_string();
        if !SUPPORTED.contains(&model_type.as_str()) {
            return Err(format!(
                "unsupported architecture `{model_type}` (supported: {})",
                SUPPORTED.join(", ")
            ));
        }
        use crate::json_fields::opt_f64;
        let usize_field = |k: &str| crate::json_fields::usize_field(v, k);
        let opt_usize = |k: &str| crate::json_fields::opt_usize(v, k);
        let opt_bool = |k: &str| crate::json_fields::opt_bool(v, k);
        let hidden_size = usize_field("hidden_size")?;
        let num_attention_heads = usize_field("num_attention_heads")?;
        if num_attention_heads == 0 || hidden_size == 0 {
            return Err("`hidden_size` and `num_attention_heads` must be positive".into());
        }
        let num_key_value_heads = opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(format!(
                "`num_attention_heads` ({num_attention_heads}) must be a multiple of `num_key_value_heads` ({num_key_value_heads})"
            ));
        }
        let head_dim = opt_usize("head_dim")?.unwrap_or(hidden_size / num_attention_heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(format!(
                "`head_dim` must be even and positive, got {head_dim}"
            ));
        }
        // transformers 5 moved rope settings into `rope_parameters`; 4.x has them top level.
        let rope = v.get("rope_parameters").filter(|r| r.is_object());
        let rope_theta = match rope.filter(|r| r.get("rope_theta").is_some()) {
            Some(r) => opt_f64(r, "rope_theta")?,
            None => opt_f64(v, "rope_theta")?,
        }
        .unwrap_or(10000.0);
        let scaling = rope
            .filter(|r| r.get("rope_type").and_then(Value::as_str) != Some("default"))
            .or_else(|| v.get("rope_scaling").filter(|r| r.is_object()));
        let rope_scaling = match scaling {
            None => RopeScaling::None,
            Some(s) => parse_rope_scaling(s)?,
        };
        let token_id = |x: &Value| x.as_u64().and_then(|i| u32::try_from(i).ok());
        let eos_token_ids = crate::json_fields::optional(
            v,
            "eos_token_id",
            |x| match x {
                Value::Array(a) => a.iter().map(token_id).collect(),
                x => token_id(x).map(|i| vec![i]),
            },
            "a token id or a list of them",
        )?
        .unwrap_or_default();
        // The Llama-family MLP is SwiGLU with SiLU; another activation would be a different model.
        if let Some(act) = v.get("hidden_act") {
            if !matches!(act.as_str(), Some("silu" | "swish")) {
                return Err(format!(
                    "`hidden_act` is {act}; the {model_type} architecture here computes its MLP \
                     with SiLU (\"silu\") only"
                ));
            }
        }
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(format!(
                "`rope_theta` must be a positive number, got {rope_theta}"
            ));
        }
        let is_qwen2 = model_type == "qwen2";
        let attention_bias = opt_bool("attention_bias")?.unwrap_or(is_qwen2);
        Ok(Self {
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_hidden_layers: usize_field("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: opt_f64(v, "rms_norm_eps")?
                .filter(|e| e.is_finite() && *e > 0.0)
                .ok_or("the field `rms_norm_eps` is missing or not a positive number")?,
            rope_theta,
            rope_scaling,
            max_position_embeddings: opt_usize("max_position_embeddings")?.unwrap_or(4096),
            // Qwen2 has biases on q/k/v only; Llama's `attention_bias` covers o_proj as well.
            attention_bias,
            o_proj_bias: attention_bias && !is_qwen2,
            mlp_bias: opt_bool("mlp_bias")?.unwrap_or(false),
            tie_word_embeddings: opt_bool("tie_word_embeddings")?.unwrap_or(false),
            bos_token_id: crate::json_fields::opt_u32(v, "bos_token_id")?,
            eos_token_ids,
            pad_token_id: crate::json_fields::opt_u32(v, "pad_token_id")?,
            sequence_classification: super::classifier::names_classifier(v),
            sliding_window: if opt_bool("use_sliding_window")? == Some(false) {
                None
            } else {
                opt_usize("sliding_window")?
            },
            model_type,
        })
    }

    /// Query heads per key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// `[out, in]` of each of the seven projections, by its short name.
    pub fn projection_shape(&self, name: &str) -> Option<(usize, usize)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        Some(match name {
            "q_proj" => (q, h),
            "k_proj" | "v_proj" => (kv, h),
            "o_proj" => (h, q),
            "gate_proj" | "up_proj" => (i, h),
            "down_proj" => (h, i),
            _ => return None,
        })
    }

    /// Parameters of the dense model (embeddings, projections, norms, head).
    pub fn parameter_count(&self) -> usize {
        let per_layer: usize = PROJECTIONS
            .iter()
            .filter_map(|p| self.projection_shape(p))
            .map(|(o, i)| o * i)
            .sum::<usize>()
            + 2 * self.hidden_size;
        let embed = self.vocab_size * self.hidden_size;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + self.num_hidden_layers * per_layer + self.hidden_size
    }
}

/// The seven linear projections of a decoder layer, in PEFT's usual order.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Checkpoint name of projection `proj` in layer `layer` (`model.layers.3.mlp.up_proj`).
pub fn projection_path(layer: usize, proj: &str) -> String {
    let group = if matches!(proj, "gate_proj" | "up_proj" | "down_proj") {
        "mlp"
    } else {
        "self_attn"
    };
    format!("model.layers.{layer}.{group}.{proj}")
}

/// RoPE inverse frequencies `θ^(-2i/d)` in f32, as transformers and llama.cpp's converter
/// compute them.
pub(crate) fn base_inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

/// Llama 3's per-frequency divisors: 1 for short wavelengths, `factor` for long ones, a smooth
/// blend between (llama.cpp's `rope_freqs.weight`, by its converter's formula).
pub fn llama3_rope_factors(
    head_dim: usize,
    theta: f64,
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_max_position_embeddings: f64,
) -> Vec<f32> {
    let old = original_max_position_embeddings;
    let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
    base_inv_freq(head_dim, theta)
        .into_iter()
        .map(|freq| {
            let wavelen = 2.0 * std::f64::consts::PI / f64::from(freq);
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth =
                    (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

/// The Llama 3 scaling whose [`llama3_rope_factors`] are `factors` (a GGUF's
/// `rope_freqs.weight`), `Ok(None)` if every factor is 1. The blend is linear in
/// 1/wavelength, so two blended entries pin it (written with `low_freq_factor` 1; any equivalent
/// triple gives the same factors); one blended entry pins it with `high_freq_factor` 4; Llama
/// 3.1's 1 / 4 / 8192 are tried next, and with no blended entry any context between the bands.
/// The result must reproduce every factor within 1e-5, else this is an error.
pub fn llama3_scaling_from_factors(
    head_dim: usize,
    theta: f64,
    factors: &[f32],
) -> Result<Option<RopeScaling>, String> {
    if factors.len() != head_dim / 2 {
        return Err(format!(
            "holds {} factors; head_dim {head_dim} needs {}",
            factors.len(),
            head_dim / 2
        ));
    }
    if factors.iter().any(|f| !f.is_finite() || *f <= 0.0) {
        return Err("holds a factor that is not a positive number".into());
    }
    let factor = factors.iter().copied().fold(1f32, f32::max) as f64;
    if (factor - 1.0).abs() < 1e-6 {
        return Ok(None);
    }
    let inv = base_inv_freq(head_dim, theta);
    let blended: Vec<(f64, f64)> = factors
        .iter()
        .zip(&inv)
        .filter(|(f, _)| {
            let f = f64::from(**f);
            f > 1.0 + 1e-6 && f < factor * (1.0 - 1e-6)
        })
        .map(|(f, freq)| {
            let u = f64::from(*freq) / (2.0 * std::f64::consts::PI);
            let s = (1.0 / f64::from(*f) - 1.0 / factor) / (1.0 - 1.0 / factor);
            (u, s)
        })
        .collect();
    // Candidate (low, high, original context) triples, tried in order; the first that
    // reproduces every factor is taken.
    let mut candidates = Vec::new();
    match blended[..] {
        [(u0, s0), .., (u1, s1)] if u0 != u1 => {
            // s = (old·u − low) / (high − low) = a·u + b; with low = 1: high = 1 − 1/b, old = −a/b.
            let a = (s1 - s0) / (u1 - u0);
            let b = s0 - a * u0;
            let high = ((1.0 - 1.0 / b) * 1e4).round() / 1e4;
            candidates.push((1.0, high, (-a / b).round()));
        }
        // One blended entry leaves one free parameter: Llama 3's high_freq_factor 4 fixes it.
        [(u0, s0)] => candidates.push((1.0, 4.0, ((3.0 * s0 + 1.0) / u0).round())),
        _ => {}
    }
    candidates.push((1.0, 4.0, 8192.0));
    if blended.is_empty() {
        // Only unscaled and fully scaled entries: any context between the bands fits, i.e.
        // scaled entries below 1/old and unscaled ones above 4/old (low 1, high 4).
        let u = |keep: bool| {
            factors.iter().zip(&inv).filter_map(move |(f, freq)| {
                let unscaled = (f64::from(*f) - 1.0).abs() < 1e-6;
                (unscaled == keep).then(|| f64::from(*freq) / (2.0 * std::f64::consts::PI))
            })
        };
        let lo = u(true).fold(f64::INFINITY, f64::min);
        let hi = u(false).fold(0.0, f64::max);
        // old ∈ (4/lo, 1/hi): the geometric middle, or half the upper end when every entry is
        // scaled (no lower end); rounded, and checked below like every candidate.
        let (a, b) = (4.0 / lo, 1.0 / hi);
        if a < b && b.is_finite() {
            let old = if a > 0.0 { (a * b).sqrt() } else { b / 2.0 };
            candidates.push((1.0, 4.0, old.round()));
        }
    }
    let reproduces = |&(low, high, old): &(f64, f64, f64)| {
        old >= 1.0 && high > low && {
            let again = llama3_rope_factors(head_dim, theta, factor, low, high, old);
            again
                .iter()
                .zip(factors)
                .all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs().max(1.0))
        }
    };
    let Some((low, high, old)) = candidates.into_iter().find(reproduces) else {
        return Err("holds per-frequency factors that do not follow Llama 3's RoPE scaling".into());
    };
    Ok(Some(RopeScaling::Llama3 {
        factor,
        low_freq_factor: low,
        high_freq_factor: high,
        original_max_position_embeddings: old,
    }))
}

fn parse_rope_scaling(s: &Value) -> Result<RopeScaling, String> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64, String> {
        s.get(k)
            .and_then(Value::as_f64)
            .ok_or(format!("rope scaling `{kind}` needs field `{k}`"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        other => Err(format!(
            "unsupported rope scaling type `{other}` (supported: default, llama3, linear)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_transformers5_rope_parameters_and_llama3_scaling() {
        let v = json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3",
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}, "eos_token_id": [1, 2]});
        let c = LlamaConfig::from_json(&v).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert_eq!(c.head_dim, 4);
        assert_eq!(c.num_key_value_heads, 2);
    }

    #[test]
    fn llama3_factors_give_back_their_scaling() {
        // Llama 3.1 8B and Llama 3.2 1B, and a small test shape with a narrow blend band.
        for (d, theta, factor, old) in [
            (128, 500000.0, 8.0, 8192.0),
            (64, 500000.0, 32.0, 8192.0),
            (16, 10000.0, 8.0, 64.0),
        ] {
            let factors = llama3_rope_factors(d, theta, factor, 1.0, 4.0, old);
            assert!(factors.iter().any(|f| *f > 1.0 && f64::from(*f) < factor));
            let back = llama3_scaling_from_factors(d, theta, &factors).unwrap();
            assert_eq!(
                back,
                Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: old,
                })
            );
        }
        // One blended entry (original context 16 at head_dim 16), none (θ 10⁶ puts no
        // wavelength inside 7.5..30), none and every entry scaled (context 5, below the shortest
        // wavelength): a scaling with the same factors comes back.
        for (d, theta, old, blended) in [(16, 1e4, 16.0, 1), (16, 1e6, 30.0, 0), (16, 1e6, 5.0, 0)]
        {
            let factors = llama3_rope_factors(d, theta, 8.0, 1.0, 4.0, old);
            let n = factors.iter().filter(|f| **f > 1.0 && **f < 8.0).count();
            assert_eq!(n, blended);
            let Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) = llama3_scaling_from_factors(d, theta, &factors).unwrap()
            else {
                panic!("no scaling for {factors:?}");
            };
            let again = llama3_rope_factors(
                d,
                theta,
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            );
            assert_eq!(again, factors, "context {old}");
        }
        assert_eq!(
            llama3_scaling_from_factors(8, 1e4, &[1.0; 4]).unwrap(),
            None
        );
        let mut odd = llama3_rope_factors(128, 500000.0, 8.0, 1.0, 4.0, 8192.0);
        odd[3] = 2.5;
        let err = llama3_scaling_from_factors(128, 500000.0, &odd).unwrap_err();
        assert!(err.contains("Llama 3"), "{err}");
        assert!(llama3_scaling_from_factors(128, 500000.0, &odd[..10]).is_err());
    }

    #[test]
    fn qwen2_has_qkv_bias_only() {
        let v = json!({"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "rms_norm_eps": 1e-6, "rope_theta": 1e6});
        let c = LlamaConfig::from_json(&v).unwrap();
        assert!(c.attention_bias && !c.o_proj_bias);
    }

    #[test]
    fn errors_name_the_field() {
        let v = json!({"model_type": "gpt2"});
        assert!(LlamaConfig::from_json(&v)
            .unwrap_err()
            .contains("unsupported architecture `gpt2`"));
        let v = json!({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2});
        assert!(LlamaConfig::from_json(&v)
            .unwrap_err()
            .contains("`vocab_size`"));
        let v = json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 3,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5});
        assert!(LlamaConfig::from_json(&v).unwrap_err().contains("multiple"));
    }
}
