//! Reading a Llama, Qwen2 or GPT-2 model from a GGUF file: typed metadata, and its tensors under Hugging Face
//! names and layout, dequantized to f32 one at a time.
//!
//! candle parses the file (`gguf_file::Content`); this module adds what a loader needs on top:
//! llama.cpp → HF names, undoing the q/k row permutation that llama.cpp's converter applies for
//! its RoPE layout, and errors that name the tensor and key at fault. candle already reverses
//! GGUF's dims (`ne[0]` innermost), so a `QTensor` of a linear weight is `[out, in]`, as in HF.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use super::gguf_config;
use super::gguf_tokenizer::{self, GgufTokenizer};

/// Everything that can go wrong reading a GGUF model.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// Opening or reading the file failed.
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// candle could not parse the header.
    #[error("{path} is not a GGUF file candle can parse")]
    Parse {
        path: PathBuf,
        source: candle_core::Error,
    },
    /// A tensor type id that candle does not know (e.g. IQ4_NL).
    #[error("{path}: tensor `{tensor}` has ggml type id {type_id}, which candle cannot read; convert the model with one of {SUPPORTED_TYPES}")]
    UnknownTensorType {
        path: PathBuf,
        tensor: String,
        type_id: u32,
    },
    /// A tensor type candle knows but cannot read from GGUF (Q8_1, Q8_K).
    #[error("tensor `{tensor}` is {dtype:?}, which cannot be dequantized; convert the model with one of {SUPPORTED_TYPES}")]
    UnsupportedTensorType { tensor: String, dtype: GgmlDType },
    /// Reading, dequantizing or un-permuting a tensor failed.
    #[error("cannot read tensor `{tensor}`")]
    Tensor {
        tensor: String,
        source: candle_core::Error,
    },
    /// A tensor's values do not mean what they must.
    #[error("tensor `{tensor}` {what}")]
    InvalidTensor { tensor: String, what: String },
    /// A tensor asked for by name is absent.
    #[error("tensor `{0}` is not in the GGUF file")]
    MissingTensor(String),
    /// A tensor that is not one of the architecture's weights.
    #[error("tensor `{tensor}` has no Hugging Face name (unexpected in a `{arch}` GGUF)")]
    UnknownTensorName { tensor: String, arch: String },
    /// A required metadata key is absent.
    #[error("GGUF metadata has no `{0}`")]
    MissingMetadata(String),
    /// A metadata value of the wrong type.
    #[error("GGUF metadata `{key}` should be {expected}, found {found}")]
    MetadataType {
        key: String,
        expected: &'static str,
        found: String,
    },
    /// An architecture other than `llama`, `qwen2` and `gpt2`.
    #[error("GGUF architecture `{0}` is not supported (supported: llama, qwen2, gpt2)")]
    UnsupportedArchitecture(String),
    /// The tokenizer metadata is unsupported or inconsistent.
    #[error("GGUF tokenizer: {0}")]
    Tokenizer(String),
}

/// The ggml types we can dequantize, for error messages.
const SUPPORTED_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

/// An open GGUF file: parsed header plus a reader for tensor data.
pub struct GgufFile {
    path: PathBuf,
    reader: BufReader<File>,
    content: Content,
}

/// One tensor of the file: its names on both sides, HF shape and stored type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    /// Hugging Face name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub hf_name: String,
    /// llama.cpp name, e.g. `blk.0.attn_q.weight`.
    pub gguf_name: String,
    /// Shape in HF order (`[out, in]` for linear weights).
    pub shape: Vec<usize>,
    /// Storage type in the file.
    pub dtype: GgmlDType,
}

