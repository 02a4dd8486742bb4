//! Writing an artifact directory so that it appears complete or not at all, and only where it
//! replaces nothing but an artifact.
//!
//! The files are written by [`kiln_ir::output::replace_dir`]: into a temporary sibling
//! (`.{name}.tmp-{pid}-…`), synced, renamed over the target (an existing directory moved aside and
//! removed once the new one is in place). The temporaries of a killed earlier compile are removed
//! on the way.
//!
//! What may be at the target ([`check_target`], which the CLI calls before compiling and [`write()`]
//! again before writing): nothing, an empty directory, or a kiln artifact: a directory whose
//! `manifest.json` has a whole-number `format_version` (any version, so an old artifact can be
//! recompiled in place) and that holds nothing but the files its manifest lists. An artifact is
//! replaced whole, so a file someone put into one would be deleted; such a directory is refused,
//! naming the files, rather than kept in part. Anything else (a file, a link, a directory without
//! a manifest, or with a manifest that is not kiln's) is refused and left as it is.

use rayon::prelude::*;
use std::path::{Path, PathBuf};

use kiln_ir::artifact::{KERNELS_MLIR, KERNELS_PTX, KERNELS_SO, MANIFEST_FILE, MODULE_KIR};
use kiln_ir::output::{self, OutputError};

use super::Artifact;

/// Why an artifact could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot write {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(
        "{} exists and is not a kiln artifact ({reason}); refusing to replace it: give a new path, an \
         empty directory or an artifact directory",
        path.display()
    )]
    NotAnArtifact { path: PathBuf, reason: String },
    #[error(
        "{} is a kiln artifact, but it also holds {} its manifest does not list ({}); an artifact is \
         replaced whole, so refusing to delete them: move them out first, or give another path",
        path.display(),
        if names.len() == 1 { "a file" } else { "files" },
        names.join(", ")
    )]
    ForeignFiles { path: PathBuf, names: Vec<String> },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WriteError + '_ {
    move |source| WriteError::Io { path: path.to_path_buf(), source }
}

/// The files any version of kiln writes into an artifact, besides the ones its manifest lists.
const KILN_FILES: [&str; 5] = [MANIFEST_FILE, KERNELS_SO, KERNELS_PTX, MODULE_KIR, KERNELS_MLIR];

/// Checks that an artifact may be written at `dir`; see the module documentation.
pub fn check_target(dir: &Path) -> Result<(), WriteError> {
    let meta = match dir.symlink_metadata() {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(dir)(e)),
    };
    let not_artifact =
        |reason: &str| WriteError::NotAnArtifact { path: dir.to_path_buf(), reason: reason.into() };
    if meta.file_type().is_symlink() {
        return Err(not_artifact(
            "it is a symbolic link, which replacing the directory would replace; give the directory it \
             points to",
        ));
    }
    if !meta.is_dir() {
        return Err(not_artifact("it is not a directory"));
    }
    let mut entries = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        entries.push(e.map_err(io(dir))?.file_name().to_string_lossy().into_owned());
    }
    if entries.is_empty() {
        return Ok(());
    }
    let manifest = dir.join(MANIFEST_FILE);
    // Only the version and the file list are kept: DeepSeek-V3's manifest is 64 MB, and parsed
    // whole into a JSON value it took 700 MB and a second before the compile began.
    #[derive(serde::Deserialize)]
    struct Listed {
        format_version: Option<u64>,
        #[serde(default)]
        files: Vec<serde_json::Value>,
    }
    let text = match std::fs::read(&manifest) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(not_artifact(&format!("it has no {MANIFEST_FILE}")))
        }
        Err(e) => return Err(io(&manifest)(e)),
    };
    let parsed: Option<Listed> = serde_json::from_slice(&text).ok();
    drop(text);
    let Some(json) = parsed.filter(|l| l.format_version.is_some()) else {
        return Err(not_artifact(&format!(
            "its {MANIFEST_FILE} has no `format_version`, so kiln did not write it"
        )));
    };
    let listed: Vec<&str> = json.files.iter().filter_map(|f| f.get("name")?.as_str()).collect();
    let mut foreign: Vec<String> = entries
        .into_iter()
        .filter(|e| !KILN_FILES.contains(&e.as_str()) && !listed.contains(&e.as_str()))
        .collect();
    foreign.sort();
    if foreign.is_empty() {
        Ok(())
    } else {
        Err(WriteError::ForeignFiles { path: dir.to_path_buf(), names: foreign })
    }
}

/// Writes `artifact` to the directory `dir`, atomically (see the module documentation).
pub fn write(artifact: &Artifact, dir: &Path) -> Result<(), WriteError> {
    check_target(dir)?;
    output::replace_dir(dir, |tmp| {
        // Every file at once, the manifest with them (DeepSeek-V3's module.kir and manifest are
        // 64 MB each): the directory is a hidden temporary until all of them are written and
        // synced, so no reader sees a manifest without its files.
        let manifest = (MANIFEST_FILE.to_string(), artifact.manifest_json.as_bytes());
        let files = artifact.files.iter().map(|(name, bytes)| (name.clone(), bytes.as_slice()));
        let all: Vec<(String, &[u8])> = std::iter::once(manifest).chain(files).collect();
        let written: Vec<Result<(), WriteError>> = (all.par_iter().with_max_len(1))
            .map(|(name, bytes)| {
                let path = tmp.join(name);
                std::fs::write(&path, bytes).map_err(io(&path))
            })
            .collect();
        written.into_iter().collect::<Result<(), WriteError>>()
    })
}
