//! `SafetensorsDir`: the tensors of a Hugging Face model folder, memory-mapped.
//!
//! A folder holds either one `model.safetensors` or shards listed in
//! `model.safetensors.index.json` (transformers prefers the single file when both exist; so do
//! we). Files are mapped, not read: a tensor's bytes are paged in only when it is used, so
//! converting a model one tensor at a time never holds the whole 16-bit model in memory.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorView};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use super::error::ModelError;
use crate::quant::Nf4Tensor;

/// Name of an unsharded weights file.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One memory-mapped safetensors file, header parsed and validated.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    metadata: Metadata,
    names: Vec<String>,
}

impl SafetensorsFile {
    /// Map `path` and parse its header. The parser checks that every tensor's offsets agree
    /// with its dtype and shape and that the data exactly fills the file, so a truncated file
    /// fails here rather than when a tensor is read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| ModelError::Read {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the map is read-only, and checkpoints are not modified while we hold them
        // (the same assumption transformers and candle make); writers here always write new
        // files and rename, never rewrite in place.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Read {
            path: path.clone(),
            source,
        })?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|source| ModelError::Safetensors {
                path: path.clone(),
                source,
            })?;
        let names = metadata.offset_keys();
        Ok(Self {
            path,
            mmap,
            data_start: 8 + header_len,
            metadata,
            names,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in storage order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when the file holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The header's `__metadata__` map (transformers writes `{"format": "pt"}`).
    pub fn header_metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.metadata().as_ref()
    }

    /// A view of tensor `name`, borrowing the mapped bytes.
    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        let info = self.metadata.info(name)?;
        let (start, end) = info.data_offsets;
        // Offsets were validated against the file size at open; `get` keeps this panic-free.
        let data = self
            .mmap
            .get(self.data_start + start..self.data_start + end)?;
        TensorView::new(info.dtype, info.shape.clone(), data).ok()
    }

    /// Drop tensor `name`'s pages from this process's resident memory once it has been used
    /// (they are read from the file again if touched later). Without this, every tensor read
    /// through the map stays resident until the kernel needs the memory, and a one-pass
    /// conversion looks (to `ps`, `time -v`, cgroups) as if it held the whole input. Best effort.
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        if let Some(info) = self.metadata.info(name) {
            let (start, end) = info.data_offsets;
            // Pages shared with neighbouring tensors are dropped too; that only costs a re-read.
            // SAFETY: the map is a read-only MAP_SHARED mapping of a file we never modify, so
            // MADV_DONTNEED cannot change what any live borrow reads: a later access faults the
            // same bytes back in from the file. The range is within the map (validated at open).
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    self.data_start + start,
                    end - start,
                )
            };
        }
        #[cfg(not(unix))]
        let _ = name;
    }
}

#[derive(Deserialize)]
struct IndexJson {
    weight_map: BTreeMap<String, String>,
}

/// The safetensors weights of a model folder, single-file or sharded.
#[derive(Debug)]
pub struct SafetensorsDir {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Tensor name -> index into `files`.
    location: HashMap<String, usize>,
    /// Every tensor, file by file, each file in storage order.
    order: Vec<String>,
}

