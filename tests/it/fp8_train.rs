//! FP8 training with DeepSeek-V3's recipe (the report's §3.3; `insert-fp8-casts` on a train step):
//! every GEMM of a linear DeepSeek stores in FP8 (forward, input gradient, weight gradient) runs on
//! block-quantised operands with promoted FP32 accumulation; the compiled step agrees with the
//! interpreter's; checkpoints are DeepSeek's FP8 release layout and resume byte for byte.
//!
//! The kernels of the three GEMM forms and of the quantisers are bit-exact against the interpreter
//! (`codegen::families`, the `promoted_gemm` and `quantize` cases). A whole step is not: the ops
//! around them (attention, norms) sum in another order, and a value that lands near an E4M3 rounding
//! boundary may then take the other code. Measured on tiny_fp8_ragged (printed with
//! `--nocapture`): losses within 2e-5 relative over two steps.

use std::collections::HashSet;

use kiln_compiler::build::TrainLosses;
use kiln_compiler::passes::cache_activations;
use kiln_compiler::passes::insert_fp8_casts::{self, train as fp8, FP8_LINEARS};
use kiln_compiler::passes::{run_until, Options};
use kiln_compiler::train::{program, Optimizer};
use kiln_ir::{GemmForm, Graph, NodeId, Op, ProgramKind, UnaryOp, ValueId};
use kiln_runtime::weights::{self, StDType};

use crate::util::{kiln, root, train_arena, Scratch};

const RAGGED: &str = "tests/specs/tiny_fp8_ragged.toml";

/// Whether `v` is a trainable weight of a linear DeepSeek stores in FP8.
fn fp8_weight(g: &Graph, v: ValueId) -> bool {
    matches!(&g.node(g.producer(v)).op, Op::Input { name }
        if name.strip_suffix(".weight").and_then(|s| s.rsplit('.').next()).is_some_and(|m| FP8_LINEARS.contains(&m)))
}

/// The operand of the transpose that makes `v`, if one does.
fn transposed(g: &Graph, v: ValueId) -> Option<ValueId> {
    let n = g.node(g.producer(v));
    matches!(n.op, Op::Transpose { .. }).then(|| n.inputs[0])
}

