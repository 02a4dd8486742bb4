//! [`ModelSpec`] back to a Hugging Face `config.json`: the inverse of [`super::import_hf`], for
//! `kiln export-hf`, whose checkpoint folders transformers loads with `AutoModelForCausalLM`.
//!
//! Every key kiln reads is written under the name `import_hf` reads first (`dtype`, not the older
//! `torch_dtype`; `rope_parameters`, as transformers 5 writes it, not `rope_scaling`), so that
//! `import_hf(to_hf_config(spec)) == spec` for every valid spec whose name is the config's folder
//! name (the name is not in a config: it comes from the file path). Besides those, the keys
//! transformers needs to build the same model and that kiln fixes rather than reads are written out
//! with the values kiln assumes: `num_key_value_heads` equal to the heads (MLA has no grouping),
//! `hidden_act` `silu`, no biases, `head_dim` the rotary dimension and `qk_head_dim` as
//! transformers' DeepseekV3 configuration derives them, and the `architectures` entry
//! `AutoModelForCausalLM` dispatches on.
//!
//! A dense spec (no `[moe]`) writes `n_routed_experts: null` and `first_k_dense_replace` equal to the
//! layer count, which both transformers' DeepseekV2 (no experts) and DeepseekV3 (every layer before
//! `first_k_dense_replace` dense) read as dense.

use kiln_ir::spec::{Family, ModelSpec, TopkMethod};
use kiln_ir::DType;
use serde_json::{json, Map, Value};

/// Hugging Face's default `initializer_range`; transformers reads it only to initialise weights.
const INITIALIZER_RANGE: f64 = 0.02;

/// The Hugging Face `config.json` of `spec` (keys sorted, as transformers writes them).
pub fn to_hf_config(spec: &ModelSpec) -> Value {
    let m = &spec.model;
    let a = &spec.attention;
    let (model_type, architecture) = match m.family {
        Family::DeepseekV3 => ("deepseek_v3", "DeepseekV3ForCausalLM"),
        Family::DeepseekV2 => ("deepseek_v2", "DeepseekV2ForCausalLM"),
    };
    let mut c = Map::new();
    let mut put = |k: &str, v: Value| {
        c.insert(k.to_string(), v);
    };
    put("architectures", json!([architecture]));
    put("model_type", json!(model_type));
    put("vocab_size", json!(m.vocab_size));
    put("hidden_size", json!(m.hidden_size));
    put("num_hidden_layers", json!(m.num_hidden_layers));
    put("intermediate_size", json!(m.intermediate_size));
    put("rms_norm_eps", json!(m.rms_norm_eps));
    put("max_position_embeddings", json!(m.max_position_embeddings));
    put("dtype", json!(torch_dtype(m.dtype)));
    put("tie_word_embeddings", json!(m.tie_word_embeddings));
    put("bos_token_id", json!(m.bos_token_id));
    put("eos_token_id", json!(m.eos_token_id));
    put("pad_token_id", Value::Null);
    put("hidden_act", json!("silu"));
    put("attention_bias", json!(false));
    put("mlp_bias", json!(false));
    put("attention_dropout", json!(0.0));
    put("initializer_range", json!(INITIALIZER_RANGE));
    put("use_cache", json!(true));

    put("num_attention_heads", json!(a.num_heads));
    put("num_key_value_heads", json!(a.num_heads));
    put("q_lora_rank", json!(a.q_lora_rank));
    put("kv_lora_rank", json!(a.kv_lora_rank));
    put("qk_nope_head_dim", json!(a.qk_nope_head_dim));
    put("qk_rope_head_dim", json!(a.qk_rope_head_dim));
    put("qk_head_dim", json!(a.qk_nope_head_dim + a.qk_rope_head_dim));
    put("head_dim", json!(a.qk_rope_head_dim));
    put("v_head_dim", json!(a.v_head_dim));

    let r = &spec.rope;
    put("rope_interleave", json!(r.interleaved));
    let rope = match &r.yarn {
        None => json!({ "rope_type": "default", "rope_theta": r.theta }),
        Some(y) => json!({
            "rope_type": "yarn",
            "rope_theta": r.theta,
            "factor": y.factor,
            "original_max_position_embeddings": y.original_max_position_embeddings,
            "beta_fast": y.beta_fast,
            "beta_slow": y.beta_slow,
            "mscale": y.mscale,
            "mscale_all_dim": y.mscale_all_dim,
        }),
    };
    put("rope_parameters", rope);

    match &spec.moe {
        Some(moe) => {
            put("n_routed_experts", json!(moe.n_routed_experts));
            put("n_shared_experts", json!(moe.n_shared_experts));
            put("num_experts_per_tok", json!(moe.num_experts_per_tok));
            put("moe_intermediate_size", json!(moe.moe_intermediate_size));
            put("first_k_dense_replace", json!(moe.first_k_dense_replace));
            put("moe_layer_freq", json!(moe.moe_layer_freq));
            put("n_group", json!(moe.n_group));
            put("topk_group", json!(moe.topk_group));
            put("scoring_func", json!(moe.scoring_func.name()));
            put("topk_method", json!(topk_method(moe.topk_method)));
            put("norm_topk_prob", json!(moe.norm_topk_prob));
            put("routed_scaling_factor", json!(moe.routed_scaling_factor));
            put("ep_size", json!(moe.ep_size));
            if let Some(alpha) = moe.aux_loss_alpha {
                put("aux_loss_alpha", json!(alpha));
            }
            if let Some(seq) = moe.seq_aux {
                put("seq_aux", json!(seq));
            }
        }
        None => {
            put("n_routed_experts", Value::Null);
            put("first_k_dense_replace", json!(m.num_hidden_layers));
        }
    }
    put("num_nextn_predict_layers", json!(spec.mtp.as_ref().map_or(0, |t| t.num_layers)));

    if let Some(q) = &spec.quantization {
        let mut config = json!({
            "quant_method": q.method,
            "fmt": "e4m3",
            "activation_scheme": q.activation_scheme,
            "weight_block_size": q.weight_block,
            "scale_fmt": if q.pow2_scale { Value::from("ue8m0") } else { Value::Null },
        });
        if let Some(kept) = &q.modules_to_not_convert {
            config["modules_to_not_convert"] = json!(kept);
        }
        put("quantization_config", config);
    }
    // serde_json's map is sorted (no `preserve_order`), as transformers' `to_json_string` sorts.
    Value::Object(c)
}

