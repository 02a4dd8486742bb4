//! The ops, one function each, grouped by family. Each takes its operand tensors and the result
//! types that shape inference gave for them (all dimensions known) and returns the results, or a
//! message saying what is wrong with operand *values* (shapes and dtypes were already checked).

mod attention;
mod elementwise;
mod grad;
mod linalg;
mod loss;
mod moe;
pub(crate) mod norm_rope;
mod promoted;
pub(crate) mod quant;
mod reduce;
mod shape;

use crate::op::Op;
use crate::types::{DType, TensorType};

use super::tensor::Tensor;

pub(crate) type OpResult = Result<Vec<Tensor>, String>;

/// Applies a compute op (not `input`, `param`, `constant`, `fused`, `send` or `recv`, which the
/// walker handles).
pub(crate) fn apply(op: &Op, ins: &[&Tensor], out: &[TensorType]) -> OpResult {
    match op {
        Op::Linear => linalg::linear(ins[0], ins[1], &out[0]),
        Op::MatMul => linalg::matmul(ins[0], ins[1], &out[0]),
        Op::Unary(u) => elementwise::unary(*u, ins[0]),
        Op::Binary(b) => elementwise::binary(*b, ins[0], ins[1], &out[0]),
        Op::Cast { to } => elementwise::cast(ins[0], *to),
        Op::Reduce { op, axes, .. } => reduce::reduce(*op, ins[0], axes, &out[0]),
        Op::Softmax { axis } => reduce::softmax(ins[0], *axis),
        Op::CrossEntropy { ignore_index } => loss::cross_entropy(ins[0], ins[1], *ignore_index),
        Op::TopK { k } => reduce::topk(ins[0], *k as usize, out),
        Op::RmsNorm { eps } => norm_rope::rms_norm(ins[0], ins[1], *eps),
        Op::Rope(cfg) => norm_rope::rope(ins[0], ins[1], cfg),
        Op::Attention { scale, causal, .. } => {
            attention::attention(ins[0], ins[1], ins[2], ins.get(3).copied(), *scale, *causal, &out[0])
        }
        Op::CacheUpdate => shape::cache_update(ins[0], ins[1], ins[2]),
        Op::Embedding => shape::embedding(ins[0], ins[1], &out[0]),
        Op::Gather { axis } => shape::gather(ins[0], ins[1], *axis, &out[0]),
        Op::Concat { axis } => shape::concat(ins, *axis, &out[0]),
        Op::Split { axis, .. } => shape::split(ins[0], *axis, out),
        Op::Reshape { .. } => Ok(vec![ins[0].clone().reshaped(dims(&out[0]))]),
        // The interpreter is one process: a group of one, whose sum is the operand.
        Op::AllReduce { .. } => Ok(vec![ins[0].clone()]),
        Op::AllGather { size: 1, .. } => Ok(vec![ins[0].clone().reshaped(dims(&out[0]))]),
        Op::AllGather { group, size } => Err(format!(
            "an all_gather over {size} processes of `{group}` needs them; the interpreter is one process"
        )),
        Op::AllToAll { size: 1, .. } => all_to_all_alone(ins),
        Op::AllToAll { group, size } => Err(format!(
            "an all_to_all over {size} processes of `{group}` needs them; the interpreter is one process"
        )),
        Op::Transpose { perm } => shape::transpose(ins[0], perm, &out[0]),
        Op::Broadcast { .. } => elementwise::broadcast_to(ins[0], &out[0]),
        Op::Quantize { spec, .. } => quant::quantize(ins[0], spec, out),
        Op::Dequantize { block, to } => quant::dequantize(ins[0], ins[1], block, *to),
        Op::MoeRoute(r) => moe::route(ins[0], ins.get(1).copied(), r, out),
        Op::MoeExperts { .. } => moe::experts(ins[0], ins[1], ins[2], &ins[3..]),
        Op::MoeDispatch(d) => moe::dispatch(ins[0], ins[1], d, out),
        Op::GroupedLinear { .. } => linalg::grouped_linear(ins[0], ins[1], &ins[2..], &out[0]),
        Op::MoeCombine { .. } => moe::combine(ins[0], ins[1], ins[2], &out[0]),
        Op::EmbeddingGrad { .. } => grad::embedding_grad(ins[0], ins[1], &out[0]),
        Op::CrossEntropyGrad { ignore_index } => {
            grad::cross_entropy_grad(ins[0], ins[1], ins[2], *ignore_index)
        }
        Op::AttentionGrad { scale, causal } => {
            // `do` is the last operand, after the optional positions.
            let (forward, d_out) = ins.split_at(ins.len() - 1);
            let (q, k, v, positions) = (forward[0], forward[1], forward[2], forward.get(3).copied());
            grad::attention_grad(q, k, v, positions, d_out[0], *scale, *causal)
        }
        Op::TakeAlong { axis } => shape::take_along(ins[0], ins[1], *axis, &out[0]),
        Op::ScatterAddAlong { axis, .. } => grad::scatter_add_along(ins[0], ins[1], *axis, &out[0]),
        Op::GroupedLinearWgrad { .. } => grad::grouped_linear_wgrad(ins[0], ins[1], ins[2], out),
        Op::MoeCombineGrad { .. } => grad::moe_combine_grad(ins[0], ins[1], ins[2], ins[3], out),
        Op::PromotedGemm { form, k_block } => promoted::promoted_gemm(*form, *k_block, ins, out),
        Op::Input { .. }
        | Op::Param { .. }
        | Op::Constant { .. }
        | Op::Fused { .. }
        | Op::Send { .. }
        | Op::Recv { .. } => Err(format!("`{}` is evaluated by the walker", op.name())),
    }
}

