//! The dataflow graph: nodes (ops) producing values, with petgraph inside and typed ids outside.
//!
//! A node holds an [`Op`], the values it reads and the values it defines. Every value is defined by
//! exactly one node and has a [`TensorType`]. Edges of the inner petgraph run from a value's producer to
//! each of its users and carry the value; they are maintained by the methods here and never exposed.
//!
//! Nodes are ordered: iteration follows a topological order that keeps insertion order wherever the
//! dependencies allow it, so a graph built front to back prints front to back, and a pass that inserts
//! a node later in the arena still gets it printed before its users.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::sync::OnceLock;

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::{EdgeRef, IntoEdgeReferences, NodeIndexable};
use petgraph::Direction;
use rustc_hash::FxHashMap;

use crate::op::Op;
use crate::types::TensorType;

/// A node of a [`Graph`]. Its `Display` (`node12`) appears only in diagnostics; the text IR names
/// values, not nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(u32);

/// A value (an SSA tensor). Its `Display` is exactly its text-IR name, `%12`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(u32);

impl NodeId {
    fn index(self) -> NodeIndex {
        NodeIndex::new(self.0 as usize)
    }
}

impl ValueId {
    pub fn new(n: u32) -> ValueId {
        ValueId(n)
    }

    pub fn as_u32(self) -> u32 {
        self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node{}", self.0)
    }
}

impl fmt::Display for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

/// An op applied to values, defining new values.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub results: Vec<ValueId>,
    /// Where the node comes from in the model, as a Hugging Face module path
    /// (`model.layers.3.self_attn`); printed as `scope` lines in the text IR.
    pub scope: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
struct ValueData {
    ty: TensorType,
    def: NodeId,
    /// How many of the graph's outputs name this value (a node whose results are outputs stays).
    outputs: u32,
}

/// A graph of ops. See the module documentation.
#[derive(Clone, Debug)]
pub struct Graph {
    name: String,
    dag: StableDiGraph<Node, ValueId>,
    /// Indexed by `ValueId`; `None` once the defining node is removed.
    values: Vec<Option<ValueData>>,
    outputs: Vec<(String, ValueId)>,
    /// The position in `outputs` of each output name: a train step has hundreds of thousands of
    /// outputs on DeepSeek-V3 (an update, a gradient and moments per parameter), and looking each
    /// one up by scanning made building and differentiating it quadratic.
    output_at: FxHashMap<String, usize>,
    /// [`Graph::nodes`], kept until the next change of the nodes or edges: passes, checks and
    /// lowering ask for the order tens of thousands of times on a DeepSeek-V3 compile, mostly of
    /// graphs that have not changed since the last time.
    order: OnceLock<Vec<NodeId>>,
}

