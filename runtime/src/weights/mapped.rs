//! Checkpoint files mapped into memory, and parameters that borrow their bytes from the mapping
//! instead of being copied.
//!
//! [`super::open_checkpoint`] maps every safetensors file read-only ([`Mapping`]) and validates its
//! header against the mapping's length before any tensor byte is touched, so a truncated or corrupt
//! file is a [`WeightError`] and never a fault. A tensor whose stored bytes already are the
//! parameter's compiled storage (the same dtype and shape, little-endian, aligned for the element
//! type) becomes a [`MappedTensor`]: a view that keeps its mapping alive, which a runtime hands to
//! its kernels as it is. Everything else is converted into a [`HostTensor`] as before; [`Param`]
//! is either.
//!
//! What is deliberately not handled: a file changed by another process while it is mapped. The
//! mapping is the file, so its bytes change with it, and a file truncated after it was opened
//! faults on access (SIGBUS). Checkpoints are treated as immutable inputs, as every mmap-based
//! loader treats them (the `safetensors` package, llama.cpp).

use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_ir::DType;
use memmap2::Mmap;

use super::{HostTensor, WeightError};

/// One checkpoint file, mapped read-only for as long as anything borrows from it.
pub struct Mapping {
    path: PathBuf,
    /// `None` for an empty file, which cannot be mapped (and holds no tensor anyway).
    map: Option<Mmap>,
}

impl fmt::Debug for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mapping({}, {} bytes)", self.path.display(), self.len())
    }
}

impl Mapping {
    /// Maps the file at `path`.
    pub(crate) fn open(path: &Path) -> Result<Arc<Mapping>, WeightError> {
        let io = |source| WeightError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the mapping is read-only and every access is bounds-checked against its length,
            // which the header was validated against. Another process changing or truncating the
            // file while it is mapped is outside kiln's contract (see the module documentation).
            Some(unsafe { Mmap::map(&file) }.map_err(io)?)
        };
        Ok(Arc::new(Mapping { path: path.to_path_buf(), map }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads `range` of the file into memory now, so that the kernels that read a parameter
    /// borrowed from it do not take its page faults (for a routed expert, first used a few tokens
    /// into decoding). `MADV_POPULATE_READ` (Linux 5.14) maps the pages in; where the kernel lacks
    /// it, `MADV_WILLNEED` starts reading them. llama.cpp prefetches its mapping the same way
    /// (`MAP_POPULATE`). Best effort: a refusal only leaves the faults to the first access.
    pub(crate) fn prefault(&self, range: Range<usize>) {
        let Some(map) = &self.map else { return };
        if range.is_empty() || range.end > map.len() {
            return;
        }
        #[cfg(target_os = "linux")]
        if map.advise_range(memmap2::Advice::PopulateRead, range.start, range.len()).is_ok() {
            return;
        }
        #[cfg(unix)]
        let _ = map.advise_range(memmap2::Advice::WillNeed, range.start, range.len());
    }

    /// The addresses the mapping occupies.
    pub fn address_range(&self) -> Range<usize> {
        let start = self.bytes().as_ptr() as usize;
        start..start + self.len()
    }
}

/// A parameter whose bytes are borrowed from a checkpoint's mapping: its storage in its compiled
/// dtype (little-endian, aligned for the element type), valid as long as the view lives.
#[derive(Clone)]
pub struct MappedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    map: Arc<Mapping>,
    range: Range<usize>,
}

impl fmt::Debug for MappedTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappedTensor")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("file", &self.map.path)
            .field("range", &self.range)
            .finish()
    }
}

impl MappedTensor {
    /// A view of `range` of `map`, if those bytes can serve as `dtype` storage as they are: the host
    /// is little-endian (as safetensors is) and the first byte is aligned for the element type.
    /// The range is in bounds: the header was validated against the mapping's length.
    pub(crate) fn new(
        name: &str,
        dtype: DType,
        shape: &[u64],
        map: &Arc<Mapping>,
        range: Range<usize>,
    ) -> Option<MappedTensor> {
        let bytes = map.bytes().get(range.clone())?;
        let size = dtype.size_bytes() as usize;
        let aligned = (bytes.as_ptr() as usize) % size == 0;
        (cfg!(target_endian = "little") && aligned).then(|| MappedTensor {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            map: Arc::clone(map),
            range,
        })
    }

    /// Reads the tensor's bytes into memory now ([`Mapping::prefault`]).
    pub fn prefault(&self) {
        self.map.prefault(self.range.clone());
    }

    /// The tensor's bytes, inside the mapping.
    pub fn bytes(&self) -> &[u8] {
        &self.map.bytes()[self.range.clone()]
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.bytes().as_ptr()
    }

    pub fn len(&self) -> usize {
        self.range.len()
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// The mapping the bytes belong to.
    pub fn mapping(&self) -> &Mapping {
        &self.map
    }
}

/// A bound parameter: borrowed from the checkpoint's mapping, or converted on the host.
#[derive(Clone, Debug)]
pub enum Param {
    Mapped(MappedTensor),
    Host(HostTensor),
}

impl Param {
    pub fn name(&self) -> &str {
        match self {
            Param::Mapped(t) => &t.name,
            Param::Host(t) => &t.name,
        }
    }
}

impl From<HostTensor> for Param {
    fn from(t: HostTensor) -> Param {
        Param::Host(t)
    }
}