impl GgufFile {
    /// Open and parse the header (metadata and tensor directory); no tensor data is read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| GgufError::Io {
            path: path.clone(),
            source,
        })?;
        let mut reader = BufReader::new(file);
        let content = match Content::read(&mut reader) {
            Ok(content) => content,
            Err(source) => {
                // candle rejects an unknown type id without saying which tensor has it.
                if let Some((tensor, type_id)) = find_unknown_tensor_type(&path) {
                    return Err(GgufError::UnknownTensorType {
                        path,
                        tensor,
                        type_id,
                    });
                }
                return Err(GgufError::Parse { path, source });
            }
        };
        Ok(Self {
            path,
            reader,
            content,
        })
    }

    /// The file this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// candle's parsed header, for anything not wrapped here.
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// Typed access to the metadata key/value pairs.
    pub fn metadata(&self) -> Metadata<'_> {
        Metadata::new(&self.content.metadata)
    }

    /// `general.architecture`, e.g. `llama`.
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.metadata().str("general.architecture")
    }

    /// An HF `config.json` equivalent built from the metadata (see [`gguf_config::hf_config`]).
    ///
    /// A `rope_freqs.weight` tensor (llama.cpp's form of Llama 3 RoPE scaling) is read and
    /// turned back into the config's `llama3` scaling; factors of another form are an error.
    pub fn hf_config(&mut self) -> Result<serde_json::Value, GgufError> {
        let mut config = gguf_config::hf_config(&self.content)?;
        if self.content.tensor_infos.contains_key(ROPE_FREQS) {
            let factors = self.read_tensor(ROPE_FREQS, &Device::Cpu).and_then(|t| {
                t.flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|source| GgufError::Tensor {
                        tensor: ROPE_FREQS.into(),
                        source,
                    })
            })?;
            gguf_config::apply_rope_freqs(&mut config, &factors)?;
        }
        Ok(config)
    }

    /// The tokenizer and chat template stored in the metadata.
    pub fn tokenizer(&self) -> Result<GgufTokenizer, GgufError> {
        gguf_tokenizer::tokenizer_from_gguf(&self.content)
    }

    /// All model tensors with HF names, in file order (so reading them in turn is sequential).
    pub fn tensor_entries(&self) -> Result<Vec<TensorEntry>, GgufError> {
        let names = self.names()?;
        let mut infos: Vec<_> = self.content.tensor_infos.iter().collect();
        infos.sort_by_key(|(_, info)| info.offset);
        let mut entries = Vec::with_capacity(infos.len());
        for (gguf_name, info) in infos {
            if SKIPPED_TENSORS.contains(&gguf_name.as_str()) {
                continue;
            }
            let hf_name = names
                .hf_name(gguf_name)
                .ok_or_else(|| GgufError::UnknownTensorName {
                    tensor: gguf_name.clone(),
                    arch: self.architecture().unwrap_or_default().to_string(),
                })?;
            let mut shape = info.shape.dims().to_vec();
            if names.is_transposed(gguf_name) {
                shape.reverse();
            }
            entries.push(TensorEntry {
                hf_name,
                gguf_name: gguf_name.clone(),
                shape,
                dtype: info.ggml_dtype,
            });
        }
        Ok(entries)
    }

    /// Read one tensor by its HF name, as f32 on `device` in HF layout.
    pub fn read_hf_tensor(&mut self, hf_name: &str, device: &Device) -> Result<Tensor, GgufError> {
        let gguf_name = self
            .names()?
            .gguf_name(hf_name)
            .ok_or_else(|| GgufError::MissingTensor(hf_name.into()))?;
        self.read_tensor(&gguf_name, device)
    }

    /// Read one tensor by its GGUF name, dequantized to f32 on `device`, in HF layout (q/k rows
    /// in HF order, GPT-2's `Conv1D` weights `[in, out]`).
    pub fn read_tensor(&mut self, gguf_name: &str, device: &Device) -> Result<Tensor, GgufError> {
        let info = self
            .content
            .tensor_infos
            .get(gguf_name)
            .ok_or_else(|| GgufError::MissingTensor(gguf_name.into()))?;
        if !is_dequantizable(info.ggml_dtype) {
            return Err(GgufError::UnsupportedTensorType {
                tensor: gguf_name.into(),
                dtype: info.ggml_dtype,
            });
        }
        // Only llama's converter permutes q/k (qwen2 uses llama.cpp's NEOX RoPE, HF's layout).
        let permuted = self.architecture()? == "llama";
        let heads = match rope_permuted_kind(gguf_name).filter(|_| permuted) {
            Some(RopePermuted::Query) => Some(self.head_count()?),
            Some(RopePermuted::Key) => Some(self.kv_head_count()?),
            None => None,
        };
        let tensor_error = |source| GgufError::Tensor {
            tensor: gguf_name.into(),
            source,
        };
        // The tensor's bytes must lie inside the file before anything is allocated for them.
        let file_len = self
            .reader
            .get_ref()
            .metadata()
            .map(|m| m.len())
            .unwrap_or(0);
        let end = tensor_bytes(info)
            .and_then(|b| b.checked_add(info.offset))
            .and_then(|b| b.checked_add(self.content.tensor_data_offset));
        if end.is_none_or(|e| e > file_len) {
            return Err(tensor_error(candle_core::Error::Msg(format!(
                "shape {:?} of {:?} does not fit in the file ({file_len} bytes): truncated or \
                 corrupt",
                info.shape.dims(),
                info.ggml_dtype
            ))));
        }
        let qtensor = info
            .read(
                &mut self.reader,
                self.content.tensor_data_offset,
                &Device::Cpu,
            )
            .map_err(tensor_error)?;
        let weight = qtensor
            .dequantize(device)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(tensor_error)?;
        let weight = match heads {
            Some(n_head) => unpermute_rows(&weight, n_head).map_err(tensor_error)?,
            None => weight,
        };
        if self.names()?.is_transposed(gguf_name) {
            return weight
                .t()
                .and_then(|w| w.contiguous())
                .map_err(tensor_error);
        }
        Ok(weight)
    }

    /// Iterate over all tensors as `(hf_name, f32 tensor)`, one read and dequantized at a time,
    /// so a loader can quantize on the fly without holding the whole model in f32.
    pub fn tensors(&mut self, device: &Device) -> Result<GgufTensors<'_>, GgufError> {
        let entries = self.tensor_entries()?.into_iter();
        Ok(GgufTensors {
            file: self,
            entries,
            device: device.clone(),
        })
    }

    fn head_count(&self) -> Result<usize, GgufError> {
        let arch = self.architecture()?;
        self.metadata()
            .usize(&format!("{arch}.attention.head_count"))
    }

    fn kv_head_count(&self) -> Result<usize, GgufError> {
        let arch = self.architecture()?;
        match self
            .metadata()
            .opt_usize(&format!("{arch}.attention.head_count_kv"))?
        {
            Some(n) => Ok(n),
            None => self.head_count(),
        }
    }

    /// The tensor names of the file's architecture; an error for one this crate cannot read.
    fn names(&self) -> Result<&'static GgufNames, GgufError> {
        let arch = self.architecture()?;
        GgufNames::of(arch).ok_or_else(|| GgufError::UnsupportedArchitecture(arch.into()))
    }
}

