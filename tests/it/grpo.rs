//! `kiln grpo` end to end: models/tiny.toml fine-tuned by `kiln sft` on eight sums
//! (tests/fixtures/chat/arith.jsonl, tiny's own chat template), then a few GRPO steps on the same
//! prompts. The equations themselves are checked against PyTorch in `src/grpo/objective.rs`.

use std::path::Path;

use serde_json::Value;

use crate::util::{kiln, root, Scratch};

/// A Hugging Face folder of tiny (random weights, seed 3) with the fixture tokenizer and tiny's chat
/// template (`Q: ...` / `A: ...<eos>`).
pub fn tiny_chat(s: &Scratch) -> String {
    let hf = s.str("tiny-chat");
    let r = kiln(&["export-hf", "models/tiny.toml", "--random-weights", "3", "-o", &hf]);
    assert!(r.ok, "{}", r.stderr);
    for f in ["tests/fixtures/tokenizer/tokenizer.json", "tests/fixtures/chat/tiny/tokenizer_config.json"] {
        let from = root().join(f);
        std::fs::copy(&from, Path::new(&hf).join(from.file_name().unwrap())).unwrap();
    }
    hf
}

fn metrics(dir: &str) -> Vec<Value> {
    std::fs::read_to_string(Path::new(dir).join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The first step samples from the policy the reference model equals: its KL term is 0 and its
/// objective is minus the mean advantage, 0 within each group. The update moves the policy (the
/// next step's KL is positive), every logged figure is in its range, the checkpoint is a Hugging
/// Face folder with its tokenizer, and bad input is refused before anything is compiled.
#[test]
fn kiln_grpo_samples_rewards_and_moves_the_policy() {
    let s = Scratch::new();
    let hf = tiny_chat(&s);
    let sft = s.str("sft");
    let r = kiln(&[
        "sft",
        &hf,
        "--data",
        "tests/fixtures/chat/arith.jsonl",
        "--batch",
        "8",
        "--epochs",
        "25",
        "--lr",
        "0.003",
        "--schedule",
        "constant",
        "--weight-decay",
        "0",
        "--threads",
        "1",
        "--out",
        &sft,
    ]);
    assert!(r.ok, "{}", r.stderr);
    let policy = format!("{sft}/step-25");
    assert!(
        Path::new(&policy).join("tokenizer_config.json").is_file(),
        "the checkpoint carries the tokenizer"
    );
    let rl = s.str("rl");
    let r = kiln(&[
        "grpo",
        &policy,
        "--prompts",
        "tests/fixtures/chat/arith-prompts.jsonl",
        "--out",
        &rl,
        "--steps",
        "3",
        "--prompts-per-step",
        "8",
        "--group",
        "4",
        "--max-new-tokens",
        "3",
        "--lr",
        "0.002",
        "--reward",
        "exact",
        "--reward",
        "format",
        "--format-pattern",
        r"\d+",
        "--threads",
        "1",
    ]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("8 prompts x 4 completions"), "{}", r.stdout);
    let m = metrics(&rl);
    assert_eq!(m.len(), 3, "{}", r.stdout);
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("no {k} in {v}"));
    assert_eq!(f(&m[0], "kl"), 0.0, "the first step's policy is the reference model");
    assert!(f(&m[0], "loss").abs() < 1e-6, "{}", m[0]);
    assert!(f(&m[1], "kl") > 0.0, "the update moved the policy: {}", m[1]);
    for v in &m {
        let (exact, format) =
            (v["rewards"]["exact"].as_f64().unwrap(), v["rewards"]["format"].as_f64().unwrap());
        assert!((0.0..=1.0).contains(&exact) && (0.0..=0.1 + 1e-12).contains(&format), "{v}");
        // 32 completions per step: each reward's mean is a whole number of completions' worth.
        assert!(((exact * 32.0) - (exact * 32.0).round()).abs() < 1e-9, "{v}");
        assert!((f(v, "reward") - exact - format).abs() < 1e-9, "{v}");
        assert!(f(v, "grad_norm").is_finite() && f(v, "completion_tokens") <= 3.0, "{v}");
    }
    // The run's page charts the rewards.
    let page = std::fs::read_to_string(Path::new(&rl).join("report.html")).unwrap();
    assert!(page.contains("<figure id=\"reward\">") && page.contains("<figure id=\"kl\">"));
    // The last checkpoint is a Hugging Face folder with its tokenizer: a chat model.
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert!(Path::new(&rl).join("step-3").join(f).is_file(), "step-3/{f}");
    }

    // Bad input, refused with what and where.
    let bad = s.str("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"1+1=\", \"answer\": \"2\"}\n{\"prompt\": 5, \"answer\": \"2\"}\n")
        .unwrap();
    let r = kiln(&["grpo", &policy, "--prompts", &bad, "--out", &s.str("x")]);
    assert!(
        !r.ok && r.stderr.contains(&format!("{bad}:2: field \"prompt\" must be a string")),
        "{}",
        r.stderr
    );
    let r = kiln(&[
        "grpo",
        &policy,
        "--prompts",
        "tests/fixtures/chat/arith-prompts.jsonl",
        "--out",
        &s.str("y"),
        "--group",
        "1",
    ]);
    assert!(!r.ok && r.stderr.contains("--group 1: GRPO compares at least 2 completions"), "{}", r.stderr);
}
