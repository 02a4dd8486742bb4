//! The train-step program: one graph that runs a whole optimizer step, so that training compiles
//! to the same kernels as inference and the runtime only feeds batches.
//!
//! [`train_step`] takes a graph [`crate::autodiff::differentiate`] made (outputs `loss` and
//! `grad.{parameter}`) and turns it into a program over state:
//!
//! - every trained parameter becomes a `trainable` state: a graph input of the parameter's
//!   (Hugging Face) name, updated in place by the output of the same name;
//! - AdamW's moments are `optimizer_moment` states `adam.m.{name}` and `adam.v.{name}`, and the step
//!   count a `counter` state `adam.step` (f32, exact up to 2^24 steps);
//! - the learning rate is a caller input `lr` (`f32[]`): the schedule is the host's;
//! - gradients are clipped by their global norm, as `torch.nn.utils.clip_grad_norm_` does:
//!   `coef = min(max_norm / (norm + 1e-6), 1)`; the program outputs the norm before clipping as
//!   `grad_norm`, and `loss`; and each layer's norm before clipping as `grad_norm.{layer}`
//!   (`sqrt` of the sum of its parameters' squared gradients, grouped by [`layer_of`]: decoder
//!   layers, the embedding, the head), for the training monitor;
//! - AdamW as `torch.optim.AdamW` (torch 2.15, `_single_tensor_adam`) computes it, in this order:
//!   `p *= 1 - lr * wd`; `m = m + (1 - b1) * (g - m)` (`lerp`); `v = b2 * v + (1 - b2) * g * g`;
//!   `t += 1`; `bc1 = 1 - b1^t`, `bc2 = 1 - b2^t`; `p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`.
//!   Powers are `exp(t * ln b)` in f32.
//!
//! Parameters listed as frozen stay parameters and get no update (the router's selection bias is
//! state that the balancing rule moves, not a trained weight). What it does not do yet: gradient
//! accumulation over micro-batches, BF16 moments, FP32 master copies of BF16 weights.

use kiln_ir::module::{StateDecl, StateRole};
use kiln_ir::{BinaryOp, DType, Dim, Graph, Op, ReduceOp, TensorType, UnaryOp, ValueId};

use crate::autodiff::{GRAD_PREFIX, LOSS};
use crate::build::{Part, KEEP, LOAD_ACC_PREFIX, LOAD_PREFIX};

/// The output holding the global gradient norm before clipping.
pub const GRAD_NORM: &str = "grad_norm";
/// The prefix of the per-layer gradient norms: `grad_norm.{layer}` (see [`layer_of`]).
pub const GRAD_NORM_PREFIX: &str = "grad_norm.";
/// The caller input holding the learning rate of the step.
pub const LR: &str = "lr";
/// The step counter state.
pub const STEP: &str = "adam.step";
/// The caller input of a split step's last program: how many micro-batches the batch was split
/// into (`f32[]`).
pub const MICRO_BATCHES: &str = kiln_ir::module::MICRO_BATCHES;
/// The accumulator state of a split step's loss.
pub const LOSS_ACC: &str = "loss.acc";
/// The prefix of the master-weight states: `master.{parameter}`.
pub const MASTER_PREFIX: &str = kiln_ir::module::MASTER_PREFIX;
/// The prefix of the gradient accumulator states: `grad.acc.{parameter}`.
pub const GRAD_ACC_PREFIX: &str = "grad.acc.";

/// AdamW's and clipping's hyperparameters, with torch's meaning.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Optimizer {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// The global-norm bound; `None` for no clipping.
    pub clip: Option<f64>,
    /// The dtype AdamW's moments are stored in: f32, or bf16 as DeepSeek-V3 does (reference
    /// §4.1, "low-precision optimizer states"); the update itself is computed in f32.
    pub moments: DType,
    /// The data-parallel replicas AdamW's states are split over (ZeRO stage 1, Rajbhandari et al.
    /// 2020): each replica keeps the moments (and f32 master weights) of one N-th of every trained
    /// tensor, updates that shard from the summed gradient, and gathers the others' shards into
    /// the whole weight. 1: every replica keeps everything. Needs a data-parallel step.
    pub shards: u32,
}

impl Default for Optimizer {
    /// DeepSeek-V3's (reference §4.2): betas 0.9 / 0.95, weight decay 0.1, clipping at 1.0.
    fn default() -> Optimizer {
        Optimizer {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            clip: Some(1.0),
            moments: DType::F32,
            shards: 1,
        }
    }
}

/// Why a train-step program could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("the graph has no `{0}` output: train_step takes what autodiff::differentiate returns")]
    Missing(String),
    #[error("bad optimizer setting: {0}")]
    Setting(String),
    #[error("internal error: {0} (a kiln bug; please report it)")]
    Internal(String),
}

/// The nodes being added, all in scope `optimizer`.
struct B<'g> {
    g: &'g mut Graph,
}

impl B<'_> {
    fn node(&mut self, op: Op, inputs: &[ValueId]) -> Result<ValueId, TrainError> {
        let tys: Vec<&TensorType> = inputs.iter().map(|&v| self.g.ty(v)).collect();
        let types = kiln_ir::infer::infer(&op, &tys).map_err(|e| TrainError::Internal(e.to_string()))?;
        let (_, r) = self
            .g
            .add_node(op, inputs, types, Some("optimizer"))
            .map_err(|e| TrainError::Internal(e.to_string()))?;
        Ok(r[0])
    }

    fn declared(&mut self, op: Op, ty: TensorType) -> Result<ValueId, TrainError> {
        let (_, r) = self
            .g
            .add_node(op, &[], vec![ty], Some("optimizer"))
            .map_err(|e| TrainError::Internal(e.to_string()))?;
        Ok(r[0])
    }

    fn c(&mut self, v: f64) -> Result<ValueId, TrainError> {
        self.declared(Op::Constant { value: v }, TensorType::scalar(DType::F32))
    }

    fn bin(&mut self, op: BinaryOp, a: ValueId, b: ValueId) -> Result<ValueId, TrainError> {
        self.node(Op::Binary(op), &[a, b])
    }

    fn un(&mut self, op: UnaryOp, a: ValueId) -> Result<ValueId, TrainError> {
        self.node(Op::Unary(op), &[a])
    }

    /// `a` in f32: itself, or a cast.
    fn f32(&mut self, a: ValueId) -> Result<ValueId, TrainError> {
        match self.g.ty(a).dtype {
            DType::F32 => Ok(a),
            _ => self.node(Op::Cast { to: DType::F32 }, &[a]),
        }
    }
}

