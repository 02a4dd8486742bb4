//! `ModelSpec`: the validated description of a DeepSeek-style model.
//!
//! This is plain data shared by compiler and runtime (it is embedded in the artifact manifest). Loading
//! it from TOML or a Hugging Face `config.json`, and validating it with file/line/column diagnostics,
//! is the compiler's job (`kiln_compiler::spec`); `ir` knows nothing about TOML.
//!
//! Field names follow the Hugging Face configuration where one exists, grouped into sections. Every
//! optional feature is an `Option` (no q LoRA, no YaRN, no MoE, no MTP, no quantisation) rather than a
//! sentinel value.

use serde::{Deserialize, Serialize};

use crate::op::Scoring;
use crate::types::DType;

/// A whole model. Sections mirror the TOML file: `[model]`, `[attention]`, `[rope]`, `[moe]`,
/// `[mtp]`, `[quantization]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub model: ModelSection,
    pub attention: AttentionSection,
    pub rope: RopeSection,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtp: Option<MtpSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<QuantSection>,
}

/// Which reference implementation the model follows; decides defaults the configs leave implicit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    DeepseekV3,
    DeepseekV2,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A short identifier, used as the graph name.
    pub name: String,
    pub family: Family,
    pub vocab_size: u64,
    pub hidden_size: u64,
    pub num_hidden_layers: u64,
    /// Intermediate size of the dense MLP layers.
    pub intermediate_size: u64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: u64,
    /// Parameter and activation dtype of the unquantised model.
    pub dtype: DType,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionSection {
    pub num_heads: u64,
    /// Rank of the query down-projection; absent means queries are projected directly (V2-Lite).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q_lora_rank: Option<u64>,
    pub kv_lora_rank: u64,
    pub qk_nope_head_dim: u64,
    pub qk_rope_head_dim: u64,
    pub v_head_dim: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeSection {
    pub theta: f64,
    /// Rotate adjacent pairs, as DeepSeek's reference code does (HF `rope_interleave`).
    #[serde(default = "yes")]
    pub interleaved: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yarn: Option<YarnSection>,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct YarnSection {
    pub factor: f64,
    pub original_max_position_embeddings: u64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
}

/// How the top-k experts are chosen (HF `topk_method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopkMethod {
    /// Plain top-k over all experts (V2-Lite).
    Greedy,
    /// Top-k within the best groups, group score = max (V2).
    GroupLimitedGreedy,
    /// Bias-corrected selection, group score = sum of top 2, auxiliary-loss-free balancing (V3).
    NoauxTc,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeSection {
    pub n_routed_experts: u64,
    pub n_shared_experts: u64,
    pub num_experts_per_tok: u64,
    pub moe_intermediate_size: u64,
    /// Layers before this index use the dense MLP (HF `first_k_dense_replace`).
    pub first_k_dense_replace: u64,
    /// Every `moe_layer_freq`-th layer from `first_k_dense_replace` on is a MoE layer.
    #[serde(default = "one")]
    pub moe_layer_freq: u64,
    pub n_group: u64,
    pub topk_group: u64,
    pub scoring_func: Scoring,
    pub topk_method: TopkMethod,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    /// Expert-parallel ranks the experts are placed on.
    #[serde(default = "one")]
    pub ep_size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aux_loss_alpha: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq_aux: Option<bool>,
}

fn one() -> u64 {
    1
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtpSection {
    /// Depth D of multi-token prediction (HF `num_nextn_predict_layers`).
    pub num_layers: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantSection {
    /// Only `"fp8"` exists today.
    pub method: String,
    /// Element format of quantised tensors; only `f8e4m3`.
    pub format: DType,
    /// Weight block `[rows, cols]`, one f32 scale per block.
    pub weight_block: [u64; 2],
    /// Only `"dynamic"`: activation scales are computed online per 1 x `weight_block[1]` tile.
    pub activation_scheme: String,
    /// Round scales up to powers of two (`scale_fmt = "ue8m0"` in DeepSeek-V3.1).
    #[serde(default)]
    pub pow2_scale: bool,
    /// Hugging Face's `modules_to_not_convert`: which linears stay in high precision. Absent,
    /// DeepSeek-V3's choice (reference §4.1): the linears it stores in FP8 are, and the output head
    /// is not. Given, the output head (`lm_head`) is quantised too, and every linear whose module
    /// path (`model.layers.3.self_attn.kv_b_proj`, `lm_head`) contains one of the entries is not,
    /// as transformers reads the key: `[]` quantises the head, `["lm_head"]` is the default,
    /// `["kv_b_proj"]` keeps every `kv_b_proj` and quantises the head. The embedding, the MoE
    /// router, norms and the attention core are never quantised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_not_convert: Option<Vec<String>>,
}

impl QuantSection {
    /// Whether the weight `name` (`{module path}.weight`) of a linear is stored in FP8: a module
    /// DeepSeek stores in FP8 (`fp8_linears`, by its last name), or the output head when
    /// `modules_to_not_convert` is given, unless an entry of that list is part of its path.
    pub fn quantises(&self, name: &str, fp8_linears: &[&str]) -> bool {
        let Some(module) = name.strip_suffix(".weight") else { return false };
        let last = module.rsplit('.').next().unwrap_or(module);
        let kept = self.modules_to_not_convert.as_ref();
        let eligible = fp8_linears.contains(&last) || (kept.is_some() && module == "lm_head");
        eligible && !kept.is_some_and(|k| k.iter().any(|m| !m.is_empty() && module.contains(m.as_str())))
    }
}

impl ModelSpec {
    /// Whether decoder layer `layer` (0-based, main model) uses MoE rather than the dense MLP.
    pub fn is_moe_layer(&self, layer: u64) -> bool {
        match &self.moe {
            Some(m) => {
                layer >= m.first_k_dense_replace && (layer - m.first_k_dense_replace) % m.moe_layer_freq == 0
            }
            None => false,
        }
    }

    /// `qk_nope_head_dim + qk_rope_head_dim`.
    pub fn qk_head_dim(&self) -> u64 {
        self.attention.qk_nope_head_dim + self.attention.qk_rope_head_dim
    }

    /// YaRN's attention-temperature correction `0.1 * m * ln(factor) + 1` (1 when `factor <= 1`).
    pub fn yarn_mscale(factor: f64, m: f64) -> f64 {
        if factor <= 1.0 {
            1.0
        } else {
            0.1 * m * factor.ln() + 1.0
        }
    }

    /// The softmax scale of attention: `qk_head_dim^-0.5`, times `mscale^2` under YaRN.
    ///
    /// Sources disagree on which mscale and when (reference §2.4, D5): DeepSeek's `model.py` uses
    /// `rope_scaling.mscale` and only when `max_seq_len > original_seq_len`, Hugging Face's modelling
    /// code uses `mscale_all_dim` whenever it is non-zero. kiln follows Hugging Face (`modeling_deepseek_v3.py`,
    /// `DeepseekV3Attention.__init__`), because its checkpoints and goldens are what users compare
    /// with; both give 0.1352338 for V3.
    pub fn softmax_scale(&self) -> f64 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        match &self.rope.yarn {
            Some(y) if y.mscale_all_dim != 0.0 => {
                let m = Self::yarn_mscale(y.factor, y.mscale_all_dim);
                base * m * m
            }
            _ => base,
        }
    }
}
