//! `linear` and `matmul`: the data gradient (dgrad) and the weight gradient (wgrad), each one GEMM
//! in the layout the GEMM kernels take.

use kiln_ir::{Dim, Op, ValueId};

use crate::autodiff::{AutodiffError, Cx};

/// `y[..., N] = x[..., K] @ w[N, K]^T`: `dx = dy @ w`, and `dw = dy^T @ x` over every leading
/// position (`[N, M] @ [M, K]` with `M` the leading dimensions flattened).
///
/// Both are written as `linear`s, `dx = linear(dy, w^T)` and `dw = linear(dy^T, x^T)`, because
/// `linear` is the GEMM the CPU backend tunes (both operands contiguous along the summed axis);
/// its `matmul` streams `b` once per output row, which at a vocabulary-sized `K` (the output
/// head's dgrad) was 35% of a train step (`kiln bench train models/bench.toml --profile`). The
/// transposes are copies, linear in the operands' size.
pub(super) fn linear(
    cx: &mut Cx,
    x: ValueId,
    w: ValueId,
    dy: ValueId,
) -> Result<Vec<Option<ValueId>>, AutodiffError> {
    let (xt, dyt) = (cx.ty(x), cx.ty(dy));
    let wt = cx.op(Op::Transpose { perm: vec![1, 0] }, &[w])?;
    let dx = cx.op(Op::Linear, &[dy, wt])?;
    let lead = xt.shape[..xt.rank() - 1].iter().try_fold(Dim::known(1), |a, &d| a.checked_mul(d));
    let lead = lead.ok_or_else(|| AutodiffError::Internal(format!("the rows of {xt} overflow")))?;
    let (k, n) = (xt.shape[xt.rank() - 1], dyt.shape[dyt.rank() - 1]);
    let x2 = cx.op(Op::Reshape { shape: vec![lead, k] }, &[x])?;
    let dy2 = cx.op(Op::Reshape { shape: vec![lead, n] }, &[dy])?;
    let dyt2 = cx.op(Op::Transpose { perm: vec![1, 0] }, &[dy2])?;
    let xt2 = cx.op(Op::Transpose { perm: vec![1, 0] }, &[x2])?;
    let dw = cx.op(Op::Linear, &[dyt2, xt2])?;
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
