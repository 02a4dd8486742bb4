//! The MoE router, expert evaluation, and dispatch / grouped linear / combine.

use super::*;

fn sigmoid(x: f32) -> f32 {
    (1.0 / (1.0 + (-(x as f64)).exp())) as f32
}

/// A router over `E` experts with the given attributes; `bias` adds the bias operand.
fn route(e: usize, k: usize, attrs: &str, logits: &[f32], bias: Option<&[f32]>) -> (Vec<f32>, Vec<i64>) {
    let (bias_decl, bias_use) = match bias {
        Some(_) => (format!("  %1 = input {{name = \"bias\"}} : f32[{e}]\n"), ", %1"),
        None => (String::new(), ""),
    };
    let src = format!(
        "graph @r {{\n  %0 = input {{name = \"logits\"}} : f32[T, {e}]\n{bias_decl}  %2, %3 = moe_route %0{bias_use} {{num_experts = {e}, top_k = {k}, {attrs}}} : f32[T, {k}], i32[T, {k}]\n  output \"w\" = %2\n  output \"i\" = %3\n}}\n"
    );
    let mut inputs = vec![("logits", f32s(&[1, e as u64], logits))];
    if let Some(b) = bias {
        inputs.push(("bias", f32s(&[e as u64], b)));
    }
    let out = run_kir(&src, inputs, vec![]).unwrap_or_else(|err| panic!("{err}"));
    (vals(&out["w"]), out["i"].as_i64().unwrap().to_vec())
}

const V3: &str = "scoring = sigmoid, num_groups = 4, topk_groups = 2, group_score = top2_sum, normalize = true, scaling = 2.5";
const FLAT: &str = "scoring = sigmoid, num_groups = 1, topk_groups = 1, group_score = top2_sum, normalize = true, scaling = 2.5";

#[test]
fn group_limiting_changes_the_choice() {
    // Groups {0,1} {2,3} {4,5} {6,7}. Expert 0 is the best single expert, but its group's top-2 sum
    // (s0 + s1) loses to groups 1 and 2, so only experts 2..=5 are eligible.
    let logits = [3.0, -5.0, 1.0, 1.1, 0.9, 0.9, -3.0, -3.0];
    let s: Vec<f32> = logits.iter().map(|&l| sigmoid(l)).collect();
    let (w, i) = route(8, 2, V3, &logits, Some(&[0.0; 8]));
    assert_eq!(i, [3, 2]);
    let z = s[3] + s[2] + 1e-20;
    assert_close(&w, &[s[3] / z * 2.5, s[2] / z * 2.5], 1e-6);
    // Without groups the best two experts overall win.
    let (w, i) = route(8, 2, FLAT, &logits, Some(&[0.0; 8]));
    assert_eq!(i, [0, 3]);
    assert_close(&w, &[s[0] / (s[0] + s[3]) * 2.5, s[3] / (s[0] + s[3]) * 2.5], 1e-6);
}

#[test]
fn the_bias_changes_selection_but_not_weights() {
    let logits = [2.0, 1.0, 0.0, -1.0];
    let s: Vec<f32> = logits.iter().map(|&l| sigmoid(l)).collect();
    let attrs = "scoring = sigmoid, num_groups = 1, topk_groups = 1, group_score = top2_sum, normalize = false, scaling = 1.0";
    let (w, i) = route(4, 2, attrs, &logits, Some(&[0.0, 0.0, 0.5, 0.0]));
    // Selection scores [0.88, 0.73, 1.0, 0.27]: expert 2 is chosen first, weighted by s2 = 0.5.
    assert_eq!(i, [2, 0]);
    assert_eq!(w, [s[2], s[0]]);
    let (w, i) = route(4, 2, attrs, &logits, Some(&[0.0; 4]));
    assert_eq!(i, [0, 1]);
    assert_eq!(w, [s[0], s[1]]);
}

#[test]
fn dropped_groups_are_masked_to_minus_infinity() {
    // Every selection score is negative (bias -1). The kept group {0,1} must still provide both
    // experts: with a 0.0 mask (old HF remote code) the dropped group's experts would win instead.
    let attrs = "scoring = sigmoid, num_groups = 2, topk_groups = 1, group_score = top2_sum, normalize = true, scaling = 1.0";
    let (_, i) = route(4, 2, attrs, &[2.0, 1.5, 0.0, -1.0], Some(&[-1.0; 4]));
    assert_eq!(i, [0, 1]);
}

