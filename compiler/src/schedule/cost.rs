//! The cost model the partition balances ([`super::partition`]): for each piece of a model (the
//! embedding, each decoder layer, the head with the MTP modules), its forward FLOPs per token, the
//! part of them in products with weights, and the weights it holds, all derived from the spec.
//!
//! Counting: a row of `n` times an `n × m` matrix is `2·n·m` FLOPs (a multiply and an add per
//! weight). Only matrix products count; norms, RoPE, the softmax, SiLU, the router's top-k and the
//! residual adds grow with the width alone and are a small part of a layer. Attention is counted for
//! a causal sequence of `seq_len` tokens: token `t` attends to `t + 1` keys, `(seq_len + 1) / 2` on
//! average, so a per-key product of `2·w` FLOPs costs `w·(seq_len + 1)` per token, an integer.
//!
//! The backward pass (which the schedule simulation needs) follows from the two parts: each product
//! with a weight is repeated twice backward (the input gradient and the weight gradient, `W`), each
//! product between activations (attention's scores and weighted sum) twice for its two operands'
//! gradients; so a full backward is twice the forward and its weight part is `weight`.
//!
//! Weights are the checkpoint's tensors as `kiln_compiler::build` declares them (FP8 block scales
//! aside), each on the piece that holds it. A tied head is the embedding's table, counted once, on
//! the embedding; the MTP modules share the head and the embedding and hold neither again (their
//! lookups run on the embedding's stage, which sends the rows: `crate::pipeline`).
//!
//! Does not model: communication (pipeline sends and the MoE all-to-all), memory traffic, kernel
//! efficiency, or expert load imbalance (routed experts cost their expected `top_k` per token).

use kiln_ir::spec::TopkMethod;
use kiln_ir::ModelSpec;

/// A piece of the model, in pipeline order: [`Piece::Embedding`], [`Piece::Layer`] `0..L`,
/// [`Piece::Head`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Piece {
    /// `model.embed_tokens`.
    Embedding,
    /// Decoder layer `i` of the main model (`model.layers.{i}`).
    Layer(u64),
    /// The final norm and the output head (`model.norm`, `lm_head`) and the MTP modules
    /// (`model.layers.{L+k-1}`), which share the head and sit with it ([P] p. 14, reference §6.2).
    Head,
}

/// Per token: forward FLOPs, the part of them in products with weights, and the weights held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    pub forward: u64,
    pub weight: u64,
    pub params: u64,
}

/// A cost too large for 64 bits (a spec far past any model; the spec's limits normally prevent it).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the cost of {what} overflows 64 bits at a sequence length of {seq_len}")]
pub struct Overflow {
    pub what: String,
    pub seq_len: u64,
}

impl Cost {
    /// The sum of two costs; `None` on overflow.
    pub fn checked_add(self, o: Cost) -> Option<Cost> {
        Some(Cost {
            forward: self.forward.checked_add(o.forward)?,
            weight: self.weight.checked_add(o.weight)?,
            params: self.params.checked_add(o.params)?,
        })
    }

    /// Products with weights: `flops` per token over `params` weights.
    fn weights(flops: Option<u64>, params: Option<u64>) -> Option<Cost> {
        let flops = flops?;
        Some(Cost { forward: flops, weight: flops, params: params? })
    }

    /// Weights read by no product (norm scales, the router's bias) or by a lookup (the embedding).
    fn held(params: Option<u64>) -> Option<Cost> {
        Some(Cost { params: params?, ..Cost::default() })
    }
}

/// The product of `factors`; `None` on overflow.
fn prod(factors: &[u64]) -> Option<u64> {
    factors.iter().try_fold(1u64, |acc, &f| acc.checked_mul(f))
}

/// The sum of costs; `None` on overflow.
fn sum(costs: &[Option<Cost>]) -> Option<Cost> {
    costs.iter().try_fold(Cost::default(), |acc, c| acc.checked_add((*c)?))
}

/// Every piece of `spec` with its cost for sequences of `seq_len` tokens, in pipeline order.
pub fn pieces(spec: &ModelSpec, seq_len: u64) -> Result<Vec<(Piece, Cost)>, Overflow> {
    let of = |what: String| Overflow { what, seq_len };
    let mut out = Vec::new();
    out.push((Piece::Embedding, embedding(spec).ok_or_else(|| of("the embedding".into()))?));
    for i in 0..spec.model.num_hidden_layers {
        out.push((Piece::Layer(i), layer(spec, i, seq_len).ok_or_else(|| of(format!("layer {i}")))?));
    }
    out.push((Piece::Head, head(spec, seq_len).ok_or_else(|| of("the head".into()))?));
    Ok(out)
}

