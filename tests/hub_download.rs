//! Models and datasets named `org/name` are downloaded through the `hf-hub` client into the
//! Hugging Face cache layout, from a local HTTP server that serves the hub's URL layout
//! (`/{org}/{name}/resolve/{revision}/{file}` with `ETag`, `X-Repo-Commit` and byte ranges,
//! `/api/datasets/{org}/{name}/revision/{revision}` for a dataset's file list), pointed at by
//! `HF_ENDPOINT` exactly as the real hub would be: a sharded model with its index, a dataset by
//! split, a download cut mid-file and resumed, gated (401) and missing (404) repositories, a file
//! that does not match its sha256, and offline mode with nothing cached.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::{arg, fixtures};
use qlora::hub::{Hub, HubError, HubName, ModelFiles};
use sha2::{Digest, Sha256};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const TOKEN: &str = "hf_test_token";

struct Served {
    body: Vec<u8>,
    etag: String,
}

/// What the server serves and what it was asked.
#[derive(Default)]
struct State {
    /// URL path → file.
    files: HashMap<String, Served>,
    /// URL path → JSON body (the API's repository info).
    listings: HashMap<String, String>,
    /// URL path prefixes that need `Authorization: Bearer TOKEN`.
    gated: Vec<String>,
    /// URL path → bytes of the body sent before the connection is cut (once).
    cut_once: HashMap<String, usize>,
    /// (URL path, Range header) of every request.
    log: Vec<(String, Option<String>)>,
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl State {
    /// Serve `body` as `file` of repository `repo` (`org/name` or `datasets/org/name`) at `main`;
    /// weights and data have their sha256 as etag (LFS files), other files a git-style one.
    fn add(&mut self, repo: &str, file: &str, body: Vec<u8>) {
        let sha = sha256(&body);
        let lfs = file.ends_with(".safetensors") || file.ends_with(".parquet");
        let etag = if lfs { sha } else { sha[..40].to_string() };
        self.files.insert(
            format!("/{repo}/resolve/main/{file}"),
            Served { body, etag },
        );
    }
}

/// Start the server on a free port; returns its base URL.
fn serve(state: Arc<Mutex<State>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(stream) = conn else { continue };
            let state = state.clone();
            std::thread::spawn(move || handle(stream, &state));
        }
    });
    format!("http://{addr}")
}

fn respond(s: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
}

fn handle(mut s: TcpStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let range = headers.get("range").cloned();
    let mut st = state.lock().unwrap();
    st.log.push((path.clone(), range.clone()));
    let authorized = headers.get("authorization") == Some(&format!("Bearer {TOKEN}"));
    if !authorized && st.gated.iter().any(|g| path.starts_with(g.as_str())) {
        let body = b"Access to this model is restricted.";
        let hs = [
            ("Content-Length", body.len().to_string()),
            ("X-Error-Code", "GatedRepo".into()),
        ];
        return respond(&mut s, "401 Unauthorized", &hs, body);
    }
    if let Some(json) = st.listings.get(&path) {
        let hs = [
            ("Content-Length", json.len().to_string()),
            ("Content-Type", "application/json".into()),
        ];
        return respond(&mut s, "200 OK", &hs, json.clone().as_bytes());
    }
    let Some(file) = st.files.get(&path) else {
        let body = b"Entry not found";
        let hs = [
            ("Content-Length", body.len().to_string()),
            ("X-Error-Code", "EntryNotFound".into()),
        ];
        return respond(&mut s, "404 Not Found", &hs, body);
    };
    let len = file.body.len();
    let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap();
            let a: usize = a.parse().unwrap();
            let b = if b.is_empty() {
                len - 1
            } else {
                b.parse::<usize>().unwrap().min(len - 1)
            };
            (a, b)
        }
        None => (0, len - 1),
    };
    let body = file.body[start..=end].to_vec();
    let hs = [
        ("Content-Length", body.len().to_string()),
        ("Content-Range", format!("bytes {start}-{end}/{len}")),
        ("ETag", format!("\"{}\"", file.etag)),
        ("X-Repo-Commit", COMMIT.into()),
    ];
    let status = if range.is_some() {
        "206 Partial Content"
    } else {
        "200 OK"
    };
    // A cut connection: the headers promise the whole body, part of it arrives.
    if let Some(&cut) = st.cut_once.get(&path) {
        if body.len() > cut {
            st.cut_once.remove(&path);
            drop(st);
            respond(&mut s, status, &hs, &body[..cut]);
            let _ = s.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
    drop(st);
    respond(&mut s, status, &hs, &body);
}

/// tiny-llama split into two safetensors shards with an index, as `save_pretrained` writes a
/// sharded model; returns the files by name.
fn sharded_tiny_llama() -> Vec<(String, Vec<u8>)> {
    let dir = fixtures().join("tiny-llama");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let half = names.len() / 2;
    let mut files = Vec::new();
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [&names[..half], &names[half..]].into_iter().enumerate() {
        let shard = format!("model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        for n in part {
            weight_map.insert(n.clone(), serde_json::Value::String(shard.clone()));
        }
        files.push((shard, safetensors::serialize(views, None).unwrap()));
    }
    let index =
        serde_json::json!({"metadata": {"total_size": bytes.len()}, "weight_map": weight_map});
    files.push((
        "model.safetensors.index.json".into(),
        serde_json::to_vec_pretty(&index).unwrap(),
    ));
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        files.push((f.into(), std::fs::read(dir.join(f)).unwrap()));
    }
    files
}

