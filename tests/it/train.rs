//! Training against PyTorch: the train-step program (`build_train`, `autodiff::differentiate`,
//! `train::train_step`) on the reference interpreter against transformers and
//! `torch.optim.AdamW` (`tests/goldens/train`, made by `tools/goldens/make_train.py`): models/tiny.toml
//! (MLA, YaRN, 16 routed experts in 4 groups with a nonzero selection bias, a shared expert, f32)
//! from `--random-weights 3`, 30 steps of next-token cross-entropy on one fixed batch of 4 x 32
//! tokens, lr 1e-3, betas 0.9 / 0.95, eps 1e-8, weight decay 0.1 on every trained parameter,
//! clipping at 1.0. Then `kiln train` end to end: checkpoints, resume, and bad input.
//!
//! Bounds (the issue's): the loss at every step within 1e-4 relative, the step-0 gradients within
//! 1e-5 absolute, the weights after step 30 within 1e-4 absolute. Measured (printed with
//! `--nocapture`): gradients 3.7e-8, losses 2.2e-7 relative, grad norms 2.0e-6, final weights
//! 1.6e-5. The routers choose the same experts as transformers at every step (the golden notes
//! that a flipped choice would move the final weights by up to 1e-2, so these bounds also pin the
//! routing).

use std::path::Path;

use kiln_compiler::autodiff::{differentiate, GRAD_PREFIX};
use kiln_compiler::build;
use kiln_compiler::train::{program, Optimizer, TrainPrograms};
use kiln_runtime::data::{self, TokenFormat};
use kiln_runtime::reference::to_tensor;
use kiln_runtime::train::Trainer;
use kiln_runtime::weights::{self, HostData};

use crate::util::{kiln, kiln_command, root, Scratch};

const GOLDEN: &str = "tests/goldens/train";

/// The tokens, targets and positions of the golden batch's 4 rows of `t` tokens, as interpreter inputs.
fn batch_feeds(
    rows: &data::TokenRows,
    t: usize,
) -> std::collections::HashMap<String, kiln_ir::interp::Tensor> {
    let ids = |f: &dyn Fn(&[i64]) -> Vec<i64>| {
        let data: Vec<i64> = (0..4).flat_map(|r| f(rows.row(r))).collect();
        kiln_ir::interp::Tensor::from_i64(kiln_ir::DType::I32, vec![4, t as u64], data).unwrap()
    };
    std::collections::HashMap::from([
        ("tokens".to_string(), ids(&|r| r[..t].to_vec())),
        ("targets".to_string(), ids(&|r| r[1..].to_vec())),
        ("positions".to_string(), ids(&|_| (0..t as i64).collect())),
    ])
}

fn f32s(t: &weights::HostTensor) -> &[f32] {
    match &t.data {
        HostData::F32(v) => v,
        HostData::I64(_) => panic!("{} is not a float tensor", t.name),
    }
}

