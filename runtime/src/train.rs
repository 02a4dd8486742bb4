//! Training on the reference interpreter: a train-step program (`kiln_compiler::train::train_step`,
//! a graph whose trained parameters, optimizer moments and step count are states) run step after
//! step with its states kept here, the way the executor keeps a compiled program's states.
//!
//! [`Trainer::new`] binds the program's frozen parameters and initialises its states: a trainable
//! state from the parameter of its name, every other state (moments, the step count) zeroed.
//! [`Trainer::step`] feeds one batch of token rows (inputs `row[..T]` at positions `0..T`,
//! targets `row[1..]`) and the learning rate, runs the program, and takes every state output as the
//! state of the next step. It is the oracle the compiled train step is checked against, exact and
//! slow.

use std::collections::HashMap;

use kiln_ir::artifact::{ArgRole, BufferId, Manifest, Program, Step, Storage};
use kiln_ir::interp::{self, Tensor};
use kiln_ir::module::{ProgramKind, StateDecl, StateRole};
use kiln_ir::module::{
    ACCUMULATE_KEEP as KEEP, EDP_GROUP, EDP_RANK, LOSS_WEIGHTS, MASTER_PREFIX, MICRO_BATCHES,
};
use kiln_ir::{DType, Graph, SymBindings, ValueId};

use crate::data::TokenRows;
use crate::exec::{Backend, Executor, NonFinite};
use crate::reference::to_tensor;
use crate::weights::{HostData, HostTensor, TensorHead};
use crate::RuntimeError;

/// What one step reports.
#[derive(Clone, Debug, PartialEq)]
pub struct StepStats {
    pub loss: f32,
    /// The global gradient norm before clipping.
    pub grad_norm: f32,
    /// Tokens each expert of each MoE layer received in the step, by layer (`load.{scope}`
    /// outputs), in the program's output order.
    pub loads: Vec<(String, Vec<f32>)>,
    /// The busiest expert's load over the mean load, worst over the layers.
    pub max_load: Option<f32>,
    /// Each layer's gradient norm before clipping (`grad_norm.{layer}` outputs), by layer name;
    /// empty for a program compiled before they were added.
    pub grad_norms: Vec<(String, f32)>,
}

/// A step that waited for a verdict before changing the model ([`Steps::step_gated`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Gated {
    /// What the step reports. A step stopped at its gate reports the outputs made by then: the
    /// loss, the gradient norm, and those of the others computed before it (the experts' loads).
    pub stats: StepStats,
    /// Whether the update was applied. When not, every state is as it was before the step but
    /// the gradient accumulators, which hold zeros.
    pub applied: bool,
    /// With `check`: the first op (in run order) whose results were not all finite, among those
    /// that ran.
    pub found: Option<NonFinite>,
}

/// The verdict on a step from its loss and global gradient norm (before clipping): true applies
/// its update.
pub type Verdict<'a> = &'a mut dyn FnMut(f32, f32) -> bool;

/// Where a compiled train-step program can stop before it changes the model: the training
/// monitor's gate. A step's loss and global gradient norm are known before AdamW writes any
/// weight or moment (clipping needs the norm, and the norm needs every gradient), so a step the
/// monitor rejects (non-finite, or a spike under `--on-anomaly skip-batch`) can be stopped there
/// and leave the model as it was, where otherwise every state would have to be copied before
/// each step to undo it.
///
/// What a program writes before its gate besides gradient accumulators (which a rejected step
/// zeroes) must be small: the step count, which its scalar kernels may advance early, and the
/// routers' biases, which the balancing rule moves from the forward pass's loads. Those are
/// copied before the step and put back when it stops. A program that writes a trained weight, a
/// moment or a master weight before its gate has none ([`Gate::find`] gives `None`), and its
/// steps are undone from a copy as before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gate {
    /// The step (an index into the program's steps) after which `loss` and `grad_norm` are made.
    pub after: usize,
    /// The states written up to it (but accumulators), to copy before a step and put back when it
    /// stops.
    pub undo: Vec<String>,
    /// The caller outputs made up to it, readable when a step stops there.
    pub ready: Vec<String>,
}

impl Gate {
    /// The gate of program `program` of `manifest`, if it has one: it must output `loss` and
    /// `grad_norm`, and write no state but accumulators, counters and routers' biases before both
    /// are made.
    pub fn find(manifest: &Manifest, program: &Program) -> Option<Gate> {
        let output = |name: &str| program.outputs.iter().find(|o| o.name == name).map(|o| o.buffer);
        let (loss, norm) = (output("loss")?, output("grad_norm")?);
        // The buffers each step makes: those it writes, and a reshape's (an alias of its source,
        // which writes nothing).
        let made = |step: &Step| -> Vec<BufferId> {
            match step {
                Step::Alias { buffer, .. } => vec![*buffer],
                _ => written_by(manifest, step),
            }
        };
        let after = (program.steps.iter().enumerate())
            .filter(|(_, s)| made(s).iter().any(|&b| b == loss || b == norm))
            .map(|(i, _)| i)
            .collect::<Vec<_>>();
        // Both must be made: the last of the two.
        let both = [loss, norm].iter().all(|b| program.steps.iter().any(|s| made(s).contains(b)));
        let after = *after.last().filter(|_| both)?;
        let (mut undo, mut ready) = (Vec::new(), Vec::new());
        for step in &program.steps[..=after] {
            for b in made(step) {
                if let Storage::State { name } = &program.buffer(b).storage {
                    if matches!(step, Step::Alias { .. }) {
                        continue;
                    }
                    match manifest.state(name)?.role {
                        StateRole::GradientAccumulator => {}
                        StateRole::Counter | StateRole::RoutingBias => {
                            if !undo.contains(name) {
                                undo.push(name.clone());
                            }
                        }
                        _ => return None,
                    }
                    continue;
                }
                for o in program.outputs.iter().filter(|o| o.buffer == b) {
                    if !ready.contains(&o.name) {
                        ready.push(o.name.clone());
                    }
                }
            }
        }
        Some(Gate { after, undo, ready })
    }
}

/// The buffers step `step` of a program of `manifest` writes: a launch's results, a message's
/// or a collective's destination.
fn written_by(manifest: &Manifest, step: &Step) -> Vec<BufferId> {
    match step {
        Step::Launch { kernel, buffers, .. } => {
            let args = manifest.kernels.get(kernel.0 as usize).map(|k| k.args.as_slice()).unwrap_or(&[]);
            (buffers.iter().zip(args)).filter(|(_, a)| a.role == ArgRole::Output).map(|(b, _)| *b).collect()
        }
        Step::Alias { .. } | Step::Send { .. } => Vec::new(),
        Step::Recv { buffer, .. }
        | Step::AllReduce { buffer, .. }
        | Step::AllGather { buffer, .. }
        | Step::AllToAll { buffer, .. } => vec![*buffer],
    }
}

