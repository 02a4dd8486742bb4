//! Pipeline stages as programs: the `accumulate` program of a train step (one micro-batch's
//! forward, loss and backward, added into the gradient accumulators) cut into one program per
//! stage and phase, which `kiln train --pp` runs on the ranks of a pipeline.
//!
//! [`split`] assigns every node a **stage** (a slice of the model: the parallel plan's
//! [`StageEntry`]) and a **phase**:
//!
//! - **F**, the forward pass: the nodes the micro-batch's loss and the routers' loads depend on;
//! - **B**, the backward pass for inputs: the backward nodes whose results another stage needs
//!   (the gradient of the stage's input activations), with what they depend on;
//! - **W**, the backward pass for weights: the rest of the backward pass, the weight gradients and
//!   their accumulation, which zero-bubble schedules defer (ZB1P, DualPipe).
//!
//! Stages come from names and scopes, the contract every builder keeps: a state or parameter by
//! its Hugging Face name (`model.layers.3.…` is layer 3's stage; the embedding's is the first
//! stage's, the final norm's and the head's the last one's; `grad.acc.{p}` and `load.acc.{scope}`
//! follow `p` and `scope`), a node by its scope (`model.layers.3.mlp`), and any other node by its
//! operands: the latest of their stages for a forward node (the embedding lookup follows its
//! table, the head its input); a backward node outside the layers goes to the latest stage among
//! its users and the states it reads (the final norm's gradient where the norm's weight is, the
//! embedding's scatter where its accumulator is), and one that writes a state where the state is. A node whose operands are all caller inputs or constants is
//! replicated: every program that needs it computes it.
//!
//! An embedding lookup and its gradient run on the stage that holds the table, whatever their
//! scope: the MTP modules, on the last stage, look their tokens up in the first stage's embedding,
//! so the first stage looks them up and sends the rows (`B·T·d` a micro-batch), and the rows'
//! gradient comes back to it, where it is scattered into the table's. (Sending the `V·d` table's
//! gradient instead, every micro-batch, and the updated table after every step, cost DeepSeek-V3
//! 3.7 GB in f32 each time, against 117 MB of rows for a micro-batch of 4096 tokens.)
//!
//! A stage may still read another stage's weight (a tied head reads the embedding's table): its
//! gradient there is an ordinary value sent back to the stage that holds the weight, and the runtime
//! sends the updated weight to the reading rank after each step.
//!
//! A value used outside its own program becomes an output there and an input where it is used:
//! `pp.saved.{v}` between programs of one stage (activations the forward keeps for the backward,
//! input gradients the weight phase reads), `pp.x.{phase}.{from}.{to}.{v}` between stages, sent by
//! the runtime from the producing rank to the using one. Every program's other outputs are the
//! accumulate program's own (accumulators, loads), each written by exactly one program.
//!
//! The programs compute exactly the accumulate program's nodes, so a pipeline's gradients are the
//! one-process run's, added in the same order; only the global norm's sum is regrouped (each rank
//! sums its own parameters, then the ranks' sums are added: `all_reduce` over [`PP_GROUP`]).

use std::collections::{HashMap, HashSet};

use kiln_ir::artifact::StageEntry;
use kiln_ir::{Graph, NodeId, Op, ValueId};

/// The communication group of a pipeline's ranks.
pub const PP_GROUP: &str = kiln_ir::module::PP_GROUP;
/// The prefix of a value kept between two programs of one stage.
pub const SAVED_PREFIX: &str = "pp.saved.";
/// The prefix of a value sent between stages: `pp.x.{phase}.{from}.{to}.{value}`.
pub const SENT_PREFIX: &str = "pp.x.";

/// A stage's part of a micro-batch's work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    Forward,
    Backward,
    Weight,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::Forward, Phase::Backward, Phase::Weight];

    /// The letter of transfer names: `f`, `b`, `w`.
    pub fn letter(self) -> char {
        match self {
            Phase::Forward => 'f',
            Phase::Backward => 'b',
            Phase::Weight => 'w',
        }
    }

    pub fn from_letter(c: char) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.letter() == c)
    }

    /// The last word of the program's name: `stage.{s}.forward`.
    pub fn word(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::Weight => "weight",
        }
    }
}

