//! Every vector-Jacobian rule of the `autodiff` pass against central finite differences of the
//! reference interpreter. Each `tests/autodiff/*.kir` is a graph whose `param`s are the variables
//! and whose output `y` is any float value; the harness scores it as `loss = sum(y * r)` with a
//! random `r`, differentiates, and compares each parameter's gradient with
//! `(loss(p + h) - loss(p - h)) / 2h` at up to 24 elements per parameter. Header lines:
//! `// sizes: B=2 T=3` binds symbolic sizes; `// ids: NAME 0..16` gives an integer input's range;
//! `// tol: 2e-3` loosens the bound for a file; `// h: 1e-3` takes a smaller step (for a router,
//! whose selection must not change under the perturbation).
//!
//! Values are f32 in the graph (the interpreter accumulates in f64), so the differences use
//! h = 1e-2 and the bound is `tol * max(1, |grad|max of that parameter)` with tol 1e-3: 30x the
//! worst error measured (3.6e-5), far below any wrong rule (a wrong
//! rule is off by the gradient's own size).

use std::collections::HashMap;
use std::path::PathBuf;

use kiln_compiler::autodiff::{differentiate, GRAD_PREFIX};
use kiln_ir::interp::{run, Tensor};
use kiln_ir::{DType, Dim, Graph, Op, ReduceOp, SymBindings, TensorType};

use crate::util::{root, Rng};

fn header<'a>(src: &'a str, key: &str) -> Vec<&'a str> {
    src.lines()
        .map_while(|l| l.strip_prefix("//"))
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
        .collect()
}

fn sizes(src: &str) -> SymBindings {
    let mut s = SymBindings { b: 1, t: 1, s: 1 };
    for h in header(src, "sizes") {
        for kv in h.split_whitespace() {
            let (k, v) = kv.split_once('=').unwrap();
            let v: u64 = v.parse().unwrap();
            match k {
                "B" => s.b = v,
                "T" => s.t = v,
                "S" => s.s = v,
                _ => panic!("unknown size {k}"),
            }
        }
    }
    s
}

fn eval(ty: &TensorType, s: &SymBindings) -> Vec<u64> {
    ty.shape.iter().map(|d| d.eval(s).unwrap()).collect()
}

fn random(ty: &TensorType, s: &SymBindings, name: &str, range: Option<(i64, i64)>) -> Tensor {
    let shape = eval(ty, s);
    let n = shape.iter().product::<u64>() as usize;
    let mut rng = Rng::for_name(name, 7);
    if ty.dtype.is_float() {
        let v: Vec<f32> = (0..n).map(|_| rng.uniform(1.0)).collect();
        Tensor::from_f32(ty.dtype, shape, v).unwrap()
    } else {
        let (lo, hi) =
            range.unwrap_or_else(|| panic!("integer input `{name}` needs an `// ids: {name} LO..HI` header"));
        let v: Vec<i64> = (0..n).map(|_| lo + (rng.next() % (hi - lo) as u64) as i64).collect();
        Tensor::from_i64(ty.dtype, shape, v).unwrap()
    }
}

/// `g` with `r` (an input shaped like `y`) and `loss = sum(y * r)`.
fn scored(mut g: Graph) -> Graph {
    let y = g.outputs().iter().find(|(n, _)| n == "y").expect("an output `y`").1;
    let ty = g.ty(y).clone();
    let (_, r) = g.add_node(Op::Input { name: "__r".into() }, &[], vec![ty.clone()], None).unwrap();
    let (_, p) = g.add_node(Op::Binary(kiln_ir::BinaryOp::Mul), &[y, r[0]], vec![ty.clone()], None).unwrap();
    let axes: Vec<usize> = (0..ty.rank()).collect();
    let (_, l) = g
        .add_node(
            Op::Reduce { op: ReduceOp::Sum, axes, keep_dims: false },
            &[p[0]],
            vec![TensorType::scalar(DType::F32)],
            None,
        )
        .unwrap();
    g.remove_output("y");
    g.add_output("loss", l[0]).unwrap();
    g
}

