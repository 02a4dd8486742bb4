//! The model folder as the unit of work: `kiln run DIR` on a Hugging Face folder (its
//! `config.json`, weights and tokenizer) compiles the model for this CPU on first use, into a cache,
//! and reuses that artifact after.
//!
//! The cache is `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`; each artifact
//! is `artifacts/{name}-{key}`, where the key is the SHA-256 (first 16 hex digits) of everything the
//! artifact depends on:
//! - the model spec as kiln reads it (the parsed config, so whitespace and key order do not matter
//!   but every value does),
//! - the compile options (`--target cpu`, the default `--max-batch` and `--max-context`),
//! - kiln's version and the identity of this `kiln` executable (its size and modification time: a
//!   rebuilt or reinstalled kiln compiles afresh rather than trust an artifact an older one made),
//! - the host CPU (LLVM's triple, CPU name and features: `kernels.so` is made for them, and a
//!   cache on a shared home directory must not hand one machine's AVX-512 code to another).
//!
//! An artifact is written atomically (a hidden sibling renamed into place), so a run killed while
//! compiling leaves nothing a later run would take for an artifact, and two runs compiling the
//! same model at once both end with a whole one. One that is there but does not load (a file
//! changed or removed by hand: loading checks every file's SHA-256) is compiled again.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use kiln_compiler::pack::{self, Options, Source, Targets};
use kiln_compiler::spec;

/// The compile options of a cached artifact: `kiln compile`'s defaults, for the CPU.
const MAX_BATCH: u64 = 1;
const MAX_CONTEXT: u64 = 4096;

/// Whether `path` is a Hugging Face model folder: a directory with a `config.json` and no
/// `manifest.json` (which would make it an artifact).
pub fn is_model_folder(path: &Path) -> bool {
    path.is_dir()
        && path.join("config.json").is_file()
        && !path.join(kiln_ir::artifact::MANIFEST_FILE).exists()
}

/// `MODEL` as a command runs it, with the weights it implies.
pub struct Resolved {
    /// What to load: the cached artifact of a model folder (compiled now if need be), its
    /// `config.json` with `--interp`, or `MODEL` as given.
    pub model: PathBuf,
    /// The folder's own weights, when `MODEL` is a model folder and neither `--weights` nor
    /// `--random-weights` was given.
    pub weights: Option<PathBuf>,
}

/// Resolves `MODEL` for `kiln {command}` (see the module documentation): `weights_given` says
/// whether `--weights` or `--random-weights` was. Weights are required unless `MODEL` is a model
/// folder that has them, which is checked before anything is compiled.
pub fn resolve(model: &Path, weights_given: bool, interp: bool, command: &str) -> Result<Resolved> {
    let folder = is_model_folder(model);
    let weights = match (weights_given, folder) {
        (true, _) => None,
        (false, true) => {
            let has = model.join("model.safetensors").is_file() || model.join("model.safetensors.index.json").is_file();
            if !has {
                bail!(
                    "{} has a config.json but no weights (model.safetensors or model.safetensors.index.json): \
                     give them with --weights DIR, or use --random-weights SEED",
                    model.display()
                );
            }
            Some(model.to_path_buf())
        }
        (false, false) => bail!(
            "kiln {command} needs weights: --weights DIR (a Hugging Face checkpoint folder) or --random-weights \
             SEED, unless MODEL is a Hugging Face folder, whose own weights are used"
        ),
    };
    let model = match (folder, interp) {
        (true, false) => artifact_for(model, &mut std::io::stderr().lock())?,
        (true, true) => model.join("config.json"),
        (false, _) => model.to_path_buf(),
    };
    Ok(Resolved { model, weights })
}

/// The cache directory (see the module documentation).
pub fn cache_dir() -> Result<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = env("KILN_CACHE_DIR") {
        if dir.exists() && !dir.is_dir() {
            bail!(
                "KILN_CACHE_DIR={} is not a folder: give a folder for kiln's cache (it is made if missing)",
                dir.display()
            );
        }
        return Ok(dir);
    }
    if let Some(dir) = env("XDG_CACHE_HOME") {
        return Ok(dir.join("kiln"));
    }
    match env("HOME") {
        Some(home) => Ok(home.join(".cache").join("kiln")),
        None => bail!(
            "cannot find a cache directory for compiled models: set KILN_CACHE_DIR (or HOME), or compile \
             the model yourself with `kiln compile` and run the artifact"
        ),
    }
}

