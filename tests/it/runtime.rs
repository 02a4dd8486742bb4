//! The runtime on real artifacts: `kiln compile` output loaded by `kiln_runtime`, run on its
//! `kernels.so`, and checked against the reference interpreter on the artifact's own `module.kir`
//! and against Hugging Face transformers' logits and greedy continuation; generation in batches and
//! with sampling; FP8 weights bound as stored; and every way an artifact, its weights or a request
//! can be wrong, each refused with a clear error before anything runs or is written.
//!
//! Tolerances (measured, printed by the tests with `--nocapture`): the tiny model in f32 agrees with
//! the interpreter to 3e-7 of the logits' scale (6e-7 absolute; the kernels accumulate in f32 where
//! the interpreter accumulates dot products in f64), asserted at 1e-4; the golden model's logits are
//! within 3.4e-6 of transformers', asserted at 1e-4 like the interpreter's own golden test; the bf16
//! FP8 model is bit-identical to the interpreter (bf16 rounding absorbs the accumulation order),
//! asserted at 1e-3 of the scale; a row of a padded batch equals the same prompt alone exactly.

use std::path::{Path, PathBuf};

use kiln_ir::artifact::{FORMAT_VERSION, MANIFEST_FILE};
use kiln_ir::interp::Tensor;
use kiln_ir::DType;
use kiln_runtime::artifact::{self, Artifact};
use kiln_runtime::cpu::{CpuModel, CpuOptions};
use kiln_runtime::generate::{generate, Engine, GenerateOptions, Generation, Sampling};
use kiln_runtime::reference::Reference;
use kiln_runtime::weights::{self, HostData, HostTensor, StoreFloats, WeightError};
use kiln_runtime::RuntimeError;

use crate::util::{kiln, random_params, Scratch as TempDir};

const GOLDEN: &str = "tests/goldens/v3_tiny_yarn";
const GOLDEN_PROMPT: &str = "0,17,42,255,3,128,77,9,200";

/// `kiln compile INPUT --target cpu -o DIR/NAME EXTRA...`; returns the artifact's path.
fn compile(dir: &TempDir, name: &str, input: &str, extra: &[&str]) -> PathBuf {
    let out = dir.path(name);
    let o = out.to_string_lossy().into_owned();
    let r = kiln(&[&["compile", input, "--target", "cpu", "-o", &o], extra].concat());
    assert!(r.ok, "{}", r.stderr);
    out
}

fn str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The test helpers' seeded parameters (norms near 1, matrices of scale 1/sqrt(fan_in), so logits
/// are of order one) as host tensors, and as the interpreter's tensors.
fn params_of(art: &Artifact, seed: u64) -> Vec<HostTensor> {
    // Every program's parameters (the helpers seed each parameter by its name, so the programs
    // agree on the ones they share).
    let mut all = std::collections::BTreeMap::new();
    for p in art.module().unwrap().programs {
        all.extend(random_params(&p.graph, seed));
    }
    let mut ts: Vec<(String, Tensor)> = all.into_iter().collect();
    ts.sort_by(|a, b| a.0.cmp(&b.0));
    ts.into_iter()
        .map(|(name, t)| HostTensor {
            name,
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            data: HostData::F32(t.as_f32().unwrap().to_vec()),
        })
        .collect()
}

fn ok(ts: &[HostTensor]) -> impl Iterator<Item = Result<HostTensor, WeightError>> + '_ {
    ts.iter().cloned().map(Ok)
}

fn ids(name: &str, b: u64, t: u64, v: Vec<i64>) -> HostTensor {
    HostTensor { name: name.into(), dtype: DType::I32, shape: vec![b, t], data: HostData::I64(v) }
}

/// Tokens, positions and (for MTP) the shifted tokens of `rows`, all of one length.
fn token_inputs(rows: &[Vec<i64>], mtp: bool) -> Vec<HostTensor> {
    let (b, t) = (rows.len() as u64, rows[0].len() as u64);
    let mut v = vec![
        ids("tokens", b, t, rows.concat()),
        ids("positions", b, t, (0..b).flat_map(|_| 0..t as i64).collect()),
    ];
    if mtp {
        let shifted = rows.iter().flat_map(|r| (0..r.len()).map(|i| r.get(i + 1).copied().unwrap_or(0)));
        v.push(ids("mtp_tokens", b, t, shifted.collect()));
    }
    v
}

fn f32s(t: &HostTensor) -> &[f32] {
    match &t.data {
        HostData::F32(v) => v,
        HostData::I64(_) => panic!("{} is not a float tensor", t.name),
    }
}

/// Largest absolute difference, and that over the largest magnitude of `want` (the logits' scale).
fn diff(got: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().chain(want).all(|x| x.is_finite()), "non-finite values");
    assert!(want.iter().any(|&x| x != 0.0), "all zeros");
    let abs = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    let scale = want.iter().map(|x| x.abs()).fold(0.0, f32::max);
    (abs, abs / scale.max(f32::MIN_POSITIVE))
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions { max_new_tokens: n, sampling: Sampling::Greedy, stop_tokens: vec![] }
}

