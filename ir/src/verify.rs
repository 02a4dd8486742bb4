//! The verifier: checks that a graph is well-formed. It runs after the builder, after the parser and
//! after every pass in tests and debug builds. A verifier failure on a graph kiln produced is a
//! compiler bug, never a user error; on a graph a user wrote (`kiln check file.kir`) it is the
//! diagnostic.
//!
//! Invariants (each violation is reported with the offending value and its node printed in context):
//!
//! 1. Every operand is defined, and by a node that comes earlier in [`Graph::nodes`] order (the graph
//!    is acyclic). The mutation API guarantees this; the verifier re-checks it.
//! 2. Each node's result types are exactly what shape inference ([`crate::infer::infer`]) gives for its
//!    operands. Ops that declare their type (`input`, `param`, `constant`, `recv`) take no operands
//!    and define exactly one value.
//! 3. `constant` is a finite scalar of a floating-point type (so that the text form reads back).
//! 4. Parameter types are fully known: no symbolic dimension in a weight.
//! 5. Parameter names are unique, and so are input names; every graph has at least one output.
//! 6. The body of a `fused` kernel is itself a verified graph with no parameters and no pipeline
//!    communication (weights reach kernels as arguments; sends and receives stay at the top level),
//!    and no `cache_update` (compiled code updates a KV cache in place, as a launch of its own).
//! 7. Scopes, when present, are non-empty.
//!
//! Deliberately not invariants: dead values (a pass may leave them for a later cleanup) and
//! unused inputs.

use rustc_hash::FxHashSet as HashSet;
use std::fmt;

use crate::graph::{Graph, NodeId, ValueId};
use crate::infer::infer;
use crate::op::Op;

/// One broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The value the problem is about, when there is one.
    pub value: Option<ValueId>,
    pub message: String,
    /// The offending node in text-IR form.
    pub context: String,
}

/// Everything wrong with a graph, in node order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct VerifyError {
    pub graph: String,
    pub violations: Vec<Violation>,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.violations.len();
        write!(f, "graph @{} is invalid ({n} problem{}):", self.graph, if n == 1 { "" } else { "s" })?;
        for v in &self.violations {
            write!(f, "\n  {}", v.message)?;
            if !v.context.is_empty() {
                write!(f, "\n      in: {}", v.context)?;
            }
        }
        Ok(())
    }
}

/// Checks every invariant listed in the module documentation.
pub fn verify(g: &Graph) -> Result<(), VerifyError> {
    let violations = check(g, false);
    if violations.is_empty() {
        Ok(())
    } else {
        Err(VerifyError { graph: g.name().to_string(), violations })
    }
}

fn check(g: &Graph, in_kernel: bool) -> Vec<Violation> {
    let mut out = Vec::new();
    // By value id: whether an earlier node defines the value (a table, not a hash set: a graph of
    // DeepSeek-V3 has a quarter of a million values, and the pipeline verifies after every pass).
    let mut defined = vec![false; g.value_bound() as usize];
    let order = g.nodes();
    // Sized up front: a DeepSeek-V3 program declares about 90 thousand parameters (every routed
    // expert's weights and scales), and growing the set to that size rehashed the names over and
    // over: 39% of the verifier's samples in a `perf` profile of `kiln compile`, where the
    // verifier was 10% of all (2026-12-07).
    let (mut n_params, mut n_inputs) = (0, 0);
    for &n in &order {
        match g.node(n).op {
            Op::Param { .. } => n_params += 1,
            Op::Input { .. } => n_inputs += 1,
            _ => {}
        }
    }
    let mut params: HashSet<&str> = HashSet::with_capacity_and_hasher(n_params, Default::default());
    let mut inputs: HashSet<&str> = HashSet::with_capacity_and_hasher(n_inputs, Default::default());
    let mut bodies: HashSet<*const Graph> = HashSet::default();
    for &n in &order {
        let node = g.node(n);
        let mut report = |value: Option<ValueId>, message: String| {
            out.push(Violation { value, message, context: crate::text::node_line(g, n) });
        };
        for &v in &node.inputs {
            if !defined.get(v.as_u32() as usize).copied().unwrap_or(false) {
                report(Some(v), format!("operand {v} is used before it is defined"));
            }
        }
        if let Some(scope) = &node.scope {
            if scope.is_empty() {
                report(None, "scope is empty; leave it out instead".into());
            }
        }
        if node.op.declares_type() {
            if !node.inputs.is_empty() || node.results.len() != 1 {
                report(
                    node.results.first().copied(),
                    format!("`{}` takes no operands and defines one value", node.op.name()),
                );
            }
        } else {
            let tys: Vec<_> = node.inputs.iter().map(|&v| g.ty(v)).collect();
            match infer(&node.op, &tys) {
                Err(e) => report(node.results.first().copied(), e.0),
                Ok(want) => {
                    if want.len() != node.results.len() {
                        report(
                            None,
                            format!(
                                "`{}` defines {} value(s), found {}",
                                node.op.name(),
                                want.len(),
                                node.results.len()
                            ),
                        );
                    }
                    for (&r, w) in node.results.iter().zip(&want) {
                        if g.ty(r) != w {
                            report(Some(r), format!("{r} has type {} but its op gives {w}", g.ty(r)));
                        }
                    }
                }
            }
        }
        match &node.op {
            Op::Constant { value } => {
                let ty = g.ty(node.results[0]);
                if ty.rank() != 0 || !ty.dtype.is_float() || !value.is_finite() {
                    report(
                        Some(node.results[0]),
                        format!("a constant is a finite float scalar, found {value:?} : {ty}"),
                    );
                }
            }
            Op::Param { name } => {
                let ty = g.ty(node.results[0]);
                if ty.shape.iter().any(|d| d.is_symbolic()) {
                    report(
                        Some(node.results[0]),
                        format!("parameter `{name}` has a symbolic dimension: {ty}"),
                    );
                }
                if !params.insert(name) {
                    report(Some(node.results[0]), format!("parameter `{name}` is declared twice"));
                }
                if in_kernel {
                    report(
                        Some(node.results[0]),
                        "a fused kernel takes weights as arguments, not parameters".into(),
                    );
                }
            }
            // `insert` in the guard records the name whether or not it is a duplicate.
            Op::Input { name } if !inputs.insert(name) => {
                report(Some(node.results[0]), format!("input `{name}` is declared twice"));
            }
            Op::CacheUpdate if in_kernel => {
                report(
                    None,
                    "a KV-cache update cannot sit inside a fused kernel: it is done in place".into(),
                );
            }
            Op::Send { .. } | Op::Recv { .. } if in_kernel => {
                report(None, "pipeline communication cannot sit inside a fused kernel".into());
            }
            Op::AllReduce { .. } | Op::AllGather { .. } | Op::AllToAll { .. } if in_kernel => {
                report(None, "an all-reduce cannot sit inside a fused kernel: the runtime runs it".into());
            }
            // A body's value ids are its own: the finding is about the fused node's results.
            // A body several fused nodes share (the identical layers of a model) is checked once.
            Op::Fused { name, body } if bodies.insert(std::sync::Arc::as_ptr(body)) => {
                for v in check(body, true) {
                    let message = format!("in fused kernel `{name}`: {} ({})", v.message, v.context);
                    report(node.results.first().copied(), message);
                }
            }
            _ => {}
        }
        for &r in &node.results {
            defined[r.as_u32() as usize] = true;
        }
    }
    if g.outputs().is_empty() {
        out.push(Violation {
            value: None,
            message: "the graph has no outputs".into(),
            context: String::new(),
        });
    }
    out
}

