//! Integration tests: build. The graph builder against the DeepSeek-V3, DeepSeek-V2-Lite and tiny
//! configurations (reference §1.1, §8), and the `inspect` summary computed from those graphs.
//!
//! Specs come from `models/` (whose values are checked against the references in `tests/it/spec.rs`);
//! the expected numbers are recomputed here from the configuration with closed formulas.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::OnceLock;

use kiln_compiler::build::{build_graph, build_layer, BuildError};
use kiln_compiler::inspect::summarize;
use kiln_compiler::spec::load;
use kiln_ir::infer::infer;
use kiln_ir::op::{GroupScore, Op, Scoring};
use kiln_ir::spec::ModelSpec;
use kiln_ir::verify::verify;
use kiln_ir::{DType, Dim, Graph, TensorType};

/// A model from `models/`, through the same loader and validation as the CLI.
fn model(name: &str) -> ModelSpec {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(format!("{name}.toml"));
    load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// The V3 graph, built once for the tests that only read it.
fn v3_graph() -> &'static Graph {
    static G: OnceLock<Graph> = OnceLock::new();
    G.get_or_init(|| build_graph(&model("deepseek_v3")).unwrap())
}

fn params(g: &Graph) -> HashMap<String, TensorType> {
    g.params().into_iter().map(|(n, t)| (n.to_string(), t.clone())).collect()
}

fn ty(dtype: DType, dims: &[u64]) -> TensorType {
    TensorType::known(dtype, dims)
}

/// Parameter counts from the configuration alone, with closed formulas (reference D10).
struct ClosedForm {
    total: u64,
    activated: u64,
    mtp_unique: u64,
    /// Activated weights that are matmul operands: activated minus embedding, norms and router bias.
    matmul: u64,
}

fn closed_form(s: &ModelSpec) -> ClosedForm {
    let m = &s.model;
    let a = &s.attention;
    let (d, v) = (m.hidden_size, m.vocab_size);
    let h = a.num_heads;
    let dqk = a.qk_nope_head_dim + a.qk_rope_head_dim;
    let q = match a.q_lora_rank {
        Some(qr) => qr * d + qr + h * dqk * qr,
        None => h * dqk * d,
    };
    let attn = q
        + (a.kv_lora_rank + a.qk_rope_head_dim) * d
        + a.kv_lora_rank
        + h * (a.qk_nope_head_dim + a.v_head_dim) * a.kv_lora_rank
        + d * h * a.v_head_dim;
    let attn_norms = a.q_lora_rank.map_or(0, |qr| qr) + a.kv_lora_rank;
    let is_moe = |i: u64| {
        s.moe.as_ref().is_some_and(|e| {
            i >= e.first_k_dense_replace && (i - e.first_k_dense_replace) % e.moe_layer_freq == 0
        })
    };
    // (all params, activated params, activated non-matmul params) of layer `i`.
    let layer = |i: u64| -> (u64, u64, u64) {
        let base = attn + 2 * d;
        let norms = 2 * d + attn_norms;
        if !is_moe(i) {
            let mlp = 3 * d * m.intermediate_size;
            return (base + mlp, base + mlp, norms);
        }
        let e = s.moe.as_ref().unwrap();
        let expert = 3 * d * e.moe_intermediate_size;
        let bias = if e.topk_method == kiln_ir::spec::TopkMethod::NoauxTc { e.n_routed_experts } else { 0 };
        let fixed = base + e.n_routed_experts * d + bias + e.n_shared_experts * expert;
        (fixed + e.n_routed_experts * expert, fixed + e.num_experts_per_tok * expert, norms + bias)
    };
    let heads = if m.tie_word_embeddings { v * d } else { 2 * v * d };
    let (mut total, mut activated, mut other) = (heads + d, heads + d, v * d + d);
    for i in 0..m.num_hidden_layers {
        let (t, act, o) = layer(i);
        total += t;
        activated += act;
        other += o;
    }
    let depth = s.mtp.as_ref().map_or(0, |x| x.num_layers);
    let mtp_unique = (0..depth).map(|k| 2 * d + 2 * d * d + layer(m.num_hidden_layers + k).0 + d).sum();
    ClosedForm { total, activated, mtp_unique, matmul: activated - other }
}

