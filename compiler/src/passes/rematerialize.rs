//! `rematerialize`: DeepSeek-V3's recomputation in the backward pass (the report's §3.2,
//! "Recomputation of RMSNorm and MLA Up-Projection"). On a train step (`train_step`,
//! `accumulate`), a forward value that the backward pass reads is kept alive from the forward pass
//! to its backward readers; for the values of these named rules the backward readers get a copy of
//! the op computed again from its operands instead, so the forward value dies after its last
//! forward reader:
//!
//! - [`RMS_NORM`]: every `rms_norm` (its input is kept anyway: the norm's own gradient reads it);
//! - [`MLA_UP_PROJ`]: the MLA up-projections, the `linear`s of `q_b_proj` and `kv_b_proj`, whose
//!   inputs are the latent `q_a` and `kv_a` norms (recomputed by the rule above), narrow where the
//!   projections' outputs are wide; with them the shape ops and the rotary embedding between them
//!   and attention (reshape, split, rope, broadcast, concat), since attention's gradient reads the
//!   per-head queries, keys and values those make, not the projections' outputs.
//!
//! The forward pass is the loss's ancestry (the output `loss`); the backward pass everything else.
//! A recomputed op reads its operands' backward copies where they have one, so chains recompute
//! from the first kept value. The copies are the same ops on the same values, so the step's results
//! do not change, bit for bit; the memory plan's activation arena shrinks by the saved values'
//! bytes, at the cost of computing them twice. Without a `loss` output (a program that is not a
//! train step) it does nothing; nor when a copy would read a trained weight after the optimizer
//! may have updated it in place (an update that does not wait for the whole backward pass, as it
//! does without gradient clipping). `kiln train --no-recompute` (and `kiln compile --disable-pass
//! rematerialize`) turns it off.
//!
//! Where the copies run: [`kiln_ir::Graph::nodes`] orders nodes by dependencies and then by id, so a
//! copy, made last, runs once its first backward reader is otherwise ready, late in the backward
//! pass rather than at its start.

use std::collections::{HashMap, HashSet};

use kiln_ir::module::ProgramKind;
use kiln_ir::{Graph, NodeId, Op, ValueId};

use super::rewrite::Trace;
use super::{Changed, Options, PassError};

const NAME: &str = "rematerialize";

/// `rms_norm(x, w)` read by the backward pass -> the same `rms_norm` computed again there.
pub const RMS_NORM: &str = "recompute-rms-norm";
/// `linear(c, W_qb)` / `linear(c, W_kvb)` read by the backward pass -> computed again there.
pub const MLA_UP_PROJ: &str = "recompute-mla-up-proj";

pub const RULES: &[&str] = &[RMS_NORM, MLA_UP_PROJ];

/// The modules whose `linear`s are MLA's up-projections.
const UP_PROJ: &[&str] = &["q_b_proj", "kv_b_proj"];

pub fn run(graph: &mut Graph, opts: &Options) -> Result<Changed, PassError> {
    Ok(rewrite(graph, opts)?.changed())
}

/// The rule that recomputes node `n`, if one does.
fn rule(g: &Graph, n: NodeId) -> Option<&'static str> {
    let node = g.node(n);
    match &node.op {
        Op::RmsNorm { .. } => Some(RMS_NORM),
        Op::Linear => match &g.node(g.producer(node.inputs[1])).op {
            Op::Input { name } | Op::Param { name } => {
                let module = name.strip_suffix(".weight").and_then(|s| s.rsplit('.').next());
                module.is_some_and(|m| UP_PROJ.contains(&m)).then_some(MLA_UP_PROJ)
            }
            _ => None,
        },
        _ => None,
    }
}

fn fail(e: kiln_ir::GraphError) -> PassError {
    PassError::Precondition { pass: NAME, message: e.to_string() }
}

