//! The artifact manifest: what `kiln compile` writes to `manifest.json` and what a runtime reads to
//! run a compiled module, without the compiler.
//!
//! An artifact is a directory:
//!
//! | file            | what it holds                                                              |
//! |-----------------|----------------------------------------------------------------------------|
//! | `manifest.json` | a [`Manifest`]                                                             |
//! | `kernels.so`    | the CPU kernels, each with a packed entry point (target `cpu`)            |
//! | `kernels.ptx`   | the GPU kernels, one PTX module for sm_90a (target `sm_90a`)               |
//! | `module.kir`    | the module the kernels were formed from, every program after the passes    |
//! | `kernels.mlir`  | the lowered MLIR of every compiled target, for reading and bug reports    |
//!
//! A manifest holds one set of kernels, parameters and states, and any number of named
//! [`Program`]s over them (`prefill`, `decode`, `score`, ...). A program is a list of steps over
//! buffers. Every SSA value of the program's graph is a [`Buffer`], and so is the scratch space of
//! each launch of a kernel that needs some ([`ArgRole::Scratch`]); a [`Step`] launches a kernel on
//! buffers (arguments, results, then scratch, in the kernel's order), aliases one buffer as another
//! (a reshape: no code runs), or sends or receives one. Buffers live in one of four places
//! ([`Storage`]): the activation arena (one allocation per program, with an offset per buffer that
//! holds for every size up to the program's [`SymbolEntry::max`] values), a model parameter, a
//! scalar constant, or a state ([`StateEntry`]: a KV cache, and later optimizer moments and
//! counters) that the runtime keeps from one run of any program to the next. Shapes are dimensions
//! over the symbolic sizes `B`, `T`, `S`, written as in the text IR (`"B*T"`, `"7168"`), and are
//! evaluated with the sizes of each run.
//!
//! Running a program, as a runtime does: check the sizes against the program's maxima
//! ([`Program::check_sizes`]); allocate its arena; bind each parameter by its Hugging Face name;
//! allocate each state once, at the maxima, zeroed; fill constant buffers; copy each caller input to
//! its arena offset; run the steps in order; read each output. A program output stored in a state
//! ([`Storage::State`]) updates that state in place: the caller neither passes nor reads it. A CPU
//! launch calls the kernel's packed entry
//! `void f(void *const *buffers, const int64_t *sizes, int64_t lo, int64_t hi)` over `[0, work)`,
//! split into ranges as the runtime likes; a GPU launch calls the `.entry` with the buffer pointers
//! then the sizes (`i64` each) as parameters.
//!
//! What a runtime must know about a program's structure is typed data, never a name to match:
//! [`Program::index_inputs`] are the inputs that index something (token ids, positions in a KV
//! cache, targets) with the rows they may index, checked before a run because kernels clamp ids; [`Program::moe_dispatches`] are
//! the MoE dispatch launches whose `offsets` give the load of each expert.
//!
//! A manifest may also carry a [`ParallelPlan`] (`kiln compile --pp`): the stages a pipeline cuts
//! the model into, the ranks that hold them, each rank's schedule and the experts' placement. It
//! describes a run across processes and changes nothing in the programs.
//!
//! The manifest is code the runtime trusts for memory safety, so [`Manifest::validate`] checks it
//! whole before anything runs (see `check.rs`): every cross-reference, every buffer extent at the
//! maxima inside its allocation, every kernel's CPU symbol its own packed entry, and no two buffers
//! that are live at the same time overlapping in an arena. What only the kernel library can confirm
//! (that a kernel was compiled for the signature and work the manifest gives it) a backend checks
//! against [`KernelEntry::cpu_signature`], which `kernels.so` carries for every kernel.
//!
//! This module is serde only (no JSON here): the compiler writes it and the runtime reads it with
//! `serde_json`.

mod buffer_text;
mod check;
mod parallel;
mod serde_text;

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::module::{ProgramKind, StateRole};
use crate::spec::ModelSpec;
use crate::types::{DType, Dim, Sym, SymBindings};

pub use check::ManifestError;
pub use parallel::{
    AllToAllEntry, DispatchEntry, ExpertPlan, MoeLayerEntry, ParallelPlan, RankEntry, StageEntry,
};

