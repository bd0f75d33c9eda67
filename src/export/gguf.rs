//! The merged model as one GGUF file for llama.cpp (architectures `llama`, `qwen2`, `gpt2`):
//! llama.cpp tensor names, q/k rows permuted to its interleaved RoPE layout (`llama` only),
//! GPT-2's `Conv1D` weights transposed to `[out, in]`, `{arch}.*` and `tokenizer.*` metadata.
//!
//! candle's `gguf_file::write` needs every tensor in memory at once; this writer lays out the
//! header from the tensors' shapes and types first, then streams each tensor's data as it is
//! merged and converted (candle's `QTensor` does the F16/BF16/Q8_0 encoding), so peak memory is
//! one tensor. The byte format is GGUF v3 with 32-byte alignment, as llama.cpp writes it.

use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::gguf_metadata::{gguf_architecture, model_metadata};
use super::tensors::{adapted_projections, read_merged, tensor_specs, TensorSpec};
use super::{ExportProgress, ExportReport};
use crate::model::config::LlamaConfig;
use crate::model::config::{llama3_rope_factors, RopeScaling};
use crate::model::error::ModelError;
use crate::model::gguf::{permute_rows, GgufNames, ROPE_FREQS};
use crate::model::loader::LoadedModel;
use crate::model::transformer::{Model, WeightLayout};

/// GGUF tensor type of the exported matrices (norms and biases are always F32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufType {
    /// 32-bit floats.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 8-bit blocks of 32 with an f16 scale (llama.cpp's Q8_0).
    Q8_0,
}

