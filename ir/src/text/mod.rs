//! The text format of the graph IR (`.kir`): a printer and a parser with `parse(print(g)) == g` for a
//! graph and `parse_module(print_module(m)) == m` for a [`Module`].
//!
//! ```text
//! graph @tiny {
//!   %0 = input {name = "tokens"} : i32[B, T]
//!   scope "model.embed_tokens"
//!   %1 = param {name = "model.embed_tokens.weight"} : f32[1024, 64]
//!   %2 = embedding %1, %0 : f32[B, T, 64]
//!   %7, %8 = topk %2 {k = 8} : f32[B, T, 8], i32[B, T, 8]
//!   %12 = fused %2 {name = "square"} : f32[B, T, 64] {
//!     %0 = input {name = "x"} : f32[B, T, 64]
//!     %1 = mul %0, %0 : f32[B, T, 64]
//!     output "y" = %1
//!   }
//!   scope none
//!   send %12 {peer = 1, tag = 0}
//!   output "logits" = %7
//! }
//! ```
//!
//! The format is line-based: one statement per line, `//` comments to the end of a line.
//!
//! - `<results> = <op> <operands> {<attrs>} : <result types>` is a node. Results and operands are
//!   value ids (`%N`, kept exactly as written); the attribute block is left out when the op has no
//!   attributes; ops without results (`send`) have neither `<results> =` nor `: <types>`. Op names and
//!   attributes are those of [`Op::name`](crate::Op::name) and [`Op::attrs`](crate::Op::attrs), so the
//!   format needs no change when an op is added.
//! - Attribute values are integers, floats (always with a `.` or an exponent, as `{:?}` writes them),
//!   `true`/`false`, quoted strings (with the escapes of Rust's `{:?}`), bare words (`sigmoid`, `bf16`,
//!   dimensions such as `8*B*T`) and lists `[...]`.
//! - `fused` has the single attribute `name` and is followed by its body in `{ ... }`: a nested graph in
//!   the same grammar, with its own value ids, whose `input`s are the kernel's operands in order and whose
//!   `output`s are its results.
//! - `scope "<module path>"` sets [`Node::scope`](crate::Node::scope) for the nodes that follow;
//!   `scope none` clears it. The printer writes one whenever the scope changes.
//! - `output "<name>" = %N` declares a graph output; the printer puts them after the nodes.
//! - Types are written as [`TensorType`](crate::TensorType) displays them: `bf16[B, T, 7168]`, `f32[]`.
//!   Every node lists its result types; the parser checks them against shape inference, except for the
//!   ops that declare their type (`input`, `param`, `constant`, `recv`).
//!
//! What the parser does not check is left to the verifier: it accepts any graph that the mutation API
//! of [`Graph`] would build whose written types agree with inference. Two limits keep hostile input
//! cheap: value numbers stop at `%16777215`, and lists and `fused` bodies nest at most 16 deep.
//!
//! # Modules
//!
//! A module file holds one `module`, whose programs are graphs in the grammar above:
//!
//! ```text
//! module @tiny {
//!   param "model.embed_tokens.weight" : f32[512, 64]
//!   state "kv_cache.0" : f32[B, S, 1, 40] {role = kv_cache}
//!   state "step" : i64[] {role = counter}
//!   program "prefill" {kind = prefill} graph @tiny {
//!     %0 = input {name = "tokens"} : i32[B, T]
//!     %1 = input {name = "kv_cache.0"} : f32[B, S, 1, 40]
//!     ...
//!     output "kv_cache.0" = %12
//!   }
//!   program "decode" {kind = decode} graph @tiny {
//!     ...
//!   }
//! }
//! ```
//!
//! - `module @<name> {` opens the file and `}` on a line of its own closes it; the name is written as
//!   a graph's is (bare when it is one word, quoted otherwise). Inside, one declaration per line:
//! - `param "<name>" : <type>` declares a [`ParamDecl`](crate::module::ParamDecl).
//! - `state "<name>" : <type> {role = <role>}` declares a [`StateDecl`](crate::module::StateDecl);
//!   the role is one of [`StateRole::name`](crate::module::StateRole::name) (`kv_cache`, `trainable`,
//!   `optimizer_moment`, `master_weight`, `gradient_accumulator`, `counter`).
//! - `program "<name>" {kind = <kind>} graph @<name> {` starts a [`Program`](crate::module::Program),
//!   with the kind one of [`ProgramKind::name`](crate::module::ProgramKind::name) (`forward`,
//!   `prefill`, `decode`, `score`, `train_step`, `accumulate`, `draft`); the graph's statements
//!   follow, one level deeper, and its `}` closes the program.
//!
//! The printer writes the parameters, then the states, then the programs, each in declaration order;
//! the parser takes the lines in any order. The role and kind blocks are attribute blocks with
//! exactly one attribute, so a later attribute (a state's initialiser, say) needs no new syntax. The
//! parser rejects two declarations of one kind with the same name, which would make a name ambiguous;
//! everything else about how declarations and programs fit together is
//! [`verify_module`](crate::module::verify_module)'s to check.
//!
//! A file someone wrote is read with [`read_file`] (or [`check_graph_file`], [`check_module_file`]):
//! UTF-8, parse and verifiers in one, every error at a line and column of the file, the verifiers'
//! included (`check.rs`).

use std::fmt;

use crate::diag::Diagnostic;
use crate::graph::Graph;
use crate::module::Module;

mod check;
mod dot;
mod lex;
#[cfg(test)]
mod module_tests;
mod parse;
mod print;
#[cfg(test)]
mod tests;

pub use check::{check_graph_file, check_module_file, is_module, read_file, KirFile};
pub use dot::{print_dot, print_module_dot};
pub use print::{node_line, print, print_module};

/// A `.kir` file that does not parse, with the place and the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ParseError(Diagnostic);

impl ParseError {
    pub fn diagnostic(&self) -> &Diagnostic {
        &self.0
    }

    pub fn into_diagnostic(self) -> Diagnostic {
        self.0
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Parses a graph from text; diagnostics name the file `<input>`.
pub fn parse(src: &str) -> Result<Graph, ParseError> {
    parse_file("<input>", src)
}

/// Parses a graph from the text of the file `name` (used only in diagnostics).
pub fn parse_file(name: &str, src: &str) -> Result<Graph, ParseError> {
    parse::parse_graph(src).map_err(|e| ParseError(Diagnostic::at_bytes(name, src, e.start, e.end, e.msg)))
}

/// Parses a module from text; diagnostics name the file `<input>`.
pub fn parse_module(src: &str) -> Result<Module, ParseError> {
    parse_module_file("<input>", src)
}

/// Parses a module from the text of the file `name` (used only in diagnostics).
pub fn parse_module_file(name: &str, src: &str) -> Result<Module, ParseError> {
    parse::parse_module(src).map_err(|e| ParseError(Diagnostic::at_bytes(name, src, e.start, e.end, e.msg)))
}

/// An error at bytes `start..end` of the source, before it is turned into a [`Diagnostic`].
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SpanError {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) msg: String,
}

impl SpanError {
    pub(crate) fn new(start: usize, end: usize, msg: impl Into<String>) -> SpanError {
        SpanError { start, end, msg: msg.into() }
    }
}
