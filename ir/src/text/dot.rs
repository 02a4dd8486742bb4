//! The graph IR drawn as Graphviz DOT (`kiln ir --format dot | dot -Tsvg > g.svg`).
//!
//! One box per node, labelled with its op (a `fused` node with its rule name and the size of its
//! body) and its result types; one edge per operand, labelled with the value's text-IR name (`%12`)
//! so a drawing can be read next to the `.kir` text. Inputs and parameters are ellipses, graph
//! outputs are ellipses of their own. Nodes are grouped into nested clusters by their scope, one
//! cluster per module of the Hugging Face path (`model` > `layers.3` > `self_attn`): a layer index
//! stays with the word before it. A module is one digraph with a cluster per program.
//!
//! The drawing is a view, not a format: nothing reads it back, and it can change with any release.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::graph::Graph;
use crate::module::Module;
use crate::op::Op;

/// `g` as one DOT digraph.
pub fn print_dot(g: &Graph) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph {} {{", quote(g.name()));
    header(&mut out);
    body(&mut out, g, "n", 1);
    out.push_str("}\n");
    out
}

/// `m` as one DOT digraph, each program a cluster of its own.
pub fn print_module_dot(m: &Module) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph {} {{", quote(&m.name));
    header(&mut out);
    for (i, p) in m.programs.iter().enumerate() {
        let _ = writeln!(out, "  subgraph {} {{", quote(&format!("cluster_p{i}")));
        let _ =
            writeln!(out, "    label={}; style=bold;", quote(&format!("program {} ({})", p.name, p.kind)));
        body(&mut out, &p.graph, &format!("p{i}n"), 2);
        out.push_str("  }\n");
    }
    out.push_str("}\n");
    out
}

fn header(out: &mut String) {
    out.push_str("  rankdir=TB;\n");
    out.push_str("  node [shape=box, fontname=\"monospace\", fontsize=10];\n");
    out.push_str("  edge [fontname=\"monospace\", fontsize=8];\n");
}

/// A scope's clusters: the nodes directly in it (by position in the node order) and its children.
#[derive(Default)]
struct Cluster {
    nodes: Vec<usize>,
    children: BTreeMap<String, Cluster>,
}

/// The parts of a scope path, a numeric part joined to the word before it (`layers.3`).
fn scope_parts(scope: &str) -> Vec<String> {
    let mut parts: Vec<String> = Vec::new();
    for p in scope.split('.') {
        match parts.last_mut() {
            Some(last) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                last.push('.');
                last.push_str(p);
            }
            _ => parts.push(p.to_string()),
        }
    }
    parts
}

fn body(out: &mut String, g: &Graph, prefix: &str, depth: usize) {
    let order = g.nodes();
    let pos: BTreeMap<_, _> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut root = Cluster::default();
    for (i, &n) in order.iter().enumerate() {
        let mut at = &mut root;
        for part in g.node(n).scope.as_deref().map(scope_parts).unwrap_or_default() {
            at = at.children.entry(part).or_default();
        }
        at.nodes.push(i);
    }
    let mut counter = 0;
    cluster(out, g, &order, &root, prefix, depth, "", &mut counter);
    let pad = "  ".repeat(depth);
    for (i, &n) in order.iter().enumerate() {
        for &v in &g.node(n).inputs {
            let from = pos[&g.producer(v)];
            let _ = writeln!(out, "{pad}{prefix}{from} -> {prefix}{i} [label={}];", quote(&v.to_string()));
        }
    }
    for (k, (name, v)) in g.outputs().iter().enumerate() {
        let _ = writeln!(
            out,
            "{pad}{prefix}out{k} [label={}, shape=ellipse, style=filled, fillcolor=\"#e8f0ff\"];",
            quote(&format!("output {name}\n{}", g.ty(*v)))
        );
        let _ = writeln!(
            out,
            "{pad}{prefix}{} -> {prefix}out{k} [label={}];",
            pos[&g.producer(*v)],
            quote(&v.to_string())
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn cluster(
    out: &mut String,
    g: &Graph,
    order: &[crate::graph::NodeId],
    c: &Cluster,
    prefix: &str,
    depth: usize,
    path: &str,
    counter: &mut usize,
) {
    let pad = "  ".repeat(depth);
    for &i in &c.nodes {
        let _ = writeln!(out, "{pad}{prefix}{i} [{}];", node_attrs(g, order[i]));
    }
    for (name, child) in &c.children {
        let path = if path.is_empty() { name.clone() } else { format!("{path}.{name}") };
        *counter += 1;
        let _ = writeln!(out, "{pad}subgraph {} {{", quote(&format!("cluster_{prefix}{}", *counter)));
        let _ = writeln!(out, "{pad}  label={}; style=rounded; color=gray;", quote(&path));
        cluster(out, g, order, child, prefix, depth + 1, &path, counter);
        let _ = writeln!(out, "{pad}}}");
    }
}

fn node_attrs(g: &Graph, n: crate::graph::NodeId) -> String {
    let node = g.node(n);
    let types: Vec<String> = node.results.iter().map(|&r| g.ty(r).to_string()).collect();
    let types = types.join(", ");
    let (head, extra) = match &node.op {
        Op::Input { name } => (format!("input {name}"), ", shape=ellipse"),
        Op::Param { name } => (format!("param {name}"), ", shape=ellipse, color=gray"),
        Op::Fused { name, body } => {
            (format!("fused {name} ({} ops)", body.node_count()), ", style=filled, fillcolor=\"#fff2cc\"")
        }
        op => (op.name().to_string(), ""),
    };
    let label = if types.is_empty() { head } else { format!("{head}\n{types}") };
    format!("label={}{extra}", quote(&label))
}

/// A DOT string literal.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for ch in s.chars() {
        match ch {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::parse;

    const SRC: &str = r#"graph @g {
  %0 = input {name = "x"} : f32[2, 4]
  scope "model.layers.0.mlp"
  %1 = param {name = "model.layers.0.mlp.w"} : f32[3, 4]
  %2 = linear %0, %1 : f32[2, 3]
  scope "model.layers.1.mlp"
  %3 = silu %2 : f32[2, 3]
  scope none
  output "y" = %3
}
"#;

    #[test]
    fn every_node_edge_and_output_is_drawn_in_its_scope() {
        let g = parse(SRC).unwrap();
        let dot = print_dot(&g);
        assert!(dot.starts_with("digraph \"g\" {\n"), "{dot}");
        assert!(dot.contains("n0 [label=\"input x\\nf32[2, 4]\", shape=ellipse];"), "{dot}");
        assert!(dot.contains("n2 [label=\"linear\\nf32[2, 3]\"];"), "{dot}");
        // Operand edges, labelled with the value's name.
        assert!(dot.contains("n0 -> n2 [label=\"%0\"];"), "{dot}");
        assert!(dot.contains("n1 -> n2 [label=\"%1\"];"), "{dot}");
        assert!(dot.contains("n2 -> n3 [label=\"%2\"];"), "{dot}");
        assert!(dot.contains("n3 -> nout0 [label=\"%3\"];"), "{dot}");
        // Nested clusters: model > layers.0 > mlp, and layers.1 beside layers.0.
        for label in ["model", "model.layers.0", "model.layers.0.mlp", "model.layers.1.mlp"] {
            assert!(dot.contains(&format!("label=\"{label}\"; style=rounded")), "{label}: {dot}");
        }
        assert_eq!(dot.matches("subgraph").count(), 5, "{dot}");
        assert_eq!(dot.matches('{').count(), dot.matches('}').count(), "{dot}");
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(quote("a \"b\"\\\nc"), "\"a \\\"b\\\"\\\\\\nc\"");
    }

    #[test]
    fn scope_parts_keep_layer_indices_with_their_word() {
        assert_eq!(scope_parts("model.layers.12.self_attn"), ["model", "layers.12", "self_attn"]);
        assert_eq!(scope_parts("lm_head"), ["lm_head"]);
    }
}
