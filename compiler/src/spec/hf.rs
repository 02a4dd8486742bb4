//! Hugging Face `config.json` (model types `deepseek_v3` and `deepseek_v2`) into a validated
//! [`ModelSpec`].
//!
//! The mapping follows the reference (§1.1, §1.2, §8.1): most keys keep their names; the renamed ones
//! are `model_type` → `family`, `torch_dtype` (or `dtype`) → `dtype`, `num_attention_heads` →
//! `num_heads`, `rope_theta` → `theta`, `rope_interleave` → `interleaved`, `rope_scaling` (or the newer
//! `rope_parameters`) with type `yarn` → `[rope.yarn]`, `num_nextn_predict_layers` → `[mtp]
//! num_layers`, and `quantization_config` → `[quantization]`.
//!
//! Defaults are taken only where Hugging Face's own default is neutral and the same for both families
//! (`rope_theta` 10000, `rope_interleave` true, `moe_layer_freq` 1, `ep_size` 1, no YaRN mscale on all
//! dims); a missing dtype means f32, as `transformers` instantiates the model in f32 unless told
//! otherwise. Every other key kiln needs must be present; a missing one is an error at the object.
//!
//! Keys kiln does not model are ignored when they cannot change the computation (`auto_map`,
//! `transformers_version`, `use_cache`, `initializer_range`, `pretraining_tp`, `attention_dropout`,
//! `architectures`, `pad_token_id`, ...). Values kiln cannot honour are errors at their key:
//! `attention_bias` or `mlp_bias` true, `hidden_act` other than `silu`, `num_key_value_heads` other
//! than `num_attention_heads` (MLA has no KV-head grouping, D13), and rope scaling other than YaRN.
//!
//! The model name is not in the config: it comes from the file name (`deepseek_v3_config.json` and
//! `DeepSeek-V3/config.json` both give `deepseek_v3`), or from `model_type` when the file says nothing.

use std::path::Path;

use kiln_ir::op::Scoring;
use kiln_ir::spec::{
    AttentionSection, Family, ModelSection, ModelSpec, MoeSection, MtpSection, QuantSection, RopeSection,
    TopkMethod, YarnSection,
};
use kiln_ir::{DType, Diagnostic};
use serde_json::{Map, Value};

use super::json::{key_span, root_start};
use super::validate::validate;
use super::SpecError;

const SUPPORTED: &str = "`deepseek_v3` and `deepseek_v2`";

/// Imports a Hugging Face `config.json` and validates the result. `file` names the file in
/// diagnostics and gives the model its name.
pub fn import_hf(file: &str, json: &str) -> Result<ModelSpec, SpecError> {
    let value: Value =
        serde_json::from_str(json).map_err(|e| SpecError::Syntax(syntax_diagnostic(file, json, &e)))?;
    let cx = Cx { file, src: json };
    let Value::Object(map) = &value else {
        let at = root_start(json);
        return Err(SpecError::Schema(
            cx.at(at..at + 1, "expected a JSON object (a Hugging Face config.json)"),
        ));
    };
    let root = Obj { cx: &cx, path: Vec::new(), map };

    if !map.contains_key("model_type") {
        return Err(SpecError::Schema(
            cx.at(root.span(), format!("missing key `model_type`: kiln imports {SUPPORTED}")),
        ));
    }
    let model_type = root.req_str("model_type")?;
    let family = match model_type {
        "deepseek_v3" => Family::DeepseekV3,
        "deepseek_v2" => Family::DeepseekV2,
        other => {
            return Err(root.unsupported(
                "model_type",
                format!("model_type `{other}` is not supported: kiln imports {SUPPORTED}"),
            ))
        }
    };
    reject_unsupported(&root)?;

    let spec = ModelSpec {
        model: model_section(&root, family, model_type)?,
        attention: attention_section(&root)?,
        rope: rope_section(&root)?,
        moe: moe_section(&root)?,
        mtp: root
            .u64("num_nextn_predict_layers")?
            .filter(|&n| n > 0)
            .map(|num_layers| MtpSection { num_layers }),
        quantization: quant_section(&root)?,
    };
    validate(&spec).map_err(|v| {
        let span = hf_span(json, v.path);
        SpecError::Invalid(cx.at(span, v.message))
    })?;
    Ok(spec)
}

