//! Integration tests of model specs: every `models/*.toml` is valid and canonical, the Hugging Face
//! fixtures import to exactly the committed models, the numbers match the reference, every file in
//! `tests/specs/bad/` fails with a located diagnostic (snapshotted together in `bad_spec_diagnostics`),
//! and no input, however mangled, makes the loaders panic.

use std::fmt::Write;
use std::path::Path;

use kiln_compiler::spec::{import_hf, load, parse_bytes, parse_toml, to_toml, validate, SpecError};
use kiln_ir::op::Scoring;
use kiln_ir::spec::{Family, ModelSpec, TopkMethod};
use kiln_ir::DType;
use proptest::prelude::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Relative paths of the files in `dir` ending in one of `exts`, sorted.
fn files(dir: &str, exts: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| entry.expect("readable directory entry").file_name().to_string_lossy().into_owned())
        .filter(|name| exts.iter().any(|ext| name.ends_with(ext)))
        .map(|name| format!("{dir}/{name}"))
        .collect();
    names.sort();
    names
}

/// A model file without its leading comment block (the sources it cites), which `to_toml` does not
/// write.
fn body(text: &str) -> &str {
    let mut rest = text;
    while rest.starts_with('#') || rest.starts_with('\n') {
        rest = rest.split_once('\n').map_or("", |(_, after)| after);
    }
    rest
}

