//! The view of a graph that `fuse-kernels` grows its groups in, and the two questions a rule asks of
//! a candidate group: is it convex (can it become one node), and how would codegen compute its body.
//!
//! Nodes are numbered by their position in one topological order; each value's producer and readers
//! are looked up by position in tables built once, so no question walks the whole graph:
//!
//! - Convexity walks only the part of the graph between a group's members (see [`Ctx::convex`]).
//! - A candidate's body is built in time linear in the group, and its analysis (the one-pass
//!   pattern [`classify`] finds, or whether [`fusion::plan`] lowers it) is looked up by the body's
//!   structure first. Bodies carry no scopes or model names, so the identical layers of a model
//!   (DeepSeek-V3's 58 MoE layers) ask the same questions about the same bodies, and each distinct
//!   body is analysed once per run of the pass. Equal hashes are confirmed by comparing the bodies,
//!   so a collision costs time, never a wrong answer.
//!
//! [`Work`] counts what the pass did (nodes visited, bodies built, analyses made and reused), so a
//! test can check that the pass's work grows linearly with the graph, without timing it.
//!
//! What this does not do: decide anything. The rules (`fuse_kernels.rs`) choose the groups.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet, FxHasher};

use kiln_ir::{Graph, NodeId, Op, TensorType, ValueId};

use super::{fail, PassError};
use crate::codegen::fusion::{self, classify, Pattern};

/// A group of nodes to fuse: `nodes` are moved into the body, `cloned` copied in (GEMM operands'
/// `dequantize`s, which other nodes may read too).
#[derive(Clone, Debug, Default)]
pub(super) struct Group {
    pub nodes: BTreeSet<usize>,
    pub cloned: BTreeSet<usize>,
    pub anchor: usize,
}

impl Group {
    pub fn of(nodes: impl IntoIterator<Item = usize>, anchor: usize) -> Group {
        Group { nodes: nodes.into_iter().collect(), cloned: BTreeSet::new(), anchor }
    }

    /// The moved and the copied-in nodes, in position order (the body lists them in
    /// [`Ctx::ordered`]'s).
    fn members(&self) -> Vec<usize> {
        let mut all: Vec<usize> = self.nodes.iter().chain(&self.cloned).copied().collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

/// What one run of `fuse-kernels` did, for tests that check how its work grows with the graph.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Work {
    /// Nodes the pass visited: positions it numbered, nodes its convexity walks passed through, and
    /// nodes copied into candidate bodies.
    pub visited: u64,
    /// Candidate bodies whose analysis was computed (distinct bodies).
    pub analyses: usize,
    /// Candidate bodies whose analysis was found already made for an identical body.
    pub reused: usize,
}

impl Work {
    fn add(self, other: Work) -> Work {
        Work {
            visited: self.visited + other.visited,
            analyses: self.analyses + other.analyses,
            reused: self.reused + other.reused,
        }
    }
}

impl std::ops::AddAssign for Work {
    fn add_assign(&mut self, other: Work) {
        *self = self.add(other);
    }
}

/// What codegen says of one body, each part computed when first asked.
struct Analysis {
    body: Graph,
    /// The body as the fused nodes of this key hold it, by their rule's name: one graph that every
    /// such node shares (DeepSeek-V3's 58 MoE layers hold one routed-expert body, of some 2300
    /// nodes, instead of a copy each).
    named: Vec<(String, Arc<Graph>)>,
    one_pass: Option<Option<Pattern>>,
    lowers: Option<bool>,
}

/// One item of a group's [`Key`].
#[derive(Clone, Copy, Debug, PartialEq)]
enum Token<'g> {
    /// The next member: its op, then its operands, then its result types.
    Op(&'g Op),
    /// The same for a `fused` member, its op by class (equal ops, equal classes): comparing two
    /// fused bodies of a few thousand nodes at every lookup would cost more than the analysis.
    Fused(u32),
    /// Operand: a value from outside read for the first time, the body's next input (`a0`,
    /// `a1`, ...), of this type.
    NewArg(&'g TensorType),
    /// Operand: the body's input `a{i}`, again.
    Arg(u32),
    /// Operand: a constant seen for the first time in this group, copied in.
    Constant(&'g Op, &'g TensorType),
    /// Operand: the `i`th constant copied in, again.
    Again(u32),
    /// Operand: result `r` of member `m` (by order in the group).
    Member(u32, u32),
    Result(&'g TensorType),
    /// The body's next output (`r0`, `r1`, ...): result `r` of member `m`.
    Output(u32, u32),
}

impl Hash for Token<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        std::mem::discriminant(self).hash(h);
        match *self {
            Token::NewArg(t) | Token::Result(t) => t.hash(h),
            // An op by its name only: equal keys are compared in full anyway.
            Token::Op(op) => op.name().hash(h),
            Token::Fused(class) => class.hash(h),
            Token::Constant(op, t) => {
                op.name().hash(h);
                t.hash(h);
            }
            Token::Arg(i) | Token::Again(i) => i.hash(h),
            Token::Member(m, r) | Token::Output(m, r) => (m, r).hash(h),
        }
    }
}

/// A group's body described by reference into the graph, without building it: [`Ctx::body`] is a
/// function of exactly this (each member's op, operands and result types in order, the body's
/// inputs numbered as first read, then the outputs), so groups with equal keys have equal bodies.
type Key<'g> = Vec<Token<'g>>;

/// Analyses by body: the key's hash, then the keys with that hash.
#[derive(Default)]
struct Analyses<'g> {
    by_hash: HashMap<u64, Vec<(Key<'g>, Analysis)>>,
}

/// A set of positions emptied in constant time: a position is in it when marked with the current
/// epoch.
struct Marks {
    epoch: u32,
    marks: Vec<u32>,
}

impl Marks {
    fn new(len: usize) -> Marks {
        Marks { epoch: 0, marks: vec![0; len] }
    }