impl Gate {
    /// Empty buffers for the states [`Gate::run`] copies and puts back, to reuse from step to step.
    pub fn undo_buffers(&self) -> Undo {
        self.undo.iter().map(|n| (n.clone(), Vec::new())).collect()
    }

    /// Runs `program` (the one this gate was found in) on `exec` with `feeds`, asking `go` at
    /// the gate with the loss and gradient norm ([`Executor::run_gated`]; with `check`,
    /// [`Executor::run_gated_checked`]). When `go` says no, the states in [`Gate::undo`] are put
    /// back from their copies in `undo` and the gradient accumulators are zeroed: nothing the
    /// step did remains. Returns whether it went on, and with `check` the first non-finite launch.
    pub fn run<B: Backend>(
        &self,
        undo: &mut Undo,
        exec: &mut Executor<B>,
        program: &str,
        feeds: &[HostTensor],
        check: bool,
        go: Verdict,
    ) -> Result<(bool, Option<NonFinite>), RuntimeError> {
        for (name, bytes) in undo.iter_mut() {
            exec.copy_state(name, bytes)?;
        }
        let mut ask = |ex: &Executor<B>| -> Result<bool, RuntimeError> {
            let first = |name: &str| ex.output_f32(name, 0..1).map(|v| v[0]);
            Ok(go(first("loss")?, first("grad_norm")?))
        };
        let (applied, found) = match check {
            true => exec.run_gated_checked(program, feeds, self.after, &mut ask)?,
            false => (exec.run_gated(program, feeds, self.after, &mut ask)?, None),
        };
        if !applied {
            for (name, bytes) in undo.iter() {
                exec.restore_state(name, bytes)?;
            }
            exec.zero_accumulators()?;
        }
        Ok((applied, found))
    }

    /// Whether output `name` is readable after a step that stopped at this gate: `loss`,
    /// `grad_norm`, or another made before it.
    pub fn made(&self, name: &str) -> bool {
        self.ready.iter().any(|r| r == name)
    }
}

/// The bytes of the states a [`Gate`] puts back, by name ([`Gate::undo_buffers`]).
pub type Undo = Vec<(String, Vec<u8>)>;

/// A train-step program on the interpreter with its states; see the module documentation.
pub struct Trainer {
    graph: Graph,
    /// The `accumulate` program of a step split into micro-batches.
    accumulate: Option<Graph>,
    micro_batches: usize,
    states: Vec<StateDecl>,
    values: HashMap<String, Tensor>,
    params: HashMap<String, Tensor>,
}

impl Trainer {
    /// `params`: every parameter of the model by name (trained ones initialise their state, the
    /// others stay parameters of the program).
    pub fn new(
        graph: Graph,
        states: Vec<StateDecl>,
        params: Vec<HostTensor>,
    ) -> Result<Trainer, RuntimeError> {
        let mut given: HashMap<String, Tensor> = HashMap::new();
        for p in params {
            given.insert(p.name.clone(), to_tensor(p)?);
        }
        let mut values = HashMap::new();
        for s in states.iter().filter(|s| s.role != StateRole::MasterWeight) {
            let from_weights = matches!(s.role, StateRole::Trainable | StateRole::RoutingBias);
            let v = match (from_weights, given.remove(&s.name)) {
                (true, Some(t)) => t,
                (true, None) => {
                    return Err(RuntimeError::MissingParam { name: s.name.clone(), count: states.len() })
                }
                _ => {
                    let none = SymBindings { b: 1, t: 1, s: 1 };
                    let shape: Option<Vec<u64>> = s.ty.shape.iter().map(|d| d.eval(&none)).collect();
                    let shape = shape
                        .ok_or_else(|| RuntimeError::BadOption(format!("state `{}` is not sized", s.name)))?;
                    let n = shape.iter().product::<u64>() as usize;
                    Tensor::from_f32(s.ty.dtype, shape, vec![0.0; n]).map_err(|e| {
                        RuntimeError::InputValue { name: s.name.clone(), reason: e.to_string() }
                    })?
                }
            };
            values.insert(s.name.clone(), v);
        }
        // A master weight starts as its (narrower) weight, in f32.
        for s in states.iter().filter(|s| s.role == StateRole::MasterWeight) {
            let of = s.name.strip_prefix(MASTER_PREFIX).and_then(|w| values.get(w));
            let Some(w) = of.and_then(|w| Some((w.as_f32()?.to_vec(), w.shape().to_vec()))) else {
                return Err(RuntimeError::BadOption(format!(
                    "master weight `{}` has no weight state",
                    s.name
                )));
            };
            let t = Tensor::from_f32(DType::F32, w.1, w.0)
                .map_err(|e| RuntimeError::InputValue { name: s.name.clone(), reason: e.to_string() })?;
            values.insert(s.name.clone(), t);
        }
        let declared: Vec<String> = graph.params().into_iter().map(|(n, _)| n.to_string()).collect();
        let params = given.into_iter().filter(|(n, _)| declared.contains(n)).collect();
        Ok(Trainer { graph, accumulate: None, micro_batches: 1, states, values, params })
    }

    /// Splits every step's batch into `count` micro-batches of equal rows, run by the
    /// `accumulate` program `graph` (all but the last) and the train-step program (the last),
    /// which must be [`kiln_compiler::train::train_step_last`]'s.
    pub fn with_micro_batches(mut self, graph: Graph, count: usize) -> Trainer {
        self.accumulate = Some(graph);
        self.micro_batches = count.max(1);
        self
    }

    /// Runs `graph` on `extra` inputs besides the states, and keeps the state outputs. With
    /// `found`, every value is checked as it is computed, and the first that is not all finite
    /// (in node order) is put there if it is still empty.
    fn run(
        &mut self,
        which: Which,
        extra: Vec<HostTensor>,
        found: Option<&mut Option<NonFinite>>,
    ) -> Result<std::collections::BTreeMap<String, Tensor>, RuntimeError> {
        Ok(self.run_gated(which, extra, found, None)?.0)
    }