/// The version of the manifest format this crate reads and writes. Bumped on any change a reader
/// of an older version would misread. Version 4: a buffer stored in a parameter is written
/// `{"id", "value", "param"}`, the parameter's index (version 3 wrote it whole). Version 3: a
/// list of named programs over one set of kernels, parameters and states (version 2 had a forward
/// program and an optional `decode`).
pub const FORMAT_VERSION: u32 = 4;

/// The manifest's file name in an artifact directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The CPU kernels: a shared library for the host that compiled it.
pub const KERNELS_SO: &str = "kernels.so";
/// The GPU kernels: PTX text for [`GpuTarget::arch`].
pub const KERNELS_PTX: &str = "kernels.ptx";
/// The module after the pass pipeline, in the `.kir` text format.
pub const MODULE_KIR: &str = "module.kir";
/// The MLIR of every compiled target.
pub const KERNELS_MLIR: &str = "kernels.mlir";

/// Suffix of a kernel's packed CPU entry point in `kernels.so` (`k_linear_…_packed`).
pub const PACKED_SUFFIX: &str = "_packed";
/// Suffix of the symbol under which `kernels.so` holds a kernel's signature, a NUL-terminated
/// string equal to [`KernelEntry::cpu_signature`] of the entry it was compiled for.
pub const SIGNATURE_SUFFIX: &str = "_signature";

/// Every byte offset in the arena is a multiple of this (CUDA's allocation alignment, and enough for
/// any vector load on the CPU).
pub const ARENA_ALIGN: u64 = 256;

/// A buffer of a program. Displays as `b3`; serialised as its number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BufferId(pub u32);

/// A kernel of the manifest, its index in [`Manifest::kernels`]. Displays as `k3`, like the
/// compiler's kernel ids; serialised as its number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KernelIndex(pub u32);

impl BufferId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl KernelIndex {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for BufferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b{}", self.0)
    }
}

impl fmt::Display for KernelIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "k{}", self.0)
    }
}

/// Everything a runtime needs to run a compiled module. See the module documentation.
///
/// Its `Serialize` and `Deserialize` are the derived ones (`remote = "Self"`) around which the
/// buffers stored in parameters are written and read against [`Manifest::params`] (see
/// `buffer_text`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct Manifest {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// The version of kiln that compiled the artifact.
    pub kiln_version: String,
    /// The model the module was built from; absent when a `.kir` graph was compiled on its own.
    pub model: Option<ModelSpec>,
    /// The module's name (`tiny`).
    pub name: String,
    /// The CPU target, when `kernels.so` was built.
    pub cpu: Option<CpuTarget>,
    /// The GPU target, when `kernels.ptx` was built.
    pub gpu: Option<GpuTarget>,
    /// The distinct kernels of every program, indexed by [`KernelIndex`].
    pub kernels: Vec<KernelEntry>,
    /// Model parameters, named as in the Hugging Face checkpoint: read-only, shared by every
    /// program. Before `programs`, whose buffers refer to them by index.
    #[serde(deserialize_with = "buffer_text::read_params")]
    pub params: Vec<ParamEntry>,
    /// Persistent state: allocated once by the runtime, zeroed, at the loaded maxima; kept between
    /// runs and shared by every program.
    pub states: Vec<StateEntry>,
    /// The programs, each over the kernels, parameters and states above.
    pub programs: Vec<Program>,
    /// The other files of the artifact with their SHA-256, so a reader can check them.
    pub files: Vec<FileEntry>,
    /// What the training programs were compiled with, in a training artifact (`kiln compile
    /// --train`): `kiln train` runs it with these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<TrainEntry>,
    /// How a pipeline- and expert-parallel run would cut, place and schedule the model, when it was
    /// compiled with `--pp` (see [`ParallelPlan`]). Optional, so an artifact without it reads as
    /// before; a reader older than the field refuses an artifact that has it (unknown fields are
    /// refused) rather than misreading it, so the format version stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<ParallelPlan>,
}

impl Serialize for Manifest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        buffer_text::with_params(Some(&self.params), || Manifest::serialize(self, s))
    }
}

impl<'de> Deserialize<'de> for Manifest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        buffer_text::with_params(None, || Manifest::deserialize(d))
    }
}

