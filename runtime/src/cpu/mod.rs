//! The CPU backend: runs an artifact's program on its `kernels.so`.
//!
//! [`CpuModel::load`] does everything that can fail before the first run: it opens the library and
//! resolves every kernel's packed entry ([`RuntimeError::MissingSymbol`]), refuses programs with
//! pipeline `send`/`recv` steps ([`RuntimeError::Distributed`]), allocates ONE activation arena,
//! binds the parameters and fills the constants, and computes each launch's pointer array once
//! (every buffer has a fixed address from then on).
//!
//! The arena is sized for the largest sizes the caller asks for ([`CpuOptions::max`], at most what
//! the artifact was compiled for): the plan's offsets hold for any sizes up to the compiled maxima,
//! so the arena needs `max(offset + bytes at the requested maxima)` over the arena buffers, which is
//! less than the manifest's `arena_bytes` when smaller maxima are asked for.
//!
//! Parameters are stored in their compiled dtypes: f32, bf16, f16, and FP8 E4M3 as one byte per
//! element (next to their f32 `_scale_inv` parameters); each is converted from its
//! [`HostTensor`] as it arrives, so a checkpoint streams through without being held twice. A
//! parameter that arrives as a [`MappedTensor`] (`weights::bind_mapped`: a checkpoint tensor stored
//! exactly as its compiled storage) is not copied at all: the kernels read the checkpoint's mapping,
//! which the model keeps alive. Kernels never write parameters, so the read-only mapping suffices.
//!
//! [`CpuModel::run`] binds `B`, `T`, `S` from the inputs' shapes, checks every input and every token
//! id (the kernels clamp out-of-range ids, so a bad id would silently read another row: ids that
//! feed an `embedding` are checked against its table before anything runs), writes the inputs into
//! their arena slots, and runs the steps in order. A launch whose work is large enough (see
//! [`CpuOptions::parallel_min_bytes`]) is split over the thread pool (`pool.rs`); others run on the
//! calling thread. Aliases are views (nothing runs). Outputs stay in the arena until the next run
//! and are read with [`CpuModel::output`] and [`CpuModel::output_f32`].
//!
//! An artifact compiled with a KV cache has two programs, the prefill ([`CpuModel::run`]) and the
//! decode ([`CpuModel::run_decode`]), each with its own arena and launches, sharing the parameters,
//! the kernel library and the KV caches: every `Storage::State` buffer is allocated once, at the
//! loaded maxima (`B x S`), and lives as long as the model. The caller never passes a cache; `S` is
//! always the cache's capacity, and every position must be a slot of it (checked before a run,
//! since the in-place update would otherwise write out of bounds).
//!
//! Weight-only launches (every input a parameter, a constant or another weight-only value: the
//! concatenated down-projections and the per-head halves of `kv_b_proj` that `fuse-mla-latent`
//! makes, or a dequantised FP8 weight read whole) run once at load into memory of their own
//! ([`CpuModel::folded_bytes`]) and are not among the launches of a run. Each program folds its
//! own: a value both programs compute is held twice.
//!
//! After each run the model adds the rows each expert of each MoE layer received to
//! [`CpuModel::expert_load`] (read from the `moe_dispatch` kernels' `offsets`, see `expert_load.rs`;
//! padding rows of a batch are counted like real tokens).

mod expert_load;
mod pool;

use std::cell::Cell;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use kiln_ir::artifact::{ArgRole, BufferId, KernelIndex, Manifest, Step, Storage};
use kiln_ir::{DType, Dim, Sym, SymBindings};

use crate::artifact::Artifact;
use crate::host::{decode, decode_f32, encode, Memory};
use crate::weights::{manifest_params, HostData, HostTensor, MappedTensor, Param, WeightError};
use crate::RuntimeError;

use expert_load::Probe;
use pool::{run_range, Job, Packed, Pool, Shared};

pub use expert_load::LayerLoad;

/// How to run.
#[derive(Clone, Debug)]
pub struct CpuOptions {
    /// Threads per launch, the calling one included (default: every core the OS gives the process).
    pub threads: usize,
    /// The largest sizes runs will use; the arena is sized for them. Default: the artifact's maxima.
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

/// One launch of the program, ready to call.
struct Launch {
    entry: Packed,
    kernel: usize,
    /// Arguments then results, at their fixed addresses.
    ptrs: Vec<*mut u8>,
    buffers: Vec<BufferId>,
    work: Dim,
}

/// Where a parameter's bytes live.
enum ParamMemory {
    /// Converted into an allocation of its own.
    Owned(Memory),
    /// Borrowed from a checkpoint's mapping.
    Mapped(MappedTensor),
}

impl ParamMemory {
    fn bytes(&self) -> &[u8] {
        match self {
            ParamMemory::Owned(m) => m.bytes(),
            ParamMemory::Mapped(t) => t.bytes(),
        }
    }

