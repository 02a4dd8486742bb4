//! Loading an artifact directory written by `kiln compile`, and refusing one that is not exactly what
//! the compiler wrote.
//!
//! [`load`] checks, in this order, before anything is run or allocated:
//!
//! 1. `manifest.json` exists (else [`RuntimeError::NotAnArtifact`]) and is JSON;
//! 2. its `format_version` is the one this kiln reads ([`RuntimeError::FormatVersion`] names both),
//!    checked before the rest is decoded, because another version may have other fields;
//! 3. it decodes as a [`Manifest`] ([`RuntimeError::BadManifest`], with serde's line and column: a
//!    truncated manifest ends here) and [`Manifest::validate`] holds;
//! 4. every file the manifest lists has its size and SHA-256 ([`RuntimeError::FileSize`],
//!    [`RuntimeError::FileHash`], [`RuntimeError::MissingFile`], each naming the file), so a
//!    modified or truncated `kernels.so` is never loaded.
//!
//! What it does not do: keep the bytes it hashed. A backend opens `kernels.so` by path afterwards,
//! so a file replaced between the check and the `dlopen` is not caught; the check is against
//! accidents (a partial copy, a stale file, an edit), not against an attacker with write access.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use kiln_ir::artifact::{self, FileEntry, Manifest, FORMAT_VERSION};
use kiln_ir::module::Module;
use kiln_ir::Graph;

use crate::RuntimeError;

/// A checked artifact: its directory and manifest.
#[derive(Clone, Debug)]
pub struct Artifact {
    dir: PathBuf,
    manifest: Manifest,
}

impl Artifact {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Keeps the programs that `keep` names (under the name it gives, or drops those it gives
    /// `None`) with the parameters and states they use, and drops the rest from the manifest this
    /// process loads, so that nothing else is allocated or bound: a pipeline rank loads its own
    /// stages, an expert-parallel rank its own copy of each program (`prefill.ep1` as `prefill`)
    /// with its experts. Returns the whole manifest.
    pub fn keep_programs(&mut self, keep: impl Fn(&str) -> Option<String>) -> Manifest {
        let whole = self.manifest.clone();
        self.manifest.programs.retain_mut(|p| match keep(&p.name) {
            Some(name) => {
                p.name = name;
                true
            }
            None => false,
        });
        let mut states = std::collections::HashSet::new();
        let mut params = std::collections::HashSet::new();
        for b in self.manifest.programs.iter().flat_map(|p| &p.buffers) {
            match &b.storage {
                artifact::Storage::State { name } => states.insert(name.clone()),
                artifact::Storage::Param { name } => params.insert(name.clone()),
                _ => false,
            };
        }
        self.manifest.states.retain(|s| states.contains(&s.name));
        self.manifest.params.retain(|p| params.contains(&p.name));
        whole
    }

    /// Renames every parameter of the manifest this process loads as `rename` says (an
    /// expert-parallel rank binds the names of rank 0's experts to its own).
    pub fn rename_params(&mut self, rename: impl Fn(&str) -> String) {
        for p in &mut self.manifest.params {
            p.name = rename(&p.name);
        }
        for b in self.manifest.programs.iter_mut().flat_map(|p| &mut p.buffers) {
            if let artifact::Storage::Param { name } = &mut b.storage {
                *name = rename(name);
            }
        }
    }

    /// The path of a file of the artifact.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Reads a file the manifest lists, checking its size and hash again (it may have changed since
    /// [`load`]).
    pub fn read_file(&self, name: &str) -> Result<Vec<u8>, RuntimeError> {
        let entry = self
            .manifest
            .file(name)
            .ok_or_else(|| RuntimeError::MissingFile { dir: self.dir.clone(), name: name.to_string() })?;
        let bytes = std::fs::read(self.path(name)).map_err(|e| self.io_error(name, e))?;
        if bytes.len() as u64 != entry.bytes {
            return Err(RuntimeError::FileSize {
                dir: self.dir.clone(),
                name: name.to_string(),
                expected: entry.bytes,
                found: bytes.len() as u64,
            });
        }
        if hex(&Sha256::digest(&bytes)) != entry.sha256 {
            return Err(RuntimeError::FileHash { dir: self.dir.clone(), name: name.to_string() });
        }
        Ok(bytes)
    }

    /// The module the kernels were formed from (`module.kir`), for the reference interpreter.
    pub fn module(&self) -> Result<Module, RuntimeError> {
        let bytes = self.read_file(artifact::MODULE_KIR)?;
        let bad = |reason: String| RuntimeError::BadGraph { dir: self.dir.clone(), reason };
        let text = String::from_utf8(bytes).map_err(|e| bad(e.to_string()))?;
        kiln_ir::parse_module(&text).map_err(|e| bad(e.to_string()))
    }

    /// The graph of program `name` of [`Artifact::module`].
    pub fn program_graph(&self, name: &str) -> Result<Graph, RuntimeError> {
        let module = self.module()?;
        let known = module.programs.iter().map(|p| format!("`{}`", p.name)).collect::<Vec<_>>().join(", ");
        let program = module.programs.into_iter().find(|p| p.name == name);
        program.map(|p| p.graph).ok_or(RuntimeError::NoSuchProgram { name: name.to_string(), known })
    }

    fn io_error(&self, name: &str, e: std::io::Error) -> RuntimeError {
        if e.kind() == std::io::ErrorKind::NotFound {
            RuntimeError::MissingFile { dir: self.dir.clone(), name: name.to_string() }
        } else {
            RuntimeError::Io { path: self.path(name), source: e }
        }
    }
}

/// Loads and checks the artifact in `dir`; see the module documentation for what is checked.
pub fn load(dir: &Path) -> Result<Artifact, RuntimeError> {
    let path = dir.join(artifact::MANIFEST_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dir.is_dir() {
                return Err(RuntimeError::NotAnArtifact { dir: dir.to_path_buf() });
            }
            return Err(RuntimeError::Io { path: dir.to_path_buf(), source: e });
        }
        Err(e) => return Err(RuntimeError::Io { path, source: e }),
    };
    let manifest = parse_manifest(dir, &text)?;
    let art = Artifact { dir: dir.to_path_buf(), manifest };
    for f in &art.manifest.files {
        check_file(&art, f)?;
    }
    Ok(art)
}

