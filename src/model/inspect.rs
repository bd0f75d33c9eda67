//! What a model folder, bnb checkpoint, GGUF file or adapter folder holds, without loading it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde_json::Value;

use super::checkpoint::SafetensorsDir;
use super::config::LlamaConfig;
use super::error::ModelError;
use super::gguf::GgufFile;

/// A summary of a model or adapter on disk.
#[derive(Clone, Debug, Default)]
pub struct Inspection {
    /// What kind of thing it is.
    pub kind: String,
    /// Architecture line (model type, layers, widths), if known.
    pub architecture: Option<String>,
    /// Number of tensors stored.
    pub tensors: usize,
    /// Count of tensors per stored type (`F32`, `U8 (nf4 packed)`, `Q4_1`, ...).
    pub dtypes: BTreeMap<String, usize>,
    /// Parameters of the (dense) model or adapter.
    pub parameters: usize,
    /// Bytes on disk.
    pub disk_bytes: u64,
    /// Bytes in memory once loaded with an NF4 + double-quant base (models only).
    pub nf4_memory_bytes: Option<u64>,
    /// Other facts worth a line (quantization config, adapter rank, ...).
    pub notes: Vec<String>,
    /// A few example tensors: name, type, shape.
    pub examples: Vec<(String, String, Vec<usize>)>,
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kind:          {}", self.kind)?;
        if let Some(a) = &self.architecture {
            writeln!(f, "architecture:  {a}")?;
        }
        writeln!(f, "tensors:       {}", self.tensors)?;
        let types: Vec<String> = self
            .dtypes
            .iter()
            .map(|(k, v)| format!("{k} x{v}"))
            .collect();
        writeln!(f, "stored types:  {}", types.join(", "))?;
        writeln!(
            f,
            "parameters:    {} ({:.1} M)",
            self.parameters,
            self.parameters as f64 / 1e6
        )?;
        writeln!(
            f,
            "size on disk:  {:.1} MiB",
            self.disk_bytes as f64 / 1048576.0
        )?;
        if let Some(m) = self.nf4_memory_bytes {
            writeln!(
                f,
                "in memory:     {:.1} MiB with an NF4 + double-quant base, f32 embeddings/norms",
                m as f64 / 1048576.0
            )?;
        }
        for n in &self.notes {
            writeln!(f, "note:          {n}")?;
        }
        for (name, ty, shape) in &self.examples {
            writeln!(f, "  {name:<60} {ty:<8} {shape:?}")?;
        }
        Ok(())
    }
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Memory of `cfg` with NF4 + double quant projections (0.5 B/weight + 1 B per 64 + nested)
/// and f32 embeddings, head and norms.
pub fn nf4_memory_bytes(cfg: &LlamaConfig) -> u64 {
    let proj: u64 = super::config::PROJECTIONS
        .iter()
        .filter_map(|p| cfg.projection_shape(p))
        .map(|(o, i)| {
            let n = (o * i) as u64;
            n / 2 + n.div_ceil(64) + 4 * n.div_ceil(64 * 256)
        })
        .sum::<u64>()
        * cfg.num_hidden_layers as u64;
    let embed = (cfg.vocab_size * cfg.hidden_size) as u64 * 4;
    let head = if cfg.tie_word_embeddings { 0 } else { embed };
    let norms = ((2 * cfg.num_hidden_layers + 1) * cfg.hidden_size) as u64 * 4;
    proj + embed + head + norms
}

