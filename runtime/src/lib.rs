//! kiln's runtime: loads artifacts produced by `kiln compile` and runs them on the CPU or on a CUDA
//! GPU.
//!
//! - [`artifact`]: [`artifact::load`] reads `manifest.json`, checks its format version and every
//!   cross-reference, and the size and SHA-256 of every file it lists.
//! - [`exec`]: [`exec::Executor`], one loaded artifact (its programs, parameters, states, arena,
//!   the checks of every run) over a [`exec::Backend`], which is only what differs per device.
//! - [`cpu`]: the CPU backend ([`cpu::CpuModel`]): `kernels.so`, each kernel checked against the
//!   signature the library carries, launches split over a thread pool.
//! - [`gpu`]: the CUDA backend ([`gpu::GpuModel`]): `kernels.ptx` on one device, launches planned
//!   and checked against the PTX entries at load ([`gpu::plan`], testable without a GPU), one
//!   stream.
//! - [`generate`]: greedy and sampled decoding over any [`generate::Engine`]: prefill then decode
//!   over the KV cache when the engine has both programs, else each step recomputes the sequence.
//! - [`mod@reference`]: the reference interpreter behind the same [`generate::Engine`], so compiled and
//!   interpreted runs share one generation loop and can be compared token for token.
//! - [`weights`]: checkpoints, binding them to a graph's or a manifest's parameters, random weights.
//! - [`host`]: aligned host memory and the byte encoding of each dtype.
//! - [`cuda`]: driver and device discovery.
//! - [`data`]: token datasets (rows of `T + 1` ids from a safetensors `tokens` tensor or a flat
//!   `u16`/`u32` stream) for perplexity and training, checked against a model's vocabulary and context.
//!
//! Architecture invariant: the runtime never depends on the compiler and never links MLIR or LLVM;
//! it reads artifacts. CUDA is reached through cudarc with dynamic loading, so the runtime builds and
//! runs on machines without CUDA and reports a typed error where a GPU was asked for.

pub mod artifact;
pub mod comm;
pub mod cpu;
pub mod cuda;
pub mod data;
mod error;
pub mod exec;
pub mod generate;
pub mod gpu;
pub mod host;
mod inputs;
pub mod reference;
pub mod score;
pub mod train;
pub mod weights;

pub use error::RuntimeError;
