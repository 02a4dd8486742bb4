//! Mixture of experts: the router, the token-by-token expert evaluation, and the dispatch /
//! combine pair that the `plan-moe-dispatch` lowering uses around `grouped_linear`.
//!
//! Router ([`route`]), following HF `DeepseekV3TopkRouter` (transformers 5.24) and \[R\] `Gate`
//! (reference §3.1), per token in f32:
//!
//! ```text
//! scores  = sigmoid(logits)  |  softmax(logits)
//! sel     = scores + bias                      (sel = scores without a bias)
//! groups  (num_groups > 1): group score = top-2 sum (Top2Sum) or max (Max) of sel in each group;
//!         keep the top `topk_groups` groups, set sel of the others to -inf
//! idx     = top_k(sel)                          (largest first, ties to the lower index)
//! w       = scores[idx]                         (the bias steers selection only)
//! w       = w / (sum(w) + 1e-20)   if normalize
//! w       = w * scaling
//! ```
//!
//! The mask value is -inf as in HF (`masked_fill(~score_mask.bool(), float("-inf"))`) and in \[R\]
//! since commit 1398800; the older HF remote code used 0.0 (reference D3). They differ only when
//! fewer than `top_k` experts of the kept groups have a selection score above 0.
//!
//! Experts ([`experts`]) and [`combine`] round as HF `DeepseekV3Experts` does in the activation
//! dtype `d`: `gate`, `up`, `silu(gate)`, their product and `down` are each rounded to `d`, the
//! expert output times its f32 weight is rounded to `d`, and a token's contributions are added in `d`
//! in ascending expert order (HF loops over experts and `index_add_`s into a `d` tensor). For f32
//! models every rounding is exact, so only the summation order remains.
//!
//! Dispatch ([`dispatch`]) sorts the `N*K` token slots (`slot = token * K + k`) stably by expert, so
//! rows are ordered by (expert, token, slot); `offsets[e]` is the first row of expert `e` and
//! `perm[row]` the slot a row came from. The expert-parallel size does not change the order (the
//! experts of one rank are contiguous), so the interpreter ignores it. The group limit
//! (`num_groups`, `topk_groups`) is a promise the router made and the dispatch plan's buffers rely
//! on; the interpreter checks it and reports a token whose experts span more groups.
//!
//! Index `E` (one past the last expert) marks a slot with no expert in this operation: an
//! expert-parallel rank's slot routed to another rank's expert. [`experts`] skips it, and
//! [`dispatch`] sorts it after every expert's rows (from `offsets[E]` on), which `grouped_linear`
//! leaves at zero; it takes no part in the group limit. Any other index outside `0..E` is an error.

use crate::op::{Dispatch, GroupScore, Router, Scoring};
use crate::types::{DType, TensorType};

use super::elementwise::sigmoid;
use super::reduce::{softmax_in_place, top_k_indices};
use super::{dims, dot, floats, index, ints, OpResult};
use crate::interp::numerics::round_to_dtype;
use crate::interp::tensor::Tensor;

