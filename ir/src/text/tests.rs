//! Unit tests of the text format: exact printing, round trips of hand-built graphs covering every op
//! and of random graphs, error positions, and a graph the size of DeepSeek-V3's MoE layers.

use proptest::prelude::*;

use super::{parse, print};
use crate::graph::{Graph, ValueId};
use crate::infer;
use crate::op::{
    BinaryOp, Dispatch, GemmForm, GroupScore, Op, QuantSpec, ReduceOp, RopeConfig, Router, Scoring, UnaryOp,
    Yarn,
};
use crate::types::{DType, Dim, TensorType};

/// `"bf16[B, T, 16]"` as a type, for building graphs without going through the parser under test.
fn ty(s: &str) -> TensorType {
    let (d, rest) = s.split_once('[').unwrap();
    let dims = rest.strip_suffix(']').unwrap();
    let shape =
        if dims.is_empty() { vec![] } else { dims.split(", ").map(|x| Dim::parse(x).unwrap()).collect() };
    TensorType::new(DType::from_name(d).unwrap(), shape)
}

/// Builds graphs through the API, inferring result types.
struct Builder {
    g: Graph,
    scope: Option<String>,
}

impl Builder {
    fn new(name: &str) -> Builder {
        Builder { g: Graph::new(name), scope: None }
    }

    fn scope(&mut self, s: Option<&str>) {
        self.scope = s.map(str::to_string);
    }

    fn op(&mut self, op: Op, ins: &[ValueId]) -> Vec<ValueId> {
        let tys = infer::infer_node(&self.g, &op, ins).unwrap_or_else(|e| panic!("{}: {e}", op.name()));
        self.g.add_node(op, ins, tys, self.scope.as_deref()).unwrap().1
    }

    fn op1(&mut self, op: Op, ins: &[ValueId]) -> ValueId {
        self.op(op, ins)[0]
    }

    fn decl(&mut self, op: Op, t: &str) -> ValueId {
        self.g.add_node(op, &[], vec![ty(t)], self.scope.as_deref()).unwrap().1[0]
    }

    fn input(&mut self, name: &str, t: &str) -> ValueId {
        self.decl(Op::Input { name: name.into() }, t)
    }

    fn param(&mut self, name: &str, t: &str) -> ValueId {
        self.decl(Op::Param { name: name.into() }, t)
    }
}

fn assert_round_trip(g: &Graph) {
    let text = print(g);
    let back = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(back == *g, "round trip changed the graph:\n{text}\n{}", print(&back));
    assert_eq!(print(&back), text);
}

#[test]
fn prints_the_documented_form() {
    let mut b = Builder::new("tiny");
    let tokens = b.input("tokens", "i32[B, T]");
    b.scope(Some("model.embed_tokens"));
    let table = b.param("model.embed_tokens.weight", "f32[1024, 64]");
    let x = b.op1(Op::Embedding, &[table, tokens]);
    b.scope(Some("model.layers.0.mlp"));
    let top = b.op(Op::TopK { k: 8 }, &[x]);
    let shaped = b.op1(Op::Reshape { shape: vec![Dim::B, Dim::T, Dim::known(4), Dim::known(16)] }, &[x]);
    let mut body = Builder::new("square");
    let bx = body.input("x", "f32[B, T, 64]");
    let sq = body.op1(Op::Binary(BinaryOp::Mul), &[bx, bx]);
    body.g.add_output("y", sq).unwrap();
    let fused = b.op1(Op::Fused { name: "square".into(), body: std::sync::Arc::new(body.g) }, &[x]);
    b.scope(None);
    b.op(Op::Send { peer: 1, tag: 0 }, &[shaped]);
    b.g.add_output("logits", top[0]).unwrap();
    b.g.add_output("sq", fused).unwrap();
    let want = r#"graph @tiny {
  %0 = input {name = "tokens"} : i32[B, T]
  scope "model.embed_tokens"
  %1 = param {name = "model.embed_tokens.weight"} : f32[1024, 64]
  %2 = embedding %1, %0 : f32[B, T, 64]
  scope "model.layers.0.mlp"
  %3, %4 = topk %2 {k = 8} : f32[B, T, 8], i32[B, T, 8]
  %5 = reshape %2 {shape = [B, T, 4, 16]} : f32[B, T, 4, 16]
  %6 = fused %2 {name = "square"} : f32[B, T, 64] {
    %0 = input {name = "x"} : f32[B, T, 64]
    %1 = mul %0, %0 : f32[B, T, 64]
    output "y" = %1
  }
  scope none
  send %5 {peer = 1, tag = 0}
  output "logits" = %3
  output "sq" = %6
}
"#;
    assert_eq!(print(&b.g), want);
    assert_eq!(b.g.to_string(), want);
    assert_round_trip(&b.g);
}

