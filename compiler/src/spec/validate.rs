//! The rules a [`ModelSpec`] must satisfy before anything is built from it, one function per rule.
//!
//! Rules are checked in the order of [`RULES`] (roughly the order of the sections in the file) and the
//! first one broken is reported. Each rule names the key that is wrong (a path such as
//! `moe.n_group`, which the TOML and JSON front ends turn into a line and column), says what is wrong
//! and what would be right. The rules are what the reference implementations assume, either
//! explicitly (an `assert`) or because their tensors would not fit together otherwise:
//!
//! - sizes are positive, and no larger than any model can be (`limits`: every size against a named
//!   limit, then the parameter count and the expert blocks); the dtype is a float type kiln computes in (f32, bf16, f16);
//! - `0 < rms_norm_eps < 1`, `theta > 0`, token ids inside the vocabulary;
//! - low-rank projections compress (`q_lora_rank`, `kv_lora_rank` < `hidden_size`); the rotary
//!   dimension is even (rotation acts on pairs);
//! - YaRN: `factor >= 1`, `beta_fast > beta_slow > 0`, finite non-negative mscales, the original
//!   context no longer than `max_position_embeddings`;
//! - MoE: groups divide the experts, `1 <= topk_group <= n_group`, the experts per token fit in the
//!   kept groups, `greedy` has exactly one group, `noaux_tc` scores with a sigmoid and has at least two
//!   experts per group (its group score is a top-2 sum), dense layers fit in the model, the expert
//!   parallel ranks divide the experts;
//! - FP8: method `fp8`, format `f8e4m3`, dynamic activation scales. Dimensions need not be
//!   multiples of the block: edge blocks and tiles are partial, as DeepSeek's checkpoint format
//!   allows (scales `[ceil(out / 128), ceil(in / 128)]`).
//!
//! What it does not check: anything about a target (memory, devices); that is the planner's job.

use std::fmt;

use kiln_ir::op::Scoring;
use kiln_ir::spec::{ModelSpec, TopkMethod};
use kiln_ir::DType;

use super::limits::{model_is_bounded, sizes_are_bounded};

/// A broken rule: the key it is about and a message saying what would be right.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Section and key in kiln's TOML naming, e.g. `["moe", "n_group"]`.
    pub path: &'static [&'static str],
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.path.join("."), self.message)
    }
}

type Rule = fn(&ModelSpec) -> Option<Violation>;

/// Every rule, in the order they are checked.
const RULES: &[Rule] = &[
    name_is_identifier,
    sizes_are_positive,
    sizes_are_bounded,
    model_is_bounded,
    dtype_is_float,
    rms_norm_eps_in_range,
    special_tokens_in_vocab,
    q_lora_rank_compresses,
    kv_lora_rank_compresses,
    rope_dim_is_even,
    rope_theta_is_positive,
    yarn_factor_at_least_one,
    yarn_betas_ordered,
    yarn_mscales_finite,
    yarn_original_context_fits,
    groups_divide_experts,
    topk_group_in_range,
    experts_per_token_fit,
    greedy_has_one_group,
    noaux_tc_uses_sigmoid,
    noaux_tc_groups_have_two_experts,
    dense_layers_fit,
    routed_scaling_is_positive,
    aux_loss_alpha_is_non_negative,
    ep_size_divides_experts,
    quant_method_is_fp8,
    quant_format_is_e4m3,
    quant_activations_dynamic,
    quant_block_is_positive,
];

/// Checks every rule; returns the first one broken.
pub fn validate(spec: &ModelSpec) -> Result<(), Violation> {
    match RULES.iter().find_map(|rule| rule(spec)) {
        Some(v) => Err(v),
        None => Ok(()),
    }
}

fn violation(path: &'static [&'static str], message: String) -> Option<Violation> {
    Some(Violation { path, message })
}

/// The name becomes the graph name (`graph @name` in `.kir`) and a file name in artifacts.
fn name_is_identifier(s: &ModelSpec) -> Option<Violation> {
    let name = &s.model.name;
    let ok = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    (!ok).then(|| Violation {
        path: &["model", "name"],
        message: format!(
            "name `{name}` is not an identifier: use ASCII letters, digits and `_`, not starting with a digit \
             (e.g. `deepseek_v3`)"
        ),
    })
}

