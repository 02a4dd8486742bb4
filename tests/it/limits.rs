//! Sizes, counts and lengths beyond what a machine or a model can hold (issue 16's crash and hang
//! reproducers): each is refused with a message saying what and what would be right, never a
//! panic, an abort or a run that does not end.

use crate::util::{kiln, Scratch};

#[track_caller]
fn refused(args: &[&str], want: &str) {
    let out = kiln(args);
    assert!(!out.ok, "{args:?} succeeded: {}", out.stdout);
    assert!(out.stderr.starts_with("error: ") && out.stderr.contains(want), "want `{want}`:\n{}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

/// A `.kir` graph compiled for the CPU at T = S = 1.
fn compile_kir(s: &Scratch, name: &str, text: &str) -> String {
    std::fs::write(s.path(&format!("{name}.kir")), text).unwrap();
    let dir = s.str(name);
    let kir = s.str(&format!("{name}.kir"));
    let out = kiln(&["compile", &kir, "--target", "cpu", "--max-context", "1", "-o", &dir]);
    assert!(out.ok, "{}", out.stderr);
    dir
}

#[test]
fn threads_beyond_the_machine_are_refused_before_any_work() {
    let max = 4 * std::thread::available_parallelism().map_or(1, |n| n.get());
    let want = format!("100000 threads is more than this machine can use: at most {max}");
    refused(
        &[
            "run",
            "models/tiny.toml",
            "--interp",
            "--random-weights",
            "1",
            "--prompt-ids",
            "1",
            "--threads",
            "100000",
        ],
        &want,
    );
    // A train run would compile its step first: refused before that, and before its --out exists.
    let s = Scratch::new();
    let out = s.str("out");
    refused(
        &[
            "train",
            "models/tiny.toml",
            "--random-weights",
            "1",
            "--data",
            "tests/goldens/train/tokens.safetensors",
            "--steps",
            "1",
            "--out",
            &out,
            "--threads",
            "100000",
        ],
        &want,
    );
    assert!(s.entries().is_empty(), "{:?}", s.entries());
    refused(&["bench", "gemm", "--sizes", "8", "--threads", "100000"], &want);
}

#[test]
fn a_huge_max_new_tokens_does_not_wrap_the_length_check() {
    refused(
        &["run", "models/tiny.toml", "--interp", "--random-weights", "1", "--prompt-ids", "1",
          "--max-new-tokens", "18446744073709551615"],
        "1 prompt tokens + 18446744073709551615 new tokens = 18446744073709551616 exceed the model's context \
         of 1024 positions",
    );
}

#[test]
fn allocations_larger_than_the_machine_are_refused_not_aborted() {
    let s = Scratch::new();
    // 128 TB of weights, and a 8 TB arena: more than any machine these tests run on.
    let weight = compile_kir(
        &s,
        "weight",
        "graph @w {\n  %0 = input {name = \"x\"} : f32[B, T, 4000000]\n  \
         %1 = param {name = \"model.layers.0.mlp.up_proj.weight\"} : f32[4000000, 4000000]\n  \
         %2 = linear %0, %1 : f32[B, T, 4000000]\n  output \"logits\" = %2\n}\n",
    );
    let want =
        "cannot allocate 128000000000000 bytes (116.4 TiB) for the random weights (1 tensor): more than \
                this machine's memory of";
    refused(&["run", &weight, "--random-weights", "1", "--prompt-ids", "1"], want);
    refused(
        &["run", &weight, "--interp", "--random-weights", "1", "--prompt-ids", "1"],
        "cannot allocate 64000000000000 bytes (58.2 TiB) for the parameters as f32 (1 tensor)",
    );
    let arena = compile_kir(
        &s,
        "arena",
        "graph @a {\n  %0 = input {name = \"x\"} : f32[B, T, 1000000000000]\n  \
         %1 = exp %0 : f32[B, T, 1000000000000]\n  output \"logits\" = %1\n}\n",
    );
    refused(
        &["run", &arena, "--random-weights", "1", "--prompt-ids", "1"],
        "cannot allocate 8000000000000 bytes (7.3 TiB) for the activation arena: more than this machine's memory",
    );
}
