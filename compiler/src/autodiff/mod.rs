//! `autodiff`: reverse-mode differentiation over the graph IR.
//!
//! [`differentiate`] takes a forward graph with a scalar loss output and returns one graph that
//! computes the loss and the gradient of the loss with respect to every parameter it reads: the
//! forward nodes as they were, then the backward nodes, outputs `loss` and `grad.{parameter}`
//! (parameters the loss does not depend on have no gradient output) after the forward graph's
//! other outputs, which stay. It runs on the high-level
//! forward graph, before `insert-fp8-casts` and `fuse-kernels`, so those passes see the backward
//! graph too.
//!
//! The backward graph is built by vector-Jacobian rules, one per op family, each in its own file
//! under `rules/` as the interpreter's ops are. A rule gets the op, its operands and results and
//! the gradient of each result (`None` where nothing downstream depends on it) and adds the nodes
//! that compute the gradient of each operand (`None` for integer operands and for operands the
//! result does not depend on differentiably, such as token ids or the indices a top-k selects).
//! Gradients that reach a value by several paths are summed. A rule may express an op's gradient
//! by recomputing it from differentiable ops and differentiating those
//! ([`Cx::vjp_of_composite`]): the router's weights, for instance, are recomputed from the
//! sigmoid scores at the selected indices, so the gradient flows through the selected scores, the
//! normalisation and the scaling, as PyTorch's autograd does for DeepSeek's `MoEGate`.
//!
//! Backward nodes keep the scope of the forward node they differentiate, so profiles and reports
//! attribute them to the same module.
//!
//! Guarantees: the result verifies; every rule is checked against central finite differences of
//! the interpreter (`tests/autodiff/*.kir`, run by `tests/it/autodiff.rs`). What it does not do:
//! second derivatives, gradients of integer values, ops that only appear after the pass pipeline
//! (`fused`, `moe_dispatch` and the rest are differentiated before they exist), or in-place state
//! (`cache_update`: training programs have no KV cache); an op without a rule is a typed error
//! naming it.

mod rules;

use std::collections::HashMap;

use kiln_ir::infer::infer;
use kiln_ir::verify::{verify, VerifyError};
use kiln_ir::{BinaryOp, DType, Dim, Graph, NodeId, Op, ReduceOp, TensorType, UnaryOp, ValueId};

/// The prefix of each gradient output: `grad.model.embed_tokens.weight`.
pub const GRAD_PREFIX: &str = "grad.";
/// The loss output of a differentiated graph.
pub const LOSS: &str = "loss";

/// Why a graph could not be differentiated.
#[derive(Debug, thiserror::Error)]
pub enum AutodiffError {
    #[error("the graph has no output `{0}` to differentiate")]
    NoLoss(String),
    #[error("the loss `{name}` must be a scalar f32 (`f32[]`), found {ty}")]
    LossType { name: String, ty: TensorType },
    #[error("autodiff has no rule for `{op}` ({why})")]
    NoRule { op: &'static str, why: String },
    /// A node the pass built does not type-check: a kiln bug.
    #[error("internal error: a backward node does not type-check: {0} (a kiln bug; please report it)")]
    Internal(String),
    #[error("internal error: the differentiated graph is invalid (a kiln bug; please report it)\n{0}")]
    Invalid(VerifyError),
}

/// The graph being extended with backward nodes, and the scope new nodes get.
pub struct Cx<'g> {
    pub g: &'g mut Graph,
    scope: Option<String>,
}

