//! `AtomicDir`: build an output folder under a hidden temporary name, then rename it into place.
//!
//! Writers (quantized models, checkpoints, exports) fill [`AtomicDir::path`] and call
//! [`AtomicDir::commit`] last. Until then the target name does not exist; if the writer fails or
//! panics, dropping the `AtomicDir` deletes the temporary folder, so a failed run leaves nothing
//! half-written behind. A process killed by a signal leaves a `.<name>.tmp-<pid>-*` folder next
//! to the target; it is never mistaken for the output, and the next writer of the same target
//! deletes it once no process with that id is running.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

/// Why an output folder could not be created or committed.
#[derive(Debug, thiserror::Error)]
pub enum AtomicDirError {
    /// The target is already there; we never overwrite or merge into an existing folder.
    #[error("output folder {} already exists; remove it or choose another output folder", .0.display())]
    Exists(PathBuf),
    /// The target path has no final component (e.g. `/` or `..`).
    #[error("{} cannot be used as an output folder: it has no name", .0.display())]
    NoName(PathBuf),
    /// A filesystem operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What we were doing.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Delete the `.<name>.tmp-<pid>-*` folders in `parent` left by killed writers (no process
/// `pid` running). Best effort: a folder that cannot be read or removed stays.
fn remove_stale(parent: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if pid as u32 != std::process::id() && !process_running(pid) && entry.path().is_dir() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether a process with this id exists (Unix; elsewhere assumed running, so nothing is
/// deleted).
fn process_running(pid: i32) -> bool {
    #[cfg(unix)]
    {
        // SAFETY: signal 0 only checks that the process exists; nothing is sent.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// A temporary folder next to `target` that becomes `target` on [`commit`](AtomicDir::commit).
#[derive(Debug)]
pub struct AtomicDir {
    target: PathBuf,
    temp: TempDir,
}

impl AtomicDir {
    /// Refuse if `target` exists; otherwise create its parent folders if needed and a hidden
    /// temporary folder `.<name>.tmp-<pid>-<random>` beside it (same filesystem, so the final
    /// rename is atomic).
    pub fn new(target: impl AsRef<Path>) -> Result<Self, AtomicDirError> {
        let target = target.as_ref().to_path_buf();
        check_absent(&target)?;
        let name = target
            .file_name()
            .ok_or_else(|| AtomicDirError::NoName(target.clone()))?
            .to_string_lossy()
            .into_owned();
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(|source| AtomicDirError::Io {
            what: "cannot create folder",
            path: parent.clone(),
            source,
        })?;
        remove_stale(&parent, &name);
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{name}.tmp-{}-", std::process::id()))
            .tempdir_in(&parent)
            .map_err(|source| AtomicDirError::Io {
                what: "cannot create a temporary folder in",
                path: parent,
                source,
            })?;
        Ok(Self { target, temp })
    }

    /// The temporary folder to write into.
    pub fn path(&self) -> &Path {
        self.temp.path()
    }

    /// Where the folder will end up.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Flush every file to disk, then rename the folder to the target. On error the temporary
    /// folder is removed.
    pub fn commit(self) -> Result<PathBuf, AtomicDirError> {
        sync_tree(self.temp.path())?;
        // Checked again because the target may have appeared while we worked: rename(2) would
        // silently replace an empty folder. (A folder created between this check and the rename
        // can still be replaced if it is empty; a non-empty one makes the rename fail.)
        check_absent(&self.target)?;
        fs::rename(self.temp.path(), &self.target).map_err(|source| AtomicDirError::Io {
            what: "cannot rename the finished output into",
            path: self.target.clone(),
            source,
        })?;
        let _ = self.temp.keep();
        if let Some(parent) = self.target.parent() {
            // Best effort: makes the rename itself durable on filesystems that need it.
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            if let Ok(dir) = fs::File::open(parent) {
                let _ = dir.sync_all();
            }
        }
        Ok(self.target)
    }
}

fn check_absent(target: &Path) -> Result<(), AtomicDirError> {
    match fs::symlink_metadata(target) {
        Ok(_) => Err(AtomicDirError::Exists(target.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(AtomicDirError::Io {
            what: "cannot check",
            path: target.to_path_buf(),
            source,
        }),
    }
}

/// `fsync` every regular file under `dir`, then `dir` itself.
fn sync_tree(dir: &Path) -> Result<(), AtomicDirError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AtomicDirError::Io {
            what: "cannot flush",
            path,
            source,
        }
    };
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
        if meta.is_dir() {
            sync_tree(&path)?;
        } else if meta.is_file() {
            fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&path))?;
        }
    }
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn folders_left_by_killed_writers_are_removed_by_the_next_one() {
        let root = tempfile::tempdir().unwrap();
        // A pid above the kernel's limit (4194304) is never running.
        let dead = root.path().join(".out.tmp-99999999-abc");
        let other = root.path().join(".other.tmp-99999999-abc");
        let mine = root
            .path()
            .join(format!(".out.tmp-{}-abc", std::process::id()));
        for d in [&dead, &other, &mine] {
            fs::create_dir_all(d.join("sub")).unwrap();
        }
        let dir = AtomicDir::new(root.path().join("out")).unwrap();
        assert!(
            !dead.exists(),
            "a dead writer's folder of this target is removed"
        );
        assert!(
            other.exists() && mine.exists(),
            "other targets and live writers are kept"
        );
        dir.commit().unwrap();
    }

    #[test]
    fn commit_renames_and_drop_cleans_up() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");

        let dir = AtomicDir::new(&target).unwrap();
        fs::write(dir.path().join("a.txt"), b"x").unwrap();
        assert!(!target.exists());
        assert_eq!(entries(root.path()).len(), 1);
        drop(dir);
        assert!(
            entries(root.path()).is_empty(),
            "temporary folder left behind"
        );

        let dir = AtomicDir::new(&target).unwrap();
        fs::write(dir.path().join("a.txt"), b"x").unwrap();
        assert_eq!(dir.commit().unwrap(), target);
        assert_eq!(entries(root.path()), vec!["out".to_string()]);
        assert_eq!(fs::read(target.join("a.txt")).unwrap(), b"x");
    }

    #[test]
    fn refuses_existing_target() {
        let root = tempfile::tempdir().unwrap();
        let err = AtomicDir::new(root.path()).unwrap_err();
        assert!(matches!(err, AtomicDirError::Exists(_)), "{err}");
        assert!(err.to_string().contains("already exists"), "{err}");

        // Appearing while we work is caught at commit, and the temporary folder goes away.
        let target = root.path().join("late");
        let dir = AtomicDir::new(&target).unwrap();
        fs::create_dir(&target).unwrap();
        let err = dir.commit().unwrap_err();
        assert!(matches!(err, AtomicDirError::Exists(_)), "{err}");
        assert_eq!(entries(root.path()), vec!["late".to_string()]);
    }

    #[test]
    fn creates_missing_parents() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("a/b/out");
        let dir = AtomicDir::new(&target).unwrap();
        dir.commit().unwrap();
        assert!(target.is_dir());
    }
}
