//! The router and the routed experts.
//!
//! The router's selection (group-limited top-k over the biased scores) is piecewise constant, so its
//! gradient flows only through the weights of the selected experts: the rule recomputes
//! `weights = take_along(scores, indices) / sum * scaling` from the router's logits in
//! differentiable ops and differentiates that, which is what PyTorch's autograd does for
//! DeepSeek-V3's `MoEGate` (the bias only changes `indices`, and has no gradient).
//!
//! `moe_experts` is differentiated through the dispatch plan `plan-moe-dispatch` makes of it
//! (dispatch, grouped GEMMs, SwiGLU, combine), recomputed here: each of those has a rule of its
//! own. A dispatch's gradient is a combine with unit weights (the rows go back to their token and
//! add up); a grouped GEMM's data gradient is a grouped GEMM with each expert's weight transposed,
//! its weight gradient `grouped_linear_wgrad`; a combine's gradient is `moe_combine_grad`.

use kiln_ir::op::{Dispatch, Router, Scoring};
use kiln_ir::{BinaryOp, DType, Dim, Op, ReduceOp, UnaryOp, ValueId};

use super::loss::to_dtype;
use crate::autodiff::{AutodiffError, Cx};

/// `weights, indices = moe_route(logits[, bias])`.
pub(super) fn route(
    cx: &mut Cx,
    r: &Router,
    operands: &[ValueId],
    indices: ValueId,
    dweights: Option<ValueId>,
) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let Some(dw) = dweights else { return Ok(vec![None; operands.len()]) };
    let logits = operands[0];
    let lt = cx.ty(logits);
    let last = lt.rank() - 1;
    let mark = cx.mark();
    let l32 = to_dtype(cx, logits, DType::F32)?;
    let scores = match r.scoring {
        Scoring::Sigmoid => cx.unary(UnaryOp::Sigmoid, l32)?,
        Scoring::Softmax => cx.op(Op::Softmax { axis: last }, &[l32])?,
    };
    let sel = cx.op(Op::TakeAlong { axis: last }, &[scores, indices])?;
    let mut w = sel;
    if r.normalize {
        let sum = cx.op(Op::Reduce { op: ReduceOp::Sum, axes: vec![last], keep_dims: true }, &[sel])?;
        let tiny = cx.scalar(1e-20, DType::F32)?;
        let den = cx.add(sum, tiny)?;
        w = cx.div(sel, den)?;
    }
    let scaling = cx.scalar(r.scaling, DType::F32)?;
    w = cx.mul(w, scaling)?;
    let d = cx.vjp_of_composite(mark, &[logits], &[w], &[Some(dw)])?;
    let mut out = vec![d[0]];
    out.resize(operands.len(), None);
    Ok(out)
}

/// `values, indices = topk(x)`: the values' gradient goes back to where they were taken from.
pub(super) fn topk(
    cx: &mut Cx,
    x: ValueId,
    indices: ValueId,
    dvalues: Option<ValueId>,
) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let Some(dv) = dvalues else { return Ok(vec![None]) };
    let xt = cx.ty(x);
    let last = xt.rank() - 1;
    let size = xt.shape[last]
        .as_known()
        .ok_or_else(|| AutodiffError::Internal(format!("topk over a symbolic axis of {xt}")))?;
    let d = cx.op(Op::ScatterAddAlong { axis: last, size }, &[indices, dv])?;
    Ok(vec![Some(to_dtype(cx, d, xt.dtype)?)])
}

/// `x_sorted, offsets, perm = moe_dispatch(x, indices)`: `dx` sums each token's rows back, a
/// combine with unit weights.
pub(super) fn dispatch(
    cx: &mut Cx,
    plan: &Dispatch,
    x: ValueId,
    indices: ValueId,
    perm: ValueId,
    d_sorted: ValueId,
) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let it = cx.ty(indices);
    let one = cx.scalar(1.0, DType::F32)?;
    let ones = cx.op(Op::Broadcast { shape: it.shape.clone() }, &[one])?;
    let d = cx.op(Op::MoeCombine { top_k: plan.top_k }, &[d_sorted, perm, ones])?;
    let dtype = cx.ty(x).dtype;
    Ok(vec![Some(to_dtype(cx, d, dtype)?), None])
}