/// The name of the program of `stage`'s `phase`.
pub fn program_name(stage: u32, phase: Phase) -> String {
    format!("stage.{stage}.{}", phase.word())
}

/// The name of rank `rank`'s optimizer step over the parameters of its stages.
pub fn update_name(rank: u32) -> String {
    format!("rank.{rank}.update")
}

/// A value moving between stages, parsed from its name: `(phase of the producer, from, to)`.
pub fn parse_sent(name: &str) -> Option<(Phase, u32, u32)> {
    let rest = name.strip_prefix(SENT_PREFIX)?;
    let mut it = rest.split('.');
    let phase = Phase::from_letter(it.next()?.chars().next()?)?;
    let from = it.next()?.parse().ok()?;
    let to = it.next()?.parse().ok()?;
    Some((phase, from, to))
}

/// One program of [`split`].
#[derive(Clone, Debug)]
pub struct StageProgram {
    pub stage: u32,
    pub phase: Phase,
    pub graph: Graph,
}

/// Why a program could not be cut into stages.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("the pipeline cut cannot place `{name}`: {why}")]
    Unplaced { name: String, why: String },
    #[error(
        "internal error: value {value} (made in stage {from_stage} {from_phase:?}, scope {scope}) is used by stage \
         {to_stage} {to_phase:?}, which runs before it (a kiln bug; please report it)"
    )]
    Backwards {
        value: String,
        from_stage: u32,
        from_phase: Phase,
        to_stage: u32,
        to_phase: Phase,
        scope: String,
    },
    #[error("internal error: {0} (a kiln bug; please report it)")]
    Internal(String),
}

/// The stages of a plan, by what they hold.
pub struct Cut<'a> {
    pub stages: &'a [StageEntry],
    /// The main model's decoder layers: a layer number past them is an MTP module's, which the
    /// last stage holds.
    pub layers: u64,
}