/// Iterator over a GGUF file's tensors; see [`GgufFile::tensors`].
pub struct GgufTensors<'a> {
    file: &'a mut GgufFile,
    entries: std::vec::IntoIter<TensorEntry>,
    device: Device,
}

impl Iterator for GgufTensors<'_> {
    type Item = Result<(String, Tensor), GgufError>;

    fn next(&mut self) -> Option<Self::Item> {
        let entry = self.entries.next()?;
        let tensor = self.file.read_tensor(&entry.gguf_name, &self.device);
        Some(tensor.map(|t| (entry.hf_name, t)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.entries.size_hint()
    }
}

fn is_dequantizable(dtype: GgmlDType) -> bool {
    // candle parses these two but has no reader for them in GGUF files.
    !matches!(dtype, GgmlDType::Q8_1 | GgmlDType::Q8K)
}

// ---------------------------------------------------------------------------------------------
// Names

/// Tensors that are not weights in HF form: llama3's precomputed RoPE frequency factors.
/// llama.cpp's per-frequency RoPE divisors (Llama 3 scaling), read into the config instead.
pub const ROPE_FREQS: &str = "rope_freqs.weight";

const SKIPPED_TENSORS: &[&str] = &[ROPE_FREQS];

/// How llama.cpp names one architecture's tensors, and which it stores transposed from HF.
#[derive(Debug)]
pub struct GgufNames {
    /// Whole-name pairs `(gguf, hf)` outside the layers.
    global: &'static [(&'static str, &'static str)],
    /// HF prefix of layer `N`'s tensors, before `N`.
    layer_prefix: &'static str,
    /// Per-layer pairs `(gguf, hf)`: `blk.N.{gguf}` ↔ `{layer_prefix}N.{hf}`, before
    /// `.weight`/`.bias`.
    layer: &'static [(&'static str, &'static str)],
    /// Layer tensors (GGUF base names) whose HF weight is `[in, out]` (GPT-2's `Conv1D`), which
    /// llama.cpp stores as `[out, in]` like every other matrix.
    transposed: &'static [&'static str],
}

