//! Multi-head latent attention in its "naive" form (reference §2.1, §2.2): keys and values are
//! expanded from the latent per head, so the graph reads like Hugging Face's `DeepseekV3Attention`.
//! The `fuse-mla-latent` pass later absorbs `kv_b_proj` into the query and output sides.
//!
//! ```text
//! q      = q_b(rms_norm(q_a(x)))  or  q_proj(x)        -> [B, T, H, dn + dr] -> q_nope, q_pe
//! q_pe   = rope(q_pe)
//! kv_all = kv_a(x)                                     -> c_kv [B, T, r], k_pe [B, T, dr]
//! k_pe   = broadcast(rope(k_pe as [B, T, 1, dr]))      -> [B, T, H, dr]   (one rope head for all heads)
//! k_nope, v = kv_b(rms_norm(c_kv))                     -> [B, T, H, dn + dv] split [dn, dv]
//! out    = o_proj(attention(q_nope|q_pe, k_nope|k_pe, v))
//! ```

use kiln_ir::op::{Op, RopeConfig, Yarn};
use kiln_ir::spec::ModelSpec;
use kiln_ir::{BinaryOp, Dim, ValueId};

use super::{add, bt, mul, BuildError, Builder, Phase};

/// Epsilon of the two latent norms (`q_a_layernorm`, `kv_a_layernorm`). Both Hugging Face
/// (`modeling_deepseek_v3.py`: `DeepseekV3RMSNorm(self.q_lora_rank)` with its default `eps=1e-6`) and
/// DeepSeek's `model.py` (`RMSNorm(self.q_lora_rank)`) build them with a fixed 1e-6 rather than
/// `rms_norm_eps`; the two only differ for configs whose `rms_norm_eps` is not 1e-6 (Moonlight: 1e-5).
const LATENT_NORM_EPS: f64 = 1e-6;

/// Attention of one layer, with its params and ops in `scope` (`model.layers.{i}.self_attn`).
pub(super) fn attention(
    b: &mut Builder,
    scope: &str,
    x: ValueId,
    positions: ValueId,
) -> Result<ValueId, BuildError> {
    let a = &b.spec.attention;
    let d = b.spec.model.hidden_size;
    let (h, dn, dr, dv, r) =
        (a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank);
    let dqk = add(dn, dr)?;

    let q = match a.q_lora_rank {
        Some(qr) => {
            let c = b.linear(scope, "q_a_proj.weight", x, qr, d)?;
            let c = b.rms_norm_with_eps(scope, "q_a_layernorm.weight", c, LATENT_NORM_EPS)?;
            b.linear(scope, "q_b_proj.weight", c, mul(h, dqk)?, qr)?
        }
        None => b.linear(scope, "q_proj.weight", x, mul(h, dqk)?, d)?,
    };
    let q = b.op(scope, Op::Reshape { shape: bt(&[h, dqk]) }, &[q])?;
    let (q_nope, q_pe) = b.split2(scope, q, 3, [dn, dr])?;
    let q_pe = rope(b, scope, q_pe, positions)?;

    let kv_all = b.linear(scope, "kv_a_proj_with_mqa.weight", x, add(r, dr)?, d)?;
    let (c_kv, k_pe) = b.split2(scope, kv_all, 2, [r, dr])?;
    let c_kv = b.rms_norm_with_eps(scope, "kv_a_layernorm.weight", c_kv, LATENT_NORM_EPS)?;
    let k_pe = b.op(scope, Op::Reshape { shape: bt(&[1, dr]) }, &[k_pe])?;
    let k_pe = rope(b, scope, k_pe, positions)?;
    let k_pe = b.op(scope, Op::Broadcast { shape: bt(&[h, dr]) }, &[k_pe])?;

    let kv = b.linear(scope, "kv_b_proj.weight", c_kv, mul(h, add(dn, dv)?)?, r)?;
    let kv = b.op(scope, Op::Reshape { shape: bt(&[h, add(dn, dv)?]) }, &[kv])?;
    let (k_nope, v) = b.split2(scope, kv, 3, [dn, dv])?;

    let q = b.op(scope, Op::Concat { axis: 3 }, &[q_nope, q_pe])?;
    let k = b.op(scope, Op::Concat { axis: 3 }, &[k_nope, k_pe])?;
    let attn = Op::Attention { scale: b.spec.softmax_scale(), causal: true, mla: None };
    let o = match b.phase {
        None => b.op(scope, attn, &[q, k, v])?,
        Some(phase) => {
            // The naive cache: every head's key and value of every position (reference §2.3).
            let k_all = cache(b, scope, "k", k, positions)?;
            let v_all = cache(b, scope, "v", v, positions)?;
            match phase {
                // A prefill starts from position 0: the new tokens are the whole context.
                Phase::Prefill => b.op(scope, attn, &[q, k, v])?,
                Phase::Decode => b.op(scope, attn, &[q, k_all, v_all, positions])?,
            }
        }
    };
    let o = b.op(scope, Op::Reshape { shape: vec![Dim::B, Dim::T, Dim::known(mul(h, dv)?)] }, &[o])?;
    b.linear(scope, "o_proj.weight", o, d, mul(h, dv)?)
}

