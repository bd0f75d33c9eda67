//! Models and datasets named as the Hugging Face hub names them (`org/name`,
//! `org/name@revision`), found in the local hub cache that transformers, `datasets` and
//! `huggingface_hub` share, and downloaded into that same cache when missing.
//!
//! The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`,
//! else `~/.cache/huggingface/hub`; a repository lives in `models--{org}--{name}/` (datasets in
//! `datasets--{org}--{name}/`), its files under `snapshots/{commit}/` as links into `blobs/`,
//! and `refs/{branch}` holds the commit a branch or tag points to.
//!
//! A name found in the cache with the files a run needs is used offline, without asking the hub.
//! Otherwise the files are downloaded with the `hf-hub` client from `$HF_ENDPOINT` (default
//! `https://huggingface.co`), authenticated by `$HF_TOKEN` or the token file `huggingface-cli
//! login` writes; `HF_HUB_OFFLINE=1` forbids downloading. A download goes to a `.part` file
//! beside its blob, which a later run resumes; a file whose hub etag is a sha256 (every LFS
//! file: weights, parquet shards) is checked against it, and removed when it does not match.
//!
//! This module reads the hub's layout only and imports nothing else of the crate.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Repo, RepoType};
use sha2::{Digest, Sha256};

/// What can go wrong finding or downloading a hub repository.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The argument is not of the form `org/name[@revision]`.
    #[error("`{0}` is not a hub name (org/name[@revision])")]
    NotAName(String),
    /// No cache folder could be chosen.
    #[error("`{0}` is not a local path, and no Hugging Face cache folder is known (set HF_HOME)")]
    NoCache(String),
    /// `HF_HUB_OFFLINE` is set and the cache lacks what is needed.
    #[error(
        "`{name}` is not usable from the Hugging Face cache ({what}) and HF_HUB_OFFLINE is set, \
         so nothing is downloaded; unset it to download, or give a local folder"
    )]
    Offline {
        /// The hub name.
        name: String,
        /// What the cache lacks.
        what: String,
    },
    /// HTTP 401/403: gated or private.
    #[error(
        "`{name}`: {url} answered HTTP {status}: the repository is gated or private; accept its \
         terms on the hub and set HF_TOKEN (or run `huggingface-cli login`){token}"
    )]
    Unauthorized {
        /// The hub name.
        name: String,
        /// The file's URL.
        url: String,
        /// 401 or 403.
        status: u16,
        /// Whether a token was sent, in words.
        token: &'static str,
    },
    /// HTTP 404: no such repository, revision or file.
    #[error(
        "`{name}`: {url} does not exist (HTTP 404): check the name, the revision and the file"
    )]
    NotFound {
        /// The hub name.
        name: String,
        /// The file's URL.
        url: String,
    },
    /// The repository has no weights this tool reads.
    #[error("`{name}` has no safetensors weights on the hub (model.safetensors or model.safetensors.index.json); this tool does not read pytorch_model.bin")]
    NoWeights {
        /// The hub name.
        name: String,
    },
    /// The dataset has no file of the split.
    #[error("`{name}` has no {split} split in parquet or JSON Lines files ({found})")]
    NoSplit {
        /// The hub name.
        name: String,
        /// The split asked for.
        split: String,
        /// What the repository holds, in words.
        found: String,
    },
    /// Any other failure talking to the hub.
    #[error(
        "`{name}`: downloading {file} from {endpoint} failed: {what} (run again to resume; set \
         HF_HUB_OFFLINE=1 to use only the cache)"
    )]
    Download {
        /// The hub name.
        name: String,
        /// The file.
        file: String,
        /// The endpoint.
        endpoint: String,
        /// What happened.
        what: String,
    },
    /// A downloaded file does not hash to its etag.
    #[error(
        "`{name}`: {file} from {endpoint} does not match its sha256 {expected} (got {got}); the \
         corrupt copy is removed, run again to download it anew"
    )]
    Checksum {
        /// The hub name.
        name: String,
        /// The file.
        file: String,
        /// The endpoint.
        endpoint: String,
        /// sha256 the hub announced.
        expected: String,
        /// sha256 of what arrived.
        got: String,
    },
    /// A file in the cache could not be read.
    #[error("{path}: {what}")]
    Cache {
        /// The file or folder.
        path: PathBuf,
        /// What went wrong.
        what: String,
    },
}

