//! [`ModelSpec`] back to canonical TOML: the text `kiln import-hf` writes and every `models/*.toml`
//! is in.
//!
//! Canonical means: sections in the order `[model]`, `[attention]`, `[rope]`, `[rope.yarn]`, `[moe]`,
//! `[mtp]`, `[quantization]`; keys in the order of the struct fields; every key with a default
//! written out (so a reader never needs to know the defaults), absent options left out; floats with
//! a decimal point or exponent, so they stay floats. Keys whose Hugging Face name differs carry a `#`
//! comment naming it, aligned within the section. `parse_toml(to_toml(s)) == s` for every spec, and
//! `to_toml` is a fixed point on its own output.
//!
//! It writes no header: a file's leading comment block (its sources) is the author's, and tests that
//! compare a file with `to_toml` skip the leading comment lines.

use std::fmt::Write;

use kiln_ir::spec::{Family, ModelSpec, TopkMethod};

/// The canonical TOML text of `spec`.
pub fn to_toml(spec: &ModelSpec) -> String {
    let mut out = Out::default();
    let m = &spec.model;
    out.section("model", None);
    out.key("name", string(&m.name), Some("kiln's name for the model (not in the HF config)"));
    out.key("family", string(family(m.family)), Some("model_type"));
    out.key("vocab_size", m.vocab_size.to_string(), None);
    out.key("hidden_size", m.hidden_size.to_string(), None);
    out.key("num_hidden_layers", m.num_hidden_layers.to_string(), None);
    out.key("intermediate_size", m.intermediate_size.to_string(), None);
    out.key("rms_norm_eps", float(m.rms_norm_eps), None);
    out.key("max_position_embeddings", m.max_position_embeddings.to_string(), None);
    out.key("dtype", string(m.dtype.name()), Some("torch_dtype"));
    out.key("tie_word_embeddings", m.tie_word_embeddings.to_string(), None);
    if let Some(id) = m.bos_token_id {
        out.key("bos_token_id", id.to_string(), None);
    }
    if let Some(id) = m.eos_token_id {
        out.key("eos_token_id", id.to_string(), None);
    }

    let a = &spec.attention;
    out.section("attention", None);
    out.key("num_heads", a.num_heads.to_string(), Some("num_attention_heads"));
    match a.q_lora_rank {
        Some(r) => out.key("q_lora_rank", r.to_string(), None),
        None => out.comment("no q_lora_rank: queries are projected directly (HF q_lora_rank = null)"),
    }
    out.key("kv_lora_rank", a.kv_lora_rank.to_string(), None);
    out.key("qk_nope_head_dim", a.qk_nope_head_dim.to_string(), None);
    out.key("qk_rope_head_dim", a.qk_rope_head_dim.to_string(), None);
    out.key("v_head_dim", a.v_head_dim.to_string(), None);

    let r = &spec.rope;
    out.section("rope", None);
    out.key("theta", float(r.theta), Some("rope_theta"));
    out.key("interleaved", r.interleaved.to_string(), Some("rope_interleave"));
    if let Some(y) = &r.yarn {
        out.section("rope.yarn", Some("rope_scaling, type = \"yarn\""));
        out.key("factor", float(y.factor), None);
        out.key("original_max_position_embeddings", y.original_max_position_embeddings.to_string(), None);
        out.key("beta_fast", float(y.beta_fast), None);
        out.key("beta_slow", float(y.beta_slow), None);
        out.key("mscale", float(y.mscale), None);
        out.key("mscale_all_dim", float(y.mscale_all_dim), None);
    }

    if let Some(moe) = &spec.moe {
        out.section("moe", None);
        out.key("n_routed_experts", moe.n_routed_experts.to_string(), None);
        out.key("n_shared_experts", moe.n_shared_experts.to_string(), None);
        out.key("num_experts_per_tok", moe.num_experts_per_tok.to_string(), None);
        out.key("moe_intermediate_size", moe.moe_intermediate_size.to_string(), None);
        out.key("first_k_dense_replace", moe.first_k_dense_replace.to_string(), None);
        out.key("moe_layer_freq", moe.moe_layer_freq.to_string(), None);
        out.key("n_group", moe.n_group.to_string(), None);
        out.key("topk_group", moe.topk_group.to_string(), None);
        out.key("scoring_func", string(moe.scoring_func.name()), None);
        out.key("topk_method", string(topk_method(moe.topk_method)), None);
        out.key("norm_topk_prob", moe.norm_topk_prob.to_string(), None);
        out.key("routed_scaling_factor", float(moe.routed_scaling_factor), None);
        out.key("ep_size", moe.ep_size.to_string(), None);
        if let Some(alpha) = moe.aux_loss_alpha {
            out.key("aux_loss_alpha", float(alpha), None);
        }
        if let Some(seq_aux) = moe.seq_aux {
            out.key("seq_aux", seq_aux.to_string(), None);
        }
    }

    if let Some(mtp) = &spec.mtp {
        out.section("mtp", None);
        out.key("num_layers", mtp.num_layers.to_string(), Some("num_nextn_predict_layers"));
    }

    if let Some(q) = &spec.quantization {
        out.section("quantization", Some("quantization_config"));
        out.key("method", string(&q.method), Some("quant_method"));
        out.key("format", string(q.format.name()), Some("fmt = \"e4m3\""));
        out.key(
            "weight_block",
            format!("[{}, {}]", q.weight_block[0], q.weight_block[1]),
            Some("weight_block_size"),
        );
        out.key("activation_scheme", string(&q.activation_scheme), None);
        out.key("pow2_scale", q.pow2_scale.to_string(), Some("scale_fmt = \"ue8m0\" when true"));
        if let Some(kept) = &q.modules_to_not_convert {
            let list: Vec<String> = kept.iter().map(|m| string(m)).collect();
            out.key("modules_to_not_convert", format!("[{}]", list.join(", ")), None);
        }
    }
    out.finish()
}