#[test]
fn thirty_adamw_steps_match_pytorch() {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join(GOLDEN).join("golden.json")).unwrap())
            .unwrap();
    let spec = kiln_compiler::spec::load(&root().join("models/tiny.toml")).unwrap();
    let losses = build::TrainLosses::default();
    let (forward, _) = build::build_train(&spec, &losses).unwrap();
    let grads = differentiate(&forward, "loss").unwrap();
    let opt = Optimizer {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        clip: Some(1.0),
        moments: kiln_ir::DType::F32,
        shards: 1,
    };
    let TrainPrograms { step: program, states, .. } =
        program(&spec, &losses, &opt, false, false, None).unwrap();
    // The weights transformers started from: `kiln export-hf --random-weights 3`.
    let decls = weights::graph_params(&build::build_graph(&spec).unwrap()).unwrap();
    let initial: Vec<weights::HostTensor> = weights::random_tensors(decls, 3, 0.02).collect();
    let rows = data::load_tokens(&root().join(GOLDEN).join("tokens.safetensors"), &TokenFormat::Safetensors)
        .unwrap();
    assert_eq!((rows.rows(), rows.width()), (4, 33));

    // Step 0's gradients, from the differentiated graph alone.
    let t = rows.width() - 1;
    let mut feeds = batch_feeds(&rows, t);
    // The routers' selection biases are inputs of the training graph (state of the program).
    for (name, _) in forward.inputs() {
        if let Some(p) = initial.iter().find(|p| p.name == name) {
            feeds.insert(name.to_string(), to_tensor(p.clone()).unwrap());
        }
    }
    let declared: Vec<String> = forward.params().into_iter().map(|(n, _)| n.to_string()).collect();
    let params = initial
        .iter()
        .filter(|p| declared.contains(&p.name))
        .map(|p| (p.name.clone(), to_tensor(p.clone()).unwrap()))
        .collect();
    let out = kiln_ir::interp::run(&grads, &feeds, &params).unwrap();
    let want = weights::open_checkpoint(&root().join(GOLDEN).join("grads0.safetensors")).unwrap();
    let mut worst = 0f32;
    let mut compared = 0;
    for name in want.tensors().map(|t| t.name.clone()).collect::<Vec<_>>() {
        let w = want.read(&name).unwrap();
        let got =
            out.get(&format!("{GRAD_PREFIX}{name}")).unwrap_or_else(|| panic!("no gradient for {name}"));
        let d = got.as_f32().unwrap().iter().zip(f32s(&w)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        worst = worst.max(d);
        compared += 1;
    }
    eprintln!("step-0 gradients of {compared} parameters: max abs diff vs PyTorch {worst:e}");
    assert!(compared >= 190 && worst <= 1e-5, "{worst:e}");

    // 30 steps.
    let mut trainer = Trainer::new(program, states, initial).unwrap();
    let losses: Vec<f64> = serde_json::from_value(golden["losses"].clone()).unwrap();
    let norms: Vec<f64> = serde_json::from_value(golden["grad_norms"].clone()).unwrap();
    assert_eq!(losses.len(), 30);
    let (mut worst_loss, mut worst_norm) = (0f64, 0f64);
    for (k, (&want_loss, &want_norm)) in losses.iter().zip(&norms).enumerate() {
        let s = trainer.step(&rows, 1e-3).unwrap();
        let rel = (f64::from(s.loss) - want_loss).abs() / want_loss.abs();
        let nrel = (f64::from(s.grad_norm) - want_norm).abs() / want_norm.abs();
        worst_loss = worst_loss.max(rel);
        worst_norm = worst_norm.max(nrel);
        assert!(rel <= 1e-4, "step {k}: loss {} vs PyTorch {want_loss} ({rel:e} relative)", s.loss);
    }
    eprintln!("30 steps: loss within {worst_loss:e} relative of PyTorch, grad norm within {worst_norm:e}");
    let fin = weights::open_checkpoint(&root().join(GOLDEN).join("final.safetensors")).unwrap();
    let now: std::collections::HashMap<String, weights::HostTensor> =
        trainer.weights().into_iter().map(|t| (t.name.clone(), t)).collect();
    let mut worst = 0f32;
    for name in fin.tensors().map(|t| t.name.clone()).collect::<Vec<_>>() {
        let w = fin.read(&name).unwrap();
        let got = now.get(&name).unwrap_or_else(|| panic!("no weight {name}"));
        let d = f32s(got).iter().zip(f32s(&w)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        worst = worst.max(d);
    }
    eprintln!("weights after 30 steps: max abs diff vs PyTorch {worst:e}");
    assert!(worst <= 1e-4, "{worst:e}");
}

/// `kiln train`: two steps, then two more from the checkpoint, equal the four steps of one run
/// byte for byte; the checkpoint loads in `kiln run --weights`; bad input is refused before any
/// step.
#[test]
fn kiln_train_checkpoints_resume_bit_identically() {
    let s = Scratch::new();
    let data = root().join("tests/goldens/perplexity/tokens.safetensors").to_string_lossy().into_owned();
    let base = ["train", "models/tiny.toml", "--data", data.as_str(), "--interp"];
    let (one, two) = (s.str("one"), s.str("two"));
    let r = kiln(
        &[&base[..], &["--batch", "2", "--random-weights", "3", "--steps", "4", "--out", &one]].concat(),
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.lines().filter(|l| l.starts_with("step ")).count() == 4, "{}", r.stdout);
    let r = kiln(
        &[&base[..], &["--batch", "2", "--random-weights", "3", "--steps", "2", "--out", &two]].concat(),
    );
    assert!(r.ok, "{}", r.stderr);
    let resume = s.str("two/step-2");
    let r =
        kiln(&[&base[..], &["--batch", "2", "--resume", &resume, "--steps", "4", "--out", &two]].concat());
    assert!(r.ok, "{}", r.stderr);
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let (a, b) = (s.path("one/step-4").join(f), s.path("two/step-4").join(f));
        assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap(), "{f} differs after a resume");
    }
    // A line for each step, after the monitor's note of the copies of the states it takes (their
    // bytes, and the memory free beside them): none before each step, which stops at its gate
    // when the monitor rejects it.
    let metrics = std::fs::read_to_string(s.path("one/metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[0]["event"], "monitor_copies", "{}", lines[0]);
    assert_eq!(lines[0]["copy_before_each_step"], false, "{}", lines[0]);
    assert_eq!(lines[0]["gate"], true, "{}", lines[0]);
    assert!(lines[0]["free_bytes"].as_u64().unwrap() > lines[0]["state_bytes"].as_u64().unwrap());
    let first = &lines[1];
    assert_eq!(first["step"], 1);
    assert!(first["loss"].as_f64().unwrap() > 5.0);
    assert!(!s.path("one").read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with('.')));

    // The checkpoint is a Hugging Face folder kiln runs.
    let ckpt = s.str("one/step-4");
    let r = kiln(&[
        "run",
        "models/tiny.toml",
        "--interp",
        "--weights",
        &ckpt,
        "--prompt-ids",
        "1,2",
        "--max-new-tokens",
        "2",
    ]);
    assert!(r.ok, "{}", r.stderr);

    // And a model kiln trains further: the folder is the model and its weights.
    let r =
        kiln(&["train", &ckpt, "--data", data.as_str(), "--interp", "--steps", "1", "--out", &s.str("hf")]);
    assert!(r.ok && r.stdout.contains("step     1"), "{}", r.stderr);
    let r = kiln(&[
        "train",
        &s.str("one"),
        "--data",
        data.as_str(),
        "--interp",
        "--random-weights",
        "3",
        "--steps",
        "1",
        "--out",
        &s.str("x"),
    ]);
    assert!(!r.ok && r.stderr.contains("has no config.json"), "{}", r.stderr);

    // Bad input, refused before any step.
    let refused = |extra: &[&str], want: &str| {
        let r = kiln(&[&base[..], &["--out", &s.str("bad")], extra].concat());
        assert!(!r.ok && r.stderr.contains(want), "want `{want}`:\n{}", r.stderr);
        assert!(!r.stdout.contains("step "), "{}", r.stdout);
    };
    refused(&["--random-weights", "3", "--steps", "1", "--lr", "NaN"], "--lr must be a finite");
    refused(&["--random-weights", "3", "--steps", "1", "--batch", "9"], "3 rows, fewer than one batch of 9");
    refused(&["--random-weights", "3", "--steps", "0"], "--steps and --batch must be at least 1");
    refused(
        &[
            "--random-weights",
            "3",
            "--steps",
            "2",
            "--schedule",
            "cosine",
            "--lr",
            "1e-3",
            "--min-lr",
            "1e-2",
        ],
        "--min-lr 0.01 is above --lr 0.001: the cosine schedule decays from --lr to --min-lr",
    );
    refused(
        &["--random-weights", "3", "--steps", "2", "--save-every", "0"],
        "invalid value '0' for '--save-every <K>'",
    );
    refused(&["--steps", "1"], "give the initial weights");
    let _ = Path::new(".");
}

