//! The gradient ops reverse-mode autodiff builds backward graphs from: `embedding_grad`,
//! `cross_entropy_grad`, `attention_grad`, `scatter_add_along` (the adjoint of `take_along`, which
//! is in `shape`), `grouped_linear_wgrad` and `moe_combine_grad`. `rope`'s gradient is `rope` with
//! `inverse`, in `norm_rope`.
//!
//! Each is the vector-Jacobian product of its forward op as the interpreter computes it, and is
//! tested against central differences of that forward op (or, for the linear ones, against the
//! adjoint identity `<f(x), y> = <x, f^T(y)>`). Every sum accumulates in f64 and every result is
//! rounded once to its dtype, as in the rest of the interpreter.
//!
//! Where a forward op rounds to the activation dtype mid-computation (attention's probabilities,
//! the MoE combination's products and sums), the gradient treats the rounding as the identity, as
//! torch's autograd does for `.to(dtype)` (its backward casts the gradient back): the softmax
//! Jacobian uses the f32 probabilities, and only `dv`, which multiplies them directly, uses the
//! rounded ones the forward multiplied `v` by. For f32 every such rounding is exact.
//!
//! Values that index something (ids, targets, indices, offsets, the permutation) are checked as
//! their forward op checks them; one out of range is an error naming it.

use crate::types::{DType, TensorType};

use super::attention::Mask;
use super::linalg::check_offsets;
use super::loss::{row_max, target_class};
use super::moe::slot_rows;
use super::reduce::softmax_in_place;
use super::{dims, dot, floats, index, ints, udims, OpResult};
use crate::interp::numerics::round_to_dtype;
use crate::interp::tensor::Tensor;

/// `dtable[rows, D]`: zeros with row `dy[i]` added into row `ids[i]`, in f64.
pub(super) fn embedding_grad(ids: &Tensor, dy: &Tensor, out: &TensorType) -> OpResult {
    let ids = ints(ids, "ids")?;
    let ds = floats(dy, "dy")?;
    let od = udims(out);
    let (rows, d) = (od[0], od[1]);
    let mut acc = vec![0.0f64; rows * d];
    for (i, &id) in ids.iter().enumerate() {
        let r = index(id, rows, "token id")?;
        for (a, &g) in acc[r * d..(r + 1) * d].iter_mut().zip(&ds[i * d..(i + 1) * d]) {
            *a += g as f64;
        }
    }
    Ok(vec![Tensor::float(DType::F32, dims(out), acc.iter().map(|&a| a as f32).collect())])
}

/// `dlogits = (softmax(row) - onehot(target)) * dloss` per row, 0 for an ignored row. The
/// exponentials are `cross_entropy`'s (`exp(x - max)`, the difference in f32), the rest in f64.
pub(super) fn cross_entropy_grad(
    logits: &Tensor,
    targets: &Tensor,
    dloss: &Tensor,
    ignore_index: Option<i64>,
) -> OpResult {
    let xs = floats(logits, "the logits")?;
    let ts = ints(targets, "the targets")?;
    let gs = floats(dloss, "dloss")?;
    let v = *logits.dims().last().expect("inference checked the rank");
    let mut data = vec![0.0f32; xs.len()];
    let mut exps = vec![0.0f64; v];
    for (r, &t) in ts.iter().enumerate() {
        let Some(target) = target_class(t, r, v, ignore_index)? else { continue };
        let row = &xs[r * v..(r + 1) * v];
        let max = row_max(row);
        for (e, &x) in exps.iter_mut().zip(row) {
            *e = ((x - max) as f64).exp();
        }
        let sum: f64 = exps.iter().sum();
        let g = gs[r] as f64;
        for (j, (o, &e)) in data[r * v..(r + 1) * v].iter_mut().zip(&exps).enumerate() {
            let onehot = if j == target { 1.0 } else { 0.0 };
            *o = ((e / sum - onehot) * g) as f32;
        }
    }
    Ok(vec![Tensor::float(DType::F32, logits.shape().to_vec(), data)])
}

