//! `rematerialize` (DeepSeek-V3 §3.2): RMS norms and MLA up-projections (with the shape ops and
//! rotary embedding between them and attention) computed again in the backward pass. The step's
//! results do not change, byte for byte, and the activation arena shrinks.

use kiln_compiler::build::TrainLosses;
use kiln_compiler::passes::rematerialize::{self, MLA_UP_PROJ, RMS_NORM};
use kiln_compiler::passes::{run_until, Options};
use kiln_compiler::train::{program, Optimizer};
use kiln_ir::{Op, ProgramKind};

use crate::util::{kiln, root, train_arena, Scratch};

#[test]
fn recomputed_norms_and_up_projections_change_no_result_and_shrink_the_arena() {
    // The rules: every norm and both up-projections of every layer the step trains (MTP's too).
    let spec = kiln_compiler::spec::load(&root().join("models/tiny.toml")).unwrap();
    let losses = TrainLosses { mtp_lambda: 0.3, ..TrainLosses::default() };
    let mut g = program(&spec, &losses, &Optimizer::default(), false, false, None).unwrap().step;
    run_until(&mut g, &spec, ProgramKind::TrainStep, "plan-moe-dispatch").unwrap();
    let norms = g.nodes().into_iter().filter(|&n| matches!(g.node(n).op, Op::RmsNorm { .. })).count();
    let trace = rematerialize::rewrite(&mut g, &Options::of_kind(&spec, ProgramKind::TrainStep)).unwrap();
    println!("{trace}");
    let layers = (spec.model.num_hidden_layers + 1) as usize;
    assert_eq!(trace.count(MLA_UP_PROJ), 2 * layers, "q_b_proj and kv_b_proj per layer");
    // Every norm whose output the backward pass reads (a weight gradient, or a recomputed
    // up-projection's input).
    assert!(trace.count(RMS_NORM) >= norms - 2 && trace.count(RMS_NORM) <= norms, "{norms} norms");
    kiln_ir::verify::verify(&g).unwrap();
    // Not when the optimizer may update a weight before a copy reads it (no clipping: each update
    // waits for its own gradient only).
    let unclipped = Optimizer { clip: None, ..Optimizer::default() };
    let mut u = program(&spec, &losses, &unclipped, false, false, None).unwrap().step;
    run_until(&mut u, &spec, ProgramKind::TrainStep, "plan-moe-dispatch").unwrap();
    let kept = rematerialize::rewrite(&mut u, &Options::of_kind(&spec, ProgramKind::TrainStep)).unwrap();
    assert_eq!(kept.count(RMS_NORM) + kept.count(MLA_UP_PROJ), 0, "{kept}");
    // Not on a forward program.
    let mut f = kiln_compiler::build::build_graph(&spec).unwrap();
    let none = rematerialize::rewrite(&mut f, &Options::of_kind(&spec, ProgramKind::Forward)).unwrap();
    assert_eq!(none.count(RMS_NORM) + none.count(MLA_UP_PROJ), 0);

    // The arena of the compiled step, with and without.
    let s = Scratch::new();
    let (with, without) = (
        train_arena(&s, "models/tiny.toml", "on", &[]),
        train_arena(&s, "models/tiny.toml", "off", &["--disable-pass", "rematerialize"]),
    );
    println!("train step arena at 8 x 256 tokens: {with} B recomputing, {without} B keeping");
    assert!(with * 10 < without * 9, "recomputation saves at least 10%: {with} vs {without}");

    // Trained both ways: the same losses and checkpoints, byte for byte.
    let data = root().join("tests/goldens/perplexity/tokens.safetensors").to_string_lossy().into_owned();
    let train = |out: &str, extra: &[&str]| {
        let base = ["train", "models/tiny.toml", "--data", data.as_str(), "--batch", "2", "--steps", "2"];
        let r = kiln(
            &[&base[..], &["--random-weights", "3", "--mtp-lambda", "0.3", "--out", out], extra].concat(),
        );
        assert!(r.ok, "{}", r.stderr);
    };
    // In FP8 too: a recomputed norm is the same computation as its forward value, so the weight
    // gradient that reads it is still found and quantised.
    for extra in [&[][..], &["--fp8"][..]] {
        let (a, b) = (s.str("a"), s.str("b"));
        let _ = (std::fs::remove_dir_all(&a), std::fs::remove_dir_all(&b));
        train(&a, extra);
        train(&b, &[extra, &["--no-recompute"]].concat());
        for f in ["model.safetensors", "optimizer.safetensors"] {
            let (x, y) = (s.path("a/step-2").join(f), s.path("b/step-2").join(f));
            let same = std::fs::read(x).unwrap() == std::fs::read(y).unwrap();
            assert!(same, "{f} differs with recomputation ({extra:?})");
        }
    }
}
