//! Modules: the named programs of one model over its parameters and its persistent, typed state.
//!
//! A [`Module`] is what kiln compiles for a model. It declares parameters, states and programs; each
//! program is a [`Graph`] with a name and a [`ProgramKind`] (a stateless forward pass, the prefill and
//! the decode step of generation, scoring, or one step of training). The KV cache of generation is one
//! kind of state; the weights, optimizer moments and counters that training updates are others, so a
//! new use of state is a new [`StateRole`], not a new special case in every later stage.
//!
//! Parameters are read-only weights shared by all programs of the module. A program reads one through
//! a `param` node whose name is the parameter's, and a runtime binds it from a checkpoint by that
//! name: Hugging Face's tensor names are the contract, so they are kept exactly. A weight that a
//! program updates is not a parameter but a state of role `trainable`.
//!
//! A state is memory that the module owns. It keeps its value from one run of any program to the
//! next, and it is shared by all programs of the module: what the prefill writes into a KV cache is
//! what the next decode step reads. A program reads a state through a graph `input` whose name is the
//! state's name. An output whose name is a state's name updates that state in place: the output
//! aliases the state's storage, and a runtime never copies it to the caller. A program that reads a
//! state without writing it leaves it unchanged. Any other input is a caller input, passed by whoever
//! runs the program (token ids, positions, a learning rate); any other output is returned to the
//! caller.
//!
//! [`verify_module`] checks these invariants, reporting the first one broken (declarations first,
//! then each program in order):
//!
//! 1. Program names are non-empty and unique.
//! 2. Parameter names are unique, state names are unique, and no name is both a parameter and a state.
//! 3. A declared parameter's type has only constant dimensions (a checkpoint tensor has one shape).
//! 4. A state's type may use the symbolic sizes `B` and `S` but not `T`: a state outlives the new
//!    tokens of one run, so its size cannot depend on them.
//! 5. Every program's graph passes [`crate::verify::verify`].
//! 6. Every `param` node of a program names a declared parameter and has exactly its type.
//! 7. Every input of a program named like a state has exactly the state's type.
//! 8. Every output of a program named like a state has exactly the state's type (it is written into the
//!    state's storage).
//!
//! Deliberately not invariants: a program need not read or write any state, a state may be written by
//! a program that never reads it (it is overwritten), and a declared parameter may go unused by every
//! program (a later pass may have removed its last reader).

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::fmt;

use crate::graph::Graph;
use crate::op::Op;
use crate::types::{Sym, TensorType};
use crate::verify::{verify, VerifyError};

#[cfg(test)]
mod tests;

/// What a state is for. The role tells a runtime how to initialise the state and a compiler what it
/// may assume about it; the in-place semantics are the same for every role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StateRole {
    /// Attention keys and values of the tokens seen so far (`kv_cache`).
    KvCache,
    /// A weight that training updates (`trainable`).
    Trainable,
    /// An optimizer's running moment of a trainable weight, such as Adam's `exp_avg` (`optimizer_moment`).
    OptimizerMoment,
    /// The full-precision copy of a weight that is trained in a narrower type (`master_weight`).
    MasterWeight,
    /// Gradients summed over micro-batches before an optimizer step (`gradient_accumulator`).
    GradientAccumulator,
    /// Step counters and random-number-generator state (`counter`).
    Counter,
    /// A MoE router's selection bias, which the auxiliary-loss-free balancing rule moves after
    /// each step (`routing_bias`): state, not a trained weight (DeepSeek-V3 §2.1.2).
    RoutingBias,
}

impl StateRole {
    pub const ALL: [StateRole; 7] = [
        StateRole::KvCache,
        StateRole::Trainable,
        StateRole::OptimizerMoment,
        StateRole::MasterWeight,
        StateRole::GradientAccumulator,
        StateRole::Counter,
        StateRole::RoutingBias,
    ];

    /// The spelling in the text IR (`state "kv_cache.0" : ... {role = kv_cache}`).
    pub fn name(self) -> &'static str {
        match self {
            StateRole::KvCache => "kv_cache",
            StateRole::Trainable => "trainable",
            StateRole::OptimizerMoment => "optimizer_moment",
            StateRole::MasterWeight => "master_weight",
            StateRole::GradientAccumulator => "gradient_accumulator",
            StateRole::Counter => "counter",
            StateRole::RoutingBias => "routing_bias",
        }
    }

    pub fn from_name(s: &str) -> Option<StateRole> {
        StateRole::ALL.into_iter().find(|r| r.name() == s)
    }
}

impl fmt::Display for StateRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The communication group of data-parallel replicas, which a data-parallel train step's
/// `all_reduce` ops sum over.
pub const DP_GROUP: &str = "dp";