/// `v` computed again, where that is cheap: an elementwise op, or a chain of them, on the
/// program's inputs, parameters, constants, scalars, sums over peers and the values in `kept` (a
/// last micro-batch's sums, written over their accumulators) (`None` otherwise). AdamW
/// reads its own copy of each gradient the global norm has read first. A pipeline rank's gradients
/// are its kept accumulators times `1 / M` (`pipeline_update`), a data-parallel replica's its
/// all-reduced gradients times `1 / M`: read by both, each scaled gradient would be held whole,
/// every parameter's at once, from the norm's kernels until the update's, beside the values it is
/// made from (the rank's gradients over again in the arena, 1.8 GB on models/bench.toml with MTP
/// under DualPipe); with a copy, each lives only inside the fused kernels that read it. The copy
/// is the same ops on the same values, so the update's floats do not change.
fn recomputed(b: &mut B, v: ValueId, kept: &[ValueId]) -> Result<Option<ValueId>, TrainError> {
    let node = b.g.node(b.g.producer(v));
    let (op, inputs) = match &node.op {
        _ if b.g.ty(v).rank() == 0 || kept.contains(&v) => return Ok(Some(v)),
        Op::Input { .. } | Op::Param { .. } | Op::Constant { .. } => return Ok(Some(v)),
        // A sum over the replicas is made once, as the backward pass ends, and kept in any case:
        // reading it again costs nothing.
        Op::AllReduce { .. } => return Ok(Some(v)),
        Op::Binary(_) | Op::Unary(_) | Op::Cast { .. } if node.results.len() == 1 => {
            (node.op.clone(), node.inputs.clone())
        }
        _ => return Ok(None),
    };
    let mut copies = Vec::with_capacity(inputs.len());
    for x in inputs {
        match recomputed(b, x, kept)? {
            Some(c) => copies.push(c),
            None => return Ok(None),
        }
    }
    b.node(op, &copies).map(Some)
}

/// [`recomputed`] on this replica's shard (`s`, of a tensor of `numel` elements): the same
/// elementwise chain computed from the shards of its f32 tensors, which all have `v`'s numel, so
/// that the whole scaled gradient is never made only to have one shard taken from it (the
/// embedding's, 3.7 GB in f32 at DeepSeek-V3's size). Each element is the same ops on the same
/// values, so the update's floats do not change. `None` where the chain is not such.
fn recomputed_shard(
    b: &mut B,
    v: ValueId,
    kept: &[ValueId],
    s: Sharding,
    numel: u64,
) -> Result<Option<ValueId>, TrainError> {
    let ty = b.g.ty(v).clone();
    if ty.rank() == 0 {
        return Ok(Some(v));
    }
    if ty.dtype != DType::F32 || ty.known_numel() != Some(numel) {
        return Ok(None);
    }
    let node = b.g.node(b.g.producer(v));
    let (op, inputs) = match &node.op {
        _ if kept.contains(&v) => return s.take(b, v, numel).map(Some),
        Op::Input { .. } | Op::Param { .. } | Op::AllReduce { .. } => return s.take(b, v, numel).map(Some),
        Op::Binary(_) | Op::Unary(_) if node.results.len() == 1 => (node.op.clone(), node.inputs.clone()),
        _ => return Ok(None),
    };
    let mut shards = Vec::with_capacity(inputs.len());
    for x in inputs {
        match recomputed_shard(b, x, kept, s, numel)? {
            Some(c) => shards.push(c),
            None => return Ok(None),
        }
    }
    b.node(op, &shards).map(Some)
}

/// The caller input of a step whose AdamW states are split over the replicas
/// ([`Optimizer::shards`]): this replica's rank, i32 `[1]`.
pub const DP_RANK: &str = kiln_ir::module::DP_RANK;

/// ZeRO-1's split of a trained tensor of `numel` elements over `n` replicas: flat, padded with
/// zeros to `n · m` (`m = ceil(numel / n)`), rank `r` holding elements `r·m .. (r+1)·m`.
#[derive(Clone, Copy)]
struct Sharding {
    n: u64,
    /// The caller input [`DP_RANK`] (or, for a routed expert's states, [`EDP_RANK`]).
    rank: ValueId,
    /// The group the shards are gathered over: [`DP_GROUP`], or a routed expert's
    /// [`crate::expert_parallel::EXPERT_DP_GROUP`].
    group: &'static str,
}

/// The caller input of an expert-parallel step whose routed experts' AdamW states are split over
/// the processes holding the same experts (ZeRO-1 with `--ep` and `--dp`): this process's rank
/// among them, i32 `[1]`.
pub const EDP_RANK: &str = kiln_ir::module::EDP_RANK;

impl Sharding {
    /// This replica's shard of `x` (f32, `numel` elements): f32 `[m]`.
    fn take(self, b: &mut B, x: ValueId, numel: u64) -> Result<ValueId, TrainError> {
        let m = numel.div_ceil(self.n);
        let x = b.f32(x)?;
        let flat = b.node(Op::Reshape { shape: vec![Dim::known(numel)] }, &[x])?;
        let padded = match self.n * m - numel {
            0 => flat,
            pad => {
                let zero = b.c(0.0)?;
                let zeros = b.node(Op::Broadcast { shape: vec![Dim::known(pad)] }, &[zero])?;
                b.node(Op::Concat { axis: 0 }, &[flat, zeros])?
            }
        };
        let table = b.node(Op::Reshape { shape: vec![Dim::known(self.n), Dim::known(m)] }, &[padded])?;
        let row = b.node(Op::Embedding, &[table, self.rank])?;
        b.node(Op::Reshape { shape: vec![Dim::known(m)] }, &[row])
    }

    /// The whole tensor, f32 of `ty`'s shape, from every replica's shard gathered (`all`, f32
    /// `[n, m]`).
    fn whole(self, b: &mut B, all: ValueId, ty: &TensorType) -> Result<ValueId, TrainError> {
        let numel = ty.known_numel().ok_or_else(|| TrainError::Internal("an unsized weight".into()))?;
        let m = numel.div_ceil(self.n);
        let flat = b.node(Op::Reshape { shape: vec![Dim::known(self.n * m)] }, &[all])?;
        let whole = match self.n * m - numel {
            0 => flat,
            pad => b.node(Op::Split { axis: 0, sizes: vec![numel, pad] }, &[flat])?,
        };
        b.node(Op::Reshape { shape: ty.shape.clone() }, &[whole])
    }
}

/// The train-step program from a differentiated graph; returns it with the states it declares.
/// See the module documentation.
pub fn train_step(
    grads: &Graph,
    frozen: &[&str],
    opt: &Optimizer,
) -> Result<(Graph, Vec<StateDecl>), TrainError> {
    step_program(grads, frozen, opt, false, false, None, None)
}

