//! The vector-Jacobian rules, one file per op family. [`vjp`] dispatches on the op; each rule
//! returns the gradient of each operand (`None` where there is none) given the gradient of each
//! result (`None` where nothing downstream depends on it).

mod attention;
mod elementwise;
mod linalg;
mod loss;
mod moe;
mod norm;
mod reduce;
mod shape;

use kiln_ir::{Node, Op, ValueId};

use super::{AutodiffError, Cx};

/// The gradients of `node`'s operands; see the module documentation.
pub(super) fn vjp(
    cx: &mut Cx,
    node: &Node,
    dys: &[Option<ValueId>],
) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let (x, dy) = (&node.inputs, dys);
    let none = |why: &str| AutodiffError::NoRule { op: node.op.name(), why: why.to_string() };
    match &node.op {
        Op::Input { .. } | Op::Param { .. } | Op::Constant { .. } => Ok(vec![]),
        Op::Unary(u) => elementwise::unary(cx, *u, x[0], node.results[0], need(dy, 0)?),
        Op::Binary(b) => elementwise::binary(cx, *b, x[0], x[1], need(dy, 0)?),
        Op::Cast { .. } => elementwise::cast(cx, x[0], need(dy, 0)?),
        Op::Linear => linalg::linear(cx, x[0], x[1], need(dy, 0)?),
        Op::MatMul => linalg::matmul(cx, x[0], x[1], need(dy, 0)?),
        Op::Reduce { op, axes, keep_dims } => reduce::reduce(cx, *op, axes, *keep_dims, x[0], need(dy, 0)?),
        Op::Softmax { axis } => reduce::softmax(cx, *axis, node.results[0], need(dy, 0)?),
        Op::RmsNorm { eps } => norm::rms_norm(cx, *eps, x[0], x[1], need(dy, 0)?),
        Op::Reshape { .. } => shape::reshape(cx, x[0], need(dy, 0)?),
        Op::Transpose { perm } => shape::transpose(cx, perm, need(dy, 0)?),
        Op::Broadcast { .. } => shape::broadcast(cx, x[0], need(dy, 0)?),
        Op::Concat { axis } => shape::concat(cx, *axis, x, need(dy, 0)?),
        Op::Split { axis, .. } => shape::split(cx, *axis, x[0], &node.results, dy),
        Op::Embedding => loss::embedding(cx, x[0], x[1], need(dy, 0)?),
        Op::CrossEntropy { ignore_index } => loss::cross_entropy(cx, *ignore_index, x[0], x[1], need(dy, 0)?),
        Op::Rope(cfg) => attention::rope(cx, cfg, x[1], need(dy, 0)?),
        Op::Attention { scale, causal, .. } => attention::attention(cx, *scale, *causal, x, need(dy, 0)?),
        Op::MoeRoute(r) => moe::route(cx, r, x, node.results[1], dy[0]),
        Op::TopK { .. } => moe::topk(cx, x[0], node.results[1], dy[0]),
        Op::MoeExperts { num_experts } => moe::experts(cx, *num_experts, x, need(dy, 0)?),
        // The ops of the dispatch plan, which the `moe_experts` rule differentiates through.
        Op::MoeDispatch(plan) => moe::dispatch(cx, plan, x[0], x[1], node.results[2], need(dy, 0)?),
        Op::GroupedLinear { num_experts } => moe::grouped_linear(cx, *num_experts, x, need(dy, 0)?),
        Op::MoeCombine { top_k } => moe::combine(cx, *top_k, x, need(dy, 0)?),
        Op::Gather { .. } => Err(none("no model op uses it; take_along is the differentiable gather")),
        Op::CacheUpdate => Err(none("a training program has no KV cache")),
        Op::Quantize { .. } | Op::Dequantize { .. } => {
            Err(none("FP8 casts are inserted after autodiff, on the backward graph too"))
        }
        Op::Fused { .. } => Err(none("fusion runs after autodiff")),
        Op::TakeAlong { axis } => {
            let size = cx.ty(x[0]).shape[*axis]
                .as_known()
                .ok_or_else(|| none("a take along a symbolic axis would scatter into a symbolic size"))?;
            let d = cx.op(Op::ScatterAddAlong { axis: *axis, size }, &[x[1], need(dy, 0)?])?;
            let dtype = cx.ty(x[0]).dtype;
            Ok(vec![Some(loss::to_dtype(cx, d, dtype)?), None])
        }
        // The adjoint of a scatter-add is a take at the same indices (the balancing counts and
        // loads are scatter-adds of constants, whose gradient goes nowhere, but a rule is a rule).
        Op::ScatterAddAlong { axis, .. } => {
            let d = cx.op(Op::TakeAlong { axis: *axis }, &[need(dy, 0)?, x[0]])?;
            let dtype = cx.ty(x[1]).dtype;
            Ok(vec![None, Some(loss::to_dtype(cx, d, dtype)?)])
        }
        Op::EmbeddingGrad { .. }
        | Op::CrossEntropyGrad { .. }
        | Op::AttentionGrad { .. }
        | Op::GroupedLinearWgrad { .. }
        | Op::MoeCombineGrad { .. } => Err(none("second derivatives are not supported")),
        Op::Send { .. } | Op::Recv { .. } => Err(none("pipeline stages are differentiated per stage")),
        // A sum over the processes whose every process then takes its own part of the loss from
        // the (replicated) result, the total being the sum of the parts (expert parallelism's
        // dispatch and combine, `crate::expert_parallel::split_tokens`): each operand's gradient
        // is the sum of every process's gradient of the result.
        Op::AllReduce { group } => {
            Ok(vec![Some(cx.op(Op::AllReduce { group: group.clone() }, &[need(dy, 0)?])?)])
        }
        Op::AllGather { .. } => Err(none("gathers are inserted after differentiation")),
        // A permutation of blocks between the processes, the rows not kept zeroed: its adjoint
        // sends each gradient block back where its value came from, keeping the rows that came
        // (`keep`'s own exchange says which: process q's flags for this process).
        Op::AllToAll { group, size } => {
            let a2a = Op::AllToAll { group: group.clone(), size: *size };
            let mut ins = vec![need(dy, 0)?];
            if let Some(&keep) = x.get(1) {
                ins.push(cx.op(a2a.clone(), &[keep])?);
            }
            let mut grads = vec![Some(cx.op(a2a, &ins)?)];
            grads.extend(x.get(1).map(|_| None));
            Ok(grads)
        }
        Op::PromotedGemm { .. } => {
            Err(none("FP8 GEMMs are inserted after differentiation (insert-fp8-casts on the train step)"))
        }
    }
}

/// The gradient of result `i`, which a single-result rule needs.
fn need(dys: &[Option<ValueId>], i: usize) -> Result<ValueId, AutodiffError> {
    dys.get(i)
        .copied()
        .flatten()
        .ok_or_else(|| AutodiffError::Internal(format!("no gradient for result {i}")))
}