#[test]
fn the_train_step_runs_all_three_gemms_of_every_fp8_linear_in_fp8() {
    for path in ["models/tiny_fp8.toml", RAGGED] {
        let spec = kiln_compiler::spec::load(&root().join(path)).unwrap();
        // With MTP, so that its `eh_proj` trains too.
        let losses = TrainLosses { mtp_lambda: 0.3, ..TrainLosses::default() };
        let mut g = program(&spec, &losses, &Optimizer::default(), false, false, None).unwrap().step;
        run_until(&mut g, &spec, ProgramKind::TrainStep, "plan-moe-dispatch").unwrap();
        // The forward GEMMs of FP8 linears, counted on the step before the pass: the routed experts'
        // are computed again in the backward pass (the `moe_experts` rule recomputes them), so a
        // grouped linear may have two, one backward of inputs and one of weights.
        let (mut dense, mut grouped, mut weights) = (0, 0, HashSet::new());
        let mut linears = HashSet::new();
        for n in g.nodes() {
            let node = g.node(n);
            let ws = match node.op {
                Op::Linear => &node.inputs[1..2],
                Op::GroupedLinear { .. } => &node.inputs[2..],
                _ => continue,
            };
            if ws.iter().all(|&w| fp8_weight(&g, w)) {
                weights.extend(ws.iter().copied());
                linears.insert(ws.to_vec());
                if matches!(node.op, Op::Linear) {
                    dense += 1
                } else {
                    grouped += 1
                }
            }
        }
        assert!(dense > 0 && grouped > 0, "{path}: {dense} dense and {grouped} grouped FP8 linears");
        let trace =
            insert_fp8_casts::rewrite(&mut g, &Options::of_kind(&spec, ProgramKind::TrainStep)).unwrap();
        println!("{path}: {trace}");
        let grouped_linears = linears.iter().filter(|ws| ws.len() > 1).count();
        assert_eq!(trace.count(fp8::FPROP), dense + grouped, "{path}");
        for rule in [fp8::DGRAD, fp8::WGRAD] {
            assert_eq!(trace.count(rule), linears.len(), "{path}: {rule}, one per linear");
        }
        assert_eq!(trace.count(fp8::WEIGHT_ONLINE), weights.len(), "{path}: one FP8 copy per weight");
        // The step clips, so every update waits for every Dgrad: each Dgrad quantises its weight
        // again rather than keeping the forward's copy alive through the backward pass.
        assert_eq!(
            trace.count(fp8::WEIGHT_RECOMPUTED),
            weights.len(),
            "{path}: one backward copy per weight"
        );
        kiln_ir::verify::verify(&g).unwrap();
        let mut forms = [0; 3];
        for n in g.nodes() {
            let node = g.node(n);
            match node.op {
                Op::PromotedGemm { form, k_block } => {
                    assert_eq!(k_block, 128, "{path}: DeepSeek's promotion interval");
                    forms[match form {
                        GemmForm::Linear => 0,
                        GemmForm::Grouped { .. } => 1,
                        GemmForm::GroupedWgrad { .. } => 2,
                    }] += 1;
                    // Every operand but the offsets is a dequantised FP8 value.
                    for (i, &v) in node.inputs.iter().enumerate() {
                        let offsets = i == 1 && !matches!(form, GemmForm::Linear);
                        let mut p = g.node(g.producer(v));
                        if let Op::Transpose { .. } = p.op {
                            p = g.node(g.producer(p.inputs[0]));
                        }
                        assert!(offsets || matches!(p.op, Op::Dequantize { .. }), "{path}: {:?}", p.op);
                    }
                }
                // No GEMM reads an FP8 linear's weight (or its transpose) in high precision.
                Op::Linear | Op::GroupedLinear { .. } => {
                    let ws =
                        if matches!(node.op, Op::Linear) { &node.inputs[1..2] } else { &node.inputs[2..] };
                    for &w in ws {
                        let w = transposed(&g, w).unwrap_or(w);
                        assert!(
                            !fp8_weight(&g, w),
                            "{path}: a plain GEMM still reads an FP8 linear's weight"
                        );
                    }
                }
                _ => {}
            }
        }
        assert_eq!(
            forms,
            [3 * dense, grouped + grouped_linears, grouped_linears],
            "{path}: Fprop, Dgrad, Wgrad by form"
        );
        // The high-precision parts stay (§3.3.1): the output head is a plain linear.
        let head = g.nodes().into_iter().any(|n| {
            let node = g.node(n);
            matches!(node.op, Op::Linear)
                && matches!(&g.node(g.producer(node.inputs[1])).op, Op::Input { name } if name == "lm_head.weight")
        });
        assert!(head, "{path}: lm_head runs in high precision");
    }
}

/// A train step's forward pass: what its `loss` output depends on.
fn forward_pass(g: &Graph) -> HashSet<NodeId> {
    let loss = g.outputs().iter().find(|(n, _)| n == "loss").expect("a loss output").1;
    let mut seen = HashSet::new();
    let mut stack = vec![g.producer(loss)];
    while let Some(n) = stack.pop() {
        if seen.insert(n) {
            stack.extend(g.node(n).inputs.iter().map(|&v| g.producer(v)));
        }
    }
    seen
}