pub(super) fn route(logits: &Tensor, bias: Option<&Tensor>, r: &Router, outs: &[TensorType]) -> OpResult {
    let ls = floats(logits, "logits")?;
    let bias = bias.map(|b| floats(b, "the bias")).transpose()?;
    let e = r.num_experts as usize;
    let k = r.top_k as usize;
    let groups = r.num_groups as usize;
    let group_size = e / groups;
    if groups > 1 && r.group_score == GroupScore::Top2Sum && group_size < 2 {
        return Err(format!("top2_sum group scores need at least 2 experts per group, found {group_size}"));
    }
    let rows = ls.len().checked_div(e).unwrap_or(0);
    let mut weights = Vec::with_capacity(rows * k);
    let mut indices = Vec::with_capacity(rows * k);
    let mut scores = vec![0.0f32; e];
    let mut sel = vec![0.0f32; e];
    for row in ls.chunks_exact(e.max(1)).take(rows) {
        match r.scoring {
            Scoring::Sigmoid => {
                for (s, &l) in scores.iter_mut().zip(row) {
                    *s = sigmoid(l as f64) as f32;
                }
            }
            Scoring::Softmax => {
                scores.copy_from_slice(row);
                softmax_in_place(&mut scores);
            }
        }
        for (i, s) in sel.iter_mut().enumerate() {
            *s = scores[i] + bias.map_or(0.0, |b| b[i]);
        }
        if groups > 1 {
            let group_scores: Vec<f32> = sel
                .chunks_exact(group_size)
                .map(|g| match r.group_score {
                    GroupScore::Top2Sum => top_k_indices(g, 2).iter().map(|&i| g[i]).sum(),
                    GroupScore::Max => g[top_k_indices(g, 1)[0]],
                })
                .collect();
            let kept = top_k_indices(&group_scores, r.topk_groups as usize);
            for (gi, g) in sel.chunks_exact_mut(group_size).enumerate() {
                if !kept.contains(&gi) {
                    g.fill(f32::NEG_INFINITY);
                }
            }
        }
        let idx = top_k_indices(&sel, k);
        let mut w: Vec<f32> = idx.iter().map(|&i| scores[i]).collect();
        if r.normalize {
            let denom = w.iter().map(|&v| v as f64).sum::<f64>() as f32 + 1e-20;
            w.iter_mut().for_each(|v| *v /= denom);
        }
        weights.extend(w.iter().map(|&v| v * r.scaling as f32));
        indices.extend(idx.iter().map(|&i| i as i64));
    }
    Ok(vec![
        Tensor::float(DType::F32, dims(&outs[0]), weights),
        Tensor::int(DType::I32, dims(&outs[1]), indices),
    ])
}

/// One token's contribution `round(round(y) * w)` added to `acc` in the dtype.
fn accumulate(acc: &mut [f32], y: &[f32], w: f32, dtype: DType) {
    for (a, &v) in acc.iter_mut().zip(y) {
        let c = round_to_dtype(dtype, v * w);
        *a = round_to_dtype(dtype, *a + c);
    }
}

/// `sum_k w_k * down(silu(gate x) * up x)` over each token's experts; see the module documentation.
pub(super) fn experts(x: &Tensor, weights: &Tensor, indices: &Tensor, params: &[&Tensor]) -> OpResult {
    let xs = floats(x, "the input")?;
    let ws = floats(weights, "the weights")?;
    let ids = ints(indices, "the indices")?;
    let dtype = x.dtype();
    let xd = x.dims();
    let d = xd[xd.len() - 1];
    let k = weights.dims().last().copied().unwrap_or(0);
    let num_experts = params.len() / 3;
    let tokens = ids.len().checked_div(k).unwrap_or(0);
    let mut data = Vec::with_capacity(xs.len());
    let mut h = Vec::new();
    let mut y = vec![0.0f32; d];
    let mut acc = vec![0.0f32; d];
    for t in 0..tokens {
        let xrow = &xs[t * d..(t + 1) * d];
        let mut slots = Vec::with_capacity(k);
        for s in 0..k {
            slots.push((slot_expert(ids[t * k + s], num_experts)?, s));
        }
        slots.sort();
        acc.fill(0.0);
        for (e, s) in slots.into_iter().filter(|&(e, _)| e < num_experts) {
            let (gate, up, down) = (
                floats(params[3 * e], "gate")?,
                floats(params[3 * e + 1], "up")?,
                floats(params[3 * e + 2], "down")?,
            );
            let inter = params[3 * e].dims()[0];
            h.clear();
            for j in 0..inter {
                let g = round_to_dtype(dtype, dot(xrow, &gate[j * d..(j + 1) * d]) as f32);
                let a = round_to_dtype(dtype, (g as f64 * sigmoid(g as f64)) as f32);
                let u = round_to_dtype(dtype, dot(xrow, &up[j * d..(j + 1) * d]) as f32);
                h.push(round_to_dtype(dtype, a * u));
            }
            for (o, yo) in y.iter_mut().enumerate() {
                *yo = round_to_dtype(dtype, dot(&h, &down[o * inter..(o + 1) * inter]) as f32);
            }
            accumulate(&mut acc, &y, ws[t * k + s], dtype);
        }
        data.extend_from_slice(&acc);
    }
    Ok(vec![Tensor::float(dtype, x.shape().to_vec(), data)])
}

