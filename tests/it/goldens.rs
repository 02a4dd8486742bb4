//! The reference interpreter against Hugging Face transformers: the golden data in `tests/goldens/`
//! (made by `tools/goldens/make_goldens.py`; versions in `tools/goldens/README.md`).
//!
//! Each model case is a tiny random DeepSeek model saved by transformers: its `config.json` goes through
//! `kiln import-hf`'s loader, its `model.safetensors` through the runtime's checkpoint reader, and the
//! graph kiln builds is run by `kiln_ir::interp`. Tolerances: logits and hidden states within 1e-4 max
//! abs (f32 throughout; measured differences are reported on failure), routing weights within 1e-5,
//! expert choices and the greedy continuation identical.
//!
//! `v3_tiny_mtp` adds a multi-token-prediction module (layer 3, under DeepSeek-V3's checkpoint names,
//! including the copies of the shared embedding and head) whose golden logits come from transformers'
//! generic `MtpModel`; its `golden.json` `mtp` section records the conventions they pin.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kiln_compiler::{build, spec};
use kiln_ir::interp::{self, Tensor};
use kiln_ir::{DType, Graph, Op, ValueId};
use kiln_runtime::weights::{self, HostData, HostTensor};

fn golden_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goldens").join(case)
}

fn to_tensor(t: HostTensor) -> Tensor {
    match t.data {
        HostData::F32(v) => Tensor::from_f32(t.dtype, t.shape, v).unwrap(),
        HostData::I64(v) => Tensor::from_i64(t.dtype, t.shape, v).unwrap(),
    }
}

fn f32s(t: &HostTensor) -> &[f32] {
    match &t.data {
        HostData::F32(v) => v,
        HostData::I64(_) => panic!("{} is not a float tensor", t.name),
    }
}