fn loss(g: &Graph, inputs: &HashMap<String, Tensor>, params: &HashMap<String, Tensor>) -> f64 {
    let out = run(g, inputs, params).unwrap_or_else(|e| panic!("{e}"));
    f64::from(out["loss"].as_f32().unwrap()[0])
}

fn check_file(path: &PathBuf) {
    let rel = path.strip_prefix(root()).unwrap().display().to_string();
    let src = std::fs::read_to_string(path).unwrap();
    let s = sizes(&src);
    let tol: f64 = header(&src, "tol").first().map_or(1e-3, |t| t.parse().unwrap());
    let h: f32 = header(&src, "h").first().map_or(1e-2, |t| t.parse().unwrap());
    let ranges: HashMap<String, (i64, i64)> = header(&src, "ids")
        .into_iter()
        .map(|h| {
            let (name, range) = h.split_once(' ').unwrap();
            let (lo, hi) = range.trim().split_once("..").unwrap();
            (name.to_string(), (lo.parse().unwrap(), hi.parse().unwrap()))
        })
        .collect();
    let g = scored(kiln_ir::text::parse_file(&rel, &src).unwrap_or_else(|e| panic!("{e}")));
    let d = differentiate(&g, "loss").unwrap_or_else(|e| panic!("{rel}: {e}"));
    let inputs: HashMap<String, Tensor> = g
        .inputs()
        .into_iter()
        .map(|(n, v)| (n.to_string(), random(g.ty(v), &s, n, ranges.get(n).copied())))
        .collect();
    let mut params: HashMap<String, Tensor> =
        g.params().into_iter().map(|(n, ty)| (n.to_string(), random(ty, &s, n, None))).collect();
    let grads = run(&d, &inputs, &params).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let mut checked = 0;
    let mut names: Vec<String> = params.keys().cloned().collect();
    names.sort();
    for name in names {
        let Some(grad) = grads.get(&format!("{GRAD_PREFIX}{name}")) else {
            panic!("{rel}: no gradient for `{name}` (outputs {:?})", grads.keys().collect::<Vec<_>>())
        };
        let grad = grad.as_f32().unwrap().to_vec();
        let scale = grad.iter().fold(1f64, |m, &x| m.max(f64::from(x).abs()));
        let base = params[&name].clone();
        let values = base.as_f32().unwrap().to_vec();
        let step = (values.len() / 24).max(1);
        let mut worst = 0f64;
        for i in (0..values.len()).step_by(step) {
            let at = |delta: f32| {
                let mut v = values.clone();
                v[i] += delta;
                Tensor::from_f32(base.dtype(), base.shape().to_vec(), v).unwrap()
            };
            params.insert(name.clone(), at(h));
            let up = loss(&g, &inputs, &params);
            params.insert(name.clone(), at(-h));
            let down = loss(&g, &inputs, &params);
            let fd = (up - down) / (2.0 * f64::from(h));
            let err = (fd - f64::from(grad[i])).abs();
            worst = worst.max(err / scale);
            assert!(
                err <= tol * scale,
                "{rel}: d loss / d {name}[{i}] is {} by autodiff, {fd} by finite differences (scale {scale})",
                grad[i]
            );
            checked += 1;
        }
        params.insert(name.clone(), base);
        eprintln!("{rel}: {name}: worst |autodiff - fd| / scale = {worst:.2e}");
    }
    assert!(checked > 0, "{rel}: no parameter checked");
}

#[test]
fn every_rule_matches_finite_differences() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("tests/autodiff"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "kir"))
        .collect();
    files.sort();
    assert!(files.len() >= 5);
    for f in &files {
        check_file(f);
    }
}