/// An index per `Op` variant. The match is exhaustive, so a new variant does not compile until it is
/// listed here, and `every_op_round_trips` then fails until the graph below uses it.
fn variant(op: &Op) -> usize {
    match op {
        Op::Input { .. } => 0,
        Op::Param { .. } => 1,
        Op::Constant { .. } => 2,
        Op::Linear => 3,
        Op::MatMul => 4,
        Op::Unary(_) => 5,
        Op::Binary(_) => 6,
        Op::Cast { .. } => 7,
        Op::Reduce { .. } => 8,
        Op::Softmax { .. } => 9,
        Op::RmsNorm { .. } => 10,
        Op::Rope(_) => 11,
        Op::Attention { .. } => 12,
        Op::Embedding => 13,
        Op::Gather { .. } => 14,
        Op::TopK { .. } => 15,
        Op::Concat { .. } => 16,
        Op::Split { .. } => 17,
        Op::Reshape { .. } => 18,
        Op::Transpose { .. } => 19,
        Op::Broadcast { .. } => 20,
        Op::Quantize { .. } => 21,
        Op::Dequantize { .. } => 22,
        Op::MoeRoute(_) => 23,
        Op::MoeExperts { .. } => 24,
        Op::MoeDispatch(_) => 25,
        Op::GroupedLinear { .. } => 26,
        Op::MoeCombine { .. } => 27,
        Op::Fused { .. } => 28,
        Op::Send { .. } => 29,
        Op::Recv { .. } => 30,
        Op::CacheUpdate => 31,
        Op::CrossEntropy { .. } => 32,
        Op::EmbeddingGrad { .. } => 33,
        Op::CrossEntropyGrad { .. } => 34,
        Op::AttentionGrad { .. } => 35,
        Op::TakeAlong { .. } => 36,
        Op::ScatterAddAlong { .. } => 37,
        Op::GroupedLinearWgrad { .. } => 38,
        Op::MoeCombineGrad { .. } => 39,
        Op::AllReduce { .. } => 40,
        Op::AllGather { .. } => 41,
        Op::PromotedGemm { .. } => 42,
        Op::AllToAll { .. } => 43,
    }
}
const VARIANTS: usize = 44;

