//! The kernel cache: each kernel's CPU object file and PTX, kept on disk under a key of everything
//! that made them, so that a compile which meets a kernel it has compiled before (the same layer in
//! a second run, a resumed training run, the same model's step with other parallel settings, a
//! training step and the inference programs of one model) takes it instead of running MLIR and
//! LLVM again; and `ptxas`'s report on a module of PTX it has checked before. It is to kiln what
//! ccache is to a C compiler, or Triton's cache directory to its kernels.
//!
//! The key of an entry is the SHA-256 of:
//! - the kernel as lowered: its MLIR text (the module [`LoweredModule::text`] gives for it alone)
//!   and, on the CPU, what its packed entry is made from (name, passed buffers, sizes, table,
//!   signature);
//! - the back end's pipelines ([`cpu::CPU_PIPELINE`] and [`cpu::CPU_OPT`], or
//!   [`gpu::GPU_PIPELINE`], [`gpu::GPU_OPT`] and [`gpu::SM`]);
//! - for the CPU, the host as [`cpu::host_description`] gives it (an object for AVX-512 must not
//!   reach a CPU without it, even through a cache on a shared home directory);
//! - for a `ptxas` report, the PTX, the architecture, the threads and the `ptxas` executable (path,
//!   size and modification time); only a passing check is kept;
//! - kiln's version and the identity of the running executable ([`executable_identity`]: its size
//!   and modification time), so a rebuilt kiln compiles afresh rather than trust objects an older
//!   one made, and the version of the LLVM it runs (a shared library, which an upgrade replaces
//!   under the same kiln).
//!
//! An entry is written under a temporary name and renamed into place, so a compile killed midway
//! leaves no partial entry and two compiles that write the same one at once both end with a whole
//! one. Each entry carries the SHA-256 of its object: one that does not match (a file changed by
//! hand, a disk error) is compiled again and replaced. Reading an entry refreshes its
//! modification time, and when the cache outgrows its limit ([`DEFAULT_LIMIT`], or
//! `KILN_KERNEL_CACHE_LIMIT_MB`) the least recently used entries are removed.
//!
//! The cache is off unless the process turns it on ([`configure`]): `kiln` does, at
//! `$KILN_KERNEL_CACHE_DIR`, else the `kernels` folder of its cache directory (`$KILN_CACHE_DIR`,
//! `$XDG_CACHE_HOME/kiln` or `~/.cache/kiln`); `KILN_NO_KERNEL_CACHE=1` leaves it off. A library
//! user who never calls [`configure`] compiles every kernel.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use sha2::{Digest, Sha256};

use super::emit::{timed, KernelTime};
use super::lower::{LoweredModule, Target};
use super::{cpu, gpu, EmitError};
use crate::toolchain::{self, ToolchainError};

/// The largest the cache grows before its least recently used entries are removed: 2 GiB, about
/// twenty thousand kernels of DeepSeek-V3's size.
pub const DEFAULT_LIMIT: u64 = 2 << 30;

/// The first bytes of an entry, then the SHA-256 of its contents, then the contents.
const MAGIC: &[u8; 8] = b"KILNOBJ1";

/// The extensions of entries' files: CPU objects, PTX, `ptxas` reports.
const OBJECT: &str = "o";
const PTX: &str = "ptx";
const PTXAS: &str = "ptxas";
const EXTENSIONS: [&str; 3] = [OBJECT, PTX, PTXAS];

static DIR: RwLock<Option<PathBuf>> = RwLock::new(None);

/// Turns the cache on at `dir` (created when first written), or off with `None`, for every compile
/// of this process after.
pub fn configure(dir: Option<PathBuf>) {
    *DIR.write().unwrap_or_else(|e| e.into_inner()) = dir;
}

/// Where the cache is, if it is on.
pub fn dir() -> Option<PathBuf> {
    DIR.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The identity of the running executable: its size and modification time, empty where they
/// cannot be read. Caches of compiled code key on it.
pub fn executable_identity() -> String {
    match std::env::current_exe().and_then(|p| p.metadata()) {
        Ok(m) => format!("{} {:?}", m.len(), m.modified().ok()),
        Err(_) => String::new(),
    }
}

/// How a compile used the cache for one target: kernels it found there, and kernels it compiled
/// (and, with the cache on, stored).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Use {
    pub found: u64,
    pub compiled: u64,
}