/// A server with `test-org/sharded`, the same model gated as `test-org/gated`, and the dataset
/// `test-org/sonnets` (train and test splits as parquet shards under `data/`).
fn hub_server() -> (Arc<Mutex<State>>, String) {
    let mut st = State::default();
    for (name, body) in sharded_tiny_llama() {
        st.add("test-org/sharded", &name, body.clone());
        st.add("test-org/gated", &name, body);
    }
    st.gated.push("/test-org/gated/".into());
    let text = std::fs::read(fixtures().join("parquet/text.parquet")).unwrap();
    let repo = "datasets/test-org/sonnets";
    let files = [
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
        "data/test-00000-of-00001.parquet",
    ];
    for f in files {
        st.add(repo, f, text.clone());
    }
    let siblings: Vec<serde_json::Value> = ["README.md", files[0], files[1], files[2]]
        .iter()
        .map(|f| serde_json::json!({ "rfilename": f }))
        .collect();
    st.listings.insert(
        "/api/datasets/test-org/sonnets/revision/main".into(),
        serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string(),
    );
    let state = Arc::new(Mutex::new(st));
    let url = serve(state.clone());
    (state, url)
}

fn hub(endpoint: &str, cache: &Path) -> Hub {
    Hub {
        cache: cache.to_path_buf(),
        endpoint: endpoint.to_string(),
        token: None,
        offline: false,
        progress: false,
    }
}

fn name(s: &str) -> HubName {
    HubName::parse(s).unwrap()
}

/// `qlora` with the hub's environment variables set (and any token of the machine unset).
fn qlora(
    endpoint: &str,
    cache: &Path,
    env: &[(&str, &str)],
    args: &[&str],
) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qlora"));
    cmd.args(args)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HUB_CACHE", cache)
        .env("HF_HOME", cache.join("no-home"))
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn perplexity(stdout: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    v["perplexity"].as_f64().unwrap()
}