fn syntax_diagnostic(file: &str, src: &str, e: &serde_json::Error) -> Diagnostic {
    let message = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let message = message.strip_suffix(&suffix).unwrap_or(&message);
    // serde_json counts columns in bytes, from 1; 0 means "before the first byte of the line".
    let line_start: usize = src.split_inclusive('\n').take(e.line().saturating_sub(1)).map(str::len).sum();
    let at = line_start + e.column().saturating_sub(1);
    Diagnostic::at_bytes(file, src, at, at + 1, message)
}

/// Values that would change the computation in a way kiln does not implement.
fn reject_unsupported(root: &Obj<'_>) -> Result<(), SpecError> {
    for key in ["attention_bias", "mlp_bias"] {
        if root.bool(key)? == Some(true) {
            return Err(root.unsupported(
                key,
                format!("`{key}: true` is not supported: kiln's projections have no bias"),
            ));
        }
    }
    if let Some(act) = root.str("hidden_act")? {
        if act != "silu" {
            return Err(root.unsupported(
                "hidden_act",
                format!("hidden_act `{act}` is not supported: kiln's MLPs and experts are SwiGLU (`silu`)"),
            ));
        }
    }
    if let Some(kv) = root.u64("num_key_value_heads")? {
        let heads = root.req_u64("num_attention_heads")?;
        if kv != heads {
            return Err(root.unsupported(
                "num_key_value_heads",
                format!(
                    "num_key_value_heads = {kv} differs from num_attention_heads = {heads}: MLA has no grouped \
                     KV heads, every head reads the shared latent"
                ),
            ));
        }
    }
    Ok(())
}

fn model_section(root: &Obj<'_>, family: Family, model_type: &str) -> Result<ModelSection, SpecError> {
    let dtype_key = if root.map.contains_key("torch_dtype") { "torch_dtype" } else { "dtype" };
    let dtype = match root.str(dtype_key)? {
        None => DType::F32,
        Some("bfloat16") => DType::BF16,
        Some("float16") => DType::F16,
        Some("float32") => DType::F32,
        Some(other) => {
            return Err(root.unsupported(
                dtype_key,
                format!(
                    "{dtype_key} `{other}` is not supported: use \"bfloat16\", \"float16\" or \"float32\""
                ),
            ))
        }
    };
    Ok(ModelSection {
        name: model_name(root.cx.file, model_type),
        family,
        vocab_size: root.req_u64("vocab_size")?,
        hidden_size: root.req_u64("hidden_size")?,
        num_hidden_layers: root.req_u64("num_hidden_layers")?,
        intermediate_size: root.req_u64("intermediate_size")?,
        rms_norm_eps: root.req_f64("rms_norm_eps")?,
        max_position_embeddings: root.req_u64("max_position_embeddings")?,
        dtype,
        tie_word_embeddings: root.bool("tie_word_embeddings")?.unwrap_or(false),
        bos_token_id: root.u64("bos_token_id")?,
        eos_token_id: root.u64("eos_token_id")?,
    })
}

/// `deepseek_v3_config.json` → `deepseek_v3`; `DeepSeek-V2-Lite/config.json` → `deepseek_v2_lite`;
/// a bare `config.json`, `<stdin>` or a name starting with a digit → the model type.
fn model_name(file: &str, model_type: &str) -> String {
    let path = Path::new(file);
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let stem = if stem.eq_ignore_ascii_case("config") {
        path.parent().and_then(|p| p.file_name()).and_then(|s| s.to_str()).unwrap_or("")
    } else {
        stem
    };
    let mut name = String::new();
    for c in stem.chars() {
        let c = if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' };
        if !(c == '_' && (name.is_empty() || name.ends_with('_'))) {
            name.push(c);
        }
    }
    let name = name.trim_end_matches('_');
    let name = name.strip_suffix("_config").unwrap_or(name);
    // `<stdin>` and the like name no file.
    if name.is_empty() || stem.starts_with('<') || name.starts_with(|c: char| c.is_ascii_digit()) {
        model_type.to_string()
    } else {
        name.to_string()
    }
}