/// A graph that uses every op (every unary, binary and reduce kind too), with scopes and outputs.
fn every_op_graph() -> Graph {
    let mut b = Builder::new("every_op");
    let tokens = b.input("tokens", "i32[B, T]");
    let pos = b.input("positions", "i32[B, T]");
    b.scope(Some("model.embed_tokens"));
    let table = b.param("model.embed_tokens.weight", "bf16[1024, 64]");
    let x = b.op1(Op::Embedding, &[table, tokens]);

    b.scope(Some("model.layers.0.self_attn"));
    let norm_w = b.param("model.layers.0.input_layernorm.weight", "bf16[64]");
    let h = b.op1(Op::RmsNorm { eps: 1e-6 }, &[x, norm_w]);
    let wq = b.param("model.layers.0.self_attn.q_proj.weight", "bf16[128, 64]");
    let q = b.op1(Op::Linear, &[h, wq]);
    let q = b.op1(Op::Reshape { shape: vec![Dim::B, Dim::T, Dim::known(2), Dim::known(64)] }, &[q]);
    let yarn = Yarn { factor: 40.0, original_max_position: 4096, beta_fast: 32.0, beta_slow: 1.0 };
    let rope = RopeConfig { theta: 10000.0, interleaved: true, yarn: Some(yarn), inverse: false };
    let q = b.op1(Op::Rope(rope), &[q, pos]);
    let wk = b.param("model.layers.0.self_attn.k_proj.weight", "bf16[64, 64]");
    let k = b.op1(Op::Linear, &[h, wk]);
    let k = b.op1(Op::Reshape { shape: vec![Dim::B, Dim::T, Dim::known(1), Dim::known(64)] }, &[k]);
    let rope = RopeConfig { theta: 5e4, interleaved: false, yarn: None, inverse: false };
    let kr = b.op1(Op::Rope(rope), &[k, pos]);
    b.op1(Op::Rope(RopeConfig { inverse: true, ..rope }), &[kr, pos]);
    let att = b.op1(Op::Attention { scale: 0.1352338, causal: true, mla: None }, &[q, kr, k]);
    b.op(Op::AttentionGrad { scale: 0.1352338, causal: false }, &[q, kr, k, att]);
    let cache = b.input("cache.0", "bf16[B, S, 1, 64]");
    let kc = b.op1(Op::CacheUpdate, &[cache, kr, pos]);
    let cached = b.op1(Op::Attention { scale: 0.125, causal: true, mla: None }, &[q, kc, kc, pos]);
    b.op(Op::AttentionGrad { scale: 0.125, causal: true }, &[q, kc, kc, pos, cached]);
    let qt = b.op1(Op::Transpose { perm: vec![0, 2, 1, 3] }, &[att]);
    let kt = b.op1(Op::Transpose { perm: vec![0, 2, 3, 1] }, &[kr]);
    let scores = b.op1(Op::MatMul, &[qt, kt]);
    b.op1(Op::Softmax { axis: 3 }, &[scores]);
    let loss = b.op1(Op::CrossEntropy { ignore_index: None }, &[x, tokens]);
    b.op1(Op::CrossEntropy { ignore_index: Some(-100) }, &[x, tokens]);
    b.op1(Op::CrossEntropyGrad { ignore_index: None }, &[x, tokens, loss]);
    let dlogits = b.op1(Op::CrossEntropyGrad { ignore_index: Some(-100) }, &[x, tokens, loss]);
    b.op1(Op::EmbeddingGrad { rows: 1024 }, &[tokens, dlogits]);

    b.scope(Some("model.layers.0.elementwise"));
    let xf = b.op1(Op::Cast { to: DType::F32 }, &[x]);
    let mut v = xf;
    for u in UnaryOp::ALL {
        v = b.op1(Op::Unary(u), &[v]);
    }
    for op in BinaryOp::ALL {
        v = b.op1(Op::Binary(op), &[v, xf]);
    }
    for (i, op) in ReduceOp::ALL.into_iter().enumerate() {
        b.op1(Op::Reduce { op, axes: vec![2], keep_dims: i % 2 == 0 }, &[v]);
    }
    let half = b.decl(Op::Constant { value: -0.5 }, "f32[]");
    b.op1(Op::Broadcast { shape: vec![Dim::S, Dim::B, Dim::T, Dim::known(64)] }, &[half]);
    let v = b.op1(Op::Binary(BinaryOp::Mul), &[v, half]);
    let rows = b.input("rows", "i64[4]");
    b.op1(Op::Gather { axis: 1 }, &[v, rows]);
    let top = b.op(Op::TopK { k: 8 }, &[v]);
    let cat = b.op1(Op::Concat { axis: 2 }, &[v, xf]);
    b.op(Op::Split { axis: 2, sizes: vec![32, 96] }, &[cat]);
    let spec = QuantSpec { block: vec![1, 64], amax_floor: 1e-4, pow2_scale: true };
    let qs = b.op(Op::Quantize { to: DType::F8E4M3, spec }, &[v]);
    let deq = b.op1(Op::Dequantize { to: DType::BF16, block: vec![1, 64] }, &qs);

    b.scope(Some("model.layers.0.mlp"));
    let flat = b.op1(Op::Reshape { shape: vec![Dim::parse("B*T").unwrap(), Dim::known(64)] }, &[deq]);
    let gate = b.param("model.layers.0.mlp.gate.weight", "bf16[8, 64]");
    let logits = b.op1(Op::Linear, &[flat, gate]);
    let logits = b.op1(Op::Cast { to: DType::F32 }, &[logits]);
    let bias = b.param("model.layers.0.mlp.gate.e_score_correction_bias", "f32[8]");
    let router = Router {
        num_experts: 8,
        top_k: 2,
        scoring: Scoring::Sigmoid,
        num_groups: 4,
        topk_groups: 2,
        group_score: GroupScore::Top2Sum,
        normalize: true,
        scaling: 2.5,
    };
    let route = b.op(Op::MoeRoute(router), &[logits, bias]);
    let taken = b.op1(Op::TakeAlong { axis: 1 }, &[logits, route[1]]);
    b.op1(Op::ScatterAddAlong { axis: 1, size: 8 }, &[route[1], taken]);
    let mut experts = vec![flat, route[0], route[1]];
    for e in 0..8 {
        for (w, t) in [("gate", "bf16[16, 64]"), ("up", "bf16[16, 64]"), ("down", "bf16[64, 16]")] {
            experts.push(b.param(&format!("model.layers.0.mlp.experts.{e}.{w}_proj.weight"), t));
        }
    }
    let moe = b.op1(Op::MoeExperts { num_experts: 8 }, &experts);
    let dispatch = Dispatch { num_experts: 8, top_k: 2, ep_size: 2, num_groups: 4, topk_groups: 2 };
    let d = b.op(Op::MoeDispatch(dispatch), &[flat, route[1]]);
    let mut grouped = vec![d[0], d[1]];
    for e in 0..8 {
        grouped.push(b.param(&format!("w.{e}"), "bf16[32, 64]"));
    }
    let y = b.op1(Op::GroupedLinear { num_experts: 8 }, &grouped);
    b.op1(Op::PromotedGemm { form: GemmForm::Grouped { num_experts: 8 }, k_block: 32 }, &grouped);
    let combined = b.op1(Op::MoeCombine { top_k: 2 }, &[y, d[2], route[0]]);
    let dy = b.op(Op::MoeCombineGrad { top_k: 2 }, &[combined, y, d[2], route[0]]);
    b.op(Op::GroupedLinearWgrad { num_experts: 8 }, &[d[0], d[1], dy[0]]);

    b.scope(None);
    let mut body = Builder::new("rms_quant");
    let bx = body.input("x", "f32[B, T, 64]");
    body.scope(Some("inside"));
    let sq = body.op1(Op::Binary(BinaryOp::Mul), &[bx, bx]);
    let ms = body.op1(Op::Reduce { op: ReduceOp::Mean, axes: vec![2], keep_dims: true }, &[sq]);
    let spec = QuantSpec { block: vec![1, 64], amax_floor: 1e-4, pow2_scale: false };
    let q = body.op(Op::Quantize { to: DType::F8E4M3, spec }, &[bx]);
    body.g.add_output("q", q[0]).unwrap();
    body.g.add_output("s", q[1]).unwrap();
    body.g.add_output("ms", ms).unwrap();
    let fused = b.op(Op::Fused { name: "rms_quant".into(), body: std::sync::Arc::new(body.g) }, &[xf]);
    b.op(Op::Send { peer: 1, tag: 0 }, &[fused[0]]);
    let r = b.decl(Op::Recv { peer: 0, tag: 3 }, "f32[B, T, 64]");
    let summed = b.op1(Op::AllReduce { group: "dp".into() }, &[r]);
    let gathered = b.op1(Op::AllGather { group: "dp".into(), size: 2 }, &[summed]);
    let flags = b.op1(Op::Reduce { op: ReduceOp::Max, axes: vec![2, 3], keep_dims: false }, &[gathered]);
    let exchanged = b.op1(Op::AllToAll { group: "ep".into(), size: 2 }, &[gathered, flags]);
    let returned = b.op1(Op::AllToAll { group: "ep".into(), size: 2 }, &[exchanged]);

    b.g.add_output("logits", top[0]).unwrap();
    b.g.add_output("moe", moe).unwrap();
    b.g.add_output("combined", combined).unwrap();
    b.g.add_output("received \"x\"", r).unwrap();
    b.g.add_output("summed", summed).unwrap();
    b.g.add_output("gathered", gathered).unwrap();
    b.g.add_output("returned", returned).unwrap();
    b.g
}

