//! The training monitor of `kiln train` under injected faults (`--inject-fault`, see
//! `src/monitor.rs`): each fault raises its alert, `rollback` recovers to exactly the run that
//! skipped the offending batch, a NaN written into one compiled kernel's output is reported with
//! that op's scope, and `stop` ends the run with a clear error and its checkpoint intact. Also the
//! per-layer gradient norms of the train step, against the interpreter and a direct computation.
//!
//! Every run trains models/tiny.toml on 28 rows of a 4-token cycle (which it learns within a few
//! steps, so that a fault stands out) with batches of 2 rows at lr 1e-2, from one train step
//! compiled once per test process (`kiln compile --train`), so each run takes seconds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln_compiler::autodiff::{differentiate, GRAD_PREFIX};
use kiln_compiler::build::{self, TrainLosses};
use kiln_compiler::train::{layer_of, program, Optimizer, TrainPrograms};
use kiln_ir::interp::{self, Tensor};
use kiln_runtime::data::TokenRows;
use kiln_runtime::reference::to_tensor;
use kiln_runtime::train::{step_inputs, CompiledTrainer, Trainer};
use kiln_runtime::weights::{self, HostData, HostTensor, StoreFloats};

use crate::util::{kiln, root, Out, Scratch};

const ROWS: usize = 28;
const WIDTH: usize = 17;

/// Row `r` of the data: the cycle 10, 11, 12, 13 from `10 + r % 4`.
fn row(r: usize) -> Vec<i64> {
    (0..WIDTH).map(|k| 10 + ((r + k) % 4) as i64).collect()
}

/// Writes the rows `which` as a token file `tokens` [N, 17].
fn write_rows(path: &Path, which: &[usize]) {
    let tokens = HostTensor {
        name: "tokens".into(),
        dtype: kiln_ir::DType::I64,
        shape: vec![which.len() as u64, WIDTH as u64],
        data: HostData::I64(which.iter().flat_map(|&r| row(r)).collect()),
    };
    weights::write_safetensors(path, &[tokens], StoreFloats::AsDeclared).unwrap();
}

/// Compiles the train step of models/tiny.toml for batches of 2 rows of 16 tokens into `dir`,
/// with `extra` flags.
fn compile_step(dir: &Path, extra: &[&str]) {
    let base = [
        "compile",
        "models/tiny.toml",
        "--train",
        "--target",
        "cpu",
        "--max-batch",
        "2",
        "--max-context",
        "16",
    ];
    let c = kiln(&[&base[..], extra, &["-o", dir.to_str().unwrap()]].concat());
    assert!(c.ok, "{}", c.stderr);
}

/// The train step of models/tiny.toml for batches of 2 rows of 16 tokens, compiled once.
fn artifact() -> &'static Path {
    static ART: OnceLock<PathBuf> = OnceLock::new();
    ART.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("monitor-train.kiln");
        compile_step(&dir, &[]);
        dir
    })
}

/// `kiln train` of the compiled step on `data` for `steps` steps, checkpoints every 4, with the
/// spike window shortened to the run's length, and `extra` flags.
fn train(data: &Path, out: &Path, steps: u64, extra: &[&str]) -> Out {
    let (art, data, out, steps) =
        (artifact().to_str().unwrap(), data.to_str().unwrap(), out.to_str().unwrap(), steps.to_string());
    let base = [
        "train",
        art,
        "--data",
        data,
        "--random-weights",
        "1",
        "--batch",
        "2",
        "--lr",
        "1e-2",
        "--steps",
        &steps,
        "--save-every",
        "4",
        "--spike-window",
        "5",
        "--spike-warmup",
        "4",
        "--out",
        out,
    ];
    kiln(&[&base[..], extra].concat())
}

/// The lines of `metrics.jsonl` in `dir`: the step lines and the event lines (but the
/// `monitor_copies` line every run starts with, checked below).
fn log(dir: &Path) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let lines = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
    let lines: Vec<serde_json::Value> = lines.filter(|l| l["event"] != "monitor_copies").collect();
    lines.into_iter().partition(|l| l.get("event").is_none())
}