#[test]
fn v3_parameter_counts_match_the_config() {
    {
        let s = model("deepseek_v3");
        let g = build_graph(&s).unwrap();
        let sum = summarize(&s, &g, 4096);
        let want = closed_form(&s);
        assert_eq!(sum.params.total, want.total);
        assert_eq!(sum.params.activated, want.activated);
        assert_eq!(sum.params.mtp_unique, want.mtp_unique);
        // Reference D10: 671.03B total, 37.55B activated, 11.61B unique MTP parameters.
        let near = |n: u64, billions: f64| (n as f64 / 1e9 - billions).abs() < 0.01;
        assert!(near(want.total, 671.03), "{}", want.total);
        assert!(near(want.activated, 37.55), "{}", want.activated);
        assert!(near(want.mtp_unique, 11.61), "{}", want.mtp_unique);
        assert_eq!(sum.params.routed_experts, 58 * 256 * 3 * 7168 * 2048);

        assert_eq!(sum.flops.matmul, 2 * want.matmul);
        assert_eq!(sum.flops.attention, 61 * 2 * 128 * 4096 * (192 + 128));
        assert_eq!((sum.layers.decoder, sum.layers.dense, sum.layers.moe, sum.layers.mtp), (61, 3, 58, 1));
    }
}

#[test]
fn v3_kv_cache_is_576_elements_per_layer() {
    let s = model("deepseek_v3");
    let kv = summarize(&s, v3_graph(), 4096).kv_cache;
    assert_eq!(kv.mla_bytes_per_token, 70_272);
    assert_eq!(kv.naive_bytes_per_token, 4_997_120);
    assert!((kv.ratio - 4_997_120.0 / 70_272.0).abs() < 1e-12);
}

/// Every node's result types are what shape inference gives for its operands, and every param has
/// a constant shape.
fn assert_types_inferred(g: &Graph) {
    for n in g.nodes() {
        let node = g.node(n);
        let got: Vec<TensorType> = node.results.iter().map(|&r| g.ty(r).clone()).collect();
        if node.op.declares_type() {
            assert!(node.inputs.is_empty());
            if let Op::Param { name } = &node.op {
                assert!(got[0].known_numel().is_some(), "{name}: {:?}", got[0]);
            }
            continue;
        }
        let ins: Vec<&TensorType> = node.inputs.iter().map(|&v| g.ty(v)).collect();
        assert_eq!(infer(&node.op, &ins).as_ref(), Ok(&got), "{} in {:?}", node.op.name(), node.scope);
    }
}

#[test]
fn graphs_are_shape_consistent() {
    for s in [model("deepseek_v2_lite"), model("tiny")] {
        let g = build_graph(&s).unwrap();
        assert_types_inferred(&g);
        verify(&g).unwrap();
    }
    let g = v3_graph();
    assert_types_inferred(g);
    verify(g).unwrap();
    let outputs: BTreeMap<&str, String> =
        g.outputs().iter().map(|(n, v)| (n.as_str(), g.ty(*v).to_string())).collect();
    assert_eq!(outputs["logits"], "f32[B, T, 129280]");
    assert_eq!(outputs["mtp_logits"], "f32[B, T, 129280]");
    let inputs: Vec<(&str, String)> = g.inputs().into_iter().map(|(n, v)| (n, g.ty(v).to_string())).collect();
    assert_eq!(
        inputs,
        [("tokens", "i32[B, T]"), ("positions", "i32[B, T]"), ("mtp_tokens", "i32[B, T]")]
            .map(|(n, t)| (n, t.to_string()))
    );
}