#[test]
fn every_op_round_trips() {
    let g = every_op_graph();
    let mut seen = [false; VARIANTS];
    for n in g.nodes() {
        seen[variant(&g.node(n).op)] = true;
    }
    let missing: Vec<usize> = (0..VARIANTS).filter(|&i| !seen[i]).collect();
    assert!(missing.is_empty(), "variants not covered: {missing:?}");
    assert_round_trip(&g);
}

#[test]
fn ids_names_and_scopes_are_kept() {
    let mut b = Builder::new("deepseek-v3 (fp8)");
    let x = b.input("x\ty \u{e9}", "f32[8*B*T]");
    b.scope(Some(""));
    let y = b.op1(Op::Unary(UnaryOp::Exp), &[x]);
    let z = b.op1(Op::Unary(UnaryOp::Neg), &[y]);
    b.scope(None);
    let w = b.op1(Op::Unary(UnaryOp::Abs), &[z]);
    b.scope(Some("s"));
    let u = b.op1(Op::Unary(UnaryOp::Abs), &[w]);
    b.g.add_output("u", u).unwrap();
    // Removing a node leaves a gap in the value ids, which the text keeps.
    b.g.remove_node(b.g.producer(u)).unwrap_err();
    let (_, dead) = b.g.add_node(Op::Unary(UnaryOp::Tanh), &[x], vec![ty("f32[8*B*T]")], None).unwrap();
    let last = b.op1(Op::Unary(UnaryOp::Exp), &[x]);
    b.g.remove_node(b.g.producer(dead[0])).unwrap();
    b.g.add_output("last", last).unwrap();
    let text = print(&b.g);
    assert!(text.starts_with("graph @\"deepseek-v3 (fp8)\" {\n"), "{text}");
    assert!(text.contains("  scope \"\"\n") && text.contains("  scope none\n"), "{text}");
    assert!(text.contains(&format!("{last} = exp %0")) && !text.contains(&dead[0].to_string()), "{text}");
    assert_round_trip(&b.g);
}

