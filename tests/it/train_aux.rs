//! DeepSeek-V3's auxiliary training losses against PyTorch: the MTP loss (report eq. 24-25) and the
//! complementary sequence-wise balance loss (eq. 17-20) in kiln's train step, against
//! `tests/goldens/train_aux` (made by `tools/goldens/make_train_aux.py`: transformers' DeepSeek-V3 and
//! `MtpModel` for the model, the two losses written from the equations in torch).
//!
//! The model is v3_tiny_mtp's architecture at half its width (2 main layers, the second MoE, and one
//! MoE MTP module; live correction biases and group limit), the batch 2 rows of 16 + 1 tokens, and
//! the loss `CE + λ/D Σ_k L_MTP^k + L_Bal` with λ = 0.3, D = 1, α = 0.01. The golden holds the
//! gradient of the total and of each term. kiln gives the terms as differences of three train
//! graphs: `(λ, α)`, `(λ, 0)` and `(0, 0)`; so the balance term, whose gradients are a thousand times
//! smaller than the others', is checked against its own scale and cannot hide inside the total's
//! tolerance.
//!
//! Bounds: the loss within 1e-5 relative, every gradient of the total within 1e-5 absolute, and each
//! term's gradients within 2e-3 of that term's largest gradient (0.28 for CE, 0.068 for MTP, 4.1e-4
//! for the balance loss; the golden's wrong conventions move a term by at least 6.7e-2 of it).
//! Measured (printed with `--nocapture`): on the interpreter the loss is bit-identical, the total's
//! gradients within 2.2e-7, the terms within 6.0e-7, 1.6e-6 and 1.5e-4 of their largest gradient;
//! compiled, the loss within 7.5e-8 relative, the total's gradients within 2.2e-7, the terms within
//! 8.0e-7, 1.5e-6 and 2.4e-4 (the balance term's error is the rounding of the embedding's gradient,
//! about 1e-7, left by the subtraction of two totals).

use std::collections::HashMap;
use std::path::Path;

use kiln_compiler::autodiff::{differentiate, GRAD_PREFIX};
use kiln_compiler::build::{self, TrainLosses};
use kiln_compiler::pack;
use kiln_compiler::train::Optimizer;
use kiln_ir::interp::{self, Tensor};
use kiln_runtime::data::{self, TokenFormat, TokenRows};
use kiln_runtime::reference::to_tensor;
use kiln_runtime::train::step_inputs;
use kiln_runtime::weights::{self, HostData, HostTensor};

use crate::util::{root, Scratch};

const GOLDEN: &str = "tests/goldens/train_aux";

/// Each term's bound, as a fraction of the term's largest gradient.
const TERM_TOLERANCE: f64 = 2e-3;

struct Case {
    spec: kiln_ir::ModelSpec,
    weights: Vec<HostTensor>,
    rows: TokenRows,
    json: serde_json::Value,
    /// λ and α of the golden.
    lambda: f64,
    alpha: f64,
}

fn case() -> Case {
    let dir = root().join(GOLDEN);
    let spec = kiln_compiler::spec::load(&dir.join("config.json")).unwrap();
    let ckpt = weights::open_checkpoint(&dir).unwrap();
    let weights = weights::bind(&build::build_graph(&spec).unwrap(), &ckpt).unwrap();
    let rows = data::load_tokens(&dir.join("tokens.safetensors"), &TokenFormat::Safetensors).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let hyper = &json["hyperparameters"];
    let (lambda, alpha) = (hyper["mtp_lambda"].as_f64().unwrap(), hyper["balance_alpha"].as_f64().unwrap());
    assert_eq!(hyper["mtp_depth"].as_u64(), spec.mtp.as_ref().map(|m| m.num_layers));
    Case { spec, weights, rows, json, lambda, alpha }
}

fn losses(mtp_lambda: f64, balance_alpha: f64) -> TrainLosses {
    TrainLosses { mtp_lambda, balance_alpha, ..TrainLosses::default() }
}

