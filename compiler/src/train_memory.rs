//! What a compiled train step holds in memory, by component and by piece of the model (`kiln
//! inspect --train`), counted from the step's buffers: the module's states and parameters, and the
//! memory plan's arena buffers.
//!
//! Components:
//!
//! - **parameters**: the trained weights (`trainable` states) and frozen parameters, in their
//!   stored dtype;
//! - **master weights** (`master_weight` states) and **optimizer moments** (`optimizer_moment`);
//! - **gradients**: what the optimizer reads, all of it live at once when the global norm is
//!   taken: each trained weight's f32 gradient in the arena (the value whose square the norm sums),
//!   plus the `gradient_accumulator` states of a split step;
//! - **saved activations**: forward values (those the loss is computed from) that the backward
//!   pass reads, so they stay live from the forward to the backward. Recomputation shrinks them;
//! - **other states**: counters, routing biases, load accumulators (by the piece their name
//!   says; the step's counters sit with the head).
//!
//! The arena also holds transient values: weight copies (values computed from the weights alone,
//! such as the FP8 blocks quantised each step and the transposes the data gradients read), the
//! activations' gradients and each kernel's temporaries. [`Peak`] splits the arena at its busiest
//! step into these classes.
//!
//! Pieces are the cost model's ([`crate::schedule::cost::Piece`]): the embedding, each decoder
//! layer, and the head with the final norm, the loss and the MTP modules. A state belongs to the
//! piece its parameter's name says; an arena value to the piece of the scope of the node that
//! defines it (backward nodes keep the scope of the forward node they differentiate). The routed
//! experts' part of each component is kept apart, because expert parallelism divides it.

use std::collections::{HashMap, HashSet};

use kiln_ir::artifact::{BufferKind, Storage};
use kiln_ir::module::{Module, StateRole};
use kiln_ir::{Graph, NodeId, Op, ValueId};

use crate::codegen::{KernelPlan, Step};
use crate::pack::MemoryPlan;
use crate::schedule::cost::Piece;

/// Bytes of one component: the routed experts' part, which expert parallelism divides, and the
/// rest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Split {
    pub experts: u64,
    pub other: u64,
}

impl Split {
    pub fn total(&self) -> u64 {
        self.experts + self.other
    }

    fn add(&mut self, routed: bool, bytes: u64) {
        if routed {
            self.experts += bytes;
        } else {
            self.other += bytes;
        }
    }

    /// The sum of two.
    pub fn plus(self, o: Split) -> Split {
        Split { experts: self.experts + o.experts, other: self.other + o.other }
    }

    /// `n` times this.
    pub fn times(self, n: u64) -> Split {
        Split { experts: self.experts * n, other: self.other * n }
    }
}

/// The components of one piece of the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PieceBytes {
    pub params: Split,
    pub master: Split,
    pub moments: Split,
    pub gradients: Split,
    pub activations: Split,
    /// Other states: the routers' selection biases, counters and accumulators.
    pub other: u64,
}

impl PieceBytes {
    pub fn plus(self, o: PieceBytes) -> PieceBytes {
        PieceBytes {
            params: self.params.plus(o.params),
            master: self.master.plus(o.master),
            moments: self.moments.plus(o.moments),
            gradients: self.gradients.plus(o.gradients),
            activations: self.activations.plus(o.activations),
            other: self.other + o.other,
        }
    }

    pub fn times(self, n: u64) -> PieceBytes {
        PieceBytes {
            params: self.params.times(n),
            master: self.master.times(n),
            moments: self.moments.times(n),
            gradients: self.gradients.times(n),
            activations: self.activations.times(n),
            other: self.other * n,
        }
    }
}

/// The arena at its busiest step: the bytes live there, by class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Peak {
    pub step: usize,
    pub live: u64,
    /// Saved activations (see the module documentation).
    pub activations: u64,
    pub gradients: u64,
    /// Other copies of the gradients: as the backward pass made them (before the optimizer's f32
    /// cast), the data-parallel sums.
    pub gradient_copies: u64,
    /// Values computed from the weights alone: FP8 copies, transposes.
    pub weight_copies: u64,
    /// The part of `weight_copies` computed from routed experts' weights (expert parallelism
    /// divides it).
    pub expert_copies: u64,
    /// The rest: activation gradients, recomputed values, forward temporaries, kernels' scratch.
    pub other: u64,
}