#[test]
fn softmax_scoring_with_max_groups() {
    // DeepSeek-V2's group_limited_greedy: softmax scores, group score = max, no renormalisation.
    let logits = [0.0, 2.0, 1.9, 1.8, -1.0, 0.5];
    let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
    let p: Vec<f32> = logits.iter().map(|&l| ((l as f64).exp() / z) as f32).collect();
    let attrs = "scoring = softmax, num_groups = 3, topk_groups = 2, group_score = max, normalize = false, scaling = 16.0";
    let (w, i) = route(6, 3, attrs, &logits, None);
    // Group maxima: {0,1} -> 2.0, {2,3} -> 1.9, {4,5} -> 0.5; experts 0..=3 are eligible.
    assert_eq!(i, [1, 2, 3]);
    assert_close(&w, &[p[1] * 16.0, p[2] * 16.0, p[3] * 16.0], 1e-6);
}

/// `moe_experts` next to the dispatch / grouped linear / combine lowering of the same experts.
fn moe_src(dtype: &str, n: usize, d: usize, e: usize, k: usize, inter: usize) -> String {
    let mut s = format!(
        "graph @moe {{\n  %0 = input {{name = \"x\"}} : {dtype}[{n}, {d}]\n  %1 = input {{name = \"w\"}} : f32[{n}, {k}]\n  %2 = input {{name = \"idx\"}} : i32[{n}, {k}]\n"
    );
    let mut v = 3;
    let mut experts = Vec::new();
    let (mut gates, mut ups, mut downs) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..e {
        for (name, shape, list) in [
            ("gate", format!("{inter}, {d}"), &mut gates),
            ("up", format!("{inter}, {d}"), &mut ups),
            ("down", format!("{d}, {inter}"), &mut downs),
        ] {
            s += &format!("  %{v} = param {{name = \"{name}{i}\"}} : {dtype}[{shape}]\n");
            experts.push(format!("%{v}"));
            list.push(format!("%{v}"));
            v += 1;
        }
    }
    let rows = n * k;
    let (gates, ups, downs) = (gates.join(", "), ups.join(", "), downs.join(", "));
    s += &format!(
        "  %100 = moe_experts %0, %1, %2, {} {{num_experts = {e}}} : {dtype}[{n}, {d}]\n",
        experts.join(", ")
    );
    s += &format!("  %101, %102, %103 = moe_dispatch %0, %2 {{num_experts = {e}, top_k = {k}, ep_size = 1}} : {dtype}[{rows}, {d}], i32[{}], i32[{rows}]\n", e + 1);
    s += &format!(
        "  %104 = grouped_linear %101, %102, {gates} {{num_experts = {e}}} : {dtype}[{rows}, {inter}]\n"
    );
    s += &format!("  %105 = silu %104 : {dtype}[{rows}, {inter}]\n");
    s += &format!(
        "  %106 = grouped_linear %101, %102, {ups} {{num_experts = {e}}} : {dtype}[{rows}, {inter}]\n"
    );
    s += &format!("  %107 = mul %105, %106 : {dtype}[{rows}, {inter}]\n");
    s += &format!(
        "  %108 = grouped_linear %107, %102, {downs} {{num_experts = {e}}} : {dtype}[{rows}, {d}]\n"
    );
    s += &format!("  %109 = moe_combine %108, %103, %1 {{top_k = {k}}} : {dtype}[{n}, {d}]\n");
    s += "  output \"experts\" = %100\n  output \"combined\" = %109\n  output \"offsets\" = %102\n  output \"perm\" = %103\n}\n";
    s
}

