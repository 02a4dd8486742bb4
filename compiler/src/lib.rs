//! kiln's compiler: model specs (TOML or Hugging Face `config.json`) into validated `ModelSpec`s,
//! the graph builder, the passes, and code generation through MLIR (melior) and LLVM (inkwell).
//!
//! Architecture invariant: this is the only crate that links MLIR and LLVM. Passes never touch a
//! device or the filesystem; the CLI does the I/O.

pub mod autodiff;
pub mod build;
pub mod codegen;
pub mod expert_parallel;
pub mod inspect;
pub mod pack;
pub mod passes;
pub mod pipeline;
pub mod schedule;
pub mod spec;
pub mod target;
pub mod toolchain;
pub mod train;
pub mod train_memory;