#[test]
fn a_loss_that_is_not_a_scalar_or_an_op_without_a_rule_is_a_clear_error() {
    let g = kiln_ir::parse("graph @g {\n  %0 = param {name = \"w\"} : f32[4]\n  %1 = exp %0 : f32[4]\n  output \"loss\" = %1\n}\n").unwrap();
    let e = differentiate(&g, "loss").unwrap_err().to_string();
    assert_eq!(e, "the loss `loss` must be a scalar f32 (`f32[]`), found f32[4]");
    assert_eq!(
        differentiate(&g, "nope").unwrap_err().to_string(),
        "the graph has no output `nope` to differentiate"
    );
    let g = kiln_ir::parse(
        "graph @g {\n  %0 = param {name = \"w\"} : f32[4]\n  %1 = reduce_max %0 {axes = [0], keep_dims = false} : f32[]\n  output \"loss\" = %1\n}\n",
    )
    .unwrap();
    let e = differentiate(&g, "loss").unwrap_err().to_string();
    assert!(e.starts_with("autodiff has no rule for `reduce`"), "{e}");
    let _ = Dim::known(1);
}

/// The train-step program (clipping and AdamW as graph ops over state) against torch's AdamW
/// written out in f64 here, over three steps of a least-squares problem: the program's weights,
/// moments and step count after each step, fed back as the next step's state.
#[test]
fn the_train_step_program_is_torch_adamw_with_clipping() {
    use kiln_compiler::train::{train_step, Optimizer, GRAD_NORM, LR, STEP};
    let g = kiln_ir::parse(
        "graph @lsq {\n  %0 = input {name = \"x\"} : f32[5, 4]\n  %1 = param {name = \"w\"} : f32[3, 4]\n  \
         %2 = linear %0, %1 : f32[5, 3]\n  %3 = input {name = \"t\"} : f32[5, 3]\n  %4 = sub %2, %3 : f32[5, 3]\n  \
         %5 = mul %4, %4 : f32[5, 3]\n  %6 = reduce_mean %5 {axes = [0, 1], keep_dims = false} : f32[]\n  \
         output \"loss\" = %6\n}\n",
    )
    .unwrap();
    let d = differentiate(&g, "loss").unwrap();
    let opt = Optimizer {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        clip: Some(0.5),
        moments: kiln_ir::DType::F32,
        shards: 1,
    };
    let (step, states) = train_step(&d, &[], &opt).unwrap();
    let names: Vec<&str> = states.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, [STEP, "w", "adam.m.w", "adam.v.w"]);
    let s = SymBindings { b: 1, t: 1, s: 1 };
    let x = random(&TensorType::known(DType::F32, &[5, 4]), &s, "x", None);
    let t = random(&TensorType::known(DType::F32, &[5, 3]), &s, "t", None);
    let w0 = random(&TensorType::known(DType::F32, &[3, 4]), &s, "w", None);
    let f = |v: Vec<f32>, shape: &[u64]| Tensor::from_f32(DType::F32, shape.to_vec(), v).unwrap();
    let lr = 0.05f64;
    // The state the program keeps, and torch's AdamW in f64 beside it.
    let mut state: HashMap<String, Tensor> = HashMap::from([
        (STEP.to_string(), f(vec![0.0], &[])),
        ("w".to_string(), w0.clone()),
        ("adam.m.w".to_string(), f(vec![0.0; 12], &[3, 4])),
        ("adam.v.w".to_string(), f(vec![0.0; 12], &[3, 4])),
    ]);
    let mut w: Vec<f64> = w0.as_f32().unwrap().iter().map(|&v| f64::from(v)).collect();
    let (mut m, mut v) = (vec![0f64; 12], vec![0f64; 12]);
    for k in 1..=3 {
        // The reference: the gradient at the current weights from the differentiated graph alone.
        let p = HashMap::from([("w".to_string(), f(w.iter().map(|&v| v as f32).collect(), &[3, 4]))]);
        let feeds = HashMap::from([("x".to_string(), x.clone()), ("t".to_string(), t.clone())]);
        let out = run(&d, &feeds, &p).unwrap();
        let grad: Vec<f64> = out["grad.w"].as_f32().unwrap().iter().map(|&v| f64::from(v)).collect();
        let norm = grad.iter().map(|g| g * g).sum::<f64>().sqrt();
        let coef = (0.5 / (norm + 1e-6)).min(1.0);
        let (bc1, bc2) = (1.0 - 0.9f64.powi(k), 1.0 - 0.95f64.powi(k));
        for i in 0..12 {
            let g = grad[i] * coef;
            w[i] *= 1.0 - lr * 0.1;
            m[i] += (1.0 - 0.9) * (g - m[i]);
            v[i] = 0.95 * v[i] + (1.0 - 0.95) * g * g;
            w[i] -= lr / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + 1e-8);
        }
        // The program.
        let mut feeds = state.clone();
        feeds.insert("x".into(), x.clone());
        feeds.insert("t".into(), t.clone());
        feeds.insert(LR.into(), f(vec![lr as f32], &[]));
        let out = run(&step, &feeds, &HashMap::new()).unwrap();
        let got_norm = f64::from(out[GRAD_NORM].as_f32().unwrap()[0]);
        assert!((got_norm - norm).abs() <= 1e-5 * norm, "step {k}: grad norm {got_norm} vs {norm}");
        for name in [STEP, "w", "adam.m.w", "adam.v.w"] {
            state.insert(name.to_string(), out[name].clone());
        }
        assert_eq!(state[STEP].as_f32().unwrap()[0], k as f32);
        let got = state["w"].as_f32().unwrap();
        let worst = got.iter().zip(&w).map(|(&a, &b)| (f64::from(a) - b).abs()).fold(0f64, f64::max);
        eprintln!("AdamW step {k}: grad norm {norm:.6}, max |program - torch formula| = {worst:.2e}");
        assert!(worst <= 1e-6, "step {k}: weights differ by {worst}");
    }
}

