//! The artifact manifest: what `kiln compile` writes to `manifest.json` and what a runtime reads to
//! run a compiled graph, without the compiler.
//!
//! An artifact is a directory:
//!
//! | file            | what it holds                                                              |
//! |-----------------|----------------------------------------------------------------------------|
//! | `manifest.json` | a [`Manifest`]                                                             |
//! | `kernels.so`    | the CPU kernels, each with a packed entry point (target `cpu`)            |
//! | `kernels.ptx`   | the GPU kernels, one PTX module for sm_90a (target `sm_90a`)               |
//! | `graph.kir`     | the graph the kernels were formed from, after the pass pipeline           |
//! | `kernels.mlir`  | the lowered MLIR of every compiled target, for reading and bug reports    |
//!
//! The manifest describes a program over buffers. Every SSA value of the graph is a [`Buffer`], and
//! so is the scratch space of each launch of a kernel that needs some ([`ArgRole::Scratch`]); a
//! [`Step`] launches a kernel on buffers (arguments, results, then scratch, in the kernel's order),
//! aliases one buffer as another (a reshape: no code runs), or sends or receives one. Buffers live in one of
//! three places ([`Storage`]): the activation arena (one allocation, with an offset per buffer that
//! holds for every size up to the [`SymbolEntry::max`] values), a model parameter, or a scalar
//! constant. Shapes are dimensions over the symbolic sizes `B`, `T`, `S`, written as in the text IR
//! (`"B*T"`, `"7168"`), and are evaluated with the sizes of each run.
//!
//! Running a program, as a runtime does: check the sizes against the maxima
//! ([`Manifest::check_sizes`]); allocate `arena_bytes`; bind each parameter by its Hugging Face name;
//! fill constant buffers; copy each input to its arena offset; run the steps in order; read each
//! output. A CPU launch calls the kernel's packed entry
//! `void f(void *const *buffers, const int64_t *sizes, int64_t lo, int64_t hi)` over `[0, work)`,
//! split into ranges as the runtime likes; a GPU launch calls the `.entry` with the buffer pointers
//! then the sizes (`i64` each) as parameters.
//!
//! This module is serde only (no JSON here): the compiler writes it and the runtime reads it with
//! `serde_json`. [`Manifest::validate`] checks every cross-reference, so a runtime can trust indices
//! after one call.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::spec::ModelSpec;
use crate::types::{DType, Dim, Sym, SymBindings};

/// The version of the manifest format this crate reads and writes. Bumped on any change a reader
/// of an older version would misread.
pub const FORMAT_VERSION: u32 = 2;

/// The manifest's file name in an artifact directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The CPU kernels: a shared library for the host that compiled it.
pub const KERNELS_SO: &str = "kernels.so";
/// The GPU kernels: PTX text for [`GpuTarget::arch`].
pub const KERNELS_PTX: &str = "kernels.ptx";
/// The graph after the pass pipeline, in the `.kir` text format.
pub const GRAPH_KIR: &str = "graph.kir";
/// The decode graph after the pass pipeline, for an artifact with a KV cache.
pub const DECODE_KIR: &str = "decode.kir";
/// The MLIR of every compiled target.
pub const KERNELS_MLIR: &str = "kernels.mlir";

/// Every byte offset in the arena is a multiple of this (CUDA's allocation alignment, and enough for
/// any vector load on the CPU).
pub const ARENA_ALIGN: u64 = 256;

/// A buffer of the program. Displays as `b3`; serialised as its number.
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

/// Everything a runtime needs to run a compiled graph. See the module documentation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// The version of kiln that compiled the artifact.
    pub kiln_version: String,
    /// The model the graph was built from; absent when a `.kir` graph was compiled on its own.
    pub model: Option<ModelSpec>,
    /// The graph's name (`@tiny`, without the `@`).
    pub graph_name: String,
    /// The CPU target, when `kernels.so` was built.
    pub cpu: Option<CpuTarget>,
    /// The GPU target, when `kernels.ptx` was built.
    pub gpu: Option<GpuTarget>,
    /// The symbolic sizes the graph's shapes use, in `B, T, S` order: the ones a run binds.
    pub symbols: Vec<SymbolEntry>,
    /// The distinct kernels, indexed by [`KernelIndex`].
    pub kernels: Vec<KernelEntry>,
    /// The steps of one run of the graph, in order.
    pub program: Vec<Step>,
    /// Every value of the graph, then the scratch buffers of launches, indexed by [`BufferId`].
    pub buffers: Vec<Buffer>,
    /// Bytes of the activation arena, sized for the [`SymbolEntry::max`] values.
    pub arena_bytes: u64,
    /// Model parameters, in graph order, named as in the Hugging Face checkpoint.
    pub params: Vec<ParamEntry>,
    /// Graph inputs by name, in graph order: the caller writes them before a run.
    pub inputs: Vec<NamedBuffer>,
    /// Graph outputs by name, in declaration order: the caller reads them after a run.
    pub outputs: Vec<NamedBuffer>,
    /// The other files of the artifact with their SHA-256, so a reader can check them.
    pub files: Vec<FileEntry>,
    /// The decode program of a model compiled with a KV cache: one new token per sequence over the
    /// cache the program above (the prefill) filled. Both share the kernels, the parameters and the
    /// [`Storage::State`] buffers (the caches). Absent for a stateless graph.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<Box<Program>>,
}

