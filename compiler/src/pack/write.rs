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
use std::io::{Read, Seek, SeekFrom};
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
    let mut file = match std::fs::File::open(&manifest) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(not_artifact(&format!("it has no {MANIFEST_FILE}")))
        }
        Err(e) => return Err(io(&manifest)(e)),
    };
    let (head, tail) = read_ends(&mut file).map_err(io(&manifest))?;
    let parsed = match listed_by_layout(&head, &tail) {
        Some(listed) => Some(listed),
        None => {
            let mut text = Vec::new();
            file.seek(SeekFrom::Start(0)).and_then(|_| file.read_to_end(&mut text)).map_err(io(&manifest))?;
            serde_json::from_slice(&text).ok()
        }
    };
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

/// What [`check_target`] reads of a manifest: its version and its file list. Only these are kept:
/// DeepSeek-V3's manifest is 64 MB, and parsed whole into a JSON value it took 700 MB and a second
/// before the compile began.
#[derive(Debug, PartialEq, serde::Deserialize)]
struct Listed {
    format_version: Option<u64>,
    #[serde(default)]
    files: Vec<serde_json::Value>,
}

/// [`Listed`] from the layout kiln writes a manifest in (`json_lines`: a top-level field per line,
/// indented two spaces, `format_version` first and `files` last), reading the first line of fields
/// and the list at the end instead of the whole text: even skipped, DeepSeek-V3's 64 MB took 0.1 s
/// to parse, twice per compile over an earlier artifact. `None` where the text is not laid out
/// so; the caller then parses it whole.
fn listed_by_layout(head: &[u8], tail: &[u8]) -> Option<Listed> {
    let head = head.strip_prefix(b"{\n  \"format_version\": ")?;
    let digits = head.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || head.get(digits) != Some(&b',') {
        return None;
    }
    let version = std::str::from_utf8(&head[..digits]).ok()?.parse().ok()?;
    // The file list is a few lines; its line is the last top-level field, just before the `}`.
    const FILES: &[u8] = b"\n  \"files\": ";
    let at = tail.windows(FILES.len()).rposition(|w| w == FILES)?;
    let rest = std::str::from_utf8(&tail[at + FILES.len()..]).ok()?.trim_end();
    let list = rest.strip_suffix('}')?.trim_end();
    let files: Vec<serde_json::Value> = serde_json::from_str(list).ok()?;
    Some(Listed { format_version: Some(version), files })
}

/// Bytes read from each end of a manifest for [`listed_by_layout`].
const END_BYTES: u64 = 1 << 16;

/// The first and last [`END_BYTES`] of a manifest (the whole text twice when it is shorter).
fn read_ends(file: &mut std::fs::File) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let len = file.metadata()?.len();
    let mut head = vec![0; len.min(END_BYTES) as usize];
    file.read_exact(&mut head)?;
    let start = len.saturating_sub(END_BYTES);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::with_capacity((len - start) as usize);
    file.read_to_end(&mut tail)?;
    Ok((head, tail))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Option<Listed> {
        serde_json::from_str(text).ok()
    }

    #[test]
    fn manifest_layout_reads_as_the_whole_parse_does() {
        let laid_out = "{\n  \"format_version\": 3,\n  \"kiln_version\": \"0.1.0\",\n  \"programs\": [\n    \
            {\"files\": [\"not this one\"]}\n  ],\n  \"files\": [\n    {\"name\":\"kernels.so\",\"bytes\":4},\n    \
            {\"name\":\"module.kir\",\"bytes\":9}\n  ]\n}\n";
        let fast = listed_by_layout(laid_out.as_bytes(), laid_out.as_bytes()).expect("kiln's layout");
        assert_eq!(Some(&fast), parsed(laid_out).as_ref());
        assert_eq!(fast.format_version, Some(3));
        let names: Vec<&str> = fast.files.iter().filter_map(|f| f["name"].as_str()).collect();
        assert_eq!(names, ["kernels.so", "module.kir"]);
        // Any other layout, or a manifest that is not whole, is left to the full parse.
        for other in [
            "{\"format_version\":3,\"files\":[]}",
            "{\n  \"format_version\": \"3\",\n  \"files\": []\n}\n",
            "{\n  \"format_version\": 3,\n  \"files\": [\n    {\"name\":\"kernels.so\"}\n",
            "{\n  \"format_version\": 3,\n  \"files\": [],\n  \"more\": 1\n}\n",
        ] {
            assert_eq!(listed_by_layout(other.as_bytes(), other.as_bytes()), None, "{other}");
        }
    }
}