impl SafetensorsDir {
    /// Open the weights of the model folder `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(ModelError::Missing {
                path: dir,
                hint: "expected a Hugging Face model folder (config.json + model.safetensors)",
            });
        }
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        if single.is_file() {
            let file = SafetensorsFile::open(&single)?;
            Ok(Self::from_files(dir, vec![file], None))
        } else if index.is_file() {
            Self::open_sharded(dir, &index)
        } else {
            Err(ModelError::Missing {
                path: single,
                hint: "the folder has no weights: expected model.safetensors, or \
                       model.safetensors.index.json and the shards it lists",
            })
        }
    }

    /// Treat one safetensors file (an adapter, a reference file) like a folder's weights.
    pub fn open_file(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let file = SafetensorsFile::open(path)?;
        let dir = file.path().to_path_buf();
        Ok(Self::from_files(dir, vec![file], None))
    }

    fn open_sharded(dir: PathBuf, index_path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read(index_path).map_err(|source| ModelError::Read {
            path: index_path.to_path_buf(),
            source,
        })?;
        let index: IndexJson =
            serde_json::from_slice(&text).map_err(|source| ModelError::Json {
                path: index_path.to_path_buf(),
                source,
            })?;
        let invalid = |what: String| ModelError::Invalid {
            path: index_path.to_path_buf(),
            what,
        };
        let shard_names: BTreeSet<&str> = index.weight_map.values().map(String::as_str).collect();
        let mut files = Vec::with_capacity(shard_names.len());
        let mut file_of_shard = HashMap::new();
        for shard in shard_names {
            let plain = {
                let mut c = Path::new(shard).components();
                matches!((c.next(), c.next()), (Some(Component::Normal(_)), None))
            };
            if !plain {
                return Err(invalid(format!(
                    "shard `{shard}` is not a file name inside the model folder"
                )));
            }
            let path = dir.join(shard);
            if !path.is_file() {
                return Err(ModelError::Missing {
                    path,
                    hint: "model.safetensors.index.json lists this shard",
                });
            }
            file_of_shard.insert(shard, files.len());
            files.push(SafetensorsFile::open(&path)?);
        }
        let mut location = HashMap::with_capacity(index.weight_map.len());
        for (name, shard) in &index.weight_map {
            let i = file_of_shard[shard.as_str()];
            if files[i].get(name).is_none() {
                return Err(invalid(format!(
                    "lists tensor `{name}` in {shard}, which does not contain it"
                )));
            }
            location.insert(name.clone(), i);
        }
        Ok(Self::from_files(dir, files, Some(location)))
    }

    /// `location` restricts the tensors to those an index lists; `None` takes every tensor.
    fn from_files(
        dir: PathBuf,
        files: Vec<SafetensorsFile>,
        location: Option<HashMap<String, usize>>,
    ) -> Self {
        let location = location.unwrap_or_else(|| {
            files
                .iter()
                .enumerate()
                .flat_map(|(i, f)| f.names().map(move |n| (n.to_string(), i)))
                .collect()
        });
        let owner = &location;
        let order = files
            .iter()
            .enumerate()
            .flat_map(|(i, f)| f.names().filter(move |n| owner.get(*n) == Some(&i)))
            .map(str::to_string)
            .collect();
        Self {
            dir,
            files,
            location,
            order,
        }
    }

    /// The folder (or file) this was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The mapped files, in shard order.
    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }

    /// Tensor names, file by file in storage order (the order that reads the mapped files
    /// sequentially).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(String::as_str)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// True when there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// True if tensor `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// The file holding tensor `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.location.get(name).map(|&i| self.files[i].path())
    }

    /// Total bytes of tensor data.
    pub fn tensor_bytes(&self) -> u64 {
        self.names()
            .filter_map(|n| self.get(n))
            .map(|v| v.data().len() as u64)
            .sum()
    }

    /// A view of tensor `name`, if present.
    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        self.files[*self.location.get(name)?].get(name)
    }

    /// Drop tensor `name`'s mapped pages from resident memory (see [`SafetensorsFile::release`]).
    pub fn release(&self, name: &str) {
        if let Some(&i) = self.location.get(name) {
            self.files[i].release(name);
        }
    }

    /// A view of tensor `name`; an error naming the folder if it is absent.
    pub fn view(&self, name: &str) -> Result<TensorView<'_>, ModelError> {
        self.get(name).ok_or_else(|| ModelError::TensorNotFound {
            name: name.to_string(),
            dir: self.dir.clone(),
        })
    }

    /// Tensor `name` widened to f32 (flat, row-major). F32, BF16, F16 and F64 are accepted.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        let view = self.view(name)?;
        decode_f32(view.dtype(), view.data()).ok_or_else(|| {
            self.tensor_error(
                name,
                format!(
                    "dtype {} cannot be read as floats (F32, BF16, F16 or F64)",
                    view.dtype()
                ),
            )
        })
    }

    /// Tensor `name` as a candle tensor of its stored dtype on `device`.
    pub fn read_tensor(&self, name: &str, device: &Device) -> Result<Tensor, ModelError> {
        self.view(name)?
            .load(device)
            .map_err(|e| self.tensor_error(name, e.to_string()))
    }

    /// The 4-bit weight stored in bitsandbytes layout under `prefix` (e.g.
    /// `model.layers.0.self_attn.q_proj.weight`), every field validated.
    pub fn read_nf4(&self, prefix: &str) -> Result<Nf4Tensor, ModelError> {
        Nf4Tensor::from_bnb(prefix, |name| self.get(name)).map_err(|source| ModelError::Nf4 {
            prefix: prefix.to_string(),
            dir: self.dir.clone(),
            source: Box::new(source),
        })
    }

    /// A [`ModelError::Tensor`] about `name`, naming its file.
    pub fn tensor_error(&self, name: &str, what: String) -> ModelError {
        ModelError::Tensor {
            name: name.to_string(),
            path: self.file_of(name).unwrap_or(&self.dir).to_path_buf(),
            what,
        }
    }
}

/// Little-endian `bytes` of `dtype` widened to f32; `None` for non-float dtypes.
fn decode_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let out = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                f64::from_le_bytes(b) as f32
            })
            .collect(),
        _ => return None,
    };
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
    }

    #[test]
    fn reads_the_tiny_model() {
        let st = SafetensorsDir::open(tiny()).unwrap();
        assert_eq!(st.len(), 21);
        assert_eq!(st.names().next(), Some("lm_head.weight"));
        let name = "model.layers.0.self_attn.k_proj.weight";
        let v = st.view(name).unwrap();
        assert_eq!(v.shape(), &[32, 64]);
        let w = st.read_f32(name).unwrap();
        assert_eq!(w.len(), 32 * 64);
        let t = st.read_tensor(name, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[32, 64]);
        assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), w);
        assert_eq!(
            st.files()[0]
                .header_metadata()
                .and_then(|m| m.get("format")),
            Some(&"pt".to_string())
        );
        let err = st.view("nope").unwrap_err().to_string();
        assert!(
            err.contains("`nope`") && err.contains("tiny-llama"),
            "{err}"
        );
    }

    #[test]
    fn decodes_half_precision() {
        let bf = half::bf16::from_f32(1.5).to_le_bytes();
        let f = half::f16::from_f32(-2.25).to_le_bytes();
        assert_eq!(decode_f32(Dtype::BF16, &bf), Some(vec![1.5]));
        assert_eq!(decode_f32(Dtype::F16, &f), Some(vec![-2.25]));
        assert_eq!(decode_f32(Dtype::I32, &[0; 4]), None);
    }

    #[test]
    fn missing_weights_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = SafetensorsDir::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("model.safetensors"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
    }
}