    /// [`Trainer::run`], asking `go` (when given) with the loss and gradient norm before the
    /// state outputs are kept: when it says no, none is (and the accumulators are zeroed).
    /// Returns the outputs and whether the states were kept.
    fn run_gated(
        &mut self,
        which: Which,
        extra: Vec<HostTensor>,
        found: Option<&mut Option<NonFinite>>,
        go: Option<Verdict>,
    ) -> Result<(std::collections::BTreeMap<String, Tensor>, bool), RuntimeError> {
        let graph = match which {
            Which::Step => &self.graph,
            Which::Accumulate => self.accumulate.as_ref().expect("split steps have the program"),
        };
        // The program's own states (an accumulate program reads no moments, say).
        let inputs = inputs_of(graph);
        let mut feeds: HashMap<String, Tensor> = (self.values.iter())
            .filter(|(n, _)| inputs.contains(n))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        for t in extra.into_iter().filter(|t| inputs.contains(&t.name)) {
            feeds.insert(t.name.clone(), to_tensor(t)?);
        }
        let out = match found {
            None => interp::run(graph, &feeds, &self.params)?,
            Some(slot) => {
                let program = match which {
                    Which::Step => "train_step",
                    Which::Accumulate => "accumulate",
                };
                let mut observe = |v: ValueId, t: &Tensor| {
                    let Some(x) = t.as_f32().filter(|_| slot.is_none()) else { return };
                    let count = x.iter().filter(|x| !x.is_finite()).count();
                    if count > 0 {
                        let node = graph.node(graph.producer(v));
                        let op = match &node.op {
                            kiln_ir::Op::Input { name } => format!("{v} = input `{name}`"),
                            kiln_ir::Op::Param { name } => format!("{v} = param `{name}`"),
                            op => format!("{v} = {}", op.name()),
                        };
                        let (scope, value) = (node.scope.clone(), v.to_string());
                        *slot = Some(NonFinite { program: program.into(), op, scope, value, count });
                    }
                };
                interp::run_with(graph, &feeds, &self.params, &mut observe)?
            }
        };
        if let Some(go) = go {
            let first = |name: &str| {
                out.get(name).and_then(|t| t.as_f32()).and_then(|v| v.first().copied()).unwrap_or(f32::NAN)
            };
            if !go(first("loss"), first("grad_norm")) {
                self.clear_accumulators()?;
                return Ok((out, false));
            }
        }
        for s in &self.states {
            if let Some(v) = out.get(&s.name) {
                self.values.insert(s.name.clone(), v.clone());
            }
        }
        Ok((out, true))
    }

    /// One step on `rows` (all of them, as one batch) at learning rate `lr`.
    pub fn step(&mut self, rows: &TokenRows, lr: f32) -> Result<StepStats, RuntimeError> {
        self.step_watched(rows, lr, None)
    }

    /// [`Trainer::step`], checking every value as the interpreter computes it: also returns the
    /// first op (in program order) whose result was not all finite.
    pub fn step_checked(
        &mut self,
        rows: &TokenRows,
        lr: f32,
    ) -> Result<(StepStats, Option<NonFinite>), RuntimeError> {
        let mut found = None;
        let stats = self.step_watched(rows, lr, Some(&mut found))?;
        Ok((stats, found))
    }

    fn step_watched(
        &mut self,
        rows: &TokenRows,
        lr: f32,
        found: Option<&mut Option<NonFinite>>,
    ) -> Result<StepStats, RuntimeError> {
        Ok(self.step_gated_watched(rows, lr, found, None)?.0)
    }

    /// [`Trainer::step`], asking `go` before the states are kept ([`Steps::step_gated`]).
    pub fn step_gated(
        &mut self,
        rows: &TokenRows,
        lr: f32,
        check: bool,
        go: Verdict,
    ) -> Result<Gated, RuntimeError> {
        let mut found = None;
        let (stats, applied) = self.step_gated_watched(rows, lr, check.then_some(&mut found), Some(go))?;
        Ok(Gated { stats, applied, found })
    }

    fn step_gated_watched(
        &mut self,
        rows: &TokenRows,
        lr: f32,
        mut found: Option<&mut Option<NonFinite>>,
        go: Option<Verdict>,
    ) -> Result<(StepStats, bool), RuntimeError> {
        let parts = split(rows, if self.accumulate.is_some() { self.micro_batches } else { 1 })?;
        let (last, earlier) = parts.split_last().expect("at least one part");
        if let Some(names) = self.accumulate.as_ref().map(inputs_of) {
            for (i, part) in earlier.iter().enumerate() {
                let mut feeds = step_inputs(&names, part, lr)?;
                feeds.push(scalar(KEEP, if i == 0 { 0.0 } else { 1.0 }));
                self.run(Which::Accumulate, feeds, found.as_deref_mut())?;
            }
        }
        let names: Vec<String> = self.graph.inputs().iter().map(|(n, _)| n.to_string()).collect();
        let mut feeds = step_inputs(&names, last, lr)?;
        if names.iter().any(|n| n == MICRO_BATCHES) {
            feeds.push(scalar(MICRO_BATCHES, parts.len() as f32));
        }
        // See `CompiledTrainer::step_watched`.
        if earlier.is_empty() && self.accumulate.is_some() {
            self.clear_accumulators()?;
        }
        let (out, applied) = self.run_gated(Which::Step, feeds, found, go)?;
        let outputs = out.iter().filter_map(|(k, v)| Some((k.as_str(), v.as_f32()?.to_vec())));
        Ok((stats(outputs), applied))
    }

    /// Zeros over every gradient accumulator ([`Steps::zero_accumulators`]).
    fn clear_accumulators(&mut self) -> Result<(), RuntimeError> {
        for s in self.states.iter().filter(|s| s.role == StateRole::GradientAccumulator) {
            let t = &self.values[&s.name];
            let zeros = Tensor::from_f32(t.dtype(), t.shape().to_vec(), vec![0.0; t.numel()])
                .map_err(|e| RuntimeError::BadOption(format!("accumulator `{}`: {e}", s.name)))?;
            self.values.insert(s.name.clone(), zeros);
        }
        Ok(())
    }

    /// The states a checkpoint keeps besides the model's weights (moments, the step count), by
    /// name; not the accumulators, which hold nothing between steps.
    pub fn states(&self) -> Vec<HostTensor> {
        let rest = self.states.iter().filter(|s| kept(s.role));
        rest.map(|s| host(&s.name, &self.values[&s.name])).collect()
    }

    /// Replaces state `name` (a resumed run's moments and step count); its type must not change.
    pub fn set_state(&mut self, name: &str, value: HostTensor) -> Result<(), RuntimeError> {
        let Some(old) = self.values.get(name) else {
            return Err(RuntimeError::UnknownParam { name: name.to_string() });
        };
        if old.dtype() != value.dtype || old.shape() != value.shape.as_slice() {
            return Err(RuntimeError::ParamType {
                name: name.to_string(),
                expected: crate::inputs::shape_text(old.dtype(), old.shape()),
                found: crate::inputs::shape_text(value.dtype, &value.shape),
            });
        }
        self.values.insert(name.to_string(), to_tensor(value)?);
        Ok(())
    }