fn f32s(t: &HostTensor) -> &[f32] {
    match &t.data {
        HostData::F32(v) => v,
        HostData::I64(_) => panic!("{} is not a float tensor", t.name),
    }
}

/// Gradients by parameter name.
type Grads = HashMap<String, Vec<f64>>;

/// kiln's loss and the gradient of every trained parameter, from the differentiated train graph on
/// the reference interpreter, with the inputs `kiln train` feeds (`step_inputs`: the MTP tokens,
/// targets and mask shifted from the rows).
fn interpreted(c: &Case, l: &TrainLosses) -> (f64, Grads) {
    let (forward, _) = build::build_train(&c.spec, l).unwrap();
    let grads = differentiate(&forward, "loss").unwrap();
    let inputs: Vec<String> = grads.inputs().iter().map(|(n, _)| n.to_string()).collect();
    let mut feeds: HashMap<String, Tensor> = HashMap::new();
    for t in step_inputs(&inputs, &c.rows, 0.0).unwrap() {
        if inputs.contains(&t.name) {
            feeds.insert(t.name.clone(), to_tensor(t).unwrap());
        }
    }
    // The routers' selection biases are inputs (states) of the training graph.
    for w in &c.weights {
        if inputs.contains(&w.name) {
            feeds.insert(w.name.clone(), to_tensor(w.clone()).unwrap());
        }
    }
    let declared: Vec<String> = grads.params().into_iter().map(|(n, _)| n.to_string()).collect();
    let params = (c.weights.iter())
        .filter(|w| declared.contains(&w.name))
        .map(|w| (w.name.clone(), to_tensor(w.clone()).unwrap()))
        .collect();
    let out = interp::run(&grads, &feeds, &params).unwrap();
    let loss = f64::from(out["loss"].as_f32().unwrap()[0]);
    let g = (out.iter())
        .filter_map(|(k, v)| {
            let name = k.strip_prefix(GRAD_PREFIX)?;
            Some((name.to_string(), v.as_f32().unwrap().iter().map(|&x| f64::from(x)).collect()))
        })
        .collect();
    (loss, g)
}

/// The golden's gradients in `file`, by name.
fn golden(file: &str) -> Grads {
    let ckpt = weights::open_checkpoint(&root().join(GOLDEN).join(file)).unwrap();
    let names: Vec<String> = ckpt.tensors().map(|t| t.name.clone()).collect();
    (names.into_iter())
        .map(|n| {
            let t = ckpt.read(&n).unwrap();
            (n, f32s(&t).iter().map(|&x| f64::from(x)).collect())
        })
        .collect()
}

/// `a - b`, a tensor missing from one side being zero (a train graph without the MTP module has no
/// MTP parameters).
fn minus(a: &Grads, b: &Grads) -> Grads {
    let mut out = a.clone();
    for (name, gb) in b {
        let ga = out.entry(name.clone()).or_insert_with(|| vec![0.0; gb.len()]);
        for (x, y) in ga.iter_mut().zip(gb) {
            *x -= y;
        }
    }
    out
}

/// The largest difference between kiln's and the golden's gradients and the parameter where it is;
/// every golden tensor must have a kiln gradient of its size, and kiln none other (a parameter the
/// graph lacks counts as zero when `absent_is_zero`).
fn worst(got: &Grads, want: &Grads, absent_is_zero: bool) -> (f64, String) {
    let mut worst = (0f64, String::new());
    for (name, w) in want {
        let zeros = vec![0.0; w.len()];
        let g = match got.get(name) {
            Some(g) => g,
            None if absent_is_zero => &zeros,
            None => panic!("kiln has no gradient for {name}"),
        };
        assert_eq!(g.len(), w.len(), "{name}: gradient size");
        let d = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
        if d > worst.0 {
            worst = (d, name.clone());
        }
    }
    for name in got.keys() {
        assert!(want.contains_key(name), "kiln has a gradient for {name}, the golden none");
    }
    worst
}

fn largest(g: &Grads) -> f64 {
    g.values().flatten().fold(0f64, |m, x| m.max(x.abs()))
}

