//! The `kiln` command line, run as a user runs it: real processes, real files, snapshots of what they
//! print.

use std::path::Path;

use crate::util::{kiln, root};

fn models() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root().join("models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| format!("models/{}", p.file_name().unwrap().to_string_lossy()))
        .collect();
    v.sort();
    v
}

#[test]
fn inspect_every_model() {
    let models = models();
    assert!(models.len() >= 3, "{models:?}");
    for m in models {
        let out = kiln(&["inspect", &m]);
        assert!(out.ok, "{m}: {}", out.stderr);
        let name = Path::new(&m).file_stem().unwrap().to_string_lossy().to_string();
        insta::assert_snapshot!(format!("inspect_{name}"), out.stdout);
    }
}

#[test]
fn inspect_json_has_the_reference_numbers() {
    let out = kiln(&["inspect", "models/deepseek_v3.toml", "--json"]);
    assert!(out.ok, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let text = v.to_string();
    // MLA latent cache over 61 layers in BF16 (reference §2.3) and the naive cache.
    assert!(text.contains("70272"), "{text}");
    assert!(text.contains("4997120"), "{text}");
}

#[test]
fn ir_of_the_tiny_model() {
    let out = kiln(&["ir", "models/tiny.toml"]);
    assert!(out.ok, "{}", out.stderr);
    insta::assert_snapshot!("ir_tiny", out.stdout);
    let layer = kiln(&["ir", "models/tiny.toml", "--layer", "1"]);
    assert!(layer.ok, "{}", layer.stderr);
    insta::assert_snapshot!("ir_tiny_layer1", layer.stdout);
    // The printed IR is a valid .kir file.
    let graph = kiln_ir::text::parse(&out.stdout).unwrap();
    kiln_ir::verify::verify(&graph).unwrap();
}

/// `kiln ir --format dot` draws every node of the graph (the text IR's node count) and every
/// output, grouped by scope; with `--module`, a cluster per program.
#[test]
fn ir_draws_the_graph_as_dot() {
    let kir = kiln(&["ir", "models/tiny.toml"]);
    let dot = kiln(&["ir", "models/tiny.toml", "--format", "dot"]);
    assert!(dot.ok, "{}", dot.stderr);
    let graph = kiln_ir::text::parse(&kir.stdout).unwrap();
    let boxes = (dot.stdout.lines())
        .filter(|l| l.trim_start().starts_with('n') && l.contains(" [label=") && !l.contains(" -> "))
        .count();
    let edges = dot.stdout.matches(" -> ").count();
    let operands: usize = graph.nodes().iter().map(|&n| graph.node(n).inputs.len()).sum();
    assert_eq!(boxes, graph.node_count() + graph.outputs().len(), "{}", dot.stdout);
    assert_eq!(edges, operands + graph.outputs().len());
    assert!(dot.stdout.contains("label=\"model.layers.1\"; style=rounded"), "{}", dot.stdout);
    let module = kiln(&["ir", "models/tiny.toml", "--module", "--format", "dot"]);
    assert!(module.ok, "{}", module.stderr);
    for program in ["prefill", "decode", "score"] {
        assert!(module.stdout.contains(&format!("label=\"program {program} ({program})\"")), "{program}");
    }
    let bad = kiln(&["ir", "models/tiny.toml", "--format", "svg"]);
    assert!(!bad.ok && bad.stderr.contains("possible values: kir, dot"), "{}", bad.stderr);
}

/// `parse(print(g)) == g` and the graph verifies, for every model in `models/` (DeepSeek-V3 included).
#[test]
fn every_model_round_trips_through_the_text_format() {
    for m in models() {
        let spec = kiln_compiler::spec::load(&root().join(&m)).unwrap();
        let graph = kiln_compiler::build::build_graph(&spec).unwrap();
        kiln_ir::verify::verify(&graph).unwrap_or_else(|e| panic!("{m}: {e}"));
        let text = kiln_ir::print(&graph);
        let back = kiln_ir::parse(&text).unwrap_or_else(|e| panic!("{m}: {e}"));
        assert!(back == graph, "{m}: the graph changed through print and parse");
        assert_eq!(kiln_ir::print(&back), text);
    }
}

#[test]
fn check_accepts_good_files_and_points_at_errors() {
    for f in ["tests/kir/good/moe_route.kir", "tests/kir/good/rmsnorm_mlp.kir"] {
        let out = kiln(&["check", f]);
        assert!(out.ok, "{f}: {}", out.stderr);
        assert!(out.stdout.starts_with(&format!("{f}: ok: graph @")), "{}", out.stdout);
    }
    let bad = kiln(&["check", "tests/kir/bad/undefined_value.kir"]);
    assert!(!bad.ok);
    assert!(bad.stderr.starts_with("error: "), "{}", bad.stderr);
    assert!(bad.stderr.contains("--> tests/kir/bad/undefined_value.kir:"), "{}", bad.stderr);
}

#[test]
fn import_hf_reproduces_the_model_files() {
    for (config, model) in [
        ("tests/fixtures/hf/deepseek_v3_config.json", "models/deepseek_v3.toml"),
        ("tests/fixtures/hf/deepseek_v2_lite_config.json", "models/deepseek_v2_lite.toml"),
    ] {
        let out = kiln(&["import-hf", config]);
        assert!(out.ok, "{config}: {}", out.stderr);
        let file = std::fs::read_to_string(root().join(model)).unwrap();
        // The model files add a header comment citing their sources; the rest is identical.
        let body: String = file
            .lines()
            .skip_while(|l| l.starts_with('#') || l.is_empty())
            .map(|l| format!("{l}\n"))
            .collect();
        let printed: String = out
            .stdout
            .lines()
            .skip_while(|l| l.starts_with('#') || l.is_empty())
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(printed, body, "{config} vs {model}");
    }
    let not_json = kiln(&["import-hf", "models/tiny.toml"]);
    assert!(!not_json.ok && not_json.stderr.contains("expected a .json file"), "{}", not_json.stderr);
}

#[test]
fn outputs_are_written_atomically() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let target = dir.join("tiny.kir");
    let out = kiln(&["ir", "models/tiny.toml", "-o", target.to_str().unwrap()]);
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.is_empty());
    let written = std::fs::read_to_string(&target).unwrap();
    assert!(kiln_ir::parse(&written).is_ok());
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, [std::ffi::OsString::from("tiny.kir")]);
    // A failing build writes nothing at all.
    let missing = dir.join("not.kir");
    let bad = kiln(&["ir", "tests/specs/bad/does-not-exist.toml", "-o", missing.to_str().unwrap()]);
    assert!(!bad.ok);
    assert!(!missing.exists());
    // An unwritable destination is a clear error.
    let nodir = kiln(&["ir", "models/tiny.toml", "-o", "/nonexistent-dir/x.kir"]);
    assert!(!nodir.ok && nodir.stderr.contains("cannot write /nonexistent-dir/x.kir"), "{}", nodir.stderr);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn passes_and_after() {
    let list = kiln(&["passes"]);
    assert!(list.ok && list.stdout.starts_with("fuse-mla-latent "), "{}", list.stdout);
    let planned = kiln(&["ir", "models/tiny.toml", "--after", "plan-moe-dispatch"]);
    assert!(planned.ok, "{}", planned.stderr);
    assert!(planned.stdout.contains("moe_dispatch") && !planned.stdout.contains("moe_experts"));
    let after = kiln(&["ir", "models/tiny.toml", "--after", "dce"]);
    assert!(after.ok, "{}", after.stderr);
    // The decode program over the latent cache, after fuse-mla-latent.
    let decode = kiln(&["ir", "models/tiny.toml", "--program", "decode", "--after", "fuse-mla-latent"]);
    assert!(decode.ok, "{}", decode.stderr);
    assert!(decode.stdout.contains("input {name = \"kv_cache.0\"} : f32[B, S, 40]"), "{}", decode.stdout);
    assert!(decode.stdout.contains("scope \"model.layers.3.self_attn.absorbed\""));
    // tiny has no [quantization], so insert-fp8-casts does nothing, and the rewrites leave no dead
    // code, so dce changes nothing either.
    assert_eq!(after.stdout, planned.stdout);
    let unknown = kiln(&["ir", "models/tiny.toml", "--after", "fuse-everything"]);
    assert!(!unknown.ok);
    assert_eq!(
        unknown.stderr.trim(),
        "error: unknown pass `fuse-everything`; the passes are: fuse-mla-latent, plan-moe-dispatch, \
         rematerialize, insert-fp8-casts, cache-activations, dce, fuse-kernels"
    );
}