    /// Empties the set; call before each use.
    fn clear(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.marks.fill(0);
            self.epoch = 1;
        }
    }

    /// Adds `i`; whether it was not in the set.
    fn insert(&mut self, i: usize) -> bool {
        std::mem::replace(&mut self.marks[i], self.epoch) != self.epoch
    }

    fn contains(&self, i: usize) -> bool {
        self.marks[i] == self.epoch
    }
}

/// What [`Ctx::key`] knows of a value a group's members read or make: the [`Token`] its next
/// reads get.
#[derive(Clone, Copy, Debug)]
enum Local {
    Arg(u32),
    Again(u32),
    Member(u32, u32),
}

impl Local {
    fn token<'g>(self) -> Token<'g> {
        match self {
            Local::Arg(i) => Token::Arg(i),
            Local::Again(i) => Token::Again(i),
            Local::Member(m, r) => Token::Member(m, r),
        }
    }
}

/// A map from value ids to [`Local`]s, emptied in O(1) like [`Marks`]: [`Ctx::key`]'s. A hash map
/// there cost more than the rest of the key on a train step, whose rules ask for the key of every
/// candidate they try.
struct Locals {
    epoch: u32,
    slots: Vec<(u32, Local)>,
}

impl Locals {
    fn new(len: usize) -> Locals {
        Locals { epoch: 0, slots: vec![(0, Local::Arg(0)); len] }
    }

    /// Empties the map; call before each use.
    fn clear(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.slots.iter_mut().for_each(|s| s.0 = 0);
            self.epoch = 1;
        }
    }

    fn get(&self, v: ValueId) -> Option<Local> {
        let (epoch, l) = self.slots[v.as_u32() as usize];
        (epoch == self.epoch).then_some(l)
    }

    fn insert(&mut self, v: ValueId, l: Local) {
        self.slots[v.as_u32() as usize] = (self.epoch, l);
    }
}

