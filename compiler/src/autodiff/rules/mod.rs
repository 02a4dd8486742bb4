//! The vector-Jacobian rules, one file per op family. [`vjp`] dispatches on the op; each rule
//! returns the gradient of each operand (`None` where there is none) given the gradient of each
//! result (`None` where nothing downstream depends on it).

mod elementwise;
mod linalg;
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
        Op::Embedding
        | Op::CrossEntropy { .. }
        | Op::Rope(_)
        | Op::Attention { .. }
        | Op::MoeRoute(_)
        | Op::MoeExperts { .. }
        | Op::TopK { .. }
        | Op::Gather { .. } => Err(none("its rule needs the backward ops that are not in the IR yet")),
        Op::CacheUpdate => Err(none("a training program has no KV cache")),
        Op::Quantize { .. } | Op::Dequantize { .. } => {
            Err(none("FP8 casts are inserted after autodiff, on the backward graph too"))
        }
        Op::MoeDispatch(_) | Op::GroupedLinear { .. } | Op::MoeCombine { .. } | Op::Fused { .. } => {
            Err(none("it appears only after the pass pipeline, which runs after autodiff"))
        }
        Op::Send { .. } | Op::Recv { .. } => Err(none("pipeline stages are differentiated per stage")),
    }
}

/// The gradient of result `i`, which a single-result rule needs.
fn need(dys: &[Option<ValueId>], i: usize) -> Result<ValueId, AutodiffError> {
    dys.get(i)
        .copied()
        .flatten()
        .ok_or_else(|| AutodiffError::Internal(format!("no gradient for result {i}")))
}