    /// The current value of every trained parameter, of the routers' biases and of the frozen
    /// parameters, by name: the model's weights.
    pub fn weights(&self) -> Vec<HostTensor> {
        let trained = (self.states.iter())
            .filter(|s| matches!(s.role, StateRole::Trainable | StateRole::RoutingBias))
            .map(|s| (&s.name, &self.values[&s.name]));
        trained.chain(self.params.iter()).map(|(name, t)| host(name, t)).collect()
    }
}

fn inputs_of(g: &Graph) -> Vec<String> {
    g.inputs().iter().map(|(n, _)| n.to_string()).collect()
}

/// Which program of a trainer runs.
#[derive(Clone, Copy)]
enum Which {
    Step,
    Accumulate,
}

/// An update's rank inputs: the replica's rank (`dp.rank`), which picks its shard of split
/// optimizer states (ZeRO-1), and under expert parallelism its rank among the processes holding
/// the same experts (`edp.rank`), which picks its shard of theirs; 0 without the group.
pub fn rank_inputs(comm: Option<&dyn crate::comm::Communicator>) -> Vec<HostTensor> {
    [(kiln_ir::module::DP_RANK, kiln_ir::module::DP_GROUP), (EDP_RANK, EDP_GROUP)]
        .into_iter()
        .map(|(input, group)| HostTensor {
            name: input.into(),
            dtype: DType::I32,
            shape: vec![1],
            data: HostData::I64(vec![comm.and_then(|c| c.rank_in(group)).map_or(0, |r| r.0) as i64]),
        })
        .collect()
}

/// Whether a checkpoint keeps a state of `role` besides the weights: optimizer state, not the
/// weights (kept as the model) nor the accumulators (empty between steps).
pub fn kept(role: StateRole) -> bool {
    !matches!(role, StateRole::Trainable | StateRole::RoutingBias | StateRole::GradientAccumulator)
}

/// An f32 scalar input.
fn scalar(name: &str, v: f32) -> HostTensor {
    HostTensor { name: name.into(), dtype: DType::F32, shape: Vec::new(), data: HostData::F32(vec![v]) }
}

/// `rows` split into `count` micro-batches of equal rows, in order.
pub fn split(rows: &TokenRows, count: usize) -> Result<Vec<TokenRows>, RuntimeError> {
    let n = rows.rows();
    if count == 0 || n % count != 0 {
        return Err(RuntimeError::BadOption(format!(
            "a batch of {n} rows does not split into {count} micro-batches of equal rows"
        )));
    }
    if count == 1 {
        return Ok(vec![rows.clone()]);
    }
    let per = n / count;
    Ok((0..count).map(|c| rows.select(&(c * per..(c + 1) * per).collect::<Vec<_>>())).collect())
}

fn host(name: &str, t: &Tensor) -> HostTensor {
    let data = match (t.as_f32(), t.as_i64()) {
        (Some(v), _) => HostData::F32(v.to_vec()),
        (None, Some(v)) => HostData::I64(v.to_vec()),
        (None, None) => HostData::F32(Vec::new()),
    };
    HostTensor { name: name.to_string(), dtype: t.dtype(), shape: t.shape().to_vec(), data }
}

/// The caller inputs of a train step on `rows` (all of them, as one batch) at learning rate `lr`,
/// for a program whose inputs are `names`: `tokens` (`row[..T]`), `positions` (`0..T`), `targets`
/// (`row[1..]`), and for each MTP depth k the token k ahead as input, the token k + 1 ahead as
/// target where there is one, and the mask of the positions that have one.
pub fn step_inputs(names: &[String], rows: &TokenRows, lr: f32) -> Result<Vec<HostTensor>, RuntimeError> {
    if !lr.is_finite() {
        return Err(RuntimeError::BadOption(format!("the learning rate must be finite, not {lr}")));
    }
    let (n, t) = (rows.rows(), rows.width() - 1);
    let shape = vec![n as u64, t as u64];
    let ids = |name: String, f: &dyn Fn(&[i64]) -> Vec<i64>| HostTensor {
        name,
        dtype: DType::I32,
        shape: shape.clone(),
        data: HostData::I64((0..n).flat_map(|r| f(rows.row(r))).collect()),
    };
    let mut out = vec![
        ids("tokens".into(), &|r| r[..t].to_vec()),
        ids("targets".into(), &|r| r[1..].to_vec()),
        ids("positions".into(), &|_| (0..t as i64).collect()),
    ];
    // The MTP depths any of the program's inputs names: a pipeline's last stage reads module k's
    // targets and mask, and its tokens' rows come from the first stage, which looks them up.
    let mut depths = std::collections::BTreeSet::new();
    for name in names {
        let Some((family, k)) = name.rsplit_once('.') else { continue };
        if matches!(family, "mtp_tokens" | "mtp_targets" | "mtp_mask") {
            let k: usize = k.parse().map_err(|_| RuntimeError::UnknownModelInput(name.clone()))?;
            depths.insert(k);
        }
    }
    for k in depths {
        let at = |r: &[i64], i: usize| r.get(i).copied().unwrap_or(0);
        out.push(ids(format!("mtp_tokens.{k}"), &|r| (0..t).map(|i| at(r, i + k)).collect()));
        out.push(ids(format!("mtp_targets.{k}"), &|r| (0..t).map(|i| at(r, i + k + 1)).collect()));
        // With target weights, module k's target at position i is the main loss's target at i + k:
        // it weighs what that one weighs (an SFT mask covers the MTP losses too).
        let weight = |r: usize, i: usize| rows.weights().map_or(1.0, |w| w[r * t + i]);
        let mask = (0..n)
            .flat_map(|r| (0..t).map(move |i| if i + k < t { weight(r, i + k) } else { 0.0 }))
            .collect();
        out.push(HostTensor {
            name: format!("mtp_mask.{k}"),
            dtype: DType::F32,
            shape: shape.clone(),
            data: HostData::F32(mask),
        });
    }
    if names.iter().any(|n| n == LOSS_WEIGHTS) {
        let Some(w) = rows.weights() else {
            return Err(RuntimeError::BadOption(format!(
                "the train step weighs its loss by `{LOSS_WEIGHTS}`, and these rows carry no target weights"
            )));
        };
        out.push(HostTensor {
            name: LOSS_WEIGHTS.into(),
            dtype: DType::F32,
            shape: shape.clone(),
            data: HostData::F32(w.to_vec()),
        });
    } else if rows.weights().is_some() {
        return Err(RuntimeError::BadOption(format!(
            "the rows carry target weights, and the train step has no `{LOSS_WEIGHTS}` input: compile it              with token-weighted loss"
        )));
    }
    out.push(HostTensor {
        name: "lr".into(),
        dtype: DType::F32,
        shape: Vec::new(),
        data: HostData::F32(vec![lr]),
    });
    Ok(out)
}