/// Llama, Mistral and Qwen2 (llama.cpp's `llama` and `qwen2`).
const LLAMA_NAMES: GgufNames = GgufNames {
    global: &[
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ],
    layer_prefix: "model.layers.",
    layer: &[
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
        ("attn_norm", "input_layernorm"),
        ("ffn_norm", "post_attention_layernorm"),
    ],
    transposed: &[],
};

/// GPT-2 (llama.cpp's `gpt2`; `convert_hf_to_gguf.py` transposes the four `Conv1D` weights).
const GPT2_NAMES: GgufNames = GgufNames {
    global: &[
        ("token_embd.weight", "transformer.wte.weight"),
        ("position_embd.weight", "transformer.wpe.weight"),
        ("output_norm.weight", "transformer.ln_f.weight"),
        ("output_norm.bias", "transformer.ln_f.bias"),
        ("output.weight", "lm_head.weight"),
    ],
    layer_prefix: "transformer.h.",
    layer: &[
        ("attn_norm", "ln_1"),
        ("attn_qkv", "attn.c_attn"),
        ("attn_output", "attn.c_proj"),
        ("ffn_norm", "ln_2"),
        ("ffn_up", "mlp.c_fc"),
        ("ffn_down", "mlp.c_proj"),
    ],
    transposed: &["attn_qkv", "attn_output", "ffn_up", "ffn_down"],
};

/// GGUF architectures this crate reads and writes.
pub const ARCHITECTURES: &[&str] = &["llama", "qwen2", "gpt2"];

impl GgufNames {
    /// The names of GGUF architecture `arch`, if it is one of [`ARCHITECTURES`].
    pub fn of(arch: &str) -> Option<&'static GgufNames> {
        match arch {
            "llama" | "qwen2" => Some(&LLAMA_NAMES),
            "gpt2" => Some(&GPT2_NAMES),
            _ => None,
        }
    }

    /// HF name of a llama.cpp tensor name, if it is one of the architecture's weights.
    pub fn hf_name(&self, gguf_name: &str) -> Option<String> {
        if let Some((_, hf)) = self.global.iter().find(|(g, _)| *g == gguf_name) {
            return Some((*hf).to_string());
        }
        let (layer, rest) = gguf_name.strip_prefix("blk.")?.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (base, suffix) = rest.split_once('.')?;
        if suffix != "weight" && suffix != "bias" {
            return None;
        }
        let (_, hf) = self.layer.iter().find(|(g, _)| *g == base)?;
        Some(format!("{}{layer}.{hf}.{suffix}", self.layer_prefix))
    }

    /// llama.cpp name of an HF tensor name (inverse of [`GgufNames::hf_name`]).
    pub fn gguf_name(&self, hf_name: &str) -> Option<String> {
        if let Some((gguf, _)) = self.global.iter().find(|(_, h)| *h == hf_name) {
            return Some((*gguf).to_string());
        }
        let (layer, rest) = hf_name.strip_prefix(self.layer_prefix)?.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (base, suffix) = rest.rsplit_once('.')?;
        if suffix != "weight" && suffix != "bias" {
            return None;
        }
        let (gguf, _) = self.layer.iter().find(|(_, h)| *h == base)?;
        Some(format!("blk.{layer}.{gguf}.{suffix}"))
    }

    /// True if the GGUF tensor `gguf_name` is the transpose of its HF tensor.
    pub fn is_transposed(&self, gguf_name: &str) -> bool {
        gguf_name
            .strip_prefix("blk.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(_, rest)| rest.strip_suffix(".weight"))
            .is_some_and(|base| self.transposed.contains(&base))
    }
}