/// What one train-step program holds.
#[derive(Clone, Debug, PartialEq)]
pub struct StepMemory {
    /// Every piece with its bytes, in pipeline order.
    pub pieces: Vec<(Piece, PieceBytes)>,
    /// The arena as planned.
    pub arena: u64,
    pub peak: Peak,
}

impl StepMemory {
    /// The sum over the pieces.
    pub fn total(&self) -> PieceBytes {
        self.pieces.iter().fold(PieceBytes::default(), |a, (_, p)| a.plus(*p))
    }

    /// The bytes of `piece` (zero when it has none).
    pub fn piece(&self, piece: Piece) -> PieceBytes {
        self.pieces.iter().find(|(p, _)| *p == piece).map_or_else(PieceBytes::default, |(_, b)| *b)
    }
}

/// The piece a parameter (by its checkpoint name) belongs to, for a model of `layers` decoder
/// layers: MTP modules (`model.layers.{L+k}`) sit with the head.
pub fn piece_of_name(name: &str, layers: u64) -> Piece {
    if name.starts_with("model.embed_tokens") {
        return Piece::Embedding;
    }
    match name.strip_prefix("model.layers.").and_then(|r| r.split('.').next()).and_then(|n| n.parse().ok()) {
        Some(i) if i < layers => Piece::Layer(i),
        _ => Piece::Head,
    }
}

/// The piece of a node's scope; the embedding's lookup shares the scope `model` with the final
/// norm.
fn piece_of_scope(scope: Option<&str>, op: &Op, layers: u64) -> Piece {
    match scope {
        Some("model") if matches!(op, Op::Embedding) => Piece::Embedding,
        Some(s) if s.starts_with("model.embed_tokens") => Piece::Embedding,
        Some(s) if s.starts_with("model.layers.") => piece_of_name(s, layers),
        _ => Piece::Head,
    }
}

/// Whether a checkpoint name is a routed expert's weight.
pub fn is_routed(name: &str) -> bool {
    name.contains(".mlp.experts.")
}

/// The parameter a state is kept for, and the state's component.
fn state_param(name: &str, role: StateRole) -> Option<&str> {
    match role {
        StateRole::Trainable => Some(name),
        StateRole::MasterWeight => name.strip_prefix(crate::train::MASTER_PREFIX),
        StateRole::OptimizerMoment => name.strip_prefix("adam.m.").or_else(|| name.strip_prefix("adam.v.")),
        StateRole::GradientAccumulator => name.strip_prefix(crate::train::GRAD_ACC_PREFIX),
        _ => None,
    }
}

const OPTIMIZER_SCOPE: &str = "optimizer";

