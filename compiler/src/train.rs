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
//!   `grad_norm`, and `loss`;
//! - AdamW as `torch.optim.AdamW` (torch 2.15, `_single_tensor_adam`) computes it, in this order:
//!   `p *= 1 - lr * wd`; `m = m + (1 - b1) * (g - m)` (`lerp`); `v = b2 * v + (1 - b2) * g * g`;
//!   `t += 1`; `bc1 = 1 - b1^t`, `bc2 = 1 - b2^t`; `p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`.
//!   Powers are `exp(t * ln b)` in f32.
//!
//! Parameters listed as frozen stay parameters and get no update (the router's selection bias is
//! state that the balancing rule moves, not a trained weight). What it does not do yet: gradient
//! accumulation over micro-batches, BF16 moments, FP32 master copies of BF16 weights.

use kiln_ir::module::{StateDecl, StateRole};
use kiln_ir::{BinaryOp, DType, Graph, Op, ReduceOp, TensorType, UnaryOp, ValueId};

use crate::autodiff::{GRAD_PREFIX, LOSS};

/// The output holding the global gradient norm before clipping.
pub const GRAD_NORM: &str = "grad_norm";
/// The caller input holding the learning rate of the step.
pub const LR: &str = "lr";
/// The step counter state.
pub const STEP: &str = "adam.step";

/// AdamW's and clipping's hyperparameters, with torch's meaning.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Optimizer {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// The global-norm bound; `None` for no clipping.
    pub clip: Option<f64>,
}

impl Default for Optimizer {
    /// DeepSeek-V3's (reference §4.2): betas 0.9 / 0.95, weight decay 0.1, clipping at 1.0.
    fn default() -> Optimizer {
        Optimizer { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, clip: Some(1.0) }
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
}

/// The train-step program from a differentiated graph; returns it with the states it declares.
/// See the module documentation.
pub fn train_step(
    grads: &Graph,
    frozen: &[&str],
    opt: &Optimizer,
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
    if opt.clip.is_some_and(|c| !(c > 0.0 && c.is_finite())) {
        return Err(TrainError::Setting(format!("the clipping norm must be positive, found {:?}", opt.clip)));
    }
    let mut g = grads.clone();
    let loss = output(&g, LOSS)?;
    // The trained parameters, in graph order, with their gradients.
    let mut trained: Vec<(String, ValueId, ValueId)> = Vec::new();
    for n in g.nodes() {
        let Op::Param { name } = &g.node(n).op else { continue };
        if frozen.contains(&name.as_str()) {
            continue;
        }
        let Some(d) = g.outputs().iter().find(|(o, _)| *o == format!("{GRAD_PREFIX}{name}")).map(|&(_, d)| d)
        else {
            continue;
        };
        let (name, v) = (name.clone(), g.node(n).results[0]);
        *g.node_mut_op(n) = Op::Input { name: name.clone() };
        trained.push((name, v, d));
    }
    // The gradients are consumed here; the forward graph's other outputs (expert loads, the
    // routers' bias updates) stay.
    for name in g.outputs().iter().map(|(n, _)| n.clone()).collect::<Vec<_>>() {
        if name == LOSS || name.starts_with(GRAD_PREFIX) {
            g.remove_output(&name);
        }
    }
    let mut states = Vec::new();
    let mut b = B { g: &mut g };
    let lr = b.declared(Op::Input { name: LR.into() }, TensorType::scalar(DType::F32))?;
    let step = b.declared(Op::Input { name: STEP.into() }, TensorType::scalar(DType::F32))?;
    states.push(StateDecl {
        name: STEP.into(),
        ty: TensorType::scalar(DType::F32),
        role: StateRole::Counter,
    });

    // The global norm over every trained gradient, and the clipped gradients.
    let mut total = None;
    for (_, _, d) in &trained {
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
        total = Some(match total {
            None => s,
            Some(t) => b.bin(BinaryOp::Add, t, s)?,
        });
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
    for (name, p, d) in &trained {
        let ty = b.g.ty(*p).clone();
        let (mn, vn) = (format!("adam.m.{name}"), format!("adam.v.{name}"));
        let m = b.declared(Op::Input { name: mn.clone() }, ty.clone())?;
        let v = b.declared(Op::Input { name: vn.clone() }, ty.clone())?;
        let g = match coef {
            Some(c) => b.bin(BinaryOp::Mul, *d, c)?,
            None => *d,
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
        updates.push((name.clone(), p2));
        updates.push((mn.clone(), m1));
        updates.push((vn.clone(), v1));
        states.push(StateDecl { name: name.clone(), ty: ty.clone(), role: StateRole::Trainable });
        states.push(StateDecl { name: mn, ty: ty.clone(), role: StateRole::OptimizerMoment });
        states.push(StateDecl { name: vn, ty, role: StateRole::OptimizerMoment });
    }
    let add = |g: &mut Graph, n: &str, v: ValueId| {
        g.add_output(n, v).map_err(|e| TrainError::Internal(e.to_string()))
    };
    add(&mut g, LOSS, loss)?;
    add(&mut g, GRAD_NORM, norm)?;
    add(&mut g, STEP, t)?;
    for (n, v) in updates {
        add(&mut g, &n, v)?;
    }
    kiln_ir::verify::verify(&g).map_err(|e| TrainError::Internal(e.to_string()))?;
    Ok((g, states))
}

/// The train-step program of a model spec: [`crate::build::build_train`] with `losses`,
/// [`crate::autodiff::differentiate`], then [`train_step`]; its states include the routers'
/// selection biases (`routing_bias`), which the balancing rule moves (or keeps, at γ = 0).
pub fn program(
    spec: &kiln_ir::ModelSpec,
    losses: &crate::build::TrainLosses,
    opt: &Optimizer,
) -> Result<(Graph, Vec<StateDecl>), ProgramError> {
    let (forward, info) = crate::build::build_train(spec, losses)?;
    let grads = crate::autodiff::differentiate(&forward, LOSS)?;
    let (g, mut states) = train_step(&grads, &[], opt)?;
    states.extend(info.biases.into_iter().map(|(name, ty)| StateDecl {
        name,
        ty,
        role: StateRole::RoutingBias,
    }));
    Ok((g, states))
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
}

fn output(g: &Graph, name: &str) -> Result<ValueId, TrainError> {
    g.outputs()
        .iter()
        .find(|(n, _)| n == name)
        .map(|&(_, v)| v)
        .ok_or_else(|| TrainError::Missing(name.into()))
}