fn gen(
    engine: &mut dyn kiln_runtime::generate::Engine,
    prompts: &[Vec<i64>],
    o: &GenerateOptions,
) -> Generation {
    generate(engine, prompts, o, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_tiny_artifact_matches_the_interpreter_on_its_own_graph() {
    let d = TempDir::new();
    let dir = compile(
        &d,
        "tiny",
        "models/tiny.toml",
        &["--no-kv-cache", "--max-batch", "2", "--max-context", "16"],
    );
    let art = artifact::load(&dir).unwrap();
    let params = params_of(&art, 11);
    let one = CpuOptions { threads: 1, ..CpuOptions::default() };
    let mut model = CpuModel::load(&art, ok(&params), &one).unwrap();
    let compiled = art.manifest().programs.iter().map(|p| p.arena_bytes).max().unwrap();
    assert_eq!(model.arena_bytes() as u64, compiled, "one arena for the programs, at the compiled maxima");
    let mut reference = Reference::new(art.program_graph("forward").unwrap(), params.clone(), None).unwrap();

    let rows = vec![vec![1, 17, 42, 255, 3, 128, 77], vec![9, 200, 5, 6, 0, 511, 2]];
    let inputs = token_inputs(&rows, true);
    assert!(matches!(model.output("logits"), Err(RuntimeError::NotRun)));
    let sizes = model.run("forward", &inputs).unwrap();
    assert_eq!((sizes.b, sizes.t), (2, 7));
    let want = reference.run("forward", &inputs).unwrap().clone();
    for name in ["logits", "mtp_logits"] {
        let got = model.output(name).unwrap();
        assert_eq!(got.shape, vec![2, 7, 512]);
        let (abs, rel) = diff(f32s(&got), want[name].as_f32().unwrap());
        eprintln!("tiny {name}: max abs diff vs interpreter {abs:e}, relative to the logits' scale {rel:e}");
        assert!(rel <= 1e-4, "{name}: {abs:e} ({rel:e} of the scale)");
    }
    // A slice is the same numbers as the whole.
    let whole = model.output("logits").unwrap();
    assert_eq!(model.output_f32("logits", 512..1024).unwrap(), f32s(&whole)[512..1024]);
    assert!(matches!(
        model.output_f32("logits", 7000..7169),
        Err(RuntimeError::OutputRange { len: 7168, .. })
    ));

    // Splitting launches over threads changes nothing: every work item is computed alone.
    let many = CpuOptions { threads: 3, parallel_min_bytes: 0, ..CpuOptions::default() };
    let mut parallel = CpuModel::load(&art, ok(&params), &many).unwrap();
    parallel.run("forward", &inputs).unwrap();
    assert_eq!(parallel.output("logits").unwrap(), whole, "3 threads, every launch split");
    // Programs that share arena bytes cannot run interleaved (DualPipe's pairs are compiled apart),
    // and the refusal comes before anything is written.
    let e = model.run_pair(("forward", &inputs), ("forward", &inputs)).unwrap_err().to_string();
    assert!(e.contains("`forward` and `forward` cannot run interleaved: they share arena bytes 0.."), "{e}");
    assert_eq!(model.output("logits").unwrap(), whole);

    // And generation agrees token for token.
    let prompts = [rows[0].clone()];
    let a = gen(&mut model, &prompts, &greedy(6));
    let r = gen(&mut reference, &prompts, &greedy(6));
    assert_eq!(a.tokens, r.tokens);
    assert_eq!(a.stats.forwards, 6);
    assert_eq!((a.stats.prompt_tokens, a.stats.decode_tokens), (7, 5));
}

#[test]
fn the_golden_checkpoint_reproduces_transformers_through_the_artifact() {
    let d = TempDir::new();
    let config = format!("{GOLDEN}/config.json");
    // Every position's logits, to compare with transformers' (generation reads the last ones).
    let dir = compile(&d, "yarn", &config, &["--max-batch", "2", "--max-context", "16", "--all-logits"]);
    let out = kiln(&[
        "run",
        &str(&dir),
        "--weights",
        GOLDEN,
        "--prompt-ids",
        GOLDEN_PROMPT,
        "--max-new-tokens",
        "8",
        "--ignore-eos",
    ]);
    assert!(out.ok, "{}", out.stderr);
    // golden.json's "continuation": transformers' generate(..., do_sample=False).
    // Standard output is the new ids alone, as --prompt-ids takes them; the report is on stderr.
    assert_eq!(out.stdout, "51,10,89,138,46,46,186,46\n");
    assert!(out.stderr.contains("generated 8 tokens: [51, 10, 89, 138, 46, 46, 186, 46]"), "{}", out.stderr);
    assert_eq!(out.stderr.lines().filter(|l| l.starts_with("token ")).count(), 8);
    assert!(out.stderr.starts_with("v3_tiny_yarn: 9 prompt tokens, greedy, compiled artifact on the CPU"));
    let speeds = out.stderr.lines().last().unwrap();
    assert!(speeds.starts_with("time to first token ") && speeds.contains("tokens/s"), "{speeds}");

    // The whole forward pass of the golden batch against transformers' logits.
    let art = artifact::load(&dir).unwrap();
    let ckpt = weights::open_checkpoint(Path::new(GOLDEN)).unwrap();
    let bound = weights::bind_params(weights::manifest_params(art.manifest()).unwrap(), &ckpt).unwrap();
    let mut model = CpuModel::load(&art, bound, &CpuOptions::default()).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{GOLDEN}/golden.json")).unwrap()).unwrap();
    let rows: Vec<Vec<i64>> = serde_json::from_value(json["input_ids"].clone()).unwrap();
    model.run("prefill", &token_inputs(&rows, false)).unwrap();
    let want = weights::open_checkpoint(&Path::new(GOLDEN).join("golden.safetensors"))
        .unwrap()
        .read("logits")
        .unwrap();
    let (abs, rel) = diff(f32s(&model.output("logits").unwrap()), f32s(&want));
    eprintln!("v3_tiny_yarn logits: max abs diff vs transformers {abs:e} ({rel:e} of the scale)");
    assert!(abs <= 1e-4, "{abs:e}");
}

/// The default prefill computes the logits at each row's last prompt token alone (input `last`):
/// they are the rows an `--all-logits` prefill computes there, to the GEMM's rounding (a head of
/// one row against T), and generation from both artifacts, a batch of different lengths, picks the
/// same tokens. A `last` outside the run's new tokens is refused before anything runs.
#[test]
fn the_prefill_computes_each_rows_last_logits_alone() {
    let d = TempDir::new();
    let flags = ["--max-batch", "3", "--max-context", "16"];
    let last = compile(&d, "last", "models/tiny.toml", &flags);
    let all = compile(&d, "all", "models/tiny.toml", &[&flags[..], &["--all-logits"]].concat());
    let (last, all) = (artifact::load(&last).unwrap(), artifact::load(&all).unwrap());
    let params = params_of(&all, 4);
    let mut one = CpuModel::load(&last, ok(&params), &CpuOptions::default()).unwrap();
    let mut every = CpuModel::load(&all, ok(&params), &CpuOptions::default()).unwrap();
    let vocab = every.vocab_size().unwrap() as usize;
    assert_eq!(one.vocab_size(), every.vocab_size());
    let names =
        |m: &CpuModel| Engine::inputs(m, "prefill").unwrap().into_iter().map(|(n, _)| n).collect::<Vec<_>>();
    assert_eq!(names(&one), ["tokens", "positions", "last"]);
    assert_eq!(names(&every), ["tokens", "positions"]);
    // Three rows padded to 6 tokens; their last tokens are at 5, 2 and 0.
    let rows: Vec<i64> = vec![5, 17, 42, 8, 9, 10, 3, 4, 5, 0, 0, 0, 77, 0, 0, 0, 0, 0];
    let inputs =
        [ids("tokens", 3, 6, rows.clone()), ids("positions", 3, 6, (0..3).flat_map(|_| 0..6).collect())];
    every.run("prefill", &inputs).unwrap();
    let at = [5usize, 2, 0];
    let lasts = HostTensor {
        name: "last".into(),
        dtype: DType::I32,
        shape: vec![3],
        data: HostData::I64(at.map(|a| a as i64).to_vec()),
    };
    one.run("prefill", &[inputs[0].clone(), inputs[1].clone(), lasts.clone()]).unwrap();
    assert_eq!(one.output("logits").unwrap().shape, [3, 1, vocab as u64]);
    for (b, &t) in at.iter().enumerate() {
        let want = every.output_f32("logits", (b * 6 + t) * vocab..(b * 6 + t + 1) * vocab).unwrap();
        let got = one.output_f32("logits", b * vocab..(b + 1) * vocab).unwrap();
        let (abs, rel) = diff(&got, &want);
        assert!(rel <= 1e-5, "row {b}: max abs diff {abs:e} ({rel:e} relative)");
    }
    let prompts = vec![vec![5, 17, 42, 8, 9, 10], vec![3, 4, 5], vec![77]];
    let g = |m: &mut CpuModel| gen(m, &prompts, &greedy(6)).tokens;
    assert_eq!(g(&mut one), g(&mut every));
    // A last token outside the 6 new tokens of this run (though inside the loaded maximum, 16).
    let bad = HostTensor { data: HostData::I64(vec![5, 6, 0]), ..lasts };
    let e = one.run("prefill", &[inputs[0].clone(), inputs[1].clone(), bad]).unwrap_err();
    assert!(e.to_string().contains("input `last` element 1 is 6, outside 0..6"), "{e}");
}

#[test]
fn batches_of_different_lengths_and_sampling_match_one_at_a_time() {
    let d = TempDir::new();
    let dir = compile(
        &d,
        "tiny",
        "models/tiny.toml",
        &["--no-kv-cache", "--max-batch", "2", "--max-context", "24"],
    );
    let art = artifact::load(&dir).unwrap();
    let params = params_of(&art, 5);
    let mut model = CpuModel::load(&art, ok(&params), &CpuOptions::default()).unwrap();
    let prompts = vec![vec![3, 1, 4, 1, 5], vec![2, 7, 1, 8, 2, 8, 1, 8, 2]];
    let alone = |model: &mut CpuModel, o: &GenerateOptions| -> Vec<Vec<i64>> {
        prompts.iter().map(|p| gen(model, std::slice::from_ref(p), o).tokens.remove(0)).collect()
    };

    // Right padding is exact (causal attention): the batch gives each prompt's own continuation.
    let batch = gen(&mut model, &prompts, &greedy(8));
    assert_eq!(batch.tokens, alone(&mut model, &greedy(8)));
    assert_eq!(batch.stats.prompt_tokens, 14);

    // The last position of each row in a padded batch has the logits it has alone.
    let padded = vec![[prompts[0].clone(), vec![0; 4]].concat(), prompts[1].clone()];
    model.run("forward", &token_inputs(&padded, true)).unwrap();
    let row0 = model.output_f32("logits", 4 * 512..5 * 512).unwrap();
    model.run("forward", &token_inputs(&prompts[..1], true)).unwrap();
    let (abs, _) = diff(&row0, &model.output_f32("logits", 4 * 512..5 * 512).unwrap());
    eprintln!("padded batch vs alone: max abs diff {abs:e}");
    assert!(abs <= 1e-5, "{abs:e}");

    // Sampling: each sequence draws from the stream of its index in the batch, so the first
    // sequence samples what it samples alone, whatever runs beside it; the seed matters.
    let sampled = |seed| GenerateOptions {
        max_new_tokens: 8,
        sampling: Sampling::Sample { temperature: 0.9, top_p: 0.95, seed },
        stop_tokens: vec![],
    };
    let s = gen(&mut model, &prompts, &sampled(5));
    assert_eq!(s.tokens[0], alone(&mut model, &sampled(5))[0]);
    let other = gen(&mut model, &[prompts[0].clone(), vec![9; 3]], &sampled(5));
    assert_eq!(other.tokens[0], s.tokens[0]);
    assert_eq!(s.tokens, gen(&mut model, &prompts, &sampled(5)).tokens, "deterministic");
    assert_ne!(s.tokens, gen(&mut model, &prompts, &sampled(6)).tokens, "another seed, other tokens");

    // A stop token ends its sequence (and is kept); the other goes on.
    let stop = batch.tokens[0][2];
    let o = GenerateOptions { stop_tokens: vec![stop], ..greedy(8) };
    let mut seen = Vec::new();
    let g = generate(&mut model, &prompts, &o, &mut |e| seen.push((e.sequence, e.token))).unwrap();
    let first_stop = batch.tokens[0].iter().position(|&t| t == stop).unwrap();
    assert_eq!(g.tokens[0], batch.tokens[0][..=first_stop]);
    assert!(g.stopped[0]);
    assert_eq!(seen.iter().filter(|e| e.0 == 0).count(), first_stop + 1, "every token is reported");
}

/// FP8 weights (models/tiny_fp8.toml compiles with DeepSeek's FP8 recipe) written in DeepSeek's
/// checkpoint format, bound as stored (one byte per weight next to its f32 `_scale_inv`), and run.
#[test]
fn an_fp8_checkpoint_binds_without_dequantising_and_runs() {
    let d = TempDir::new();
    let dir = compile(&d, "fp8", "models/tiny_fp8.toml", &["--no-kv-cache", "--max-context", "8"]);
    let art = artifact::load(&dir).unwrap();
    let params = params_of(&art, 3);
    let fp8: Vec<&HostTensor> = params.iter().filter(|t| t.dtype == DType::F8E4M3).collect();
    assert!(fp8.len() > 20, "the FP8 recipe made FP8 weights");
    let ckpt_dir = d.path("ckpt");
    std::fs::create_dir(&ckpt_dir).unwrap();
    weights::write_safetensors(&ckpt_dir.join("model.safetensors"), &params, StoreFloats::AsDeclared)
        .unwrap();
    let ckpt = weights::open_checkpoint(&ckpt_dir).unwrap();
    assert!(fp8.iter().all(|t| ckpt.get(&t.name).unwrap().dtype == weights::StDType::F8E4M3));

    let bound = weights::bind_params(weights::manifest_params(art.manifest()).unwrap(), &ckpt).unwrap();
    let mut model = CpuModel::load(&art, bound, &CpuOptions::default()).unwrap();
    let fp8_bytes: u64 = fp8.iter().map(|t| t.data.len() as u64).sum();
    let all_bytes: u64 = params.iter().map(|t| t.data.len() as u64 * t.dtype.size_bytes()).sum();
    assert_eq!(model.param_bytes() as u64, all_bytes, "FP8 weights take one byte each");
    assert!(fp8_bytes * 2 > all_bytes / 2, "most of the bytes are FP8 weights");

    let mut reference = Reference::new(art.program_graph("forward").unwrap(), params.clone(), None).unwrap();
    let inputs = token_inputs(&[vec![1, 17, 42, 255, 3, 128]], true);
    model.run("forward", &inputs).unwrap();
    let want = reference.run("forward", &inputs).unwrap();
    let (abs, rel) = diff(f32s(&model.output("logits").unwrap()), want["logits"].as_f32().unwrap());
    eprintln!("tiny_fp8 logits: max abs diff vs interpreter {abs:e} ({rel:e} of the scale)");
    assert!(rel <= 1e-3, "{abs:e} ({rel:e} of the scale)");
}

/// Runs `kiln run` on `dir` with `extra` and checks that it fails with `want` in its message,
/// printing nothing on standard output and leaving the directory as it was.
#[track_caller]
fn refused(dir: &Path, extra: &[&str], want: &str) {
    let listing = |p: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let before = listing(dir);
    let d = str(dir);
    let out = kiln(&[&["run", d.as_str()], extra].concat());
    assert!(!out.ok, "{}", out.stdout);
    assert!(out.stderr.starts_with("error: ") && out.stderr.contains(want), "want `{want}`:\n{}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert_eq!(out.stdout, "", "nothing is printed before the error");
    assert_eq!(listing(dir), before, "nothing is written");
}

#[test]
fn bad_artifacts_weights_and_requests_are_refused_clearly() {
    let d = TempDir::new();
    let dir = compile(&d, "tiny", "models/tiny.toml", &["--max-context", "16"]);
    let run = ["--random-weights", "1", "--prompt-ids", "1,2,3", "--max-new-tokens", "2"];
    let copy = |name: &str| {
        let to = d.path(name);
        std::fs::create_dir(&to).unwrap();
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
        to
    };

    // A flipped byte in the library.
    let tampered = copy("tampered");
    let mut so = std::fs::read(tampered.join("kernels.so")).unwrap();
    let middle = so.len() / 2;
    so[middle] ^= 0x20;
    std::fs::write(tampered.join("kernels.so"), &so).unwrap();
    refused(&tampered, &run, "file `kernels.so` does not match its SHA-256");
    // A truncated library and a truncated manifest.
    let short = copy("short");
    std::fs::write(short.join("kernels.so"), &so[..1000]).unwrap();
    refused(&short, &run, "file `kernels.so` has 1000 bytes but the manifest says");
    let text = std::fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap();
    let cut = copy("cut");
    std::fs::write(cut.join(MANIFEST_FILE), &text[..text.len() / 2]).unwrap();
    refused(&cut, &run, "not a manifest this kiln can read: EOF while parsing");
    // Another format version.
    let v2 = copy("v2");
    std::fs::write(
        v2.join(MANIFEST_FILE),
        text.replace(&format!("\"format_version\": {FORMAT_VERSION},"), "\"format_version\": 2,"),
    )
    .unwrap();
    refused(
        &v2,
        &run,
        &format!("artifact format version 2, but this kiln reads version {FORMAT_VERSION}: recompile it with this kiln"),
    );
    // A manifest naming an entry the library does not export.
    let nosym = copy("nosym");
    let entry = text.split("\"symbol\":\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    std::fs::write(nosym.join(MANIFEST_FILE), text.replace(&entry, &format!("{entry}x"))).unwrap();
    refused(&nosym, &run, &format!("`{entry}x` is not the packed entry of kernel"));
    // A directory that is not an artifact, and a missing file.
    refused(&d.0, &run, "not a kiln artifact (no manifest.json)");
    let missing = copy("missing");
    std::fs::remove_file(missing.join("module.kir")).unwrap();
    refused(&missing, &run, "file `module.kir`, listed in the manifest, is missing");

    // Weights missing a tensor.
    let art = artifact::load(&dir).unwrap();
    let mut params: Vec<HostTensor> =
        weights::random_tensors(weights::manifest_params(art.manifest()).unwrap(), 1, 0.02).collect();
    let dropped = params.remove(3).name;
    let ckpt = d.path("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    weights::write_safetensors(&ckpt.join("model.safetensors"), &params, StoreFloats::AsDeclared).unwrap();
    let c = str(&ckpt);
    refused(
        &dir,
        &["--weights", &c, "--prompt-ids", "1"],
        &format!("lacks 1 tensor(s) the graph needs: `{dropped}`"),
    );
    let e = CpuModel::load(&art, ok(&params), &CpuOptions::default()).err().unwrap();
    assert!(matches!(&e, RuntimeError::MissingParam { name, .. } if *name == dropped), "{e}");

    // Requests: a prompt longer than the planned context, a bad token id, a bad option, CUDA.
    let base = ["--random-weights", "1", "--max-new-tokens", "8"];
    let long = (0..10).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    refused(
        &dir,
        &[&base[..], &["--prompt-ids", &long]].concat(),
        "10 prompt tokens + 8 new tokens need 17 positions, but the KV cache (16 positions",
    );
    // A prompt longer than the prefill takes is that, not "20 prompt tokens + 0 new tokens".
    let longer = (0..20).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    refused(
        &dir,
        &[&base[..], &["--prompt-ids", &longer]].concat(),
        "the prompt has 20 tokens, but the artifact as loaded (T <= 16; kiln compile --max-context) \
         prefills at most 16 at once",
    );
    // The largest --max-new-tokens does not wrap the length check around.
    refused(
        &dir,
        &["--random-weights", "1", "--prompt-ids", "1,2,3", "--max-new-tokens", "18446744073709551615"],
        "3 prompt tokens + 18446744073709551615 new tokens need 18446744073709551617 positions, but the KV \
         cache (16 positions",
    );
    refused(
        &dir,
        &[&base[..], &["--prompt-ids", "1", "--threads", "100000"]].concat(),
        "100000 threads is more than this machine can use",
    );
    refused(
        &dir,
        &[&base[..], &["--prompt-ids", "1,2,512"]].concat(),
        "prompt token 2 is 512, outside the vocabulary",
    );
    refused(
        &dir,
        &[&base[..], &["--prompt-ids", "1", "--temperature", "1", "--top-p", "0"]].concat(),
        "top-p",
    );
    refused(
        &dir,
        &[&base[..], &["--prompt-ids", "1", "--threads", "0"]].concat(),
        "threads must be at least 1",
    );
    let cuda = if kiln_runtime::cuda::driver_present() {
        "CUDA backend is not written yet"
    } else {
        "no CUDA driver"
    };
    refused(&dir, &[&base[..], &["--prompt-ids", "1", "--device", "cuda"]].concat(), cuda);

    // The library checks every input before anything runs (on the stateless graph, whose MTP
    // inputs are token ids too).
    let dir = compile(&d, "stateless", "models/tiny.toml", &["--no-kv-cache", "--max-context", "16"]);
    let art = artifact::load(&dir).unwrap();
    let params: Vec<HostTensor> =
        weights::random_tensors(weights::manifest_params(art.manifest()).unwrap(), 1, 0.02).collect();
    let small = CpuOptions { max: Some(kiln_ir::SymBindings { b: 1, t: 8, s: 1 }), ..CpuOptions::default() };
    let mut m = CpuModel::load(&art, ok(&params), &small).unwrap();
    let compiled = art.manifest().programs.iter().map(|p| p.arena_bytes).max().unwrap();
    assert!((m.arena_bytes() as u64) < compiled, "a smaller arena for smaller maxima");
    let good = token_inputs(&[vec![1, 2, 3]], true);
    m.run("forward", &good).unwrap();
    let before = m.output("logits").unwrap();
    let mut bad = good.clone();
    bad[2] = ids("mtp_tokens", 1, 3, vec![4, 512, 0]);
    let e = m.run("forward", &bad).unwrap_err();
    assert!(
        matches!(&e, RuntimeError::TokenOutOfRange { name, index: 1, value: 512, vocab: 512 }
            if name == "mtp_tokens"),
        "{e}"
    );
    let e = m.run("forward", &token_inputs(&[vec![1; 9]], true)).unwrap_err();
    assert_eq!(e.to_string(), "T = 9 is outside 1..=8, the sizes this model was loaded for");
    let mut bad = good.clone();
    bad[1] = ids("positions", 1, 4, vec![0, 1, 2, 3]);
    assert!(matches!(m.run("forward", &bad), Err(RuntimeError::SizeConflict { sym: "T", .. })));
    let mut bad = good.clone();
    bad[0].dtype = DType::I64;
    assert!(matches!(m.run("forward", &bad), Err(RuntimeError::InputType { .. })));
    assert!(matches!(m.run("forward", &good[..2]), Err(RuntimeError::MissingInput { .. })));
    let mut bad = good.clone();
    bad[0].name = "token".into();
    assert!(matches!(m.run("forward", &bad), Err(RuntimeError::UnknownInput { .. })));
    assert_eq!(m.output("logits").unwrap(), before, "failed runs leave the last outputs alone");
    let big = CpuOptions { max: Some(kiln_ir::SymBindings { b: 2, t: 8, s: 1 }), ..CpuOptions::default() };
    let e = CpuModel::load(&art, ok(&params), &big).err().unwrap();
    assert!(
        e.to_string().starts_with("B = 2 is outside 1..=1, the sizes the artifact was compiled for"),
        "{e}"
    );
}

#[test]
fn pipeline_steps_need_the_distributed_runtime() {
    let d = TempDir::new();
    let kir = d.path("stage.kir");
    std::fs::write(
        &kir,
        "graph @stage {\n  %0 = input {name = \"x\"} : f32[B, T, 8]\n  %1 = exp %0 : f32[B, T, 8]\n  \
         send %1 {peer = 1, tag = 3}\n  output \"y\" = %1\n}\n",
    )
    .unwrap();
    let dir = compile(&d, "stage", &str(&kir), &[]);
    let art = artifact::load(&dir).unwrap();
    let e =
        CpuModel::load(&art, std::iter::empty::<Result<HostTensor, WeightError>>(), &CpuOptions::default())
            .err()
            .unwrap();
    assert!(matches!(&e, RuntimeError::Distributed { what, .. } if what == "send to stage 1"), "{e}");
}

#[test]
fn bench_run_compares_the_artifact_with_the_interpreter() {
    let d = TempDir::new();
    let dir = compile(&d, "tiny", "models/tiny.toml", &["--max-context", "16"]);
    let out = kiln(&["bench", "run", &str(&dir), "--prompt-len", "6", "--new-tokens", "3", "--threads", "2"]);
    assert!(out.ok, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines[0].starts_with("bench run tiny: 6 prompt tokens, 3 new tokens, greedy, 2 threads"),
        "{}",
        out.stdout
    );
    for (line, label) in lines[2..4].iter().zip(["kiln artifact", "interpreter"]) {
        assert!(line.starts_with(label), "{line}");
        let nums: Vec<f64> = line[label.len()..].split_whitespace().map(|x| x.parse().unwrap()).collect();
        assert!(nums.len() == 3 && nums.iter().all(|&x| x > 0.0), "{line}");
    }
    assert!(lines[4].starts_with("ratio") && lines[4].matches('x').count() == 2, "{}", lines[4]);
    assert!(lines[5].starts_with("roofline: a decoded token reads "), "{}", lines[5]);
    assert_eq!(lines[6], "tokens: the same (3 of 3)");
    let j = kiln(&[
        "bench",
        "run",
        &str(&dir),
        "--prompt-len",
        "6",
        "--new-tokens",
        "3",
        "--threads",
        "2",
        "--json",
    ]);
    assert!(j.ok, "{}", j.stderr);
    let doc: serde_json::Value =
        serde_json::from_str(&j.stdout).unwrap_or_else(|e| panic!("{e}: {}", j.stdout));
    let engines = doc["engines"].as_array().unwrap();
    assert_eq!(engines[0]["tokens"], engines[1]["tokens"]);
    assert_eq!(engines[0]["tokens"].as_array().unwrap().len(), 3);
    assert!(engines.iter().all(|e| e["prefill_tokens_per_s"].as_f64().unwrap() > 0.0));
    assert_eq!(doc["tokens_differ_from"], serde_json::Value::Null);
    // The roofline: every parameter's bytes once, but top_k / E of the routed experts and one row of
    // the embedding table; decode tokens/s over bandwidth / bytes.
    let art = artifact::load(&dir).unwrap();
    let m = art.manifest();
    let spec = m.model.as_ref().unwrap();
    let moe = spec.moe.as_ref().unwrap();
    let bytes = |p: &kiln_ir::artifact::ParamEntry| {
        kiln_ir::artifact::bytes_of(p.dtype, &p.shape, &m.max_sizes()).unwrap() as f64
    };
    let all: f64 = m.params.iter().map(bytes).sum();
    let routed: f64 = m.params.iter().filter(|p| p.name.contains(".mlp.experts.")).map(bytes).sum();
    assert!(routed > 0.0);
    let row = (spec.model.hidden_size * 4) as f64;
    let want = all
        - routed * (1.0 - moe.num_experts_per_tok as f64 / moe.n_routed_experts as f64)
        - row * (spec.model.vocab_size - 1) as f64;
    let got = doc["decode_weight_bytes_per_token"].as_f64().unwrap();
    assert!((got - want).abs() <= 1.0, "{got} vs {want}");
    let (bw, roof) =
        (doc["read_bytes_per_s"].as_f64().unwrap(), doc["roofline_decode_tokens_per_s"].as_f64().unwrap());
    assert!(bw > 0.0 && (roof - bw / got).abs() <= 1e-9 * roof, "{doc}");
    let decode = engines[0]["decode_tokens_per_s"].as_f64().unwrap();
    assert!((doc["roofline_fraction"].as_f64().unwrap() - decode / roof).abs() <= 1e-9, "{doc}");

    let mb = kiln(&["bench", "membw", "--mib", "8", "--reps", "1", "--threads", "2"]);
    assert!(mb.ok, "{}", mb.stderr);
    let rows: Vec<Vec<&str>> = mb.stdout.lines().skip(2).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.iter().map(|r| r[0]).collect::<Vec<_>>(), ["1", "2"], "{}", mb.stdout);
    assert!(rows.iter().all(|r| r[1].parse::<f64>().unwrap() > 0.0), "{}", mb.stdout);
}

#[test]
fn kiln_run_on_an_artifact_with_interp_uses_its_graph() {
    let d = TempDir::new();
    let dir = str(&compile(&d, "tiny", "models/tiny.toml", &["--max-context", "16"]));
    let base = ["run", &dir, "--random-weights", "4", "--prompt-ids", "5,6,7", "--ignore-eos"];
    let with = |extra: &[&str]| kiln(&[&base[..], extra].concat());
    let (compiled, interp) = (with(&["--max-new-tokens", "4"]), with(&["--max-new-tokens", "4", "--interp"]));
    assert!(compiled.ok && interp.ok, "{}{}", compiled.stderr, interp.stderr);
    let tokens = |s: &str| s.lines().find(|l| l.starts_with("generated")).unwrap().to_string();
    assert_eq!(tokens(&compiled.stderr), tokens(&interp.stderr));
    assert_eq!(compiled.stdout, interp.stdout);
    assert!(interp.stderr.contains("reference interpreter on module.kir"), "{}", interp.stderr);

    let sampled =
        |seed| with(&["--max-new-tokens", "6", "--temperature", "1.5", "--top-p", "0.9", "--seed", seed]);
    let (s1, s1b, s2) = (sampled("1"), sampled("1"), sampled("2"));
    assert!(s1.stderr.contains("sampled at temperature 1.5, top-p 0.9, seed 1"), "{}", s1.stderr);
    assert_eq!(tokens(&s1.stderr), tokens(&s1b.stderr));
    assert_ne!(tokens(&s1.stderr), tokens(&s2.stderr));
}

#[test]
fn expert_load_counts_what_the_interpreter_routes() {
    use std::collections::HashMap;

    use kiln_ir::interp::run_with;
    use kiln_ir::op::Op;
    use kiln_runtime::reference::to_tensor;

    let d = TempDir::new();
    // Without fuse-kernels, whose `router` rule puts `moe_route` inside a fused kernel where the
    // interpreter's watch below cannot see it.
    let extra =
        ["--no-kv-cache", "--disable-pass", "fuse-kernels", "--max-batch", "2", "--max-context", "16"];
    let dir = compile(&d, "tiny", "models/tiny.toml", &extra);
    let art = artifact::load(&dir).unwrap();
    let params = params_of(&art, 23);
    let two = CpuOptions { threads: 2, parallel_min_bytes: 0, ..CpuOptions::default() };
    let mut model = CpuModel::load(&art, ok(&params), &two).unwrap();
    let rows = vec![vec![1, 17, 42, 255, 3, 128, 77], vec![9, 200, 5, 6, 0, 511, 2]];
    let inputs = token_inputs(&rows, true);
    let fresh = model.expert_load();
    assert!(!fresh.is_empty() && fresh.iter().all(|l| l.routed() == 0));
    model.run("forward", &inputs).unwrap();
    let got = model.expert_load();

    // The interpreter on the same graph and weights: the experts each `moe_route` chose, and the
    // rows each `moe_dispatch` gave each expert, by the module they come from.
    let graph = art.program_graph("forward").unwrap();
    let mut watched: HashMap<kiln_ir::ValueId, (String, bool)> = HashMap::new();
    for n in graph.nodes() {
        let node = graph.node(n);
        let scope = node.scope.clone().unwrap_or_default();
        match node.op {
            Op::MoeRoute(_) => drop(watched.insert(node.results[1], (scope, true))),
            Op::MoeDispatch(_) => drop(watched.insert(node.results[1], (scope, false))),
            _ => {}
        }
    }
    let feeds: HashMap<String, Tensor> =
        inputs.iter().map(|t| (t.name.clone(), to_tensor(t.clone()).unwrap())).collect();
    let weights: HashMap<String, Tensor> =
        params.iter().map(|t| (t.name.clone(), to_tensor(t.clone()).unwrap())).collect();
    let (mut routed, mut dispatched) = (HashMap::new(), HashMap::new());
    run_with(&graph, &feeds, &weights, &mut |v, t| {
        let Some((scope, is_route)) = watched.get(&v) else { return };
        let x = t.as_i64().unwrap();
        if *is_route {
            let mut counts = vec![0u64; 16];
            x.iter().for_each(|&e| counts[e as usize] += 1);
            routed.insert(scope.clone(), counts);
        } else {
            dispatched.insert(scope.clone(), x.windows(2).map(|w| (w[1] - w[0]) as u64).collect::<Vec<_>>());
        }
    })
    .unwrap();

    let tokens = 2 * 7;
    assert_eq!(got.len(), routed.len(), "one entry per MoE layer");
    for l in &got {
        assert_eq!(l.top_k, 4);
        assert_eq!(l.counts.len(), 16, "{}", l.label);
        assert_eq!(l.routed(), tokens * 4, "{}: tokens x top_k", l.label);
        assert_eq!(l.tokens(), tokens);
        assert_eq!(Some(&l.counts), routed.get(&l.label), "{}: the router's choices", l.label);
        assert_eq!(Some(&l.counts), dispatched.get(&l.label), "{}: the interpreter's offsets", l.label);
        assert!(l.imbalance().unwrap() >= 1.0);
    }

    // Runs accumulate; a reset starts again from zero.
    model.run("forward", &inputs[..]).unwrap();
    let twice = model.expert_load();
    for (a, b) in got.iter().zip(&twice) {
        assert_eq!(b.counts, a.counts.iter().map(|c| 2 * c).collect::<Vec<_>>());
    }
    model.reset_expert_load();
    assert!(model.expert_load().iter().all(|l| l.routed() == 0));

    // The CLI: 3 prompt tokens and 2 new ones are two forward passes, of 3 then 4 tokens.
    let d = str(&dir);
    let base = ["run", &d, "--random-weights", "4", "--prompt-ids", "5,6,7", "--ignore-eos"];
    let r = kiln(&[&base[..], &["--max-new-tokens", "2", "--expert-load"]].concat());
    assert!(r.ok, "{}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().filter(|l| l.starts_with("model.layers.")).collect();
    assert_eq!(lines.len(), got.len(), "{}", r.stderr);
    for (line, l) in lines.iter().zip(&got) {
        let want = format!("{}: 7 tokens x top-4 over 16 experts; rows per expert min ", l.label);
        assert!(
            line.starts_with(&want) && line.contains("mean 1.8 max") && line.contains("busiest e"),
            "{line}"
        );
    }
    let interp = kiln(&[&base[..], &["--expert-load", "--interp"]].concat());
    assert!(!interp.ok && interp.stderr.contains("not available with --interp"), "{}", interp.stderr);

    // --json: one document on standard output with the same tokens, loads and a profile; the
    // report still on standard error.
    let j = kiln(&[&base[..], &["--max-new-tokens", "2", "--expert-load", "--profile", "--json"]].concat());
    assert!(j.ok, "{}", j.stderr);
    let doc: serde_json::Value =
        serde_json::from_str(&j.stdout).unwrap_or_else(|e| panic!("{e}: {}", j.stdout));
    let plain: Vec<i64> = r.stdout.trim().split(',').map(|t| t.parse().unwrap()).collect();
    let tokens: Vec<i64> = doc["tokens"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect();
    assert_eq!(tokens, plain);
    assert_eq!(doc["prompt_ids"], serde_json::json!([5, 6, 7]));
    assert_eq!(doc["finish_reason"], "length");
    assert_eq!(doc["logits"].as_array().unwrap().len(), 2);
    assert_eq!(doc["stats"]["forward_passes"], 2);
    assert_eq!(doc["stats"]["kv_cache"], false, "compiled with --no-kv-cache");
    let loads = doc["expert_load"].as_array().unwrap();
    assert_eq!(loads.len(), got.len());
    for (l, want) in loads.iter().zip(&got) {
        assert_eq!(l["layer"], want.label.as_str());
        let rows: u64 = l["rows_per_expert"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).sum();
        assert_eq!(rows, 7 * 4, "7 tokens x top-4");
    }
    let profile = doc["profile"].as_array().unwrap();
    assert!(!profile.is_empty() && profile.iter().all(|k| k["launches"].as_u64().unwrap() > 0));
    assert!(j.stderr.contains("generated 2 tokens") && j.stderr.contains("by kind: "), "{}", j.stderr);
}

/// Logits rows `rows` (flat row indices of `[B, T]`) of the last run's `logits`.
fn logits_rows(model: &CpuModel, vocab: usize, rows: impl IntoIterator<Item = usize>) -> Vec<Vec<f32>> {
    rows.into_iter().map(|r| model.output_f32("logits", r * vocab..(r + 1) * vocab).unwrap()).collect()
}

#[test]
fn prefill_then_decode_matches_full_recomputation_at_every_position() {
    let d = TempDir::new();
    let dir =
        compile(&d, "tiny", "models/tiny.toml", &["--max-batch", "2", "--max-context", "16", "--all-logits"]);
    let art = artifact::load(&dir).unwrap();
    let programs: Vec<&str> = art.manifest().programs.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(programs, ["prefill", "decode", "score"], "what a spec compiles to by default");
    let params = params_of(&art, 5);
    let mut model = CpuModel::load(&art, ok(&params), &CpuOptions::default()).unwrap();
    let cache = model.kv_cache().expect("a KV cache shared by the prefill and the decode program");
    let vocab = model.vocab_size().unwrap() as usize;
    // tiny: 4 layers with the latent cache of kv_lora_rank + qk_rope = 32 + 8 f32 (after
    // fuse-mla-latent), or the naive per-head keys and values before it.
    let (bytes, slots) = (cache.bytes, model.max_sizes().b * cache.capacity);
    assert_eq!(slots, 2 * 16);
    let spec = art.manifest().model.clone().unwrap();
    let a = &spec.attention;
    let latent = a.kv_lora_rank + a.qk_rope_head_dim;
    let naive = a.num_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim);
    let per_token = bytes / slots / spec.model.num_hidden_layers / 4;
    assert!(per_token == latent || per_token == naive, "{per_token} elements per token and layer");

    let seq: Vec<i64> = vec![3, 141, 59, 26, 5, 35, 89, 79, 32, 38, 46, 26];
    let n = seq.len();
    // Full recomputation: one prefill over the whole sequence gives the logits of every position.
    model
        .run(
            "prefill",
            &[
                ids("tokens", 1, n as u64, seq.clone()),
                ids("positions", 1, n as u64, (0..n as i64).collect()),
            ],
        )
        .unwrap();
    let full = logits_rows(&model, vocab, 0..n);
    // Prefill the first 4 tokens, then decode the rest one at a time.
    let k = 4;
    model
        .run(
            "prefill",
            &[
                ids("tokens", 1, k as u64, seq[..k].to_vec()),
                ids("positions", 1, k as u64, (0..k as i64).collect()),
            ],
        )
        .unwrap();
    let mut worst = 0.0f32;
    for (p, want) in full.iter().enumerate().take(k) {
        let (abs, _) = diff(&logits_rows(&model, vocab, [p])[0], want);
        worst = worst.max(abs);
    }
    for (p, want) in full.iter().enumerate().skip(k) {
        model
            .run("decode", &[ids("tokens", 1, 1, vec![seq[p]]), ids("positions", 1, 1, vec![p as i64])])
            .unwrap();
        let (abs, rel) = diff(&logits_rows(&model, vocab, [0])[0], want);
        assert!(rel < 1e-5, "position {p}: max abs diff {abs} (relative {rel})");
        worst = worst.max(abs);
    }
    eprintln!("prefill-then-decode vs full recomputation over {n} positions: max abs diff {worst:e}");

    // The same continuation as the interpreter, which recomputes the whole sequence each step.
    let mut reference = Reference::new(art.program_graph("prefill").unwrap(), params.clone(), None).unwrap();
    let prompt = [seq[..5].to_vec()];
    assert_eq!(gen(&mut model, &prompt, &greedy(8)).tokens, gen(&mut reference, &prompt, &greedy(8)).tokens);
}

#[test]
fn a_batch_over_the_kv_cache_matches_one_sequence_at_a_time() {
    let d = TempDir::new();
    let dir = compile(&d, "tiny", "models/tiny.toml", &["--max-batch", "3", "--max-context", "24"]);
    let art = artifact::load(&dir).unwrap();
    let params = params_of(&art, 8);
    let mut model = CpuModel::load(&art, ok(&params), &CpuOptions::default()).unwrap();
    let prompts = vec![vec![7, 8, 9], vec![1, 2, 3, 4, 5, 6, 7, 8, 9], vec![200, 100]];
    let events = |model: &mut CpuModel, ps: &[Vec<i64>], o: &GenerateOptions| {
        let mut ev = Vec::new();
        generate(model, ps, o, &mut |e| ev.push(*e)).unwrap();
        ev
    };
    let o = greedy(6);
    let batched = events(&mut model, &prompts, &o);
    for (i, p) in prompts.iter().enumerate() {
        let alone = events(&mut model, std::slice::from_ref(p), &o);
        let mine: Vec<_> = batched.iter().filter(|e| e.sequence == i).collect();
        assert_eq!(mine.len(), alone.len());
        for (b, a) in mine.iter().zip(&alone) {
            assert_eq!(b.token, a.token, "sequence {i} step {}", a.step);
            assert!(
                (b.logit - a.logit).abs() < 1e-5,
                "sequence {i} step {}: {} vs {}",
                a.step,
                b.logit,
                a.logit
            );
        }
    }
    // A sequence that stops early (at its first token that the others never make) leaves the
    // others exact.
    let others: Vec<i64> = batched.iter().filter(|e| e.sequence != 2).map(|e| e.token).collect();
    let third: Vec<i64> = batched.iter().filter(|e| e.sequence == 2).map(|e| e.token).collect();
    let at = third.iter().position(|t| !others.contains(t)).expect("a token only the third sequence makes");
    let o = GenerateOptions { stop_tokens: vec![third[at]], ..greedy(6) };
    let g = gen(&mut model, &prompts, &o);
    assert!(g.stopped[2] && g.tokens[2] == third[..=at], "{:?}", g.tokens);
    for i in 0..2 {
        let alone = gen(&mut model, &prompts[i..=i], &o);
        assert_eq!(g.tokens[i], alone.tokens[0]);
    }
}

#[test]
fn kv_cache_limits_are_checked_before_anything_runs() {
    let d = TempDir::new();
    let dir = compile(&d, "tiny", "models/tiny.toml", &["--max-context", "8"]);
    let art = artifact::load(&dir).unwrap();
    let params = params_of(&art, 2);
    let mut model = CpuModel::load(&art, ok(&params), &CpuOptions::default()).unwrap();
    // Prompt + new tokens beyond the cache's 8 positions.
    let e = generate(&mut model, &[vec![1, 2, 3, 4, 5, 6]], &greedy(4), &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("need 9 positions, but the KV cache (8 positions"), "{e}");
    // A decode position outside the cache.
    let e =
        model.run("decode", &[ids("tokens", 1, 1, vec![1]), ids("positions", 1, 1, vec![8])]).unwrap_err();
    assert_eq!(e.to_string(), "position 8 of sequence 0 is outside the KV cache of 8 slots");
    // The caches are the model's: a caller cannot pass one.
    let cache = model.manifest().states[0].name.clone();
    let inputs = [ids("tokens", 1, 1, vec![1]), ids("positions", 1, 1, vec![0]), ids(&cache, 1, 1, vec![0])];
    let e = model.run("prefill", &inputs).unwrap_err();
    assert!(e.to_string().contains(&cache), "{e}");
    // A stateless artifact has no decode program.
    let dir = compile(&d, "stateless", "models/tiny.toml", &["--max-context", "8", "--no-kv-cache"]);
    let art = artifact::load(&dir).unwrap();
    let mut model = CpuModel::load(&art, ok(&params_of(&art, 2)), &CpuOptions::default()).unwrap();
    let e =
        model.run("decode", &[ids("tokens", 1, 1, vec![1]), ids("positions", 1, 1, vec![0])]).unwrap_err();
    assert!(e.to_string().contains("has no program `decode`"), "{e}");
}

/// A manifest is code the runtime trusts for memory safety: each of these hand edits used to crash
/// the process or print wrong tokens without a word; each is now refused before anything runs,
/// naming the field.
#[test]
fn hand_edited_manifests_are_refused_naming_the_field() {
    let d = TempDir::new();
    let dir = compile(&d, "tiny", "models/tiny.toml", &["--max-context", "16"]);
    let text = std::fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap();
    let good: serde_json::Value = serde_json::from_str(&text).unwrap();
    let run = ["--random-weights", "1", "--prompt-ids", "1,2,3", "--max-new-tokens", "2"];
    let edited = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let to = d.path(name);
        std::fs::create_dir(&to).unwrap();
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
        let mut m = good.clone();
        edit(&mut m);
        std::fs::write(to.join(MANIFEST_FILE), serde_json::to_string(&m).unwrap()).unwrap();
        to
    };

    // A work range far beyond the buffers: the library's signature of the kernel says otherwise.
    let work = edited("work", &|m| m["kernels"][0]["cpu"]["work"] = "99999999*B*T".into());
    refused(&work, &run, "manifest field `kernels[0].cpu.work` does not match kernel");
    refused(&work, &run, "work 99999999*B*T");
    // Any symbol of the process: only the kernel's own packed entry is ever looked up.
    let abort = edited("abort", &|m| m["kernels"][0]["cpu"]["symbol"] = "abort".into());
    refused(
        &abort,
        &run,
        "manifest field `kernels[0].cpu.symbol`: `abort` is not the packed entry of kernel",
    );
    // Two kernels' entries swapped.
    let swapped = edited("swapped", &|m| {
        let (a, b) = (m["kernels"][0]["cpu"]["symbol"].clone(), m["kernels"][1]["cpu"]["symbol"].clone());
        m["kernels"][0]["cpu"]["symbol"] = b;
        m["kernels"][1]["cpu"]["symbol"] = a;
    });
    refused(&swapped, &run, "manifest field `kernels[0].cpu.symbol`");
    // The first activation moved onto bytes another live buffer holds.
    let first = good["programs"][0]["buffers"]
        .as_array()
        .unwrap()
        .iter()
        .position(|b| {
            b["kind"] == "activation" && b["storage"]["in"] == "arena" && b["storage"]["offset"] != 0
        })
        .unwrap();
    let overlap = edited("overlap", &|m| m["programs"][0]["buffers"][first]["storage"]["offset"] = 0.into());
    refused(&overlap, &run, &format!("manifest field `programs[0].buffers[{first}].storage.offset`"));
    refused(&overlap, &run, "overlaps");

    // The same through the library: typed errors, nothing loaded.
    let load = |dir: &Path| {
        let art = artifact::load(dir)?;
        let params = weights::random_tensors(weights::manifest_params(art.manifest()).unwrap(), 1, 0.02);
        CpuModel::load(&art, params.map(Ok), &CpuOptions::default()).map(drop)
    };
    let e = load(&work).unwrap_err();
    assert!(
        matches!(&e, RuntimeError::KernelSignature { field, .. } if field == "kernels[0].cpu.work"),
        "{e}"
    );
    let e = load(&overlap).unwrap_err();
    assert!(matches!(&e, RuntimeError::InvalidManifest { .. }), "{e}");
    load(&dir).unwrap();
}

/// `kiln run --trace`: one complete event per program run and per launch, the launches of each run
/// inside its span and as many as its program has, named by fusion rule (or op) and scope, with
/// the kernel's hash name only as an argument.
#[test]
fn run_trace_names_each_launch_by_rule_and_scope() {
    let d = TempDir::new();
    let dir =
        compile(&d, "tiny", "models/tiny.toml", &["--max-batch", "1", "--max-context", "32", "--no-score"]);
    let trace = d.path("trace.json");
    let out = kiln(&[
        "run",
        &str(&dir),
        "--random-weights",
        "1",
        "--prompt-ids",
        "1,2,3,4",
        "--max-new-tokens",
        "3",
        "--threads",
        "1",
        "--trace",
        &str(&trace),
    ]);
    assert!(out.ok, "{}", out.stderr);
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let events: Vec<&serde_json::Value> =
        doc["traceEvents"].as_array().unwrap().iter().filter(|e| e["ph"] == "X").collect();
    let art = artifact::load(&dir).unwrap();
    let launches_of = |name: &str| {
        let p = art.manifest().programs.iter().find(|p| p.name == name).unwrap();
        p.steps.iter().filter(|s| matches!(s, kiln_ir::artifact::Step::Launch { .. })).count()
    };
    let span = |e: &serde_json::Value| {
        (e["ts"].as_f64().unwrap(), e["ts"].as_f64().unwrap() + e["dur"].as_f64().unwrap())
    };
    // The prefill, then a decode per new token after the first.
    let runs: Vec<&&serde_json::Value> = events.iter().filter(|e| e["tid"] == 1).collect();
    let names: Vec<&str> = runs.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["prefill", "decode", "decode"]);
    let kernels: Vec<&&serde_json::Value> = events.iter().filter(|e| e["tid"] == 2).collect();
    // Each run's launches: those of its program that are not weight-only (computed once at load).
    let per_run: Vec<usize> = runs
        .iter()
        .map(|r| {
            let (rs, re) = span(r);
            kernels
                .iter()
                .filter(|k| k["cat"] == r["name"] && rs <= span(k).0 && span(k).1 <= re + 1e-3)
                .count()
        })
        .collect();
    assert_eq!(per_run.iter().sum::<usize>(), kernels.len(), "{per_run:?}");
    assert_eq!(per_run[1], per_run[2], "every decode runs the same launches");
    assert!(per_run[0] <= launches_of("prefill") && per_run[1] <= launches_of("decode"), "{per_run:?}");
    assert!(per_run[0] > launches_of("prefill") / 2 && per_run[1] > launches_of("decode") / 2, "{per_run:?}");
    assert!(
        out.stderr.contains(&format!("trace: 3 runs and {} launches written to", kernels.len())),
        "{}",
        out.stderr
    );
    let span = |e: &serde_json::Value| {
        (e["ts"].as_f64().unwrap(), e["ts"].as_f64().unwrap() + e["dur"].as_f64().unwrap())
    };
    for k in &kernels {
        let (s, e) = span(k);
        let inside = runs.iter().filter(|r| r["name"] == k["cat"]).any(|r| {
            let (rs, re) = span(r);
            rs <= s && e <= re + 1e-3
        });
        assert!(inside, "{k} lies in no run of its program");
        let name = k["name"].as_str().unwrap();
        assert!(!name.starts_with("k_"), "named by rule, not hash: {name}");
        assert!(k["args"]["kernel"].as_str().unwrap().starts_with("k_"), "{k}");
    }
    let named = |prefix: &str| kernels.iter().any(|k| k["name"].as_str().unwrap().starts_with(prefix));
    assert!(named("gemm-swiglu model.layers."), "a fused MLP launch, by rule and scope");
    assert!(named("cache_update model.layers.0.self_attn"), "an unfused op, by op and scope");
    assert!(named("decode-phases model.layers."), "tiny's decode layers, by rule and scope");
    // --trace with --interp is refused: there are no launches to trace.
    let out = kiln(&[
        "run",
        &str(&dir),
        "--interp",
        "--random-weights",
        "1",
        "--prompt-ids",
        "1",
        "--trace",
        &str(&trace),
    ]);
    assert!(!out.ok && out.stderr.contains("--trace records the compiled kernels"), "{}", out.stderr);
}

/// An FP8 model whose GEMM inputs are not multiples of the 128-wide block (tiny: 64, 32) compiles,
/// with `[ceil(out / 128), ceil(in / 128)]` scales, and the artifact generates what the interpreter
/// does, logits within 1e-4: every block and activation tile is a partial one. Then again with
/// `modules_to_not_convert = []`, which puts the output head in FP8 too.
#[test]
fn an_fp8_model_with_ragged_blocks_compiles_and_matches_the_interpreter() {
    let d = TempDir::new();
    let ragged = "tests/specs/tiny_fp8_ragged.toml";
    let text = std::fs::read_to_string(crate::util::root().join(ragged)).unwrap();
    assert!(text.trim_end().ends_with("activation_scheme = \"dynamic\""), "[quantization] comes last");
    let head = d.path("head.toml");
    std::fs::write(&head, format!("{text}modules_to_not_convert = []\n")).unwrap();
    // With the head in FP8, the last hidden state is quantised too: where the artifact's and the
    // interpreter's differ by rounding across an E4M3 code boundary, a logit moves by the product of
    // that one code step with its weight (1.2e-4 measured), so the bound is 1e-3 there.
    let cases = [("ragged", ragged.to_string(), "f32", 1e-4), ("head", str(&head), "f8e4m3", 1e-3)];
    for (name, spec, head_dtype, bound) in cases {
        ragged_matches_the_interpreter(&d, name, &spec, head_dtype, bound);
    }
}

fn ragged_matches_the_interpreter(d: &TempDir, name: &str, spec: &str, head_dtype: &str, bound: f32) {
    let dir = compile(d, name, spec, &["--max-context", "32"]);
    let art = artifact::load(&dir).unwrap();
    let param = |n: &str| art.manifest().params.iter().find(|p| p.name == n).cloned();
    let scale = param("model.layers.0.mlp.down_proj.weight_scale_inv");
    // down_proj: [hidden 64, intermediate 128] in 128 x 128 blocks: one partial row of blocks.
    let dims: Vec<String> = scale.expect("down_proj's scale").shape.iter().map(|d| d.to_string()).collect();
    assert_eq!(dims, ["1", "1"]);
    assert_eq!(param("lm_head.weight").unwrap().dtype.to_string(), head_dtype, "{name}");
    assert_eq!(param("lm_head.weight_scale_inv").is_some(), head_dtype == "f8e4m3", "{name}");
    let run = |extra: &[&str]| {
        let logits = d.path(&format!("logits{}.txt", extra.len()));
        let args = ["run", &str(&dir), "--random-weights", "5", "--prompt-ids", "1,2,3,4,5,6,7"];
        let out =
            kiln(&[&args[..], &["--max-new-tokens", "4", "--dump-logits", &str(&logits)], extra].concat());
        assert!(out.ok, "{}", out.stderr);
        let rows: Vec<Vec<f32>> = std::fs::read_to_string(logits)
            .unwrap()
            .lines()
            .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
            .collect();
        (out.stdout, rows)
    };
    let (compiled, a) = run(&[]);
    let (interp, b) = run(&["--interp"]);
    assert_eq!(compiled, interp, "{name}: the same tokens");
    let worst = a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(a.len() == 4 && worst <= bound, "{name}: {worst:e}");
}
