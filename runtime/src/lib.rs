//! kiln's runtime: loads artifacts produced by `kiln compile` and runs them on the CPU or on CUDA.
//!
//! Architecture invariant: the runtime never depends on the compiler and never links MLIR or LLVM;
//! it reads artifacts. CUDA is reached through cudarc with dynamic loading, so the runtime builds and
//! runs on machines without CUDA and reports a typed error where a GPU was asked for.

pub mod cuda;
pub mod weights;

/// Errors of the runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no CUDA driver: libcuda could not be loaded on this machine (is an NVIDIA driver installed?)")]
    NoCudaDriver,
    #[error("CUDA: {0}")]
    Cuda(String),
}
