//! The CPU backend: an artifact's `kernels.so` under the executor ([`crate::exec`]).
//!
//! [`CpuBackend::open`] checks the host (the library's triple) and opens the library. Memory is
//! host memory, zeroed and aligned ([`Memory`]); a parameter that arrives as a [`MappedTensor`] (a
//! checkpoint tensor stored exactly as its compiled storage) is not copied at all: kernels read the
//! checkpoint's mapping, which the model keeps alive (kernels never write parameters, so the
//! read-only mapping suffices).
//!
//! [`Backend::bind`] resolves every kernel it binds, trusting nothing the manifest says on its own:
//! the entry is the kernel's own packed entry (`{name}_packed`, checked by the manifest's
//! validation), and the library's signature of the kernel (`{name}_signature`, written by the
//! compiler next to the entry) must equal the one the manifest implies
//! ([`kiln_ir::artifact::KernelEntry::cpu_signature`]): the buffer types the launches pass, the
//! sizes, and the work range. A manifest edited to give a kernel a larger work range, another
//! kernel's entry, or buffers of other types is refused with the field it changed, instead of a
//! kernel running out of bounds. Each launch's pointer array is computed once: buffers never move.
//!
//! [`Backend::run`] runs the launches in order. A launch whose work is large enough (see
//! [`CpuOptions::parallel_min_bytes`]) is split over a thread pool started for the run (`pool.rs`);
//! others run on the calling thread.

pub mod pool;

use std::ffi::CStr;
use std::ops::Range;
use std::os::raw::c_char;
use std::sync::Mutex;

use kiln_ir::artifact::{self, CpuKernel, Manifest, Step, PACKED_SUFFIX, SIGNATURE_SUFFIX};
use kiln_ir::{Dim, Sym, SymBindings};

use crate::artifact::Artifact;
use crate::exec::{After, Backend, Binding, Executor, ParamBytes};
use crate::host::Memory;
use crate::weights::MappedTensor;
use crate::RuntimeError;

use pool::{run_range, Job, Packed, Workers};

pub use crate::exec::{KernelTime, LayerLoad};

/// A loaded artifact with its weights, ready to run on the CPU.
pub type CpuModel = Executor<CpuBackend>;

/// How to run.
#[derive(Clone, Debug)]
pub struct CpuOptions {
    /// Threads per launch, the calling one included (default: every core the OS gives the process).
    pub threads: usize,
    /// The largest sizes runs will use; memory is sized for them. Default: the artifact's maxima.
    pub max: Option<SymBindings>,
    /// A launch is split over the threads when the buffers it reads and writes total at least this
    /// many bytes (and its work has at least two items): below that, waking the pool costs more
    /// than the kernel.
    pub parallel_min_bytes: u64,
}

impl Default for CpuOptions {
    fn default() -> CpuOptions {
        CpuOptions {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max: None,
            parallel_min_bytes: 64 << 10,
        }
    }
}

