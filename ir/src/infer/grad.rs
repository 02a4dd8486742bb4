//! Inference for the ops reverse-mode autodiff needs: the gradients of `embedding`,
//! `cross_entropy`, `attention`, `grouped_linear` and `moe_combine`, and the `take_along` /
//! `scatter_add_along` pair a router's gradient is written with. (`rope`'s gradient is `rope` with
//! `inverse`, inferred as `rope`.)
//!
//! A gradient op that recomputes its forward (`cross_entropy_grad`, `attention_grad`,
//! `moe_combine_grad`) checks its forward operands with the forward op's own rule, so the two cannot
//! drift apart, and then checks the incoming gradient against the forward result's type.

use super::{
    arity, attention, check_axes, cross_entropy_loss, dim_eq, fail, float, int, last, moe_combine, rank_is,
    same_dtype, InferError,
};
use crate::op::Op;
use crate::types::{DType, Dim, TensorType};

/// The most experts `grouped_linear_wgrad` takes. It has a result per expert, so without a bound a
/// written attribute could ask for billions of result types; this is far above any MoE layer
/// (DeepSeek-V3 routes over 256 experts).
const MAX_WGRAD_EXPERTS: u64 = 1 << 16;

/// `embedding_grad {rows}`: `ids[...]` (integer) and `dy[..., D]` (float, the ids' shape plus one
/// axis) give `f32[rows, D]`.
pub(super) fn embedding_grad(op: &Op, rows: u64, ins: &[&TensorType]) -> Result<Vec<TensorType>, InferError> {
    arity(op, ins, 2)?;
    let (ids, dy) = (ins[0], ins[1]);
    int(op, "ids", ids)?;
    float(op, "dy", dy)?;
    if dy.rank() != ids.rank() + 1 {
        return fail(format!(
            "`{}` needs dy of rank {} (the ids' rank plus the embedding axis), found {dy} for ids {ids}",
            op.name(),
            ids.rank() + 1
        ));
    }
    for (a, (&i, &d)) in ids.shape.iter().zip(&dy.shape).enumerate() {
        dim_eq(op, &format!("axis {a} of the ids and dy"), i, d)?;
    }
    if rows == 0 {
        return fail(format!("`{}` needs at least one row", op.name()));
    }
    Ok(vec![TensorType::new(DType::F32, [Dim::known(rows), last(dy)])])
}

/// `cross_entropy_grad`: `logits[..., V]` and `targets[...]` as for `cross_entropy`, and
/// `dloss[...]` (f32, the loss's type), give `f32[..., V]`.
pub(super) fn cross_entropy_grad(op: &Op, ins: &[&TensorType]) -> Result<Vec<TensorType>, InferError> {
    arity(op, ins, 3)?;
    let (logits, dloss) = (ins[0], ins[2]);
    let loss = cross_entropy_loss(op, logits, ins[1])?;
    if *dloss != loss {
        return fail(format!(
            "`{}` needs dloss of the loss's type {loss} (f32, the targets' shape), found {dloss}",
            op.name()
        ));
    }
    Ok(vec![logits.with_dtype(DType::F32)])
}

/// `attention_grad`: `q`, `k`, `v` and the optional `positions` as for `attention`, then `do` of
/// the attention's output type, give `dq`, `dk`, `dv` of q's, k's and v's types.
pub(super) fn attention_grad(
    op: &Op,
    causal: bool,
    ins: &[&TensorType],
) -> Result<Vec<TensorType>, InferError> {
    if ins.len() != 4 && ins.len() != 5 {
        return fail(format!(
            "`{}` takes q, k, v, optionally positions, and do: 4 or 5 operands, found {}",
            op.name(),
            ins.len()
        ));
    }
    let (forward, d_out) = ins.split_at(ins.len() - 1);
    let out = attention(op, causal, forward)?;
    if *d_out[0] != out {
        return fail(format!(
            "`{}` needs do (the last operand) of the attention's output type {out}, found {}",
            op.name(),
            d_out[0]
        ));
    }
    Ok(vec![ins[0].clone(), ins[1].clone(), ins[2].clone()])
}