fn torch_dtype(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        // Validation admits only the three float dtypes for a model.
        _ => "float32",
    }
}

fn topk_method(t: TopkMethod) -> &'static str {
    match t {
        TopkMethod::Greedy => "greedy",
        TopkMethod::GroupLimitedGreedy => "group_limited_greedy",
        TopkMethod::NoauxTc => "noaux_tc",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{import_hf, load};

    fn models() -> Vec<std::path::PathBuf> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn import_hf_inverts_to_hf_config_for_every_model() {
        let models = models();
        assert!(models.len() >= 4, "{models:?}");
        for path in models {
            let spec = load(&path).unwrap();
            let json = serde_json::to_string_pretty(&to_hf_config(&spec)).unwrap();
            // The name comes from the folder, as for `kiln export-hf -o NAME`.
            let file = format!("{}/config.json", spec.model.name);
            let back = import_hf(&file, &json).unwrap_or_else(|e| panic!("{}: {e}\n{json}", path.display()));
            assert_eq!(back, spec, "{}", path.display());
        }
    }

    #[test]
    fn transformers_keys_follow_the_spec() {
        let spec = load(&models().into_iter().find(|p| p.ends_with("deepseek_v3.toml")).unwrap()).unwrap();
        let c = to_hf_config(&spec);
        assert_eq!(c["model_type"], "deepseek_v3");
        assert_eq!(c["architectures"][0], "DeepseekV3ForCausalLM");
        assert_eq!(c["num_key_value_heads"], c["num_attention_heads"]);
        assert_eq!(c["qk_head_dim"], 192);
        assert_eq!(c["head_dim"], 64);
        assert_eq!(c["rope_parameters"]["rope_type"], "yarn");
        assert_eq!(c["quantization_config"]["weight_block_size"], json!([128, 128]));
        assert_eq!(c["num_nextn_predict_layers"], 1);
    }

    #[test]
    fn a_dense_spec_is_dense_for_both_readers() {
        let mut spec = load(&models().into_iter().find(|p| p.ends_with("tiny.toml")).unwrap()).unwrap();
        spec.moe = None;
        let c = to_hf_config(&spec);
        assert_eq!(c["n_routed_experts"], Value::Null);
        assert_eq!(c["first_k_dense_replace"], 4);
        let back = import_hf("tiny/config.json", &c.to_string()).unwrap();
        assert_eq!(back, spec);
    }
}
