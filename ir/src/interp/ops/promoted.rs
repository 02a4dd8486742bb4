//! `promoted_gemm`: the GEMMs of FP8 training with DeepSeek-V3's promoted accumulation. Each dot
//! product is summed in blocks of `k_block` along the contraction axis (aligned at index 0): the
//! block's products in f64 in index order (a product of two f32 is exact in f64), the block's sum
//! rounded once to f32, the blocks' sums added in f32 in order. The kernels follow the same order,
//! so the two agree bit for bit.

use crate::types::TensorType;

use super::linalg::check_offsets;
use super::{dims, floats, udims, OpResult};
use crate::interp::tensor::Tensor;
use crate::op::GemmForm;

/// The promoted dot product of two rows of equal length.
fn dot(a: &[f32], b: &[f32], k_block: usize) -> f32 {
    let mut acc = 0.0f32;
    for (ca, cb) in a.chunks(k_block).zip(b.chunks(k_block)) {
        let s: f64 = ca.iter().zip(cb).fold(0.0, |s, (&x, &y)| s + x as f64 * y as f64);
        acc += s as f32;
    }
    acc
}

/// Every row of `xs` (rows of `k`) times every row of `ws`, appended to `data`.
fn rows_times_weight(xs: &[f32], ws: &[f32], k: usize, k_block: usize, data: &mut Vec<f32>) {
    if k == 0 {
        return;
    }
    for row in xs.chunks_exact(k) {
        for wrow in ws.chunks_exact(k) {
            data.push(dot(row, wrow, k_block));
        }
    }
}

pub(super) fn promoted_gemm(form: GemmForm, k_block: u64, ins: &[&Tensor], out: &[TensorType]) -> OpResult {
    let kb = usize::try_from(k_block).map_err(|_| format!("k_block {k_block} does not fit this machine"))?;
    match form {
        GemmForm::Linear => {
            let (xs, ws) = (floats(ins[0], "the input")?, floats(ins[1], "the weight")?);
            let k = ins[1].dims()[1];
            let numel = udims(&out[0]).iter().product::<usize>();
            let mut data = Vec::with_capacity(numel);
            rows_times_weight(xs, ws, k, kb, &mut data);
            data.resize(numel, 0.0);
            Ok(vec![Tensor::float(out[0].dtype, dims(&out[0]), data)])
        }
        GemmForm::Grouped { .. } => {
            let xs = floats(ins[0], "the rows")?;
            let xd = ins[0].dims();
            let k = xd[1];
            let off = check_offsets(ins[1], xd[0])?;
            let numel = udims(&out[0]).iter().product::<usize>();
            let mut data = Vec::with_capacity(numel);
            for (e, w) in ins[2..].iter().enumerate() {
                let ws = floats(w, "expert weights")?;
                rows_times_weight(&xs[off[e] * k..off[e + 1] * k], ws, k, kb, &mut data);
            }
            data.resize(numel, 0.0);
            Ok(vec![Tensor::float(out[0].dtype, dims(&out[0]), data)])
        }
        GemmForm::GroupedWgrad { .. } => {
            let xs = floats(ins[0], "the rows x_sorted")?;
            let ds = floats(ins[2], "dy")?;
            let xd = ins[0].dims();
            let (m, k) = (xd[0], xd[1]);
            let n = ins[2].dims()[1];
            let off = check_offsets(ins[1], m)?;
            let mut results = Vec::with_capacity(out.len());
            for (e, ty) in out.iter().enumerate() {
                let mut data = Vec::with_capacity(n * k);
                for a in 0..n {
                    for c in 0..k {
                        let (mut acc, mut r) = (0.0f32, off[e]);
                        while r < off[e + 1] {
                            // The rows of this block: up to the next multiple of k_block.
                            let end = off[e + 1].min((r / kb + 1) * kb);
                            let s: f64 =
                                (r..end).fold(0.0, |s, r| s + ds[r * n + a] as f64 * xs[r * k + c] as f64);
                            acc += s as f32;
                            r = end;
                        }
                        data.push(acc);
                    }
                }
                results.push(Tensor::float(ty.dtype, dims(ty), data));
            }
            Ok(results)
        }
    }
}
