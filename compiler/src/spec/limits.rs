//! The largest model kiln accepts: a bound on every size of a spec, and on the model as a whole.
//!
//! Each limit is far beyond any released model (DeepSeek-V3's value is given beside it), so a spec
//! beyond one is a typo or a corrupted file, not a model: `num_hidden_layers =
//! 9223372036854775807` would otherwise grow the graph until the process aborts, and
//! `hidden_size = 1000000000000` would compile and then abort `kiln run` allocating petabytes. With
//! every size bounded, every element count, byte count and parameter count kiln computes from a
//! spec fits in 64 bits.
//!
//! The limits are checked by the rules [`sizes_are_bounded`] (each key against its limit) and
//! [`model_is_bounded`] (the parameter count, and the expert blocks the graph holds), which
//! `validate` runs right after the sizes are known to be positive. What they do not check is the
//! machine: whether a model this size fits in memory is the runtime's question, asked before it
//! allocates.

use kiln_ir::spec::ModelSpec;

use super::validate::Violation;

/// Decoder layers, and MTP modules (DeepSeek-V3: 61 and 1).
pub const MAX_LAYERS: u64 = 1 << 10;
/// Any width: `hidden_size`, the intermediate sizes, the LoRA ranks, the head dimensions, an FP8
/// block (DeepSeek-V3's largest: `intermediate_size` 18,432).
pub const MAX_WIDTH: u64 = 1 << 20;
/// Attention heads (DeepSeek-V3: 128).
pub const MAX_HEADS: u64 = 1 << 12;
/// Vocabulary entries (DeepSeek-V3: 129,280).
pub const MAX_VOCAB: u64 = 1 << 24;
/// Positions of the context, `max_position_embeddings` (DeepSeek-V3: 163,840).
pub const MAX_CONTEXT: u64 = 1 << 26;
/// Routed or shared experts of an MoE layer, groups and ranks (DeepSeek-V3: 256 routed).
pub const MAX_EXPERTS: u64 = 1 << 16;
/// Parameters of the whole model, MTP modules included (DeepSeek-V3: 6.8e11).
pub const MAX_PARAMETERS: u128 = 100_000_000_000_000;
/// Expert blocks in all MoE layers together, each a few nodes of the graph (DeepSeek-V3: 58 layers
/// of 257, 14,906).
pub const MAX_EXPERT_BLOCKS: u64 = 1 << 18;

/// Every size of the spec against its limit; the first one over it is reported.
pub fn sizes_are_bounded(s: &ModelSpec) -> Option<Violation> {
    let (m, a) = (&s.model, &s.attention);
    let mut sizes: Vec<(&'static [&'static str], u64, u64, &'static str)> = vec![
        (&["model", "vocab_size"], m.vocab_size, MAX_VOCAB, "MAX_VOCAB"),
        (&["model", "hidden_size"], m.hidden_size, MAX_WIDTH, "MAX_WIDTH"),
        (&["model", "num_hidden_layers"], m.num_hidden_layers, MAX_LAYERS, "MAX_LAYERS"),
        (&["model", "intermediate_size"], m.intermediate_size, MAX_WIDTH, "MAX_WIDTH"),
        (&["model", "max_position_embeddings"], m.max_position_embeddings, MAX_CONTEXT, "MAX_CONTEXT"),
        (&["attention", "num_heads"], a.num_heads, MAX_HEADS, "MAX_HEADS"),
        (&["attention", "kv_lora_rank"], a.kv_lora_rank, MAX_WIDTH, "MAX_WIDTH"),
        (&["attention", "qk_nope_head_dim"], a.qk_nope_head_dim, MAX_WIDTH, "MAX_WIDTH"),
        (&["attention", "qk_rope_head_dim"], a.qk_rope_head_dim, MAX_WIDTH, "MAX_WIDTH"),
        (&["attention", "v_head_dim"], a.v_head_dim, MAX_WIDTH, "MAX_WIDTH"),
    ];
    if let Some(q) = a.q_lora_rank {
        sizes.push((&["attention", "q_lora_rank"], q, MAX_WIDTH, "MAX_WIDTH"));
    }
    if let Some(moe) = &s.moe {
        sizes.extend([
            (
                &["moe", "n_routed_experts"] as &'static [&'static str],
                moe.n_routed_experts,
                MAX_EXPERTS,
                "MAX_EXPERTS",
            ),
            (&["moe", "n_shared_experts"], moe.n_shared_experts, MAX_EXPERTS, "MAX_EXPERTS"),
            (&["moe", "moe_intermediate_size"], moe.moe_intermediate_size, MAX_WIDTH, "MAX_WIDTH"),
            (&["moe", "moe_layer_freq"], moe.moe_layer_freq, MAX_LAYERS, "MAX_LAYERS"),
            (&["moe", "n_group"], moe.n_group, MAX_EXPERTS, "MAX_EXPERTS"),
            (&["moe", "ep_size"], moe.ep_size, MAX_EXPERTS, "MAX_EXPERTS"),
        ]);
    }
    if let Some(mtp) = &s.mtp {
        sizes.push((&["mtp", "num_layers"], mtp.num_layers, MAX_LAYERS, "MAX_LAYERS"));
    }
    if let Some(q) = &s.quantization {
        let [rows, cols] = q.weight_block;
        sizes.push((&["quantization", "weight_block"], rows.max(cols), MAX_WIDTH, "MAX_WIDTH"));
    }
    let (path, value, limit, name) = sizes.into_iter().find(|&(_, v, limit, _)| v > limit)?;
    Some(Violation {
        path,
        message: format!(
            "`{}` = {value} is larger than any model kiln can build: at most {limit} ({name}, far beyond any \
             released model); check the value",
            path[path.len() - 1]
        ),
    })
}