/// A model or a dataset repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `models--org--name`.
    Model,
    /// `datasets--org--name`.
    Dataset,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Model => "models",
            Kind::Dataset => "datasets",
        }
    }
}

/// `org/name[@revision]`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubName {
    /// `org/name`.
    pub repo: String,
    /// Branch, tag or commit (`main` when not given).
    pub revision: String,
}

impl HubName {
    /// The parts of `org/name[@revision]`, or `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        let (repo, rev) = match s.split_once('@') {
            Some((r, v)) if !v.is_empty() => (r, v),
            Some(_) => return None,
            None => (s, "main"),
        };
        let (org, name) = repo.split_once('/')?;
        let ok = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        let rev_ok = rev
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
            && !rev.split('/').any(|p| p.is_empty() || p == "..");
        (ok(org) && ok(name) && rev_ok).then(|| Self {
            repo: repo.to_string(),
            revision: rev.to_string(),
        })
    }

    fn folder(&self, kind: Kind) -> String {
        format!("{}--{}", kind.prefix(), self.repo.replace('/', "--"))
    }
}

impl std::fmt::Display for HubName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.revision == "main" {
            write!(f, "{}", self.repo)
        } else {
            write!(f, "{}@{}", self.repo, self.revision)
        }
    }
}

/// The hub cache folder, as `huggingface_hub` chooses it.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = env_path("HF_HUB_CACHE") {
        return Some(d);
    }
    hf_home().map(|h| h.join("hub"))
}

fn env_path(k: &str) -> Option<PathBuf> {
    std::env::var_os(k)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
fn hf_home() -> Option<PathBuf> {
    if let Some(d) = env_path("HF_HOME") {
        return Some(d);
    }
    if let Some(d) = env_path("XDG_CACHE_HOME") {
        return Some(d.join("huggingface"));
    }
    env_path("HOME").map(|h| h.join(".cache").join("huggingface"))
}

/// Whether an environment flag is set the way `huggingface_hub` reads one (1, ON, YES, TRUE).
fn env_flag(k: &str) -> bool {
    std::env::var(k).is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_uppercase().as_str(),
            "1" | "ON" | "YES" | "TRUE"
        )
    })
}

/// Which files of a model repository a command needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFiles {
    /// Config, generation config, tokenizer and the safetensors weights (every shard).
    Full,
    /// `config.json` alone (the memory plan).
    ConfigOnly,
}

/// Optional files of a model: downloaded when the repository has them.
const MODEL_EXTRAS: [&str; 4] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];
const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";

/// Where and how the hub is reached.
#[derive(Clone, Debug)]
pub struct Hub {
    /// The cache folder (`…/huggingface/hub`).
    pub cache: PathBuf,
    /// Base URL of the hub.
    pub endpoint: String,
    /// Bearer token, if any.
    pub token: Option<String>,
    /// Never download.
    pub offline: bool,
    /// Draw download progress bars (on a terminal).
    pub progress: bool,
}