fn attention_section(root: &Obj<'_>) -> Result<AttentionSection, SpecError> {
    Ok(AttentionSection {
        num_heads: root.req_u64("num_attention_heads")?,
        // The inference-format configs write "no q LoRA" as 0, Hugging Face as null (§1.2).
        q_lora_rank: root.u64("q_lora_rank")?.filter(|&r| r > 0),
        kv_lora_rank: root.req_u64("kv_lora_rank")?,
        qk_nope_head_dim: root.req_u64("qk_nope_head_dim")?,
        qk_rope_head_dim: root.req_u64("qk_rope_head_dim")?,
        v_head_dim: root.req_u64("v_head_dim")?,
    })
}

fn rope_section(root: &Obj<'_>) -> Result<RopeSection, SpecError> {
    // transformers 5 writes `rope_parameters` (with `rope_theta` inside) where 4.x wrote `rope_scaling`.
    let scaling = match root.obj("rope_scaling")? {
        Some(s) => Some(s),
        None => root.obj("rope_parameters")?,
    };
    let theta = match (root.f64("rope_theta")?, &scaling) {
        (Some(t), _) => t,
        (None, Some(s)) => s.f64("rope_theta")?.unwrap_or(10000.0),
        (None, None) => 10000.0,
    };
    let yarn = match &scaling {
        None => None,
        Some(s) => {
            let type_key = if s.map.contains_key("rope_type") { "rope_type" } else { "type" };
            match s.req_str(type_key)? {
                "default" => None,
                "yarn" => Some(YarnSection {
                    factor: s.req_f64("factor")?,
                    original_max_position_embeddings: s.req_u64("original_max_position_embeddings")?,
                    beta_fast: s.f64("beta_fast")?.unwrap_or(32.0),
                    beta_slow: s.f64("beta_slow")?.unwrap_or(1.0),
                    mscale: s.f64("mscale")?.unwrap_or(1.0),
                    mscale_all_dim: s.f64("mscale_all_dim")?.unwrap_or(0.0),
                }),
                other => {
                    return Err(s.unsupported(
                        type_key,
                        format!(
                            "rope scaling `{other}` is not supported: kiln implements \"yarn\" (or none)"
                        ),
                    ))
                }
            }
        }
    };
    Ok(RopeSection { theta, interleaved: root.bool("rope_interleave")?.unwrap_or(true), yarn })
}

/// No `n_routed_experts` (or null, or 0) means a dense model, as in Hugging Face's modelling code.
fn moe_section(root: &Obj<'_>) -> Result<Option<MoeSection>, SpecError> {
    let Some(n_routed_experts) = root.u64("n_routed_experts")?.filter(|&n| n > 0) else { return Ok(None) };
    let scoring_func = match root.req_str("scoring_func")? {
        "sigmoid" => Scoring::Sigmoid,
        "softmax" => Scoring::Softmax,
        other => {
            return Err(root.unsupported(
                "scoring_func",
                format!("scoring_func `{other}` is not supported: use \"sigmoid\" or \"softmax\""),
            ))
        }
    };
    let topk_method = match root.req_str("topk_method")? {
        "greedy" => TopkMethod::Greedy,
        "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
        "noaux_tc" => TopkMethod::NoauxTc,
        other => {
            return Err(root.unsupported(
                "topk_method",
                format!(
                    "topk_method `{other}` is not supported: use \"greedy\", \"group_limited_greedy\" or \
                     \"noaux_tc\""
                ),
            ))
        }
    };
    Ok(Some(MoeSection {
        n_routed_experts,
        // null shared experts means none, as in the modelling code's `is not None` test.
        n_shared_experts: root.opt_u64_or_null("n_shared_experts", 0)?,
        num_experts_per_tok: root.req_u64("num_experts_per_tok")?,
        moe_intermediate_size: root.req_u64("moe_intermediate_size")?,
        first_k_dense_replace: root.req_u64("first_k_dense_replace")?,
        moe_layer_freq: root.u64("moe_layer_freq")?.unwrap_or(1),
        // DeepSeek-V2 configs without grouping write null groups.
        n_group: root.opt_u64_or_null("n_group", 1)?,
        topk_group: root.opt_u64_or_null("topk_group", 1)?,
        scoring_func,
        topk_method,
        norm_topk_prob: root.req_bool("norm_topk_prob")?,
        routed_scaling_factor: root.req_f64("routed_scaling_factor")?,
        ep_size: root.u64("ep_size")?.unwrap_or(1),
        aux_loss_alpha: root.f64("aux_loss_alpha")?,
        seq_aux: root.bool("seq_aux")?,
    }))
}

