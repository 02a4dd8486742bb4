//! The parallel plan of `kiln compile --pp`: DeepSeek-V3's, checked against what the reference and
//! the schedules' own rules say; the plan in a compiled artifact, checked against the artifact's
//! parameters and graph; the manifest's validation of a tampered plan; the CLI's errors.

use std::collections::BTreeMap;
use std::path::Path;

use kiln_compiler::passes::moe_plan;
use kiln_compiler::schedule::cost::{self, Piece};
use kiln_compiler::schedule::{self, Kind, Request};
use kiln_ir::artifact::{Manifest, ManifestError, ParallelPlan};
use kiln_ir::schedule::{Chunk, Rank, Slot};
use kiln_ir::ModelSpec;

use crate::util::{kiln, root, Scratch};

fn spec(name: &str) -> ModelSpec {
    kiln_compiler::spec::load(&root().join("models").join(name)).unwrap()
}

/// The plan `kiln compile SPEC ARGS --emit plan` prints.
fn plan_of(model: &str, args: &[&str]) -> ParallelPlan {
    let mut all = vec!["compile", model, "--emit", "plan"];
    all.extend_from_slice(args);
    let out = kiln(&all);
    assert!(out.ok, "{}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}\n{}", out.stdout))
}

/// The smallest largest sum of `costs` cut into `parts` ranges, by the textbook dynamic program over
/// every last cut (quadratic, independent of the pass's binary search).
fn textbook_min_max(costs: &[u64], parts: usize) -> u64 {
    let n = costs.len();
    let sum = |a: usize, b: usize| costs[a..b].iter().sum::<u64>();
    let mut best = vec![vec![u64::MAX; n + 1]; parts + 1];
    best[0][0] = 0;
    for j in 1..=parts {
        for i in j..=n {
            for s in j - 1..i {
                if best[j - 1][s] != u64::MAX {
                    best[j][i] = best[j][i].min(best[j - 1][s].max(sum(s, i)));
                }
            }
        }
    }
    best[parts][n]
}

/// Which stage holds each decoder layer, checking that each is held once, in order.
fn layer_stages(plan: &ParallelPlan, layers: u64) -> Vec<u32> {
    let mut of = vec![None; layers as usize];
    for s in &plan.stages {
        for l in s.layers.clone() {
            assert!(of[l as usize].replace(s.stage).is_none(), "layer {l} is on two stages");
        }
    }
    let of: Vec<u32> = of.into_iter().map(|s| s.expect("a layer on no stage")).collect();
    assert!(of.windows(2).all(|w| w[0] <= w[1]), "{of:?}");
    of
}

