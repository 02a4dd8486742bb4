//! Speculative decoding with the MTP module (`kiln compile --speculative`, `kiln run
//! --speculative`): greedy, the tokens are plain greedy decoding's, token for token, in batches, at
//! stop tokens and length limits, in f32, bf16 and FP8; sampled, the tokens have plain sampling's
//! distribution; a module trained by `kiln train` has its drafts accepted; and every request it
//! cannot serve is refused with a clear error.
//!
//! The trained model: tiny, from seeded random weights, 100 steps of `kiln train --mtp-lambda 0.3`
//! on a sequence that repeats a 13-token phrase 70 % of the time (random tokens otherwise). Its
//! greedy continuation of the phrase is the phrase, and its MTP module learns the token after next
//! (measured: every draft accepted on the phrase).

use std::path::{Path, PathBuf};

use kiln_runtime::artifact::{self, Artifact};
use kiln_runtime::cpu::{CpuModel, CpuOptions};
use kiln_runtime::generate::{generate, generate_speculative, Flow, GenerateOptions, Generation, Sampling};
use kiln_runtime::weights;

use crate::util::{kiln, Scratch};

const PHRASE: [u16; 13] = [5, 17, 42, 8, 99, 23, 61, 3, 77, 12, 150, 33, 210];

/// `kiln compile SPEC --target cpu --speculative -o DIR/NAME`.
fn compile(dir: &Scratch, name: &str, spec: &str, extra: &[&str]) -> PathBuf {
    let out = dir.path(name);
    let o = out.to_string_lossy().into_owned();
    let r = kiln(
        &[&["compile", spec, "--target", "cpu", "-o", &o, "--max-batch", "3", "--max-context", "96"], extra]
            .concat(),
    );
    assert!(r.ok, "{}", r.stderr);
    out
}