/// Named inputs and named parameters of a test graph.
type Feeds = (Vec<(&'static str, Tensor)>, Vec<(String, Tensor)>);

/// Random inputs and expert weights for [`moe_src`]; each token picks `k` distinct experts.
fn moe_data(rng: &mut Rng, dtype: DType, n: usize, d: usize, e: usize, k: usize, inter: usize) -> Feeds {
    let t = |shape: &[u64], v: Vec<f32>| Tensor::from_f32(dtype, shape, v).unwrap();
    let mut idx = Vec::new();
    for _ in 0..n {
        let mut pool: Vec<i64> = (0..e as i64).collect();
        for _ in 0..k {
            idx.push(pool.remove(rng.below(pool.len() as u64) as usize));
        }
    }
    let w: Vec<f32> = (0..n * k).map(|_| rng.uniform(0.5) + 0.6).collect();
    let inputs = vec![
        ("x", t(&[n as u64, d as u64], rng.vec(n * d, 1.0))),
        ("w", f32s(&[n as u64, k as u64], &w)),
        ("idx", i32s(&[n as u64, k as u64], &idx)),
    ];
    let mut params = Vec::new();
    for i in 0..e {
        params.push((format!("gate{i}"), t(&[inter as u64, d as u64], rng.vec(inter * d, 0.5))));
        params.push((format!("up{i}"), t(&[inter as u64, d as u64], rng.vec(inter * d, 0.5))));
        params.push((format!("down{i}"), t(&[d as u64, inter as u64], rng.vec(d * inter, 0.5))));
    }
    (inputs, params)
}

#[test]
fn dispatch_grouped_linear_and_combine_equal_moe_experts() {
    let (n, d, e, k, inter) = (7, 8, 5, 3, 6);
    for (dtype, name) in [(DType::F32, "f32"), (DType::BF16, "bf16")] {
        let mut rng = Rng(42);
        let (inputs, params) = moe_data(&mut rng, dtype, n, d, e, k, inter);
        let params: Vec<(&str, Tensor)> = params.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let out = run_kir(&moe_src(name, n, d, e, k, inter), inputs, params).unwrap();
        // Same roundings in the same order: bit-identical, not merely close.
        assert_eq!(vals(&out["experts"]), vals(&out["combined"]), "{name}");
        let offsets = out["offsets"].as_i64().unwrap();
        assert_eq!((offsets[0], offsets[e]), (0, (n * k) as i64));
    }
}

#[test]
fn moe_experts_matches_a_hand_loop() {
    let (n, d, e, k, inter) = (3, 4, 3, 2, 2);
    let mut rng = Rng(9);
    let (inputs, params) = moe_data(&mut rng, DType::F32, n, d, e, k, inter);
    let get = |name: &str| vals(&params.iter().find(|(p, _)| p == name).unwrap().1);
    let (x, w, idx) = (vals(&inputs[0].1), vals(&inputs[1].1), inputs[2].1.as_i64().unwrap().to_vec());
    let mut want = vec![0.0f32; n * d];
    for t in 0..n {
        for s in 0..k {
            let ex = idx[t * k + s];
            let (g, u, dn) = (get(&format!("gate{ex}")), get(&format!("up{ex}")), get(&format!("down{ex}")));
            let h: Vec<f32> = (0..inter)
                .map(|j| {
                    let gj: f32 = (0..d).map(|i| x[t * d + i] * g[j * d + i]).sum();
                    let uj: f32 = (0..d).map(|i| x[t * d + i] * u[j * d + i]).sum();
                    gj * sigmoid(gj) * uj
                })
                .collect();
            for o in 0..d {
                let y: f32 = (0..inter).map(|j| h[j] * dn[o * inter + j]).sum();
                want[t * d + o] += w[t * k + s] * y;
            }
        }
    }
    let params: Vec<(&str, Tensor)> = params.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let out = run_kir(&moe_src("f32", n, d, e, k, inter), inputs, params).unwrap();
    assert_close(&vals(&out["experts"]), &want, 1e-5);
}

#[test]
fn dispatch_sorts_slots_by_expert() {
    let src = r#"graph @d {
  %0 = input {name = "x"} : f32[3, 1]
  %1 = input {name = "idx"} : i32[3, 2]
  %2, %3, %4 = moe_dispatch %0, %1 {num_experts = 3, top_k = 2, ep_size = 1} : f32[6, 1], i32[4], i32[6]
  output "rows" = %2
  output "offsets" = %3
  output "perm" = %4
}
"#;
    let x = f32s(&[3, 1], &[10.0, 11.0, 12.0]);
    // Slots: 0 -> e1, 1 -> e0, 2 -> e0, 3 -> e2, 4 -> e2, 5 -> e1.
    let out =
        run_kir(src, vec![("x", x.clone()), ("idx", i32s(&[3, 2], &[1, 0, 0, 2, 2, 1]))], vec![]).unwrap();
    assert_eq!(out["perm"].as_i64().unwrap(), [1, 2, 0, 5, 3, 4]);
    assert_eq!(out["offsets"].as_i64().unwrap(), [0, 2, 4, 6]);
    assert_eq!(vals(&out["rows"]), [10.0, 11.0, 10.0, 12.0, 11.0, 12.0]);
    // Index 3 (= E) is no expert: its slots (3 and 0) go last, past offsets[3], in slot order.
    let none = i32s(&[3, 2], &[3, 0, 0, 3, 2, 1]);
    let out = run_kir(src, vec![("x", x.clone()), ("idx", none)], vec![]).unwrap();
    assert_eq!(out["perm"].as_i64().unwrap(), [1, 2, 5, 4, 0, 3]);
    assert_eq!(out["offsets"].as_i64().unwrap(), [0, 2, 3, 4]);
    assert_eq!(vals(&out["rows"]), [10.0, 11.0, 12.0, 12.0, 10.0, 11.0]);
    let err = run_kir(src, vec![("x", x), ("idx", i32s(&[3, 2], &[1, 0, 0, 4, 2, 1]))], vec![]).unwrap_err();
    assert_eq!(err.to_string(), "%2 = moe_dispatch: expert index 4 is out of range 0..4");
}

#[test]
fn slots_of_no_expert_add_nothing() {
    // Some slots carry index E (an expert-parallel rank's slot of another rank's expert): both
    // forms skip them, and agree with the experts of the other slots alone.
    let (n, d, e, k, inter) = (6, 8, 4, 3, 5);
    let mut rng = Rng(7);
    let (mut inputs, params) = moe_data(&mut rng, DType::F32, n, d, e, k, inter);
    let idx = inputs[2].1.as_i64().unwrap().to_vec();
    let w = vals(&inputs[1].1);
    let none: Vec<i64> =
        idx.iter().enumerate().map(|(s, &i)| if s % 3 == 1 { e as i64 } else { i }).collect();
    let kept: Vec<f32> = w.iter().enumerate().map(|(s, &v)| if s % 3 == 1 { 0.0 } else { v }).collect();
    inputs[2].1 = i32s(&[n as u64, k as u64], &none);
    let params: Vec<(&str, Tensor)> = params.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let out = run_kir(&moe_src("f32", n, d, e, k, inter), inputs.clone(), params.clone()).unwrap();
    assert_eq!(vals(&out["experts"]), vals(&out["combined"]));
    let offsets = out["offsets"].as_i64().unwrap();
    assert_eq!(offsets[e], (n * k - n) as i64, "one slot of each token has no expert");
    // The same tokens with those slots at their own experts and weight 0.
    inputs[1].1 = f32s(&[n as u64, k as u64], &kept);
    inputs[2].1 = i32s(&[n as u64, k as u64], &idx);
    let zeroed = run_kir(&moe_src("f32", n, d, e, k, inter), inputs, params).unwrap();
    assert_close(&vals(&out["experts"]), &vals(&zeroed["experts"]), 1e-6);
}

#[test]
fn dispatch_checks_the_group_limit() {
    // Groups {0, 1} and {2, 3}; each token's experts must lie in one group.
    let src = r#"graph @d {
  %0 = input {name = "x"} : f32[2, 1]
  %1 = input {name = "idx"} : i32[2, 2]
  %2, %3, %4 = moe_dispatch %0, %1 {num_experts = 4, top_k = 2, ep_size = 2, num_groups = 2, topk_groups = 1} : f32[4, 1], i32[5], i32[4]
  output "offsets" = %3
}
"#;
    let x = f32s(&[2, 1], &[1.0, 2.0]);
    let out = run_kir(src, vec![("x", x.clone()), ("idx", i32s(&[2, 2], &[0, 1, 3, 2]))], vec![]).unwrap();
    assert_eq!(out["offsets"].as_i64().unwrap(), [0, 1, 2, 3, 4]);
    let err = run_kir(src, vec![("x", x), ("idx", i32s(&[2, 2], &[0, 1, 1, 2]))], vec![]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "%2 = moe_dispatch: token 1 has experts in 2 groups, more than topk_groups = 1"
    );
}