    /// The address kernels get. Kernels only read parameters, so a mapped (read-only) one is never
    /// written through it.
    fn as_ptr(&self) -> *mut u8 {
        match self {
            ParamMemory::Owned(m) => m.as_ptr(),
            ParamMemory::Mapped(t) => t.as_ptr().cast_mut(),
        }
    }
}

/// A loaded artifact with its weights, ready to run on the CPU. See the module documentation.
pub struct CpuModel {
    manifest: Manifest,
    launches: Vec<Launch>,
    arena: Memory,
    /// Parameters by name and constants by buffer: owned (or, for mapped parameters, kept alive)
    /// here, pointed to by `launches`.
    params: Arc<HashMap<String, ParamMemory>>,
    constants: HashMap<BufferId, Memory>,
    /// The KV caches by name, shared with the other program of the artifact.
    states: Arc<HashMap<String, Memory>>,
    max: SymBindings,
    threads: usize,
    parallel_min_bytes: u64,
    /// Inputs that feed an embedding, with the number of rows of the smallest table they index.
    token_inputs: HashMap<String, u64>,
    /// The sizes of the last run, whose outputs the arena holds.
    last: Option<SymBindings>,
    /// The `moe_dispatch` launches, with the load they have seen.
    moe: Vec<Probe>,
    /// The decode program of an artifact with a KV cache.
    decode: Option<Box<CpuModel>>,
    /// Whether the last run was of the decode program (whose outputs are then the ones to read).
    decoded: bool,
    /// Weight-only values computed once at load (see [`CpuModel::load`]), pointed to by launches.
    folded: HashMap<BufferId, Memory>,
    /// Nanoseconds spent in each launch over every run, when profiling ([`CpuModel::set_profiling`]).
    profile: Option<Vec<Cell<u64>>>,
    // Declared last: dropped after everything that points into it (the entries above).
    _library: Arc<libloading::Library>,
}

/// One kernel's share of a profile ([`CpuModel::profile`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelTime {
    pub name: String,
    /// Launches of the kernel in one run of each program that has it (its layers, mostly).
    pub launches: usize,
    pub nanos: u64,
}

/// The buffer an alias chain ends at.
fn root(alias_of: &HashMap<BufferId, BufferId>, b: BufferId) -> BufferId {
    alias_of.get(&b).copied().unwrap_or(b)
}

/// What the programs of one artifact share: parameters, KV caches and the kernel library.
struct SharedMemory {
    params: Arc<HashMap<String, ParamMemory>>,
    states: Arc<HashMap<String, Memory>>,
    library: Arc<libloading::Library>,
}

/// Checks the sizes a program is loaded for against what it was compiled for.
fn check_max(m: &Manifest, max: &SymBindings) -> Result<(), RuntimeError> {
    let compiled = m.max_sizes();
    for sym in Sym::ALL {
        let (v, limit) = (max.get(sym), compiled.get(sym));
        if m.max(sym).is_some() && (v == 0 || v > limit) {
            return Err(RuntimeError::Size {
                sym: sym.name(),
                value: v,
                max: limit,
                why: "the sizes the artifact was compiled for (kiln compile --max-batch, --max-context)",
            });
        }
    }
    Ok(())
}

// SAFETY: the raw pointers in `launches` point into memory this struct owns (`arena`, `params`,
// `constants`) or into `_library`, which it also owns; nothing is shared with another owner, except
// mapped parameters, which are only read.
unsafe impl Send for CpuModel {}