/// Auxiliary-loss-free balancing: after a step every router's selection bias has moved by exactly
/// γ toward balance (up for an expert below the mean load, down above it, not at all at the mean),
/// counted over the step's tokens, and the biases are written back with the model's weights.
#[test]
fn the_bias_rule_moves_each_bias_by_gamma_toward_balance() {
    let spec = kiln_compiler::spec::load(&root().join("models/tiny.toml")).unwrap();
    let gamma = 1e-3f32;
    let losses = build::TrainLosses { bias_update_speed: f64::from(gamma), ..build::TrainLosses::default() };
    let TrainPrograms { step: prog, states, .. } =
        program(&spec, &losses, &Optimizer::default(), false, false, None).unwrap();
    let decls = weights::graph_params(&build::build_graph(&spec).unwrap()).unwrap();
    let initial: Vec<weights::HostTensor> = weights::random_tensors(decls, 3, 0.02).collect();
    let before: std::collections::HashMap<String, Vec<f32>> = initial
        .iter()
        .filter(|t| t.name.ends_with("e_score_correction_bias"))
        .map(|t| (t.name.clone(), f32s(t).to_vec()))
        .collect();
    assert_eq!(before.len(), 4);
    let rows = data::load_tokens(&root().join(GOLDEN).join("tokens.safetensors"), &TokenFormat::Safetensors)
        .unwrap();
    let mut trainer = Trainer::new(prog, states, initial).unwrap();
    let stats = trainer.step(&rows, 1e-3).unwrap();
    assert_eq!(stats.loads.len(), 3, "the three MoE layers of the main model");
    let after: std::collections::HashMap<String, weights::HostTensor> =
        trainer.weights().into_iter().map(|t| (t.name.clone(), t)).collect();
    let mut moved = 0;
    for (layer, load) in &stats.loads {
        assert_eq!(load.iter().sum::<f32>(), (4 * 32 * 4) as f32, "{layer}: every token routed to 4 experts");
        let name = format!("{layer}.gate.e_score_correction_bias");
        let mean = load.iter().sum::<f32>() / load.len() as f32;
        for (e, (&b0, &b1)) in before[&name].iter().zip(f32s(&after[&name])).enumerate() {
            let want = b0 + gamma * (mean - load[e]).signum() * if mean == load[e] { 0.0 } else { 1.0 };
            assert!(
                (b1 - want).abs() <= 1e-7,
                "{layer} expert {e}: load {} (mean {mean}): {b0} -> {b1}",
                load[e]
            );
            moved += usize::from(b1 != b0);
        }
    }
    assert!(moved > 40, "{moved} biases moved");
    let ratio = stats.max_load.unwrap();
    eprintln!(
        "one step: the busiest expert has {ratio:.3}x the mean load; {moved} of 48 biases moved by {gamma}"
    );
    assert!(ratio > 1.0);
}

/// Gradient accumulation: a batch of 4 rows split into 2 or 4 micro-batches (the `accumulate`
/// program, then the step's last) gives the step of the whole batch, with the MTP loss, the
/// balance loss and the bias rule on: the same losses and gradient norms to rounding, the same
/// expert loads exactly (the bias rule counts over the whole step), and the same weights.
#[test]
fn micro_batches_accumulate_to_the_step_of_the_whole_batch() {
    let spec = kiln_compiler::spec::load(&root().join("models/tiny.toml")).unwrap();
    let losses = build::TrainLosses {
        mtp_lambda: 0.3,
        balance_alpha: 0.01,
        bias_update_speed: 1e-3,
        token_weights: false,
    };
    let opt = Optimizer::default();
    let decls = weights::graph_params(&build::build_graph(&spec).unwrap()).unwrap();
    let initial: Vec<weights::HostTensor> = weights::random_tensors(decls, 3, 0.02).collect();
    let rows = data::load_tokens(&root().join(GOLDEN).join("tokens.safetensors"), &TokenFormat::Safetensors)
        .unwrap();
    let whole = program(&spec, &losses, &opt, false, false, None).unwrap();
    assert!(whole.accumulate.is_none());
    let mut reference = Trainer::new(whole.step, whole.states, initial.clone()).unwrap();
    let want: Vec<_> = (0..3).map(|_| reference.step(&rows, 1e-3).unwrap()).collect();
    let want_w: std::collections::HashMap<String, weights::HostTensor> =
        reference.weights().into_iter().map(|t| (t.name.clone(), t)).collect();
    for count in [2, 4] {
        let split = program(&spec, &losses, &opt, true, false, None).unwrap();
        let mut trainer = Trainer::new(split.step, split.states, initial.clone())
            .unwrap()
            .with_micro_batches(split.accumulate.unwrap(), count);
        for (k, w) in want.iter().enumerate() {
            let s = trainer.step(&rows, 1e-3).unwrap();
            let rel = |a: f32, b: f32| (a - b).abs() / b.abs();
            assert!(
                rel(s.loss, w.loss) <= 1e-6,
                "{count} micro-batches, step {k}: loss {} vs {}",
                s.loss,
                w.loss
            );
            assert!(
                rel(s.grad_norm, w.grad_norm) <= 1e-5,
                "step {k}: norm {} vs {}",
                s.grad_norm,
                w.grad_norm
            );
            assert_eq!(s.loads, w.loads, "{count} micro-batches, step {k}: the step's loads");
        }
        let mut worst = 0f32;
        for t in trainer.weights() {
            let d =
                f32s(&t).iter().zip(f32s(&want_w[&t.name])).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            if t.name.ends_with("e_score_correction_bias") {
                assert_eq!(d, 0.0, "{}: the bias rule saw other loads", t.name);
            }
            worst = worst.max(d);
        }
        eprintln!("{count} micro-batches vs the whole batch after 3 steps: weights within {worst:e}");
        assert!(worst <= 1e-6, "{worst:e}");
        // A batch that does not split evenly is refused.
        let three = kiln_runtime::data::TokenRows::from_rows(rows.width(), rows.row(0).repeat(3)).unwrap();
        let e = trainer.step(&three, 1e-3).unwrap_err().to_string();
        assert!(e.contains("does not split"), "{e}");
    }
}

