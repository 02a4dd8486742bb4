//! The `.kir` printer. It writes nodes in [`Graph::nodes`] order, so a parsed file prints back exactly
//! as the parser read it when it is in this canonical form. A module prints its parameters, then its
//! states, then its programs, each in declaration order.
//!
//! Everything goes through one [`fmt::Write`] sink: `print` fills one `String`, and `Display` writes
//! straight into the formatter, so a graph of tens of thousands of nodes costs no per-line allocation
//! beyond what [`Op::attrs`] builds.

use std::fmt::{self, Write};
use std::sync::Arc;

use rustc_hash::FxHashMap as HashMap;

use crate::graph::{Graph, Node, NodeId, ValueId};
use crate::module::Module;
use crate::op::Op;

use super::lex::is_word;

/// The text form of a graph (see the module documentation of [`crate::text`]).
pub fn print(g: &Graph) -> String {
    let mut out = String::with_capacity(64 * (g.node_count() + 2));
    write_graph(&mut out, g).expect("writing to a String cannot fail");
    out
}

/// The text form of a module (see the module documentation of [`crate::text`]).
pub fn print_module(m: &Module) -> String {
    let nodes: usize = m.programs.iter().map(|p| p.graph.node_count() + 2).sum();
    let mut out = String::with_capacity(64 * (nodes + m.params.len() + m.states.len() + 2));
    write_module(&mut out, m).expect("writing to a String cannot fail");
    out
}

/// The line of one node as the printer writes it, without indentation and, for `fused`, without the
/// body: the context line of diagnostics about the node.
pub fn node_line(g: &Graph, n: NodeId) -> String {
    let mut out = String::new();
    write_node(&mut out, g, g.node(n)).expect("writing to a String cannot fail");
    out
}

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_graph(f, self)
    }
}

impl fmt::Display for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_module(f, self)
    }
}

/// `@name`: a name that lexes as one word is written bare (`@tiny`); anything else is quoted.
fn write_at_name(w: &mut impl Write, name: &str) -> fmt::Result {
    w.write_str("@")?;
    if is_word(name) {
        w.write_str(name)
    } else {
        write!(w, "{name:?}")
    }
}

fn write_graph(w: &mut impl Write, g: &Graph) -> fmt::Result {
    write_graph_at(w, g, 0)
}

/// `graph @name {`, the body one level deeper than `depth`, and the closing `}` at `depth`. The caller
/// has written the indentation (and anything else) before `graph`.
fn write_graph_at(w: &mut impl Write, g: &Graph, depth: usize) -> fmt::Result {
    write_graph_shared(w, g, depth, &mut Shared::default())
}

/// The text of fused bodies that several nodes share (`fuse-kernels` gives the identical layers of a
/// model one body), by body and depth: written once, then copied. DeepSeek-V3's routed-expert body
/// is printed 58 times a program.
#[derive(Default)]
struct Shared(HashMap<(*const Graph, usize), String>);

fn write_graph_shared(w: &mut impl Write, g: &Graph, depth: usize, shared: &mut Shared) -> fmt::Result {
    w.write_str("graph ")?;
    write_at_name(w, g.name())?;
    w.write_str(" {\n")?;
    write_body(w, g, depth + 1, shared)?;
    indent(w, depth)?;
    w.write_str("}\n")
}

fn write_module(w: &mut impl Write, m: &Module) -> fmt::Result {
    w.write_str("module ")?;
    write_at_name(w, &m.name)?;
    w.write_str(" {\n")?;
    for p in &m.params {
        writeln!(w, "  param {:?} : {}", p.name, p.ty)?;
    }
    for s in &m.states {
        writeln!(w, "  state {:?} : {} {{role = {}}}", s.name, s.ty, s.role)?;
    }
    let mut shared = Shared::default();
    for p in &m.programs {
        write!(w, "  program {:?} {{kind = {}}} ", p.name, p.kind)?;
        write_graph_shared(w, &p.graph, 1, &mut shared)?;
    }
    w.write_str("}\n")
}

fn indent(w: &mut impl Write, depth: usize) -> fmt::Result {
    for _ in 0..depth {
        w.write_str("  ")?;
    }
    Ok(())
}

fn write_values(w: &mut impl Write, values: &[ValueId]) -> fmt::Result {
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            w.write_str(", ")?;
        }
        write!(w, "{v}")?;
    }
    Ok(())
}

/// The nodes and outputs of `g`, each line indented by `depth` levels.
fn write_body(w: &mut impl Write, g: &Graph, depth: usize, shared: &mut Shared) -> fmt::Result {
    let mut scope: Option<&str> = None;
    for n in g.nodes() {
        let node = g.node(n);
        if node.scope.as_deref() != scope {
            scope = node.scope.as_deref();
            indent(w, depth)?;
            match scope {
                Some(s) => writeln!(w, "scope {s:?}")?,
                None => w.write_str("scope none\n")?,
            }
        }
        indent(w, depth)?;
        write_node(w, g, node)?;
        if let Op::Fused { body, .. } = &node.op {
            w.write_str(" {\n")?;
            if Arc::strong_count(body) > 1 {
                let key = (Arc::as_ptr(body), depth + 1);
                let text = match shared.0.get(&key) {
                    Some(text) => text,
                    None => {
                        let mut text = String::new();
                        write_body(&mut text, body, depth + 1, shared)?;
                        shared.0.entry(key).or_insert(text)
                    }
                };
                w.write_str(text)?;
            } else {
                write_body(w, body, depth + 1, shared)?;
            }
            indent(w, depth)?;
            w.write_str("}")?;
        }
        w.write_str("\n")?;
    }
    for (name, v) in g.outputs() {
        indent(w, depth)?;
        writeln!(w, "output {name:?} = {v}")?;
    }
    Ok(())
}

/// `<results> = <op> <operands> {<attrs>} : <types>`, without the body of a `fused`.
fn write_node(w: &mut impl Write, g: &Graph, node: &Node) -> fmt::Result {
    if !node.results.is_empty() {
        write_values(w, &node.results)?;
        w.write_str(" = ")?;
    }
    w.write_str(node.op.name())?;
    if !node.inputs.is_empty() {
        w.write_str(" ")?;
        write_values(w, &node.inputs)?;
    }
    let attrs = node.op.attrs();
    if !attrs.is_empty() {
        w.write_str(" {")?;
        for (i, (key, value)) in attrs.iter().enumerate() {
            if i > 0 {
                w.write_str(", ")?;
            }
            write!(w, "{key} = {value}")?;
        }
        w.write_str("}")?;
    }
    if !node.results.is_empty() {
        w.write_str(" : ")?;
        for (i, &r) in node.results.iter().enumerate() {
            if i > 0 {
                w.write_str(", ")?;
            }
            write!(w, "{}", g.ty(r))?;
        }
    }
    Ok(())
}
