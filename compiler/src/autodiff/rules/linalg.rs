//! `linear` and `matmul`: the data gradient (dgrad) and the weight gradient (wgrad), each one GEMM
//! in the layout the GEMM kernels take.

use kiln_ir::{Dim, Op, ValueId};

use crate::autodiff::{AutodiffError, Cx};

/// `y[..., N] = x[..., K] @ w[N, K]^T`: `dx = dy @ w` (a matmul of `[..., N]` by `[N, K]`), and
/// `dw = dy^T @ x` over every leading position: `[N, M] @ [M, K]` with `M` the leading dimensions
/// flattened.
pub(super) fn linear(
    cx: &mut Cx,
    x: ValueId,
    w: ValueId,
    dy: ValueId,
) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let (xt, dyt) = (cx.ty(x), cx.ty(dy));
    let dx = cx.op(Op::MatMul, &[dy, w])?;
    let lead = xt.shape[..xt.rank() - 1].iter().try_fold(Dim::known(1), |a, &d| a.checked_mul(d));
    let lead = lead.ok_or_else(|| AutodiffError::Internal(format!("the rows of {xt} overflow")))?;
    let (k, n) = (xt.shape[xt.rank() - 1], dyt.shape[dyt.rank() - 1]);
    let x2 = cx.op(Op::Reshape { shape: vec![lead, k] }, &[x])?;
    let dy2 = cx.op(Op::Reshape { shape: vec![lead, n] }, &[dy])?;
    let dyt2 = cx.op(Op::Transpose { perm: vec![1, 0] }, &[dy2])?;
    let dw = cx.op(Op::MatMul, &[dyt2, x2])?;
    Ok(vec![Some(dx), Some(dw)])
}

/// The last two axes swapped.
fn t(cx: &mut Cx, v: ValueId) -> Result<ValueId, AutodiffError> {
    let r = cx.ty(v).rank();
    let mut perm: Vec<usize> = (0..r).collect();
    perm.swap(r - 2, r - 1);
    cx.op(Op::Transpose { perm }, &[v])
}

/// `y[..., M, N] = a[..., M, K] @ b[..., K, N]`: `da = dy @ b^T`, `db = a^T @ dy`, each summed
/// over the batch axes its operand was broadcast along.
pub(super) fn matmul(
    cx: &mut Cx,
    a: ValueId,
    b: ValueId,
    dy: ValueId,
) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let bt = t(cx, b)?;
    let da = cx.op(Op::MatMul, &[dy, bt])?;
    let at = t(cx, a)?;
    let db = cx.op(Op::MatMul, &[at, dy])?;
    let (sa, sb) = (cx.ty(a).shape, cx.ty(b).shape);
    Ok(vec![Some(cx.unbroadcast(da, &sa)?), Some(cx.unbroadcast(db, &sb)?)])
}