/// The trained parameters of `g` (every parameter with a `grad.{name}` output, less `frozen`),
/// turned into inputs of their names (states), in graph order: name, value, gradient.
fn train_params(g: &mut Graph, frozen: &[&str]) -> Vec<(String, ValueId, ValueId)> {
    let mut trained = Vec::new();
    for n in g.nodes() {
        let Op::Param { name } = &g.node(n).op else { continue };
        if frozen.contains(&name.as_str()) {
            continue;
        }
        let Some(d) = g.output(&format!("{GRAD_PREFIX}{name}")) else { continue };
        let (name, v) = (name.clone(), g.node(n).results[0]);
        *g.node_mut_op(n) = Op::Input { name: name.clone() };
        trained.push((name, v, d));
    }
    // The gradients are consumed here; the forward graph's other outputs (expert loads, the
    // routers' bias updates) stay.
    g.retain_outputs(|name, _| name != LOSS && !name.starts_with(GRAD_PREFIX));
    trained
}

/// The layer a parameter's gradient norm is counted in: `model.layers.N` for a decoder layer's
/// (an MTP module's too: Hugging Face numbers them after the main layers), `model.embed_tokens`
/// for the embedding, and `lm_head` for the rest, the head (the final norm and the output
/// projection). Parameter names are Hugging Face's: checkpoints are the contract.
pub fn layer_of(param: &str) -> String {
    if let Some(rest) = param.strip_prefix("model.layers.") {
        if let Some((n, _)) = rest.split_once('.') {
            return format!("model.layers.{n}");
        }
    }
    if param.starts_with("model.embed_tokens.") {
        return "model.embed_tokens".into();
    }
    "lm_head".into()
}

/// The f32 master copy of trained parameter `name`, when its stored dtype is narrower.
pub fn master_of(name: &str) -> String {
    format!("{MASTER_PREFIX}{name}")
}

/// The state that accumulates parameter `name`'s gradient over a step's micro-batches.
pub fn grad_acc(name: &str) -> String {
    format!("{GRAD_ACC_PREFIX}{name}")
}

/// The accumulating program of a step split into micro-batches (gradient accumulation): from a
/// graph that [`crate::autodiff::differentiate`] made of [`crate::build::build_train_part`]'s
/// [`Part::Accumulate`] graph. It reads the trained parameters (states it does not write) and adds
/// into accumulator states, each scaled by the caller input [`KEEP`] first (0 on the step's first
/// micro-batch, so that it starts the sum; 1 after):
///
/// - `grad.acc.{name}` (f32) += the micro-batch's gradient of each trained parameter;
/// - [`LOSS_ACC`] += the micro-batch's loss;
/// - `load.acc.{scope}` += each router's load (the graph adds it already).
///
/// The step's last micro-batch runs [`train_step_last`], which adds its own share and applies the
/// update. Accumulating sums, rather than means, keeps the micro-batches' shares exact, and the
/// last program scales by `1 / micro_batches` once.
pub fn accumulate_step(grads: &Graph, frozen: &[&str]) -> Result<(Graph, Vec<StateDecl>), TrainError> {
    let mut g = grads.clone();
    let loss = output(&g, LOSS)?;
    let trained = train_params(&mut g, frozen);
    let loads: Vec<(String, ValueId)> = (g.outputs().iter())
        .filter_map(|(n, v)| Some((n.strip_prefix(LOAD_PREFIX)?.to_string(), *v)))
        .collect();
    g.retain_outputs(|name, _| !name.starts_with(LOAD_PREFIX));
    let mut b = B { g: &mut g };
    let keep = match (b.g.inputs().iter()).find(|(n, _)| *n == KEEP) {
        Some(&(_, v)) => v,
        None => b.declared(Op::Input { name: KEEP.into() }, TensorType::scalar(DType::F32))?,
    };
    let mut states = Vec::new();
    let mut outputs = Vec::new();
    let mut add_into = |b: &mut B, name: String, d: ValueId| -> Result<(), TrainError> {
        let d = b.f32(d)?;
        let ty = b.g.ty(d).clone();
        let acc = b.declared(Op::Input { name: name.clone() }, ty.clone())?;
        let kept = b.bin(BinaryOp::Mul, acc, keep)?;
        outputs.push((name.clone(), b.bin(BinaryOp::Add, kept, d)?));
        states.push(StateDecl { name, ty, role: StateRole::GradientAccumulator });
        Ok(())
    };
    for (name, _, d) in &trained {
        add_into(&mut b, grad_acc(name), *d)?;
    }
    add_into(&mut b, LOSS_ACC.into(), loss)?;
    for (scope, load) in loads {
        let name = format!("{LOAD_ACC_PREFIX}{scope}");
        let ty = b.g.ty(load).clone();
        outputs.push((name.clone(), load));
        states.push(StateDecl { name, ty, role: StateRole::GradientAccumulator });
    }
    for (n, v) in outputs {
        g.add_output(n, v).map_err(|e| TrainError::Internal(e.to_string()))?;
    }
    kiln_ir::verify::verify(&g).map_err(|e| TrainError::Internal(e.to_string()))?;
    Ok((g, states))
}

/// The train-step program of a step's last micro-batch, when the batch is split: [`train_step`]
/// on the sums of the earlier micro-batches' gradients and loss ([`accumulate_step`]'s states)
/// plus this one's, times `1 / micro_batches` (the caller input [`MICRO_BATCHES`]): the gradient
/// and loss of the whole batch, since every micro-batch has the same number of rows and each loss
/// is a mean over them. From a graph made of [`Part::Last`]'s.
pub fn train_step_last(
    grads: &Graph,
    frozen: &[&str],
    opt: &Optimizer,
) -> Result<(Graph, Vec<StateDecl>), TrainError> {
    step_program(grads, frozen, opt, true, false, None, None)
}

/// The communication group of data-parallel replicas, which [`Op::AllReduce`] sums over.
pub const DP_GROUP: &str = kiln_ir::module::DP_GROUP;