/// Parses `src` and returns `(line, col, message)` of the error.
fn error_at(src: &str) -> (usize, usize, String) {
    let e = parse(src).expect_err("the source must not parse");
    let d = e.diagnostic();
    (d.line, d.col, d.message.clone())
}

#[test]
fn errors_point_at_the_offending_token() {
    let head = "graph @g {\n  %0 = input {name = \"x\"} : f32[B, T]\n";
    let at = |line: &str| error_at(&format!("{head}{line}\n}}\n"));
    assert_eq!(
        at("  %1 = exp"),
        (3, 11, "expected `:` and the result types, found the end of the line".into())
    );
    assert_eq!(
        at("  %1 = exp %0 : f32[B, T] junk"),
        (3, 27, "expected the end of the line, found `junk`".into())
    );
    assert_eq!(
        at("  %1, %2 = topk %0 {k = 2, x = 1} : f32[B, 2], i32[B, 2]"),
        (3, 28, "`topk` has no attribute `x`".into())
    );
    assert_eq!(at("  %1 = softmax %0 : f32[B, T]"), (3, 8, "`softmax` needs the attribute `axis`".into()));
    assert_eq!(
        at("  %1 = exp %0 : f32[B, T]\n  %2 = exp %1 : f32[T, B]"),
        (4, 17, "result type f32[T, B] does not match the inferred f32[B, T]".into())
    );
    assert_eq!(
        at("  %1 = reshape %0 {shape = [B, 2.5]} : f32[B, T]").2,
        "attribute `shape` of `reshape` must be a list of dimensions, found `2.5`"
    );
    assert_eq!(at("  %0 = exp %0 : f32[B, T]"), (3, 3, "value %0 is already defined".into()));
    assert_eq!(at("  exp %0"), (3, 3, "`exp` has 1 result, found no results".into()));
    assert_eq!(error_at("graph @g {\n}\n}\n"), (3, 1, "unexpected `}` after the end of the graph".into()));
    assert_eq!(error_at("graph @g { %0 = exp\n}\n").2, "expected the end of the line, found `%0`");
    assert_eq!(error_at(""), (1, 1, "expected `graph @<name> {`, found the end of the file".into()));
}