/// A second program of an artifact ([`Manifest::decode`]): the per-program fields of a manifest,
/// with the same meaning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Program {
    pub graph_name: String,
    pub symbols: Vec<SymbolEntry>,
    pub program: Vec<Step>,
    pub buffers: Vec<Buffer>,
    pub arena_bytes: u64,
    pub params: Vec<ParamEntry>,
    pub inputs: Vec<NamedBuffer>,
    pub outputs: Vec<NamedBuffer>,
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
    #[serde(with = "sym_text")]
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
    /// The buffers the kernel takes: its arguments, then its results.
    pub args: Vec<ArgSig>,
    /// The sizes it takes after the buffers, in this order (a subset of `B, T, S`).
    #[serde(with = "syms_text")]
    pub sym_args: Vec<Sym>,
    /// Present when the CPU target was compiled.
    pub cpu: Option<CpuKernel>,
    /// Present when the GPU target was compiled.
    pub gpu: Option<GpuKernel>,
}

/// The type of one kernel buffer and how the kernel uses it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgSig {
    pub dtype: DType,
    #[serde(with = "dims_text")]
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

/// The CPU entry of a kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuKernel {
    /// The packed entry point in the library (`{name}_packed`).
    pub symbol: String,
    /// Work items `[0, work)`; any split into `[lo, hi)` ranges, run in any order or in parallel,
    /// computes the kernel.
    #[serde(with = "dim_text")]
    pub work: Dim,
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
    #[serde(with = "dim_text")]
    pub work: Dim,
    pub per_block: u64,
}

impl GridAxis {
    /// The number of blocks for concrete sizes; `None` on overflow.
    pub fn blocks(&self, sizes: &SymBindings) -> Option<u64> {
        Some(self.work.eval(sizes)?.div_ceil(self.per_block.max(1)))
    }
}

/// One step of the program.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Runs `kernel` on `buffers` (its arguments, then its results) with the sizes its
    /// [`KernelEntry::sym_args`] name.
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
}

/// One value of the graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Buffer {
    pub id: BufferId,
    /// The value in `graph.kir` (`%12`); for a scratch buffer, the first result of its launch and
    /// the scratch number (`%12#s0`).
    pub value: String,
    pub dtype: DType,
    #[serde(with = "dims_text")]
    pub shape: Vec<Dim>,
    pub kind: BufferKind,
    pub storage: Storage,
    /// Bytes at the maximum sizes: the room the storage has.
    pub max_bytes: u64,
}

impl Buffer {
    /// Bytes of the buffer for concrete sizes; `None` on overflow.
    pub fn bytes(&self, sizes: &SymBindings) -> Option<u64> {
        self.shape.iter().try_fold(self.dtype.size_bytes(), |acc, d| acc.checked_mul(d.eval(sizes)?))
    }
}

/// What a buffer is to the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BufferKind {
    /// A graph input: written by the caller before the run.
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

/// Where a buffer's bytes are.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "in", rename_all = "snake_case", deny_unknown_fields)]
pub enum Storage {
    /// At `offset` bytes into the activation arena. Buffers whose lifetimes overlap never overlap
    /// in the arena; an alias has the offset of its source.
    Arena { offset: u64 },
    /// The memory of parameter `name` (see [`Manifest::params`]).
    Param { name: String },
    /// A buffer of its own with every element equal to `value`.
    Constant { value: f64 },
    /// Persistent state of the runtime named like the graph input it holds (a KV cache,
    /// `kv_cache.3`): allocated once at the maxima, kept from one run to the next and shared by
    /// every program of the artifact. The input, and the `cache_update` result that the kernel
    /// writes in place, both have it; the caller never copies it in or out.
    State { name: String },
}

/// A model parameter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamEntry {
    /// The Hugging Face tensor name (`model.layers.0.mlp.gate_proj.weight`).
    pub name: String,
    pub dtype: DType,
    #[serde(with = "dims_text")]
    pub shape: Vec<Dim>,
    pub buffer: BufferId,
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