/// The graph in order, with node positions: groups are sets of positions.
pub(super) struct Ctx<'g> {
    pub g: &'g Graph,
    pub order: Vec<NodeId>,
    /// By value id: the position of the value's producer.
    producer: Vec<u32>,
    /// By value id, compressed: `readers[first_reader[v]..first_reader[v + 1]]` are the positions of
    /// the nodes reading `v`, each once, in order.
    first_reader: Vec<u32>,
    readers: Vec<u32>,
    /// By value id: whether the value is a graph output.
    is_output: Vec<bool>,
    /// By value id: whether the value is a state input that an output of the same name updates
    /// in place (a train step's weights and moments).
    updated: Vec<bool>,
    /// By position: the class of a `fused` node's op (nodes with equal ops have equal classes;
    /// `u32::MAX` for other nodes).
    fused_class: Vec<u32>,
    /// By position: bit `2k` set for the ancestors of pivot `k`, bit `2k + 1` for its descendants
    /// (see [`pivots`]).
    around_pivot: Vec<u32>,
    pivots: Vec<usize>,
    taken: Vec<bool>,
    /// Scratch sets of positions: the members of the group being looked at, and the nodes a walk
    /// has seen.
    in_group: RefCell<Marks>,
    seen: RefCell<Marks>,
    /// Scratch for [`Ctx::key`].
    locals: RefCell<Locals>,
    analyses: RefCell<Analyses<'g>>,
    work: Cell<Work>,
}