/// The embedding: a lookup (no FLOPs) in a `V × d` table.
fn embedding(spec: &ModelSpec) -> Option<Cost> {
    Cost::held(prod(&[spec.model.vocab_size, spec.model.hidden_size]))
}

/// Decoder layer `layer` (a main layer, or an MTP module's, `L + k - 1`): its two norms, MLA, and
/// the dense MLP or the MoE block ([`ModelSpec::is_moe_layer`]). Reference §2.5: `x = x +
/// attn(attn_norm(x)); x = x + ffn(ffn_norm(x))`.
pub fn layer(spec: &ModelSpec, layer: u64, seq_len: u64) -> Option<Cost> {
    let d = spec.model.hidden_size;
    let ffn = if spec.is_moe_layer(layer) { moe(spec)? } else { mlp(d, spec.model.intermediate_size)? };
    sum(&[Cost::held(d.checked_mul(2)), attention(spec, seq_len), Some(ffn)])
}

/// MLA as training computes it (reference §2.1 projections, §2.2 the "naive" form: the latent is
/// expanded by `kv_b` for every token; the absorbed form of §2.3 is decoding's). With `d` the
/// width, `H` heads, `qr` the query rank, `r` the KV rank, `dn`/`dr`/`dv` the nope, rope and value
/// head dims:
///
/// ```text
/// q        2·d·qr + 2·qr·H·(dn+dr)       (wq_a, q_norm (qr weights), wq_b; or 2·d·H·(dn+dr) by wq)
/// kv_a     2·d·(r+dr)                    (wkv_a; kv_norm holds r weights)
/// kv_b     2·r·H·(dn+dv)                 (wkv_b: k_nope and v for every head)
/// o        2·H·dv·d                      (wo)
/// scores   H·(dn+dr)·(seq_len+1)         (q·k over (seq_len+1)/2 keys on average; no weights)
/// context  H·dv·(seq_len+1)              (P·v, the same)
/// ```
fn attention(spec: &ModelSpec, seq_len: u64) -> Option<Cost> {
    let a = &spec.attention;
    let (d, h) = (spec.model.hidden_size, a.num_heads);
    let (r, dn, dr, dv) = (a.kv_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim);
    let qk = dn.checked_add(dr)?;
    let q = match a.q_lora_rank {
        Some(qr) => sum(&[
            Cost::weights(prod(&[2, d, qr]), prod(&[d, qr])),
            Cost::held(Some(qr)),
            Cost::weights(prod(&[2, qr, h, qk]), prod(&[qr, h, qk])),
        ]),
        None => Cost::weights(prod(&[2, d, h, qk]), prod(&[d, h, qk])),
    };
    let kv_a = r.checked_add(dr)?;
    let kv_b = dn.checked_add(dv)?;
    let keys = seq_len.checked_add(1)?;
    let core = prod(&[h, qk.checked_add(dv)?, keys])?;
    sum(&[
        q,
        Cost::weights(prod(&[2, d, kv_a]), prod(&[d, kv_a])),
        Cost::held(Some(r)),
        Cost::weights(prod(&[2, r, h, kv_b]), prod(&[r, h, kv_b])),
        Cost::weights(prod(&[2, h, dv, d]), prod(&[h, dv, d])),
        Some(Cost { forward: core, ..Cost::default() }),
    ])
}

/// A SwiGLU MLP of width `d` and intermediate size `inter`, `w2(silu(w1 x) * w3 x)` (reference
/// §3.1, Expert/MLP): three `d × inter` products, `6·d·inter` FLOPs.
fn mlp(d: u64, inter: u64) -> Option<Cost> {
    Cost::weights(prod(&[6, d, inter]), prod(&[3, d, inter]))
}

/// A MoE block (reference §3.1): the router's `2·d·E` (and, with bias-corrected selection, `E`
/// bias weights), the shared experts as one MLP of `n_shared · moe_inter`, and `top_k` routed
/// experts of `moe_inter` per token, `6·d·moe_inter` each, out of `E` held.
fn moe(spec: &ModelSpec) -> Option<Cost> {
    let m = spec.moe.as_ref()?;
    let d = spec.model.hidden_size;
    let expert = mlp(d, m.moe_intermediate_size)?;
    let bias = if m.topk_method == TopkMethod::NoauxTc { m.n_routed_experts } else { 0 };
    sum(&[
        Cost::weights(prod(&[2, d, m.n_routed_experts]), prod(&[d, m.n_routed_experts])),
        Cost::held(Some(bias)),
        mlp(d, m.n_shared_experts.checked_mul(m.moe_intermediate_size)?),
        Some(Cost {
            forward: expert.forward.checked_mul(m.num_experts_per_tok)?,
            weight: expert.weight.checked_mul(m.num_experts_per_tok)?,
            params: expert.params.checked_mul(m.n_routed_experts)?,
        }),
    ])
}