/// `take_along {axis}`: `data[...]` and `indices[...]` (integer, data's rank and dimensions except
/// along `axis`) give the indices' shape in data's dtype.
pub(super) fn take_along(op: &Op, axis: usize, ins: &[&TensorType]) -> Result<Vec<TensorType>, InferError> {
    arity(op, ins, 2)?;
    let (data, idx) = (ins[0], ins[1]);
    int(op, "indices", idx)?;
    check_axes(op, &[axis], data.rank())?;
    rank_is(op, "indices (the data's rank)", idx, data.rank())?;
    for (a, (&d, &i)) in data.shape.iter().zip(&idx.shape).enumerate() {
        if a != axis {
            dim_eq(op, &format!("axis {a} of the data and the indices (all but axis {axis})"), d, i)?;
        }
    }
    Ok(vec![data.with_shape(idx.shape.clone())])
}

/// `scatter_add_along {axis, size}`: `indices[...]` (integer) and `src` (float, the indices' shape)
/// give f32 of src's shape with dimension `axis` replaced by `size`.
pub(super) fn scatter_add_along(
    op: &Op,
    axis: usize,
    size: u64,
    ins: &[&TensorType],
) -> Result<Vec<TensorType>, InferError> {
    arity(op, ins, 2)?;
    let (idx, src) = (ins[0], ins[1]);
    int(op, "indices", idx)?;
    float(op, "src", src)?;
    check_axes(op, &[axis], idx.rank())?;
    if src.rank() != idx.rank() {
        return fail(format!("`{}` needs src of the indices' shape, found {src} for {idx}", op.name()));
    }
    for (a, (&i, &x)) in idx.shape.iter().zip(&src.shape).enumerate() {
        dim_eq(op, &format!("axis {a} of the indices and src"), i, x)?;
    }
    let mut shape = src.shape.clone();
    shape[axis] = Dim::known(size);
    Ok(vec![TensorType::new(DType::F32, shape)])
}

/// `grouped_linear_wgrad {num_experts}`: `x_sorted[M, K]` (float), `offsets[E + 1]` (integer) and
/// `dy[M, N]` (x's dtype) give `E` results `f32[N, K]`.
pub(super) fn grouped_linear_wgrad(
    op: &Op,
    num_experts: u64,
    ins: &[&TensorType],
) -> Result<Vec<TensorType>, InferError> {
    arity(op, ins, 3)?;
    if num_experts == 0 || num_experts > MAX_WGRAD_EXPERTS {
        return fail(format!(
            "`{}`: num_experts must be between 1 and {MAX_WGRAD_EXPERTS} (one result each), found {num_experts}",
            op.name()
        ));
    }
    let (x, offsets, dy) = (ins[0], ins[1], ins[2]);
    float(op, "rows x_sorted", x)?;
    rank_is(op, "rows x_sorted", x, 2)?;
    int(op, "offsets", offsets)?;
    if offsets.shape != [Dim::known(num_experts + 1)] {
        return fail(format!(
            "`{}`: offsets must be i32[{}] (num_experts + 1), found {offsets}",
            op.name(),
            num_experts + 1
        ));
    }
    rank_is(op, "dy", dy, 2)?;
    same_dtype(op, x, dy)?;
    dim_eq(op, "rows of x_sorted and dy", x.shape[0], dy.shape[0])?;
    let dw = TensorType::new(DType::F32, [dy.shape[1], x.shape[1]]);
    Ok(vec![dw; num_experts as usize])
}

/// `moe_combine_grad {top_k}`: `dy[N, D]` of the combined output's type, then `y_sorted`, `perm`
/// and `weights` as for `moe_combine` (both floats), give `dy_sorted` of y_sorted's type and
/// `dweights` of the weights' type.
pub(super) fn moe_combine_grad(
    op: &Op,
    top_k: u64,
    ins: &[&TensorType],
) -> Result<Vec<TensorType>, InferError> {
    arity(op, ins, 4)?;
    let (dy, y, w) = (ins[0], ins[1], ins[3]);
    let out = moe_combine(op, top_k, &ins[1..])?;
    float(op, "rows y_sorted", y)?;
    float(op, "weights", w)?;
    if *dy != out {
        return fail(format!(
            "`{}` needs dy (the first operand) of the combined output's type {out}, found {dy}",
            op.name()
        ));
    }
    Ok(vec![y.clone(), w.clone()])
}

