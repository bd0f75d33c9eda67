//! Which device a run computes on, chosen once from `--device` and passed down.
//!
//! `cpu` (the default) or `cuda[:N]`. CUDA needs a binary built with the `cuda` feature; without
//! it the choice fails with an error saying so, rather than at the first tensor op.

use std::fmt;

use candle_core::{DType, Device};

/// A device as named on the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU (AVX-512/AVX2 kernels).
    #[default]
    Cpu,
    /// CUDA device number N (`cuda` = `cuda:0`).
    Cuda(usize),
}

/// Why a device could not be chosen.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Not `cpu`, `cuda` or `cuda:N`.
    #[error("device `{0}`: expected cpu, cuda or cuda:N (N = device number, e.g. cuda:1)")]
    Unknown(String),
    /// CUDA asked for, but this binary has no CUDA backend.
    #[error(
        "device `{0}`: this qlora binary was built without CUDA; rebuild with \
         `cargo build --release --features cuda` (needs the CUDA toolkit: see the README's CUDA section)"
    )]
    NotCompiled(DeviceSpec),
    /// The CUDA device could not be opened.
    #[error(
        "device `{spec}`: cannot open it ({source}); check `nvidia-smi` and the device number"
    )]
    Open {
        /// The device.
        spec: DeviceSpec,
        /// candle's / the driver's error.
        source: candle_core::Error,
    },
}

impl DeviceSpec {
    /// Parse `cpu`, `cuda` or `cuda:N`.
    pub fn parse(s: &str) -> Result<Self, DeviceError> {
        let s = s.trim();
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| DeviceError::Unknown(s.to_string())),
        }
    }

    /// Open the device.
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(_) if !cfg!(feature = "cuda") => Err(DeviceError::NotCompiled(self)),
            DeviceSpec::Cuda(n) => {
                Device::new_cuda(n).map_err(|source| DeviceError::Open { spec: self, source })
            }
        }
    }

    /// The compute dtype a run uses unless told otherwise: f32 on CPU (its kernels are f32),
    /// bf16 on a GPU (tensor cores, half the activation memory; QLoRA's own default there).
    pub fn default_compute_dtype(self) -> DType {
        match self {
            DeviceSpec::Cpu => DType::F32,
            DeviceSpec::Cuda(_) => DType::BF16,
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Parse a compute dtype name: `f32`, `bf16` or `f16`.
pub fn parse_compute_dtype(s: &str) -> Result<DType, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(format!(
            "compute dtype `{other}`: expected f32, bf16 or f16"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!(DeviceSpec::parse("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::parse("cuda").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(DeviceSpec::parse("CUDA:3").unwrap(), DeviceSpec::Cuda(3));
        assert!(DeviceSpec::parse("cuda:x").is_err());
        assert!(DeviceSpec::parse("metal").is_err());
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn bf16_by_default_on_gpu_f32_on_cpu() {
        assert_eq!(DeviceSpec::Cpu.default_compute_dtype(), DType::F32);
        assert_eq!(DeviceSpec::Cuda(0).default_compute_dtype(), DType::BF16);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_so() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("built without CUDA"), "{err}");
        assert!(err.contains("--features cuda"), "{err}");
    }
}
