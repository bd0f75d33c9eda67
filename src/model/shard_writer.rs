//! `ShardWriter`: write a model's tensors as transformers does, one `model.safetensors`, or
//! `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json` once they pass
//! a size limit.
//!
//! Tensors are held until their shard is written, then dropped, so the memory a writer needs is
//! bounded by the shard size. Tensors borrowed from a mapped input cost no memory at all.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{TensorView, View};
use safetensors::Dtype;

use super::checkpoint::{INDEX_FILE, SINGLE_FILE};
use super::error::ModelError;
use crate::quant::StoredTensor;

/// transformers' long-standing `max_shard_size` default (5 GB, decimal).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// A tensor to write: borrowed from a mapped checkpoint, or computed.
#[derive(Debug)]
pub enum ShardTensor<'a> {
    /// Bytes of an input file, copied as they are.
    Mapped(TensorView<'a>),
    /// A tensor built in memory.
    Owned(StoredTensor),
}

impl ShardTensor<'_> {
    /// Size of the tensor's data in bytes.
    pub fn byte_len(&self) -> u64 {
        View::data_len(&self) as u64
    }
}

impl View for &ShardTensor<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            ShardTensor::Mapped(v) => v.dtype(),
            ShardTensor::Owned(t) => t.dtype,
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            ShardTensor::Mapped(v) => v.shape(),
            ShardTensor::Owned(t) => &t.shape,
        }
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            ShardTensor::Mapped(v) => Cow::Borrowed(v.data()),
            ShardTensor::Owned(t) => Cow::Borrowed(&t.data),
        }
    }
    fn data_len(&self) -> usize {
        match self {
            ShardTensor::Mapped(v) => v.data().len(),
            ShardTensor::Owned(t) => t.data.len(),
        }
    }
}

/// What a [`ShardWriter`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenShards {
    /// Files written, index last if there is one.
    pub files: Vec<PathBuf>,
    /// Number of tensors.
    pub tensors: usize,
    /// Total bytes of tensor data.
    pub tensor_bytes: u64,
}

/// Collects tensors and writes them into `dir` in shards of at most `max_shard_bytes` (a
/// group larger than that gets a shard of its own).
#[derive(Debug)]
pub struct ShardWriter<'a> {
    dir: PathBuf,
    max_shard_bytes: u64,
    pending: Vec<(String, ShardTensor<'a>)>,
    pending_bytes: u64,
    /// Shards written so far (under provisional names) and the tensors in each.
    written: Vec<(PathBuf, Vec<String>)>,
    tensors: usize,
    tensor_bytes: u64,
}

impl<'a> ShardWriter<'a> {
    /// A writer into the existing folder `dir`.
    pub fn new(dir: impl AsRef<Path>, max_shard_bytes: u64) -> Self {
        Self {
            dir: dir.as_ref().to_path_buf(),
            max_shard_bytes,
            pending: Vec::new(),
            pending_bytes: 0,
            written: Vec::new(),
            tensors: 0,
            tensor_bytes: 0,
        }
    }