/// Writes the new `[B, T, ...]` entries into the layer's cache input `kv_cache.{layer}.{what}`
/// (`[B, S, ...]`) at `positions`, and outputs the updated cache under the same name.
fn cache(
    b: &mut Builder,
    scope: &str,
    what: &str,
    new: ValueId,
    positions: ValueId,
) -> Result<ValueId, BuildError> {
    let layer = scope.trim_start_matches("model.layers.").trim_end_matches(".self_attn");
    let name = format!("kv_cache.{layer}.{what}");
    let ty = b.g.ty(new);
    let mut shape = ty.shape.clone();
    shape[1] = Dim::S;
    let ty = kiln_ir::TensorType::new(ty.dtype, shape);
    let input = b.input(&name, ty)?;
    let updated = b.op(scope, Op::CacheUpdate, &[input, new, positions])?;
    b.output(&name, updated)?;
    Ok(updated)
}

/// Rotary embedding of `x` as Hugging Face applies it, amplitude included.
fn rope(b: &mut Builder, scope: &str, x: ValueId, positions: ValueId) -> Result<ValueId, BuildError> {
    let y = b.op(scope, Op::Rope(rope_config(b.spec)), &[x, positions])?;
    let amp = rope_amplitude(b.spec);
    if amp == 1.0 {
        return Ok(y);
    }
    let c = b.constant(scope, amp, b.g.ty(y).dtype)?;
    b.op(scope, Op::Binary(BinaryOp::Mul), &[y, c])
}

/// The rope op's attributes. YaRN is on whenever the spec has a `[rope.yarn]` section: Hugging Face
/// (`modeling_rope_utils.py`, `rope_type = "yarn"`) always uses the YaRN frequencies when
/// `rope_scaling` is present, while DeepSeek's `model.py` uses them only when `max_seq_len` exceeds
/// `original_seq_len` (reference §2.4). kiln follows Hugging Face, whose checkpoints and goldens users
/// compare with; for the released configs the two agree at their default lengths.
fn rope_config(spec: &ModelSpec) -> RopeConfig {
    RopeConfig {
        theta: spec.rope.theta,
        interleaved: spec.rope.interleaved,
        yarn: spec.rope.yarn.as_ref().map(|y| Yarn {
            factor: y.factor,
            original_max_position: y.original_max_position_embeddings,
            beta_fast: y.beta_fast,
            beta_slow: y.beta_slow,
        }),
        inverse: false,
    }
}

/// The factor Hugging Face multiplies YaRN's cos and sin by (`attention_factor` of
/// `_compute_yarn_parameters`): `mscale(f, mscale) / mscale(f, mscale_all_dim)` when both are
/// non-zero, else `mscale(f, 1)`. It is 1 for every DeepSeek release (`mscale == mscale_all_dim`),
/// where the temperature lives in the softmax scale instead (`ModelSpec::softmax_scale`); the rope op
/// has no amplitude, so any other value becomes a multiply after it.
fn rope_amplitude(spec: &ModelSpec) -> f64 {
    match &spec.rope.yarn {
        None => 1.0,
        Some(y) if y.mscale != 0.0 && y.mscale_all_dim != 0.0 => {
            ModelSpec::yarn_mscale(y.factor, y.mscale) / ModelSpec::yarn_mscale(y.factor, y.mscale_all_dim)
        }
        Some(y) => ModelSpec::yarn_mscale(y.factor, 1.0),
    }
}