#[test]
fn deepseek_v3_on_16_pipeline_and_64_expert_ranks() {
    let plan = plan_of("models/deepseek_v3.toml", &["--pp", "16", "--ep", "64"]);
    // DualPipe by default, on 2·pp micro-batches: 16 stages, rank i holding stages i and 15-i.
    assert_eq!((plan.schedule.as_str(), plan.pp, plan.ep, plan.micro_batches), ("dualpipe", 16, 64, 32));
    assert_eq!(plan.stages.len(), 16);
    for (r, rank) in plan.ranks.iter().enumerate() {
        assert_eq!(rank.stages, [r as u32, 15 - r as u32]);
        let params = plan.stages[r].params + plan.stages[15 - r].params;
        assert_eq!(rank.params, params);
    }
    // Every one of the 61 layers on one stage, the embedding first and the head (with MTP) last.
    layer_stages(&plan, 61);
    assert!(plan.stages[0].embedding && plan.stages[15].head);
    // Every list passes the verifier, and has the DualPipe lanes: stage i at r_i.c0 going down and
    // at r_(15-i).c1 coming back.
    kiln_ir::schedule::verify(&plan.lists).unwrap();
    assert_eq!(plan.lists.ranks.len(), 16);
    for i in 0..16u32 {
        assert_eq!(plan.lists.lanes[0][i as usize], Slot { rank: Rank(i), chunk: Chunk(0) });
        assert_eq!(plan.lists.lanes[1][i as usize], Slot { rank: Rank(15 - i), chunk: Chunk(1) });
    }
    // Weights: twice the model's 682.64B over the ranks (reference §6.1, "2×" parameters; D10,
    // 671.03B + 11.61B of MTP).
    let total: u64 = plan.stages.iter().map(|s| s.params).sum();
    assert_eq!((total + 5_000_000) / 10_000_000, 68_264);
    assert_eq!(plan.ranks.iter().map(|r| r.params).sum::<u64>(), 2 * total);
    // DualPipe holds PP+1 micro-batches of activations (reference §6.1).
    assert!(plan.ranks.iter().all(|r| r.peak_activations == 17), "{:?}", plan.ranks);

    // Experts: 256 over 64 ranks, 4 each, rank r holding 4r..4r+4; 8 groups of 8 ranks (nodes),
    // a token reaching at most 4 (reference §3.2).
    let x = plan.experts.as_ref().unwrap();
    assert_eq!((x.experts, x.experts_per_rank, x.ranks.len()), (256, 4, 64));
    assert!(x.ranks.iter().enumerate().all(|(r, e)| *e == (4 * r as u64..4 * r as u64 + 4)));
    assert_eq!((x.groups, x.topk_groups, x.ranks_per_group), (8, 4, Some(8)));
    // The MoE layers: 3..=60 of the main model (first_k_dense_replace = 3) and the MTP module's,
    // 61, on the last stage.
    let moe: Vec<u64> = x.layers.iter().map(|l| l.layer).collect();
    assert_eq!(moe, (3..=61).collect::<Vec<_>>());
    let stage_of = layer_stages(&plan, 61);
    for l in &x.layers {
        assert_eq!(l.module, format!("model.layers.{}.mlp", l.layer));
        assert_eq!(l.stage, if l.layer == 61 { 15 } else { stage_of[l.layer as usize] });
        // 4096 tokens (one sequence of --max-context), top-8: a rank receives at most 4 of a
        // token's 8 rows (it holds 4 experts), 16384 rows of 7168 bf16 (14336 bytes): 224 MiB;
        // 512 expected; and the 64 tokens it owns come back, 512 rows.
        let d = &l.dispatch;
        assert_eq!((d.tokens, d.rows, d.hidden), (4096, 4096 * 8, 7168));
        let sizes: Vec<_> =
            d.all_to_all.iter().map(|a| (a.name.as_str(), a.worst_rows, a.expected_rows)).collect();
        assert_eq!(sizes, [("dispatch", 4 * 4096, 512), ("combine", 512, 512)]);
        assert_eq!(d.all_to_all[0].worst_bytes, 224 << 20);
        assert_eq!(d.all_to_all[1].expected_bytes, 7 << 20);
    }
}

#[test]
fn the_cut_minimises_the_largest_stage_for_every_schedule() {
    for (model, sizes) in [("deepseek_v3.toml", &[2u32, 4, 8, 16, 30][..]), ("tiny.toml", &[1, 2, 3][..])] {
        let spec = spec(model);
        let pieces = cost::pieces(&spec, 4096).unwrap();
        let forward: Vec<u64> = pieces.iter().map(|(_, c)| c.forward).collect();
        for kind in Kind::ALL {
            for &pp in sizes {
                let req = Request { kind, pp, ep: None, micro_batches: None, seq_len: 4096, tokens: 4096 };
                let plan = match schedule::plan(&spec, &req) {
                    Ok(p) => p,
                    // Odd DualPipe pipelines and V-cuts longer than the model are refused.
                    Err(e) => {
                        assert!(
                            (kind == Kind::DualPipe && pp % 2 == 1)
                                || (kind == Kind::DualPipeV && 2 * pp as usize > pieces.len()),
                            "{model} {kind:?} {pp}: {e}"
                        );
                        continue;
                    }
                };
                let stages = if kind == Kind::DualPipeV { 2 * pp } else { pp } as usize;
                assert_eq!(plan.stages.len(), stages);
                let largest = plan.stages.iter().map(|s| s.forward_flops).max().unwrap();
                assert_eq!(largest, textbook_min_max(&forward, stages), "{model} {kind:?} {pp}");
                // The stages' costs are their pieces' (the embedding, the layers, the head).
                for s in &plan.stages {
                    let mine: u64 = pieces
                        .iter()
                        .filter(|(p, _)| match p {
                            Piece::Embedding => s.embedding,
                            Piece::Layer(l) => s.layers.contains(l),
                            Piece::Head => s.head,
                        })
                        .map(|(_, c)| c.forward)
                        .sum();
                    assert_eq!(s.forward_flops, mine);
                }
                layer_stages(&plan, spec.model.num_hidden_layers);
                kiln_ir::schedule::verify(&plan.lists).unwrap();
                // Placement, from the schedule's rules ([P] §3.2.1, reference §6.2-6.3).
                let pp_ = pp;
                for (r, rank) in plan.ranks.iter().enumerate() {
                    let r = r as u32;
                    let want = match kind {
                        Kind::OneFOneB | Kind::Zb1p => vec![r],
                        Kind::DualPipe => vec![r, pp_ - 1 - r],
                        Kind::DualPipeV => vec![r, 2 * pp_ - 1 - r],
                    };
                    assert_eq!(rank.stages, want, "{model} {kind:?} {pp}");
                }
                let copies = if kind == Kind::DualPipe { 2 } else { 1 };
                let total: u64 = plan.stages.iter().map(|s| s.params).sum();
                assert_eq!(plan.ranks.iter().map(|r| r.params).sum::<u64>(), copies * total);
            }
        }
    }
}