impl<'g> Ctx<'g> {
    pub fn new(g: &'g Graph) -> Ctx<'g> {
        let order = g.nodes();
        let values = g.value_bound() as usize;
        let mut producer = vec![u32::MAX; values];
        let mut count = vec![0u32; values + 1];
        // Each reader once, however many times it reads the value (a fused MoE node reads
        // hundreds of operands): the last position counted for each value.
        let mut last = vec![u32::MAX; values];
        for (p, &n) in order.iter().enumerate() {
            let node = g.node(n);
            for &r in &node.results {
                producer[r.as_u32() as usize] = p as u32;
            }
            for &v in &node.inputs {
                let v = v.as_u32() as usize;
                if std::mem::replace(&mut last[v], p as u32) != p as u32 {
                    count[v + 1] += 1;
                }
            }
        }
        for v in 0..values {
            count[v + 1] += count[v];
        }
        let first_reader = count.clone();
        let mut next = count;
        let mut readers = vec![0u32; first_reader[values] as usize];
        last.fill(u32::MAX);
        for (p, &n) in order.iter().enumerate() {
            for &v in &g.node(n).inputs {
                let v = v.as_u32() as usize;
                if std::mem::replace(&mut last[v], p as u32) != p as u32 {
                    readers[next[v] as usize] = p as u32;
                    next[v] += 1;
                }
            }
        }
        let mut is_output = vec![false; values];
        for &(_, v) in g.outputs() {
            is_output[v.as_u32() as usize] = true;
        }
        let mut updated = vec![false; values];
        let output_names: HashSet<&str> = g.outputs().iter().map(|(n, _)| n.as_str()).collect();
        for (name, v) in g.inputs() {
            if output_names.contains(name) {
                updated[v.as_u32() as usize] = true;
            }
        }
        let fused_class = fused_classes(g, &order);
        let reader_count = |r: ValueId| {
            let r = r.as_u32() as usize;
            (first_reader[r + 1] - first_reader[r]) as usize
        };
        let pivots = pivots(g, &order, reader_count);
        let mut around_pivot = vec![0u32; order.len()];
        for (k, &pivot) in pivots.iter().enumerate() {
            let (before, after) = (1u32 << (2 * k), 1u32 << (2 * k + 1));
            let mut stack = vec![pivot];
            while let Some(p) = stack.pop() {
                if around_pivot[p] & before == 0 {
                    around_pivot[p] |= before;
                    stack.extend(
                        g.node(order[p]).inputs.iter().map(|&v| producer[v.as_u32() as usize] as usize),
                    );
                }
            }
            stack.push(pivot);
            while let Some(p) = stack.pop() {
                if around_pivot[p] & after == 0 {
                    around_pivot[p] |= after;
                    for &r in &g.node(order[p]).results {
                        let r = r.as_u32() as usize;
                        stack.extend(
                            readers[first_reader[r] as usize..first_reader[r + 1] as usize]
                                .iter()
                                .map(|&u| u as usize),
                        );
                    }
                }
            }
        }
        let taken = vec![false; order.len()];
        let work = Cell::new(Work { visited: order.len() as u64, ..Work::default() });
        Ctx {
            g,
            order,
            producer,
            first_reader,
            readers,
            is_output,
            updated,
            fused_class,
            around_pivot,
            pivots,
            in_group: RefCell::new(Marks::new(taken.len())),
            seen: RefCell::new(Marks::new(taken.len())),
            locals: RefCell::new(Locals::new(values)),
            taken,
            analyses: RefCell::default(),
            work,
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn node(&self, p: usize) -> &'g kiln_ir::graph::Node {
        self.g.node(self.order[p])
    }

    pub fn producer(&self, v: ValueId) -> usize {
        self.producer[v.as_u32() as usize] as usize
    }

    /// Positions of the nodes reading `v`, each once, in order.
    pub fn readers(&self, v: ValueId) -> impl Iterator<Item = usize> + '_ {
        let v = v.as_u32() as usize;
        let range = self.first_reader[v] as usize..self.first_reader[v + 1] as usize;
        self.readers[range].iter().map(|&p| p as usize)
    }

    /// The same, collected.
    pub fn users(&self, v: ValueId) -> Vec<usize> {
        self.readers(v).collect()
    }

    pub fn is_output(&self, v: ValueId) -> bool {
        self.is_output[v.as_u32() as usize]
    }

    /// Whether `v` is a state input updated in place (see [`Ctx::updated`]).
    pub fn is_updated(&self, v: ValueId) -> bool {
        self.updated[v.as_u32() as usize]
    }

    pub fn free(&self, p: usize) -> bool {
        !self.taken[p]
    }

    pub fn take(&mut self, group: &Group) {
        for &p in &group.nodes {
            self.taken[p] = true;
        }
    }

    /// What the pass has done on this view so far.
    pub fn work(&self) -> Work {
        self.work.get()
    }

    pub(super) fn count(&self, visited: usize) {
        let mut w = self.work.get();
        w.visited += visited as u64;
        self.work.set(w);
    }

    /// No path leaves the group and comes back: no member reads, through nodes outside the group,
    /// a value computed from another member.
    ///
    /// Such a path starts at a member and passes only through positions after it. Paths from the
    /// group's own nodes are found walking back from the members' operands, no further back than
    /// the first of them; paths from a copied-in node that comes before that (a weight's
    /// `dequantize`, often placed at the start of its layer) are found walking forward from it, no
    /// further than the last member. Either walk stays between the group's members.
    ///
    /// A group with an ancestor and a descendant of a pivot it does not hold is not convex: the
    /// path through the pivot says so without a walk. A train step asks this of groups on either
    /// side of its logits (forward and backward) and of its clipping coefficient (a gradient's
    /// square, which the global norm sums, and the clipped gradient); walking between them
    /// crosses the backward pass, and the question is asked for each expert's weights.
    pub fn convex(&self, group: &Group) -> bool {
        let members = group.members();
        let Some(&lo) = group.nodes.iter().next() else { return true };
        let Some(&hi) = members.last() else { return true };
        if !self.pivots.is_empty() {
            self.count(members.len());
            let (mut any, mut pivots_in) = (0u32, 0u32);
            for &m in &members {
                any |= self.around_pivot[m];
                if let Some(k) = self.pivots.iter().position(|&p| p == m) {
                    pivots_in |= 0b11 << (2 * k);
                }
            }
            let across = any & !pivots_in & (any >> 1) & 0x5555_5555;
            if across != 0 {
                return false;
            }
        }
        let mut in_group = self.in_group.borrow_mut();
        in_group.clear();
        for &m in &members {
            in_group.insert(m);
        }
        let mut seen = self.seen.borrow_mut();
        seen.clear();
        let mut visited = 0;
        let mut stack: Vec<usize> = Vec::new();
        for &m in &members {
            for &v in &self.node(m).inputs {
                let p = self.producer(v);
                if !in_group.contains(p) {
                    stack.push(p);
                }
            }
        }
        let mut convex = true;
        while let Some(p) = stack.pop() {
            if p < lo || !seen.insert(p) {
                continue;
            }
            visited += 1;
            if in_group.contains(p) {
                convex = false;
                break;
            }
            stack.extend(self.node(p).inputs.iter().map(|&v| self.producer(v)));
        }
        if convex {
            seen.clear();
            stack.clear();
            for &c in group.cloned.range(..lo) {
                for &r in &self.node(c).results {
                    stack.extend(self.readers(r).filter(|&u| !in_group.contains(u)));
                }
            }
            while let Some(p) = stack.pop() {
                if p > hi || !seen.insert(p) {
                    continue;
                }
                visited += 1;
                if in_group.contains(p) {
                    convex = false;
                    break;
                }
                for &r in &self.node(p).results {
                    stack.extend(self.readers(r));
                }
            }
        }
        self.count(visited);
        convex
    }

    /// The body of a group: an input per outside value read, an output per member result read
    /// outside the group (or a graph output), in order.
    pub fn body(&self, group: &Group, name: &str) -> Result<Graph, PassError> {
        let err = |e: kiln_ir::graph::GraphError| fail(e.to_string());
        let mut body = Graph::new(name);
        let mut map: HashMap<ValueId, ValueId> = HashMap::default();
        for (i, v) in self.inputs(group).into_iter().enumerate() {
            let name = format!("a{i}");
            let (_, r) =
                body.add_node(Op::Input { name }, &[], vec![self.g.ty(v).clone()], None).map_err(err)?;
            map.insert(v, r[0]);
        }
        let all = self.ordered(group);
        self.count(all.len());
        for &p in &all {
            let node = self.node(p);
            let mut ins = Vec::with_capacity(node.inputs.len());
            for &v in &node.inputs {
                let m = match map.get(&v) {
                    Some(&m) => m,
                    // A constant is copied in rather than passed.
                    None => {
                        let c = self.node(self.producer(v));
                        let (_, r) = body
                            .add_node(c.op.clone(), &[], vec![self.g.ty(v).clone()], None)
                            .map_err(err)?;
                        map.insert(v, r[0]);
                        r[0]
                    }
                };
                ins.push(m);
            }
            let tys = node.results.iter().map(|&r| self.g.ty(r).clone()).collect();
            let (_, rs) = body.add_node(node.op.clone(), &ins, tys, None).map_err(err)?;
            map.extend(node.results.iter().copied().zip(rs));
        }
        for v in self.outputs(group) {
            body.add_output(format!("r{}", body.outputs().len()), map[&v]).map_err(err)?;
        }
        Ok(body)
    }

    /// The members of a group in the order its body lists them: depth first from its last member
    /// (which no member reads; then from any member that walk did not reach, last first), each
    /// member after the members it reads, which are taken in operand order. The order follows the
    /// group's structure, not where its nodes sit in the graph, so two groups that compute the
    /// same thing get the same body and share a kernel: a GEMM's `dequantize`s are copied in from
    /// wherever the two operands' nodes were made (a weight's often at the start of its layer, an
    /// activation's where an earlier GEMM quantised it), and DeepSeek-V3's `q_a_proj` and
    /// `kv_a_proj` were two kernels each, one per program, when members were listed by position.
    fn ordered(&self, group: &Group) -> Vec<usize> {
        let members = group.members();
        if members.len() < 2 {
            return members;
        }
        let mut in_group = self.in_group.borrow_mut();
        in_group.clear();
        for &m in &members {
            in_group.insert(m);
        }
        let mut visited = self.seen.borrow_mut();
        visited.clear();
        let mut order = Vec::with_capacity(members.len());
        let mut stack: Vec<(usize, usize)> = Vec::new();
        for &root in members.iter().rev() {
            if !visited.insert(root) {
                continue;
            }
            stack.push((root, 0));
            while let Some((p, next)) = stack.last_mut() {
                let inputs = &self.node(*p).inputs;
                match inputs.get(*next) {
                    Some(&v) => {
                        *next += 1;
                        let q = self.producer(v);
                        if in_group.contains(q) && visited.insert(q) {
                            stack.push((q, 0));
                        }
                    }
                    None => {
                        order.push(*p);
                        stack.pop();
                    }
                }
            }
        }
        order
    }

    /// The inputs of a group's fused node, in the order of its body's inputs: each value a member
    /// reads that no earlier member defines and that is not a constant, once, in order.
    pub fn inputs(&self, group: &Group) -> Vec<ValueId> {
        let mut defined: HashSet<ValueId> = HashSet::default();
        let mut listed: HashSet<ValueId> = HashSet::default();
        let mut ins = Vec::new();
        for p in self.ordered(group) {
            let node = self.node(p);
            for &v in &node.inputs {
                let constant = matches!(self.node(self.producer(v)).op, Op::Constant { .. });
                if !constant && !defined.contains(&v) && listed.insert(v) {
                    ins.push(v);
                }
            }
            defined.extend(node.results.iter().copied());
        }
        ins
    }

    /// Member results read outside the group, or graph outputs.
    pub fn outputs(&self, group: &Group) -> Vec<ValueId> {
        let mut moved = self.in_group.borrow_mut();
        moved.clear();
        for &p in &group.nodes {
            moved.insert(p);
        }
        let mut out = Vec::new();
        for &p in &group.nodes {
            for &r in &self.node(p).results {
                if self.is_output(r) || self.readers(r).any(|u| !moved.contains(u)) {
                    out.push(r);
                }
            }
        }
        out
    }

    /// The key of a group's body (see [`Key`]). It lists the members by position, which is cheaper
    /// than [`Ctx::ordered`] (a rule asks for the key of every candidate it tries) and enough:
    /// groups with equal keys are the same graph, member for member in position order, so the
    /// structural order picks corresponding members in both, and their bodies are equal.
    fn key(&self, group: &Group) -> Key<'g> {
        let g = self.g;
        let mut key: Key<'g> = Vec::new();
        let mut local = self.locals.borrow_mut();
        local.clear();
        let (mut args, mut constants) = (0, 0);
        for (m, p) in group.members().into_iter().enumerate() {
            let node = self.node(p);
            key.push(match self.fused_class[p] {
                u32::MAX => Token::Op(&node.op),
                class => Token::Fused(class),
            });
            for &v in &node.inputs {
                let t = match local.get(v) {
                    Some(l) => l.token(),
                    None if matches!(self.node(self.producer(v)).op, Op::Constant { .. }) => {
                        local.insert(v, Local::Again(constants));
                        constants += 1;
                        Token::Constant(&self.node(self.producer(v)).op, g.ty(v))
                    }
                    None => {
                        local.insert(v, Local::Arg(args));
                        args += 1;
                        Token::NewArg(g.ty(v))
                    }
                };
                key.push(t);
            }
            for (r, &v) in node.results.iter().enumerate() {
                key.push(Token::Result(g.ty(v)));
                local.insert(v, Local::Member(m as u32, r as u32));
            }
        }
        for v in self.outputs(group) {
            match local.get(v) {
                Some(Local::Member(m, r)) => key.push(Token::Output(m, r)),
                other => unreachable!("an output of a group is a member's result, not {other:?}"),
            }
        }
        self.count(key.len());
        key
    }