/// The communication group of a pipeline's ranks, over which a pipeline stage's optimizer step sums
/// the squared gradients of the global norm and the loss.
pub const PP_GROUP: &str = "pp";

/// The caller input of a data-parallel train step whose optimizer states are split over the
/// replicas (ZeRO-1): this replica's rank, i32 `[1]`.
pub const DP_RANK: &str = "dp.rank";

/// The communication group of the processes that hold the same routed experts in an
/// expert-parallel run (one per data-parallel replica of the expert-parallel group).
pub const EDP_GROUP: &str = "edp";

/// The caller input of an expert-parallel train step whose routed experts' AdamW states are split
/// over [`EDP_GROUP`] (ZeRO-1): this process's rank in it, i32 `[1]`.
pub const EDP_RANK: &str = "edp.rank";

/// Where a routed expert's id is in a tensor name (`….experts.{e}.…`, the first such mark: a
/// parameter or one of its optimizer states): its byte range and value. Under expert parallelism
/// these are the tensors a rank holds its own share of, and whose ZeRO-1 shards go over
/// [`EDP_GROUP`].
pub fn expert_mark(name: &str) -> Option<(std::ops::Range<usize>, u64)> {
    const MARK: &str = ".experts.";
    let at = name.find(MARK)? + MARK.len();
    let digits = name[at..].bytes().take_while(u8::is_ascii_digit).count();
    let e = name[at..at + digits].parse::<u64>().ok().filter(|_| digits > 0)?;
    Some((at..at + digits, e))
}

/// The caller input of an `accumulate` program: 0 on a step's first micro-batch, so that it starts
/// the accumulators' sums, 1 after.
pub const ACCUMULATE_KEEP: &str = "accumulate.keep";
/// The caller input of a train step whose next-token loss weighs each target: f32 `[B, T]`.
pub const LOSS_WEIGHTS: &str = "loss_weights";
/// The caller input of a split step's `train_step` program: how many micro-batches the step's batch
/// was split into (`f32[]`).
pub const MICRO_BATCHES: &str = "micro_batches";

/// The prefix of a master-weight state: `master.{parameter}` is the f32 copy of a trained
/// parameter stored in a narrower dtype, initialised from it.
pub const MASTER_PREFIX: &str = "master.";

/// What a program computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProgramKind {
    /// The stateless forward pass over a whole sequence (`forward`).
    Forward,
    /// The first step of generation: the prompt's tokens, written into the KV cache (`prefill`).
    Prefill,
    /// A later step of generation: new tokens attending to the KV cache (`decode`).
    Decode,
    /// Log-probabilities of given tokens, as for evaluation (`score`).
    Score,
    /// One step of training: forward, backward and the optimizer's update of the state (`train_step`).
    TrainStep,
    /// One micro-batch of a training step whose batch is split: forward and backward, with the
    /// gradients, the loss and the expert loads added into accumulator states that the step's last
    /// micro-batch (`train_step`) reads (`accumulate`).
    Accumulate,
    /// The MTP module's draft of the next token in speculative decoding, over a KV cache of its own
    /// layer, reading the main model's hidden states (`draft`).
    Draft,
}

impl ProgramKind {
    pub const ALL: [ProgramKind; 7] = [
        ProgramKind::Forward,
        ProgramKind::Prefill,
        ProgramKind::Decode,
        ProgramKind::Score,
        ProgramKind::TrainStep,
        ProgramKind::Accumulate,
        ProgramKind::Draft,
    ];

    /// The spelling in the text IR (`program "decode" {kind = decode} graph @...`).
    pub fn name(self) -> &'static str {
        match self {
            ProgramKind::Forward => "forward",
            ProgramKind::Prefill => "prefill",
            ProgramKind::Decode => "decode",
            ProgramKind::Score => "score",
            ProgramKind::TrainStep => "train_step",
            ProgramKind::Accumulate => "accumulate",
            ProgramKind::Draft => "draft",
        }
    }

    pub fn from_name(s: &str) -> Option<ProgramKind> {
        ProgramKind::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl fmt::Display for ProgramKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A state of the module: memory it owns and keeps between runs (see the module documentation).
#[derive(Clone, Debug, PartialEq)]
pub struct StateDecl {
    pub name: String,
    pub ty: TensorType,
    pub role: StateRole,
}

/// A read-only weight, bound from a checkpoint by its (Hugging Face) name.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamDecl {
    pub name: String,
    pub ty: TensorType,
}

/// A named graph of the module.
#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    pub name: String,
    pub kind: ProgramKind,
    pub graph: Graph,
}