fn sizes_are_positive(s: &ModelSpec) -> Option<Violation> {
    let m = &s.model;
    let a = &s.attention;
    let mut sizes: Vec<(&'static [&'static str], u64)> = vec![
        (&["model", "vocab_size"], m.vocab_size),
        (&["model", "hidden_size"], m.hidden_size),
        (&["model", "num_hidden_layers"], m.num_hidden_layers),
        (&["model", "intermediate_size"], m.intermediate_size),
        (&["model", "max_position_embeddings"], m.max_position_embeddings),
        (&["attention", "num_heads"], a.num_heads),
    ];
    if let Some(q) = a.q_lora_rank {
        sizes.push((&["attention", "q_lora_rank"], q));
    }
    sizes.extend([
        (&["attention", "kv_lora_rank"] as &'static [&'static str], a.kv_lora_rank),
        (&["attention", "qk_nope_head_dim"], a.qk_nope_head_dim),
        (&["attention", "qk_rope_head_dim"], a.qk_rope_head_dim),
        (&["attention", "v_head_dim"], a.v_head_dim),
    ]);
    if let Some(y) = &s.rope.yarn {
        sizes.push((
            &["rope", "yarn", "original_max_position_embeddings"],
            y.original_max_position_embeddings,
        ));
    }
    if let Some(moe) = &s.moe {
        sizes.extend([
            (&["moe", "n_routed_experts"] as &'static [&'static str], moe.n_routed_experts),
            (&["moe", "num_experts_per_tok"], moe.num_experts_per_tok),
            (&["moe", "moe_intermediate_size"], moe.moe_intermediate_size),
            (&["moe", "moe_layer_freq"], moe.moe_layer_freq),
            (&["moe", "n_group"], moe.n_group),
            (&["moe", "topk_group"], moe.topk_group),
            (&["moe", "ep_size"], moe.ep_size),
        ]);
    }
    if let Some(mtp) = &s.mtp {
        sizes.push((&["mtp", "num_layers"], mtp.num_layers));
    }
    let (path, _) = sizes.into_iter().find(|&(_, v)| v == 0)?;
    let key = path[path.len() - 1];
    let hint = match *path {
        ["attention", "q_lora_rank"] => " (remove the key to project queries directly, without a LoRA)",
        ["mtp", "num_layers"] => " (remove the [mtp] section for a model without multi-token prediction)",
        _ => "",
    };
    violation(path, format!("`{key}` is 0; it must be at least 1{hint}"))
}

fn dtype_is_float(s: &ModelSpec) -> Option<Violation> {
    let d = s.model.dtype;
    (!matches!(d, DType::F32 | DType::BF16 | DType::F16)).then(|| Violation {
        path: &["model", "dtype"],
        message: format!(
            "dtype `{d}` cannot hold the model's parameters and activations: use `f32`, `bf16` or `f16` \
             (FP8 goes in a [quantization] section)"
        ),
    })
}

fn rms_norm_eps_in_range(s: &ModelSpec) -> Option<Violation> {
    let e = s.model.rms_norm_eps;
    (!(e > 0.0 && e < 1.0)).then(|| Violation {
        path: &["model", "rms_norm_eps"],
        message: format!("rms_norm_eps = {e:?} must be in (0, 1); DeepSeek models use 1e-6"),
    })
}

fn special_tokens_in_vocab(s: &ModelSpec) -> Option<Violation> {
    let m = &s.model;
    let tokens: [(&'static [&'static str], Option<u64>); 2] =
        [(&["model", "bos_token_id"], m.bos_token_id), (&["model", "eos_token_id"], m.eos_token_id)];
    tokens.into_iter().find_map(|(path, id)| {
        let id = id.filter(|&id| id >= m.vocab_size)?;
        violation(
            path,
            format!(
                "`{}` = {id} is outside the vocabulary: token ids must be below vocab_size = {}",
                path[1], m.vocab_size
            ),
        )
    })
}

fn q_lora_rank_compresses(s: &ModelSpec) -> Option<Violation> {
    let q = s.attention.q_lora_rank?;
    let h = s.model.hidden_size;
    (q >= h).then(|| Violation {
        path: &["attention", "q_lora_rank"],
        message: format!(
            "q_lora_rank = {q} must be smaller than hidden_size = {h}: the query down-projection compresses \
             (remove the key to project queries directly)"
        ),
    })
}

fn kv_lora_rank_compresses(s: &ModelSpec) -> Option<Violation> {
    let r = s.attention.kv_lora_rank;
    let h = s.model.hidden_size;
    (r >= h).then(|| Violation {
        path: &["attention", "kv_lora_rank"],
        message: format!(
            "kv_lora_rank = {r} must be smaller than hidden_size = {h}: the latent KV is a compression"
        ),
    })
}

fn rope_dim_is_even(s: &ModelSpec) -> Option<Violation> {
    let d = s.attention.qk_rope_head_dim;
    (d % 2 != 0).then(|| Violation {
        path: &["attention", "qk_rope_head_dim"],
        message: format!(
            "qk_rope_head_dim = {d} must be even: rotary embedding rotates pairs of elements (DeepSeek uses 64)"
        ),
    })
}

