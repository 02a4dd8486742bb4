//! Elementwise ops: unary functions, broadcast binary ops, casts and `broadcast`.
//!
//! Float arithmetic is done as PyTorch does it for narrow dtypes: operands widened to f32, one f32
//! operation, the result rounded to the dtype. Transcendental functions are evaluated in f64 and
//! rounded, so they are correctly rounded to f32 in practice. `max` and `min` propagate NaN
//! (`torch.maximum`). Integer arithmetic wraps at the dtype's width and `div` truncates toward zero,
//! as the compiled code (two's complement, LLVM `sdiv`) does; division by zero is an error. On
//! booleans, `mul` and `min` are "and", `max` is "or"; the other binary ops are errors.

use crate::op::{BinaryOp, UnaryOp};
use crate::types::{DType, TensorType};

use super::super::numerics::round_to_dtype;
use super::super::tensor::{strided_index, strides, Data, Tensor};
use super::{dims, floats, udims, OpResult};

pub(super) fn unary(op: UnaryOp, x: &Tensor) -> OpResult {
    let xs = floats(x, "the operand")?;
    let f: fn(f64) -> f64 = match op {
        UnaryOp::Neg => |v| -v,
        UnaryOp::Abs => f64::abs,
        UnaryOp::Exp => f64::exp,
        UnaryOp::Log => f64::ln,
        UnaryOp::Sqrt => f64::sqrt,
        UnaryOp::Rsqrt => |v| 1.0 / v.sqrt(),
        UnaryOp::Recip => |v| 1.0 / v,
        UnaryOp::Sigmoid => sigmoid,
        UnaryOp::Silu => |v| v * sigmoid(v),
        UnaryOp::Tanh => f64::tanh,
    };
    let data = xs.iter().map(|&v| f(v as f64) as f32).collect();
    Ok(vec![Tensor::float(x.dtype(), x.shape().to_vec(), data)])
}

/// `1 / (1 + e^-v)`.
pub(crate) fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

/// For each element of a tensor of shape `out`, the flat index of the element of a tensor of shape
/// `inp` that NumPy broadcasting maps to it (shapes aligned on the right, size-1 dimensions stretch).
pub(crate) fn broadcast_index(out: &[usize], inp: &[usize]) -> Vec<usize> {
    let lead = out.len() - inp.len();
    let in_strides = strides(inp);
    // Strides of the input seen through the output's axes: 0 where the input is stretched.
    let mut st = vec![0usize; out.len()];
    for (i, &d) in inp.iter().enumerate() {
        if d != 1 {
            st[lead + i] = in_strides[i];
        }
    }
    strided_index(out, &st)
}

pub(super) fn binary(op: BinaryOp, a: &Tensor, b: &Tensor, out: &TensorType) -> OpResult {
    let shape = udims(out);
    let ia = broadcast_index(&shape, &a.dims());
    let ib = broadcast_index(&shape, &b.dims());
    let pairs = ia.iter().zip(&ib);
    let dtype = a.dtype();
    let result = match (a.data(), b.data()) {
        (Data::Float(x), Data::Float(y)) => {
            let f: fn(f32, f32) -> f32 = match op {
                BinaryOp::Add => |p, q| p + q,
                BinaryOp::Sub => |p, q| p - q,
                BinaryOp::Mul => |p, q| p * q,
                BinaryOp::Div => |p, q| p / q,
                BinaryOp::Max => |p, q| if p.is_nan() || q.is_nan() { f32::NAN } else { p.max(q) },
                BinaryOp::Min => |p, q| if p.is_nan() || q.is_nan() { f32::NAN } else { p.min(q) },
            };
            let data = pairs.map(|(&i, &j)| f(x[i], y[j])).collect();
            Tensor::float(dtype, dims(out), data)
        }
        (Data::Int(x), Data::Int(y)) => {
            let mut data = Vec::with_capacity(ia.len());
            for (&i, &j) in pairs {
                let (p, q) = (x[i], y[j]);
                let v = match op {
                    BinaryOp::Add => p.wrapping_add(q),
                    BinaryOp::Sub => p.wrapping_sub(q),
                    BinaryOp::Mul => p.wrapping_mul(q),
                    BinaryOp::Div if q == 0 => return Err("integer division by zero".to_string()),
                    BinaryOp::Div => p.wrapping_div(q),
                    BinaryOp::Max => p.max(q),
                    BinaryOp::Min => p.min(q),
                };
                data.push(wrap(dtype, v));
            }
            Tensor::int(dtype, dims(out), data)
        }
        (Data::Bool(x), Data::Bool(y)) => {
            let f: fn(bool, bool) -> bool = match op {
                BinaryOp::Mul | BinaryOp::Min => |p, q| p && q,
                BinaryOp::Max => |p, q| p || q,
                _ => return Err(format!("`{}` is not defined on booleans", op.name())),
            };
            let data = pairs.map(|(&i, &j)| f(x[i], y[j])).collect();
            Tensor::with_data(DType::Bool, dims(out), Data::Bool(data))
        }
        _ => unreachable!("operands of one dtype have data of one kind"),
    };
    Ok(vec![result])
}

/// An i64 wrapped to the width of an integer dtype (two's complement).
fn wrap(dtype: DType, v: i64) -> i64 {
    match dtype {
        DType::I32 => v as i32 as i64,
        _ => v,
    }
}

pub(super) fn cast(x: &Tensor, to: DType) -> OpResult {
    let shape = x.shape().to_vec();
    let t = match (x.data(), to) {
        (Data::Float(v), to) if to.is_float() => Tensor::float(to, shape, v.clone()),
        (Data::Float(v), DType::Bool) => {
            Tensor::with_data(to, shape, Data::Bool(v.iter().map(|&f| f != 0.0).collect()))
        }
        (Data::Float(v), _) => {
            // Truncation toward zero, as `tensor.to(torch.int32)`; torch leaves NaN and
            // out-of-range values undefined, kiln reports them.
            let (lo, hi) = if to == DType::I32 {
                (-2f64.powi(31), 2f64.powi(31))
            } else {
                (-2f64.powi(63), 2f64.powi(63))
            };
            let mut out = Vec::with_capacity(v.len());
            for &f in v {
                let t = (f as f64).trunc();
                if !(lo..hi).contains(&t) {
                    return Err(format!("{f} cannot be converted to {to}"));
                }
                out.push(t as i64);
            }
            Tensor::int(to, shape, out)
        }
        // Large integers (beyond 2^24) round to f32 first, then to the dtype.
        (Data::Int(v), to) if to.is_float() => {
            Tensor::float(to, shape, v.iter().map(|&i| round_to_dtype(to, i as f32)).collect())
        }
        (Data::Int(v), DType::Bool) => {
            Tensor::with_data(to, shape, Data::Bool(v.iter().map(|&i| i != 0).collect()))
        }
        (Data::Int(v), _) => Tensor::int(to, shape, v.iter().map(|&i| wrap(to, i)).collect()),
        (Data::Bool(v), to) if to.is_float() => {
            Tensor::float(to, shape, v.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect())
        }
        (Data::Bool(v), DType::Bool) => Tensor::with_data(to, shape, Data::Bool(v.clone())),
        (Data::Bool(v), _) => Tensor::int(to, shape, v.iter().map(|&b| b as i64).collect()),
    };
    Ok(vec![t])
}

/// `broadcast`: NumPy-style expansion to the result shape.
pub(super) fn broadcast_to(x: &Tensor, out: &TensorType) -> OpResult {
    let idx = broadcast_index(&udims(out), &x.dims());
    Ok(vec![x.select(dims(out), idx)])
}