/// How a compile used the cache: per target, when it emitted that target, and whether `ptxas`'s
/// report came from it, when the PTX was checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub cpu: Option<Use>,
    pub gpu: Option<Use>,
    pub ptxas_found: Option<bool>,
}

/// A SHA-256 of labelled parts, as 32 hex digits.
struct Key(Sha256);

impl Key {
    fn new(kind: &str) -> Key {
        let mut k = Key(Sha256::new());
        k.part("kind", kind.as_bytes());
        k.part("kiln", env!("CARGO_PKG_VERSION").as_bytes());
        k.part("executable", executable_identity().as_bytes());
        // LLVM and MLIR are shared libraries: an upgrade changes the code without changing kiln.
        k.part("llvm", format!("{:?}", inkwell::support::get_llvm_version()).as_bytes());
        k
    }

    fn part(&mut self, label: &str, bytes: &[u8]) {
        self.0.update(label.as_bytes());
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    fn finish(self) -> String {
        self.0.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect()
    }
}

/// The key of a module's object (CPU) or PTX (GPU): the module usually holds one kernel.
pub fn key(module: &LoweredModule) -> String {
    let mut k;
    match module.target {
        Target::Cpu => {
            k = Key::new("cpu object");
            k.part("host", cpu::host_description().as_bytes());
            k.part("pipeline", cpu::CPU_PIPELINE.as_bytes());
            k.part("opt", cpu::CPU_OPT.as_bytes());
        }
        Target::Gpu => {
            k = Key::new("ptx");
            k.part("pipeline", gpu::GPU_PIPELINE.as_bytes());
            k.part("opt", gpu::GPU_OPT.as_bytes());
            k.part("sm", gpu::SM.as_bytes());
        }
    }
    k.part("module", module.text().as_bytes());
    for e in &module.kernels {
        let entry = format!("{} {:?} {} {} {:?}", e.name, e.passed, e.syms.len(), e.table, e.signature);
        k.part("entry", entry.as_bytes());
    }
    k.finish()
}

/// The contents stored under `key.ext` in `dir`, if there is a whole entry; its modification time
/// is refreshed (the cache removes the least recently used entries first).
fn read(dir: &Path, key: &str, ext: &str) -> Option<Vec<u8>> {
    let path = dir.join(format!("{key}.{ext}"));
    let bytes = std::fs::read(&path).ok()?;
    let (head, object) = bytes.split_at_checked(MAGIC.len() + 32)?;
    if &head[..MAGIC.len()] != MAGIC || head[MAGIC.len()..] != Sha256::digest(object)[..] {
        return None;
    }
    if let Ok(f) = std::fs::File::options().append(true).open(&path) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
    Some(object.to_vec())
}

/// Stores `object` under `key.ext` in `dir`, whole or not at all. Best effort: a cache that cannot
/// be written (a read-only or full disk) costs the next compile time, not this one its result.
fn write(dir: &Path, key: &str, ext: &str, object: &[u8]) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tag = format!("{}.{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    let tmp = dir.join(format!(".{key}.{tag}.tmp"));
    let mut bytes = Vec::with_capacity(MAGIC.len() + 32 + object.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&Sha256::digest(object));
    bytes.extend_from_slice(object);
    let stored =
        std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, dir.join(format!("{key}.{ext}"))));
    if stored.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// The cache's size limit in bytes: `KILN_KERNEL_CACHE_LIMIT_MB` (mebibytes), else
/// [`DEFAULT_LIMIT`].
pub fn limit() -> u64 {
    std::env::var("KILN_KERNEL_CACHE_LIMIT_MB")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(DEFAULT_LIMIT, |mb| mb << 20)
}

/// The entries of the cache at `dir` and their bytes (none where it does not exist yet).
pub fn usage(dir: &Path) -> (u64, u64) {
    let Ok(read) = std::fs::read_dir(dir) else { return (0, 0) };
    read.flatten()
        .filter(|e| e.path().extension().is_some_and(|x| EXTENSIONS.iter().any(|ext| x == *ext)))
        .filter_map(|e| e.metadata().ok().filter(|m| m.is_file()))
        .fold((0, 0), |(n, bytes), m| (n + 1, bytes + m.len()))
}

