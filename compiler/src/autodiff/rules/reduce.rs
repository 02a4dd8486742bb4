//! Reductions and softmax.

use kiln_ir::{Dim, Op, ReduceOp, ValueId};

use crate::autodiff::{AutodiffError, Cx};

/// `sum` broadcasts the gradient back over the reduced axes; `mean` also divides by their size.
pub(super) fn reduce(
    cx: &mut Cx,
    op: ReduceOp,
    axes: &[usize],
    keep_dims: bool,
    x: ValueId,
    dy: ValueId,
) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let xt = cx.ty(x);
    if matches!(op, ReduceOp::Max | ReduceOp::Min) {
        return Err(AutodiffError::NoRule {
            op: "reduce",
            why: "max/min would route the gradient to the chosen element; no rule yet".into(),
        });
    }
    // The gradient with the reduced axes kept as 1, then broadcast to the operand.
    let kept: Vec<Dim> = xt
        .shape
        .iter()
        .enumerate()
        .map(|(i, &d)| if axes.contains(&i) { Dim::known(1) } else { d })
        .collect();
    let d = if keep_dims { dy } else { cx.op(Op::Reshape { shape: kept }, &[dy])? };
    let mut dx = cx.op(Op::Broadcast { shape: xt.shape.clone() }, &[d])?;
    if op == ReduceOp::Mean {
        // 1 / n as a value of the graph: the reduced axes may be symbolic.
        let n = axes.iter().try_fold(Dim::known(1), |a, &i| a.checked_mul(xt.shape[i]));
        let n = n.ok_or_else(|| AutodiffError::Internal("the reduced size overflows".into()))?;
        let scale = match n.as_known() {
            Some(k) => cx.scalar(1.0 / k as f64, xt.dtype)?,
            None => {
                // Mean of ones over the same axes: exactly 1 / n at run time.
                let one = cx.scalar(1.0, xt.dtype)?;
                let ones = cx.op(Op::Broadcast { shape: xt.shape.clone() }, &[one])?;
                let m =
                    cx.op(Op::Reduce { op: ReduceOp::Mean, axes: axes.to_vec(), keep_dims: true }, &[ones])?;
                let s =
                    cx.op(Op::Reduce { op: ReduceOp::Sum, axes: axes.to_vec(), keep_dims: true }, &[ones])?;
                let r = cx.div(m, s)?;
                cx.op(Op::Broadcast { shape: xt.shape.clone() }, &[r])?
            }
        };
        dx = cx.mul(dx, scale)?;
    }
    Ok(vec![Some(dx)])
}

/// `y = softmax(x)` along `axis`: `dx = y * (dy - sum(dy * y, axis))`.
pub(super) fn softmax(
    cx: &mut Cx,
    axis: usize,
    y: ValueId,
    dy: ValueId,
) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let p = cx.mul(dy, y)?;
    let s = cx.op(Op::Reduce { op: ReduceOp::Sum, axes: vec![axis], keep_dims: true }, &[p])?;
    let c = cx.sub(dy, s)?;
    Ok(vec![Some(cx.mul(y, c)?)])
}
