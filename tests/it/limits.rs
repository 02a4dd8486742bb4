//! Sizes, counts and lengths beyond what a machine or a model can hold (issue 16's crash and hang
//! reproducers): each is refused with a message saying what and what would be right, never a
//! panic, an abort or a run that does not end.

use crate::util::{kiln, kiln_env, Scratch};

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
        "cannot allocate 8000000000000 bytes (7.3 TiB) for the parameters (0 B), states (0 B) and activation arena (7.3 TiB) together: more than this machine's memory",
    );
}

/// The parameters, states (the KV cache) and activation arena are checked together before any of
/// them is allocated: each may fit while all of them do not, and the OOM killer then ends the
/// process without a word (models/tiny.toml compiled for `--max-context 100000 --max-batch 64`
/// wants a 3.8 GiB cache beside a 20 GiB arena). `KILN_MEMORY_LIMIT` takes the machine's memory
/// as smaller, so the test holds on any machine: one byte less than the load's sum is refused,
/// naming each part and where the limit came from, and the sum itself runs.
#[test]
fn a_load_whose_parts_fit_but_not_together_is_refused() {
    let s = Scratch::new();
    let dir = s.str("tiny.kiln");
    let out = kiln(&[
        "compile",
        "models/tiny.toml",
        "--target",
        "cpu",
        "--max-context",
        "64",
        "--max-batch",
        "2",
        "-o",
        &dir,
    ]);
    assert!(out.ok, "{}", out.stderr);
    let run = [
        "run",
        dir.as_str(),
        "--random-weights",
        "1",
        "--prompt-ids",
        "1",
        "--max-new-tokens",
        "2",
        "--json",
    ];
    let out = kiln(&run);
    assert!(out.ok, "{}", out.stderr);
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let engine = doc["engine"].as_str().unwrap().to_string();
    // "... arena N bytes, KV cache N bytes ..., parameters N bytes ...": the number before the
    // first " bytes" after `label`.
    let bytes = |label: &str| -> u64 {
        let at = engine.find(label).unwrap_or_else(|| panic!("no `{label}` in {engine}")) + label.len();
        engine[at..].trim_start().split(' ').next().unwrap().parse().unwrap()
    };
    let (arena, cache, params) = (bytes("arena"), bytes("KV cache"), bytes("parameters"));
    let total = arena + cache + params;
    let out = kiln_env(&run, &[("KILN_MEMORY_LIMIT", &(total - 1).to_string())]);
    assert!(!out.ok, "{}", out.stdout);
    let want = format!("error: cannot allocate {total} bytes (");
    assert!(out.stderr.starts_with(&want), "{}", out.stderr);
    assert!(
        out.stderr.contains(") together: more than this machine's memory of")
            && out.stderr.contains(&format!("{} bytes (", total - 1))
            && out.stderr.contains("; KILN_MEMORY_LIMIT)"),
        "{}",
        out.stderr
    );
    let out = kiln_env(&run, &[("KILN_MEMORY_LIMIT", &total.to_string())]);
    assert!(out.ok, "{}", out.stderr);
    let out = kiln_env(&run, &[("KILN_MEMORY_LIMIT", "16G")]);
    assert!(
        !out.ok && out.stderr.contains("KILN_MEMORY_LIMIT=\"16G\" is not a number of bytes"),
        "{}",
        out.stderr
    );
}

/// `kiln bench membw --mib` beyond what a machine can address, or hold, is refused before the
/// buffer is made (the first was a capacity-overflow panic, 2^44 wrapped to a 0-byte read).
#[test]
fn a_membw_read_beyond_the_machine_is_refused() {
    for mib in ["18446744073709551615", "17592186044416"] {
        refused(
            &["bench", "membw", "--mib", mib],
            &format!("--mib {mib} is more bytes than a machine can address"),
        );
    }
    refused(
        &["bench", "membw", "--mib", "1000000000"],
        "for the 1000000000 MiB read by --mib: more than this machine's memory",
    );
    refused(&["bench", "membw", "--mib", "8", "--reps", "0"], "--reps must be at least 1");
}

/// A loss or optimizer setting that is not a finite number in its range is refused naming the
/// flag, before anything is compiled: NaN was written to the manifest as `null`, which no kiln
/// could read back (`--clip nan` read back as no clipping), and an infinity reached the verifier
/// as "a kiln bug"; `1e39` is finite in f64 but not as the step's f32 constant.
#[test]
fn train_settings_that_are_not_finite_numbers_are_refused() {
    let s = Scratch::new();
    let out = s.str("out");
    for (flag, value, want) in [
        ("--balance-alpha", "nan", "--balance-alpha NaN: must be a finite number at least 0"),
        ("--bias-update-speed", "inf", "--bias-update-speed inf: must be a finite number at least 0"),
        ("--mtp-lambda", "1e39", "--mtp-lambda 1e39: must be a finite number at least 0"),
        ("--mtp-lambda", "-0.5", "--mtp-lambda -0.5: must be a finite number at least 0"),
        ("--clip", "nan", "--clip NaN: must be a finite number at least 0 (0 for no clipping)"),
        ("--betas", "0.9,1", "--betas 1: must be a finite number in [0, 1)"),
        ("--eps", "0", "--eps 0: must be a finite number above 0"),
    ] {
        let arg = format!("{flag}={value}");
        refused(&["compile", "models/tiny.toml", "--target", "cpu", "--train", &arg, "-o", &out], want);
        assert!(!s.path("out").exists(), "{arg}: an artifact was written");
    }
}

/// `kiln inspect --context` beyond the model's positions printed attention FLOPs saturated at
/// u64::MAX; `kiln serve --batch-window` of u64::MAX milliseconds held a lone request forever.
#[test]
fn an_inspect_context_or_a_batch_window_beyond_reason_is_refused() {
    refused(
        &["inspect", "models/tiny.toml", "--context", "18446744073709551615"],
        "--context 18446744073709551615: the context must be from 1 to the model's 1024 positions",
    );
    refused(&["inspect", "models/tiny.toml", "--context", "0"], "--context 0: the context must be from 1");
    refused(
        &["serve", "models/tiny.toml", "--interp", "--batch-window", "18446744073709551615"],
        "a batch's first request waits at most 60000 ms for others",
    );
}

/// `kiln compile X.kir --train` compiled the graph's forward program and said nothing of `--train`.
#[test]
fn a_kir_graph_is_not_compiled_for_training() {
    refused(
        &["compile", "tests/compile/small.kir", "--train", "--target", "cpu"],
        "--train builds the train step from a model spec (a .toml or a Hugging Face config.json); \
         tests/compile/small.kir is a .kir graph",
    );
}