#[test]
fn bad_invocations_say_what_is_wrong() {
    let missing = kiln(&["inspect", "models/nope.toml"]);
    assert!(!missing.ok && missing.stderr.contains("models/nope.toml"), "{}", missing.stderr);
    let layer = kiln(&["ir", "models/tiny.toml", "--layer", "99"]);
    assert!(!layer.ok && layer.stderr.starts_with("error: "), "{}", layer.stderr);
    assert!(!layer.stderr.contains("panicked"));
}

#[test]
fn run_reproduces_the_transformers_continuation() {
    let out = kiln(&[
        "run",
        "tests/goldens/v3_tiny_yarn/config.json",
        "--weights",
        "tests/goldens/v3_tiny_yarn",
        "--interp",
        "--prompt-ids",
        "0,17,42,255,3,128,77,9,200",
        "--max-new-tokens",
        "8",
        "--ignore-eos",
    ]);
    assert!(out.ok, "{}", out.stderr);
    // The same ids as `tests/goldens/v3_tiny_yarn/golden.json` ("continuation").
    assert!(out.stderr.contains("generated 8 tokens: [51, 10, 89, 138, 46, 46, 186, 46]"), "{}", out.stderr);
    assert_eq!(out.stderr.lines().filter(|l| l.starts_with("token ")).count(), 8);
    assert_eq!(out.stdout, "51,10,89,138,46,46,186,46\n");
}