#[cfg(test)]
mod tests {
    use super::super::tests::{bad, ok};
    use super::*;

    #[test]
    fn embedding_grad() {
        let g = Op::EmbeddingGrad { rows: 1024 };
        assert_eq!(ok(g.clone(), &["i32[B, T]", "bf16[B, T, 64]"]), ["f32[1024, 64]"]);
        assert_eq!(ok(g.clone(), &["i64[]", "f32[8]"]), ["f32[1024, 8]"]);
        assert_eq!(
            bad(g.clone(), &["i32[B, T]", "f32[B, 64]"]),
            "`embedding_grad` needs dy of rank 3 (the ids' rank plus the embedding axis), found f32[B, 64] \
             for ids i32[B, T]"
        );
        assert_eq!(
            bad(g.clone(), &["i32[B, T]", "f32[B, S, 64]"]),
            "`embedding_grad`: axis 1 of the ids and dy must match, found T and S"
        );
        assert_eq!(
            bad(g.clone(), &["f32[B, T]", "f32[B, T, 64]"]),
            "`embedding_grad` needs integer ids, found f32[B, T]"
        );
        assert_eq!(
            bad(g, &["i32[B, T]", "i32[B, T, 64]"]),
            "`embedding_grad` needs a floating-point dy, found i32[B, T, 64]"
        );
        assert!(bad(Op::EmbeddingGrad { rows: 0 }, &["i32[T]", "f32[T, 4]"]).contains("at least one row"));
    }

    #[test]
    fn cross_entropy_grad() {
        let g = Op::CrossEntropyGrad { ignore_index: Some(-100) };
        assert_eq!(ok(g.clone(), &["bf16[B, T, 1024]", "i64[B, T]", "f32[B, T]"]), ["f32[B, T, 1024]"]);
        assert_eq!(
            bad(g.clone(), &["f32[B, T, 8]", "i32[B, T]", "bf16[B, T]"]),
            "`cross_entropy_grad` needs dloss of the loss's type f32[B, T] (f32, the targets' shape), found \
             bf16[B, T]"
        );
        assert_eq!(
            bad(g.clone(), &["f32[B, T, 8]", "i32[B, S]", "f32[B, S]"]),
            "`cross_entropy_grad`: axis 1 of the logits and the targets must match, found T and S"
        );
        assert!(bad(g, &["f32[B, 8]", "i32[B]"]).contains("takes 3 operand(s), found 2"));
    }

    #[test]
    fn attention_grad() {
        let g = Op::AttentionGrad { scale: 0.1, causal: true };
        let (q, k, v, o) =
            ("bf16[B, T, 8, 24]", "bf16[B, S, 1, 24]", "bf16[B, S, 1, 16]", "bf16[B, T, 8, 16]");
        assert_eq!(ok(g.clone(), &[q, k, v, o]), [q, k, v]);
        assert_eq!(ok(g.clone(), &[q, k, v, "i32[B, T]", o]), [q, k, v]);
        assert_eq!(
            bad(g.clone(), &[q, k, v, "f32[B, T, 8, 16]"]),
            "`attention_grad` needs do (the last operand) of the attention's output type bf16[B, T, 8, 16], \
             found f32[B, T, 8, 16]"
        );
        assert!(bad(g.clone(), &[q, k, v]).contains("4 or 5 operands, found 3"));
        assert!(bad(g, &[q, "bf16[B, S, 3, 24]", "bf16[B, S, 3, 16]", o]).contains("constant multiple"));
        let plain = Op::AttentionGrad { scale: 0.1, causal: false };
        assert_eq!(
            bad(plain, &[q, k, v, "i32[B, T]", o]),
            "`attention_grad` with positions must be causal (the positions are its mask)"
        );
    }

