//! A model built from generated weights instead of a file, for scale checks and memory tests.
//!
//! Each tensor is generated when the loader asks for it and (for linear weights) quantized right
//! away, exactly as a checkpoint would stream in, so a 7B-shaped model never exists in 16 or 32
//! bits and never touches the disk. Values are uniform with the standard deviation of a typical
//! initialisation (0.02), norms are 1; the same seed gives the same model.

use candle_core::{Device, Tensor};
use qlora_quant::Nf4Tensor;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::config::{LlamaConfig, PROJECTIONS};
use super::error::ModelError;
use super::loader::{build, LoadOptions, TensorSource};
use super::transformer::Model;

/// Standard deviation of generated weights (a common initialiser's, so activations stay tame).
const WEIGHT_STD: f32 = 0.02;

/// Values generated per independently seeded chunk (lets threads fill one tensor in parallel).
const CHUNK: usize = 1 << 16;

/// Weights drawn from a seeded generator, shaped by a config.
struct GeneratedWeights<'a> {
    cfg: &'a LlamaConfig,
    seed: u64,
    /// Tensors handed out so far; each gets its own stream.
    counter: u64,
}

impl GeneratedWeights<'_> {
    /// The shape of an HF-named tensor of this config, and whether it is a norm (all ones).
    fn shape_of(&self, name: &str) -> Option<(Vec<usize>, bool)> {
        let (v, h) = (self.cfg.vocab_size, self.cfg.hidden_size);
        match name {
            "model.embed_tokens.weight" | "lm_head.weight" => return Some((vec![v, h], false)),
            "model.norm.weight" => return Some((vec![h], true)),
            _ => {}
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        if layer.parse::<usize>().ok()? >= self.cfg.num_hidden_layers {
            return None;
        }
        if rest == "input_layernorm.weight" || rest == "post_attention_layernorm.weight" {
            return Some((vec![h], true));
        }
        let (_, rest) = rest.split_once('.')?;
        let (proj, kind) = rest.split_once('.')?;
        let (out, inp) = self.cfg.projection_shape(proj)?;
        match kind {
            "weight" => Some((vec![out, inp], false)),
            "bias" => Some((vec![out], false)),
            _ => None,
        }
    }
}

impl TensorSource for GeneratedWeights<'_> {
    fn dense(&mut self, name: &str) -> Result<Tensor, ModelError> {
        let (shape, ones) = self
            .shape_of(name)
            .ok_or_else(|| ModelError::TensorNotFound {
                name: name.to_string(),
                dir: "<generated weights>".into(),
            })?;
        let n: usize = shape.iter().product();
        if ones {
            return Ok(Tensor::ones(shape, candle_core::DType::F32, &Device::Cpu)?);
        }
        self.counter += 1;
        let stream = self.seed ^ self.counter.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        // Uniform on [-a, a] has standard deviation a / √3.
        let a = WEIGHT_STD * 3f32.sqrt();
        let mut data = vec![0f32; n];
        data.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
            let mut rng = SmallRng::seed_from_u64(stream.wrapping_add(i as u64));
            for x in c {
                *x = rng.random_range(-a..a);
            }
        });
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    }

    fn quantized(&mut self, _prefix: &str) -> Result<Option<Nf4Tensor>, ModelError> {
        Ok(None)
    }

    fn has(&self, name: &str) -> bool {
        // Heads are untied (as in Llama 2) unless the config ties them; biases as the config says.
        if name == "lm_head.weight" {
            return !self.cfg.tie_word_embeddings;
        }
        if name.ends_with(".bias") {
            return PROJECTIONS.iter().any(|p| {
                name.ends_with(&format!("{p}.bias"))
                    && match *p {
                        "q_proj" | "k_proj" | "v_proj" => self.cfg.attention_bias,
                        "o_proj" => self.cfg.o_proj_bias,
                        _ => self.cfg.mlp_bias,
                    }
            });
        }
        self.shape_of(name).is_some()
    }
}

/// A Llama-family model of shape `cfg` with seeded random weights, loaded as `opts` says (NF4 by
/// default: each linear weight is generated, quantized and dropped before the next).
pub fn generate_model(
    cfg: &LlamaConfig,
    opts: &LoadOptions,
    seed: u64,
) -> Result<Model, ModelError> {
    let mut src = GeneratedWeights {
        cfg,
        seed,
        counter: 0,
    };
    Ok(Model::Llama(build(cfg, &mut src, opts)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::linear::BaseWeight;
    use serde_json::json;

    fn tiny() -> LlamaConfig {
        LlamaConfig::from_json(
            &json!({"model_type": "qwen2", "vocab_size": 50, "hidden_size": 64,
            "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-6}),
        )
        .unwrap()
    }

    #[test]
    fn builds_every_tensor_deterministically_with_the_config_shapes() {
        let cfg = tiny();
        let m = generate_model(&cfg, &LoadOptions::default(), 7).unwrap();
        let again = generate_model(&cfg, &LoadOptions::default(), 7).unwrap();
        assert_eq!(m.num_layers(), 2);
        assert!(
            m.as_llama().unwrap().lm_head.is_some(),
            "untied head expected"
        );
        let q = &m.as_llama().unwrap().layers[1].self_attn.q_proj;
        assert!(matches!(q.base, BaseWeight::Quantized(_)));
        assert_eq!(q.base.shape(), (64, 64));
        assert_eq!(q.bias.as_ref().map(|b| b.dims().to_vec()), Some(vec![64]));
        assert!(m.as_llama().unwrap().layers[1]
            .self_attn
            .o_proj
            .bias
            .is_none());
        let w = q.base.to_dense_f32(&Device::Cpu).unwrap();
        let w2 = again.as_llama().unwrap().layers[1]
            .self_attn
            .q_proj
            .base
            .to_dense_f32(&Device::Cpu)
            .unwrap();
        let diff = (&w - &w2).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        let std = w
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        assert!((std - WEIGHT_STD).abs() < 0.004, "std {std}");
        // Different seeds, different weights.
        let other = generate_model(&cfg, &LoadOptions::default(), 8).unwrap();
        let w3 = other.as_llama().unwrap().layers[1]
            .self_attn
            .q_proj
            .base
            .to_dense_f32(&Device::Cpu)
            .unwrap();
        assert!(
            (&w - &w3)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }
}
