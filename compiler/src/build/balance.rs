//! Expert balancing in the training graph (`build_train`): each MoE layer's load, the
//! auxiliary-loss-free bias update, and the complementary sequence-wise balance loss
//! (DeepSeek-V3 §2.1.2, eq. 17–20; reference §3.3, §3.4).
//!
//! The load of a layer is the number of times each expert was selected over the step's tokens:
//! `scatter_add_along` of ones at the selected indices. Where the reference is silent on what
//! "overloaded" means, kiln compares with the mean load (Wang et al. 2024a, which the report cites):
//! `b_i += γ sign(mean - load_i)`, with `sign(0) = 0`.
//!
//! The balance loss's `f_i` does not count that selection. Eq. 18 counts `s_{i,t} ∈ Topk({s_{j,t} |
//! 1 <= j <= N_r}, K_r)`: the top K_r of the raw affinities over all routed experts, with neither the
//! selection bias nor the group limit, which decide the routing (eq. 16) but are no part of `f_i`
//! (Megatron-LM's `compute_routing_scores_for_aux_loss` reads it the same way). With the bias on,
//! the two differ for most tokens (`tests/goldens/train_aux`).

use kiln_ir::op::{Op, ReduceOp, Scoring};
use kiln_ir::{BinaryOp, DType, Dim, Graph, TensorType, UnaryOp, ValueId};

use super::{BuildError, Builder, Part, Routing, TrainLosses, LOAD_ACC_PREFIX, LOAD_PREFIX};

/// Adds router `r`'s load output, its bias update and its balance loss (added to `loss`); `part`
/// says which micro-batch of the step the graph runs (`keep` is the [`super::KEEP`] input of an
/// accumulating part).
pub(super) fn add(
    b: &mut Builder,
    r: &Routing,
    losses: &TrainLosses,
    part: Part,
    keep: Option<ValueId>,
    data_parallel: bool,
    loss: &mut ValueId,
) -> Result<(), BuildError> {
    let scope = r.scope.as_str();
    let it = b.g.ty(r.indices).clone();
    let e = r.experts;
    let one = b.constant(scope, 1.0, DType::F32)?;

    // Tokens per expert over the whole step.
    let n = it.shape.iter().try_fold(Dim::known(1), |a, &d| a.checked_mul(d));
    let n = n.ok_or_else(|| BuildError::Spec(format!("{scope}: the routed slots of {it} overflow")))?;
    let flat = b.op(scope, Op::Reshape { shape: vec![n] }, &[r.indices])?;
    let ones = b.op(scope, Op::Broadcast { shape: vec![n] }, &[one])?;
    let mut load = b.op(scope, Op::ScatterAddAlong { axis: 0, size: e }, &[flat, ones])?;
    // The earlier micro-batches' load, when the step's batch is split.
    if part != Part::Whole {
        let ty = b.g.ty(load).clone();
        let mut earlier = b.input(&format!("{LOAD_ACC_PREFIX}{scope}"), ty)?;
        if let Some(keep) = keep {
            earlier = b.op(scope, Op::Binary(BinaryOp::Mul), &[earlier, keep])?;
        }
        load = b.op(scope, Op::Binary(BinaryOp::Add), &[load, earlier])?;
    }
    // Every replica's tokens count, so that all of them move their biases alike.
    if data_parallel && part != Part::Accumulate {
        load = b.op(scope, Op::AllReduce { group: crate::train::DP_GROUP.into() }, &[load])?;
    }
    b.output(&format!("{LOAD_PREFIX}{scope}"), load)?;

    let moves = part != Part::Accumulate && losses.bias_update_speed > 0.0;
    if let (Some((name, bias)), true) = (&r.bias, moves) {
        let updated = moved_bias(&mut b.g, scope, load, *bias, e, losses.bias_update_speed)?;
        b.output(name, updated)?;
    }

    if losses.balance_alpha > 0.0 {
        let last = it.rank() - 1;
        // P_i: the scores normalised over all experts, averaged over the sequence.
        let s = match b.g.node(b.g.producer(r.indices)).op {
            Op::MoeRoute(ref router) if router.scoring == Scoring::Softmax => {
                b.op(scope, Op::Softmax { axis: last }, &[r.logits])?
            }
            _ => b.op(scope, Op::Unary(UnaryOp::Sigmoid), &[r.logits])?,
        };
        let sum = b.op(scope, Op::Reduce { op: ReduceOp::Sum, axes: vec![last], keep_dims: true }, &[s])?;
        let sn = b.op(scope, Op::Binary(BinaryOp::Div), &[s, sum])?;
        let p = b.op(scope, Op::Reduce { op: ReduceOp::Mean, axes: vec![1], keep_dims: false }, &[sn])?;
        // f_i = E / (K T) * the times i is among the top K of the raw scores s_t over all E experts
        // (eq. 18; not the routed selection, see the module documentation): a mean over T of
        // one-hot counts. A count: no gradient flows through the indices.
        let top = b.node(scope, Op::TopK { k: r.top_k }, &[s])?[1];
        let ones = b.op(scope, Op::Broadcast { shape: it.shape.clone() }, &[one])?;
        let hot = b.op(scope, Op::ScatterAddAlong { axis: last, size: e }, &[top, ones])?;
        let f = b.op(scope, Op::Reduce { op: ReduceOp::Mean, axes: vec![1], keep_dims: false }, &[hot])?;
        let c = b.constant(scope, e as f64 / r.top_k as f64, DType::F32)?;
        let f = b.op(scope, Op::Binary(BinaryOp::Mul), &[f, c])?;
        let fp = b.op(scope, Op::Binary(BinaryOp::Mul), &[f, p])?;
        let per_seq =
            b.op(scope, Op::Reduce { op: ReduceOp::Sum, axes: vec![1], keep_dims: false }, &[fp])?;
        let mean =
            b.op(scope, Op::Reduce { op: ReduceOp::Mean, axes: vec![0], keep_dims: false }, &[per_seq])?;
        let alpha = b.constant(scope, losses.balance_alpha, DType::F32)?;
        let bal = b.op(scope, Op::Binary(BinaryOp::Mul), &[mean, alpha])?;
        *loss = b.op("loss", Op::Binary(BinaryOp::Add), &[*loss, bal])?;
    }
    Ok(())
}