fn quant_section(root: &Obj<'_>) -> Result<Option<QuantSection>, SpecError> {
    let Some(q) = root.obj("quantization_config")? else { return Ok(None) };
    let format = match q.str("fmt")?.unwrap_or("e4m3") {
        "e4m3" => DType::F8E4M3,
        other => {
            return Err(
                q.unsupported("fmt", format!("FP8 format `{other}` is not supported: kiln uses \"e4m3\""))
            )
        }
    };
    let weight_block = match q.get("weight_block_size") {
        None => return Err(q.missing("weight_block_size")),
        Some(Value::Array(a)) => match a.as_slice() {
            [r, c] => match (r.as_u64(), c.as_u64()) {
                (Some(r), Some(c)) => [r, c],
                _ => return Err(q.wrong_type("weight_block_size", "two non-negative integers [rows, cols]")),
            },
            _ => return Err(q.wrong_type("weight_block_size", "two non-negative integers [rows, cols]")),
        },
        Some(_) => return Err(q.wrong_type("weight_block_size", "two non-negative integers [rows, cols]")),
    };
    let pow2_scale = match q.str("scale_fmt")? {
        None => false,
        Some("ue8m0") => true,
        Some(other) => {
            return Err(q.unsupported(
                "scale_fmt",
                format!("scale_fmt `{other}` is not supported: use \"ue8m0\" (power-of-two scales) or null"),
            ))
        }
    };
    let modules_to_not_convert = match q.get("modules_to_not_convert") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|m| m.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| q.wrong_type("modules_to_not_convert", "a list of module names, or null"))?,
        ),
        Some(_) => return Err(q.wrong_type("modules_to_not_convert", "a list of module names, or null")),
    };
    Ok(Some(QuantSection {
        method: q.req_str("quant_method")?.to_string(),
        format,
        weight_block,
        activation_scheme: q.str("activation_scheme")?.unwrap_or("dynamic").to_string(),
        pow2_scale,
        modules_to_not_convert,
    }))
}

/// Where a validation rule's key lives in a Hugging Face config: the first candidate path present,
/// else the nearest enclosing object, else the top-level `{`.
fn hf_span(src: &str, spec_path: &[&str]) -> std::ops::Range<usize> {
    let rope = ["rope_scaling", "rope_parameters"];
    let candidates: Vec<Vec<&str>> = match spec_path {
        ["model", "family"] => vec![vec!["model_type"]],
        ["model", "dtype"] => vec![vec!["torch_dtype"], vec!["dtype"]],
        ["model", "name"] => vec![],
        ["attention", "num_heads"] => vec![vec!["num_attention_heads"]],
        ["rope", "theta"] => vec![vec!["rope_theta"], vec!["rope_parameters", "rope_theta"]],
        ["rope", "interleaved"] => vec![vec!["rope_interleave"]],
        ["rope", "yarn", key] => rope.iter().map(|r| vec![*r, *key]).chain(rope.map(|r| vec![r])).collect(),
        ["mtp", "num_layers"] => vec![vec!["num_nextn_predict_layers"]],
        ["quantization", key] => {
            let hf = match *key {
                "method" => "quant_method",
                "format" => "fmt",
                "weight_block" => "weight_block_size",
                "pow2_scale" => "scale_fmt",
                other => other,
            };
            vec![vec!["quantization_config", hf], vec!["quantization_config"]]
        }
        [_, key] => vec![vec![*key]],
        _ => vec![],
    };
    candidates.iter().find_map(|p| key_span(src, p)).unwrap_or_else(|| {
        let at = root_start(src);
        at..at + 1
    })
}

struct Cx<'a> {
    file: &'a str,
    src: &'a str,
}

impl Cx<'_> {
    fn at(&self, span: std::ops::Range<usize>, message: impl Into<String>) -> Diagnostic {
        Diagnostic::at_bytes(self.file, self.src, span.start, span.end, message)
    }
}

