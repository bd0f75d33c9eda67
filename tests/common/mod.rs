//! Helpers shared by the integration tests.

// Every test binary compiles its own copy of this module and uses part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use qlora::model::loader::{load_model, BaseFormat, LoadOptions, LoadedModel};

/// This crate's `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Every tensor of a safetensors file, on the CPU (panics naming the file).
pub fn safetensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A reference file's `input_ids` (int64) as u32.
pub fn input_ids(r: &HashMap<String, Tensor>) -> Tensor {
    r["input_ids"].to_dtype(DType::U32).unwrap()
}

/// The model at `dir` with its base in `base` (panics naming the folder).
pub fn load_as(dir: &Path, base: BaseFormat) -> LoadedModel {
    let opts = LoadOptions {
        base,
        ..Default::default()
    };
    load_model(dir, &opts).unwrap_or_else(|e| panic!("{} loads: {e}", dir.display()))
}

/// Largest absolute elementwise difference of two same-shaped tensors, compared in f32.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
