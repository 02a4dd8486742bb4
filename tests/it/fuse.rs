//! `fuse-kernels` in the packed program: launches per decoder layer, counted from the steps of an
//! artifact's program (any program: the forward, a prefill or the decode steps; [`by_layer`]), and
//! the FP8 GEMMs' effect on the activation arena.

use std::collections::BTreeMap;

use kiln_compiler::build::build_layer;
use kiln_compiler::codegen::form_kernels;
use kiln_compiler::pack::{self, plan_memory, Observer, Options, Source, Targets};
use kiln_compiler::passes::{self, fuse_kernels, Options as PassOptions};
use kiln_ir::artifact::Step;
use kiln_ir::ModelSpec;

fn spec(name: &str) -> ModelSpec {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("models/{name}.toml"));
    kiln_compiler::spec::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// Launches per decoder layer of a program: `layer -> (all, in the MoE or MLP block)`, from each
/// launch's scope (`model.layers.N...`, the block `model.layers.N.mlp...`).
pub fn by_layer(program: &[Step]) -> BTreeMap<u64, (usize, usize)> {
    let mut out: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
    for step in program {
        let Step::Launch { scope: Some(scope), .. } = step else { continue };
        let Some(rest) = scope.strip_prefix("model.layers.") else { continue };
        let (layer, block) = rest.split_once('.').unwrap_or((rest, ""));
        let Ok(layer) = layer.parse::<u64>() else { continue };
        let e = out.entry(layer).or_default();
        e.0 += 1;
        if block == "mlp" || block.starts_with("mlp.") {
            e.1 += 1;
        }
    }
    out
}

