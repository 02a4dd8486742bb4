//! Code generation: a graph into kernels, kernels into MLIR text, MLIR into a host shared library and
//! PTX for sm_90a.
//!
//! The stages, each a function whose output can be printed:
//!
//! ```text
//! Graph ──kernel::form_kernels──▶ KernelPlan (deduplicated kernels + the steps that run them)
//!   (fusion::plan: how each `fused` body is computed, in one pass or in phases with scratch)
//!   ──lower::lower_module(kernels, Target)──▶ LoweredModule (MLIR text: func.func | gpu.func)
//!   ──cpu::objects / cpu::link_objects──▶ kernels.so   (cpu::object: one object; cpu::llvm_ir to inspect)
//!   ──gpu::ptx──▶ PTX text, checked with toolchain::ptxas_check   (gpu::llvm_ir to inspect)
//! ```
//!
//! Formation and lowering are pure functions of the graph. The emit stages run MLIR and LLVM in
//! process, each kernel on its own and in parallel where a whole module is emitted (`cpu::objects`,
//! `gpu::ptx`), with results in kernel order whatever the number of threads; only
//! `link_shared_library`/`link_objects` touch the filesystem and run a tool (`cc`), and the kernel
//! cache (`cache::objects`, `cache::ptx`, `cache::ptxas_check`), when a process turns it on, keeps
//! each kernel's object and PTX and ptxas's reports on disk for the compiles after.

pub mod cache;
pub mod cpu;
pub mod emit;
pub mod fusion;
pub mod gpu;
pub mod kernel;
pub mod lower;
pub mod mlir;

pub use emit::{verify_mlir, EmitError};
pub use fusion::{plan as fusion_plan, Loc, Pattern, Phase, Plan};
pub use kernel::{form_kernels, form_programs, FormError, Kernel, KernelId, KernelPlan, Step};
pub use lower::{
    lower_kernel, lower_module, GridDim, LaunchShape, LowerError, LoweredKernel, LoweredModule, Target,
};
