//! Attention and rotary embeddings.

use kiln_ir::op::RopeConfig;
use kiln_ir::{Op, ValueId};

use crate::autodiff::{AutodiffError, Cx};

/// `y = rope(x, positions)`: a rotation per pair, so `dx` is `dy` rotated back (`inverse`).
pub(super) fn rope(
    cx: &mut Cx,
    cfg: &RopeConfig,
    positions: ValueId,
    dy: ValueId,
) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let inv = RopeConfig { inverse: !cfg.inverse, ..*cfg };
    Ok(vec![Some(cx.op(Op::Rope(inv), &[dy, positions])?), None])
}

/// `o = attention(q, k, v[, positions])`: `attention_grad` recomputes the probabilities from `q`
/// and `k` (the "recompute" choice: nothing of the forward is kept) and gives `dq`, `dk`, `dv`.
pub(super) fn attention(
    cx: &mut Cx,
    scale: f64,
    causal: bool,
    operands: &[ValueId],
    d_out: ValueId,
) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let mut ins = operands.to_vec();
    ins.push(d_out);
    let d = cx.node(Op::AttentionGrad { scale, causal }, &ins)?;
    let mut out: Vec<Option<ValueId>> = d.into_iter().map(Some).collect();
    if operands.len() == 4 {
        out.push(None);
    }
    Ok(out)
}