/// The whole tiny DeepSeek-V3 (MLA, YaRN, 16 routed experts in 4 groups, a shared expert, the
/// biased sigmoid router, one MTP module) differentiates with every loss term on: the next-token
/// loss, the MTP loss (λ 0.3) and the sequence-wise balance loss (DeepSeek-V3's α, 1e-4). Every
/// parameter gets a gradient (the routers' selection biases are state inputs, not parameters), and
/// a sample of them agree with finite differences of the whole loss.
///
/// The balance loss's `f_i` counts the top K of the raw router scores (eq. 18), which at this
/// initialisation are nearly tied: a step of `h` flips some counts, and the loss jumps (by 1.3e-4
/// at α = 0.1, which put an embedding's difference off by 7%). At DeepSeek-V3's α the jumps are
/// far below the differences' noise, and so is the balance loss's share of a gradient: its
/// gradients are checked exactly, term by term, against PyTorch (`train_aux.rs`).
#[test]
fn the_whole_model_differentiates_and_matches_finite_differences() {
    use kiln_compiler::build::{build_train, TrainLosses};
    let spec = kiln_compiler::spec::load(&root().join("models/tiny.toml")).unwrap();
    let losses = TrainLosses { mtp_lambda: 0.3, balance_alpha: 1e-4, ..TrainLosses::default() };
    let (g, info) = build_train(&spec, &losses).unwrap();
    assert_eq!((info.mtp_depth, info.biases.len()), (1, 4), "one MTP module; 4 MoE layers with it");
    let d = differentiate(&g, "loss").unwrap_or_else(|e| panic!("{e}"));
    let full = kiln_compiler::build::build_graph(&spec).unwrap();
    let all: HashMap<String, Tensor> =
        kiln_runtime::weights::random_tensors(kiln_runtime::weights::graph_params(&full).unwrap(), 3, 0.02)
            .map(|t| (t.name.clone(), kiln_runtime::reference::to_tensor(t).unwrap()))
            .collect();
    let declared: Vec<String> = g.params().into_iter().map(|(n, _)| n.to_string()).collect();
    let params: HashMap<String, Tensor> =
        all.iter().filter(|(n, _)| declared.contains(n)).map(|(n, t)| (n.clone(), t.clone())).collect();
    let ids = |seed: &str| {
        let mut r = Rng::for_name(seed, 1);
        Tensor::from_i64(DType::I32, vec![2, 6], (0..12).map(|_| (r.next() % 512) as i64).collect()).unwrap()
    };
    let mask: Vec<f32> = (0..12).map(|i| if i % 6 < 4 { 1.0 } else { 0.0 }).collect();
    let mut inputs = HashMap::from([
        ("tokens".to_string(), ids("tokens")),
        ("targets".to_string(), ids("targets")),
        ("mtp_tokens.1".to_string(), ids("mtp_tokens")),
        ("mtp_targets.1".to_string(), ids("mtp_targets")),
        ("mtp_mask.1".to_string(), Tensor::from_f32(DType::F32, vec![2, 6], mask).unwrap()),
        (
            "positions".to_string(),
            Tensor::from_i64(DType::I32, vec![2, 6], (0..12).map(|i| i % 6).collect()).unwrap(),
        ),
    ]);
    for (name, _) in &info.biases {
        inputs.insert(name.clone(), all[name].clone());
    }
    let out = run(&d, &inputs, &params).unwrap_or_else(|e| panic!("{e}"));
    let without: Vec<&String> =
        params.keys().filter(|p| !out.contains_key(&format!("{GRAD_PREFIX}{p}"))).collect();
    assert!(without.is_empty(), "no gradient for {without:?}");
    assert!(declared.iter().any(|p| p.starts_with("model.layers.4.")), "the MTP module is trained");
    let mut params = params;
    for name in [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.kv_b_proj.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.2.mlp.experts.5.down_proj.weight",
        "model.layers.3.mlp.shared_experts.up_proj.weight",
        "model.layers.4.eh_proj.weight",
        "model.layers.4.mlp.gate.weight",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        let grad = out[&format!("{GRAD_PREFIX}{name}")].as_f32().unwrap().to_vec();
        let base = params[name].clone();
        let values = base.as_f32().unwrap().to_vec();
        // The elements with the largest gradients (a sparse one, like an embedding row, is mostly 0).
        let mut order: Vec<usize> = (0..grad.len()).collect();
        order.sort_by(|&a, &b| grad[b].abs().total_cmp(&grad[a].abs()));
        for &i in order.iter().take(3) {
            // A whole model in f32 with routers (whose choices a step may flip): a looser bound than
            // the per-rule files', still far below any wrong rule. PyTorch's gradients are the
            // exact check.
            let h = 3e-3f32;
            let at = |delta: f32| {
                let mut v = values.clone();
                v[i] += delta;
                Tensor::from_f32(base.dtype(), base.shape().to_vec(), v).unwrap()
            };
            params.insert(name.to_string(), at(h));
            let up = loss(&g, &inputs, &params);
            params.insert(name.to_string(), at(-h));
            let down = loss(&g, &inputs, &params);
            let fd = (up - down) / (2.0 * f64::from(h));
            let err = (fd - f64::from(grad[i])).abs();
            eprintln!("{name}[{i}]: autodiff {} fd {fd:.6e}", grad[i]);
            // Rounding of an f32 loss near 8 over a step of 2h gives about 1.6e-4 of noise.
            assert!(err <= 1e-2 * f64::from(grad[i].abs()) + 3e-4, "{name}[{i}]: {} vs {fd}", grad[i]);
        }
        params.insert(name.to_string(), base);
    }
}