/// The train step on the reference interpreter: the loss and every gradient of
/// `CE + λ L_MTP + L_Bal` against PyTorch, then each term on its own (CE from the `(0, 0)` graph, the
/// MTP term as `(λ, 0)` minus it, the balance term as `(λ, α)` minus `(λ, 0)`).
#[test]
fn mtp_and_balance_gradients_match_pytorch() {
    let c = case();
    let want_loss = |k: &str| c.json["losses"][k].as_f64().unwrap();
    let (loss, total) = interpreted(&c, &losses(c.lambda, c.alpha));
    let rel = (loss - want_loss("total")).abs() / want_loss("total");
    eprintln!("loss {loss} vs PyTorch {} ({rel:e} relative)", want_loss("total"));
    assert!(rel <= 1e-5, "loss {loss} vs PyTorch {} ({rel:e} relative)", want_loss("total"));
    let want_total = golden("grads.safetensors");
    assert_eq!(want_total.len(), c.json["model"]["parameters"].as_u64().unwrap() as usize);
    let (d, at) = worst(&total, &want_total, false);
    eprintln!("total: {} gradients, max abs diff vs PyTorch {d:e} ({at})", want_total.len());
    assert!(d <= 1e-5, "total gradient of {at} differs from PyTorch's by {d:e}");

    let (loss_ce, ce) = interpreted(&c, &losses(0.0, 0.0));
    let (loss_mtp, with_mtp) = interpreted(&c, &losses(c.lambda, 0.0));
    let terms = [
        ("ce", loss_ce, ce.clone(), "grads_ce.safetensors"),
        ("mtp", loss_mtp - loss_ce, minus(&with_mtp, &ce), "grads_mtp.safetensors"),
        ("balance", loss - loss_mtp, minus(&total, &with_mtp), "grads_balance.safetensors"),
    ];
    for (term, l, got, file) in terms {
        let want = golden(file);
        let (d, at) = worst(&got, &want, true);
        let scale = largest(&want);
        let ld = (l - want_loss(term)).abs();
        eprintln!(
            "{term}: loss {l} vs PyTorch {} (diff {ld:e}); gradients max abs diff {d:e} ({at}), {:e} of the \
             largest ({scale:e})",
            want_loss(term),
            d / scale
        );
        assert!(
            d <= TERM_TOLERANCE * scale,
            "{term}: the gradient of {at} differs by {d:e} (largest {scale:e})"
        );
        // kiln's terms are differences of f32 losses near 6.4 (an ulp is 4.8e-7).
        assert!(ld <= 2e-6, "{term}: loss {l} vs PyTorch {}", want_loss(term));
    }
}

/// The learning rate of [`compiled`]'s one step.
const LR: f64 = 1024.0;