/// A fault with `--on-anomaly rollback` (or `skip-batch`): it raises `kinds` at some step, the
/// run goes back to the checkpoint of step 8 (or undoes the step) and skips the batch of that
/// step, and ends with exactly the losses, weights and optimizer state of a run on the data
/// without that batch's rows.
fn recovers(fault: &str, policy: &str, kinds: &[&str]) {
    let s = Scratch::new();
    let all: Vec<usize> = (0..ROWS).collect();
    write_rows(&s.path("all.safetensors"), &all);
    let r = train(
        &s.path("all.safetensors"),
        &s.path("a"),
        12,
        &["--on-anomaly", policy, "--inject-fault", fault],
    );
    assert!(r.ok, "{}", r.stderr);
    let (steps, events) = log(&s.path("a"));
    let alerts: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "alert").collect();
    let alerted: Vec<&str> = alerts.iter().map(|a| a["kind"].as_str().unwrap()).collect();
    assert!(
        kinds.iter().any(|k| alerted.contains(k)),
        "{fault}: alerts {alerted:?}, wanted one of {kinds:?}"
    );
    assert!(alerts.iter().all(|a| a["action"] == policy), "{alerts:?}");
    let step = alerts[0]["step"].as_u64().unwrap();
    assert!(r.stderr.contains(&format!("alert: step {step}: {}", alerted[0])), "{}", r.stderr);
    let rollback: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "rollback").collect();
    let skip: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "skip").collect();
    assert_eq!(skip.len(), 1, "{events:?}");
    if policy == "rollback" {
        assert_eq!(rollback.len(), 1, "{events:?}");
        assert_eq!((rollback[0]["step"].as_u64(), rollback[0]["to"].as_u64()), (Some(step), Some(8)));
        assert_eq!(skip[0]["rows"], rollback[0]["rows"], "the replay skips the batch");
    } else {
        assert!(rollback.is_empty(), "{events:?}");
        assert_eq!(skip[0]["why"], "skip-batch");
    }
    let skipped: Vec<usize> =
        skip[0]["rows"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    assert_eq!(skip[0]["step"].as_u64(), Some(step));
    assert_eq!(skipped, [2 * (step as usize - 1), 2 * step as usize - 1], "the batch of step {step}");
    // `kiln report` draws the run with the alert marked, self-contained.
    let r = kiln(&["report", &s.str("a")]);
    assert!(r.ok && r.stdout.contains("report.html (12 steps"), "{}{}", r.stdout, r.stderr);
    let page = std::fs::read_to_string(s.path("a/report.html")).unwrap();
    for id in ["loss", "grad-norm", "grad-norm-layers", "lr", "tokens-per-s"] {
        assert!(page.contains(&format!("<figure id=\"{id}\">")), "{id}");
    }
    assert_eq!(page.matches("<svg class=\"heatmap\"").count(), 3, "models/tiny.toml's three MoE layers");
    assert_eq!(page.matches("<figure class=\"bias\"").count(), 3);
    assert!(page.contains(&format!(">{} @{step}</text>", alerted[0])), "the alert marked");
    assert!(!page.contains("http") && !page.contains("<script"));
    // Steps 9.. are logged twice (before and after the rollback); the last line of each counts.
    let last = |n: u64| steps.iter().rev().find(|l| l["step"] == n).unwrap()["loss"].as_f64().unwrap();

    // The run that never saw the batch.
    let kept: Vec<usize> = all.iter().copied().filter(|r| !skipped.contains(r)).collect();
    write_rows(&s.path("kept.safetensors"), &kept);
    let r = train(&s.path("kept.safetensors"), &s.path("b"), 12, &[]);
    assert!(r.ok, "{}", r.stderr);
    let (want, events) = log(&s.path("b"));
    assert!(events.is_empty(), "the clean run raises nothing: {events:?}");
    for w in &want {
        let n = w["step"].as_u64().unwrap();
        assert_eq!(last(n), w["loss"].as_f64().unwrap(), "{fault}: step {n}'s loss");
    }
    eprintln!("{fault}: alert at step {step}, final loss {} as the run without rows {skipped:?}", last(12));
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let (x, y) = (s.path("a/step-12").join(f), s.path("b/step-12").join(f));
        assert_eq!(std::fs::read(x).unwrap(), std::fs::read(y).unwrap(), "{fault}: {f} differs");
    }
}