/// The decoder layer of a parameter name, the piece it belongs to in a model of `layers` layers.
fn piece_of(name: &str, layers: u64) -> Piece {
    if name.starts_with("model.embed_tokens.") {
        return Piece::Embedding;
    }
    match name.strip_prefix("model.layers.").and_then(|r| r.split('.').next()).and_then(|l| l.parse().ok()) {
        Some(l) if l < layers => Piece::Layer(l),
        // The final norm, the head, and the MTP modules (layers L and on).
        _ => Piece::Head,
    }
}

/// Compiles tiny's stateless forward program (with the MTP module) with a plan into `dir`.
fn compile_tiny_with_plan(dir: &Path, args: &[&str]) -> Manifest {
    let d = dir.to_string_lossy();
    let mut all = vec![
        "compile",
        "models/tiny.toml",
        "--target",
        "cpu",
        "--no-kv-cache",
        "--no-score",
        "--max-context",
        "32",
        "-o",
        &d,
    ];
    all.extend_from_slice(args);
    let out = kiln(&all);
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains("parallel plan: "), "{}", out.stdout);
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    let m: Manifest = serde_json::from_str(&text).unwrap();
    m.validate().unwrap();
    m
}

#[test]
fn the_plan_in_a_compiled_artifact_matches_its_parameters_and_graph() {
    let s = Scratch::new();
    let m = compile_tiny_with_plan(&s.path("tiny.kiln"), &["--pp", "2", "--ep", "2"]);
    let plan = m.parallel.as_ref().unwrap();
    let spec = m.model.as_ref().unwrap();
    let layers = spec.model.num_hidden_layers;
    assert_eq!((plan.seq_len, plan.tokens), (32, 32));

    // Each stage's weights are the artifact's parameters of its pieces (FP8 aside: tiny is f32).
    let mut per_piece: BTreeMap<String, u64> = BTreeMap::new();
    for p in &m.params {
        let n: u64 = p.shape.iter().map(|d| d.as_known().unwrap()).product();
        *per_piece.entry(format!("{:?}", piece_of(&p.name, layers))).or_default() += n;
    }
    let held = |s: &kiln_ir::artifact::StageEntry| {
        let mut pieces = Vec::new();
        if s.embedding {
            pieces.push(Piece::Embedding);
        }
        pieces.extend(s.layers.clone().map(Piece::Layer));
        if s.head {
            pieces.push(Piece::Head);
        }
        pieces
    };
    for s in &plan.stages {
        let from_params: u64 = held(s).iter().map(|p| per_piece[&format!("{p:?}")]).sum();
        assert_eq!(s.params, from_params, "stage {}", s.stage);
    }
    // Each stage's weight FLOPs per token are two per weight a token reads: every matrix once, a
    // routed expert's top_k / experts of the time, the head once more for each MTP module; the
    // embedding is a lookup and norm scales and the router's bias multiply no matrix.
    let moe = spec.moe.as_ref().unwrap();
    let mtp = spec.mtp.as_ref().map_or(0, |m| m.num_layers);
    let mut reads: BTreeMap<String, u64> = BTreeMap::new();
    for p in m.params.iter().filter(|p| p.shape.len() == 2 && !p.name.starts_with("model.embed_tokens")) {
        let n: u64 = p.shape.iter().map(|d| d.as_known().unwrap()).product();
        let times_e = if p.name.contains(".mlp.experts.") {
            n * moe.num_experts_per_tok
        } else if p.name == "lm_head.weight" {
            n * (1 + mtp) * moe.n_routed_experts
        } else {
            n * moe.n_routed_experts
        };
        *reads.entry(format!("{:?}", piece_of(&p.name, layers))).or_default() += times_e;
    }
    for s in &plan.stages {
        let r: u64 = held(s).iter().map(|p| reads.get(&format!("{p:?}")).copied().unwrap_or(0)).sum();
        assert_eq!(s.weight_flops * moe.n_routed_experts, 2 * r, "stage {}", s.stage);
    }

    // The dispatch of each MoE layer is what `moe_plan` finds in the graph the passes make, for
    // the plan's tokens and --ep 2.
    let mut ep2 = spec.clone();
    ep2.moe.as_mut().unwrap().ep_size = 2;
    let options = kiln_compiler::pack::Options {
        kv_cache: false,
        score: false,
        ..kiln_compiler::pack::Options::new(kiln_compiler::pack::Targets::Cpu, 1, 32)
    };
    let module = kiln_compiler::pack::module_after(&ep2, &options, Some("plan-moe-dispatch")).unwrap();
    let graph_plans =
        moe_plan::plan_graph(&module.programs[0].graph, plan.tokens, moe_plan::DEFAULT_TILE_ROWS).unwrap();
    let x = plan.experts.as_ref().unwrap();
    assert_eq!(graph_plans.len(), x.layers.len());
    for ((scope, p), l) in graph_plans.iter().zip(&x.layers) {
        assert_eq!(scope, &l.module);
        let d = &l.dispatch;
        assert_eq!(
            (d.rows, d.worst_rows_per_rank, d.worst_padded_rows_per_rank, d.expected_padded_rows_per_rank),
            (p.rows, p.worst_rows_per_rank, p.worst_padded_rows_per_rank, p.expected_padded_rows_per_rank)
        );
        assert_eq!((d.hidden, d.dtype, x.experts_per_rank), (p.hidden, p.dtype, p.experts_per_rank));
        let sizes: Vec<_> = p.all_to_all.iter().map(|a| (a.name, a.worst_bytes, a.expected_bytes)).collect();
        let ours: Vec<_> =
            d.all_to_all.iter().map(|a| (a.name.as_str(), a.worst_bytes, a.expected_bytes)).collect();
        assert_eq!(ours, sizes);
    }
}