/// Counts the memory of program `program` of `module` with its kernel and memory plans, for a
/// model of `layers` decoder layers (the MTP modules after them).
pub fn measure(
    module: &Module,
    program: usize,
    plan: &KernelPlan,
    memory: &MemoryPlan,
    layers: u64,
) -> StepMemory {
    let g = &module.programs[program].graph;
    let max = memory.max;
    let mut pieces: Vec<(Piece, PieceBytes)> = Vec::new();

    // States and parameters.
    for s in &module.states {
        let bytes = kiln_ir::artifact::bytes_of(s.ty.dtype, &s.ty.shape, &max).unwrap_or(0);
        match state_param(&s.name, s.role) {
            Some(param) => {
                let b = slot(&mut pieces, piece_of_name(param, layers));
                let split = match s.role {
                    StateRole::Trainable => &mut b.params,
                    StateRole::MasterWeight => &mut b.master,
                    StateRole::OptimizerMoment => &mut b.moments,
                    _ => &mut b.gradients,
                };
                split.add(is_routed(param), bytes);
            }
            None => slot(&mut pieces, piece_of_name(&s.name, layers)).other += bytes,
        }
    }
    for p in &module.params {
        let bytes = kiln_ir::artifact::bytes_of(p.ty.dtype, &p.ty.shape, &max).unwrap_or(0);
        slot(&mut pieces, piece_of_name(&p.name, layers)).params.add(is_routed(&p.name), bytes);
    }

    // The arena's values: roots (a reshape shares its source's storage) and their classes.
    let mut root: HashMap<ValueId, ValueId> = HashMap::new();
    for step in &plan.steps {
        if let Step::Alias { result, source, .. } = step {
            let r = root.get(source).copied().unwrap_or(*source);
            root.insert(*result, r);
        }
    }
    let root_of = |v: ValueId| root.get(&v).copied().unwrap_or(v);
    let in_arena = |v: ValueId| {
        memory
            .of_value
            .get(&v)
            .is_some_and(|&b| matches!(memory.buffers[b.index()].storage, Storage::Arena { .. }))
    };
    let scope_of = |v: ValueId| g.node(g.producer(v)).scope.as_deref();
    let optimizer = |v: ValueId| scope_of(v) == Some(OPTIMIZER_SCOPE);

    // Forward values: what the loss is computed from.
    let forward =
        ancestors(g, g.outputs().iter().filter(|(n, _)| n == crate::autodiff::LOSS).map(|&(_, v)| v));

    // Gradients: each trained weight's gradient is squared and summed for the global norm
    // (`crate::train`), by a node of its own or inside a fused one (a GEMM's epilogue, a cast's
    // chain). A gradient has a trained weight's shape, all of it known; an activation's has the
    // batch's symbolic sizes.
    let weight_shapes: HashSet<&[kiln_ir::Dim]> = (module.states.iter())
        .filter(|s| s.role == StateRole::Trainable)
        .map(|s| s.ty.shape.as_slice())
        .collect();
    let mut gradients: HashSet<ValueId> = HashSet::new();
    for n in g.nodes() {
        for d in squared(g, n) {
            let ty = g.ty(d);
            if ty.dtype == kiln_ir::DType::F32 && weight_shapes.contains(ty.shape.as_slice()) {
                gradients.insert(root_of(d));
            }
        }
    }
    // The gradients' other copies: back from each through casts, sums over peers, scaling and
    // accumulation (a tensor of the same size), to the node that computed it.
    let mut copies: HashSet<ValueId> = HashSet::new();
    for &d in &gradients {
        let mut v = d;
        loop {
            let node = g.node(g.producer(v));
            let numel = |x: ValueId| g.ty(x).known_numel();
            let through = matches!(
                node.op,
                Op::Cast { .. }
                    | Op::AllReduce { .. }
                    | Op::Binary(_)
                    | Op::Reshape { .. }
                    | Op::Fused { .. }
            );
            let same: Vec<ValueId> = (node.inputs.iter().copied())
                .filter(|&i| {
                    g.ty(i).rank() > 0
                        && numel(i) == numel(v)
                        && !matches!(g.node(g.producer(i)).op, Op::Input { .. })
                })
                .collect();
            match (through, same.as_slice()) {
                (true, [u]) => {
                    let u = root_of(*u);
                    if gradients.contains(&u) || !copies.insert(u) {
                        break;
                    }
                    v = u;
                }
                _ => break,
            }
        }
    }

    // The outputs that update a trained weight's states, by the weight's name.
    let updates: HashMap<ValueId, &str> = (g.outputs().iter())
        .filter_map(|(name, v)| {
            let s = module.states.iter().find(|s| s.name == *name)?;
            Some((*v, state_param(&s.name, s.role)?))
        })
        .collect();
    for &d in &gradients {
        if !in_arena(d) {
            continue;
        }
        let param = gradient_of(g, d, &updates).unwrap_or_default();
        let (piece, routed) = (piece_of_name(&param, layers), is_routed(&param));
        slot(&mut pieces, piece).gradients.add(routed, memory.buffers[memory.buffer(d).index()].max_bytes);
    }

    // Values of the weights alone: no caller input (other than the states) reaches them.
    let states: HashSet<&str> = module.states.iter().map(|s| s.name.as_str()).collect();
    let data =
        descendants(g, g.inputs().into_iter().filter(|(name, _)| !states.contains(name)).map(|(_, v)| v));

    // Saved activations: forward arena values (or views of them) computed from the data that a
    // node outside the forward reads. (A weight's copy kept for the backward pass is a weight
    // copy.)
    let mut saved: HashSet<ValueId> = HashSet::new();
    for n in g.nodes() {
        let node = g.node(n);
        if node.results.iter().any(|r| forward.contains(r)) {
            continue;
        }
        for &v in &node.inputs {
            let r = root_of(v);
            if forward.contains(&r) && data.contains(&r) && in_arena(r) && !optimizer(r) {
                saved.insert(r);
            }
        }
    }
    for &v in &saved {
        let node = g.node(g.producer(v));
        slot(&mut pieces, piece_of_scope(node.scope.as_deref(), &node.op, layers))
            .activations
            .add(false, memory.buffers[memory.buffer(v).index()].max_bytes);
    }

    // Values of routed experts' weights.
    let experts = descendants(g, g.inputs().into_iter().filter(|(name, _)| is_routed(name)).map(|(_, v)| v));

    // The arena's busiest step.
    let steps = plan.steps.len() + 1;
    let mut delta = vec![0i128; steps + 1];
    let mut class: Vec<(usize, usize, u64, u8)> = Vec::new();
    for (b, &(start, end)) in memory.buffers.iter().zip(&memory.live) {
        if !matches!(b.storage, Storage::Arena { .. }) {
            continue;
        }
        let c = if b.kind == BufferKind::Scratch {
            3
        } else {
            let Some(v) = value_of(g, memory, b.id.index()) else { continue };
            if root_of(v) != v {
                continue;
            }
            if saved.contains(&v) {
                0
            } else if gradients.contains(&v) {
                1
            } else if copies.contains(&v) {
                5
            } else if !data.contains(&v) && !optimizer(v) {
                if experts.contains(&v) {
                    4
                } else {
                    2
                }
            } else {
                3
            }
        };
        let end = end.min(steps - 1);
        delta[start] += i128::from(b.max_bytes);
        delta[end + 1] -= i128::from(b.max_bytes);
        class.push((start, end, b.max_bytes, c));
    }
    let (mut live, mut best, mut step) = (0i128, 0i128, 0usize);
    for (i, d) in delta.iter().enumerate().take(steps) {
        live += d;
        if live > best {
            (best, step) = (live, i);
        }
    }
    let mut peak = Peak { step, live: best as u64, ..Peak::default() };
    for &(s, e, bytes, c) in &class {
        if s <= step && step <= e {
            match c {
                0 => peak.activations += bytes,
                1 => peak.gradients += bytes,
                2 => peak.weight_copies += bytes,
                5 => peak.gradient_copies += bytes,
                4 => {
                    peak.weight_copies += bytes;
                    peak.expert_copies += bytes;
                }
                _ => peak.other += bytes,
            }
        }
    }

    pieces.sort_by_key(|(p, _)| match p {
        Piece::Embedding => 0,
        Piece::Layer(i) => 1 + i,
        Piece::Head => u64::MAX,
    });
    StepMemory { pieces, arena: memory.arena_bytes, peak }
}

