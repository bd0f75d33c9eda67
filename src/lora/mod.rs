//! LoRA adapters: configuration, the adapter layer, initialisation, PEFT files, merging.

pub mod adapter;
pub mod config;
pub mod dropout;
pub mod fused;
pub mod init;
pub mod merge;
pub mod peft;

pub use adapter::{DropoutSeed, LoraAdapter};
pub use config::{parse_targets, LoraConfig, LoraInit};

use candle_core::Var;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::model::error::ModelError;
use crate::model::llama::Llama;

/// Put fresh adapters on every targeted projection of `model` (deterministic for a `seed`).
pub fn attach_new(model: &mut Llama, cfg: &LoraConfig, seed: u64) -> Result<(), ModelError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let device = model.device().clone();
    for layer in model.layers.iter_mut() {
        for (proj, lin) in layer.projections_mut() {
            let adapter = if cfg.targets_projection(proj) {
                Some(init::init_adapter(cfg, lin, &mut rng, &device)?)
            } else {
                None
            };
            lin.set_adapter(adapter)?;
        }
    }
    Ok(())
}

/// Give every adapter of `model` a distinct dropout key and one shared seed handle, which the
/// trainer sets before each forward.
pub fn share_dropout_seed(model: &mut Llama) -> DropoutSeed {
    let seed = DropoutSeed::default();
    for (li, layer) in model.layers.iter_mut().enumerate() {
        for (pi, (_, lin)) in layer.projections_mut().into_iter().enumerate() {
            if let Some(a) = lin.adapter.as_mut() {
                a.dropout_key = (li * 8 + pi) as u64 + 1;
                a.dropout_seed = seed.clone();
            }
        }
    }
    seed
}

/// Every trainable variable of the model's adapters, with its PEFT key.
pub fn trainable_vars(model: &Llama) -> Vec<(String, Var)> {
    let mut out = Vec::new();
    for (li, layer) in model.layers.iter().enumerate() {
        for (proj, lin) in layer.projections() {
            if let Some(a) = &lin.adapter {
                for (suffix, var) in a.parameters() {
                    out.push((peft::peft_key(li, proj, suffix), var.clone()));
                }
            }
        }
    }
    out
}
