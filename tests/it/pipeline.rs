//! The pipeline's stage programs (`kiln_compiler::pipeline::split`) compute exactly what the
//! `accumulate` program they are cut from computes: run on the reference interpreter one after
//! another (every stage's forward in order, then every stage's backward and weight phases in
//! reverse), handing each the values the others output under its input names, they give every
//! accumulator, loss and load bit for bit, for cuts of every shape: the embedding alone, the head
//! alone, one layer a stage, with the MTP module and balance losses on or off, and on the FP8
//! recipe. The multi-process run is `tests/it/dist.rs`.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use kiln_compiler::build::TrainLosses;
use kiln_compiler::pack::{self, Options, TrainOptions};
use kiln_compiler::pipeline::{split, Cut, Phase, StageProgram};
use kiln_compiler::target::Targets;
use kiln_ir::artifact::StageEntry;
use kiln_ir::interp::{self, Tensor};
use kiln_ir::module::ProgramKind;
use kiln_ir::{DType, Graph, SymBindings};

fn stage(stage: u32, embedding: bool, layers: Range<u64>, head: bool) -> StageEntry {
    StageEntry { stage, embedding, layers, head, forward_flops: 0, weight_flops: 0, params: 0 }
}

/// Deterministic inputs for every input of `g` at 1 x 8 tokens: ids within the vocabulary,
/// positions `0..8`, small floats, and `accumulate.keep` 1 (so the accumulators' old values count).
fn inputs(g: &Graph) -> HashMap<String, Tensor> {
    let bind = SymBindings { b: 1, t: 8, s: 8 };
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out = HashMap::new();
    for (name, v) in g.inputs() {
        let ty = g.ty(v);
        let shape: Vec<u64> = ty.shape.iter().map(|d| d.eval(&bind).unwrap()).collect();
        let n: u64 = shape.iter().product();
        let t = match ty.dtype {
            DType::I32 | DType::I64 => {
                let data = (0..n as i64)
                    .map(|i| if name == "positions" { i % 8 } else { (next() % 500) as i64 + 2 })
                    .collect();
                Tensor::from_i64(ty.dtype, shape, data).unwrap()
            }
            dtype => {
                let data =
                    (0..n)
                        .map(|_| {
                            if name == "accumulate.keep" {
                                1.0
                            } else {
                                (next() % 2001) as f32 / 1000.0 - 1.0
                            }
                        })
                        .map(|x| {
                            if name.contains("layernorm") || name.contains("norm.weight") {
                                1.0 + x / 4.0
                            } else {
                                x / 8.0
                            }
                        })
                        .collect();
                Tensor::from_f32(dtype, shape, data).unwrap()
            }
        };
        out.insert(name.to_string(), t);
    }
    out
}

fn accumulate(model: &str, losses: TrainLosses) -> (Graph, HashSet<String>) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("models/{model}.toml"));
    let spec = kiln_compiler::spec::load(&path).unwrap();
    let options = Options {
        train: Some(TrainOptions { losses, accumulate: true, ..Default::default() }),
        kv_cache: false,
        score: false,
        ..Options::new(Targets::Cpu, 1, 8)
    };
    let module = pack::module_after(&spec, &options, Some("dce")).unwrap();
    let states = module.states.iter().map(|s| s.name.clone()).collect();
    let acc = module.programs.into_iter().find(|p| p.kind == ProgramKind::Accumulate).unwrap();
    (acc.graph, states)
}

/// Runs the parts in a pipeline's order on the interpreter, from `given`; returns every value
/// they output, by name.
fn run_parts(parts: &[StageProgram], given: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let stages = parts.iter().map(|p| p.stage).max().unwrap() + 1;
    let mut order: Vec<(u32, Phase)> = (0..stages).map(|s| (s, Phase::Forward)).collect();
    for s in (0..stages).rev() {
        order.extend([(s, Phase::Backward), (s, Phase::Weight)]);
    }
    let mut values = given.clone();
    for (s, phase) in order {
        let Some(p) = parts.iter().find(|p| p.stage == s && p.phase == phase) else { continue };
        let feeds: HashMap<String, Tensor> = (p.graph.inputs().into_iter())
            .map(|(n, _)| {
                let t = values.get(n).unwrap_or_else(|| panic!("stage {s} {phase:?}: `{n}` was never made"));
                (n.to_string(), t.clone())
            })
            .collect();
        let out = interp::run(&p.graph, &feeds, &HashMap::new()).unwrap();
        values.extend(out);
    }
    values
}

