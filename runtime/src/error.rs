//! [`RuntimeError`]: everything that can go wrong loading an artifact, binding its weights, running
//! it and generating from it. Each message says what was wrong, where, and what would be right;
//! nothing a caller passes in makes the runtime panic.

use std::path::PathBuf;

use kiln_ir::artifact::ManifestError;
use kiln_ir::interp::InterpError;

use crate::weights::WeightError;

/// Errors of the runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    // Devices.
    #[error("no CUDA driver: libcuda could not be loaded on this machine (is an NVIDIA driver installed?)")]
    NoCudaDriver,
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("the CUDA driver sees no device: check `nvidia-smi`, or run on the CPU (--device cpu)")]
    NoCudaDevice,
    #[error(
        "NCCL could not be loaded (libnccl.so.2): install it (for example `pip install nvidia-nccl-cu12`, \
         with its lib folder on LD_LIBRARY_PATH), or leave out --nccl to sum over MPI through host memory"
    )]
    NoNccl,
    #[error("NCCL, group `{group}` (rank {rank} of {size}): {what}")]
    Nccl { group: String, rank: usize, size: usize, what: String },
    #[error("the CUDA driver cannot load kernels.ptx (compiled for {arch}): {log}")]
    PtxLoad { arch: String, log: String },

    // Loading an artifact.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{}: not a kiln artifact (no manifest.json); `kiln compile SPEC -o DIR` writes one",
        dir.display()
    )]
    NotAnArtifact { dir: PathBuf },
    #[error("{}: not a manifest this kiln can read: {reason}", path.display())]
    BadManifest { path: PathBuf, reason: String },
    #[error(
        "{}: artifact format version {found}, but this kiln reads version {supported}: recompile it \
         with this kiln (`kiln compile`)",
        dir.display()
    )]
    FormatVersion { dir: PathBuf, found: u64, supported: u32 },
    #[error("{}: {source}", dir.display())]
    InvalidManifest { dir: PathBuf, source: ManifestError },
    #[error("{}: file `{name}`, listed in the manifest, is missing", dir.display())]
    MissingFile { dir: PathBuf, name: String },
    #[error(
        "{}: file `{name}` has {found} bytes but the manifest says {expected} (truncated or replaced \
         since `kiln compile`?)",
        dir.display()
    )]
    FileSize { dir: PathBuf, name: String, expected: u64, found: u64 },
    #[error(
        "{}: file `{name}` does not match its SHA-256 in the manifest (modified since `kiln compile`?)",
        dir.display()
    )]
    FileHash { dir: PathBuf, name: String },
    #[error("{}: module.kir does not parse: {reason}", dir.display())]
    BadGraph { dir: PathBuf, reason: String },

    // The CPU backend.
    #[error("the artifact has no CPU kernels: compile it with `--target cpu` or `--target all`")]
    NoCpuTarget,
    #[error("kernels.so was compiled for `{triple}`, which this {host} machine cannot run: recompile here")]
    WrongHost { triple: String, host: &'static str },
    #[error("cannot load {}: {message}", path.display())]
    Library { path: PathBuf, message: String },
    #[error("kernel {kernel} (`{name}`): its entry `{symbol}` is not in kernels.so")]
    MissingSymbol { kernel: String, name: String, symbol: String },

    // The CUDA backend.
    #[error("the artifact has no GPU kernels: compile it with `--target sm_90a` or `--target all`")]
    NoGpuTarget,
    #[error("kernel {kernel} (`{name}`) on the GPU: {reason}")]
    GpuKernel { kernel: String, name: String, reason: String },
    #[error(
        "program step {step} ({what}) needs the distributed runtime, which kiln does not have yet: this \
         runtime runs single-stage artifacts"
    )]
    Distributed { step: usize, what: String },
    #[error("collective over group `{group}`: {what}")]
    Collective { group: String, what: String },
    #[error("cannot allocate {bytes} bytes for {what}")]
    OutOfMemory { bytes: u64, what: String },
    #[error(
        "cannot allocate {bytes} bytes ({}) for {what}: more than this machine's memory of {memory} bytes \
         ({}; {counted}); use a smaller model or smaller maxima (kiln \
         compile --max-batch, --max-context), or a machine with more memory",
        Bytes(*bytes),
        Bytes(*memory)
    )]
    TooLarge { bytes: u64, what: String, memory: u64, counted: &'static str },
    #[error("{0}")]
    BadOption(String),

    // Weights.
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error("parameter `{name}` was not given (the artifact declares {count} parameters)")]
    MissingParam { name: String, count: usize },
    #[error("`{name}` is not a parameter of the artifact")]
    UnknownParam { name: String },
    #[error("parameter `{name}` was given twice")]
    DuplicateParam { name: String },
    #[error("parameter `{name}`: the artifact expects {expected}, got {found}")]
    ParamType { name: String, expected: String, found: String },

    // Runs.
    #[error("{sym} = {value} is outside 1..={max}, {why}")]
    Size { sym: &'static str, value: u64, max: u64, why: &'static str },
    #[error("input `{name}` was not given")]
    MissingInput { name: String },
    #[error("`{name}` is not an input of the artifact (its inputs: {known})")]
    UnknownInput { name: String, known: String },
    #[error("input `{name}` was given twice")]
    DuplicateInput { name: String },
    #[error("input `{name}` must be {expected}, got {found}")]
    InputType { name: String, expected: String, found: String },
    #[error("input `{name}`: dimension {axis} is {found}, but {sym} = {bound} from {bound_by}")]
    SizeConflict { name: String, axis: usize, found: u64, sym: &'static str, bound: u64, bound_by: String },
    #[error("the artifact uses the size {sym}, but no input has a dimension that is exactly {sym}")]
    UnboundSize { sym: &'static str },
    #[error("input `{name}`: {reason}")]
    InputValue { name: String, reason: String },
    #[error(
        "input `{name}`: token id {value} at index {index} is outside the vocabulary: ids must be in \
         0..{vocab}"
    )]
    TokenOutOfRange { name: String, index: usize, value: i64, vocab: u64 },
    #[error("the artifact has no program `{name}` (its programs: {known})")]
    NoSuchProgram { name: String, known: String },
    #[error(
        "manifest field `{field}` does not match kernel `{name}` as kernels.so was compiled: the library \
         says `{library}`, the manifest `{manifest}`; the manifest was edited or belongs to another \
         library (recompile with `kiln compile`)"
    )]
    KernelSignature { field: String, name: String, library: String, manifest: String },
    #[error("`{name}` is not an output (the outputs: {known})")]
    NoSuchOutput { name: String, known: String },
    #[error("nothing has run yet, so there are no outputs to read")]
    NotRun,
    #[error("position {position} of sequence {sequence} is outside the KV cache of {capacity} slots")]
    PositionOutOfRange { sequence: usize, position: i64, capacity: u64 },
    #[error(
        "input `{name}` element {index} is {value}, outside 0..{limit}, the positions it picks from (for a \
         prefill's `last`, a row's last prompt token among the run's {limit} new tokens)"
    )]
    AlongOutOfRange { name: String, index: usize, value: i64, limit: u64 },
    #[error("output `{name}` has {len} elements; elements {start}..{end} were asked for")]
    OutputRange { name: String, len: usize, start: usize, end: usize },
    #[error("output `{name}` is {dtype}, not a float tensor")]
    OutputType { name: String, dtype: kiln_ir::DType },
    #[error(transparent)]
    Interp(#[from] InterpError),

    // Generation.
    #[error("prompt {0} is empty: give at least one token id")]
    EmptyPrompt(usize),
    #[error("no prompts to generate from")]
    NoPrompts,
    #[error("{count} prompts, but {what} holds a batch of at most {max}")]
    BatchTooLarge { count: usize, max: u64, what: String },
    #[error("{which} is {value}, outside the vocabulary: ids must be in 0..{vocab}")]
    PromptToken { which: String, value: i64, vocab: u64 },
    #[error(
        "{prompt} prompt tokens + {new} new tokens need {needed} positions, but {what} holds at most {max}"
    )]
    ContextTooLong { prompt: usize, new: usize, needed: u128, max: u64, what: String },
    #[error("the prompt has {prompt} tokens, but {what} prefills at most {max} at once")]
    PromptTooLong { prompt: usize, max: u64, what: String },
    #[error("the model has no `{0}` output to generate from")]
    NoLogits(String),
    #[error("the model takes input `{0}`, which generation does not know how to fill")]
    UnknownModelInput(String),
    #[error("the logits of sequence {sequence} at step {step} have no finite value")]
    NonFiniteLogits { sequence: usize, step: usize },
    /// `kiln run --speculative` on an artifact that was not compiled for it.
    #[error(
        "this model cannot decode speculatively: {0}; compile it with `kiln compile --speculative` \
         from a spec with an MTP module ([mtp] num_layers >= 1)"
    )]
    NoSpeculation(String),
}

/// A byte count in the largest binary unit that keeps it at least 1 (`2.0 PiB`).
pub(crate) struct Bytes(pub(crate) u64);

impl std::fmt::Display for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{value:.1} {}", UNITS[unit])
        }
    }
}