fn rope_theta_is_positive(s: &ModelSpec) -> Option<Violation> {
    let t = s.rope.theta;
    (!(t > 0.0 && t.is_finite())).then(|| Violation {
        path: &["rope", "theta"],
        message: format!("rope theta = {t:?} must be a positive finite number (DeepSeek uses 10000.0)"),
    })
}

fn yarn_factor_at_least_one(s: &ModelSpec) -> Option<Violation> {
    let f = s.rope.yarn.as_ref()?.factor;
    (!(f >= 1.0 && f.is_finite())).then(|| Violation {
        path: &["rope", "yarn", "factor"],
        message: format!(
            "YaRN factor = {f:?} must be a finite number >= 1 (it stretches the context; DeepSeek-V3 uses 40.0)"
        ),
    })
}

fn yarn_betas_ordered(s: &ModelSpec) -> Option<Violation> {
    let y = s.rope.yarn.as_ref()?;
    if !(y.beta_slow > 0.0 && y.beta_slow.is_finite()) {
        return violation(
            &["rope", "yarn", "beta_slow"],
            format!("beta_slow = {:?} must be a positive finite number (DeepSeek uses 1.0)", y.beta_slow),
        );
    }
    (!(y.beta_fast > y.beta_slow && y.beta_fast.is_finite())).then(|| Violation {
        path: &["rope", "yarn", "beta_fast"],
        message: format!(
            "beta_fast = {:?} must be greater than beta_slow = {:?}: they bound the ramp between interpolated \
             and extrapolated frequencies (DeepSeek uses 32.0 and 1.0)",
            y.beta_fast, y.beta_slow
        ),
    })
}

fn yarn_mscales_finite(s: &ModelSpec) -> Option<Violation> {
    let y = s.rope.yarn.as_ref()?;
    let scales: [(&'static [&'static str], f64); 2] =
        [(&["rope", "yarn", "mscale"], y.mscale), (&["rope", "yarn", "mscale_all_dim"], y.mscale_all_dim)];
    scales.into_iter().find_map(|(path, m)| {
        (!(m >= 0.0 && m.is_finite())).then(|| Violation {
            path,
            message: format!("`{}` = {m:?} must be a finite number >= 0", path[2]),
        })
    })
}

fn yarn_original_context_fits(s: &ModelSpec) -> Option<Violation> {
    let y = s.rope.yarn.as_ref()?;
    let max = s.model.max_position_embeddings;
    (y.original_max_position_embeddings > max).then(|| Violation {
        path: &["rope", "yarn", "original_max_position_embeddings"],
        message: format!(
            "original_max_position_embeddings = {} exceeds max_position_embeddings = {max}: YaRN extends the \
             original context, so it must be the smaller one",
            y.original_max_position_embeddings
        ),
    })
}

fn groups_divide_experts(s: &ModelSpec) -> Option<Violation> {
    let m = s.moe.as_ref()?;
    (m.n_routed_experts % m.n_group != 0).then(|| Violation {
        path: &["moe", "n_group"],
        message: format!(
            "n_routed_experts = {} is not divisible by n_group = {}: every group must hold the same number of \
             experts",
            m.n_routed_experts, m.n_group
        ),
    })
}

fn topk_group_in_range(s: &ModelSpec) -> Option<Violation> {
    let m = s.moe.as_ref()?;
    (m.topk_group > m.n_group).then(|| Violation {
        path: &["moe", "topk_group"],
        message: format!(
            "topk_group = {} exceeds n_group = {}: a token can keep at most every group",
            m.topk_group, m.n_group
        ),
    })
}

fn experts_per_token_fit(s: &ModelSpec) -> Option<Violation> {
    let m = s.moe.as_ref()?;
    let k = m.num_experts_per_tok;
    if k > m.n_routed_experts {
        return violation(
            &["moe", "num_experts_per_tok"],
            format!("num_experts_per_tok = {k} exceeds n_routed_experts = {}", m.n_routed_experts),
        );
    }
    let reachable = m.topk_group.saturating_mul(m.n_routed_experts / m.n_group);
    (k > reachable).then(|| Violation {
        path: &["moe", "num_experts_per_tok"],
        message: format!(
            "num_experts_per_tok = {k} exceeds the {reachable} experts in the topk_group = {} kept groups of {} \
             experts each",
            m.topk_group,
            m.n_routed_experts / m.n_group
        ),
    })
}

