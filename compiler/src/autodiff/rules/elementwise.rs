//! Elementwise ops: `y = f(x)` gives `dx = dy * f'(x)`, written with the forward result where that
//! is cheaper (`exp`, `sigmoid`, `tanh`, `sqrt`, `rsqrt`, `recip`); binary ops reduce each operand's
//! gradient over the axes it was broadcast along.

use kiln_ir::{BinaryOp, UnaryOp, ValueId};

use crate::autodiff::{AutodiffError, Cx};

pub(super) fn unary(
    cx: &mut Cx,
    op: UnaryOp,
    x: ValueId,
    y: ValueId,
    dy: ValueId,
) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let dtype = cx.ty(x).dtype;
    let dx = match op {
        UnaryOp::Neg => cx.neg(dy)?,
        // d/dx exp(x) = exp(x) = y.
        UnaryOp::Exp => cx.mul(dy, y)?,
        // d/dx log(x) = 1/x.
        UnaryOp::Log => cx.div(dy, x)?,
        // d/dx sqrt(x) = 1 / (2 sqrt(x)) = 0.5 / y.
        UnaryOp::Sqrt => {
            let half = cx.scalar(0.5, dtype)?;
            let h = cx.div(half, y)?;
            cx.mul(dy, h)?
        }
        // d/dx x^-1/2 = -1/2 x^-3/2 = -1/2 y^3.
        UnaryOp::Rsqrt => {
            let y2 = cx.mul(y, y)?;
            let y3 = cx.mul(y2, y)?;
            let c = cx.scalar(-0.5, dtype)?;
            let d = cx.mul(y3, c)?;
            cx.mul(dy, d)?
        }
        // d/dx 1/x = -1/x^2 = -y^2.
        UnaryOp::Recip => {
            let y2 = cx.mul(y, y)?;
            let d = cx.mul(dy, y2)?;
            cx.neg(d)?
        }
        // d/dx sigmoid(x) = y (1 - y).
        UnaryOp::Sigmoid => {
            let one = cx.scalar(1.0, dtype)?;
            let c = cx.sub(one, y)?;
            let d = cx.mul(y, c)?;
            cx.mul(dy, d)?
        }
        // d/dx x sigmoid(x) = s + x s (1 - s) = s (1 + x (1 - s)), s = sigmoid(x).
        UnaryOp::Silu => {
            let s = cx.unary(UnaryOp::Sigmoid, x)?;
            let one = cx.scalar(1.0, dtype)?;
            let c = cx.sub(one, s)?;
            let xc = cx.mul(x, c)?;
            let t = cx.add(one, xc)?;
            let d = cx.mul(s, t)?;
            cx.mul(dy, d)?
        }
        // d/dx tanh(x) = 1 - y^2.
        UnaryOp::Tanh => {
            let one = cx.scalar(1.0, dtype)?;
            let y2 = cx.mul(y, y)?;
            let d = cx.sub(one, y2)?;
            cx.mul(dy, d)?
        }
        UnaryOp::Abs => {
            // sign(x), 0 at 0 as torch has it: x / max(|x|, tiny).
            let a = cx.unary(UnaryOp::Abs, x)?;
            let tiny = cx.scalar(f64::from(f32::MIN_POSITIVE), dtype)?;
            let m = cx.binary(BinaryOp::Max, a, tiny)?;
            let sign = cx.div(x, m)?;
            cx.mul(dy, sign)?
        }
    };
    Ok(vec![Some(dx)])
}

pub(super) fn binary(
    cx: &mut Cx,
    op: BinaryOp,
    a: ValueId,
    b: ValueId,
    dy: ValueId,
) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let (da, db) = match op {
        BinaryOp::Add => (dy, dy),
        BinaryOp::Sub => (dy, cx.neg(dy)?),
        BinaryOp::Mul => (cx.mul(dy, b)?, cx.mul(dy, a)?),
        // d(a/b) = da / b - a db / b^2.
        BinaryOp::Div => {
            let da = cx.div(dy, b)?;
            let q = cx.div(a, b)?;
            let t = cx.mul(da, q)?;
            (da, cx.neg(t)?)
        }
        BinaryOp::Max | BinaryOp::Min => {
            return Err(AutodiffError::NoRule {
                op: if op == BinaryOp::Max { "max" } else { "min" },
                why: "no selection op to route the gradient to the chosen operand yet".into(),
            })
        }
    };
    let (ta, tb) = (cx.ty(a).shape, cx.ty(b).shape);
    Ok(vec![Some(cx.unbroadcast(da, &ta)?), Some(cx.unbroadcast(db, &tb)?)])
}

/// A cast's gradient is the incoming gradient cast back to the operand's dtype.
pub(super) fn cast(cx: &mut Cx, x: ValueId, dy: ValueId) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let to = cx.ty(x).dtype;
    if cx.ty(dy).dtype == to {
        return Ok(vec![Some(dy)]);
    }
    Ok(vec![Some(cx.op(kiln_ir::Op::Cast { to }, &[dy])?)])
}