impl Cx<'_> {
    /// Adds `op` on `inputs` with the types shape inference gives; returns its results.
    pub fn node(&mut self, op: Op, inputs: &[ValueId]) -> Result<Vec<ValueId>, AutodiffError> {
        let tys: Vec<&TensorType> = inputs.iter().map(|&v| self.g.ty(v)).collect();
        let name = op.name();
        let types = infer(&op, &tys).map_err(|e| AutodiffError::Internal(format!("`{name}`: {e}")))?;
        let (_, results) = self
            .g
            .add_node(op, inputs, types, self.scope.as_deref())
            .map_err(|e| AutodiffError::Internal(e.to_string()))?;
        Ok(results)
    }

    /// [`Cx::node`] for an op with one result.
    pub fn op(&mut self, op: Op, inputs: &[ValueId]) -> Result<ValueId, AutodiffError> {
        Ok(self.node(op, inputs)?[0])
    }

    pub fn ty(&self, v: ValueId) -> TensorType {
        self.g.ty(v).clone()
    }

    pub fn unary(&mut self, op: UnaryOp, x: ValueId) -> Result<ValueId, AutodiffError> {
        self.op(Op::Unary(op), &[x])
    }

    pub fn binary(&mut self, op: BinaryOp, a: ValueId, b: ValueId) -> Result<ValueId, AutodiffError> {
        self.op(Op::Binary(op), &[a, b])
    }

    pub fn add(&mut self, a: ValueId, b: ValueId) -> Result<ValueId, AutodiffError> {
        self.binary(BinaryOp::Add, a, b)
    }

    pub fn sub(&mut self, a: ValueId, b: ValueId) -> Result<ValueId, AutodiffError> {
        self.binary(BinaryOp::Sub, a, b)
    }

    pub fn mul(&mut self, a: ValueId, b: ValueId) -> Result<ValueId, AutodiffError> {
        self.binary(BinaryOp::Mul, a, b)
    }

    pub fn div(&mut self, a: ValueId, b: ValueId) -> Result<ValueId, AutodiffError> {
        self.binary(BinaryOp::Div, a, b)
    }

    pub fn neg(&mut self, x: ValueId) -> Result<ValueId, AutodiffError> {
        self.unary(UnaryOp::Neg, x)
    }

    /// A scalar constant of `dtype` (broadcast by the binary ops that read it).
    pub fn scalar(&mut self, value: f64, dtype: DType) -> Result<ValueId, AutodiffError> {
        let (_, r) = self
            .g
            .add_node(Op::Constant { value }, &[], vec![TensorType::scalar(dtype)], self.scope.as_deref())
            .map_err(|e| AutodiffError::Internal(e.to_string()))?;
        Ok(r[0])
    }

    /// Zeros of type `ty` (a scalar broadcast to the shape).
    pub fn zeros(&mut self, ty: &TensorType) -> Result<ValueId, AutodiffError> {
        let z = self.scalar(0.0, ty.dtype)?;
        if ty.shape.is_empty() {
            return Ok(z);
        }
        self.op(Op::Broadcast { shape: ty.shape.clone() }, &[z])
    }

    /// `x` summed over every axis where `to` is broadcast (a missing leading axis, or a 1 against
    /// a larger size) and reshaped to `to`: the gradient of a NumPy-style broadcast.
    pub fn unbroadcast(&mut self, x: ValueId, to: &[Dim]) -> Result<ValueId, AutodiffError> {
        let from = self.ty(x).shape;
        if from == to {
            return Ok(x);
        }
        let lead = from.len() - to.len();
        let axes: Vec<usize> = (0..from.len())
            .filter(|&i| i < lead || (to[i - lead] == Dim::known(1) && from[i] != Dim::known(1)))
            .collect();
        let summed = if axes.is_empty() {
            x
        } else {
            self.op(Op::Reduce { op: ReduceOp::Sum, axes, keep_dims: true }, &[x])?
        };
        self.op(Op::Reshape { shape: to.to_vec() }, &[summed])
    }

    /// A mark before a rule adds a recomputation, for [`Cx::vjp_of_composite`].
    pub fn mark(&self) -> u32 {
        self.g.value_bound()
    }

    /// The gradients of `inputs` given the gradients `dys` of `outputs`, where `outputs` were
    /// computed from `inputs` by the nodes added since `mark` (a recomputation in differentiable
    /// ops): reverse mode over those nodes. `None` for an input the outputs do not depend on.
    pub fn vjp_of_composite(
        &mut self,
        mark: u32,
        inputs: &[ValueId],
        outputs: &[ValueId],
        dys: &[Option<ValueId>],
    ) -> Result<Vec<Option<ValueId>>, AutodiffError> {
        let mut grads: HashMap<ValueId, ValueId> = HashMap::new();
        for (&y, dy) in outputs.iter().zip(dys) {
            if let Some(d) = dy {
                accumulate(self, &mut grads, y, *d)?;
            }
        }
        // Value ids are handed out in order, so the nodes since the mark, by their first result,
        // are in the order they were added: a topological order.
        let mut region: Vec<NodeId> = Vec::new();
        for v in mark..self.g.value_bound() {
            let v = ValueId::new(v);
            if self.g.contains_value(v) {
                let n = self.g.producer(v);
                if region.last() != Some(&n) {
                    region.push(n);
                }
            }
        }
        let scope = self.scope.clone();
        backprop(self, &region, inputs, &mut grads)?;
        self.scope = scope;
        Ok(inputs.iter().map(|v| grads.get(v).copied()).collect())
    }
}