/// The settings baked into a training artifact's programs: its losses (each off at 0) and its
/// optimizer, with torch's meanings (see `kiln_compiler::train`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainEntry {
    pub mtp_lambda: f64,
    pub balance_alpha: f64,
    pub bias_update_speed: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// The global-norm bound; absent for no clipping.
    pub clip: Option<f64>,
    /// The dtype of AdamW's moments.
    pub moments: DType,
    /// Whether the next-token loss weighs each target by the caller input `loss_weights`
    /// (supervised fine-tuning's assistant mask).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub token_weights: bool,
}

/// One program of a manifest: what runs, on which buffers, and what a caller passes and reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Program {
    /// Unique in the manifest (`prefill`).
    pub name: String,
    #[serde(with = "serde_text::kind")]
    pub kind: ProgramKind,
    /// The symbolic sizes the program's shapes use, in `B, T, S` order: the ones a run binds.
    pub symbols: Vec<SymbolEntry>,
    /// The steps of one run, in order.
    pub steps: Vec<Step>,
    /// Every value of the program's graph, then the scratch buffers of launches, indexed by
    /// [`BufferId`].
    pub buffers: Vec<Buffer>,
    /// Bytes of the activation arena, sized for the [`SymbolEntry::max`] values.
    pub arena_bytes: u64,
    /// Graph inputs by name, in graph order; those stored in a state are the runtime's, the rest the
    /// caller writes before a run.
    pub inputs: Vec<NamedBuffer>,
    /// Graph outputs by name, in declaration order; those stored in a state update it, the rest the
    /// caller reads after a run.
    pub outputs: Vec<NamedBuffer>,
    /// Inputs whose values index something (token ids, positions, targets).
    #[serde(default)]
    pub index_inputs: Vec<IndexInput>,
    /// The MoE dispatch launches, in program order.
    #[serde(default)]
    pub moe_dispatches: Vec<MoeDispatch>,
}

/// A caller input whose integer values index something of `limit` rows: every value must be in
/// `0..limit` at the loaded sizes. Compiled kernels clamp or trust indices, so a bad one would
/// silently read another row, or write outside a KV cache: a runtime checks them before a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexInput {
    /// The input's name (`tokens`).
    pub input: String,
    /// The rows it indexes: a vocabulary (`"512"`), or a cache's capacity (`"S"`).
    #[serde(with = "serde_text::dim")]
    pub limit: Dim,
    pub indexes: Indexes,
    /// A value that is not an index but means "none" (a loss's `ignore_index`), allowed too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore: Option<i64>,
}

/// What an [`IndexInput`] indexes, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Indexes {
    /// An embedding table's rows: token ids.
    Vocabulary,
    /// The slots of a KV cache: positions.
    CacheSlots,
    /// The classes of a loss: target token ids.
    Classes,
    /// The positions along the axis a `take_along` reads, whose limit is evaluated at the run's
    /// sizes: a prefill's `last`, each row's last prompt token among its `T` new tokens.
    Along,
}

/// A launch of a `moe_dispatch` kernel: after it runs, `offsets` (`i32[experts + 1]`) holds the
/// start of each expert's rows, so expert `e` received `offsets[e + 1] - offsets[e]` rows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeDispatch {
    /// The launch's index in [`Program::steps`].
    pub step: usize,
    pub offsets: BufferId,
    pub experts: u64,
    /// Experts each token is routed to.
    pub top_k: u64,
    /// The Hugging Face module the dispatch belongs to (`model.layers.3.mlp`), for reports.
    pub layer: String,
}

/// The host the shared library was compiled for: it uses that CPU's instruction set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuTarget {
    /// LLVM target triple (`x86_64-pc-linux-gnu`).
    pub triple: String,
    /// LLVM's name of the host CPU (`znver4`).
    pub cpu: String,
    /// The file holding the kernels ([`KERNELS_SO`]).
    pub library: String,
}

/// The GPU the PTX was compiled for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuTarget {
    /// `sm_90a`.
    pub arch: String,
    /// The file holding the PTX module ([`KERNELS_PTX`]).
    pub module: String,
}

/// A symbolic size and the largest value the buffer plan was sized for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SymbolEntry {
    /// `B` (sequences), `T` (new tokens per sequence) or `S` (context length).
    #[serde(with = "serde_text::sym")]
    pub sym: Sym,
    /// Runs may bind any value from 1 up to this.
    pub max: u64,
}

