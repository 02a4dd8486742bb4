//! `cross_entropy`: the per-row next-token loss.
//!
//! Follows PyTorch's `F.cross_entropy(logits.float(), targets, reduction="none")` over the last axis
//! (`log_softmax` then `nll_loss`, aten `LossNLL.cpp` and `SoftMax.cpp`): for a row `x[0..V]` and its
//! target `t`, `loss = log(sum_j exp(x[j] - max)) - (x[t] - max)`, the maximum of the row subtracted
//! first so that large logits do not overflow. The differences `x[j] - max` are taken in f32 (the
//! logits' values are f32 here whatever their dtype, as after `.float()`); the exponentials and their
//! sum are in f64, like the interpreter's softmax denominator, and the loss is rounded to f32 once.
//!
//! A row holding NaN, or whose maximum is infinite, has a NaN loss (as in torch). A target equal to
//! `ignore_index` gives a loss of 0 whatever the row holds (torch's masking in `nll_loss`); any other
//! target outside `0..V` is an error naming the row, where torch raises too. Compiled kernels, which
//! cannot raise, give such a row a NaN loss without reading outside it.

use super::{floats, ints, OpResult};
use crate::interp::tensor::Tensor;
use crate::types::DType;

pub(super) fn cross_entropy(logits: &Tensor, targets: &Tensor, ignore_index: Option<i64>) -> OpResult {
    let xs = floats(logits, "the logits")?;
    let ts = ints(targets, "the targets")?;
    let v = *logits.dims().last().expect("inference checked the rank");
    let mut loss = Vec::with_capacity(ts.len());
    for (r, &t) in ts.iter().enumerate() {
        loss.push(match target_class(t, r, v, ignore_index)? {
            Some(target) => row_loss(&xs[r * v..(r + 1) * v], target),
            None => 0.0,
        });
    }
    Ok(vec![Tensor::float(DType::F32, targets.shape().to_vec(), loss)])
}

/// The class of target `t` of row `r` among `v`, `None` when it is `ignore_index`; any other target
/// outside `0..v` is an error naming the row.
pub(super) fn target_class(
    t: i64,
    r: usize,
    v: usize,
    ignore_index: Option<i64>,
) -> Result<Option<usize>, String> {
    if Some(t) == ignore_index {
        return Ok(None);
    }
    match usize::try_from(t) {
        Ok(u) if u < v => Ok(Some(u)),
        _ => Err(format!("target {t} (row {r}) is out of range 0..{v}")),
    }
}

/// The maximum of a row, NaN if it holds one.
pub(super) fn row_max(row: &[f32]) -> f32 {
    let max = |m: f32, x: f32| if x.is_nan() || m.is_nan() { f32::NAN } else { m.max(x) };
    row.iter().copied().fold(f32::NEG_INFINITY, max)
}

/// `logsumexp(row) - row[target]` with the maximum subtracted; see the module documentation.
fn row_loss(row: &[f32], target: usize) -> f32 {
    let max = row_max(row);
    let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    (sum.ln() - (row[target] - max) as f64) as f32
}