#[test]
fn the_backward_pass_reads_attention_outputs_and_swiglu_inputs_from_fp8_copies() {
    let spec = kiln_compiler::spec::load(&root().join("models/tiny_fp8.toml")).unwrap();
    let losses = TrainLosses { mtp_lambda: 0.3, ..TrainLosses::default() };
    let step = program(&spec, &losses, &Optimizer::default(), false, false, None).unwrap().step;
    let mut g = step.clone();
    run_until(&mut g, &spec, ProgramKind::TrainStep, "insert-fp8-casts").unwrap();
    // One cache per attention layer (MTP's too), one per SwiGLU of a dense MLP or shared expert.
    let inputs: Vec<String> = (g.nodes().into_iter())
        .filter_map(|n| match &g.node(n).op {
            // The trained weights (not their master copies or moments).
            Op::Input { name } if name.starts_with("model.") => Some(name.clone()),
            _ => None,
        })
        .collect();
    let count = |f: &dyn Fn(&str) -> bool| inputs.iter().filter(|n| f(n)).count();
    let o_projs = count(&|n| n.ends_with("self_attn.o_proj.weight"));
    let swiglus =
        count(&|n| n.ends_with(".mlp.down_proj.weight") || n.ends_with(".shared_experts.down_proj.weight"));
    assert!(o_projs == 5 && swiglus == 5, "{o_projs} o_proj and {swiglus} SwiGLUs");
    let opts = Options::of_kind(&spec, ProgramKind::TrainStep);
    let trace = cache_activations::rewrite(&mut g, &opts).unwrap();
    println!("{trace}");
    assert_eq!(trace.count(cache_activations::ATTN_OUT), o_projs, "{trace}");
    assert_eq!(trace.count(cache_activations::SWIGLU), swiglus, "{trace}");
    kiln_ir::verify::verify(&g).unwrap();

    let forward = forward_pass(&g);
    // Read outside the forward pass by anything but a quantisation (the FP8 caches are made
    // beside their values, but only the backward pass reads them, so they are not the loss's
    // ancestry).
    let backward_reads = |v: ValueId| {
        g.users(v).into_iter().any(|u| !forward.contains(&u) && !matches!(g.node(u).op, Op::Quantize { .. }))
    };
    let (mut attn, mut silus) = (0, 0);
    for n in g.nodes().into_iter().filter(|n| forward.contains(n)) {
        let node = g.node(n);
        match node.op {
            // o_proj's input dies in the forward pass: the backward pass dequantises its Fprop
            // operand, whose 1x128 tiles have power-of-two scales.
            Op::PromotedGemm { .. } => {
                let w = g.node(g.producer(node.inputs[1])).inputs[0];
                let w = g.node(g.producer(w)).inputs[0];
                let o_proj = matches!(&g.node(g.producer(w)).op, Op::Input { name } if name.ends_with("o_proj.weight"));
                if !o_proj {
                    continue;
                }
                let q = g.producer(g.node(g.producer(node.inputs[0])).inputs[0]);
                let Op::Quantize { spec: qs, .. } = &g.node(q).op else {
                    panic!("o_proj reads {:?}", g.node(q).op)
                };
                assert!(qs.pow2_scale, "o_proj's input tiles: power-of-two scales");
                let x = g.node(q).inputs[0];
                assert!(!backward_reads(x), "the backward pass reads o_proj's input in high precision");
                let codes = g.node(q).results[0];
                let dequantised = g
                    .users(codes)
                    .into_iter()
                    .any(|u| !forward.contains(&u) && matches!(g.node(u).op, Op::Dequantize { .. }));
                assert!(dequantised, "the backward pass reads o_proj's FP8 input");
                attn += 1;
            }
            // No SwiGLU value (gate, silu, up, product) of the forward pass reaches the backward
            // pass: the routed experts' never did (the backward recomputes their FFN), the others'
            // are recomputed from FP8 copies of gate and up.
            Op::Unary(UnaryOp::Silu) => {
                let (gate, s) = (node.inputs[0], node.results[0]);
                let mut values = vec![gate, s];
                for m in g.users(s) {
                    values.extend(g.node(m).inputs.iter().copied());
                    values.extend(g.node(m).results.iter().copied());
                }
                let kept: Vec<ValueId> = values.into_iter().filter(|&v| backward_reads(v)).collect();
                assert!(
                    kept.is_empty(),
                    "{kept:?} of the SwiGLU in {:?} kept for the backward pass",
                    node.scope
                );
                silus += 1;
            }
            _ => {}
        }
    }
    assert_eq!((attn, silus), (o_projs, swiglus + 4), "o_projs; SwiGLUs (4 routed)");

    // Nothing on a step without [quantization], or on a forward program.
    let plain = kiln_compiler::spec::load(&root().join("models/tiny.toml")).unwrap();
    let mut p = program(&plain, &losses, &Optimizer::default(), false, false, None).unwrap().step;
    run_until(&mut p, &plain, ProgramKind::TrainStep, "insert-fp8-casts").unwrap();
    let none = cache_activations::rewrite(&mut p, &Options::of_kind(&plain, ProgramKind::TrainStep)).unwrap();
    assert_eq!(none.count(cache_activations::ATTN_OUT) + none.count(cache_activations::SWIGLU), 0);
    let mut f = kiln_compiler::build::build_graph(&spec).unwrap();
    run_until(&mut f, &spec, ProgramKind::Forward, "insert-fp8-casts").unwrap();
    let none = cache_activations::rewrite(&mut f, &Options::of_kind(&spec, ProgramKind::Forward)).unwrap();
    assert_eq!(none.count(cache_activations::ATTN_OUT) + none.count(cache_activations::SWIGLU), 0);

    // The compiled step's arena, with and without.
    let s = Scratch::new();
    let (with, without) = (
        train_arena(&s, "models/tiny_fp8.toml", "on", &[]),
        train_arena(&s, "models/tiny_fp8.toml", "off", &["--disable-pass", "cache-activations"]),
    );
    println!("FP8 train step arena at 8 x 256 tokens: {with} B with the FP8 caches, {without} B without");
    assert!(with < without, "the FP8 caches save memory: {with} vs {without}");
}

