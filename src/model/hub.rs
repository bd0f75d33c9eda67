//! Models named as the Hugging Face hub names them (`org/name`, `org/name@revision`), found in
//! the local hub cache that transformers and `huggingface_hub` share, so a model a user already
//! downloaded with Python loads here offline.
//!
//! The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`,
//! else `~/.cache/huggingface/hub`; a model lives in `models--{org}--{name}/`, its files under
//! `snapshots/{commit}/`, and `refs/{branch}` holds the commit a branch or tag points to.
//! Downloading is not done here: a model missing from the cache is an error that says where it
//! was looked for.

use std::path::{Path, PathBuf};

/// The hub cache folder, as `huggingface_hub` chooses it.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = var("HF_HUB_CACHE") {
        return Some(d);
    }
    if let Some(d) = var("HF_HOME") {
        return Some(d.join("hub"));
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return Some(d.join("huggingface").join("hub"));
    }
    var("HOME").map(|h| h.join(".cache").join("huggingface").join("hub"))
}

/// `(org, name, revision)` of a hub name (`org/name[@revision]`), or `None` for anything else.
pub fn parse_repo(s: &str) -> Option<(&str, &str, &str)> {
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
    (ok(org) && ok(name)).then_some((org, name, rev))
}

/// The snapshot folder of `org/name[@revision]` in the cache at `cache`.
pub fn resolve_in(cache: &Path, s: &str) -> Result<PathBuf, String> {
    let (org, name, rev) =
        parse_repo(s).ok_or_else(|| format!("`{s}` is not a hub name (org/name[@revision])"))?;
    let repo = cache.join(format!("models--{org}--{name}"));
    if !repo.is_dir() {
        return Err(format!(
            "`{s}` is neither a local path nor in the Hugging Face cache ({} has no {}); \
             download it (e.g. `huggingface-cli download {org}/{name}`) or give a folder",
            cache.display(),
            repo.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
    }
    let refs = repo.join("refs").join(rev);
    let commit = if refs.is_file() {
        std::fs::read_to_string(&refs)
            .map_err(|e| format!("{}: {e}", refs.display()))?
            .trim()
            .to_string()
    } else {
        rev.to_string()
    };
    let snapshot = repo.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        return Err(format!(
            "`{s}`: the cache has no snapshot for revision `{rev}` ({} is missing)",
            snapshot.display()
        ));
    }
    Ok(snapshot)
}

/// A `--model` argument: an existing path as given, else a hub name resolved in the cache.
pub fn model_path(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    if p.exists() || parse_repo(s).is_none() {
        return Ok(p);
    }
    let cache = cache_dir().ok_or_else(|| {
        format!(
            "`{s}` is not a local path, and no Hugging Face cache folder is known (set HF_HOME)"
        )
    })?;
    resolve_in(&cache, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_cache() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("models--org--tiny");
        for commit in ["c0ffee", "beef42"] {
            let snap = repo.join("snapshots").join(commit);
            std::fs::create_dir_all(&snap).unwrap();
            std::fs::write(snap.join("config.json"), commit).unwrap();
        }
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "c0ffee\n").unwrap();
        std::fs::write(repo.join("refs/v1"), "beef42").unwrap();
        tmp
    }

    #[test]
    fn names_resolve_to_snapshots_by_branch_tag_or_commit() {
        let c = fake_cache();
        let snap = |s: &str| resolve_in(c.path(), s).unwrap();
        assert!(snap("org/tiny").ends_with("snapshots/c0ffee"));
        assert!(snap("org/tiny@main").ends_with("snapshots/c0ffee"));
        assert!(snap("org/tiny@v1").ends_with("snapshots/beef42"));
        assert!(snap("org/tiny@beef42").ends_with("snapshots/beef42"));
        let e = resolve_in(c.path(), "org/other").unwrap_err();
        assert!(
            e.contains("models--org--other") && e.contains("Hugging Face cache"),
            "{e}"
        );
        let e = resolve_in(c.path(), "org/tiny@nope").unwrap_err();
        assert!(e.contains("revision `nope`"), "{e}");
    }

    #[test]
    fn only_hub_shaped_names_are_looked_up() {
        assert_eq!(parse_repo("org/name@rev"), Some(("org", "name", "rev")));
        assert_eq!(parse_repo("org/name"), Some(("org", "name", "main")));
        for s in [
            "name",
            "a/b/c",
            "/abs/path",
            "./x",
            "../x/y",
            "org/",
            "org/name@",
            "x y/z",
        ] {
            assert_eq!(parse_repo(s), None, "{s}");
        }
        // An existing path wins over a hub lookup.
        let tmp = tempfile::tempdir().unwrap();
        let here = tmp.path().to_str().unwrap();
        assert_eq!(model_path(here).unwrap(), PathBuf::from(here));
    }
}