/// Turns on the kernel cache ([`kiln_compiler::codegen::cache`]) for this process:
/// `$KILN_KERNEL_CACHE_DIR`, else `kernels` in [`cache_dir`]; off with `KILN_NO_KERNEL_CACHE=1`, or
/// where there is no cache directory at all (the compile then makes every kernel).
pub fn configure_kernel_cache() {
    let off = std::env::var_os("KILN_NO_KERNEL_CACHE").is_some_and(|v| !v.is_empty() && v != "0");
    kiln_compiler::codegen::cache::configure(kernel_cache_dir().filter(|_| !off));
}

/// Where the kernel cache is, on or off: `$KILN_KERNEL_CACHE_DIR`, else `kernels` in [`cache_dir`].
fn kernel_cache_dir() -> Option<PathBuf> {
    match std::env::var_os("KILN_KERNEL_CACHE_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => Some(PathBuf::from(dir)),
        None => cache_dir().ok().map(|d| d.join("kernels")),
    }
}

/// `kiln cache [--clear]`: what the kernel cache and the compiled model folders hold, each with its
/// place and bytes; with `clear`, removes them and says what went. A run using a cached artifact
/// while it is removed keeps what it has loaded; the next run compiles the folder again.
pub fn command(clear: bool, json: bool, out: &mut dyn Write) -> Result<()> {
    use kiln_compiler::codegen::cache as kernels;
    // A KILN_CACHE_DIR that is not a folder is the user's mistake to hear of, not "0 entries".
    if std::env::var_os("KILN_CACHE_DIR").is_some_and(|v| !v.is_empty()) {
        cache_dir()?;
    }
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let mut doc = serde_json::Map::new();
    let mut text = String::new();
    match kernel_cache_dir() {
        Some(dir) => {
            let (entries, bytes) = if clear { kernels::clear(&dir) } else { kernels::usage(&dir) };
            let off = std::env::var_os("KILN_NO_KERNEL_CACHE").is_some_and(|v| !v.is_empty() && v != "0");
            text += &match clear {
                true => format!(
                    "kernels    {}: removed {entries} entries, {:.1} MiB\n",
                    dir.display(),
                    mib(bytes)
                ),
                false => format!(
                    "kernels    {}: {entries} entries, {:.1} of {} MiB{}\n",
                    dir.display(),
                    mib(bytes),
                    kernels::limit() >> 20,
                    if off { " (off: KILN_NO_KERNEL_CACHE)" } else { "" }
                ),
            };
            doc.insert(
                "kernels".into(),
                serde_json::json!({"dir": dir, "entries": entries, "bytes": bytes, "limit_bytes": kernels::limit(), "cleared": clear}),
            );
        }
        None => text += "kernels    no cache directory (set KILN_KERNEL_CACHE_DIR, KILN_CACHE_DIR or HOME)\n",
    }
    match cache_dir() {
        Ok(root) => {
            let dir = root.join("artifacts");
            let mut found: Vec<(String, u64)> = match std::fs::read_dir(&dir) {
                Ok(read) => read
                    .flatten()
                    // Folders kiln made; a link is not one (and `--clear` never follows it).
                    .filter(|e| {
                        e.file_type().is_ok_and(|t| t.is_dir())
                            && !e.file_name().to_string_lossy().starts_with('.')
                    })
                    .map(|e| (e.file_name().to_string_lossy().into_owned(), tree_bytes(&e.path())))
                    .collect(),
                Err(_) => Vec::new(),
            };
            found.sort();
            let total: u64 = found.iter().map(|(_, b)| b).sum();
            if clear {
                for (name, _) in &found {
                    let path = dir.join(name);
                    std::fs::remove_dir_all(&path)
                        .with_context(|| format!("cannot remove {}", path.display()))?;
                }
            }
            text += &format!(
                "artifacts  {}: {} {} compiled model folder{}, {:.1} MiB\n",
                dir.display(),
                if clear { "removed" } else { "" },
                found.len(),
                if found.len() == 1 { "" } else { "s" },
                mib(total)
            )
            .replace(":  ", ": ");
            if !clear {
                for (name, bytes) in &found {
                    text += &format!("  {name}  {:.1} MiB\n", mib(*bytes));
                }
            }
            let list: Vec<serde_json::Value> =
                found.iter().map(|(n, b)| serde_json::json!({"name": n, "bytes": b})).collect();
            doc.insert(
                "artifacts".into(),
                serde_json::json!({"dir": dir, "artifacts": list, "bytes": total, "cleared": clear}),
            );
        }
        Err(e) => text += &format!("artifacts  {e:#}\n"),
    }
    match json {
        true => writeln!(out, "{}", serde_json::to_string_pretty(&serde_json::Value::Object(doc))?)?,
        false => write!(out, "{text}")?,
    }
    Ok(())
}

