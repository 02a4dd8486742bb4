//! `kiln inspect --train`: the memory of a training run, counted from the compiled train step's
//! buffers (`kiln_compiler::train_memory`). The counts are pinned against what the runtime
//! allocates for the same artifact, and the one-layer-of-each-kind compile against the full one.

use kiln_compiler::pack::{self, Planned};
use kiln_compiler::schedule::cost::Piece;
use kiln_compiler::train_memory;
use kiln_ir::module::StateRole;
use kiln_ir::{DType, ProgramKind};
use kiln_runtime::cpu::{CpuModel, CpuOptions};
use kiln_runtime::weights;

use crate::util::{kiln, root, Scratch};

/// tiny_fp8 (bf16 weights, FP8 GEMMs) compiled as `kiln compile --train --moments bf16` does, at
/// 2 x 128 tokens, through the memory plan.
fn planned(recompute: bool) -> (Planned, usize) {
    struct Skip(bool);
    impl pack::Observer for Skip {
        fn runs_pass(&mut self, pass: &str) -> bool {
            !(self.0 && pass == "rematerialize")
        }
    }
    let spec = kiln_compiler::spec::load(&root().join("models/tiny_fp8.toml")).unwrap();
    let options = pack::Options {
        train: Some(pack::TrainOptions {
            optimizer: kiln_compiler::train::Optimizer { moments: DType::BF16, ..Default::default() },
            ..Default::default()
        }),
        kv_cache: false,
        score: false,
        ..pack::Options::new(pack::Targets::Cpu, 2, 128)
    };
    let p = pack::plan(pack::Source::Spec(spec), &options, &mut Skip(!recompute)).unwrap();
    let i = p.module.programs.iter().position(|p| p.kind == ProgramKind::TrainStep).unwrap();
    (p, i)
}

#[test]
fn the_memory_table_counts_what_the_runtime_allocates() {
    let (p, i) = planned(true);
    let m = train_memory::measure(&p.module, i, &p.programs[i].plan, &p.programs[i].memory, 4);
    let total = m.total();
    println!("{total:?}\npeak {:?}, arena {}", m.peak, m.arena);

    // The same step compiled to an artifact and loaded by the runtime.
    let s = Scratch::new();
    let out = s.str("step");
    let r = kiln(&[
        "compile",
        "models/tiny_fp8.toml",
        "--train",
        "--moments",
        "bf16",
        "--target",
        "cpu",
        "--max-batch",
        "2",
        "--max-context",
        "128",
        "-o",
        &out,
    ]);
    assert!(r.ok, "{}", r.stderr);
    let art = kiln_runtime::artifact::load(&s.path("step")).unwrap();
    let decls = weights::manifest_params(art.manifest()).unwrap();
    let given = weights::random_tensors(decls, 1, 0.02).map(Ok);
    let exec = CpuModel::load(&art, given, &CpuOptions { threads: 1, ..CpuOptions::default() }).unwrap();

    // The parameters are the trained weights (and frozen ones, none here).
    let max = exec.max_sizes();
    let bytes = |dtype, shape: &[kiln_ir::Dim]| kiln_ir::artifact::bytes_of(dtype, shape, &max).unwrap();
    let frozen: u64 = art.manifest().params.iter().map(|p| bytes(p.dtype, &p.shape)).sum();
    assert_eq!(total.params.total(), exec.state_bytes(StateRole::Trainable) + frozen);
    assert_eq!(total.master.total(), exec.state_bytes(StateRole::MasterWeight));
    assert_eq!(total.moments.total(), exec.state_bytes(StateRole::OptimizerMoment));
    let others =
        [StateRole::Counter, StateRole::RoutingBias, StateRole::GradientAccumulator, StateRole::KvCache];
    assert_eq!(total.other, others.iter().map(|&r| exec.state_bytes(r)).sum::<u64>());
    assert_eq!(m.arena, exec.arena_bytes() as u64, "the arena as planned is the arena allocated");
    // bf16 weights: an f32 master copy, bf16 moments (two of them), and one f32 gradient per
    // weight element, found in the arena.
    assert_eq!(total.master.total(), 2 * total.params.total());
    assert_eq!(total.moments.total(), 2 * total.params.total());
    assert_eq!(total.gradients.total(), total.master.total(), "every weight's f32 gradient");
    // The routed experts' parts are apart (expert parallelism divides them), in proportion.
    let routed: u64 = (art.manifest().states.iter())
        .filter(|s| s.role == StateRole::Trainable && s.name.contains(".mlp.experts."))
        .map(|s| bytes(s.dtype, &s.shape))
        .sum();
    assert!(routed > 0);
    assert_eq!(total.params.experts, routed);
    assert_eq!(total.gradients.experts, 2 * routed, "f32 gradients of bf16 weights");
    // Each piece holds its own layer's states: layer 1 (MoE) more than layer 0 (dense).
    assert!(m.piece(Piece::Layer(1)).params.total() > m.piece(Piece::Layer(0)).params.total());
    assert_eq!(m.piece(Piece::Layer(0)).params.experts, 0);
    // The peak fits in the arena; saved activations and gradients are part of it.
    assert!(m.peak.live <= m.arena);
    assert!(m.peak.activations + m.peak.gradients <= m.peak.live);

    // Recomputation shrinks what is saved for the backward pass and changes no state.
    let (q, j) = planned(false);
    let kept = train_memory::measure(&q.module, j, &q.programs[j].plan, &q.programs[j].memory, 4).total();
    println!(
        "saved activations: {} B recomputing, {} B keeping",
        total.activations.total(),
        kept.activations.total()
    );
    assert!(total.activations.total() * 10 < kept.activations.total() * 8, "at least 20% less");
    assert_eq!(
        (kept.params, kept.master, kept.moments, kept.gradients),
        (total.params, total.master, total.moments, total.gradients)
    );
}

