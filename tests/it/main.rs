//! kiln's integration tests: one test binary (each binary that links the compiler is large), one
//! module per area.

mod autodiff;
mod build;
mod cli;
mod codegen;
mod compile;
mod cuda;
mod dist;
mod fp8_train;
mod fuse;
mod fuzz;
mod goldens;
mod grpo;
mod interp;
mod layering;
mod limits;
mod messages;
mod monitor;
mod output;
mod partition;
mod passes;
mod passes_equiv;
mod perplexity;
mod readme;
mod runtime;
mod schedule;
mod serve;
mod sft;
mod spec;
mod text;
mod tokenizer;
mod toolchain;
mod train;
mod train_aux;
mod util;
mod weights;