/// The compiled train step (`kiln compile --train`, the CPU library) against PyTorch: the same 30
/// steps as [`thirty_adamw_steps_match_pytorch`], to the same bounds, with the weights, moments
/// and step count kept as states of the executor; then a state read back and written again
/// changes nothing, and a state of the wrong type is refused.
#[test]
fn compiled_train_step_matches_pytorch() {
    use kiln_runtime::cpu::{CpuModel, CpuOptions};
    use kiln_runtime::train::CompiledTrainer;
    let s = Scratch::new();
    let out = s.str("train.kiln");
    let r = kiln(&[
        "compile",
        "models/tiny.toml",
        "--target",
        "cpu",
        "--train",
        "--max-context",
        "32",
        "--max-batch",
        "4",
        "-o",
        &out,
    ]);
    assert!(r.ok, "{}", r.stderr);
    let art = kiln_runtime::artifact::load(Path::new(&out)).unwrap();
    let spec = kiln_compiler::spec::load(&root().join("models/tiny.toml")).unwrap();
    let decls = weights::graph_params(&build::build_graph(&spec).unwrap()).unwrap();
    let initial: Vec<weights::HostTensor> = weights::random_tensors(decls, 3, 0.02).collect();
    let wanted = weights::manifest_params(art.manifest()).unwrap();
    let given = initial.iter().filter(|t| wanted.iter().any(|d| d.name == t.name)).cloned().map(Ok);
    let model = CpuModel::load(&art, given, &CpuOptions::default()).unwrap();
    let mut trainer = CompiledTrainer::new(model).unwrap();
    let rows = data::load_tokens(&root().join(GOLDEN).join("tokens.safetensors"), &TokenFormat::Safetensors)
        .unwrap();
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join(GOLDEN).join("golden.json")).unwrap())
            .unwrap();
    let losses: Vec<f64> = serde_json::from_value(golden["losses"].clone()).unwrap();
    let norms: Vec<f64> = serde_json::from_value(golden["grad_norms"].clone()).unwrap();
    let (mut worst_loss, mut worst_norm) = (0f64, 0f64);
    for (k, (&want_loss, &want_norm)) in losses.iter().zip(&norms).enumerate() {
        let st = trainer.step(&rows, 1e-3).unwrap();
        let rel = (f64::from(st.loss) - want_loss).abs() / want_loss.abs();
        let nrel = (f64::from(st.grad_norm) - want_norm).abs() / want_norm.abs();
        worst_loss = worst_loss.max(rel);
        worst_norm = worst_norm.max(nrel);
        assert!(rel <= 1e-4, "step {k}: loss {} vs PyTorch {want_loss} ({rel:e} relative)", st.loss);
        assert!(nrel <= 1e-3, "step {k}: grad norm {} vs PyTorch {want_norm} ({nrel:e})", st.grad_norm);
        assert_eq!(st.loads.len(), 3, "one load per MoE layer");
        let routed: f32 = st.loads[0].1.iter().sum();
        assert_eq!(routed, (4 * 32 * spec.moe.as_ref().unwrap().num_experts_per_tok) as f32);
    }
    eprintln!("compiled, 30 steps: loss within {worst_loss:e} relative of PyTorch, grad norm {worst_norm:e}");
    let fin = weights::open_checkpoint(&root().join(GOLDEN).join("final.safetensors")).unwrap();
    let now: std::collections::HashMap<String, weights::HostTensor> =
        trainer.weights().unwrap().into_iter().map(|t| (t.name.clone(), t)).collect();
    let mut worst = 0f32;
    for name in fin.tensors().map(|t| t.name.clone()).collect::<Vec<_>>() {
        let w = fin.read(&name).unwrap();
        let got = now.get(&name).unwrap_or_else(|| panic!("no weight {name}"));
        let d = f32s(got).iter().zip(f32s(&w)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        worst = worst.max(d);
    }
    eprintln!("compiled, weights after 30 steps: max abs diff vs PyTorch {worst:e}");
    assert!(worst <= 1e-4, "{worst:e}");

    // The step count is a state: 30 after 30 steps; writing the states back is a no-op.
    let states = trainer.states().unwrap();
    let step = states.iter().find(|t| t.name == "adam.step").unwrap();
    assert_eq!(f32s(step), &[30.0]);
    for t in states.clone() {
        trainer.set_state(t).unwrap();
    }
    assert_eq!(trainer.states().unwrap(), states);
    let mut bad = step.clone();
    bad.shape = vec![2];
    bad.data = HostData::F32(vec![0.0, 0.0]);
    let e = trainer.set_state(bad).unwrap_err().to_string();
    assert!(e.contains("adam.step"), "{e}");
}

/// `kiln train` without --interp compiles the train step for the CPU (`--out/train.kiln`) and
/// runs it: with the MTP loss, the balance loss and the bias rule on, its losses and checkpoint
/// agree with the interpreter's run, and a resumed compiled run equals an uninterrupted one byte
/// for byte.
#[test]
fn kiln_train_compiled_agrees_with_the_interpreter_and_resumes() {
    let s = Scratch::new();
    let data = root().join("tests/goldens/perplexity/tokens.safetensors").to_string_lossy().into_owned();
    let losses = ["--mtp-lambda", "0.3", "--balance-alpha", "0.0001", "--bias-update-speed", "0.001"];
    let base =
        [&["train", "models/tiny.toml", "--data", data.as_str(), "--batch", "2"][..], &losses].concat();
    let run = |extra: &[&str]| {
        let r = kiln(&[&base[..], extra].concat());
        assert!(r.ok, "{}", r.stderr);
        r.stdout
    };
    let (c, i, r) = (s.str("c"), s.str("i"), s.str("r"));
    let stdout = run(&["--random-weights", "3", "--steps", "3", "--out", &c]);
    assert!(stdout.contains("compiled for the CPU"), "{stdout}");
    assert!(s.path("c/train.kiln/manifest.json").exists());
    run(&["--random-weights", "3", "--steps", "3", "--out", &i, "--interp"]);
    let metric = |dir: &str| -> Vec<f64> {
        let text = std::fs::read_to_string(s.path(dir).join("metrics.jsonl")).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            // Step lines only: the monitor's events (alerts, skips) have an `event` key.
            .filter(|l| l.get("event").is_none())
            .map(|l| l["loss"].as_f64().unwrap())
            .collect()
    };
    let (lc, li) = (metric("c"), metric("i"));
    assert_eq!(lc.len(), 3);
    for (a, b) in lc.iter().zip(&li) {
        assert!((a - b).abs() <= 1e-4 * b.abs(), "compiled loss {a} vs interpreter {b}");
    }
    let (wc, wi) = (
        weights::open_checkpoint(&s.path("c/step-3")).unwrap(),
        weights::open_checkpoint(&s.path("i/step-3")).unwrap(),
    );
    let names: Vec<String> = wi.tensors().map(|t| t.name.clone()).collect();
    assert_eq!(wc.tensors().count(), names.len());
    let mut worst = 0f32;
    for name in &names {
        let (a, b) = (wc.read(name).unwrap(), wi.read(name).unwrap());
        worst = f32s(&a).iter().zip(f32s(&b)).map(|(x, y)| (x - y).abs()).fold(worst, f32::max);
    }
    eprintln!("compiled vs interpreter after 3 steps with MTP, balance loss and bias rule: {worst:e}");
    assert!(worst <= 1e-4, "{worst:e}");

    // Split into micro-batches of one row (gradient accumulation): the same steps.
    let m = s.str("m");
    let stdout = run(&["--random-weights", "3", "--steps", "3", "--out", &m, "--micro-batch", "1"]);
    assert!(stdout.contains("2 micro-batches of 1 rows"), "{stdout}");
    for (a, b) in metric("m").iter().zip(&li) {
        assert!((a - b).abs() <= 1e-4 * b.abs(), "accumulated loss {a} vs interpreter {b}");
    }
    let wm = weights::open_checkpoint(&s.path("m/step-3")).unwrap();
    let mut worst_m = 0f32;
    for name in &names {
        let (a, b) = (wm.read(name).unwrap(), wi.read(name).unwrap());
        worst_m = f32s(&a).iter().zip(f32s(&b)).map(|(x, y)| (x - y).abs()).fold(worst_m, f32::max);
    }
    eprintln!("compiled with 2 micro-batches vs the interpreter's whole batch after 3 steps: {worst_m:e}");
    assert!(worst_m <= 1e-4, "{worst_m:e}");
    let bad = kiln(
        &[&base[..], &["--random-weights", "3", "--steps", "1", "--out", &m, "--micro-batch", "3"]].concat(),
    );
    assert!(!bad.ok && bad.stderr.contains("--micro-batch 3"), "{}", bad.stderr);

    // One step, then two more from its checkpoint: byte for byte the three-step run.
    run(&["--random-weights", "3", "--steps", "1", "--out", &r]);
    run(&["--resume", &s.str("r/step-1"), "--steps", "3", "--out", &r]);
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let (a, b) = (s.path("c/step-3").join(f), s.path("r/step-3").join(f));
        assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap(), "{f} differs after a resume");
    }
}