#[test]
fn v3_params_have_hugging_face_names_and_shapes() {
    let p = params(v3_graph());
    let bf = DType::BF16;
    let has = |name: &str, t: TensorType| assert_eq!(p.get(name), Some(&t), "{name}");
    has("model.embed_tokens.weight", ty(bf, &[129280, 7168]));
    has("lm_head.weight", ty(bf, &[129280, 7168]));
    has("model.norm.weight", ty(bf, &[7168]));
    // Layer 0 is dense.
    has("model.layers.0.input_layernorm.weight", ty(bf, &[7168]));
    has("model.layers.0.mlp.gate_proj.weight", ty(bf, &[18432, 7168]));
    has("model.layers.0.mlp.down_proj.weight", ty(bf, &[7168, 18432]));
    assert!(!p.contains_key("model.layers.0.mlp.gate.weight"));
    // Layer 3 is the first MoE layer, with query LoRA.
    let l3 = "model.layers.3";
    has(&format!("{l3}.self_attn.q_a_proj.weight"), ty(bf, &[1536, 7168]));
    has(&format!("{l3}.self_attn.q_a_layernorm.weight"), ty(bf, &[1536]));
    has(&format!("{l3}.self_attn.q_b_proj.weight"), ty(bf, &[128 * 192, 1536]));
    has(&format!("{l3}.self_attn.kv_a_proj_with_mqa.weight"), ty(bf, &[576, 7168]));
    has(&format!("{l3}.self_attn.kv_a_layernorm.weight"), ty(bf, &[512]));
    has(&format!("{l3}.self_attn.kv_b_proj.weight"), ty(bf, &[128 * 256, 512]));
    has(&format!("{l3}.self_attn.o_proj.weight"), ty(bf, &[7168, 128 * 128]));
    has(&format!("{l3}.mlp.gate.weight"), ty(bf, &[256, 7168]));
    has(&format!("{l3}.mlp.gate.e_score_correction_bias"), ty(DType::F32, &[256]));
    has(&format!("{l3}.mlp.experts.0.gate_proj.weight"), ty(bf, &[2048, 7168]));
    has(&format!("{l3}.mlp.experts.255.up_proj.weight"), ty(bf, &[2048, 7168]));
    has(&format!("{l3}.mlp.experts.255.down_proj.weight"), ty(bf, &[7168, 2048]));
    has(&format!("{l3}.mlp.shared_experts.down_proj.weight"), ty(bf, &[7168, 2048]));
    assert!(!p.contains_key(&format!("{l3}.mlp.experts.256.gate_proj.weight")));
    assert!(!p.keys().any(|n| n.ends_with("q_proj.weight")));
    let experts = p.keys().filter(|n| n.starts_with(&format!("{l3}.mlp.experts."))).count();
    assert_eq!(experts, 256 * 3);
    // The MTP module is layer 61 and reads the shared head.
    has("model.layers.61.eh_proj.weight", ty(bf, &[7168, 2 * 7168]));
    has("model.layers.61.enorm.weight", ty(bf, &[7168]));
    has("model.layers.61.hnorm.weight", ty(bf, &[7168]));
    has("model.layers.61.shared_head.norm.weight", ty(bf, &[7168]));
    has("model.layers.61.mlp.experts.7.gate_proj.weight", ty(bf, &[2048, 7168]));
    assert!(!p.contains_key("model.layers.61.shared_head.head.weight"));
    assert!(!p.contains_key("model.layers.62.input_layernorm.weight"));

    let g = v3_graph();
    let attn = g.nodes().into_iter().find_map(|n| match &g.node(n).op {
        Op::Attention { scale, causal, .. } => Some((*scale, *causal)),
        _ => None,
    });
    let (scale, causal) = attn.unwrap();
    assert!((scale - 0.1352338).abs() < 1e-7 && causal, "{scale}");
}

#[test]
fn v2_lite_projects_queries_directly_and_routes_with_softmax() {
    {
        let s = model("deepseek_v2_lite");
        check_v2_lite(&s);
    }
}