    /// The body of a group as [`Ctx::body`] builds it, named `name`: a copy of the body analysed
    /// for an identical group when there is one.
    pub fn fused_body(&self, group: &Group, name: &str) -> Result<Arc<Graph>, PassError> {
        let key = self.key(group);
        let mut analyses = self.analyses.borrow_mut();
        let found = (analyses.by_hash.get_mut(&hash_key(&key)))
            .and_then(|same| same.iter_mut().find(|(k, _)| *k == key));
        let Some((_, a)) = found else {
            drop(analyses);
            return self.body(group, name).map(Arc::new);
        };
        if let Some((_, body)) = a.named.iter().find(|(n, _)| n == name) {
            return Ok(Arc::clone(body));
        }
        let mut body = a.body.clone();
        body.set_name(name);
        let body = Arc::new(body);
        a.named.push((name.to_string(), Arc::clone(&body)));
        Ok(body)
    }

    /// Runs `f` on the analysis of the group's body, made or found; `None` when the body cannot be
    /// built.
    fn analysis<T>(&self, group: &Group, f: impl FnOnce(&mut Analysis) -> T) -> Option<T> {
        let key = self.key(group);
        let mut analyses = self.analyses.borrow_mut();
        let same = analyses.by_hash.entry(hash_key(&key)).or_default();
        let mut w = self.work.get();
        let i = match same.iter().position(|(k, _)| *k == key) {
            Some(i) => {
                w.reused += 1;
                i
            }
            None => {
                let body = self.body(group, "probe").ok()?;
                w.analyses += 1;
                same.push((key, Analysis { body, named: Vec::new(), one_pass: None, lowers: None }));
                same.len() - 1
            }
        };
        self.work.set(w);
        Some(f(&mut same[i].1))
    }