/// The losses a run logged.
fn losses(dir: &std::path::Path) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l.get("event").is_none())
        .map(|l| l["loss"].as_f64().unwrap())
        .collect()
}

/// `modules_to_not_convert = []` puts the output head in FP8 in the train step too: its three GEMMs
/// in FP8, the compiled step as the interpreter's, and the checkpoint with `lm_head.weight` as E4M3
/// codes and block scales, which a run binds.
#[test]
fn an_fp8_head_trains_and_checkpoints_in_fp8() {
    let s = Scratch::new();
    let text = std::fs::read_to_string(root().join(RAGGED)).unwrap();
    assert!(text.trim_end().ends_with("activation_scheme = \"dynamic\""), "[quantization] comes last");
    let spec = s.path("head.toml");
    std::fs::write(&spec, format!("{text}modules_to_not_convert = []\n")).unwrap();
    let data = root().join("tests/goldens/perplexity/tokens.safetensors").to_string_lossy().into_owned();
    let spec = spec.to_string_lossy().into_owned();
    let base = ["train", spec.as_str(), "--data", data.as_str(), "--batch", "2", "--random-weights", "3"];
    let run = |extra: &[&str]| {
        let r = kiln(&[&base[..], &["--steps", "2"], extra].concat());
        assert!(r.ok, "{}", r.stderr);
    };
    let (c, i) = (s.str("c"), s.str("i"));
    run(&["--out", &c]);
    run(&["--out", &i, "--interp"]);
    for (c, i) in losses(&s.path("c")).iter().zip(losses(&s.path("i"))) {
        assert!((c - i).abs() <= 1e-4 * i.abs(), "compiled {c} vs interpreter {i}");
    }
    let ck = weights::open_checkpoint(&s.path("c/step-2")).unwrap();
    let head = ck.get("lm_head.weight").expect("the head");
    assert_eq!(head.dtype, StDType::F8E4M3);
    let scale = ck.get("lm_head.weight_scale_inv").expect("the head's scale");
    let want: Vec<u64> = head.shape.iter().map(|d| d.div_ceil(128)).collect();
    assert_eq!((scale.dtype, &scale.shape), (StDType::F32, &want));
    let gen = kiln(&["run", &s.str("c/step-2"), "--prompt-ids", "1,2,3", "--max-new-tokens", "3"]);
    assert!(gen.ok && gen.stdout.trim().split(',').count() == 3, "{}{}", gen.stdout, gen.stderr);
}