/// Sorts token slots by expert: results `x_sorted[K*N, D]`, `offsets[E + 1]` and `perm[K*N]`.
pub(super) fn dispatch(x: &Tensor, indices: &Tensor, plan: &Dispatch, outs: &[TensorType]) -> OpResult {
    let ids = ints(indices, "the indices")?;
    let num_experts = plan.num_experts as usize;
    let xd = x.dims();
    let (n, d) = (xd[0], xd[1]);
    let k = indices.dims()[1];
    let experts: Vec<usize> = ids.iter().map(|&i| slot_expert(i, num_experts)).collect::<Result<_, _>>()?;
    if plan.num_groups > 1 {
        let group_size = num_experts / plan.num_groups as usize;
        for (t, slots) in experts.chunks_exact(k.max(1)).enumerate() {
            let mut groups: Vec<usize> =
                slots.iter().filter(|&&e| e < num_experts).map(|&e| e / group_size).collect();
            groups.sort_unstable();
            groups.dedup();
            if groups.len() as u64 > plan.topk_groups {
                return Err(format!(
                    "token {t} has experts in {} groups, more than topk_groups = {}",
                    groups.len(),
                    plan.topk_groups
                ));
            }
        }
    }
    // Slots are numbered token-major, so a stable sort by expert orders by (expert, token, slot);
    // the slots of no expert (index E) come last.
    let mut order: Vec<usize> = (0..n * k).collect();
    order.sort_by_key(|&s| experts[s]);
    let mut offsets = vec![0i64; num_experts + 1];
    for &e in experts.iter().filter(|&&e| e < num_experts) {
        offsets[e + 1] += 1;
    }
    for e in 0..num_experts {
        offsets[e + 1] += offsets[e];
    }
    let rows = order.iter().flat_map(|&s| (s / k) * d..(s / k + 1) * d);
    Ok(vec![
        x.select(dims(&outs[0]), rows),
        Tensor::int(DType::I32, dims(&outs[1]), offsets),
        Tensor::int(DType::I32, dims(&outs[2]), order.iter().map(|&s| s as i64).collect()),
    ])
}

/// A slot's expert: `0..E`, or `E` for a slot with no expert here; anything else is an error.
fn slot_expert(i: i64, num_experts: usize) -> Result<usize, String> {
    index(i, num_experts + 1, "expert index")
}

/// `out[token] = sum over its slots of weights[token, slot] * y[row of the slot]`, in row order
/// (ascending expert), rounded as [`experts`] does.
pub(super) fn combine(y: &Tensor, perm: &Tensor, weights: &Tensor, out: &TensorType) -> OpResult {
    let ys = floats(y, "the rows")?;
    let ws = floats(weights, "the weights")?;
    let perm = ints(perm, "the permutation")?;
    let wd = weights.dims();
    let (n, k) = (wd[0], wd[1]);
    let d = y.dims()[1];
    let dtype = y.dtype();
    let row_of = slot_rows(perm, n * k)?;
    let mut data = Vec::with_capacity(n * d);
    let mut acc = vec![0.0f32; d];
    let mut rows = Vec::with_capacity(k);
    for t in 0..n {
        rows.clear();
        rows.extend((0..k).map(|s| (row_of[t * k + s], s)));
        rows.sort();
        acc.fill(0.0);
        for &(r, s) in &rows {
            accumulate(&mut acc, &ys[r * d..(r + 1) * d], ws[t * k + s], dtype);
        }
        data.extend_from_slice(&acc);
    }
    Ok(vec![Tensor::float(out.dtype, dims(out), data)])
}

/// The row each of the `slots` token slots went to, from a dispatch's `perm`; every slot must appear
/// exactly once.
pub(super) fn slot_rows(perm: &[i64], slots: usize) -> Result<Vec<usize>, String> {
    let mut row_of = vec![usize::MAX; slots];
    for (r, &s) in perm.iter().enumerate() {
        let s = index(s, slots, "slot")?;
        if row_of[s] != usize::MAX {
            return Err(format!("slot {s} appears twice in the permutation"));
        }
        row_of[s] = r;
    }
    Ok(row_of)
}