/// A manifest that cannot be run as it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest format version {found} is not supported (this kiln reads version {supported})")]
    Version { found: u32, supported: u32 },
    /// A reference or a size that does not hold together; `what` says which.
    #[error("manifest is inconsistent: {0}")]
    Inconsistent(String),
    #[error("{sym} = {value} is outside the sizes the artifact was compiled for (1..={max})")]
    SizeOutOfRange { sym: &'static str, value: u64, max: u64 },
}

impl Manifest {
    pub fn kernel(&self, k: KernelIndex) -> &KernelEntry {
        &self.kernels[k.index()]
    }

    pub fn buffer(&self, b: BufferId) -> &Buffer {
        &self.buffers[b.index()]
    }

    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }

    /// The decode program as a manifest of its own (the shared fields with the decode program's),
    /// so that whatever runs a manifest runs it; `None` for a stateless artifact.
    pub fn decode_view(&self) -> Option<Manifest> {
        let d = self.decode.as_deref()?.clone();
        Some(Manifest {
            graph_name: d.graph_name,
            symbols: d.symbols,
            program: d.program,
            buffers: d.buffers,
            arena_bytes: d.arena_bytes,
            params: d.params,
            inputs: d.inputs,
            outputs: d.outputs,
            decode: None,
            ..self.clone_shared()
        })
    }

    /// The fields shared by the programs, with empty per-program fields.
    fn clone_shared(&self) -> Manifest {
        Manifest {
            format_version: self.format_version,
            kiln_version: self.kiln_version.clone(),
            model: self.model.clone(),
            graph_name: String::new(),
            cpu: self.cpu.clone(),
            gpu: self.gpu.clone(),
            symbols: Vec::new(),
            kernels: self.kernels.clone(),
            program: Vec::new(),
            buffers: Vec::new(),
            arena_bytes: 0,
            params: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            files: self.files.clone(),
            decode: None,
        }
    }

    /// The launches of the program that read only weights: every input a parameter, a constant or
    /// the result of another such launch (through aliases), and no scratch. Their results are the
    /// same at every run (a concatenation or a per-head split of weights that a pass made), so a
    /// runtime computes them once, at load, and leaves them out of its runs. Indices into
    /// [`Manifest::program`], in order.
    pub fn weight_only_steps(&self) -> Vec<usize> {
        let mut derived: HashSet<BufferId> = HashSet::new();
        let mut out = Vec::new();
        for (i, step) in self.program.iter().enumerate() {
            match step {
                Step::Alias { buffer, source } if derived.contains(source) => {
                    derived.insert(*buffer);
                }
                Step::Launch { kernel, buffers, .. } => {
                    let Some(k) = self.kernels.get(kernel.index()) else { continue };
                    let mut reads = 0;
                    let weight_only = k.args.iter().zip(buffers).all(|(a, b)| match a.role {
                        ArgRole::Input | ArgRole::Param => {
                            reads += 1;
                            derived.contains(b)
                                || self.buffers.get(b.index()).is_some_and(|b| {
                                    matches!(b.storage, Storage::Param { .. } | Storage::Constant { .. })
                                })
                        }
                        ArgRole::Output => true,
                        ArgRole::Scratch => false,
                    });
                    if weight_only && reads > 0 {
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

    /// The persistent state buffers (KV caches) the program reads: name, dtype and shape.
    pub fn states(&self) -> impl Iterator<Item = (&str, DType, &[Dim])> {
        self.buffers.iter().filter(|b| b.kind == BufferKind::Input).filter_map(|b| match &b.storage {
            Storage::State { name } => Some((name.as_str(), b.dtype, b.shape.as_slice())),
            _ => None,
        })
    }

    /// The maximum value of a symbolic size, when the graph uses it.
    pub fn max(&self, sym: Sym) -> Option<u64> {
        self.symbols.iter().find(|e| e.sym == sym).map(|e| e.max)
    }

    /// The sizes at their maxima (1 for a size the graph does not use).
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

    /// Checks every invariant a runtime relies on: the version; ids equal to positions; each launch
    /// names a kernel and passes buffers of exactly its argument types; aliases share storage;
    /// every buffer's `max_bytes` is its size at the maxima and arena buffers fit in the arena at
    /// aligned offsets; parameters, inputs and outputs name buffers of the right kind; each target's
    /// entries are present exactly when the target is; file names are unique and hashes well formed.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format_version != FORMAT_VERSION {
            return Err(ManifestError::Version { found: self.format_version, supported: FORMAT_VERSION });
        }
        let bad = |m: String| Err(ManifestError::Inconsistent(m));
        let max = self.max_sizes();
        self.check_symbols()?;
        for (i, k) in self.kernels.iter().enumerate() {
            if k.id.index() != i {
                return bad(format!("kernel {i} has id {}", k.id));
            }
            if k.cpu.is_some() != self.cpu.is_some() || k.gpu.is_some() != self.gpu.is_some() {
                return bad(format!(
                    "kernel {} lacks an entry for a compiled target, or has one for another",
                    k.id
                ));
            }
        }
        let param_names: HashSet<&str> = self.params.iter().map(|p| p.name.as_str()).collect();
        for (i, b) in self.buffers.iter().enumerate() {
            if b.id.index() != i {
                return bad(format!("buffer {i} has id {}", b.id));
            }
            let bytes = b.bytes(&max);
            if bytes != Some(b.max_bytes) {
                return bad(format!(
                    "{} ({}) has max_bytes {} but its type gives {bytes:?}",
                    b.id, b.value, b.max_bytes
                ));
            }
            let fits = match &b.storage {
                Storage::Arena { offset } => {
                    offset % ARENA_ALIGN == 0
                        && offset.checked_add(b.max_bytes).is_some_and(|e| e <= self.arena_bytes)
                }
                Storage::Param { name } => param_names.contains(name.as_str()) && b.kind == BufferKind::Param,
                Storage::Constant { .. } => b.kind == BufferKind::Constant,
                Storage::State { .. } => {
                    matches!(b.kind, BufferKind::Input | BufferKind::Output | BufferKind::Activation)
                }
            };
            if !fits {
                return bad(format!(
                    "{} ({}): storage {:?} does not fit its kind {:?}",
                    b.id, b.value, b.storage, b.kind
                ));
            }
        }
        for step in &self.program {
            self.check_step(step)?;
        }
        for p in &self.params {
            let b = self.buffer_checked(p.buffer)?;
            if b.storage != (Storage::Param { name: p.name.clone() })
                || b.dtype != p.dtype
                || b.shape != p.shape
            {
                return bad(format!("parameter `{}` does not match its buffer {}", p.name, p.buffer));
            }
        }
        for (what, list) in [("input", &self.inputs), ("output", &self.outputs)] {
            let mut names = HashSet::new();
            for n in list {
                let b = self.buffer_checked(n.buffer)?;
                if !names.insert(n.name.as_str()) {
                    return bad(format!("{what} `{}` is listed twice", n.name));
                }
                if what == "input" && b.kind != BufferKind::Input {
                    return bad(format!("input `{}` names {}, which is not an input buffer", n.name, b.id));
                }
            }
        }
        let mut files = HashSet::new();
        for f in &self.files {
            if !files.insert(f.name.as_str()) || f.name.contains('/') || f.name == MANIFEST_FILE {
                return bad(format!("file `{}` is listed twice or is not a plain file name", f.name));
            }
            if f.sha256.len() != 64 || !f.sha256.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
                return bad(format!("file `{}` has a malformed sha256 `{}`", f.name, f.sha256));
            }
        }
        if let Some(decode) = self.decode_view() {
            decode.validate()?;
            for (name, dtype, shape) in decode.states() {
                if !self.states().any(|(n, d, sh)| n == name && d == dtype && sh == shape) {
                    return bad(format!("the decode program's state `{name}` is not the prefill's"));
                }
            }
        }
        for (target, file) in [
            (self.cpu.as_ref().map(|c| &c.library), KERNELS_SO),
            (self.gpu.as_ref().map(|g| &g.module), KERNELS_PTX),
        ] {
            if target.is_some_and(|name| name != file || !files.contains(file)) {
                return bad(format!("a compiled target's file `{file}` is not listed"));
            }
        }
        Ok(())
    }

    fn check_symbols(&self) -> Result<(), ManifestError> {
        let mut seen = HashSet::new();
        let mut last = None;
        for e in &self.symbols {
            if !seen.insert(e.sym) || last.is_some_and(|l| l > e.sym) || e.max == 0 {
                return Err(ManifestError::Inconsistent(format!(
                    "symbols must be distinct, in B, T, S order, with maxima of at least 1: {:?}",
                    self.symbols
                )));
            }
            last = Some(e.sym);
        }
        let used = |s: Sym| {
            self.buffers.iter().any(|b| b.shape.iter().any(|d| d.checked_div(Dim::sym(s)).is_some()))
        };
        if let Some(s) = Sym::ALL.into_iter().find(|&s| used(s) && !seen.contains(&s)) {
            return Err(ManifestError::Inconsistent(format!(
                "buffers use {} but it has no maximum",
                s.name()
            )));
        }
        Ok(())
    }

    fn buffer_checked(&self, b: BufferId) -> Result<&Buffer, ManifestError> {
        self.buffers.get(b.index()).ok_or_else(|| ManifestError::Inconsistent(format!("{b} does not exist")))
    }

    fn check_step(&self, step: &Step) -> Result<(), ManifestError> {
        let bad = |m: String| Err(ManifestError::Inconsistent(m));
        match step {
            Step::Launch { kernel, buffers, .. } => {
                let Some(k) = self.kernels.get(kernel.index()) else {
                    return bad(format!("a launch names {kernel}, which does not exist"));
                };
                if k.sym_args.iter().any(|&s| self.max(s).is_none()) {
                    return bad(format!("kernel {} takes a size the program does not use", k.id));
                }
                if buffers.len() != k.args.len() {
                    return bad(format!(
                        "a launch of {kernel} passes {} buffers for {} arguments",
                        buffers.len(),
                        k.args.len()
                    ));
                }
                for (&b, arg) in buffers.iter().zip(&k.args) {
                    let buf = self.buffer_checked(b)?;
                    if buf.dtype != arg.dtype || buf.shape != arg.shape {
                        return bad(format!(
                            "a launch of {kernel} passes {b} ({}) where the kernel takes another type",
                            buf.value
                        ));
                    }
                    if arg.role == ArgRole::Param && buf.kind != BufferKind::Param {
                        return bad(format!(
                            "a launch of {kernel} passes {b} as a weight, but it is not a parameter"
                        ));
                    }
                    if (arg.role == ArgRole::Scratch) != (buf.kind == BufferKind::Scratch) {
                        return bad(format!(
                            "a launch of {kernel} passes {b} ({}), of kind {:?}, for a {:?} argument",
                            buf.value, buf.kind, arg.role
                        ));
                    }
                }
            }
            Step::Alias { buffer, source } => {
                let (b, s) = (self.buffer_checked(*buffer)?, self.buffer_checked(*source)?);
                let numel = |x: &Buffer| x.shape.iter().try_fold(Dim::known(1), |acc, &d| acc.checked_mul(d));
                if b.dtype != s.dtype || numel(b) != numel(s) || b.storage != s.storage {
                    return bad(format!("alias {buffer} of {source} differs in dtype, size or storage"));
                }
            }
            Step::Send { buffer, .. } | Step::Recv { buffer, .. } => {
                self.buffer_checked(*buffer)?;
            }
        }
        Ok(())
    }

    /// How many times one run launches each kernel.
    pub fn launches_per_kernel(&self) -> HashMap<KernelIndex, usize> {
        let mut n = HashMap::new();
        for s in &self.program {
            if let Step::Launch { kernel, .. } = s {
                *n.entry(*kernel).or_insert(0) += 1;
            }
        }
        n
    }
}

/// Serde for a [`Dim`] as its text form (`"8*B*T"`).
mod dim_text {
    use super::Dim;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Dim, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(d)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Dim, D::Error> {
        let text = String::deserialize(d)?;
        Dim::parse(&text).ok_or_else(|| serde::de::Error::custom(format!("`{text}` is not a dimension")))
    }
}

/// Serde for a shape as a list of dimension texts (`["B", "T", "7168"]`).
mod dims_text {
    use super::Dim;
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(dims: &[Dim], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(dims.len()))?;
        for d in dims {
            seq.serialize_element(&d.to_string())?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Dim>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|t| {
                Dim::parse(t).ok_or_else(|| serde::de::Error::custom(format!("`{t}` is not a dimension")))
            })
            .collect()
    }
}

fn sym_from_name(name: &str) -> Option<Sym> {
    Sym::ALL.into_iter().find(|s| s.name() == name)
}

/// Serde for a [`Sym`] as `"B"`, `"T"` or `"S"`.
mod sym_text {
    use super::{sym_from_name, Sym};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(sym: &Sym, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(sym.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Sym, D::Error> {
        let text = String::deserialize(d)?;
        sym_from_name(&text).ok_or_else(|| serde::de::Error::custom(format!("`{text}` is not B, T or S")))
    }
}

/// Serde for a list of [`Sym`]s.
mod syms_text {
    use super::{sym_from_name, Sym};
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(syms: &[Sym], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(syms.len()))?;
        for sym in syms {
            seq.serialize_element(sym.name())?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Sym>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|t| {
                sym_from_name(t).ok_or_else(|| serde::de::Error::custom(format!("`{t}` is not B, T or S")))
            })
            .collect()
    }
}