/// A JSON object of the config and where it is (`[]` for the top level, `["rope_scaling"]`, ...).
struct Obj<'a> {
    cx: &'a Cx<'a>,
    path: Vec<&'a str>,
    map: &'a Map<String, Value>,
}

impl<'a> Obj<'a> {
    /// A present, non-null value.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn diag(&self, key: &str, message: String) -> Diagnostic {
        let mut path = self.path.clone();
        path.push(key);
        let span = key_span(self.cx.src, &path).unwrap_or_else(|| self.span());
        self.cx.at(span, message)
    }

    /// The object itself: its key, or the top-level `{`.
    fn span(&self) -> std::ops::Range<usize> {
        key_span(self.cx.src, &self.path).unwrap_or_else(|| {
            let at = root_start(self.cx.src);
            at..at + 1
        })
    }

    fn unsupported(&self, key: &str, message: String) -> SpecError {
        SpecError::Unsupported(self.diag(key, message))
    }

    fn missing(&self, key: &str) -> SpecError {
        let place = match self.path.last() {
            Some(p) => format!("`{p}`"),
            None => "the config".to_string(),
        };
        SpecError::Schema(self.cx.at(self.span(), format!("missing key `{key}` in {place}")))
    }

    /// A required key that is absent (reported at the object) or null (reported at the key).
    fn absent(&self, key: &str, expected: &str) -> SpecError {
        if self.map.contains_key(key) {
            self.wrong_type(key, expected)
        } else {
            self.missing(key)
        }
    }

    fn wrong_type(&self, key: &str, expected: &str) -> SpecError {
        let found = match self.map.get(key) {
            Some(Value::Bool(_)) => "a boolean",
            Some(Value::Number(_)) => "a number",
            Some(Value::String(_)) => "a string",
            Some(Value::Array(_)) => "an array",
            Some(Value::Object(_)) => "an object",
            Some(Value::Null) | None => "null",
        };
        SpecError::Schema(self.diag(key, format!("`{key}` must be {expected}, found {found}")))
    }

    fn u64(&self, key: &str) -> Result<Option<u64>, SpecError> {
        self.get(key)
            .map(|v| v.as_u64().ok_or_else(|| self.wrong_type(key, "a non-negative integer")))
            .transpose()
    }

    fn req_u64(&self, key: &str) -> Result<u64, SpecError> {
        self.u64(key)?.ok_or_else(|| self.absent(key, "a non-negative integer"))
    }

    /// Present (as a number or null), with null meaning `null_means`; absent is an error.
    fn opt_u64_or_null(&self, key: &str, null_means: u64) -> Result<u64, SpecError> {
        match self.map.get(key) {
            None => Err(self.missing(key)),
            Some(Value::Null) => Ok(null_means),
            Some(_) => self.req_u64(key),
        }
    }

    fn f64(&self, key: &str) -> Result<Option<f64>, SpecError> {
        self.get(key).map(|v| v.as_f64().ok_or_else(|| self.wrong_type(key, "a number"))).transpose()
    }

    fn req_f64(&self, key: &str) -> Result<f64, SpecError> {
        self.f64(key)?.ok_or_else(|| self.absent(key, "a number"))
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, SpecError> {
        self.get(key).map(|v| v.as_bool().ok_or_else(|| self.wrong_type(key, "true or false"))).transpose()
    }

    fn req_bool(&self, key: &str) -> Result<bool, SpecError> {
        self.bool(key)?.ok_or_else(|| self.absent(key, "true or false"))
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>, SpecError> {
        self.get(key).map(|v| v.as_str().ok_or_else(|| self.wrong_type(key, "a string"))).transpose()
    }

    fn req_str(&self, key: &str) -> Result<&'a str, SpecError> {
        self.str(key)?.ok_or_else(|| self.absent(key, "a string"))
    }

    fn obj(&self, key: &'a str) -> Result<Option<Obj<'a>>, SpecError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(map)) => {
                let mut path = self.path.clone();
                path.push(key);
                Ok(Some(Obj { cx: self.cx, path, map }))
            }
            Some(_) => Err(self.wrong_type(key, "an object")),
        }
    }
}
