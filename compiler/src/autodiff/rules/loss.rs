//! The embedding (its table's gradient is a scatter-add of the output gradient at the ids) and the
//! cross-entropy loss (`softmax - onehot`, scaled by the loss gradient).

use kiln_ir::{Op, ValueId};

use crate::autodiff::{AutodiffError, Cx};

/// `y[..., D] = table[ids[...]]`: `dtable = embedding_grad(ids, dy)`; ids have no gradient.
pub(super) fn embedding(
    cx: &mut Cx,
    table: ValueId,
    ids: ValueId,
    dy: ValueId,
) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let tt = cx.ty(table);
    let rows = tt.shape[0]
        .as_known()
        .ok_or_else(|| AutodiffError::Internal(format!("the embedding table {tt} has symbolic rows")))?;
    let d = cx.op(Op::EmbeddingGrad { rows }, &[ids, dy])?;
    Ok(vec![Some(to_dtype(cx, d, tt.dtype)?), None])
}

/// `loss[...] = cross_entropy(logits[..., V], targets[...])`: `dlogits = (softmax - onehot) * dloss`.
pub(super) fn cross_entropy(
    cx: &mut Cx,
    ignore_index: Option<i64>,
    logits: ValueId,
    targets: ValueId,
    dloss: ValueId,
) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let d = cx.op(Op::CrossEntropyGrad { ignore_index }, &[logits, targets, dloss])?;
    let dtype = cx.ty(logits).dtype;
    Ok(vec![Some(to_dtype(cx, d, dtype)?), None])
}

/// `v` cast to `dtype` when it is not already (the gradient ops compute in f32).
pub(super) fn to_dtype(cx: &mut Cx, v: ValueId, dtype: kiln_ir::DType) -> Result<ValueId, AutodiffError> {
    if cx.ty(v).dtype == dtype {
        Ok(v)
    } else {
        cx.op(Op::Cast { to: dtype }, &[v])
    }
}
