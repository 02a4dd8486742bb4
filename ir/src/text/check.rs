//! Reading a `.kir` file someone wrote, whole: its bytes as UTF-8, the parse, and the verifiers,
//! every error a [`Diagnostic`] at a line and column of the file.
//!
//! The verifiers work on graphs and modules, which do not know where they were written; the parser
//! records where (each top-level value's defining line, each graph's header, each declaration), and
//! this module puts a verifier's finding there: a finding about a value at the line defining it (a
//! finding inside a `fused` body at the fused node), one about no value (a graph without outputs) at
//! the graph's header, one about a declaration at its name, one about a program at its graph's
//! header. The first finding sets the place; the others follow in the message.
//!
//! What it does not do: anything the parser and the verifiers do not already check. It only says
//! where.

use crate::diag::{self, Diagnostic};
use crate::graph::Graph;
use crate::module::{verify_module, Module, ModuleError};
use crate::verify::{verify, VerifyError};

use super::parse::{parse_graph_with_spans, parse_module_with_spans, GraphSpans, Span, Spans};
use super::SpanError;

/// What a `.kir` file holds.
#[derive(Clone, Debug, PartialEq)]
pub enum KirFile {
    Graph(Graph),
    Module(Module),
}

/// Whether the text is a module: its first line that is not blank or a comment starts with
/// `module`.
pub fn is_module(src: &str) -> bool {
    let first = src.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with("//"));
    first.is_some_and(|l| l.starts_with("module"))
}

/// Reads the bytes of the `.kir` file `name` (used only in diagnostics): a module or a graph,
/// parsed and verified.
pub fn read_file(name: &str, bytes: &[u8]) -> Result<KirFile, Diagnostic> {
    let src = diag::utf8(name, bytes)?;
    if is_module(src) {
        check_module_file(name, src).map(KirFile::Module)
    } else {
        check_graph_file(name, src).map(KirFile::Graph)
    }
}

fn parse_error(name: &str, src: &str, e: SpanError) -> Diagnostic {
    Diagnostic::at_bytes(name, src, e.start, e.end, e.msg)
}

/// Parses and verifies the graph in the text of the file `name`.
pub fn check_graph_file(name: &str, src: &str) -> Result<Graph, Diagnostic> {
    let (g, spans) = parse_graph_with_spans(src).map_err(|e| parse_error(name, src, e))?;
    let graph_spans = spans.graphs.first().expect("a parsed graph file has one graph");
    verify(&g).map_err(|e| located(name, src, "", &e, graph_spans))?;
    Ok(g)
}

/// Parses and verifies the module in the text of the file `name`.
pub fn check_module_file(name: &str, src: &str) -> Result<Module, Diagnostic> {
    let (m, spans) = parse_module_with_spans(src).map_err(|e| parse_error(name, src, e))?;
    verify_module(&m).map_err(|e| module_error(name, src, &m, &spans, e))?;
    Ok(m)
}

/// A verifier's findings as one diagnostic at the first one's place.
fn located(name: &str, src: &str, prefix: &str, e: &VerifyError, spans: &GraphSpans) -> Diagnostic {
    let first = &e.violations[0];
    let span = first.value.and_then(|v| spans.values.get(&v)).copied().unwrap_or(spans.header);
    let mut message = format!("{prefix}graph @{} is invalid: {}", e.graph, first.message);
    let rest: Vec<&str> = e.violations[1..].iter().map(|v| v.message.as_str()).collect();
    if !rest.is_empty() {
        message.push_str(&format!(" (and {} more: {})", rest.len(), rest.join("; ")));
    }
    Diagnostic::at_bytes(name, src, span.0, span.1, message)
}