fn i64s(t: &HostTensor) -> &[i64] {
    match &t.data {
        HostData::I64(v) => v,
        HostData::F32(_) => panic!("{} is not an integer tensor", t.name),
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

struct Case {
    graph: Graph,
    params: HashMap<String, Tensor>,
    golden: weights::Checkpoint,
    json: serde_json::Value,
    layers: u64,
    /// MTP depth, if the spec has MTP modules.
    mtp: Option<u64>,
}

fn load_case(case: &str) -> Case {
    let dir = golden_dir(case);
    let spec = spec::load(&dir.join("config.json")).unwrap_or_else(|e| panic!("{case}: {e}"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    // Only the MTP case has an MTP module (and an `mtp` section); the graph gets one exactly then.
    assert_eq!(spec.mtp.is_some(), json.get("mtp").is_some(), "{case}: MTP in config.json vs golden.json");
    let graph = build::build_graph(&spec).unwrap();
    let ckpt = weights::open_checkpoint(&dir).unwrap();
    let params = weights::bind(&graph, &ckpt)
        .unwrap_or_else(|e| panic!("{case}: {e}"))
        .into_iter()
        .map(|t| (t.name.clone(), to_tensor(t)))
        .collect();
    let golden = weights::open_checkpoint(&dir.join("golden.safetensors")).unwrap();
    Case {
        graph,
        params,
        golden,
        json,
        layers: spec.model.num_hidden_layers,
        mtp: spec.mtp.map(|m| m.num_layers),
    }
}

fn token_inputs(rows: &[Vec<i64>]) -> HashMap<String, Tensor> {
    let (b, t) = (rows.len() as u64, rows[0].len() as u64);
    let tokens: Vec<i64> = rows.iter().flatten().copied().collect();
    let positions: Vec<i64> = (0..b).flat_map(|_| 0..t as i64).collect();
    HashMap::from([
        ("tokens".to_string(), Tensor::from_i64(DType::I32, [b, t], tokens).unwrap()),
        ("positions".to_string(), Tensor::from_i64(DType::I32, [b, t], positions).unwrap()),
    ])
}

/// The residual stream after each decoder layer: the last `add` of scope `model.layers.{i}`.
fn layer_outputs(g: &Graph, layers: u64) -> Vec<ValueId> {
    (0..layers)
        .map(|i| {
            let scope = format!("model.layers.{i}");
            let node = g
                .nodes()
                .into_iter()
                .rev()
                .find(|&n| {
                    g.node(n).scope.as_deref() == Some(scope.as_str())
                        && matches!(g.node(n).op, Op::Binary(kiln_ir::BinaryOp::Add))
                })
                .unwrap_or_else(|| panic!("no residual add in {scope}"));
            g.node(node).results[0]
        })
        .collect()
}

/// `(layer, weights, indices)` of every router.
fn routers(g: &Graph) -> Vec<(u64, ValueId, ValueId)> {
    g.nodes()
        .into_iter()
        .filter(|&n| matches!(g.node(n).op, Op::MoeRoute(_)))
        .map(|n| {
            let scope = g.node(n).scope.as_deref().unwrap();
            let layer = scope.split('.').nth(2).unwrap().parse().unwrap();
            (layer, g.node(n).results[0], g.node(n).results[1])
        })
        .collect()
}

fn input_ids(json: &serde_json::Value) -> Vec<Vec<i64>> {
    json["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect())
        .collect()
}

fn check_forward(case: &str) {
    let c = load_case(case);
    let ids = input_ids(&c.json);
    let watched_layers = layer_outputs(&c.graph, c.layers);
    let watched_routers = routers(&c.graph);
    let mut seen: HashMap<ValueId, Tensor> = HashMap::new();
    let out = interp::run_with(&c.graph, &token_inputs(&ids), &c.params, &mut |v, t| {
        if watched_layers.contains(&v) || watched_routers.iter().any(|r| r.1 == v || r.2 == v) {
            seen.insert(v, t.clone());
        }
    })
    .unwrap_or_else(|e| panic!("{case}: {e}"));

    let logits = c.golden.read("logits").unwrap();
    let diff = max_abs_diff(out["logits"].as_f32().unwrap(), f32s(&logits));
    assert!(diff <= 1e-4, "{case}: logits differ from transformers by up to {diff:e}");
    eprintln!("{case}: logits max abs diff vs transformers {diff:e}");

    for (i, v) in watched_layers.iter().enumerate() {
        let want = c.golden.read(&format!("layer_output.{i}")).unwrap();
        let diff = max_abs_diff(seen[v].as_f32().unwrap(), f32s(&want));
        assert!(diff <= 1e-4, "{case}: output of layer {i} differs by up to {diff:e}");
    }

    assert!(!watched_routers.is_empty(), "{case}: no MoE layer");
    for &(layer, w, idx) in &watched_routers {
        let want_idx = c.golden.read(&format!("router.{layer}.indices_sorted")).unwrap();
        let want_w = c.golden.read(&format!("router.{layer}.weights_sorted")).unwrap();
        let k = want_idx.shape[1] as usize;
        let got_idx = seen[&idx].as_i64().unwrap();
        let got_w = seen[&w].as_f32().unwrap();
        for (t, (want_i, want_wt)) in i64s(&want_idx).chunks(k).zip(f32s(&want_w).chunks(k)).enumerate() {
            let mut pairs: Vec<(i64, f32)> = got_idx[t * k..(t + 1) * k]
                .iter()
                .copied()
                .zip(got_w[t * k..(t + 1) * k].iter().copied())
                .collect();
            pairs.sort_by_key(|p| p.0);
            let got_i: Vec<i64> = pairs.iter().map(|p| p.0).collect();
            assert_eq!(got_i, want_i, "{case}: layer {layer}, token {t}: experts differ");
            for (p, want) in pairs.iter().zip(want_wt) {
                assert!(
                    (p.1 - want).abs() <= 1e-5,
                    "{case}: layer {layer}, token {t}: weight {} vs {want}",
                    p.1
                );
            }
        }
    }
}

/// Greedy decoding by full recomputation: eight argmax steps from the first prompt, eos or not
/// (the goldens disable stopping at eos).
fn check_continuation(case: &str) {
    let c = load_case(case);
    let cont = &c.json["continuation"];
    let mut seq: Vec<i64> = cont["prompt"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    let want: Vec<i64> =
        cont["new_token_ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    let mut got = Vec::new();
    for _ in 0..want.len() {
        let out = interp::run(&c.graph, &token_inputs(std::slice::from_ref(&seq)), &c.params).unwrap();
        let logits = out["logits"].as_f32().unwrap();
        let vocab = *out["logits"].shape().last().unwrap() as usize;
        let last = &logits[logits.len() - vocab..];
        let next = last.iter().enumerate().fold(0, |best, (i, &x)| if x > last[best] { i } else { best });
        got.push(next as i64);
        seq.push(next as i64);
    }
    assert_eq!(got, want, "{case}: greedy continuation differs from transformers'");
}

#[test]
fn v3_with_yarn_matches_transformers() {
    check_forward("v3_tiny_yarn");
    check_continuation("v3_tiny_yarn");
}

#[test]
fn v3_without_yarn_matches_transformers() {
    check_forward("v3_tiny_rope");
    check_continuation("v3_tiny_rope");
}

#[test]
fn v2_lite_matches_transformers() {
    check_forward("v2_lite_tiny");
    check_continuation("v2_lite_tiny");
}

/// Multi-token prediction against transformers' `MtpModel`: the spec gets one MTP module from
/// `num_nextn_predict_layers`, the checkpoint binds with the MTP layer's copies of the shared embedding
/// and head, and both heads match. transformers rotates the MTP block with the positions of the embedded
/// tokens (1..9), kiln with the hidden state's (0..8); rope is relative, so the two agree to rounding
/// (golden.json `mtp.sensitivity`), far inside the tolerance, while the conventions that do matter (the
/// final-normed hidden state, embedding first, no zeroing at position 0) move the logits by over 0.2.
#[test]
fn v3_mtp_matches_transformers() {
    let case = "v3_tiny_mtp";
    let c = load_case(case);
    assert_eq!(c.mtp, Some(1), "{case}: num_nextn_predict_layers = 1 gives one MTP module");
    let has_input = |name: &str| {
        c.graph.nodes().into_iter().any(|n| matches!(&c.graph.node(n).op, Op::Input { name: i } if i == name))
    };
    assert!(has_input("mtp_tokens"), "{case}: the graph has no mtp_tokens input");
    // The MTP layer's own tensors are bound (its copies of the shared ones are explained, not bound).
    for name in ["model.layers.3.eh_proj.weight", "model.layers.3.shared_head.norm.weight"] {
        assert!(c.params.contains_key(name), "{case}: {name} is not bound");
    }
    for name in ["model.layers.3.embed_tokens.weight", "model.layers.3.shared_head.head.weight"] {
        assert!(!c.params.contains_key(name), "{case}: the copy {name} became a param");
    }

    let ids = input_ids(&c.json);
    let mtp_tokens = c.golden.read("mtp_tokens").unwrap();
    // kiln's convention, which the golden was made with: token i + 1 at position i, a filler at the end.
    let fill = c.json["mtp"]["fill_token"].as_i64().unwrap();
    let shifted: Vec<i64> = ids.iter().flat_map(|r| r[1..].iter().copied().chain([fill])).collect();
    assert_eq!(i64s(&mtp_tokens), &shifted[..], "{case}: mtp_tokens is not input_ids shifted left by one");

    let mut inputs = token_inputs(&ids);
    let [b, t] = mtp_tokens.shape[..] else { panic!("{case}: mtp_tokens is not [B, T]") };
    inputs.insert("mtp_tokens".to_string(), Tensor::from_i64(DType::I32, [b, t], shifted).unwrap());
    let out = interp::run(&c.graph, &inputs, &c.params).unwrap_or_else(|e| panic!("{case}: {e}"));

    for name in ["logits", "mtp_logits"] {
        let want = c.golden.read(name).unwrap();
        assert_eq!(out[name].shape(), &want.shape[..], "{case}: {name} shape");
        let diff = max_abs_diff(out[name].as_f32().unwrap(), f32s(&want));
        eprintln!("{case}: {name} max abs diff vs transformers {diff:e}");
        assert!(diff <= 1e-4, "{case}: {name} differ from transformers by up to {diff:e}");
    }
}

/// DeepSeek's FP8 checkpoint format (E4M3 weights with 128x128 `weight_scale_inv` blocks, partial
/// edge blocks included) dequantises bit for bit like torch.
#[test]
fn fp8_checkpoint_dequantisation_matches_torch() {
    let dir = golden_dir("fp8_dequant");
    let ckpt = weights::open_checkpoint(&dir.join("model.safetensors")).unwrap();
    let golden = weights::open_checkpoint(&dir.join("golden.safetensors")).unwrap();
    for name in ["model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.kv_b_proj.weight"] {
        let got = ckpt.read(name).unwrap();
        let want = golden.read(name).unwrap();
        assert_eq!(got.shape, want.shape);
        let same = f32s(&got).iter().zip(f32s(&want)).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{name}: dequantised values differ from torch's");
    }
}

/// The interpreter's f32 -> E4M3 conversion reproduces torch's `to(float8_e4m3fn)` on every code,
/// every tie, both sides of every tie, subnormals, overflow and specials; decoding matches on all 256
/// codes.
#[test]
fn e4m3_conversion_matches_torch_bit_for_bit() {
    let table = weights::open_checkpoint(&golden_dir("fp8_dequant").join("e4m3_table.safetensors")).unwrap();
    let inputs = table.read("inputs").unwrap();
    let codes = table.read("codes").unwrap();
    for (&x, &code) in f32s(&inputs).iter().zip(i64s(&codes)) {
        let got = interp::numerics::f8e4m3_from_f32(x);
        assert_eq!(
            got as i64,
            code,
            "f32 {x:e} ({:#010x}) -> {got:#04x}, torch gives {code:#04x}",
            x.to_bits()
        );
    }
    let all = table.read("all_codes").unwrap();
    let values = table.read("all_code_values").unwrap();
    for (&code, &want) in i64s(&all).iter().zip(f32s(&values)) {
        let got = interp::numerics::f8e4m3_to_f32(code as u8);
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "code {code:#04x}: {got} vs {want}"
        );
    }
}

/// FP8 block quantisation with ragged edges against PyTorch (`tests/goldens/fp8_quant`, from
/// `tools/goldens/make_fp8_quant.py`): activations in 1 x 128 tiles over 200 columns (a 72-wide
/// edge), with and without power-of-two scales, a weight in 128 x 128 blocks over 130 x 140, and the
/// amax floor. Every scale and every E4M3 code equal, bit for bit.
#[test]
fn fp8_quantisation_with_ragged_tiles_matches_pytorch_bit_for_bit() {
    let path = crate::util::root().join("tests/goldens/fp8_quant/golden.json");
    let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    // E4M3 from its definition: sign, 4-bit exponent with bias 7, 3-bit mantissa, subnormals.
    let decode = |code: u8| -> f32 {
        let s = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let (e, m) = ((code >> 3) & 0xF, f64::from(code & 7));
        assert!(!(e == 15 && m == 7.0), "no NaN in these cases");
        let v = if e == 0 { m / 8.0 * 2f64.powi(-6) } else { (1.0 + m / 8.0) * 2f64.powi(i32::from(e) - 7) };
        (s * v) as f32
    };
    let dims = |v: &serde_json::Value| -> Vec<u64> { serde_json::from_value(v.clone()).unwrap() };
    let text = |d: &[u64]| d.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ");
    for case in golden["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (shape, sshape, block) =
            (dims(&case["shape"]), dims(&case["scales_shape"]), dims(&case["block"]));
        let src = format!(
            "graph @q {{\n  %0 = input {{name = \"x\"}} : f32[{x}]\n  %1, %2 = quantize %0 {{to = f8e4m3, block = [{b}], \
             amax_floor = {floor}, pow2_scale = {pow2}}} : f8e4m3[{x}], f32[{s}]\n  output \"q\" = %1\n  output \"s\" = %2\n}}\n",
            x = text(&shape),
            b = text(&block),
            s = text(&sshape),
            floor = golden["amax_floor"],
            pow2 = case["pow2"],
        );
        let g = kiln_ir::parse(&src).unwrap_or_else(|e| panic!("{name}: {e}"));
        let x: Vec<f32> = serde_json::from_value(case["x"].clone()).unwrap();
        let feeds = std::collections::HashMap::from([(
            "x".to_string(),
            kiln_ir::interp::Tensor::from_f32(kiln_ir::DType::F32, shape.clone(), x).unwrap(),
        )]);
        let out = kiln_ir::interp::run(&g, &feeds, &std::collections::HashMap::new()).unwrap();
        let scales: Vec<f32> = serde_json::from_value(case["scales"].clone()).unwrap();
        let got_s = out["s"].as_f32().unwrap();
        assert_eq!(got_s.len(), scales.len(), "{name}");
        for (i, (a, b)) in got_s.iter().zip(&scales).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{name}: scale {i}: kiln {a:e}, torch {b:e}");
        }
        let codes: Vec<u8> = serde_json::from_value(case["codes"].clone()).unwrap();
        let got_q = out["q"].as_f32().unwrap();
        for (i, (a, &c)) in got_q.iter().zip(&codes).enumerate() {
            assert_eq!(
                a.to_bits(),
                decode(c).to_bits(),
                "{name}: element {i}: kiln {a:e}, torch code {c:#04x}"
            );
        }
        eprintln!("{name}: {} scales and {} codes equal PyTorch's", scales.len(), codes.len());

        // Wgrad's 128x1 tiles along the tokens are the same rule on the transposed operand: a
        // 1x128 case, transposed, pins them against PyTorch too (ragged tiles included).
        if !(shape.len() == 2 && block == [1, 128]) {
            continue;
        }
        let (m, k) = (shape[0] as usize, shape[1] as usize);
        let (sm, sk) = (sshape[0] as usize, sshape[1] as usize);
        let src = format!(
            "graph @q {{\n  %0 = input {{name = \"x\"}} : f32[{k}, {m}]\n  %1, %2 = quantize %0 {{to = f8e4m3, block = [128, 1], \
             amax_floor = {floor}, pow2_scale = {pow2}}} : f8e4m3[{k}, {m}], f32[{sk}, {sm}]\n  output \"q\" = %1\n  output \"s\" = %2\n}}\n",
            floor = golden["amax_floor"],
            pow2 = case["pow2"],
        );
        let g = kiln_ir::parse(&src).unwrap_or_else(|e| panic!("{name}, transposed: {e}"));
        let x: Vec<f32> = serde_json::from_value(case["x"].clone()).unwrap();
        let xt: Vec<f32> = (0..k * m).map(|i| x[(i % m) * k + i / m]).collect();
        let feeds = std::collections::HashMap::from([(
            "x".to_string(),
            kiln_ir::interp::Tensor::from_f32(kiln_ir::DType::F32, vec![k as u64, m as u64], xt).unwrap(),
        )]);
        let out = kiln_ir::interp::run(&g, &feeds, &std::collections::HashMap::new()).unwrap();
        let got_s = out["s"].as_f32().unwrap();
        for (i, a) in got_s.iter().enumerate() {
            let b = scales[(i % sm) * sk + i / sm];
            assert_eq!(a.to_bits(), b.to_bits(), "{name}, 128x1: scale {i}: kiln {a:e}, torch {b:e}");
        }
        let got_q = out["q"].as_f32().unwrap();
        for (i, a) in got_q.iter().enumerate() {
            let c = codes[(i % m) * k + i / m];
            assert_eq!(
                a.to_bits(),
                decode(c).to_bits(),
                "{name}, 128x1: element {i}: kiln {a:e}, torch code {c:#04x}"
            );
        }
        eprintln!(
            "{name}, transposed into 128x1 tiles: {} scales and {} codes equal PyTorch's",
            got_s.len(),
            got_q.len()
        );
    }
}