fn family(f: Family) -> &'static str {
    match f {
        Family::DeepseekV3 => "deepseek_v3",
        Family::DeepseekV2 => "deepseek_v2",
    }
}

fn topk_method(t: TopkMethod) -> &'static str {
    match t {
        TopkMethod::Greedy => "greedy",
        TopkMethod::GroupLimitedGreedy => "group_limited_greedy",
        TopkMethod::NoauxTc => "noaux_tc",
    }
}

/// A TOML float that reads back as the same `f64`: Rust's shortest round-trip form (`1e-6`,
/// `10000.0`) is valid TOML except for the non-finite values.
fn float(x: f64) -> String {
    if x.is_nan() {
        "nan".to_string()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.to_string()
    } else {
        format!("{x:?}")
    }
}

/// A TOML basic string.
fn string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Lines of the current section are buffered so their comments can be aligned.
#[derive(Default)]
struct Out {
    text: String,
    lines: Vec<(String, Option<String>)>,
}

impl Out {
    fn section(&mut self, name: &str, comment: Option<&str>) {
        self.flush();
        if !self.text.is_empty() {
            self.text.push('\n');
        }
        self.lines.push((format!("[{name}]"), comment.map(str::to_string)));
    }

    fn key(&mut self, key: &str, value: String, hf_name: Option<&str>) {
        self.lines.push((format!("{key} = {value}"), hf_name.map(str::to_string)));
    }

    fn comment(&mut self, text: &str) {
        self.lines.push((format!("# {text}"), None));
    }

    fn flush(&mut self) {
        let width = self.lines.iter().filter(|(_, c)| c.is_some()).map(|(l, _)| l.len()).max().unwrap_or(0);
        for (line, comment) in self.lines.drain(..) {
            match comment {
                Some(c) => {
                    let _ = writeln!(self.text, "{line:<width$}  # {c}");
                }
                None => {
                    self.text.push_str(&line);
                    self.text.push('\n');
                }
            }
        }
    }

    fn finish(mut self) -> String {
        self.flush();
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_and_strings_read_back() {
        for x in [1e-6, 10000.0, 0.707, 2.5, 1e16, 1e300, -0.0, 0.001] {
            let v: toml::Value = toml::from_str(&format!("x = {}", float(x))).unwrap();
            assert_eq!(v["x"].as_float(), Some(x), "{}", float(x));
        }
        assert_eq!(float(1e-6), "1e-6");
        assert_eq!(float(40.0), "40.0");
        let s = "a\"b\\c\u{1}é";
        let v: toml::Value = toml::from_str(&format!("x = {}", string(s))).unwrap();
        assert_eq!(v["x"].as_str(), Some(s));
    }
}
