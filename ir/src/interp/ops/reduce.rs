//! Reductions, softmax and top-k.
//!
//! `reduce_sum` and `reduce_mean` accumulate in f64; `reduce_max`/`reduce_min` propagate NaN
//! (`torch.amax`) and are an error over an empty axis. Softmax is computed in f32 after subtracting
//! the maximum, with an f64 denominator. Top-k orders largest first; ties go to the lower index and
//! NaN counts as larger than every number (as `torch.topk`). PyTorch does not promise an order among
//! equal values, so tests against PyTorch should avoid exact ties.

use std::cmp::Ordering;

use crate::op::ReduceOp;
use crate::types::{DType, TensorType};

use super::elementwise::broadcast_index;
use super::{dims, floats, OpResult};
use crate::interp::tensor::{Data, Tensor};

pub(super) fn reduce(op: ReduceOp, x: &Tensor, axes: &[usize], out: &TensorType) -> OpResult {
    let xd = x.dims();
    // The result with the reduced axes kept as size 1; each input element maps to one of its slots.
    let kept: Vec<usize> =
        xd.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
    let slot = broadcast_index(&xd, &kept);
    let n: usize = kept.iter().product();
    let count: usize = axes.iter().map(|&a| xd[a]).product();
    let empty = || format!("`{}` over an empty axis has no value", op_name(op));
    let t = match x.data() {
        Data::Float(v) => {
            let mut acc: Vec<Option<f64>> = vec![None; n];
            for (&val, &s) in v.iter().zip(&slot) {
                let val = val as f64;
                acc[s] = Some(match (acc[s], op) {
                    (None, _) => val,
                    (Some(a), ReduceOp::Sum | ReduceOp::Mean) => a + val,
                    (Some(a), _) if a.is_nan() || val.is_nan() => f64::NAN,
                    (Some(a), ReduceOp::Max) => a.max(val),
                    (Some(a), ReduceOp::Min) => a.min(val),
                });
            }
            let mut data = Vec::with_capacity(n);
            for a in acc {
                data.push(match (a, op) {
                    (Some(a), ReduceOp::Mean) => (a / count as f64) as f32,
                    (Some(a), _) => a as f32,
                    (None, ReduceOp::Sum) => 0.0,
                    (None, ReduceOp::Mean) => f32::NAN,
                    (None, _) => return Err(empty()),
                });
            }
            Tensor::float(x.dtype(), dims(out), data)
        }
        Data::Int(v) => {
            let mut acc: Vec<Option<i64>> = vec![None; n];
            for (&val, &s) in v.iter().zip(&slot) {
                acc[s] = Some(match (acc[s], op) {
                    (None, _) => val,
                    (Some(a), ReduceOp::Max) => a.max(val),
                    (Some(a), ReduceOp::Min) => a.min(val),
                    (Some(a), _) => a.wrapping_add(val),
                });
            }
            let mut data = Vec::with_capacity(n);
            for a in acc {
                data.push(match (a, op) {
                    (Some(a), _) if x.dtype() == DType::I32 => a as i32 as i64,
                    (Some(a), _) => a,
                    (None, ReduceOp::Sum) => 0,
                    (None, _) => return Err(empty()),
                });
            }
            Tensor::int(x.dtype(), dims(out), data)
        }
        Data::Bool(_) => return Err(format!("`{}` is not defined on booleans", op_name(op))),
    };
    Ok(vec![t])
}

fn op_name(op: ReduceOp) -> String {
    format!("reduce_{}", op.name())
}

/// Sizes before, along and after `axis`.
fn split_at_axis(d: &[usize], axis: usize) -> (usize, usize, usize) {
    (d[..axis].iter().product(), d[axis], d[axis + 1..].iter().product())
}

pub(super) fn softmax(x: &Tensor, axis: usize) -> OpResult {
    let xs = floats(x, "the operand")?;
    let (outer, len, inner) = split_at_axis(&x.dims(), axis);
    let mut data = vec![0.0f32; xs.len()];
    let mut lane = vec![0.0f32; len];
    for o in 0..outer {
        for i in 0..inner {
            let at = |a: usize| (o * len + a) * inner + i;
            for (a, l) in lane.iter_mut().enumerate() {
                *l = xs[at(a)];
            }
            softmax_in_place(&mut lane);
            for (a, &p) in lane.iter().enumerate() {
                data[at(a)] = p;
            }
        }
    }
    Ok(vec![Tensor::float(x.dtype(), x.shape().to_vec(), data)])
}

/// Softmax of one lane in f32: `exp(x - max) / sum`, the sum in f64. A lane holding NaN gives NaN.
pub(crate) fn softmax_in_place(lane: &mut [f32]) {
    let max = lane.iter().copied().fold(f32::NEG_INFINITY, |m, v| {
        if v.is_nan() || m.is_nan() {
            f32::NAN
        } else {
            m.max(v)
        }
    });
    let mut sum = 0.0f64;
    for v in lane.iter_mut() {
        *v = ((*v - max) as f64).exp() as f32;
        sum += *v as f64;
    }
    for v in lane.iter_mut() {
        *v = (*v as f64 / sum) as f32;
    }
}

/// Largest first, NaN above everything; equal values compare equal (a stable sort then keeps the
/// lower index first).
fn desc(a: f32, b: f32) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        (false, false) => b.partial_cmp(&a).expect("neither is NaN"),
    }
}

/// Indices of the `k` largest values, largest first, ties to the lower index.
pub(crate) fn top_k_indices(vals: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..vals.len()).collect();
    idx.sort_by(|&i, &j| desc(vals[i], vals[j]));
    idx.truncate(k);
    idx
}

pub(super) fn topk(x: &Tensor, k: usize, out: &[TensorType]) -> OpResult {
    let xd = x.dims();
    let n = xd[xd.len() - 1];
    let rows = x.numel().checked_div(n).unwrap_or(0);
    let mut values = Vec::with_capacity(rows * k);
    let mut indices = Vec::with_capacity(rows * k);
    for r in 0..rows {
        let row = r * n..(r + 1) * n;
        let picked = match x.data() {
            Data::Float(v) => top_k_indices(&v[row.clone()], k),
            Data::Int(v) => {
                let mut idx: Vec<usize> = (0..n).collect();
                idx.sort_by(|&i, &j| v[row.start + j].cmp(&v[row.start + i]));
                idx.truncate(k);
                idx
            }
            Data::Bool(_) => return Err("`topk` is not defined on booleans".to_string()),
        };
        values.extend(picked.iter().map(|&i| row.start + i));
        indices.extend(picked.iter().map(|&i| i as i64));
    }
    Ok(vec![x.select(dims(&out[0]), values), Tensor::int(DType::I32, dims(&out[1]), indices)])
}