#[test]
fn a_sharded_model_downloads_into_the_shared_cache_and_then_loads_offline() {
    let (state, url) = hub_server();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let data = fixtures().join("parquet/text.parquet");
    let eval = |model: &str, env: &[(&str, &str)]| {
        let args = [
            "eval",
            "--model",
            model,
            "--data",
            arg(&data),
            "--seq-len",
            "32",
            "--json",
        ];
        qlora(&url, &cache, env, &args)
    };
    let local = fixtures().join("tiny-llama");
    let (ok, want, e) = eval(arg(&local), &[]);
    assert!(ok, "{e}");
    let (ok, got, e) = eval("test-org/sharded", &[]);
    assert!(ok, "{e}");
    assert_eq!(
        perplexity(&got),
        perplexity(&want),
        "same model, same numbers"
    );

    // huggingface_hub's layout: refs/main → commit, snapshot files linking into blobs/.
    let repo = cache.join("models--test-org--sharded");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        COMMIT
    );
    let snap = repo.join("snapshots").join(COMMIT);
    let shard = snap.join("model-00002-of-00002.safetensors");
    let link = std::fs::read_link(&shard).expect("a snapshot file is a link into blobs/");
    assert!(link.starts_with("../../blobs"), "{}", link.display());
    let (body, etag) = {
        let st = state.lock().unwrap();
        let f = &st.files["/test-org/sharded/resolve/main/model-00002-of-00002.safetensors"];
        (f.body.clone(), f.etag.clone())
    };
    assert_eq!(std::fs::read(&shard).unwrap(), body);
    assert!(repo.join("blobs").join(&etag).is_file());
    // Only what a run needs: no README, nothing the index does not name.
    let mut got: Vec<String> = std::fs::read_dir(&snap)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            "config.json",
            "generation_config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    );

    // Cached: offline works and asks the server nothing.
    let asked = state.lock().unwrap().log.len();
    let (ok, again, e) = eval("test-org/sharded", &[("HF_HUB_OFFLINE", "1")]);
    assert!(ok, "{e}");
    assert_eq!(perplexity(&again), perplexity(&want));
    assert_eq!(state.lock().unwrap().log.len(), asked);
    // The plan reads the config alone.
    let (ok, out, e) = qlora(
        &url,
        &cache,
        &[],
        &["plan", "--model", "test-org/sharded", "--seq-len", "16"],
    );
    assert!(ok && out.contains("llama, 2 layers"), "{out}{e}");
}

#[test]
fn an_interrupted_download_resumes_and_never_leaves_a_partial_file_under_its_name() {
    let (state, url) = hub_server();
    let path = "/test-org/sharded/resolve/main/model-00002-of-00002.safetensors";
    let cut = 1000;
    state.lock().unwrap().cut_once.insert(path.into(), cut);
    let tmp = tempfile::tempdir().unwrap();
    let h = hub(&url, tmp.path());
    let e = h
        .model(&name("test-org/sharded"), ModelFiles::Full)
        .unwrap_err();
    assert!(matches!(e, HubError::Download { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("model-00002-of-00002.safetensors") && msg.contains("resume"),
        "{msg}"
    );
    let (body, etag) = {
        let st = state.lock().unwrap();
        (st.files[path].body.clone(), st.files[path].etag.clone())
    };
    let blobs = tmp.path().join("models--test-org--sharded/blobs");
    assert!(!blobs.join(&etag).exists(), "no blob under the final name");
    let part = blobs.join(format!("{etag}.part"));
    assert_eq!(std::fs::metadata(&part).unwrap().len(), cut as u64);
    let snap = tmp
        .path()
        .join("models--test-org--sharded/snapshots")
        .join(COMMIT);
    assert!(!snap.join("model-00002-of-00002.safetensors").exists());

    let got = h
        .model(&name("test-org/sharded"), ModelFiles::Full)
        .unwrap();
    assert_eq!(got, snap);
    assert_eq!(
        std::fs::read(snap.join("model-00002-of-00002.safetensors")).unwrap(),
        body
    );
    assert!(!part.exists());
    // The second run asked for the rest only.
    let ranges: Vec<Option<String>> = state
        .lock()
        .unwrap()
        .log
        .iter()
        .filter(|(p, _)| p == path)
        .map(|(_, r)| r.clone())
        .collect();
    assert!(
        ranges.contains(&Some(format!("bytes={cut}-"))),
        "{ranges:?}"
    );
}

#[test]
fn gated_missing_corrupt_and_offline_fail_with_clear_errors() {
    let (state, url) = hub_server();
    let tmp = tempfile::tempdir().unwrap();
    let mut h = hub(&url, tmp.path());
    let e = h
        .model(&name("test-org/gated"), ModelFiles::Full)
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, HubError::Unauthorized { status: 401, .. }),
        "{msg}"
    );
    assert!(msg.contains("gated") && msg.contains("HF_TOKEN"), "{msg}");
    h.token = Some(TOKEN.into());
    h.model(&name("test-org/gated"), ModelFiles::Full).unwrap();

    let e = h
        .model(&name("test-org/missing"), ModelFiles::Full)
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, HubError::NotFound { .. }), "{msg}");
    assert!(
        msg.contains(&format!("{url}/test-org/missing/resolve/main/config.json")),
        "{msg}"
    );

    // A file that does not hash to its etag is removed, not kept under its name.
    {
        let mut st = state.lock().unwrap();
        for (n, b) in sharded_tiny_llama() {
            st.add("test-org/corrupt", &n, b);
        }
        let f = st
            .files
            .get_mut("/test-org/corrupt/resolve/main/model-00001-of-00002.safetensors")
            .unwrap();
        let last = f.body.len() - 1;
        f.body[last] ^= 1;
    }
    let e = h
        .model(&name("test-org/corrupt"), ModelFiles::Full)
        .unwrap_err();
    assert!(matches!(e, HubError::Checksum { .. }), "{e}");
    let snap = tmp
        .path()
        .join("models--test-org--corrupt/snapshots")
        .join(COMMIT);
    assert!(!snap.join("model-00001-of-00002.safetensors").exists());

    // Through the CLI, from the environment: a token in HF_TOKEN opens the gated repository;
    // offline with nothing cached names the variable.
    let cache = tempfile::tempdir().unwrap();
    let args = ["plan", "--model", "test-org/gated", "--seq-len", "16"];
    let (ok, _, e) = qlora(&url, cache.path(), &[], &args);
    assert!(!ok && e.contains("401") && e.contains("HF_TOKEN"), "{e}");
    let (ok, _, e) = qlora(&url, cache.path(), &[("HF_TOKEN", TOKEN)], &args);
    assert!(ok, "{e}");
    let args = ["plan", "--model", "test-org/sharded", "--seq-len", "16"];
    let (ok, _, e) = qlora(&url, cache.path(), &[("HF_HUB_OFFLINE", "1")], &args);
    assert!(!ok && e.contains("HF_HUB_OFFLINE"), "{e}");
}