fn model(name: &str) -> ModelSpec {
    let rel = format!("models/{name}.toml");
    parse_toml(&rel, &read(&rel)).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_model_file_is_valid_and_canonical() {
    let models = files("models", &[".toml"]);
    for want in ["models/deepseek_v2_lite.toml", "models/deepseek_v3.toml", "models/tiny.toml"] {
        assert!(models.iter().any(|m| m == want), "{want} is missing");
    }
    for rel in models {
        let text = read(&rel);
        let spec = parse_toml(&rel, &text).unwrap_or_else(|e| panic!("{e}"));
        let canonical = to_toml(&spec);
        assert_eq!(body(&text), canonical, "{rel} is not in canonical form (to_toml of itself)");
        assert_eq!(parse_toml(&rel, &canonical).unwrap_or_else(|e| panic!("{e}")), spec);
        assert_eq!(validate(&spec), Ok(()));
    }
}

#[test]
fn hf_fixtures_import_to_exactly_the_model_files() {
    for (json, toml) in [
        ("tests/fixtures/hf/deepseek_v3_config.json", "models/deepseek_v3.toml"),
        ("tests/fixtures/hf/deepseek_v2_lite_config.json", "models/deepseek_v2_lite.toml"),
    ] {
        let imported = import_hf(json, &read(json)).unwrap_or_else(|e| panic!("{e}"));
        let text = read(toml);
        assert_eq!(imported, parse_toml(toml, &text).unwrap(), "{json} vs {toml}");
        assert_eq!(to_toml(&imported), body(&text), "kiln import-hf {json} differs from {toml}");
    }
}

#[test]
fn modules_to_not_convert_round_trips_through_toml_and_hf() {
    let mut s = model("tiny_fp8");
    assert_eq!(s.quantization.as_ref().unwrap().modules_to_not_convert, None);
    for kept in [vec![], vec!["kv_b_proj".to_string(), "layers.1.".to_string()]] {
        s.quantization.as_mut().unwrap().modules_to_not_convert = Some(kept.clone());
        let toml = to_toml(&s);
        assert_eq!(parse_toml("x.toml", &toml).unwrap(), s, "{toml}");
        let json = kiln_compiler::spec::to_hf_config(&s);
        assert_eq!(json["quantization_config"]["modules_to_not_convert"], serde_json::json!(kept));
        let back = import_hf("config.json", &serde_json::to_string(&json).unwrap()).unwrap();
        assert_eq!(back.quantization, s.quantization);
    }
    // The head is quantised only when the list is given, and then unless the list names it.
    let q = |kept: Option<&[&str]>| kiln_ir::spec::QuantSection {
        modules_to_not_convert: kept.map(|k| k.iter().map(|m| m.to_string()).collect()),
        ..s.quantization.clone().unwrap()
    };
    let fp8 = kiln_compiler::passes::insert_fp8_casts::FP8_LINEARS;
    let cases = [
        ("lm_head.weight", [false, true, false, true]),
        ("model.layers.1.self_attn.kv_b_proj.weight", [true, true, true, false]),
        ("model.layers.2.mlp.experts.3.down_proj.weight", [true, true, true, true]),
        ("model.embed_tokens.weight", [false, false, false, false]),
        ("model.layers.2.mlp.gate.weight", [false, false, false, false]),
        ("model.layers.2.mlp.experts.3.down_proj.weight_scale_inv", [false, false, false, false]),
    ];
    for (name, want) in cases {
        let got = [None, Some(&[][..]), Some(&["lm_head"][..]), Some(&["kv_b_proj"][..])]
            .map(|k| q(k).quantises(name, fp8));
        assert_eq!(got, want, "{name}");
    }
    let mut bad = kiln_compiler::spec::to_hf_config(&s);
    bad["quantization_config"]["modules_to_not_convert"] = serde_json::json!("lm_head");
    let err = import_hf("config.json", &serde_json::to_string(&bad).unwrap()).unwrap_err().to_string();
    assert!(err.contains("modules_to_not_convert") && err.contains("a list of module names"), "{err}");
}

#[test]
fn load_picks_the_front_end_by_extension_and_names_missing_files() {
    let v3 = model("deepseek_v3");
    assert_eq!(load(&root().join("models/deepseek_v3.toml")).unwrap(), v3);
    assert_eq!(load(&root().join("tests/fixtures/hf/deepseek_v3_config.json")).unwrap(), v3);

    let missing = root().join("models/no_such_model.toml");
    let err = load(&missing).unwrap_err();
    assert!(matches!(&err, SpecError::Io { path, .. } if path == &missing), "{err:?}");
    assert!(err.to_string().contains("no_such_model.toml"), "{err}");
    assert!(err.diagnostic().is_none());
}

#[test]
fn deepseek_v3_matches_the_reference() {
    let s = model("deepseek_v3");
    assert_eq!(s.model.family, Family::DeepseekV3);
    assert_eq!(
        (s.model.vocab_size, s.model.hidden_size, s.model.num_hidden_layers, s.model.intermediate_size),
        (129280, 7168, 61, 18432)
    );
    assert_eq!(s.model.dtype, DType::BF16);
    assert_eq!((s.model.bos_token_id, s.model.eos_token_id), (Some(0), Some(1)));
    assert_eq!(s.attention.num_heads, 128);
    assert_eq!(s.attention.q_lora_rank, Some(1536));
    assert_eq!(s.attention.kv_lora_rank, 512);
    assert_eq!(s.qk_head_dim(), 192);
    assert!(s.rope.interleaved);

    let moe = s.moe.as_ref().expect("V3 is a MoE model");
    assert_eq!((moe.n_routed_experts, moe.n_shared_experts, moe.num_experts_per_tok), (256, 1, 8));
    assert_eq!((moe.n_group, moe.topk_group), (8, 4));
    assert_eq!((moe.scoring_func, moe.topk_method), (Scoring::Sigmoid, TopkMethod::NoauxTc));
    assert_eq!(moe.routed_scaling_factor, 2.5);
    assert!(moe.norm_topk_prob);
    assert_eq!((moe.aux_loss_alpha, moe.seq_aux, moe.ep_size), (Some(0.001), Some(true), 1));
    assert!(!s.is_moe_layer(2) && s.is_moe_layer(3) && s.is_moe_layer(60));

    assert_eq!(s.mtp.as_ref().map(|m| m.num_layers), Some(1));
    let q = s.quantization.as_ref().expect("V3 ships FP8 weights");
    assert_eq!((q.method.as_str(), q.format, q.weight_block), ("fp8", DType::F8E4M3, [128, 128]));
    assert_eq!((q.activation_scheme.as_str(), q.pow2_scale), ("dynamic", false));

    // Reference §2.4 / DESIGN.md: 0.1352338 with YaRN (factor 40, mscale_all_dim 1).
    assert!((s.softmax_scale() - 0.1352338).abs() < 1e-7, "{}", s.softmax_scale());
}

#[test]
fn deepseek_v2_lite_matches_the_reference() {
    let s = model("deepseek_v2_lite");
    assert_eq!(s.model.family, Family::DeepseekV2);
    assert_eq!((s.model.vocab_size, s.model.hidden_size, s.model.num_hidden_layers), (102400, 2048, 27));
    assert_eq!((s.model.bos_token_id, s.model.eos_token_id), (Some(100000), Some(100001)));
    assert_eq!(s.attention.q_lora_rank, None);
    assert_eq!(s.attention.num_heads, 16);
    let moe = s.moe.as_ref().expect("V2-Lite is a MoE model");
    assert_eq!((moe.n_routed_experts, moe.n_shared_experts, moe.num_experts_per_tok), (64, 2, 6));
    assert_eq!((moe.n_group, moe.topk_group), (1, 1));
    assert_eq!((moe.scoring_func, moe.topk_method), (Scoring::Softmax, TopkMethod::Greedy));
    assert!(!moe.norm_topk_prob);
    assert_eq!(moe.routed_scaling_factor, 1.0);
    assert!(!s.is_moe_layer(0) && s.is_moe_layer(1));
    assert!(s.mtp.is_none() && s.quantization.is_none());
    let yarn = s.rope.yarn.as_ref().expect("V2-Lite uses YaRN");
    assert_eq!((yarn.factor, yarn.mscale, yarn.mscale_all_dim), (40.0, 0.707, 0.707));

    // Hugging Face's attention scale: (nope + rope)^-0.5 * (0.1 * mscale_all_dim * ln(factor) + 1)^2.
    let m = 0.1 * 0.707 * 40f64.ln() + 1.0;
    let expected = m * m / 192f64.sqrt();
    assert!((s.softmax_scale() - expected).abs() < 1e-12, "{} vs {expected}", s.softmax_scale());
    assert!((expected - 0.1147214).abs() < 1e-7, "{expected}");
}

#[test]
fn tiny_keeps_every_v3_feature() {
    let s = model("tiny");
    assert_eq!(s.model.family, Family::DeepseekV3);
    assert_eq!(s.model.dtype, DType::F32);
    assert!(s.attention.q_lora_rank.is_some());
    assert!(s.rope.yarn.is_some());
    let moe = s.moe.as_ref().expect("tiny has MoE layers");
    assert_eq!((moe.scoring_func, moe.topk_method), (Scoring::Sigmoid, TopkMethod::NoauxTc));
    assert!(moe.n_group > 1 && moe.topk_group < moe.n_group, "routing must be group-limited");
    assert!(moe.n_routed_experts / moe.n_group >= 4, "at least 4 experts per group");
    assert!(moe.n_shared_experts >= 1);
    assert_eq!(moe.first_k_dense_replace, 1);
    assert!(!s.is_moe_layer(0) && (1..s.model.num_hidden_layers).all(|l| s.is_moe_layer(l)));
    assert_eq!(s.mtp.as_ref().map(|m| m.num_layers), Some(1));
    assert!(s.quantization.is_none());
}

/// Every bad spec fails with a diagnostic that names its own file; all of them are snapshotted.
#[test]
fn bad_spec_diagnostics() {
    let bad = files("tests/specs/bad", &[".toml", ".json"]);
    assert!(bad.len() >= 15, "only {} bad specs", bad.len());
    let mut report = String::new();
    for rel in bad {
        // As `kiln` reads them: bytes, which need not be UTF-8.
        let bytes = std::fs::read(root().join(&rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let result = parse_bytes(Path::new(&rel), &bytes);
        let err = match result {
            Ok(_) => panic!("{rel} was accepted"),
            Err(e) => e,
        };
        let diag = err.diagnostic().unwrap_or_else(|| panic!("{rel}: no diagnostic in {err:?}"));
        assert_eq!(diag.file, rel);
        assert!(diag.line >= 1 && diag.col >= 1, "{rel}: {diag:?}");
        writeln!(report, "=== {rel}\n{err}\n").unwrap();
    }
    insta::assert_snapshot!("bad_spec_diagnostics", report);
}

#[test]
fn unknown_model_type_names_the_supported_ones() {
    let src = read("tests/fixtures/hf/deepseek_v3_config.json").replace("\"deepseek_v3\"", "\"qwen2_moe\"");
    let err = import_hf("config.json", &src).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, SpecError::Unsupported(_)), "{err:?}");
    assert!(msg.contains("qwen2_moe") && msg.contains("deepseek_v3") && msg.contains("deepseek_v2"), "{msg}");
}

#[test]
fn hf_model_name_comes_from_the_file() {
    let src = read("tests/fixtures/hf/deepseek_v2_lite_config.json");
    for (file, name) in [
        ("DeepSeek-V2-Lite/config.json", "deepseek_v2_lite"),
        ("config.json", "deepseek_v2"),
        ("/tmp/x/my-model_config.json", "my_model"),
        ("<stdin>", "deepseek_v2"),
    ] {
        assert_eq!(import_hf(file, &src).unwrap().model.name, name, "{file}");
    }
}

/// transformers 5 re-saves configs with `dtype` and `rope_parameters` (theta inside) instead of
/// `torch_dtype`, `rope_theta` and `rope_scaling`; both spellings are understood.
#[test]
fn transformers_5_spelling_imports_the_same() {
    let old = read("tests/fixtures/hf/deepseek_v2_lite_config.json");
    let new =
        old.replace("\"torch_dtype\"", "\"dtype\"").replace("\n  \"rope_theta\": 10000,\n", "\n").replace(
            "\"rope_scaling\": {",
            "\"rope_parameters\": {\n    \"rope_theta\": 50000.0,\n    \"rope_type\": \"yarn\",",
        );
    assert!(!new.contains("torch_dtype") && !new.contains("rope_scaling") && new.contains("50000"));
    let mut expected = import_hf("deepseek_v2_lite_config.json", &old).unwrap();
    expected.rope.theta = 50000.0;
    assert_eq!(import_hf("deepseek_v2_lite_config.json", &new).unwrap(), expected);
}

/// Every prefix of the files (cut at a character boundary) is an error or a spec, never a panic.
#[test]
fn truncated_inputs_never_panic() {
    for (rel, is_json) in
        [("models/deepseek_v3.toml", false), ("tests/fixtures/hf/deepseek_v3_config.json", true)]
    {
        let text = read(rel);
        for end in (0..text.len()).filter(|&i| text.is_char_boundary(i)) {
            let prefix = &text[..end];
            let result = if is_json { import_hf(rel, prefix) } else { parse_toml(rel, prefix) };
            if let Err(e) = result {
                let _ = e.to_string();
            }
        }
    }
}

fn mangle(text: &str, flips: &[(usize, u8)]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for &(at, byte) in flips {
        let at = at % bytes.len();
        bytes[at] = byte;
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random byte replacements in the V3 TOML and JSON: errors are fine, panics are not, and whatever
    /// is accepted is valid and prints back to something that parses to the same spec.
    #[test]
    fn mangled_inputs_never_panic(flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4)) {
        let toml_text = mangle(&read("models/deepseek_v3.toml"), &flips);
        match parse_toml("m.toml", &toml_text) {
            Ok(spec) => {
                prop_assert_eq!(validate(&spec), Ok(()));
                prop_assert_eq!(parse_toml("m.toml", &to_toml(&spec)).ok(), Some(spec));
            }
            Err(e) => { let _ = e.to_string(); }
        }
        let json_text = mangle(&read("tests/fixtures/hf/deepseek_v3_config.json"), &flips);
        match import_hf("m.json", &json_text) {
            Ok(spec) => prop_assert_eq!(validate(&spec), Ok(())),
            Err(e) => { let _ = e.to_string(); }
        }
    }
}