#[test]
fn comments_and_blank_lines_are_ignored() {
    let src = "// header\ngraph @g { // the graph\n\n  %3 = input {name = \"x\"} : f32[] // a scalar\n  output \"x\" = %3\n}\n// end\n";
    let g = parse(src).unwrap();
    assert_eq!(print(&g), "graph @g {\n  %3 = input {name = \"x\"} : f32[]\n  output \"x\" = %3\n}\n");
}

/// A graph of `levels` fused kernels, each the only node of the one around it.
fn nested_kernels(levels: usize) -> String {
    let mut text = String::from("graph @g {\n  %0 = input {name = \"x\"} : f32[4]\n");
    for _ in 0..levels {
        text += "  %1 = fused %0 {name = \"k\"} : f32[4] {\n  %0 = input {name = \"x\"} : f32[4]\n";
    }
    text += "  output \"y\" = %0\n";
    for _ in 0..levels {
        text += "  }\n  output \"y\" = %1\n";
    }
    text + "}\n"
}

#[test]
fn nesting_is_limited() {
    let g = parse(&nested_kernels(16)).unwrap();
    assert_round_trip(&g);
    assert_eq!(error_at(&nested_kernels(17)), (35, 8, "fused kernels nest more than 16 deep".into()));
    let deep = format!(
        "graph @g {{\n  %0 = input {{name = \"x\"}} : f32[4]\n  %1 = reshape %0 {{shape = {}4{}}} : f32[4]\n}}\n",
        "[".repeat(100),
        "]".repeat(100)
    );
    assert_eq!(error_at(&deep), (3, 44, "lists nest more than 16 deep".into()));
}

/// Dimensions the random graphs are built from: constants, symbols and monomials.
pub(super) fn dim_pool() -> Vec<Dim> {
    ["B", "T", "S", "1", "2", "4", "6", "8", "2*B", "B*T"].iter().map(|s| Dim::parse(s).unwrap()).collect()
}

/// Interprets random numbers as a graph: chains of unary, binary, reshape, concat, split and topk ops
/// over the live values, with scope changes and node removals. Steps whose op does not infer are
/// skipped, so every graph is valid.
fn random_graph(inputs: &[(bool, Vec<u8>)], steps: &[(u8, u16, u16)], outputs: &[u16]) -> Graph {
    let dims = dim_pool();
    let scopes = [None, Some("model.layers.0"), Some("model.layers.1.mlp"), Some("a \"quoted\"\\scope")];
    let mut b = Builder::new("random");
    let mut live: Vec<ValueId> = Vec::new();
    for (i, (bf16, shape)) in inputs.iter().enumerate() {
        let shape: Vec<Dim> = shape.iter().map(|&d| dims[d as usize % dims.len()]).collect();
        let dtype = if *bf16 { DType::BF16 } else { DType::F32 };
        let t = TensorType::new(dtype, shape);
        live.push(b.g.add_node(Op::Input { name: format!("in{i}") }, &[], vec![t], None).unwrap().1[0]);
    }
    let inputs_end = live.len();
    for &(kind, a, c) in steps {
        let (a, c) = (a as usize, c as usize);
        let v = live[a % live.len()];
        match kind % 8 {
            6 => b.scope(scopes[c % scopes.len()]),
            7 if a % live.len() >= inputs_end => {
                // Dead nodes go, leaving gaps in the value ids.
                let node = b.g.producer(v);
                let results = b.g.node(node).results.clone();
                if b.g.remove_node(node).is_ok() {
                    live.retain(|r| !results.contains(r));
                }
            }
            _ => {
                let Some((op, ins)) = random_op(kind, c, v, b.g.ty(v), live[c % live.len()]) else {
                    continue;
                };
                if let Ok(tys) = infer::infer_node(&b.g, &op, &ins) {
                    let (_, results) = b.g.add_node(op, &ins, tys, b.scope.as_deref()).unwrap();
                    live.extend(results);
                }
            }
        }
    }
    for (i, &o) in outputs.iter().enumerate() {
        b.g.add_output(format!("out{i}"), live[o as usize % live.len()]).unwrap();
    }
    b.g
}

