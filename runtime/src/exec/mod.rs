//! The executor: one loaded artifact, its programs and its state, run over a [`Backend`].
//!
//! Everything that is not device-specific lives here, once, for every backend: which programs an
//! artifact has and what each takes; the sizes a model is loaded for; parameters bound by name with
//! their declared types; the states ([`kiln_ir::artifact::StateEntry`]: KV caches today), allocated
//! once, zeroed, at the loaded maxima and shared by every program; one activation arena shared by
//! the programs (which run one at a time, or as a pair in disjoint bytes), sized for the largest
//! at the loaded maxima;
//! constants; weight-only launches folded at load; the checks of a run's inputs (`inputs.rs`) before
//! anything is written; the per-expert load read from the MoE dispatches the manifest lists; the
//! per-launch profile; and reading outputs. A [`Backend`] is only what differs between devices:
//! memory (allocate, upload, download), binding a program's launches to addresses (checking the
//! kernels it was given against what the manifest says), and running them.
//!
//! [`Executor::new`] does everything that can fail before the first run, cheapest first: sizes,
//! parameters, states, the arena, constants, then each program's launches (the backend checks
//! every kernel it binds), then the weight-only launches, run once. A value two programs fold
//! alike (the same kernel over the same weights) is computed and held once.
//!
//! [`Executor::run`] runs one program by name: it checks every input, binds `B`, `T`, `S` (a
//! program that reads a state whose shape has `S` runs at the loaded `S`, the state's capacity),
//! writes the inputs, runs the launches, and records the MoE load. Outputs stay readable until the
//! next run of any program. [`Executor::run_pair`] runs two programs interleaved at their
//! collectives (DualPipe's overlapped pairs), which the compiler has laid out in disjoint arena
//! bytes.
//!
//! What it does not run: `send`/`recv` steps; a backend refuses them at load
//! ([`RuntimeError::Distributed`]). A pipeline's stage programs exchange their values as program
//! outputs and inputs instead, which `kiln`'s pipeline trainer sends over MPI.

mod collective;
mod engine;
mod fold;
mod probe;
mod watch;

use std::collections::HashMap;
use std::ops::Range;
use std::time::Instant;

use kiln_ir::artifact::{BufferId, Manifest, Program, Step, Storage};
use kiln_ir::module::{ProgramKind, StateRole, EDP_GROUP};
use kiln_ir::{DType, Sym, SymBindings};

use crate::artifact::Artifact;
use crate::host::{decode, decode_f32, encode};
use crate::inputs;
use crate::weights::{manifest_params, HostData, HostTensor, Param, WeightError};
use crate::RuntimeError;

pub use probe::LayerLoad;
pub use watch::NonFinite;

/// What differs between devices. Memory is opaque to the executor: it allocates, writes, reads and
/// takes the address of it, and hands addresses to [`Backend::bind`].
pub trait Backend: Sized {
    /// One allocation on the device.
    type Memory;
    /// A program's launches, bound to addresses and checked, ready to run.
    type Launches;
    /// How to open the backend (the CPU's threads, a CUDA device), with the sizes to load for.
    type Options;

    /// Opens the device for `artifact`: everything about the device code that can be checked
    /// before memory is touched.
    fn open(artifact: &Artifact, options: &Self::Options) -> Result<Self, RuntimeError>;
    /// The largest sizes `options` asks runs to use (`None`: the artifact's maxima).
    fn max_sizes(options: &Self::Options) -> Option<SymBindings>;

    /// The device, in words (`CPU (2 threads)`, `NVIDIA H200 (sm_90)`).
    fn describe(&self) -> String;
    /// `bytes` of zeroed memory; `what` names it in an out-of-memory error.
    fn alloc(&self, bytes: u64, what: &str) -> Result<Self::Memory, RuntimeError>;
    /// Refuses `bytes` of allocations in all for `what` that this device could never hold at
    /// once, before any of them is made; by default nothing is refused here (each [`Backend::alloc`]
    /// still reports its own failure).
    fn fits(&self, bytes: u64, what: &str) -> Result<(), RuntimeError> {
        let _ = (bytes, what);
        Ok(())
    }
    /// A parameter's memory holding `bytes`, its compiled storage. `mapped` is the checkpoint's
    /// mapping of the same bytes when the tensor is stored exactly so: a backend that can read it
    /// in place keeps it instead of copying.
    fn param(&self, bytes: ParamBytes, what: &str) -> Result<Self::Memory, RuntimeError>;
    fn len(&self, mem: &Self::Memory) -> usize;
    /// Whether `mem` is a checkpoint's mapping used in place (no copy).
    fn is_mapped(&self, _mem: &Self::Memory) -> bool {
        false
    }
    fn write(&self, mem: &mut Self::Memory, offset: usize, bytes: &[u8]) -> Result<(), RuntimeError>;
    fn read(&self, mem: &Self::Memory, range: Range<usize>) -> Result<Vec<u8>, RuntimeError>;
    /// Copies the first `dst.len()` bytes of `mem` into `dst` (a backend whose memory the host can
    /// read copies in place; the default goes through [`Backend::read`]).
    fn read_into(&self, mem: &Self::Memory, dst: &mut [u8]) -> Result<(), RuntimeError> {
        dst.copy_from_slice(&self.read(mem, 0..dst.len())?);
        Ok(())
    }
    /// Calls `f` on bytes `range` of `mem`: in place where the host can read the memory, so that
    /// a caller decoding a few values (each generated token's logits) copies nothing; through
    /// [`Backend::read`] by default.
    fn read_with(
        &self,
        mem: &Self::Memory,
        range: Range<usize>,
        f: &mut dyn FnMut(&[u8]),
    ) -> Result<(), RuntimeError> {
        f(&self.read(mem, range)?);
        Ok(())
    }
    /// The address kernels are given for the start of `mem`.
    fn address(&self, mem: &Self::Memory) -> u64;
    /// Binds the launches [`Binding`] names, checking each kernel against the device code (its
    /// entry exists, and was compiled for the arguments and work the manifest gives it) and the
    /// launch geometry at the loaded maxima.
    fn bind(&self, what: &Binding) -> Result<Self::Launches, RuntimeError>;
    /// Runs the bound launches `range` (positions in the bound list) at `sizes`, in order;
    /// `after(self, i)` is called once launch `i` has been issued (a backend that queues work must
    /// have finished it when `after` reads memory, see [`Backend::synchronize`]). Returns when all
    /// of them are done. A run of a program may come in several ranges, in order, with another
    /// program's ranges between them ([`Executor::run_pair`]).
    fn run(
        &self,
        launches: &mut Self::Launches,
        range: Range<usize>,
        sizes: &SymBindings,
        after: &mut After<Self>,
    ) -> Result<(), RuntimeError>;
    /// Waits for everything issued so far.
    fn synchronize(&self) -> Result<(), RuntimeError> {
        Ok(())
    }
    /// A transport that sums and gathers `groups` (those `comm` has with more than one process)
    /// on this backend's own memory, joined with the other processes (NCCL on CUDA). The default
    /// has none: the CPU's memory is the host's, and MPI reads it where it is.
    fn device_collectives(
        &self,
        _comm: &dyn crate::comm::Communicator,
        _groups: &[String],
    ) -> Result<Box<dyn crate::comm::DeviceCollectives>, RuntimeError> {
        Err(RuntimeError::Collective {
            group: String::new(),
            what: format!("{} has no device transport (NCCL needs --device cuda)", self.describe()),
        })
    }
    /// Sends bytes `range` of `mem` to pipeline peer `peer` (a `send` step). Room for the
    /// distributed runtime (MPI on the CPU, NCCL on GPUs); no backend has it yet, and the executor
    /// refuses programs with `send`/`recv` steps at load.
    fn send(
        &self,
        _mem: &Self::Memory,
        _range: Range<usize>,
        peer: u32,
        _tag: u32,
    ) -> Result<(), RuntimeError> {
        Err(RuntimeError::Distributed { step: 0, what: format!("send to stage {peer}") })
    }
    /// Receives bytes `range` of `mem` from pipeline peer `peer` (a `recv` step); see
    /// [`Backend::send`].
    fn recv(
        &self,
        _mem: &mut Self::Memory,
        _range: Range<usize>,
        peer: u32,
        _tag: u32,
    ) -> Result<(), RuntimeError> {
        Err(RuntimeError::Distributed { step: 0, what: format!("receive from stage {peer}") })
    }
}