    /// Add tensors that belong in the same file (a 4-bit weight and its quant state).
    pub fn add_group(&mut self, group: Vec<(String, ShardTensor<'a>)>) -> Result<(), ModelError> {
        let bytes: u64 = group.iter().map(|(_, t)| t.byte_len()).sum();
        if !self.pending.is_empty() && self.pending_bytes + bytes > self.max_shard_bytes {
            self.flush()?;
        }
        self.tensors += group.len();
        self.tensor_bytes += bytes;
        self.pending_bytes += bytes;
        self.pending.extend(group);
        Ok(())
    }

    /// Add one tensor.
    pub fn add(&mut self, name: String, tensor: ShardTensor<'a>) -> Result<(), ModelError> {
        self.add_group(vec![(name, tensor)])
    }

    /// Bytes of tensor data added so far.
    pub fn tensor_bytes(&self) -> u64 {
        self.tensor_bytes
    }

    fn flush(&mut self) -> Result<(), ModelError> {
        let path = self.dir.join(format!(
            "model-{:05}.safetensors.part",
            self.written.len() + 1
        ));
        let names = self.write_pending(&path)?;
        self.written.push((path, names));
        Ok(())
    }

    fn write_pending(&mut self, path: &Path) -> Result<Vec<String>, ModelError> {
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let names = pending.iter().map(|(n, _)| n.clone()).collect();
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(
            pending.iter().map(|(n, t)| (n.as_str(), t)),
            Some(metadata),
            path,
        )
        .map_err(|source| ModelError::SafetensorsWrite {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(names)
    }

    /// Write what is left. One shard becomes `model.safetensors`; several are renamed
    /// `model-0000i-of-0000n.safetensors` and listed in `model.safetensors.index.json`.
    pub fn finish(mut self) -> Result<WrittenShards, ModelError> {
        if self.written.is_empty() {
            let path = self.dir.join(SINGLE_FILE);
            self.write_pending(&path)?;
            return Ok(WrittenShards {
                files: vec![path],
                tensors: self.tensors,
                tensor_bytes: self.tensor_bytes,
            });
        }
        if !self.pending.is_empty() {
            self.flush()?;
        }
        let n = self.written.len();
        let mut files = Vec::with_capacity(n + 1);
        let mut weight_map = BTreeMap::new();
        for (i, (part, names)) in self.written.iter().enumerate() {
            let file_name = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            let path = self.dir.join(&file_name);
            std::fs::rename(part, &path).map_err(|source| ModelError::Write {
                path: path.clone(),
                source,
            })?;
            for name in names {
                weight_map.insert(name.clone(), file_name.clone());
            }
            files.push(path);
        }
        let index = serde_json::json!({
            "metadata": { "total_size": self.tensor_bytes },
            "weight_map": weight_map,
        });
        let path = self.dir.join(INDEX_FILE);
        let text = serde_json::to_string_pretty(&index).unwrap_or_default() + "\n";
        std::fs::write(&path, text).map_err(|source| ModelError::Write {
            path: path.clone(),
            source,
        })?;
        files.push(path);
        Ok(WrittenShards {
            files,
            tensors: self.tensors,
            tensor_bytes: self.tensor_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint::SafetensorsDir;

    fn owned(n: usize) -> ShardTensor<'static> {
        ShardTensor::Owned(StoredTensor {
            dtype: Dtype::U8,
            shape: vec![n],
            data: vec![n as u8; n],
        })
    }

    #[test]
    fn one_file_below_the_limit_shards_above() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::new(dir.path(), 100);
        w.add("a".into(), owned(10)).unwrap();
        w.add("b".into(), owned(20)).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.files, vec![dir.path().join(SINGLE_FILE)]);

        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::new(dir.path(), 25);
        w.add("a".into(), owned(10)).unwrap();
        w.add("b".into(), owned(10)).unwrap();
        w.add("c".into(), owned(30)).unwrap();
        w.add("d".into(), owned(5)).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.files.len(), 4, "{:?}", out.files);
        assert_eq!(out.tensor_bytes, 55);
        let st = SafetensorsDir::open(dir.path()).unwrap();
        assert_eq!(st.len(), 4);
        for (name, n) in [("a", 10), ("b", 10), ("c", 30), ("d", 5)] {
            assert_eq!(st.view(name).unwrap().data(), vec![n as u8; n].as_slice());
        }
        assert!(st
            .file_of("a")
            .unwrap()
            .ends_with("model-00001-of-00003.safetensors"));
        assert!(st
            .file_of("c")
            .unwrap()
            .ends_with("model-00002-of-00003.safetensors"));
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(INDEX_FILE)).unwrap()).unwrap();
        assert_eq!(index["metadata"]["total_size"], 55);
    }
}