/// The op of a random step applied to `v` of type `t` (and `other` for binary ops and concat); `None`
/// when the step does not apply to this shape. Shape inference decides the rest.
fn random_op(kind: u8, c: usize, v: ValueId, t: &TensorType, other: ValueId) -> Option<(Op, Vec<ValueId>)> {
    let rank = t.rank();
    match kind % 8 {
        0 => Some((Op::Unary(UnaryOp::ALL[c % UnaryOp::ALL.len()]), vec![v])),
        1 => Some((Op::Binary(BinaryOp::ALL[c % BinaryOp::ALL.len()]), vec![v, other])),
        2 if rank >= 2 && c % 2 == 0 => {
            // Merge the first two dimensions.
            let mut shape = vec![t.shape[0].checked_mul(t.shape[1])?];
            shape.extend_from_slice(&t.shape[2..]);
            Some((Op::Reshape { shape }, vec![v]))
        }
        2 if rank >= 1 => {
            // Split an even constant dimension in two.
            let axis = c % rank;
            let n = t.shape[axis].as_known().filter(|n| n % 2 == 0 && *n > 0)?;
            let mut shape = t.shape.clone();
            shape.splice(axis..=axis, [Dim::known(2), Dim::known(n / 2)]);
            Some((Op::Reshape { shape }, vec![v]))
        }
        3 if rank >= 1 => Some((Op::Concat { axis: c % rank }, vec![v, other, v])),
        4 if rank >= 1 => {
            let axis = c % rank;
            let n = t.shape[axis].as_known().filter(|&n| n >= 2)?;
            let first = 1 + c as u64 % (n - 1);
            Some((Op::Split { axis, sizes: vec![first, n - first] }, vec![v]))
        }
        5 if rank >= 1 => {
            let n = t.shape[rank - 1].as_known().unwrap_or(4).max(1);
            Some((Op::TopK { k: 1 + c as u64 % n }, vec![v]))
        }
        _ => None,
    }
}

pub(super) fn graph_strategy() -> impl Strategy<Value = Graph> {
    (
        prop::collection::vec((any::<bool>(), prop::collection::vec(0u8..10, 0..4)), 1..4),
        prop::collection::vec((0u8..8, any::<u16>(), any::<u16>()), 0..80),
        prop::collection::vec(any::<u16>(), 0..4),
    )
        .prop_map(|(inputs, steps, outputs)| random_graph(&inputs, &steps, &outputs))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn random_graphs_round_trip(g in graph_strategy()) {
        let text = print(&g);
        let back = parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert!(back == g, "round trip changed the graph:\n{}\n{}", text, print(&back));
        prop_assert_eq!(print(&back), text);
    }
}