/// What [`Backend::bind`] binds: the launch steps `steps` of `program` (indices into its steps, in
/// order), each buffer at `address(buffer)`, for runs up to the sizes `max`.
pub struct Binding<'a> {
    pub manifest: &'a Manifest,
    pub program: &'a Program,
    pub steps: &'a [usize],
    pub address: &'a dyn Fn(BufferId) -> u64,
    pub max: &'a SymBindings,
}

/// What [`Backend::run`] calls once each launch has been issued, with the launch's index.
pub type After<'a, B> = dyn FnMut(&B, usize) -> Result<(), RuntimeError> + 'a;

/// A parameter's bytes as the executor hands them to [`Backend::param`].
pub enum ParamBytes {
    /// Encoded by the executor into its compiled storage.
    Owned(Vec<u8>),
    /// A checkpoint tensor already stored exactly as the parameter's compiled storage.
    Mapped(crate::weights::MappedTensor),
}

/// A program of the artifact, bound.
struct Loaded<B: Backend> {
    /// Its index in the manifest's programs.
    index: usize,
    /// The largest sizes its runs may use.
    max: SymBindings,
    launches: B::Launches,
    /// The step index of each bound launch.
    steps: Vec<usize>,
    probes: Vec<probe::Probe>,
    /// Caller inputs that index something, with the rows they may index at the loaded maxima.
    index_inputs: HashMap<String, inputs::IndexLimit>,
    reads_sized_state: bool,
    /// The program's `all_reduce` steps by where they run: those before any launch, then after
    /// each bound launch (by its position in `steps`), in program order.
    collectives: collective::Collectives,
    /// The arena bytes it uses at its maxima.
    arena: Range<u64>,
}

/// A loaded artifact with its weights, ready to run any of its programs. See the module
/// documentation.
pub struct Executor<B: Backend> {
    manifest: Manifest,
    programs: Vec<Loaded<B>>,
    arena: B::Memory,
    params: HashMap<String, B::Memory>,
    states: HashMap<String, B::Memory>,
    /// Constants by program and buffer.
    constants: HashMap<(usize, BufferId), B::Memory>,
    /// Weight-only values computed at load, by program and buffer (an alias maps to its root).
    folded: fold::Folded<B>,
    max: SymBindings,
    /// The programs of the last run (two after [`Executor::run_pair`]) and their sizes, whose
    /// outputs the arena holds.
    last: Vec<(usize, SymBindings)>,
    /// Rows per expert, per MoE layer (by label, in first-seen order), over every run.
    load: Vec<LayerLoad>,
    /// Nanoseconds per launch of each program, when profiling.
    profile: Option<Vec<Vec<u64>>>,
    /// Every run and launch since tracing was turned on, when tracing.
    trace: Option<Tracer>,
    /// The last [`Executor::run_pair`]'s pieces.
    pair_pieces: Vec<(usize, u64, u64)>,
    /// A launch to poison, and whether runs check their launches' results.
    watch: watch::Watch,
    /// The processes `all_reduce` steps sum over; none: this process alone.
    comm: Option<Box<dyn crate::comm::Communicator>>,
    /// What the collectives cost since [`Executor::take_comm_stats`].
    comm_stats: crate::comm::CommStats,
    /// The transport that sums and gathers on the backend's memory (NCCL), for the groups it has.
    device_comm: Option<Box<dyn crate::comm::DeviceCollectives>>,
    // Declared last: dropped after the memory above, which its launches point into.
    backend: B,
}

/// A run [`Executor::admit`] checked: the loaded program, its sizes, and each input encoded with
/// its arena offset.
type Admitted = (usize, SymBindings, Vec<(usize, Vec<u8>)>);

/// A run of one program under way ([`Executor::advance`]): the next launch to run, the
/// collectives in flight, and what the run has recorded so far.
struct Pass {
    li: usize,
    sizes: SymBindings,
    next: usize,
    done: bool,
    flights: Vec<collective::Flight>,
    /// The per-expert rows of each MoE dispatch run so far.
    offsets: Vec<Vec<i64>>,
    spans: Vec<(usize, u64, u64)>,
    start: Instant,
    /// The launch (by position) before which the pass stops, when it is to stop early
    /// ([`Executor::run_gated`]).
    stop_at: Option<usize>,
}

impl Pass {
    fn new(li: usize, sizes: SymBindings) -> Pass {
        Pass {
            li,
            sizes,
            next: 0,
            done: false,
            flights: Vec::new(),
            offsets: Vec::new(),
            spans: Vec::new(),
            start: Instant::now(),
            stop_at: None,
        }
    }
}

/// What tracing records: its start, and each run.
struct Tracer {
    epoch: Instant,
    runs: Vec<RunTrace>,
}

/// One traced run, in nanoseconds from the tracer's start: the loaded program, its start and
/// duration, and each launch's bound index, start and duration.
struct RunTrace {
    program: usize,
    start: u64,
    dur: u64,
    launches: Vec<(usize, u64, u64)>,
}

/// One span of a trace ([`Executor::trace`]): a run of a program, or one launch within it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    /// What ran, for a reader: the program's name for a run; for a launch, the kernel's label (its
    /// fusion rule, or its op) and the scope it computes (`gemm-swiglu model.layers.3.mlp`).
    pub name: String,
    /// The program run.
    pub program: String,
    /// The kernel launched (`k_fused_5a4ecfddaaf5`), its label and its scope; `None` for a run.
    pub kernel: Option<String>,
    pub label: Option<String>,
    pub scope: Option<String>,
    /// Nanoseconds from when tracing was turned on.
    pub start_ns: u64,
    pub dur_ns: u64,
}

/// One kernel's share of a profile ([`Executor::profile`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelTime {
    pub name: String,
    /// Launches of the kernel in one run of each program that has it (its layers, mostly).
    pub launches: usize,
    pub nanos: u64,
}

/// An executor's state of one role, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateBytes {
    pub role: StateRole,
    pub bytes: u64,
}

impl<B: Backend> Executor<B> {
    /// Loads `artifact` onto the backend `options` open, with the given parameters (each by name,
    /// in any order, every declared one exactly once): [`HostTensor`]s, converted to their compiled
    /// dtypes on the way, or [`Param`]s, whose mapped tensors the backend may use in place.
    pub fn load<P: Into<Param>>(
        artifact: &Artifact,
        params: impl IntoIterator<Item = Result<P, WeightError>>,
        options: &B::Options,
    ) -> Result<Executor<B>, RuntimeError> {
        let backend = B::open(artifact, options)?;
        Executor::new(backend, artifact.manifest(), params, B::max_sizes(options))
    }