// ---------------------------------------------------------------------------------------------
// The q/k row permutation

enum RopePermuted {
    Query,
    Key,
}

fn rope_permuted_kind(gguf_name: &str) -> Option<RopePermuted> {
    let rest = gguf_name.strip_prefix("blk.")?.split_once('.')?.1;
    match rest {
        "attn_q.weight" | "attn_q.bias" => Some(RopePermuted::Query),
        "attn_k.weight" | "attn_k.bias" => Some(RopePermuted::Key),
        _ => None,
    }
}

/// llama.cpp's q/k permutation (`convert_hf_to_gguf.py`, `LlamaModel.permute`): within each
/// head, HF's rotate-half row order becomes interleaved pairs. Rows are dim 0 of `w`.
///
/// `w.reshape(n_head, 2, rows / n_head / 2, ...).swapaxes(1, 2).reshape(w.shape)`
pub fn permute_rows(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    swap_head_halves(w, n_head, true)
}

/// Inverse of [`permute_rows`]: from llama.cpp's interleaved rows back to HF's layout.
///
/// `w.reshape(n_head, rows / n_head / 2, 2, ...).swapaxes(1, 2).reshape(w.shape)`
pub fn unpermute_rows(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    swap_head_halves(w, n_head, false)
}

fn swap_head_halves(w: &Tensor, n_head: usize, to_gguf: bool) -> candle_core::Result<Tensor> {
    let dims = w.dims();
    let rows = dims.first().copied().unwrap_or(0);
    if n_head == 0 || rows % (2 * n_head) != 0 {
        candle_core::bail!("cannot split {rows} rows into {n_head} heads of (2 × half) rows");
    }
    let half = rows / n_head / 2;
    let (a, b) = if to_gguf { (2, half) } else { (half, 2) };
    let mut split = vec![n_head, a, b];
    split.extend_from_slice(&dims[1..]);
    w.reshape(split)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

// ---------------------------------------------------------------------------------------------
// Metadata

/// Typed, error-reporting access to GGUF metadata (candle's `Value` getters are exact-type).
#[derive(Clone, Copy)]
pub struct Metadata<'a> {
    map: &'a HashMap<String, Value>,
}

impl<'a> Metadata<'a> {
    /// Wrap a metadata map.
    pub fn new(map: &'a HashMap<String, Value>) -> Self {
        Self { map }
    }

    /// The raw value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// A required non-negative integer of any width.
    pub fn usize(&self, key: &str) -> Result<usize, GgufError> {
        self.opt_usize(key)?
            .ok_or_else(|| GgufError::MissingMetadata(key.into()))
    }