/// One distinct kernel and how to call it on each target.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelEntry {
    pub id: KernelIndex,
    /// `k_{op}_{hash}`: stable across runs and machines, named after the kernel's content.
    pub name: String,
    /// What made the kernel, for people: the fusion rule of a `fused` kernel (`gemm-swiglu`),
    /// else its op (`rms_norm`). Traces and profiles name launches by it and their scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The buffers the kernel takes: its arguments, then its results, then its scratch.
    pub args: Vec<ArgSig>,
    /// The sizes it takes after the buffers, in this order (a subset of `B, T, S`).
    #[serde(with = "serde_text::syms")]
    pub sym_args: Vec<Sym>,
    /// Present when the CPU target was compiled.
    pub cpu: Option<CpuKernel>,
    /// Present when the GPU target was compiled.
    pub gpu: Option<GpuKernel>,
}

impl KernelEntry {
    /// What `kernels.so` records for this kernel under `{name}_signature`: every buffer's type,
    /// the sizes it takes and its CPU work, as one line
    /// (`f32[B, T, 64] f32[64] -> f32[B, T, 64] | B T | work B*T`). A backend compares it with the
    /// library's before the first launch, so a manifest edited to pass other buffers, sizes or a
    /// larger work range is refused instead of running the kernel out of bounds.
    pub fn cpu_signature(&self) -> Option<String> {
        let cpu = self.cpu.as_ref()?;
        Some(signature(&self.args, &self.sym_args, cpu.work, &cpu.phases))
    }
}

/// The signature line of [`KernelEntry::cpu_signature`], from its parts (the compiler writes it into
/// the library from the same parts).
pub fn signature(args: &[ArgSig], syms: &[Sym], work: Dim, phases: &[Dim]) -> String {
    let ty = |a: &ArgSig| crate::TensorType::new(a.dtype, a.shape.iter().copied()).to_string();
    let list = |role: &[ArgRole]| {
        args.iter().filter(|a| role.contains(&a.role)).map(ty).collect::<Vec<_>>().join(" ")
    };
    let syms = syms.iter().map(|s| s.name()).collect::<Vec<_>>().join(" ");
    let work = if phases.is_empty() {
        work.to_string()
    } else {
        let p: Vec<String> = phases.iter().map(Dim::to_string).collect();
        format!("{work} phases {}", p.join(" "))
    };
    format!(
        "{} -> {} | scratch {} | sizes {syms} | work {work}",
        list(&[ArgRole::Input, ArgRole::Param]),
        list(&[ArgRole::Output]),
        list(&[ArgRole::Scratch])
    )
}

/// The type of one kernel buffer and how the kernel uses it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgSig {
    pub dtype: DType,
    #[serde(with = "serde_text::dims")]
    pub shape: Vec<Dim>,
    pub role: ArgRole,
}

/// How a kernel uses one of its buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArgRole {
    /// Read.
    Input,
    /// Read, and bound to a model parameter at every launch (a weight): read-only for the whole run.
    Param,
    /// Written (every element).
    Output,
    /// Written and read by the kernel during the launch only (intermediates of a fused kernel
    /// computed in phases): bound to a [`BufferKind::Scratch`] buffer of the launch, whose contents
    /// are undefined before and after it.
    Scratch,
}

impl ArgRole {
    /// The role as the manifest spells it (`scratch`).
    pub fn name(self) -> &'static str {
        match self {
            ArgRole::Input => "input",
            ArgRole::Param => "param",
            ArgRole::Output => "output",
            ArgRole::Scratch => "scratch",
        }
    }
}

/// The CPU entry of a kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuKernel {
    /// The packed entry point in the library: always `{name}_packed` ([`PACKED_SUFFIX`]).
    pub symbol: String,
    /// Work items `[0, work)`; any split into `[lo, hi)` ranges, run in any order or in parallel,
    /// computes the kernel. 0 for a phased kernel (`phases`).
    #[serde(with = "serde_text::dim")]
    pub work: Dim,
    /// A phased kernel (a fused body that is not one pass): the work of each phase. Its items are
    /// the phases' items end to end, phase `p`'s from the sum of the earlier phases' works, and
    /// every item of a phase must have finished before any item of the next starts; within a
    /// phase, any split runs in any order or in parallel. Empty for every other kernel.
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "serde_text::dims")]
    pub phases: Vec<Dim>,
}