/// [`train_step`] (`last` false) or [`train_step_last`] (true); with `data_parallel`, for one of
/// several replicas that each run the step on their own rows: every gradient and the loss are
/// summed over the replicas (`all_reduce` over [`DP_GROUP`], once per step, after the local
/// micro-batches are added up) and scaled by `1 / micro_batches`, which the caller gives as the
/// micro-batches of all the replicas together. The replicas then hold the same gradients, so every
/// one makes the same update, and a process alone (a group of one) makes the single-process one.
fn step_program(
    grads: &Graph,
    frozen: &[&str],
    opt: &Optimizer,
    last: bool,
    data_parallel: bool,
    pipeline: Option<u32>,
    experts: Option<u64>,
) -> Result<(Graph, Vec<StateDecl>), TrainError> {
    for (name, v) in [("beta1", opt.beta1), ("beta2", opt.beta2)] {
        if !(0.0..1.0).contains(&v) {
            return Err(TrainError::Setting(format!("{name} must be in [0, 1), found {v}")));
        }
    }
    let finite = opt.eps.is_finite() && opt.weight_decay.is_finite();
    if !(finite && opt.eps > 0.0 && opt.weight_decay >= 0.0) {
        return Err(TrainError::Setting(format!(
            "eps must be positive and weight decay non-negative, found {} and {}",
            opt.eps, opt.weight_decay
        )));
    }
    if !matches!(opt.moments, DType::F32 | DType::BF16) {
        return Err(TrainError::Setting(format!("AdamW's moments are f32 or bf16, not {}", opt.moments)));
    }
    if opt.clip.is_some_and(|c| !(c > 0.0 && c.is_finite())) {
        let c = opt.clip.unwrap_or_default();
        return Err(TrainError::Setting(format!("the clipping norm must be positive and finite, found {c}")));
    }
    if opt.shards == 0 || (opt.shards > 1 && !data_parallel) {
        return Err(TrainError::Setting(format!(
            "AdamW's states are split over the data-parallel replicas: {} shards need a data-parallel step \
             with at least one replica",
            opt.shards
        )));
    }
    let mut g = grads.clone();
    let mut loss = output(&g, LOSS)?;
    let mut trained = train_params(&mut g, frozen);
    // Which group sums a gradient over the replicas: a routed expert's is summed over the ranks
    // that hold the same experts (its gradient already counts every rank's rows routed to it).
    let group_of = |name: &str| match experts {
        Some(_) if crate::expert_parallel::is_routed_expert(name) => crate::expert_parallel::EXPERT_DP_GROUP,
        _ => DP_GROUP,
    };
    let mut states = Vec::new();
    let mut b = B { g: &mut g };
    // Gradients in f32, whatever the weights' dtype.
    for (_, _, d) in &mut trained {
        *d = b.f32(*d)?;
    }
    // The whole batch's gradients and loss: the earlier micro-batches' sums plus this one's, over
    // the number of micro-batches.
    // A data-parallel step's sums over the replicas, each written over its accumulator.
    let mut summed_in_place: Vec<(String, ValueId)> = Vec::new();
    if last {
        let count = b.declared(Op::Input { name: MICRO_BATCHES.into() }, TensorType::scalar(DType::F32))?;
        let one = b.c(1.0)?;
        let scale = b.bin(BinaryOp::Div, one, count)?;
        // (A data-parallel step writes the replicas' sums over its accumulators, below: a step
        // with no earlier micro-batch, whose accumulate program would have started them, finds
        // them zeroed by the runtime.)
        let mut whole = |b: &mut B, name: String, d: ValueId| -> Result<ValueId, TrainError> {
            let d = b.f32(d)?;
            let ty = b.g.ty(d).clone();
            let acc = b.declared(Op::Input { name: name.clone() }, ty.clone())?;
            states.push(StateDecl { name, ty, role: StateRole::GradientAccumulator });
            b.bin(BinaryOp::Add, acc, d)
        };
        for (name, _, d) in &mut trained {
            *d = whole(&mut b, grad_acc(name), *d)?;
        }
        let local: Vec<ValueId> = trained.iter().map(|(_, _, d)| *d).collect();
        loss = whole(&mut b, LOSS_ACC.into(), loss)?;
        // Every sum first, then every all-reduce (one after the other, which the runtime sends as
        // one message), then the scaling.
        let mut sums: Vec<(&str, &mut ValueId)> =
            trained.iter_mut().map(|(n, _, d)| (group_of(n), d)).collect();
        sums.push((DP_GROUP, &mut loss));
        let mut reduced = Vec::new();
        if data_parallel {
            for (group, d) in sums.iter_mut() {
                **d = b.node(Op::AllReduce { group: group.to_string() }, &[**d])?;
                reduced.push(**d);
            }
        }
        for (_, d) in sums {
            *d = b.bin(BinaryOp::Mul, *d, scale)?;
        }
        // Each gradient's sum over the replicas goes into its accumulator's storage (the
        // accumulator is read before, by the add, and the next step starts it afresh), not into
        // the arena, where all of them would be held until the update beside the accumulators:
        // the model's gradients twice. The norm and AdamW each read it times `1 / M`
        // (`recomputed`).
        for ((name, _, _), r) in trained.iter().zip(reduced) {
            summed_in_place.push((grad_acc(name), r));
        }
        // One process writes its own sums there, for the same reason (fuse-kernels keeps AdamW's
        // copy of the scaling out of the kernel that makes the sum: `shed_waiting_results`).
        if !data_parallel {
            for ((name, _, _), s) in trained.iter().zip(&local) {
                summed_in_place.push((grad_acc(name), *s));
            }
        }
        // The load accumulators' inputs are the graph's own (Part::Last); declare them.
        for (name, v) in b.g.inputs() {
            if name.starts_with(LOAD_ACC_PREFIX) {
                let ty = b.g.ty(v).clone();
                states.push(StateDecl { name: name.to_string(), ty, role: StateRole::GradientAccumulator });
            }
        }
    } else if data_parallel && pipeline.is_none() {
        // One micro-batch per replica: the mean of the replicas' gradients and losses. (A
        // pipeline's update summed them already: `pipeline_update`.)
        let count = b.declared(Op::Input { name: MICRO_BATCHES.into() }, TensorType::scalar(DType::F32))?;
        let one = b.c(1.0)?;
        let scale = b.bin(BinaryOp::Div, one, count)?;
        let mut sums: Vec<(&str, &mut ValueId)> =
            trained.iter_mut().map(|(n, _, d)| (group_of(n), d)).collect();
        sums.push((DP_GROUP, &mut loss));
        for (_, d) in sums.iter_mut() {
            **d = b.f32(**d)?;
        }
        // One all-reduce after another (one message at run time), then the scaling.
        for (group, d) in sums.iter_mut() {
            **d = b.node(Op::AllReduce { group: group.to_string() }, &[**d])?;
        }
        for (_, d) in sums {
            *d = b.bin(BinaryOp::Mul, *d, scale)?;
        }
    }
    let kept: Vec<ValueId> = summed_in_place.iter().map(|(_, v)| *v).collect();
    let lr = b.declared(Op::Input { name: LR.into() }, TensorType::scalar(DType::F32))?;
    let step = b.declared(Op::Input { name: STEP.into() }, TensorType::scalar(DType::F32))?;
    states.push(StateDecl {
        name: STEP.into(),
        ty: TensorType::scalar(DType::F32),
        role: StateRole::Counter,
    });

    // The global norm over every trained gradient, and the clipped gradients.
    let mut total = None;
    let mut squares = Vec::with_capacity(trained.len());
    for (name, _, d) in &trained {
        let sq = b.bin(BinaryOp::Mul, *d, *d)?;
        let rank = b.g.ty(sq).rank();
        // Rows first, then the row sums: a whole-tensor sum is one work item, a sum per row is
        // as many as there are rows (threads share them).
        let s = match rank {
            0 => sq,
            1 => b.node(Op::Reduce { op: ReduceOp::Sum, axes: vec![0], keep_dims: false }, &[sq])?,
            _ => {
                let rows =
                    b.node(Op::Reduce { op: ReduceOp::Sum, axes: vec![rank - 1], keep_dims: false }, &[sq])?;
                b.node(
                    Op::Reduce { op: ReduceOp::Sum, axes: (0..rank - 1).collect(), keep_dims: false },
                    &[rows],
                )?
            }
        };
        squares.push(s);
        // An expert-parallel rank's experts are its own: their squares are summed over the ranks
        // below, the replicated weights' are the same on every rank.
        if experts.is_some() && crate::expert_parallel::is_routed_expert(name) {
            continue;
        }
        total = Some(match total {
            None => s,
            Some(t) => b.bin(BinaryOp::Add, t, s)?,
        });
    }
    // Per layer too (`grad_norm.{scope}`), from the same squared sums: a layer's norm is
    // sqrt(sum over its parameters); the global norm above is not regrouped, so its rounding stays.
    let mut groups: Vec<(String, ValueId)> = Vec::new();
    // Expert parallelism: each layer's experts' squares, summed here and over the ranks below.
    let mut expert_groups: Vec<(String, ValueId)> = Vec::new();
    for (name, _, sq) in trained.iter().zip(&squares).map(|((n, p, _), s)| (n, p, s)) {
        let layer = layer_of(name);
        let groups = match experts.is_some() && crate::expert_parallel::is_routed_expert(name) {
            true => &mut expert_groups,
            false => &mut groups,
        };
        match groups.iter_mut().find(|(l, _)| *l == layer) {
            Some((_, sum)) => *sum = b.bin(BinaryOp::Add, *sum, *sq)?,
            None => groups.push((layer, *sq)),
        }
    }
    if !expert_groups.is_empty() {
        // One sum over the ranks of [all experts, each layer's experts].
        let one = [Dim::known(1)];
        let mut parts = Vec::with_capacity(expert_groups.len() + 1);
        let mut all = None;
        for (_, s) in &expert_groups {
            all = Some(match all {
                None => *s,
                Some(t) => b.bin(BinaryOp::Add, t, *s)?,
            });
        }
        for s in all.iter().chain(expert_groups.iter().map(|(_, s)| s)) {
            parts.push(b.node(Op::Reshape { shape: one.to_vec() }, &[*s])?);
        }
        let n = parts.len();
        let cat = b.node(Op::Concat { axis: 0 }, &parts)?;
        let summed = b.node(Op::AllReduce { group: crate::expert_parallel::EP_GROUP.into() }, &[cat])?;
        let split = Op::Split { axis: 0, sizes: vec![1; n] };
        let tys = [b.g.ty(summed)];
        let types = kiln_ir::infer::infer(&split, &tys).map_err(|e| TrainError::Internal(e.to_string()))?;
        let (_, sums) = (b.g.add_node(split, &[summed], types, Some("optimizer")))
            .map_err(|e| TrainError::Internal(e.to_string()))?;
        let mut sums = sums.into_iter();
        let scalar = |b: &mut B, v: ValueId| b.node(Op::Reshape { shape: Vec::new() }, &[v]);
        let all = scalar(&mut b, sums.next().expect("one part per sum"))?;
        total = Some(match total {
            None => all,
            Some(t) => b.bin(BinaryOp::Add, t, all)?,
        });
        for ((layer, _), s) in expert_groups.iter().zip(sums) {
            let s = scalar(&mut b, s)?;
            match groups.iter_mut().find(|(l, _)| l == layer) {
                Some((_, sum)) => *sum = b.bin(BinaryOp::Add, *sum, s)?,
                None => groups.push((layer.clone(), s)),
            }
        }
    }
    let mut layer_norms = Vec::with_capacity(groups.len());
    for (layer, sum) in groups {
        layer_norms.push((format!("{GRAD_NORM_PREFIX}{layer}"), b.un(UnaryOp::Sqrt, sum)?));
    }
    // A pipeline rank holds some of the parameters: the ranks' sums make the global norm, and the
    // loss is the last stage's (the others add 0).
    // One sum of both, so that every rank sums the same values in the same message.
    if let Some(copies) = pipeline {
        let t = match total {
            Some(t) => t,
            None => b.c(0.0)?,
        };
        let one = [Dim::known(1)];
        let t1 = b.node(Op::Reshape { shape: one.to_vec() }, &[t])?;
        let l1 = b.node(Op::Reshape { shape: one.to_vec() }, &[loss])?;
        let both = b.node(Op::Concat { axis: 0 }, &[t1, l1])?;
        let summed = b.node(Op::AllReduce { group: PP_GROUP.into() }, &[both])?;
        let tys = [b.g.ty(summed)];
        let split = Op::Split { axis: 0, sizes: vec![1, 1] };
        let types = kiln_ir::infer::infer(&split, &tys).map_err(|e| TrainError::Internal(e.to_string()))?;
        let (_, parts) = (b.g.add_node(split, &[summed], types, Some("optimizer")))
            .map_err(|e| TrainError::Internal(e.to_string()))?;
        let (mut t, mut l) = (parts[0], parts[1]);
        // Every stage held by `copies` ranks (DualPipe's two directions) is counted that often.
        if copies > 1 {
            let share = b.c(1.0 / f64::from(copies))?;
            t = b.bin(BinaryOp::Mul, t, share)?;
            l = b.bin(BinaryOp::Mul, l, share)?;
        }
        total = Some(b.node(Op::Reshape { shape: Vec::new() }, &[t])?);
        loss = b.node(Op::Reshape { shape: Vec::new() }, &[l])?;
    }
    let zero = b.c(0.0)?;
    let norm = match total {
        Some(t) => b.un(UnaryOp::Sqrt, t)?,
        None => zero,
    };
    let coef = match opt.clip {
        Some(max) => {
            let max = b.c(max)?;
            let tiny = b.c(1e-6)?;
            let den = b.bin(BinaryOp::Add, norm, tiny)?;
            let c = b.bin(BinaryOp::Div, max, den)?;
            let one = b.c(1.0)?;
            Some(b.bin(BinaryOp::Min, c, one)?)
        }
        None => None,
    };
    // t += 1; the bias corrections 1 - b^t = 1 - exp(t ln b).
    let one = b.c(1.0)?;
    let t = b.bin(BinaryOp::Add, step, one)?;
    let bc = |b: &mut B, beta: f64| -> Result<ValueId, TrainError> {
        let ln = b.c(beta.ln())?;
        let e = b.bin(BinaryOp::Mul, t, ln)?;
        let p = b.un(UnaryOp::Exp, e)?;
        b.bin(BinaryOp::Sub, one, p)
    };
    let bc1 = bc(&mut b, opt.beta1)?;
    let bc2 = bc(&mut b, opt.beta2)?;
    let step_size = b.bin(BinaryOp::Div, lr, bc1)?;
    let bc2_sqrt = b.un(UnaryOp::Sqrt, bc2)?;
    let decay = {
        let wd = b.c(opt.weight_decay)?;
        let lw = b.bin(BinaryOp::Mul, lr, wd)?;
        b.bin(BinaryOp::Sub, one, lw)?
    };
    let (b1c, b2, b2c, eps) = (b.c(1.0 - opt.beta1)?, b.c(opt.beta2)?, b.c(1.0 - opt.beta2)?, b.c(opt.eps)?);
    let mut updates: Vec<(String, ValueId)> = Vec::new();
    // ZeRO-1: this replica's rank picks its shard of every tensor (see `Sharding`). Under expert
    // parallelism the replicated weights' states are split over every process, and a routed
    // expert's over the `opt.shards / ep` processes that hold it (none when they are one).
    let rank_input = |b: &mut B, name: &str| {
        b.declared(Op::Input { name: name.into() }, TensorType::new(DType::I32, [Dim::known(1)]))
    };
    let shards = match opt.shards {
        1 => None,
        n => Some(Sharding { n: u64::from(n), rank: rank_input(&mut b, DP_RANK)?, group: DP_GROUP }),
    };
    let expert_shards = match (shards, experts) {
        (Some(s), Some(ep)) if s.n % ep != 0 => {
            return Err(TrainError::Setting(format!(
            "AdamW's states are split over {} processes, which the {ep} expert-parallel ranks do not divide",
            s.n
        )))
        }
        (Some(s), Some(ep)) if s.n / ep > 1 => Some(Sharding {
            n: s.n / ep,
            rank: rank_input(&mut b, EDP_RANK)?,
            group: crate::expert_parallel::EXPERT_DP_GROUP,
        }),
        _ => None,
    };
    let mut gathers = Vec::new();
    for (name, p, d) in &trained {
        let ty = b.g.ty(*p).clone();
        let numel = ty.known_numel().ok_or_else(|| TrainError::Internal(format!("`{name}` is not sized")))?;
        // Under expert parallelism a routed expert's states are the rank's share of the experts
        // already: ZeRO-1 splits the replicated weights' states over every process, and an
        // expert's over the processes that hold it (DeepSeek-V3 §3.2.2: EP for the experts,
        // ZeRO-1 DP for the rest).
        let own = experts.is_some() && crate::expert_parallel::is_routed_expert(name);
        let split = if own { expert_shards } else { shards };
        let shard = split.map(|s| (s, numel.div_ceil(s.n)));
        // The states' type: the weight's, or one shard of it, flat.
        let state_ty = |dtype| match shard {
            None => TensorType { dtype, ..ty.clone() },
            Some((_, m)) => TensorType::new(dtype, [Dim::known(m)]),
        };
        let f32_ty = state_ty(DType::F32);
        // Weights stored in a narrower dtype are updated in an f32 master copy, and the stored
        // weight is the master rounded (DeepSeek-V3 §3.3.1, reference §4.1).
        let master = match ty.dtype {
            DType::F32 => None,
            _ => {
                let mn = master_of(name);
                let m = b.declared(Op::Input { name: mn.clone() }, f32_ty.clone())?;
                states.push(StateDecl {
                    name: mn.clone(),
                    ty: f32_ty.clone(),
                    role: StateRole::MasterWeight,
                });
                Some((mn, m))
            }
        };
        let p = &match (&master, shard) {
            (Some((_, m)), _) => *m,
            (None, Some((s, _))) => s.take(&mut b, *p, numel)?,
            (None, None) => *p,
        };
        let moment_ty = state_ty(opt.moments);
        let (mn, vn) = (format!("adam.m.{name}"), format!("adam.v.{name}"));
        let m_stored = b.declared(Op::Input { name: mn.clone() }, moment_ty.clone())?;
        let v_stored = b.declared(Op::Input { name: vn.clone() }, moment_ty.clone())?;
        let (m, v) = (b.f32(m_stored)?, b.f32(v_stored)?);
        // With split states, this replica's shard of the gradient, computed on the shard.
        let sharded = match (coef, shard) {
            (Some(c), Some((s, _))) => match recomputed_shard(&mut b, *d, &kept, s, numel)? {
                Some(d) => Some(b.bin(BinaryOp::Mul, d, c)?),
                None => None,
            },
            _ => None,
        };
        let g = match sharded {
            Some(g) => g,
            None => {
                let d = match coef {
                    // The norm read `d` first: the update reads a copy where one is cheap
                    // (`recomputed`).
                    Some(_) => recomputed(&mut b, *d, &kept)?.unwrap_or(*d),
                    None => *d,
                };
                let g = match coef {
                    Some(c) => b.bin(BinaryOp::Mul, d, c)?,
                    None => d,
                };
                match shard {
                    Some((s, _)) => s.take(&mut b, g, numel)?,
                    None => g,
                }
            }
        };
        // p *= 1 - lr wd.
        let p1 = b.bin(BinaryOp::Mul, *p, decay)?;
        // m = m + (1 - b1) (g - m).
        let gm = b.bin(BinaryOp::Sub, g, m)?;
        let w = b.bin(BinaryOp::Mul, gm, b1c)?;
        let m1 = b.bin(BinaryOp::Add, m, w)?;
        // v = b2 v + (1 - b2) g g.
        let vb = b.bin(BinaryOp::Mul, v, b2)?;
        let gg = b.bin(BinaryOp::Mul, g, g)?;
        let gg = b.bin(BinaryOp::Mul, gg, b2c)?;
        let v1 = b.bin(BinaryOp::Add, vb, gg)?;
        // p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps).
        let sv = b.un(UnaryOp::Sqrt, v1)?;
        let den = b.bin(BinaryOp::Div, sv, bc2_sqrt)?;
        let den = b.bin(BinaryOp::Add, den, eps)?;
        let q = b.bin(BinaryOp::Div, m1, den)?;
        let s = b.bin(BinaryOp::Mul, q, step_size)?;
        let p2 = b.bin(BinaryOp::Sub, p1, s)?;
        match (master, shard) {
            (Some((master, _)), None) => {
                let stored = b.node(Op::Cast { to: ty.dtype }, &[p2])?;
                updates.push((name.clone(), stored));
                updates.push((master, p2));
            }
            (None, None) => updates.push((name.clone(), p2)),
            // The whole weight is gathered from every replica's shard after the loop.
            (master, Some((s, _))) => {
                gathers.push((name.clone(), p2, ty.clone(), s));
                if let Some((master, _)) = master {
                    updates.push((master, p2));
                }
            }
        }
        let stored = |b: &mut B, x: ValueId| match opt.moments {
            DType::F32 => Ok(x),
            to => b.node(Op::Cast { to }, &[x]),
        };
        updates.push((mn.clone(), stored(&mut b, m1)?));
        updates.push((vn.clone(), stored(&mut b, v1)?));
        states.push(StateDecl { name: name.clone(), ty: ty.clone(), role: StateRole::Trainable });
        states.push(StateDecl { name: mn, ty: moment_ty.clone(), role: StateRole::OptimizerMoment });
        states.push(StateDecl { name: vn, ty: moment_ty, role: StateRole::OptimizerMoment });
    }
    // Every gather one after the other, so that the runtime sends them as one message, then the
    // whole weights (rounded to their stored dtype).
    let mut all = Vec::with_capacity(gathers.len());
    for (_, p2, _, s) in &gathers {
        all.push(b.node(Op::AllGather { group: s.group.into(), size: s.n }, &[*p2])?);
    }
    for ((name, _, ty, s), all) in gathers.into_iter().zip(all) {
        let whole = s.whole(&mut b, all, &ty)?;
        let stored = match ty.dtype {
            DType::F32 => whole,
            to => b.node(Op::Cast { to }, &[whole])?,
        };
        updates.push((name, stored));
    }
    let add = |g: &mut Graph, n: &str, v: ValueId| {
        g.add_output(n, v).map_err(|e| TrainError::Internal(e.to_string()))
    };
    add(&mut g, LOSS, loss)?;
    add(&mut g, GRAD_NORM, norm)?;
    add(&mut g, STEP, t)?;
    for (n, v) in layer_norms {
        add(&mut g, &n, v)?;
    }
    for (n, v) in updates.into_iter().chain(summed_in_place) {
        add(&mut g, &n, v)?;
    }
    kiln_ir::verify::verify(&g).map_err(|e| TrainError::Internal(e.to_string()))?;
    Ok((g, states))
}