    /// An optional non-negative integer of any width.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>, GgufError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let n = match *value {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        };
        n.and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| type_error(key, "a non-negative integer", value))
    }

    /// A required number (float or integer) as f64.
    pub fn f64(&self, key: &str) -> Result<f64, GgufError> {
        self.opt_f64(key)?
            .ok_or_else(|| GgufError::MissingMetadata(key.into()))
    }

    /// An optional number (float or integer) as f64; NaN and infinities are refused.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let x = match *value {
            Value::F32(v) => f64::from(v),
            Value::F64(v) => v,
            Value::U8(v) => f64::from(v),
            Value::U16(v) => f64::from(v),
            Value::U32(v) => f64::from(v),
            Value::I8(v) => f64::from(v),
            Value::I16(v) => f64::from(v),
            Value::I32(v) => f64::from(v),
            _ => return Err(type_error(key, "a number", value)),
        };
        // NaN or infinity in a hyperparameter has no meaning; JSON could not even carry it.
        if !x.is_finite() {
            return Err(type_error(key, "a finite number", value));
        }
        Ok(Some(x))
    }

    /// An optional boolean.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(value) => Err(type_error(key, "a boolean", value)),
        }
    }

    /// A required string.
    pub fn str(&self, key: &str) -> Result<&'a str, GgufError> {
        self.opt_str(key)?
            .ok_or_else(|| GgufError::MissingMetadata(key.into()))
    }

    /// An optional string.
    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(value) => Err(type_error(key, "a string", value)),
        }
    }

    /// An optional array.
    pub fn opt_array(&self, key: &str) -> Result<Option<&'a [Value]>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items.as_slice())),
            Some(value) => Err(type_error(key, "an array", value)),
        }
    }

    /// A required array of strings.
    pub fn strings(&self, key: &str) -> Result<Vec<&'a str>, GgufError> {
        let items = self
            .opt_array(key)?
            .ok_or_else(|| GgufError::MissingMetadata(key.into()))?;
        items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.as_str()),
                other => Err(type_error(key, "an array of strings", other)),
            })
            .collect()
    }
}

/// Bytes of a tensor's data by its shape and type, or `None` when the shape overflows or is not
/// a whole number of blocks.
pub fn tensor_bytes(info: &candle_core::quantized::gguf_file::TensorInfo) -> Option<u64> {
    let dt = info.ggml_dtype;
    let n = info
        .shape
        .dims()
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))?;
    let block = dt.block_size() as u64;
    if n % block != 0 {
        return None;
    }
    (n / block).checked_mul(dt.type_size() as u64)
}

fn type_error(key: &str, expected: &'static str, found: &Value) -> GgufError {
    let mut found = format!("{found:?}");
    if found.len() > 80 {
        let cut = (0..=80)
            .rev()
            .find(|&i| found.is_char_boundary(i))
            .unwrap_or(0);
        found.truncate(cut);
        found.push('…');
    }
    GgufError::MetadataType {
        key: key.into(),
        expected,
        found,
    }
}

// ---------------------------------------------------------------------------------------------
// Finding the tensor behind candle's "unknown dtype" error

/// ggml type ids candle knows (`GgmlDType::from_u32`).
const CANDLE_TYPE_IDS: &[u32] = &[0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30];