/// A bf16 model trains with f32 master weights (DeepSeek-V3's mixed precision): the compiled train
/// step with bf16 AdamW moments agrees with the interpreter's, each stored weight is its master
/// rounded to bf16 (the checkpoint's model.safetensors is bf16, optimizer.safetensors holds the f32
/// masters and bf16 moments), and a resume continues byte for byte.
#[test]
fn a_bf16_model_trains_on_f32_master_weights_with_bf16_moments() {
    use kiln_runtime::weights::StDType;
    let s = Scratch::new();
    let spec = std::fs::read_to_string(root().join("models/tiny.toml")).unwrap();
    let spec = spec.replace("dtype = \"f32\"", "dtype = \"bf16\"");
    assert!(spec.contains("\"bf16\""));
    std::fs::write(s.path("bf16.toml"), spec).unwrap();
    let (model, data) = (s.str("bf16.toml"), root().join(GOLDEN).join("tokens.safetensors"));
    let data = data.to_string_lossy().into_owned();
    let run = |extra: &[&str]| {
        let base = ["train", &model, "--data", &data, "--batch", "2", "--moments", "bf16"];
        let r = kiln(&[&base[..], extra].concat());
        assert!(r.ok, "{}", r.stderr);
    };
    let (c, i, r) = (s.str("c"), s.str("i"), s.str("r"));
    run(&["--random-weights", "3", "--steps", "2", "--save-every", "1", "--out", &c]);
    run(&["--random-weights", "3", "--steps", "2", "--out", &i, "--interp"]);
    let (lc, li) = (logged_losses(&s.path("c")), logged_losses(&s.path("i")));
    assert_eq!(lc.len(), 2);
    for (a, b) in lc.iter().zip(&li) {
        assert!((a - b).abs() <= 1e-3 * b.abs(), "compiled loss {a} vs interpreter {b}");
    }
    assert!(lc[1] < lc[0], "{lc:?}");
    let model = weights::open_checkpoint(&s.path("c/step-2")).unwrap();
    let opt = weights::open_checkpoint(&s.path("c/step-2/optimizer.safetensors")).unwrap();
    let mut checked = 0;
    // Every bf16 weight the step trains (the MTP module's stay as they were: no MTP loss here).
    for t in model.tensors().filter(|t| t.dtype == StDType::BF16 && !t.name.starts_with("model.layers.4.")) {
        let master = opt.read(&format!("master.{}", t.name)).unwrap();
        assert_eq!(
            opt.tensors().find(|m| m.name == format!("adam.m.{}", t.name)).unwrap().dtype,
            StDType::BF16
        );
        let stored = model.read(&t.name).unwrap();
        let round = |x: f32| {
            let b = x.to_bits();
            f32::from_bits(((b + 0x7fff + ((b >> 16) & 1)) >> 16) << 16)
        };
        for (m, w) in f32s(&master).iter().zip(f32s(&stored)) {
            assert_eq!(round(*m), *w, "{}: the stored weight is not its master rounded", t.name);
        }
        checked += 1;
    }
    assert!(checked > 100, "{checked} bf16 weights");
    // Resume from step 1: step 2 byte for byte.
    run(&["--resume", &s.str("c/step-1"), "--steps", "2", "--out", &r]);
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let (a, b) = (s.path("c/step-2").join(f), s.path("r/step-2").join(f));
        assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap(), "{f} differs after a resume");
    }
}