/// 64 MoE layers with 256 experts each (768 expert parameters and one `moe_experts` with 771 operands
/// per layer, as in DeepSeek-V3's 58), about 50,000 nodes: the text format must stay linear at this
/// size.
#[test]
fn a_deepseek_sized_graph_round_trips() {
    let mut b = Builder::new("moe_64x256");
    let mut x = b.input("x", "bf16[B*T, 16]");
    for layer in 0..64 {
        let p = format!("model.layers.{layer}.mlp");
        b.scope(Some(&p));
        let gate = b.param(&format!("{p}.gate.weight"), "bf16[256, 16]");
        let logits = b.op1(Op::Linear, &[x, gate]);
        let logits = b.op1(Op::Cast { to: DType::F32 }, &[logits]);
        let router = Router {
            num_experts: 256,
            top_k: 8,
            scoring: Scoring::Sigmoid,
            num_groups: 8,
            topk_groups: 4,
            group_score: GroupScore::Top2Sum,
            normalize: true,
            scaling: 2.5,
        };
        let route = b.op(Op::MoeRoute(router), &[logits]);
        let mut ins = vec![x, route[0], route[1]];
        for e in 0..256 {
            for (w, t) in [("gate", "bf16[4, 16]"), ("up", "bf16[4, 16]"), ("down", "bf16[16, 4]")] {
                ins.push(b.param(&format!("{p}.experts.{e}.{w}_proj.weight"), t));
            }
        }
        let y = b.op1(Op::MoeExperts { num_experts: 256 }, &ins);
        x = b.op1(Op::Binary(BinaryOp::Add), &[x, y]);
    }
    b.g.add_output("y", x).unwrap();
    assert!(b.g.node_count() > 49_000);
    assert_round_trip(&b.g);
}

fn every_op_text() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| print(&every_op_graph()))
}

proptest! {
    /// Mangled text is an error or a graph, never a panic, and whatever parses round-trips.
    #[test]
    fn mangled_text_parses_or_fails_cleanly(
        edits in prop::collection::vec(
            (any::<prop::sample::Index>(), 0u8..3, prop::sample::select(&[
                '%', '0', '1', '9', 'B', 'T', 'x', '*', '-', '.', 'e', '[', ']', '{', '}', '=', ',', ':',
                '"', '\\', ' ', '\n', '/', '@', 'é',
            ][..])),
            1..6,
        )
    ) {
        let mut text: Vec<char> = every_op_text().chars().collect();
        for (at, kind, c) in edits {
            let i = at.index(text.len() + 1);
            match kind {
                0 => text.insert(i, c),
                _ if i == text.len() => {}
                1 => {
                    text.remove(i);
                }
                _ => text[i] = c,
            }
        }
        let text: String = text.into_iter().collect();
        if let Ok(g) = parse(&text) {
            let printed = print(&g);
            let back = parse(&printed).map_err(|e| TestCaseError::fail(format!("{e}\n{printed}")))?;
            prop_assert!(back == g, "{}", printed);
        }
    }
}

/// A collective, and the node that only makes its operand, run as soon as they are ready; the
/// rest keeps insertion order, and a graph without collectives is in insertion order.
#[test]
fn collectives_are_ordered_as_early_as_they_can_start() {
    let text = |sum: bool| {
        let tail = if sum {
            "  %5 = add %1, %1 : f32[4]\n  %6 = all_reduce %5 {group = \"dp\"} : f32[4]\n  output \"s\" = %6\n"
        } else {
            ""
        };
        format!(
            "graph @g {{\n  %0 = input {{name = \"x\"}} : f32[4]\n  %1 = exp %0 : f32[4]\n  %2 = exp %1 : f32[4]\n  \
             %3 = exp %2 : f32[4]\n  %4 = exp %3 : f32[4]\n{tail}  output \"y\" = %4\n}}\n"
        )
    };
    let order = |g: &Graph| -> Vec<String> {
        g.nodes().into_iter().map(|n| g.node(n).results[0].to_string()).collect()
    };
    let g = parse(&text(true)).unwrap();
    assert_eq!(order(&g), ["%0", "%1", "%5", "%6", "%2", "%3", "%4"]);
    let g = parse(&text(false)).unwrap();
    assert_eq!(order(&g), ["%0", "%1", "%2", "%3", "%4"]);
}