    /// Loads `manifest` onto `backend` with the given parameters (each by name, in any order, every
    /// declared one exactly once): [`HostTensor`]s, converted to their compiled dtypes on the way,
    /// or [`Param`]s, whose mapped tensors the backend may use in place. `max`: the largest sizes
    /// runs will use (default: the artifact's maxima); every program is loaded for them, each
    /// within its own maxima (a decode program at `T = 1`).
    pub fn new<P: Into<Param>>(
        backend: B,
        manifest: &Manifest,
        params: impl IntoIterator<Item = Result<P, WeightError>>,
        max: Option<SymBindings>,
    ) -> Result<Executor<B>, RuntimeError> {
        let compiled = manifest.max_sizes();
        let max = max.unwrap_or(compiled);
        for sym in Sym::ALL {
            let (v, limit) = (max.get(sym), compiled.get(sym));
            let used = manifest.programs.iter().any(|p| p.max(sym).is_some());
            if used && (v == 0 || v > limit) {
                return Err(RuntimeError::Size {
                    sym: sym.name(),
                    value: v,
                    max: limit,
                    why: "the sizes the artifact was compiled for (kiln compile --max-batch, --max-context)",
                });
            }
        }
        let program_max = |p: &Program| {
            let m = p.max_sizes();
            let pick = |s: Sym| if p.max(s).is_some() { max.get(s).min(m.get(s)) } else { 1 };
            SymBindings { b: pick(Sym::B), t: pick(Sym::T), s: pick(Sym::S) }
        };
        // Plans first: the arena is sized from what each program keeps in it.
        let plans: Vec<_> =
            manifest.programs.iter().map(|p| (program_max(p), fold::plan(manifest, p))).collect();
        let mut arena_bytes = 0u64;
        for (p, (pmax, plan)) in manifest.programs.iter().zip(&plans) {
            for b in &p.buffers {
                if plan.is_folded(b.id) {
                    continue;
                }
                if let Storage::Arena { offset } = b.storage {
                    let end = b.bytes(pmax).and_then(|n| offset.checked_add(n));
                    arena_bytes = arena_bytes.max(end.unwrap_or(u64::MAX));
                }
            }
        }
        // The whole load at once, before any of it: each allocation may fit the machine while
        // together they do not (models/tiny.toml compiled for `--max-context 100000 --max-batch
        // 64` holds a 16 GB KV cache beside a 21 GB arena), and the OOM killer then ends the
        // process without a word.
        let state_bytes = (manifest.states.iter())
            .map(|s| kiln_ir::artifact::bytes_of(s.dtype, &s.shape, &max).unwrap_or(u64::MAX))
            .fold(0u64, u64::saturating_add);
        let param_bytes = (manifest.params.iter().filter(|p| manifest.state(&p.name).is_none()))
            .map(|p| kiln_ir::artifact::bytes_of(p.dtype, &p.shape, &max).unwrap_or(u64::MAX))
            .fold(0u64, u64::saturating_add);
        let total = param_bytes.saturating_add(state_bytes).saturating_add(arena_bytes);
        backend.fits(
            total,
            &format!(
                "the parameters ({}), states ({}) and activation arena ({}) together",
                crate::error::Bytes(param_bytes),
                crate::error::Bytes(state_bytes),
                crate::error::Bytes(arena_bytes)
            ),
        )?;
        let (params, mut init) = load_params(&backend, manifest, params)?;
        let mut states = HashMap::new();
        for s in &manifest.states {
            let bytes = kiln_ir::artifact::bytes_of(s.dtype, &s.shape, &max).unwrap_or(u64::MAX);
            let what = format!("the {} `{}`", s.role.name().replace('_', " "), s.name);
            let mut mem = backend.alloc(bytes, &what)?;
            // Each state's initial bytes go as soon as they are written: a train step's weights and
            // f32 masters (3.1 GB for models/bench.toml's FP8 form) would otherwise stay alive
            // beside every state and the activation arena until loading ends.
            if let Some(v) = init.remove(&s.name) {
                backend.write(&mut mem, 0, &v)?;
            }
            states.insert(s.name.clone(), mem);
        }
        let mut folded = fold::Folded::default();
        let mut constants = HashMap::new();
        for (pi, p) in manifest.programs.iter().enumerate() {
            for b in &p.buffers {
                if let Storage::Constant { value } = b.storage {
                    let what = format!("constant {} of program `{}`", b.id, p.name);
                    // The f32 values and their encoding, both made before the backend's copy.
                    crate::host::check_fits(b.max_bytes.saturating_mul(5), &what)?;
                    let n = (b.max_bytes / b.dtype.size_bytes()) as usize;
                    let data = if b.dtype.is_float() {
                        HostData::F32(vec![value as f32; n])
                    } else {
                        HostData::I64(vec![value as i64; n])
                    };
                    let mut bytes = vec![0u8; b.max_bytes as usize];
                    encode(b.dtype, &data, &mut bytes).map_err(|reason| RuntimeError::InputValue {
                        name: format!("constant {} of program `{}`", b.id, p.name),
                        reason,
                    })?;
                    let mut mem = backend.alloc(b.max_bytes, &format!("constant {}", b.id))?;
                    backend.write(&mut mem, 0, &bytes)?;
                    constants.insert((pi, b.id), mem);
                }
            }
        }
        let arena = backend.alloc(arena_bytes, "the activation arena")?;
        let mut exec = Executor {
            manifest: manifest.clone(),
            programs: Vec::new(),
            arena,
            params,
            states,
            constants,
            folded: fold::Folded::default(),
            max,
            last: Vec::new(),
            load: Vec::new(),
            profile: None,
            trace: None,
            pair_pieces: Vec::new(),
            watch: watch::Watch::default(),
            comm: None,
            comm_stats: Default::default(),
            device_comm: None,
            backend,
        };
        // Weight-only values, once per distinct value, then every program's run launches.
        for (pi, (pmax, plan)) in plans.iter().enumerate() {
            fold::run(&exec, &mut folded, pi, plan, pmax)?;
        }
        exec.folded = folded;
        for (pi, (pmax, plan)) in plans.into_iter().enumerate() {
            let p = &exec.manifest.programs[pi];
            let steps: Vec<usize> = p
                .steps
                .iter()
                .enumerate()
                .filter(|(i, s)| matches!(s, Step::Launch { .. }) && !plan.folded_steps.contains(i))
                .map(|(i, _)| i)
                .collect();
            for (i, s) in p.steps.iter().enumerate() {
                let what = match s {
                    Step::Send { peer, .. } => format!("send to stage {peer}"),
                    Step::Recv { peer, .. } => format!("receive from stage {peer}"),
                    _ => continue,
                };
                return Err(RuntimeError::Distributed { step: i, what });
            }
            let collectives = collective::plan(p, &steps);
            let (mut lo, mut hi) = (u64::MAX, 0);
            for b in p.buffers.iter().filter(|b| !plan.is_folded(b.id)) {
                if let (Storage::Arena { offset }, Some(n)) = (&b.storage, b.bytes(&pmax)) {
                    (lo, hi) = (lo.min(*offset), hi.max(offset + n));
                }
            }
            let arena = if lo < hi { lo..hi } else { 0..0 };
            let launches = {
                let address = |b: BufferId| exec.address(pi, b);
                let what = Binding {
                    manifest: &exec.manifest,
                    program: p,
                    steps: &steps,
                    address: &address,
                    max: &pmax,
                };
                exec.backend.bind(&what)?
            };
            let probes = probe::probes(p, &steps);
            let index_inputs = inputs::index_limits(p, &pmax);
            let reads_sized_state = p.states().any(|name| {
                exec.manifest.state(name).is_some_and(|s| {
                    s.shape.iter().any(|d| d.checked_div(kiln_ir::Dim::sym(Sym::S)).is_some())
                })
            });
            exec.programs.push(Loaded {
                index: pi,
                max: pmax,
                launches,
                steps,
                probes,
                index_inputs,
                reads_sized_state,
                collectives,
                arena,
            });
        }
        // Every MoE layer is reported from the start, with no rows yet.
        for l in &exec.programs {
            for pr in &l.probes {
                probe::add(&mut exec.load, pr, &[]);
            }
        }
        exec.backend.synchronize()?;
        Ok(exec)
    }