#[test]
fn kiln_train_fp8_agrees_with_the_interpreter_and_checkpoints_in_deepseeks_layout() {
    let s = Scratch::new();
    let data = root().join("tests/goldens/perplexity/tokens.safetensors").to_string_lossy().into_owned();
    let base = ["train", RAGGED, "--data", data.as_str(), "--batch", "2", "--random-weights", "3"];
    let run = |extra: &[&str]| {
        let r = kiln(&[&base[..], extra].concat());
        assert!(r.ok, "{}", r.stderr);
        r.stdout
    };
    let (c, i, b, r) = (s.str("c"), s.str("i"), s.str("b"), s.str("r"));
    run(&["--steps", "2", "--out", &c]);
    run(&["--steps", "2", "--out", &i, "--interp"]);
    run(&["--steps", "2", "--out", &b, "--no-fp8"]);
    run(&["--steps", "2", "--out", &s.str("n"), "--no-fp8-cache"]);
    let (lc, li, lb) = (losses(&s.path("c")), losses(&s.path("i")), losses(&s.path("b")));
    // Without the FP8 activation caches (`cache-activations`): the same recipe but for o_proj's
    // power-of-two tiles and the backward pass's unrounded activations, so close but not equal.
    for (c, n) in lc.iter().zip(losses(&s.path("n"))) {
        assert!(*c != n && (c - n).abs() < 1e-3 * n.abs(), "with caches {c}, without {n}");
    }
    assert_eq!(lc.len(), 2);
    for ((c, i), b) in lc.iter().zip(&li).zip(&lb) {
        println!("loss: FP8 compiled {c}, FP8 interpreter {i}, without FP8 {b}");
        assert!((c - i).abs() <= 1e-4 * i.abs(), "compiled {c} vs interpreter {i}");
        // FP8 is on: not the high-precision loss, but close to it.
        assert!((c - b).abs() > 1e-6 * b.abs() && (c - b).abs() < 1e-2 * b.abs(), "FP8 {c} vs {b}");
    }

    // The checkpoint: DeepSeek's release layout for the FP8 linears, nothing else in FP8.
    let ck = weights::open_checkpoint(&s.path("c/step-2")).unwrap();
    let mut fp8 = 0;
    for t in ck.tensors() {
        let module = t.name.strip_suffix(".weight").and_then(|m| m.rsplit('.').next()).unwrap_or("");
        if t.dtype == StDType::F8E4M3 {
            assert!(FP8_LINEARS.contains(&module), "{} in FP8", t.name);
            let scale =
                ck.get(&weights::scale_name(&t.name)).unwrap_or_else(|| panic!("{}: no scale", t.name));
            let want: Vec<u64> = t.shape.iter().map(|d| d.div_ceil(128)).collect();
            assert_eq!((scale.dtype, &scale.shape), (StDType::F32, &want), "{}", t.name);
            fp8 += 1;
        } else if t.name.ends_with(".weight") && t.shape.len() == 2 {
            assert!(!FP8_LINEARS.contains(&module), "{} is not in FP8", t.name);
        }
    }
    assert!(fp8 > 20, "{fp8} FP8 weights");
    let opt = weights::open_checkpoint(&s.path("c/step-2/optimizer.safetensors")).unwrap();
    assert_eq!(opt.tensors().filter(|t| t.name.starts_with("weight.")).count(), fp8, "exact copies");
    // A run of the checkpoint binds the FP8 weights as they are stored.
    let gen = kiln(&["run", &s.str("c/step-2"), "--prompt-ids", "1,2,3", "--max-new-tokens", "3"]);
    assert!(gen.ok && gen.stdout.trim().split(',').count() == 3, "{}{}", gen.stdout, gen.stderr);

    // One step, then the second from its checkpoint: byte for byte the two-step run.
    run(&["--steps", "1", "--out", &r]);
    let resumed = kiln(&[
        "train",
        RAGGED,
        "--data",
        &data,
        "--batch",
        "2",
        "--resume",
        &s.str("r/step-1"),
        "--steps",
        "2",
        "--out",
        &r,
    ]);
    assert!(resumed.ok, "{}", resumed.stderr);
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let (a, b) = (s.path("c/step-2").join(f), s.path("r/step-2").join(f));
        assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap(), "{f} differs after a resume");
    }

    // --fp8 / --no-fp8 choose the recipe of a spec; an artifact has it compiled in.
    let art = s.str("art");
    let compiled = kiln(&["compile", RAGGED, "--train", "--target", "cpu", "-o", &art]);
    assert!(compiled.ok, "{}", compiled.stderr);
    let bad = kiln(&[
        "train",
        &art,
        "--data",
        &data,
        "--random-weights",
        "3",
        "--steps",
        "1",
        "--no-fp8",
        "--out",
        &s.str("x"),
    ]);
    assert!(!bad.ok && bad.stderr.contains("compiled with the FP8 recipe"), "{}", bad.stderr);
}

/// The FP8 copies of a SwiGLU's inputs are made right after each input, wherever the order puts
/// the backward pass's first read of it. DeepSeek-V3's layout at 6 layers under expert
/// parallelism runs the last shared expert's forward late, beside its backward (the all-to-all
/// leaves it out), and the backward read `gate` before the SwiGLU after which the copies were
/// made: `--train --ep 2` (and `--pp 16 --ep 64`) failed to compile.
#[test]
fn swiglu_caches_are_made_beside_their_values_under_expert_parallelism() {
    let s = Scratch::new();
    let text = std::fs::read_to_string(root().join("models/deepseek_v3.toml")).unwrap();
    let six = text.replace("num_hidden_layers = 61", "num_hidden_layers = 6");
    assert_ne!(six, text);
    std::fs::write(s.path("v3_6.toml"), six).unwrap();
    let spec = s.str("v3_6.toml");
    let args = ["compile", &spec, "--train", "--pp", "1", "--ep", "2", "--target", "cpu", "--emit", "kir"];
    let tiles = |extra: &[&str]| {
        let out = kiln(&[&args[..], extra].concat());
        assert!(out.ok, "{}", out.stderr);
        out.stdout.lines().filter(|l| l.contains("= quantize") && l.contains("block = [1, 1, 128]")).count()
    };
    // The copies are there: more activations quantised in 1 x 128 tiles than the GEMMs' own.
    let (with, without) = (tiles(&[]), tiles(&["--disable-pass", "cache-activations"]));
    assert!(with > without, "{with} activation quantisations with the caches, {without} without");
}