#[test]
fn a_tampered_plan_is_refused_naming_the_field() {
    let s = Scratch::new();
    let m = compile_tiny_with_plan(&s.path("t.kiln"), &["--pp", "2", "--schedule", "1f1b", "--ep", "4"]);
    let field = |m: &Manifest| match m.validate() {
        Err(ManifestError::Field { field, message }) => format!("{field}: {message}"),
        other => panic!("{other:?}"),
    };
    let edit = |f: &dyn Fn(&mut ParallelPlan)| {
        let mut m = m.clone();
        f(m.parallel.as_mut().unwrap());
        field(&m)
    };
    // A layer moved out of the pipeline.
    let e = edit(&|p| p.stages[1].layers.start += 1);
    assert!(e.starts_with("parallel.stages[1].layers: "), "{e}");
    // A rank claiming another's stage.
    let e = edit(&|p| p.ranks[0].stages = vec![1]);
    assert!(e.starts_with("parallel.ranks[0].stages: [1], but the lists put stages [0]"), "{e}");
    // A forward dropped from a list: the verifier's message.
    let e = edit(&|p| {
        p.lists.ranks[0].remove(0);
    });
    assert!(e.starts_with("parallel.lists: schedule `1f1b` is invalid"), "{e}");
    // Experts that do not divide over the ranks, or not at the ranges they claim.
    let e = edit(&|p| p.ep = 3);
    assert!(e.contains("ep must divide the experts"), "{e}");
    let e = edit(&|p| p.experts.as_mut().unwrap().ranks.swap(0, 1));
    assert!(e.starts_with("parallel.experts.ranks[0]: experts 4..8; rank 0 holds 0..4"), "{e}");
    // A MoE layer left out, and bytes that are not rows of the model's width.
    let e = edit(&|p| {
        p.experts.as_mut().unwrap().layers.remove(1);
    });
    assert!(e.starts_with("parallel.experts.layers[1]: layer 3 on stage "), "{e}");
    assert!(e.contains("where the model's MoE layers on the plan's stages have layer 2 on stage "), "{e}");
    let e = edit(&|p| p.experts.as_mut().unwrap().layers[0].dispatch.all_to_all[0].worst_bytes += 1);
    assert!(e.starts_with("parallel.experts.layers[0].dispatch.all_to_all[0]"), "{e}");
    // The plan's sizes must be the lists'.
    let e = edit(&|p| p.micro_batches += 1);
    assert!(e.starts_with("parallel.lists: the lists are `1f1b` on 2 ranks with 4 micro-batches"), "{e}");
    // Without a plan the same artifact is valid, as any artifact compiled without --pp.
    let mut plain = m.clone();
    plain.parallel = None;
    plain.validate().unwrap();
    assert!(!serde_json::to_string(&plain).unwrap().contains("parallel"));
}