impl Hub {
    /// The hub as the environment configures it, or `None` when no cache folder is known.
    pub fn from_env() -> Option<Self> {
        let cache = cache_dir()?;
        let token = std::env::var("HF_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .or_else(|| {
                let file =
                    env_path("HF_TOKEN_PATH").or_else(|| hf_home().map(|h| h.join("token")))?;
                let t = std::fs::read_to_string(file).ok()?;
                Some(t.trim().to_string()).filter(|t| !t.is_empty())
            });
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| "https://huggingface.co".into());
        Some(Self {
            cache,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            offline: env_flag("HF_HUB_OFFLINE"),
            progress: true,
        })
    }

    /// The snapshot folder of `name` in the cache, if the cache has one for its revision.
    pub fn cached_snapshot(&self, name: &HubName, kind: Kind) -> Result<PathBuf, String> {
        let repo = self.cache.join(name.folder(kind));
        if !repo.is_dir() {
            return Err(format!(
                "{} has no {}",
                self.cache.display(),
                name.folder(kind)
            ));
        }
        let refs = repo.join("refs").join(&name.revision);
        let commit = if refs.is_file() {
            std::fs::read_to_string(&refs)
                .map_err(|e| format!("{}: {e}", refs.display()))?
                .trim()
                .to_string()
        } else {
            name.revision.clone()
        };
        let snapshot = repo.join("snapshots").join(&commit);
        if !snapshot.is_dir() {
            return Err(format!(
                "no snapshot for revision `{}` ({} is missing)",
                name.revision,
                snapshot.display()
            ));
        }
        Ok(snapshot)
    }

    /// The snapshot folder of model `name` holding `files`: from the cache when it has them,
    /// else downloaded.
    pub fn model(&self, name: &HubName, files: ModelFiles) -> Result<PathBuf, HubError> {
        let cached = self.cached_snapshot(name, Kind::Model).and_then(|snap| {
            match missing_model_files(&snap, files) {
                None => Ok(snap),
                Some(what) => Err(what),
            }
        });
        let what = match cached {
            Ok(snap) => return Ok(snap),
            Err(what) => what,
        };
        let (client, repo) = self.open_repo(name, RepoType::Model, what)?;
        let config = client.get(&repo, "config.json")?;
        let snapshot = config
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| HubError::Cache {
                path: config.clone(),
                what: "a downloaded file has no folder".into(),
            })?;
        if files == ModelFiles::ConfigOnly {
            return Ok(snapshot);
        }
        for extra in MODEL_EXTRAS {
            match client.get(&repo, extra) {
                Ok(_) | Err(HubError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        match client.get(&repo, INDEX) {
            Ok(index) => {
                for shard in index_shards(&index)? {
                    client.get(&repo, &shard)?;
                }
            }
            Err(HubError::NotFound { .. }) => match client.get(&repo, SINGLE) {
                Err(HubError::NotFound { .. }) => {
                    return Err(HubError::NoWeights {
                        name: name.to_string(),
                    })
                }
                r => {
                    r?;
                }
            },
            Err(e) => return Err(e),
        }
        Ok(snapshot)
    }

    /// The files of `split` of dataset `name` (parquet or JSON Lines, named as the hub's
    /// datasets name splits): from the cache when it has any, else downloaded.
    pub fn dataset(&self, name: &HubName, split: &str) -> Result<Vec<PathBuf>, HubError> {
        let cached = self.cached_snapshot(name, Kind::Dataset).and_then(|snap| {
            let files = split_files(&snap, split).map_err(|e| e.to_string())?;
            if files.is_empty() {
                Err(format!("{} has no {split} files", snap.display()))
            } else {
                Ok(files)
            }
        });
        let what = match cached {
            Ok(files) => return Ok(files),
            Err(what) => what,
        };
        let (client, repo) = self.open_repo(name, RepoType::Dataset, what)?;
        let info = repo
            .info()
            .map_err(|e| client.error(&format!("the file list of {name}"), e))?;
        let listed: Vec<PathBuf> = info
            .siblings
            .iter()
            .map(|s| PathBuf::from(&s.rfilename))
            .collect();
        let wanted: Vec<&PathBuf> = listed
            .iter()
            .filter(|p| is_data_file(p) && split_of(p).as_deref() == Some(split))
            .collect();
        if wanted.is_empty() {
            let splits: BTreeSet<String> = listed.iter().filter_map(|p| split_of(p)).collect();
            return Err(HubError::NoSplit {
                name: name.to_string(),
                split: split.to_string(),
                found: if splits.is_empty() {
                    "no data files".into()
                } else {
                    format!(
                        "splits: {}",
                        splits.into_iter().collect::<Vec<_>>().join(", ")
                    )
                },
            });
        }
        let mut out = Vec::new();
        for p in wanted {
            out.push(client.get(&repo, &p.to_string_lossy())?);
        }
        out.sort();
        Ok(out)
    }

    /// The client and repository handle to download `name` with; offline, the cache's miss
    /// (`what`) is the error instead.
    fn open_repo(
        &self,
        name: &HubName,
        kind: RepoType,
        what: String,
    ) -> Result<(Client<'_>, hf_hub::api::sync::ApiRepo), HubError> {
        if self.offline {
            return Err(HubError::Offline {
                name: name.to_string(),
                what,
            });
        }
        let client = self.client(name)?;
        let repo = client.api.repo(Repo::with_revision(
            name.repo.clone(),
            kind,
            name.revision.clone(),
        ));
        Ok((client, repo))
    }

    fn client<'a>(&'a self, name: &HubName) -> Result<Client<'a>, HubError> {
        let api = ApiBuilder::new()
            .with_cache_dir(self.cache.clone())
            .with_endpoint(self.endpoint.clone())
            .with_token(self.token.clone())
            .with_progress(self.progress)
            .with_user_agent("qlora", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|e| HubError::Download {
                name: name.to_string(),
                file: "-".into(),
                endpoint: self.endpoint.clone(),
                what: e.to_string(),
            })?;
        Ok(Client {
            hub: self,
            name: name.to_string(),
            api,
        })
    }
}

