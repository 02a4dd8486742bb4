//! Messages that used to mislead (issue 16), each asserted as the user now sees it: what is wrong,
//! where, and what would be right. (Others live with their area: `[rope.yarn]` without `[rope]`,
//! non-UTF-8 specs and the sizes in `spec.rs`'s bad specs; non-UTF-8 `.kir` and verifier findings
//! in `text.rs`'s bad files; the MTP module in `weights.rs`; the prompt longer than the prefill in
//! `runtime.rs`.)

use crate::util::{kiln, Scratch};

#[track_caller]
fn fails_with(args: &[&str], want: &str) {
    let out = kiln(args);
    assert!(!out.ok, "{args:?} succeeded: {}", out.stdout);
    assert!(out.stderr.starts_with("error: ") && out.stderr.contains(want), "want `{want}`:\n{}", out.stderr);
}

#[test]
fn a_path_that_is_not_an_artifact_is_told_for_what_it_is() {
    let s = Scratch::new();
    std::fs::write(s.path("notes.txt"), "hello\n").unwrap();
    let notes = s.str("notes.txt");
    let run = ["--random-weights", "1", "--prompt-ids", "1"];
    fails_with(
        &[&["run", &notes], &run[..]].concat(),
        &format!("{notes} is a file, not an artifact directory: `kiln run` runs an artifact directory from `kiln compile"),
    );
    let gone = s.str("gone");
    fails_with(
        &[&["run", &gone], &run[..]].concat(),
        &format!("{gone} does not exist: `kiln run` runs an artifact"),
    );
    fails_with(
        &["perplexity", &notes, "--random-weights", "1", "--data", "tests/goldens/train/tokens.safetensors"],
        &format!("{notes} is a file, not an artifact directory: `kiln perplexity` runs"),
    );
    fails_with(
        &[&["run", "tests/goldens/train/tokens.safetensors"], &run[..]].concat(),
        "tokens.safetensors is a checkpoint, not an artifact: give it with --weights",
    );
    // A spec is still named as one.
    fails_with(
        &[&["run", "models/tiny.toml"], &run[..]].concat(),
        "models/tiny.toml is a model spec; compiled execution",
    );
}

#[test]
fn weights_given_as_a_config_say_what_weights_take() {
    fails_with(
        &["run", "models/tiny.toml", "--interp", "--weights", "tests/fixtures/hf/deepseek_v3_config.json", "--prompt-ids", "1"],
        "tests/fixtures/hf/deepseek_v3_config.json is a model's config.json, not a checkpoint: give the \
         checkpoint's folder (`tests/fixtures/hf`), its model.safetensors, or its model.safetensors.index.json",
    );
}

#[test]
fn a_hand_edited_manifest_is_refused_in_a_sentence() {
    let s = Scratch::new();
    let dir = s.path("art");
    let out = kiln(&["compile", "tests/compile/small.kir", "--target", "cpu", "-o", &s.str("art")]);
    assert!(out.ok, "{}", out.stderr);
    // The maxima shrunk by hand: every buffer's size disagrees with its type.
    let path = dir.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    m["programs"][0]["symbols"][1]["max"] = 2048.into();
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let out = kiln(&["run", &s.str("art"), "--random-weights", "1", "--prompt-ids", "1"]);
    assert!(!out.ok);
    assert!(
        out.stderr.contains("manifest field `programs[0].buffers[0].max_bytes`: b0 (%0) has max_bytes 1048576, but \
                             its type gives 524288 bytes at the program's maxima (B <= 1, T <= 2048); the manifest \
                             was edited: recompile it"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("Some("), "{}", out.stderr);
}

#[test]
fn non_utf8_input_and_verifier_findings_are_located_through_the_binary() {
    let s = Scratch::new();
    std::fs::write(s.path("x.toml"), b"[model]\nname = \"t\xffny\"\n").unwrap();
    fails_with(&["inspect", &s.str("x.toml")], "byte 17 (0xff) does not start a UTF-8 character");
    fails_with(&["inspect", &s.str("x.toml")], "x.toml:2:10");
    // `kiln compile` reads a .kir as `kiln check` does.
    for verb in [&["check"][..], &["compile", "--target", "cpu"][..]] {
        let file = "tests/kir/bad/duplicate_param.kir";
        fails_with(&[verb, &[file]].concat(), "graph @dup is invalid: parameter `w` is declared twice");
        fails_with(&[verb, &[file]].concat(), "--> tests/kir/bad/duplicate_param.kir:5:3");
        fails_with(
            &[verb, &["tests/kir/bad/no_outputs.kir"]].concat(),
            "--> tests/kir/bad/no_outputs.kir:2:1",
        );
    }
}