    /// The device address of buffer `b` of program `pi`.
    fn address(&self, pi: usize, b: BufferId) -> u64 {
        if let Some(mem) = self.folded.memory(pi, b) {
            return self.backend.address(mem);
        }
        let buf = self.manifest.programs[pi].buffer(b);
        match &buf.storage {
            Storage::Arena { offset } => self.backend.address(&self.arena) + offset,
            Storage::Param { name } => self.backend.address(&self.params[name]),
            Storage::Constant { .. } => self.backend.address(&self.constants[&(pi, b)]),
            Storage::State { name } => self.backend.address(&self.states[name]),
        }
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The largest sizes runs may use (what the arena and the states were sized for).
    pub fn max_sizes(&self) -> SymBindings {
        self.max
    }

    /// The programs, by name and kind, in manifest order.
    pub fn programs(&self) -> Vec<(&str, ProgramKind)> {
        self.manifest.programs.iter().map(|p| (p.name.as_str(), p.kind)).collect()
    }

    /// The index of program `name`, or the error that lists the programs there are.
    fn loaded(&self, name: &str) -> Result<usize, RuntimeError> {
        self.manifest.programs.iter().position(|p| p.name == name).ok_or_else(|| {
            RuntimeError::NoSuchProgram { name: name.to_string(), known: self.manifest.program_names() }
        })
    }

    /// Whether the artifact has a program called `name`.
    pub fn has_program(&self, name: &str) -> bool {
        self.manifest.program(name).is_some()
    }

    /// The caller inputs of program `name` with their dtypes (the states are the model's own).
    pub fn inputs(&self, program: &str) -> Result<Vec<(String, DType)>, RuntimeError> {
        let p = &self.manifest.programs[self.loaded(program)?];
        Ok(inputs::caller_inputs(p).map(|i| (i.name.clone(), p.buffer(i.buffer).dtype)).collect())
    }

    /// The caller outputs of program `name` (what [`Executor::output`] reads after a run of it).
    pub fn outputs(&self, program: &str) -> Result<Vec<String>, RuntimeError> {
        let p = &self.manifest.programs[self.loaded(program)?];
        Ok(inputs::caller_outputs(p).map(|o| o.name.clone()).collect())
    }

    /// The largest sizes a run of `program` may use.
    pub fn program_max(&self, program: &str) -> Result<SymBindings, RuntimeError> {
        Ok(self.programs[self.loaded(program)?].max)
    }

    /// The caller inputs of `program` that index something, with the rows they may index.
    pub fn index_inputs(&self, program: &str) -> Result<&HashMap<String, inputs::IndexLimit>, RuntimeError> {
        Ok(&self.programs[self.loaded(program)?].index_inputs)
    }

    /// Bytes of the activation arena (shared by the programs).
    pub fn arena_bytes(&self) -> usize {
        self.backend.len(&self.arena)
    }

    /// Bytes of the parameters and constants, in their compiled dtypes.
    pub fn param_bytes(&self) -> usize {
        let params: usize = self.params.values().map(|m| self.backend.len(m)).sum();
        params + self.constants.values().map(|m| self.backend.len(m)).sum::<usize>()
    }

    /// Bytes of the parameters used in place from a checkpoint's mapping (no copy).
    pub fn mapped_param_bytes(&self) -> usize {
        self.params.values().filter(|m| self.backend.is_mapped(m)).map(|m| self.backend.len(m)).sum()
    }

    /// Bytes of the weight-only values computed once at load.
    pub fn folded_bytes(&self) -> usize {
        self.folded.bytes(&self.backend)
    }

    /// Bytes of the states of `role`, and the tokens (`B * S` at the loaded maxima) a KV cache
    /// holds.
    pub fn state_bytes(&self, role: StateRole) -> u64 {
        (self.manifest.states.iter())
            .filter(|s| s.role == role)
            .map(|s| self.backend.len(&self.states[&s.name]) as u64)
            .sum()
    }

    /// Runs program `name` on `inputs` (each of its caller inputs once, by name). Everything is
    /// checked before anything is written; on an error found then, memory and the last outputs are
    /// as they were.
    pub fn run(&mut self, name: &str, inputs: &[HostTensor]) -> Result<SymBindings, RuntimeError> {
        let (li, sizes, encoded) = self.admit(name, inputs)?;
        self.last.clear();
        self.write_inputs(&encoded)?;
        let mut pass = Pass::new(li, sizes);
        self.advance(&mut pass, false, &mut Vec::new())?;
        Ok(sizes)
    }

    /// Runs program `name` on `inputs` as [`Executor::run`] does, in two parts: the steps up to
    /// and including step `gate` (an index into the manifest program's steps), then, if `go`
    /// returns true, the rest. `go` is called between them with the executor, whose
    /// [`Executor::output`] and [`Executor::output_f32`] read the outputs made by then (the
    /// others hold what the arena held). When it returns false the rest never runs: whatever
    /// the steps after `gate` would have written, states included, stays as it was. Returns what
    /// `go` returned.
    ///
    /// A train step stops there when its loss or gradient norm says the update must not be
    /// applied (the training monitor's gate: see `kiln_runtime::train::Gate`). Collectives
    /// started by then are finished before `go` is called.
    pub fn run_gated(
        &mut self,
        name: &str,
        inputs: &[HostTensor],
        gate: usize,
        go: &mut dyn FnMut(&Self) -> Result<bool, RuntimeError>,
    ) -> Result<bool, RuntimeError> {
        let (li, sizes, encoded) = self.admit(name, inputs)?;
        self.last.clear();
        self.write_inputs(&encoded)?;
        let mut pass = Pass::new(li, sizes);
        let stop = self.programs[li].steps.iter().take_while(|&&s| s <= gate).count();
        pass.stop_at = Some(stop);
        self.advance(&mut pass, false, &mut Vec::new())?;
        if !pass.done {
            let Executor { backend, arena, states, comm_stats, .. } = self;
            let mut memories = watch::Memories::<B> { arena, states };
            collective::finish_due(backend, &mut memories, &mut pass.flights, |_| true, comm_stats)?;
            backend.synchronize()?;
            self.last.push((li, sizes));
        }
        if !go(self)? {
            return Ok(false);
        }
        if !pass.done {
            self.last.clear();
            pass.stop_at = None;
            self.advance(&mut pass, false, &mut Vec::new())?;
        }
        Ok(true)
    }

    /// Runs programs `a` and `b` (each a name and its inputs) interleaved: each runs until it has
    /// started a collective whose result its next launch reads (an expert-parallel dispatch or
    /// combine), then the other runs while the message travels. This is DualPipe's overlapped
    /// forward-and-backward pair: one chunk's all-to-all under the other chunk's compute.
    ///
    /// Each program's launches run in their own order, so every result is the one of running them
    /// one after the other. The two must not share arena bytes (the compiler lays out the
    /// backward programs of a schedule that pairs them after the forward programs) nor write a
    /// state the other reads or writes; a pair that shares arena bytes is refused before anything
    /// runs. Both programs' outputs stay readable ([`Executor::output_of`]) until the next run.
    pub fn run_pair(
        &mut self,
        a: (&str, &[HostTensor]),
        b: (&str, &[HostTensor]),
    ) -> Result<(SymBindings, SymBindings), RuntimeError> {
        let (la, sa, ea) = self.admit(a.0, a.1)?;
        let (lb, sb, eb) = self.admit(b.0, b.1)?;
        let (ra, rb) = (self.programs[la].arena.clone(), self.programs[lb].arena.clone());
        if la == lb || (ra.start < rb.end && rb.start < ra.end) {
            return Err(RuntimeError::BadOption(format!(
                "programs `{}` and `{}` cannot run interleaved: they share arena bytes {}..{}",
                a.0,
                b.0,
                ra.start.max(rb.start),
                ra.end.min(rb.end)
            )));
        }
        self.last.clear();
        self.write_inputs(&ea)?;
        self.write_inputs(&eb)?;
        let (mut pa, mut pb) = (Pass::new(la, sa), Pass::new(lb, sb));
        // Each lets the other's messages progress (MPI moves them only inside its calls).
        self.pair_pieces.clear();
        let start = Instant::now();
        let at = |t: Instant| (t - start).as_nanos() as u64;
        while !(pa.done && pb.done) {
            for which in [0, 1] {
                let (pass, other) = if which == 0 { (&mut pa, &mut pb) } else { (&mut pb, &mut pa) };
                if !pass.done {
                    let begin = Instant::now();
                    self.advance(pass, true, &mut other.flights)?;
                    self.pair_pieces.push((which, at(begin), at(Instant::now())));
                }
            }
        }
        Ok((sa, sb))
    }

    /// The pieces the last [`Executor::run_pair`] ran: which program (0 for its first, 1 for its
    /// second) and when, in nanoseconds from the pair's start, in order.
    pub fn pair_pieces(&self) -> &[(usize, u64, u64)] {
        &self.pair_pieces
    }

    /// Checks a run of program `name` on `inputs`: the loaded program, the sizes it runs at, and
    /// each input encoded with its arena offset. Writes nothing.
    fn admit(&self, name: &str, inputs: &[HostTensor]) -> Result<Admitted, RuntimeError> {
        let li = self.loaded(name)?;
        let (pi, pmax) = (self.programs[li].index, self.programs[li].max);
        let p = &self.manifest.programs[pi];
        let loaded = &self.programs[li];
        let sizes = inputs::check(p, &pmax, loaded.reads_sized_state, &loaded.index_inputs, inputs)?;
        // Encoded apart first: an input's slot may hold the last run's outputs, which must survive
        // a value that fails to encode.
        let mut encoded = Vec::with_capacity(inputs.len());
        for t in inputs {
            let b = p.buffer(inputs::input_buffer(p, &t.name)?);
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
        Ok((li, sizes, encoded))
    }

    fn write_inputs(&mut self, encoded: &[(usize, Vec<u8>)]) -> Result<(), RuntimeError> {
        for (at, bytes) in encoded {
            self.backend.write(&mut self.arena, *at, bytes)?;
        }
        Ok(())
    }

    /// Runs `pass` on from its next launch: to the end, or, with `pause`, through the first launch
    /// after which a collective starts that the next launch reads (its wait then comes when the
    /// pass resumes). `others` are another pass's messages in flight, which each launch lets
    /// progress as it does the pass's own. At the end the pass's outputs join the last run's.
    fn advance(
        &mut self,
        pass: &mut Pass,
        pause: bool,
        others: &mut [collective::Flight],
    ) -> Result<(), RuntimeError> {
        let li = pass.li;
        let pi = self.programs[li].index;
        let Executor {
            backend,
            programs,
            arena,
            profile,
            manifest,
            states,
            watch,
            trace,
            comm,
            comm_stats,
            device_comm,
            ..
        } = self;
        let comm = comm.as_deref();
        let device = device_comm.as_deref();
        let program = &manifest.programs[pi];
        let Loaded { launches, probes, steps, collectives, .. } = &mut programs[li];
        let sizes = pass.sizes;
        let watched = watch.check || watch.poison.is_some_and(|(p, _)| p == pi);
        let mut memories = watch::Memories::<B> { arena, states };
        let mut times = profile.as_mut().map(|p| &mut p[li]);
        let epoch = trace.as_ref().map(|t| t.epoch);
        let since = |at: Instant| epoch.map_or(0, |e| (at - e).as_nanos() as u64);
        let mut clock = Instant::now();
        let run = collective::Run { program, cs: collectives, sizes: &sizes, comm, device };
        let Pass { next, flights, offsets, spans, stop_at, .. } = pass;
        let first = *next;
        if first == 0 {
            if let Some(b) = &collectives.before {
                collective::start(backend, &mut memories, &run, b, flights, comm_stats)?;
            }
        }
        // What the launch about to run reads (a pass paused after starting it waits here).
        if !flights.is_empty() {
            collective::finish_due(backend, &mut memories, flights, |f| f.due == Some(first), comm_stats)?;
        }
        let n = steps.len();
        let end = match pause {
            true => (first..n)
                .find(|i| collectives.after.get(i).is_some_and(|b| b.due == Some(i + 1)))
                .map_or(n, |i| i + 1),
            false => n,
        };
        let end = stop_at.map_or(end, |s| end.min(s.max(first)));
        let mut after = |be: &B, i: usize| -> Result<(), RuntimeError> {
            // The dispatch's offsets are read right after it: the plan reuses their arena slot
            // once the grouped GEMMs have read them.
            if let Some(pr) = probes.get(offsets.len()).filter(|pr| pr.launch == i) {
                be.synchronize()?;
                let b = program.buffer(pr.offsets);
                let Storage::Arena { offset } = b.storage else { return Ok(()) };
                let n = b.bytes(&sizes).unwrap_or(0) as usize;
                let bytes = be.read(memories.arena, offset as usize..offset as usize + n)?;
                offsets.push(match decode(DType::I32, &bytes) {
                    HostData::I64(v) => v,
                    HostData::F32(_) => Vec::new(),
                });
            }
            if watched {
                watch::after(be, &mut memories, manifest, (pi, program), steps[i], &sizes, watch)?;
            }
            if !flights.is_empty() {
                collective::progress(flights)?;
            }
            if !others.is_empty() {
                collective::progress(others)?;
            }
            if let Some(b) = collectives.after.get(&i) {
                collective::start(be, &mut memories, &run, b, flights, comm_stats)?;
            }
            // A paused pass waits for its last collective when it resumes, not here.
            if !flights.is_empty() && i + 1 < end {
                collective::finish_due(be, &mut memories, flights, |f| f.due == Some(i + 1), comm_stats)?;
            }
            if times.is_some() || epoch.is_some() {
                be.synchronize()?;
                let now = Instant::now();
                let dur = (now - clock).as_nanos() as u64;
                if let Some(t) = times.as_mut() {
                    t[i] += dur;
                }
                if epoch.is_some() {
                    spans.push((i, since(clock), dur));
                }
                clock = now;
            }
            Ok(())
        };
        backend.run(launches, first..end, &sizes, &mut after)?;
        *next = end;
        if end < n {
            return Ok(());
        }
        // Those no launch reads (outputs), and any left by a launch that was not run.
        collective::finish_due(backend, &mut memories, flights, |_| true, comm_stats)?;
        pass.done = true;
        if let Some(t) = trace.as_mut() {
            backend.synchronize()?;
            let start = (pass.start - t.epoch).as_nanos() as u64;
            t.runs.push(RunTrace {
                program: li,
                start,
                dur: pass.start.elapsed().as_nanos() as u64,
                launches: std::mem::take(&mut pass.spans),
            });
        }
        for (pr, o) in probes.iter().zip(&pass.offsets) {
            probe::add(&mut self.load, pr, o);
        }
        self.last.push((li, sizes));
        Ok(())
    }

    /// The processes the programs' `all_reduce` steps sum over (data-parallel replicas); without
    /// one, this process is a group of one and an all-reduce copies its operand.
    ///
    /// A master weight split over the replicas (ZeRO-1: its state holds `m` of the weight's `n`
    /// values) is set to this process's shard of its weight: values `rank·m ..` of the weight,
    /// flattened and padded with zeros, `rank` this process's in `dp`, or for a routed expert's
    /// under expert parallelism in `edp`.
    pub fn set_communicator(&mut self, comm: Box<dyn crate::comm::Communicator>) -> Result<(), RuntimeError> {
        let rank_in = |group| comm.rank_in(group).map(|r| r.0);
        // A routed expert's master is split over the processes holding the expert (`edp`, under
        // expert parallelism), any other over every replica.
        let (rank, expert_rank) = (rank_in(kiln_ir::module::DP_GROUP).unwrap_or(0), rank_in(EDP_GROUP));
        self.comm = Some(comm);
        let masters: Vec<(String, String)> = (self.manifest.states.iter())
            .filter(|s| s.role == StateRole::MasterWeight)
            .filter_map(|s| {
                let w = s.name.strip_prefix(kiln_ir::module::MASTER_PREFIX)?;
                Some((s.name.clone(), w.to_string()))
            })
            .collect();
        for (master, weight) in masters {
            let (m, w) = (self.read_state(&master)?, self.read_state(&weight)?);
            let held: usize = m.shape.iter().product::<u64>() as usize;
            let whole = match w.data {
                HostData::F32(v) => v,
                HostData::I64(_) => continue,
            };
            if held >= whole.len() {
                continue;
            }
            let rank = match (expert_rank, kiln_ir::module::expert_mark(&weight)) {
                (Some(r), Some(_)) => r,
                _ => rank,
            };
            let shard =
                (rank * held..(rank + 1) * held).map(|i| whole.get(i).copied().unwrap_or(0.0)).collect();
            self.write_state(&HostTensor { data: HostData::F32(shard), ..m })?;
        }
        Ok(())
    }

    /// What the collectives of every run since the last call cost (and zero again).
    pub fn take_comm_stats(&mut self) -> crate::comm::CommStats {
        std::mem::take(&mut self.comm_stats)
    }

    /// The communicator [`Executor::set_communicator`] gave, if any.
    pub fn communicator(&self) -> Option<&dyn crate::comm::Communicator> {
        self.comm.as_deref()
    }

    /// Sums and gathers the groups `device` has on the backend's memory through it, instead of
    /// through the host and the communicator (which must be set first: it still gives the ranks,
    /// and carries the all-to-alls). Each message is the host path's, laid out the same way
    /// ([`crate::comm::DeviceMessage`]).
    pub fn set_device_collectives(
        &mut self,
        device: Box<dyn crate::comm::DeviceCollectives>,
    ) -> Result<(), RuntimeError> {
        if self.comm.is_none() {
            return Err(RuntimeError::Collective {
                group: String::new(),
                what: "a device transport needs the run's communicator first (set_communicator)".into(),
            });
        }
        self.device_comm = Some(device);
        Ok(())
    }

    /// Joins the backend's device transport ([`Backend::device_collectives`]: NCCL on CUDA) for
    /// the groups of the run's communicator (those the programs sum and gather over, where it
    /// lists none), and uses it ([`Executor::set_device_collectives`]). Every process of the run
    /// must call it, after [`Executor::set_communicator`]. Returns the transport in words.
    pub fn join_device_collectives(&mut self) -> Result<String, RuntimeError> {
        let comm = self.comm.as_deref().ok_or_else(|| RuntimeError::Collective {
            group: String::new(),
            what: "a device transport needs the run's communicator first (set_communicator)".into(),
        })?;
        // Every process of a group must join it, whatever its own programs sum over (a pipeline's
        // stages differ): the communicator's groups, in one order on every process.
        let mut groups = comm.groups();
        if groups.is_empty() {
            groups = self.collective_groups();
        }
        groups.sort();
        let device = self.backend.device_collectives(comm, &groups)?;
        let what = device.describe();
        self.device_comm = Some(device);
        Ok(what)
    }

    /// The device transport [`Executor::set_device_collectives`] gave, if any.
    pub fn device_collectives(&self) -> Option<&dyn crate::comm::DeviceCollectives> {
        self.device_comm.as_deref()
    }

    /// The groups the programs' sums and gathers use (`dp`, `edp`, ...), each once, in the order
    /// first seen: those a device transport would have to join.
    pub fn collective_groups(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for p in &self.manifest.programs {
            for s in &p.steps {
                if let Step::AllReduce { group, .. } | Step::AllGather { group, .. } = s {
                    if !out.contains(group) {
                        out.push(group.clone());
                    }
                }
            }
        }
        out
    }

    /// Runs program `name` as [`Executor::run`] does, checking every launch's float results as
    /// it finishes (each is read back to the host: slow). Returns the first launch whose results
    /// hold a NaN or an infinity, if any.
    pub fn run_checked(
        &mut self,
        name: &str,
        inputs: &[HostTensor],
    ) -> Result<Option<NonFinite>, RuntimeError> {
        self.watch.check = true;
        self.watch.found = None;
        let ran = self.run(name, inputs);
        self.watch.check = false;
        ran?;
        Ok(self.watch.found.take())
    }

    /// Checks every launch's float results as [`Executor::run_checked`] does in every run from
    /// `watching(true)` on, until `watching(false)`, which returns the first launch since whose
    /// results were not all finite: a step of several programs (a pipeline rank's stages and
    /// update) checked as one.
    pub fn watching(&mut self, on: bool) -> Option<NonFinite> {
        self.watch.check = on;
        match on {
            true => {
                self.watch.found = None;
                None
            }
            false => self.watch.found.take(),
        }
    }

    /// While [`Executor::watching`], a non-finite value found outside a launch (one received from
    /// another process): the first found unless a launch's came before.
    pub fn note_non_finite(&mut self, found: NonFinite) {
        if self.watch.check && self.watch.found.is_none() {
            self.watch.found = Some(found);
        }
    }

    /// [`Executor::run_gated`], checking every launch's float results as [`Executor::run_checked`]
    /// does: also returns the first launch that ran whose results were not all finite.
    pub fn run_gated_checked(
        &mut self,
        name: &str,
        inputs: &[HostTensor],
        gate: usize,
        go: &mut dyn FnMut(&Self) -> Result<bool, RuntimeError>,
    ) -> Result<(bool, Option<NonFinite>), RuntimeError> {
        self.watch.check = true;
        self.watch.found = None;
        let ran = self.run_gated(name, inputs, gate, go);
        self.watch.check = false;
        Ok((ran?, self.watch.found.take()))
    }

    /// From now on, every run of program `program` writes NaN into the float results of its first
    /// launch in scope `scope` (as the IR text and the manifest's steps name it) right after that
    /// launch: a fault injected to test what notices it (`kiln train --inject-fault nan:SCOPE`).
    /// `None` stops it. An unknown program or scope is an error naming the known ones.
    pub fn set_poison(&mut self, at: Option<(&str, &str)>) -> Result<(), RuntimeError> {
        self.watch.poison = match at {
            None => None,
            Some((program, scope)) => {
                let li = self.loaded(program)?;
                let pi = self.programs[li].index;
                let step = watch::poisoned_step(&self.manifest.programs[pi], scope)?;
                if !self.programs[li].steps.contains(&step) {
                    return Err(RuntimeError::BadOption(format!(
                        "the first launch in scope `{scope}` of program `{program}` reads only weights: \
                         it runs once at load, not in a step"
                    )));
                }
                Some((pi, step))
            }
        };
        Ok(())
    }

    /// The current value of state `name` (a trained weight, a moment, a counter), whole.
    pub fn read_state(&self, name: &str) -> Result<HostTensor, RuntimeError> {
        let s =
            self.manifest.state(name).ok_or_else(|| RuntimeError::UnknownParam { name: name.to_string() })?;
        let (_, shape) = self.state_type(name)?;
        let n = kiln_ir::artifact::bytes_of(s.dtype, &s.shape, &self.max).unwrap_or(0) as usize;
        let bytes = self.backend.read(&self.states[name], 0..n)?;
        Ok(HostTensor { name: name.to_string(), dtype: s.dtype, shape, data: decode(s.dtype, &bytes) })
    }

    /// State `name`'s dtype and shape (at the sizes the executor was loaded for).
    pub fn state_type(&self, name: &str) -> Result<(DType, Vec<u64>), RuntimeError> {
        let s =
            self.manifest.state(name).ok_or_else(|| RuntimeError::UnknownParam { name: name.to_string() })?;
        Ok((s.dtype, s.shape.iter().map(|d| d.eval(&self.max).unwrap_or(0)).collect()))
    }

    /// Copies state `name`'s bytes into `into`, reusing its allocation when it has the state's
    /// size already (a copy taken every step then costs a copy, not an allocation).
    pub fn copy_state(&self, name: &str, into: &mut Vec<u8>) -> Result<(), RuntimeError> {
        let s =
            self.manifest.state(name).ok_or_else(|| RuntimeError::UnknownParam { name: name.to_string() })?;
        let n = kiln_ir::artifact::bytes_of(s.dtype, &s.shape, &self.max).unwrap_or(0) as usize;
        into.resize(n, 0);
        self.backend.read_into(&self.states[name], into)
    }

    /// Puts back bytes [`Executor::copy_state`] copied from state `name`.
    pub fn restore_state(&mut self, name: &str, bytes: &[u8]) -> Result<(), RuntimeError> {
        let s =
            self.manifest.state(name).ok_or_else(|| RuntimeError::UnknownParam { name: name.to_string() })?;
        let n = kiln_ir::artifact::bytes_of(s.dtype, &s.shape, &self.max).unwrap_or(0) as usize;
        if bytes.len() != n {
            return Err(RuntimeError::BadOption(format!(
                "state `{name}` holds {n} bytes; a copy of {} cannot be put back",
                bytes.len()
            )));
        }
        let mem = self.states.get_mut(name).expect("every declared state is allocated");
        self.backend.write(mem, 0, bytes)
    }

    /// Writes zeros over every gradient accumulator state, a piece at a time (a model's
    /// accumulators are its gradients' size): a step undone may have left non-finite sums in them,
    /// which the next step's first micro-batch would keep, since it starts its sum from the old one
    /// times 0.
    pub fn zero_accumulators(&mut self) -> Result<(), RuntimeError> {
        const PIECE: usize = 16 << 20;
        let zeros = vec![0u8; PIECE];
        let accumulators: Vec<(String, usize)> = (self.manifest.states.iter())
            .filter(|s| s.role == kiln_ir::module::StateRole::GradientAccumulator)
            .map(|s| {
                (
                    s.name.clone(),
                    kiln_ir::artifact::bytes_of(s.dtype, &s.shape, &self.max).unwrap_or(0) as usize,
                )
            })
            .collect();
        for (name, n) in accumulators {
            let mem = self.states.get_mut(&name).expect("every declared state is allocated");
            for at in (0..n).step_by(PIECE) {
                self.backend.write(mem, at, &zeros[..PIECE.min(n - at)])?;
            }
        }
        Ok(())
    }

    /// State `name` as a tensor, from bytes [`Executor::copy_state`] copied.
    pub fn decode_state(&self, name: &str, bytes: &[u8]) -> Result<HostTensor, RuntimeError> {
        let s =
            self.manifest.state(name).ok_or_else(|| RuntimeError::UnknownParam { name: name.to_string() })?;
        let shape: Vec<u64> = s.shape.iter().map(|d| d.eval(&self.max).unwrap_or(0)).collect();
        Ok(HostTensor { name: name.to_string(), dtype: s.dtype, shape, data: decode(s.dtype, bytes) })
    }

    /// Replaces state `name` with `value` (a resumed run's moments), of exactly its type.
    pub fn write_state(&mut self, value: &HostTensor) -> Result<(), RuntimeError> {
        let name = &value.name;
        let s = self.manifest.state(name).ok_or_else(|| RuntimeError::UnknownParam { name: name.clone() })?;
        let shape: Vec<u64> = s.shape.iter().map(|d| d.eval(&self.max).unwrap_or(0)).collect();
        if value.dtype != s.dtype || value.shape != shape {
            return Err(RuntimeError::ParamType {
                name: name.clone(),
                expected: inputs::shape_text(s.dtype, &shape),
                found: inputs::shape_text(value.dtype, &value.shape),
            });
        }
        let mut bytes =
            vec![0u8; kiln_ir::artifact::bytes_of(s.dtype, &s.shape, &self.max).unwrap_or(0) as usize];
        encode(s.dtype, &value.data, &mut bytes)
            .map_err(|reason| RuntimeError::InputValue { name: name.clone(), reason })?;
        let mem = self.states.get_mut(name).expect("every declared state is allocated");
        self.backend.write(mem, 0, &bytes)
    }

    /// Rows routed to each expert of each MoE layer, in the order the layers were first run, summed
    /// over every run of every program since the load or the last
    /// [`Executor::reset_expert_load`]. Padding rows of a batch count like real tokens. Empty for a
    /// model without MoE layers.
    pub fn expert_load(&self) -> Vec<LayerLoad> {
        self.load.clone()
    }

    /// Sets every count of [`Executor::expert_load`] back to zero.
    pub fn reset_expert_load(&mut self) {
        for l in &mut self.load {
            l.counts.iter_mut().for_each(|c| *c = 0);
        }
    }

    /// Turns per-launch timing on (every counter back to zero) or off, for every program. Timing
    /// waits for each launch to finish.
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(|| self.programs.iter().map(|p| vec![0; p.steps.len()]).collect());
    }

    /// Turns tracing on (from now, nothing recorded yet) or off. Like profiling, tracing waits for
    /// each launch to finish, so that each span is the launch's own.
    pub fn set_tracing(&mut self, on: bool) {
        self.trace = on.then(|| Tracer { epoch: Instant::now(), runs: Vec::new() });
    }

    /// Every run and launch since tracing was turned on, in order: each run's span, then its
    /// launches'. Empty when tracing is off.
    pub fn trace(&self) -> Vec<Span> {
        let Some(t) = &self.trace else { return Vec::new() };
        let mut out = Vec::new();
        for RunTrace { program, start, dur, launches } in &t.runs {
            let l = &self.programs[*program];
            let p = &self.manifest.programs[l.index];
            out.push(Span {
                name: p.name.clone(),
                program: p.name.clone(),
                kernel: None,
                label: None,
                scope: None,
                start_ns: *start,
                dur_ns: *dur,
            });
            for &(i, start, dur) in launches {
                let Some(Step::Launch { kernel, scope, .. }) = l.steps.get(i).and_then(|&s| p.steps.get(s))
                else {
                    continue;
                };
                let k = &self.manifest.kernels[kernel.index()];
                let label = k.label.clone().unwrap_or_else(|| k.name.clone());
                let name = match scope {
                    Some(s) => format!("{label} {s}"),
                    None => label.clone(),
                };
                out.push(Span {
                    name,
                    program: p.name.clone(),
                    kernel: Some(k.name.clone()),
                    label: Some(label),
                    scope: scope.clone(),
                    start_ns: start,
                    dur_ns: dur,
                });
            }
        }
        out
    }

    /// Time per kernel over every run since profiling was turned on, in every program, most first:
    /// the kernel's name, its launches per run of its programs, and the total time.
    pub fn profile(&self) -> Vec<KernelTime> {
        let Some(profile) = &self.profile else { return Vec::new() };
        let mut by_kernel: HashMap<usize, KernelTime> = HashMap::new();
        for (l, times) in self.programs.iter().zip(profile) {
            let p = &self.manifest.programs[l.index];
            for (&step, &t) in l.steps.iter().zip(times) {
                let Step::Launch { kernel, .. } = &p.steps[step] else { continue };
                let e = by_kernel.entry(kernel.index()).or_insert_with(|| KernelTime {
                    name: self.manifest.kernels[kernel.index()].name.clone(),
                    launches: 0,
                    nanos: 0,
                });
                e.launches += 1;
                e.nanos += t;
            }
        }
        let mut out: Vec<KernelTime> = by_kernel.into_values().collect();
        out.sort_by(|a, b| b.nanos.cmp(&a.nanos).then(a.name.cmp(&b.name)));
        out
    }

    fn output_buffer(&self, name: &str) -> Result<(usize, BufferId, SymBindings), RuntimeError> {
        let has = |&&(li, _): &&(usize, SymBindings)| {
            inputs::caller_outputs(&self.manifest.programs[self.programs[li].index]).any(|o| o.name == name)
        };
        let &(li, _) = self.last.iter().find(has).or(self.last.first()).ok_or(RuntimeError::NotRun)?;
        self.output_buffer_of(li, name)
    }

    fn output_buffer_of(
        &self,
        li: usize,
        name: &str,
    ) -> Result<(usize, BufferId, SymBindings), RuntimeError> {
        let &(_, sizes) = self.last.iter().find(|l| l.0 == li).ok_or(RuntimeError::NotRun)?;
        let pi = self.programs[li].index;
        let p = &self.manifest.programs[pi];
        let o =
            inputs::caller_outputs(p).find(|o| o.name == name).ok_or_else(|| RuntimeError::NoSuchOutput {
                name: name.to_string(),
                known: inputs::caller_outputs(p)
                    .map(|o| format!("`{}`", o.name))
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        Ok((pi, o.buffer, sizes))
    }

    /// Bytes `range` (relative to the buffer) of buffer `id` of the last run's program.
    fn read(&self, pi: usize, id: BufferId, range: Range<usize>) -> Result<Vec<u8>, RuntimeError> {
        let (mem, range) = self.memory_of(pi, id, range);
        self.backend.read(mem, range)
    }

    /// The memory buffer `id` of program `pi` lies in, and where `range` of its bytes is there.
    fn memory_of(&self, pi: usize, id: BufferId, range: Range<usize>) -> (&B::Memory, Range<usize>) {
        if let Some(mem) = self.folded.memory(pi, id) {
            return (mem, range);
        }
        let (mem, at) = match &self.manifest.programs[pi].buffer(id).storage {
            Storage::Arena { offset } => (&self.arena, *offset as usize),
            Storage::Param { name } => (&self.params[name], 0),
            Storage::Constant { .. } => (&self.constants[&(pi, id)], 0),
            Storage::State { name } => (&self.states[name], 0),
        };
        (mem, at + range.start..at + range.end)
    }

    /// An output of the last run, whole.
    pub fn output(&self, name: &str) -> Result<HostTensor, RuntimeError> {
        let (pi, ..) = self.output_buffer(name)?;
        self.output_of(&self.manifest.programs[pi].name, name)
    }

    /// Output `name` of program `program`, one of the last run's (either of a
    /// [`Executor::run_pair`], whose outputs may share names), whole.
    pub fn output_of(&self, program: &str, name: &str) -> Result<HostTensor, RuntimeError> {
        let (pi, id, sizes) = self.output_buffer_of(self.loaded(program)?, name)?;
        let b = self.manifest.programs[pi].buffer(id);
        let shape = b.shape.iter().map(|d| d.eval(&sizes).unwrap_or(0)).collect();
        let bytes = self.read(pi, id, 0..b.bytes(&sizes).unwrap_or(0) as usize)?;
        Ok(HostTensor { name: name.to_string(), dtype: b.dtype, shape, data: decode(b.dtype, &bytes) })
    }

    /// The number of elements of an output of the last run.
    pub fn output_len(&self, name: &str) -> Result<usize, RuntimeError> {
        let (pi, id, sizes) = self.output_buffer(name)?;
        let b = self.manifest.programs[pi].buffer(id);
        Ok(b.bytes(&sizes).unwrap_or(0) as usize / (b.dtype.size_bytes() as usize).max(1))
    }

    /// Elements `range` (in row-major order) of a float output of the last run, as f32: the rows a
    /// caller needs without copying the rest (the last position's logits, for instance).
    pub fn output_f32(&self, name: &str, range: Range<usize>) -> Result<Vec<f32>, RuntimeError> {
        let (pi, id, sizes) = self.output_buffer(name)?;
        let b = self.manifest.programs[pi].buffer(id);
        if !b.dtype.is_float() {
            return Err(RuntimeError::OutputType { name: name.to_string(), dtype: b.dtype });
        }
        let size = b.dtype.size_bytes() as usize;
        let len = b.bytes(&sizes).unwrap_or(0) as usize / size;
        if range.start > range.end || range.end > len {
            return Err(RuntimeError::OutputRange {
                name: name.to_string(),
                len,
                start: range.start,
                end: range.end,
            });
        }
        // Decoded where the bytes lie: one allocation, the result's.
        let (mem, bytes) = self.memory_of(pi, id, range.start * size..range.end * size);
        let (dtype, mut out) = (b.dtype, Vec::new());
        self.backend.read_with(mem, bytes, &mut |b| out = decode_f32(dtype, b).unwrap_or_default())?;
        Ok(out)
    }
}

/// Converts each parameter to its compiled dtype (or hands a mapped one to the backend as it is),
/// checking that every declared parameter comes exactly once with its declared type. At most one
/// converted parameter is on the host at a time.
/// The parameters' memory, and the encoded initial value of each weight state (written into the
/// state once it is allocated).
type Loaded2<M> = (HashMap<String, M>, HashMap<String, Vec<u8>>);

fn load_params<B: Backend, P: Into<Param>>(
    backend: &B,
    m: &Manifest,
    params: impl IntoIterator<Item = Result<P, WeightError>>,
) -> Result<Loaded2<B::Memory>, RuntimeError> {
    // The parameters, then the weight states a checkpoint initialises (`manifest_params`).
    let decls = manifest_params(m)?;
    let by_name: HashMap<&str, usize> = decls.iter().enumerate().map(|(i, d)| (d.name.as_str(), i)).collect();
    let mut out: HashMap<String, B::Memory> = HashMap::new();
    let mut init: HashMap<String, Vec<u8>> = HashMap::new();
    for p in params {
        let p: Param = p?.into();
        let name = p.name().to_string();
        let Some(&i) = by_name.get(name.as_str()) else {
            return Err(RuntimeError::UnknownParam { name });
        };
        let d = &decls[i];
        if out.contains_key(&name) || init.contains_key(&name) {
            return Err(RuntimeError::DuplicateParam { name });
        }
        let is_state = m.state(&name).is_some();
        let expected = || inputs::shape_text(d.dtype, &d.shape);
        let bytes = d.numel as u64 * d.dtype.size_bytes();
        let what = format!("parameter `{}`", d.name);
        let mem = match p {
            Param::Mapped(v) => {
                if v.dtype != d.dtype || v.shape != d.shape || v.len() as u64 != bytes {
                    return Err(RuntimeError::ParamType {
                        name,
                        expected: expected(),
                        found: format!(
                            "{} mapped in {} bytes",
                            inputs::shape_text(v.dtype, &v.shape),
                            v.len()
                        ),
                    });
                }
                if is_state {
                    init.insert(name, v.bytes().to_vec());
                    continue;
                }
                backend.param(ParamBytes::Mapped(v), &what)?
            }
            Param::Host(t) => {
                if t.dtype != d.dtype || t.shape != d.shape || t.data.len() != d.numel {
                    return Err(RuntimeError::ParamType {
                        name,
                        expected: expected(),
                        found: format!(
                            "{} with {} values",
                            inputs::shape_text(t.dtype, &t.shape),
                            t.data.len()
                        ),
                    });
                }
                let mut host = vec![0u8; bytes as usize];
                encode(d.dtype, &t.data, &mut host).map_err(|reason| RuntimeError::ParamType {
                    name: name.clone(),
                    expected: expected(),
                    found: reason,
                })?;
                if is_state {
                    init.insert(name, host);
                    continue;
                }
                backend.param(ParamBytes::Owned(host), &what)?
            }
        };
        out.insert(name, mem);
    }
    if let Some(d) = decls.iter().find(|d| !out.contains_key(&d.name) && !init.contains_key(&d.name)) {
        return Err(RuntimeError::MissingParam { name: d.name.clone(), count: decls.len() });
    }
    // A master weight starts as its (narrower) weight state, in f32.
    for s in m.states.iter().filter(|s| s.role == StateRole::MasterWeight) {
        let weight = s.name.strip_prefix(kiln_ir::module::MASTER_PREFIX).and_then(|w| m.state(w));
        let Some((w, bytes)) = weight.and_then(|w| Some((w, init.get(&w.name)?))) else {
            return Err(RuntimeError::MissingParam { name: s.name.clone(), count: decls.len() });
        };
        let bad = |found: String| RuntimeError::ParamType {
            name: s.name.clone(),
            expected: format!("the f32 copy of {} `{}`", w.dtype, w.name),
            found,
        };
        let mut values = decode_f32(w.dtype, bytes).ok_or_else(|| bad(format!("{} values", w.dtype)))?;
        // A master split over data-parallel replicas (ZeRO-1) holds one shard: rank 0's until
        // `Executor::set_communicator` says which rank this process is.
        let held = s.shape.iter().try_fold(1u64, |n, d| Some(n * d.as_known()?)).unwrap_or(0) as usize;
        if held < values.len() {
            values.truncate(held);
        }
        let mut host = vec![0u8; values.len() * 4];
        encode(DType::F32, &HostData::F32(values), &mut host).map_err(bad)?;
        init.insert(s.name.clone(), host);
    }
    Ok((out, init))
}

impl<B: Backend> Drop for Executor<B> {
    fn drop(&mut self) {
        // Nothing may be freed under a kernel still running; an error here has already been
        // reported by the run that queued the work.
        let _ = self.backend.synchronize();
    }
}