/// The head piece: the final norm and the output head, `2·d·V` (reference §2.5), then each MTP
/// module `k` (reference §5, eqs. 21–23): `enorm` and `hnorm`, `eh_proj` (`2·(2d)·d`), decoder
/// layer `L + k - 1`, its own `shared_head.norm`, and the shared head again (`2·d·V`, no new
/// weights).
fn head(spec: &ModelSpec, seq_len: u64) -> Option<Cost> {
    let (d, v) = (spec.model.hidden_size, spec.model.vocab_size);
    let own_head = if spec.model.tie_word_embeddings { 0 } else { prod(&[v, d])? };
    let mut total = sum(&[Cost::held(Some(d)), Cost::weights(prod(&[2, d, v]), Some(own_head))])?;
    let depth = spec.mtp.as_ref().map_or(0, |m| m.num_layers);
    for k in 1..=depth {
        let l = spec.model.num_hidden_layers.checked_add(k - 1)?;
        let module = sum(&[
            Cost::held(prod(&[3, d])),
            Cost::weights(prod(&[4, d, d]), prod(&[2, d, d])),
            layer(spec, l, seq_len),
            Cost::weights(prod(&[2, d, v]), Some(0)),
        ])?;
        total = total.checked_add(module)?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3() -> ModelSpec {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/deepseek_v3.toml");
        crate::spec::load(std::path::Path::new(path)).unwrap()
    }

    /// In units of 10^7, as the reference rounds them (to 0.01B).
    fn tens_of_millions(n: u64) -> u64 {
        (n + 5_000_000) / 10_000_000
    }

    #[test]
    fn deepseek_v3_has_the_parameter_counts_of_the_reference() {
        let spec = v3();
        let pieces = pieces(&spec, 4096).unwrap();
        assert_eq!(pieces.len(), 63, "the embedding, 61 layers and the head");
        let total: u64 = pieces.iter().map(|(_, c)| c.params).sum();
        let (d, v) = (spec.model.hidden_size, spec.model.vocab_size);
        // The head piece less the final norm and the output head is the MTP module's own weights.
        let (_, head) = pieces.last().unwrap();
        let mtp = head.params - d - v * d;
        // Reference D10, counted from the config: 671.03B in the main model, 11.61B of MTP.
        assert_eq!(tens_of_millions(total - mtp), 67_103);
        assert_eq!(tens_of_millions(mtp), 1_161);
        // Activated per token, 37.55B with the embedding and the head: the weights the main
        // model's products read (each weight product is 2 FLOPs a weight) plus the embedding's.
        let main_weight_flops: u64 = pieces[..62].iter().map(|(_, c)| c.weight).sum::<u64>() + 2 * d * v;
        assert_eq!(tens_of_millions(main_weight_flops / 2 + v * d), 3_755);
    }

    #[test]
    fn attention_grows_with_the_sequence_and_moe_reads_top_k_experts() {
        let spec = v3();
        let (short, long) = (layer(&spec, 3, 1).unwrap(), layer(&spec, 3, 4097).unwrap());
        // Only the products between activations grow: H·(dn+dr+dv) per extra key, 128·320 for V3,
        // over (seq_len+1)/2 keys on average.
        assert_eq!(long.weight, short.weight);
        assert_eq!(long.forward - short.forward, 128 * 320 * (4098 - 2));
        assert_eq!(long.params, short.params);
        // A MoE layer and a dense one differ by their feed-forward block: top-8 of 256 experts plus
        // the shared one and the router, against an 18432-wide MLP (reference §3.1).
        let dense = layer(&spec, 0, 1).unwrap();
        let (d, inter, e) = (7168u64, 2048u64, 256u64);
        assert_eq!(short.weight - dense.weight + 6 * d * 18432, 6 * d * inter * 9 + 2 * d * e);
        assert_eq!(short.params - dense.params + 3 * d * 18432, 3 * d * inter * 257 + d * e + e);
    }
}