/// The compiled train step's loss, gradient norm and gradients. A train step outputs weights, not
/// gradients; with AdamW (betas 0.9, 0.95) at eps = 1 and no weight decay, its first step moves each
/// weight by exactly `lr g / (|g| + 1)` (at t = 1 the bias-corrected moments are `g` and `g^2`), so
/// `g = u / (1 - |u|)` for the move `u = (p0 - p1) / lr`. A large lr keeps the rounding of `p1` (an
/// ulp of the weight) small beside the move. The clipping bound is far above the norm, so the clip
/// coefficient is exactly 1. (Not `clip: None`: that program does not compile, because fusion puts a
/// moment's update in the kernel that computes its gradient and the memory plan then refuses to
/// update the moment in place; `kiln train --clip 0` fails the same way.)
fn compiled(c: &Case, l: &TrainLosses, dir: &Path) -> (f64, f64, Grads) {
    use kiln_runtime::cpu::{CpuModel, CpuOptions};
    use kiln_runtime::train::CompiledTrainer;
    let opt = Optimizer {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1.0,
        weight_decay: 0.0,
        clip: Some(1e6),
        moments: kiln_ir::DType::F32,
        shards: 1,
    };
    let (rows, t) = (c.rows.rows() as u64, c.rows.width() as u64 - 1);
    let options = pack::Options {
        train: Some(kiln_compiler::pack::TrainOptions {
            losses: *l,
            optimizer: opt,
            accumulate: false,
            data_parallel: false,
            expert_parallel: None,
        }),
        kv_cache: false,
        score: false,
        ..pack::Options::new(kiln_compiler::target::Targets::Cpu, rows, t)
    };
    let artifact = pack::compile(pack::Source::Spec(c.spec.clone()), &options, &mut ()).unwrap();
    pack::write(&artifact, dir).unwrap();
    let art = kiln_runtime::artifact::load(dir).unwrap();
    let wanted = weights::manifest_params(art.manifest()).unwrap();
    let given = (c.weights.iter()).filter(|w| wanted.iter().any(|d| d.name == w.name)).cloned().map(Ok);
    let mut trainer =
        CompiledTrainer::new(CpuModel::load(&art, given, &CpuOptions::default()).unwrap()).unwrap();
    let st = trainer.step(&c.rows, LR as f32).unwrap();
    let before: HashMap<&str, &HostTensor> = c.weights.iter().map(|w| (w.name.as_str(), w)).collect();
    let mut grads = Grads::new();
    for w in trainer.weights().unwrap() {
        let p0 = f32s(before[w.name.as_str()]);
        if w.name.ends_with("e_score_correction_bias") {
            assert_eq!(f32s(&w), p0, "{}: the bias moved at γ = 0", w.name);
            continue;
        }
        let g = (p0.iter().zip(f32s(&w)))
            .map(|(&a, &b)| {
                let u = (f64::from(a) - f64::from(b)) / LR;
                u / (1.0 - u.abs())
            })
            .collect();
        grads.insert(w.name.clone(), g);
    }
    (f64::from(st.loss), f64::from(st.grad_norm), grads)
}

/// The compiled train step (the CPU library) against the same golden and to the same bounds: its
/// loss, its gradient norm (against the norm of the golden's gradients), and its gradients recovered
/// from one AdamW step, for the total and for each term.
#[test]
fn compiled_mtp_and_balance_gradients_match_pytorch() {
    let c = case();
    let s = Scratch::new();
    let want_loss = c.json["losses"]["total"].as_f64().unwrap();
    let (loss, norm, total) = compiled(&c, &losses(c.lambda, c.alpha), &s.path("full"));
    let want_total = golden("grads.safetensors");
    let want_norm = want_total.values().flatten().map(|x| x * x).sum::<f64>().sqrt();
    let (rel, nrel) = ((loss - want_loss).abs() / want_loss, (norm - want_norm).abs() / want_norm);
    eprintln!("compiled: loss {loss} vs PyTorch {want_loss} ({rel:e} relative), grad norm {nrel:e} relative");
    assert!(rel <= 1e-5 && nrel <= 1e-5, "loss {loss} vs {want_loss}, grad norm {norm} vs {want_norm}");
    let (d, at) = worst(&total, &want_total, false);
    eprintln!("compiled, total: max abs diff vs PyTorch {d:e} ({at})");
    assert!(d <= 1e-5, "compiled: the total gradient of {at} differs from PyTorch's by {d:e}");

    let (_, _, ce) = compiled(&c, &losses(0.0, 0.0), &s.path("ce"));
    let (_, _, with_mtp) = compiled(&c, &losses(c.lambda, 0.0), &s.path("mtp"));
    let terms = [
        ("ce", ce.clone(), "grads_ce.safetensors"),
        ("mtp", minus(&with_mtp, &ce), "grads_mtp.safetensors"),
        ("balance", minus(&total, &with_mtp), "grads_balance.safetensors"),
    ];
    for (term, got, file) in terms {
        let want = golden(file);
        let (d, at) = worst(&got, &want, true);
        let scale = largest(&want);
        eprintln!("compiled, {term}: max abs diff {d:e} ({at}), {:e} of the largest ({scale:e})", d / scale);
        assert!(d <= TERM_TOLERANCE * scale, "compiled, {term}: {at} differs by {d:e} (largest {scale:e})");
    }
}