#[test]
fn a_hub_dataset_downloads_by_split() {
    let (state, url) = hub_server();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let model = fixtures().join("tiny-llama");
    let eval = |data: &str, env: &[(&str, &str)]| {
        let args = [
            "eval",
            "--model",
            arg(&model),
            "--data",
            data,
            "--seq-len",
            "32",
            "--json",
        ];
        qlora(&url, &cache, env, &args)
    };
    let one = fixtures().join("parquet/text.parquet");
    let (ok, single, e) = eval(arg(&one), &[]);
    assert!(ok, "{e}");
    let tokens = |out: &str| {
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        v["tokens"].as_u64().unwrap()
    };
    // `test`: one shard; the default split `train`: two shards, twice the tokens.
    let (ok, test, e) = eval("test-org/sonnets:test", &[]);
    assert!(ok, "{e}");
    assert_eq!(tokens(&test), tokens(&single));
    let (ok, train, e) = eval("test-org/sonnets", &[]);
    assert!(ok, "{e}");
    assert_eq!(tokens(&train), 2 * tokens(&single));
    let snap = cache
        .join("datasets--test-org--sonnets/snapshots")
        .join(COMMIT);
    assert!(snap.join("data/train-00001-of-00002.parquet").is_file());
    assert!(!snap.join("README.md").exists());
    // Cached now: offline, nothing asked.
    let asked = state.lock().unwrap().log.len();
    let (ok, again, e) = eval("test-org/sonnets", &[("HF_HUB_OFFLINE", "1")]);
    assert!(ok, "{e}");
    assert_eq!(tokens(&again), tokens(&train));
    assert_eq!(state.lock().unwrap().log.len(), asked);
    let (ok, _, e) = eval("test-org/sonnets:validation", &[]);
    assert!(
        !ok && e.contains("no validation split") && e.contains("test, train"),
        "{e}"
    );
}