/// The bytes of `piece` in `pieces`, added when missing.
fn slot(pieces: &mut Vec<(Piece, PieceBytes)>, piece: Piece) -> &mut PieceBytes {
    let i = match pieces.iter().position(|(p, _)| *p == piece) {
        Some(i) => i,
        None => {
            pieces.push((piece, PieceBytes::default()));
            pieces.len() - 1
        }
    };
    &mut pieces[i].1
}

/// The value of buffer `i` (buffers are indexed in order of definition, as the plan numbers them).
fn value_of(g: &Graph, memory: &MemoryPlan, i: usize) -> Option<ValueId> {
    let v: u32 = memory.buffers[i].value.strip_prefix('%')?.parse().ok()?;
    let v = ValueId::new(v);
    g.contains_value(v).then_some(v)
}

/// The values node `n` squares and sums: `mul d, d` whose square a reduction reads (AdamW's
/// `g * g` is scaled instead). Inside a fused node, `d` may be cast, reshaped or scaled by a scalar
/// (a data-parallel sum times `1 / M`) from one of the node's operands, or be one of its results.
fn squared(g: &Graph, n: NodeId) -> Vec<ValueId> {
    let node = g.node(n);
    let is_reduce = |op: &Op| matches!(op, Op::Reduce { .. });
    match &node.op {
        Op::Binary(kiln_ir::BinaryOp::Mul)
            if node.inputs[0] == node.inputs[1]
                && g.users(node.results[0]).into_iter().any(|u| is_reduce(&g.node(u).op)) =>
        {
            vec![node.inputs[0]]
        }
        Op::Fused { body, .. } => {
            let mut out = Vec::new();
            let output_at = |v: ValueId| body.outputs().iter().position(|(_, o)| *o == v);
            for m in body.nodes() {
                let inner = body.node(m);
                if !matches!(inner.op, Op::Binary(kiln_ir::BinaryOp::Mul))
                    || inner.inputs[0] != inner.inputs[1]
                {
                    continue;
                }
                let sq = inner.results[0];
                let reduced = body.users(sq).into_iter().any(|u| is_reduce(&body.node(u).op))
                    || output_at(sq).is_some_and(|i| {
                        g.users(node.results[i]).into_iter().any(|u| is_reduce(&g.node(u).op))
                    });
                if !reduced {
                    continue;
                }
                let mut x = inner.inputs[0];
                loop {
                    if let Some(i) = output_at(x) {
                        out.push(node.results[i]);
                        break;
                    }
                    let p = body.node(body.producer(x));
                    let scalar = |v: ValueId| body.ty(v).rank() == 0;
                    match &p.op {
                        Op::Cast { .. } | Op::Reshape { .. } => x = p.inputs[0],
                        // A gradient scaled in the kernel (a data-parallel sum times 1 / M).
                        Op::Binary(kiln_ir::BinaryOp::Mul) if scalar(p.inputs[1]) && !scalar(p.inputs[0]) => {
                            x = p.inputs[0]
                        }
                        Op::Binary(kiln_ir::BinaryOp::Mul) if scalar(p.inputs[0]) && !scalar(p.inputs[1]) => {
                            x = p.inputs[1]
                        }
                        Op::Input { name } => {
                            let k = name.strip_prefix('a').and_then(|k| k.parse::<usize>().ok());
                            if let Some(&v) = k.and_then(|k| node.inputs.get(k)) {
                                out.push(v);
                            }
                            break;
                        }
                        _ => break,
                    }
                }
            }
            out
        }
        _ => Vec::new(),
    }
}