/// A step's statistics from its float outputs by name (`loss`, `grad_norm`, `load.{scope}`).
pub fn stats<'a>(outputs: impl Iterator<Item = (&'a str, Vec<f32>)>) -> StepStats {
    let (mut loss, mut grad_norm, mut loads, mut grad_norms) = (f32::NAN, f32::NAN, Vec::new(), Vec::new());
    for (name, v) in outputs {
        match name {
            "loss" => loss = v.first().copied().unwrap_or(f32::NAN),
            "grad_norm" => grad_norm = v.first().copied().unwrap_or(f32::NAN),
            _ => {
                if let Some(scope) = name.strip_prefix("load.") {
                    loads.push((scope.to_string(), v));
                } else if let Some(layer) = name.strip_prefix(GRAD_NORM_PREFIX) {
                    grad_norms.push((layer.to_string(), v.first().copied().unwrap_or(f32::NAN)));
                }
            }
        }
    }
    loads.sort_by(|a, b| a.0.cmp(&b.0));
    grad_norms.sort_by_key(|a| layer_order(&a.0));
    let ratio = |l: &[f32]| {
        let mean = l.iter().sum::<f32>() / l.len().max(1) as f32;
        l.iter().copied().fold(0f32, f32::max) / mean.max(f32::MIN_POSITIVE)
    };
    let max_load = loads.iter().map(|(_, l)| ratio(l)).reduce(f32::max);
    StepStats { loss, grad_norm, loads, max_load, grad_norms }
}

/// The prefix of the per-layer gradient norm outputs (`kiln_compiler::train::GRAD_NORM_PREFIX`;
/// the runtime reads artifacts and does not depend on the compiler).
pub const GRAD_NORM_PREFIX: &str = "grad_norm.";

/// Layers in model order: the embedding, the decoder layers by number, then the head.
fn layer_order(layer: &str) -> (u8, u64, String) {
    match layer.strip_prefix("model.layers.").and_then(|n| n.parse().ok()) {
        Some(n) => (1, n, String::new()),
        None if layer.starts_with("model.embed") => (0, 0, layer.into()),
        None => (2, 0, layer.into()),
    }
}

/// A compiled train-step program (`kiln compile --train`) on a backend: the executor keeps the
/// weights, moments and step count as states, so a step moves only the batch in and the loss,
/// the gradient norm and the expert loads out. Same contract as [`Trainer`].
pub struct CompiledTrainer<B: Backend> {
    exec: Executor<B>,
    program: String,
    inputs: Vec<String>,
    /// The `accumulate` program and its inputs, when the artifact has one.
    accumulate: Option<(String, Vec<String>)>,
    micro_batches: usize,
    /// The train step's gate, if it has one, and the bytes of the states it puts back when a
    /// step stops there (reused from step to step).
    gate: Option<(Gate, Undo)>,
}

impl<B: Backend> CompiledTrainer<B> {
    /// Takes the executor of an artifact with a train-step program (its weights bound at load).
    pub fn new(exec: Executor<B>) -> Result<CompiledTrainer<B>, RuntimeError> {
        let program = (exec.programs().into_iter())
            .find(|(_, kind)| *kind == ProgramKind::TrainStep)
            .map(|(name, _)| name.to_string())
            .ok_or_else(|| {
                RuntimeError::BadOption(
                    "the artifact has no train-step program: compile it with `kiln compile --train`".into(),
                )
            })?;
        let inputs = exec.inputs(&program)?.into_iter().map(|(n, _)| n).collect();
        let accumulate =
            match (exec.programs().into_iter()).find(|(_, kind)| *kind == ProgramKind::Accumulate) {
                Some((name, _)) => {
                    let name = name.to_string();
                    let inputs = exec.inputs(&name)?.into_iter().map(|(n, _)| n).collect();
                    Some((name, inputs))
                }
                None => None,
            };
        let gate =
            (exec.manifest().program(&program)).and_then(|p| Gate::find(exec.manifest(), p)).map(|g| {
                let undo = g.undo_buffers();
                (g, undo)
            });
        Ok(CompiledTrainer { exec, program, inputs, accumulate, micro_batches: 1, gate })
    }

    /// Splits every step's batch into `count` micro-batches of equal rows (gradient
    /// accumulation); the artifact must have an `accumulate` program (`kiln compile --train
    /// --accumulate`).
    pub fn set_micro_batches(&mut self, count: usize) -> Result<(), RuntimeError> {
        if count > 1 && self.accumulate.is_none() {
            return Err(RuntimeError::BadOption(
                "the artifact has no accumulate program: compile it with `kiln compile --train --accumulate` \
                 to split batches into micro-batches"
                    .into(),
            ));
        }
        self.micro_batches = count.max(1);
        Ok(())
    }

    /// The largest batch and sequence (`B`, `T`) the program was loaded for.
    pub fn max_sizes(&self) -> Result<SymBindings, RuntimeError> {
        self.exec.program_max(&self.program)
    }

    /// One step on `rows` (all of them, as one batch) at learning rate `lr`.
    pub fn step(&mut self, rows: &TokenRows, lr: f32) -> Result<StepStats, RuntimeError> {
        let mut found = None;
        self.step_watched(rows, lr, false, &mut found)
    }

    /// [`CompiledTrainer::step`], checking every launch's results as it finishes: also returns
    /// the first launch (in run order) whose results were not all finite.
    pub fn step_checked(
        &mut self,
        rows: &TokenRows,
        lr: f32,
    ) -> Result<(StepStats, Option<NonFinite>), RuntimeError> {
        let mut found = None;
        let stats = self.step_watched(rows, lr, true, &mut found)?;
        Ok((stats, found))
    }

    /// From now on, every step writes NaN into the results of its first launch in scope `scope`
    /// (`None`: no more): see [`Executor::set_poison`]. With micro-batches, that launch is in the
    /// `accumulate` program, which runs first (and every micro-batch but the last).
    pub fn set_poison(&mut self, scope: Option<&str>) -> Result<(), RuntimeError> {
        let program = match &self.accumulate {
            Some((acc, _)) if self.micro_batches > 1 => acc.clone(),
            _ => self.program.clone(),
        };
        self.exec.set_poison(scope.map(|s| (program.as_str(), s)))
    }