#[test]
fn a_poisoned_batch_raises_a_loss_spike_and_rollback_ends_as_the_run_without_it() {
    recovers("poison-batch@10", "rollback", &["loss_spike"]);
}

#[test]
fn skip_batch_undoes_the_poisoned_step_and_ends_as_the_run_without_the_batch() {
    recovers("poison-batch@10", "skip-batch", &["loss_spike"]);
}

#[test]
fn an_lr_spike_raises_a_spike_and_rollback_ends_as_the_run_without_the_batch() {
    recovers("lr-spike:100@10", "rollback", &["loss_spike", "grad_norm_spike"]);
}

/// A step kept early (within the spike warm-up) at a learning rate blown up 1e30 times breaks the
/// weights: every later batch is non-finite. skip-batch undoes batch after batch, and after
/// `MAX_SKIPS_IN_A_ROW` (10) stops at the next failure with an error that says so, where it used to
/// go round the data for ever.
#[test]
fn skip_batch_gives_up_when_every_batch_fails() {
    let s = Scratch::new();
    write_rows(&s.path("d.safetensors"), &(0..ROWS).collect::<Vec<_>>());
    let r = train(
        &s.path("d.safetensors"),
        &s.path("w"),
        12,
        &["--on-anomaly", "skip-batch", "--inject-fault", "lr-spike:1e30@2"],
    );
    assert!(!r.ok, "{}", r.stderr);
    assert!(r.stderr.contains("after 10 batches in a row were undone and skipped"), "{}", r.stderr);
    assert!(r.stderr.contains("the weights, not the batches, are likely broken"), "{}", r.stderr);
    let (steps, events) = log(&s.path("w"));
    assert_eq!(steps.len(), 2, "steps 1 and 2 kept");
    assert_eq!(events.iter().filter(|e| e["event"] == "skip").count(), 10, "{events:?}");
}

/// NaN written at step 3 into a launch of the first micro-batch (with `--micro-batch`, the
/// `accumulate` program's), so that the step's gradient sums are NaN: skip-batch undoes the step
/// and zeroes the accumulators, and the run ends as the run without the batch. Before they were
/// zeroed, the next step's first micro-batch started its sum from the NaN times 0, every later
/// step failed, and skip-batch dropped batch after batch for ever.
#[test]
fn skip_batch_clears_the_gradient_accumulators_of_a_step_undone() {
    let s = Scratch::new();
    let art = s.str("acc.kiln");
    compile_step(&s.path("acc.kiln"), &["--accumulate"]);
    let run = |data: &str, out: &str, extra: &[&str]| {
        let base = [
            "train",
            &art,
            "--data",
            data,
            "--random-weights",
            "1",
            "--batch",
            "2",
            "--micro-batch",
            "1",
            "--lr",
            "1e-2",
            "--steps",
            "6",
            "--spike-window",
            "5",
            "--spike-warmup",
            "4",
            "--out",
            out,
        ];
        kiln(&[&base[..], extra].concat())
    };
    let all: Vec<usize> = (0..ROWS).collect();
    write_rows(&s.path("all.safetensors"), &all);
    let scope = "model.layers.2.self_attn";
    let r = run(
        &s.str("all.safetensors"),
        &s.str("a"),
        &["--on-anomaly", "skip-batch", "--inject-fault", &format!("nan:{scope}@3")],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.contains(&format!("in scope {scope} (")), "{}", r.stderr);
    let (steps, events) = log(&s.path("a"));
    let skips: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "skip").collect();
    assert_eq!(skips.len(), 1, "one batch skipped, then the run goes on: {events:?}");
    assert_eq!((skips[0]["step"].as_u64(), skips[0]["rows"].clone()), (Some(3), serde_json::json!([4, 5])));

    let kept: Vec<usize> = all.iter().copied().filter(|r| ![4, 5].contains(r)).collect();
    write_rows(&s.path("kept.safetensors"), &kept);
    let r = run(&s.str("kept.safetensors"), &s.str("b"), &[]);
    assert!(r.ok, "{}", r.stderr);
    let (want, _) = log(&s.path("b"));
    assert_eq!(steps.len(), want.len());
    for (got, want) in steps.iter().zip(&want) {
        assert_eq!((&got["step"], &got["loss"]), (&want["step"], &want["loss"]));
    }
    let f = "model.safetensors";
    assert_eq!(
        std::fs::read(s.path("a/step-6").join(f)).unwrap(),
        std::fs::read(s.path("b/step-6").join(f)).unwrap()
    );
}