    /// The one-pass pattern of the group's body, if it is convex and has one.
    pub fn one_pass(&self, group: &Group) -> Option<Pattern> {
        if !self.convex(group) {
            return None;
        }
        self.analysis(group, |a| a.one_pass.get_or_insert_with(|| classify(&a.body)).clone()).flatten()
    }

    /// Whether the group is convex and lowers, in any number of phases.
    pub fn lowers(&self, group: &Group) -> bool {
        self.convex(group)
            && self
                .analysis(group, |a| *a.lowers.get_or_insert_with(|| fusion::plan(&a.body).is_ok()))
                .unwrap_or(false)
    }
}

/// The class of each `fused` node's op, by position (see [`Ctx::fused_class`]): ops are bucketed
/// by name, body size and outputs, and compared in full within a bucket, once per node.
fn fused_classes(g: &Graph, order: &[NodeId]) -> Vec<u32> {
    let mut buckets: HashMap<u64, Vec<(usize, u32)>> = HashMap::default();
    let mut classes = vec![u32::MAX; order.len()];
    let mut next = 0;
    for (p, &n) in order.iter().enumerate() {
        let op = &g.node(n).op;
        let Op::Fused { name, body } = op else { continue };
        let mut h = FxHasher::default();
        (name, body.node_count(), body.value_bound(), body.outputs()).hash(&mut h);
        let bucket = buckets.entry(h.finish()).or_default();
        classes[p] = match bucket.iter().find(|&&(q, _)| g.node(order[q]).op == *op) {
            Some(&(_, class)) => class,
            None => {
                bucket.push((p, next));
                next += 1;
                next - 1
            }
        };
    }
    classes
}