impl CpuKernel {
    /// The kernel's ranges as `(first item, items)`, to be run one after another: the phases, or
    /// the one range `[0, work)`; `None` if a size overflows.
    pub fn ranges(&self, sizes: &SymBindings) -> Option<Vec<(u64, u64)>> {
        if self.phases.is_empty() {
            return Some(vec![(0, self.work.eval(sizes)?)]);
        }
        let mut start = 0u64;
        self.phases
            .iter()
            .map(|w| {
                let n = w.eval(sizes)?;
                let r = (start, n);
                start = start.checked_add(n)?;
                Some(r)
            })
            .collect()
    }
}

/// The GPU entry of a kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuKernel {
    /// The `.entry` in the PTX module.
    pub entry: String,
    /// Blocks along x, y, z.
    pub grid: [GridAxis; 3],
    /// Threads per block along x, y, z.
    pub block: [u32; 3],
    /// Dynamic shared memory to request at launch. kiln's kernels declare their shared memory
    /// statically in the PTX, so this is 0 today; the static amount is in the module itself.
    pub shared_mem_bytes: u32,
}

/// `ceil(work / per_block)` blocks along one grid axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridAxis {
    #[serde(with = "serde_text::dim")]
    pub work: Dim,
    pub per_block: u64,
}

impl GridAxis {
    /// The number of blocks for concrete sizes; `None` on overflow.
    pub fn blocks(&self, sizes: &SymBindings) -> Option<u64> {
        Some(self.work.eval(sizes)?.div_ceil(self.per_block.max(1)))
    }
}

/// One step of a program.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Runs `kernel` on `buffers` (its arguments, then its results, then its scratch) with the
    /// sizes its [`KernelEntry::sym_args`] name.
    Launch {
        kernel: KernelIndex,
        buffers: Vec<BufferId>,
        /// The Hugging Face module the launch comes from (`model.layers.3.mlp`), for profiles.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scope: Option<String>,
    },
    /// `buffer` is `source` under another shape (a reshape). Both have the same storage, so nothing
    /// runs; the step is kept so that the program reads like the graph.
    Alias { buffer: BufferId, source: BufferId },
    /// Sends `buffer` to pipeline stage `peer`.
    Send { buffer: BufferId, peer: u32, tag: u32 },
    /// Receives `buffer` from pipeline stage `peer`.
    Recv { buffer: BufferId, peer: u32, tag: u32 },
    /// `buffer` (f32) is the element-wise sum of `source` over every process of communication
    /// group `group` (`"dp"`): the runtime copies `source` into it and runs its communicator's
    /// all-reduce in place; a process with no communicator is a group of one.
    AllReduce { buffer: BufferId, source: BufferId, group: String },
    /// `buffer` (f32, `[size, ..]`) holds `source` (f32) of every process of group `group`, in
    /// rank order; the runtime's communicator gathers them. `size` is the group size the program
    /// was compiled for, which the running group must have.
    AllGather { buffer: BufferId, source: BufferId, group: String, size: u64 },
    /// `buffer` (f32 `[size, ..]`, `source`'s shape) holds, in block `q`, what process `q` of
    /// group `group` sent this one: block `p` of its `source`, where `p` is this process's rank
    /// (`all_to_all`, expert parallelism's dispatch and combine). With `keep` (f32 row flags
    /// whose shape is a prefix of `source`'s), only the rows flagged nonzero travel and the others
    /// arrive as zeros. `size` is the group size the program was compiled for.
    AllToAll { buffer: BufferId, source: BufferId, keep: Option<BufferId>, group: String, size: u64 },
}

/// One value of a program. Written whole, but for one stored in a parameter, which is written
/// `{"id", "value", "param"}` against its manifest's parameters (see `buffer_text`).
#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    pub id: BufferId,
    /// The value in the program's graph (`%12`); for a scratch buffer, the first result of its
    /// launch and the scratch number (`%12#s0`).
    pub value: String,
    pub dtype: DType,
    pub shape: Vec<Dim>,
    pub kind: BufferKind,
    pub storage: Storage,
    /// Bytes at the maximum sizes: the room the storage has.
    pub max_bytes: u64,
}

impl Buffer {
    /// Bytes of the buffer for concrete sizes; `None` on overflow.
    pub fn bytes(&self, sizes: &SymBindings) -> Option<u64> {
        bytes_of(self.dtype, &self.shape, sizes)
    }
}

