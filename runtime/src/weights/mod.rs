//! Model weights on the host: Hugging Face safetensors checkpoints, binding them to a graph's
//! parameters, and seeded random weights.
//!
//! - [`open_checkpoint`] reads and validates the headers of a single-file or sharded checkpoint
//!   (see [`safetensors`] for what is checked) and lists its tensors; [`Checkpoint::read`] decodes one
//!   tensor to f32 or i64, dequantising DeepSeek-V3's block-scaled FP8 weights on the way.
//! - [`bind`] matches a checkpoint against the `param` ops of a graph ([`bind_params`] against any
//!   declared parameters, such as an artifact's, [`manifest_params`]): every parameter present with
//!   its shape, nothing unexplained left over, values rounded to the parameter's dtype, FP8
//!   parameters bound to their stored codes.
//! - [`bind_mapped`] does the same without copying what needs no conversion: files are memory-mapped
//!   ([`mapped`]), and a tensor stored exactly as its parameter's compiled storage is handed out as
//!   a [`MappedTensor`] borrowing the mapping ([`Param::Mapped`]); only the rest is converted.
//! - [`random_params`] makes deterministic random weights for a graph, and [`write_safetensors`]
//!   stores any tensors as a checkpoint that [`open_checkpoint`] reads back.
//!
//! Tensors come out as [`HostTensor`]s: plain data, decoupled from the interpreter's tensor type.
//! Every malformed input is a [`WeightError`], never a panic.

mod bind;
mod checkpoint;
pub mod mapped;
mod numeric;
mod random;
pub mod safetensors;

#[cfg(test)]
pub(crate) mod tests;

use std::fmt;
use std::path::PathBuf;

use kiln_ir::DType;

pub use bind::{bind, bind_mapped, bind_params, graph_params, manifest_params, ParamDecl};
pub use checkpoint::{open_checkpoint, scale_name, Checkpoint, TensorInfo};
pub use mapped::{MappedTensor, Mapping, Param};
pub use numeric::{bf16_to_f32, e4m3_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, round_e4m3, round_to};
pub use random::{random_params, random_tensors};
pub use safetensors::{write_safetensors, write_safetensors_streamed, StDType, StoreFloats, TensorHead};

/// A tensor held in host memory, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub name: String,
    /// The element type the values belong to: float data holds values exactly representable in it.
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub data: HostData,
}

/// The values of a [`HostTensor`].
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    /// Values of a float dtype (f32, f16, bf16, FP8), each exactly representable in the tensor's
    /// dtype.
    F32(Vec<f32>),
    /// Values of an integer or bool dtype (bools are 0 and 1).
    I64(Vec<i64>),
}

