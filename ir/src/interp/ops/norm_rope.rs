//! RMSNorm and rotary position embedding, with YaRN frequencies.
//!
//! `rms_norm` is Hugging Face's `DeepseekV3RMSNorm` (\[T-mod\]): in f32,
//! `normed = x * rsqrt(mean(x^2) + eps)`, rounded to the input dtype, then `weight * normed` rounded
//! again (`self.weight * hidden_states.to(input_dtype)`). The mean of squares accumulates in f64.
//!
//! `rope` rotates pairs of lanes of the last axis by `position * inv_freq[j]`. Interleaved mode
//! rotates `(x[2j], x[2j+1])` in place, as DeepSeek's `apply_rotary_emb` (\[R\]) does with complex
//! pairs; otherwise lane `j` pairs with lane `j + D/2` (`rotate_half`). The rotation is computed in
//! f64 from f32 cos/sin of an f32 angle (`position.float() * inv_freq`, as HF and \[R\] form it) and
//! rounded once. See the parent module documentation for how this relates to HF's layout.
//!
//! With `inverse` the sine is negated after it is computed, so the rotation uses the same cos and
//! sin as the forward one, transposed: `rope(dy, inverse)` is exactly the adjoint of `rope(x)` (the
//! gradient with respect to `x`), up to the one rounding of each result.

use crate::op::{RopeConfig, Yarn};

use super::{floats, ints, OpResult};
use crate::interp::numerics::round_to_dtype;
use crate::interp::tensor::Tensor;

pub(super) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> OpResult {
    let (xs, ws) = (floats(x, "the input")?, floats(w, "the weight")?);
    let dtype = x.dtype();
    let d = ws.len();
    let mut data = Vec::with_capacity(xs.len());
    if d > 0 {
        for row in xs.chunks_exact(d) {
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
            let inv = 1.0 / (ms + eps).sqrt();
            for (&v, &g) in row.iter().zip(ws) {
                let normed = round_to_dtype(dtype, (v as f64 * inv) as f32);
                data.push(g * normed);
            }
        }
    }
    Ok(vec![Tensor::float(dtype, x.shape().to_vec(), data)])
}

/// The rotary inverse frequencies for a rotated width `dim`, in f64: `theta^(-2i/dim)` for
/// `i < dim/2`, blended with `theta^(-2i/dim) / factor` by YaRN's linear ramp when `yarn` is set.
///
/// This is `_compute_yarn_parameters` in transformers' `modeling_rope_utils.py` (with its default
/// `truncate = True`) and `precompute_freqs_cis` in \[R\] `model.py` (reference §2.4):
/// `corr(n) = dim * ln(L0 / (n * 2 pi)) / (2 ln theta)`, `low = max(floor(corr(beta_fast)), 0)`,
/// `high = min(ceil(corr(beta_slow)), dim - 1)`, `ramp_i = clamp((i - low) / (high - low), 0, 1)`
/// (with `high += 0.001` when they coincide) and `f'_i = f_i * (1 - ramp_i) + f_i / factor * ramp_i`.
/// Both references evaluate it in f32; kiln in f64, rounded to f32 by the caller.
pub fn inv_freq(dim: usize, theta: f64, yarn: Option<&Yarn>) -> Vec<f64> {
    let base: Vec<f64> = (0..dim / 2).map(|i| theta.powf(-((2 * i) as f64) / dim as f64)).collect();
    let Some(y) = yarn else { return base };
    let corr = |rotations: f64| {
        dim as f64 * (y.original_max_position as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
            / (2.0 * theta.ln())
    };
    let low = corr(y.beta_fast).floor().max(0.0);
    let mut high = corr(y.beta_slow).ceil().min(dim as f64 - 1.0);
    if low == high {
        high += 0.001;
    }
    base.iter()
        .enumerate()
        .map(|(i, &f)| {
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            f * (1.0 - ramp) + f / y.factor * ramp
        })
        .collect()
}

pub(super) fn rope(x: &Tensor, positions: &Tensor, cfg: &RopeConfig) -> OpResult {
    let xs = floats(x, "the input")?;
    let pos = ints(positions, "positions")?;
    let xd = x.dims();
    let d = xd[xd.len() - 1];
    let half = d / 2;
    // Every (batch, token) owns `lanes` vectors of width `d` (the heads, or one shared rope head).
    let lanes: usize = xd[2..xd.len() - 1].iter().product();
    let freqs: Vec<f32> = inv_freq(d, cfg.theta, cfg.yarn.as_ref()).iter().map(|&f| f as f32).collect();
    let (mut cos, mut sin) = (vec![0.0f64; half], vec![0.0f64; half]);
    let mut data = vec![0.0f32; xs.len()];
    for (bt, &p) in pos.iter().enumerate() {
        for j in 0..half {
            let angle = p as f32 * freqs[j];
            cos[j] = (angle as f64).cos() as f32 as f64;
            let sine = (angle as f64).sin() as f32 as f64;
            sin[j] = if cfg.inverse { -sine } else { sine };
        }
        for l in 0..lanes {
            let start = (bt * lanes + l) * d;
            let (src, dst) = (&xs[start..start + d], &mut data[start..start + d]);
            for j in 0..half {
                let (a, b) = if cfg.interleaved { (2 * j, 2 * j + 1) } else { (j, j + half) };
                let (x0, x1) = (src[a] as f64, src[b] as f64);
                dst[a] = (x0 * cos[j] - x1 * sin[j]) as f32;
                dst[b] = (x0 * sin[j] + x1 * cos[j]) as f32;
            }
        }
    }
    Ok(vec![Tensor::float(x.dtype(), x.shape().to_vec(), data)])
}