/// `kiln train ARTIFACT` runs an artifact from `kiln compile --train` with the losses and optimizer
/// compiled into it (recorded in its manifest): the same checkpoint, byte for byte, as training
/// the spec with those settings; a different setting, a batch larger than the artifact's, and an
/// inference artifact are refused before any step.
#[test]
fn kiln_train_runs_an_artifact_from_compile_train_with_its_settings() {
    let s = Scratch::new();
    let data = root().join(GOLDEN).join("tokens.safetensors").to_string_lossy().into_owned();
    let art = s.str("t.kiln");
    let settings = ["--bias-update-speed", "0.001", "--betas", "0.8,0.9", "--clip", "0.5"];
    let c = kiln(
        &[
            &["compile", "models/tiny.toml", "--train", "--accumulate", "--target", "cpu"][..],
            &["--max-batch", "2", "--max-context", "32", "-o", &art],
            &settings,
        ]
        .concat(),
    );
    assert!(c.ok, "{}", c.stderr);
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("t.kiln/manifest.json")).unwrap()).unwrap();
    assert_eq!(m["train"]["beta1"], 0.8);
    assert_eq!(m["train"]["clip"], 0.5);
    let train = |model: &str, extra: &[&str]| {
        let base = ["train", model, "--random-weights", "3", "--data", &data, "--steps", "2", "--batch", "4"];
        kiln(&[&base[..], extra].concat())
    };
    let (a, b) = (s.str("a"), s.str("b"));
    let r = train(&art, &["--micro-batch", "2", "--out", &a]);
    assert!(r.ok && r.stdout.contains("the artifact"), "{}{}", r.stdout, r.stderr);
    let r = train("models/tiny.toml", &[&["--micro-batch", "2", "--out", &b][..], &settings].concat());
    assert!(r.ok, "{}", r.stderr);
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let (x, y) = (s.path("a/step-2").join(f), s.path("b/step-2").join(f));
        assert_eq!(
            std::fs::read(x).unwrap(),
            std::fs::read(y).unwrap(),
            "{f}: the artifact trained differently"
        );
    }
    let e = train(&art, &["--micro-batch", "2", "--clip", "1", "--out", &s.str("c")]).stderr;
    assert!(e.contains("compiled with --clip 0.5 (given 1)"), "{e}");
    let e = train(&art, &["--out", &s.str("c")]).stderr;
    assert!(e.contains("compiled for micro-batches of at most 2 rows"), "{e}");
    assert!(!s.path("c/step-1").exists());
    let inference = s.str("i.kiln");
    assert!(kiln(&["compile", "models/tiny.toml", "--target", "cpu", "-o", &inference]).ok);
    let e = train(&inference, &["--out", &s.str("c")]).stderr;
    assert!(e.contains("not a training artifact"), "{e}");
    let e = kiln(&["compile", "models/tiny.toml", "--clip", "2", "-o", &s.str("x")]).stderr;
    assert!(e.contains("go with --train"), "{e}");
}

/// An artifact compiled for more rows and tokens than a run gives trains that run as a step
/// compiled for its own sizes does, byte for byte. (The gradient of the mean loss divides by the
/// token count, which the step computes from a constant broadcast to `[B, T]`: a launch that read
/// constants alone was folded once at load, at the artifact's largest sizes, and every gradient
/// came out `max / actual` times too small: 4x here.)
#[test]
fn an_artifact_compiled_for_larger_sizes_trains_smaller_batches_exactly() {
    let s = Scratch::new();
    let data = root().join(GOLDEN).join("tokens.safetensors").to_string_lossy().into_owned();
    let art = s.str("big.kiln");
    // Twice the rows and tokens the runs give.
    let larger = ["--max-batch", "4", "--max-context", "64"];
    let c = kiln(&[&["compile", "models/tiny.toml", "--train", "-o", &art][..], &larger].concat());
    assert!(c.ok, "{}", c.stderr);
    let train = |model: &str, out: &str| {
        let r = kiln(&[
            "train",
            model,
            "--random-weights",
            "3",
            "--data",
            &data,
            "--steps",
            "2",
            "--batch",
            "2",
            "--out",
            out,
        ]);
        assert!(r.ok, "{}", r.stderr);
    };
    let (a, b) = (s.str("a"), s.str("b"));
    train(&art, &a);
    train("models/tiny.toml", &b);
    let norms = |dir: &str| -> Vec<f64> {
        let text = std::fs::read_to_string(Path::new(dir).join("metrics.jsonl")).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|l| l.get("event").is_none())
            .map(|l| l["grad_norm"].as_f64().unwrap())
            .collect()
    };
    assert_eq!(norms(&a), norms(&b), "the gradient norms of the two runs");
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let (x, y) = (s.path("a/step-2").join(f), s.path("b/step-2").join(f));
        assert!(
            std::fs::read(x).unwrap() == std::fs::read(y).unwrap(),
            "{f}: the larger artifact trained differently"
        );
    }
}

/// The checkpoint folders `step-N` of `dir`, by N.
fn checkpoints(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("step-")?.parse().ok()).collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// The losses `metrics.jsonl` of `dir` logged, in order.
fn logged_losses(dir: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        // Step lines only: the monitor's events (alerts, skips) have an `event` key.
        .filter(|l| l.get("event").is_none())
        .map(|l| l["loss"].as_f64().unwrap())
        .collect()
}

/// The points of `loss.svg`'s polylines (loss first, then max load).
fn curve(dir: &Path) -> Vec<usize> {
    let svg = std::fs::read_to_string(dir.join("loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
    assert_eq!(svg.matches('<').count(), svg.matches('>').count(), "balanced tags");
    svg.lines()
        .filter(|l| l.starts_with("<polyline"))
        .map(|l| l.split("points=\"").nth(1).unwrap().split(' ').count())
        .collect()
}

/// `--shuffle SEED`: the batches differ from the in-order run's, the seed and epoch are in
/// `trainer.json`, and 2 shuffled steps then 3 more from the checkpoint equal 5 steps byte for
/// byte (5 batches of 2 over 3 rows cross three epochs, each in its own order). `loss.svg` plots
/// the whole log, the resumed run's too.
#[test]
fn kiln_train_shuffles_seeded_and_resumes_bit_identically() {
    let s = Scratch::new();
    let data = root().join("tests/goldens/perplexity/tokens.safetensors").to_string_lossy().into_owned();
    let base = ["train", "models/tiny.toml", "--data", data.as_str(), "--interp", "--batch", "2"];
    let run = |extra: &[&str]| {
        let r = kiln(&[&base[..], extra].concat());
        assert!(r.ok, "{}", r.stderr);
        r
    };
    let (ordered, one, two) = (s.str("ordered"), s.str("one"), s.str("two"));
    let w = ["--random-weights", "3", "--bias-update-speed", "0.001"];
    run(&[&w[..], &["--steps", "5", "--out", &ordered]].concat());
    let r = run(&[&w[..], &["--steps", "5", "--out", &one, "--shuffle", "7"]].concat());
    assert!(r.stdout.contains("rows shuffled each epoch (seed 7)"), "{}", r.stdout);
    assert!(r.stderr.is_empty(), "no progress bar when stderr is not a terminal: {}", r.stderr);
    let (lo, ls) = (logged_losses(&s.path("ordered")), logged_losses(&s.path("one")));
    assert_eq!((lo.len(), ls.len()), (5, 5));
    assert!(lo.iter().zip(&ls).any(|(a, b)| a != b), "shuffled losses {ls:?} equal the in-order {lo:?}");
    let trainer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("one/step-5/trainer.json")).unwrap()).unwrap();
    assert_eq!(
        (trainer["shuffle"].as_u64(), trainer["epoch"].as_u64(), trainer["row"].as_u64()),
        (Some(7), Some(3), Some(1))
    );

    run(&[&w[..], &["--steps", "2", "--out", &two, "--shuffle", "7"]].concat());
    // The order is the checkpoint's: another seed is refused, none keeps the checkpoint's.
    let r = kiln(
        &[&base[..], &["--resume", &s.str("two/step-2"), "--steps", "5", "--out", &two, "--shuffle", "8"]]
            .concat(),
    );
    assert!(!r.ok && r.stderr.contains("shuffled with seed 7"), "{}", r.stderr);
    run(&["--bias-update-speed", "0.001", "--resume", &s.str("two/step-2"), "--steps", "5", "--out", &two]);
    for f in ["model.safetensors", "optimizer.safetensors", "trainer.json"] {
        let (a, b) = (s.path("one/step-5").join(f), s.path("two/step-5").join(f));
        assert_eq!(
            std::fs::read(a).unwrap(),
            std::fs::read(b).unwrap(),
            "{f} differs after a shuffled resume"
        );
    }
    assert_eq!(logged_losses(&s.path("two")), ls);
    assert_eq!(curve(&s.path("two")), [5, 5], "loss and max load, one point per step of both runs");
    assert_eq!(curve(&s.path("ordered")), [5, 5]);
    assert!(!std::fs::read_dir(s.path("two")).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with('.')));
}