/// The dimensions of a concrete type.
pub(crate) fn dims(ty: &TensorType) -> Vec<u64> {
    ty.shape.iter().map(|d| d.as_known().expect("result types are concrete")).collect()
}

/// The dimensions of a concrete type as `usize`.
pub(crate) fn udims(ty: &TensorType) -> Vec<usize> {
    dims(ty).into_iter().map(|d| d as usize).collect()
}

/// The values of a float operand.
pub(crate) fn floats<'t>(t: &'t Tensor, what: &str) -> Result<&'t [f32], String> {
    t.as_f32().ok_or_else(|| format!("{what} must be a float tensor, found {}", t.ty()))
}

/// The values of an integer operand.
pub(crate) fn ints<'t>(t: &'t Tensor, what: &str) -> Result<&'t [i64], String> {
    t.as_i64().ok_or_else(|| format!("{what} must be an integer tensor, found {}", t.ty()))
}

/// `sum_k a[k] * b[k]`, accumulated in f64 (see the numerics section of the module documentation).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = 0.0f64;
    for (&x, &y) in a.iter().zip(b) {
        acc += x as f64 * y as f64;
    }
    acc
}

/// An index into a dimension of size `n`, or a message saying which index is out of range.
pub(crate) fn index(i: i64, n: usize, what: &str) -> Result<usize, String> {
    match usize::try_from(i) {
        Ok(u) if u < n => Ok(u),
        _ => Err(format!("{what} {i} is out of range 0..{n}")),
    }
}

/// `all_to_all` in a group of one: the process sends its one block to itself, the rows whose flag
/// is zero (when it has flags) as zeros.
fn all_to_all_alone(ins: &[&Tensor]) -> OpResult {
    let Some(keep) = ins.get(1) else { return Ok(vec![ins[0].clone()]) };
    let (Some(x), Some(k)) = (ins[0].as_f32(), keep.as_f32()) else {
        return Err("all_to_all exchanges f32 values with f32 row flags".into());
    };
    let width = x.len().checked_div(k.len()).unwrap_or(0);
    let rows = x.chunks(width.max(1)).zip(k);
    let v: Vec<f32> =
        rows.flat_map(|(r, &f)| r.iter().map(move |&v| if f != 0.0 { v } else { 0.0 })).collect();
    Tensor::from_f32(DType::F32, ins[0].shape().to_vec(), v).map(|t| vec![t]).map_err(|e| e.to_string())
}