/// NaN written into the first launch of `model.layers.2.self_attn` at step 3: the step is
/// non-finite, the re-check names that scope (and the interpreter finds the step finite), and
/// under the default policy the run stops with step 2's state as the last written.
#[test]
fn a_nan_injected_into_one_kernel_is_reported_with_its_scope() {
    let s = Scratch::new();
    write_rows(&s.path("d.safetensors"), &(0..ROWS).collect::<Vec<_>>());
    let scope = "model.layers.2.self_attn";
    let r = train(&s.path("d.safetensors"), &s.path("n"), 4, &["--inject-fault", &format!("nan:{scope}@3")]);
    assert!(!r.ok, "{}", r.stdout);
    assert!(r.stderr.contains("alert: step 3: non_finite"), "{}", r.stderr);
    assert!(
        r.stderr.contains("the compiled step: the first non-finite value is %")
            && r.stderr.contains(&format!("in scope {scope} (")),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("the reference interpreter: the step is finite"), "{}", r.stderr);
    assert!(r.stderr.contains("a non-finite step cannot be kept"), "{}", r.stderr);
    let (steps, events) = log(&s.path("n"));
    assert_eq!(steps.len(), 2);
    let nf = events.iter().find(|e| e["event"] == "non_finite").unwrap();
    assert_eq!(nf["compiled"]["scope"], scope);
    assert!(nf["compiled"]["op"].as_str().unwrap().starts_with("k_"), "{nf}");
    assert_eq!(nf["interpreter"], "finite");
    // An unknown scope is refused, naming the known ones.
    let r = train(&s.path("d.safetensors"), &s.path("u"), 4, &["--inject-fault", "nan:model.nowhere@1"]);
    assert!(
        !r.ok && r.stderr.contains("no launch of program `train_step` is in scope `model.nowhere`"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("model.layers.2.self_attn"), "{}", r.stderr);
    assert!(!s.path("u/metrics.jsonl").exists() || log(&s.path("u")).0.is_empty(), "refused before any step");
    let r = train(&s.path("d.safetensors"), &s.path("v"), 4, &["--inject-fault", "poison-batch@9"]);
    assert!(!r.ok && r.stderr.contains("the run has 4 steps; give a step from 1 to 4"), "{}", r.stderr);
}

/// `--on-anomaly stop`: the run ends nonzero at the spike with the alert in its error, and the
/// checkpoint of step 8 is as a clean run's.
#[test]
fn stop_ends_the_run_with_a_clear_error_and_its_checkpoint_intact() {
    let s = Scratch::new();
    write_rows(&s.path("d.safetensors"), &(0..ROWS).collect::<Vec<_>>());
    let r = train(
        &s.path("d.safetensors"),
        &s.path("x"),
        12,
        &["--on-anomaly", "stop", "--inject-fault", "poison-batch@10"],
    );
    assert!(!r.ok);
    let last = s.path("x/step-8");
    let want = format!(
        "error: step 10: loss_spike: the loss [..]; stopping as --on-anomaly stop asks; the last checkpoint, {}, is intact",
        last.display()
    );
    let line = r.stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_default();
    let (head, tail) = want.split_once("[..]").unwrap();
    assert!(line.starts_with(head) && line.ends_with(tail), "{}", r.stderr);
    assert!(!s.path("x/step-12").exists());
    let trainer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(last.join("trainer.json")).unwrap()).unwrap();
    assert_eq!(trainer["step"], 8);
    let r = train(&s.path("d.safetensors"), &s.path("y"), 8, &[]);
    assert!(r.ok, "{}", r.stderr);
    let (x, y) = (last.join("model.safetensors"), s.path("y/step-8/model.safetensors"));
    assert_eq!(std::fs::read(x).unwrap(), std::fs::read(y).unwrap());
}