/// `dq`, `dk`, `dv` of `attention(q, k, v, positions)` for the output gradient `d_out`, the
/// probabilities recomputed with `attention`'s own scores, softmax and [`Mask`]. Per query `t` of
/// head `h`, over its visible keys `s` (key/value head `h / (H / Hk)`):
///
/// ```text
/// P_s   = softmax(q . k_s * scale)            (f32, as the forward)
/// dv_s += round(P_s) * do                     (the forward weighs v by the rounded P)
/// dP_s  = do . v_s
/// dS_s  = P_s * (dP_s - sum_s' P_s' dP_s')
/// dq   += scale * dS_s * k_s,   dk_s += scale * dS_s * q
/// ```
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_grad(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    positions: Option<&Tensor>,
    d_out: &Tensor,
    scale: f64,
    causal: bool,
) -> OpResult {
    let (qs, ks, vs) = (floats(q, "queries")?, floats(k, "keys")?, floats(v, "values")?);
    let dos = floats(d_out, "do")?;
    let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
    let (b, t, h, dk) = (qd[0], qd[1], qd[2], qd[3]);
    let (s, hk, dv) = (kd[1], kd[2], vd[3]);
    let mask = Mask::new(positions, causal, t, s)?;
    let group = h / hk;
    let dtype = q.dtype();
    let (mut gq, mut gk, mut gv) = (vec![0.0f64; qs.len()], vec![0.0f64; ks.len()], vec![0.0f64; vs.len()]);
    let mut probs = vec![0.0f32; s];
    let mut dp = vec![0.0f64; s];
    for bi in 0..b {
        for ti in 0..t {
            let visible = mask.visible(bi, ti);
            for hi in 0..h {
                let kh = hi / group;
                let at_q = ((bi * t + ti) * h + hi) * dk;
                let at_o = ((bi * t + ti) * h + hi) * dv;
                let (qrow, dorow) = (&qs[at_q..at_q + dk], &dos[at_o..at_o + dv]);
                let at_k = |si: usize| ((bi * s + si) * hk + kh) * dk;
                let at_v = |si: usize| ((bi * s + si) * hk + kh) * dv;
                for (si, p) in probs[..visible].iter_mut().enumerate() {
                    *p = (dot(qrow, &ks[at_k(si)..at_k(si) + dk]) * scale) as f32;
                }
                softmax_in_place(&mut probs[..visible]);
                let mut weighted = 0.0f64;
                for (si, (g, &p)) in dp[..visible].iter_mut().zip(&probs).enumerate() {
                    *g = dot(dorow, &vs[at_v(si)..at_v(si) + dv]);
                    weighted += p as f64 * *g;
                }
                for si in 0..visible {
                    let p = probs[si] as f64;
                    let rounded = round_to_dtype(dtype, probs[si]) as f64;
                    for (a, &o) in gv[at_v(si)..at_v(si) + dv].iter_mut().zip(dorow) {
                        *a += rounded * o as f64;
                    }
                    let ds = p * (dp[si] - weighted) * scale;
                    let krow = &ks[at_k(si)..at_k(si) + dk];
                    for (a, &x) in gq[at_q..at_q + dk].iter_mut().zip(krow) {
                        *a += ds * x as f64;
                    }
                    for (a, &x) in gk[at_k(si)..at_k(si) + dk].iter_mut().zip(qrow) {
                        *a += ds * x as f64;
                    }
                }
            }
        }
    }
    let result = |t: &Tensor, acc: Vec<f64>| {
        Tensor::float(t.dtype(), t.shape().to_vec(), acc.into_iter().map(|a| a as f32).collect())
    };
    Ok(vec![result(q, gq), result(k, gk), result(v, gv)])
}

/// Zeros of the result's shape with `src[..., j, ...]` added at `indices[..., j, ...]` along
/// `axis`, in f64: the adjoint of `take_along`.
pub(super) fn scatter_add_along(indices: &Tensor, src: &Tensor, axis: usize, out: &TensorType) -> OpResult {
    let idx = ints(indices, "indices")?;
    let xs = floats(src, "src")?;
    let sd = src.dims();
    let (n, inner) = (sd[axis], sd[axis + 1..].iter().product::<usize>());
    let od = udims(out);
    let size = od[axis];
    let mut acc = vec![0.0f64; od.iter().product()];
    for (e, (&i, &x)) in idx.iter().zip(xs).enumerate() {
        let p = index(i, size, "index")?;
        // Element e sits at (outer o, position along axis, inner i) of src.
        let (o, rest) = (e / (n * inner), e % inner);
        acc[(o * size + p) * inner + rest] += x as f64;
    }
    Ok(vec![Tensor::float(DType::F32, dims(out), acc.into_iter().map(|a| a as f32).collect())])
}

/// `dw_e[N, K] = dy[rows]^T @ x_sorted[rows]` over expert `e`'s rows `offsets[e]..offsets[e + 1]`,
/// each element one f64 sum.
pub(super) fn grouped_linear_wgrad(
    x: &Tensor,
    offsets: &Tensor,
    dy: &Tensor,
    outs: &[TensorType],
) -> OpResult {
    let xs = floats(x, "the rows x_sorted")?;
    let ds = floats(dy, "dy")?;
    let xd = x.dims();
    let (m, k) = (xd[0], xd[1]);
    let n = dy.dims()[1];
    let off = check_offsets(offsets, m)?;
    let mut results = Vec::with_capacity(outs.len());
    for (e, ty) in outs.iter().enumerate() {
        let rows = off[e]..off[e + 1];
        let mut data = Vec::with_capacity(n * k);
        for a in 0..n {
            for c in 0..k {
                let acc: f64 = rows.clone().map(|r| ds[r * n + a] as f64 * xs[r * k + c] as f64).sum();
                data.push(acc as f32);
            }
        }
        results.push(Tensor::float(DType::F32, dims(ty), data));
    }
    Ok(results)
}

/// `dy_sorted[r] = dy[token] * weights[token, k]` and `dweights[token, k] = y_sorted[r] . dy[token]`
/// for the row `r` slot `token * K + k` went to.
pub(super) fn moe_combine_grad(
    dy: &Tensor,
    y: &Tensor,
    perm: &Tensor,
    weights: &Tensor,
    outs: &[TensorType],
) -> OpResult {
    let dys = floats(dy, "dy")?;
    let ys = floats(y, "the rows y_sorted")?;
    let ws = floats(weights, "the weights")?;
    let perm = ints(perm, "the permutation")?;
    let wd = weights.dims();
    let (n, k) = (wd[0], wd[1]);
    let d = y.dims()[1];
    let row_of = slot_rows(perm, n * k)?;
    let mut dy_sorted = vec![0.0f32; ys.len()];
    let mut dw = vec![0.0f32; n * k];
    for t in 0..n {
        let g = &dys[t * d..(t + 1) * d];
        for slot in t * k..(t + 1) * k {
            let r = row_of[slot];
            let w = ws[slot] as f64;
            for (o, &x) in dy_sorted[r * d..(r + 1) * d].iter_mut().zip(g) {
                *o = (x as f64 * w) as f32;
            }
            dw[slot] = dot(&ys[r * d..(r + 1) * d], g) as f32;
        }
    }
    Ok(vec![
        Tensor::float(outs[0].dtype, dims(&outs[0]), dy_sorted),
        Tensor::float(outs[1].dtype, dims(&outs[1]), dw),
    ])
}