/// Adds `d` to the gradient of `v` (the first gradient is taken as it is).
fn accumulate(
    cx: &mut Cx,
    grads: &mut HashMap<ValueId, ValueId>,
    v: ValueId,
    d: ValueId,
) -> Result<(), AutodiffError> {
    let sum = match grads.get(&v) {
        Some(&old) => cx.add(old, d)?,
        None => d,
    };
    grads.insert(v, sum);
    Ok(())
}

/// Reverse mode over `nodes` (in forward order), starting from the gradients in `grads`, which it
/// extends with the gradient of every value those nodes read that depends on a parameter or on
/// one of `roots`.
fn backprop(
    cx: &mut Cx,
    nodes: &[NodeId],
    roots: &[ValueId],
    grads: &mut HashMap<ValueId, ValueId>,
) -> Result<(), AutodiffError> {
    // The float values that depend on a parameter (or on an operand of a composite) through float
    // values: no gradient flows into the others (an expert-parallel rank's masks, computed from its rank, say), so no rule
    // runs for them.
    let mut trained: std::collections::HashSet<ValueId> = roots.iter().copied().collect();
    for &n in nodes {
        let node = cx.g.node(n);
        if matches!(node.op, Op::Param { .. }) || node.inputs.iter().any(|x| trained.contains(x)) {
            // An integer carries no gradient (expert ids), nor what is computed from it alone.
            trained.extend(node.results.iter().copied().filter(|&r| cx.g.ty(r).dtype.is_float()));
        }
    }
    for &n in nodes.iter().rev() {
        let node = cx.g.node(n).clone();
        let dys: Vec<Option<ValueId>> = node.results.iter().map(|r| grads.get(r).copied()).collect();
        if dys.iter().all(Option::is_none) || !node.inputs.iter().any(|x| trained.contains(x)) {
            continue;
        }
        cx.scope = node.scope.clone();
        let dxs = rules::vjp(cx, &node, &dys)?;
        for (&x, dx) in node.inputs.iter().zip(dxs) {
            if let Some(d) = dx {
                if cx.g.ty(x).dtype.is_float() && trained.contains(&x) {
                    accumulate(cx, grads, x, d)?;
                }
            }
        }
    }
    Ok(())
}

/// The forward graph `g`, extended to compute the loss (output `loss`) and the gradient of the
/// loss with respect to each parameter it depends on (outputs `grad.{name}`, in the order the
/// parameters appear). See the module documentation.
pub fn differentiate(g: &Graph, loss_output: &str) -> Result<Graph, AutodiffError> {
    let loss = g
        .outputs()
        .iter()
        .find(|(n, _)| n == loss_output)
        .map(|&(_, v)| v)
        .ok_or_else(|| AutodiffError::NoLoss(loss_output.to_string()))?;
    let ty = g.ty(loss).clone();
    if ty != TensorType::scalar(DType::F32) {
        return Err(AutodiffError::LossType { name: loss_output.to_string(), ty });
    }
    // The loss goes last with the gradients; the forward graph's other outputs stay (a training
    // graph's expert loads and state updates).
    let mut out = g.clone();
    out.remove_output(loss_output);
    let order = out.nodes();
    let mut cx = Cx { g: &mut out, scope: Some(LOSS.to_string()) };
    let one = cx.scalar(1.0, DType::F32)?;
    let mut grads = HashMap::from([(loss, one)]);
    backprop(&mut cx, &order, &[], &mut grads)?;
    out.add_output(LOSS, loss).map_err(|e| AutodiffError::Internal(e.to_string()))?;
    let mut seen = std::collections::HashSet::new();
    for n in order {
        let node = out.node(n);
        let Op::Param { name } = &node.op else { continue };
        let (name, v) = (name.clone(), node.results[0]);
        if let Some(&d) = grads.get(&v) {
            if seen.insert(name.clone()) {
                out.add_output(format!("{GRAD_PREFIX}{name}"), d)
                    .map_err(|e| AutodiffError::Internal(e.to_string()))?;
            }
        }
    }
    verify(&out).map_err(AutodiffError::Invalid)?;
    Ok(out)
}