    /// The train step's gate ([`Gate`]), if it has one.
    pub fn gate(&self) -> Option<&Gate> {
        self.gate.as_ref().map(|(g, _)| g)
    }

    /// [`CompiledTrainer::step`], asking `go` at the train step's gate ([`Steps::step_gated`]);
    /// an error when the program has none ([`CompiledTrainer::gate`]).
    pub fn step_gated(
        &mut self,
        rows: &TokenRows,
        lr: f32,
        check: bool,
        go: Verdict,
    ) -> Result<Gated, RuntimeError> {
        if self.gate.is_none() {
            return Err(RuntimeError::BadOption(format!(
                "program `{}` writes weights or moments before its loss and gradient norm are known: \
                 it has no gate to stop at",
                self.program
            )));
        }
        let mut found = None;
        let (stats, applied) = self.step_gated_watched(rows, lr, check, &mut found, Some(go))?;
        Ok(Gated { stats, applied, found })
    }

    fn step_watched(
        &mut self,
        rows: &TokenRows,
        lr: f32,
        check: bool,
        found: &mut Option<NonFinite>,
    ) -> Result<StepStats, RuntimeError> {
        Ok(self.step_gated_watched(rows, lr, check, found, None)?.0)
    }

    fn step_gated_watched(
        &mut self,
        rows: &TokenRows,
        lr: f32,
        check: bool,
        found: &mut Option<NonFinite>,
        go: Option<Verdict>,
    ) -> Result<(StepStats, bool), RuntimeError> {
        let parts = split(rows, self.micro_batches)?;
        let (last, earlier) = parts.split_last().expect("at least one part");
        if let Some((acc, inputs)) = &self.accumulate {
            for (i, part) in earlier.iter().enumerate() {
                let mut feeds = step_inputs(inputs, part, lr)?;
                feeds.push(scalar(KEEP, if i == 0 { 0.0 } else { 1.0 }));
                feeds.retain(|t| inputs.contains(&t.name));
                if check {
                    if let Some(f) = self.exec.run_checked(acc, &feeds)? {
                        found.get_or_insert(f);
                    }
                } else {
                    self.exec.run(acc, &feeds)?;
                }
            }
        }
        let mut feeds = step_inputs(&self.inputs, last, lr)?;
        // Every replica's micro-batches, when the step is one replica's of several.
        let replicas = crate::comm::group_size(self.exec.communicator(), kiln_ir::module::DP_GROUP)?;
        feeds.push(scalar(MICRO_BATCHES, (parts.len() * replicas) as f32));
        // The last micro-batch adds into the accumulators the earlier ones started (and a
        // data-parallel step writes the replicas' sums over them): with none before it, they
        // must be zero.
        if earlier.is_empty() && self.accumulate.is_some() {
            self.exec.zero_accumulators()?;
        }
        feeds.extend(rank_inputs(self.exec.communicator()));
        feeds.retain(|t| self.inputs.contains(&t.name));
        let applied = match (go, &mut self.gate) {
            (Some(go), Some((gate, undo))) => {
                let (applied, f) = gate.run(undo, &mut self.exec, &self.program, &feeds, check, go)?;
                if let Some(f) = f {
                    found.get_or_insert(f);
                }
                applied
            }
            _ => {
                if check {
                    if let Some(f) = self.exec.run_checked(&self.program, &feeds)? {
                        found.get_or_insert(f);
                    }
                } else {
                    self.exec.run(&self.program, &feeds)?;
                }
                true
            }
        };
        let mut outputs = Vec::new();
        for name in ["loss", "grad_norm"] {
            outputs.push((name, self.exec.output_f32(name, 0..1)?));
        }
        let ready = |name: &str| applied || self.gate.as_ref().is_some_and(|(g, _)| g.made(name));
        let loads: Vec<String> = (self.exec.outputs(&self.program)?.into_iter())
            .filter(|n| n.starts_with("load.") || n.starts_with(GRAD_NORM_PREFIX))
            .filter(|n| ready(n))
            .collect();
        for name in &loads {
            let t = self.exec.output(name)?;
            outputs.push((name.as_str(), f32s(t)));
        }
        Ok((stats(outputs.into_iter()), applied))
    }

    fn weight_states(&self) -> impl Iterator<Item = &kiln_ir::artifact::StateEntry> {
        self.exec.manifest().states.iter()
    }

    /// The states a checkpoint keeps besides the model's weights (moments, the step count), by
    /// name.
    pub fn states(&self) -> Result<Vec<HostTensor>, RuntimeError> {
        (self.weight_states()).filter(|s| kept(s.role)).map(|s| self.exec.read_state(&s.name)).collect()
    }

    /// Replaces state `name` (a resumed run's moments and step count); its type must not change.
    pub fn set_state(&mut self, value: HostTensor) -> Result<(), RuntimeError> {
        self.exec.write_state(&value)
    }

    /// The current value of every trained parameter and of the routers' biases, by name. (A
    /// compiled train step trains every parameter of the model, so these are all its weights.)
    pub fn weights(&self) -> Result<Vec<HostTensor>, RuntimeError> {
        (self.weight_states())
            .filter(|s| matches!(s.role, StateRole::Trainable | StateRole::RoutingBias))
            .map(|s| self.exec.read_state(&s.name))
            .collect()
    }

    /// The executor (profiles, memory figures).
    pub fn executor(&self) -> &Executor<B> {
        &self.exec
    }

    /// The executor, to turn profiling on or off.
    pub fn executor_mut(&mut self) -> &mut Executor<B> {
        &mut self.exec
    }
}

fn f32s(t: HostTensor) -> Vec<f32> {
    match t.data {
        HostData::F32(v) => v,
        HostData::I64(v) => v.into_iter().map(|x| x as f32).collect(),
    }
}

/// What a training loop needs of a trainer, on the interpreter ([`Trainer`]) or compiled
/// ([`CompiledTrainer`]).
/// The states a step changes (the trained weights, the routers' biases, AdamW's moments and
/// master weights, the step count), copied so that the step can be undone: [`Steps::save`] fills
/// it, reusing the buffers of the copy it held, and [`Steps::restore`] puts it back. A compiled
/// trainer keeps raw bytes (a copy per step, no allocation once the first is made); the
/// interpreter and a pipeline keep tensors.
#[derive(Default)]
pub struct Saved {
    raw: Vec<(String, Vec<u8>)>,
    tensors: Vec<HostTensor>,
}