fn check_v2_lite(s: &ModelSpec) {
    let g = build_graph(s).unwrap();
    let p = params(&g);
    assert_eq!(p["model.layers.1.self_attn.q_proj.weight"], ty(DType::BF16, &[16 * 192, 2048]));
    assert!(!p.keys().any(|n| n.contains("q_a_proj") || n.contains("e_score_correction_bias")));
    assert!(!p.keys().any(|n| n.starts_with("model.layers.27.")), "no MTP");
    assert_eq!(p["model.layers.1.mlp.shared_experts.gate_proj.weight"], ty(DType::BF16, &[2 * 1408, 2048]));
    let routes: Vec<_> = g
        .nodes()
        .into_iter()
        .filter_map(|n| match &g.node(n).op {
            Op::MoeRoute(r) => Some((r.clone(), g.node(n).inputs.len())),
            _ => None,
        })
        .collect();
    assert_eq!(routes.len(), 26);
    let (r, operands) = &routes[0];
    assert_eq!(*operands, 1, "no bias operand");
    assert_eq!(
        (r.scoring, r.group_score, r.num_groups, r.topk_groups),
        (Scoring::Softmax, GroupScore::Max, 1, 1)
    );
    assert_eq!((r.num_experts, r.top_k, r.normalize, r.scaling), (64, 6, false, 1.0));
    assert_eq!(g.outputs().len(), 1);
    // DeepSeek-V2-Lite is "15.7B total" (reference §8).
    let sum = summarize(s, &g, 4096);
    let want = closed_form(s);
    assert_eq!(
        (sum.params.total, sum.params.activated, sum.params.mtp_unique),
        (want.total, want.activated, 0)
    );
    assert!((want.total as f64 / 1e9 - 15.71).abs() < 0.01, "{}", want.total);
}

fn op_counts(g: &Graph) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for n in g.nodes() {
        *counts.entry(g.node(n).op.name()).or_insert(0) += 1;
    }
    counts
}

#[test]
fn tiny_node_counts_per_layer_kind() {
    {
        let s = model("tiny");
        // Attention: 7 params + 20 ops. Block: 2 norms (4 nodes) + 2 adds. Dense MLP: 3 params + 5 ops.
        // MoE (f32, no casts): gate, bias, linear, route, 48 expert params, experts, shared MLP (8), add.
        // Params of a MoE layer: 7 attention + 2 norms + gate and bias + 48 experts + 3 shared.
        let dense = build_layer(&s, 0).unwrap();
        assert_eq!(dense.node_count(), 2 + 27 + 6 + 8);
        let moe = build_layer(&s, 1).unwrap();
        assert_eq!(moe.node_count(), 2 + 27 + 6 + 62);
        let c = op_counts(&moe);
        assert_eq!((c["param"], c["linear"], c["moe_route"], c["moe_experts"], c["add"]), (62, 9, 1, 1, 3));
        // MTP: 3 inputs, embedding, enorm/hnorm, concat, eh_proj, an MoE block, shared_head norm, head.
        let mtp = build_layer(&s, 4).unwrap();
        assert_eq!(mtp.node_count(), 3 + 9 + 95 + 4);
        // Whole model: 3 inputs, embedding, 1 dense + 3 MoE layers, norm + head, MTP without re-emitting
        // the shared embedding and head params.
        let g = build_graph(&s).unwrap();
        assert_eq!(g.node_count(), 3 + 2 + 41 + 3 * 95 + 4 + (8 + 95 + 3));
    }
}

#[test]
fn a_layer_graph_matches_that_layer_of_the_whole_graph() {
    let s = model("deepseek_v3");
    let whole = v3_graph();
    for layer in [3, 61] {
        let g = build_layer(&s, layer).unwrap();
        let prefix = format!("model.layers.{layer}.");
        let mut want: Vec<(String, TensorType)> =
            params(whole).into_iter().filter(|(n, _)| n.starts_with(&prefix)).collect();
        if layer == 61 {
            for shared in ["model.embed_tokens.weight", "lm_head.weight"] {
                want.push((shared.to_string(), params(whole)[shared].clone()));
            }
        }
        let mut got: Vec<(String, TensorType)> = params(&g).into_iter().collect();
        want.sort_by(|a, b| a.0.cmp(&b.0));
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, want, "layer {layer}");

        // Same ops in the same order with the same scopes, apart from the inputs.
        let ops = |g: &Graph, keep: &dyn Fn(&str) -> bool| -> Vec<(String, String)> {
            g.nodes()
                .into_iter()
                .map(|n| g.node(n))
                .filter(|node| node.scope.as_deref().is_some_and(keep))
                .map(|node| (node.op.name().to_string(), node.scope.clone().unwrap()))
                .collect()
        };
        let in_layer = |scope: &str| scope == prefix.trim_end_matches('.') || scope.starts_with(&prefix);
        assert_eq!(ops(&g, &in_layer), ops(whole, &in_layer), "layer {layer}");
    }
    assert_eq!(build_layer(&s, 3).unwrap().outputs()[0].0, "hidden");
}

