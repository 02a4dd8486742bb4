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

/// tiny fine-tuned by `kiln sft` on the eight sums until it answers some: a policy whose
/// completions earn different rewards.
fn sft_policy(s: &Scratch) -> String {
    let hf = tiny_chat(s);
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
    policy
}

/// The first step samples from the policy the reference model equals: its KL term is 0 and its
/// objective is minus the mean advantage, 0 within each group. The update moves the policy (the
/// next step's KL is positive), every logged figure is in its range, the checkpoint is a Hugging
/// Face folder with its tokenizer, and bad input is refused before anything is compiled.
#[test]
fn kiln_grpo_samples_rewards_and_moves_the_policy() {
    let s = Scratch::new();
    let policy = sft_policy(&s);
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

/// A checkpoint carries AdamW's state and the run's position: 2 steps, then a resume to 4, end
/// byte for byte where 4 steps in one run end, and log the same steps. A resume with another
/// reference model, other sampling settings or other prompts is refused before anything is
/// compiled.
#[test]
fn kiln_grpo_resumes_byte_for_byte() {
    // 4 completions of up to 3 tokens a prompt.
    const SAMPLING: [&str; 6] = ["--group", "4", "--max-new-tokens", "3", "--lr", "0.002"];
    let s = Scratch::new();
    let policy = sft_policy(&s);
    let prompts = s.str("prompts.jsonl");
    std::fs::copy(root().join("tests/fixtures/chat/arith-prompts.jsonl"), &prompts).unwrap();
    let grpo = |out: &str, steps: &str, extra: &[&str]| {
        let base = [
            "grpo",
            &policy,
            "--prompts",
            &prompts,
            "--out",
            out,
            "--steps",
            steps,
            "--prompts-per-step",
            "4",
            "--save-every",
            "2",
            "--threads",
            "1",
        ];
        kiln(&[&base[..], &SAMPLING[..], extra].concat())
    };
    let (whole, split) = (s.str("whole"), s.str("split"));
    let r = grpo(&whole, "4", &[]);
    assert!(r.ok, "{}", r.stderr);
    // The first half, then the rest from its checkpoint (in another folder: only step-2 is shared).
    let r = grpo(&split, "2", &[]);
    assert!(r.ok, "{}", r.stderr);
    let half = format!("{split}/step-2");
    let r = grpo(&split, "4", &["--resume", &half]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains(&format!("resumed from {half} at step 2")), "{}", r.stdout);
    assert!(r.stdout.contains("step    3") && !r.stdout.contains("step    1 "), "{}", r.stdout);
    for f in ["model.safetensors", "optimizer.safetensors", "grpo.json"] {
        let (a, b) = (
            std::fs::read(format!("{whole}/step-4/{f}")).unwrap(),
            std::fs::read(format!("{split}/step-4/{f}")).unwrap(),
        );
        assert!(a == b, "step-4/{f} differs between one run and a resumed one");
    }
    // The policy moved: a resume that lost the optimizer's state or the weights could not match.
    let (a, b) = (
        std::fs::read(format!("{whole}/step-2/model.safetensors")).unwrap(),
        std::fs::read(format!("{whole}/step-4/model.safetensors")).unwrap(),
    );
    assert!(a != b, "the updates moved the policy");
    let (m_whole, m_split) = (metrics(&whole), metrics(&split));
    assert_eq!(m_split.len(), 4, "the resumed run's log holds its 4 steps once");
    assert_eq!(m_whole, m_split);

    // A resume from an earlier checkpoint drops the later steps' log lines it takes again.
    let r = grpo(&whole, "3", &["--resume", &format!("{whole}/step-2")]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(metrics(&whole)[..], m_split[..3]);

    // Refused: another reference model, another seed; a folder that is not a GRPO checkpoint.
    let r = grpo(&s.str("x"), "4", &["--resume", &half, "--random-weights", "1"]);
    assert!(!r.ok && r.stderr.contains("reference model"), "{}", r.stderr);
    let r = grpo(&s.str("x"), "4", &["--resume", &half, "--seed", "7"]);
    assert!(!r.ok && r.stderr.contains("--seed 0"), "{}", r.stderr);
    let r = grpo(&s.str("x"), "4", &["--resume", &policy]);
    assert!(!r.ok && r.stderr.contains("grpo.json"), "{}", r.stderr);
    // The same prompts file, edited since: its first prompt's answer.
    let text = std::fs::read_to_string(&prompts).unwrap();
    let first = text.lines().next().unwrap();
    let mut v: Value = serde_json::from_str(first).unwrap();
    v["answer"] = Value::from("x");
    let edited = text.replacen(first, &v.to_string(), 1);
    std::fs::write(&prompts, edited).unwrap();
    let r = grpo(&s.str("x"), "4", &["--resume", &half]);
    assert!(!r.ok && r.stderr.contains("give the same --prompts"), "{}", r.stderr);
}
