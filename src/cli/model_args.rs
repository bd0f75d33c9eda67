//! Options shared by every command that loads a model.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::device::{parse_compute_dtype, DeviceSpec};
use crate::model::loader::{load_model, BaseFormat, LoadOptions, LoadedModel};
use crate::peft;

/// Which model to load and how.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// HF model folder (safetensors, or a bitsandbytes 4-bit checkpoint), a .gguf file, or a hub
    /// name `org/name[@revision]` found in the local Hugging Face cache.
    #[arg(long, value_name = "PATH|ORG/NAME", value_parser = crate::hub::model_path)]
    pub model: PathBuf,

    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors) to apply.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,

    /// Base weights: nf4 or fp4 (4-bit, quantized on load unless already 4-bit), or none (full
    /// precision, for comparison).
    #[arg(long, value_name = "nf4|fp4|none", default_value = "nf4", value_parser = BaseFormat::parse)]
    pub quant: BaseFormat,

    /// Blocksize when quantizing on load.
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,

    /// Keep the absmax in f32 instead of double-quantizing it.
    #[arg(long)]
    pub no_double_quant: bool,

    /// Device: cpu, or cuda[:N] (GPU N; needs a binary built with `--features cuda`).
    #[arg(long, value_name = "cpu|cuda[:N]", default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceSpec,

    /// Activation dtype: f32, bf16 or f16 [default: f32 on cpu, bf16 on cuda].
    #[arg(long, value_name = "f32|bf16|f16", value_parser = parse_compute_dtype)]
    pub compute_dtype: Option<candle_core::DType>,
}

fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    DeviceSpec::parse(s).map_err(|e| e.to_string())
}

impl ModelArgs {
    /// Load the model (and adapter), with context in errors.
    pub fn load(&self, max_positions: Option<usize>) -> anyhow::Result<LoadedModel> {
        let opts = LoadOptions {
            base: self.quant,
            blocksize: self.blocksize,
            double_quant: !self.no_double_quant,
            max_positions,
            compute_dtype: self
                .compute_dtype
                .unwrap_or_else(|| self.device.default_compute_dtype()),
            device: self.device.open()?,
            ..Default::default()
        };
        let mut m = load_model(&self.model, &opts)
            .with_context(|| format!("loading model {}", self.model.display()))?;
        if let Some(dir) = &self.adapter {
            peft::load_adapter(&mut m.model, dir, None)
                .with_context(|| format!("loading adapter {}", dir.display()))?;
        }
        Ok(m)
    }
}