/// Skips one pass, as `kiln compile --disable-pass` does.
struct Without(&'static str);

impl Observer for Without {
    fn runs_pass(&mut self, pass: &str) -> bool {
        pass != self.0
    }
}

/// The steps a decode step runs (the decode program when the artifact has one, else the forward,
/// which a one-token step runs whole).
fn decode_steps(a: &pack::Artifact) -> Vec<Step> {
    let m = &a.manifest;
    let p = m.program_of_kind(kiln_ir::ProgramKind::Decode).unwrap_or(&m.programs[0]);
    // Weight-only launches run once at load, not at each step.
    let folded = p.weight_only_steps(&m.kernels);
    p.steps.iter().enumerate().filter(|(i, _)| !folded.contains(i)).map(|(_, s)| s.clone()).collect()
}

#[test]
fn a_moe_layer_of_tiny_decodes_in_at_most_10_launches() {
    let s = spec("tiny");
    let options = Options { score: false, ..Options::new(Targets::Cpu, 1, 8) };
    let fused = pack::compile(Source::Spec(s.clone()), &options, &mut ()).unwrap_or_else(|e| panic!("{e}"));
    let plain = pack::compile(Source::Spec(s.clone()), &options, &mut Without("fuse-kernels"))
        .unwrap_or_else(|e| panic!("{e}"));
    let (after, before) = (by_layer(&decode_steps(&fused)), by_layer(&decode_steps(&plain)));
    eprintln!("launches per layer (all, mlp): before {before:?}, after {after:?}");
    let first_moe = s.moe.as_ref().unwrap().first_k_dense_replace;
    assert_eq!(after.len() as u64, s.model.num_hidden_layers);
    for (&layer, &(all, mlp)) in &after {
        let (all_before, mlp_before) = before[&layer];
        assert!(all < all_before && mlp < mlp_before, "layer {layer}: {all} launches, {all_before} unfused");
        if layer >= first_moe {
            // The whole decode step of the layer: attention (the cache update is a launch of its
            // own) and the MoE block, whose routed expert GEMMs keep kernels of their own.
            assert!(all <= 10, "MoE layer {layer}: {all} launches per decode step ({mlp} in its MoE block)");
        }
    }
}

/// One DeepSeek-V3 MoE layer with FP8 weights: before fuse-kernels every routed expert's
/// dequantised weight is an f32 activation in the arena; after it the GEMMs read the FP8 codes and
/// scales, and the arena holds activations only.
#[test]
fn fp8_gemms_keep_dequantised_weights_out_of_the_arena() {
    let s = spec("deepseek_v3");
    let mut g = build_layer(&s, 3).unwrap();
    for p in ["plan-moe-dispatch", "insert-fp8-casts", "dce"] {
        passes::run_pass(&mut g, passes::find(p).unwrap(), &PassOptions::new(&s)).unwrap();
    }
    let max = kiln_ir::SymBindings { b: 1, t: 1, s: 1 };
    let arena = |g: &kiln_ir::Graph| plan_memory(g, &form_kernels(g).unwrap(), max, &[]).unwrap().arena_bytes;
    let before = arena(&g);
    passes::run_pass(&mut g, passes::find("fuse-kernels").unwrap(), &PassOptions::new(&s)).unwrap();
    let after = arena(&g);
    eprintln!("one V3 MoE layer at one token: arena {before} bytes before fuse-kernels, {after} after");
    // 256 routed experts x 3 weights of 7168 x 2048 f32 is 45 GB; one is 58.7 MB.
    let one_weight = 7168 * 2048 * 4;
    assert!(before > 700 * one_weight, "{before}");
    assert!(after < one_weight, "{after}");
}

/// Keeps the graph after `fuse-kernels`.
#[derive(Default)]
struct AfterFusion(Option<kiln_ir::Graph>);

impl Observer for AfterFusion {
    fn finished(&mut self, stage: pack::Stage, dump: &pack::Dump<'_>) {
        if let (pack::Stage::Pass("fuse-kernels"), pack::Dump::Graph(g)) = (stage, dump) {
            self.0 = Some((*g).clone());
        }
    }
}

/// A train step's AdamW update of one parameter is one elementwise kernel: the new moments and the
/// new weight come out of one `fused` node, which also reads the clipped gradient's scale, the
/// decayed weight and the decayed second moment (producers after the chain's seed in program
/// order), and the graph has no launch per parameter left outside it.
#[test]
fn a_train_steps_adamw_update_is_one_kernel_per_parameter() {
    let spec = spec("tiny");
    let options = Options {
        train: Some(kiln_compiler::pack::TrainOptions::default()),
        kv_cache: false,
        score: false,
        ..Options::new(Targets::Cpu, 2, 16)
    };
    let mut after = AfterFusion::default();
    pack::make_module(Source::Spec(spec), &options, &mut after).unwrap();
    let g = after.0.expect("fuse-kernels ran");
    let name = "model.layers.1.mlp.experts.0.down_proj.weight";
    let producer = |out: &str| {
        let &(_, v) = g.outputs().iter().find(|(n, _)| n == out).unwrap_or_else(|| panic!("no output {out}"));
        g.producer(v)
    };
    let (m, v, w) =
        (producer(&format!("adam.m.{name}")), producer(&format!("adam.v.{name}")), producer(name));
    assert!(m == v && v == w, "the moments and the weight come from one node");
    let kiln_ir::Op::Fused { body, .. } = &g.node(w).op else { panic!("{:?} is not fused", g.node(w).op) };
    let computing =
        body.nodes().into_iter().filter(|&n| !matches!(body.node(n).op, kiln_ir::Op::Input { .. })).count();
    assert!(computing >= 15, "the whole update, {computing} nodes");
    // Nothing reads the old weight or second moment but that kernel (and the forward's GEMMs).
    for state in [format!("adam.v.{name}"), format!("adam.m.{name}")] {
        let input = g
            .nodes()
            .into_iter()
            .find(|&n| matches!(&g.node(n).op, kiln_ir::Op::Input { name } if *name == state))
            .unwrap();
        let users = g.users(g.node(input).results[0]);
        assert_eq!(users, vec![w], "{state} is read by the update alone");
    }
}

/// Without gradient clipping nothing holds an optimizer's update back from its gradient's GEMM,
/// and the memory plan updates a state in place only in an elementwise kernel: so fusion leaves
/// the update out of the GEMM's epilogue, and the train step plans (it used to fail with "cannot
/// be updated in place").
#[test]
fn a_train_step_without_clipping_plans_its_in_place_updates() {
    let optimizer = kiln_compiler::train::Optimizer { clip: None, ..Default::default() };
    let options = Options {
        train: Some(kiln_compiler::pack::TrainOptions { optimizer, ..Default::default() }),
        kv_cache: false,
        score: false,
        ..Options::new(Targets::Cpu, 2, 16)
    };
    let prepared = pack::prepare(Source::Spec(spec("tiny")), &options, &mut ());
    assert!(prepared.is_ok(), "{}", prepared.err().map(|e| e.to_string()).unwrap_or_default());
}

/// What `fuse-kernels` does on `tiny_fp8` resized to `layers` decoder layers of `experts` routed
/// experts, summed over the prefill and the decode program (so `decode-phases` runs too): FP8
/// weights make every GEMM copy its weights' `dequantize`s in, one per expert in the MoE layers.
fn fusion_work(layers: u64, experts: u64) -> fuse_kernels::Work {
    let mut s = spec("tiny_fp8");
    s.model.num_hidden_layers = layers;
    s.moe.as_mut().unwrap().n_routed_experts = experts;
    let options = Options { score: false, ..Options::new(Targets::Cpu, 1, 8) };
    let module = pack::module_after(&s, &options, Some("dce")).unwrap_or_else(|e| panic!("{e}"));
    let mut work = fuse_kernels::Work::default();
    for p in module.programs {
        let mut g = p.graph;
        let (trace, w) = fuse_kernels::rewrite_counted(&mut g, p.kind).unwrap_or_else(|e| panic!("{e}"));
        assert!(trace.count(fuse_kernels::FP8_GEMM) > 0, "{}: {trace}", p.name);
        work += w;
    }
    work
}

/// fuse-kernels' work (nodes it numbers, walks through and copies into candidate bodies) grows
/// linearly with the graph, in depth (layers) and in width (experts): doubling the layers (or the
/// experts) again adds at most twice what the previous doubling added, so an added layer (or
/// expert) costs no more in a bigger model. No rule walks the whole graph per candidate, and a
/// GEMM's copied-in weights cost it once each. Counted, not timed.
#[test]
fn fuse_kernels_work_grows_linearly() {
    let by_layers: Vec<u64> = [4, 8, 16].into_iter().map(|l| fusion_work(l, 16).visited).collect();
    let by_experts: Vec<u64> = [16, 32, 64].into_iter().map(|e| fusion_work(4, e).visited).collect();
    eprintln!("nodes visited by layers 4, 8, 16: {by_layers:?}; by experts 16, 32, 64: {by_experts:?}");
    for w in [&by_layers, &by_experts] {
        assert!(
            w[0] < w[1] && w[2] - w[1] <= 2 * (w[1] - w[0]),
            "the second doubling costs more than twice the first: {w:?}"
        );
    }
}

/// fuse-kernels' work on the train step of `tiny` resized to `layers` decoder layers, and the most
/// nodes an `elementwise-chain` kernel of it computes.
fn train_fusion_work(layers: u64) -> (fuse_kernels::Work, usize) {
    let mut s = spec("tiny");
    s.model.num_hidden_layers = layers;
    // DeepSeek-V3's weights are bf16, and so are tiny's here: the optimizer's f32 copy of each
    // gradient is then a kernel of the GEMM that computes it, with the gradient's square (which
    // the norm sums) and its clipped value as candidates for the same kernel.
    s.model.dtype = kiln_ir::DType::BF16;
    let options = Options {
        train: Some(kiln_compiler::pack::TrainOptions::default()),
        kv_cache: false,
        score: false,
        ..Options::new(Targets::Cpu, 1, 8)
    };
    let module = pack::module_after(&s, &options, Some("dce")).unwrap_or_else(|e| panic!("{e}"));
    let (mut work, mut largest) = (fuse_kernels::Work::default(), 0);
    for p in module.programs {
        let mut g = p.graph;
        let (_, w) = fuse_kernels::rewrite_counted(&mut g, p.kind).unwrap_or_else(|e| panic!("{e}"));
        work += w;
        for n in g.nodes() {
            if let kiln_ir::Op::Fused { name, body } = &g.node(n).op {
                if name == fuse_kernels::ELEMENTWISE_CHAIN {
                    let computed = body.nodes().iter().filter(|&&m| !body.node(m).op.declares_type()).count();
                    largest = largest.max(computed);
                }
            }
        }
    }
    (work, largest)
}

/// The same on a train step, whose global gradient norm is a chain of one scalar add per
/// parameter: grown into one kernel a node at a time, with a convexity walk across the backward
/// pass each time, it made the work quadratic in depth (and DeepSeek-V3's train step ran out of
/// memory). `elementwise-chain` takes at most `MAX_CHAIN_NODES` nodes, so the chain becomes
/// kernels of that many adds, more of them the deeper the model.
///
/// Every parameter's gradient feeds the norm and is then scaled by the clipping coefficient, and
/// asking whether one kernel may hold both (it may not) walked the backward pass once per
/// parameter, until the coefficient became a pivot that answers without a walk (bf16 weights: 0.9
/// then 2.6 million nodes more per doubling without it). The placement of the kernels counts too:
/// it dissolved the cyclic groups of a train step one at a time, placing the whole graph again
/// after each.
#[test]
fn train_step_fusion_work_grows_linearly() {
    let runs: Vec<(fuse_kernels::Work, usize)> = [4, 8, 16].into_iter().map(train_fusion_work).collect();
    let w: Vec<u64> = runs.iter().map(|(w, _)| w.visited).collect();
    eprintln!("train step, nodes visited by layers 4, 8, 16: {w:?}");
    assert!(w[0] < w[1] && w[2] - w[1] <= 2 * (w[1] - w[0]), "the second doubling costs more: {w:?}");
    for (layers, (_, largest)) in [4, 8, 16].into_iter().zip(&runs) {
        assert!(
            (2..=fuse_kernels::MAX_CHAIN_NODES).contains(largest),
            "{layers} layers: an elementwise chain of {largest} nodes"
        );
    }
}

/// Identical layers are analysed once: however many identical MoE layers the model has, codegen's
/// fusion analysis runs on the same number of distinct candidate bodies, and every further layer
/// reuses them.
#[test]
fn identical_layers_share_one_fusion_analysis() {
    let (four, eight) = (fusion_work(4, 16), fusion_work(8, 16));
    assert_eq!(four.analyses, eight.analyses, "4 layers: {four:?}, 8 layers: {eight:?}");
    assert!(eight.reused > four.reused, "4 layers: {four:?}, 8 layers: {eight:?}");
}