/// The trained weight gradient `d` is for: the state its values flow into, following only
/// tensors (the norm and the clipping coefficient, scalars, reach every weight's update).
fn gradient_of(g: &Graph, d: ValueId, states: &HashMap<ValueId, &str>) -> Option<String> {
    let mut seen = HashSet::new();
    let mut queue = std::collections::VecDeque::from([d]);
    while let Some(v) = queue.pop_front() {
        if !seen.insert(v) {
            continue;
        }
        if let Some(name) = states.get(&v) {
            return Some(name.to_string());
        }
        for u in g.users(v) {
            queue.extend(g.node(u).results.iter().copied().filter(|&r| g.ty(r).rank() > 0));
        }
    }
    None
}

/// `roots` and every value they are computed from.
fn ancestors(g: &Graph, roots: impl IntoIterator<Item = ValueId>) -> HashSet<ValueId> {
    let mut seen = HashSet::new();
    let mut stack: Vec<ValueId> = roots.into_iter().collect();
    while let Some(v) = stack.pop() {
        if seen.insert(v) {
            stack.extend(g.node(g.producer(v)).inputs.iter().copied());
        }
    }
    seen
}

/// `roots` and every value computed from them.
fn descendants(g: &Graph, roots: impl IntoIterator<Item = ValueId>) -> HashSet<ValueId> {
    let mut seen = HashSet::new();
    let mut stack: Vec<ValueId> = roots.into_iter().collect();
    while let Some(v) = stack.pop() {
        if seen.insert(v) {
            for n in g.users(v) {
                stack.extend(g.node(n).results.iter().copied());
            }
        }
    }
    seen
}