/// The most threads a launch may be split over: four per core the OS gives this process. More
/// only adds wake-ups to every launch, and far more fails to start (each thread reserves a stack).
pub fn max_threads() -> usize {
    4 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Checks a number of threads asked for: at least 1 and at most [`max_threads`].
pub fn check_threads(threads: usize) -> Result<(), RuntimeError> {
    if threads == 0 {
        return Err(RuntimeError::BadOption("the number of threads must be at least 1".into()));
    }
    let max = max_threads();
    if threads > max {
        return Err(RuntimeError::BadOption(format!(
            "{threads} threads is more than this machine can use: at most {max}, four per core of its {}; \
             the default, one per core, is usually fastest",
            max / 4
        )));
    }
    Ok(())
}

/// The host's kernel library and how to split launches over threads.
pub struct CpuBackend {
    library: libloading::Library,
    threads: usize,
    parallel_min_bytes: u64,
    /// The pool's workers, started by the first run that needs them and kept (a run from another
    /// thread while one holds them starts its own for that run).
    workers: Mutex<Option<Workers>>,
}

/// Host memory: an allocation of the model's own, or a checkpoint's mapping used in place.
pub enum CpuMemory {
    Owned(Memory),
    Mapped(MappedTensor),
}

impl CpuMemory {
    fn bytes(&self) -> &[u8] {
        match self {
            CpuMemory::Owned(m) => m.bytes(),
            CpuMemory::Mapped(t) => t.bytes(),
        }
    }
}

/// One launch, ready to call.
pub struct Launch {
    entry: Packed,
    /// Arguments, results and scratch, at their fixed addresses.
    ptrs: Vec<*mut u8>,
    /// The sizes the kernel takes, rewritten for each run; launches point into it.
    sizes: Vec<i64>,
    syms: Vec<Sym>,
    cpu: CpuKernel,
    /// Each buffer's element size and shape, to weigh the launch at a run's sizes.
    buffers: Vec<(u64, Vec<Dim>)>,
}

/// A program's launches.
pub struct Launches(Vec<Launch>);

// SAFETY: the raw pointers in a `Launch` point into memory owned by the executor that owns these
// launches (its arena, parameters, constants, states and folded values) or into the library the
// backend owns; nothing is shared with another owner except mapped parameters, which are only read.
unsafe impl Send for Launches {}
// SAFETY: as above; `CpuBackend` holds the library handle, which is usable from any thread.
unsafe impl Send for CpuBackend {}

impl CpuBackend {
    /// The packed entry of kernel `k`, after checking the library's signature of it against the
    /// manifest's.
    fn entry(&self, m: &Manifest, k: usize) -> Result<Packed, RuntimeError> {
        let entry = &m.kernels[k];
        let cpu = entry.cpu.as_ref().ok_or(RuntimeError::NoCpuTarget)?;
        let missing = |symbol: String| RuntimeError::MissingSymbol {
            kernel: entry.id.to_string(),
            name: entry.name.clone(),
            symbol,
        };
        let sig_symbol = format!("{}{SIGNATURE_SUFFIX}", entry.name);
        // SAFETY: the compiler writes `{name}_signature` as a NUL-terminated constant string, and
        // the manifest's validation allows only names of kernels (`k_[a-z0-9_]+`), none of which a
        // system library exports. The string is read before anything else of the library runs.
        let library_sig = unsafe {
            let sym = self
                .library
                .get::<*const c_char>(sig_symbol.as_bytes())
                .map_err(|_| missing(sig_symbol.clone()))?;
            let ptr: *const c_char = *sym;
            if ptr.is_null() {
                return Err(missing(sig_symbol));
            }
            CStr::from_ptr(ptr).to_string_lossy().into_owned()
        };
        let manifest_sig = artifact::signature(&entry.args, &entry.sym_args, cpu.work, &cpu.phases);
        if library_sig != manifest_sig {
            // Name the field that differs: the buffer types, the sizes, or the work.
            let part = |s: &str, i: usize| s.split(" | ").nth(i).unwrap_or_default().to_string();
            let field = if part(&library_sig, 3) != part(&manifest_sig, 3) {
                "cpu.work"
            } else if part(&library_sig, 2) != part(&manifest_sig, 2) {
                "sym_args"
            } else {
                "args"
            };
            return Err(RuntimeError::KernelSignature {
                field: format!("kernels[{k}].{field}"),
                name: entry.name.clone(),
                library: library_sig,
                manifest: manifest_sig,
            });
        }
        debug_assert_eq!(cpu.symbol, format!("{}{PACKED_SUFFIX}", entry.name));
        // SAFETY: every packed entry kiln exports has the `Packed` signature, and this one was
        // compiled for the buffers and work the manifest gives it (checked just above).
        unsafe { self.library.get::<Packed>(cpu.symbol.as_bytes()) }
            .map(|sym| *sym)
            .map_err(|_| missing(cpu.symbol.clone()))
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}

impl Backend for CpuBackend {
    type Memory = CpuMemory;
    type Launches = Launches;
    type Options = CpuOptions;

    fn open(artifact: &Artifact, options: &CpuOptions) -> Result<CpuBackend, RuntimeError> {
        let m = artifact.manifest();
        let target = m.cpu.as_ref().ok_or(RuntimeError::NoCpuTarget)?;
        let arch = target.triple.split('-').next().unwrap_or_default();
        if arch != std::env::consts::ARCH {
            return Err(RuntimeError::WrongHost {
                triple: target.triple.clone(),
                host: std::env::consts::ARCH,
            });
        }
        check_threads(options.threads)?;
        let path = artifact.path(&target.library);
        // SAFETY: kiln's kernel libraries have no initialisers or global constructors; the library
        // was checked against its hash in the manifest by `artifact::load`, and it stays loaded for
        // as long as the entries taken from it (the backend is dropped after the launches).
        let library = unsafe { libloading::Library::new(&path) }
            .map_err(|e| RuntimeError::Library { path: path.clone(), message: e.to_string() })?;
        Ok(CpuBackend {
            library,
            threads: options.threads,
            parallel_min_bytes: options.parallel_min_bytes,
            workers: Mutex::new(None),
        })
    }

    fn describe(&self) -> String {
        format!("CPU ({} threads)", self.threads)
    }

    fn fits(&self, bytes: u64, what: &str) -> Result<(), RuntimeError> {
        crate::host::check_fits(bytes, what)
    }

    fn alloc(&self, bytes: u64, what: &str) -> Result<CpuMemory, RuntimeError> {
        crate::host::check_fits(bytes, what)?;
        Memory::zeroed(bytes)
            .map(CpuMemory::Owned)
            .ok_or_else(|| RuntimeError::OutOfMemory { bytes, what: what.to_string() })
    }

    fn param(&self, bytes: ParamBytes, what: &str) -> Result<CpuMemory, RuntimeError> {
        match bytes {
            ParamBytes::Mapped(t) => Ok(CpuMemory::Mapped(t)),
            ParamBytes::Owned(v) => {
                let mut mem = self.alloc(v.len() as u64, what)?;
                self.write(&mut mem, 0, &v)?;
                Ok(mem)
            }
        }
    }

    fn len(&self, mem: &CpuMemory) -> usize {
        mem.bytes().len()
    }

    fn is_mapped(&self, mem: &CpuMemory) -> bool {
        matches!(mem, CpuMemory::Mapped(_))
    }

    fn write(&self, mem: &mut CpuMemory, offset: usize, bytes: &[u8]) -> Result<(), RuntimeError> {
        let CpuMemory::Owned(m) = mem else {
            return Err(RuntimeError::BadOption("a checkpoint's mapping is read-only".into()));
        };
        let dst = offset.checked_add(bytes.len()).and_then(|end| m.bytes_mut().get_mut(offset..end));
        let Some(dst) = dst else {
            return Err(RuntimeError::BadOption(format!(
                "a write of {} bytes at {offset} does not fit an allocation of {}",
                bytes.len(),
                m.len()
            )));
        };
        dst.copy_from_slice(bytes);
        Ok(())
    }

    fn read(&self, mem: &CpuMemory, range: Range<usize>) -> Result<Vec<u8>, RuntimeError> {
        let len = mem.bytes().len();
        mem.bytes().get(range.clone()).map(<[u8]>::to_vec).ok_or_else(|| {
            RuntimeError::BadOption(format!("bytes {range:?} lie outside an allocation of {len}"))
        })
    }

    fn read_with(
        &self,
        mem: &CpuMemory,
        range: Range<usize>,
        f: &mut dyn FnMut(&[u8]),
    ) -> Result<(), RuntimeError> {
        let len = mem.bytes().len();
        f(mem.bytes().get(range.clone()).ok_or_else(|| {
            RuntimeError::BadOption(format!("bytes {range:?} lie outside an allocation of {len}"))
        })?);
        Ok(())
    }

    fn read_into(&self, mem: &CpuMemory, dst: &mut [u8]) -> Result<(), RuntimeError> {
        let len = mem.bytes().len();
        let src = mem.bytes().get(..dst.len()).ok_or_else(|| {
            RuntimeError::BadOption(format!("{} bytes lie outside an allocation of {len}", dst.len()))
        })?;
        dst.copy_from_slice(src);
        Ok(())
    }

    fn address(&self, mem: &CpuMemory) -> u64 {
        match mem {
            CpuMemory::Owned(m) => m.as_ptr() as u64,
            CpuMemory::Mapped(t) => t.as_ptr() as u64,
        }
    }

    fn bind(&self, what: &Binding) -> Result<Launches, RuntimeError> {
        let Binding { manifest: m, program, steps, address, max } = *what;
        let mut entries: Vec<Option<Packed>> = vec![None; m.kernels.len()];
        let mut out = Vec::with_capacity(steps.len());
        for &i in steps {
            let Some(Step::Launch { kernel, buffers, .. }) = program.steps.get(i) else { continue };
            let k = m.kernel(*kernel);
            let entry = match entries[kernel.index()] {
                Some(e) => e,
                None => *entries[kernel.index()].insert(self.entry(m, kernel.index())?),
            };
            let cpu = k.cpu.as_ref().ok_or(RuntimeError::NoCpuTarget)?;
            if cpu.ranges(max).is_none() {
                return Err(RuntimeError::BadOption(format!("the work of kernel `{}` overflows", k.name)));
            }
            out.push(Launch {
                entry,
                ptrs: buffers.iter().map(|&b| address(b) as *mut u8).collect(),
                sizes: vec![0; k.sym_args.len()],
                syms: k.sym_args.clone(),
                cpu: cpu.clone(),
                buffers: buffers
                    .iter()
                    .map(|&b| (program.buffer(b).dtype.size_bytes(), program.buffer(b).shape.clone()))
                    .collect(),
            });
        }
        Ok(Launches(out))
    }

    fn run(
        &self,
        todo: &mut Launches,
        range: Range<usize>,
        at: &SymBindings,
        then: &mut After<Self>,
    ) -> Result<(), RuntimeError> {
        let todo = &mut todo.0[range.clone()];
        for l in todo.iter_mut() {
            for (slot, &s) in l.sizes.iter_mut().zip(&l.syms) {
                *slot = at.get(s) as i64;
            }
        }
        // One job per range of the kernel: its work, or each phase of a phased kernel in turn.
        let jobs = |l: &Launch| -> Vec<Job> {
            let ranges = l.cpu.ranges(at).unwrap_or_default();
            (ranges.into_iter())
                .map(|(first, work)| Job {
                    entry: l.entry,
                    buffers: l.ptrs.as_ptr(),
                    sizes: l.sizes.as_ptr(),
                    first: first as i64,
                    work: work as i64,
                    chunks: 1,
                })
                .collect()
        };
        if self.threads == 1 {
            for (i, l) in (range.start..).zip(todo.iter()) {
                for j in jobs(l) {
                    // SAFETY: the entry was resolved from the artifact's library for this kernel and
                    // its signature checked against the manifest; its pointers address buffers of
                    // the kernel's types, allocated for sizes up to the loaded maxima, which `sizes`
                    // is within (checked by the executor), and the sizes array is the kernel's.
                    unsafe { run_range(&j, j.first, j.first + j.work) };
                }
                then(self, i)?;
            }
            return Ok(());
        }
        let mut held = self.workers.try_lock().ok();
        let mut own = None;
        let workers: &Workers = match held.as_deref_mut() {
            Some(kept) => kept.get_or_insert_with(|| Workers::start(self.threads)),
            None => own.insert(Workers::start(self.threads)),
        };
        let pool = workers.pool();
        {
            for (i, l) in (range.start..).zip(todo.iter()) {
                let bytes: u64 = (l.buffers.iter())
                    .map(|(size, shape)| artifact_bytes(*size, shape, at))
                    .fold(0u64, u64::saturating_add);
                // The phases of a phased kernel one after another: `launch` returns when every
                // chunk has finished, the barrier a phase needs.
                for mut j in jobs(l) {
                    if j.work >= 2 && bytes >= self.parallel_min_bytes {
                        j.chunks = pool::chunks(j.work, pool.threads());
                        // SAFETY: as above, for every item.
                        unsafe { pool.launch(j) };
                    } else {
                        // SAFETY: as above.
                        unsafe { run_range(&j, j.first, j.first + j.work) };
                    }
                }
                then(self, i)?;
            }
            Ok(())
        }
    }

    fn max_sizes(options: &CpuOptions) -> Option<SymBindings> {
        options.max
    }
}

fn artifact_bytes(size: u64, shape: &[Dim], sizes: &SymBindings) -> u64 {
    shape.iter().try_fold(size, |acc, d| acc.checked_mul(d.eval(sizes)?)).unwrap_or(u64::MAX)
}

impl Executor<CpuBackend> {
    pub fn threads(&self) -> usize {
        self.backend().threads()
    }
}