/// The train step's `grad_norm.{layer}` outputs: on the interpreter, each is the square root of
/// the sum of its layer's squared gradients, computed here from the differentiated graph's
/// `grad.*` outputs; their squares add up to the global norm; and the compiled step gives the same
/// norms (to f32 rounding).
#[test]
fn per_layer_gradient_norms_match_a_direct_computation_and_the_compiled_step() {
    let spec = kiln_compiler::spec::load(&root().join("models/tiny.toml")).unwrap();
    let losses = TrainLosses::default();
    let (forward, _) = build::build_train(&spec, &losses).unwrap();
    let grads = differentiate(&forward, "loss").unwrap();
    let TrainPrograms { step, states, .. } =
        program(&spec, &losses, &Optimizer::default(), false, false, None).unwrap();
    let decls = weights::graph_params(&build::build_graph(&spec).unwrap()).unwrap();
    let params: Vec<HostTensor> = weights::random_tensors(decls, 1, 0.02).collect();
    let rows = TokenRows::from_rows(WIDTH, (0..2).flat_map(row).collect()).unwrap();

    // Directly: the gradients of the differentiated graph, grouped by layer.
    let names: Vec<String> = grads.inputs().iter().map(|(n, _)| n.to_string()).collect();
    // The batch, and the routers' biases (inputs of a train graph) from the weights.
    let feeds: HashMap<String, Tensor> = (step_inputs(&names, &rows, 1e-3).unwrap().into_iter())
        .chain(params.iter().cloned())
        .filter(|t| names.contains(&t.name))
        .map(|t| (t.name.clone(), to_tensor(t).unwrap()))
        .collect();
    let declared: Vec<String> = grads.params().iter().map(|(n, _)| n.to_string()).collect();
    let ps: HashMap<String, Tensor> = (params.iter())
        .filter(|t| declared.contains(&t.name))
        .map(|t| (t.name.clone(), to_tensor(t.clone()).unwrap()))
        .collect();
    let out = interp::run(&grads, &feeds, &ps).unwrap();
    let mut direct: Vec<(String, f64)> = Vec::new();
    for (name, t) in &out {
        let Some(p) = name.strip_prefix(GRAD_PREFIX) else { continue };
        let sq: f64 = t.as_f32().unwrap().iter().map(|&g| f64::from(g) * f64::from(g)).sum();
        match direct.iter_mut().find(|(l, _)| *l == layer_of(p)) {
            Some((_, s)) => *s += sq,
            None => direct.push((layer_of(p), sq)),
        }
    }
    let mut layers: Vec<&str> = direct.iter().map(|(l, _)| l.as_str()).collect();
    layers.sort();
    assert_eq!(
        layers,
        [
            "lm_head",
            "model.embed_tokens",
            "model.layers.0",
            "model.layers.1",
            "model.layers.2",
            "model.layers.3"
        ]
    );

    let mut t = Trainer::new(step.clone(), states.clone(), params.clone()).unwrap();
    let stats = t.step(&rows, 1e-3).unwrap();
    assert_eq!(stats.grad_norms.len(), direct.len());
    assert_eq!(stats.grad_norms[0].0, "model.embed_tokens", "in model order");
    assert_eq!(stats.grad_norms.last().unwrap().0, "lm_head");
    let mut total = 0.0;
    for (layer, norm) in &stats.grad_norms {
        let want = direct.iter().find(|(l, _)| l == layer).unwrap().1.sqrt();
        assert!((f64::from(*norm) - want).abs() <= 1e-5 * want, "{layer}: {norm} vs {want}");
        total += f64::from(*norm).powi(2);
    }
    let g = f64::from(stats.grad_norm);
    assert!((total.sqrt() - g).abs() <= 1e-5 * g, "the layers' norms make up the global {g}");

    // Compiled: the same norms.
    let art = kiln_runtime::artifact::load(artifact()).unwrap();
    let wanted: std::collections::HashSet<String> =
        weights::manifest_params(art.manifest()).unwrap().into_iter().map(|d| d.name).collect();
    let given = params.into_iter().filter(|t| wanted.contains(&t.name)).map(Ok);
    let model = kiln_runtime::cpu::CpuModel::load(&art, given, &Default::default()).unwrap();
    let mut c = CompiledTrainer::new(model).unwrap();
    let compiled = c.step(&rows, 1e-3).unwrap();
    for ((l, a), (m, b)) in compiled.grad_norms.iter().zip(&stats.grad_norms) {
        assert_eq!(l, m);
        assert!((a - b).abs() <= 1e-4 * b, "{l}: compiled {a} vs interpreter {b}");
    }
}

