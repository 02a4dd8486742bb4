//! `kiln run --prompt "text"`: prompts encoded by the weights folder's `tokenizer.json` and the
//! continuation decoded as it comes. The tokenizer is tests/fixtures/tokenizer (a byte-level BPE
//! made by `make_tokenizer.py` with Hugging Face's Python `tokenizers`), whose `expected.json`
//! holds the ids Python encodes each sample to: kiln's encoding must be the same.

use std::path::{Path, PathBuf};

use crate::util::{kiln, root, Scratch};

const FIXTURE: &str = "tests/fixtures/tokenizer";

/// A Hugging Face folder of models/tiny.toml with random weights (seed 3) and the fixture tokenizer.
fn tiny_folder(dir: &Scratch) -> PathBuf {
    let out = dir.str("tiny_hf");
    let export = kiln(&["export-hf", "models/tiny.toml", "--random-weights", "3", "-o", &out]);
    assert!(export.ok, "{}", export.stderr);
    let folder = dir.path("tiny_hf");
    std::fs::copy(root().join(FIXTURE).join("tokenizer.json"), folder.join("tokenizer.json")).unwrap();
    folder
}

fn run_text(folder: &Path, text: &str, new_tokens: &str) -> crate::util::Out {
    kiln(&[
        "run",
        "models/tiny.toml",
        "--weights",
        folder.to_str().unwrap(),
        "--interp",
        "--prompt",
        text,
        "--max-new-tokens",
        new_tokens,
        "--ignore-eos",
    ])
}

/// The ids of a `prefix [1, 2, 3]` line.
fn ids_after(stdout: &str, prefix: &str) -> Vec<i64> {
    let line = stdout.lines().find_map(|l| l.strip_prefix(prefix)).unwrap_or_else(|| panic!("{stdout}"));
    let list = line.trim().trim_start_matches('[').trim_end_matches(']');
    list.split(", ").filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect()
}

#[test]
fn prompts_encode_as_python_tokenizers_encodes_them() {
    let dir = Scratch::new();
    let folder = tiny_folder(&dir);
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join(FIXTURE).join("expected.json")).unwrap())
            .unwrap();
    let samples = expected.as_array().unwrap();
    assert_eq!(samples.len(), 4);
    for s in samples {
        let text = s["text"].as_str().unwrap();
        let want: Vec<i64> = s["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        let out = run_text(&folder, text, "1");
        assert!(out.ok, "{text}: {}", out.stderr);
        assert_eq!(ids_after(&out.stderr, "prompt ids: "), want, "{text}");
        assert!(out.stderr.contains(&format!(": {} prompt tokens, greedy", want.len())), "{}", out.stderr);
    }
}

#[test]
fn the_continuation_is_printed_as_decoded_text() {
    let dir = Scratch::new();
    let folder = tiny_folder(&dir);
    let out = run_text(&folder, "hello world", "6");
    assert!(out.ok, "{}", out.stderr);
    let prompt = ids_after(&out.stderr, "prompt ids: ");
    let generated = ids_after(&out.stderr, "generated 6 tokens: ");
    // Text instead of one line per token: standard output is exactly what the streamed tokens
    // added to the prompt's text, so that the prompt's text followed by it is the decoding of the
    // whole sequence (special tokens skipped; ids past the tokenizer's 320 decode to nothing).
    assert_eq!(out.stderr.lines().filter(|l| l.starts_with("token ")).count(), 0, "{}", out.stderr);
    let tok = tokenizers::Tokenizer::from_file(folder.join("tokenizer.json")).unwrap();
    let all: Vec<u32> = prompt.iter().chain(&generated).map(|&i| i as u32).collect();
    let want = tok.decode(&all, true).unwrap();
    assert!(want.starts_with("hello world"), "{want}");
    let shown = out.stderr.lines().find_map(|l| l.strip_prefix("prompt: ")).unwrap();
    assert_eq!(format!("{shown}{}", out.stdout), format!("{want}\n"), "{}", out.stderr);

    // The same prompt as ids generates the same tokens.
    let ids: Vec<String> = prompt.iter().map(i64::to_string).collect();
    let by_ids = kiln(&[
        "run",
        "models/tiny.toml",
        "--weights",
        folder.to_str().unwrap(),
        "--interp",
        "--prompt-ids",
        &ids.join(","),
        "--max-new-tokens",
        "6",
        "--ignore-eos",
    ]);
    assert!(by_ids.ok, "{}", by_ids.stderr);
    assert_eq!(ids_after(&by_ids.stderr, "generated 6 tokens: "), generated);
}

#[test]
fn text_prompts_without_a_tokenizer_are_refused_clearly() {
    let golden = "tests/goldens/v3_tiny_yarn";
    let no_tokenizer = kiln(&[
        "run",
        "tests/goldens/v3_tiny_yarn/config.json",
        "--weights",
        golden,
        "--interp",
        "--prompt",
        "hello",
    ]);
    assert_eq!(
        no_tokenizer.stderr.trim(),
        format!(
            "error: {golden} has no tokenizer.json: --prompt \"text\" needs the model's tokenizer in the \
             weights folder; give the prompt as token ids with --prompt-ids instead"
        )
    );
    let random = kiln(&["run", "models/tiny.toml", "--random-weights", "1", "--interp", "--prompt", "hello"]);
    assert!(random.stderr.contains("--random-weights has none"), "{}", random.stderr);
    assert!(random.stderr.contains("--prompt-ids"), "{}", random.stderr);
    let both = kiln(&[
        "run",
        "models/tiny.toml",
        "--random-weights",
        "1",
        "--interp",
        "--prompt",
        "hello",
        "--prompt-ids",
        "1",
    ]);
    assert!(both.stderr.contains("'--prompt <PROMPT>' cannot be used with '--prompt-ids"), "{}", both.stderr);
    let neither = kiln(&["run", "models/tiny.toml", "--random-weights", "1", "--interp"]);
    assert!(neither.stderr.contains("--prompt <PROMPT>|--prompt-ids <PROMPT_IDS>"), "{}", neither.stderr);
    for out in [no_tokenizer, random, both, neither] {
        assert!(!out.ok && !out.stderr.contains("panicked"), "{}", out.stderr);
    }
}

/// `kiln export-hf` writes no tokenizer, and re-exporting into a folder that has one keeps it.
#[test]
fn export_hf_keeps_a_tokenizer_it_finds() {
    let dir = Scratch::new();
    let folder = tiny_folder(&dir);
    let again =
        kiln(&["export-hf", "models/tiny.toml", "--random-weights", "4", "-o", folder.to_str().unwrap()]);
    assert!(again.ok, "{}", again.stderr);
    let mut files: Vec<String> =
        std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    assert_eq!(files, ["config.json", "model.safetensors", "tokenizer.json"]);
    let kept = std::fs::read(folder.join("tokenizer.json")).unwrap();
    assert_eq!(kept, std::fs::read(root().join(FIXTURE).join("tokenizer.json")).unwrap());
    let out = run_text(&folder, "hello world", "1");
    assert!(out.ok, "{}", out.stderr);
}