fn greedy_has_one_group(s: &ModelSpec) -> Option<Violation> {
    let m = s.moe.as_ref()?;
    if m.topk_method != TopkMethod::Greedy {
        return None;
    }
    let path: &'static [&'static str] =
        if m.n_group != 1 { &["moe", "n_group"] } else { &["moe", "topk_group"] };
    (m.n_group != 1 || m.topk_group != 1).then(|| Violation {
        path,
        message: format!(
            "topk_method \"greedy\" picks from all experts, so n_group and topk_group must both be 1 (found {} and \
             {}); use \"group_limited_greedy\" or \"noaux_tc\" for group-limited routing",
            m.n_group, m.topk_group
        ),
    })
}

fn noaux_tc_uses_sigmoid(s: &ModelSpec) -> Option<Violation> {
    let m = s.moe.as_ref()?;
    (m.topk_method == TopkMethod::NoauxTc && m.scoring_func != Scoring::Sigmoid).then(|| Violation {
        path: &["moe", "scoring_func"],
        message: format!(
            "topk_method \"noaux_tc\" adds a bias to sigmoid scores, so scoring_func must be \"sigmoid\", not \
             \"{}\"",
            m.scoring_func.name()
        ),
    })
}

fn noaux_tc_groups_have_two_experts(s: &ModelSpec) -> Option<Violation> {
    let m = s.moe.as_ref()?;
    let per_group = m.n_routed_experts / m.n_group;
    (m.topk_method == TopkMethod::NoauxTc && m.n_group > 1 && per_group < 2).then(|| Violation {
        path: &["moe", "n_group"],
        message: format!(
            "topk_method \"noaux_tc\" scores a group by the sum of its top 2 experts, but n_group = {} leaves {} \
             expert per group",
            m.n_group, per_group
        ),
    })
}

fn dense_layers_fit(s: &ModelSpec) -> Option<Violation> {
    let m = s.moe.as_ref()?;
    let layers = s.model.num_hidden_layers;
    (m.first_k_dense_replace > layers).then(|| Violation {
        path: &["moe", "first_k_dense_replace"],
        message: format!(
            "first_k_dense_replace = {} exceeds num_hidden_layers = {layers}: at most every layer can be dense",
            m.first_k_dense_replace
        ),
    })
}

fn routed_scaling_is_positive(s: &ModelSpec) -> Option<Violation> {
    let f = s.moe.as_ref()?.routed_scaling_factor;
    (!(f > 0.0 && f.is_finite())).then(|| Violation {
        path: &["moe", "routed_scaling_factor"],
        message: format!(
            "routed_scaling_factor = {f:?} must be a positive finite number (1.0 for no scaling)"
        ),
    })
}

fn aux_loss_alpha_is_non_negative(s: &ModelSpec) -> Option<Violation> {
    let a = s.moe.as_ref()?.aux_loss_alpha?;
    (!(a >= 0.0 && a.is_finite())).then(|| Violation {
        path: &["moe", "aux_loss_alpha"],
        message: format!("aux_loss_alpha = {a:?} must be a finite number >= 0"),
    })
}

fn ep_size_divides_experts(s: &ModelSpec) -> Option<Violation> {
    let m = s.moe.as_ref()?;
    (m.n_routed_experts % m.ep_size != 0).then(|| Violation {
        path: &["moe", "ep_size"],
        message: format!(
            "n_routed_experts = {} is not divisible by ep_size = {}: each expert-parallel rank holds the same \
             number of experts",
            m.n_routed_experts, m.ep_size
        ),
    })
}

fn quant_method_is_fp8(s: &ModelSpec) -> Option<Violation> {
    let q = s.quantization.as_ref()?;
    (q.method != "fp8").then(|| Violation {
        path: &["quantization", "method"],
        message: format!("quantization method \"{}\" is not supported: the only method is \"fp8\"", q.method),
    })
}

fn quant_format_is_e4m3(s: &ModelSpec) -> Option<Violation> {
    let q = s.quantization.as_ref()?;
    (q.format != DType::F8E4M3).then(|| Violation {
        path: &["quantization", "format"],
        message: format!("quantization format `{}` is not supported: FP8 tensors are `f8e4m3`", q.format),
    })
}

fn quant_activations_dynamic(s: &ModelSpec) -> Option<Violation> {
    let q = s.quantization.as_ref()?;
    (q.activation_scheme != "dynamic").then(|| Violation {
        path: &["quantization", "activation_scheme"],
        message: format!(
            "activation_scheme \"{}\" is not supported: activation scales are computed online per tile \
             (\"dynamic\")",
            q.activation_scheme
        ),
    })
}

fn quant_block_is_positive(s: &ModelSpec) -> Option<Violation> {
    let q = s.quantization.as_ref()?;
    q.weight_block.contains(&0).then(|| Violation {
        path: &["quantization", "weight_block"],
        message: format!(
            "weight_block = [{}, {}] must have both dimensions >= 1 (DeepSeek-V3 uses [128, 128])",
            q.weight_block[0], q.weight_block[1]
        ),
    })
}