/// Walk a GGUF (v2/v3) header and return the first tensor whose type id candle does not know.
/// Only used to explain a failed parse, so any trouble just yields `None`.
fn find_unknown_tensor_type(path: &Path) -> Option<(String, u32)> {
    let mut r = BufReader::new(File::open(path).ok()?);
    let magic = read_u32(&mut r).ok()?;
    let version = read_u32(&mut r).ok()?;
    if magic != 0x4655_4747 || !(2..=3).contains(&version) {
        return None;
    }
    let tensor_count = read_u64(&mut r).ok()?;
    let kv_count = read_u64(&mut r).ok()?;
    for _ in 0..kv_count {
        skip_string(&mut r).ok()?;
        let value_type = read_u32(&mut r).ok()?;
        skip_value(&mut r, value_type, 0).ok()?;
    }
    for _ in 0..tensor_count {
        let name = read_string(&mut r).ok()?;
        let n_dims = read_u32(&mut r).ok()?;
        r.seek_relative(8 * i64::from(n_dims)).ok()?;
        let type_id = read_u32(&mut r).ok()?;
        read_u64(&mut r).ok()?; // offset
        if !CANDLE_TYPE_IDS.contains(&type_id) {
            return Some((name, type_id));
        }
    }
    None
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_string(r: &mut impl Read) -> std::io::Result<String> {
    let len = read_u64(r)?;
    let mut bytes = Vec::new();
    r.take(len).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn skip_string(r: &mut (impl Read + Seek)) -> std::io::Result<()> {
    let len = read_u64(r)?;
    r.seek(SeekFrom::Current(to_offset(len)?))?;
    Ok(())
}

fn skip_value(r: &mut (impl Read + Seek), value_type: u32, depth: usize) -> std::io::Result<()> {
    let size: u64 = match value_type {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        8 => return skip_string(r),
        9 if depth < 4 => {
            let item_type = read_u32(r)?;
            let len = read_u64(r)?;
            for _ in 0..len {
                skip_value(r, item_type, depth + 1)?;
            }
            return Ok(());
        }
        _ => return Err(std::io::ErrorKind::InvalidData.into()),
    };
    r.seek(SeekFrom::Current(to_offset(size)?))?;
    Ok(())
}

fn to_offset(n: u64) -> std::io::Result<i64> {
    i64::try_from(n).map_err(|_| std::io::ErrorKind::InvalidData.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, QTensor};

    #[test]
    fn names_round_trip() {
        for arch in ARCHITECTURES {
            let names = GgufNames::of(arch).unwrap();
            for layer in [0, 7, 29] {
                for (gguf, _) in names.layer {
                    for suffix in ["weight", "bias"] {
                        let g = format!("blk.{layer}.{gguf}.{suffix}");
                        let h = names.hf_name(&g).expect("a layer name maps");
                        assert_eq!(names.gguf_name(&h).as_deref(), Some(g.as_str()));
                    }
                }
            }
            for (g, h) in names.global {
                assert_eq!(names.hf_name(g).as_deref(), Some(*h));
                assert_eq!(names.gguf_name(h).as_deref(), Some(*g));
            }
        }
        assert_eq!(
            LLAMA_NAMES.hf_name("blk.3.ffn_norm.weight").as_deref(),
            Some("model.layers.3.post_attention_layernorm.weight")
        );
        assert_eq!(
            GPT2_NAMES.hf_name("blk.3.attn_qkv.bias").as_deref(),
            Some("transformer.h.3.attn.c_attn.bias")
        );
        assert!(GPT2_NAMES.is_transposed("blk.1.ffn_down.weight"));
        assert!(!GPT2_NAMES.is_transposed("blk.1.ffn_down.bias"));
        assert!(!GPT2_NAMES.is_transposed("token_embd.weight"));
        assert!(!LLAMA_NAMES.is_transposed("blk.1.ffn_down.weight"));
        for bad in [
            "blk.x.attn_q.weight",
            "blk.0.attn_qq.weight",
            "blk.0.attn_q.scale",
            "foo",
        ] {
            assert_eq!(LLAMA_NAMES.hf_name(bad), None, "{bad}");
        }
        assert_eq!(GPT2_NAMES.hf_name("blk.0.attn_q.weight"), None);
        assert!(GgufNames::of("bert").is_none());
    }

    /// A `[rows, cols]` matrix whose entry is `row * 1000 + col`, so any permutation shows.
    fn labelled(rows: usize, cols: usize) -> Tensor {
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i / cols) * 1000 + i % cols) as f32)
            .collect();
        Tensor::from_vec(data, (rows, cols), &Device::Cpu).expect("shape matches data")
    }

    fn rows_of(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2::<f32>().expect("a matrix")
    }

    #[test]
    fn permutation_matches_llama_cpp_and_is_undone() {
        // 2 heads of 6 rows: llama.cpp interleaves each head's halves: 0,3,1,4,2,5 | 6,9,7,10,8,11.
        let w = labelled(12, 3);
        let permuted = permute_rows(&w, 2).expect("permute");
        let order: Vec<usize> = rows_of(&permuted)
            .iter()
            .map(|row| (row[0] / 1000.0) as usize)
            .collect();
        assert_eq!(order, [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]);
        let back = unpermute_rows(&permuted, 2).expect("unpermute");
        assert_eq!(rows_of(&back), rows_of(&w));
    }

    #[test]
    fn unpermute_inverts_permute_for_q_k_shapes_and_bias() {
        // SmolLM2-like: q has 9 heads × 64 rows, k has 3 kv heads × 64 rows.
        for (rows, heads) in [(576, 9), (192, 3), (8, 1)] {
            let w = labelled(rows, 5);
            let round = unpermute_rows(&permute_rows(&w, heads).expect("permute"), heads)
                .expect("unpermute");
            assert_eq!(rows_of(&round), rows_of(&w));
            assert_ne!(
                rows_of(&permute_rows(&w, heads).expect("permute")),
                rows_of(&w)
            );
        }
        let bias = Tensor::arange(0f32, 12.0, &Device::Cpu).expect("arange");
        let round = unpermute_rows(&permute_rows(&bias, 3).expect("permute"), 3).expect("back");
        assert_eq!(
            round.to_vec1::<f32>().expect("vector"),
            bias.to_vec1::<f32>().expect("vector")
        );
        assert!(unpermute_rows(&labelled(10, 2), 3).is_err());
    }

    /// Write a GGUF with the given tensors and metadata into a temp file.
    fn write_gguf(
        tensors: &[(&str, &QTensor)],
        metadata: &[(&str, &Value)],
    ) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        gguf_file::write(file.as_file_mut(), metadata, tensors).expect("write gguf");
        file
    }

    #[test]
    fn unsupported_type_names_the_tensor() {
        let x = Tensor::ones((2, 32), DType::F32, &Device::Cpu).expect("ones");
        let q8_1 = QTensor::quantize(&x, GgmlDType::Q8_1).expect("quantize");
        let arch = Value::String("llama".into());
        let file = write_gguf(
            &[("blk.0.ffn_up.weight", &q8_1)],
            &[("general.architecture", &arch)],
        );
        let mut gguf = GgufFile::open(file.path()).expect("open");
        let err = gguf
            .read_tensor("blk.0.ffn_up.weight", &Device::Cpu)
            .expect_err("Q8_1 cannot be read");
        let msg = err.to_string();
        assert!(
            msg.contains("blk.0.ffn_up.weight") && msg.contains("Q8_1"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_type_id_names_the_tensor() {
        let x = Tensor::ones(4, DType::F32, &Device::Cpu).expect("ones");
        let f32_tensor = QTensor::quantize(&x, GgmlDType::F32).expect("wrap");
        let file = write_gguf(&[("blk.0.attn_norm.weight", &f32_tensor)], &[]);
        // Patch the tensor's type id (F32 = 0) to 20 (IQ4_NL), unknown to candle. The header is:
        // magic, version, counts (24 bytes), then name (8 + len), n_dims (4), dims (8 each), type.
        let mut bytes = std::fs::read(file.path()).expect("read back");
        let name_len = "blk.0.attn_norm.weight".len();
        let type_at = 24 + 8 + name_len + 4 + 8;
        assert_eq!(bytes[type_at..type_at + 4], 0u32.to_le_bytes());
        bytes[type_at..type_at + 4].copy_from_slice(&20u32.to_le_bytes());
        std::fs::write(file.path(), &bytes).expect("patch");
        let err = GgufFile::open(file.path())
            .err()
            .expect("unknown type must fail");
        let msg = err.to_string();
        assert!(
            msg.contains("blk.0.attn_norm.weight") && msg.contains("type id 20"),
            "{msg}"
        );
    }

    #[test]
    fn metadata_reports_key_and_type() {
        let mut map = HashMap::new();
        map.insert("a".to_string(), Value::U32(7));
        map.insert("b".to_string(), Value::I32(-1));
        map.insert("c".to_string(), Value::F32(0.5));
        map.insert("s".to_string(), Value::String("x".into()));
        let md = Metadata::new(&map);
        assert_eq!(md.usize("a").expect("u32"), 7);
        assert_eq!(md.f64("a").expect("int as float"), 7.0);
        assert_eq!(md.f64("c").expect("f32"), 0.5);
        assert!(md.usize("b").is_err());
        let missing = md.usize("nope").expect_err("missing").to_string();
        assert!(missing.contains("nope"), "{missing}");
        let wrong = md.str("a").expect_err("wrong type").to_string();
        assert!(wrong.contains("`a`") && wrong.contains("string"), "{wrong}");
        assert_eq!(md.str("s").expect("string"), "x");
    }
}