/// The phrase data and a tiny model trained on it with the MTP loss; returns the checkpoint.
fn trained(dir: &Scratch) -> PathBuf {
    // SplitMix-like stream, so that the data is the same on every run.
    let mut state = 7u64;
    let mut next = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        state >> 33
    };
    let mut data: Vec<u16> = Vec::new();
    for _ in 0..2000 {
        if next() % 10 < 7 {
            data.extend(PHRASE);
        } else {
            data.extend((0..13).map(|_| (next() % 400) as u16));
        }
    }
    let bin = dir.path("phrase.bin");
    std::fs::write(&bin, data.iter().flat_map(|t| t.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let out = dir.path("trained");
    let (bin, o) = (bin.to_string_lossy().into_owned(), out.to_string_lossy().into_owned());
    #[rustfmt::skip]
    let r = kiln(&[
        "train", "models/tiny.toml", "--random-weights", "3", "--data", &bin, "--dtype", "u16",
        "--seq-len", "32", "--batch", "8", "--steps", "100", "--mtp-lambda", "0.3", "--lr", "3e-3",
        "--out", &o,
    ]);
    assert!(r.ok, "{}", r.stderr);
    out.join("step-100")
}

fn load(art: &Artifact, ckpt: Option<&Path>) -> CpuModel {
    let decls = weights::manifest_params(art.manifest()).unwrap();
    let opts = CpuOptions { threads: 2, ..CpuOptions::default() };
    match ckpt {
        Some(dir) => {
            let c = weights::open_checkpoint(dir).unwrap();
            CpuModel::load(art, weights::bind_params(decls, &c).unwrap(), &opts).unwrap()
        }
        None => CpuModel::load(art, weights::random_tensors(decls, 5, 0.02).map(Ok), &opts).unwrap(),
    }
}

fn greedy(n: usize, stop: &[i64]) -> GenerateOptions {
    GenerateOptions { max_new_tokens: n, sampling: Sampling::Greedy, stop_tokens: stop.to_vec() }
}

fn plain(m: &mut CpuModel, prompts: &[Vec<i64>], o: &GenerateOptions) -> Generation {
    generate(m, prompts, o, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"))
}

/// Speculative generation, checking that the callback sees each sequence's tokens in order.
fn speculative(m: &mut CpuModel, prompts: &[Vec<i64>], o: &GenerateOptions) -> Generation {
    let mut seen: Vec<Vec<i64>> = vec![Vec::new(); prompts.len()];
    let g = generate_speculative(m, prompts, o, &mut |e| {
        assert_eq!(e.step, seen[e.sequence].len(), "sequence {} step", e.sequence);
        seen[e.sequence].push(e.token);
        Flow::Continue
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(seen, g.tokens, "the callback saw every token");
    g
}

fn phrase_prompt(from: usize, len: usize) -> Vec<i64> {
    (0..len).map(|i| i64::from(PHRASE[(from + i) % PHRASE.len()])).collect()
}

#[test]
fn a_trained_mtp_module_drafts_tokens_that_greedy_decoding_makes() {
    let d = Scratch::new();
    let ckpt = trained(&d);
    let art = artifact::load(&compile(&d, "tiny", "models/tiny.toml", &["--speculative"])).unwrap();
    let mut m = load(&art, Some(&ckpt));
    // Three prompts of different lengths: two on the phrase, one off it.
    let prompts = vec![phrase_prompt(0, 4), phrase_prompt(5, 9), vec![300, 7, 250, 11, 1, 399]];
    for (n, stop) in [(40, vec![]), (7, vec![]), (30, vec![i64::from(PHRASE[6])])] {
        let o = greedy(n, &stop);
        let want = plain(&mut m, &prompts, &o);
        let got = speculative(&mut m, &prompts, &o);
        assert_eq!(got.tokens, want.tokens, "max {n}, stop {stop:?}");
        assert_eq!(got.stopped, want.stopped);
        let s = got.stats;
        println!(
            "max {n}: {} of {} drafts accepted, {} main passes against {}",
            s.accepted, s.drafted, s.forwards, want.stats.forwards
        );
        assert!(s.drafted > 0 && s.accepted <= s.drafted);
        if n == 40 {
            // The phrase is learnt: most drafts are right, and the main model runs far fewer times.
            assert!(s.acceptance().unwrap() > 0.6, "acceptance {:?}", s.acceptance());
            assert!(
                s.forwards < want.stats.forwards * 3 / 4,
                "{} against {}",
                s.forwards,
                want.stats.forwards
            );
        }
    }
    // One sequence alone is the same as in the batch.
    let alone = speculative(&mut m, &prompts[1..2], &greedy(40, &[]));
    let batch = speculative(&mut m, &prompts, &greedy(40, &[]));
    assert_eq!(alone.tokens[0], batch.tokens[1]);

    // Sampled at temperature 1: the first two decoded tokens have plain sampling's distribution
    // (200 seeds each, total variation distance against plain sampling's; the model is confident on
    // its phrase, so 200 draws resolve its distribution, which they would not at a temperature
    // that spreads it over hundreds of tokens: the rule itself is checked on 40,000 draws in
    // runtime/src/generate/speculative.rs), and drafts stand.
    let prompt = vec![phrase_prompt(0, 4)];
    let (mut plain_n, mut spec_n) = (std::collections::BTreeMap::new(), std::collections::BTreeMap::new());
    let (mut drafted, mut accepted) = (0, 0);
    for seed in 0..200 {
        let o = GenerateOptions {
            sampling: Sampling::Sample { temperature: 1.0, top_p: 1.0, seed },
            ..greedy(3, &[])
        };
        let p = plain(&mut m, &prompt, &o);
        let g = speculative(&mut m, &prompt, &o);
        for (n, toks) in [(&mut plain_n, &p.tokens[0]), (&mut spec_n, &g.tokens[0])] {
            for (i, &t) in toks.iter().enumerate().skip(1) {
                *n.entry((i, t)).or_insert(0usize) += 1;
            }
        }
        (drafted, accepted) = (drafted + g.stats.drafted, accepted + g.stats.accepted);
    }
    let keys: std::collections::BTreeSet<_> = plain_n.keys().chain(spec_n.keys()).collect();
    for step in [1, 2] {
        let tv: f64 = (keys.iter().filter(|k| k.0 == step))
            .map(|k| {
                let (a, b) = (plain_n.get(*k).copied().unwrap_or(0), spec_n.get(*k).copied().unwrap_or(0));
                (a as f64 - b as f64).abs() / 200.0
            })
            .sum::<f64>()
            / 2.0;
        println!("sampled, new token {step}: total variation {tv:.3} between plain and speculative");
        assert!(tv < 0.15, "new token {step}: total variation {tv}: {plain_n:?} against {spec_n:?}");
    }
    println!("sampled: {accepted} of {drafted} drafts accepted");
    assert!(drafted > 0 && accepted > drafted / 2, "{accepted} of {drafted}");

    // `kiln run --speculative --json`: the same tokens as without, and the acceptance reported.
    let art = art.dir().to_string_lossy().into_owned();
    let run = |extra: &[&str]| -> serde_json::Value {
        let ids = "5,17,42,8";
        let c = ckpt.to_string_lossy();
        let r = kiln(
            &[
                &["run", &art, "--weights", &c, "--prompt-ids", ids, "--max-new-tokens", "30", "--json"],
                extra,
            ]
            .concat(),
        );
        assert!(r.ok, "{}", r.stderr);
        serde_json::from_str(&r.stdout).unwrap()
    };
    let (want, got) = (run(&[]), run(&["--speculative"]));
    assert_eq!(got["tokens"], want["tokens"]);
    assert_eq!(want["stats"]["acceptance"], serde_json::Value::Null);
    let accepted = got["stats"]["drafts_accepted"].as_f64().unwrap();
    let drafts = got["stats"]["drafts"].as_f64().unwrap();
    assert!(
        drafts > 0.0 && got["stats"]["acceptance"].as_f64() == Some(accepted / drafts),
        "{}",
        got["stats"]
    );
}

#[test]
fn speculation_keeps_the_greedy_tokens_of_bf16_and_fp8_models() {
    let d = Scratch::new();
    for spec in ["models/tiny.toml", "models/tiny_fp8.toml"] {
        let art = artifact::load(&compile(&d, spec.trim_start_matches("models/"), spec, &["--speculative"]))
            .unwrap();
        let mut m = load(&art, None);
        let prompts = vec![vec![1, 2, 3], vec![9, 8, 7, 6, 5, 4, 3, 2]];
        let o = greedy(24, &[]);
        let want = plain(&mut m, &prompts, &o);
        let got = speculative(&mut m, &prompts, &o);
        assert_eq!(got.tokens, want.tokens, "{spec}");
        assert!(got.stats.drafted > 0, "{spec}: drafts were checked");
    }
}

#[test]
fn requests_speculation_cannot_serve_are_refused() {
    let d = Scratch::new();
    // An artifact without the draft program.
    let art = artifact::load(&compile(&d, "plain", "models/tiny.toml", &[])).unwrap();
    let mut m = load(&art, None);
    let e =
        generate_speculative(&mut m, &[vec![1, 2]], &greedy(4, &[]), &mut |_| Flow::Continue).unwrap_err();
    assert!(e.to_string().contains("no `draft` program") && e.to_string().contains("--speculative"), "{e}");
    // A temperature speculative sampling cannot take.
    let art = artifact::load(&compile(&d, "spec", "models/tiny.toml", &["--speculative"])).unwrap();
    let mut m = load(&art, None);
    let o = GenerateOptions {
        sampling: Sampling::Sample { temperature: -1.0, top_p: 1.0, seed: 1 },
        ..greedy(4, &[])
    };
    let e = generate_speculative(&mut m, &[vec![1, 2]], &o, &mut |_| Flow::Continue).unwrap_err();
    assert!(e.to_string().contains("temperature"), "{e}");
    // The CLI: a spec without an MTP module, and --speculative with --interp.
    let o = d.path("bench");
    let r = kiln(&[
        "compile",
        "models/bench.toml",
        "--target",
        "cpu",
        "--speculative",
        "-o",
        &o.to_string_lossy(),
    ]);
    assert!(!r.ok && r.stderr.contains("no MTP module"), "{}", r.stderr);
    assert!(!o.exists(), "nothing written");
    let r = kiln(&[
        "run",
        "models/tiny.toml",
        "--interp",
        "--speculative",
        "--random-weights",
        "1",
        "--prompt-ids",
        "1",
    ]);
    assert!(!r.ok && r.stderr.contains("--speculative"), "{}", r.stderr);
}

#[test]
fn bench_run_compares_speculative_with_plain_decoding() {
    let d = Scratch::new();
    let dir = compile(&d, "tiny", "models/tiny.toml", &["--speculative"]);
    let dir = dir.to_string_lossy();
    let args =
        ["bench", "run", &dir, "--prompt-len", "6", "--new-tokens", "9", "--threads", "2", "--speculative"];
    let out = kiln(&args);
    assert!(out.ok, "{}", out.stderr);
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("speculative (MTP draft"))
        .unwrap_or_else(|| panic!("{}", out.stdout));
    assert!(line.ends_with("tokens: the same as plain decoding"), "{line}");
    let j = kiln(&[&args[..], &["--json"]].concat());
    assert!(j.ok, "{}", j.stderr);
    let doc: serde_json::Value = serde_json::from_str(&j.stdout).unwrap();
    let s = &doc["speculative"];
    assert_eq!(s["tokens_same"], true);
    assert_eq!(s["tokens"], doc["engines"][0]["tokens"]);
    // The prefill makes the first token and each decode step one, or two when its draft stands;
    // every decode step checks a draft but a last one that needs a single token.
    let (drafts, passes) = (s["drafts"].as_u64().unwrap(), s["forward_passes"].as_u64().unwrap());
    let accepted = s["drafts_accepted"].as_u64().unwrap();
    assert_eq!(passes + accepted, 9, "{s}");
    assert!(drafts + 2 >= passes && drafts < passes, "{s}");
    assert_eq!(s["plain_forward_passes"], 9);

    // A batch of three prompts (the artifact's --max-batch), each sequence its own tokens, the
    // interpreter's; and one more round of each traced.
    let trace = d.path("bench.json");
    let trace_arg = trace.to_string_lossy();
    let batch = [&args[..], &["--batch", "3", "--trace", &trace_arg, "--json"]].concat();
    let j = kiln(&batch);
    assert!(j.ok, "{}", j.stderr);
    let doc: serde_json::Value = serde_json::from_str(&j.stdout).unwrap();
    assert_eq!(doc["batch"], 3);
    let tokens = doc["engines"][0]["tokens"].as_array().unwrap();
    assert!(tokens.len() == 3 && tokens.iter().all(|t| t.as_array().unwrap().len() == 9), "{doc}");
    assert_ne!(tokens[0], tokens[1], "the prompts differ");
    assert_eq!(doc["engines"][1]["tokens"], doc["engines"][0]["tokens"]);
    assert_eq!(doc["tokens_differ_from"], serde_json::Value::Null);
    assert_eq!(doc["roofline_fraction"], serde_json::Value::Null, "at batch 1 only");
    assert_eq!(doc["speculative"]["tokens"], doc["engines"][0]["tokens"]);
    let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let launches: Vec<&serde_json::Value> =
        t["traceEvents"].as_array().unwrap().iter().filter(|e| e["tid"] == 2).collect();
    for program in ["prefill", "decode", "draft"] {
        assert!(launches.iter().any(|e| e["args"]["program"] == program), "no {program} launch traced");
    }
    // The draft program's head runs on one position per sequence: its logits are [B, 1, V].
    let manifest = std::fs::read_to_string(Path::new(&*dir).join("manifest.json")).unwrap();
    let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    let draft = manifest["programs"].as_array().unwrap().iter().find(|p| p["name"] == "draft").unwrap();
    let logits = draft["outputs"].as_array().unwrap().iter().find(|o| o["name"] == "mtp_logits").unwrap();
    let buffer = &draft["buffers"][logits["buffer"].as_u64().unwrap() as usize];
    assert_eq!(buffer["shape"], serde_json::json!(["B", "1", "512"]), "{buffer}");
    // Without the interpreter: no interpreter row and no comparison of tokens.
    let quiet = kiln(&[&args[..], &["--batch", "2", "--no-interp"]].concat());
    assert!(quiet.ok, "{}", quiet.stderr);
    assert!(quiet.stdout.lines().next().unwrap().contains("a batch of 2 sequences"), "{}", quiet.stdout);
    assert!(quiet.stdout.contains("no interpreter (--no-interp)"), "{}", quiet.stdout);
    assert!(!quiet.stdout.lines().any(|l| l.starts_with("interpreter") || l.starts_with("tokens:")));
    assert!(quiet.stdout.contains("roofline: for batch 1 only"), "{}", quiet.stdout);
    let zero = kiln(&[&args[..], &["--batch", "0"]].concat());
    assert!(!zero.ok && zero.stderr.contains("--batch must be at least 1"), "{}", zero.stderr);
}

#[test]
fn the_draft_program_is_refused_without_the_speculative_build() {
    // `kiln bench run --speculative` on an artifact without the draft program says what to do.
    let d = Scratch::new();
    let dir = compile(&d, "tiny", "models/tiny.toml", &[]);
    let r = kiln(&[
        "bench",
        "run",
        &dir.to_string_lossy(),
        "--prompt-len",
        "4",
        "--new-tokens",
        "2",
        "--speculative",
    ]);
    assert!(!r.ok && r.stderr.contains("kiln compile --speculative"), "{}", r.stderr);
}