/// Inspect `path` (model folder, adapter folder, `.gguf` or `.safetensors` file).
pub fn inspect(path: &Path) -> Result<Inspection, ModelError> {
    let mut out = Inspection::default();
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        let mut file = GgufFile::open(path).map_err(|source| ModelError::Gguf {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        out.kind = "GGUF model (llama.cpp)".into();
        out.disk_bytes = file_size(path);
        if let Ok(cfg_json) = file.hf_config() {
            describe_config(&mut out, &cfg_json);
        }
        // In file order; every tensor's bytes must lie inside the file.
        let content = file.content();
        let mut infos: Vec<_> = content.tensor_infos.iter().collect();
        infos.sort_by_key(|(name, info)| (info.offset, name.as_str()));
        let len = out.disk_bytes;
        for (name, info) in &infos {
            let end = crate::model::gguf::tensor_bytes(info)
                .and_then(|b| b.checked_add(info.offset))
                .and_then(|b| b.checked_add(content.tensor_data_offset));
            if end.is_none_or(|e| e > len) {
                return Err(ModelError::invalid(
                    path.display().to_string(),
                    format!(
                        "truncated or corrupt: tensor `{name}` (shape {:?}) does not fit in the \
                         file's {len} bytes",
                        info.shape.dims()
                    ),
                ));
            }
        }
        for (name, info) in infos {
            *out.dtypes
                .entry(format!("{:?}", info.ggml_dtype))
                .or_default() += 1;
            out.parameters += info.shape.dims().iter().product::<usize>();
            if out.examples.len() < 6 && (name.starts_with("blk.0.") || !name.starts_with("blk.")) {
                out.examples.push((
                    name.to_string(),
                    format!("{:?}", info.ggml_dtype),
                    info.shape.dims().to_vec(),
                ));
            }
        }
        out.tensors = file.content().tensor_infos.len();
        return Ok(out);
    }
    if path.is_dir() && path.join("adapter_config.json").is_file() {
        let cfg = crate::peft::read_config(path)?;
        let w = path.join(crate::peft::WEIGHTS_FILE);
        let st = SafetensorsDir::open_file(&w)?;
        out.kind = "PEFT LoRA adapter".into();
        out.notes.push(format!(
            "r {}, alpha {}, scale {}, dropout {}, targets {}, DoRA {}, rsLoRA {}",
            cfg.rank,
            cfg.alpha,
            cfg.scale(),
            cfg.dropout,
            cfg.targets.join(","),
            cfg.use_dora,
            cfg.use_rslora
        ));
        describe_tensors(&mut out, &st);
        out.disk_bytes = file_size(&w) + file_size(&path.join("adapter_config.json"));
        return Ok(out);
    }
    if path.is_file() {
        let st = SafetensorsDir::open_file(path)?;
        out.kind = "safetensors file".into();
        describe_tensors(&mut out, &st);
        out.disk_bytes = file_size(path);
        return Ok(out);
    }
    let cfg_path = path.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
    let cfg_json: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: cfg_path.clone(),
        source,
    })?;
    let st = SafetensorsDir::open(path)?;
    let q = cfg_json.get("quantization_config");
    out.kind = match q
        .and_then(|q| q.get("quant_method"))
        .and_then(Value::as_str)
    {
        Some("bitsandbytes") => "HF model folder, bitsandbytes 4-bit checkpoint".into(),
        _ => "HF model folder (safetensors)".into(),
    };
    if let Some(q) = q {
        out.notes.push(format!("quantization_config: {q}"));
    }
    describe_config(&mut out, &cfg_json);
    describe_tensors(&mut out, &st);
    out.disk_bytes = st.files().iter().map(|f| file_size(f.path())).sum();
    Ok(out)
}

fn describe_config(out: &mut Inspection, cfg_json: &Value) {
    match LlamaConfig::from_json(cfg_json) {
        Ok(c) => {
            out.architecture = Some(format!(
                "{}: {} layers, hidden {}, intermediate {}, {} heads / {} kv heads (head_dim {}), vocab {}, rope_theta {}, tied embeddings {}",
                c.model_type,
                c.num_hidden_layers,
                c.hidden_size,
                c.intermediate_size,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim,
                c.vocab_size,
                c.rope_theta,
                c.tie_word_embeddings
            ));
            out.nf4_memory_bytes = Some(nf4_memory_bytes(&c));
            out.notes.push(format!(
                "dense parameter count from config: {}",
                c.parameter_count()
            ));
        }
        Err(e) => out.notes.push(format!("config: {e}")),
    }
}

fn describe_tensors(out: &mut Inspection, st: &SafetensorsDir) {
    out.tensors = st.len();
    for name in st.names() {
        let Some(v) = st.get(name) else { continue };
        let is_packed = name.ends_with(".weight") && st.contains(&format!("{name}.absmax"));
        let ty = if is_packed {
            format!("{:?} (4-bit packed)", v.dtype())
        } else {
            format!("{:?}", v.dtype())
        };
        let n: usize = v.shape().iter().product();
        let is_state =
            name.contains(".absmax") || name.contains("quant_map") || name.contains("quant_state");
        if !is_state {
            out.parameters += if is_packed { 2 * n } else { n };
        }
        *out.dtypes.entry(ty.clone()).or_default() += 1;
        if out.examples.len() < 8 && (name.contains("layers.0.") || !name.contains("layers.")) {
            out.examples
                .push((name.to_string(), ty, v.shape().to_vec()));
        }
    }
}