#[test]
fn stage_programs_compute_the_accumulate_program_bit_for_bit() {
    let cuts: Vec<Vec<StageEntry>> = vec![
        vec![stage(0, true, 0..0, false), stage(1, false, 0..4, true)],
        vec![stage(0, true, 0..2, false), stage(1, false, 2..4, false), stage(2, false, 4..4, true)],
        vec![
            stage(0, true, 0..1, false),
            stage(1, false, 1..2, false),
            stage(2, false, 2..3, false),
            stage(3, false, 3..4, true),
        ],
    ];
    let plain = TrainLosses::default();
    // With the MTP module on, the last stage reads the first stage's embedding.
    let all = TrainLosses {
        mtp_lambda: 0.3,
        balance_alpha: 1e-4,
        bias_update_speed: 1e-3,
        ..TrainLosses::default()
    };
    // tiny_fp8: bf16 weights and DeepSeek's FP8 recipe, its activation caches included.
    for (model, losses) in [("tiny", plain), ("tiny", all), ("tiny_fp8", all)] {
        let (acc, states) = accumulate(model, losses);
        let given = inputs(&acc);
        let reference = interp::run(&acc, &given, &HashMap::new()).unwrap();
        let state_names: HashSet<&str> = states.iter().map(String::as_str).collect();
        // The FP8 model interprets slowly: one cut.
        let cuts = if model == "tiny_fp8" { &cuts[1..2] } else { &cuts[..] };
        for stages in cuts {
            let cut = Cut { stages, layers: 4 };
            let parts = split(&acc, &cut, &state_names).unwrap_or_else(|e| panic!("{stages:?}: {e}"));
            // Every output of the accumulate program is made by exactly one part.
            for (name, _) in acc.outputs() {
                let makers =
                    parts.iter().filter(|p| p.graph.outputs().iter().any(|(n, _)| n == name)).count();
                assert_eq!(makers, 1, "{name} is made by {makers} parts");
            }
            let got = run_parts(&parts, &given);
            for (name, want) in &reference {
                assert_eq!(got[name].as_f32(), want.as_f32(), "{name} differs under the cut {stages:?}");
            }
        }
    }
}

/// The MTP modules, on the last stage, look their tokens up in the first stage's embedding: the
/// lookup and its gradient run where the table is, so what crosses between stages is the rows and
/// their gradient (a token dimension), never the `V × d` table or its gradient, and no stage reads
/// a weight another stage holds.
#[test]
fn the_mtp_lookup_sends_rows_not_the_table() {
    let losses = TrainLosses { mtp_lambda: 0.3, ..TrainLosses::default() };
    let (acc, states) = accumulate("tiny", losses);
    let state_names: HashSet<&str> = states.iter().map(String::as_str).collect();
    let cuts: Vec<Vec<StageEntry>> = vec![
        vec![stage(0, true, 0..4, false), stage(1, false, 4..4, true)],
        vec![stage(0, true, 0..1, false), stage(1, false, 1..3, false), stage(2, false, 3..4, true)],
    ];
    for stages in &cuts {
        let cut = Cut { stages, layers: 4 };
        let parts = split(&acc, &cut, &state_names).unwrap();
        let last = stages.len() as u32 - 1;
        let mut crossing_to_first = 0;
        for p in &parts {
            for (name, v) in p.graph.inputs() {
                if let Some((_, from, to)) = kiln_compiler::pipeline::parse_sent(name) {
                    let ty = p.graph.ty(v);
                    assert!(
                        ty.shape.first().is_some_and(|d| d.to_string() == "B"),
                        "{name} ({ty}) crosses from stage {from} to {to} under {stages:?}: only activations \
                         and their gradients may"
                    );
                    crossing_to_first += usize::from(from == last && to == 0);
                }
                if state_names.contains(name) {
                    assert_eq!(
                        cut.of_name(name),
                        Some(p.stage),
                        "stage {} reads `{name}`, which another stage holds, under {stages:?}",
                        p.stage
                    );
                }
            }
        }
        // The MTP lookup's rows' gradient comes back to the first stage from the last.
        assert!(crossing_to_first >= 1, "nothing crosses from the last stage to the first under {stages:?}");
    }
}