#[test]
fn an_artifact_without_a_plan_has_no_parallel_field() {
    let s = Scratch::new();
    let dir = s.str("plain.kiln");
    let out = kiln(&[
        "compile",
        "models/tiny.toml",
        "--target",
        "cpu",
        "--no-kv-cache",
        "--no-score",
        "--max-context",
        "32",
        "-o",
        &dir,
    ]);
    assert!(out.ok, "{}", out.stderr);
    assert!(!out.stdout.contains("parallel plan"), "{}", out.stdout);
    let text = std::fs::read_to_string(s.path("plain.kiln/manifest.json")).unwrap();
    assert!(!text.contains("\"parallel\""));
    let m: Manifest = serde_json::from_str(&text).unwrap();
    assert!(m.parallel.is_none());
    m.validate().unwrap();
}

#[test]
fn a_model_without_moe_has_no_expert_plan() {
    let mut dense = spec("tiny.toml");
    dense.moe = None;
    let req = Request { kind: Kind::Zb1p, pp: 3, ep: None, micro_batches: Some(5), seq_len: 64, tokens: 64 };
    let plan = schedule::plan(&dense, &req).unwrap();
    assert_eq!((plan.ep, plan.micro_batches, plan.experts.is_none()), (1, 5, true));
    let e = schedule::plan(&dense, &Request { ep: Some(2), ..req }).unwrap_err();
    assert_eq!(
        e.to_string(),
        "--ep 2: `tiny` has no MoE layers, so there are no experts to spread; leave --ep out"
    );
}

#[test]
fn impossible_requests_are_refused() {
    let err = |args: &[&str]| {
        let mut all = vec!["compile"];
        all.extend_from_slice(args);
        let out = kiln(&all);
        assert!(!out.ok, "{args:?} succeeded: {}", out.stdout);
        out.stderr
    };
    let e = err(&["models/tiny.toml", "--pp", "0", "--emit", "plan"]);
    assert!(e.contains("--pp 0: a pipeline needs at least 1 rank"), "{e}");
    let e = err(&["models/tiny.toml", "--pp", "4", "--schedule", "dualpipev", "--emit", "plan"]);
    assert!(
        e.contains(
            "--pp 4: dualpipev cuts the model into 8 stages, but `tiny` has only 6 pieces to cut (the \
             embedding, 4 decoder layers and the head); try --pp 3 or fewer"
        ),
        "{e}"
    );
    let e = err(&["models/deepseek_v3.toml", "--pp", "16", "--ep", "48", "--emit", "plan"]);
    assert!(e.contains("--ep 48: 256 routed experts cannot be spread evenly over 48 ranks; --ep must divide them: 1, 2, 4, 8, 16, 32, 64, 128, 256"), "{e}");
    let e = err(&["models/tiny.toml", "--pp", "3", "--emit", "plan"]);
    assert!(e.contains("--pp 3: dualpipe needs an even number of ranks"), "{e}");
    let e = err(&["models/tiny.toml", "--pp", "2", "--micro-batches", "3", "--emit", "plan"]);
    assert!(e.contains("--micro-batches 3: dualpipe on 2 ranks needs at least 4 micro-batches"), "{e}");
    let e = err(&["models/tiny.toml", "--emit", "plan"]);
    assert!(e.contains("--emit plan prints the parallel plan of --pp"), "{e}");
    let e = err(&["tests/compile/small.kir", "--pp", "2", "--emit", "plan"]);
    assert!(e.contains("a .kir graph without --spec has no model to cut"), "{e}");
    let e = err(&["models/tiny.toml", "--ep", "2"]);
    assert!(e.contains("--pp <P>"), "{e}");
}

#[test]
fn the_plan_file_is_written_atomically_with_a_summary() {
    let s = Scratch::new();
    let file = s.str("plan.json");
    let out = kiln(&["compile", "models/tiny.toml", "--pp", "2", "--ep", "2", "--emit", "plan", "-o", &file]);
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.starts_with("parallel plan: dualpipe on 2 ranks, 4 micro-batches, 2 stages"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.ends_with(&format!("wrote {file}\n")), "{}", out.stdout);
    assert_eq!(s.entries(), ["plan.json"]);
    let plan: ParallelPlan = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    // The same plan as on standard output.
    assert_eq!(plan, plan_of("models/tiny.toml", &["--pp", "2", "--ep", "2"]));
    // A directory is not a file to write the plan to.
    let out = kiln(&["compile", "models/tiny.toml", "--pp", "2", "--emit", "plan", "-o", &s.str("")]);
    assert!(!out.ok && out.stderr.contains("give a file path"), "{}", out.stderr);
}