/// The interpreter's re-check names the first op with a non-finite result: with one weight of
/// layer 2's attention output projection set to infinity, the step's first non-finite value is
/// that weight (a `trainable` state, an input of the program in its layer's scope), and the
/// compiled re-check agrees on the scope.
#[test]
fn the_re_check_names_the_first_non_finite_op_on_the_interpreter_and_compiled() {
    let spec = kiln_compiler::spec::load(&root().join("models/tiny.toml")).unwrap();
    let losses = TrainLosses::default();
    let TrainPrograms { step, states, .. } =
        program(&spec, &losses, &Optimizer::default(), false, false, None).unwrap();
    let decls = weights::graph_params(&build::build_graph(&spec).unwrap()).unwrap();
    let name = "model.layers.2.self_attn.o_proj.weight";
    let params: Vec<HostTensor> = weights::random_tensors(decls, 1, 0.02)
        .map(|mut t| {
            if let (true, HostData::F32(v)) = (t.name == name, &mut t.data) {
                v[5] = f32::INFINITY;
            }
            t
        })
        .collect();
    let rows = TokenRows::from_rows(WIDTH, (0..2).flat_map(row).collect()).unwrap();
    let mut t = Trainer::new(step, states, params.clone()).unwrap();
    let (stats, found) = t.step_checked(&rows, 1e-3).unwrap();
    assert!(!stats.loss.is_finite() || !stats.grad_norm.is_finite());
    let f = found.expect("a non-finite value");
    assert_eq!(
        (f.program.as_str(), f.scope.as_deref(), f.count),
        ("train_step", Some("model.layers.2.self_attn"), 1)
    );
    assert!(f.op.ends_with(&format!("= input `{name}`")), "{}", f.op);

    let art = kiln_runtime::artifact::load(artifact()).unwrap();
    let wanted: std::collections::HashSet<String> =
        weights::manifest_params(art.manifest()).unwrap().into_iter().map(|d| d.name).collect();
    let given = params.into_iter().filter(|t| wanted.contains(&t.name)).map(Ok);
    let model = kiln_runtime::cpu::CpuModel::load(&art, given, &Default::default()).unwrap();
    let mut c = CompiledTrainer::new(model).unwrap();
    let (_, found) = c.step_checked(&rows, 1e-3).unwrap();
    let f = found.expect("a non-finite launch");
    assert_eq!(f.scope.as_deref(), Some("model.layers.2.self_attn"), "{f}");
    assert!(f.op.starts_with("k_"), "{f}");
}

