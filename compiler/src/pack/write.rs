//! Writing an artifact directory so that it appears complete or not at all.
//!
//! Every file is written into a temporary sibling, `.{name}.tmp-{pid}`, and synced; only then is the
//! sibling renamed to the target. A directory already at the target is moved aside first
//! (`.{name}.old-{pid}`) and removed after the new one is in place, and moved back if the final
//! rename fails. (Linux cannot rename a directory over a non-empty one, so there is a moment between
//! the two renames when the target is absent; there is never one when it is half written.) On any
//! failure the temporary directory is removed.
//!
//! An existing target is replaced only when it looks like an artifact (it has a `manifest.json`) or
//! is empty, so `-o` pointed at the wrong directory by mistake cannot delete it.

use std::io::Write;

use rayon::prelude::*;
use std::path::{Path, PathBuf};

use kiln_ir::artifact::MANIFEST_FILE;

use super::Artifact;

/// Why an artifact could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} exists and is not a kiln artifact (it has no {MANIFEST_FILE}); refusing to replace it")]
    NotAnArtifact { path: PathBuf },
    #[error("{path} is not a directory path to write an artifact to")]
    BadPath { path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WriteError + '_ {
    move |source| WriteError::Io { path: path.to_path_buf(), source }
}

/// Whether an existing path may be replaced by an artifact.
fn replaceable(dir: &Path) -> Result<bool, WriteError> {
    if !dir.is_dir() {
        return Ok(false);
    }
    if dir.join(MANIFEST_FILE).is_file() {
        return Ok(true);
    }
    Ok(std::fs::read_dir(dir).map_err(io(dir))?.next().is_none())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let mut f = std::fs::File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Writes `artifact` to the directory `dir`, atomically (see the module documentation).
pub fn write(artifact: &Artifact, dir: &Path) -> Result<(), WriteError> {
    let name = dir
        .file_name()
        .filter(|n| *n != "." && *n != "..")
        .ok_or_else(|| WriteError::BadPath { path: dir.to_path_buf() })?
        .to_string_lossy()
        .into_owned();
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let exists = dir.symlink_metadata().is_ok();
    if exists && !replaceable(dir)? {
        return Err(WriteError::NotAnArtifact { path: dir.to_path_buf() });
    }
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let pid = std::process::id();
    let tmp = parent.join(format!(".{name}.tmp-{pid}"));
    // Only a crashed earlier process with this pid can have left it.
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    let result = fill(artifact, &tmp).and_then(|()| replace(&tmp, dir, parent, &name, exists));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn fill(artifact: &Artifact, tmp: &Path) -> Result<(), WriteError> {
    std::fs::create_dir(tmp).map_err(io(tmp))?;
    // At once: most of the time is the disk syncing each file.
    let written: Vec<Result<(), WriteError>> =
        artifact.files.par_iter().map(|(name, bytes)| write_file(&tmp.join(name), bytes)).collect();
    written.into_iter().collect::<Result<(), WriteError>>()?;
    // The manifest last: a directory with a manifest has every file it lists.
    write_file(&tmp.join(MANIFEST_FILE), artifact.manifest_json.as_bytes())
}

fn replace(tmp: &Path, dir: &Path, parent: &Path, name: &str, exists: bool) -> Result<(), WriteError> {
    if !exists {
        return std::fs::rename(tmp, dir).map_err(io(dir));
    }
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    std::fs::rename(dir, &old).map_err(io(dir))?;
    if let Err(e) = std::fs::rename(tmp, dir) {
        let _ = std::fs::rename(&old, dir);
        return Err(io(dir)(e));
    }
    std::fs::remove_dir_all(&old).map_err(io(&old))
}