#[test]
fn out_of_range_layers_are_reported_with_the_valid_range() {
    let err = build_layer(&model("tiny"), 5).unwrap_err();
    assert_eq!(
        err.to_string(),
        "layer 5 is out of range: the model has decoder layers 0..=3 and MTP layers 4..=4"
    );
    let err = build_layer(&model("deepseek_v2_lite"), 27).unwrap_err();
    assert_eq!(err.to_string(), "layer 27 is out of range: the model has decoder layers 0..=26");
}

#[test]
fn inference_errors_name_the_scope_and_op() {
    let mut s = model("tiny");
    s.attention.qk_rope_head_dim = 7;
    let err = build_graph(&s).unwrap_err();
    assert!(matches!(err, BuildError::Infer { op: "rope", .. }));
    assert_eq!(
        err.to_string(),
        "model.layers.0.self_attn: rope: `rope` needs an even, constant last dimension, found f32[B, T, 4, 7]"
    );
    let mut s = model("tiny");
    s.moe.as_mut().unwrap().num_experts_per_tok = 9;
    let err = build_graph(&s).unwrap_err().to_string();
    assert!(err.starts_with("model.layers.1.mlp: moe_route: "), "{err}");
    let mut s = model("tiny");
    s.moe.as_mut().unwrap().moe_layer_freq = 0;
    assert_eq!(build_graph(&s).unwrap_err().to_string(), "moe.moe_layer_freq must be at least 1, found 0");
}

/// Every param is named `{scope}.{local}` and read by the first non-param node after it.
fn assert_params_precede_their_first_use(g: &Graph) {
    let order = g.nodes();
    for (i, &n) in order.iter().enumerate() {
        let node = g.node(n);
        let Op::Param { name } = &node.op else { continue };
        let scope = node.scope.as_deref().unwrap();
        assert!(name.starts_with(&format!("{scope}.")), "{name} in {scope}");
        let next =
            order[i + 1..].iter().map(|&m| g.node(m)).find(|m| !matches!(m.op, Op::Param { .. })).unwrap();
        assert!(
            next.inputs.contains(&node.results[0]),
            "{name} is not read by the next op, {}",
            next.op.name()
        );
    }
}

#[test]
fn params_come_right_before_their_first_use() {
    assert_params_precede_their_first_use(&build_graph(&model("tiny")).unwrap());
    assert_params_precede_their_first_use(v3_graph());
}

#[test]
fn tied_embeddings_share_one_param() {
    let mut s = model("tiny");
    s.model.tie_word_embeddings = true;
    let g = build_graph(&s).unwrap();
    let p = params(&g);
    assert!(!p.contains_key("lm_head.weight"));
    let heads: Vec<_> = g
        .outputs()
        .iter()
        .map(|(_, v)| g.node(g.producer(*v)).inputs[1])
        .map(|w| match &g.node(g.producer(w)).op {
            Op::Param { name } => name.clone(),
            other => other.name().to_string(),
        })
        .collect();
    assert_eq!(heads, ["model.embed_tokens.weight", "model.embed_tokens.weight"]);
    let untied = summarize(&model("tiny"), &build_graph(&model("tiny")).unwrap(), 16).params.total;
    assert_eq!(summarize(&s, &g, 16).params.total, untied - 512 * 64);
}