impl Cut<'_> {
    fn head(&self) -> u32 {
        self.stages.iter().find(|s| s.head).map_or(self.stages.len() as u32 - 1, |s| s.stage)
    }

    fn embedding(&self) -> u32 {
        self.stages.iter().find(|s| s.embedding).map_or(0, |s| s.stage)
    }

    fn layer(&self, n: u64) -> u32 {
        if n >= self.layers {
            return self.head();
        }
        self.stages.iter().find(|s| s.layers.contains(&n)).map_or(self.head(), |s| s.stage)
    }

    /// The stage of a module path or state name (`model.layers.3.mlp`, `lm_head.weight`).
    fn of_path(&self, path: &str) -> Option<u32> {
        if let Some(rest) = path.strip_prefix("model.layers.") {
            let n = rest.split('.').next()?.parse().ok()?;
            return Some(self.layer(n));
        }
        if path.starts_with("model.embed_tokens") {
            return Some(self.embedding());
        }
        if path.starts_with("model.norm") || path.starts_with("lm_head") {
            return Some(self.head());
        }
        None
    }

    /// The stage of a state or parameter, by name.
    pub fn of_name(&self, name: &str) -> Option<u32> {
        if name == crate::train::LOSS_ACC {
            return Some(self.head());
        }
        let prefixes = [crate::train::GRAD_ACC_PREFIX, crate::build::LOAD_ACC_PREFIX, "adam.m.", "adam.v."];
        let base = prefixes.iter().find_map(|p| name.strip_prefix(p)).unwrap_or(name);
        let base = base.strip_prefix(crate::train::MASTER_PREFIX).unwrap_or(base);
        self.of_path(base)
    }

    /// The stage a scope pins a node to: a decoder layer's (`model.layers.N…`).
    fn of_scope(&self, scope: &str) -> Option<u32> {
        let rest = scope.strip_prefix("model.layers.")?;
        let n = rest.split('.').next()?.parse().ok()?;
        Some(self.layer(n))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Home {
    /// Computed by every program that needs it.
    Replicated,
    /// A state or parameter of a stage: an input of every program of the stage that reads it.
    State(u32),
    Part(u32, Phase),
}

/// The name a value `v` made in `(stage, phase)` has where stage `to` uses it.
fn transfer_name(v: ValueId, stage: u32, phase: Phase, to: u32) -> String {
    if stage == to {
        format!("{SAVED_PREFIX}{}", v.as_u32())
    } else {
        format!("{SENT_PREFIX}{}.{stage}.{to}.{}", phase.letter(), v.as_u32())
    }
}

/// Cuts `acc`, an `accumulate` program after the passes (before kernel fusion), into the programs
/// of `cut`'s stages (see the module documentation); `states` are the module's state names. The
/// programs come in stage order, F, B, W within a stage; a part with no node has no program.
pub fn split(acc: &Graph, cut: &Cut, states: &HashSet<&str>) -> Result<Vec<StageProgram>, PipelineError> {
    let order = acc.nodes();
    // The forward pass: what the micro-batch's loss and the routers' loads depend on.
    let loss = crate::passes::rematerialize::micro_batch_loss(acc)
        .ok_or_else(|| PipelineError::Internal("the accumulate program has no loss accumulator".into()))?;
    let mut roots = vec![loss];
    roots.extend(
        (acc.outputs().iter()).filter(|(n, _)| n.starts_with(crate::build::LOAD_ACC_PREFIX)).map(|&(_, v)| v),
    );
    let mut forward: HashSet<NodeId> = HashSet::new();
    let mut stack: Vec<NodeId> = roots.iter().map(|&v| acc.producer(v)).collect();
    while let Some(n) = stack.pop() {
        if forward.insert(n) {
            stack.extend(acc.node(n).inputs.iter().map(|&v| acc.producer(v)));
        }
    }

    // Stages, in graph order (operands first).
    let mut home: HashMap<NodeId, Home> = HashMap::new();
    let mut deferred: Vec<NodeId> = Vec::new();
    for &n in &order {
        let node = acc.node(n);
        let phase = if forward.contains(&n) { Phase::Forward } else { Phase::Backward };
        let h = match &node.op {
            Op::Param { name } => Home::State(cut.of_name(name).ok_or_else(|| PipelineError::Unplaced {
                name: name.clone(),
                why: "a parameter outside the decoder layers, the embedding and the head".into(),
            })?),
            // An expert-parallel rank's number: every stage with MoE layers reads it.
            Op::Input { name } if name == crate::expert_parallel::EP_RANK => Home::Replicated,
            Op::Input { name } if states.contains(name.as_str()) => {
                Home::State(cut.of_name(name).ok_or_else(|| PipelineError::Unplaced {
                    name: name.clone(),
                    why: "a state that belongs to no layer, the embedding or the head".into(),
                })?)
            }
            Op::Input { .. } | Op::Constant { .. } => Home::Replicated,
            // Expert parallelism's dispatch and combine are part of their layer (below).
            Op::AllReduce { group } | Op::AllToAll { group, .. }
                if group == crate::expert_parallel::EP_GROUP =>
            {
                match node.scope.as_deref().and_then(|s| cut.of_scope(s)) {
                    Some(s) => Home::Part(s, phase),
                    None => {
                        return Err(PipelineError::Unplaced {
                            name: format!("an expert-parallel {}", node.op.name()),
                            why: "it is outside the decoder layers".into(),
                        })
                    }
                }
            }
            Op::Recv { .. }
            | Op::Send { .. }
            | Op::AllReduce { .. }
            | Op::AllGather { .. }
            | Op::AllToAll { .. } => {
                return Err(PipelineError::Unplaced {
                    name: format!("{} node", node.op.name()),
                    why: "a program that communicates already cannot be cut into pipeline stages (data \
                          parallelism with --pp is not built yet)"
                        .into(),
                })
            }
            // An embedding lookup runs on the stage that holds its table, whatever its scope (the
            // MTP modules, on the last stage, look their tokens up in the first stage's table):
            // what crosses stages is then the looked-up rows, `B·T·d` a micro-batch, and not the
            // `V·d` table, which the last stage would otherwise hold a copy of, receive after every
            // step, and send back as its gradient every micro-batch (3.7 GB in f32 at
            // DeepSeek-V3's size, each time).
            Op::Embedding if table_stage(&home, acc, n).is_some() => {
                Home::Part(table_stage(&home, acc, n).expect("checked"), phase)
            }
            // Its gradient likewise runs where the table's gradient is summed (by its users, below),
            // so what comes back is the rows' gradient.
            Op::EmbeddingGrad { .. } => {
                deferred.push(n);
                Home::Part(0, phase)
            }
            _ => {
                let operands: Vec<u32> = (node.inputs.iter())
                    .filter_map(|&v| match home[&acc.producer(v)] {
                        Home::Part(s, _) | Home::State(s) => Some(s),
                        Home::Replicated => None,
                    })
                    .collect();
                match node.scope.as_deref().and_then(|s| cut.of_scope(s)) {
                    Some(s) => Home::Part(s, phase),
                    None if operands.is_empty() => Home::Replicated,
                    // The latest stage of its operands: the embedding lookup follows its table,
                    // the head its input.
                    None if phase == Phase::Forward => {
                        Home::Part(*operands.iter().max().expect("some"), phase)
                    }
                    // A backward node outside the layers is placed by its users, below.
                    None => {
                        deferred.push(n);
                        Home::Part(0, phase)
                    }
                }
            }
        };
        home.insert(n, h);
    }

    let mut users: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
    for &n in &order {
        for &v in &acc.node(n).inputs {
            users.entry(acc.producer(v)).or_default().push(n);
        }
    }
    // A backward node outside the decoder layers (the loss's, the head's, the final norm's and
    // its recomputation, the embedding's, the accumulators') runs on the latest stage among its
    // users and the states it reads, users first: the final norm's gradient where the norm's weight
    // is, though it reads the last layer's output; the embedding's scatter where its accumulator
    // is. One that writes a state runs where the state is.
    let written: HashMap<NodeId, u32> = (acc.outputs().iter())
        .filter(|(name, _)| states.contains(name.as_str()))
        .filter_map(|(name, v)| Some((acc.producer(*v), cut.of_name(name)?)))
        .collect();
    for &n in deferred.iter().rev() {
        let by_users = (users.get(&n).into_iter().flatten()).filter_map(|u| match home[u] {
            Home::Part(s, _) => Some(s),
            _ => None,
        });
        let by_states = (acc.node(n).inputs.iter()).filter_map(|&v| match home[&acc.producer(v)] {
            Home::State(s) => Some(s),
            _ => None,
        });
        let s = match written.get(&n) {
            Some(&s) => s,
            None => by_users.chain(by_states).max().unwrap_or(cut.head()),
        };
        home.insert(n, Home::Part(s, Phase::Backward));
    }
    // B or W: a backward node is B when another stage needs it, or a B node does.
    let stage_of = |h: Home| match h {
        Home::Part(s, _) => Some(s),
        Home::Replicated | Home::State(_) => None,
    };
    let mut stack: Vec<NodeId> = Vec::new();
    for &n in &order {
        let Home::Part(s, Phase::Backward) = home[&n] else { continue };
        let elsewhere =
            users.get(&n).is_some_and(|us| us.iter().any(|u| stage_of(home[u]).is_some_and(|t| t != s)));
        if elsewhere {
            stack.push(n);
        }
    }
    let mut input_grad: HashSet<NodeId> = HashSet::new();
    while let Some(n) = stack.pop() {
        let Home::Part(s, Phase::Backward) = home[&n] else { continue };
        if !input_grad.insert(n) {
            continue;
        }
        for &v in &acc.node(n).inputs {
            let m = acc.producer(v);
            if home[&m] == Home::Part(s, Phase::Backward) {
                stack.push(m);
            }
        }
    }
    for &n in &order {
        if let Home::Part(s, Phase::Backward) = home[&n] {
            if !input_grad.contains(&n) {
                home.insert(n, Home::Part(s, Phase::Weight));
            }
        }
    }

    // Every use must come after its value in any schedule: a forward value flows to later stages'
    // forward passes or to any backward pass; a backward value to its own stage's weight phase
    // or to earlier stages' backward passes.
    for &n in &order {
        let Home::Part(b, pb) = home[&n] else { continue };
        for &v in &acc.node(n).inputs {
            let m = acc.producer(v);
            let (a, pa) = match home[&m] {
                Home::Part(a, pa) => (a, pa),
                Home::State(a) if a != b && !weight(acc, m) => return Err(shared(acc, m, a, b)),
                _ => continue,
            };
            let fine = match (pa, pb) {
                _ if a == b => pa <= pb,
                (Phase::Forward, Phase::Forward) => a < b,
                (Phase::Forward, _) => true,
                (Phase::Backward, Phase::Backward | Phase::Weight) => a > b,
                _ => false,
            };
            if !fine {
                return Err(PipelineError::Backwards {
                    value: v.to_string(),
                    from_stage: a,
                    from_phase: pa,
                    to_stage: b,
                    to_phase: pb,
                    scope: acc.node(m).scope.clone().unwrap_or_else(|| "none".into()),
                });
            }
        }
    }

    // A state is written by the stage that holds it.
    for (name, v) in acc.outputs() {
        if !states.contains(name.as_str()) {
            continue;
        }
        if let (Home::Part(s, _), Some(t)) = (home[&acc.producer(*v)], cut.of_name(name)) {
            if s != t {
                return Err(PipelineError::Internal(format!(
                    "state `{name}` of stage {t} would be written by stage {s}"
                )));
            }
        }
    }

    let stages = cut.stages.len() as u32;
    let mut programs = Vec::new();
    for stage in 0..stages {
        for phase in Phase::ALL {
            let part = Home::Part(stage, phase);
            let members: Vec<NodeId> = order.iter().copied().filter(|n| home[n] == part).collect();
            if members.is_empty() {
                continue;
            }
            let name = format!("{}.stage{stage}.{}", acc.name(), phase.word());
            let graph = part_graph(acc, &name, &members, &home, part)?;
            kiln_ir::verify::verify(&graph)
                .map_err(|e| PipelineError::Internal(format!("{}: {e}", program_name(stage, phase))))?;
            programs.push(StageProgram { stage, phase, graph });
        }
    }
    Ok(programs)
}

/// Whether `m` reads a weight (a trained parameter or a router's bias), which another stage may read
/// too (the MTP modules' embedding lookup, on the last stage, reads the first stage's table): the
/// runtime sends the updated weight to the reading rank after each step. An accumulator may not.
fn weight(acc: &Graph, m: NodeId) -> bool {
    let accumulators = [crate::train::GRAD_ACC_PREFIX, crate::build::LOAD_ACC_PREFIX, crate::train::LOSS_ACC];
    match &acc.node(m).op {
        Op::Input { name } | Op::Param { name } => !accumulators.iter().any(|p| name.starts_with(p)),
        _ => false,
    }
}

/// The stage of the table an embedding lookup `n` reads, where the table is a state.
fn table_stage(home: &HashMap<NodeId, Home>, acc: &Graph, n: NodeId) -> Option<u32> {
    let table = *acc.node(n).inputs.first()?;
    match home.get(&acc.producer(table))? {
        Home::State(s) => Some(*s),
        _ => None,
    }
}

/// A state of stage `a` that stage `b` may not read.
fn shared(acc: &Graph, m: NodeId, a: u32, b: u32) -> PipelineError {
    let name = match &acc.node(m).op {
        Op::Input { name } | Op::Param { name } => name.clone(),
        op => op.name().to_string(),
    };
    PipelineError::Unplaced {
        name,
        why: format!("an accumulator of stage {a} read by stage {b}: a stage accumulates only its own sums"),
    }
}

/// The graph of one part: its nodes, the replicated ones they need, inputs for the values made
/// elsewhere and outputs for the values used elsewhere.
fn part_graph(
    acc: &Graph,
    name: &str,
    members: &[NodeId],
    home: &HashMap<NodeId, Home>,
    part: Home,
) -> Result<Graph, PipelineError> {
    let Home::Part(stage, phase) = part else { unreachable!("a part") };
    let mut g = Graph::new(name);
    let mut map: HashMap<ValueId, ValueId> = HashMap::new();
    let internal = |e: kiln_ir::GraphError| PipelineError::Internal(e.to_string());

    // A value of `acc` in `g`: its copy, a replicated node computed here, or an input.
    fn get(
        acc: &Graph,
        g: &mut Graph,
        map: &mut HashMap<ValueId, ValueId>,
        home: &HashMap<NodeId, Home>,
        stage: u32,
        v: ValueId,
    ) -> Result<ValueId, PipelineError> {
        if let Some(&x) = map.get(&v) {
            return Ok(x);
        }
        let internal = |e: kiln_ir::GraphError| PipelineError::Internal(e.to_string());
        let m = acc.producer(v);
        let node = acc.node(m);
        match home[&m] {
            Home::Replicated => {
                let mut inputs = Vec::with_capacity(node.inputs.len());
                for &i in &node.inputs {
                    inputs.push(get(acc, g, map, home, stage, i)?);
                }
                let types = node.results.iter().map(|&r| acc.ty(r).clone()).collect();
                let (_, rs) =
                    g.add_node(node.op.clone(), &inputs, types, node.scope.as_deref()).map_err(internal)?;
                for (&r, x) in node.results.iter().zip(rs) {
                    map.insert(r, x);
                }
            }
            Home::State(_) => {
                let types = vec![acc.ty(v).clone()];
                let (_, rs) =
                    g.add_node(node.op.clone(), &[], types, node.scope.as_deref()).map_err(internal)?;
                map.insert(v, rs[0]);
            }
            Home::Part(a, pa) => {
                let op = Op::Input { name: transfer_name(v, a, pa, stage) };
                let (_, rs) = g.add_node(op, &[], vec![acc.ty(v).clone()], None).map_err(internal)?;
                map.insert(v, rs[0]);
            }
        }
        Ok(map[&v])
    }

    let member_set: HashSet<NodeId> = members.iter().copied().collect();
    for &n in members {
        let node = acc.node(n);
        let mut inputs = Vec::with_capacity(node.inputs.len());
        for &i in &node.inputs {
            let m = acc.producer(i);
            inputs.push(if member_set.contains(&m) {
                *map.get(&i).ok_or_else(|| PipelineError::Internal("a part's nodes out of order".into()))?
            } else {
                get(acc, &mut g, &mut map, home, stage, i)?
            });
        }
        let types = node.results.iter().map(|&r| acc.ty(r).clone()).collect();
        let (_, rs) = g.add_node(node.op.clone(), &inputs, types, node.scope.as_deref()).map_err(internal)?;
        for (&r, x) in node.results.iter().zip(rs) {
            map.insert(r, x);
        }
    }
    // The program's outputs of the accumulate program's, then what other programs read.
    for (out, v) in acc.outputs() {
        if member_set.contains(&acc.producer(*v)) {
            g.add_output(out.clone(), map[v]).map_err(internal)?;
        }
    }
    let mut sent: HashSet<String> = HashSet::new();
    for &n in members {
        for &r in &acc.node(n).results {
            for u in acc.users(r) {
                let Home::Part(to, _) = home[&u] else { continue };
                if home[&u] == part {
                    continue;
                }
                let name = transfer_name(r, stage, phase, to);
                if sent.insert(name.clone()) {
                    g.add_output(name, map[&r]).map_err(internal)?;
                }
            }
        }
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_names_parse_back() {
        let v = ValueId::new(42);
        assert_eq!(transfer_name(v, 1, Phase::Forward, 1), "pp.saved.42");
        let name = transfer_name(v, 1, Phase::Backward, 0);
        assert_eq!(name, "pp.x.b.1.0.42");
        assert_eq!(parse_sent(&name), Some((Phase::Backward, 1, 0)));
        assert_eq!(parse_sent("pp.saved.42"), None);
    }
}