/// A router's selection bias moved by the auxiliary-loss-free rule, `bias + γ sign(mean(load) -
/// load)`, as nodes of `g` in `scope`: what the step's last program outputs under the bias's name.
pub fn moved_bias(
    g: &mut Graph,
    scope: &str,
    load: ValueId,
    bias: ValueId,
    experts: u64,
    gamma: f64,
) -> Result<ValueId, BuildError> {
    let node = |g: &mut Graph, op: Op, inputs: &[ValueId]| -> Result<ValueId, BuildError> {
        let types = match op {
            Op::Constant { .. } => vec![TensorType::scalar(DType::F32)],
            _ => {
                let tys: Vec<&TensorType> = inputs.iter().map(|&v| g.ty(v)).collect();
                kiln_ir::infer::infer(&op, &tys).map_err(|e| BuildError::Spec(e.to_string()))?
            }
        };
        let (_, r) =
            g.add_node(op, inputs, types, Some(scope)).map_err(|e| BuildError::Spec(e.to_string()))?;
        Ok(r[0])
    };
    let mean = node(g, Op::Reduce { op: ReduceOp::Mean, axes: vec![0], keep_dims: false }, &[load])?;
    let d = node(g, Op::Binary(BinaryOp::Sub), &[mean, load])?;
    // sign(d), 0 at 0: d / max(|d|, 1/2); loads are whole numbers, so |d| is 0 or at least 1/E.
    let a = node(g, Op::Unary(UnaryOp::Abs), &[d])?;
    let tiny = node(g, Op::Constant { value: 0.5 / experts as f64 }, &[])?;
    let m = node(g, Op::Binary(BinaryOp::Max), &[a, tiny])?;
    let sign = node(g, Op::Binary(BinaryOp::Div), &[d, m])?;
    let gamma = node(g, Op::Constant { value: gamma }, &[])?;
    let step = node(g, Op::Binary(BinaryOp::Mul), &[sign, gamma])?;
    node(g, Op::Binary(BinaryOp::Add), &[bias, step])
}