/// Nodes that many paths go through, for [`Ctx::convex`], in a program with a loss (a train
/// step): the producers of the logits each loss reads (every path from the forward pass to the
/// backward pass runs through them), and hubs, computed nodes with at least [`HUB_READERS`]
/// readers (the gradient-clipping coefficient, which every parameter's gradient feeds and every
/// update reads). The 8 most read, in order: each costs two walks of the graph.
fn pivots(g: &Graph, order: &[NodeId], readers: impl Fn(ValueId) -> usize) -> Vec<usize> {
    let logits: HashSet<ValueId> = (order.iter())
        .filter(|&&n| matches!(g.node(n).op, Op::CrossEntropy { .. }))
        .map(|&n| g.node(n).inputs[0])
        .collect();
    if logits.is_empty() {
        return Vec::new();
    }
    let mut ranked: Vec<(usize, usize)> = Vec::new();
    for (p, &n) in order.iter().enumerate() {
        let node = g.node(n);
        if node.inputs.is_empty() {
            continue;
        }
        let most = node.results.iter().map(|&r| readers(r)).max().unwrap_or(0);
        if node.results.iter().any(|r| logits.contains(r)) {
            ranked.push((usize::MAX, p));
        } else if most >= HUB_READERS {
            ranked.push((most, p));
        }
    }
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    let mut pivots: Vec<usize> = ranked.into_iter().take(8).map(|(_, p)| p).collect();
    pivots.sort_unstable();
    pivots
}

/// The readers that make a computed node of a train step a pivot of [`Ctx::convex`]: fewer than
/// the optimizer of a small model has parameters, so that its clipping coefficient is one. Busier
/// nodes go first, so the values a MoE layer fans out to its experts take a place only where
/// there are no busier hubs.
const HUB_READERS: usize = 64;

fn hash_key(key: &Key) -> u64 {
    let mut h = FxHasher::default();
    key.hash(&mut h);
    h.finish()
}