struct Client<'a> {
    hub: &'a Hub,
    name: String,
    api: Api,
}

impl Client<'_> {
    /// Download `file` (resuming a `.part` left by an interrupted run) and check its sha256.
    fn get(&self, repo: &hf_hub::api::sync::ApiRepo, file: &str) -> Result<PathBuf, HubError> {
        let path = repo.download(file).map_err(|e| self.error(file, e))?;
        self.verify(file, &path)?;
        Ok(path)
    }

    /// Check a downloaded file against its blob name, when that is a sha256 (LFS files).
    fn verify(&self, file: &str, path: &Path) -> Result<(), HubError> {
        let blob = std::fs::canonicalize(path).map_err(|e| HubError::Cache {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
        let Some(expected) = blob
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_ascii_lowercase)
        else {
            return Ok(());
        };
        let mut hasher = Sha256::new();
        let mut f = std::fs::File::open(&blob).map_err(|e| HubError::Cache {
            path: blob.clone(),
            what: e.to_string(),
        })?;
        std::io::copy(&mut f, &mut hasher).map_err(|e| HubError::Cache {
            path: blob.clone(),
            what: e.to_string(),
        })?;
        let got: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if got == expected {
            return Ok(());
        }
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(&blob);
        Err(HubError::Checksum {
            name: self.name.clone(),
            file: file.to_string(),
            endpoint: self.hub.endpoint.clone(),
            expected,
            got,
        })
    }

    fn error(&self, file: &str, e: ApiError) -> HubError {
        let url = |resp: &ureq::Response| resp.get_url().to_string();
        match e {
            ApiError::RequestError(boxed) => match *boxed {
                ureq::Error::Status(status @ (401 | 403), resp) => HubError::Unauthorized {
                    name: self.name.clone(),
                    url: url(&resp),
                    status,
                    token: if self.hub.token.is_some() {
                        " (a token was sent and refused)"
                    } else {
                        " (no token was sent)"
                    },
                },
                ureq::Error::Status(404, resp) => HubError::NotFound {
                    name: self.name.clone(),
                    url: url(&resp),
                },
                ureq::Error::Status(status, resp) => HubError::Download {
                    name: self.name.clone(),
                    file: file.to_string(),
                    endpoint: self.hub.endpoint.clone(),
                    what: format!("{} answered HTTP {status}", url(&resp)),
                },
                ureq::Error::Transport(t) => HubError::Download {
                    name: self.name.clone(),
                    file: file.to_string(),
                    endpoint: self.hub.endpoint.clone(),
                    what: t.to_string(),
                },
            },
            ApiError::InvalidResume => HubError::Download {
                name: self.name.clone(),
                file: file.to_string(),
                endpoint: self.hub.endpoint.clone(),
                what: "the partial download in the cache is longer than the file (delete the \
                       `.part` file in the repository's blobs folder)"
                    .into(),
            },
            other => HubError::Download {
                name: self.name.clone(),
                file: file.to_string(),
                endpoint: self.hub.endpoint.clone(),
                what: other.to_string(),
            },
        }
    }
}

/// What a snapshot lacks of `files`, in words, or `None` when it has everything.
fn missing_model_files(snap: &Path, files: ModelFiles) -> Option<String> {
    if !snap.join("config.json").is_file() {
        return Some(format!("{} has no config.json", snap.display()));
    }
    if files == ModelFiles::ConfigOnly {
        return None;
    }
    let index = snap.join(INDEX);
    if index.is_file() {
        let shards = match index_shards(&index) {
            Ok(s) => s,
            Err(e) => return Some(e.to_string()),
        };
        let missing: Vec<String> = shards
            .into_iter()
            .filter(|s| !snap.join(s).is_file())
            .collect();
        return (!missing.is_empty())
            .then(|| format!("{} lacks the shards {}", snap.display(), missing.join(", ")));
    }
    (!snap.join(SINGLE).is_file())
        .then(|| format!("{} has neither {SINGLE} nor {INDEX}", snap.display()))
}