/// The gate of a compiled train step (`kiln_runtime::train::Gate`): a step the monitor rejects
/// stops once its loss and gradient norm are known, before it changes the model. Here a step of
/// two micro-batches with DeepSeek's bias rule on, whose step count and routers' biases the
/// program writes before that point (they are put back). A rejected step leaves every state
/// bit for bit as it was and its accumulators zeroed, so the same batch then gives the same loss
/// and norm; an accepted one is exactly a plain step. The interpreter's steps gate the same way.
#[test]
fn a_rejected_step_stops_at_its_gate_and_changes_nothing() {
    use kiln_ir::module::StateRole;
    use kiln_runtime::train::Steps;
    let s = Scratch::new();
    let dir = s.path("gate.kiln");
    compile_step(&dir, &["--accumulate", "--bias-update-speed", "0.001"]);
    let art = kiln_runtime::artifact::load(&dir).unwrap();
    let decls = weights::manifest_params(art.manifest()).unwrap();
    let load = || {
        let given = weights::random_tensors(decls.clone(), 1, 0.02).map(Ok);
        let model = kiln_runtime::cpu::CpuModel::load(&art, given, &Default::default()).unwrap();
        let mut c = CompiledTrainer::new(model).unwrap();
        c.set_micro_batches(2).unwrap();
        c
    };
    let (mut a, mut b) = (load(), load());
    let gate = a.gate().expect("the train step has a gate").clone();
    let role = |n: &str| art.manifest().state(n).unwrap().role;
    assert!(
        gate.undo.iter().all(|n| matches!(role(n), StateRole::Counter | StateRole::RoutingBias)),
        "{gate:?}"
    );
    assert!(
        gate.undo.iter().any(|n| role(n) == StateRole::RoutingBias),
        "the biases move before the gate: {gate:?}"
    );
    let every = |c: &CompiledTrainer<_>| -> Vec<HostTensor> {
        (art.manifest().states.iter()).map(|st| c.executor().read_state(&st.name).unwrap()).collect()
    };
    let rows = TokenRows::from_rows(WIDTH, (0..4).flat_map(row).collect()).unwrap();
    let before = every(&a);

    let mut seen = Vec::new();
    let g = a.step_gated(&rows, 1e-2, false, &mut |l, n| {
        seen.push((l, n));
        false
    });
    let g = g.unwrap();
    assert!(!g.applied);
    assert_eq!(seen.len(), 1);
    assert!(seen[0].0.is_finite() && seen[0].1 > 0.0, "{seen:?}");
    assert_eq!((g.stats.loss, g.stats.grad_norm), seen[0]);
    for (x, y) in every(&a).iter().zip(&before) {
        assert!(x == y || role(&x.name) == StateRole::GradientAccumulator, "state `{}` changed", x.name);
        if role(&x.name) == StateRole::GradientAccumulator {
            let HostData::F32(v) = &x.data else { panic!() };
            assert!(v.iter().all(|&v| v == 0.0), "accumulator `{}` not zeroed", x.name);
        }
    }
    // Accepted: a plain step of the same batch from the same states.
    let g = a.step_gated(&rows, 1e-2, false, &mut |_, _| true).unwrap();
    let plain = b.step(&rows, 1e-2).unwrap();
    assert!(g.applied);
    assert_eq!(g.stats, plain);
    assert_eq!((g.stats.loss, g.stats.grad_norm), seen[0], "the rejected step left nothing behind");
    assert_eq!(every(&a), every(&b));
    assert_ne!(every(&a), before);

    // The interpreter's train step.
    let spec = kiln_compiler::spec::load(&root().join("models/tiny.toml")).unwrap();
    let TrainPrograms { step, states, .. } =
        program(&spec, &TrainLosses::default(), &Optimizer::default(), false, false, None).unwrap();
    let decls = weights::graph_params(&build::build_graph(&spec).unwrap()).unwrap();
    let params: Vec<HostTensor> = weights::random_tensors(decls, 1, 0.02).collect();
    let mut t = Trainer::new(step.clone(), states.clone(), params.clone()).unwrap();
    let rows = TokenRows::from_rows(WIDTH, (0..2).flat_map(row).collect()).unwrap();
    let (w, k) = (Steps::weights(&t).unwrap(), Steps::states(&t).unwrap());
    let g = t.step_gated(&rows, 1e-2, false, &mut |_, _| false).unwrap();
    assert!(!g.applied && g.stats.loss.is_finite());
    assert_eq!((Steps::weights(&t).unwrap(), Steps::states(&t).unwrap()), (w, k));
    let mut u = Trainer::new(step, states, params).unwrap();
    assert_eq!(
        t.step_gated(&rows, 1e-2, false, &mut |_, _| true).unwrap().stats,
        u.step(&rows, 1e-2).unwrap()
    );
    assert_eq!(Steps::weights(&t).unwrap(), Steps::weights(&u).unwrap());
}