/// Misuse of the mutation API: a caller bug, reported rather than panicking so that the parser can
/// turn it into a diagnostic.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("value {0} is not defined")]
    UndefinedValue(ValueId),
    #[error("value {0} is defined twice")]
    Redefined(ValueId),
    #[error("{0} does not exist")]
    NoSuchNode(NodeId),
    #[error("{node} still has users of its results")]
    StillUsed { node: NodeId },
    #[error("output `{0}` is declared twice")]
    DuplicateOutput(String),
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph {
            name: name.into(),
            dag: StableDiGraph::new(),
            values: Vec::new(),
            outputs: Vec::new(),
            output_at: FxHashMap::default(),
            order: OnceLock::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn set_name(&mut self, name: impl Into<String>) {
        self.name = name.into();
    }

    /// Adds a node whose results get fresh value ids; returns the node and its results.
    pub fn add_node(
        &mut self,
        op: Op,
        inputs: &[ValueId],
        result_types: Vec<TensorType>,
        scope: Option<&str>,
    ) -> Result<(NodeId, Vec<ValueId>), GraphError> {
        let first = self.values.len() as u32;
        let results: Vec<ValueId> = (0..result_types.len() as u32).map(|i| ValueId(first + i)).collect();
        let node = self.add_node_with_ids(op, inputs, &results, result_types, scope)?;
        Ok((node, results))
    }

    /// Adds a node whose results take the given ids (the parser keeps the ids of the file).
    pub fn add_node_with_ids(
        &mut self,
        op: Op,
        inputs: &[ValueId],
        results: &[ValueId],
        result_types: Vec<TensorType>,
        scope: Option<&str>,
    ) -> Result<NodeId, GraphError> {
        assert_eq!(results.len(), result_types.len(), "one type per result");
        for &v in inputs {
            self.value(v)?;
        }
        for (i, &r) in results.iter().enumerate() {
            if self.values.get(r.0 as usize).is_some_and(Option::is_some) || results[..i].contains(&r) {
                return Err(GraphError::Redefined(r));
            }
        }
        self.order.take();
        let idx = self.dag.add_node(Node {
            op,
            inputs: inputs.to_vec(),
            results: results.to_vec(),
            scope: scope.map(str::to_string),
        });
        let node = NodeId(idx.index() as u32);
        for (&r, ty) in results.iter().zip(result_types) {
            let slot = r.0 as usize;
            if self.values.len() <= slot {
                self.values.resize(slot + 1, None);
            }
            self.values[slot] = Some(ValueData { ty, def: node, outputs: 0 });
        }
        for &v in inputs {
            let def = self.values[v.0 as usize].as_ref().expect("checked above").def;
            self.dag.add_edge(def.index(), idx, v);
        }
        Ok(node)
    }

    /// A value known to exist (checked by the caller).
    fn value_mut(&mut self, v: ValueId) -> &mut ValueData {
        self.values[v.0 as usize].as_mut().expect("the caller checked the value")
    }

    fn value(&self, v: ValueId) -> Result<&ValueData, GraphError> {
        self.values.get(v.0 as usize).and_then(Option::as_ref).ok_or(GraphError::UndefinedValue(v))
    }

    /// Whether `v` is defined in this graph.
    pub fn contains_value(&self, v: ValueId) -> bool {
        self.value(v).is_ok()
    }

    /// The type of a value. Panics on an id that is not in this graph (ids come from the graph).
    pub fn ty(&self, v: ValueId) -> &TensorType {
        &self.value(v).unwrap_or_else(|e| panic!("{e}")).ty
    }

    /// Replaces the recorded type of a value (used by passes that change a value's dtype).
    pub fn set_ty(&mut self, v: ValueId, ty: TensorType) -> Result<(), GraphError> {
        match self.values.get_mut(v.0 as usize).and_then(Option::as_mut) {
            Some(d) => {
                d.ty = ty;
                Ok(())
            }
            None => Err(GraphError::UndefinedValue(v)),
        }
    }

    /// The node that defines `v`.
    pub fn producer(&self, v: ValueId) -> NodeId {
        self.value(v).unwrap_or_else(|e| panic!("{e}")).def
    }

    pub fn node(&self, n: NodeId) -> &Node {
        &self.dag[n.index()]
    }

    pub fn node_mut_op(&mut self, n: NodeId) -> &mut Op {
        // The order depends on some ops (collectives, reductions, cache updates).
        self.order.take();
        &mut self.dag[n.index()].op
    }

    pub fn contains_node(&self, n: NodeId) -> bool {
        self.dag.contains_node(n.index())
    }

    pub fn node_count(&self) -> usize {
        self.dag.node_count()
    }

    /// One past the largest value id in use: the next id `add_node` hands out.
    pub fn value_bound(&self) -> u32 {
        self.values.len() as u32
    }

    /// The nodes that read `v`, each once, in id order.
    pub fn users(&self, v: ValueId) -> Vec<NodeId> {
        let Ok(d) = self.value(v) else {
            return Vec::new();
        };
        let mut users: Vec<NodeId> = self
            .dag
            .edges_directed(d.def.index(), Direction::Outgoing)
            .filter(|e| *e.weight() == v)
            .map(|e| NodeId(e.target().index() as u32))
            .collect();
        users.sort();
        users.dedup();
        users
    }

    /// Nodes in topological order, preferring lower ids (insertion order) among the ready ones
    /// (see [`Graph::ordered`] for nodes added after their users); except that some nodes go as
    /// soon as they are ready:
    ///
    /// - a sum over peers (`all_reduce`), and a node whose only users are collectives (the add or
    ///   cast that makes a collective's operand, with the leaves declared after what it computes
    ///   from: an accumulator's input), so that a program starts each sum over its peers
    ///   as early as it can and the communication overlaps the computation after it (a
    ///   data-parallel step's gradient sums start during the backward pass, as DDP's buckets do);
    ///   and a gather (`all_gather`), so that ZeRO-1's updated shards each travel as soon as they
    ///   are made, rather than all waiting in the arena for one message at the end. Only one level: everything upstream of a gradient ends in a collective, and hurrying all
    ///   of it would hurry nothing;
    /// - a reduction that is the only reader of its operand, so that the operand dies at once
    ///   rather than when the reduction's turn comes (a train step's squared gradients, summed
    ///   for the global norm, would otherwise all be alive at the end of the backward pass);
    /// - a KV cache's update, and the nodes only it reads (the latent's concat), whose operands
    ///   then die at once (the update writes the cache's own storage);
    /// - a state's update (its result the output named as an input it reads) from values only it
    ///   reads, scalars, and the program's inputs, parameters and constants, and those of them
    ///   declared after the values: a gradient accumulator's update (`acc * keep + dW`, or a last
    ///   micro-batch's `acc + dW` fused with its square times `1 / M`), so that each
    ///   micro-batch's weight gradient dies as soon as it is made, rather than every one of them
    ///   living until the accumulators' turn comes at the end (the stage's gradients over again
    ///   in the arena).
    pub fn nodes(&self) -> Vec<NodeId> {
        self.order.get_or_init(|| self.order_now()).clone()
    }

    /// [`Graph::nodes`], computed.
    fn order_now(&self) -> Vec<NodeId> {
        let (order, due) = self.ordered();
        let collective =
            |i: usize| matches!(self.dag[NodeIndex::new(i)].op, Op::AllReduce { .. } | Op::AllGather { .. });
        let shrinks = |i: usize| {
            let node = &self.dag[NodeIndex::new(i)];
            matches!(node.op, Op::Reduce { .. })
                && node.inputs.iter().all(|&v| self.read_only_by(v, NodeId(i as u32)))
        };
        let leaf = |v: ValueId| {
            matches!(
                self.node(self.producer(v)).op,
                Op::Input { .. } | Op::Param { .. } | Op::Constant { .. }
            )
        };
        // A state's update (the output named as the input it reads), but a KV cache's (above).
        let accumulates = |i: usize| {
            let node = &self.dag[NodeIndex::new(i)];
            let alone = |v: ValueId| self.read_only_by(v, NodeId(i as u32));
            !matches!(node.op, Op::CacheUpdate)
                && node.inputs.iter().any(|&v| !leaf(v) && alone(v))
                && node.inputs.iter().all(|&v| leaf(v) || alone(v) || self.ty(v).rank() == 0)
                && node.results.iter().any(|&r| self.updates_state(NodeId(i as u32), r))
        };
        let mut urgent = vec![false; self.dag.node_bound()];
        // A KV cache's update, and what only it reads (the latent's concat), as soon as ready: its
        // operands die at once and its result is the cache's own storage.
        for &n in order.iter().rev() {
            let i = NodeIndex::new(n.0 as usize);
            let mut users =
                self.dag.edges_directed(i, Direction::Outgoing).map(|e| e.target().index()).peekable();
            urgent[i.index()] = matches!(self.dag[i].op, Op::CacheUpdate)
                || (users.peek().is_some() && users.all(|u| urgent[u]));
        }
        let mut any = urgent.iter().any(|&u| u);
        for &n in &order {
            let i = NodeIndex::new(n.0 as usize);
            let mut users =
                self.dag.edges_directed(i, Direction::Outgoing).map(|e| e.target().index()).peekable();
            let feeds_collective = users.peek().is_some() && users.all(collective);
            urgent[i.index()] |= collective(i.index()) || feeds_collective || shrinks(i.index());
            if accumulates(i.index()) || feeds_collective {
                // Its inputs, parameters and constants declared after what it computes from (the
                // accumulator's input, declared just before its update or its sum over peers)
                // too: they would otherwise wait their turn by id, and the node with them.
                urgent[i.index()] = true;
                let inputs = &self.dag[i].inputs;
                let made = inputs.iter().filter(|&&v| !leaf(v)).map(|&v| self.producer(v).0).min();
                for &v in inputs {
                    let n = self.producer(v).0;
                    if leaf(v) && made.is_some_and(|m| n > m) {
                        urgent[n as usize] = true;
                    }
                }
                // And the scalars a tensor's update reads, with everything scalar they are computed
                // from (a last micro-batch's `1 / M`, made from an input declared after the
                // backward pass).
                let tensor = self.dag[i].results.iter().any(|&r| self.ty(r).rank() > 0);
                let mut stack: Vec<ValueId> = (inputs.iter().copied())
                    .filter(|&v| tensor && !leaf(v) && self.ty(v).rank() == 0)
                    .collect();
                while let Some(v) = stack.pop() {
                    let n = self.producer(v);
                    if !std::mem::replace(&mut urgent[n.0 as usize], true) {
                        stack.extend(self.node(n).inputs.iter().copied().filter(|&x| self.ty(x).rank() == 0));
                    }
                }
            }
            any |= urgent[i.index()];
        }
        if !any {
            return order;
        }
        self.kahn(&urgent, due.as_deref().unwrap_or(&[]))
    }

    /// Kahn's topological order: among the ready nodes, an `urgent` one first, then the one due
    /// first, then the lowest id. A node is due at the lowest id of itself and everything computed
    /// from it: a node added after its users (a pass's recomputed copy, a cast inserted before a
    /// GEMM) runs just before the first of them, rather than after every older node that is ready,
    /// which would also pull those forward and keep their results alive. Where every node is
    /// older than its users, as a builder makes them, this is plain id order.
    ///
    /// Returns the order and the due ids, `None` when every node is due at its own id (the order
    /// is then plain Kahn by id, and a second pass would give it again).
    fn ordered(&self) -> (Vec<NodeId>, Option<Vec<usize>>) {
        // Every edge from an older node to a newer one (as a builder makes them): the order is
        // the ids', and each node is due at its own id (everything computed from it is newer).
        if self.dag.edge_references().all(|e| e.source().index() < e.target().index()) {
            return (self.dag.node_indices().map(|n| NodeId(n.index() as u32)).collect(), None);
        }
        let plain = self.kahn(&[], &[]);
        let mut due: Vec<usize> = (0..self.dag.node_bound()).collect();
        let mut moved = false;
        for &n in plain.iter().rev() {
            let i = NodeIndex::new(n.0 as usize);
            let first_user =
                self.dag.edges_directed(i, Direction::Outgoing).map(|e| due[e.target().index()]).min();
            if let Some(u) = first_user {
                if u < due[i.index()] {
                    due[i.index()] = u;
                    moved = true;
                }
            }
        }
        if !moved {
            return (plain, None);
        }
        (self.kahn(&[], &due), Some(due))
    }

    /// Kahn's topological order: among the ready nodes, an `urgent` one first, then the lowest
    /// `due` (where given), then the lowest id.
    fn kahn(&self, urgent: &[bool], due: &[usize]) -> Vec<NodeId> {
        let first = |n: usize| urgent.get(n).copied().unwrap_or(false);
        let key = |n: usize| Reverse((!first(n), due.get(n).copied().unwrap_or(n), n));
        let mut indegree = vec![0usize; self.dag.node_bound()];
        for e in self.dag.edge_references() {
            indegree[e.target().index()] += 1;
        }
        // Urgent nodes sort first (`false < true`, reversed), then by due and id.
        let mut ready: BinaryHeap<Reverse<(bool, usize, usize)>> =
            self.dag.node_indices().filter(|n| indegree[n.index()] == 0).map(|n| key(n.index())).collect();
        let mut order = Vec::with_capacity(self.dag.node_count());
        while let Some(Reverse((_, _, n))) = ready.pop() {
            order.push(NodeId(n as u32));
            for e in self.dag.edges_directed(NodeIndex::new(n), Direction::Outgoing) {
                let t = e.target().index();
                indegree[t] -= 1;
                if indegree[t] == 0 {
                    ready.push(key(t));
                }
            }
        }
        // The mutation API cannot create a cycle (operands must exist before their users), so every
        // node is reached.
        debug_assert_eq!(order.len(), self.dag.node_count());
        order
    }

    /// The graph's named outputs, in declaration order.
    pub fn outputs(&self) -> &[(String, ValueId)] {
        &self.outputs
    }

    pub fn add_output(&mut self, name: impl Into<String>, v: ValueId) -> Result<(), GraphError> {
        let name = name.into();
        self.value(v)?;
        if self.output_at.contains_key(&name) {
            return Err(GraphError::DuplicateOutput(name));
        }
        self.value_mut(v).outputs += 1;
        self.output_at.insert(name.clone(), self.outputs.len());
        self.outputs.push((name, v));
        Ok(())
    }

    /// The value of the output called `name`.
    pub fn output(&self, name: &str) -> Option<ValueId> {
        self.output_at.get(name).map(|&i| self.outputs[i].1)
    }

    /// Whether any output names value `v`.
    pub fn is_output(&self, v: ValueId) -> bool {
        self.values.get(v.0 as usize).and_then(Option::as_ref).is_some_and(|d| d.outputs > 0)
    }

    /// Whether value `v` is an output under the name of an input that node `n` reads: the new
    /// value of a state `n` updates (an accumulator, a weight, a KV cache).
    pub fn updates_state(&self, n: NodeId, v: ValueId) -> bool {
        // Output names are unique, so the output of an input's name is looked up rather than
        // every output scanned for `v` (a DeepSeek-V3 train step has hundreds of thousands).
        self.is_output(v)
            && (self.node(n).inputs.iter()).any(
                |&x| matches!(&self.node(self.producer(x)).op, Op::Input { name } if self.output(name) == Some(v)),
            )
    }

    /// Whether node `n` is the only node that reads `v` (`users(v) == [n]`), without listing the
    /// users: a value that thousands of nodes read (a train step's learning rate, the clipping
    /// coefficient every update reads) is answered at its second reader, not by a list of them
    /// all for each of them.
    pub fn read_only_by(&self, v: ValueId, n: NodeId) -> bool {
        let Ok(d) = self.value(v) else {
            return false;
        };
        let mut read = false;
        for e in self.dag.edges_directed(d.def.index(), Direction::Outgoing).filter(|e| *e.weight() == v) {
            if e.target().index() != n.0 as usize {
                return false;
            }
            read = true;
        }
        read
    }

    /// Removes the output called `name`, returning its value (the value itself stays).
    pub fn remove_output(&mut self, name: &str) -> Option<ValueId> {
        let i = self.output_at.remove(name)?;
        let (_, v) = self.outputs.remove(i);
        for (j, (n, _)) in self.outputs.iter().enumerate().skip(i) {
            *self.output_at.get_mut(n).expect("every output is indexed") = j;
        }
        self.value_mut(v).outputs -= 1;
        Some(v)
    }

    /// Keeps the outputs for which `keep(name, value)` holds, in their order: one pass, where
    /// removing them one by one would shift the rest each time.
    pub fn retain_outputs(&mut self, mut keep: impl FnMut(&str, ValueId) -> bool) {
        let mut dropped = Vec::new();
        self.outputs.retain(|(n, v)| {
            let k = keep(n, *v);
            if !k {
                dropped.push(*v);
            }
            k
        });
        for v in dropped {
            self.value_mut(v).outputs -= 1;
        }
        self.output_at = self.outputs.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)).collect();
    }

    /// Makes every user of `old` (and any output naming it) read `new` instead.
    pub fn replace_all_uses(&mut self, old: ValueId, new: ValueId) -> Result<(), GraphError> {
        let old_def = self.value(old)?.def;
        let new_def = self.value(new)?.def;
        self.order.take();
        let edges: Vec<_> = self
            .dag
            .edges_directed(old_def.index(), Direction::Outgoing)
            .filter(|e| *e.weight() == old)
            .map(|e| (e.id(), e.target()))
            .collect();
        for (id, user) in edges {
            self.dag.remove_edge(id);
            for input in &mut self.dag[user].inputs {
                if *input == old {
                    *input = new;
                }
            }
            self.dag.add_edge(new_def.index(), user, new);
        }
        let moved = std::mem::take(&mut self.value_mut(old).outputs);
        if moved > 0 {
            for (_, v) in &mut self.outputs {
                if *v == old {
                    *v = new;
                }
            }
            self.value_mut(new).outputs += moved;
        }
        Ok(())
    }

    /// Makes node `user` read `new` wherever it reads `old` (its other readers keep `old`).
    pub fn replace_input(&mut self, user: NodeId, old: ValueId, new: ValueId) -> Result<(), GraphError> {
        let old_def = self.value(old)?.def;
        let new_def = self.value(new)?.def;
        if !self.contains_node(user) {
            return Err(GraphError::NoSuchNode(user));
        }
        self.order.take();
        let edges: Vec<_> = self
            .dag
            .edges_directed(old_def.index(), Direction::Outgoing)
            .filter(|e| *e.weight() == old && e.target() == user.index())
            .map(|e| e.id())
            .collect();
        for id in edges {
            self.dag.remove_edge(id);
            self.dag.add_edge(new_def.index(), user.index(), new);
        }
        for input in &mut self.dag[user.index()].inputs {
            if *input == old {
                *input = new;
            }
        }
        Ok(())
    }

    /// Removes a node whose results are no longer read.
    pub fn remove_node(&mut self, n: NodeId) -> Result<Node, GraphError> {
        if !self.contains_node(n) {
            return Err(GraphError::NoSuchNode(n));
        }
        let node = &self.dag[n.index()];
        if self.dag.edges_directed(n.index(), Direction::Outgoing).next().is_some()
            || node.results.iter().any(|&v| self.is_output(v))
        {
            return Err(GraphError::StillUsed { node: n });
        }
        self.order.take();
        let node = self.dag.remove_node(n.index()).expect("checked above");
        for r in &node.results {
            self.values[r.0 as usize] = None;
        }
        Ok(node)
    }

    /// `(name, type)` of every parameter, in node order.
    pub fn params(&self) -> Vec<(&str, &TensorType)> {
        self.nodes()
            .into_iter()
            .filter_map(|n| match &self.node(n).op {
                Op::Param { name } => Some((name.as_str(), self.ty(self.node(n).results[0]))),
                _ => None,
            })
            .collect()
    }

    /// `(name, value)` of every graph input, in node order.
    pub fn inputs(&self) -> Vec<(&str, ValueId)> {
        self.nodes()
            .into_iter()
            .filter_map(|n| match &self.node(n).op {
                Op::Input { name } => Some((name.as_str(), self.node(n).results[0])),
                _ => None,
            })
            .collect()
    }
}