/// Steps 1 to 3 of [`load`] on the bytes of `dir`'s manifest: JSON, the format version, the
/// decoding and [`Manifest::validate`]. Any bytes give a manifest or an error, never a panic.
pub fn parse_manifest(dir: &Path, text: &[u8]) -> Result<Manifest, RuntimeError> {
    let path = dir.join(artifact::MANIFEST_FILE);
    let bad = |reason: String| RuntimeError::BadManifest { path: path.clone(), reason };
    // The version alone first, every other field skipped unread: decoding the whole text into a
    // `serde_json::Value` before the `Manifest` built a map per object, which for DeepSeek-V3's
    // manifest (64 MB in format 3, some 300 thousand buffers) took over a second and 800 MB.
    let head: Head = serde_json::from_slice(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data if !e.to_string().starts_with("duplicate field") => {
            bad("it is not a JSON object with a `format_version`".into())
        }
        _ => bad(e.to_string()),
    })?;
    let version = head
        .0
        .ok_or_else(|| bad("it has no `format_version`".into()))?
        .as_u64()
        .ok_or_else(|| bad("`format_version` is not a whole number".into()))?;
    if version != u64::from(FORMAT_VERSION) {
        return Err(RuntimeError::FormatVersion {
            dir: dir.to_path_buf(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let manifest: Manifest = serde_json::from_slice(text).map_err(|e| bad(e.to_string()))?;
    manifest.validate().map_err(|source| RuntimeError::InvalidManifest { dir: dir.to_path_buf(), source })?;
    Ok(manifest)
}

/// A manifest's `format_version`, if its top-level object has one: the other fields are skipped
/// without being decoded (and a top-level value that is not an object is refused).
struct Head(Option<serde_json::Value>);

impl<'de> serde::Deserialize<'de> for Head {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = Head;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Head, A::Error> {
                let mut version = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "format_version" {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    } else if version.is_some() {
                        return Err(serde::de::Error::duplicate_field("format_version"));
                    } else {
                        version = Some(map.next_value()?);
                    }
                }
                Ok(Head(version))
            }
        }
        d.deserialize_map(Fields)
    }
}

/// Size first (cheap, and what a truncation changes), then the hash, streamed.
fn check_file(art: &Artifact, f: &FileEntry) -> Result<(), RuntimeError> {
    let path = art.path(&f.name);
    let meta = std::fs::metadata(&path).map_err(|e| art.io_error(&f.name, e))?;
    if !meta.is_file() {
        return Err(RuntimeError::MissingFile { dir: art.dir.clone(), name: f.name.clone() });
    }
    if meta.len() != f.bytes {
        return Err(RuntimeError::FileSize {
            dir: art.dir.clone(),
            name: f.name.clone(),
            expected: f.bytes,
            found: meta.len(),
        });
    }
    let mut file = std::fs::File::open(&path).map_err(|e| art.io_error(&f.name, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|source| RuntimeError::Io { path: path.clone(), source })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    if hex(&hasher.finalize()) != f.sha256 {
        return Err(RuntimeError::FileHash { dir: art.dir.clone(), name: f.name.clone() });
    }
    Ok(())
}

/// Lowercase hex, as the manifest writes hashes.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)] as char, DIGITS[usize::from(b & 15)] as char])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(text: &str) -> String {
        match parse_manifest(Path::new("a"), text.as_bytes()) {
            Err(RuntimeError::BadManifest { reason, .. }) => reason,
            other => panic!("expected a bad manifest, got {other:?}"),
        }
    }

    /// The version is read before the rest is decoded: each way of getting it wrong has its own
    /// message, and the text's syntax is checked whole first.
    #[test]
    fn the_version_is_read_first() {
        assert_eq!(reason("{\"files\": []}"), "it has no `format_version`");
        assert_eq!(reason("{\"format_version\": \"3\"}"), "`format_version` is not a whole number");
        assert_eq!(reason("[1, 2]"), "it is not a JSON object with a `format_version`");
        assert!(reason("{\"format_version\": 3, \"format_version\": 3}").starts_with("duplicate field"));
        assert!(reason("{\"format_version\": 3, \"files\": [").contains("EOF while parsing"));
        let other = format!("{{\"format_version\": {}, \"anything\": 1}}", FORMAT_VERSION + 1);
        match parse_manifest(Path::new("a"), other.as_bytes()) {
            Err(RuntimeError::FormatVersion { found, supported, .. }) => {
                assert_eq!((found, supported), (u64::from(FORMAT_VERSION) + 1, FORMAT_VERSION))
            }
            r => panic!("expected a version error, got {r:?}"),
        }
        // The right version and the rest wrong: the decoding's own error, with its position.
        let wrong = format!("{{\"format_version\": {FORMAT_VERSION}, \"files\": 7}}");
        assert!(reason(&wrong).contains("line 1"), "{}", reason(&wrong));
    }
}
