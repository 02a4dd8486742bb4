//! `dce`: dead-code elimination.
//!
//! Removes every node none of whose results reaches a graph output. Assumes a verified graph.
//! Guarantees the outputs compute the same values, and that graph inputs (the calling convention)
//! and sends (side effects) stay. Removes dead parameters too, so the parameter table shrinks to what
//! the outputs need. Does not look inside fused kernels (their bodies have no dead code by
//! construction) and does not fold or merge anything.

use kiln_ir::{Graph, NodeId, Op};
use rustc_hash::FxHashSet as HashSet;

use super::{Changed, Options, PassError};

pub fn run(graph: &mut Graph, _opts: &Options) -> Result<Changed, PassError> {
    let order = graph.nodes();
    let mut live: HashSet<NodeId> = HashSet::default();
    let mut work: Vec<NodeId> = graph.outputs().iter().map(|&(_, v)| graph.producer(v)).collect();
    work.extend(
        order.iter().copied().filter(|&n| matches!(graph.node(n).op, Op::Input { .. } | Op::Send { .. })),
    );
    while let Some(n) = work.pop() {
        if live.insert(n) {
            work.extend(graph.node(n).inputs.iter().map(|&v| graph.producer(v)));
        }
    }
    // Remove users before producers: walk the order backwards.
    let dead: Vec<NodeId> = order.into_iter().rev().filter(|n| !live.contains(n)).collect();
    for &n in &dead {
        graph.remove_node(n).map_err(|e| PassError::Precondition { pass: "dce", message: e.to_string() })?;
    }
    Ok(if dead.is_empty() { Changed::No } else { Changed::Yes })
}