/// The bytes of the files under `dir`.
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(read) = std::fs::read_dir(dir) else { return 0 };
    read.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => tree_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The artifact of the model folder `folder` for this CPU: the cached one, or one compiled now.
/// What happens is said on `log`.
pub fn artifact_for(folder: &Path, log: &mut dyn Write) -> Result<PathBuf> {
    let config = folder.join("config.json");
    let spec = spec::load(&config)?;
    let key = key(&spec)?;
    let name: String = (spec.model.name.chars())
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .take(64)
        .collect();
    let dir = cache_dir()?.join("artifacts").join(format!("{name}-{key}"));
    if dir.join(kiln_ir::artifact::MANIFEST_FILE).is_file() {
        match kiln_runtime::artifact::load(&dir) {
            Ok(_) => {
                writeln!(log, "kiln: {} compiled for this CPU: {}", folder.display(), dir.display())?;
                return Ok(dir);
            }
            Err(e) => {
                writeln!(log, "kiln: the cached {} does not load ({e}); compiling it again", dir.display())?
            }
        }
    }
    writeln!(
        log,
        "kiln: compiling {} for this CPU into {} (the first run of this model; later runs reuse it)",
        folder.display(),
        dir.display()
    )?;
    let parent = dir.parent().expect("the artifact is inside the cache");
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create the cache directory {}", parent.display()))?;
    let options = Options { last_logits: true, ..Options::new(Targets::Cpu, MAX_BATCH, MAX_CONTEXT) };
    let artifact = pack::compile(Source::Spec(spec), &options, &mut ())?;
    pack::write(&artifact, &dir)?;
    Ok(dir)
}

/// The cache key of `spec` compiled by this kiln for this CPU (see the module documentation).
fn key(spec: &kiln_ir::ModelSpec) -> Result<String> {
    let mut h = Sha256::new();
    let mut part = |label: &str, bytes: &[u8]| {
        h.update(label.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    part("spec", serde_json::to_string(spec)?.as_bytes());
    part("options", format!("cpu b={MAX_BATCH} s={MAX_CONTEXT}").as_bytes());
    part("kiln", env!("CARGO_PKG_VERSION").as_bytes());
    part("executable", kiln_compiler::codegen::cache::executable_identity().as_bytes());
    part("host", kiln_compiler::codegen::cpu::host_description().as_bytes());
    let digest = h.finalize();
    Ok(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key follows every value of the spec and nothing else: the same spec read twice has
    /// one key, and changing any one value (the rope's theta, the layers) gives another.
    #[test]
    fn the_key_changes_with_the_spec_and_only_with_it() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let tiny = || spec::load(&root.join("models/tiny.toml")).unwrap();
        let base = key(&tiny()).unwrap();
        assert_eq!(base.len(), 16);
        assert_eq!(key(&tiny()).unwrap(), base);
        let mut theta = tiny();
        theta.rope.theta *= 2.0;
        let mut layers = tiny();
        layers.model.num_hidden_layers += 1;
        let (a, b) = (key(&theta).unwrap(), key(&layers).unwrap());
        assert!(a != base && b != base && a != b, "{base} {a} {b}");
    }
}
