//! Scaled dot-product attention over `q[B, T, H, Dk]`, `k[B, S, Hk, Dk]`, `v[B, S, Hk, Dv]`.
//!
//! For query `t` of head `h`: `score_s = (q_t . k_s) * scale` in f32 (the dot in f64), over the keys
//! `s` it may see; with `causal` those are `0..=t + (S - T)`, the new tokens coming after `S - T`
//! cached ones. Softmax in f32 with the maximum subtracted; the probabilities are rounded to the
//! activation dtype, as HF's eager attention (`softmax(..., dtype=torch.float32).to(query.dtype)`)
//! and \[R\] (`.type_as(x)`) do; the weighted sum of `v` accumulates in f64 and is rounded to the
//! dtype. Query head `h` reads key/value head `h / (H / Hk)` (HF `repeat_kv`).

use crate::types::TensorType;

use super::reduce::softmax_in_place;
use super::{dims, dot, floats, ints, OpResult};
use crate::interp::numerics::round_to_dtype;
use crate::interp::tensor::Tensor;

pub(super) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    positions: Option<&Tensor>,
    scale: f64,
    causal: bool,
    out: &TensorType,
) -> OpResult {
    let (qs, ks, vs) = (floats(q, "queries")?, floats(k, "keys")?, floats(v, "values")?);
    let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
    let (b, t, h, dk) = (qd[0], qd[1], qd[2], qd[3]);
    let (s, hk, dv) = (kd[1], kd[2], vd[3]);
    let mask = Mask::new(positions, causal, t, s)?;
    let group = h / hk;
    let dtype = q.dtype();
    let mut data = Vec::with_capacity(b * t * h * dv);
    let mut probs = vec![0.0f32; s];
    let mut acc = vec![0.0f64; dv];
    for bi in 0..b {
        for ti in 0..t {
            let visible = mask.visible(bi, ti);
            for hi in 0..h {
                let kh = hi / group;
                let qrow = &qs[((bi * t + ti) * h + hi) * dk..][..dk];
                for (si, p) in probs[..visible].iter_mut().enumerate() {
                    let krow = &ks[((bi * s + si) * hk + kh) * dk..][..dk];
                    *p = (dot(qrow, krow) * scale) as f32;
                }
                softmax_in_place(&mut probs[..visible]);
                acc.fill(0.0);
                for (si, &p) in probs[..visible].iter().enumerate() {
                    let p = round_to_dtype(dtype, p) as f64;
                    let vrow = &vs[((bi * s + si) * hk + kh) * dv..][..dv];
                    for (a, &x) in acc.iter_mut().zip(vrow) {
                        *a += p * x as f64;
                    }
                }
                data.extend(acc.iter().map(|&a| a as f32));
            }
        }
    }
    Ok(vec![Tensor::float(dtype, dims(out), data)])
}

/// Which keys each query sees: `attention`'s masking, shared with `attention_grad`.
pub(super) struct Mask<'a> {
    positions: Option<&'a [i64]>,
    causal: bool,
    t: usize,
    s: usize,
}

impl<'a> Mask<'a> {
    /// The mask of `t` queries over `s` keys; causal attention without positions needs `s >= t`.
    pub(super) fn new(
        positions: Option<&'a Tensor>,
        causal: bool,
        t: usize,
        s: usize,
    ) -> Result<Self, String> {
        if causal && positions.is_none() && s < t {
            return Err(format!(
                "causal attention needs at least as many keys as queries, found {s} keys for {t} queries"
            ));
        }
        let positions = positions.map(|p| ints(p, "positions")).transpose()?;
        Ok(Mask { positions, causal, t, s })
    }

    /// The number of keys query `(b, t)` sees, keys `0..visible`; causal masking removes the rest
    /// (they would get exp(-inf) = 0). With positions, slot j of the cache holds position j: keys
    /// up to the query's own.
    pub(super) fn visible(&self, b: usize, t: usize) -> usize {
        match self.positions {
            Some(p) => (p[b * self.t + t].max(-1) + 1).min(self.s as i64) as usize,
            None if self.causal => t + (self.s - self.t) + 1,
            None => self.s,
        }
    }
}