/// Removes every entry of the cache at `dir`, and the temporary files of writes in progress or
/// interrupted (a compile writing one now stores nothing, and compiles on). Returns the entries
/// removed and their bytes.
pub fn clear(dir: &Path) -> (u64, u64) {
    let Ok(read) = std::fs::read_dir(dir) else { return (0, 0) };
    let mut removed = (0, 0);
    for e in read.flatten() {
        let (path, Ok(meta)) = (e.path(), e.metadata()) else { continue };
        let name = e.file_name().to_string_lossy().into_owned();
        let entry = path.extension().is_some_and(|x| EXTENSIONS.iter().any(|e| x == *e));
        if !meta.is_file() || !(entry || (name.starts_with('.') && name.ends_with(".tmp"))) {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() && entry {
            removed = (removed.0 + 1, removed.1 + meta.len());
        }
    }
    removed
}

/// Removes the least recently used entries of `dir` until it holds at most three quarters of
/// `limit`, if it holds more than `limit`; also temporary files an interrupted write left (an
/// hour old or more). Returns the entries removed.
pub fn prune(dir: &Path, limit: u64) -> usize {
    let Ok(read) = std::fs::read_dir(dir) else { return 0 };
    let now = std::time::SystemTime::now();
    let mut entries = Vec::new();
    let mut total = 0u64;
    for e in read.flatten() {
        let (path, Ok(meta)) = (e.path(), e.metadata()) else { continue };
        let modified = meta.modified().unwrap_or(now);
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".tmp") {
            if now.duration_since(modified).is_ok_and(|d| d.as_secs() >= 3600) {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        if path.extension().is_some_and(|x| EXTENSIONS.iter().any(|e| x == *e)) && meta.is_file() {
            total += meta.len();
            entries.push((modified, meta.len(), path));
        }
    }
    if total <= limit {
        return 0;
    }
    entries.sort();
    let mut removed = 0;
    for (_, len, path) in entries {
        if total <= limit / 4 * 3 {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= len;
            removed += 1;
        }
    }
    removed
}

/// What a target's emission through the cache gives: its output, how it used the cache, and what
/// each kernel it compiled cost.
pub type Emitted<T> = (T, Use, Vec<KernelTime>);

/// [`cpu::objects`] through the cache: the objects of `module`'s kernels in kernel order, those
/// the cache holds taken from it, the others compiled (in parallel) and stored, with what each
/// compiled one cost. Without a cache, every kernel is compiled.
pub fn objects(module: &LoweredModule) -> Result<Emitted<Vec<Vec<u8>>>, EmitError> {
    let time = |m: &LoweredModule, i: usize, cpu| KernelTime {
        kernel: m.kernels[i].name.clone(),
        target: Target::Cpu,
        cpu,
    };
    let Some(dir) = dir() else {
        let (objects, times): (Vec<_>, Vec<_>) = cpu::objects_timed(module)?.into_iter().unzip();
        let compiled = objects.len() as u64;
        let times = times.into_iter().enumerate().map(|(i, t)| time(module, i, t)).collect();
        return Ok((objects, Use { found: 0, compiled }, times));
    };
    let alone = |i: usize| LoweredModule { target: module.target, kernels: vec![module.kernels[i].clone()] };
    let keys: Vec<String> = (0..module.kernels.len()).map(|i| key(&alone(i))).collect();
    let mut found: Vec<Option<Vec<u8>>> = keys.iter().map(|k| read(&dir, k, OBJECT)).collect();
    let missing: Vec<usize> = (0..found.len()).filter(|&i| found[i].is_none()).collect();
    let rest = LoweredModule {
        target: module.target,
        kernels: missing.iter().map(|&i| module.kernels[i].clone()).collect(),
    };
    let compiled = cpu::objects_timed(&rest)?;
    let used = Use { found: (found.len() - missing.len()) as u64, compiled: missing.len() as u64 };
    let mut times = Vec::with_capacity(missing.len());
    for (&i, (object, cpu)) in missing.iter().zip(compiled) {
        write(&dir, &keys[i], OBJECT, &object);
        found[i] = Some(object);
        times.push(time(module, i, cpu));
    }
    if used.compiled > 0 {
        prune(&dir, limit());
    }
    Ok((found.into_iter().flatten().collect(), used, times))
}

/// [`gpu::ptx`] through the cache: each kernel's PTX (or the whole module's, where
/// [`gpu::ptx`] compiles it whole) taken from the cache or compiled and stored, with what each
/// kernel compiled alone cost.
pub fn ptx(module: &LoweredModule) -> Result<Emitted<String>, EmitError> {
    let all = module.kernels.len() as u64;
    let dir = dir();
    let found = AtomicU64::new(0);
    let times = std::sync::Mutex::new(Vec::new());
    let part = |m: &LoweredModule| -> Result<String, EmitError> {
        let key = dir.as_ref().map(|_| key(m));
        if let (Some(dir), Some(key)) = (&dir, &key) {
            if let Some(text) = read(dir, key, PTX).and_then(|b| String::from_utf8(b).ok()) {
                found.fetch_add(m.kernels.len() as u64, Ordering::Relaxed);
                return Ok(text);
            }
        }
        let (text, cpu) = timed(|| gpu::module_ptx(m))?;
        if let [kernel] = &m.kernels[..] {
            let time = KernelTime { kernel: kernel.name.clone(), target: Target::Gpu, cpu };
            times.lock().unwrap_or_else(|e| e.into_inner()).push(time);
        }
        if let (Some(dir), Some(key)) = (&dir, &key) {
            write(dir, key, PTX, text.as_bytes());
        }
        Ok(text)
    };
    let text = gpu::ptx_by(module, &part)?;
    let found = found.into_inner().min(all);
    if let (Some(dir), true) = (&dir, found < all) {
        prune(dir, limit());
    }
    let mut times = times.into_inner().unwrap_or_else(|e| e.into_inner());
    // In kernel order, whichever thread finished first.
    let order: std::collections::HashMap<&str, usize> =
        module.kernels.iter().enumerate().map(|(i, k)| (k.name.as_str(), i)).collect();
    times.sort_by_key(|t| order.get(t.kernel.as_str()).copied());
    Ok((text, Use { found, compiled: all - found }, times))
}

/// [`toolchain::ptxas_check_on`] through the cache: `ptxas`'s report on this PTX, and whether it
/// came from the cache. A check that fails is not kept.
pub fn ptxas_check(
    tool: &Path,
    ptx: &str,
    arch: &str,
    threads: usize,
) -> Result<(String, bool), ToolchainError> {
    let Some(dir) = dir() else {
        return Ok((toolchain::ptxas_check_on(tool, ptx, arch, threads)?, false));
    };
    let mut k = Key::new("ptxas");
    let identity =
        tool.metadata().map(|m| format!("{} {:?}", m.len(), m.modified().ok())).unwrap_or_default();
    k.part("tool", format!("{} {identity}", tool.display()).as_bytes());
    k.part("arch", arch.as_bytes());
    k.part("threads", threads.to_string().as_bytes());
    k.part("ptx", ptx.as_bytes());
    let key = k.finish();
    if let Some(report) = read(&dir, &key, PTXAS).and_then(|b| String::from_utf8(b).ok()) {
        return Ok((report, true));
    }
    let report = toolchain::ptxas_check_on(tool, ptx, arch, threads)?;
    write(&dir, &key, PTXAS, report.as_bytes());
    Ok((report, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    /// Entries of 100 bytes, each used a second after the one before: over a 500-byte limit the
    /// oldest go first until three quarters of it is left; old temporary files go, other files
    /// stay.
    #[test]
    fn prune_removes_the_least_recently_used_entries_first() {
        let dir = tempfile::tempdir().unwrap();
        let base = SystemTime::now() - Duration::from_secs(7200);
        for i in 0..8u64 {
            let path = dir.path().join(format!("{i:02}.{OBJECT}"));
            std::fs::write(&path, [0u8; 100]).unwrap();
            let f = std::fs::File::options().append(true).open(&path).unwrap();
            // Entry 3 was read last.
            let used = if i == 3 { 100 } else { i };
            f.set_modified(base + Duration::from_secs(used)).unwrap();
        }
        let stale = dir.path().join(".00.1.0.tmp");
        std::fs::write(&stale, b"partial").unwrap();
        std::fs::File::options().append(true).open(&stale).unwrap().set_modified(base).unwrap();
        std::fs::write(dir.path().join("notes.txt"), [0u8; 1000]).unwrap();

        assert_eq!(prune(dir.path(), 800), 0);
        assert_eq!(prune(dir.path(), 500), 5);
        let mut left: Vec<String> = (std::fs::read_dir(dir.path()).unwrap())
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["03.o", "06.o", "07.o", "notes.txt"]);
    }
}