    #[test]
    fn take_along_and_scatter_add_along() {
        let take = Op::TakeAlong { axis: 1 };
        assert_eq!(ok(take.clone(), &["f32[B*T, 256]", "i32[B*T, 8]"]), ["f32[B*T, 8]"]);
        assert_eq!(ok(Op::TakeAlong { axis: 0 }, &["bf16[4, 3]", "i64[7, 3]"]), ["bf16[7, 3]"]);
        assert_eq!(
            bad(take.clone(), &["f32[T, 256]", "i32[B, 8]"]),
            "`take_along`: axis 0 of the data and the indices (all but axis 1) must match, found T and B"
        );
        assert_eq!(
            bad(take.clone(), &["f32[T, 256]", "i32[T]"]),
            "`take_along` needs indices (the data's rank) of rank 2, found i32[T]"
        );
        assert!(bad(take.clone(), &["f32[T, 256]", "f32[T, 8]"]).contains("needs integer indices"));
        assert!(bad(Op::TakeAlong { axis: 2 }, &["f32[T, 256]", "i32[T, 8]"]).contains("not distinct axes"));
        let scatter = Op::ScatterAddAlong { axis: 1, size: 256 };
        assert_eq!(ok(scatter.clone(), &["i32[B*T, 8]", "bf16[B*T, 8]"]), ["f32[B*T, 256]"]);
        assert_eq!(
            bad(scatter.clone(), &["i32[T, 8]", "f32[T, 4]"]),
            "`scatter_add_along`: axis 1 of the indices and src must match, found 8 and 4"
        );
        assert_eq!(
            bad(scatter.clone(), &["i32[T, 8]", "f32[T, 8, 1]"]),
            "`scatter_add_along` needs src of the indices' shape, found f32[T, 8, 1] for i32[T, 8]"
        );
        assert!(bad(scatter, &["i32[T, 8]", "i32[T, 8]"]).contains("needs a floating-point src"));
    }

    #[test]
    fn grouped_linear_wgrad() {
        let g = Op::GroupedLinearWgrad { num_experts: 2 };
        assert_eq!(
            ok(g.clone(), &["bf16[4*B*T, 32]", "i32[3]", "bf16[4*B*T, 8]"]),
            ["f32[8, 32]", "f32[8, 32]"]
        );
        assert_eq!(
            bad(g.clone(), &["bf16[4*T, 32]", "i32[2]", "bf16[4*T, 8]"]),
            "`grouped_linear_wgrad`: offsets must be i32[3] (num_experts + 1), found i32[2]"
        );
        assert_eq!(
            bad(g.clone(), &["bf16[4*T, 32]", "i32[3]", "bf16[2*T, 8]"]),
            "`grouped_linear_wgrad`: rows of x_sorted and dy must match, found 4*T and 2*T"
        );
        assert!(bad(g, &["bf16[T, 32]", "i32[3]", "f32[T, 8]"]).contains("one dtype"));
        let huge = Op::GroupedLinearWgrad { num_experts: u64::MAX };
        assert!(bad(huge, &["f32[T, 4]", "i32[3]", "f32[T, 4]"]).contains("between 1 and 65536"));
    }

    #[test]
    fn moe_combine_grad() {
        let g = Op::MoeCombineGrad { top_k: 4 };
        assert_eq!(
            ok(g.clone(), &["bf16[B*T, 32]", "bf16[4*B*T, 32]", "i32[4*B*T]", "f32[B*T, 4]"]),
            ["bf16[4*B*T, 32]", "f32[B*T, 4]"]
        );
        assert_eq!(
            bad(g.clone(), &["f32[B*T, 32]", "bf16[4*B*T, 32]", "i32[4*B*T]", "f32[B*T, 4]"]),
            "`moe_combine_grad` needs dy (the first operand) of the combined output's type bf16[B*T, 32], \
             found f32[B*T, 32]"
        );
        assert!(bad(g.clone(), &["f32[T, 32]", "f32[3*T, 32]", "i32[3*T]", "f32[T, 4]"])
            .contains("must hold top_k rows per token"));
        assert!(bad(g, &["f32[T, 32]", "f32[4*T, 32]", "i32[4*T]", "i32[T, 4]"])
            .contains("floating-point weights"));
    }
}
