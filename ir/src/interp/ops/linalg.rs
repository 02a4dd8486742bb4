//! Matrix products: `linear`, batched `matmul` and the per-expert `grouped_linear`.
//!
//! Every output element is one dot product accumulated in f64 ([`super::dot`]) and rounded once to
//! the result dtype. Both operands of each dot are read contiguously: a linear weight is stored
//! `(out, in)`, so its rows are the dot's second operand as they are; for `matmul` the right
//! operand is transposed once per batch into a scratch buffer.

use crate::types::TensorType;

use super::elementwise::broadcast_index;
use super::{dims, dot, floats, ints, udims, OpResult};
use crate::interp::tensor::Tensor;

/// `x[..., K] @ w[N, K]^T`.
pub(super) fn linear(x: &Tensor, w: &Tensor, out: &TensorType) -> OpResult {
    let (xs, ws) = (floats(x, "the input")?, floats(w, "the weight")?);
    let k = w.dims()[1];
    let numel = dims(out).iter().product::<u64>() as usize;
    let mut data = Vec::with_capacity(numel);
    rows_times_weight(xs, ws, k, &mut data);
    // An empty contraction yields zeros.
    data.resize(numel, 0.0);
    Ok(vec![Tensor::float(out.dtype, dims(out), data)])
}

/// Appends `row · w_j` for every row of `xs` (rows of length `k`) and every row `w_j` of `ws`.
fn rows_times_weight(xs: &[f32], ws: &[f32], k: usize, data: &mut Vec<f32>) {
    if k == 0 {
        // `chunks_exact(0)` has no meaning; the callers fill an empty contraction with zeros.
        return;
    }
    for row in xs.chunks_exact(k) {
        for wrow in ws.chunks_exact(k) {
            data.push(dot(row, wrow) as f32);
        }
    }
}

/// `a[..., M, K] @ b[..., K, N]` with broadcast batch dimensions.
pub(super) fn matmul(a: &Tensor, b: &Tensor, out: &TensorType) -> OpResult {
    let (av, bv) = (floats(a, "the left operand")?, floats(b, "the right operand")?);
    let (ad, bd, od) = (a.dims(), b.dims(), udims(out));
    let (m, k, n) = (ad[ad.len() - 2], ad[ad.len() - 1], bd[bd.len() - 1]);
    let batch = &od[..od.len() - 2];
    let ia = broadcast_index(batch, &ad[..ad.len() - 2]);
    let ib = broadcast_index(batch, &bd[..bd.len() - 2]);
    let mut data = Vec::with_capacity(ia.len() * m * n);
    let mut bt = vec![0.0f32; k * n];
    for (&i, &j) in ia.iter().zip(&ib) {
        let ablk = &av[i * m * k..(i + 1) * m * k];
        let bblk = &bv[j * k * n..(j + 1) * k * n];
        for kk in 0..k {
            for nn in 0..n {
                bt[nn * k + kk] = bblk[kk * n + nn];
            }
        }
        if k == 0 {
            data.extend(std::iter::repeat_n(0.0, m * n));
        }
        rows_times_weight(ablk, &bt, k, &mut data);
    }
    Ok(vec![Tensor::float(out.dtype, dims(out), data)])
}

/// Checks an `offsets[E + 1]` table against `rows` rows: it starts at 0, never decreases and ends
/// at most at `rows`, so every row belongs to at most one expert (the rows after `offsets[E]` to
/// none: the slots a dispatch found no expert for). Returns the offsets as `usize`.
pub(crate) fn check_offsets(offsets: &Tensor, rows: usize) -> Result<Vec<usize>, String> {
    let off = ints(offsets, "offsets")?;
    let bad = off.first() != Some(&0)
        || off.windows(2).any(|w| w[0] > w[1])
        || off.last().is_none_or(|&l| l as u64 > rows as u64);
    if bad {
        return Err(format!(
            "offsets {off:?} must start at 0, never decrease and end at most at the {rows} rows"
        ));
    }
    Ok(off.iter().map(|&o| o as usize).collect())
}

/// Rows `offsets[e]..offsets[e + 1]` of `x[M, K]` times `ws[e][N, K]^T`.
pub(super) fn grouped_linear(x: &Tensor, offsets: &Tensor, ws: &[&Tensor], out: &TensorType) -> OpResult {
    let xs = floats(x, "the rows")?;
    let xd = x.dims();
    let k = xd[1];
    let off = check_offsets(offsets, xd[0])?;
    let mut data = Vec::with_capacity(xd[0] * udims(out)[1]);
    for (e, w) in ws.iter().enumerate() {
        let ws = floats(w, "expert weights")?;
        rows_times_weight(&xs[off[e] * k..off[e + 1] * k], ws, k, &mut data);
    }
    // An empty contraction yields zeros.
    data.resize(xd[0] * udims(out)[1], 0.0);
    Ok(vec![Tensor::float(out.dtype, dims(out), data)])
}
