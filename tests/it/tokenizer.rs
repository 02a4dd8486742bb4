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

/// The model folder is the unit of work: `kiln run FOLDER --prompt TEXT` uses the folder's config,
/// weights and tokenizer, compiles the model for this CPU on first use into the cache
/// (`KILN_CACHE_DIR`), and reuses that artifact after; the text is the interpreter's. An artifact
/// damaged by hand is compiled again. (That another config is another artifact is `cache`'s unit
/// test.)
#[test]
fn a_model_folder_goes_to_text_in_one_command_compiled_once() {
    let dir = Scratch::new();
    let folder = tiny_folder(&dir);
    let cache = dir.str("cache");
    let f = folder.to_str().unwrap();
    let args = ["run", f, "--prompt", "hello world", "--max-new-tokens", "6", "--ignore-eos"];
    let run = |args: &[&str]| crate::util::kiln_env(args, &[("KILN_CACHE_DIR", &cache)]);
    let first = run(&args);
    assert!(first.ok, "{}", first.stderr);
    assert!(
        first.stderr.contains("kiln: compiling ") && first.stderr.contains("compiled artifact on the CPU")
    );
    let artifacts = |d: &Scratch| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d.path("cache/artifacts"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let made = artifacts(&dir);
    assert_eq!(made.len(), 1, "{made:?}");
    assert!(made[0].starts_with("tiny_hf-"), "named after the config's model: {made:?}");

    let second = run(&args);
    assert!(second.ok, "{}", second.stderr);
    assert!(!second.stderr.contains("kiln: compiling") && second.stderr.contains("compiled for this CPU"));
    assert_eq!(second.stdout, first.stdout);
    assert_eq!(artifacts(&dir), made);
    // The interpreter on the same folder writes the same text.
    let interp = run(&[&args[..], &["--interp"]].concat());
    assert!(interp.ok, "{}", interp.stderr);
    assert_eq!(interp.stdout, first.stdout);
    assert!(!interp.stderr.contains("kiln: compiling"));

    // A file of the cached artifact changed by hand: it no longer loads and is compiled again.
    let so = dir.path("cache/artifacts").join(&made[0]).join("kernels.so");
    let mut bytes = std::fs::read(&so).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&so, bytes).unwrap();
    let again = run(&args);
    assert!(again.ok && again.stderr.contains("does not load") && again.stderr.contains("kiln: compiling"));
    assert_eq!(again.stdout, first.stdout);

    // A folder without weights says what to do, before compiling anything.
    std::fs::remove_file(folder.join("model.safetensors")).unwrap();
    let none = run(&args);
    assert!(!none.ok && none.stderr.contains("no weights") && none.stderr.contains("--random-weights"));
    assert_eq!(artifacts(&dir), made);
}
