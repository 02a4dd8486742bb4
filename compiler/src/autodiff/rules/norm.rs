//! `rms_norm`: `y = x * r * w` with `r = (mean(x^2) + eps)^-1/2` over the last axis.
//!
//! `dx = r * (g - x * r^2 * mean(g * x))` with `g = dy * w`, and `dw = sum over rows of dy * x * r`:
//! torch's autograd of `x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight`, in the
//! model's dtype (Hugging Face's `DeepseekV3RMSNorm` computes in f32 and casts back; for f32 models
//! the two are the same).

use kiln_ir::{Op, ReduceOp, UnaryOp, ValueId};

use crate::autodiff::{AutodiffError, Cx};

pub(super) fn rms_norm(
    cx: &mut Cx,
    eps: f64,
    x: ValueId,
    w: ValueId,
    dy: ValueId,
) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let xt = cx.ty(x);
    let last = xt.rank() - 1;
    let mean =
        |cx: &mut Cx, v| cx.op(Op::Reduce { op: ReduceOp::Mean, axes: vec![last], keep_dims: true }, &[v]);
    // r, recomputed.
    let x2 = cx.mul(x, x)?;
    let ms = mean(cx, x2)?;
    let e = cx.scalar(eps, xt.dtype)?;
    let ms = cx.add(ms, e)?;
    let r = cx.unary(UnaryOp::Rsqrt, ms)?;
    // dx.
    let g = cx.mul(dy, w)?;
    let gx = cx.mul(g, x)?;
    let m = mean(cx, gx)?;
    let r2 = cx.mul(r, r)?;
    let r2m = cx.mul(r2, m)?;
    let t = cx.mul(x, r2m)?;
    let c = cx.sub(g, t)?;
    let dx = cx.mul(r, c)?;
    // dw: every axis but the last summed.
    let xr = cx.mul(x, r)?;
    let p = cx.mul(dy, xr)?;
    let axes: Vec<usize> = (0..last).collect();
    let dw = if axes.is_empty() {
        p
    } else {
        cx.op(Op::Reduce { op: ReduceOp::Sum, axes, keep_dims: false }, &[p])?
    };
    Ok(vec![Some(dx), Some(dw)])
}
