//! Text generation with a KV cache: greedy at temperature 0, otherwise temperature + top-p
//! sampling from a seeded RNG. Tokens are handed to a callback as they come.

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::error::ModelError;
use super::transformer::{KvCache, Model};

/// Sampling settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingOptions {
    /// New tokens at most.
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus threshold in (0, 1].
    pub top_p: f64,
    /// RNG seed.
    pub seed: u64,
    /// Tokens that end generation.
    pub stop_ids: Vec<u32>,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_ids: vec![],
        }
    }
}

/// Generate after `prompt`; `on_token` sees each new id (return `false` to stop early).
/// Returns the new ids (without the stop token).
pub fn generate(
    model: &Model,
    prompt: &[u32],
    opts: &SamplingOptions,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::invalid("prompt", "the prompt has no tokens"));
    }
    let limit = model.max_positions();
    if prompt.len() >= limit {
        return Err(ModelError::invalid(
            "prompt",
            format!("{} tokens do not fit the context of {limit}", prompt.len()),
        ));
    }
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut cache = KvCache::new(model.num_layers());
    let mut input = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < opts.max_new_tokens && cache.len() + input.len() < limit {
        let x = Tensor::from_vec(input.clone(), (1, input.len()), model.device())?;
        let logits = model
            .forward_cached(&x, &mut cache)?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let next = pick(&logits, opts, &mut rng);
        if opts.stop_ids.contains(&next) {
            break;
        }
        out.push(next);
        if !on_token(next) {
            break;
        }
        input = vec![next];
    }
    Ok(out)
}

/// Choose the next token from `logits`.
fn pick(logits: &[f32], opts: &SamplingOptions, rng: &mut StdRng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if opts.temperature <= 0.0 {
        return argmax();
    }
    let t = opts.temperature as f32;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i, ((v - max) / t).exp()))
        .collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f32 = probs.iter().map(|p| p.1).sum();
    let mut kept = 0.0f32;
    let mut cut = probs.len();
    for (k, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= opts.top_p as f32 {
            cut = k + 1;
            break;
        }
    }
    probs.truncate(cut);
    let mass: f32 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.random::<f32>() * mass;
    for &(i, p) in &probs {
        if u < p {
            return i as u32;
        }
        u -= p;
    }
    probs.last().map_or_else(argmax, |p| p.0 as u32)
}