/// Bytes of a tensor of `dtype` and `shape` at `sizes`; `None` on overflow.
pub fn bytes_of(dtype: DType, shape: &[Dim], sizes: &SymBindings) -> Option<u64> {
    shape.iter().try_fold(dtype.size_bytes(), |acc, d| acc.checked_mul(d.eval(sizes)?))
}

/// What a buffer is to the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BufferKind {
    /// A graph input: written by the caller before the run (or, stored in a state, by earlier runs).
    Input,
    /// A graph output (that is not an input, parameter or constant): read after the run.
    Output,
    /// A model parameter, or a view of one.
    Param,
    /// A scalar constant, or a view of one.
    Constant,
    /// An intermediate value.
    Activation,
    /// Scratch space of one launch ([`ArgRole::Scratch`]), in the arena; not a value of the graph.
    Scratch,
}

impl BufferKind {
    /// The kind as the manifest spells it (`activation`).
    pub fn name(self) -> &'static str {
        match self {
            BufferKind::Input => "input",
            BufferKind::Output => "output",
            BufferKind::Param => "param",
            BufferKind::Constant => "constant",
            BufferKind::Activation => "activation",
            BufferKind::Scratch => "scratch",
        }
    }
}

/// Where a buffer's bytes are.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "in", rename_all = "snake_case", deny_unknown_fields)]
pub enum Storage {
    /// At `offset` bytes into the program's activation arena. Buffers whose lifetimes overlap never
    /// overlap in the arena; an alias has the offset of its source.
    Arena { offset: u64 },
    /// The memory of parameter `name` (see [`Manifest::params`]).
    Param { name: String },
    /// A buffer of its own with every element equal to `value`.
    Constant { value: f64 },
    /// The state `name` (see [`Manifest::states`]): the program input that reads it, and the
    /// output that a kernel writes in place to update it, both have it; the caller never copies it
    /// in or out.
    State { name: String },
}

/// A model parameter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamEntry {
    /// The Hugging Face tensor name (`model.layers.0.mlp.gate_proj.weight`).
    pub name: String,
    pub dtype: DType,
    #[serde(with = "serde_text::dims")]
    pub shape: Vec<Dim>,
}

/// A persistent state of the module.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateEntry {
    /// The name programs read and update it by (`kv_cache.3`).
    pub name: String,
    pub dtype: DType,
    /// Over `B` and `S` at most (a state outlives a run's new tokens).
    #[serde(with = "serde_text::dims")]
    pub shape: Vec<Dim>,
    #[serde(with = "serde_text::role")]
    pub role: StateRole,
}

/// A graph input or output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedBuffer {
    pub name: String,
    pub buffer: BufferId,
}

/// A file of the artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// The file name inside the artifact directory.
    pub name: String,
    /// SHA-256 of the contents, 64 lowercase hex digits.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
}

impl Manifest {
    pub fn kernel(&self, k: KernelIndex) -> &KernelEntry {
        &self.kernels[k.index()]
    }

    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }

    /// The program called `name`.
    pub fn program(&self, name: &str) -> Option<&Program> {
        self.programs.iter().find(|p| p.name == name)
    }

    /// The first program of `kind`.
    pub fn program_of_kind(&self, kind: ProgramKind) -> Option<&Program> {
        self.programs.iter().find(|p| p.kind == kind)
    }

    pub fn state(&self, name: &str) -> Option<&StateEntry> {
        self.states.iter().find(|s| s.name == name)
    }

    /// The program names, for messages (`` `prefill`, `decode` ``).
    pub fn program_names(&self) -> String {
        self.programs.iter().map(|p| format!("`{}`", p.name)).collect::<Vec<_>>().join(", ")
    }

    /// The states some program writes (an output stored in the state).
    pub fn written_states(&self) -> HashSet<&str> {
        let mut out = HashSet::new();
        for p in &self.programs {
            for o in &p.outputs {
                if let Some(Storage::State { name }) = p.buffers.get(o.buffer.index()).map(|b| &b.storage) {
                    out.insert(name.as_str());
                }
            }
        }
        out
    }

    /// The largest sizes over every program (1 for a size no program uses): what memory shared by
    /// the programs, the states, is allocated for.
    pub fn max_sizes(&self) -> SymBindings {
        let mut max = SymBindings { b: 1, t: 1, s: 1 };
        for p in &self.programs {
            let m = p.max_sizes();
            max = SymBindings { b: max.b.max(m.b), t: max.t.max(m.t), s: max.s.max(m.s) };
        }
        max
    }
}