/// The shard files an index's `weight_map` names, each once, in order.
fn index_shards(index: &Path) -> Result<Vec<String>, HubError> {
    let bad = |what: String| HubError::Cache {
        path: index.to_path_buf(),
        what,
    };
    let text = std::fs::read_to_string(index).map_err(|e| bad(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let f = file
            .as_str()
            .filter(|f| {
                !f.is_empty()
                    && !f.starts_with('/')
                    && !Path::new(f)
                        .components()
                        .any(|c| matches!(c, std::path::Component::ParentDir))
            })
            .ok_or_else(|| bad(format!("`weight_map.{tensor}` is not a file name: {file}")))?;
        shards.insert(f.to_string());
    }
    if shards.is_empty() {
        return Err(bad("`weight_map` is empty".into()));
    }
    Ok(shards.into_iter().collect())
}

/// Whether `p` is a data file the loaders read (parquet or JSON Lines).
pub fn is_data_file(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        ["parquet", "jsonl"]
            .iter()
            .any(|x| e.eq_ignore_ascii_case(x))
    })
}

/// The split a data file belongs to by the hub's naming: a folder named after the split
/// (`train/0000.parquet`) or a file name starting with it (`train-00000-of-00002.parquet`,
/// `test.jsonl`).
pub fn split_of(p: &Path) -> Option<String> {
    const SPLITS: [&str; 5] = ["train", "validation", "valid", "dev", "test"];
    let stem = p.file_stem()?.to_str()?;
    let head = stem
        .split(['-', '_', '.'])
        .next()
        .unwrap_or(stem)
        .to_ascii_lowercase();
    if SPLITS.contains(&head.as_str()) {
        return Some(head);
    }
    p.parent()?
        .components()
        .rev()
        .filter_map(|c| c.as_os_str().to_str())
        .map(str::to_ascii_lowercase)
        .find(|c| SPLITS.contains(&c.as_str()))
}