/// A run killed with SIGKILL while it writes a checkpoint per step leaves its last complete
/// checkpoint loadable and resumable; the resume removes the hidden folders a dead run left.
#[test]
fn kiln_train_killed_with_sigkill_resumes_from_its_last_checkpoint() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let s = Scratch::new();
    let data = root().join("tests/goldens/perplexity/tokens.safetensors").to_string_lossy().into_owned();
    let out = s.str("run");
    let args = ["train", "models/tiny.toml", "--data", data.as_str(), "--interp", "--batch", "2"];
    let mut child = kiln_command()
        .args(args)
        .args(["--random-weights", "3", "--save-every", "1", "--steps", "200", "--out", &out])
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Poll for a few checkpoints (a step takes about 0.1 s; the limit is only against a hang).
    let start = Instant::now();
    while checkpoints(&s.path("run")).len() < 3 {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("kiln train exited ({status}) before writing 3 checkpoints");
        }
        assert!(start.elapsed() < Duration::from_secs(300), "no 3 checkpoints in 300 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success());
    let n = *checkpoints(&s.path("run")).last().unwrap();
    assert!((3..200).contains(&n), "killed at step {n}");
    let last = s.path("run").join(format!("step-{n}"));
    let trainer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(last.join("trainer.json")).unwrap()).unwrap();
    assert_eq!(trainer["step"].as_u64(), Some(n));
    let r = kiln(&[
        "run",
        "models/tiny.toml",
        "--interp",
        "--weights",
        &last.to_string_lossy(),
        "--prompt-ids",
        "1,2",
        "--max-new-tokens",
        "1",
    ]);
    assert!(r.ok, "{}", r.stderr);

    // A dead run's temporary (pid 2^32-1 never runs) goes with the resume.
    std::fs::create_dir_all(s.path("run").join(".step-9999.tmp-4294967295")).unwrap();
    let r = kiln(
        &[&args[..], &["--resume", &last.to_string_lossy(), "--steps", &(n + 2).to_string(), "--out", &out]]
            .concat(),
    );
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.stdout.lines().filter(|l| l.starts_with("step ")).count(), 2, "{}", r.stdout);
    let done: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(s.path("run").join(format!("step-{}/trainer.json", n + 2))).unwrap(),
    )
    .unwrap();
    assert_eq!(done["step"].as_u64(), Some(n + 2));
    let hidden: Vec<String> = std::fs::read_dir(s.path("run"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
    // The curve covers every step logged, the killed run's included.
    let logged = std::fs::read_to_string(s.path("run/metrics.jsonl")).unwrap();
    let steps: std::collections::BTreeSet<u64> = logged
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .collect();
    assert!(steps.len() as u64 >= n + 2);
    assert_eq!(curve(&s.path("run"))[0], steps.len());
}

/// `kiln bench train` on the tiny model: kiln's row with a step-0 loss near ln(vocabulary)
/// (random weights) is there, PyTorch is skipped with the reason when the given
/// Python does not exist, the profile sums to kernel kinds, and bad sizes are refused.
#[test]
fn kiln_bench_train_reports_kiln_and_says_why_pytorch_is_skipped() {
    let r = kiln(&[
        "bench",
        "train",
        "models/tiny.toml",
        "--seq-len",
        "16",
        "--batch",
        "2",
        "--steps",
        "1",
        "--python",
        "/nonexistent/python",
        "--profile",
    ]);
    assert!(r.ok, "{}", r.stderr);
    let row =
        r.stdout.lines().find(|l| l.starts_with("kiln, compiled")).unwrap_or_else(|| panic!("{}", r.stdout));
    let loss: f64 = row.split_whitespace().last().unwrap().parse().unwrap();
    // Random weights of std 0.02 over a 512-token vocabulary: the loss starts near ln 512.
    assert!((loss - 512f64.ln()).abs() < 0.5, "{loss}");
    assert!(r.stdout.contains("PyTorch eager: skipped (cannot run /nonexistent/python"), "{}", r.stdout);
    assert!(r.stdout.contains("by kind: "), "{}", r.stdout);
    // --json: the figures in one document, the baseline's absence said.
    let j = kiln(&[
        "bench",
        "train",
        "models/tiny.toml",
        "--seq-len",
        "16",
        "--batch",
        "2",
        "--steps",
        "1",
        "--python",
        "/nonexistent/python",
        "--json",
    ]);
    assert!(j.ok, "{}", j.stderr);
    let doc: serde_json::Value =
        serde_json::from_str(&j.stdout).unwrap_or_else(|e| panic!("{e}: {}", j.stdout));
    let engines = doc["engines"].as_array().unwrap();
    assert_eq!(engines.len(), 1, "{doc}");
    assert!(engines[0]["tokens_per_s"].as_f64().unwrap() > 0.0);
    // The same seed, the same first loss (the table prints 6 decimals).
    assert!((engines[0]["step0_loss"].as_f64().unwrap() - loss).abs() < 1e-6, "{doc}");
    assert!(doc["baseline_skipped"].as_str().unwrap().contains("/nonexistent/python"), "{doc}");
    let r = kiln(&["bench", "train", "models/tiny.toml", "--steps", "0"]);
    assert!(!r.ok && r.stderr.contains("must be at least 1"), "{}", r.stderr);
}

/// The expert-parallel form of the training graph (`expert_parallel::split_tokens`): at one rank it
/// is the plain graph on the interpreter (its sums over a group of one are the values themselves):
/// the loss bit for bit, every gradient to rounding; at two, each rank holds half the experts, gets no
/// gradient for the others, and its backward pass exchanges tokens where the forward pass did.
#[test]
fn the_expert_parallel_graph_of_one_rank_is_the_plain_one() {
    use kiln_compiler::expert_parallel::{split_tokens, EP_GROUP, EP_RANK};
    use kiln_ir::Op;
    let spec = kiln_compiler::spec::load(&root().join("models/tiny.toml")).unwrap();
    let losses = build::TrainLosses { mtp_lambda: 0.3, balance_alpha: 1e-4, ..Default::default() };
    let (forward, _) = build::build_train(&spec, &losses).unwrap();
    let plain = differentiate(&forward, "loss").unwrap();
    let (one, per_rank) = split_tokens(&forward, 1).unwrap().unwrap();
    assert_eq!(per_rank, 16);
    let one = differentiate(&one, "loss").unwrap();

    let decls = weights::graph_params(&build::build_graph(&spec).unwrap()).unwrap();
    let initial: Vec<weights::HostTensor> = weights::random_tensors(decls, 3, 0.02).collect();
    let rows = data::load_tokens(&root().join(GOLDEN).join("tokens.safetensors"), &TokenFormat::Safetensors)
        .unwrap();
    let t = rows.width() - 1;
    let mut feeds = batch_feeds(&rows, t);
    for (name, v) in forward.inputs() {
        let ty = forward.ty(v);
        if let Some(p) = initial.iter().find(|p| p.name == name) {
            feeds.insert(name.to_string(), to_tensor(p.clone()).unwrap());
        } else if name.starts_with("mtp_") {
            // The MTP inputs, `[B, T]` (their values do not matter here).
            let n = 4 * t;
            let v = match ty.dtype.is_float() {
                true => kiln_ir::interp::Tensor::from_f32(ty.dtype, vec![4, t as u64], vec![1.0; n]).unwrap(),
                false => {
                    let ids = (0..n as i64).map(|i| i % 50).collect();
                    kiln_ir::interp::Tensor::from_i64(ty.dtype, vec![4, t as u64], ids).unwrap()
                }
            };
            feeds.insert(name.to_string(), v);
        }
    }
    let declared: Vec<String> = forward.params().into_iter().map(|(n, _)| n.to_string()).collect();
    let params: std::collections::HashMap<_, _> = initial
        .iter()
        .filter(|p| declared.contains(&p.name))
        .map(|p| (p.name.clone(), to_tensor(p.clone()).unwrap()))
        .collect();
    let want = kiln_ir::interp::run(&plain, &feeds, &params).unwrap();
    feeds.insert(
        EP_RANK.to_string(),
        kiln_ir::interp::Tensor::from_f32(kiln_ir::DType::F32, vec![], vec![0.0]).unwrap(),
    );
    let got = kiln_ir::interp::run(&one, &feeds, &params).unwrap();
    let outputs: Vec<&String> = want.keys().filter(|k| *k == "loss" || k.starts_with(GRAD_PREFIX)).collect();
    assert!(outputs.len() > 190, "{}", outputs.len());
    // The loss bit for bit; a gradient is the same sum, whose terms autodiff may add in another
    // order (the rewritten layers' nodes are newer), so to rounding.
    assert_eq!(want["loss"].as_f32().unwrap(), got["loss"].as_f32().unwrap());
    let mut worst = (0f32, String::new());
    for name in outputs {
        let (a, b) = (want[name].as_f32().unwrap(), got[name].as_f32().unwrap());
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
        let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
        if d > worst.0 {
            worst = (d, name.clone());
        }
    }
    eprintln!(
        "one rank against the plain graph: gradients within {:e} of their largest value ({})",
        worst.0, worst.1
    );
    assert!(worst.0 <= 1e-5, "`{}` differs by {:e} at one rank", worst.1, worst.0);

    // Two ranks: rank 0's experts, no gradient for the others, and the sums in both passes.
    let (two, per_rank) = split_tokens(&forward, 2).unwrap().unwrap();
    assert_eq!(per_rank, 8);
    let exchanges = |g: &kiln_ir::Graph, flagged: usize| {
        g.nodes()
            .into_iter()
            .filter(|&n| {
                let node = g.node(n);
                let a2a = matches!(&node.op, Op::AllToAll { group, size: 2 } if group == EP_GROUP);
                a2a && node.inputs.len() == flagged
            })
            .count()
    };
    assert!(!two.nodes().into_iter().any(|n| matches!(two.node(n).op, Op::AllReduce { .. })));
    let layers =
        forward.nodes().into_iter().filter(|&n| matches!(forward.node(n).op, Op::MoeExperts { .. })).count();
    // Per MoE layer: the flags' exchange, and the dispatch and the combine, which send flagged rows.
    assert_eq!((exchanges(&two, 1), exchanges(&two, 2)), (layers, 2 * layers));
    let two = differentiate(&two, "loss").unwrap();
    // The backward pass adds the adjoints of the dispatch (x and the weights in one row) and of the
    // combine, each with its flags sent back.
    assert_eq!((exchanges(&two, 1), exchanges(&two, 2)), (3 * layers, 4 * layers));
    let grads: Vec<String> =
        two.outputs().iter().map(|(n, _)| n.clone()).filter(|n| n.contains(".experts.")).collect();
    assert!(!grads.is_empty());
    for n in &grads {
        let e: u64 = n.split(".experts.").nth(1).unwrap().split('.').next().unwrap().parse().unwrap();
        assert!(e < 8, "{n}: another rank's expert");
    }
}