impl Program {
    pub fn buffer(&self, b: BufferId) -> &Buffer {
        &self.buffers[b.index()]
    }

    /// The maximum value of a symbolic size, when the program uses it.
    pub fn max(&self, sym: Sym) -> Option<u64> {
        self.symbols.iter().find(|e| e.sym == sym).map(|e| e.max)
    }

    /// The sizes at their maxima (1 for a size the program does not use).
    pub fn max_sizes(&self) -> SymBindings {
        let m = |s| self.max(s).unwrap_or(1);
        SymBindings { b: m(Sym::B), t: m(Sym::T), s: m(Sym::S) }
    }

    /// Checks that a run's sizes are within what the buffer plan was sized for.
    pub fn check_sizes(&self, sizes: &SymBindings) -> Result<(), ManifestError> {
        for e in &self.symbols {
            let value = sizes.get(e.sym);
            if value == 0 || value > e.max {
                return Err(ManifestError::SizeOutOfRange { sym: e.sym.name(), value, max: e.max });
            }
        }
        Ok(())
    }

    /// The launches of the program that read only weights: every input a parameter, a constant or
    /// the result of another such launch (through aliases), and no scratch. Parameters are never
    /// written by any program (a value some program writes is a state, and a launch that reads a
    /// state is not weight-only), so their results are the same at every run (a concatenation or a
    /// per-head split of weights that a pass made): a runtime computes them once, at load, and
    /// leaves them out of its runs. Indices into [`Program::steps`], in order.
    pub fn weight_only_steps(&self, kernels: &[KernelEntry]) -> Vec<usize> {
        let mut derived: HashSet<BufferId> = HashSet::new();
        let mut out = Vec::new();
        for (i, step) in self.steps.iter().enumerate() {
            match step {
                Step::Alias { buffer, source } if derived.contains(source) => {
                    derived.insert(*buffer);
                }
                Step::Launch { kernel, buffers, .. } => {
                    let Some(k) = kernels.get(kernel.index()) else { continue };
                    let mut reads = 0;
                    let weight_only = k.args.iter().zip(buffers).all(|(a, b)| match a.role {
                        ArgRole::Input | ArgRole::Param => {
                            reads += 1;
                            derived.contains(b)
                                || self.buffers.get(b.index()).is_some_and(|b| {
                                    matches!(b.storage, Storage::Param { .. } | Storage::Constant { .. })
                                })
                        }
                        ArgRole::Output => {
                            // A result that is a program output or a state must be produced by
                            // every run.
                            self.buffers.get(b.index()).is_some_and(|b| b.kind == BufferKind::Activation)
                        }
                        ArgRole::Scratch => false,
                    });
                    // A kernel that takes the run's sizes (a broadcast to `[B, T]` of a constant,
                    // say, summed to count the tokens) computes something else at every size: it
                    // runs with the run.
                    if weight_only && reads > 0 && k.sym_args.is_empty() {
                        for (a, b) in k.args.iter().zip(buffers) {
                            if a.role == ArgRole::Output {
                                derived.insert(*b);
                            }
                        }
                        out.push(i);
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// The states the program reads or updates, by name.
    pub fn states(&self) -> impl Iterator<Item = &str> {
        let mut seen = HashSet::new();
        self.buffers
            .iter()
            .filter_map(|b| match &b.storage {
                Storage::State { name } => Some(name.as_str()),
                _ => None,
            })
            .filter(move |n| seen.insert(*n))
    }

    /// How many times one run launches each kernel.
    pub fn launches_per_kernel(&self) -> HashMap<KernelIndex, usize> {
        let mut n = HashMap::new();
        for s in &self.steps {
            if let Step::Launch { kernel, .. } = s {
                *n.entry(*kernel).or_insert(0) += 1;
            }
        }
        n
    }

    /// The index input called `name`, if the program has one.
    pub fn index_input(&self, name: &str) -> Option<&IndexInput> {
        self.index_inputs.iter().find(|t| t.input == name)
    }
}