/// `y = grouped_linear(x_sorted, offsets, w_0 .. w_E-1)`: `dx = grouped_linear(dy, offsets, w_e^T)`
/// and `dw_e = grouped_linear_wgrad(x_sorted, offsets, dy)`.
pub(super) fn grouped_linear(
    cx: &mut Cx,
    num_experts: u64,
    operands: &[ValueId],
    dy: ValueId,
) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let (x, offsets, ws) = (operands[0], operands[1], &operands[2..]);
    let mut transposed = vec![dy, offsets];
    for &w in ws {
        transposed.push(cx.op(Op::Transpose { perm: vec![1, 0] }, &[w])?);
    }
    let dx = cx.op(Op::GroupedLinear { num_experts }, &transposed)?;
    let dws = cx.node(Op::GroupedLinearWgrad { num_experts }, &[x, offsets, dy])?;
    let mut out = vec![Some(dx), None];
    for (&w, d) in ws.iter().zip(dws) {
        let dtype = cx.ty(w).dtype;
        out.push(Some(to_dtype(cx, d, dtype)?));
    }
    Ok(out)
}

/// `y = moe_combine(y_sorted, perm, weights)`: `moe_combine_grad` gives the sorted rows' and the
/// weights' gradients.
pub(super) fn combine(
    cx: &mut Cx,
    top_k: u64,
    operands: &[ValueId],
    dy: ValueId,
) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let (ys, perm, w) = (operands[0], operands[1], operands[2]);
    let d = cx.node(Op::MoeCombineGrad { top_k }, &[dy, ys, perm, w])?;
    Ok(vec![Some(d[0]), None, Some(d[1])])
}

/// `y = moe_experts(x, weights, indices, gate_e, up_e, down_e ...)`, differentiated through the
/// dispatch plan, recomputed (see the module documentation).
pub(super) fn experts(
    cx: &mut Cx,
    num_experts: u64,
    operands: &[ValueId],
    dy: ValueId,
) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let (x, w, idx) = (operands[0], operands[1], operands[2]);
    let (xt, wt) = (cx.ty(x), cx.ty(w));
    let top_k = wt.shape.last().and_then(|d| d.as_known()).ok_or_else(|| {
        AutodiffError::Internal(format!("moe_experts with a symbolic number of experts per token {wt}"))
    })?;
    let d = *xt.shape.last().expect("moe_experts inputs have rank >= 1");
    let tokens = xt.shape[..xt.rank() - 1]
        .iter()
        .try_fold(Dim::known(1), |a, &v| a.checked_mul(v))
        .ok_or_else(|| AutodiffError::Internal(format!("the token count of {xt} overflows")))?;
    let mark = cx.mark();
    let xs = cx.op(Op::Reshape { shape: vec![tokens, d] }, &[x])?;
    let ws = cx.op(Op::Reshape { shape: vec![tokens, Dim::known(top_k)] }, &[w])?;
    let is = cx.op(Op::Reshape { shape: vec![tokens, Dim::known(top_k)] }, &[idx])?;
    let plan = Dispatch { num_experts, top_k, ep_size: 1, num_groups: 1, topk_groups: 1 };
    let dd = cx.node(Op::MoeDispatch(plan), &[xs, is])?;
    let (rows, offsets, perm) = (dd[0], dd[1], dd[2]);
    let experts = &operands[3..];
    let grouped = |cx: &mut Cx, input: ValueId, role: usize| -> Result<ValueId, AutodiffError> {
        let mut ins = vec![input, offsets];
        ins.extend(experts.iter().skip(role).step_by(3));
        cx.op(Op::GroupedLinear { num_experts }, &ins)
    };
    let gate = grouped(cx, rows, 0)?;
    let gate = cx.unary(UnaryOp::Silu, gate)?;
    let up = grouped(cx, rows, 1)?;
    let h = cx.binary(BinaryOp::Mul, gate, up)?;
    let down = grouped(cx, h, 2)?;
    let y = cx.op(Op::MoeCombine { top_k }, &[down, perm, ws])?;
    let y = cx.op(Op::Reshape { shape: xt.shape.clone() }, &[y])?;
    let wrt: Vec<ValueId> = [x, w].into_iter().chain(experts.iter().copied()).collect();
    let grads = cx.vjp_of_composite(mark, &wrt, &[y], &[Some(dy)])?;
    let mut out = vec![grads[0], grads[1], None];
    out.extend(grads[2..].iter().copied());
    Ok(out)
}