#[test]
fn run_with_random_weights_is_deterministic() {
    let args = [
        "run",
        "models/tiny.toml",
        "--random-weights",
        "7",
        "--interp",
        "--prompt-ids",
        "1,2,3",
        "--max-new-tokens",
        "3",
        "--ignore-eos",
    ];
    let (a, b) = (kiln(&args), kiln(&args));
    assert!(a.ok, "{}", a.stderr);
    let tokens = |s: &str| s.lines().find(|l| l.starts_with("generated")).unwrap().to_string();
    assert_eq!(tokens(&a.stderr), tokens(&b.stderr));
    let other = kiln(&[
        "run",
        "models/tiny.toml",
        "--random-weights",
        "8",
        "--interp",
        "--prompt-ids",
        "1,2,3",
        "--max-new-tokens",
        "3",
        "--ignore-eos",
    ]);
    assert!(other.ok);
    assert_ne!(tokens(&a.stderr), tokens(&other.stderr), "another seed gives other weights");
}

#[test]
fn run_rejects_bad_requests_clearly() {
    let base = ["run", "models/tiny.toml", "--random-weights", "1", "--interp"];
    let with = |extra: &[&str]| kiln(&[&base[..], extra].concat());
    let bad_id = with(&["--prompt-ids", "1,2,512"]);
    assert_eq!(
        bad_id.stderr.trim(),
        "error: prompt token 2 is 512, outside the vocabulary: ids must be in 0..512"
    );
    let negative = with(&["--prompt-ids", "-3"]);
    assert!(negative.stderr.contains("prompt token 0 is -3"), "{}", negative.stderr);
    let too_long = with(&["--prompt-ids", "1,2", "--max-new-tokens", "1023"]);
    assert!(too_long.stderr.contains("exceed the model's context of 1024 positions"), "{}", too_long.stderr);
    // Nothing to generate, or a top-p that is no probability (greedy or not).
    let none = with(&["--prompt-ids", "1", "--max-new-tokens", "0"]);
    assert!(!none.ok && none.stderr.contains("'0' for '--max-new-tokens"), "{}", none.stderr);
    for p in ["0", "2", "nan"] {
        let top_p = with(&["--prompt-ids", "1", "--top-p", p]);
        assert!(!top_p.ok && top_p.stderr.contains("--top-p"), "{p}: {}", top_p.stderr);
    }
    let not_a_number = with(&["--prompt-ids", "1,x"]);
    assert!(!not_a_number.ok && not_a_number.stderr.contains("invalid value 'x'"), "{}", not_a_number.stderr);
    let no_engine = kiln(&["run", "models/tiny.toml", "--random-weights", "1", "--prompt-ids", "1"]);
    assert!(no_engine.stderr.contains("pass --interp"), "{}", no_engine.stderr);
    let missing = kiln(&[
        "run",
        "models/tiny.toml",
        "--weights",
        "tests/goldens/v3_tiny_yarn",
        "--interp",
        "--prompt-ids",
        "1",
    ]);
    assert!(
        !missing.ok && missing.stderr.contains("the checkpoint lacks 128 tensor(s) the graph needs"),
        "{}",
        missing.stderr
    );
    for out in [bad_id, negative, too_long, not_a_number, no_engine, missing] {
        assert!(!out.ok && !out.stderr.contains("panicked"), "{}", out.stderr);
    }
}

/// `kiln export-hf` writes a Hugging Face folder that kiln itself reads back to the same model and
/// weights: generation from the folder equals generation from the spec with the same seed.
#[test]
fn export_hf_round_trips_through_run() {
    let dir = crate::util::Scratch::new();
    let out = dir.str("tiny_hf");
    let export = kiln(&["export-hf", "models/tiny.toml", "--random-weights", "5", "-o", &out]);
    assert!(export.ok, "{}", export.stderr);
    let mut files = std::fs::read_dir(dir.path("tiny_hf"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect::<Vec<_>>();
    files.sort();
    assert_eq!(files, ["config.json", "model.safetensors"]);
    let config = format!("{out}/config.json");
    let from_folder = kiln(&[
        "run",
        &config,
        "--weights",
        &out,
        "--interp",
        "--prompt-ids",
        "3,1,4",
        "--max-new-tokens",
        "4",
        "--ignore-eos",
    ]);
    let from_spec = kiln(&[
        "run",
        "models/tiny.toml",
        "--random-weights",
        "5",
        "--interp",
        "--prompt-ids",
        "3,1,4",
        "--max-new-tokens",
        "4",
        "--ignore-eos",
    ]);
    assert!(from_folder.ok, "{}", from_folder.stderr);
    let tokens = |s: &str| s.lines().find(|l| l.starts_with("generated")).unwrap().to_string();
    assert_eq!(tokens(&from_folder.stderr), tokens(&from_spec.stderr));
}