impl GgufType {
    /// Parse `f32`, `f16`, `bf16`, `q8_0`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(GgufType::F32),
            "f16" => Ok(GgufType::F16),
            "bf16" => Ok(GgufType::BF16),
            "q8_0" => Ok(GgufType::Q8_0),
            other => Err(format!(
                "unknown GGUF type `{other}` (f32, f16, bf16, q8_0)"
            )),
        }
    }

    /// The type matching an export dtype.
    pub fn from_dtype(dtype: candle_core::DType) -> Self {
        match dtype {
            candle_core::DType::F16 => GgufType::F16,
            candle_core::DType::F32 => GgufType::F32,
            _ => GgufType::BF16,
        }
    }

    fn ggml(self) -> GgmlDType {
        match self {
            GgufType::F32 => GgmlDType::F32,
            GgufType::F16 => GgmlDType::F16,
            GgufType::BF16 => GgmlDType::BF16,
            GgufType::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_ALL_F32`, `MOSTLY_F16`, ...).
    pub fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
            GgufType::BF16 => 32,
        }
    }
}

const MAGIC: u32 = 0x4655_4747;
const VERSION: u32 = 3;
const ALIGNMENT: u64 = 32;

/// ggml's type id (`enum ggml_type`).
fn type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q8_0 => 8,
        GgmlDType::BF16 => 30,
        // Only the four types above are ever chosen by `plan`.
        _ => u32::MAX,
    }
}

/// Where a tensor's values come from.
enum Source {
    /// A model tensor, adapters merged in.
    Model(TensorSpec),
    /// Values computed for the file (`rope_freqs.weight`).
    Values(Vec<f32>),
}

/// One tensor of the file: where it comes from and how it is stored.
struct Planned {
    /// HF name (a model tensor) or the GGUF name (a computed one), for messages and progress.
    name: String,
    /// HF shape (rows first).
    shape: Vec<usize>,
    source: Source,
    gguf_name: String,
    dtype: GgmlDType,
    /// Heads for llama.cpp's q/k row permutation.
    permute_heads: Option<usize>,
    /// Stored as the transpose of the checkpoint's `[in, out]` (GPT-2's `Conv1D`).
    transpose: bool,
    bytes: u64,
}

/// What the writer needs of the model's family: llama.cpp's architecture, its tensor names,
/// and the decoder config where the architecture is `llama` or `qwen2`.
pub(super) struct Target<'a> {
    pub arch: &'static str,
    pub names: &'static GgufNames,
    pub llama: Option<&'a LlamaConfig>,
}

/// The GGUF form of `loaded`; families and heads llama.cpp has no architecture for here are
/// refused by name.
pub(super) fn target(loaded: &LoadedModel) -> Result<Target<'_>, ModelError> {
    let refuse = |what: String| ModelError::invalid(loaded.path.display().to_string(), what);
    if let Some(head) = loaded.model.classifier() {
        return Err(refuse(format!(
            "GGUF export of a sequence classifier (head `{}`) is not supported; export \
             --format safetensors",
            head.module
        )));
    }
    let (arch, llama) =
        match &loaded.model {
            Model::Llama(l) => (gguf_architecture(&l.cfg)?, Some(&l.cfg)),
            Model::Gpt2(_) => ("gpt2", None),
            Model::Bert(_) => return Err(refuse(
                "GGUF export of a `bert` model is not supported (llama, mistral, qwen2, gpt2); \
                 export --format safetensors"
                    .into(),
            )),
        };
    let names = GgufNames::of(arch).ok_or_else(|| {
        refuse(format!(
            "llama.cpp architecture `{arch}` has no tensor names"
        ))
    })?;
    Ok(Target { arch, names, llama })
}

fn plan(loaded: &LoadedModel, ty: GgufType) -> Result<Vec<Planned>, ModelError> {
    let target = target(loaded)?;
    // llama.cpp's llama architecture rotates interleaved pairs, so q/k rows are permuted for it;
    // qwen2 uses its NEOX rotation, which is HF's rotate-half layout as is.
    let permuted = target.arch == "llama";
    let mut out = Vec::new();
    for spec in tensor_specs(&loaded.model) {
        let gguf_name = target.names.gguf_name(&spec.name).ok_or_else(|| {
            ModelError::invalid(
                spec.name.clone(),
                format!("has no tensor name in llama.cpp's `{}`", target.arch),
            )
        })?;
        let transpose = spec.layout == WeightLayout::InOut;
        let mut shape = spec.shape.clone();
        if transpose {
            shape.reverse();
        }
        let matrix = shape.len() == 2;
        let inner = shape.last().copied().unwrap_or(0);
        let dtype = match ty.ggml() {
            _ if !matrix => GgmlDType::F32,
            // llama.cpp's converter falls back to F16 for rows Q8_0 blocks do not divide.
            GgmlDType::Q8_0 if inner % GgmlDType::Q8_0.block_size() != 0 => GgmlDType::F16,
            t => t,
        };
        let module = spec.name.rsplit('.').nth(1).unwrap_or("");
        let permute_heads = match (module, target.llama) {
            (_, _) if !permuted => None,
            ("q_proj", Some(cfg)) => Some(cfg.num_attention_heads),
            ("k_proj", Some(cfg)) => Some(cfg.num_key_value_heads),
            _ => None,
        };
        let n: usize = shape.iter().product();
        let bytes = (n / dtype.block_size() * dtype.type_size()) as u64;
        out.push(Planned {
            name: spec.name.clone(),
            shape,
            source: Source::Model(spec),
            gguf_name,
            dtype,
            permute_heads,
            transpose,
            bytes,
        });
    }
    // Llama 3 scaling: llama.cpp divides each RoPE frequency by `rope_freqs.weight`.
    if let Some(cfg) = target.llama {
        if let RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } = cfg.rope_scaling
        {
            if !permuted {
                return Err(ModelError::invalid(
                    "config.json",
                    format!(
                        "llama3 RoPE scaling on a {} model has no GGUF form here",
                        cfg.model_type
                    ),
                ));
            }
            let factors = llama3_rope_factors(
                cfg.head_dim,
                cfg.rope_theta,
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            );
            out.push(Planned {
                name: ROPE_FREQS.into(),
                shape: vec![factors.len()],
                bytes: 4 * factors.len() as u64,
                source: Source::Values(factors),
                gguf_name: ROPE_FREQS.into(),
                dtype: GgmlDType::F32,
                permute_heads: None,
                transpose: false,
            });
        }
    }
    Ok(out)
}

fn padding(n: u64) -> u64 {
    (ALIGNMENT - n % ALIGNMENT) % ALIGNMENT
}

fn write_string(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// GGUF's value type id (`enum gguf_type`).
fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_value(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&x.to_le_bytes()),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::String(s) => write_string(w, s),
        Value::Array(items) => {
            // An empty array still needs an item type; GGUF readers accept any.
            let item_type = items.first().map_or(4, value_type);
            if items.iter().any(|i| value_type(i) != item_type) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "GGUF arrays must hold one type",
                ));
            }
            w.write_all(&item_type.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|i| write_value(w, i))
        }
    }
}

/// The data of one planned tensor: merged, permuted for llama.cpp if q/k, transposed if
/// `Conv1D`, encoded.
fn encode(loaded: &LoadedModel, p: &Planned) -> Result<Vec<u8>, ModelError> {
    let t = match &p.source {
        Source::Model(spec) => read_merged(&loaded.model, spec)?,
        Source::Values(v) => Tensor::from_slice(v, v.len(), &Device::Cpu)?,
    };
    let t = match p.permute_heads {
        Some(heads) => permute_rows(&t, heads)?,
        None => t,
    };
    let t = if p.transpose { t.t()? } else { t };
    let q = QTensor::quantize(&t.contiguous()?, p.dtype).map_err(|e| {
        ModelError::invalid(
            p.name.clone(),
            format!("cannot encode as {:?}: {e}", p.dtype),
        )
    })?;
    let data = q.data()?.into_owned();
    if data.len() as u64 != p.bytes {
        return Err(ModelError::invalid(
            p.name.clone(),
            format!(
                "encoded to {} bytes, the header says {}",
                data.len(),
                p.bytes
            ),
        ));
    }
    Ok(data)
}

/// Write the merged model as a GGUF file at `path`, matrices in `ty`.
pub fn write_file(
    loaded: &LoadedModel,
    path: &Path,
    ty: GgufType,
    progress: &mut dyn FnMut(ExportProgress<'_>),
) -> Result<ExportReport, ModelError> {
    let metadata: Vec<(String, Value)> = model_metadata(loaded, ty)?;
    let planned = plan(loaded, ty)?;
    progress(ExportProgress::Started {
        tensors: planned.len(),
    });
    let io = |source| ModelError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file = File::create(path).map_err(io)?;
    let mut w = BufWriter::new(file);
    let header = |w: &mut BufWriter<File>| -> std::io::Result<()> {
        w.write_all(&MAGIC.to_le_bytes())?;
        w.write_all(&VERSION.to_le_bytes())?;
        w.write_all(&(planned.len() as u64).to_le_bytes())?;
        w.write_all(&(metadata.len() as u64).to_le_bytes())?;
        for (key, value) in &metadata {
            write_string(w, key)?;
            w.write_all(&value_type(value).to_le_bytes())?;
            write_value(w, value)?;
        }
        let mut offset = 0u64;
        for p in &planned {
            write_string(w, &p.gguf_name)?;
            w.write_all(&(p.shape.len() as u32).to_le_bytes())?;
            // GGUF lists dimensions innermost first.
            for &d in p.shape.iter().rev() {
                w.write_all(&(d as u64).to_le_bytes())?;
            }
            w.write_all(&type_id(p.dtype).to_le_bytes())?;
            w.write_all(&offset.to_le_bytes())?;
            offset += p.bytes + padding(p.bytes);
        }
        let pos = w.stream_position()?;
        w.write_all(&vec![0u8; padding(pos) as usize])
    };
    header(&mut w).map_err(io)?;
    let mut tensor_bytes = 0u64;
    for p in &planned {
        let data = encode(loaded, p)?;
        w.write_all(&data).map_err(io)?;
        w.write_all(&vec![0u8; padding(p.bytes) as usize])
            .map_err(io)?;
        tensor_bytes += p.bytes;
        progress(ExportProgress::Tensor { name: &p.name });
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(ExportReport {
        out: path.to_path_buf(),
        files: vec![path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()],
        tensors: planned.len(),
        tensor_bytes,
        merged: adapted_projections(&loaded.model),
        requantized: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_candle_reader() {
        let md = vec![
            ("a.u32".to_string(), Value::U32(7)),
            ("a.f32".to_string(), Value::F32(1e-5)),
            ("a.s".to_string(), Value::String("héllo".into())),
            (
                "a.arr".to_string(),
                Value::Array(vec![Value::I32(1), Value::I32(-3)]),
            ),
            ("a.b".to_string(), Value::Bool(true)),
        ];
        let mut buf = std::io::Cursor::new(Vec::new());
        buf.write_all(&MAGIC.to_le_bytes()).unwrap();
        buf.write_all(&VERSION.to_le_bytes()).unwrap();
        buf.write_all(&0u64.to_le_bytes()).unwrap();
        buf.write_all(&(md.len() as u64).to_le_bytes()).unwrap();
        for (k, v) in &md {
            write_string(&mut buf, k).unwrap();
            buf.write_all(&value_type(v).to_le_bytes()).unwrap();
            write_value(&mut buf, v).unwrap();
        }
        buf.set_position(0);
        let c = candle_core::quantized::gguf_file::Content::read(&mut buf).unwrap();
        assert_eq!(c.metadata["a.u32"].to_u32().unwrap(), 7);
        assert_eq!(c.metadata["a.f32"].to_f32().unwrap(), 1e-5);
        assert_eq!(c.metadata["a.s"].to_string().unwrap(), "héllo");
        assert_eq!(
            c.metadata["a.arr"].to_vec().unwrap()[1].to_i32().unwrap(),
            -3
        );
        assert!(c.metadata["a.b"].to_bool().unwrap());
    }

    #[test]
    fn mixed_arrays_are_refused() {
        let mut buf = Vec::new();
        let v = Value::Array(vec![Value::I32(1), Value::U32(2)]);
        assert!(write_value(&mut buf, &v).is_err());
    }
}