pub trait Steps {
    /// One step on `rows` (all of them, as one batch) at learning rate `lr`.
    fn step(&mut self, rows: &TokenRows, lr: f32) -> Result<StepStats, RuntimeError>;
    /// The trained parameters and the routers' biases, by name.
    fn weights(&self) -> Result<Vec<HostTensor>, RuntimeError>;
    /// The other states (moments, the step count), by name.
    fn states(&self) -> Result<Vec<HostTensor>, RuntimeError>;
    /// Replaces a state of that name, of exactly its type.
    fn set_state(&mut self, value: HostTensor) -> Result<(), RuntimeError>;
    /// One state's current value (a router's selection bias, say), by name.
    fn state(&self, name: &str) -> Result<HostTensor, RuntimeError>;
    /// [`Steps::step`], checking every op's results as they are computed: also returns the first
    /// op whose result was not all finite (a kernel launch compiled, a node on the interpreter).
    fn step_checked(
        &mut self,
        rows: &TokenRows,
        lr: f32,
    ) -> Result<(StepStats, Option<NonFinite>), RuntimeError>;
    /// Whether [`Steps::step_gated`] can stop a step before it changes the model: the compiled
    /// train step (or a pipeline rank's update) has a [`Gate`], or the step runs on the interpreter.
    fn gated(&self) -> bool {
        false
    }
    /// One step on `rows` at learning rate `lr`, as [`Steps::step`], that asks `go` with the
    /// step's loss and global gradient norm once both are known and before any weight, moment,
    /// step count or router bias changes: when `go` says no, the step stops there and leaves
    /// every state as it was (but the gradient accumulators, zeroed). With `check`, every op's
    /// results are checked as [`Steps::step_checked`] does. An error where [`Steps::gated`] is
    /// false.
    fn step_gated(
        &mut self,
        _rows: &TokenRows,
        _lr: f32,
        _check: bool,
        _go: Verdict,
    ) -> Result<Gated, RuntimeError> {
        Err(RuntimeError::BadOption(
            "this trainer's steps cannot stop before their update: its program writes weights before the gradient norm is known"
                .into(),
        ))
    }
    /// Writes NaN into the results of the train step's first op in scope `scope` at every step
    /// from now on (`None`: no more): a fault injected to test the training monitor. Only a
    /// compiled step has it.
    fn set_poison(&mut self, _scope: Option<&str>) -> Result<(), RuntimeError> {
        Err(RuntimeError::BadOption(
            "a NaN is injected into a compiled kernel's output: this train step runs on the reference \
             interpreter (drop --interp)"
                .into(),
        ))
    }
    /// What the step's collectives cost since the last call (nothing on one process).
    fn take_comm_stats(&mut self) -> crate::comm::CommStats {
        crate::comm::CommStats::default()
    }
    /// Before a checkpoint that the first process writes while the others stream their parts
    /// to it as it asks for them (a pipeline's first replica, whose ranks' replicas join the
    /// gathers of states they split): after this, there,
    /// [`Steps::heads`] names the whole model's tensors and [`Steps::tensor`] fetches each from the
    /// process that holds it; the others serve its requests until [`Steps::checkpoint_written`]
    /// there. Nothing to do for one process or for replicas.
    fn stream_for_checkpoint(&mut self) -> Result<(), RuntimeError> {
        Ok(())
    }
    /// Before a checkpoint whose tensors the caller asks of the processes that hold them itself
    /// (expert parallelism's): on the first process, [`Steps::heads`] names the whole model's
    /// tensors in the shapes their processes hold, [`Steps::checkpoint_source`] the rank of its
    /// pipeline holding each, and [`Steps::tensor`] reads this process's own; elsewhere nothing.
    /// [`Steps::checkpoint_written`] ends it.
    fn plan_checkpoint(&mut self) -> Result<(), RuntimeError> {
        Ok(())
    }
    /// During a streamed checkpoint, on the first process: tensor `name` is the one
    /// [`Steps::tensor`] will be asked for next, so it may ask the process that holds it now, for
    /// the transfer to overlap the writing of the one before. Nothing by default.
    fn prefetch(&self, _name: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
    /// During a streamed checkpoint, on the first process: the rank of its pipeline that gives
    /// state `name` (0: this process).
    fn checkpoint_source(&self, _name: &str) -> u32 {
        0
    }
    /// After the checkpoint [`Steps::stream_for_checkpoint`] began is written (or given up), on
    /// every process: the first lets the others go on.
    fn checkpoint_written(&mut self) -> Result<(), RuntimeError> {
        Ok(())
    }
    /// Copies every state a step changes into `into` (see [`Saved`]).
    fn save(&self, into: &mut Saved) -> Result<(), RuntimeError> {
        into.raw.clear();
        into.tensors = self.weights()?.into_iter().chain(self.states()?).collect();
        Ok(())
    }
    /// Puts back the states [`Steps::save`] copied, and zeroes the gradient accumulators
    /// ([`Steps::zero_accumulators`]).
    fn restore(&mut self, from: &Saved) -> Result<(), RuntimeError> {
        for v in &from.tensors {
            self.set_state(v.clone())?;
        }
        self.zero_accumulators()
    }
    /// Writes zeros over the gradient accumulators of a step split into micro-batches. A step is
    /// undone (or re-run op by op) because its sums were not finite, and they may stay in the
    /// accumulators: the next step's first micro-batch starts its sum from the old one times 0,
    /// which keeps a NaN, so every later step would fail too.
    fn zero_accumulators(&mut self) -> Result<(), RuntimeError>;
    /// The states [`Steps::save`] copied, as tensors.
    fn saved_tensors(&self, from: &Saved) -> Result<Vec<HostTensor>, RuntimeError> {
        Ok(from.tensors.clone())
    }
    /// Whether this process holds state `name` (a pipeline rank holds its own stages' states,
    /// and after [`Steps::gather_for_checkpoint`] on the first rank, every stage's).
    fn holds(&self, _name: &str) -> bool {
        true
    }
    /// The name, dtype and shape of every tensor [`Steps::weights`] and then [`Steps::states`]
    /// give, in their order, without their values: a checkpoint is written from these, fetching
    /// each tensor with [`Steps::tensor`] when its turn comes, so that one tensor at a time is
    /// copied to the host rather than the whole model and its optimizer state. (This default
    /// copies everything once; the trainers of one process know it without a copy.)
    fn heads(&self) -> Result<(Vec<TensorHead>, Vec<TensorHead>), RuntimeError> {
        let heads = |v: Vec<HostTensor>| v.iter().map(TensorHead::of).collect();
        Ok((heads(self.weights()?), heads(self.states()?)))
    }
    /// One of the tensors [`Steps::heads`] names, by name.
    fn tensor(&self, name: &str) -> Result<HostTensor, RuntimeError> {
        self.state(name)
    }
}

impl Steps for Trainer {
    fn step(&mut self, rows: &TokenRows, lr: f32) -> Result<StepStats, RuntimeError> {
        Trainer::step(self, rows, lr)
    }
    fn gated(&self) -> bool {
        true
    }
    fn step_gated(
        &mut self,
        rows: &TokenRows,
        lr: f32,
        check: bool,
        go: Verdict,
    ) -> Result<Gated, RuntimeError> {
        Trainer::step_gated(self, rows, lr, check, go)
    }
    fn weights(&self) -> Result<Vec<HostTensor>, RuntimeError> {
        let trained =
            self.states.iter().filter(|s| matches!(s.role, StateRole::Trainable | StateRole::RoutingBias));
        Ok(trained.map(|s| host(&s.name, &self.values[&s.name])).collect())
    }
    fn states(&self) -> Result<Vec<HostTensor>, RuntimeError> {
        Ok(Trainer::states(self))
    }
    fn set_state(&mut self, value: HostTensor) -> Result<(), RuntimeError> {
        let name = value.name.clone();
        Trainer::set_state(self, &name, value)
    }
    fn state(&self, name: &str) -> Result<HostTensor, RuntimeError> {
        let t = self.values.get(name).ok_or_else(|| RuntimeError::UnknownParam { name: name.to_string() })?;
        Ok(host(name, t))
    }
    fn heads(&self) -> Result<(Vec<TensorHead>, Vec<TensorHead>), RuntimeError> {
        let head = |name: &String, t: &Tensor| TensorHead {
            name: name.clone(),
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
        };
        let trained = (self.states.iter())
            .filter(|s| matches!(s.role, StateRole::Trainable | StateRole::RoutingBias))
            .map(|s| head(&s.name, &self.values[&s.name]));
        let weights = trained.chain(self.params.iter().map(|(n, t)| head(n, t))).collect();
        let rest = self.states.iter().filter(|s| kept(s.role));
        Ok((weights, rest.map(|s| head(&s.name, &self.values[&s.name])).collect()))
    }
    fn tensor(&self, name: &str) -> Result<HostTensor, RuntimeError> {
        match self.params.get(name) {
            Some(t) => Ok(host(name, t)),
            None => self.state(name),
        }
    }
    fn step_checked(
        &mut self,
        rows: &TokenRows,
        lr: f32,
    ) -> Result<(StepStats, Option<NonFinite>), RuntimeError> {
        Trainer::step_checked(self, rows, lr)
    }
    fn zero_accumulators(&mut self) -> Result<(), RuntimeError> {
        self.clear_accumulators()
    }
}

impl<B: Backend> Steps for CompiledTrainer<B> {
    fn step(&mut self, rows: &TokenRows, lr: f32) -> Result<StepStats, RuntimeError> {
        CompiledTrainer::step(self, rows, lr)
    }
    fn gated(&self) -> bool {
        self.gate.is_some()
    }
    fn step_gated(
        &mut self,
        rows: &TokenRows,
        lr: f32,
        check: bool,
        go: Verdict,
    ) -> Result<Gated, RuntimeError> {
        CompiledTrainer::step_gated(self, rows, lr, check, go)
    }
    fn take_comm_stats(&mut self) -> crate::comm::CommStats {
        self.exec.take_comm_stats()
    }
    fn weights(&self) -> Result<Vec<HostTensor>, RuntimeError> {
        CompiledTrainer::weights(self)
    }
    fn states(&self) -> Result<Vec<HostTensor>, RuntimeError> {
        CompiledTrainer::states(self)
    }
    fn set_state(&mut self, value: HostTensor) -> Result<(), RuntimeError> {
        CompiledTrainer::set_state(self, value)
    }
    fn state(&self, name: &str) -> Result<HostTensor, RuntimeError> {
        self.exec.read_state(name)
    }
    fn heads(&self) -> Result<(Vec<TensorHead>, Vec<TensorHead>), RuntimeError> {
        let head = |s: &kiln_ir::artifact::StateEntry| {
            let (dtype, shape) = self.exec.state_type(&s.name)?;
            Ok(TensorHead { name: s.name.clone(), dtype, shape })
        };
        let weights = (self.weight_states())
            .filter(|s| matches!(s.role, StateRole::Trainable | StateRole::RoutingBias))
            .map(head)
            .collect::<Result<_, RuntimeError>>()?;
        Ok((weights, self.weight_states().filter(|s| kept(s.role)).map(head).collect::<Result<_, _>>()?))
    }
    fn step_checked(
        &mut self,
        rows: &TokenRows,
        lr: f32,
    ) -> Result<(StepStats, Option<NonFinite>), RuntimeError> {
        CompiledTrainer::step_checked(self, rows, lr)
    }
    fn set_poison(&mut self, scope: Option<&str>) -> Result<(), RuntimeError> {
        CompiledTrainer::set_poison(self, scope)
    }
    fn save(&self, into: &mut Saved) -> Result<(), RuntimeError> {
        into.tensors.clear();
        let names: Vec<&str> = (self.weight_states())
            .filter(|s| kept(s.role) || matches!(s.role, StateRole::Trainable | StateRole::RoutingBias))
            .map(|s| s.name.as_str())
            .collect();
        if into.raw.len() != names.len() || into.raw.iter().zip(&names).any(|((n, _), m)| n != m) {
            into.raw = names.iter().map(|n| (n.to_string(), Vec::new())).collect();
        }
        for (name, bytes) in &mut into.raw {
            self.exec.copy_state(name, bytes)?;
        }
        Ok(())
    }
    fn restore(&mut self, from: &Saved) -> Result<(), RuntimeError> {
        for (name, bytes) in &from.raw {
            self.exec.restore_state(name, bytes)?;
        }
        for v in &from.tensors {
            self.set_state(v.clone())?;
        }
        self.exec.zero_accumulators()
    }
    fn zero_accumulators(&mut self) -> Result<(), RuntimeError> {
        self.exec.zero_accumulators()
    }
    fn saved_tensors(&self, from: &Saved) -> Result<Vec<HostTensor>, RuntimeError> {
        let mut out = Vec::with_capacity(from.raw.len() + from.tensors.len());
        for (name, bytes) in &from.raw {
            out.push(self.exec.decode_state(name, bytes)?);
        }
        out.extend(from.tensors.iter().cloned());
        Ok(out)
    }
}