impl CpuModel {
    /// Loads `artifact` for the CPU with the given parameters (each by name, in any order, every
    /// declared one exactly once): [`HostTensor`]s, or [`Param`]s, whose mapped tensors are used
    /// without a copy. See the module documentation for what is checked.
    pub fn load<P: Into<Param>>(
        artifact: &Artifact,
        params: impl IntoIterator<Item = Result<P, WeightError>>,
        options: &CpuOptions,
    ) -> Result<CpuModel, RuntimeError> {
        let m = artifact.manifest();
        let target = m.cpu.as_ref().ok_or(RuntimeError::NoCpuTarget)?;
        let arch = target.triple.split('-').next().unwrap_or_default();
        if arch != std::env::consts::ARCH {
            return Err(RuntimeError::WrongHost {
                triple: target.triple.clone(),
                host: std::env::consts::ARCH,
            });
        }
        if options.threads == 0 {
            return Err(RuntimeError::BadOption("the number of threads must be at least 1".into()));
        }
        for (step, s) in m.program.iter().enumerate() {
            let what = match s {
                Step::Send { peer, .. } => format!("send to stage {peer}"),
                Step::Recv { peer, .. } => format!("receive from stage {peer}"),
                _ => continue,
            };
            return Err(RuntimeError::Distributed { step, what });
        }
        let compiled = m.max_sizes();
        let max = options.max.unwrap_or(compiled);
        check_max(m, &max)?;
        let params = Arc::new(load_params(m, params)?);
        // Every KV cache, once, at the maxima: both programs read and write the same ones.
        let mut states = HashMap::new();
        for (name, dtype, shape) in m.states() {
            let bytes = shape.iter().try_fold(dtype.size_bytes(), |a, d| a.checked_mul(d.eval(&max)?));
            let bytes = bytes.unwrap_or(u64::MAX);
            let mem = Memory::zeroed(bytes)
                .ok_or_else(|| RuntimeError::OutOfMemory { bytes, what: format!("the KV cache `{name}`") })?;
            states.insert(name.to_string(), mem);
        }
        let states = Arc::new(states);

        let library_path = artifact.path(&target.library);
        // SAFETY: kiln's kernel libraries have no initialisers or global constructors; the library
        // was checked against its hash in the manifest by `artifact::load`, and it stays loaded for
        // as long as the entries taken from it (it is dropped last).
        let library = unsafe { libloading::Library::new(&library_path) }
            .map_err(|e| RuntimeError::Library { path: library_path.clone(), message: e.to_string() })?;
        let library = Arc::new(library);
        let shared = SharedMemory { params, states, library };
        let mut model = CpuModel::program(m, max, &shared, options)?;
        if let Some(d) = m.decode_view() {
            let dmax = SymBindings { t: 1, ..max };
            check_max(&d, &dmax)?;
            model.decode = Some(Box::new(CpuModel::program(&d, dmax, &shared, options)?));
        }
        Ok(model)
    }