/// The CLI's table: a model compiled one layer of each kind has every count of the model compiled
/// whole (each other layer is a copy); parallelism divides them.
#[test]
fn kiln_inspect_train_counts_each_kind_of_layer_once() {
    let json = |extra: &[&str]| -> serde_json::Value {
        let base = [
            "inspect",
            "--train",
            "models/tiny_fp8.toml",
            "--micro-batch",
            "2",
            "--seq-len",
            "128",
            "--json",
        ];
        let r = kiln(&[&base[..], extra].concat());
        assert!(r.ok, "{}", r.stderr);
        serde_json::from_str(&r.stdout).unwrap()
    };
    let (reduced, full) = (json(&[]), json(&["--full"]));
    assert_eq!(reduced["compiled_layers"], 3, "tiny_fp8's 4 layers: dense, MoE then MoE, last");
    for c in 0..2 {
        let (a, b) = (&reduced["columns"][c]["per_rank"][0], &full["columns"][c]["per_rank"][0]);
        for k in [
            "params",
            "master",
            "moments",
            "gradients",
            "activations",
            "activations_no_recompute",
            "other_states",
        ] {
            assert_eq!(a[k], b[k], "column {c}: {k}");
        }
    }
    assert!(full["columns"][0]["arena_planned"].as_u64().unwrap() > 0);
    // BF16 baseline against the FP8 recipe: half the moments, less saved, the same weights.
    let (base, recipe) = (&full["columns"][0]["per_rank"][0], &full["columns"][1]["per_rank"][0]);
    assert_eq!(base["moments"].as_u64().unwrap(), 2 * recipe["moments"].as_u64().unwrap());
    assert!(recipe["activations"].as_u64() < recipe["activations_no_recompute"].as_u64());
    assert_eq!(base["params"], recipe["params"]);

    // Expert parallelism divides the routed experts' states; a pipeline each rank's share.
    let ep = json(&["--ep", "4"]);
    let one = |d: &serde_json::Value, k: &str| d["columns"][1]["per_rank"][0][k].as_u64().unwrap();
    assert!(one(&ep, "params") < one(&reduced, "params"));
    assert_eq!(ep["devices"], 4);
    // ZeRO-1 under expert parallelism, as `kiln train --ep --zero1` splits the states: the
    // experts' over the --dp replicas holding them, the other weights' over all ep x dp processes,
    // so a device keeps less than half of what it keeps unsplit (half: the experts alone split).
    let moments = |d: &serde_json::Value| d["columns"][0]["per_rank"][0]["moments"].as_u64().unwrap();
    let (unsplit, split) = (json(&["--ep", "2", "--dp", "2"]), json(&["--ep", "2", "--dp", "2", "--zero1"]));
    assert!(
        (moments(&split) as f64) < 0.95 * moments(&unsplit) as f64 / 2.0,
        "{} against {}",
        moments(&split),
        moments(&unsplit)
    );
    // A data-parallel replica holds its gradients once: summed over the replicas in place of
    // the backward pass's, the norm and AdamW each reading the sum times 1 / M for themselves.
    let dp = json(&["--dp", "2"]);
    for c in 0..2 {
        let (a, b) = (&dp["columns"][c]["per_rank"][0], &reduced["columns"][c]["per_rank"][0]);
        assert_eq!(a["gradient_copies"], 0, "column {c}");
        assert_eq!(a["gradients"], b["gradients"], "column {c}");
    }
    let pp = json(&["--pp", "2", "--schedule", "1f1b"]);
    let ranks = pp["columns"][1]["per_rank"].as_array().unwrap();
    assert_eq!(ranks.len(), 2);
    let params: u64 = ranks.iter().map(|r| r["params"].as_u64().unwrap()).sum();
    assert_eq!(params, one(&reduced, "params"), "1F1B: each weight on one rank");
    // With the MTP module's loss on, the first stage sends the module's looked-up rows to the last
    // and gets their gradient back: one buffer of each in BF16, on both ends (2 x 128 tokens of
    // 256), and no copy of the table.
    let mtp = json(&["--pp", "2", "--schedule", "1f1b", "--mtp-lambda", "0.3"]);
    for r in 0..2 {
        let comm = |d: &serde_json::Value| d["columns"][1]["per_rank"][r]["communication"].as_u64().unwrap();
        assert_eq!(comm(&mtp) - comm(&pp), 2 * (2 * 128) * 256 * 2, "rank {r}");
    }

    // Bad input: a clear error before anything compiles.
    let r = kiln(&["inspect", "--train", "models/tiny_fp8.toml", "--ep", "3"]);
    assert!(!r.ok && r.stderr.contains("divisor"), "{}", r.stderr);
    let r = kiln(&["inspect", "--train", "models/tiny_fp8.toml", "--zero1"]);
    assert!(!r.ok && r.stderr.contains("--dp 2"), "{}", r.stderr);
    let r = kiln(&["inspect", "--train", "models/tiny_fp8.toml", "--schedule", "1f1b"]);
    assert!(!r.ok && r.stderr.contains("--pp 2"), "{}", r.stderr);
}