/// The node that defines `v`, for callers that report a violation's location.
pub fn defining_node(g: &Graph, v: ValueId) -> Option<NodeId> {
    g.contains_value(v).then(|| g.producer(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{BinaryOp, UnaryOp};
    use crate::types::{DType, Dim, TensorType};

    fn input(g: &mut Graph, name: &str, ty: TensorType) -> ValueId {
        g.add_node(Op::Input { name: name.into() }, &[], vec![ty], None).unwrap().1[0]
    }

    #[test]
    fn a_good_graph_verifies() {
        let mut g = Graph::new("ok");
        let x = input(&mut g, "x", TensorType::new(DType::F32, [Dim::T, Dim::known(4)]));
        let w = g
            .add_node(Op::Param { name: "w".into() }, &[], vec![TensorType::known(DType::F32, &[4])], None)
            .unwrap()
            .1[0];
        let y =
            g.add_node(Op::Binary(BinaryOp::Mul), &[x, w], vec![g.ty(x).clone()], Some("blk")).unwrap().1[0];
        g.add_output("y", y).unwrap();
        assert_eq!(verify(&g), Ok(()));
    }

    #[test]
    fn every_broken_invariant_is_reported() {
        let mut g = Graph::new("bad");
        let x = input(&mut g, "x", TensorType::new(DType::F32, [Dim::T, Dim::known(4)]));
        input(&mut g, "x", TensorType::scalar(DType::F32));
        // Wrong declared result type.
        let bad = TensorType::new(DType::F32, [Dim::T]);
        g.add_node(Op::Unary(UnaryOp::Exp), &[x], vec![bad], None).unwrap();
        // Symbolic parameter, declared twice.
        let sym = TensorType::new(DType::F32, [Dim::T]);
        g.add_node(Op::Param { name: "w".into() }, &[], vec![sym.clone()], None).unwrap();
        g.add_node(Op::Param { name: "w".into() }, &[], vec![TensorType::known(DType::F32, &[2])], None)
            .unwrap();
        // A NaN constant and an empty scope.
        g.add_node(Op::Constant { value: f64::NAN }, &[], vec![TensorType::scalar(DType::F32)], Some(""))
            .unwrap();
        let err = verify(&g).unwrap_err();
        let messages: Vec<&str> = err.violations.iter().map(|v| v.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "input `x` is declared twice",
                "%2 has type f32[T] but its op gives f32[T, 4]",
                "parameter `w` has a symbolic dimension: f32[T]",
                "parameter `w` is declared twice",
                "scope is empty; leave it out instead",
                "a constant is a finite float scalar, found NaN : f32[]",
                "the graph has no outputs",
            ]
        );
        assert_eq!(err.violations[1].value, Some(ValueId::new(2)));
        assert!(err.to_string().starts_with("graph @bad is invalid (7 problems):"));
    }
}