/// Makes the backward copy of recomputed node `n` (and first those of the recomputed nodes it
/// reads), once; returns nothing, the copies of its results are in `copies`.
fn copy(
    g: &mut Graph,
    n: NodeId,
    rule_of: &HashMap<NodeId, Option<&'static str>>,
    copies: &mut HashMap<ValueId, ValueId>,
    fired: &mut Vec<(NodeId, &'static str)>,
) -> Result<(), PassError> {
    let node = g.node(n).clone();
    if copies.contains_key(&node.results[0]) {
        return Ok(());
    }
    let mut inputs = Vec::with_capacity(node.inputs.len());
    for &i in &node.inputs {
        let p = g.producer(i);
        if rule_of.contains_key(&p) {
            copy(g, p, rule_of, copies, fired)?;
        }
        inputs.push(*copies.get(&i).unwrap_or(&i));
    }
    let types = node.results.iter().map(|&r| g.ty(r).clone()).collect();
    let (c, results) = g.add_node(node.op.clone(), &inputs, types, node.scope.as_deref()).map_err(fail)?;
    copies.extend(node.results.iter().copied().zip(results));
    if let Some(r) = rule_of[&n] {
        fired.push((c, r));
    }
    Ok(())
}

/// Runs the pass and reports which rules fired.
pub fn rewrite(graph: &mut Graph, opts: &Options) -> Result<Trace, PassError> {
    let mut trace = Trace::new(RULES);
    if !matches!(opts.kind, ProgramKind::TrainStep | ProgramKind::Accumulate) {
        return Ok(trace);
    }
    let Some(forward) = forward_pass(graph) else { return Ok(trace) };
    // The recomputed nodes, in forward order: the rules' nodes, and the nodes between an
    // up-projection and attention.
    let order = graph.nodes();
    let mut recomputed: Vec<NodeId> = Vec::new();
    let mut rule_of: HashMap<NodeId, Option<&'static str>> = HashMap::new();
    for &n in &order {
        if !forward.contains(&n) {
            continue;
        }
        let node = graph.node(n);
        let r = rule(graph, n);
        let follows = matches!(
            node.op,
            Op::Reshape { .. } | Op::Split { .. } | Op::Rope(_) | Op::Broadcast { .. } | Op::Concat { .. }
        ) && node.inputs.iter().any(|&i| {
            let p = graph.producer(i);
            rule_of.get(&p).is_some_and(|r| *r != Some(RMS_NORM))
        });
        if r.is_some() || follows {
            recomputed.push(n);
            rule_of.insert(n, r);
        }
    }
    // Copies are made from the last forward node back, each after the copies it reads: the
    // backward pass needs the last layer's first, and among ready nodes the lower id runs first.
    let mut copies: HashMap<ValueId, ValueId> = HashMap::new();
    let mut fired = Vec::new();
    for &n in recomputed.iter().rev() {
        copy(graph, n, &rule_of, &mut copies, &mut fired)?;
    }
    let original = graph.clone();
    let made: HashSet<NodeId> = copies.values().map(|&c| graph.producer(c)).collect();
    for &n in &recomputed {
        for r in graph.node(n).results.clone() {
            // Outputs stay on the forward value: they are the program's interface.
            for u in graph.users(r) {
                if !forward.contains(&u) && !made.contains(&u) {
                    graph.replace_input(u, r, copies[&r]).map_err(fail)?;
                }
            }
        }
    }
    // Copies no backward node reads (those made for a recomputed reader that needed none), gone.
    let mut made = made;
    loop {
        let dead: Vec<NodeId> = (made.iter().copied())
            .filter(|&c| graph.node(c).results.iter().all(|&r| graph.users(r).is_empty()))
            .collect();
        if dead.is_empty() {
            break;
        }
        for c in dead {
            graph.remove_node(c).map_err(fail)?;
            made.remove(&c);
        }
    }
    // A state updated in place (an output of an input's name: a trained weight) must not be read
    // after its new value is computed. A copy reads the old value late; that is safe only when the
    // update waits for the copy, as it does when the update waits for the whole backward pass
    // (the global norm of gradient clipping). Otherwise nothing is recomputed.
    let mut reads_state: Vec<(NodeId, ValueId)> = Vec::new();
    for &c in &made {
        for &i in &graph.node(c).inputs {
            let Op::Input { name } = &graph.node(graph.producer(i)).op else { continue };
            if let Some(new) = graph.output(name) {
                reads_state.push((c, new));
            }
        }
    }
    if !updates_wait_for(graph, &reads_state) {
        *graph = original;
        return Ok(Trace::new(RULES));
    }
    for (c, r) in fired {
        if made.contains(&c) {
            trace.fire(r);
        }
    }
    Ok(trace)
}

/// The loss of a train step's batch: the output `loss`, or in an `accumulate` program, which
/// outputs the loss's accumulator instead, the loss that program adds (`acc * keep + loss`, see
/// `train::accumulate_step`). `None` for any other program.
pub fn micro_batch_loss(graph: &Graph) -> Option<ValueId> {
    let output = |name: &str| graph.output(name);
    if let Some(loss) = output("loss") {
        return Some(loss);
    }
    let add = graph.node(graph.producer(output(crate::train::LOSS_ACC)?));
    match (&add.op, add.inputs.as_slice()) {
        (Op::Binary(kiln_ir::BinaryOp::Add), [_, loss]) => Some(*loss),
        _ => None,
    }
}

/// A train step's forward pass: the nodes its loss ([`micro_batch_loss`]) depends on (`None`
/// without one).
pub(super) fn forward_pass(graph: &Graph) -> Option<HashSet<NodeId>> {
    let loss = micro_batch_loss(graph)?;
    let mut forward: HashSet<NodeId> = HashSet::new();
    let mut stack = vec![graph.producer(loss)];
    while let Some(n) = stack.pop() {
        if forward.insert(n) {
            stack.extend(graph.node(n).inputs.iter().map(|&v| graph.producer(v)));
        }
    }
    Some(forward)
}

/// Whether each `(node, value)` pair's value depends on its node. One sweep per 64 values, from
/// the last node back, marks every node with the values that depend on it: a DeepSeek-V3 train
/// step asks this of hundreds of weights, each update depending on the whole backward pass
/// through the gradient norm, and walking back from each update was quadratic in its depth.
fn updates_wait_for(g: &Graph, pairs: &[(NodeId, ValueId)]) -> bool {
    let order = g.nodes();
    let at: HashMap<NodeId, usize> = order.iter().enumerate().map(|(p, &n)| (n, p)).collect();
    let mut values: Vec<ValueId> = pairs.iter().map(|&(_, v)| v).collect();
    values.sort_unstable();
    values.dedup();
    let bit: HashMap<ValueId, usize> = values.iter().enumerate().map(|(k, &v)| (v, k)).collect();
    for (chunk, batch) in values.chunks(64).enumerate() {
        let mut needed_by = vec![0u64; order.len()];
        for (k, &v) in batch.iter().enumerate() {
            needed_by[at[&g.producer(v)]] |= 1 << k;
        }
        for p in (0..order.len()).rev() {
            let mask = needed_by[p];
            if mask != 0 {
                for &i in &g.node(order[p]).inputs {
                    needed_by[at[&g.producer(i)]] |= mask;
                }
            }
        }
        for &(n, v) in pairs {
            let k = bit[&v];
            if k / 64 == chunk && needed_by[at[&n]] & (1 << (k % 64)) == 0 {
                return false;
            }
        }
    }
    true
}