/// Data files under `dir` (recursively, sorted), skipping hidden folders.
pub fn data_files_under(dir: &Path) -> Result<Vec<PathBuf>, HubError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| HubError::Cache {
            path: d.clone(),
            what: e.to_string(),
        })?;
        for entry in entries {
            let entry = entry.map_err(|e| HubError::Cache {
                path: d.clone(),
                what: e.to_string(),
            })?;
            let p = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if is_data_file(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The data files of `split` under `dir`, by the hub's split naming.
pub fn split_files(dir: &Path, split: &str) -> Result<Vec<PathBuf>, HubError> {
    Ok(data_files_under(dir)?
        .into_iter()
        .filter(|p| {
            p.strip_prefix(dir)
                .ok()
                .and_then(split_of)
                .is_some_and(|s| s == split)
        })
        .collect())
}

/// A `--model` argument: an existing path as given, else a hub name, from the cache or
/// downloaded (config, tokenizer and weights).
pub fn model_path(s: &str) -> Result<PathBuf, HubError> {
    model_path_with(s, ModelFiles::Full)
}

/// A `--model` argument whose config alone is needed (the memory plan).
pub fn model_config_path(s: &str) -> Result<PathBuf, HubError> {
    model_path_with(s, ModelFiles::ConfigOnly)
}

fn model_path_with(s: &str, files: ModelFiles) -> Result<PathBuf, HubError> {
    let p = PathBuf::from(s);
    let Some(name) = HubName::parse(s).filter(|_| !p.exists()) else {
        return Ok(p);
    };
    let hub = Hub::from_env().ok_or_else(|| HubError::NoCache(s.to_string()))?;
    hub.model(&name, files)
}

/// A `--data` argument: an existing path as given; else `org/name[@revision][:split]`, a hub
/// dataset (split `train` unless named), from the cache or downloaded, given as the path of its
/// split: `SNAPSHOT/{split}` for the data loaders to pick the split's files.
pub fn data_path(s: &str) -> Result<PathBuf, HubError> {
    let p = PathBuf::from(s);
    if p.exists() {
        return Ok(p);
    }
    let (name, split) = match s.rsplit_once(':') {
        Some((n, split)) if !split.is_empty() && !split.contains('/') => (n, split),
        _ => (s, "train"),
    };
    let Some(hub_name) = HubName::parse(name) else {
        return Ok(p);
    };
    let hub = Hub::from_env().ok_or_else(|| HubError::NoCache(s.to_string()))?;
    let files = hub.dataset(&hub_name, split)?;
    let snapshot = hub
        .cached_snapshot(&hub_name, Kind::Dataset)
        .map_err(|what| HubError::Cache {
            path: hub.cache.clone(),
            what,
        })?;
    debug_assert!(files.iter().all(|f| f.starts_with(&snapshot)));
    Ok(snapshot.join(split))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub_at(cache: &Path) -> Hub {
        Hub {
            cache: cache.to_path_buf(),
            endpoint: "http://127.0.0.1:9".into(),
            token: None,
            offline: true,
            progress: false,
        }
    }

    fn fake_cache() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("models--org--tiny");
        for commit in ["c0ffee", "beef42"] {
            let snap = repo.join("snapshots").join(commit);
            std::fs::create_dir_all(&snap).unwrap();
            std::fs::write(snap.join("config.json"), commit).unwrap();
            std::fs::write(snap.join("model.safetensors"), commit).unwrap();
        }
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "c0ffee\n").unwrap();
        std::fs::write(repo.join("refs/v1"), "beef42").unwrap();
        tmp
    }

    #[test]
    fn names_resolve_to_snapshots_by_branch_tag_or_commit() {
        let c = fake_cache();
        let hub = hub_at(c.path());
        let snap = |s: &str| {
            hub.model(&HubName::parse(s).unwrap(), ModelFiles::Full)
                .unwrap()
        };
        assert!(snap("org/tiny").ends_with("snapshots/c0ffee"));
        assert!(snap("org/tiny@main").ends_with("snapshots/c0ffee"));
        assert!(snap("org/tiny@v1").ends_with("snapshots/beef42"));
        assert!(snap("org/tiny@beef42").ends_with("snapshots/beef42"));
        let e = hub
            .model(&HubName::parse("org/other").unwrap(), ModelFiles::Full)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("models--org--other") && e.contains("HF_HUB_OFFLINE"),
            "{e}"
        );
        let e = hub
            .model(&HubName::parse("org/tiny@nope").unwrap(), ModelFiles::Full)
            .unwrap_err()
            .to_string();
        assert!(e.contains("revision `nope`"), "{e}");
    }

    #[test]
    fn a_snapshot_missing_a_shard_is_not_used_offline() {
        let c = fake_cache();
        let snap = c.path().join("models--org--tiny/snapshots/c0ffee");
        std::fs::remove_file(snap.join("model.safetensors")).unwrap();
        std::fs::write(
            snap.join(INDEX),
            r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(snap.join("model-00001-of-00002.safetensors"), "x").unwrap();
        let hub = hub_at(c.path());
        let name = HubName::parse("org/tiny").unwrap();
        let e = hub.model(&name, ModelFiles::Full).unwrap_err().to_string();
        assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
        // The plan needs the config alone, which is there.
        assert!(hub.model(&name, ModelFiles::ConfigOnly).is_ok());
    }

    #[test]
    fn only_hub_shaped_names_are_looked_up() {
        let p = |s: &str| HubName::parse(s).map(|n| (n.repo, n.revision));
        assert_eq!(p("org/name@rev"), Some(("org/name".into(), "rev".into())));
        assert_eq!(p("org/name"), Some(("org/name".into(), "main".into())));
        assert_eq!(
            p("org/name@refs/pr/1"),
            Some(("org/name".into(), "refs/pr/1".into()))
        );
        for s in [
            "name",
            "a/b/c",
            "/abs/path",
            "./x",
            "../x/y",
            "org/",
            "org/name@",
            "x y/z",
            "org/name@../../x",
        ] {
            assert_eq!(p(s), None, "{s}");
        }
        // An existing path wins over a hub lookup.
        let tmp = tempfile::tempdir().unwrap();
        let here = tmp.path().to_str().unwrap();
        assert_eq!(model_path(here).unwrap(), PathBuf::from(here));
    }

    #[test]
    fn splits_follow_the_hubs_file_naming() {
        let s = |p: &str| split_of(Path::new(p));
        assert_eq!(
            s("data/train-00000-of-00002.parquet").as_deref(),
            Some("train")
        );
        assert_eq!(s("test.jsonl").as_deref(), Some("test"));
        assert_eq!(
            s("default/validation/0000.parquet").as_deref(),
            Some("validation")
        );
        assert_eq!(s("data/shard-0.parquet"), None);
    }
}