#[test]
fn mtp_depth_two_numbers_its_inputs_and_outputs() {
    let mut s = model("tiny");
    s.mtp.as_mut().unwrap().num_layers = 2;
    let g = build_graph(&s).unwrap();
    let inputs: Vec<&str> = g.inputs().into_iter().map(|(n, _)| n).collect();
    assert_eq!(inputs, ["tokens", "positions", "mtp_tokens.1", "mtp_tokens.2"]);
    let outputs: Vec<&str> = g.outputs().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(outputs, ["logits", "mtp_logits.1", "mtp_logits.2"]);
    assert!(params(&g).contains_key("model.layers.5.eh_proj.weight"));
    let layer = build_layer(&s, 5).unwrap();
    let names: Vec<&str> = layer.inputs().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["hidden", "positions", "mtp_tokens.2"]);
    let sum = summarize(&s, &g, 16);
    assert_eq!(sum.layers.mtp, 2);
    assert_eq!(sum.params.mtp_unique, closed_form(&s).mtp_unique);
}

#[test]
fn yarn_amplitude_other_than_one_becomes_a_multiply() {
    // Hugging Face scales cos/sin by mscale(f, mscale) / mscale(f, mscale_all_dim).
    let mut s = model("tiny");
    s.rope.yarn.as_mut().unwrap().mscale = 0.5;
    let g = build_layer(&s, 0).unwrap();
    let want = (0.1 * 0.5 * 4f64.ln() + 1.0) / (0.1 * 4f64.ln() + 1.0);
    let constants: Vec<f64> = g
        .nodes()
        .into_iter()
        .filter_map(|n| match g.node(n).op {
            Op::Constant { value } => Some(value),
            _ => None,
        })
        .collect();
    assert_eq!(constants, [want, want], "one for q_pe, one for k_pe");
    assert_types_inferred(&g);
    assert_eq!(op_counts(&build_layer(&model("tiny"), 0).unwrap()).get("constant"), None);
}

#[test]
fn summary_serialises_for_json_output() {
    let s = model("tiny");
    let sum = summarize(&s, &build_graph(&s).unwrap(), 1024);
    let json = serde_json::to_value(&sum).unwrap();
    assert_eq!(json["params"]["total"], sum.params.total);
    assert_eq!(json["dtype"], "f32");
    assert_eq!(json["routing"]["top_k"], 4);
    assert_eq!(json["flops"]["context"], 1024);
    assert_eq!(json["layers"]["mtp"], 1);
}

#[test]
fn summary_of_deepseek_v3() {
    let s = model("deepseek_v3");
    insta::assert_snapshot!(summarize(&s, v3_graph(), 4096).to_string());
}

#[test]
fn summary_of_tiny() {
    let s = model("tiny");
    insta::assert_snapshot!(summarize(&s, &build_graph(&s).unwrap(), 1024).to_string());
}

#[test]
fn symbolic_dims_are_batch_and_tokens() {
    // In this cache-less graph attention's keys span the new tokens: the context is T, not S.
    let g = build_layer(&model("tiny"), 0).unwrap();
    for n in g.nodes() {
        let node = g.node(n);
        if let Op::Attention { .. } = node.op {
            assert_eq!(g.ty(node.inputs[1]).shape[..2], [Dim::B, Dim::T]);
        }
    }
}

/// The latent norms keep their architectural epsilon (1e-6, as Hugging Face and DeepSeek's
/// `model.py` build them) when the config's `rms_norm_eps` differs; every other norm follows it.
#[test]
fn latent_norms_keep_their_own_epsilon() {
    let mut s = model("tiny");
    s.model.rms_norm_eps = 1e-5;
    let g = build_layer(&s, 1).unwrap();
    let mut eps_by_weight = BTreeMap::new();
    for n in g.nodes() {
        if let Op::RmsNorm { eps } = g.node(n).op {
            let w = g.node(n).inputs[1];
            if let Op::Param { name } = &g.node(g.producer(w)).op {
                eps_by_weight.insert(name.rsplit('.').nth(1).unwrap().to_string(), eps);
            }
        }
    }
    assert_eq!(eps_by_weight["q_a_layernorm"], 1e-6);
    assert_eq!(eps_by_weight["kv_a_layernorm"], 1e-6);
    assert_eq!(eps_by_weight["input_layernorm"], 1e-5);
    assert_eq!(eps_by_weight["post_attention_layernorm"], 1e-5);
}