/// The parameters of the model as the builder makes them (embeddings, attention, dense and MoE
/// MLPs, norms, the MTP modules' projections), in `u128`: with [`sizes_are_bounded`] holding, no
/// term overflows.
pub fn parameter_count(s: &ModelSpec) -> u128 {
    let (m, a) = (&s.model, &s.attention);
    let w = |x: u64| u128::from(x);
    let (h, heads) = (w(m.hidden_size), w(a.num_heads));
    let qk = w(a.qk_nope_head_dim) + w(a.qk_rope_head_dim);
    let q = match a.q_lora_rank {
        Some(r) => h * w(r) + w(r) + w(r) * heads * qk,
        None => h * heads * qk,
    };
    let kv = h * (w(a.kv_lora_rank) + w(a.qk_rope_head_dim))
        + w(a.kv_lora_rank)
        + w(a.kv_lora_rank) * heads * (w(a.qk_nope_head_dim) + w(a.v_head_dim));
    let attention = q + kv + heads * w(a.v_head_dim) * h + 2 * h;
    let dense = attention + 3 * h * w(m.intermediate_size);
    let layers = w(m.num_hidden_layers);
    let mtp = w(s.mtp.as_ref().map_or(0, |t| t.num_layers));
    let (dense_layers, moe_layer) = match &s.moe {
        Some(e) => {
            let experts = w(e.n_routed_experts) + w(e.n_shared_experts);
            let moe = attention + 3 * h * w(e.moe_intermediate_size) * experts + h * w(e.n_routed_experts);
            (w(e.first_k_dense_replace.min(m.num_hidden_layers)), moe)
        }
        None => (layers, dense),
    };
    let embeddings = w(m.vocab_size) * h * if m.tie_word_embeddings { 1 } else { 2 };
    // An MTP module is a decoder layer like the last one, plus its two norms and projection.
    let mtp_module = moe_layer + 2 * h + 2 * h * h;
    embeddings + dense_layers * dense + (layers - dense_layers) * moe_layer + mtp * mtp_module + h
}

/// The model as a whole: its parameters, and the expert blocks of all its MoE layers (each a few
/// nodes of the graph, which is built whole).
pub fn model_is_bounded(s: &ModelSpec) -> Option<Violation> {
    let params = parameter_count(s);
    if params > MAX_PARAMETERS {
        return Some(Violation {
            path: &["model", "hidden_size"],
            message: format!(
                "these sizes make a model of {params} parameters, more than kiln builds: at most \
                 {MAX_PARAMETERS} (MAX_PARAMETERS, 150 times DeepSeek-V3); check hidden_size, \
                 num_hidden_layers and the expert sizes"
            ),
        });
    }
    let e = s.moe.as_ref()?;
    let moe_layers = s.model.num_hidden_layers.saturating_sub(e.first_k_dense_replace)
        + s.mtp.as_ref().map_or(0, |t| t.num_layers);
    let blocks = moe_layers * (e.n_routed_experts + e.n_shared_experts);
    (blocks > MAX_EXPERT_BLOCKS).then(|| Violation {
        path: &["moe", "n_routed_experts"],
        message: format!(
            "{moe_layers} MoE layers of {} experts make {blocks} expert blocks, more than kiln builds: at most \
             {MAX_EXPERT_BLOCKS} (MAX_EXPERT_BLOCKS, 17 times DeepSeek-V3's)",
            e.n_routed_experts + e.n_shared_experts
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3() -> ModelSpec {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/deepseek_v3.toml");
        crate::spec::load(std::path::Path::new(path)).unwrap()
    }

    /// The count is `kiln inspect`'s (counted from the built graph): 671.03B in the main model and
    /// 11.61B in the MTP module, which shares the embedding and the head.
    #[test]
    fn the_count_is_deepseek_v3s() {
        let n = parameter_count(&v3()) as f64;
        assert!((682.6e9..682.7e9).contains(&n), "{n:e}");
    }

    #[test]
    fn every_size_is_bounded_and_the_bound_is_named() {
        let mut s = v3();
        s.model.num_hidden_layers = 9_223_372_036_854_775_807;
        let v = sizes_are_bounded(&s).unwrap();
        assert_eq!(v.path, ["model", "num_hidden_layers"]);
        assert!(v.message.contains("at most 1024 (MAX_LAYERS"), "{}", v.message);
        let mut s = v3();
        s.moe.as_mut().unwrap().moe_intermediate_size = 1 << 20;
        s.model.num_hidden_layers = 1000;
        assert_eq!(sizes_are_bounded(&s), None);
        assert!(model_is_bounded(&s).unwrap().message.contains("MAX_PARAMETERS"));
        let mut s = v3();
        s.moe.as_mut().unwrap().n_routed_experts = 8192;
        s.model.num_hidden_layers = 100;
        assert!(model_is_bounded(&s).unwrap().message.contains("MAX_EXPERT_BLOCKS"));
        assert_eq!(model_is_bounded(&v3()), None);
    }
}