/// Programs over shared parameters and state. See the module documentation.
#[derive(Clone, Debug, PartialEq)]
pub struct Module {
    pub name: String,
    pub params: Vec<ParamDecl>,
    pub states: Vec<StateDecl>,
    pub programs: Vec<Program>,
}

/// A broken module invariant (see the module documentation), with the program and the name it is
/// about.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModuleError {
    #[error("program `{program}` does not verify: {error}")]
    Graph { program: String, error: VerifyError },
    #[error(
        "the program at index {index} has an empty name: name it after what it computes, such as `decode`"
    )]
    EmptyProgramName { index: usize },
    #[error("program `{0}` is declared twice: program names must be unique")]
    DuplicateProgram(String),
    #[error("parameter `{0}` is declared twice: parameter names must be unique")]
    DuplicateParam(String),
    #[error("state `{0}` is declared twice: state names must be unique")]
    DuplicateState(String),
    #[error(
        "`{0}` is declared both as a parameter and as a state: a name is one or the other \
         (a weight that a program updates is a `trainable` state)"
    )]
    ParamIsState(String),
    #[error(
        "parameter `{name}` has type {ty}: a parameter is bound from a checkpoint, so its dimensions \
         are constants"
    )]
    SymbolicParam { name: String, ty: TensorType },
    #[error(
        "state `{name}` has type {ty}, which uses T: a state outlives the new tokens of a run, so its \
         dimensions are constants, B and S"
    )]
    StateUsesT { name: String, ty: TensorType },
    #[error(
        "program `{program}` reads parameter `{name}`, which the module does not declare: declare it \
         as `param {name:?} : {ty}`"
    )]
    UndeclaredParam { program: String, name: String, ty: TensorType },
    #[error(
        "program `{program}` reads parameter `{name}` as {found}, but the module declares it as \
         {declared}: a `param` node has exactly its parameter's type"
    )]
    ParamType { program: String, name: String, declared: TensorType, found: TensorType },
    #[error(
        "program `{program}` reads state `{name}` as {found}, but the state is {declared}: an input \
         named like a state has exactly the state's type"
    )]
    StateInputType { program: String, name: String, declared: TensorType, found: TensorType },
    #[error(
        "program `{program}` writes state `{name}` as {found}, but the state is {declared}: an output \
         named like a state updates it in place, so it has exactly the state's type"
    )]
    StateOutputType { program: String, name: String, declared: TensorType, found: TensorType },
}

impl Module {
    pub fn new(name: impl Into<String>) -> Module {
        Module { name: name.into(), params: Vec::new(), states: Vec::new(), programs: Vec::new() }
    }

    pub fn program(&self, name: &str) -> Option<&Program> {
        self.programs.iter().find(|p| p.name == name)
    }

    pub fn program_mut(&mut self, name: &str) -> Option<&mut Program> {
        self.programs.iter_mut().find(|p| p.name == name)
    }

    pub fn param(&self, name: &str) -> Option<&ParamDecl> {
        self.params.iter().find(|p| p.name == name)
    }

    pub fn state(&self, name: &str) -> Option<&StateDecl> {
        self.states.iter().find(|s| s.name == name)
    }

    /// Declares every `param` node of every program that is not declared yet, with its name and type,
    /// in the order the programs first read them. A builder builds the programs and then calls this.
    ///
    /// Fails, leaving the module unchanged, when a program reads a parameter with another type than
    /// its declaration (or than an earlier program), or reads a state's name as a parameter.
    pub fn declare_params_from_programs(&mut self) -> Result<(), ModuleError> {
        // Indexed by name: DeepSeek-V3 has tens of thousands of parameters.
        let mut known: HashMap<&str, &TensorType> =
            self.params.iter().map(|p| (p.name.as_str(), &p.ty)).collect();
        let states: HashSet<&str> = self.states.iter().map(|s| s.name.as_str()).collect();
        let mut new = Vec::new();
        for program in &self.programs {
            for (name, ty) in program.graph.params() {
                if states.contains(name) {
                    return Err(ModuleError::ParamIsState(name.to_string()));
                }
                match known.get(name) {
                    Some(&declared) if declared == ty => {}
                    Some(&declared) => {
                        return Err(ModuleError::ParamType {
                            program: program.name.clone(),
                            name: name.to_string(),
                            declared: declared.clone(),
                            found: ty.clone(),
                        })
                    }
                    None => {
                        known.insert(name, ty);
                        new.push(ParamDecl { name: name.to_string(), ty: ty.clone() });
                    }
                }
            }
        }
        self.params.extend(new);
        Ok(())
    }