/// Structural equality: same name, same outputs, and the same nodes (op, operands, results, result
/// types, scope) in topological order. Node ids, which are internal, do not take part.
impl PartialEq for Graph {
    fn eq(&self, other: &Graph) -> bool {
        if self.name != other.name || self.outputs != other.outputs {
            return false;
        }
        let (a, b) = (self.nodes(), other.nodes());
        a.len() == b.len()
            && a.iter().zip(&b).all(|(&x, &y)| {
                let (nx, ny) = (self.node(x), other.node(y));
                nx == ny && nx.results.iter().all(|&r| self.ty(r) == other.ty(r))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{BinaryOp, UnaryOp};
    use crate::types::{DType, Dim};

    fn f32_bt() -> TensorType {
        TensorType::new(DType::F32, [Dim::B, Dim::T])
    }

    #[test]
    fn build_query_and_rewrite() {
        let mut g = Graph::new("g");
        let (_, x) = g.add_node(Op::Input { name: "x".into() }, &[], vec![f32_bt()], None).unwrap();
        let x = x[0];
        let (_, e) = g.add_node(Op::Unary(UnaryOp::Exp), &[x], vec![f32_bt()], None).unwrap();
        let (add, s) =
            g.add_node(Op::Binary(BinaryOp::Add), &[e[0], e[0]], vec![f32_bt()], Some("blk")).unwrap();
        g.add_output("y", s[0]).unwrap();
        assert_eq!(g.users(e[0]), vec![add]);
        assert_eq!(g.nodes().len(), 3);
        assert_eq!(s[0].to_string(), "%2");

        // Replace exp by neg: the add now reads the neg, and the exp can go.
        let (neg, n) = g.add_node(Op::Unary(UnaryOp::Neg), &[x], vec![f32_bt()], None).unwrap();
        g.replace_all_uses(e[0], n[0]).unwrap();
        assert_eq!(g.node(add).inputs, vec![n[0], n[0]]);
        assert_eq!(g.remove_node(g.producer(s[0])), Err(GraphError::StillUsed { node: add }));
        g.remove_node(g.producer(e[0])).unwrap();
        // The neg was added after the add but must come first.
        let order = g.nodes();
        let pos = |n| order.iter().position(|&m| m == n).unwrap();
        assert!(pos(neg) < pos(add));
        assert!(!g.contains_value(e[0]));
    }

    /// `read_only_by` answers `users(v) == [n]` and `updates_state` finds the output of an input's
    /// name, without scanning: an accumulator `acc + lr * w` whose `lr` two nodes read.
    #[test]
    fn sole_readers_and_state_updates() {
        let mut g = Graph::new("g");
        let scalar = TensorType::new(DType::F32, [] as [Dim; 0]);
        let add = |g: &mut Graph, op: Op, ins: &[ValueId], ty: TensorType| {
            g.add_node(op, ins, vec![ty], None).unwrap()
        };
        let (_, acc) = add(&mut g, Op::Input { name: "acc".into() }, &[], f32_bt());
        let (_, lr) = add(&mut g, Op::Input { name: "lr".into() }, &[], scalar.clone());
        let (_, w) = add(&mut g, Op::Input { name: "w".into() }, &[], f32_bt());
        let (scale, step) = add(&mut g, Op::Binary(BinaryOp::Mul), &[lr[0], w[0]], f32_bt());
        let (update, new) = add(&mut g, Op::Binary(BinaryOp::Add), &[acc[0], step[0]], f32_bt());
        let (twice, lr2) = add(&mut g, Op::Binary(BinaryOp::Add), &[lr[0], lr[0]], scalar);
        g.add_output("acc", new[0]).unwrap();
        g.add_output("lr2", lr2[0]).unwrap();
        for (v, n) in [(lr[0], scale), (lr[0], twice), (step[0], update), (acc[0], update), (w[0], update)] {
            assert_eq!(g.read_only_by(v, n), g.users(v) == [n], "{v} read only by {n:?}");
        }
        assert!(g.read_only_by(step[0], update) && !g.read_only_by(lr[0], twice));
        assert!(g.read_only_by(lr2[0], twice) == (g.users(lr2[0]) == [twice]));
        assert!(g.updates_state(update, new[0]));
        // An output, but under no name of what `twice` reads.
        assert!(!g.updates_state(twice, lr2[0]));
        assert!(!g.updates_state(scale, step[0]));
    }

    /// The order [`Graph::nodes`] keeps is dropped by every change that can move it: each answer
    /// below differs from the one before, so a kept order that outlived its graph would fail.
    #[test]
    fn the_kept_order_follows_every_change() {
        let mut g = Graph::new("g");
        let x = g.add_node(Op::Input { name: "x".into() }, &[], vec![f32_bt()], None).unwrap().1[0];
        let (neg, n) = g.add_node(Op::Unary(UnaryOp::Neg), &[x], vec![f32_bt()], None).unwrap();
        let (exp, e) = g.add_node(Op::Unary(UnaryOp::Exp), &[x], vec![f32_bt()], None).unwrap();
        g.add_output("n", n[0]).unwrap();
        g.add_output("e", e[0]).unwrap();
        let input = g.producer(x);
        assert_eq!(g.nodes(), [input, neg, exp]);
        // A sum over peers goes as soon as it is ready.
        *g.node_mut_op(exp) = Op::AllReduce { group: "dp".into() };
        assert_eq!(g.nodes(), [input, exp, neg]);
        // A node added after its users runs just before the first of them.
        let (abs, a) = g.add_node(Op::Unary(UnaryOp::Abs), &[x], vec![f32_bt()], None).unwrap();
        assert_eq!(g.nodes(), [input, exp, neg, abs]);
        g.replace_input(neg, x, a[0]).unwrap();
        assert_eq!(g.nodes(), [input, exp, abs, neg]);
        g.replace_all_uses(a[0], x).unwrap();
        assert_eq!(g.nodes(), [input, exp, neg, abs]);
        g.remove_node(abs).unwrap();
        assert_eq!(g.nodes(), [input, exp, neg]);
        assert_eq!(g.nodes(), g.order_now());
    }

    /// The index of the outputs (by name, and how many name each value) follows every change.
    #[test]
    fn outputs_are_found_by_name_through_every_change() {
        let mut g = Graph::new("g");
        let x = g.add_node(Op::Input { name: "x".into() }, &[], vec![f32_bt()], None).unwrap().1[0];
        let (neg, n) = g.add_node(Op::Unary(UnaryOp::Neg), &[x], vec![f32_bt()], None).unwrap();
        let (_, e) = g.add_node(Op::Unary(UnaryOp::Exp), &[x], vec![f32_bt()], None).unwrap();
        for (name, v) in [("a", n[0]), ("b", e[0]), ("c", n[0]), ("d", e[0])] {
            g.add_output(name, v).unwrap();
        }
        assert_eq!(g.remove_output("a"), Some(n[0]));
        assert_eq!(g.remove_output("a"), None);
        assert_eq!((g.output("c"), g.output("d")), (Some(n[0]), Some(e[0])));
        // `neg` is still named by `c`, so it stays.
        assert_eq!(g.remove_node(neg).unwrap_err(), GraphError::StillUsed { node: neg });
        g.retain_outputs(|name, _| name != "c");
        let names: Vec<&str> = g.outputs().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["b", "d"]);
        assert_eq!((g.output("b"), g.output("c")), (Some(e[0]), None));
        assert!(!g.is_output(n[0]) && g.is_output(e[0]));
        // Outputs move with the uses of their value.
        g.replace_all_uses(e[0], n[0]).unwrap();
        assert!(g.is_output(n[0]) && !g.is_output(e[0]));
        assert_eq!(g.output("d"), Some(n[0]));
        g.add_output("a", x).unwrap();
        assert_eq!(g.add_output("b", x).unwrap_err(), GraphError::DuplicateOutput("b".into()));
        assert_eq!(g.remove_output("b"), Some(n[0]));
        assert_eq!((g.output("d"), g.output("a")), (Some(n[0]), Some(x)));
        assert!(g.remove_node(neg).is_err(), "`d` still names it");
    }

    #[test]
    fn misuse_is_an_error() {
        let mut g = Graph::new("g");
        let err = g.add_node(Op::Unary(UnaryOp::Exp), &[ValueId(7)], vec![f32_bt()], None);
        assert_eq!(err.unwrap_err(), GraphError::UndefinedValue(ValueId(7)));
        g.add_node_with_ids(Op::Input { name: "x".into() }, &[], &[ValueId(3)], vec![f32_bt()], None)
            .unwrap();
        let again =
            g.add_node_with_ids(Op::Input { name: "y".into() }, &[], &[ValueId(3)], vec![f32_bt()], None);
        assert_eq!(again.unwrap_err(), GraphError::Redefined(ValueId(3)));
        g.add_output("o", ValueId(3)).unwrap();
        assert_eq!(g.add_output("o", ValueId(3)).unwrap_err(), GraphError::DuplicateOutput("o".into()));
    }
}