/// The communication group of a pipeline's ranks.
pub const PP_GROUP: &str = kiln_ir::module::PP_GROUP;

/// A MoE router of a pipeline rank's stages: the scope its load is counted under
/// (`load.acc.{scope}`), its selection bias state and the number of experts.
#[derive(Clone, Debug, PartialEq)]
pub struct StageRouter {
    pub scope: String,
    pub bias: Option<String>,
    pub experts: u64,
}

/// The optimizer step of a pipeline rank, after every micro-batch of the step ran through its
/// stages' programs (`crate::pipeline`) and added into the accumulators: the gradients of
/// `params` (name and type) are `grad.acc.{p} / micro_batches`, the loss `loss.acc /
/// micro_batches` on the rank that holds the head (`head`), and [`step_program`] updates them as
/// one process would, with the global norm's squared sum and the loss summed over the pipeline's
/// ranks ([`PP_GROUP`]) and divided by `copies`, the ranks that hold each stage (2 in DualPipe,
/// whose partner ranks sum their accumulators first). Each router's load over the step is output
/// as `load.{scope}`, and with `bias_update_speed` > 0 its bias moves by the rule of
/// `build::balance`.
///
/// With `data_parallel`, the pipeline is one replica of several, each running its own rows
/// through its own copy of the stages: the accumulators, the loss and the loads are first summed
/// over the replicas' ranks of the same stages ([`DP_GROUP`], one message), and the caller gives
/// `micro_batches` as the micro-batches of all the replicas together. Every replica then makes the
/// same update, and the pp sums that follow add identical values on every replica. With
/// `opt.shards` = the replicas, each replica keeps and updates its shard of AdamW's states
/// (ZeRO-1), as [`step_program`] does for a data-parallel step. With `experts` ranks of expert
/// parallelism (each `experts` consecutive replicas splitting the routed experts), a routed
/// expert's accumulator is summed over the replicas holding the same experts instead, and the
/// experts' squared sums over the expert-parallel ranks.
#[allow(clippy::too_many_arguments)]
pub fn pipeline_update(
    params: &[(String, TensorType)],
    routers: &[StageRouter],
    head: bool,
    copies: u32,
    opt: &Optimizer,
    bias_update_speed: f64,
    data_parallel: bool,
    experts: Option<u64>,
) -> Result<Graph, TrainError> {
    let experts = experts.filter(|&e| e > 1);
    let mut g = Graph::new("update");
    let mut b = B { g: &mut g };
    let count = b.declared(Op::Input { name: MICRO_BATCHES.into() }, TensorType::scalar(DType::F32))?;
    let one = b.c(1.0)?;
    let scale = b.bin(BinaryOp::Div, one, count)?;
    // The step's sums: each parameter's accumulator, the loss on the head's rank, each router's
    // load. Declared first, then summed over the replicas one after the other (one message).
    let mut accs = Vec::with_capacity(params.len());
    for (name, ty) in params {
        b.declared(Op::Param { name: name.clone() }, ty.clone())?;
        let f32_ty = TensorType { dtype: DType::F32, ..ty.clone() };
        accs.push(b.declared(Op::Input { name: grad_acc(name) }, f32_ty)?);
    }
    let mut loss_acc = match head {
        true => Some(b.declared(Op::Input { name: LOSS_ACC.into() }, TensorType::scalar(DType::F32))?),
        false => None,
    };
    let mut loads = Vec::with_capacity(routers.len());
    for r in routers {
        let ty = TensorType::known(DType::F32, &[r.experts]);
        loads.push(b.declared(Op::Input { name: format!("{LOAD_ACC_PREFIX}{}", r.scope) }, ty)?);
    }
    if data_parallel {
        // A routed expert's sums go over the replicas holding the same experts (expert parallelism).
        let expert = |i: usize| {
            experts.is_some()
                && params.get(i).is_some_and(|(n, _)| crate::expert_parallel::is_routed_expert(n))
        };
        for (i, v) in accs.iter_mut().chain(loss_acc.iter_mut()).chain(loads.iter_mut()).enumerate() {
            let group = if expert(i) { crate::expert_parallel::EXPERT_DP_GROUP } else { DP_GROUP };
            *v = b.node(Op::AllReduce { group: group.into() }, &[*v])?;
        }
    }
    // Each accumulator's sum over the replicas is written over the accumulator itself (nothing
    // reads the rank's own sum after it), not held in the arena beside it until the update.
    let summed_in_place: Vec<(String, ValueId)> = match data_parallel {
        true => params.iter().zip(&accs).map(|((name, _), &v)| (grad_acc(name), v)).collect(),
        false => Vec::new(),
    };
    let mut outputs = Vec::new();
    for ((name, _), acc) in params.iter().zip(&accs) {
        outputs.push((format!("{GRAD_PREFIX}{name}"), b.bin(BinaryOp::Mul, *acc, scale)?));
    }
    let loss = match loss_acc {
        Some(acc) => b.bin(BinaryOp::Mul, acc, scale)?,
        // 0, computed (a constant has no buffer for the sum over the ranks to read).
        None => {
            let zero = b.c(0.0)?;
            b.bin(BinaryOp::Mul, count, zero)?
        }
    };
    outputs.push((LOSS.into(), loss));
    for (r, &load) in routers.iter().zip(&loads) {
        let ty = TensorType::known(DType::F32, &[r.experts]);
        // A copy: an output cannot be a state's storage under another name.
        let copy = b.bin(BinaryOp::Mul, load, one)?;
        outputs.push((format!("{LOAD_PREFIX}{}", r.scope), copy));
        if let (Some(name), true) = (&r.bias, bias_update_speed > 0.0) {
            let bias = b.declared(Op::Input { name: name.clone() }, ty)?;
            let moved =
                crate::build::balance::moved_bias(b.g, &r.scope, load, bias, r.experts, bias_update_speed)
                    .map_err(|e| TrainError::Internal(e.to_string()))?;
            outputs.push((name.clone(), moved));
        }
    }
    for (n, v) in outputs {
        g.add_output(n, v).map_err(|e| TrainError::Internal(e.to_string()))?;
    }
    // With `data_parallel`, the sums are done; the step may still split AdamW's states over the
    // replicas (ZeRO-1, `opt.shards`).
    let (mut step, _) = step_program(&g, &[], opt, false, data_parallel, Some(copies), experts)?;
    for (n, v) in summed_in_place {
        step.add_output(n, v).map_err(|e| TrainError::Internal(e.to_string()))?;
    }
    Ok(step)
}