    /// The states `program` reads (its inputs named like a state), in declaration order.
    pub fn reads(&self, program: &Program) -> Vec<&StateDecl> {
        let inputs: HashSet<&str> = program.graph.inputs().into_iter().map(|(name, _)| name).collect();
        self.states.iter().filter(|s| inputs.contains(s.name.as_str())).collect()
    }

    /// The states `program` updates in place (its outputs named like a state), in declaration order.
    pub fn writes(&self, program: &Program) -> Vec<&StateDecl> {
        let outputs: HashSet<&str> = program.graph.outputs().iter().map(|(name, _)| name.as_str()).collect();
        self.states.iter().filter(|s| outputs.contains(s.name.as_str())).collect()
    }
}

/// Checks every invariant listed in the module documentation and returns the first one broken.
pub fn verify_module(m: &Module) -> Result<(), ModuleError> {
    check_module(m, Graphs::Verify)
}

/// [`verify_module`] but for invariant 5, for a caller that has verified every program's graph
/// itself (the compiler verifies the programs after every pass, and at once): the other
/// invariants, in the same order.
pub fn verify_declarations(m: &Module) -> Result<(), ModuleError> {
    check_module(m, Graphs::Verified)
}

/// Whether [`check_module`] verifies each program's graph (invariant 5), or its caller has.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Graphs {
    Verify,
    Verified,
}

fn check_module(m: &Module, graphs: Graphs) -> Result<(), ModuleError> {
    let mut programs = HashSet::default();
    for (index, p) in m.programs.iter().enumerate() {
        if p.name.is_empty() {
            return Err(ModuleError::EmptyProgramName { index });
        }
        if !programs.insert(p.name.as_str()) {
            return Err(ModuleError::DuplicateProgram(p.name.clone()));
        }
    }
    let mut params: HashMap<&str, &TensorType> = HashMap::default();
    for p in &m.params {
        if params.insert(&p.name, &p.ty).is_some() {
            return Err(ModuleError::DuplicateParam(p.name.clone()));
        }
        if p.ty.shape.iter().any(|d| d.is_symbolic()) {
            return Err(ModuleError::SymbolicParam { name: p.name.clone(), ty: p.ty.clone() });
        }
    }
    let mut states: HashMap<&str, &TensorType> = HashMap::default();
    for s in &m.states {
        if states.insert(&s.name, &s.ty).is_some() {
            return Err(ModuleError::DuplicateState(s.name.clone()));
        }
        if params.contains_key(s.name.as_str()) {
            return Err(ModuleError::ParamIsState(s.name.clone()));
        }
        if s.ty.shape.iter().any(|d| d.uses(Sym::T)) {
            return Err(ModuleError::StateUsesT { name: s.name.clone(), ty: s.ty.clone() });
        }
    }
    for p in &m.programs {
        verify_program(p, &params, &states, graphs)?;
    }
    Ok(())
}

/// Invariants 5 to 8 for one program, given the module's declarations by name.
fn verify_program(
    p: &Program,
    params: &HashMap<&str, &TensorType>,
    states: &HashMap<&str, &TensorType>,
    graphs: Graphs,
) -> Result<(), ModuleError> {
    let g = &p.graph;
    if graphs == Graphs::Verify {
        verify(g).map_err(|error| ModuleError::Graph { program: p.name.clone(), error })?;
    }
    let program = || p.name.clone();
    for n in g.nodes() {
        let node = g.node(n);
        match &node.op {
            Op::Param { name } => {
                // The graph verifier has checked that a `param` defines exactly one value.
                let found = g.ty(node.results[0]);
                match params.get(name.as_str()) {
                    None => {
                        let ty = found.clone();
                        return Err(ModuleError::UndeclaredParam {
                            program: program(),
                            name: name.clone(),
                            ty,
                        });
                    }
                    Some(&declared) if declared != found => {
                        return Err(ModuleError::ParamType {
                            program: program(),
                            name: name.clone(),
                            declared: declared.clone(),
                            found: found.clone(),
                        });
                    }
                    Some(_) => {}
                }
            }
            Op::Input { name } => {
                let found = g.ty(node.results[0]);
                // An input that is not named like a state is a caller input, which may have any type.
                if let Some(&declared) = states.get(name.as_str()).filter(|&&d| d != found) {
                    return Err(ModuleError::StateInputType {
                        program: program(),
                        name: name.clone(),
                        declared: declared.clone(),
                        found: found.clone(),
                    });
                }
            }
            _ => {}
        }
    }
    for (name, v) in g.outputs() {
        if let Some(&declared) = states.get(name.as_str()) {
            if declared != g.ty(*v) {
                return Err(ModuleError::StateOutputType {
                    program: program(),
                    name: name.clone(),
                    declared: declared.clone(),
                    found: g.ty(*v).clone(),
                });
            }
        }
    }
    Ok(())
}
