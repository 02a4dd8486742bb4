//! Data movement: reshape, transpose, broadcast, concat and split move gradients back the way the
//! values came.

use kiln_ir::{Op, ValueId};

use crate::autodiff::{AutodiffError, Cx};

pub(super) fn reshape(cx: &mut Cx, x: ValueId, dy: ValueId) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let shape = cx.ty(x).shape;
    Ok(vec![Some(cx.op(Op::Reshape { shape }, &[dy])?)])
}

/// The inverse permutation.
pub(super) fn transpose(
    cx: &mut Cx,
    perm: &[usize],
    dy: ValueId,
) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    Ok(vec![Some(cx.op(Op::Transpose { perm: inv }, &[dy])?)])
}

pub(super) fn broadcast(cx: &mut Cx, x: ValueId, dy: ValueId) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let shape = cx.ty(x).shape;
    Ok(vec![Some(cx.unbroadcast(dy, &shape)?)])
}

/// Each operand gets its slice of the gradient.
pub(super) fn concat(
    cx: &mut Cx,
    axis: usize,
    xs: &[ValueId],
    dy: ValueId,
) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let sizes: Option<Vec<u64>> = xs.iter().map(|&x| cx.ty(x).shape[axis].as_known()).collect();
    let sizes = sizes.ok_or_else(|| AutodiffError::NoRule {
        op: "concat",
        why: "the gradient of a concatenation along a symbolic axis needs a split of symbolic sizes".into(),
    })?;
    Ok(cx.node(Op::Split { axis, sizes }, &[dy])?.into_iter().map(Some).collect())
}

/// The parts' gradients concatenated, zeros for a part nothing depends on.
pub(super) fn split(
    cx: &mut Cx,
    axis: usize,
    _x: ValueId,
    parts: &[ValueId],
    dys: &[Option<ValueId>],
) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let mut pieces = Vec::with_capacity(parts.len());
    for (&p, dy) in parts.iter().zip(dys) {
        pieces.push(match dy {
            Some(d) => *d,
            None => {
                let t = cx.ty(p);
                cx.zeros(&t)?
            }
        });
    }
    Ok(vec![Some(cx.op(Op::Concat { axis }, &pieces)?)])
}
