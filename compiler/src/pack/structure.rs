//! What a runtime must know about a program's structure, found from its ops (never from kernel or
//! scope names) and written into the manifest as typed data:
//!
//! - the caller inputs whose values index something, with the rows they may index
//!   ([`kiln_ir::artifact::IndexInput`]): the ids of an `embedding` (the table's rows), the
//!   positions a `cache_update` writes or an `attention` reads the cache at (the cache's slots),
//!   the targets of a `cross_entropy` (the classes); and in training, the ids of an
//!   `embedding_grad` (the gradient table's `rows`), the targets of a `cross_entropy_grad` (the
//!   classes, with its `ignore_index`) and the positions of an `attention_grad` (the slots); and
//!   the indices of a `take_along` (a prefill's last token of each row, among the new tokens).
//!   Compiled kernels clamp, skip or trust such values, so the runtime checks them before a run;
//! - the `moe_dispatch` launches, whose `offsets` result gives the load of each expert
//!   ([`kiln_ir::artifact::MoeDispatch`]).
//!
//! An index operand is traced back through reshapes and broadcasts to the graph input it comes from; one computed
//! by the graph is not a caller's value and is not listed. Ops inside `fused` bodies count too: a
//! body input stands for the fused node's operand in the same place.

use std::collections::HashMap;

use kiln_ir::artifact::{BufferId, IndexInput, Indexes, MoeDispatch};
use kiln_ir::{Dim, Graph, NodeId, Op, ValueId};

/// Which operand of an op indexes what, the rows it may index (from the op's operand types), and
/// the value that means "none" if the op has one.
fn index_operands(g: &Graph, n: NodeId) -> Vec<(usize, Indexes, Dim, Option<i64>)> {
    let node = g.node(n);
    let dim = |operand: usize, axis: usize| g.ty(node.inputs[operand]).shape.get(axis).copied();
    let last = |operand: usize| g.ty(node.inputs[operand]).shape.last().copied();
    let mut out = Vec::new();
    match &node.op {
        Op::Embedding => out.extend(dim(0, 0).map(|rows| (1, Indexes::Vocabulary, rows, None))),
        Op::CacheUpdate => out.extend(dim(0, 1).map(|slots| (2, Indexes::CacheSlots, slots, None))),
        Op::Attention { .. } if node.inputs.len() == 4 => {
            out.extend(dim(1, 1).map(|slots| (3, Indexes::CacheSlots, slots, None)))
        }
        Op::CrossEntropy { ignore_index } | Op::CrossEntropyGrad { ignore_index } => {
            out.extend(last(0).map(|classes| (1, Indexes::Classes, classes, *ignore_index)))
        }
        Op::EmbeddingGrad { rows } => out.push((0, Indexes::Vocabulary, Dim::known(*rows), None)),
        // The row a prefill takes each sequence's logits at (`build_prefill_last`).
        Op::TakeAlong { axis } => out.extend(dim(0, *axis).map(|t| (1, Indexes::Along, t, None))),
        Op::AttentionGrad { .. } if node.inputs.len() == 5 => {
            out.extend(dim(1, 1).map(|slots| (3, Indexes::CacheSlots, slots, None)))
        }
        _ => {}
    }
    out
}

/// The graph input `v` is, through reshapes; `None` for a computed value.
fn input_of(g: &Graph, mut v: ValueId) -> Option<String> {
    loop {
        let node = g.node(g.producer(v));
        match &node.op {
            Op::Input { name } => return Some(name.clone()),
            Op::Reshape { .. } | Op::Broadcast { .. } => v = node.inputs[0],
            _ => return None,
        }
    }
}

/// The index inputs of `g` (see the module documentation), each `(input, indexes)` once with the
/// smallest limit that applies (a constant one, when one is symbolic and one constant, is kept as
/// the first seen).
pub(super) fn index_inputs(g: &Graph) -> Vec<IndexInput> {
    let mut out: Vec<IndexInput> = Vec::new();
    let mut add = |input: String, indexes: Indexes, limit: Dim, ignore: Option<i64>| {
        match out.iter_mut().find(|t| t.input == input && t.indexes == indexes) {
            Some(t) => {
                if let (Some(a), Some(b)) = (t.limit.as_known(), limit.as_known()) {
                    t.limit = Dim::known(a.min(b));
                }
                // Allowed only if every reader ignores it.
                if t.ignore != ignore {
                    t.ignore = None;
                }
            }
            None => out.push(IndexInput { input, limit, indexes, ignore }),
        }
    };
    for n in g.nodes() {
        let node = g.node(n);
        for (operand, indexes, limit, ignore) in index_operands(g, n) {
            if let Some(input) = input_of(g, node.inputs[operand]) {
                add(input, indexes, limit, ignore);
            }
        }
        // Inside a fused body: a body input is the fused node's operand in the same place.
        if let Op::Fused { body, .. } = &node.op {
            let body_inputs = body.inputs();
            for m in body.nodes() {
                for (operand, indexes, limit, ignore) in index_operands(body, m) {
                    let v = body.node(m).inputs[operand];
                    let Some(i) = body_inputs.iter().position(|&(_, b)| b == v) else { continue };
                    if let Some(input) = node.inputs.get(i).and_then(|&outer| input_of(g, outer)) {
                        add(input, indexes, limit, ignore);
                    }
                }
            }
        }
    }
    out
}

/// The top-level `moe_dispatch` launches of `g`, in program order: `step_of` maps a node to its
/// launch step, `buffer` a value to its buffer.
pub(super) fn moe_dispatches(
    g: &Graph,
    step_of: &HashMap<NodeId, usize>,
    buffer: impl Fn(ValueId) -> BufferId,
) -> Vec<MoeDispatch> {
    let mut out = Vec::new();
    for n in g.nodes() {
        let node = g.node(n);
        let Op::MoeDispatch(_) = &node.op else { continue };
        let (Some(&step), Some(&offsets), Some(&indices)) =
            (step_of.get(&n), node.results.get(1), node.inputs.get(1))
        else {
            continue;
        };
        let experts =
            g.ty(offsets).shape.first().and_then(|d| d.as_known()).filter(|&e| e >= 2).map(|e| e - 1);
        let top_k = g.ty(indices).shape.last().and_then(|d| d.as_known());
        let (Some(experts), Some(top_k)) = (experts, top_k) else { continue };
        let layer = node.scope.clone().unwrap_or_else(|| format!("moe_dispatch {offsets}"));
        out.push(MoeDispatch { step, offsets: buffer(offsets), experts, top_k, layer });
    }
    out.sort_by_key(|d| d.step);
    out
}