impl HostData {
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Everything that can go wrong reading, binding or writing weights.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{}: not a checkpoint: expected a directory holding model.safetensors or \
         model.safetensors.index.json, a .safetensors file, or a .safetensors.index.json file",
        path.display()
    )]
    NoCheckpoint { path: PathBuf },
    #[error(
        "{} is {what}, not a checkpoint: give the checkpoint's folder (`{}`), its model.safetensors, or its \
         model.safetensors.index.json",
        path.display(),
        folder.display()
    )]
    NotAnIndex { path: PathBuf, what: &'static str, folder: PathBuf },
    #[error(transparent)]
    Output(#[from] kiln_ir::output::OutputError),

    // The safetensors format.
    #[error("{}: {len} bytes is too short for a safetensors file, which starts with an 8-byte header length", path.display())]
    Truncated { path: PathBuf, len: u64 },
    #[error("{}: the header claims {header_len} bytes; more than {} is not a real header", path.display(), safetensors::MAX_HEADER_LEN)]
    HeaderTooLarge { path: PathBuf, header_len: u64 },
    #[error(
        "{}: the header claims {header_len} bytes, but the file has only {} after its 8-byte length \
         ({file_len} in all; truncated?)",
        path.display(),
        file_len.saturating_sub(8)
    )]
    HeaderPastEof { path: PathBuf, header_len: u64, file_len: u64 },
    #[error("{}: bad header: {reason}", path.display())]
    BadHeader { path: PathBuf, reason: String },
    #[error("{}: tensor `{tensor}` has unknown dtype `{dtype}`", path.display())]
    UnknownDType { path: PathBuf, tensor: String, dtype: String },
    #[error(
        "{}: tensor `{tensor}` ({dtype}{}) should occupy {expected} bytes but its data_offsets span {found}",
        path.display(), Dims(shape)
    )]
    ByteLength { path: PathBuf, tensor: String, dtype: StDType, shape: Vec<u64>, expected: u64, found: u64 },
    #[error(
        "{}: tensor `{tensor}` occupies bytes {begin}..{end} of a data section of {data_len} bytes \
         (truncated file?)",
        path.display()
    )]
    OutOfRange { path: PathBuf, tensor: String, begin: u64, end: u64, data_len: u64 },
    #[error("{}: the data of tensors `{first}` and `{second}` overlap", path.display())]
    Overlap { path: PathBuf, first: String, second: String },

    // Checkpoints.
    #[error("{}: bad index: {reason}", path.display())]
    BadIndex { path: PathBuf, reason: String },
    #[error("{}: the index and the shards disagree: {reason}", path.display())]
    IndexMismatch { path: PathBuf, reason: String },
    #[error("no tensor `{name}` in the checkpoint")]
    NoSuchTensor { name: String },
    #[error("tensor `{tensor}` is {dtype}, which kiln does not read: {why}")]
    UnsupportedDType { tensor: String, dtype: StDType, why: &'static str },
    #[error("FP8 tensor `{tensor}` has no block scale `{scale}` in the checkpoint")]
    MissingScale { tensor: String, scale: String },
    #[error("FP8 tensor `{tensor}`: its scale `{scale}` {reason}")]
    BadScale { tensor: String, scale: String, reason: String },
    #[error("FP8 tensor `{tensor}` has shape {}; block-scaled weights are 2-D", Dims(shape))]
    Fp8Rank { tensor: String, shape: Vec<u64> },
    #[error("weight block {block:?}: both sides must be positive")]
    BadBlock { block: [u64; 2] },

    // Binding to a graph.
    #[error("the checkpoint lacks {count} tensor(s) the graph needs: {}", NameList(names, *count))]
    Missing { count: usize, names: Vec<String> },
    #[error(
        "tensor `{name}`: the graph expects shape {} but the checkpoint has {}",
        Dims(expected),
        Dims(found)
    )]
    ShapeMismatch { name: String, expected: Vec<u64>, found: Vec<u64> },
    #[error(
        "tensor `{name}`: the graph expects {param} but the checkpoint stores {stored}, \
         which does not convert (floats convert to floats, integers to integers, bools only to bools)"
    )]
    DTypeClass { name: String, param: DType, stored: StDType },
    #[error("the checkpoint has {count} tensor(s) the graph does not use: {}", NameList(names, *count))]
    Extra { count: usize, names: Vec<String> },
    #[error(
        "the checkpoint's MTP module `{prefix}` lacks {count} tensor(s) it needs: {}; the programs here do \
         not run it, but a checkpoint missing part of a module is damaged: restore the tensor(s), or \
         leave the whole module out",
        NameList(names, *count)
    )]
    IncompleteMtp { prefix: String, count: usize, names: Vec<String> },
    #[error(
        "`{copy}` copies `{shared}` but has shape {} where the graph's `{shared}` has {}",
        Dims(copy_shape),
        Dims(shared_shape)
    )]
    CopyMismatch { copy: String, shared: String, copy_shape: Vec<u64>, shared_shape: Vec<u64> },
    #[error("parameter `{name}` has type {ty}; weights need constant dimensions")]
    SymbolicParam { name: String, ty: String },
    #[error("parameter `{name}` has type {ty}, whose element count does not fit in 64 bits")]
    ParamTooLarge { name: String, ty: String },
    #[error("parameter `{name}` appears as both {first} and {second}")]
    ConflictingParam { name: String, first: String, second: String },
    #[error(
        "parameter `{name}` is {dtype} but the checkpoint stores {stored}: kiln does not quantise weights \
         while loading; use an FP8 checkpoint (codes with `_scale_inv` block scales) or a model without \
         [quantization]"
    )]
    UnsupportedParam { name: String, dtype: DType, stored: StDType },
    #[error(
        "FP8 parameter `{name}` has no float parameter `{scale}` in the graph: its codes would be used \
         unscaled"
    )]
    UnscaledFp8 { name: String, scale: String },
    #[error("tensor `{name}`: value {value} does not fit in {dtype}")]
    IntOutOfRange { name: String, value: i64, dtype: DType },

    // Writing.
    #[error("cannot write tensor `{name}`: {reason}")]
    BadTensor { name: String, reason: String },
}

/// A shape as `[2, 3]`.
struct Dims<'a>(&'a [u64]);

impl fmt::Display for Dims<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// At most ten names, then how many more.
struct NameList<'a>(&'a [String], usize);

/// How many names an error lists before it only counts.
const LISTED: usize = 10;

impl fmt::Display for NameList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, n) in self.0.iter().take(LISTED).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "`{n}`")?;
        }
        let shown = self.0.len().min(LISTED);
        if self.1 > shown {
            write!(f, " and {} more", self.1 - shown)?;
        }
        Ok(())
    }
}
