//! kiln's graph IR: element types and symbolic dimensions, the closed set of ops, the graph, modules
//! (named programs over shared parameters and state), their text format (`.kir`), the verifiers,
//! shape inference and the model specification shared by compiler and runtime.
//!
//! [`output`] is the one implementation of writing files safely (atomic writes, refused targets,
//! stale temporaries), here because every crate writes something and every crate depends on this
//! one.
//!
//! Architecture invariant: this crate knows nothing about TOML, MLIR, LLVM or CUDA. Its dependencies
//! are petgraph, serde, thiserror and tempfile (for [`output`]).

pub mod artifact;
pub mod diag;
pub mod graph;
pub mod infer;
pub mod interp;
pub mod module;
pub mod op;
pub mod output;
pub mod schedule;
pub mod spec;
pub mod text;
pub mod types;
pub mod verify;

pub use diag::Diagnostic;
pub use graph::{Graph, GraphError, Node, NodeId, ValueId};
pub use module::{verify_module, Module, ModuleError, ParamDecl, Program, ProgramKind, StateDecl, StateRole};
pub use op::{Attr, BinaryOp, GemmForm, MlaForm, Op, ReduceOp, UnaryOp};
pub use spec::ModelSpec;
pub use text::{parse, parse_module, print, print_module, ParseError};
pub use types::{DType, Dim, Shape, Sym, SymBindings, TensorType};