/// A module verifier's error at the program, declaration or module it is about.
fn module_error(name: &str, src: &str, m: &Module, spans: &Spans, e: ModuleError) -> Diagnostic {
    let program = |p: &str| -> Option<&GraphSpans> {
        let i = m.programs.iter().position(|q| q.name == p)?;
        spans.graphs.get(i)
    };
    if let ModuleError::Graph { program: p, error } = &e {
        if let Some(g) = program(p) {
            return located(name, src, &format!("program `{p}`: "), error, g);
        }
    }
    let decl = |n: &str| spans.decls.get(n).copied();
    let span: Option<Span> = match &e {
        ModuleError::DuplicateParam(n) | ModuleError::DuplicateState(n) | ModuleError::ParamIsState(n) => {
            decl(n)
        }
        ModuleError::SymbolicParam { name: n, .. } | ModuleError::StateUsesT { name: n, .. } => decl(n),
        ModuleError::UndeclaredParam { program: p, .. }
        | ModuleError::ParamType { program: p, .. }
        | ModuleError::StateInputType { program: p, .. }
        | ModuleError::StateOutputType { program: p, .. }
        | ModuleError::Graph { program: p, .. }
        | ModuleError::DuplicateProgram(p) => program(p).map(|g| g.header),
        ModuleError::EmptyProgramName { index } => spans.graphs.get(*index).map(|g| g.header),
    };
    let span = span.unwrap_or(spans.module);
    Diagnostic::at_bytes(name, src, span.0, span.1, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The line and column a file's error is reported at, and its message.
    fn at(src: &str) -> (usize, usize, String) {
        let d = read_file("f.kir", src.as_bytes()).unwrap_err();
        (d.line, d.col, d.message)
    }

    #[test]
    fn a_finding_inside_a_fused_body_is_reported_at_the_fused_node() {
        let src = "graph @g {\n  %0 = input {name = \"x\"} : f32[B, 4]\n  \
                   %1 = fused %0 {name = \"k\"} : f32[B, 4] {\n    %0 = input {name = \"x\"} : f32[B, 4]\n    \
                   %1 = param {name = \"w\"} : f32[4, 4]\n    %2 = linear %0, %1 : f32[B, 4]\n    \
                   output \"y\" = %2\n  }\n  output \"y\" = %1\n}\n";
        let (line, col, message) = at(src);
        assert_eq!((line, col), (3, 3));
        assert!(message.starts_with("graph @g is invalid: in fused kernel `k`: a fused kernel takes weights"));
    }

    #[test]
    fn module_findings_are_reported_at_their_program_or_declaration() {
        let module = |state: &str| {
            format!(
                "module @m {{\n  state \"s\" : {state} {{role = kv_cache}}\n  \
                 program \"forward\" {{kind = forward}} graph @f {{\n    %0 = input {{name = \"x\"}} : f32[B, 4]\n    \
                 output \"y\" = %0\n  }}\n  program \"decode\" {{kind = decode}} graph @d {{\n    \
                 %0 = input {{name = \"x\"}} : f32[B, 4]\n    %1 = exp %0 : f32[B, 4]\n    \
                 %2 = param {{name = \"w\"}} : f32[4]\n    %3 = param {{name = \"w\"}} : f32[4]\n  }}\n}}\n"
            )
        };
        let (line, col, message) = at(&module("f32[B, T]"));
        assert_eq!((line, col), (2, 9));
        assert!(message.starts_with("state `s` has type f32[B, T], which uses T"), "{message}");
        let (line, col, message) = at(&module("f32[B, S]"));
        assert_eq!((line, col), (11, 5), "{message}");
        assert_eq!(
            message,
            "program `decode`: graph @d is invalid: parameter `w` is declared twice (and 1 more: the graph has \
             no outputs)"
        );
    }

    #[test]
    fn good_files_read_as_what_they_are() {
        let graph = "// a graph\ngraph @g {\n  %0 = input {name = \"x\"} : f32[B]\n  output \"y\" = %0\n}\n";
        assert!(matches!(read_file("g.kir", graph.as_bytes()), Ok(KirFile::Graph(_))));
        let module = "// a module\nmodule @m {\n  program \"forward\" {kind = forward} graph @g {\n    \
                      %0 = input {name = \"x\"} : f32[B]\n    output \"y\" = %0\n  }\n}\n";
        assert!(is_module(module) && !is_module(graph));
        assert!(matches!(read_file("m.kir", module.as_bytes()), Ok(KirFile::Module(_))));
    }
}