/// The programs of training a model spec, with the states they declare.
#[derive(Clone, Debug)]
pub struct TrainPrograms {
    /// `train_step`: the whole step, or with [`TrainPrograms::accumulate`] a split step's last
    /// micro-batch ([`train_step_last`]).
    pub step: Graph,
    /// `accumulate`: a split step's earlier micro-batches ([`accumulate_step`]), when asked for.
    pub accumulate: Option<Graph>,
    pub states: Vec<StateDecl>,
}

/// The train-step program of a model spec: [`crate::build::build_train`] with `losses`,
/// [`crate::autodiff::differentiate`], then [`train_step`]; its states include the routers'
/// selection biases (`routing_bias`), which the balancing rule moves (or keeps, at γ = 0). With
/// `accumulate`, the programs of a step split into micro-batches: [`accumulate_step`] and
/// [`train_step_last`]. With `data_parallel`, the step is one replica's of several (see
/// [`step_program`]): the gradients, the loss and the routers' loads are summed over
/// [`DP_GROUP`] before they are used.
pub fn program(
    spec: &kiln_ir::ModelSpec,
    losses: &crate::build::TrainLosses,
    opt: &Optimizer,
    accumulate: bool,
    data_parallel: bool,
    expert_parallel: Option<u64>,
) -> Result<TrainPrograms, ProgramError> {
    use crate::build::build_train_part;
    use crate::expert_parallel as ep_split;
    // Expert-parallel ranks train on their own rows: they are data-parallel replicas for every
    // weight but the routed experts.
    let experts = expert_parallel.filter(|&e| e > 1);
    let data_parallel = data_parallel || experts.is_some();
    let differentiate = |part| -> Result<_, ProgramError> {
        let (mut forward, info) = build_train_part(spec, losses, part, data_parallel)?;
        if let Some(ep) = experts {
            forward = match ep_split::split_tokens(&forward, ep)? {
                Some((g, _)) => g,
                None => {
                    return Err(ProgramError::Train(TrainError::Setting(format!(
                        "--ep {ep}: model `{}` has no routed experts to split",
                        spec.model.name
                    ))))
                }
            };
        }
        Ok((crate::autodiff::differentiate(&forward, LOSS)?, info))
    };
    let (step, mut states, info, accumulate) = if accumulate {
        let (grads, info) = differentiate(Part::Last)?;
        let (step, mut states) = step_program(&grads, &[], opt, true, data_parallel, None, experts)?;
        let (acc, acc_states) = accumulate_step(&differentiate(Part::Accumulate)?.0, &[])?;
        // Both programs declare the accumulators; the module holds each once.
        for s in acc_states {
            if !states.iter().any(|d| d.name == s.name) {
                states.push(s);
            }
        }
        (step, states, info, Some(acc))
    } else {
        let (grads, info) = differentiate(Part::Whole)?;
        let (step, states) = step_program(&grads, &[], opt, false, data_parallel, None, experts)?;
        (step, states, info, None)
    };
    states.extend(info.biases.into_iter().map(|(name, ty)| StateDecl {
        name,
        ty,
        role: StateRole::RoutingBias,
    }));
    if experts.is_some() {
        // The rank, which the runtime writes (as for inference's expert-parallel copies).
        let ty = TensorType::scalar(DType::F32);
        states.push(StateDecl { name: ep_split::EP_RANK.into(), ty, role: StateRole::Counter });
    }
    Ok(TrainPrograms { step, accumulate, states })
}

/// Why [`program`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error(transparent)]
    Build(#[from] crate::build::BuildError),
    #[error(transparent)]
    Autodiff(#[from] crate::autodiff::AutodiffError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Split(#[from] crate::expert_parallel::SplitError),
}

fn output(g: &Graph, name: &str) -> Result<ValueId, TrainError> {
    g.outputs()
        .iter()
        .find(|(n, _)| n == name)
        .map(|&(_, v)| v)
        .ok_or_else(|| TrainError::Missing(name.into()))
}