    /// The executable form of one program of the manifest `m` (the forward one, or the decode view),
    /// over memory shared with the other program.
    fn program(
        m: &Manifest,
        max: SymBindings,
        shared: &SharedMemory,
        options: &CpuOptions,
    ) -> Result<CpuModel, RuntimeError> {
        let (params, states, library) = (&shared.params, &shared.states, &shared.library);
        for p in &m.params {
            if !params.contains_key(&p.name) {
                return Err(RuntimeError::UnknownParam { name: p.name.clone() });
            }
        }
        let mut constants = HashMap::new();
        for b in &m.buffers {
            if let Storage::Constant { value } = b.storage {
                let mut mem = Memory::zeroed(b.max_bytes).ok_or_else(|| RuntimeError::OutOfMemory {
                    bytes: b.max_bytes,
                    what: format!("constant {}", b.id),
                })?;
                let n = (b.max_bytes / b.dtype.size_bytes()) as usize;
                let data = if b.dtype.is_float() {
                    HostData::F32(vec![value as f32; n])
                } else {
                    HostData::I64(vec![value as i64; n])
                };
                encode(b.dtype, &data, mem.bytes_mut()).map_err(|reason| RuntimeError::InputValue {
                    name: format!("constant {}", b.id),
                    reason,
                })?;
                constants.insert(b.id, mem);
            }
        }

        // Weight-only launches (every input a parameter, a constant or another weight-only value:
        // a concatenation or split of weights that a pass made, like `fuse-mla-latent`'s merged
        // projection) run once, here, into memory of their own, and never again.
        let folded_steps = m.weight_only_steps();
        let mut folded_mem: HashMap<BufferId, Memory> = HashMap::new();
        let mut alias_of: HashMap<BufferId, BufferId> = HashMap::new();
        for (i, s) in m.program.iter().enumerate() {
            match s {
                Step::Alias { buffer, source } if folded_mem.contains_key(&root(&alias_of, *source)) => {
                    alias_of.insert(*buffer, root(&alias_of, *source));
                }
                Step::Launch { kernel, buffers, .. } if folded_steps.contains(&i) => {
                    for (a, &b) in m.kernel(*kernel).args.iter().zip(buffers) {
                        if a.role == ArgRole::Output {
                            let bytes = m.buffer(b).max_bytes;
                            let mem = Memory::zeroed(bytes).ok_or_else(|| RuntimeError::OutOfMemory {
                                bytes,
                                what: format!("folded weight {b}"),
                            })?;
                            folded_mem.insert(b, mem);
                        }
                    }
                }
                _ => {}
            }
        }

        // The arena at the requested maxima (folded values live elsewhere); every work range must
        // be computable there too.
        let mut arena_bytes = 0u64;
        for b in &m.buffers {
            if folded_mem.contains_key(&root(&alias_of, b.id)) {
                continue;
            }
            if let Storage::Arena { offset } = b.storage {
                let end = b.bytes(&max).and_then(|n| offset.checked_add(n));
                arena_bytes = arena_bytes.max(end.unwrap_or(u64::MAX));
            }
        }
        let arena = Memory::zeroed(arena_bytes).ok_or_else(|| RuntimeError::OutOfMemory {
            bytes: arena_bytes,
            what: "the activation arena".into(),
        })?;

        let mut entries: Vec<Option<Packed>> = vec![None; m.kernels.len()];
        let mut launches = Vec::new();
        let mut folds = Vec::new();
        for (i, s) in m.program.iter().enumerate() {
            let Step::Launch { kernel, buffers, .. } = s else { continue };
            let k = m.kernel(*kernel);
            let cpu = k.cpu.as_ref().ok_or(RuntimeError::NoCpuTarget)?;
            let entry = match entries[kernel.index()] {
                Some(e) => e,
                None => {
                    // SAFETY: every packed entry kiln exports has the `Packed` signature.
                    let e = unsafe { library.get::<Packed>(cpu.symbol.as_bytes()) }.map(|sym| *sym).map_err(
                        |_| RuntimeError::MissingSymbol {
                            kernel: kernel.to_string(),
                            name: k.name.clone(),
                            symbol: cpu.symbol.clone(),
                        },
                    )?;
                    entries[kernel.index()] = Some(e);
                    e
                }
            };
            if cpu.work.eval(&max).is_none() {
                return Err(RuntimeError::BadOption(format!("the work of kernel `{}` overflows", k.name)));
            }
            let ptrs = buffers
                .iter()
                .map(|&b| match &m.buffer(b).storage {
                    _ if folded_mem.contains_key(&root(&alias_of, b)) => {
                        folded_mem[&root(&alias_of, b)].as_ptr()
                    }
                    Storage::Arena { offset } => arena.as_ptr().wrapping_add(*offset as usize),
                    Storage::Param { name } => params[name].as_ptr(),
                    Storage::Constant { .. } => constants[&b].as_ptr(),
                    Storage::State { name } => states[name].as_ptr(),
                })
                .collect();
            let launch =
                Launch { entry, kernel: kernel.index(), ptrs, buffers: buffers.clone(), work: cpu.work };
            if folded_steps.contains(&i) {
                folds.push(launch);
            } else {
                launches.push(launch);
            }
        }
        // Weight-only values have no symbolic sizes (weights never do), so any sizes run them.
        for l in &folds {
            let syms: Vec<i64> = m.kernel(KernelIndex(l.kernel as u32)).sym_args.iter().map(|_| 1).collect();
            let work = l.work.eval(&max).unwrap_or(0) as i64;
            let job = Job { entry: l.entry, buffers: l.ptrs.as_ptr(), sizes: syms.as_ptr(), work, chunks: 1 };
            // SAFETY: as for every launch (see `execute`): the entry is the kernel's and its
            // buffers are allocated at their maximum sizes.
            unsafe { run_range(&job, 0, job.work) };
        }
        let token_inputs = crate::inputs::token_inputs(m);
        Ok(CpuModel {
            manifest: m.clone(),
            launches,
            arena,
            params: Arc::clone(params),
            constants,
            states: Arc::clone(states),
            max,
            threads: options.threads,
            parallel_min_bytes: options.parallel_min_bytes,
            token_inputs,
            last: None,
            moe: expert_load::probes(m, &folded_steps),
            decode: None,
            folded: folded_mem,
            profile: None,
            decoded: false,
            _library: Arc::clone(library),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The largest sizes a run may use (what the arena was sized for).
    pub fn max_sizes(&self) -> SymBindings {
        self.max
    }

    /// Bytes of the activation arena.
    pub fn arena_bytes(&self) -> usize {
        self.arena.len()
    }

    /// Bytes of the parameters and constants, in their compiled dtypes.
    pub fn param_bytes(&self) -> usize {
        let params: usize = self.params.values().map(|p| p.bytes().len()).sum();
        params + self.constants.values().map(Memory::len).sum::<usize>()
    }

    /// Turns per-launch timing on (every counter back to zero) or off, for this program and the
    /// decode program. Timing costs a clock read per launch.
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(|| (0..self.launches.len()).map(|_| Cell::new(0)).collect());
        if let Some(d) = &mut self.decode {
            d.set_profiling(on);
        }
    }

    /// Time per kernel over every run since profiling was turned on, in both programs, most first:
    /// the kernel's name, its launches per run of its programs, and the total time.
    pub fn profile(&self) -> Vec<KernelTime> {
        let mut by_kernel: HashMap<usize, KernelTime> = HashMap::new();
        for model in std::iter::once(self).chain(self.decode.as_deref()) {
            let Some(p) = &model.profile else { continue };
            for (l, t) in model.launches.iter().zip(p) {
                let e = by_kernel.entry(l.kernel).or_insert_with(|| KernelTime {
                    name: model.manifest.kernels[l.kernel].name.clone(),
                    launches: 0,
                    nanos: 0,
                });
                e.launches += 1;
                e.nanos += t.get();
            }
        }
        let mut out: Vec<KernelTime> = by_kernel.into_values().collect();
        out.sort_by(|a, b| b.nanos.cmp(&a.nanos).then(a.name.cmp(&b.name)));
        out
    }

    /// Bytes of the weight-only values computed once at load (see [`CpuModel::load`]), in this
    /// program and the decode program.
    pub fn folded_bytes(&self) -> usize {
        let mine: usize = self.folded.values().map(Memory::len).sum();
        mine + self.decode.as_ref().map_or(0, |d| d.folded_bytes())
    }

    /// Bytes of the parameters read straight from a checkpoint's mapping (no copy); the rest of
    /// [`CpuModel::param_bytes`] was converted into memory of the model's own.
    pub fn mapped_param_bytes(&self) -> usize {
        self.params.values().filter(|p| matches!(p, ParamMemory::Mapped(_))).map(|p| p.bytes().len()).sum()
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Inputs that are token ids, with the vocabulary they index.
    pub fn token_inputs(&self) -> &HashMap<String, u64> {
        &self.token_inputs
    }

    /// Runs the program on `inputs` (each of the artifact's inputs once, by name). Everything is
    /// checked before anything is written; on an error the arena and the last outputs are as they
    /// were.
    pub fn run(&mut self, inputs: &[HostTensor]) -> Result<SymBindings, RuntimeError> {
        let sizes = self.check_inputs(inputs)?;
        // Encoded apart first: an input's slot may hold the last run's outputs, which must survive
        // a value that fails to encode.
        let mut encoded = Vec::with_capacity(inputs.len());
        for t in inputs {
            let b = self.manifest.buffer(self.input_buffer(&t.name)?);
            let Storage::Arena { offset } = b.storage else {
                return Err(RuntimeError::InputValue {
                    name: t.name.clone(),
                    reason: "not in the arena".into(),
                });
            };
            let mut bytes = vec![0u8; b.bytes(&sizes).unwrap_or(0) as usize];
            encode(b.dtype, &t.data, &mut bytes)
                .map_err(|reason| RuntimeError::InputValue { name: t.name.clone(), reason })?;
            encoded.push((offset as usize, bytes));
        }
        self.last = None;
        for (at, bytes) in encoded {
            self.arena.bytes_mut()[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        let offsets = self.execute(sizes);
        self.last = Some(sizes);
        self.decoded = false;
        for (p, o) in self.moe.iter_mut().zip(offsets) {
            p.add(&o);
        }
        Ok(sizes)
    }

    /// Rows routed to each expert of each MoE layer, in program order, summed over every run since
    /// the load or the last [`CpuModel::reset_expert_load`]. Padding rows of a batch count like real
    /// tokens. Empty for a model without MoE layers.
    pub fn expert_load(&self) -> Vec<LayerLoad> {
        self.moe.iter().map(|p| p.load.clone()).collect()
    }

    /// Sets every count of [`CpuModel::expert_load`] back to zero.
    pub fn reset_expert_load(&mut self) {
        for p in &mut self.moe {
            p.load.counts.iter_mut().for_each(|c| *c = 0);
        }
    }

    fn input_buffer(&self, name: &str) -> Result<BufferId, RuntimeError> {
        crate::inputs::input_buffer(&self.manifest, name)
    }

    /// Binds the sizes from the inputs' shapes and checks every input against its buffer, the sizes
    /// against the maxima, and token ids against their vocabularies.
    fn check_inputs(&self, inputs: &[HostTensor]) -> Result<SymBindings, RuntimeError> {
        crate::inputs::check(&self.manifest, &self.max, self.has_states(), &self.token_inputs, inputs)
    }

    /// The inputs the caller writes: every input but the KV caches, which the model keeps.
    fn caller_inputs(&self) -> impl Iterator<Item = &kiln_ir::artifact::NamedBuffer> {
        crate::inputs::caller_inputs(&self.manifest)
    }

    fn has_states(&self) -> bool {
        !self.states.is_empty()
    }

    /// Whether the artifact has a decode program over a KV cache.
    pub fn has_decode(&self) -> bool {
        self.decode.is_some()
    }

    /// Bytes of every KV cache together, and the number of tokens (`B * S` at the loaded maxima)
    /// they hold.
    pub fn kv_cache_bytes(&self) -> (u64, u64) {
        let bytes = self.states.values().map(|m| m.len() as u64).sum();
        (bytes, if self.has_states() { self.max.b * self.max.s } else { 0 })
    }

    /// Runs the decode program (see [`CpuModel::run`]) on the caches the last runs left; its
    /// outputs are then the ones [`CpuModel::output`] reads.
    pub fn run_decode(&mut self, inputs: &[HostTensor]) -> Result<SymBindings, RuntimeError> {
        let decode = self.decode.as_mut().ok_or(RuntimeError::NoDecodeProgram)?;
        let sizes = decode.run(inputs)?;
        for (p, q) in self.moe.iter_mut().zip(&mut decode.moe) {
            for (a, b) in p.load.counts.iter_mut().zip(&mut q.load.counts) {
                *a += std::mem::take(b);
            }
        }
        self.last = None;
        self.decoded = true;
        Ok(sizes)
    }

    /// Runs every launch at `sizes`, on the pool when it has more than one thread. Returns the
    /// `offsets` of each `moe_dispatch` probe, read right after its launch: the plan reuses their
    /// arena slots once the grouped GEMMs have read them.
    fn execute(&self, sizes: SymBindings) -> Vec<Vec<i64>> {
        // The sizes each kernel takes, in its `sym_args` order: one array per kernel, alive for the
        // whole run because launches point into them.
        let syms: Vec<Vec<i64>> = self
            .manifest
            .kernels
            .iter()
            .map(|k| k.sym_args.iter().map(|&s| sizes.get(s) as i64).collect())
            .collect();
        let mut offsets = Vec::with_capacity(self.moe.len());
        let mut read_probe = |i: usize| {
            if let Some(p) = self.moe.get(offsets.len()).filter(|p| p.launch == i) {
                match decode(DType::I32, self.bytes_of(p.offsets, &sizes)) {
                    HostData::I64(v) => offsets.push(v),
                    HostData::F32(_) => unreachable!("an i32 buffer decodes to integers"),
                }
            }
        };
        // With profiling on, the time from one launch's start to the next (the pool waits for
        // every launch to finish before the next starts).
        let mut clock = self.profile.as_ref().map(|_| Instant::now());
        let mut read_probe = |i: usize| {
            read_probe(i);
            if let (Some(t), Some(p)) = (clock.as_mut(), &self.profile) {
                let now = Instant::now();
                p[i].set(p[i].get() + (now - *t).as_nanos() as u64);
                *t = now;
            }
        };
        let job = |l: &Launch| {
            let work = l.work.eval(&sizes).unwrap_or(0) as i64;
            Job { entry: l.entry, buffers: l.ptrs.as_ptr(), sizes: syms[l.kernel].as_ptr(), work, chunks: 1 }
        };
        if self.threads == 1 {
            for (i, l) in self.launches.iter().enumerate() {
                let j = job(l);
                // SAFETY: the entry was resolved from the artifact's library for this kernel; its
                // pointers address buffers of the kernel's types, sized for `sizes` (checked against
                // the maxima the arena was allocated for), and the sizes array is the kernel's.
                unsafe { run_range(&j, 0, j.work) };
                read_probe(i);
            }
            return offsets;
        }
        let shared = Shared::new();
        std::thread::scope(|scope| {
            let pool = Pool::start(scope, &shared, self.threads);
            for (i, l) in self.launches.iter().enumerate() {
                let mut j = job(l);
                let bytes: u64 =
                    l.buffers.iter().map(|&b| self.manifest.buffer(b).bytes(&sizes).unwrap_or(0)).sum();
                if j.work >= 2 && bytes >= self.parallel_min_bytes {
                    // A few chunks per thread, so that unequal items still balance.
                    j.chunks = j.work.min(4 * pool.threads() as i64);
                    pool.launch(j);
                } else {
                    // SAFETY: as above.
                    unsafe { run_range(&j, 0, j.work) };
                }
                read_probe(i);
            }
        });
        offsets
    }

    fn output_buffer(&self, name: &str) -> Result<(BufferId, SymBindings), RuntimeError> {
        let o = self.manifest.outputs.iter().find(|o| o.name == name).ok_or_else(|| {
            RuntimeError::NoSuchOutput {
                name: name.to_string(),
                known: self
                    .manifest
                    .outputs
                    .iter()
                    .map(|o| format!("`{}`", o.name))
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        })?;
        Ok((o.buffer, self.last.ok_or(RuntimeError::NotRun)?))
    }

    /// The bytes of a buffer at `sizes`.
    fn bytes_of(&self, id: BufferId, sizes: &SymBindings) -> &[u8] {
        let b = self.manifest.buffer(id);
        let n = b.bytes(sizes).unwrap_or(0) as usize;
        match &b.storage {
            Storage::Arena { offset } => &self.arena.bytes()[*offset as usize..*offset as usize + n],
            Storage::Param { name } => &self.params[name].bytes()[..n],
            Storage::Constant { .. } => &self.constants[&id].bytes()[..n],
            Storage::State { name } => &self.states[name].bytes()[..n],
        }
    }

    /// An output of the last run, whole.
    pub fn output(&self, name: &str) -> Result<HostTensor, RuntimeError> {
        if let (true, Some(d)) = (self.decoded, &self.decode) {
            return d.output(name);
        }
        let (id, sizes) = self.output_buffer(name)?;
        let b = self.manifest.buffer(id);
        let shape = b.shape.iter().map(|d| d.eval(&sizes).unwrap_or(0)).collect();
        Ok(HostTensor {
            name: name.to_string(),
            dtype: b.dtype,
            shape,
            data: decode(b.dtype, self.bytes_of(id, &sizes)),
        })
    }

    /// Elements `range` (in row-major order) of a float output of the last run, as f32: the rows a
    /// caller needs without copying the rest (the last position's logits, for instance).
    pub fn output_f32(&self, name: &str, range: Range<usize>) -> Result<Vec<f32>, RuntimeError> {
        if let (true, Some(d)) = (self.decoded, &self.decode) {
            return d.output_f32(name, range);
        }
        let (id, sizes) = self.output_buffer(name)?;
        let b = self.manifest.buffer(id);
        if !b.dtype.is_float() {
            return Err(RuntimeError::OutputType { name: name.to_string(), dtype: b.dtype });
        }
        let size = b.dtype.size_bytes() as usize;
        let bytes = self.bytes_of(id, &sizes);
        let len = bytes.len() / size;
        if range.start > range.end || range.end > len {
            return Err(RuntimeError::OutputRange {
                name: name.to_string(),
                len,
                start: range.start,
                end: range.end,
            });
        }
        Ok(decode_f32(b.dtype, &bytes[range.start * size..range.end * size]).unwrap_or_default())
    }
}

/// Converts each parameter to its compiled dtype in its own allocation (or keeps a mapped one as it
/// is), checking that every declared parameter comes exactly once with its declared type.
fn load_params<P: Into<Param>>(
    m: &Manifest,
    params: impl IntoIterator<Item = Result<P, WeightError>>,
) -> Result<HashMap<String, ParamMemory>, RuntimeError> {
    let decls = manifest_params(m)?;
    let by_name: HashMap<&str, usize> = decls.iter().enumerate().map(|(i, d)| (d.name.as_str(), i)).collect();
    let mut out: HashMap<String, ParamMemory> = HashMap::new();
    for p in params {
        let p: Param = p?.into();
        let Some(&i) = by_name.get(p.name()) else {
            return Err(RuntimeError::UnknownParam { name: p.name().to_string() });
        };
        let d = &decls[i];
        if out.contains_key(p.name()) {
            return Err(RuntimeError::DuplicateParam { name: p.name().to_string() });
        }
        let t = match p {
            Param::Mapped(v) => {
                let bytes = d.numel as u64 * d.dtype.size_bytes();
                if v.dtype != d.dtype || v.shape != d.shape || v.len() as u64 != bytes {
                    return Err(RuntimeError::ParamType {
                        name: v.name.clone(),
                        expected: crate::inputs::shape_text(d.dtype, &d.shape),
                        found: format!(
                            "{} mapped in {} bytes",
                            crate::inputs::shape_text(v.dtype, &v.shape),
                            v.len()
                        ),
                    });
                }
                out.insert(v.name.clone(), ParamMemory::Mapped(v));
                continue;
            }
            Param::Host(t) => t,
        };
        if t.dtype != d.dtype || t.shape != d.shape || t.data.len() != d.numel {
            return Err(RuntimeError::ParamType {
                name: t.name.clone(),
                expected: crate::inputs::shape_text(d.dtype, &d.shape),
                found: format!(
                    "{} with {} values",
                    crate::inputs::shape_text(t.dtype, &t.shape),
                    t.data.len()
                ),
            });
        }
        let bytes = d.numel as u64 * d.dtype.size_bytes();
        let mut mem = Memory::zeroed(bytes)
            .ok_or_else(|| RuntimeError::OutOfMemory { bytes, what: format!("parameter `{}`", d.name) })?;
        encode(d.dtype, &t.data, mem.bytes_mut()).map_err(|reason| RuntimeError::ParamType {
            name: t.name.clone(),
            expected: crate::inputs::shape_text(d.dtype, &d.shape),
            found: reason,
        })?;
        out.insert(t.name, ParamMemory::Owned(mem));
    }
    if let Some(d) = decls.iter().find(|d| !out.contains_key(&d.name)) {
        return Err(RuntimeError::MissingParam { name: d.name.clone(), count: decls.len() });
    }
    Ok(out)
}

impl crate::generate::Engine for CpuModel {
    fn inputs(&self) -> Vec<(String, DType)> {
        self.caller_inputs().map(|i| (i.name.clone(), self.manifest.buffer(i.buffer).dtype)).collect()
    }

    fn kv_cache(&self) -> Option<crate::generate::KvCache> {
        self.decode.as_ref()?;
        let (bytes, _) = self.kv_cache_bytes();
        Some(crate::generate::KvCache { capacity: self.max.s, bytes })
    }

    fn run_decode(&mut self, inputs: &[HostTensor]) -> Result<(), RuntimeError> {
        CpuModel::run_decode(self, inputs).map(|_| ())
    }

    fn vocab_size(&self) -> Option<u64> {
        let o = self.manifest.outputs.iter().find(|o| o.name == crate::generate::LOGITS)?;
        self.manifest.buffer(o.buffer).shape.last()?.as_known()
    }

    fn limits(&self) -> crate::generate::Limits {
        let used = |s: Sym| self.manifest.max(s).is_some();
        let mut limits = crate::generate::Limits {
            max_batch: if used(Sym::B) { self.max.b } else { 1 },
            max_tokens: if used(Sym::T) { self.max.t } else { 1 },
            what: format!("the artifact as loaded (T <= {}; kiln compile --max-context)", self.max.t),
        };
        if let Some(p) = self.manifest.model.as_ref().map(|m| m.model.max_position_embeddings) {
            if p < limits.max_tokens {
                limits = crate::generate::Limits {
                    max_tokens: p,
                    what: "the model's max_position_embeddings".into(),
                    ..limits
                };
            }
        }
        limits
    }

    fn run(&mut self, inputs: &[HostTensor]) -> Result<(), RuntimeError> {
        CpuModel::run(self, inputs).map(|_| ())
    }

    fn output_f32(&self, name: &str, range: Range<usize>) -> Result<Vec<f32>, RuntimeError> {
        CpuModel::output_f32(self, name, range)
    }
}
